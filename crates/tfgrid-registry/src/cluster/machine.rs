//! The state machine: one thread owns the registry state and its redb store. Raft hands it
//! committed entries; it applies each batch's transactions, commits the records, the history and
//! the last applied entry in one fsynced write, refreshes the read side, then answers. Snapshots
//! are the whole state (records and nonces), kept in `snapshot.bin` beside the store.

use super::{Applied, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, Tc};
use crate::error::RegistryError;
use crate::index::{Delta, ReadModel};
use crate::state::{Changes, State, Verified};
use crate::store::Store;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, RwLock};
use tfgrid_core::canonical;
use tfgrid_core::contract::Contract;
use tfgrid_core::network::Network;
use tfgrid_core::records::{Farm, Node, RegistryConfig, Twin};
use tfgrid_core::tx::Receipt;
use tfgrid_core::{Millis, PublicKey};
use tokio::sync::{oneshot, watch};

const SNAP_DOMAIN: &str = "tfgrid/snapshot/v1";
const SNAP_FILE: &str = "snapshot.bin";

pub(crate) fn delta(state: &State, ch: &Changes) -> Delta {
    Delta {
        height: state.height,
        twins: ch.twins.iter().map(|id| state.twins[id].clone()).collect(),
        farms: ch.farms.iter().map(|id| state.farms[id].clone()).collect(),
        nodes: ch.nodes.iter().map(|id| state.nodes[id].clone()).collect(),
        contracts: ch
            .contracts
            .iter()
            .map(|id| state.contracts[id].clone())
            .collect(),
        networks: ch
            .networks
            .iter()
            .map(|id| state.networks[id].clone())
            .collect(),
        nonces: ch.nonces.iter().map(|k| (*k, state.nonces[k])).collect(),
    }
}

/// A read model holding everything in `state`.
fn read_model(state: &State) -> ReadModel {
    let mut read = ReadModel::new(state.config.clone());
    let everything = Changes {
        twins: state.twins.keys().copied().collect(),
        farms: state.farms.keys().copied().collect(),
        nodes: state.nodes.keys().copied().collect(),
        contracts: state.contracts.keys().copied().collect(),
        networks: state.networks.keys().copied().collect(),
        nonces: state.nonces.keys().copied().collect(),
    };
    read.apply(delta(state, &everything));
    read
}

/// The state as a snapshot carries it. The config travels along so that a validator started
/// with another config refuses the snapshot instead of applying the log differently.
#[derive(Serialize, Deserialize)]
struct SnapState {
    config: RegistryConfig,
    height: u64,
    last_at: Millis,
    twins: Vec<Twin>,
    farms: Vec<Farm>,
    nodes: Vec<Node>,
    contracts: Vec<Contract>,
    networks: Vec<Network>,
    nonces: Vec<(PublicKey, u64)>,
}

impl SnapState {
    fn of(s: &State) -> Self {
        Self {
            config: s.config.clone(),
            height: s.height,
            last_at: s.last_at,
            twins: s.twins.values().cloned().collect(),
            farms: s.farms.values().cloned().collect(),
            nodes: s.nodes.values().cloned().collect(),
            contracts: s.contracts.values().cloned().collect(),
            networks: s.networks.values().cloned().collect(),
            nonces: s.nonces.iter().map(|(k, n)| (*k, *n)).collect(),
        }
    }

    fn into_state(self) -> State {
        let mut s = State::new(self.config);
        s.height = self.height;
        s.last_at = self.last_at;
        s.twins = self.twins.into_iter().map(|t| (t.id, t)).collect();
        s.farms = self.farms.into_iter().map(|f| (f.id, f)).collect();
        s.nodes = self.nodes.into_iter().map(|n| (n.id, n)).collect();
        s.contracts = self.contracts.into_iter().map(|c| (c.id, c)).collect();
        s.networks = self.networks.into_iter().map(|n| (n.id, n)).collect();
        s.nonces = self.nonces.into_iter().collect();
        s.reindex();
        s
    }
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Cmd {
    AppliedState(Reply<(Option<LogId>, StoredMembership)>),
    Apply(Vec<Entry>, Reply<Vec<Applied>>),
    Build(Reply<(SnapshotMeta, Vec<u8>)>),
    Install(Box<SnapshotMeta>, Vec<u8>, Reply<()>),
    Current(Reply<Option<(SnapshotMeta, Vec<u8>)>>),
}

/// The state machine, its read side, and its applied height.
pub type Started = (Machine, Arc<RwLock<ReadModel>>, watch::Receiver<u64>);

/// A handle on the state machine thread; raft's state machine and snapshot builder.
#[derive(Clone)]
pub struct Machine {
    cmds: mpsc::Sender<Cmd>,
}

struct Inner {
    store: Store,
    state: State,
    read: Arc<RwLock<ReadModel>>,
    height: watch::Sender<u64>,
    applied: Option<LogId>,
    membership: StoredMembership,
    dir: PathBuf,
    snapshots: u64,
}

fn sm_err(verb: ErrorVerb, e: impl ToString) -> StorageError {
    StorageError::from_io_error(
        ErrorSubject::StateMachine,
        verb,
        std::io::Error::other(e.to_string()),
    )
}

/// A raft mark as [`mark`] wrote it; `None` when it was never written.
fn read_mark<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: &str,
) -> Result<Option<T>, RegistryError> {
    store
        .mark(key)?
        .map(|b| {
            postcard::from_bytes(&b)
                .map_err(|e| RegistryError::Corrupt(format!("raft mark {key}: {e}")))
        })
        .transpose()
}

