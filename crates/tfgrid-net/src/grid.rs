//! A node on the grid overlay. The node's TUN device takes the grid's whole workload range (its
//! own prefix stays on its bridge, which is more specific), and peers are made on demand from
//! the registry: a packet for an address no peer holds names the node that owns it (the
//! registry gives node `id` the `(id - 1)`th prefix of the range), whose record has its
//! WireGuard key and endpoints. The node that starts a conversation tells the other over the
//! bus (`net.hello`), so that one looks the first up by its twin and starts its own handshake at
//! once: both sides send first, which is also what opens a NAT's mapping from the inside.
//! Datagrams go by the relay until a direct path is seen to work.
//!
//! The users' private networks are routed into the device too. An address there names its
//! network and the position of its subnet (`tfgrid_core::network::Layout::place`), and the
//! network's record names the node at that position. A peer's allowed IPs are everything the
//! registry says its node holds: its workload prefix, its subnets in networks and the addresses of
//! the users' machines that join through it, so no node can speak for another's addresses. When
//! a peer sends from an address it was not known to have (it joined a network since), the packet
//! is held while its record is read again.

use ipnet::{IpNet, Ipv4Net};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tfgrid_bus::Peer;
use tfgrid_core::filter::NodeFilter;
use tfgrid_core::network::{Layout, Place};
use tfgrid_core::prefix::Ipv4Prefix;
use tfgrid_core::records::Node;
use tfgrid_core::{NodeId, TwinId};
use tfgrid_registry_client::RegistryClient;
use tokio::sync::mpsc;

use crate::device::ip;
use crate::relay::{self, Directory};
use crate::{Device, Error, PeerConfig, PeerStatus, WgPublic};

/// The bus command a node sends to a node it is about to peer with (one-way, no payload).
pub const HELLO_CMD: &str = "net.hello";
/// Keeps a NAT's mapping open between a node behind it and its peers, and each path fresh (a
/// path unheard for 20 s is no longer counted as working).
const KEEPALIVE_S: u16 = 15;
/// A look-up for the same node or twin is not repeated sooner than this.
const LOOKUP_EVERY: Duration = Duration::from_secs(2);
/// A peer that sent from an address it was not known to hold is read again at most this often.
const WIDEN_EVERY: Duration = Duration::from_millis(300);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
const LOOKUP_QUEUE: usize = 256;

#[derive(Debug, Clone)]
pub struct GridOptions {
    /// The grid's workload range and the prefix length of each node's share (registry config).
    pub range: Ipv4Prefix,
    pub node_prefix_len: u8,
    pub own_node: NodeId,
    /// Source address for the node's own traffic into the overlay (its bridge address: the
    /// peer takes packets only from the node's own prefix).
    pub src: Ipv4Addr,
    /// Metric of the range's route: several nodes on one host each have their own route.
    pub metric: u32,
    /// Where the users' private networks are (registry config); None: not routed.
    pub networks: Option<Layout>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Want {
    /// The node that owns an address we have a packet for.
    Node(NodeId),
    /// A node whose twin said hello (or sent relayed datagrams) to us.
    Twin(TwinId),
    /// The node holding a subnet (or a user's machine) of a private network.
    Place(Place),
    /// A peer that sent from an address it was not known to hold: read its node again.
    Widen(TwinId),
}

struct Shared {
    dev: Arc<Device>,
    opts: GridOptions,
    /// Twin of each peer's key and back (the relayed path's directory).
    keys: RwLock<HashMap<WgPublic, TwinId>>,
    twins: RwLock<HashMap<TwinId, WgPublic>>,
    /// The users' machines that join their networks through this node, with their addresses.
    access: RwLock<HashMap<WgPublic, Ipv4Addr>>,
    wants: mpsc::Sender<Want>,
}

/// The node's overlay, running: dropping it removes the route and stops the look-ups.
pub struct Grid {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Grid {
    /// Routes the grid's range into `dev` and makes peers for it as packets need them.
    pub fn attach(
        dev: Arc<Device>,
        bus: &Peer,
        registry: RegistryClient,
        opts: GridOptions,
    ) -> Result<Grid, Error> {
        for range in opts.routed() {
            ip(&[
                "route",
                "replace",
                &range.to_string(),
                "dev",
                dev.name(),
                "metric",
                &opts.metric.to_string(),
                "src",
                &opts.src.to_string(),
            ])?;
        }
        let (tx, rx) = mpsc::channel(LOOKUP_QUEUE);
        let shared = Arc::new(Shared {
            dev: dev.clone(),
            opts,
            keys: RwLock::default(),
            twins: RwLock::default(),
            access: RwLock::default(),
            wants: tx,
        });
        let s = shared.clone();
        dev.set_miss_hook(Some(Arc::new(move |dst| {
            if let Some(w) = s.owner(dst) {
                let _ = s.wants.try_send(w);
            }
        })));
        let s = shared.clone();
        dev.set_reject_hook(Some(Arc::new(move |key, _src| {
            if let Some(t) = s.keys.read().unwrap().get(&key) {
                let _ = s.wants.try_send(Want::Widen(*t));
            }
        })));
        let s = shared.clone();
        bus.on_notify(HELLO_CMD, move |twin, _| {
            let _ = s.wants.try_send(Want::Twin(twin));
        });
        relay::attach(bus, &dev, Arc::new(Dir(shared.clone())));
        let task = tokio::spawn(lookups(shared.clone(), rx, bus.clone(), registry));
        Ok(Grid { shared, task })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.shared.dev
    }

