//! tfgrid-storage: a user's object store over zdb namespaces on many nodes. Objects are cut
//! into stripes; each stripe is compressed (when it pays), sealed with AES-256-GCM under a key
//! derived from the user's key, and erasure coded (reed-solomon-simd) into k data and m parity
//! shards, shard i on slot i of the pool (a namespace on its own node). Metadata records are
//! sealed too and written to every slot, so a bot with the same key recovers the whole store
//! from the slots alone. A repair pass rebuilds what a lost or replaced slot should hold, and
//! the S3 API (s3s) is how users speak to it.

pub mod codec;
pub mod keys;
pub mod meta;
mod repair;
pub mod s3;
pub mod slot;
mod store;
mod upload;

pub use codec::Layout;
pub use keys::StorageKey;
pub use repair::{RepairProgress, SlotStatus, Status};
pub use s3::Pools;
pub use slot::SlotAddr;
pub use store::{ListPage, Listed, PoolConfig, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("no such bucket: {0}")]
    NoSuchBucket(String),
    #[error("bucket {0} is not empty")]
    BucketNotEmpty(String),
    #[error("bucket {0} exists")]
    BucketExists(String),
    #[error("no such key: {0}")]
    NoSuchKey(String),
    #[error("no such upload: {0}")]
    NoSuchUpload(String),
    /// A zdb that could not be reached or refused a request.
    #[error("{0}")]
    Backend(String),
    /// Too few slots answered for a write or a read to count.
    #[error("only {have} of {need} slots answered: {why}")]
    Quorum {
        have: usize,
        need: usize,
        why: String,
    },
    /// Fewer than k good shards of a stripe: `bad` of them failed their checksum.
    #[error("a stripe is unreadable: {have} good shards of the {need} needed ({bad} altered)")]
    Unreadable {
        have: usize,
        need: usize,
        bad: usize,
    },
    /// Data that fails authentication or its checksum: altered, or another key's.
    #[error("{0}")]
    Corrupt(String),
}
