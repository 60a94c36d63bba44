use thiserror::Error;

#[derive(Debug, Error)]
pub enum CoreError {
    #[error("invalid public key: {0}")]
    BadPublicKey(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("capacity arithmetic overflowed")]
    CapacityOverflow,
    #[error("canonical decoding failed: {0}")]
    Decode(String),
    #[error("invalid hex: {0}")]
    Hex(String),
}
