//! One namespace: its settings, its append-only files and the in-memory index over them.
//!
//! Writes are appended to in-memory buffers under the namespace lock and reach the data file in
//! one write per connection batch (`sync`), before any reply of that batch is sent: an
//! acknowledged write is in the kernel and survives the process being killed. `--sync` adds an
//! fsync for power loss. Index entries follow lazily (on a timer, or when the buffer is large):
//! the data files hold everything an index entry says, so at start the entries the index is
//! missing are rebuilt from the data written after the last indexed one.

use crate::format::{
    self, DataHead, IndexRecord, Parsed, DATA_HEAD, FILE_HEADER, FLAG_DELETED, MAX_KEY,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How keys are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The client names its keys.
    #[default]
    User,
    /// `SET "" value` allocates the next id: an 8-byte little-endian counter.
    Seq,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "user" | "userkey" => Some(Mode::User),
            "seq" | "sequential" => Some(Mode::Seq),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::User => "userkey",
            Mode::Seq => "sequential",
        }
    }
}

/// A namespace's settings, kept in `settings.json` beside its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub password: Option<String>,
    /// Readable without the password (writes still need it).
    pub public: bool,
    /// Bytes of live values allowed; 0 is unlimited.
    pub maxsize: u64,
    pub mode: Mode,
    /// Write once: no overwrite, no delete.
    pub worm: bool,
    /// Read-only for everyone.
    pub lock: bool,
    /// No access at all.
    pub freeze: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            password: None,
            public: true,
            maxsize: 0,
            mode: Mode::User,
            worm: false,
            lock: false,
            freeze: false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// A data file is closed and the next one started past this size.
    pub datasize: u64,
    /// fsync the data file before acknowledging writes.
    pub sync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            datasize: 64 * 1024 * 1024,
            sync: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Corrupt { path: PathBuf, msg: String },
}

/// A refused or failed operation; the message is the RESP error the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NsError {
    #[error("{0}")]
    Refused(&'static str),
    #[error("Cannot write data right now")]
    WriteFailed,
    #[error("Data corrupted (CHECK reports it)")]
    Corrupt,
    #[error("Internal error: {0}")]
    Read(String),
}

/// What opening found: reported in the log and in NSINFO.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Bytes cut from the end of files after a torn write.
    pub truncated_bytes: u64,
    /// Damaged stretches found inside files, as (file name, offset, length).
    pub corrupt: Vec<(String, u64, u64)>,
    /// Index entries rebuilt from the data files.
    pub reindexed: u64,
    /// The index was damaged in the middle and rebuilt from the data files.
    pub index_rebuilt: bool,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    file: u32,
    offset: u64,
    len: u32,
    crc: u32,
    ts: u32,
    pos: u64,
    prev: u64,
    deleted: bool,
}

/// Proof of an appended write; `Namespace::sync` turns it into a durable one.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    epoch: u64,
    seq: u64,
}

pub enum SetOutcome {
    Stored(Vec<u8>, Ticket),
    Unchanged,
}

pub struct ScanItem {
    pub key: Arc<[u8]>,
    pub len: u32,
    pub ts: u32,
}

pub struct History {
    /// Where the previous version is, for the next HISTORY call (None: the oldest).
    pub prev: Option<u64>,
    pub ts: u32,
    pub value: Vec<u8>,
}

pub struct Info {
    pub settings: Settings,
    pub entries: u64,
    pub data_bytes: u64,
    pub index_bytes: u64,
    pub data_files: usize,
    pub report: OpenReport,
}

pub struct Namespace {
    pub name: String,
    dir: PathBuf,
    opts: StoreOptions,
    removed: AtomicBool,
    state: Mutex<State>,
}

struct State {
    settings: Settings,
    keys: HashMap<Arc<[u8]>, Entry>,
    /// Live keys by the index position of their current version: SCAN's order.
    order: BTreeMap<u64, Arc<[u8]>>,
    live_bytes: u64,
    next_id: u64,
    data_files: Vec<Arc<File>>,
    /// Bytes of the last data file that are written; `data_pending` follows them.
    data_len: u64,
    data_pending: Vec<u8>,
    index: Arc<File>,
    index_len: u64,
    index_pending: Vec<u8>,
    /// Bumped when unflushed writes are lost (a failed write), voiding outstanding tickets.
    epoch: u64,
    appended: u64,
    synced: u64,
    report: OpenReport,
}