fn mark<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes raft marks")
}

impl Machine {
    /// Loads the store in `dir` and starts the thread. Returns the read side and the applied
    /// height that the thread keeps up to date.
    pub fn start(
        dir: &Path,
        store: Store,
        config: RegistryConfig,
    ) -> Result<Started, RegistryError> {
        let state = store.load(config)?;
        let applied: Option<LogId> = read_mark(&store, "applied")?.flatten();
        let membership: StoredMembership = read_mark(&store, "membership")?.unwrap_or_default();
        tracing::info!(
            height = state.height,
            twins = state.twins.len(),
            nodes = state.nodes.len(),
            applied = ?applied,
            "registry state loaded"
        );
        let read = Arc::new(RwLock::new(read_model(&state)));
        let (height, height_rx) = watch::channel(state.height);
        let mut inner = Inner {
            store,
            state,
            read: read.clone(),
            height,
            applied,
            membership,
            dir: dir.to_path_buf(),
            snapshots: 0,
        };
        let (cmds, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("registry-state".into())
            .spawn(move || inner.run(rx))
            .map_err(RegistryError::Io)?;
        Ok((Self { cmds }, read, height_rx))
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Cmd,
        verb: ErrorVerb,
    ) -> Result<T, StorageError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(make(tx))
            .map_err(|_| sm_err(verb, "the state machine thread has stopped"))?;
        rx.await
            .map_err(|_| sm_err(verb, "the state machine thread has stopped"))?
            .map_err(|e| sm_err(verb, e))
    }
}

impl Inner {
    fn run(&mut self, rx: mpsc::Receiver<Cmd>) {
        while let Ok(cmd) = rx.recv() {
            match cmd {
                Cmd::AppliedState(r) => {
                    let _ = r.send(Ok((self.applied, self.membership.clone())));
                }
                Cmd::Apply(entries, r) => {
                    let _ = r.send(Ok(self.apply(entries)));
                }
                Cmd::Build(r) => {
                    let _ = r.send(self.build().map_err(|e| e.to_string()));
                }
                Cmd::Install(meta, data, r) => {
                    let _ = r.send(self.install(*meta, data).map_err(|e| e.to_string()));
                }
                Cmd::Current(r) => {
                    let _ = r.send(self.current().map_err(|e| e.to_string()));
                }
            }
        }
    }

