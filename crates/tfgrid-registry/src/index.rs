//! The read side: copies of committed records with the secondary indexes the query API needs.
//! The writer refreshes it after each commit, so a reader never sees a record that is not durable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use tfgrid_core::contract::{Contract, ContractKind};
use tfgrid_core::filter::{ContractFilter, NodeFilter, SortBy, SortOrder};
use tfgrid_core::network::{Network, NetworkId};
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
    pub networks: Vec<Network>,
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

/// A node's record and its JSON, rendered once per change: a search response is mostly a copy of
/// these. The JSON lacks its closing brace; `free` and `status` are appended per query.
#[derive(Debug)]
struct Slot {
    node: Node,
    json_open: Box<str>,
}

/// Nodes stored by column (one array per filtered attribute, indexed by node id, which the
/// registry hands out densely), so a filter is a tight loop over a few arrays instead of a walk
/// through records. Ordered sets per sortable resource and posting sets for the selective
/// equality filters sit beside the columns.
#[derive(Debug, Default)]
pub struct NodeIndex {
    slots: Vec<Option<Slot>>,
    len: usize,
    present: Vec<u8>,
    free: [Vec<u64>; 4],
    total: [Vec<u64>; 4],
    farm: Vec<u32>,
    twin: Vec<u32>,
    last_seen: Vec<u64>,
    country: Vec<u32>,
    city: Vec<u32>,
    gpu: Vec<u8>,
    gateway: Vec<u8>,
    /// Lowercased country and city names -> small ids for the columns.
    names: HashMap<String, u32>,
    by_farm: HashMap<FarmId, BTreeSet<NodeId>>,
    by_twin: HashMap<TwinId, NodeId>,
    gateways: BTreeSet<NodeId>,
    gpu_nodes: BTreeSet<NodeId>,
    sorted: [BTreeSet<(u64, NodeId)>; 8],
}

fn norm(s: &str) -> String {
    s.to_lowercase()
}

const CHUNK: usize = 4096;