const INDEX_FLUSH_AT: usize = 256 * 1024;
const SCAN_SLICE: Duration = Duration::from_millis(2);
const SCAN_MAX: usize = 10_000;

fn now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

fn data_name(id: u32) -> String {
    format!("d{id:05}")
}

impl Namespace {
    /// Opens (creating if missing) the namespace in `dir`, recovering from a torn tail and
    /// reporting damage inside its files.
    pub fn open(
        dir: &Path,
        name: &str,
        opts: StoreOptions,
        mode: Mode,
    ) -> Result<Arc<Namespace>, OpenError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let settings_path = dir.join("settings.json");
        let settings = match fs::read(&settings_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| OpenError::Corrupt {
                path: settings_path.clone(),
                msg: format!("unreadable settings: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let s = Settings {
                    mode,
                    ..Settings::default()
                };
                write_settings(dir, &s).map_err(io(&settings_path))?;
                s
            }
            Err(e) => return Err(io(&settings_path)(e)),
        };
        let ns = Namespace {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            opts,
            removed: AtomicBool::new(false),
            state: Mutex::new(load(dir, name, settings)?),
        };
        Ok(Arc::new(ns))
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub fn settings(&self) -> Settings {
        self.state.lock().settings.clone()
    }

    /// Changes settings through `f`, persisting them; `f` may refuse.
    pub fn update_settings(
        &self,
        f: impl FnOnce(&mut Settings, u64) -> Result<(), NsError>,
    ) -> Result<(), NsError> {
        let mut st = self.state.lock();
        let mut s = st.settings.clone();
        let entries = st.keys.len() as u64;
        f(&mut s, entries)?;
        write_settings(&self.dir, &s).map_err(|e| {
            tracing::error!(ns = %self.name, "saving settings: {e}");
            NsError::WriteFailed
        })?;
        st.settings = s;
        Ok(())
    }

    pub fn set(&self, key: &[u8], value: &[u8], ts: Option<u32>) -> Result<SetOutcome, NsError> {
        if key.len() > MAX_KEY {
            return Err(NsError::Refused("Key too large"));
        }
        let mut st = self.state.lock();
        st.writable()?;
        let key: Vec<u8> = match st.settings.mode {
            Mode::User if key.is_empty() => {
                return Err(NsError::Refused("Invalid argument, key needed"))
            }
            Mode::User => key.to_vec(),
            Mode::Seq if key.is_empty() => st.next_id.to_le_bytes().to_vec(),
            Mode::Seq => {
                if st.keys.get(key).is_none_or(|e| e.deleted) {
                    return Err(NsError::Refused("Invalid key, only update authorized"));
                }
                key.to_vec()
            }
        };
        let crc = format::crc(value);
        let existing = st.keys.get(key.as_slice()).copied().filter(|e| !e.deleted);
        if let Some(e) = existing {
            if e.crc == crc && e.len as usize == value.len() {
                return Ok(SetOutcome::Unchanged);
            }
            if st.settings.worm {
                return Err(NsError::Refused(
                    "Cannot overwrite a key when namespace is in worm mode",
                ));
            }
        }
        let max = st.settings.maxsize;
        let after = st.live_bytes - existing.map_or(0, |e| e.len as u64) + value.len() as u64;
        if max > 0 && after > max {
            return Err(NsError::Refused("No space left on this namespace"));
        }
        if st.settings.mode == Mode::Seq && existing.is_none() {
            st.next_id += 1;
        }
        let head = DataHead {
            flags: 0,
            key_len: key.len() as u8,
            value_len: value.len() as u32,
            timestamp: ts.unwrap_or_else(now),
            value_crc: crc,
        };
        let ticket = self.append(&mut st, &key, head, value)?;
        Ok(SetOutcome::Stored(key, ticket))
    }

    pub fn del(&self, key: &[u8]) -> Result<Ticket, NsError> {
        let mut st = self.state.lock();
        st.writable()?;
        if st.keys.get(key).is_none_or(|e| e.deleted) {
            return Err(NsError::Refused("Key not found"));
        }
        if st.settings.worm {
            return Err(NsError::Refused(
                "Cannot delete a key when namespace is in worm mode",
            ));
        }
        let head = DataHead {
            flags: FLAG_DELETED,
            key_len: key.len() as u8,
            value_len: 0,
            timestamp: now(),
            value_crc: 0,
        };
        self.append(&mut st, key, head, &[])
    }

