//! The raft log in its own redb file (`raft.redb`): appends fsync before raft counts them, and a
//! separate file keeps them from queueing behind the state machine's commits (redb has one
//! writer per file).

// openraft's StorageError is the traits' error type; these helpers return it as it is.
#![allow(clippy::result_large_err)]

use super::{Entry, LogId, StorageError, Tc, ValidatorId};
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogId, Vote};
use redb::{Database, ReadableTable, TableDefinition};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
/// "vote", "committed", "purged": postcard values.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

fn io_err(subject: ErrorSubject<ValidatorId>, verb: ErrorVerb, e: impl ToString) -> StorageError {
    StorageError::from_io_error(subject, verb, std::io::Error::other(e.to_string()))
}

fn read_err(e: impl ToString) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_err(e: impl ToString) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

impl LogStore {
    pub fn open(path: &Path) -> Result<Self, crate::RegistryError> {
        let db = Database::create(path).map_err(|e| {
            crate::RegistryError::Store(format!("cannot open {}: {e}", path.display()))
        })?;
        let w = db.begin_write()?;
        w.open_table(ENTRIES)?;
        w.open_table(META)?;
        w.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let r = self.db.begin_read().map_err(read_err)?;
        let t = r.open_table(META).map_err(read_err)?;
        let Some(v) = t.get(key).map_err(read_err)? else {
            return Ok(None);
        };
        postcard::from_bytes(v.value()).map(Some).map_err(read_err)
    }

    /// Writes one meta value and fsyncs, on the blocking pool.
    async fn put_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        v: &T,
    ) -> Result<(), StorageError> {
        let bytes = postcard::to_stdvec(v).map_err(write_err)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let w = db.begin_write().map_err(write_err)?;
            w.open_table(META)
                .map_err(write_err)?
                .insert(key, bytes.as_slice())
                .map_err(write_err)?;
            w.commit().map_err(write_err)
        })
        .await
        .map_err(write_err)?
    }

    /// Changes the entries table on the blocking pool and fsyncs.
    async fn edit(
        &self,
        f: impl FnOnce(&mut redb::Table<u64, &[u8]>) -> Result<(), redb::StorageError> + Send + 'static,
    ) -> Result<(), StorageError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let w = db.begin_write().map_err(write_err)?;
            {
                let mut t = w.open_table(ENTRIES).map_err(write_err)?;
                f(&mut t).map_err(write_err)?;
            }
            w.commit().map_err(write_err)
        })
        .await
        .map_err(write_err)?
    }
}

impl RaftLogReader<Tc> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let r = self.db.begin_read().map_err(read_err)?;
        let t = r.open_table(ENTRIES).map_err(read_err)?;
        let mut out = Vec::new();
        for row in t.range(range).map_err(read_err)? {
            let (_, v) = row.map_err(read_err)?;
            out.push(postcard::from_bytes(v.value()).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<Tc> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<Tc>, StorageError> {
        let purged: Option<LogId> = self.get_meta("purged")?;
        let last = {
            let r = self.db.begin_read().map_err(read_err)?;
            let t = r.open_table(ENTRIES).map_err(read_err)?;
            let last = t.last().map_err(read_err)?;
            match last {
                Some((_, v)) => {
                    let e: Entry = postcard::from_bytes(v.value()).map_err(read_err)?;
                    Some(*e.get_log_id())
                }
                None => purged,
            }
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<ValidatorId>) -> Result<(), StorageError> {
        self.put_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<ValidatorId>>, StorageError> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta("committed", &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<Tc>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((
                e.get_log_id().index,
                postcard::to_stdvec(&e).map_err(write_err)?,
            ));
        }
        let r = self
            .edit(move |t| {
                for (i, b) in &rows {
                    t.insert(*i, b.as_slice())?;
                }
                Ok(())
            })
            .await;
        // Raft counts the entries only once they are on disk.
        callback.log_io_completed(match &r {
            Ok(()) => Ok(()),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        });
        r
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = log_id.index;
        self.edit(move |t| t.retain_in(from.., |_, _| false)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The purge mark first: a crash between the two leaves entries that are never read.
        self.put_meta("purged", &log_id).await?;
        let upto = log_id.index;
        self.edit(move |t| t.retain_in(..=upto, |_, _| false)).await
    }
}