impl NodeIndex {
    pub fn get(&self, id: NodeId) -> Option<&Node> {
        self.slots.get(id as usize)?.as_ref().map(|s| &s.node)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Node> {
        self.slots.iter().flatten().map(|s| &s.node)
    }

    fn name_id(&mut self, s: &str) -> u32 {
        let next = self.names.len() as u32;
        *self.names.entry(norm(s)).or_insert(next)
    }

    fn grow(&mut self, id: usize) {
        if id < self.slots.len() {
            return;
        }
        let n = (id + 1).max(self.slots.len() * 2).max(64);
        self.slots.resize_with(n, || None);
        self.present.resize(n, 0);
        for c in self.free.iter_mut().chain(self.total.iter_mut()) {
            c.resize(n, 0);
        }
        self.farm.resize(n, 0);
        self.twin.resize(n, 0);
        self.last_seen.resize(n, 0);
        self.country.resize(n, 0);
        self.city.resize(n, 0);
        self.gpu.resize(n, 0);
        self.gateway.resize(n, 0);
    }

    pub fn upsert(&mut self, n: Node) {
        self.remove(n.id);
        let id = n.id;
        let i = id as usize;
        self.grow(i);
        self.by_farm.entry(n.farm_id).or_default().insert(id);
        self.by_twin.insert(n.twin_id, id);
        if n.public_config.domain.is_some() {
            self.gateways.insert(id);
        }
        if n.total.gpu > 0 {
            self.gpu_nodes.insert(id);
        }
        for (k, by) in SORT_KEYS.iter().enumerate() {
            self.sorted[k].insert((sort_value(&n, *by), id));
        }
        let free = n.free();
        for (k, v) in [free.cru, free.mru, free.sru, free.hru]
            .into_iter()
            .enumerate()
        {
            self.free[k][i] = v;
        }
        for (k, v) in [n.total.cru, n.total.mru, n.total.sru, n.total.hru]
            .into_iter()
            .enumerate()
        {
            self.total[k][i] = v;
        }
        self.present[i] = 1;
        self.farm[i] = n.farm_id;
        self.twin[i] = n.twin_id;
        self.last_seen[i] = n.last_seen;
        self.country[i] = self.name_id(&n.location.country);
        self.city[i] = self.name_id(&n.location.city);
        self.gpu[i] = (n.total.gpu > 0) as u8;
        self.gateway[i] = n.public_config.domain.is_some() as u8;
        let mut json = serde_json::to_string(&n).expect("a node always serializes");
        json.pop(); // the closing brace; free and status follow per query
        self.slots[i] = Some(Slot {
            node: n,
            json_open: json.into_boxed_str(),
        });
        self.len += 1;
    }

    fn remove(&mut self, id: NodeId) {
        let Some(Slot { node: n, .. }) = self.slots.get_mut(id as usize).and_then(Option::take)
        else {
            return;
        };
        self.len -= 1;
        self.present[id as usize] = 0;
        if let Some(s) = self.by_farm.get_mut(&n.farm_id) {
            s.remove(&id);
            if s.is_empty() {
                self.by_farm.remove(&n.farm_id);
            }
        }
        self.by_twin.remove(&n.twin_id);
        self.gateways.remove(&id);
        self.gpu_nodes.remove(&id);
        for (k, by) in SORT_KEYS.iter().enumerate() {
            self.sorted[k].remove(&(sort_value(&n, *by), id));
        }
    }
}

/// A filter resolved against the index: column references and the values to compare.
struct Compiled<'a> {
    mins: Vec<(&'a [u64], u64)>,
    /// (want up, last_seen threshold): a node is up when last_seen >= threshold.
    status: Option<(bool, u64)>,
    country: Option<u32>,
    city: Option<u32>,
    farms: Option<Vec<FarmId>>,
    twin: Option<TwinId>,
    gpu: Option<u8>,
    gateway: Option<u8>,
    node_ids: Option<&'a [NodeId]>,
}

impl Compiled<'_> {
    /// Keeps in `mask` (one byte per row, rows `base..base+mask.len()`) only rows that match.
    /// Each condition is one branch-free loop over one column, which the compiler vectorizes.
    fn filter_chunk(&self, ix: &NodeIndex, base: usize, mask: &mut [u8]) {
        let end = base + mask.len();
        mask.copy_from_slice(&ix.present[base..end]);
        for (col, min) in &self.mins {
            for (m, v) in mask.iter_mut().zip(&col[base..end]) {
                *m &= (*v >= *min) as u8;
            }
        }
        if let Some((up, threshold)) = self.status {
            for (m, v) in mask.iter_mut().zip(&ix.last_seen[base..end]) {
                *m &= ((*v >= threshold) == up) as u8;
            }
        }
        let eq32 = |mask: &mut [u8], col: &[u32], want: u32| {
            for (m, v) in mask.iter_mut().zip(&col[base..end]) {
                *m &= (*v == want) as u8;
            }
        };
        if let Some(c) = self.country {
            eq32(mask, &ix.country, c);
        }
        if let Some(c) = self.city {
            eq32(mask, &ix.city, c);
        }
        if let Some(t) = self.twin {
            eq32(mask, &ix.twin, t);
        }
        if let Some(farms) = &self.farms {
            for (m, v) in mask.iter_mut().zip(&ix.farm[base..end]) {
                *m &= farms.contains(v) as u8;
            }
        }
        for (want, col) in [(self.gpu, &ix.gpu), (self.gateway, &ix.gateway)] {
            if let Some(w) = want {
                for (m, v) in mask.iter_mut().zip(&col[base..end]) {
                    *m &= (*v == w) as u8;
                }
            }
        }
        if let Some(ids) = self.node_ids {
            for (i, m) in mask.iter_mut().enumerate() {
                if *m != 0 && !ids.contains(&((base + i) as NodeId)) {
                    *m = 0;
                }
            }
        }
    }

