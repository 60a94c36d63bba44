//! The write path. Requests queue on a channel; on the leader, the proposer takes everything
//! queued (up to MAX_BATCH) as one raft entry and hands it to raft without waiting for the entry
//! before it, so batches pipeline. An entry is acknowledged only after a majority of validators
//! have it on disk and this validator's state machine applied it: throughput comes from batching,
//! never from skipping the fsync.

use crate::cluster::log_store::LogStore;
use crate::cluster::machine::Machine;
use crate::cluster::network::Network;
use crate::cluster::{Applied, Batch, ClusterConfig, Raft, ValidatorId};
use crate::error::{RegistryError, TxError};
use crate::index::ReadModel;
use crate::state::Verified;
use crate::store::Store;
use openraft::error::ClientWriteError;
use openraft::BasicNode;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tfgrid_core::records::RegistryConfig;
use tfgrid_core::tx::{Receipt, SignedTx};
use tokio::sync::{mpsc, oneshot, watch};

const MAX_BATCH: usize = 4096;
/// Batches handed to raft and not yet applied. Small on purpose: while they commit, the next
/// requests queue up and go out as one batch (one fsync per validator), instead of one entry
/// each.
const IN_FLIGHT: usize = 2;
const QUEUE: usize = 65_536;

type Reply = oneshot::Sender<Result<Receipt, TxError>>;

pub struct Ledger {
    queue: mpsc::Sender<(Verified, Reply)>,
    read: Arc<RwLock<ReadModel>>,
    height: watch::Receiver<u64>,
    pub(crate) raft: Raft,
    pub(crate) cluster: ClusterConfig,
    pub(crate) net: Network,
    pub(crate) store: Store,
    forward: reqwest::Client,
}

/// Where a write goes from this validator.
pub enum Route {
    Local,
    Leader(ValidatorId, String),
    /// No leader is known (an election is on).
    Nobody,
}

