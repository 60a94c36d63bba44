//! tfgrid-bot: the user's agent (ThreeFold's 3Bot). It turns a declared deployment into contracts
//! on the registry and workloads on nodes, and from then on keeps the declared state true.

mod adopt;
pub mod api;
pub mod bot;
mod deploy;
mod liveness;
pub mod networks;
mod placement;
mod reconcile;
pub mod recovery;
mod routes;
pub mod scheduler;
pub mod spec;
pub mod storage;
pub mod store;