    /// The same conditions as [`filter_chunk`](Self::filter_chunk), for one row.
    fn matches(&self, ix: &NodeIndex, id: NodeId) -> bool {
        let i = id as usize;
        i < ix.present.len()
            && ix.present[i] != 0
            && self.mins.iter().all(|(col, min)| col[i] >= *min)
            && self
                .status
                .is_none_or(|(up, t)| (ix.last_seen[i] >= t) == up)
            && self.country.is_none_or(|c| ix.country[i] == c)
            && self.city.is_none_or(|c| ix.city[i] == c)
            && self.twin.is_none_or(|t| ix.twin[i] == t)
            && self.farms.as_ref().is_none_or(|f| f.contains(&ix.farm[i]))
            && self.gpu.is_none_or(|g| ix.gpu[i] == g)
            && self.gateway.is_none_or(|g| ix.gateway[i] == g)
            && self.node_ids.is_none_or(|ids| ids.contains(&id))
    }
}

/// Collects one page out of a stream of matches while counting them all.
struct Pager {
    skip: usize,
    size: usize,
    seen: usize,
    page: Vec<NodeId>,
}

impl Pager {
    fn take(&mut self, id: NodeId) {
        if self.seen >= self.skip && self.page.len() < self.size {
            self.page.push(id);
        }
        self.seen += 1;
    }

    fn full(&self) -> bool {
        self.page.len() == self.size
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
    pub networks: BTreeMap<NetworkId, Network>,
    network_by_name: HashMap<(TwinId, String), NetworkId>,
    /// Largest posting set tested member by member instead of scanning the columns; `None` picks
    /// by index size. Tests set it to exercise both paths on small grids.
    pub candidate_limit: Option<usize>,
}

impl ReadModel {
    pub fn new(config: RegistryConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    pub fn network_by_name(&self, twin: TwinId, name: &str) -> Option<&Network> {
        self.network_by_name
            .get(&(twin, name.to_string()))
            .and_then(|id| self.networks.get(id))
    }

    /// The networks with a subnet on `node`, in id order.
    pub fn networks_on(&self, node: NodeId) -> Vec<&Network> {
        self.networks
            .values()
            .filter(|n| n.nodes.contains(&node) || n.access.iter().any(|a| a.node_id == node))
            .collect()
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
        for n in d.networks {
            self.network_by_name
                .insert((n.twin_id, n.name.clone()), n.id);
            self.networks.insert(n.id, n);
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

    fn view_parts(&self, n: &Node, now: Millis) -> (Capacity, NodeStatus) {
        let mut free = n.free();
        free.ipv4 = self.farm_free_ips.get(&n.farm_id).copied().unwrap_or(0);
        (free, n.status(now, self.config.down_after_ms))
    }

    pub fn view(&self, n: &Node, now: Millis) -> NodeView {
        let (free, status) = self.view_parts(n, now);
        NodeView {
            node: n.clone(),
            free,
            status,
        }
    }

    /// Resolves a filter against the columns; `None` when no node can match (an unknown country,
    /// no farm with enough free IPs, ...).
    fn compile<'a>(&'a self, f: &'a NodeFilter, now: Millis) -> Option<Compiled<'a>> {
        let ix = &self.nodes;
        let mut mins = Vec::new();
        let wants = [
            (f.free_cru, &ix.free[0]),
            (f.free_mru, &ix.free[1]),
            (f.free_sru, &ix.free[2]),
            (f.free_hru, &ix.free[3]),
            (f.total_cru, &ix.total[0]),
            (f.total_mru, &ix.total[1]),
            (f.total_sru, &ix.total[2]),
            (f.total_hru, &ix.total[3]),
        ];
        for (want, col) in wants {
            if let Some(w) = want.filter(|w| *w > 0) {
                mins.push((col.as_slice(), w));
            }
        }
        let name = |s: &Option<String>| -> Option<Option<u32>> {
            match s {
                None => Some(None),
                Some(s) => ix.names.get(&norm(s)).map(|id| Some(*id)),
            }
        };
        let mut farms = f.farm_ids.clone();
        if let Some(w) = f.free_ips.filter(|w| *w > 0) {
            let rich: Vec<FarmId> = self
                .farm_free_ips
                .iter()
                .filter(|(_, n)| **n >= w)
                .map(|(id, _)| *id)
                .collect();
            farms = Some(match farms {
                Some(list) => list.into_iter().filter(|id| rich.contains(id)).collect(),
                None => rich,
            });
        }
        if farms.as_ref().is_some_and(|f| f.is_empty()) {
            return None;
        }
        Some(Compiled {
            mins,
            status: f.status.map(|s| {
                (
                    s == NodeStatus::Up,
                    now.saturating_sub(self.config.down_after_ms),
                )
            }),
            country: name(&f.country)?,
            city: name(&f.city)?,
            farms,
            twin: f.twin_id,
            gpu: f.has_gpu.map(u8::from),
            gateway: f.domain.map(u8::from),
            node_ids: f.node_ids.as_deref(),
        })
    }

    /// The smallest posting set some selective filter allows, if one is small enough that
    /// testing its members beats scanning the columns.
    fn candidates(&self, f: &NodeFilter) -> Option<Vec<NodeId>> {
        let ix = &self.nodes;
        let limit = self.candidate_limit.unwrap_or((ix.len() / 32).max(256));
        // Sizes first: a set is only copied out when it is the one that will be used.
        let farm_size = |farms: &Vec<FarmId>| {
            farms
                .iter()
                .map(|id| ix.by_farm.get(id).map_or(0, |s| s.len()))
                .sum::<usize>()
        };
        let sizes = [
            f.node_ids.as_ref().map(|v| v.len()),
            f.twin_id.map(|t| ix.by_twin.contains_key(&t) as usize),
            f.farm_ids.as_ref().map(farm_size),
            (f.domain == Some(true)).then_some(ix.gateways.len()),
            (f.has_gpu == Some(true)).then_some(ix.gpu_nodes.len()),
        ];
        let (which, size) = sizes
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)))
            .min_by_key(|(_, s)| *s)?;
        if size > limit {
            return None;
        }
        Some(match which {
            0 => f.node_ids.clone().unwrap_or_default(),
            1 => f
                .twin_id
                .and_then(|t| ix.by_twin.get(&t))
                .copied()
                .into_iter()
                .collect(),
            2 => f
                .farm_ids
                .iter()
                .flatten()
                .flat_map(|fid| ix.by_farm.get(fid).into_iter().flatten().copied())
                .collect(),
            3 => ix.gateways.iter().copied().collect(),
            _ => ix.gpu_nodes.iter().copied().collect(),
        })
    }

