//! Fast failure detection off the ledger: each reconcile pass the bot asks the nodes its own
//! replicas and names are on for its deployments' states there (`deployment.states`, one call
//! per node, which is also the ping). A node is gone when its relay answers that its twin
//! is not connected (the relay sees a dropped connection at once) for DISCONNECTED_FOR, or when
//! it stays silent for SILENT_FOR while other nodes answer the same passes. The registry's
//! uptime status still counts, but healing no longer waits for it, so the ledger's report period
//! can be slow.
//!
//! Partition guard: a pass in which the bot itself is cut off (its relay connection is down, or
//! no node answers at all) decides nothing and restarts no clock, so a bot that loses the
//! network moves nothing.

use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tfgrid_bus::BusError;
use tfgrid_core::deployment::WorkloadResult;
use tfgrid_core::node_api;
use tfgrid_core::{ContractId, NodeId, TwinId};

pub(crate) const DISCONNECTED_FOR: Duration = Duration::from_secs(2);
pub(crate) const SILENT_FOR: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_millis(1500);
/// Survey calls in flight at once. The relay queues at most `relay::QUEUE` frames for one
/// connection and refuses the rest, so thousands of answers arriving together would be lost
/// and their nodes taken for silent.
const SURVEY_IN_FLIGHT: usize = 256;

/// What one ping said about one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The node answered (an error from the node itself is an answer too).
    Answered,
    /// Its relay says its twin is not connected.
    Disconnected,
    /// No answer in time.
    Silent,
    /// The bot's own connection to its relay is down: says nothing about the node.
    BotOffline,
}

impl Probe {
    pub(crate) fn of(r: &Result<Vec<u8>, BusError>) -> Self {
        match r {
            Ok(_) => Probe::Answered,
            Err(BusError::Remote(m)) if m.contains("is not connected") => Probe::Disconnected,
            Err(BusError::Remote(_)) => Probe::Answered,
            Err(BusError::Timeout(_)) => Probe::Silent,
            Err(BusError::NotConnected) => Probe::BotOffline,
            // The registry or the crypto failed on the bot's side: nothing about the node.
            Err(_) => Probe::BotOffline,
        }
    }
}

/// What one reconcile pass learned from the nodes.
pub(crate) struct Survey {
    /// Nodes gone now, with the reason.
    pub(crate) gone: HashMap<NodeId, String>,
    /// Per node asked: the results of each of this bot's deployments there, or None when the
    /// node did not say (no answer, or an answer that was not a list of states).
    pub(crate) states: HashMap<NodeId, Option<NodeStates>>,
}

pub(crate) type NodeStates = HashMap<ContractId, BTreeMap<String, WorkloadResult>>;

#[derive(Debug, Clone, Copy)]
struct Streak {
    since: Instant,
    disconnected: bool,
    twin: TwinId,
}

/// Each node's current run of failed pings.
#[derive(Default)]
pub(crate) struct Liveness {
    failing: HashMap<NodeId, Streak>,
}

impl Liveness {
    /// Takes one pass's pings; returns the nodes that are gone now, each with the reason.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        probes: &[(NodeId, TwinId, Probe)],
    ) -> HashMap<NodeId, String> {
        let cut_off = probes.iter().any(|(_, _, p)| *p == Probe::BotOffline)
            || (!probes.is_empty() && probes.iter().all(|(_, _, p)| *p == Probe::Silent));
        if cut_off {
            // Clocks restart after the bot is back: the time it was cut off proves nothing.
            self.failing.clear();
            return HashMap::new();
        }
        for (node, twin, p) in probes {
            match p {
                Probe::Answered => {
                    self.failing.remove(node);
                }
                Probe::Disconnected | Probe::Silent => {
                    let s = self.failing.entry(*node).or_insert(Streak {
                        since: now,
                        disconnected: true,
                        twin: *twin,
                    });
                    // Gone as disconnected only if every failed ping said so.
                    s.disconnected &= *p == Probe::Disconnected;
                }
                Probe::BotOffline => unreachable!("handled above"),
            }
        }
        let asked: std::collections::HashSet<NodeId> = probes.iter().map(|(n, _, _)| *n).collect();
        self.failing.retain(|n, _| asked.contains(n));
        self.failing
            .iter()
            .filter_map(|(n, s)| {
                let for_ = now.duration_since(s.since);
                let (limit, how) = if s.disconnected {
                    (DISCONNECTED_FOR, "its relay says it is not connected")
                } else {
                    (SILENT_FOR, "it does not answer while other nodes do")
                };
                (for_ >= limit).then(|| {
                    (
                        *n,
                        format!(
                            "node {n} is unreachable: {how} (for {:.1} s)",
                            for_.as_secs_f64()
                        ),
                    )
                })
            })
            .collect()
    }

    /// Starts a streak for a node a placement found not answering, so the next passes ping it.
    fn note(&mut self, now: Instant, node: NodeId, twin: TwinId, p: Probe) {
        self.failing.entry(node).or_insert(Streak {
            since: now,
            disconnected: p == Probe::Disconnected,
            twin,
        });
    }

    /// The nodes failing now: still pinged after the bot moved everything off them, so a dead
    /// node stays out of placements until it answers again.
    fn failing(&self) -> Vec<(NodeId, TwinId)> {
        self.failing.iter().map(|(n, s)| (*n, s.twin)).collect()
    }
}

impl crate::bot::Bot {
    /// Pings every node at once.
    async fn ping_all(&self, nodes: &[(NodeId, TwinId)]) -> Vec<(NodeId, TwinId, Probe)> {
        let pings = nodes.iter().map(|(n, twin)| async move {
            let r = self.peer.call(*twin, "bus.ping", b"", PING_TIMEOUT).await;
            (*n, *twin, Probe::of(&r))
        });
        futures::future::join_all(pings).await
    }