    fn append(
        &self,
        st: &mut State,
        key: &[u8],
        head: DataHead,
        value: &[u8],
    ) -> Result<Ticket, NsError> {
        let size = head.total_len() as u64;
        if st.data_len + st.data_pending.len() as u64 + size > self.opts.datasize
            && st.data_len + (st.data_pending.len() as u64) > FILE_HEADER as u64
        {
            self.rotate(st)?;
        }
        let file = (st.data_files.len() - 1) as u32;
        let offset = st.data_len + st.data_pending.len() as u64;
        format::encode_data(&mut st.data_pending, &head, key, value);
        st.index_data(key, &head, file, offset);
        st.appended += 1;
        Ok(Ticket {
            epoch: st.epoch,
            seq: st.appended,
        })
    }

    fn rotate(&self, st: &mut State) -> Result<(), NsError> {
        self.flush_data(st)?;
        let id = st.data_files.len() as u32;
        let path = self.dir.join(data_name(id));
        let file = create_file(&path, format::DATA_MAGIC, id).map_err(|e| {
            tracing::error!(ns = %self.name, "creating {}: {e}", path.display());
            NsError::WriteFailed
        })?;
        st.data_files.push(Arc::new(file));
        st.data_len = FILE_HEADER as u64;
        Ok(())
    }

    /// Makes the writes up to `t` durable (in the kernel; on disk with `--sync`).
    pub fn sync(&self, t: Ticket) -> Result<(), NsError> {
        let mut st = self.state.lock();
        if st.epoch != t.epoch {
            return Err(NsError::WriteFailed);
        }
        if st.synced >= t.seq {
            return Ok(());
        }
        self.flush_data(&mut st)?;
        if st.index_pending.len() >= INDEX_FLUSH_AT {
            self.flush_index_locked(&mut st);
        }
        Ok(())
    }

    fn flush_data(&self, st: &mut State) -> Result<(), NsError> {
        if st.data_pending.is_empty() {
            return Ok(());
        }
        let file = st.data_files.last().expect("a data file").clone();
        let written = file
            .write_all_at(&st.data_pending, st.data_len)
            .and_then(|_| {
                if self.opts.sync {
                    file.sync_data()
                } else {
                    Ok(())
                }
            });
        match written {
            Ok(()) => {
                st.data_len += st.data_pending.len() as u64;
                st.data_pending.clear();
                st.synced = st.appended;
                Ok(())
            }
            Err(e) => {
                tracing::error!(ns = %self.name, "writing data: {e}; unacknowledged writes are dropped");
                let _ = file.set_len(st.data_len);
                self.reload(st);
                Err(NsError::WriteFailed)
            }
        }
    }

    /// After a failed write the memory holds entries the disk does not: start again from disk.
    fn reload(&self, st: &mut State) {
        let epoch = st.epoch + 1;
        let appended = st.appended;
        match load(&self.dir, &self.name, st.settings.clone()) {
            Ok(fresh) => *st = fresh,
            Err(e) => {
                tracing::error!(ns = %self.name, "reloading after a failed write: {e}; the namespace is frozen");
                st.settings.freeze = true;
                st.data_pending.clear();
                st.index_pending.clear();
            }
        }
        st.epoch = epoch;
        st.appended = appended;
        st.synced = appended;
    }

    /// Writes buffered index entries (their data first, so the index never runs ahead of it).
    pub fn flush_index(&self) {
        let mut st = self.state.lock();
        self.flush_index_locked(&mut st);
    }

    fn flush_index_locked(&self, st: &mut State) {
        if st.index_pending.is_empty() || self.flush_data(st).is_err() {
            return;
        }
        match st.index.write_all_at(&st.index_pending, st.index_len) {
            Ok(()) => {
                st.index_len += st.index_pending.len() as u64;
                st.index_pending.clear();
            }
            Err(e) => {
                // Kept in memory and retried; a restart rebuilds them from the data files.
                tracing::error!(ns = %self.name, "writing index: {e}");
                let _ = st.index.set_len(st.index_len);
            }
        }
    }