    /// Ids of one page of matching nodes, in order, and the count of all matches when asked.
    pub fn search_ids(&self, f: &NodeFilter, now: Millis) -> (Vec<NodeId>, Option<u64>) {
        let Some(c) = self.compile(f, now) else {
            return (Vec::new(), f.ret_count.then_some(0));
        };
        let ix = &self.nodes;
        let by = f.sort_by.unwrap_or(SortBy::NodeId);
        let desc = f.sort_order.unwrap_or_default() == SortOrder::Desc;
        let skip = (f.page() as usize - 1).saturating_mul(f.size() as usize);
        let size = f.size() as usize;

        if let Some(mut ids) = self.candidates(f) {
            ids.sort_unstable();
            ids.dedup();
            if desc {
                ids.reverse();
            }
            if by == SortBy::NodeId && !f.ret_count {
                let page = ids
                    .into_iter()
                    .filter(|id| c.matches(ix, *id))
                    .skip(skip)
                    .take(size)
                    .collect();
                return (page, None);
            }
            ids.retain(|id| c.matches(ix, *id));
            if by != SortBy::NodeId {
                let col = self.column(by);
                ids.sort_unstable_by_key(|id| (col[*id as usize], *id));
                if desc {
                    ids.reverse();
                }
            }
            let count = f.ret_count.then_some(ids.len() as u64);
            return (ids.into_iter().skip(skip).take(size).collect(), count);
        }

        let rows = ix.present.len();
        let mut pg = Pager {
            skip,
            size,
            seen: 0,
            page: Vec::with_capacity(size.min(1024)),
        };
        match slot(by) {
            // Id order: filter chunk by chunk and stop as soon as the page is full.
            None => {
                let mut mask = [0u8; CHUNK];
                let chunks = rows.div_ceil(CHUNK);
                for k in 0..chunks {
                    let chunk = if desc { chunks - 1 - k } else { k };
                    let base = chunk * CHUNK;
                    let m = &mut mask[..CHUNK.min(rows - base)];
                    c.filter_chunk(ix, base, m);
                    if pg.full() {
                        // Page full: only the count is still wanted, and a sum gives it.
                        pg.seen += m.iter().map(|v| *v as usize).sum::<usize>();
                        continue;
                    }
                    let hits = m
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| **v != 0)
                        .map(|(i, _)| (base + i) as NodeId);
                    if desc {
                        hits.rev().for_each(|id| pg.take(id));
                    } else {
                        hits.for_each(|id| pg.take(id));
                    }
                    if !f.ret_count && pg.full() {
                        break;
                    }
                }
            }
            // Resource order, walking the ordered set from the filter's own lower bound on that
            // resource. Without a count, rows are tested as the walk meets them and it stops at
            // the end of the page; with one, every row is filtered first and the mask counted.
            Some(k) => {
                let lo = c
                    .mins
                    .iter()
                    .find(|(col, _)| std::ptr::eq(col.as_ptr(), self.column(by).as_ptr()))
                    .map(|(_, w)| *w)
                    .unwrap_or(0);
                let range = ix.sorted[k].range((lo, 0)..);
                let ordered: Box<dyn Iterator<Item = &(u64, NodeId)>> = if desc {
                    Box::new(range.rev())
                } else {
                    Box::new(range)
                };
                if !f.ret_count {
                    for (_, id) in ordered.filter(|(_, id)| c.matches(ix, *id)) {
                        pg.take(*id);
                        if pg.full() {
                            break;
                        }
                    }
                    return (pg.page, None);
                }
                let mut mask = vec![0u8; rows];
                for (chunk, m) in mask.chunks_mut(CHUNK).enumerate() {
                    c.filter_chunk(ix, chunk * CHUNK, m);
                }
                for (_, id) in ordered.filter(|(_, id)| mask[*id as usize] != 0) {
                    pg.take(*id);
                    if pg.full() {
                        break;
                    }
                }
                let count = mask.iter().map(|v| *v as u64).sum();
                return (pg.page, Some(count));
            }
        }
        (pg.page, f.ret_count.then_some(pg.seen as u64))
    }

