//! The tfgrid message bus (ThreeFold's RMB): twins talk by twin id through relays they connect
//! out to, with envelopes signed by their source and payloads sealed end to end.

pub mod crypto;
pub mod envelope;
pub mod error;
pub mod frame;
pub mod peer;
pub mod relay;
pub mod twins;

pub use envelope::{Body, Envelope, Header};
pub use error::BusError;
pub use peer::{Peer, PeerConfig};
pub use relay::RelayConfig;