    /// Appends the value of `key` to `out` as a RESP bulk string, or nil. The value's checksum is
    /// verified on every read.
    pub fn get_into(&self, key: &[u8], out: &mut Vec<u8>) -> Result<(), NsError> {
        let (file, at, e) = {
            let st = self.state.lock();
            st.readable()?;
            let Some(e) = st.keys.get(key).copied().filter(|e| !e.deleted) else {
                crate::resp::reply::nil(out);
                return Ok(());
            };
            let at = e.offset + (DATA_HEAD + key.len()) as u64;
            if let Some(value) = st.unwritten(e.file, at, e.len as usize) {
                crate::resp::reply::bulk(out, value);
                return Ok(());
            }
            (st.data_files[e.file as usize].clone(), at, e)
        };
        let mark = out.len();
        crate::resp::reply::bulk_header(out, e.len as usize);
        let start = out.len();
        out.resize(start + e.len as usize, 0);
        if let Err(err) = file.read_exact_at(&mut out[start..], at) {
            out.truncate(mark);
            return Err(NsError::Read(err.to_string()));
        }
        if format::crc(&out[start..]) != e.crc {
            out.truncate(mark);
            tracing::error!(ns = %self.name, file = e.file, offset = e.offset, "value fails its checksum");
            return Err(NsError::Corrupt);
        }
        out.extend_from_slice(b"\r\n");
        Ok(())
    }

    fn live(&self, key: &[u8]) -> Result<Option<Entry>, NsError> {
        let st = self.state.lock();
        st.readable()?;
        Ok(st.keys.get(key).copied().filter(|e| !e.deleted))
    }

    pub fn exists(&self, key: &[u8]) -> Result<bool, NsError> {
        Ok(self.live(key)?.is_some())
    }

    /// (length, timestamp) of the live value.
    pub fn meta(&self, key: &[u8]) -> Result<Option<(u32, u32)>, NsError> {
        Ok(self.live(key)?.map(|e| (e.len, e.ts)))
    }

    /// The SCAN cursor of the key's current version.
    pub fn cursor(&self, key: &[u8]) -> Result<Option<u64>, NsError> {
        Ok(self.live(key)?.map(|e| e.pos))
    }

    /// Verifies the whole stored entry (head, key and value checksums). None: no such key.
    pub fn check(&self, key: &[u8]) -> Result<Option<bool>, NsError> {
        let (file, e, mut buf) = {
            let st = self.state.lock();
            st.readable()?;
            let Some(e) = st.keys.get(key).copied().filter(|e| !e.deleted) else {
                return Ok(None);
            };
            let total = DATA_HEAD + key.len() + e.len as usize;
            match st.unwritten(e.file, e.offset, total) {
                Some(bytes) => (None, e, bytes.to_vec()),
                None => (
                    Some(st.data_files[e.file as usize].clone()),
                    e,
                    vec![0u8; total],
                ),
            }
        };
        if let Some(file) = file {
            if file.read_exact_at(&mut buf, e.offset).is_err() {
                return Ok(Some(false));
            }
        }
        Ok(Some(match format::parse_data(&buf) {
            Parsed::Entry(head, _) => {
                head.value_crc == e.crc
                    && format::data_key(&buf, &head) == key
                    && head.flags & FLAG_DELETED == 0
            }
            _ => false,
        }))
    }

    /// Live keys after (`forward`) or before the cursor, in write order, in a time-bounded batch.
    pub fn scan(
        &self,
        cursor: Option<u64>,
        forward: bool,
    ) -> Result<Vec<(u64, ScanItem)>, NsError> {
        let st = self.state.lock();
        st.readable()?;
        let range: (Bound<u64>, Bound<u64>) = match (cursor, forward) {
            (None, _) => (Bound::Unbounded, Bound::Unbounded),
            (Some(c), true) => (Bound::Excluded(c), Bound::Unbounded),
            (Some(c), false) => (Bound::Unbounded, Bound::Excluded(c)),
        };
        let started = Instant::now();
        let mut items = Vec::new();
        let mut push = |(pos, key): (&u64, &Arc<[u8]>)| {
            let e = st.keys[key];
            items.push((
                *pos,
                ScanItem {
                    key: key.clone(),
                    len: e.len,
                    ts: e.ts,
                },
            ));
            !(items.len() >= SCAN_MAX || (items.len() % 64 == 0 && started.elapsed() > SCAN_SLICE))
        };
        if forward {
            for kv in st.order.range(range) {
                if !push(kv) {
                    break;
                }
            }
        } else {
            for kv in st.order.range(range).rev() {
                if !push(kv) {
                    break;
                }
            }
        }
        Ok(items)
    }

