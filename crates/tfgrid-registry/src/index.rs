//! The read side: copies of committed records with the secondary indexes the query API needs.
//! The writer refreshes it after each commit, so a reader never sees a record that is not durable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use tfgrid_core::contract::{Contract, ContractKind};
use tfgrid_core::filter::{ContractFilter, NodeFilter, SortBy, SortOrder};
use tfgrid_core::records::{
    Account, Farm, Node, NodeStatus, NodeView, RegistryConfig, Stats, Twin,
};
use tfgrid_core::{Capacity, ContractId, FarmId, Millis, NodeId, PublicKey, TwinId};

/// The records a commit changed, in their committed form.
#[derive(Debug, Default)]
pub struct Delta {
    pub height: u64,
    pub twins: Vec<Twin>,
    pub farms: Vec<Farm>,
    pub nodes: Vec<Node>,
    pub contracts: Vec<Contract>,
    pub nonces: Vec<(PublicKey, u64)>,
}

const SORT_KEYS: [SortBy; 8] = [
    SortBy::FreeCru,
    SortBy::FreeMru,
    SortBy::FreeSru,
    SortBy::FreeHru,
    SortBy::TotalCru,
    SortBy::TotalMru,
    SortBy::TotalSru,
    SortBy::TotalHru,
];

fn sort_value(n: &Node, by: SortBy) -> u64 {
    let free = n.free();
    match by {
        SortBy::NodeId => n.id.into(),
        SortBy::FreeCru => free.cru,
        SortBy::FreeMru => free.mru,
        SortBy::FreeSru => free.sru,
        SortBy::FreeHru => free.hru,
        SortBy::TotalCru => n.total.cru,
        SortBy::TotalMru => n.total.mru,
        SortBy::TotalSru => n.total.sru,
        SortBy::TotalHru => n.total.hru,
    }
}

fn slot(by: SortBy) -> Option<usize> {
    SORT_KEYS.iter().position(|k| *k == by)
}

/// Nodes with one ordered set per sortable resource and posting sets per equality filter, so a
/// query walks only candidates, in the order it returns them, and stops once its page is full.
#[derive(Debug, Default)]
pub struct NodeIndex {
    nodes: BTreeMap<NodeId, Node>,
    by_farm: HashMap<FarmId, BTreeSet<NodeId>>,
    by_country: HashMap<String, BTreeSet<NodeId>>,
    by_city: HashMap<String, BTreeSet<NodeId>>,
    by_twin: HashMap<TwinId, NodeId>,
    gateways: BTreeSet<NodeId>,
    gpu_nodes: BTreeSet<NodeId>,
    sorted: [BTreeSet<(u64, NodeId)>; 8],
}

fn norm(s: &str) -> String {
    s.to_lowercase()
}

impl NodeIndex {
    pub fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(&id)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn upsert(&mut self, n: Node) {
        self.remove(n.id);
        let id = n.id;
        self.by_farm.entry(n.farm_id).or_default().insert(id);
        self.by_country
            .entry(norm(&n.location.country))
            .or_default()
            .insert(id);
        self.by_city
            .entry(norm(&n.location.city))
            .or_default()
            .insert(id);
        self.by_twin.insert(n.twin_id, id);
        if n.public_config.domain.is_some() {
            self.gateways.insert(id);
        }
        if n.total.gpu > 0 {
            self.gpu_nodes.insert(id);
        }
        for (i, k) in SORT_KEYS.iter().enumerate() {
            self.sorted[i].insert((sort_value(&n, *k), id));
        }
        self.nodes.insert(id, n);
    }

