//! The registry's state machine: applies verified transactions in log order. Each call is checked
//! in full before anything is changed, so a refused transaction leaves no trace.

use crate::error::TxError;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use tfgrid_core::capacity::Capacity;
use tfgrid_core::contract::{
    Contract, ContractKind, ContractState, DeleteCause, NameContract, NodeContract,
};
use tfgrid_core::network::{Network, NetworkId};
use tfgrid_core::records::{
    Farm, FarmIp, Node, NodeStatus, RegistryConfig, Twin, X25519Key, MAX_OVERLAY_ENDPOINTS,
};
use tfgrid_core::tx::{Call, NodeSpec, Outcome, SignedTx};
use tfgrid_core::{ContractId, FarmId, Hash, Millis, NodeId, PublicKey, TwinId};

mod networks;

/// A signed transaction whose signature has been checked. Only [`Verified::check`] makes one, so
/// the state machine cannot be handed an unverified transaction.
#[derive(Debug, Clone)]
pub struct Verified(SignedTx);

impl Verified {
    pub fn check(stx: SignedTx) -> Result<Self, TxError> {
        stx.verify().map_err(|e| {
            TxError::BadSignature(format!(
                "{e} for signer {} ({})",
                stx.tx.signer,
                stx.tx.call.name()
            ))
        })?;
        Ok(Self(stx))
    }

    pub fn tx(&self) -> &SignedTx {
        &self.0
    }

    pub(crate) fn into_tx(self) -> SignedTx {
        self.0
    }

    /// For records read back from the registry's own log, which were verified before commit.
    pub(crate) fn trusted(stx: SignedTx) -> Self {
        Self(stx)
    }
}

/// Which records a batch touched, so the store writes and the read side refreshes only those.
#[derive(Debug, Default)]
pub struct Changes {
    pub twins: BTreeSet<TwinId>,
    pub farms: BTreeSet<FarmId>,
    pub nodes: BTreeSet<NodeId>,
    pub contracts: BTreeSet<ContractId>,
    pub networks: BTreeSet<NetworkId>,
    pub nonces: BTreeSet<PublicKey>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.twins.is_empty()
            && self.farms.is_empty()
            && self.nodes.is_empty()
            && self.contracts.is_empty()
            && self.networks.is_empty()
            && self.nonces.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub config: RegistryConfig,
    pub height: u64,
    /// The registry time of the last batch applied: batches never go back in time.
    pub last_at: Millis,
    pub twins: BTreeMap<TwinId, Twin>,
    pub farms: BTreeMap<FarmId, Farm>,
    pub nodes: BTreeMap<NodeId, Node>,
    pub contracts: BTreeMap<ContractId, Contract>,
    pub networks: BTreeMap<NetworkId, Network>,
    pub nonces: HashMap<PublicKey, u64>,
    // Derived lookups, rebuilt from the records above on load.
    twin_by_key: HashMap<PublicKey, TwinId>,
    farm_by_name: HashMap<String, FarmId>,
    node_by_twin: HashMap<TwinId, NodeId>,
    live_names: HashMap<String, ContractId>,
    live_hashes: HashMap<(NodeId, Hash), ContractId>,
    network_by_name: HashMap<(TwinId, String), NetworkId>,
}

fn next_id<K: Copy + Ord + Into<u64>, V>(m: &BTreeMap<K, V>) -> u64 {
    m.keys().next_back().map(|k| (*k).into() + 1).unwrap_or(1)
}

