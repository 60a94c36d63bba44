//! What the registry stores about twins, farms and nodes, and how it presents them.

use crate::capacity::Capacity;
use crate::keys::{hex_bytes, PublicKey};
use crate::prefix::Ipv4Prefix;
use crate::{FarmId, Millis, NodeId, TwinId};
use serde::{Deserialize, Serialize};

hex_bytes!(X25519Key, 32, "x25519 key");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Twin {
    pub id: TwinId,
    pub public_key: PublicKey,
    /// Address of the relay this twin connects to (the bus routes to it there).
    pub relay: String,
    /// Key for end-to-end payload encryption on the bus; absent until the twin publishes one.
    #[serde(default)]
    pub enc_key: Option<X25519Key>,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Farm {
    pub id: FarmId,
    pub name: String,
    pub twin_id: TwinId,
    pub dedicated: bool,
    pub public_ips: Vec<FarmIp>,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FarmIp {
    /// Address with prefix, e.g. `185.69.166.10/24`.
    pub ip: String,
    pub gateway: String,
    /// The contract holding it; `None` when free.
    #[serde(default)]
    pub contract_id: Option<crate::ContractId>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Location {
    #[serde(default)]
    pub country: String,
    #[serde(default)]
    pub city: String,
    #[serde(default)]
    pub latitude: Option<f64>,
    #[serde(default)]
    pub longitude: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PublicConfig {
    #[serde(default)]
    pub ipv4: Option<String>,
    #[serde(default)]
    pub gw4: Option<String>,
    #[serde(default)]
    pub ipv6: Option<String>,
    #[serde(default)]
    pub gw6: Option<String>,
    /// Set on gateway nodes: names are served as `name.<domain>`.
    #[serde(default)]
    pub domain: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub vendor: String,
    pub model: String,
    /// Video memory in bytes.
    pub memory: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub farm_id: FarmId,
    pub twin_id: TwinId,
    /// What the node offers to the grid (its own reserve already taken off).
    pub total: Capacity,
    /// Sum of the capacity of its live contracts.
    pub reserved: Capacity,
    pub gpus: Vec<Gpu>,
    pub location: Location,
    #[serde(default)]
    pub public_config: PublicConfig,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Registry time of the last uptime report (or of registration).
    pub last_seen: Millis,
    /// Seconds the node said it has been up in its last report.
    pub uptime: u64,
    /// The node's share of the grid's workload range, handed out once at registration and kept
    /// for the node's life: its workloads' addresses come from it.
    pub workload_prefix: Ipv4Prefix,
    /// How other nodes reach its workloads over the grid overlay; absent on nodes that run none.
    #[serde(default)]
    pub overlay: Option<Overlay>,
}

/// A node's place on the grid overlay: its WireGuard public key (an x25519 key) and the UDP
/// addresses it listens on. A node behind NAT lists its own (private) address: peers learn
/// where it really is from its first authentic datagram, as WireGuard's roaming does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    pub wg_key: X25519Key,
    pub endpoints: Vec<std::net::SocketAddr>,
}

/// What `/whoami` answers: the address a request came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub ip: std::net::IpAddr,
}

/// At most this many endpoints per node: a peer tries them in order.
pub const MAX_OVERLAY_ENDPOINTS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Up,
    Down,
}

impl std::str::FromStr for NodeStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "up" => Ok(NodeStatus::Up),
            "down" => Ok(NodeStatus::Down),
            other => Err(format!("unknown status {other:?} (expected up or down)")),
        }
    }
}

impl Node {
    pub fn free(&self) -> Capacity {
        // The registry keeps reserved <= total, so this never saturates in practice; saturating keeps
        // a broken invariant from turning into a huge free figure.
        self.total.saturating_sub(&self.reserved)
    }

    pub fn status(&self, now: Millis, down_after_ms: u64) -> NodeStatus {
        if now.saturating_sub(self.last_seen) <= down_after_ms {
            NodeStatus::Up
        } else {
            NodeStatus::Down
        }
    }
}

/// A node as the search API returns it: the record plus what is derived from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub node: Node,
    pub free: Capacity,
    pub status: NodeStatus,
}

/// A key's standing with the registry: the last nonce it used and its twin, if it has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub public_key: PublicKey,
    pub nonce: u64,
    pub twin_id: Option<TwinId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub twins: u64,
    pub farms: u64,
    pub nodes: u64,
    pub nodes_up: u64,
    pub contracts_live: u64,
    pub node_contracts_live: u64,
    pub name_contracts_live: u64,
    pub countries: u64,
    pub total: Capacity,
    pub reserved: Capacity,
    pub height: u64,
}

/// Settings nodes and bots need to agree with the registry on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryConfig {
    /// How often nodes should report uptime.
    pub report_interval_ms: u64,
    /// A node with no report for this long is down.
    pub down_after_ms: u64,
    /// Smallest capacity a node may register with.
    pub min_node: Capacity,
    /// Every workload address of the grid comes from here: node `id` gets the `(id - 1)`th
    /// prefix of length `node_prefix_len` (ids are dense and never reused, so none is given
    /// twice). Registration is refused when it runs out.
    pub workload_range: Ipv4Prefix,
    pub node_prefix_len: u8,
    /// Every private network's range comes from here: network `id` gets the `(id - 1)`th
    /// prefix of length `network_prefix_len`, cut into subnets of `network_subnet_len` (the
    /// first for the user's own machines, one for each node the network is on).
    #[serde(default = "default_network_range")]
    pub network_range: Ipv4Prefix,
    #[serde(default = "default_network_prefix_len")]
    pub network_prefix_len: u8,
    #[serde(default = "default_network_subnet_len")]
    pub network_subnet_len: u8,
}

fn default_network_range() -> Ipv4Prefix {
    Ipv4Prefix::new(std::net::Ipv4Addr::new(10, 128, 0, 0), 9).expect("a valid prefix")
}
fn default_network_prefix_len() -> u8 {
    20
}
fn default_network_subnet_len() -> u8 {
    26
}

impl Default for RegistryConfig {
    /// Seconds, not ThreeFold's 40 minutes: a local grid heals within seconds of a node dying.
    fn default() -> Self {
        Self {
            report_interval_ms: 1_000,
            down_after_ms: 3_000,
            min_node: Capacity {
                cru: 1,
                mru: 256 * crate::capacity::MIB,
                ..Default::default()
            },
            // 16,384 nodes of /24 (253 workloads each).
            workload_range: Ipv4Prefix::new(std::net::Ipv4Addr::new(10, 64, 0, 0), 10)
                .expect("a valid prefix"),
            node_prefix_len: 24,
            // 2,048 networks of 4,096 addresses: 63 nodes of 61 workloads each, 61 machines.
            network_range: default_network_range(),
            network_prefix_len: default_network_prefix_len(),
            network_subnet_len: default_network_subnet_len(),
        }
    }
}

/// The JSON body of every error the registry API returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable kind: malformed, bad_signature, forbidden, not_found, nonce,
    /// conflict, capacity, internal.
    pub error: String,
    pub message: String,
}