    /// The current version of `key` (at = None) or the version at index position `at`, which must
    /// belong to `key`.
    pub fn history(&self, key: &[u8], at: Option<u64>) -> Result<History, NsError> {
        let (at, rec, pending_value, file) = {
            let st = self.state.lock();
            st.readable()?;
            let pos = match at {
                Some(p) => p,
                None => match st.keys.get(key) {
                    Some(e) if !e.deleted => e.pos,
                    _ => return Err(NsError::Refused("Key not found")),
                },
            };
            let rec = if pos >= st.index_len {
                let start = (pos - st.index_len) as usize;
                match st.index_pending.get(start..).map(format::parse_index) {
                    Some(Parsed::Entry(rec, len))
                        if &st.index_pending[start + format::INDEX_HEAD..start + len] == key =>
                    {
                        rec
                    }
                    _ => return Err(NsError::Refused("Invalid arguments (invalid key)")),
                }
            } else {
                let mut buf = vec![0u8; format::INDEX_HEAD + key.len()];
                let n = st
                    .index
                    .read_at(&mut buf, pos)
                    .map_err(|e| NsError::Read(e.to_string()))?;
                match format::parse_index(&buf[..n]) {
                    Parsed::Entry(rec, len) if &buf[format::INDEX_HEAD..len] == key => rec,
                    _ => return Err(NsError::Refused("Invalid arguments (invalid key)")),
                }
            };
            if rec.data_file as usize >= st.data_files.len() {
                return Err(NsError::Refused("Invalid arguments (index query)"));
            }
            let at = rec.data_offset + (DATA_HEAD + key.len()) as u64;
            let pending = st
                .unwritten(rec.data_file, at, rec.value_len as usize)
                .map(<[u8]>::to_vec);
            (
                at,
                rec,
                pending,
                st.data_files[rec.data_file as usize].clone(),
            )
        };
        let value = match pending_value {
            Some(v) => v,
            None => {
                let mut v = vec![0u8; rec.value_len as usize];
                file.read_exact_at(&mut v, at)
                    .map_err(|e| NsError::Read(e.to_string()))?;
                v
            }
        };
        if format::crc(&value) != rec.value_crc {
            return Err(NsError::Corrupt);
        }
        Ok(History {
            prev: (rec.prev != 0).then_some(rec.prev),
            ts: rec.timestamp,
            value,
        })
    }

    /// Empties the namespace, keeping its settings.
    pub fn flush_all(&self) -> Result<(), NsError> {
        let mut st = self.state.lock();
        let _ = self.flush_data(&mut st);
        let result = (|| -> std::io::Result<State> {
            for id in 0..st.data_files.len() {
                fs::remove_file(self.dir.join(data_name(id as u32)))?;
            }
            fs::remove_file(self.dir.join("index"))?;
            load(&self.dir, &self.name, st.settings.clone()).map_err(std::io::Error::other)
        })();
        match result {
            Ok(fresh) => {
                let (epoch, appended) = (st.epoch, st.appended);
                *st = fresh;
                st.epoch = epoch;
                st.appended = appended;
                st.synced = appended;
                Ok(())
            }
            Err(e) => {
                tracing::error!(ns = %self.name, "flush: {e}");
                self.reload(&mut st);
                Err(NsError::WriteFailed)
            }
        }
    }

    /// Deletes the namespace's files; clients still on it learn it at their next command.
    pub fn remove(&self) -> std::io::Result<()> {
        let _st = self.state.lock();
        self.removed.store(true, Ordering::Release);
        fs::remove_dir_all(&self.dir)
    }

    pub fn info(&self) -> Info {
        let st = self.state.lock();
        Info {
            settings: st.settings.clone(),
            entries: st.order.len() as u64,
            data_bytes: st.live_bytes,
            index_bytes: st.index_len + st.index_pending.len() as u64,
            data_files: st.data_files.len(),
            report: st.report.clone(),
        }
    }