impl State {
    pub fn new(config: RegistryConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    /// Rebuilds the derived lookups after the primary records were loaded.
    pub fn reindex(&mut self) {
        self.twin_by_key = self.twins.values().map(|t| (t.public_key, t.id)).collect();
        self.farm_by_name = self
            .farms
            .values()
            .map(|f| (f.name.to_lowercase(), f.id))
            .collect();
        self.node_by_twin = self.nodes.values().map(|n| (n.twin_id, n.id)).collect();
        self.network_by_name = self
            .networks
            .values()
            .map(|n| ((n.twin_id, n.name.clone()), n.id))
            .collect();
        self.live_names.clear();
        self.live_hashes.clear();
        for c in self.contracts.values().filter(|c| c.is_live()) {
            match &c.kind {
                ContractKind::Name(n) => {
                    self.live_names.insert(n.name.clone(), c.id);
                }
                ContractKind::Node(n) => {
                    self.live_hashes
                        .insert((n.node_id, n.deployment_hash), c.id);
                }
            }
        }
    }

    pub fn twin_by_key(&self, key: &PublicKey) -> Option<TwinId> {
        self.twin_by_key.get(key).copied()
    }

    /// Applies one transaction at registry time `now`. On error nothing changed.
    pub fn apply(
        &mut self,
        v: &Verified,
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        let tx = &v.tx().tx;
        let last = self.nonces.get(&tx.signer).copied().unwrap_or(0);
        if tx.nonce <= last {
            return Err(TxError::Nonce {
                got: tx.nonce,
                last,
            });
        }
        // Gaps are fine, but one far ahead (u64::MAX, say) would leave the key no nonce to use.
        if tx.nonce - last > MAX_NONCE_GAP {
            return Err(malformed(format!(
                "nonce {} is more than {MAX_NONCE_GAP} past this key's last nonce {last}: it would use up the key's nonces",
                tx.nonce
            )));
        }
        let signer_twin = self.twin_by_key.get(&tx.signer).copied();
        let outcome = match &tx.call {
            Call::CreateTwin { relay, enc_key } => {
                self.create_twin(tx.signer, signer_twin, relay, *enc_key, now, ch)?
            }
            call => {
                let twin = signer_twin.ok_or_else(|| {
                    TxError::Forbidden(format!(
                        "key {} has no twin; {} needs one (send create_twin first)",
                        tx.signer,
                        call.name()
                    ))
                })?;
                self.apply_as_twin(twin, call, now, ch)?
            }
        };
        self.nonces.insert(tx.signer, tx.nonce);
        ch.nonces.insert(tx.signer);
        self.height += 1;
        Ok(outcome)
    }

    fn apply_as_twin(
        &mut self,
        twin: TwinId,
        call: &Call,
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        match call {
            Call::CreateTwin { .. } => unreachable!("handled before the twin lookup"),
            Call::UpdateTwin { relay, enc_key } => {
                check_relay(relay)?;
                let t = self.twins.get_mut(&twin).expect("twin of a known key");
                t.relay = relay.clone();
                t.enc_key = *enc_key;
                ch.twins.insert(twin);
                Ok(Outcome::TwinUpdated { twin_id: twin })
            }
            Call::CreateFarm { name, dedicated } => {
                check_farm_name(name)?;
                if let Some(id) = self.farm_by_name.get(&name.to_lowercase()) {
                    return Err(TxError::Conflict(format!(
                        "farm name {name:?} is taken by farm {id}"
                    )));
                }
                let id = next_id(&self.farms) as FarmId;
                self.farms.insert(
                    id,
                    Farm {
                        id,
                        name: name.clone(),
                        twin_id: twin,
                        dedicated: *dedicated,
                        public_ips: vec![],
                        created_at: now,
                    },
                );
                self.farm_by_name.insert(name.to_lowercase(), id);
                ch.farms.insert(id);
                Ok(Outcome::FarmCreated { farm_id: id })
            }
            Call::UpdateFarm {
                farm_id,
                name,
                dedicated,
            } => {
                check_farm_name(name)?;
                let farm = self.owned_farm(twin, *farm_id)?;
                let old_key = farm.name.to_lowercase();
                let new_key = name.to_lowercase();
                if let Some(other) = self
                    .farm_by_name
                    .get(&new_key)
                    .filter(|id| **id != *farm_id)
                {
                    return Err(TxError::Conflict(format!(
                        "farm name {name:?} is taken by farm {other}"
                    )));
                }
                let farm = self.farms.get_mut(farm_id).expect("checked");
                farm.name = name.clone();
                farm.dedicated = *dedicated;
                self.farm_by_name.remove(&old_key);
                self.farm_by_name.insert(new_key, *farm_id);
                ch.farms.insert(*farm_id);
                Ok(Outcome::FarmUpdated { farm_id: *farm_id })
            }
            Call::AddFarmIp {
                farm_id,
                ip,
                gateway,
            } => {
                check_farm_ip(ip, gateway)?;
                let farm = self.owned_farm(twin, *farm_id)?;
                if farm.public_ips.iter().any(|p| same_ip(&p.ip, ip)) {
                    return Err(TxError::Conflict(format!(
                        "farm {farm_id} already has {ip}"
                    )));
                }
                let farm = self.farms.get_mut(farm_id).expect("checked");
                farm.public_ips.push(FarmIp {
                    ip: ip.clone(),
                    gateway: gateway.clone(),
                    contract_id: None,
                });
                ch.farms.insert(*farm_id);
                Ok(Outcome::FarmUpdated { farm_id: *farm_id })
            }
            Call::RemoveFarmIp { farm_id, ip } => {
                let farm = self.owned_farm(twin, *farm_id)?;
                let pos = farm
                    .public_ips
                    .iter()
                    .position(|p| same_ip(&p.ip, ip))
                    .ok_or_else(|| TxError::NotFound(format!("farm {farm_id} has no ip {ip}")))?;
                if let Some(c) = farm.public_ips[pos].contract_id {
                    return Err(TxError::Conflict(format!(
                        "{ip} is held by contract {c}; cancel it first"
                    )));
                }
                self.farms
                    .get_mut(farm_id)
                    .expect("checked")
                    .public_ips
                    .remove(pos);
                ch.farms.insert(*farm_id);
                Ok(Outcome::FarmUpdated { farm_id: *farm_id })
            }
            Call::RegisterNode(spec) => self.register_node(twin, spec, now, ch),
            Call::ReportUptime { uptime } => {
                let id = *self.node_by_twin.get(&twin).ok_or_else(|| {
                    TxError::Forbidden(format!(
                        "twin {twin} is not a node's twin; only nodes report uptime"
                    ))
                })?;
                let node = self.nodes.get_mut(&id).expect("indexed node");
                node.last_seen = now;
                node.uptime = *uptime;
                ch.nodes.insert(id);
                Ok(Outcome::UptimeRecorded { node_id: id })
            }
            Call::CreateNodeContract {
                node_id,
                deployment_hash,
                capacity,
            } => self.create_node_contract(twin, *node_id, *deployment_hash, *capacity, now, ch),
            Call::UpdateNodeContract {
                contract_id,
                deployment_hash,
                capacity,
            } => {
                self.update_node_contract(twin, *contract_id, *deployment_hash, *capacity, now, ch)
            }
            Call::CreateNameContract { name } => {
                check_gateway_name(name)?;
                if let Some(c) = self.live_names.get(name) {
                    return Err(TxError::Conflict(format!(
                        "name {name:?} is held by contract {c}"
                    )));
                }
                let id = next_id(&self.contracts);
                self.contracts.insert(
                    id,
                    Contract {
                        id,
                        twin_id: twin,
                        created_at: now,
                        updated_at: now,
                        state: ContractState::Created,
                        kind: ContractKind::Name(NameContract { name: name.clone() }),
                    },
                );
                self.live_names.insert(name.clone(), id);
                ch.contracts.insert(id);
                Ok(Outcome::ContractCreated {
                    contract_id: id,
                    public_ips: vec![],
                })
            }
            Call::CancelContract { contract_id } => {
                self.cancel_contract(twin, *contract_id, now, ch)
            }
            Call::CreateNetwork { name } => self.create_network(twin, name, now, ch),
            Call::AddNetworkNode {
                network_id,
                node_id,
            } => self.add_network_node(twin, *network_id, *node_id, now, ch),
            Call::AddNetworkAccess {
                network_id,
                wg_key,
                node_id,
            } => self.add_network_access(twin, *network_id, *wg_key, *node_id, now, ch),
            Call::SetNetworkHosts { network_id, hosts } => {
                self.set_network_hosts(twin, *network_id, hosts, now, ch)
            }
        }
    }

    fn create_twin(
        &mut self,
        key: PublicKey,
        existing: Option<TwinId>,
        relay: &str,
        enc_key: Option<X25519Key>,
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        if let Some(id) = existing {
            return Err(TxError::Conflict(format!(
                "key {key} already has twin {id}"
            )));
        }
        check_relay(relay)?;
        let id = next_id(&self.twins) as TwinId;
        self.twins.insert(
            id,
            Twin {
                id,
                public_key: key,
                relay: relay.to_string(),
                enc_key,
                created_at: now,
            },
        );
        self.twin_by_key.insert(key, id);
        ch.twins.insert(id);
        Ok(Outcome::TwinCreated { twin_id: id })
    }

    fn owned_farm(&self, twin: TwinId, farm_id: FarmId) -> Result<&Farm, TxError> {
        let farm = self
            .farms
            .get(&farm_id)
            .ok_or_else(|| TxError::NotFound(format!("farm {farm_id}")))?;
        if farm.twin_id != twin {
            return Err(TxError::Forbidden(format!(
                "farm {farm_id} belongs to twin {}, not twin {twin}",
                farm.twin_id
            )));
        }
        Ok(farm)
    }

    fn register_node(
        &mut self,
        twin: TwinId,
        spec: &NodeSpec,
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        if !self.farms.contains_key(&spec.farm_id) {
            return Err(TxError::NotFound(format!("farm {}", spec.farm_id)));
        }
        check_node_spec(spec, &self.config.min_node)?;
        if let Some(&id) = self.node_by_twin.get(&twin) {
            let node = &self.nodes[&id];
            let live = if node.farm_id != spec.farm_id {
                self.live_contracts_on(id)
            } else {
                0
            };
            if live > 0 {
                return Err(TxError::Conflict(format!(
                    "node {id} has {live} live contracts; it cannot move from farm {} to farm {}",
                    node.farm_id, spec.farm_id
                )));
            }
            let mut total_with_ips = spec.total;
            total_with_ips.ipv4 = node.reserved.ipv4;
            if !node.reserved.fits_in(&total_with_ips) {
                return Err(TxError::Conflict(format!(
                    "node {id}: new capacity is below what live contracts reserve ({})",
                    node.reserved.shortfall(&total_with_ips).join("; ")
                )));
            }
            let node = self.nodes.get_mut(&id).expect("indexed node");
            node.farm_id = spec.farm_id;
            node.total = spec.total;
            node.gpus = spec.gpus.clone();
            node.location = spec.location.clone();
            node.public_config = spec.public_config.clone();
            node.overlay = spec.overlay.clone();
            node.updated_at = now;
            node.last_seen = now;
            ch.nodes.insert(id);
            return Ok(Outcome::NodeUpdated { node_id: id });
        }
        let id = next_id(&self.nodes) as NodeId;
        let c = &self.config;
        let workload_prefix = c
            .workload_range
            .nth(c.node_prefix_len, u64::from(id) - 1)
            .ok_or_else(|| {
                TxError::Conflict(format!(
                    "the grid's workload range {} has room for {} nodes (a /{} each); none is left for node {id}",
                    c.workload_range,
                    c.workload_range.count(c.node_prefix_len),
                    c.node_prefix_len
                ))
            })?;
        self.nodes.insert(
            id,
            Node {
                id,
                farm_id: spec.farm_id,
                twin_id: twin,
                total: spec.total,
                reserved: Capacity::default(),
                gpus: spec.gpus.clone(),
                location: spec.location.clone(),
                public_config: spec.public_config.clone(),
                created_at: now,
                updated_at: now,
                last_seen: now,
                uptime: 0,
                workload_prefix,
                overlay: spec.overlay.clone(),
            },
        );
        self.node_by_twin.insert(twin, id);
        ch.nodes.insert(id);
        Ok(Outcome::NodeRegistered { node_id: id })
    }

    fn live_contracts_on(&self, node: NodeId) -> usize {
        self.live_hashes.keys().filter(|(n, _)| *n == node).count()
    }

    fn farm_free_ips(&self, farm: FarmId) -> u32 {
        self.farms
            .get(&farm)
            .map(|f| {
                f.public_ips
                    .iter()
                    .filter(|p| p.contract_id.is_none())
                    .count() as u32
            })
            .unwrap_or(0)
    }

    /// Free capacity on a node as a contract sees it: the node's own units plus its farm's free IPs.
    fn node_free(&self, node: &Node) -> Capacity {
        let mut free = node.free();
        free.ipv4 = self.farm_free_ips(node.farm_id);
        free
    }

    fn check_fits(&self, node: &Node, want: &Capacity) -> Result<(), TxError> {
        let free = self.node_free(node);
        if want.fits_in(&free) {
            Ok(())
        } else {
            Err(TxError::Capacity {
                node: node.id,
                detail: want.shortfall(&free).join("; "),
            })
        }
    }

    fn take_ips(&mut self, farm: FarmId, contract: ContractId, n: u32) -> Vec<String> {
        let farm = self.farms.get_mut(&farm).expect("node's farm exists");
        let mut out = Vec::new();
        for ip in farm
            .public_ips
            .iter_mut()
            .filter(|p| p.contract_id.is_none())
            .take(n as usize)
        {
            ip.contract_id = Some(contract);
            out.push(ip.ip.clone());
        }
        out
    }

    fn release_ips(&mut self, farm: FarmId, ips: &[String]) {
        if let Some(farm) = self.farms.get_mut(&farm) {
            for p in farm.public_ips.iter_mut().filter(|p| ips.contains(&p.ip)) {
                p.contract_id = None;
            }
        }
    }

    fn create_node_contract(
        &mut self,
        twin: TwinId,
        node_id: NodeId,
        hash: Hash,
        capacity: Capacity,
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        let node = self
            .nodes
            .get(&node_id)
            .ok_or_else(|| TxError::NotFound(format!("node {node_id}")))?;
        if node.status(now, self.config.down_after_ms) == NodeStatus::Down {
            return Err(TxError::Conflict(format!(
                "node {node_id} is down (no uptime report for {} s)",
                now.saturating_sub(node.last_seen) / 1000
            )));
        }
        if let Some(c) = self.live_hashes.get(&(node_id, hash)) {
            return Err(TxError::Conflict(format!(
                "contract {c} already holds deployment {hash} on node {node_id}"
            )));
        }
        self.check_fits(node, &capacity)?;
        let farm = node.farm_id;
        let id = next_id(&self.contracts);
        let public_ips = self.take_ips(farm, id, capacity.ipv4);
        let node = self.nodes.get_mut(&node_id).expect("checked");
        node.reserved = node
            .reserved
            .checked_add(&capacity)
            .expect("fits in total, so cannot overflow");
        self.contracts.insert(
            id,
            Contract {
                id,
                twin_id: twin,
                created_at: now,
                updated_at: now,
                state: ContractState::Created,
                kind: ContractKind::Node(NodeContract {
                    node_id,
                    deployment_hash: hash,
                    capacity,
                    public_ips: public_ips.clone(),
                }),
            },
        );
        self.live_hashes.insert((node_id, hash), id);
        ch.nodes.insert(node_id);
        ch.contracts.insert(id);
        if capacity.ipv4 > 0 {
            ch.farms.insert(farm);
        }
        Ok(Outcome::ContractCreated {
            contract_id: id,
            public_ips,
        })
    }

    fn owned_live_contract(&self, twin: TwinId, id: ContractId) -> Result<&Contract, TxError> {
        let c = self
            .contracts
            .get(&id)
            .ok_or_else(|| TxError::NotFound(format!("contract {id}")))?;
        if c.twin_id != twin {
            return Err(TxError::Forbidden(format!(
                "contract {id} belongs to twin {}, not twin {twin}",
                c.twin_id
            )));
        }
        if !c.is_live() {
            return Err(TxError::Conflict(format!(
                "contract {id} is already canceled"
            )));
        }
        Ok(c)
    }

    fn update_node_contract(
        &mut self,
        twin: TwinId,
        id: ContractId,
        hash: Hash,
        capacity: Capacity,
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        let c = self.owned_live_contract(twin, id)?;
        let old = c
            .node()
            .cloned()
            .ok_or_else(|| TxError::Conflict(format!("contract {id} is not a node contract")))?;
        if let Some(other) = self
            .live_hashes
            .get(&(old.node_id, hash))
            .filter(|c| **c != id)
        {
            return Err(TxError::Conflict(format!(
                "contract {other} already holds deployment {hash} on node {}",
                old.node_id
            )));
        }
        let node = &self.nodes[&old.node_id];
        // Capacity check against the node with this contract's old reservation handed back.
        let mut free = self
            .node_free(node)
            .checked_add(&old.capacity)
            .map_err(|_| TxError::Malformed("capacity overflow".into()))?;
        free.ipv4 = self.farm_free_ips(node.farm_id) + old.capacity.ipv4;
        if !capacity.fits_in(&free) {
            return Err(TxError::Capacity {
                node: old.node_id,
                detail: capacity.shortfall(&free).join("; "),
            });
        }
        let farm = node.farm_id;
        let mut ips = old.public_ips.clone();
        if capacity.ipv4 < old.capacity.ipv4 {
            let gone = ips.split_off(capacity.ipv4 as usize);
            self.release_ips(farm, &gone);
        } else if capacity.ipv4 > old.capacity.ipv4 {
            ips.extend(self.take_ips(farm, id, capacity.ipv4 - old.capacity.ipv4));
        }
        if capacity.ipv4 != old.capacity.ipv4 {
            ch.farms.insert(farm);
        }
        let node = self.nodes.get_mut(&old.node_id).expect("checked");
        node.reserved = node
            .reserved
            .checked_sub(&old.capacity)
            .expect("reserved includes this contract");
        node.reserved = node.reserved.checked_add(&capacity).expect("fits in total");
        self.live_hashes.remove(&(old.node_id, old.deployment_hash));
        self.live_hashes.insert((old.node_id, hash), id);
        let c = self.contracts.get_mut(&id).expect("checked");
        c.kind = ContractKind::Node(NodeContract {
            node_id: old.node_id,
            deployment_hash: hash,
            capacity,
            public_ips: ips,
        });
        c.updated_at = now;
        ch.nodes.insert(old.node_id);
        ch.contracts.insert(id);
        Ok(Outcome::ContractUpdated { contract_id: id })
    }

    fn cancel_contract(
        &mut self,
        twin: TwinId,
        id: ContractId,
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        let kind = self.owned_live_contract(twin, id)?.kind.clone();
        match kind {
            ContractKind::Node(n) => {
                let node = self
                    .nodes
                    .get_mut(&n.node_id)
                    .expect("contract's node exists");
                node.reserved = node
                    .reserved
                    .checked_sub(&n.capacity)
                    .expect("reserved includes this contract");
                let farm = node.farm_id;
                self.release_ips(farm, &n.public_ips);
                if !n.public_ips.is_empty() {
                    ch.farms.insert(farm);
                }
                self.live_hashes.remove(&(n.node_id, n.deployment_hash));
                ch.nodes.insert(n.node_id);
            }
            ContractKind::Name(n) => {
                self.live_names.remove(&n.name);
            }
        }
        let c = self.contracts.get_mut(&id).expect("checked");
        c.state = ContractState::Deleted {
            cause: DeleteCause::CanceledByUser,
            at: now,
        };
        c.updated_at = now;
        ch.contracts.insert(id);
        Ok(Outcome::ContractCanceled { contract_id: id })
    }
}

fn malformed(msg: impl Into<String>) -> TxError {
    TxError::Malformed(msg.into())
}

/// How far past its last nonce a key may jump in one transaction.
pub const MAX_NONCE_GAP: u64 = 1 << 20;

fn check_relay(relay: &str) -> Result<(), TxError> {
    if relay.len() > 256 {
        return Err(malformed("relay address longer than 256 bytes"));
    }
    if relay.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(malformed(format!(
            "relay address {relay:?} contains whitespace or control characters"
        )));
    }
    tfgrid_core::checks::relay_url(relay).map_err(malformed)
}

