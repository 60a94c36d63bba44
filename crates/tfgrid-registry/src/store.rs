//! Durable state in one redb file. A batch of transactions is one redb write transaction: its log
//! entries and every record it touched, committed with `Durability::Immediate` (fsync) before any
//! of them is acknowledged. The same write transaction records the last raft entry applied
//! (table `raft`), so a restart re-applies exactly the entries after it, never one twice.

use crate::error::RegistryError;
use crate::state::{Changes, State, Verified};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;
use tfgrid_core::canonical;
use tfgrid_core::records::RegistryConfig;
use tfgrid_core::tx::SignedTx;
use tfgrid_core::Millis;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TWINS: TableDefinition<u32, &[u8]> = TableDefinition::new("twins");
const FARMS: TableDefinition<u32, &[u8]> = TableDefinition::new("farms");
const NODES: TableDefinition<u32, &[u8]> = TableDefinition::new("nodes");
const CONTRACTS: TableDefinition<u64, &[u8]> = TableDefinition::new("contracts");
const NETWORKS: TableDefinition<u32, &[u8]> = TableDefinition::new("networks");
const NONCES: TableDefinition<&[u8], u64> = TableDefinition::new("nonces");
/// Height -> (registry time, signed transaction): the history the records were built from. A
/// validator that joined from a snapshot holds the history after `meta.log_base` only.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// The state machine's raft marks (last applied entry, membership), written with the records.
const RAFT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft");

const REC_DOMAIN: &str = "tfgrid/store/v1";
const LOG_DOMAIN: &str = "tfgrid/log/v1";

/// A handle on the store; clones share one database (the state machine writes, the API reads
/// the history).
#[derive(Clone)]
pub struct Store {
    db: std::sync::Arc<Database>,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    canonical::encode(REC_DOMAIN, v)
}

