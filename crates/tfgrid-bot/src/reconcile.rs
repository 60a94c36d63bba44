//! Self-healing: every pass compares each deployment with what the registry and its nodes report.
//! A replica whose node is down, whose container gave up, whose node lost the deployment, or
//! that its gateway has not reached for a while (after reaching it before) is redeployed
//! elsewhere and its names re-pointed; a name whose gateway node is down moves to
//! another gateway. Deployments are reconciled side by side, each under its own lock: one that is
//! being deployed or removed is skipped this pass, and a slow heal holds up no other deployment.

use crate::bot::{wname, Bot, BotError};
use crate::liveness::NodeStates;
use crate::scheduler::Scheduler;
use crate::spec::{Service, Spec};
use crate::store::{Record, Replica, State};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tfgrid_core::deployment::ResultState;
use tfgrid_core::node_api::{self, ContractRef, DeploymentInfo};
use tfgrid_core::records::NodeStatus;
use tfgrid_core::{now_millis, ContractId, NodeId, TwinId};

/// How many reconcile passes between two orphan sweeps.
const SWEEP_EVERY: u32 = 10;
/// A replica its gateway has not reached for this long (having reached it before) is healed.
/// Never reached means a wrong port or a service that never listens, which another node would
/// not fix: that is logged, not healed.
const UNREACHABLE_FOR_S: f64 = 6.0;

impl Bot {
    /// One pass of self-healing over every running deployment.
    pub async fn reconcile(&self) -> Result<(), BotError> {
        let records = self.store.all()?;
        let used: Vec<NodeId> = records
            .iter()
            .flat_map(|r| {
                r.replicas
                    .iter()
                    .map(|x| x.node_id)
                    .chain(r.routes.iter().map(|x| x.node_id))
                    .collect::<Vec<_>>()
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if used.is_empty() {
            return Ok(());
        }
        let views = self.nodes_by_id(&used).await?;
        // The registry's status is the ledger's slow view; the pings see a dead node in seconds.
        let twins: Vec<(NodeId, TwinId)> =
            views.iter().map(|n| (n.node.id, n.node.twin_id)).collect();
        let crate::liveness::Survey { gone, states } = self.survey(&twins).await;
        let status: HashMap<NodeId, NodeStatus> = views
            .iter()
            .map(|n| {
                let s = if gone.contains_key(&n.node.id) {
                    NodeStatus::Down
                } else {
                    n.status
                };
                (n.node.id, s)
            })
            .collect();
        let passes = records
            .iter()
            .filter(|r| matches!(r.state, State::Running | State::Degraded))
            .map(|r| self.reconcile_one(&r.name, &status, &gone, &states));
        for r in futures::future::join_all(passes).await {
            if let Err(e) = r {
                tracing::warn!("reconcile: {e}");
            }
        }
        Ok(())
    }

    async fn reconcile_one(
        &self,
        name: &str,
        status: &HashMap<NodeId, NodeStatus>,
        gone: &HashMap<NodeId, String>,
        states: &HashMap<NodeId, Option<NodeStates>>,
    ) -> Result<(), BotError> {
        let down = |n: NodeId| {
            gone.get(&n)
                .cloned()
                .unwrap_or_else(|| format!("node {n} is down"))
        };
        let lock = self.lock_of(name);
        // Busy (being deployed, updated or removed): its operation owns it this pass.
        let Ok(_g) = lock.try_lock() else {
            return Ok(());
        };
        // Read again under the lock: the pass's list may be older than the last operation.
        let Some(mut rec) = self.store.get(name)? else {
            return Ok(());
        };
        if !matches!(rec.state, State::Running | State::Degraded) {
            return Ok(());
        }
        let spec = match Spec::parse(&rec.yaml) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(deployment = %rec.name, "stored spec no longer parses: {e}");
                return Ok(());
            }
        };
        let mut changed = false;
        let mut degraded = false;
        let from_gateways = self.gateway_health(&rec, status).await;
        // Every replica's node is asked at once: one slow node does not hold up the others.
        let checks = rec.replicas.iter().map(|r| async {
            match status.get(&r.node_id) {
                Some(NodeStatus::Up) => {
                    let (seen, why) = self.replica_health(r, states).await;
                    let why = why.or_else(|| unreachable(r, &from_gateways));
                    (seen, why)
                }
                Some(NodeStatus::Down) => (None, Some(down(r.node_id))),
                // Not in the pass's node list (placed after it was made): next pass.
                None => (None, None),
            }
        });
        let health = futures::future::join_all(checks).await;
        for (i, (seen, why)) in health.into_iter().enumerate() {
            if let Some((state, message)) = seen {
                let r = &mut rec.replicas[i];
                if state != r.state || message != r.message {
                    (r.state, r.message) = (state, message);
                    changed = true;
                }
            }
            let r = rec.replicas[i].clone();
            let Some(why) = why else { continue };
            let Some(svc) = spec.services.get(&r.service) else {
                continue;
            };
            match self.heal(&rec, &r, svc, &why).await {
                Ok(new) => {
                    rec.replicas[i] = new;
                    self.replace(&mut rec, &[(r.contract_id, r.node_twin)])
                        .await?;
                    changed = true;
                }
                Err(e) => {
                    self.heal_failed(&rec, format!("{}/{}: {why}; {e}", r.service, r.index));
                    degraded = true;
                }
            }
        }
        // Every name points at its service's replicas as they are now (after a heal, or a
        // re-point a crash cut short).
        for (sname, svc) in &spec.services {
            if self.repoint_service(&mut rec, svc, sname).await {
                changed = true;
            }
        }
        // A route whose gateway node is down moves to another gateway (its URL changes with
        // the gateway's domain and address).
        for j in 0..rec.routes.len() {
            let old = rec.routes[j].clone();
            if status.get(&old.node_id) != Some(&NodeStatus::Down) {
                continue;
            }
            let journal = self.journal(&rec.name);
            match self
                .make_route(&journal, &old.service, &old.name, old.backends.clone())
                .await
            {
                Ok(mut new) => {
                    new.name_contract = old.name_contract;
                    self.event(
                        &rec.name,
                        "gateway-moved",
                        format!(
                            "gateway {}; {} is now served at {} by node {}",
                            down(old.node_id),
                            old.name,
                            new.url,
                            new.node_id
                        ),
                    );
                    rec.routes[j] = new;
                    self.replace(&mut rec, &[(old.contract_id, old.node_twin)])
                        .await?;
                    changed = true;
                }
                Err(e) => {
                    self.heal_failed(&rec, format!("gateway {}; {e}", down(old.node_id)));
                    degraded = true;
                }
            }
        }
        let state = if degraded {
            State::Degraded
        } else {
            State::Running
        };
        if changed || state != rec.state {
            rec.state = state;
            rec.updated_at = now_millis();
            rec.made.clear();
            self.store.put(&rec)?;
        }
        Ok(())
    }