/// A name of `len` characters each allowed by `ok`; `rule` says what is allowed, for the error.
fn check_name(
    what: &str,
    name: &str,
    len: std::ops::RangeInclusive<usize>,
    ok: fn(char) -> bool,
    rule: &str,
) -> Result<(), TxError> {
    if !len.contains(&name.len()) || !name.chars().all(ok) {
        return Err(malformed(format!(
            "{what} {name:?}: {} to {} characters of {rule}",
            len.start(),
            len.end()
        )));
    }
    Ok(())
}

fn check_farm_name(name: &str) -> Result<(), TxError> {
    check_name(
        "farm name",
        name,
        3..=40,
        |c| c.is_ascii_alphanumeric() || c == '_' || c == '-',
        "A-Z a-z 0-9 _ -",
    )
}

/// Gateway names become DNS labels (`name.<domain>`), hence lowercase and no dots.
fn check_gateway_name(name: &str) -> Result<(), TxError> {
    check_name(
        "name",
        name,
        3..=64,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-',
        "a-z 0-9 _ -",
    )
}

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some(())?;
    Some((ip.parse().ok()?, prefix))
}

fn same_ip(a: &str, b: &str) -> bool {
    match (parse_cidr(a), parse_cidr(b)) {
        (Some((a, _)), Some((b, _))) => a == b,
        _ => a == b,
    }
}