fn dec<T: DeserializeOwned>(
    table: &str,
    key: impl std::fmt::Display,
    b: &[u8],
) -> Result<T, RegistryError> {
    canonical::decode(REC_DOMAIN, b)
        .map_err(|e| RegistryError::Corrupt(format!("{table} record {key}: {e}")))
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("registry.redb");
        let db = Database::create(&path)
            .map_err(|e| RegistryError::Store(format!("cannot open {}: {e}", path.display())))?;
        let w = db.begin_write()?;
        {
            w.open_table(META)?;
            w.open_table(TWINS)?;
            w.open_table(FARMS)?;
            w.open_table(NODES)?;
            w.open_table(CONTRACTS)?;
            w.open_table(NETWORKS)?;
            w.open_table(NONCES)?;
            w.open_table(LOG)?;
            w.open_table(RAFT)?;
        }
        w.commit()?;
        Ok(Self { db: db.into() })
    }

    /// Loads every record and checks the result is consistent: a record whose id disagrees with
    /// its key, or a height that disagrees with the log, is reported rather than served.
    pub fn load(&self, config: RegistryConfig) -> Result<State, RegistryError> {
        let r = self.db.begin_read()?;
        let mut st = State::new(config);
        let meta = r.open_table(META)?;
        let get = |k: &str| -> Result<u64, RegistryError> {
            Ok(meta.get(k)?.map(|v| v.value()).unwrap_or(0))
        };
        st.height = get("height")?;
        st.last_at = get("last_at")?;
        let log_base = get("log_base")?;
        macro_rules! load_table {
            ($def:expr, $name:literal, $map:expr) => {
                for row in r.open_table($def)?.iter()? {
                    let (k, v) = row?;
                    let rec = dec($name, k.value(), v.value())?;
                    $map.insert(k.value(), rec);
                }
            };
        }
        load_table!(TWINS, "twins", st.twins);
        load_table!(FARMS, "farms", st.farms);
        load_table!(NODES, "nodes", st.nodes);
        load_table!(CONTRACTS, "contracts", st.contracts);
        load_table!(NETWORKS, "networks", st.networks);
        for row in r.open_table(NONCES)?.iter()? {
            let (k, v) = row?;
            let key: [u8; 32] = k
                .value()
                .try_into()
                .map_err(|_| RegistryError::Corrupt("nonces: key is not 32 bytes".into()))?;
            st.nonces.insert(tfgrid_core::PublicKey(key), v.value());
        }
        let check = |table: &str, k: u64, id: u64| {
            if k == id {
                Ok(())
            } else {
                Err(RegistryError::Corrupt(format!(
                    "{table} record under key {k} has id {id}"
                )))
            }
        };
        for (k, t) in &st.twins {
            check("twins", (*k).into(), t.id.into())?;
        }
        for (k, f) in &st.farms {
            check("farms", (*k).into(), f.id.into())?;
        }
        for (k, n) in &st.nodes {
            check("nodes", (*k).into(), n.id.into())?;
        }
        for (k, c) in &st.contracts {
            check("contracts", *k, c.id)?;
        }
        for (k, n) in &st.networks {
            check("networks", (*k).into(), n.id.into())?;
        }
        let log_len = r.open_table(LOG)?.len()?;
        if log_base + log_len != st.height {
            return Err(RegistryError::Corrupt(format!(
                "height {} but the log holds {log_len} entries after height {log_base}",
                st.height
            )));
        }
        st.reindex();
        Ok(st)
    }

    /// A raft mark written by [`commit`](Self::commit) or [`install`](Self::install).
    pub fn mark(&self, key: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(RAFT)?;
        let v = t.get(key)?.map(|v| v.value().to_vec());
        Ok(v)
    }

    /// Writes the batch's log entries (heights `state.height - log.len() + 1 ..= state.height`),
    /// the current value of every record the batch touched and the raft `marks`, then fsyncs.
    pub fn commit(
        &self,
        state: &State,
        log: &[(Millis, &Verified)],
        ch: &Changes,
        marks: &[(&str, Vec<u8>)],
    ) -> Result<(), RegistryError> {
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(RAFT)?;
            for (k, v) in marks {
                t.insert(*k, v.as_slice())?;
            }
            let first = state.height + 1 - log.len() as u64;
            let mut t = w.open_table(LOG)?;
            for (i, (at, v)) in log.iter().enumerate() {
                t.insert(
                    first + i as u64,
                    canonical::encode(LOG_DOMAIN, &(at, v.tx())).as_slice(),
                )?;
            }
            let mut meta = w.open_table(META)?;
            meta.insert("height", state.height)?;
            meta.insert("last_at", state.last_at)?;
            drop(meta);
            let mut t = w.open_table(TWINS)?;
            for id in &ch.twins {
                t.insert(*id, enc(&state.twins[id]).as_slice())?;
            }
            let mut t = w.open_table(FARMS)?;
            for id in &ch.farms {
                t.insert(*id, enc(&state.farms[id]).as_slice())?;
            }
            let mut t = w.open_table(NODES)?;
            for id in &ch.nodes {
                t.insert(*id, enc(&state.nodes[id]).as_slice())?;
            }
            let mut t = w.open_table(CONTRACTS)?;
            for id in &ch.contracts {
                t.insert(*id, enc(&state.contracts[id]).as_slice())?;
            }
            let mut t = w.open_table(NETWORKS)?;
            for id in &ch.networks {
                t.insert(*id, enc(&state.networks[id]).as_slice())?;
            }
            let mut t = w.open_table(NONCES)?;
            for k in &ch.nonces {
                t.insert(k.0.as_slice(), state.nonces[k])?;
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Replaces everything with `state` (a snapshot installed from the leader): the history
    /// before it is not held here, so the log restarts after its height.
    pub fn install(&self, state: &State, marks: &[(&str, Vec<u8>)]) -> Result<(), RegistryError> {
        let w = self.db.begin_write()?;
        {
            macro_rules! replace {
                ($def:expr, $map:expr) => {{
                    let mut t = w.open_table($def)?;
                    t.retain(|_, _| false)?;
                    for (k, v) in $map {
                        t.insert(*k, enc(v).as_slice())?;
                    }
                }};
            }
            replace!(TWINS, &state.twins);
            replace!(FARMS, &state.farms);
            replace!(NODES, &state.nodes);
            replace!(CONTRACTS, &state.contracts);
            replace!(NETWORKS, &state.networks);
            let mut t = w.open_table(NONCES)?;
            t.retain(|_, _| false)?;
            for (k, n) in &state.nonces {
                t.insert(k.0.as_slice(), *n)?;
            }
            w.open_table(LOG)?.retain(|_, _| false)?;
            let mut meta = w.open_table(META)?;
            meta.insert("height", state.height)?;
            meta.insert("last_at", state.last_at)?;
            meta.insert("log_base", state.height)?;
            drop(meta);
            let mut t = w.open_table(RAFT)?;
            for (k, v) in marks {
                t.insert(*k, v.as_slice())?;
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Log entries from `from` (inclusive), at most `limit`.
    pub fn log(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Millis, SignedTx)>, RegistryError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(LOG)?;
        let mut out = Vec::new();
        for row in t.range(from..)?.take(limit) {
            let (k, v) = row?;
            let (at, stx): (Millis, SignedTx) = canonical::decode(LOG_DOMAIN, v.value())
                .map_err(|e| RegistryError::Corrupt(format!("log entry {}: {e}", k.value())))?;
            out.push((k.value(), at, stx));
        }
        Ok(out)
    }

    /// Rebuilds the state by replaying the log from scratch: a consistency check between the log
    /// and the records (a test runs it after a burst). Only a validator that holds the whole
    /// history (it did not join from a snapshot) can replay.
    pub fn replay(&self, config: RegistryConfig) -> Result<State, RegistryError> {
        let mut st = State::new(config);
        let mut ch = Changes::default();
        let mut from = 1;
        loop {
            let batch = self.log(from, 4096)?;
            if batch.is_empty() {
                break;
            }
            if from == 1 && batch[0].0 != 1 {
                return Err(RegistryError::Corrupt(format!(
                    "the history here starts at height {} (this validator joined from a snapshot); a replay needs all of it",
                    batch[0].0
                )));
            }
            for (h, at, stx) in batch {
                st.apply(&Verified::trusted(stx), at, &mut ch)
                    .map_err(|e| {
                        RegistryError::Corrupt(format!("log entry {h} no longer applies: {e}"))
                    })?;
                from = h + 1;
            }
        }
        Ok(st)
    }
}
