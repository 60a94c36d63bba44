//! Placement: which nodes get a service's replicas. Fit first (node up, free capacity, country,
//! farms, GPU, one replica per node), then score: a farm with none of the service's replicas
//! before one that has some, then the least loaded node, then the lowest node id, so the same
//! registry state always gives the same placement.
//!
//! Nodes are kept ordered by load, so a placement looks at the least loaded nodes first and stops
//! at the first that fits in a new farm: placing is fast however many nodes the grid has, and
//! only a placement that fails looks at every node (to say why).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use tfgrid_core::records::{NodeStatus, NodeView};
use tfgrid_core::{Capacity, FarmId, NodeId};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Want {
    pub capacity: Capacity,
    pub country: Option<String>,
    pub farms: Option<Vec<FarmId>>,
    pub gpu: bool,
    /// Each replica on its own node.
    pub distinct: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: NodeId,
    pub twin: u32,
    pub farm: FarmId,
    pub country: String,
    pub up: bool,
    pub gpus: usize,
    pub total: Capacity,
    pub free: Capacity,
}

impl From<&NodeView> for Candidate {
    fn from(n: &NodeView) -> Self {
        Candidate {
            id: n.node.id,
            twin: n.node.twin_id,
            farm: n.node.farm_id,
            country: n.node.location.country.clone(),
            up: n.status == NodeStatus::Up,
            gpus: n.node.gpus.len(),
            total: n.node.total,
            free: n.free,
        }
    }
}

/// Why nodes were passed over, counted, for "no node fits" messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Down,
    Country,
    Farm,
    Gpu,
    Cores,
    Memory,
    Ssd,
    Hdd,
    Excluded,
    HasReplica,
}