impl Ledger {
    /// Opens the state machine and the raft log under `dir`, starts raft, and founds the cluster
    /// when this is the lowest founding member and nothing was ever written.
    pub async fn start(
        dir: &Path,
        config: RegistryConfig,
        cluster: ClusterConfig,
    ) -> Result<Self, RegistryError> {
        let raft_config = cluster.raft_config().map_err(RegistryError::Config)?;
        let store = Store::open(dir)?;
        let (machine, read, height) = Machine::start(dir, store.clone(), config)?;
        let log = LogStore::open(&dir.join("raft.redb"))?;
        let net = Network::new(cluster.key);
        let raft = Raft::new(cluster.id, Arc::new(raft_config), net.clone(), log, machine)
            .await
            .map_err(|e| RegistryError::Store(format!("starting raft: {e}")))?;
        let founder = cluster.peers.keys().next() == Some(&cluster.id);
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| RegistryError::Store(format!("raft: {e}")))?;
        if founder && !initialized {
            let members: std::collections::BTreeMap<ValidatorId, BasicNode> = cluster
                .peers
                .iter()
                .map(|(id, url)| (*id, BasicNode::new(url)))
                .collect();
            tracing::info!(?members, "founding the registry cluster");
            raft.initialize(members)
                .await
                .map_err(|e| RegistryError::Store(format!("founding the cluster: {e}")))?;
        }
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(propose(raft.clone(), rx));
        Ok(Self {
            queue,
            read,
            height,
            raft,
            cluster,
            net,
            store,
            forward: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(30))
                .build()
                .map_err(|e| RegistryError::Config(format!("an HTTP client: {e}")))?,
        })
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, ReadModel> {
        self.read.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> ValidatorId {
        self.cluster.id
    }

    /// The HTTP client that sends writes on to the leader.
    pub(crate) fn forwarder(&self) -> &reqwest::Client {
        &self.forward
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Where a write should go now, from raft's view of the leader.
    pub fn route(&self) -> Route {
        let m = self.raft.metrics();
        let m = m.borrow();
        match m.current_leader {
            Some(l) if l == self.cluster.id => Route::Local,
            Some(l) => match m.membership_config.nodes().find(|(id, _)| **id == l) {
                Some((_, n)) => Route::Leader(l, n.addr.clone()),
                None => Route::Nobody,
            },
            None => Route::Nobody,
        }
    }

    /// Waits (at most until `deadline`, and at most 50 ms) for raft's view to change: a new
    /// leader, a new term.
    pub async fn settle(&self, deadline: Instant) {
        let mut m = self.raft.metrics();
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(50));
        let _ = tokio::time::timeout(wait, m.changed()).await;
    }

    /// Waits until this validator has applied `height` (a write forwarded to the leader is then
    /// readable here too), at most `max`.
    pub async fn wait_applied(&self, height: u64, max: Duration) {
        let mut h = self.height.clone();
        let _ = tokio::time::timeout(max, h.wait_for(|a| *a >= height)).await;
    }

    /// Verifies all signatures (spread over the blocking pool), then queues the valid ones in the
    /// order given, so one signer's increasing nonces reach the proposer in order.
    pub async fn submit_many(&self, txs: Vec<SignedTx>) -> Vec<Result<Receipt, TxError>> {
        let n = txs.len();
        let chunk = n
            .div_ceil(
                std::thread::available_parallelism()
                    .map(|p| p.get())
                    .unwrap_or(1),
            )
            .max(1);
        let mut jobs = Vec::new();
        let mut txs = txs.into_iter();
        loop {
            let part: Vec<SignedTx> = txs.by_ref().take(chunk).collect();
            if part.is_empty() {
                break;
            }
            jobs.push(tokio::task::spawn_blocking(move || {
                part.into_iter().map(Verified::check).collect::<Vec<_>>()
            }));
        }
        let mut pending = Vec::with_capacity(n);
        for job in jobs {
            let checked = job
                .await
                .unwrap_or_else(|e| vec![Err(TxError::Unavailable(e.to_string()))]);
            for c in checked {
                pending.push(match c {
                    Ok(v) => self.enqueue(v).await,
                    Err(e) => Err(e),
                });
            }
        }
        let mut out = Vec::with_capacity(n);
        for p in pending {
            out.push(match p {
                Ok(rx) => rx.await.unwrap_or_else(|_| Err(stopped())),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Verifies the signature on the caller's thread (so verification runs on every core), then
    /// queues the transaction for the proposer and waits for its commit.
    pub async fn submit(&self, stx: SignedTx) -> Result<Receipt, TxError> {
        let v = Verified::check(stx)?;
        self.enqueue(v)
            .await?
            .await
            .unwrap_or_else(|_| Err(stopped()))
    }

    async fn enqueue(
        &self,
        v: Verified,
    ) -> Result<oneshot::Receiver<Result<Receipt, TxError>>, TxError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((v, tx))
            .await
            .map_err(|_| TxError::Unavailable("the proposer has stopped".into()))?;
        Ok(rx)
    }
}

fn stopped() -> TxError {
    TxError::Unavailable("the registry stopped before committing".into())
}

/// Takes what is queued as one batch and hands it to raft; a task per batch waits for its
/// result, so the next batch is proposed while this one replicates.
async fn propose(raft: Raft, mut rx: mpsc::Receiver<(Verified, Reply)>) {
    let mut last_at = 0;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let window = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = window.clone().acquire_owned().await else {
            return;
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let at = tfgrid_core::now_millis().max(last_at);
        last_at = at;
        let (txs, replies): (Vec<SignedTx>, Vec<Reply>) =
            batch.drain(..).map(|(v, r)| (v.into_tx(), r)).unzip();
        match raft.client_write_ff(Batch { at, txs }).await {
            Ok(result) => {
                tokio::spawn(async move {
                    let r = result.await;
                    drop(permit);
                    let outcome = match r {
                        Ok(Ok(resp)) => Ok(resp.data),
                        Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                            Err(TxError::NotLeader(match f.leader_id {
                                Some(l) => format!("validator {l} leads now; send it again"),
                                None => "an election is on; send it again".into(),
                            }))
                        }
                        Ok(Err(e)) => Err(TxError::Unavailable(e.to_string())),
                        Err(_) => Err(stopped()),
                    };
                    answer(replies, outcome);
                });
            }
            Err(fatal) => answer(replies, Err(TxError::Unavailable(fatal.to_string()))),
        }
    }
}

fn answer(replies: Vec<Reply>, outcome: Result<Applied, TxError>) {
    match outcome {
        Ok(Applied(results)) => {
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(r);
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
