//! What makes the bot's flows crash-safe: removal as a persisted state, the retried cancel queue,
//! the start-up recovery that finishes or undoes whatever a crash interrupted, and the orphan
//! sweep (the bot owns its twin's contracts: a live one that no record holds is cancelled).

use crate::bot::{Bot, BotError};
use crate::store::{Record, State};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use tfgrid_core::contract::{Contract, ContractKind};
use tfgrid_core::faults::crash_point;
use tfgrid_core::filter::{ContractFilter, MAX_PAGE_SIZE};
use tfgrid_core::{now_millis, ContractId, TwinId};

/// What a removal did: how many contracts the registry has not confirmed cancelled yet (they stay
/// queued and the record stays `removing` until it does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    pub cancelled: usize,
    pub pending: usize,
}

/// Marks a user operation (deploy, update, remove) as running while it lives: the orphan sweep
/// does not act while one runs or when one began during the sweep.
pub struct Operation<'a>(&'a Bot);

impl Drop for Operation<'_> {
    fn drop(&mut self) {
        self.0.ops_running.fetch_sub(1, Ordering::SeqCst);
    }
}

fn jobs_of(rec: &Record) -> Vec<(ContractId, TwinId)> {
    let mut v: Vec<(ContractId, TwinId)> = rec
        .replicas
        .iter()
        .map(|r| (r.contract_id, r.node_twin))
        .chain(
            rec.routes
                .iter()
                .flat_map(|r| [(r.contract_id, r.node_twin), (r.name_contract, 0)]),
        )
        .chain(rec.made.iter().map(|m| (m.contract_id, m.node_twin)))
        .collect();
    v.sort_unstable();
    v.dedup_by_key(|j| j.0);
    v
}

