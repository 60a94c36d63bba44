//! tfgrid-node: the node agent (Zero-OS's job). It measures and registers the host's capacity,
//! reports uptime, and runs users' signed deployments through one module per workload kind.

pub mod agent;
/// The bus API types live in tfgrid-core (so the bot need not depend on the agent).
pub use tfgrid_core::node_api as api;
pub mod capacity;
pub mod engine;
pub mod images;
pub mod kinds;
pub mod net;
pub mod networks;
pub mod sim;
mod sparse;
pub mod store;