    /// Refuses reads of a frozen namespace.
    pub fn readable(&self) -> Result<(), NsError> {
        self.state.lock().readable()
    }

    pub fn entries(&self) -> u64 {
        self.state.lock().order.len() as u64
    }
}

impl State {
    /// The bytes at `at..at+len` of data file `file` when they are still in the write buffer.
    fn unwritten(&self, file: u32, at: u64, len: usize) -> Option<&[u8]> {
        if file as usize != self.data_files.len() - 1 || at < self.data_len {
            return None;
        }
        let start = (at - self.data_len) as usize;
        Some(&self.data_pending[start..start + len])
    }

    /// Appends the index entry for a data entry at (`file`, `offset`) and applies it: the one
    /// step shared by new writes and by re-indexing data at start.
    fn index_data(&mut self, key: &[u8], head: &DataHead, file: u32, offset: u64) {
        let pos = self.index_len + self.index_pending.len() as u64;
        let prev = match self.keys.get(key) {
            Some(old) if old.deleted => old.prev,
            Some(old) => old.pos,
            None => 0,
        };
        let rec = IndexRecord {
            flags: head.flags,
            key_len: head.key_len,
            data_file: file,
            data_offset: offset,
            value_len: head.value_len,
            timestamp: head.timestamp,
            value_crc: head.value_crc,
            prev,
        };
        format::encode_index(&mut self.index_pending, &rec, key);
        self.apply(key, entry_of(&rec, pos));
    }

    fn readable(&self) -> Result<(), NsError> {
        if self.settings.freeze {
            return Err(NsError::Refused("Namespace is temporarily frozen"));
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), NsError> {
        self.readable()?;
        if self.settings.lock {
            return Err(NsError::Refused(
                "Namespace is temporarily locked (read-only)",
            ));
        }
        Ok(())
    }

    fn apply(&mut self, key: &[u8], e: Entry) {
        let shared: Arc<[u8]> = match self.keys.get_key_value(key) {
            Some((k, old)) => {
                let k = k.clone();
                if !old.deleted {
                    self.order.remove(&old.pos);
                    self.live_bytes -= old.len as u64;
                }
                k
            }
            None => Arc::from(key),
        };
        if self.settings.mode == Mode::Seq && key.len() == 8 {
            let id = u64::from_le_bytes(key.try_into().unwrap());
            self.next_id = self.next_id.max(id.saturating_add(1));
        }
        if !e.deleted {
            self.order.insert(e.pos, shared.clone());
            self.live_bytes += e.len as u64;
        }
        self.keys.insert(shared, e);
    }
}

fn entry_of(rec: &IndexRecord, pos: u64) -> Entry {
    Entry {
        file: rec.data_file,
        offset: rec.data_offset,
        len: rec.value_len,
        crc: rec.value_crc,
        ts: rec.timestamp,
        pos,
        prev: rec.prev,
        deleted: rec.flags & FLAG_DELETED != 0,
    }
}

fn write_settings(dir: &Path, s: &Settings) -> std::io::Result<()> {
    let tmp = dir.join("settings.json.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(s).expect("settings serialise"))?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join("settings.json"))
}

/// The name a file is made under before it has its header.
fn unfinished(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(UNFINISHED);
    PathBuf::from(p)
}

const UNFINISHED: &str = ".new";

/// Makes a file that has its header from the moment it exists under its name: the header is
/// written under `<name>.new`, which is then renamed. A kill between the two leaves only the
/// `.new` file, which the next open removes (made in place, a kill there left an empty data
/// file that the next start refused as "bad header").
fn create_file(path: &Path, magic: &[u8; 8], id: u32) -> std::io::Result<File> {
    if path.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists", path.display()),
        ));
    }
    let tmp = unfinished(path);
    let _ = fs::remove_file(&tmp);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    file.write_all_at(&format::file_header(magic, id), 0)?;
    fs::rename(&tmp, path)?;
    Ok(file)
}

