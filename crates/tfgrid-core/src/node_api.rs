//! What a node answers on the bus: the command names and their JSON bodies. They live here, not in
//! the node agent's crate, so the bot and the CLI speak to nodes without depending on the agent
//! (its image puller, runtime and store).

use crate::deployment::{Deployment, WorkloadResult};
use crate::{Capacity, ContractId, NodeId, TwinId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const DEPLOY: &str = "deployment.deploy";
pub const UPDATE: &str = "deployment.update";
pub const GET: &str = "deployment.get";
pub const DELETE: &str = "deployment.delete";
pub const CHANGES: &str = "deployment.changes";
pub const LIST: &str = "deployment.list";
/// Every deployment of the caller on the node, with only its workloads' results: what an owner
/// checks each reconcile pass, in one call per node.
pub const STATES: &str = "deployment.states";
pub const STATISTICS: &str = "node.statistics";
pub const VERSION: &str = "node.version";
pub const LOGS: &str = "workload.logs";
pub const OVERLAY: &str = "node.overlay";
pub const OWNER: &str = "workload.owner";
pub const GATEWAY_BACKENDS: &str = "gateway.backends";

/// One deployment's workload results (`deployment.states`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentState {
    pub contract_id: ContractId,
    pub results: BTreeMap<String, WorkloadResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContractRef {
    pub contract_id: ContractId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentInfo {
    pub deployment: Deployment,
    /// Current result of each workload, by name.
    pub results: BTreeMap<String, WorkloadResult>,
}

/// One result a workload went through (`deployment.changes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub workload: String,
    pub result: WorkloadResult,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Changes {
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statistics {
    /// What the node offers to the grid.
    pub total: Capacity,
    /// Held by the deployments on this node (their contracts' capacity).
    pub reserved: Capacity,
    /// Held by workloads that are running (state ok).
    pub used: Capacity,
    pub deployments: u64,
    pub workloads: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogsRequest {
    pub contract_id: ContractId,
    pub name: String,
    /// Last this many bytes; the whole bounded log when absent.
    #[serde(default)]
    pub tail: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Logs {
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
}

/// A node's place on the grid overlay: its key and port, and the peers it has made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OverlayStatus {
    /// WireGuard public key, base64.
    pub public_key: String,
    pub listen_port: u16,
    pub peers: Vec<OverlayPeer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OverlayPeer {
    /// The node whose prefix the peer holds, and its twin.
    pub node_id: Option<NodeId>,
    pub twin_id: Option<TwinId>,
    pub public_key: String,
    /// Where its datagrams come from (after roaming: a NAT's address for a node behind one).
    pub endpoint: Option<std::net::SocketAddr>,
    pub allowed_ips: Vec<String>,
    /// `direct` (UDP), `relay` (over the bus) or `none` (nothing heard for a while).
    pub path: String,
    pub last_handshake_s: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// Whose workload has this address (asked of the node whose prefix holds it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnerRequest {
    pub ip: std::net::Ipv4Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Owner {
    /// None: no workload of this node has it.
    pub twin_id: Option<TwinId>,
}

/// Asks a gateway node how a name's backends do (the twin that deployed the route only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendsRequest {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendHealth {
    pub backend: String,
    /// As of the last check (every 2 s); None before the first.
    pub reachable: Option<bool>,
    /// Seconds it has been so.
    pub for_s: f64,
    pub ever_reachable: bool,
    pub error: String,
}