    /// How each route's gateway sees its backends (gateways that are up and answer).
    async fn gateway_health(
        &self,
        rec: &Record,
        status: &HashMap<NodeId, NodeStatus>,
    ) -> Vec<(NodeId, node_api::BackendHealth)> {
        let asks = rec
            .routes
            .iter()
            .filter(|r| status.get(&r.node_id) == Some(&NodeStatus::Up))
            .map(|r| async move {
                let h: Result<Vec<node_api::BackendHealth>, _> = self
                    .peer
                    .call_json(
                        r.node_twin,
                        node_api::GATEWAY_BACKENDS,
                        &node_api::BackendsRequest {
                            name: r.name.clone(),
                        },
                        Duration::from_secs(2),
                    )
                    .await;
                (r.node_id, h.unwrap_or_default())
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flat_map(|(n, hs)| hs.into_iter().map(move |h| (n, h)))
            .collect()
    }

    /// Said once, when the deployment turns degraded; the heal is retried every pass.
    fn heal_failed(&self, rec: &Record, msg: String) {
        if rec.state != State::Degraded {
            self.event(&rec.name, "heal-failed", msg);
        }
    }

    /// Stores `rec` (which now holds the replacement) and, in the same transaction, queues the
    /// cancel of what it replaced; then cancels it.
    async fn replace(
        &self,
        rec: &mut Record,
        gone: &[(ContractId, TwinId)],
    ) -> Result<(), BotError> {
        rec.made.clear();
        rec.updated_at = now_millis();
        self.store.put_with_cancels(rec, gone)?;
        tfgrid_core::faults::crash_point("bot-heal-after-commit");
        self.cancel_all(gone).await;
        Ok(())
    }

    /// How the replica is, from what its node said this pass: its container's state and
    /// message, and a reason to heal when the container gave up restarting or the node no
    /// longer has the deployment. A node that did not say gives neither (liveness decides on it).
    async fn replica_health(
        &self,
        r: &Replica,
        states: &HashMap<NodeId, Option<NodeStates>>,
    ) -> (Option<(String, String)>, Option<String>) {
        let Some(Some(on)) = states.get(&r.node_id) else {
            return (None, None);
        };
        let results = match on.get(&r.contract_id) {
            Some(results) => std::borrow::Cow::Borrowed(results),
            // Missing from the node's answer: placed after it was asked, or gone. Asked alone.
            None => match self.deployment_on(r).await {
                Ok(info) => std::borrow::Cow::Owned(info.results),
                Err(e) if e.contains("not found") => {
                    return (
                        None,
                        Some(format!("node {} no longer has the deployment", r.node_id)),
                    )
                }
                Err(_) => return (None, None),
            },
        };
        // The container's (or vm's) result; a replica of namespaces only has its first namespace's.
        let Some(res) = results
            .get(&wname(&r.service))
            .or_else(|| results.values().next())
        else {
            return (None, None);
        };
        let why = (res.state == ResultState::Error && res.message.contains("gave up"))
            .then(|| format!("{} failed: {}", r.service, res.message));
        (
            Some((
                format!("{:?}", res.state).to_lowercase(),
                res.message.clone(),
            )),
            why,
        )
    }

    async fn deployment_on(&self, r: &Replica) -> Result<DeploymentInfo, String> {
        self.peer
            .call_json(
                r.node_twin,
                node_api::GET,
                &ContractRef {
                    contract_id: r.contract_id,
                },
                Duration::from_secs(2),
            )
            .await
            .map_err(|e| e.to_string())
    }

    /// Deploys a replacement for `old` on another node. The caller stores it and cancels `old`.
    async fn heal(
        &self,
        rec: &Record,
        old: &Replica,
        svc: &Service,
        why: &str,
    ) -> Result<Replica, String> {
        let t0 = Instant::now();
        let (nodes, read_at) = self.recent_nodes().await.map_err(|e| e.to_string())?;
        let mut sched = Scheduler::new(self.placements.candidates(&nodes, read_at));
        let used: Vec<NodeId> = rec
            .replicas
            .iter()
            .filter(|r| r.service == old.service && r.contract_id != old.contract_id)
            .map(|r| r.node_id)
            .collect();
        let mut exclude: HashSet<NodeId> = self.gone_nodes();
        exclude.insert(old.node_id);
        let want = Self::want(svc).map_err(|e| e.to_string())?;
        // A target that does not answer a ping (the ledger may still call it up) is passed over.
        let mut target = None;
        for _ in 0..3 {
            let t = sched
                .place(
                    &format!("service {}", old.service),
                    &want,
                    1,
                    &used,
                    &exclude,
                )
                .map_err(|e| e.message)?[0];
            // Held before the ping: heals running beside this one place around it.
            let hold = self.placements.hold(t, want.capacity);
            let twin = sched.node(t).map(|c| c.twin).unwrap_or_default();
            if self.not_answering(&[(t, twin)]).await.is_empty() {
                target = Some((t, hold));
                break;
            }
            hold.discard();
            exclude.insert(t);
        }
        let (target, hold) = target.ok_or("the nodes chosen do not answer (three in a row)")?;
        let node = sched.node(target).cloned().expect("placed on a known node");
        let spec = Spec::parse(&rec.yaml).map_err(|e| e.to_string())?;
        let net = match spec.needs_network() {
            true => Some(self.network_of(&spec).await?.id),
            false => None,
        };
        let journal = self.journal(&rec.name);
        let new = self
            .deploy_replica(
                &journal,
                (&rec.name, &rec.yaml),
                (&old.service, old.index),
                svc,
                (&node, hold),
                net,
            )
            .await?;
        self.event(
            &rec.name,
            "healed",
            format!(
                "{}/{}: {why}; redeployed on node {}{} in {} ms",
                old.service,
                old.index,
                new.node_id,
                crate::bot::at_ip(&new.ip),
                t0.elapsed().as_millis()
            ),
        );
        Ok(new)
    }

    /// Reconciles every `period` until the task is dropped; retries queued cancels every pass and
    /// sweeps orphaned contracts every [`SWEEP_EVERY`] passes.
    pub async fn run_reconciler(self: std::sync::Arc<Self>, period: Duration) {
        let mut pass = 0u32;
        loop {
            tokio::time::sleep(period).await;
            if let Err(e) = self.reconcile().await {
                tracing::warn!("reconcile: {e}");
            }
            self.retry_cancels().await;
            self.sync_hosts().await;
            pass = pass.wrapping_add(1);
            if pass.is_multiple_of(SWEEP_EVERY) {
                // A bot with no records first tries to adopt what its nodes hold (a start that
                // could not); the sweep waits until that has been tried.
                match self.adopt().await {
                    Ok(_) => {
                        if let Err(e) = self.sweep_orphans().await {
                            tracing::warn!("orphan sweep: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("adopting deployments: {e}"),
                }
            }
        }
    }
}

/// Why a replica counts as unhealthy by its gateways, if it does.
fn unreachable(r: &Replica, from: &[(NodeId, node_api::BackendHealth)]) -> Option<String> {
    if r.ip.is_empty() {
        return None;
    }
    let prefix = format!("http://{}:", r.ip);
    let (gw, h) = from.iter().find(|(_, h)| h.backend.starts_with(&prefix))?;
    match h.reachable {
        Some(false) if h.ever_reachable && h.for_s >= UNREACHABLE_FOR_S => Some(format!(
            "not reachable from its gateway (node {gw}) for {:.0} s: {}",
            h.for_s, h.error
        )),
        Some(false) if !h.ever_reachable => {
            tracing::debug!(
                backend = %h.backend,
                "never reached by its gateway (node {gw}): {}",
                h.error
            );
            None
        }
        _ => None,
    }
}