fn check_farm_ip(ip: &str, gateway: &str) -> Result<(), TxError> {
    let (addr, prefix) = parse_cidr(ip).ok_or_else(|| {
        malformed(format!(
            "ip {ip:?}: expected IPv4 with prefix, e.g. 185.69.166.10/24"
        ))
    })?;
    let gw: Ipv4Addr = gateway
        .parse()
        .map_err(|_| malformed(format!("gateway {gateway:?} is not an IPv4 address")))?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    if u32::from(addr) & mask != u32::from(gw) & mask {
        return Err(malformed(format!("gateway {gateway} is outside {ip}")));
    }
    if addr == gw {
        return Err(malformed(format!(
            "gateway {gateway} equals the address itself"
        )));
    }
    Ok(())
}

fn check_node_spec(spec: &NodeSpec, min: &Capacity) -> Result<(), TxError> {
    let t = &spec.total;
    if t.ipv4 != 0 {
        return Err(malformed(
            "node capacity ipv4 must be 0: public addresses belong to the farm (add_farm_ip)",
        ));
    }
    if t.gpu as usize != spec.gpus.len() {
        return Err(malformed(format!(
            "node capacity says {} gpus but {} are described",
            t.gpu,
            spec.gpus.len()
        )));
    }
    let mut floor = *min;
    floor.ipv4 = 0;
    floor.gpu = 0;
    if !floor.fits_in(t) {
        return Err(malformed(format!(
            "node capacity below the registry minimum: {}",
            floor.shortfall(t).join("; ")
        )));
    }
    let loc = &spec.location;
    for (what, s) in [("country", &loc.country), ("city", &loc.city)] {
        if s.len() > 64 || s.chars().any(|c| c.is_control()) {
            return Err(malformed(format!(
                "{what} {s:?}: at most 64 printable characters"
            )));
        }
    }
    for (what, v, lim) in [
        ("latitude", loc.latitude, 90.0),
        ("longitude", loc.longitude, 180.0),
    ] {
        if let Some(v) = v {
            if !v.is_finite() || v.abs() > lim {
                return Err(malformed(format!("{what} {v} outside -{lim}..{lim}")));
            }
        }
    }
    if let Some(d) = &spec.public_config.domain {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        if d.len() > 253 || !d.split('.').all(label_ok) {
            return Err(malformed(format!("domain {d:?} is not a valid DNS name")));
        }
    }
    if let Some(o) = &spec.overlay {
        if o.endpoints.len() > MAX_OVERLAY_ENDPOINTS {
            return Err(malformed(format!(
                "overlay: at most {MAX_OVERLAY_ENDPOINTS} endpoints"
            )));
        }
        for e in &o.endpoints {
            let ip = e.ip();
            if e.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
                return Err(malformed(format!(
                    "overlay endpoint {e}: an address other nodes can send to (not unspecified or multicast; port not 0)"
                )));
            }
        }
    }
    for g in &spec.gpus {
        if g.vendor.len() > 128 || g.model.len() > 128 {
            return Err(malformed("gpu vendor and model: at most 128 characters"));
        }
    }
    Ok(())
}
