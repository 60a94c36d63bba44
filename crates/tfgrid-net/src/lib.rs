//! The overlay that joins nodes on separate hosts: WireGuard in userspace (boringtun does the
//! protocol; this crate moves packets between a TUN device, a UDP socket and, for peers no UDP
//! reaches, the bus relay), a node's place on the grid overlay (peers made on demand from the
//! registry), wg-quick configuration files, and keys.

pub mod batch;
mod config;
mod device;
pub mod grid;
pub mod hosts;
mod key;
pub mod relay;

pub use config::{Config, InterfaceConfig, PeerConfig};
pub use device::{Device, DeviceOptions, MissHook, Path, PeerStatus, RelaySink};
pub use key::{WgPublic, WgSecret};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