impl Reason {
    fn says(self) -> &'static str {
        match self {
            Reason::Down => "the node is down",
            Reason::Country => "not in the requested country",
            Reason::Farm => "not in the requested farms",
            Reason::Gpu => "no GPU",
            Reason::Cores => "not enough free cores (cru)",
            Reason::Memory => "not enough free memory (mru)",
            Reason::Ssd => "not enough free SSD (sru)",
            Reason::Hdd => "not enough free HDD (hru)",
            Reason::Excluded => "excluded (a failed node)",
            Reason::HasReplica => "already runs a replica (distinct_nodes)",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct NoFit {
    pub message: String,
    /// The reason that excluded the most nodes.
    pub top: Option<Reason>,
}

type Order = BTreeSet<(u32, NodeId)>;

pub struct Scheduler {
    nodes: HashMap<NodeId, Candidate>,
    /// (load in per-mille, node id): the least loaded first.
    order: Order,
    /// The same order within one country, and among nodes with GPUs: a placement that asks for
    /// either walks only those nodes.
    by_country: HashMap<String, Order>,
    with_gpu: Order,
}

fn load(c: &Candidate) -> u32 {
    let frac = |free: u64, total: u64| {
        (free.min(total) * 1000)
            .checked_div(total)
            .map_or(1000, |f| (1000 - f) as u32)
    };
    frac(c.free.cru, c.total.cru).max(frac(c.free.mru, c.total.mru))
}

impl Scheduler {
    pub fn new(nodes: impl IntoIterator<Item = Candidate>) -> Self {
        let mut s = Scheduler {
            nodes: HashMap::new(),
            order: BTreeSet::new(),
            by_country: HashMap::new(),
            with_gpu: BTreeSet::new(),
        };
        for c in nodes {
            s.index(&c, true);
            s.nodes.insert(c.id, c);
        }
        s
    }

    fn index(&mut self, c: &Candidate, insert: bool) {
        let key = (load(c), c.id);
        let country = self
            .by_country
            .entry(c.country.to_ascii_lowercase())
            .or_default();
        let sets: [&mut Order; 2] = [&mut self.order, country];
        for set in sets {
            if insert {
                set.insert(key);
            } else {
                set.remove(&key);
            }
        }
        if c.gpus > 0 {
            if insert {
                self.with_gpu.insert(key);
            } else {
                self.with_gpu.remove(&key);
            }
        }
    }

    pub fn node(&self, id: NodeId) -> Option<&Candidate> {
        self.nodes.get(&id)
    }

    fn reject(
        &self,
        c: &Candidate,
        w: &Want,
        used: &HashSet<NodeId>,
        exclude: &HashSet<NodeId>,
    ) -> Option<Reason> {
        if !c.up {
            return Some(Reason::Down);
        }
        if exclude.contains(&c.id) {
            return Some(Reason::Excluded);
        }
        if w.distinct && used.contains(&c.id) {
            return Some(Reason::HasReplica);
        }
        if let Some(country) = &w.country {
            if !c.country.eq_ignore_ascii_case(country) {
                return Some(Reason::Country);
            }
        }
        if let Some(farms) = &w.farms {
            if !farms.contains(&c.farm) {
                return Some(Reason::Farm);
            }
        }
        if w.gpu && c.gpus == 0 {
            return Some(Reason::Gpu);
        }
        let (n, f) = (&w.capacity, &c.free);
        if n.cru > f.cru {
            return Some(Reason::Cores);
        }
        if n.mru > f.mru {
            return Some(Reason::Memory);
        }
        if n.sru > f.sru {
            return Some(Reason::Ssd);
        }
        if n.hru > f.hru {
            return Some(Reason::Hdd);
        }
        None
    }

    /// Places `replicas` replicas of one service. `used` holds the nodes that already run this
    /// service's replicas (they count for spreading and for distinct_nodes); `exclude` nodes are
    /// never chosen. The chosen nodes' free capacity is taken in this scheduler, so the next call
    /// sees it gone.
    pub fn place(
        &mut self,
        what: &str,
        want: &Want,
        replicas: u32,
        used: &[NodeId],
        exclude: &HashSet<NodeId>,
    ) -> Result<Vec<NodeId>, NoFit> {
        let mut used_nodes: HashSet<NodeId> = used.iter().copied().collect();
        let mut farms: HashMap<FarmId, u32> = HashMap::new();
        for id in used {
            if let Some(c) = self.nodes.get(id) {
                *farms.entry(c.farm).or_default() += 1;
            }
        }
        let mut out = Vec::new();
        for i in 0..replicas {
            let mut fallback: Option<NodeId> = None;
            let mut chosen = None;
            let mut seen_fitting = 0;
            let empty = Order::new();
            let walk = if want.gpu {
                &self.with_gpu
            } else if let Some(country) = &want.country {
                self.by_country
                    .get(&country.to_ascii_lowercase())
                    .unwrap_or(&empty)
            } else {
                &self.order
            };
            for &(_, id) in walk {
                let c = &self.nodes[&id];
                if self.reject(c, want, &used_nodes, exclude).is_some() {
                    continue;
                }
                if !farms.contains_key(&c.farm) {
                    chosen = Some(id);
                    break;
                }
                fallback.get_or_insert(id);
                seen_fitting += 1;
                // Enough evidence that the fitting nodes are all in used farms.
                if seen_fitting > 64 {
                    break;
                }
            }
            let Some(id) = chosen.or(fallback) else {
                return Err(self.explain(what, want, i, replicas, &used_nodes, exclude));
            };
            let mut c = self.nodes.remove(&id).expect("ordered node exists");
            self.index(&c, false);
            c.free = c.free.saturating_sub(&want.capacity);
            self.index(&c, true);
            *farms.entry(c.farm).or_default() += 1;
            self.nodes.insert(id, c);
            used_nodes.insert(id);
            out.push(id);
        }
        Ok(out)
    }

    fn explain(
        &self,
        what: &str,
        want: &Want,
        replica: u32,
        replicas: u32,
        used: &HashSet<NodeId>,
        exclude: &HashSet<NodeId>,
    ) -> NoFit {
        let mut counts: BTreeMap<Reason, usize> = BTreeMap::new();
        for c in self.nodes.values() {
            if let Some(r) = self.reject(c, want, used, exclude) {
                *counts.entry(r).or_default() += 1;
            }
        }
        let top = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(r, n)| (*r, *n));
        let which = if replicas > 1 {
            format!(" (replica {} of {replicas})", replica + 1)
        } else {
            String::new()
        };
        let message = match top {
            None => format!("no node fits {what}{which}: the grid has no nodes"),
            Some((r, n)) => {
                let others: Vec<String> = counts
                    .iter()
                    .filter(|(k, _)| **k != r)
                    .map(|(k, v)| format!("{v} {}", k.says()))
                    .collect();
                format!(
                    "no node fits {what}{which}: {n} of {} nodes excluded because {}{}",
                    self.nodes.len(),
                    r.says(),
                    if others.is_empty() {
                        String::new()
                    } else {
                        format!("; others: {}", others.join(", "))
                    }
                )
            }
        };
        NoFit {
            message,
            top: top.map(|t| t.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfgrid_core::capacity::GIB;

    fn node(id: NodeId, farm: FarmId, cru: u64, mru_gib: u64, free_mru_gib: u64) -> Candidate {
        Candidate {
            id,
            twin: id + 100,
            farm,
            country: if id.is_multiple_of(2) { "BE" } else { "EG" }.into(),
            up: true,
            gpus: 0,
            total: Capacity {
                cru,
                mru: mru_gib * GIB,
                sru: 100 * GIB,
                ..Default::default()
            },
            free: Capacity {
                cru,
                mru: free_mru_gib * GIB,
                sru: 100 * GIB,
                ..Default::default()
            },
        }
    }

    fn want(mru_gib: u64) -> Want {
        Want {
            capacity: Capacity {
                cru: 1,
                mru: mru_gib * GIB,
                ..Default::default()
            },
            distinct: true,
            ..Default::default()
        }
    }

    #[test]
    fn spreads_over_farms_then_least_loaded() {
        // Farm 1: nodes 1 (idle) and 2 (idle); farm 2: node 3 (half used).
        let mut s = Scheduler::new([
            node(1, 1, 4, 8, 8),
            node(2, 1, 4, 8, 8),
            node(3, 2, 4, 8, 4),
        ]);
        let got = s.place("web", &want(1), 2, &[], &HashSet::new()).unwrap();
        // The first goes to the least loaded (node 1), the second to the other farm.
        assert_eq!(got, vec![1, 3]);
        // A third replica: no new farm left, the least loaded fitting node.
        let got = s
            .place("web", &want(1), 1, &[1, 3], &HashSet::new())
            .unwrap();
        assert_eq!(got, vec![2]);
    }

    #[test]
    fn deterministic() {
        let nodes: Vec<_> = (1..50)
            .map(|i| node(i, i % 5, 4, 8, 8 - (i as u64 % 3)))
            .collect();
        let a = Scheduler::new(nodes.clone()).place("x", &want(1), 5, &[], &HashSet::new());
        let b =
            Scheduler::new(nodes.into_iter().rev()).place("x", &want(1), 5, &[], &HashSet::new());
        assert_eq!(a, b);
    }

    #[test]
    fn explains_the_constraint_that_excluded_most() {
        let mut nodes = vec![
            node(1, 1, 4, 8, 1),
            node(2, 1, 4, 8, 1),
            node(3, 1, 4, 8, 8),
        ];
        nodes[2].up = false;
        let mut s = Scheduler::new(nodes);
        let e = s
            .place("web", &want(4), 1, &[], &HashSet::new())
            .unwrap_err();
        assert_eq!(e.top, Some(Reason::Memory));
        assert!(
            e.message
                .contains("2 of 3 nodes excluded because not enough free memory"),
            "{}",
            e.message
        );
        assert!(e.message.contains("1 the node is down"), "{}", e.message);
        let mut w = want(1);
        w.country = Some("NL".into());
        let e = s.place("web", &w, 1, &[], &HashSet::new()).unwrap_err();
        assert_eq!(e.top, Some(Reason::Country));
        let e = Scheduler::new([])
            .place("web", &want(1), 1, &[], &HashSet::new())
            .unwrap_err();
        assert!(e.message.contains("no nodes"));
    }

    #[test]
    fn distinct_nodes_and_exclusions() {
        let mut s = Scheduler::new([node(1, 1, 4, 8, 8), node(2, 1, 4, 8, 8)]);
        let e = s
            .place("web", &want(1), 3, &[], &HashSet::new())
            .unwrap_err();
        assert!(e.message.contains("replica 3 of 3"), "{}", e.message);
        assert_eq!(e.top, Some(Reason::HasReplica));
        let mut s = Scheduler::new([node(1, 1, 4, 8, 8), node(2, 1, 4, 8, 8)]);
        let got = s.place("web", &want(1), 1, &[], &[1].into()).unwrap();
        assert_eq!(got, vec![2]);
        let mut w = want(1);
        w.distinct = false;
        let mut s = Scheduler::new([node(1, 1, 4, 8, 8)]);
        assert_eq!(
            s.place("web", &w, 3, &[], &HashSet::new()).unwrap(),
            vec![1, 1, 1]
        );
    }

    #[test]
    fn capacity_is_taken_as_it_is_placed() {
        let mut s = Scheduler::new([node(1, 1, 4, 8, 2)]);
        assert!(s.place("a", &want(2), 1, &[], &HashSet::new()).is_ok());
        let e = s.place("b", &want(1), 1, &[], &HashSet::new()).unwrap_err();
        assert_eq!(e.top, Some(Reason::Memory));
    }
}
