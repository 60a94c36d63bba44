//! The bot's persisted state: each declared deployment with where its replicas and gateway routes
//! are, and the event log. A restarted bot reads it and carries on.

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tfgrid_core::{ContractId, Millis, NodeId, TwinId};

const DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("deployments");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Contracts to cancel, kept until the registry has cancelled them: contract -> node twin (0 for
/// a name contract), so a cancel that meets a dead registry is retried, also after a restart.
const CANCELS: TableDefinition<u64, u32> = TableDefinition::new("cancels");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bot database: {0}")]
    Db(String),
    #[error("bot database holds a corrupt record in {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
}

tfgrid_core::redb_errors_into!(StoreError);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Being made; a bot that restarts in this state rolls it back.
    Deploying,
    Running,
    /// Some replica could not be healed yet.
    Degraded,
    /// The user removed it; a bot that restarts in this state finishes the removal.
    Removing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    pub service: String,
    pub index: u32,
    pub node_id: NodeId,
    pub node_twin: TwinId,
    pub contract_id: ContractId,
    /// The container's address on its node's workload network.
    #[serde(default)]
    pub ip: String,
    /// ok / error / init, as the node last reported it.
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub message: String,
    /// Every workload of the replica's node deployment: its container, volumes and zdbs.
    #[serde(default)]
    pub workloads: Vec<WorkloadView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadView {
    pub name: String,
    pub kind: String,
    pub state: String,
    #[serde(default)]
    pub message: String,
    /// What the node reported: addresses, zdb endpoint and namespace, sizes.
    #[serde(default)]
    pub data: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub service: String,
    pub name: String,
    pub node_id: NodeId,
    pub node_twin: TwinId,
    pub name_contract: ContractId,
    pub contract_id: ContractId,
    pub version: u32,
    pub backends: Vec<String>,
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// The spec as the user wrote it.
    pub yaml: String,
    pub state: State,
    pub replicas: Vec<Replica>,
    pub routes: Vec<Route>,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Contracts made by an operation still in progress (a deploy, an update, a heal), written
    /// the moment the registry answers, before anything else is asked of a node. The operation
    /// moves them into replicas and routes when it completes; a bot that restarts and finds any
    /// here cancels them: the operation it was in is undone.
    #[serde(default)]
    pub made: Vec<Made>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Made {
    pub contract_id: ContractId,
    /// The node's twin, to ask it to delete; 0 for a name contract.
    pub node_twin: TwinId,
}

impl Record {
    /// Every contract this record holds: its replicas', its routes' (gateway and name), and
    /// those of an operation in progress.
    pub fn contracts(&self) -> impl Iterator<Item = ContractId> + '_ {
        self.replicas
            .iter()
            .map(|r| r.contract_id)
            .chain(
                self.routes
                    .iter()
                    .flat_map(|r| [r.contract_id, r.name_contract]),
            )
            .chain(self.made.iter().map(|m| m.contract_id))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at: Millis,
    pub deployment: String,
    /// deploying, deployed, failed, healing, healed, heal-failed, removed, ...
    pub kind: String,
    pub message: String,
}

pub struct Store {
    db: Database,
}

fn decode<T: serde::de::DeserializeOwned>(table: &'static str, b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

impl Store {
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(DEPLOYMENTS)?;
        tx.open_table(EVENTS)?;
        tx.open_table(CANCELS)?;
        tx.commit()?;
        Ok(Self { db })
    }

    pub fn put(&self, r: &Record) -> Result<(), StoreError> {
        self.put_with_cancels(r, &[])
    }

    pub fn get(&self, name: &str) -> Result<Option<Record>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DEPLOYMENTS)?;
        t.get(name)?
            .map(|v| decode("deployments", v.value()))
            .transpose()
    }

    pub fn all(&self) -> Result<Vec<Record>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DEPLOYMENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(decode("deployments", row?.1.value())?);
        }
        Ok(out)
    }

    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        self.remove_with_cancels(name, &[])
    }

    /// Stores `r` and queues cancels in one transaction: what a new version replaces is never
    /// held by nothing, whatever moment a crash picks.
    pub fn put_with_cancels(
        &self,
        r: &Record,
        jobs: &[(ContractId, TwinId)],
    ) -> Result<(), StoreError> {
        self.write(Some(r), None, jobs)
    }

    /// Removes a record and queues its cancels in one transaction.
    pub fn remove_with_cancels(
        &self,
        name: &str,
        jobs: &[(ContractId, TwinId)],
    ) -> Result<(), StoreError> {
        self.write(None, Some(name), jobs)
    }

    /// Queues cancels (idempotent: a contract queued twice is one entry).
    pub fn queue_cancels(&self, jobs: &[(ContractId, TwinId)]) -> Result<(), StoreError> {
        self.write(None, None, jobs)
    }

    /// One transaction: store `put`, remove `remove`, queue `jobs`.
    fn write(
        &self,
        put: Option<&Record>,
        remove: Option<&str>,
        jobs: &[(ContractId, TwinId)],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut d = tx.open_table(DEPLOYMENTS)?;
            if let Some(r) = put {
                d.insert(
                    r.name.as_str(),
                    serde_json::to_vec(r).expect("record serializes").as_slice(),
                )?;
            }
            if let Some(name) = remove {
                d.remove(name)?;
            }
            let mut t = tx.open_table(CANCELS)?;
            for (c, twin) in jobs {
                t.insert(*c, *twin)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn cancel_done(&self, contract: ContractId) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(CANCELS)?.remove(contract)?;
        tx.commit()?;
        Ok(())
    }

    /// Cancels still to do: (contract, node twin).
    pub fn pending_cancels(&self) -> Result<Vec<(ContractId, TwinId)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CANCELS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value(), v.value()));
        }
        Ok(out)
    }

    pub fn event(
        &self,
        deployment: &str,
        kind: &str,
        message: String,
    ) -> Result<Event, StoreError> {
        let tx = self.db.begin_write()?;
        let e;
        {
            let mut t = tx.open_table(EVENTS)?;
            let seq = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            e = Event {
                seq,
                at: tfgrid_core::now_millis(),
                deployment: deployment.to_string(),
                kind: kind.to_string(),
                message,
            };
            t.insert(
                seq,
                serde_json::to_vec(&e).expect("event serializes").as_slice(),
            )?;
        }
        tx.commit()?;
        tracing::info!(deployment, kind, "{}", e.message);
        Ok(e)
    }

    /// Events after `since` (a sequence number), oldest first, at most `limit`.
    pub fn events(
        &self,
        since: u64,
        deployment: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in t.range(since + 1..)? {
            let e: Event = decode("events", row?.1.value())?;
            if deployment.is_none_or(|d| d == e.deployment) {
                out.push(e);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}