    /// The users' machines that join their networks through this node (WireGuard key and
    /// address, from the registry): each is a peer that may send only from its address; those
    /// no longer listed are removed.
    pub fn set_access(&self, machines: &[(WgPublic, Ipv4Addr)]) {
        let mut have = self.shared.access.write().unwrap();
        for (key, addr) in machines {
            if have.get(key) == Some(addr) {
                continue;
            }
            let net = Ipv4Net::new(*addr, 32).expect("a /32");
            let cfg = PeerConfig {
                public_key: *key,
                endpoint: None,
                allowed_ips: vec![IpNet::V4(net)],
                persistent_keepalive: None,
            };
            match self.shared.dev.claim_peer(&cfg) {
                Ok(()) => {
                    tracing::info!(%key, %addr, "network access peer");
                    have.insert(*key, *addr);
                }
                Err(e) => tracing::warn!(%key, "network access peer: {e}"),
            }
        }
        let gone: Vec<WgPublic> = have
            .keys()
            .filter(|k| !machines.iter().any(|(m, _)| m == *k))
            .copied()
            .collect();
        for k in gone {
            have.remove(&k);
            self.shared.dev.remove_peer(&k);
        }
    }

    /// Each peer with the node whose prefix it holds and that node's twin.
    pub fn peers(&self) -> Vec<(PeerStatus, Option<NodeId>, Option<TwinId>)> {
        let o = &self.shared.opts;
        let keys = self.shared.keys.read().unwrap().clone();
        self.shared
            .dev
            .peers()
            .into_iter()
            .map(|p| {
                let node = p.allowed_ips.iter().find_map(|n| match n {
                    IpNet::V4(n) => node_of(&o.range, o.node_prefix_len, n.network()),
                    IpNet::V6(_) => None,
                });
                let twin = keys.get(&p.public_key).copied();
                (p, node, twin)
            })
            .collect()
    }
}

impl Drop for Grid {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.dev.set_miss_hook(None);
        self.shared.dev.set_reject_hook(None);
        self.shared.dev.set_relay(None);
        let o = &self.shared.opts;
        for range in o.routed() {
            let _ = ip(&[
                "route",
                "del",
                &range.to_string(),
                "dev",
                self.shared.dev.name(),
                "metric",
                &o.metric.to_string(),
            ]);
        }
    }
}

impl GridOptions {
    fn routed(&self) -> Vec<Ipv4Prefix> {
        std::iter::once(self.range)
            .chain(self.networks.map(|l| l.range))
            .collect()
    }
}

impl Shared {
    /// What to look up for a packet to `dst`: the node whose prefix holds it (not this node), or
    /// the place in a private network.
    fn owner(&self, dst: IpAddr) -> Option<Want> {
        let IpAddr::V4(v4) = dst else { return None };
        if let Some(p) = self.opts.networks.and_then(|l| l.place(v4)) {
            return Some(Want::Place(p));
        }
        node_of(&self.opts.range, self.opts.node_prefix_len, v4)
            .filter(|id| *id != self.opts.own_node)
            .map(Want::Node)
    }

    /// Everything `node` holds: its workload prefix, its subnets in networks, the addresses of
    /// the machines that join through it.
    async fn holdings(&self, node: &Node, registry: &RegistryClient) -> Vec<IpNet> {
        let p = node.workload_prefix;
        let mut nets = vec![IpNet::V4(
            Ipv4Net::new(p.addr(), p.prefix_len()).expect("a prefix is a network"),
        )];
        let Some(l) = self.opts.networks else {
            return nets;
        };
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, registry.networks_on(node.id)).await;
        let list = match found {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::debug!(node = node.id, "networks of the node: {e}");
                return nets;
            }
            Err(_) => return nets,
        };
        for n in list {
            if let Some(s) = n.subnet_of(&l, node.id) {
                nets.push(IpNet::V4(
                    Ipv4Net::new(s.addr(), s.prefix_len()).expect("a prefix is a network"),
                ));
            }
            for (i, a) in n.access.iter().enumerate() {
                if a.node_id == node.id {
                    if let Some(ip) = l.access_addr(n.id, i) {
                        nets.push(IpNet::V4(Ipv4Net::new(ip, 32).expect("a /32")));
                    }
                }
            }
        }
        nets
    }

    fn add(&self, node: &Node, allowed_ips: Vec<IpNet>) -> Option<WgPublic> {
        let o = node.overlay.as_ref()?;
        let key = WgPublic(o.wg_key.0);
        let p = node.workload_prefix;
        let cfg = PeerConfig {
            public_key: key,
            endpoint: o.endpoints.first().copied(),
            allowed_ips,
            persistent_keepalive: Some(KEEPALIVE_S),
        };
        // The registry is the authority on who holds an address: a machine that now joins
        // through another node is taken from the old one.
        if let Err(e) = self.dev.claim_peer(&cfg) {
            tracing::warn!(node = node.id, "overlay peer: {e}");
            return None;
        }
        // A node that came back with a new key leaves its old one behind.
        let old = self.twins.write().unwrap().insert(node.twin_id, key);
        let mut keys = self.keys.write().unwrap();
        if let Some(old) = old.filter(|o| *o != key) {
            keys.remove(&old);
            self.dev.remove_peer(&old);
        }
        keys.insert(key, node.twin_id);
        tracing::info!(node = node.id, %key, prefix = %p, "overlay peer");
        Some(key)
    }
}

