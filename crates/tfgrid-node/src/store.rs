//! The node's persisted state: deployments, the current result of each workload and the history of
//! results (`deployment.changes`). Everything a reply reports is committed here first, so a
//! restarted agent knows exactly what it had promised.

use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use tfgrid_core::deployment::{Deployment, WorkloadResult};
use tfgrid_core::ContractId;

const DEPLOYMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("deployments");
const RESULTS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("results");
/// (contract, sequence) -> change; the sequence is per node, so changes sort by time.
const CHANGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("changes");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("node database: {0}")]
    Db(String),
    #[error("node database holds a corrupt record in {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
}

tfgrid_core::redb_errors_into!(StoreError);

pub use tfgrid_core::node_api::Change;

pub struct Store {
    db: Database,
}

fn decode<T: serde::de::DeserializeOwned>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("node records serialize")
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::init(Database::create(path)?)
    }

    /// A store that lives in memory only: a simulated node's, gone with its process.
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(256 << 10)
            .create_with_backend(crate::sparse::SparseMemory::default())?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self, StoreError> {
        let tx = db.begin_write()?;
        tx.open_table(DEPLOYMENTS)?;
        tx.open_table(RESULTS)?;
        tx.open_table(CHANGES)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(Self { db })
    }

    /// Stores a deployment (new or updated) and the given results in one transaction.
    pub fn put_deployment(
        &self,
        d: &Deployment,
        results: &[(String, WorkloadResult)],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(DEPLOYMENTS)?
            .insert(d.contract_id, encode(d).as_slice())?;
        Self::record(&tx, d.contract_id, results)?;
        tx.commit()?;
        Ok(())
    }

    pub fn set_results(
        &self,
        contract: ContractId,
        results: &[(String, WorkloadResult)],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        Self::record(&tx, contract, results)?;
        tx.commit()?;
        Ok(())
    }

    fn record(
        tx: &redb::WriteTransaction,
        contract: ContractId,
        results: &[(String, WorkloadResult)],
    ) -> Result<(), StoreError> {
        let mut meta = tx.open_table(META)?;
        let mut seq = meta.get("seq")?.map(|v| v.value()).unwrap_or(0);
        let mut res = tx.open_table(RESULTS)?;
        let mut changes = tx.open_table(CHANGES)?;
        for (name, r) in results {
            res.insert((contract, name.as_str()), encode(r).as_slice())?;
            seq += 1;
            let c = Change {
                workload: name.clone(),
                result: r.clone(),
            };
            changes.insert((contract, seq), encode(&c).as_slice())?;
        }
        meta.insert("seq", seq)?;
        Ok(())
    }

    pub fn deployment(&self, id: ContractId) -> Result<Option<Deployment>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DEPLOYMENTS)?;
        t.get(id)?
            .map(|v| decode("deployments", v.value()))
            .transpose()
    }

    pub fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DEPLOYMENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("deployments", v.value())?);
        }
        Ok(out)
    }

    pub fn results(&self, id: ContractId) -> Result<BTreeMap<String, WorkloadResult>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RESULTS)?;
        let mut out = BTreeMap::new();
        for row in t.range((id, "")..(id + 1, ""))? {
            let (k, v) = row?;
            out.insert(k.value().1.to_string(), decode("results", v.value())?);
        }
        Ok(out)
    }

    pub fn changes(&self, id: ContractId) -> Result<Vec<Change>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CHANGES)?;
        let mut out = Vec::new();
        for row in t.range((id, 0)..(id + 1, 0))? {
            let (_, v) = row?;
            out.push(decode("changes", v.value())?);
        }
        Ok(out)
    }

    /// Forgets a deployment and everything recorded about it.
    pub fn remove(&self, id: ContractId) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(DEPLOYMENTS)?.remove(id)?;
        tx.open_table(RESULTS)?
            .retain_in((id, "")..(id + 1, ""), |_, _| false)?;
        tx.open_table(CHANGES)?
            .retain_in((id, 0)..(id + 1, 0), |_, _| false)?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets one workload's current result (it was removed from its deployment by an update).
    pub fn forget_result(&self, id: ContractId, name: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(RESULTS)?.remove((id, name))?;
        tx.commit()?;
        Ok(())
    }
}
