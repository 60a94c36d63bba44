//! The single writer. Requests queue on a channel; the writer thread takes everything queued,
//! applies it to the state machine, commits the batch to redb in one fsync, refreshes the read
//! side, then answers every request in the batch. Throughput comes from batching, not from
//! skipping the fsync: an acknowledged transaction is on disk.

use crate::error::{RegistryError, TxError};
use crate::index::{Delta, ReadModel};
use crate::state::{Changes, State, Verified};
use crate::store::Store;
use std::sync::{Arc, RwLock};
use tfgrid_core::tx::{Receipt, SignedTx};
use tfgrid_core::Millis;
use tokio::sync::{mpsc, oneshot};

const MAX_BATCH: usize = 4096;
const QUEUE: usize = 65_536;

type Reply = oneshot::Sender<Result<Receipt, TxError>>;

pub struct Ledger {
    queue: mpsc::Sender<(Verified, Reply)>,
    read: Arc<RwLock<ReadModel>>,
}

fn delta(state: &State, ch: &Changes) -> Delta {
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

impl Ledger {
    pub fn start(store: Store, state: State) -> Self {
        let mut read = ReadModel::new(state.config.clone());
        let everything = Changes {
            twins: state.twins.keys().copied().collect(),
            farms: state.farms.keys().copied().collect(),
            nodes: state.nodes.keys().copied().collect(),
            contracts: state.contracts.keys().copied().collect(),
            networks: state.networks.keys().copied().collect(),
            nonces: state.nonces.keys().copied().collect(),
        };
        read.apply(delta(&state, &everything));
        let read = Arc::new(RwLock::new(read));
        let (queue, rx) = mpsc::channel(QUEUE);
        let r = read.clone();
        std::thread::Builder::new()
            .name("registry-writer".into())
            .spawn(move || writer(store, state, rx, r))
            .expect("spawn the registry writer thread");
        Self { queue, read }
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, ReadModel> {
        self.read.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Verifies all signatures (spread over the blocking pool), then queues the valid ones in the
    /// order given, so one signer's increasing nonces reach the writer in order.
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
                    Ok(v) => {
                        let (tx, rx) = oneshot::channel();
                        match self.queue.send((v, tx)).await {
                            Ok(()) => Ok(rx),
                            Err(_) => Err(TxError::Unavailable("the writer has stopped".into())),
                        }
                    }
                    Err(e) => Err(e),
                });
            }
        }
        let mut out = Vec::with_capacity(n);
        for p in pending {
            out.push(match p {
                Ok(rx) => rx.await.unwrap_or_else(|_| {
                    Err(TxError::Unavailable(
                        "the writer stopped before committing".into(),
                    ))
                }),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Verifies the signature on the caller's thread (so verification runs on every core), then
    /// queues the transaction for the writer and waits for its commit.
    pub async fn submit(&self, stx: SignedTx) -> Result<Receipt, TxError> {
        let v = Verified::check(stx)?;
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((v, tx))
            .await
            .map_err(|_| TxError::Unavailable("the writer has stopped".into()))?;
        rx.await
            .map_err(|_| TxError::Unavailable("the writer stopped before committing".into()))?
    }
}

fn writer(
    store: Store,
    mut state: State,
    mut rx: mpsc::Receiver<(Verified, Reply)>,
    read: Arc<RwLock<ReadModel>>,
) {
    let mut last_now: Millis = 0;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Registry time never goes backwards, even if the wall clock does.
        let now = tfgrid_core::now_millis().max(last_now);
        last_now = now;
        let mut ch = Changes::default();
        let mut results = Vec::with_capacity(batch.len());
        let mut log: Vec<(Millis, &Verified)> = Vec::new();
        for (v, _) in &batch {
            let r = state.apply(v, now, &mut ch).map(|outcome| {
                log.push((now, v));
                Receipt {
                    height: state.height,
                    tx_hash: v.tx().hash(),
                    at: now,
                    outcome,
                }
            });
            results.push(r);
        }
        if !log.is_empty() {
            let t = std::time::Instant::now();
            if let Err(e) = store.commit(&state, &log, &ch) {
                fatal(e);
            }
            let committed = t.elapsed();
            let d = delta(&state, &ch);
            read.write().unwrap_or_else(|p| p.into_inner()).apply(d);
            tracing::debug!(
                txs = batch.len(),
                applied = log.len(),
                commit_us = committed.as_micros() as u64,
                publish_us = (t.elapsed() - committed).as_micros() as u64,
                "batch"
            );
        }
        drop(log);
        for ((_, reply), r) in batch.drain(..).zip(results) {
            let _ = reply.send(r);
        }
    }
}

/// The in-memory state is ahead of the disk and cannot be rolled back: stop, and let the restart
/// recover exactly what was committed (nothing in this batch was acknowledged).
fn fatal(e: RegistryError) -> ! {
    tracing::error!("commit failed, exiting so the restart recovers the committed state: {e}");
    eprintln!("tfgrid registry: commit failed: {e}");
    std::process::exit(70)
}