    fn remove(&mut self, id: NodeId) {
        let Some(n) = self.nodes.remove(&id) else {
            return;
        };
        fn unpost<K: std::hash::Hash + Eq>(m: &mut HashMap<K, BTreeSet<NodeId>>, k: K, id: NodeId) {
            if let Some(s) = m.get_mut(&k) {
                s.remove(&id);
                if s.is_empty() {
                    m.remove(&k);
                }
            }
        }
        unpost(&mut self.by_farm, n.farm_id, id);
        unpost(&mut self.by_country, norm(&n.location.country), id);
        unpost(&mut self.by_city, norm(&n.location.city), id);
        self.by_twin.remove(&n.twin_id);
        self.gateways.remove(&id);
        self.gpu_nodes.remove(&id);
        for (i, k) in SORT_KEYS.iter().enumerate() {
            self.sorted[i].remove(&(sort_value(&n, *k), id));
        }
    }
}

/// Everything a query reads, besides the nodes.
#[derive(Debug, Default)]
pub struct ReadModel {
    pub config: RegistryConfig,
    pub height: u64,
    pub twins: BTreeMap<TwinId, Twin>,
    pub twin_by_key: HashMap<PublicKey, TwinId>,
    pub nonces: HashMap<PublicKey, u64>,
    pub farms: BTreeMap<FarmId, Farm>,
    pub farm_free_ips: HashMap<FarmId, u32>,
    pub nodes: NodeIndex,
    pub contracts: BTreeMap<ContractId, Contract>,
    contracts_by_twin: HashMap<TwinId, BTreeSet<ContractId>>,
    contracts_by_node: HashMap<NodeId, BTreeSet<ContractId>>,
    live_names: HashMap<String, ContractId>,
}