impl Bot {
    pub(crate) fn operation(&self) -> Operation<'_> {
        self.ops_started.fetch_add(1, Ordering::SeqCst);
        self.ops_running.fetch_add(1, Ordering::SeqCst);
        Operation(self)
    }

    /// Removes a deployment: first stored as `removing` with every contract queued for cancel
    /// (one transaction), then the nodes are asked to delete and the registry to cancel. A crash
    /// at any point is finished by the next start; a removal is never undone.
    pub async fn remove(&self, name: &str) -> Result<Removed, BotError> {
        let lock = self.lock_of(name);
        let _g = lock.lock().await;
        let _op = self.operation();
        let mut rec = self
            .store
            .get(name)?
            .ok_or_else(|| BotError::NotFound(format!("no deployment named {name:?}")))?;
        let jobs = jobs_of(&rec);
        rec.state = State::Removing;
        rec.updated_at = now_millis();
        self.store.put_with_cancels(&rec, &jobs)?;
        crash_point("bot-during-remove");
        let pending = self.cancel_all(&jobs).await;
        let done = Removed {
            cancelled: jobs.len() - pending,
            pending,
        };
        self.finish_removal(&rec, done)?;
        Ok(done)
    }

    /// A `removing` record goes once none of its contracts waits in the cancel queue.
    fn finish_removal(&self, rec: &Record, r: Removed) -> Result<bool, BotError> {
        if r.pending > 0 {
            self.event(
                &rec.name,
                "removing",
                format!(
                    "{} contracts cancelled; {} wait for the registry and are retried until cancelled",
                    r.cancelled, r.pending
                ),
            );
            return Ok(false);
        }
        self.store.remove(&rec.name)?;
        self.event(
            &rec.name,
            "removed",
            format!(
                "{} replicas and {} routes removed, {} contracts cancelled",
                rec.replicas.len(),
                rec.routes.len(),
                r.cancelled
            ),
        );
        Ok(true)
    }

    /// At start: undo what a crash cut short, finish removals, retry cancels, then sweep.
    pub(crate) async fn recover(&self) -> Result<(), BotError> {
        for mut rec in self.store.all()? {
            match rec.state {
                State::Deploying => {
                    let jobs = jobs_of(&rec);
                    // The record goes and its cancels are queued in one transaction.
                    self.store.remove_with_cancels(&rec.name, &jobs)?;
                    let pending = self.cancel_all(&jobs).await;
                    self.event(
                        &rec.name,
                        "failed",
                        format!(
                            "the bot stopped during the deploy; rolled back: {} contracts cancelled{}",
                            jobs.len() - pending,
                            if pending > 0 {
                                format!(", {pending} queued until the registry answers")
                            } else {
                                String::new()
                            }
                        ),
                    );
                }
                State::Removing => {
                    let jobs = jobs_of(&rec);
                    let pending = self.cancel_all(&jobs).await;
                    self.finish_removal(
                        &rec,
                        crate::recovery::Removed {
                            cancelled: jobs.len() - pending,
                            pending,
                        },
                    )?;
                }
                State::Running | State::Degraded if !rec.made.is_empty() => {
                    // An update or heal was cut short: the deployed version stays as it was.
                    let jobs: Vec<(ContractId, TwinId)> = rec
                        .made
                        .iter()
                        .map(|m| (m.contract_id, m.node_twin))
                        .collect();
                    rec.made.clear();
                    self.store.put_with_cancels(&rec, &jobs)?;
                    let pending = self.cancel_all(&jobs).await;
                    self.event(
                        &rec.name,
                        "rolled-back",
                        format!(
                            "the bot stopped during an update or heal; its {} new contracts are cancelled{}",
                            jobs.len(),
                            if pending > 0 {
                                format!(" ({pending} queued until the registry answers)")
                            } else {
                                String::new()
                            }
                        ),
                    );
                }
                _ => {}
            }
        }
        self.retry_cancels().await;
        match self.adopt().await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!("adopted {n} deployments found on nodes");
                }
                if let Err(e) = self.sweep_orphans().await {
                    tracing::warn!("orphan sweep at start: {e}");
                }
            }
            // Nothing is swept that might have been adopted: the next sweep comes later.
            Err(e) => tracing::warn!("adopting deployments at start: {e}"),
        }
        Ok(())
    }

    /// Tries every queued cancel again; a `removing` record whose cancels are all done goes.
    pub async fn retry_cancels(&self) {
        let pending = match self.store.pending_cancels() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("reading the cancel queue: {e}");
                return;
            }
        };
        if !pending.is_empty() {
            let tries = pending.iter().map(|&(c, _)| self.cancel_now(c));
            futures::future::join_all(tries).await;
        }
        let Ok(still) = self.store.pending_cancels() else {
            return;
        };
        let still: HashSet<ContractId> = still.into_iter().map(|j| j.0).collect();
        let Ok(records) = self.store.all() else {
            return;
        };
        for rec in records.iter().filter(|r| r.state == State::Removing) {
            let lock = self.lock_of(&rec.name);
            let Ok(_g) = lock.try_lock() else { continue };
            let jobs = jobs_of(rec);
            let left = jobs.iter().filter(|j| still.contains(&j.0)).count();
            if left == 0 {
                let r = Removed {
                    cancelled: jobs.len(),
                    pending: 0,
                };
                if let Err(e) = self.finish_removal(rec, r) {
                    tracing::error!("finishing the removal of {}: {e}", rec.name);
                }
            }
        }
    }

    /// Every live contract of this bot's twin, all pages.
    pub(crate) async fn live_contracts(&self) -> Result<Vec<Contract>, BotError> {
        let mut out = Vec::new();
        for page in 1.. {
            let batch = self
                .registry
                .contracts(&ContractFilter {
                    twin_id: Some(self.twin),
                    state: Some("live".into()),
                    page: Some(page),
                    size: Some(MAX_PAGE_SIZE),
                    ..Default::default()
                })
                .await?;
            let n = batch.len();
            out.extend(batch);
            if n < MAX_PAGE_SIZE as usize {
                break;
            }
        }
        Ok(out)
    }

    /// Cancels every live contract of this twin that no record holds, that is not queued for
    /// cancel already and that no operation is creating right now. Returns the ids cancelled.
    pub async fn sweep_orphans(&self) -> Result<Vec<ContractId>, BotError> {
        let started = self.ops_started.load(Ordering::SeqCst);
        if self.ops_running.load(Ordering::SeqCst) > 0 {
            return Ok(Vec::new());
        }
        let live = self.live_contracts().await?;
        // In this order: a contract in the list was created before it was fetched, so it is
        // either still marked in flight or already in a record's journal (marks go after).
        let inflight = self.inflight_keys();
        let mut held: HashSet<ContractId> = HashSet::new();
        for rec in self.store.all()? {
            held.extend(rec.contracts());
        }
        held.extend(self.store.pending_cancels()?.into_iter().map(|j| j.0));
        let orphans: Vec<(ContractId, TwinId)> = live
            .iter()
            .filter(|c| !held.contains(&c.id))
            .filter(|c| {
                let key = match &c.kind {
                    ContractKind::Node(n) => format!("node:{}:{}", n.node_id, n.deployment_hash),
                    ContractKind::Name(n) => format!("name:{}", n.name),
                };
                !inflight.contains(&key)
            })
            .map(|c| (c.id, 0))
            .collect();
        if orphans.is_empty() {
            return Ok(Vec::new());
        }
        // A user operation that began meanwhile may reuse one of them (a name): next sweep.
        if self.ops_started.load(Ordering::SeqCst) != started
            || self.ops_running.load(Ordering::SeqCst) > 0
        {
            return Ok(Vec::new());
        }
        // The nodes delete them when they see the cancel (they check every 2 s).
        let pending = self.cancel_all(&orphans).await;
        let ids: Vec<ContractId> = orphans.iter().map(|o| o.0).collect();
        self.event(
            "",
            "orphans",
            format!(
                "cancelled {} live contracts of this twin that no deployment holds: {:?}{}",
                ids.len() - pending,
                ids,
                if pending > 0 {
                    format!(" ({pending} queued until the registry answers)")
                } else {
                    String::new()
                }
            ),
        );
        Ok(ids)
    }
}