    fn column(&self, by: SortBy) -> &[u64] {
        let ix = &self.nodes;
        match by {
            SortBy::FreeCru => &ix.free[0],
            SortBy::FreeMru => &ix.free[1],
            SortBy::FreeSru => &ix.free[2],
            SortBy::FreeHru => &ix.free[3],
            SortBy::TotalCru => &ix.total[0],
            SortBy::TotalMru => &ix.total[1],
            SortBy::TotalSru => &ix.total[2],
            SortBy::TotalHru => &ix.total[3],
            SortBy::NodeId => &[],
        }
    }

    /// One page of matching nodes and, when asked, the count of all matches.
    pub fn search(&self, f: &NodeFilter, now: Millis) -> (Vec<NodeView>, Option<u64>) {
        let (ids, count) = self.search_ids(f, now);
        let page = ids
            .iter()
            .filter_map(|id| self.nodes.get(*id))
            .map(|n| self.view(n, now))
            .collect();
        (page, count)
    }

    /// The JSON array of [`NodeView`]s for `ids`, assembled from each node's pre-rendered JSON.
    pub fn render_views(&self, ids: &[NodeId], now: Millis) -> String {
        let mut out = String::with_capacity(ids.len() * 768 + 2);
        out.push('[');
        for id in ids {
            let Some(slot) = self.nodes.slots.get(*id as usize).and_then(Option::as_ref) else {
                continue;
            };
            if out.len() > 1 {
                out.push(',');
            }
            let v = self.view_parts(&slot.node, now);
            out.push_str(&slot.json_open);
            out.push_str(",\"free\":");
            out.push_str(&serde_json::to_string(&v.0).expect("capacity serializes"));
            out.push_str(match v.1 {
                NodeStatus::Up => ",\"status\":\"up\"}",
                NodeStatus::Down => ",\"status\":\"down\"}",
            });
        }
        out.push(']');
        out
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