impl ReadModel {
    pub fn new(config: RegistryConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    pub fn apply(&mut self, d: Delta) {
        self.height = d.height;
        for t in d.twins {
            self.twin_by_key.insert(t.public_key, t.id);
            self.twins.insert(t.id, t);
        }
        for f in d.farms {
            let free = f
                .public_ips
                .iter()
                .filter(|p| p.contract_id.is_none())
                .count() as u32;
            self.farm_free_ips.insert(f.id, free);
            self.farms.insert(f.id, f);
        }
        for n in d.nodes {
            self.nodes.upsert(n);
        }
        for c in d.contracts {
            self.contracts_by_twin
                .entry(c.twin_id)
                .or_default()
                .insert(c.id);
            if let ContractKind::Node(n) = &c.kind {
                self.contracts_by_node
                    .entry(n.node_id)
                    .or_default()
                    .insert(c.id);
            }
            if let ContractKind::Name(n) = &c.kind {
                if c.is_live() {
                    self.live_names.insert(n.name.clone(), c.id);
                } else if self.live_names.get(&n.name) == Some(&c.id) {
                    self.live_names.remove(&n.name);
                }
            }
            self.contracts.insert(c.id, c);
        }
        for (k, n) in d.nonces {
            self.nonces.insert(k, n);
        }
    }

    pub fn account(&self, key: &PublicKey) -> Account {
        Account {
            public_key: *key,
            nonce: self.nonces.get(key).copied().unwrap_or(0),
            twin_id: self.twin_by_key.get(key).copied(),
        }
    }

    pub fn view(&self, n: &Node, now: Millis) -> NodeView {
        let mut free = n.free();
        free.ipv4 = self.farm_free_ips.get(&n.farm_id).copied().unwrap_or(0);
        NodeView {
            node: n.clone(),
            free,
            status: n.status(now, self.config.down_after_ms),
        }
    }

    fn matches(&self, f: &NodeFilter, n: &Node, now: Millis) -> bool {
        let free = n.free();
        let min = |want: Option<u64>, have: u64| want.is_none_or(|w| have >= w);
        min(f.free_cru, free.cru)
            && min(f.free_mru, free.mru)
            && min(f.free_sru, free.sru)
            && min(f.free_hru, free.hru)
            && min(f.total_cru, n.total.cru)
            && min(f.total_mru, n.total.mru)
            && min(f.total_sru, n.total.sru)
            && min(f.total_hru, n.total.hru)
            && f.free_ips
                .is_none_or(|w| self.farm_free_ips.get(&n.farm_id).copied().unwrap_or(0) >= w)
            && f.status
                .is_none_or(|s| n.status(now, self.config.down_after_ms) == s)
            && f.country
                .as_ref()
                .is_none_or(|c| n.location.country.eq_ignore_ascii_case(c))
            && f.city
                .as_ref()
                .is_none_or(|c| n.location.city.eq_ignore_ascii_case(c))
            && f.farm_ids
                .as_ref()
                .is_none_or(|ids| ids.contains(&n.farm_id))
            && f.twin_id.is_none_or(|t| n.twin_id == t)
            && f.has_gpu.is_none_or(|g| (n.total.gpu > 0) == g)
            && f.domain
                .is_none_or(|d| n.public_config.domain.is_some() == d)
            && f.node_ids.as_ref().is_none_or(|ids| ids.contains(&n.id))
    }

    /// The smallest posting set some equality filter allows, if any filter names one.
    fn candidates(&self, f: &NodeFilter) -> Option<Vec<NodeId>> {
        let ix = &self.nodes;
        let mut best: Option<Vec<NodeId>> = None;
        let mut offer = |ids: Vec<NodeId>| {
            if best.as_ref().is_none_or(|b| ids.len() < b.len()) {
                best = Some(ids);
            }
        };
        let set = |s: Option<&BTreeSet<NodeId>>| {
            s.map(|s| s.iter().copied().collect()).unwrap_or_default()
        };
        if let Some(ids) = &f.node_ids {
            offer(ids.clone());
        }
        if let Some(t) = f.twin_id {
            offer(ix.by_twin.get(&t).copied().into_iter().collect());
        }
        if let Some(farms) = &f.farm_ids {
            offer(
                farms
                    .iter()
                    .flat_map(|fid| ix.by_farm.get(fid).into_iter().flatten().copied())
                    .collect(),
            );
        }
        if let Some(c) = &f.country {
            offer(set(ix.by_country.get(&norm(c))));
        }
        if let Some(c) = &f.city {
            offer(set(ix.by_city.get(&norm(c))));
        }
        if f.domain == Some(true) {
            offer(ix.gateways.iter().copied().collect());
        }
        if f.has_gpu == Some(true) {
            offer(ix.gpu_nodes.iter().copied().collect());
        }
        best
    }

    /// One page of matching nodes and, when asked, the count of all matches.
    pub fn search(&self, f: &NodeFilter, now: Millis) -> (Vec<NodeView>, Option<u64>) {
        let by = f.sort_by.unwrap_or(SortBy::NodeId);
        let desc = f.sort_order.unwrap_or_default() == SortOrder::Desc;
        let skip = (f.page() as usize - 1).saturating_mul(f.size() as usize);
        let size = f.size() as usize;

        if let Some(mut ids) = self.candidates(f) {
            ids.sort_unstable();
            ids.dedup();
            let mut hits: Vec<&Node> = ids
                .iter()
                .filter_map(|id| self.nodes.get(*id))
                .filter(|n| self.matches(f, n, now))
                .collect();
            hits.sort_by_key(|n| (sort_value(n, by), n.id));
            if desc {
                hits.reverse();
            }
            let count = f.ret_count.then_some(hits.len() as u64);
            let page = hits
                .into_iter()
                .skip(skip)
                .take(size)
                .map(|n| self.view(n, now))
                .collect();
            return (page, count);
        }

        // No posting set: walk nodes in the order requested and stop when the page is full (or,
        // with ret_count, keep counting). A minimum on the sort key starts the walk at that bound.
        let ordered: Box<dyn Iterator<Item = &Node>> = match slot(by) {
            None => {
                let it = self.nodes.nodes.values();
                if desc {
                    Box::new(it.rev())
                } else {
                    Box::new(it)
                }
            }
            Some(i) => {
                let lo = match by {
                    SortBy::FreeCru => f.free_cru,
                    SortBy::FreeMru => f.free_mru,
                    SortBy::FreeSru => f.free_sru,
                    SortBy::FreeHru => f.free_hru,
                    SortBy::TotalCru => f.total_cru,
                    SortBy::TotalMru => f.total_mru,
                    SortBy::TotalSru => f.total_sru,
                    SortBy::TotalHru => f.total_hru,
                    SortBy::NodeId => None,
                }
                .unwrap_or(0);
                let range = self.nodes.sorted[i].range((lo, 0)..);
                let get = move |(_, id): &(u64, NodeId)| &self.nodes.nodes[id];
                if desc {
                    Box::new(range.rev().map(get))
                } else {
                    Box::new(range.map(get))
                }
            }
        };
        let mut page = Vec::with_capacity(size.min(64));
        let mut seen = 0usize;
        for n in ordered.filter(|n| self.matches(f, n, now)) {
            if seen >= skip && page.len() < size {
                page.push(self.view(n, now));
            }
            seen += 1;
            if !f.ret_count && page.len() == size {
                break;
            }
        }
        (page, f.ret_count.then_some(seen as u64))
    }

    pub fn contracts(&self, f: &ContractFilter) -> Result<Vec<&Contract>, String> {
        let live = match f.state.as_deref() {
            None => None,
            Some("live") | Some("created") => Some(true),
            Some("deleted") => Some(false),
            Some(other) => return Err(format!("state {other:?}: expected live or deleted")),
        };
        let node_kind = match f.kind.as_deref() {
            None => None,
            Some("node") => Some(true),
            Some("name") => Some(false),
            Some(other) => return Err(format!("type {other:?}: expected node or name")),
        };
        let size = f.size.unwrap_or(100).clamp(1, 1000) as usize;
        let skip = (f.page.unwrap_or(1).max(1) as usize - 1) * size;
        let ids: Box<dyn Iterator<Item = &ContractId>> = if let Some(name) = &f.name {
            Box::new(self.live_names.get(name).into_iter())
        } else if let Some(n) = f.node_id {
            Box::new(self.contracts_by_node.get(&n).into_iter().flatten())
        } else if let Some(t) = f.twin_id {
            Box::new(self.contracts_by_twin.get(&t).into_iter().flatten())
        } else {
            Box::new(self.contracts.keys())
        };
        Ok(ids
            .filter_map(|id| self.contracts.get(id))
            .filter(|c| f.twin_id.is_none_or(|t| c.twin_id == t))
            .filter(|c| {
                f.node_id
                    .is_none_or(|n| c.node().is_some_and(|nc| nc.node_id == n))
            })
            .filter(|c| live.is_none_or(|l| c.is_live() == l))
            .filter(|c| node_kind.is_none_or(|k| c.node().is_some() == k))
            .filter(|c| f.name.as_ref().is_none_or(|n| c.name() == Some(n.as_str())))
            .skip(skip)
            .take(size)
            .collect())
    }

    pub fn stats(&self, now: Millis) -> Stats {
        let mut total = Capacity::default();
        let mut reserved = Capacity::default();
        let mut up = 0;
        let mut countries = std::collections::HashSet::new();
        for n in self.nodes.iter() {
            total = total.checked_add(&n.total).unwrap_or(total);
            reserved = reserved.checked_add(&n.reserved).unwrap_or(reserved);
            if n.status(now, self.config.down_after_ms) == NodeStatus::Up {
                up += 1;
            }
            if !n.location.country.is_empty() {
                countries.insert(norm(&n.location.country));
            }
        }
        let live: Vec<&Contract> = self.contracts.values().filter(|c| c.is_live()).collect();
        let node_live = live.iter().filter(|c| c.node().is_some()).count() as u64;
        Stats {
            twins: self.twins.len() as u64,
            farms: self.farms.len() as u64,
            nodes: self.nodes.len() as u64,
            nodes_up: up,
            contracts_live: live.len() as u64,
            node_contracts_live: node_live,
            name_contracts_live: live.len() as u64 - node_live,
            countries: countries.len() as u64,
            total,
            reserved,
            height: self.height,
        }
    }
}