/// Node `id` owns the `(id - 1)`th prefix of the range.
pub fn node_of(range: &Ipv4Prefix, node_prefix_len: u8, ip: Ipv4Addr) -> Option<NodeId> {
    if !range.contains(ip) || node_prefix_len < range.prefix_len() || node_prefix_len > 32 {
        return None;
    }
    let off = u32::from(ip) - u32::from(range.addr());
    let i = u64::from(off) >> (32 - u32::from(node_prefix_len));
    NodeId::try_from(i + 1).ok()
}

async fn lookups(
    s: Arc<Shared>,
    mut rx: mpsc::Receiver<Want>,
    bus: Peer,
    registry: RegistryClient,
) {
    let mut last: HashMap<Want, Instant> = HashMap::new();
    while let Some(w) = rx.recv().await {
        let every = if let Want::Widen(_) = w {
            WIDEN_EVERY
        } else {
            LOOKUP_EVERY
        };
        if last.get(&w).is_some_and(|t| t.elapsed() < every) {
            continue;
        }
        last.insert(w, Instant::now());
        if last.len() > 4096 {
            last.retain(|_, t| t.elapsed() < LOOKUP_EVERY);
        }
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, async {
            match w {
                Want::Node(id) => registry.node(id).await.map(|v| Some(v.node)),
                Want::Place(p) => {
                    let Some(id) = place_node(&registry, p).await? else {
                        return Ok(None);
                    };
                    registry.node(id).await.map(|v| Some(v.node))
                }
                Want::Twin(t) | Want::Widen(t) => registry
                    .nodes(&NodeFilter {
                        twin_id: Some(t),
                        ..Default::default()
                    })
                    .await
                    .map(|p| p.nodes.into_iter().next().map(|v| v.node)),
            }
        })
        .await;
        let node = match found {
            Ok(Ok(Some(n))) => n,
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                tracing::debug!("overlay look-up {w:?}: {e}");
                continue;
            }
            Err(_) => {
                tracing::debug!("overlay look-up {w:?}: timed out");
                continue;
            }
        };
        if node.id == s.opts.own_node {
            continue;
        }
        let holds = s.holdings(&node, &registry).await;
        let Some(key) = s.add(&node, holds) else {
            continue;
        };
        if let Want::Widen(_) = w {
            continue;
        }
        if let Want::Node(_) | Want::Place(_) = w {
            if let Err(e) = bus
                .notify(node.twin_id, HELLO_CMD, &[], Duration::from_secs(5))
                .await
            {
                tracing::debug!(node = node.id, "hello: {e}");
            }
        }
        s.dev.initiate(&key);
    }
}

/// The node at a place in a network, as its record says now.
async fn place_node(
    registry: &RegistryClient,
    p: Place,
) -> Result<Option<NodeId>, tfgrid_registry_client::ClientError> {
    let (id, index, access) = match p {
        Place::Node { network, index } => (network, index, false),
        Place::Access { network, index } => (network, index, true),
    };
    let n = registry.network(id).await?;
    Ok(if access {
        n.access.get(index).map(|a| a.node_id)
    } else {
        n.nodes.get(index).copied()
    })
}

struct Dir(Arc<Shared>);

impl Directory for Dir {
    fn twin_of(&self, key: &WgPublic) -> Option<TwinId> {
        self.0.keys.read().unwrap().get(key).copied()
    }
    fn key_of(&self, twin: TwinId) -> Option<WgPublic> {
        self.0.twins.read().unwrap().get(&twin).copied()
    }
    fn unknown_twin(&self, twin: TwinId) {
        let _ = self.0.wants.try_send(Want::Twin(twin));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_their_node() {
        let range: Ipv4Prefix = "10.64.0.0/16".parse().unwrap();
        let n = |s: &str| node_of(&range, 24, s.parse().unwrap());
        assert_eq!(n("10.64.0.2"), Some(1));
        assert_eq!(n("10.64.0.255"), Some(1));
        assert_eq!(n("10.64.1.7"), Some(2));
        assert_eq!(n("10.64.255.254"), Some(256));
        assert_eq!(n("10.65.0.2"), None);
        assert_eq!(n("192.168.1.1"), None);
        let wide: Ipv4Prefix = "10.64.0.0/10".parse().unwrap();
        assert_eq!(node_of(&wide, 26, "10.64.0.64".parse().unwrap()), Some(2));
        assert_eq!(node_of(&wide, 8, "10.64.0.64".parse().unwrap()), None);
    }
}
