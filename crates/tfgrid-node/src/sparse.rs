//! A redb storage backend in memory that holds only the pages written. redb's own
//! `InMemoryBackend` is one zero-filled buffer as long as the file, about 2 MB for an empty
//! database; thousands of simulated nodes each with a store would spend gigabytes on zeros.
//! No crate offers a sparse one, so it is written here: a page map, zeros where nothing was
//! written.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

const PAGE: u64 = 4096;

#[derive(Debug, Default)]
pub struct SparseMemory {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    len: u64,
    pages: HashMap<u64, Box<[u8]>>,
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "beyond the end of the database",
    )
}

impl SparseMemory {
    /// The memory the written pages take.
    #[cfg(test)]
    fn resident(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pages
            .len() as u64
            * PAGE
    }
}

impl redb::StorageBackend for SparseMemory {
    fn len(&self) -> io::Result<u64> {
        Ok(self.inner.lock().unwrap_or_else(|p| p.into_inner()).len)
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset.checked_add(len as u64).ok_or_else(out_of_range)?;
        if end > g.len {
            return Err(out_of_range());
        }
        let mut out = vec![0u8; len];
        let mut at = offset;
        while at < end {
            let (page, off) = (at / PAGE, at % PAGE);
            let n = (PAGE - off).min(end - at);
            if let Some(p) = g.pages.get(&page) {
                let dst = (at - offset) as usize;
                out[dst..dst + n as usize].copy_from_slice(&p[off as usize..(off + n) as usize]);
            }
            at += n;
        }
        Ok(out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if len < g.len {
            // Pages past the end go; the last one keeps only what is below the end, so a later
            // growth reads zeros there as a file would.
            let keep = len.div_ceil(PAGE);
            g.pages.retain(|p, _| *p < keep);
            if !len.is_multiple_of(PAGE) {
                if let Some(p) = g.pages.get_mut(&(len / PAGE)) {
                    p[(len % PAGE) as usize..].fill(0);
                }
            }
        }
        g.len = len;
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(out_of_range)?;
        if end > g.len {
            return Err(out_of_range());
        }
        let mut at = offset;
        while at < end {
            let (page, off) = (at / PAGE, at % PAGE);
            let n = (PAGE - off).min(end - at);
            let src = (at - offset) as usize;
            let chunk = &data[src..src + n as usize];
            match g.pages.get_mut(&page) {
                Some(p) => p[off as usize..(off + n) as usize].copy_from_slice(chunk),
                // A page of zeros written whole stays unallocated: redb zeroes what it frees.
                None if chunk.iter().all(|b| *b == 0) => {}
                None => {
                    let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
                    p[off as usize..(off + n) as usize].copy_from_slice(chunk);
                    g.pages.insert(page, p);
                }
            }
            at += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::StorageBackend;

    #[test]
    fn reads_what_was_written_and_zeros_elsewhere() {
        let m = SparseMemory::default();
        m.set_len(3 * PAGE).unwrap();
        m.write(PAGE - 2, b"abcd").unwrap();
        assert_eq!(m.read(PAGE - 3, 6).unwrap(), b"\0abcd\0");
        assert_eq!(m.resident(), 2 * PAGE);
        assert!(m.write(3 * PAGE - 1, b"xy").is_err());
        assert!(m.read(3 * PAGE, 1).is_err());
        // Shrinking drops what is past the end; growing again reads zeros there.
        m.set_len(PAGE - 1).unwrap();
        m.set_len(2 * PAGE).unwrap();
        assert_eq!(m.read(PAGE - 3, 6).unwrap(), b"\0a\0\0\0\0");
        assert_eq!(m.resident(), PAGE);
    }

    #[test]
    fn a_database_on_it_keeps_its_data_in_a_fraction_of_redbs_own_memory_backend() {
        let db = redb::Database::builder()
            .create_with_backend(SparseMemory::default())
            .unwrap();
        const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(T).unwrap();
            for i in 0..1000u64 {
                t.insert(i, vec![i as u8; 100].as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(T).unwrap();
        assert_eq!(t.get(777).unwrap().unwrap().value(), vec![9u8; 100]);
        assert_eq!(t.range(0u64..).unwrap().count(), 1000);
    }
}
