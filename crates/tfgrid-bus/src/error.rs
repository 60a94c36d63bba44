use tfgrid_core::TwinId;
use thiserror::Error;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("signature of twin {src} does not verify")]
    BadSignature { src: TwinId },
    #[error("encryption: {0}")]
    Crypto(String),
    #[error("remote error: {0}")]
    Remote(String),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("not connected to the relay")]
    NotConnected,
    #[error("registry: {0}")]
    Registry(String),
    #[error("authentication failed: {0}")]
    Auth(String),
}