    /// Asks every node in `nodes`, and every node failing so far, at once for the states of this
    /// bot's deployments on it (`deployment.states`, one call per node, which is also its
    /// ping). Returns the nodes that are gone and what each node that answered said.
    pub(crate) async fn survey(&self, nodes: &[(NodeId, TwinId)]) -> Survey {
        let mut targets: HashMap<NodeId, TwinId> = self
            .liveness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failing()
            .into_iter()
            .collect();
        targets.extend(nodes.iter().copied());
        let asks = targets.into_iter().map(|(n, twin)| async move {
            let r = self
                .peer
                .call(twin, node_api::STATES, b"{}", PING_TIMEOUT)
                .await;
            let states = r
                .as_ref()
                .ok()
                .and_then(|b| serde_json::from_slice::<Vec<node_api::DeploymentState>>(b).ok())
                .map(|v| v.into_iter().map(|d| (d.contract_id, d.results)).collect());
            ((n, twin, Probe::of(&r)), (n, states))
        });
        let (probes, states): (Vec<_>, HashMap<_, _>) = futures::stream::iter(asks)
            .buffer_unordered(SURVEY_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .unzip();
        let gone = self
            .liveness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(Instant::now(), &probes);
        *self.gone.lock().unwrap_or_else(|p| p.into_inner()) = gone.clone();
        Survey { gone, states }
    }

    /// Of the nodes a placement chose, the ones that do not answer a ping now (the relay says
    /// they are not connected, or they are silent): the placement is made again without them.
    /// A bot that is itself offline learns nothing here and excludes nothing.
    pub(crate) async fn not_answering(
        &self,
        nodes: &[(NodeId, TwinId)],
    ) -> std::collections::HashSet<NodeId> {
        let probes = self.ping_all(nodes).await;
        let now = Instant::now();
        let mut l = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        probes
            .into_iter()
            .filter(|(_, _, p)| matches!(p, Probe::Disconnected | Probe::Silent))
            .map(|(n, twin, p)| {
                l.note(now, n, twin, p);
                n
            })
            .collect()
    }

    /// The nodes the last pass found gone: never chosen for a placement.
    pub(crate) fn gone_nodes(&self) -> std::collections::HashSet<NodeId> {
        self.gone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_gone_only_after_its_streak_and_a_cut_off_bot_decides_nothing() {
        let mut l = Liveness::default();
        let t = Instant::now();
        let s = |ms: u64| t + Duration::from_millis(ms);
        use Probe::*;
        // Disconnected, by its relay's word: gone after 2 s, not before.
        assert!(l
            .observe(s(0), &[(1, 0, Disconnected), (2, 0, Answered)])
            .is_empty());
        assert!(l
            .observe(s(1500), &[(1, 0, Disconnected), (2, 0, Answered)])
            .is_empty());
        let gone = l.observe(s(2100), &[(1, 0, Disconnected), (2, 0, Answered)]);
        assert!(gone[&1].contains("not connected"), "{gone:?}");
        // An answer ends the streak.
        assert!(l
            .observe(s(2200), &[(1, 0, Answered), (2, 0, Answered)])
            .is_empty());
        assert!(l
            .observe(s(4500), &[(1, 0, Disconnected), (2, 0, Answered)])
            .is_empty());
        // Silent while others answer: gone after 5 s.
        let mut l = Liveness::default();
        assert!(l
            .observe(s(0), &[(1, 0, Silent), (2, 0, Answered)])
            .is_empty());
        assert!(l
            .observe(s(4000), &[(1, 0, Silent), (2, 0, Answered)])
            .is_empty());
        assert!(l
            .observe(s(5100), &[(1, 0, Silent), (2, 0, Answered)])
            .contains_key(&1));
        // Everyone silent: the bot is the one cut off; nothing is gone and clocks restart.
        let mut l = Liveness::default();
        assert!(l
            .observe(s(0), &[(1, 0, Silent), (2, 0, Answered)])
            .is_empty());
        assert!(l
            .observe(s(6000), &[(1, 0, Silent), (2, 0, Silent)])
            .is_empty());
        assert!(l
            .observe(s(7000), &[(1, 0, Silent), (2, 0, Answered)])
            .is_empty());
        // The bot's relay connection down: nothing is decided either.
        let mut l = Liveness::default();
        assert!(l.observe(s(0), &[(1, 0, Disconnected)]).is_empty());
        assert!(l.observe(s(3000), &[(1, 0, BotOffline)]).is_empty());
        assert!(l.observe(s(3100), &[(1, 0, Disconnected)]).is_empty());
        assert!(l.observe(s(5200), &[(1, 0, Disconnected)]).contains_key(&1));
        // A node that stays gone is still pinged (the bot passes the failing ones too).
        assert_eq!(l.failing(), vec![(1, 0)]);
    }

    #[test]
    fn bus_errors_are_read_as_what_they_say_about_the_node() {
        assert_eq!(Probe::of(&Ok(vec![])), Probe::Answered);
        assert_eq!(
            Probe::of(&Err(BusError::Remote("twin 7 is not connected".into()))),
            Probe::Disconnected
        );
        assert_eq!(
            Probe::of(&Err(BusError::Remote("unknown method".into()))),
            Probe::Answered
        );
        assert_eq!(Probe::of(&Err(BusError::Timeout(1500))), Probe::Silent);
        assert_eq!(Probe::of(&Err(BusError::NotConnected)), Probe::BotOffline);
    }
}