fn open_file(path: &Path, magic: &[u8; 8], id: u32) -> Result<(File, Vec<u8>), OpenError> {
    let io = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let bytes = fs::read(path).map_err(io)?;
    match format::check_file_header(magic, &bytes) {
        Some(found) if found == id => Ok((file, bytes)),
        Some(found) => Err(OpenError::Corrupt {
            path: path.to_path_buf(),
            msg: format!("file id {found}, expected {id}"),
        }),
        None => Err(OpenError::Corrupt {
            path: path.to_path_buf(),
            msg: "not a tfgrid zdb file (bad header)".into(),
        }),
    }
}

/// Reads a namespace from disk: index first, then every data file verified entry by entry; data
/// past the last indexed entry is indexed again. Damage in the middle of the index rebuilds the
/// index from the data files; damage in the middle of a data file is reported and its entries
/// are never served (reads verify checksums).
fn load(dir: &Path, name: &str, settings: Settings) -> Result<State, OpenError> {
    let io = |path: PathBuf| move |source| OpenError::Io { path, source };
    let mut report = OpenReport::default();

    // Data files: d00000, d00001, ... with no gaps. A file a kill left unfinished goes.
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir.to_path_buf()))? {
        let entry = entry.map_err(io(dir.to_path_buf()))?;
        let fname = entry.file_name().to_string_lossy().to_string();
        if fname.ends_with(UNFINISHED) {
            fs::remove_file(entry.path()).map_err(io(entry.path()))?;
            continue;
        }
        if let Some(id) = fname.strip_prefix('d').and_then(|n| n.parse::<u32>().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    if ids.iter().enumerate().any(|(i, &id)| id != i as u32) {
        return Err(OpenError::Corrupt {
            path: dir.to_path_buf(),
            msg: format!("data files are not contiguous: {ids:?}"),
        });
    }
    if ids.is_empty() {
        create_file(&dir.join(data_name(0)), format::DATA_MAGIC, 0)
            .map_err(io(dir.join(data_name(0))))?;
        ids.push(0);
    }
    let mut data_lens = Vec::new();
    for &id in &ids {
        let path = dir.join(data_name(id));
        let mut meta = fs::metadata(&path).map_err(io(path.clone()))?;
        // An empty last data file is one a kill left before its header (as files were made
        // before `create_file` wrote them under another name first): it holds nothing.
        if meta.len() == 0 && Some(&id) == ids.last() {
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.write_all_at(&format::file_header(format::DATA_MAGIC, id), 0))
                .map_err(io(path.clone()))?;
            meta = fs::metadata(&path).map_err(io(path.clone()))?;
        }
        data_lens.push(meta.len());
    }

    let index_path = dir.join("index");
    if !index_path.exists() {
        create_file(&index_path, format::INDEX_MAGIC, 0).map_err(io(index_path.clone()))?;
    }
    let (index, index_bytes) = open_file(&index_path, format::INDEX_MAGIC, 0)?;
    let mut st = State {
        settings,
        keys: HashMap::new(),
        order: BTreeMap::new(),
        live_bytes: 0,
        next_id: 0,
        data_files: Vec::new(),
        data_len: 0,
        data_pending: Vec::new(),
        index: Arc::new(index),
        index_len: FILE_HEADER as u64,
        index_pending: Vec::new(),
        epoch: 0,
        appended: 0,
        synced: 0,
        report: OpenReport::default(),
    };

    // The index, up to the first entry that is damaged or points past the data.
    let mut pos = FILE_HEADER;
    let mut covered: Option<(u32, u64)> = None;
    let mut rebuild = false;
    while pos < index_bytes.len() {
        let rest = &index_bytes[pos..];
        let ok = match format::parse_index(rest) {
            Parsed::Entry(rec, len) => {
                let end = rec.data_offset
                    + (DATA_HEAD + rec.key_len as usize + rec.value_len as usize) as u64;
                let in_bounds = data_lens
                    .get(rec.data_file as usize)
                    .is_some_and(|&l| end <= l);
                in_bounds.then_some((rec, len, end))
            }
            _ => None,
        };
        let Some((rec, len, end)) = ok else {
            if format::resync(&index_bytes, pos, format::parse_index).is_some() {
                tracing::error!(
                    ns = name,
                    offset = pos,
                    "index damaged in the middle: rebuilding it from the data files"
                );
                report.corrupt.push(("index".into(), pos as u64, 0));
                rebuild = true;
            } else {
                tracing::warn!(
                    ns = name,
                    offset = pos,
                    bytes = index_bytes.len() - pos,
                    "index ends in a torn write: cut"
                );
                report.truncated_bytes += (index_bytes.len() - pos) as u64;
            }
            break;
        };
        let key = &rest[format::INDEX_HEAD..len];
        st.apply(key, entry_of(&rec, pos as u64));
        covered = Some((rec.data_file, end));
        pos += len;
    }
    drop(index_bytes);
    if rebuild {
        st.keys.clear();
        st.order.clear();
        st.live_bytes = 0;
        st.next_id = 0;
        covered = None;
        pos = FILE_HEADER;
        report.index_rebuilt = true;
    }
    st.index
        .set_len(pos as u64)
        .map_err(io(index_path.clone()))?;
    st.index_len = pos as u64;

    // Every data file, verified; entries past `covered` go into the index again.
    let last = ids.len() - 1;
    for (i, &id) in ids.iter().enumerate() {
        let path = dir.join(data_name(id));
        let (file, bytes) = open_file(&path, format::DATA_MAGIC, id)?;
        let mut off = FILE_HEADER;
        while off < bytes.len() {
            match format::parse_data(&bytes[off..]) {
                parsed @ (Parsed::Entry(head, len) | Parsed::Damaged(head, len)) => {
                    if matches!(parsed, Parsed::Damaged(..)) {
                        tracing::error!(ns = name, file = %data_name(id), offset = off, key = %String::from_utf8_lossy(&format::data_key(&bytes[off..], &head)), "data damaged: the value fails its checksum and is not served");
                        report.corrupt.push((data_name(id), off as u64, len as u64));
                    }
                    let after_covered = match covered {
                        None => true,
                        Some((cf, cend)) => id > cf || (id == cf && off as u64 >= cend),
                    };
                    if after_covered {
                        let key = format::data_key(&bytes[off..], &head);
                        st.index_data(&key, &head, id, off as u64);
                        report.reindexed += 1;
                    }
                    off += len;
                }
                Parsed::Short | Parsed::Bad => {
                    match format::resync(&bytes, off, format::parse_data) {
                        Some(next) => {
                            tracing::error!(ns = name, file = %data_name(id), offset = off, bytes = next - off, "data damaged: entries there are not served");
                            report
                                .corrupt
                                .push((data_name(id), off as u64, (next - off) as u64));
                            off = next;
                        }
                        // Indexed data was acknowledged: damage there is never a torn write.
                        None if i == last
                            && covered.is_none_or(|(cf, cend)| id > cf || off as u64 >= cend) =>
                        {
                            tracing::warn!(ns = name, file = %data_name(id), offset = off, bytes = bytes.len() - off, "data ends in a torn write: cut");
                            report.truncated_bytes += (bytes.len() - off) as u64;
                            file.set_len(off as u64).map_err(io(path.clone()))?;
                            break;
                        }
                        None => {
                            tracing::error!(ns = name, file = %data_name(id), offset = off, "data damaged up to the end of a closed file");
                            report.corrupt.push((
                                data_name(id),
                                off as u64,
                                (bytes.len() - off) as u64,
                            ));
                            break;
                        }
                    }
                }
            }
        }
        let len = off.min(bytes.len()) as u64;
        if i == last {
            st.data_len = len;
        }
        st.data_files.push(Arc::new(file));
    }

    if rebuild {
        // A fresh index from the data alone, swapped in whole.
        let tmp = dir.join("index.rebuild");
        let _ = fs::remove_file(&tmp);
        let file = create_file(&tmp, format::INDEX_MAGIC, 0).map_err(io(tmp.clone()))?;
        file.write_all_at(&st.index_pending, FILE_HEADER as u64)
            .map_err(io(tmp.clone()))?;
        file.sync_all().map_err(io(tmp.clone()))?;
        fs::rename(&tmp, &index_path).map_err(io(index_path.clone()))?;
        st.index_len += st.index_pending.len() as u64;
        st.index_pending.clear();
        st.index = Arc::new(file);
    } else if !st.index_pending.is_empty() {
        st.index
            .write_all_at(&st.index_pending, st.index_len)
            .map_err(io(index_path.clone()))?;
        st.index_len += st.index_pending.len() as u64;
        st.index_pending.clear();
    }
    st.report = report;
    Ok(st)
}
