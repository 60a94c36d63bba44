//! tfgrid-node: the node agent (Zero-OS's job). It measures and registers the host's capacity,
//! reports uptime, and runs users' signed deployments through one module per workload kind.

pub mod agent;
pub mod api;
pub mod capacity;
pub mod engine;
pub mod images;
pub mod kinds;
pub mod net;
pub mod store;