    fn marks(&self) -> [(&'static str, Vec<u8>); 2] {
        [
            ("applied", mark(&self.applied)),
            ("membership", mark(&self.membership)),
        ]
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Vec<Applied> {
        let mut ch = Changes::default();
        let mut out = Vec::with_capacity(entries.len());
        let mut log: Vec<(Millis, Verified)> = Vec::new();
        let mut txs = 0;
        for e in entries {
            self.applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Applied::default()),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Applied::default());
                }
                EntryPayload::Normal(b) => {
                    // Registry time never goes backwards, whatever the leader's clock says.
                    let at = b.at.max(self.state.last_at);
                    self.state.last_at = at;
                    txs += b.txs.len();
                    let mut res = Vec::with_capacity(b.txs.len());
                    for stx in b.txs {
                        // The leader verified the signature before proposing it.
                        let v = Verified::trusted(stx);
                        let r = self.state.apply(&v, at, &mut ch).map(|outcome| Receipt {
                            height: self.state.height,
                            tx_hash: v.tx().hash(),
                            at,
                            outcome,
                        });
                        if r.is_ok() {
                            log.push((at, v));
                        }
                        res.push(r);
                    }
                    out.push(Applied(res));
                }
            }
        }
        let t = std::time::Instant::now();
        let refs: Vec<(Millis, &Verified)> = log.iter().map(|(a, v)| (*a, v)).collect();
        if let Err(e) = self.store.commit(&self.state, &refs, &ch, &self.marks()) {
            fatal(e);
        }
        let committed = t.elapsed();
        if !ch.is_empty() || !log.is_empty() {
            let d = delta(&self.state, &ch);
            self.read
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .apply(d);
        }
        self.height.send_replace(self.state.height);
        tracing::debug!(
            txs,
            applied = log.len(),
            commit_us = committed.as_micros() as u64,
            publish_us = (t.elapsed() - committed).as_micros() as u64,
            "entries applied"
        );
        out
    }

    fn build(&mut self) -> Result<(SnapshotMeta, Vec<u8>), RegistryError> {
        let data = canonical::encode(SNAP_DOMAIN, &SnapState::of(&self.state));
        self.snapshots += 1;
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!(
                "{}-{}-{}",
                self.applied.map(|l| l.index).unwrap_or(0),
                tfgrid_core::now_millis(),
                self.snapshots
            ),
        };
        self.save(&meta, &data)?;
        tracing::info!(height = self.state.height, bytes = data.len(), id = %meta.snapshot_id, "snapshot built");
        Ok((meta, data))
    }

    /// Writes the snapshot file (a temporary file renamed over the old one, so a crash keeps
    /// one whole snapshot).
    fn save(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), RegistryError> {
        use std::io::Write;
        let path = self.dir.join(SNAP_FILE);
        let tmp = self.dir.join(format!("{SNAP_FILE}.tmp"));
        let bytes = postcard::to_stdvec(&(meta, data))
            .map_err(|e| RegistryError::Store(format!("encoding a snapshot: {e}")))?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn install(&mut self, meta: SnapshotMeta, data: Vec<u8>) -> Result<(), RegistryError> {
        let snap: SnapState = canonical::decode(SNAP_DOMAIN, &data)
            .map_err(|e| RegistryError::Corrupt(format!("snapshot {}: {e}", meta.snapshot_id)))?;
        let theirs = canonical::encode("config", &snap.config);
        let ours = canonical::encode("config", &self.state.config);
        if theirs != ours {
            tracing::error!(
                "refusing snapshot {}: the cluster's registry config differs from this validator's (cluster: {}; here: {})",
                meta.snapshot_id,
                serde_json::to_string(&snap.config).unwrap_or_default(),
                serde_json::to_string(&self.state.config).unwrap_or_default()
            );
            return Err(RegistryError::Config(
                "the cluster's registry config differs from this validator's".into(),
            ));
        }
        let state = snap.into_state();
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.store.install(&state, &self.marks())?;
        self.save(&meta, &data)?;
        *self.read.write().unwrap_or_else(|p| p.into_inner()) = read_model(&state);
        tracing::info!(height = state.height, id = %meta.snapshot_id, "snapshot installed");
        self.state = state;
        self.height.send_replace(self.state.height);
        Ok(())
    }

    fn current(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, RegistryError> {
        let bytes = match std::fs::read(self.dir.join(SNAP_FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (meta, data): (SnapshotMeta, Vec<u8>) = postcard::from_bytes(&bytes)
            .map_err(|e| RegistryError::Corrupt(format!("{SNAP_FILE}: {e}")))?;
        Ok(Some((meta, data)))
    }
}

/// The in-memory state is ahead of the disk and cannot be rolled back: stop, and let the restart
/// re-apply the entries from the raft log (nothing in them was acknowledged).
fn fatal(e: RegistryError) -> ! {
    tracing::error!("commit failed, exiting so the restart recovers the committed state: {e}");
    eprintln!("tfgrid registry: commit failed: {e}");
    std::process::exit(70)
}

fn snapshot(meta: SnapshotMeta, data: Vec<u8>) -> Snapshot<Tc> {
    Snapshot {
        meta,
        snapshot: Box::new(Cursor::new(data)),
    }
}

impl RaftSnapshotBuilder<Tc> for Machine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<Tc>, StorageError> {
        let (meta, data) = self.ask(Cmd::Build, ErrorVerb::Write).await?;
        Ok(snapshot(meta, data))
    }
}

impl RaftStateMachine<Tc> for Machine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.ask(Cmd::AppliedState, ErrorVerb::Read).await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        self.ask(|r| Cmd::Apply(entries, r), ErrorVerb::Write).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let meta = Box::new(meta.clone());
        let data = snapshot.into_inner();
        self.ask(|r| Cmd::Install(meta, data, r), ErrorVerb::Write)
            .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<Tc>>, StorageError> {
        Ok(self
            .ask(Cmd::Current, ErrorVerb::Read)
            .await?
            .map(|(m, d)| snapshot(m, d)))
    }
}
