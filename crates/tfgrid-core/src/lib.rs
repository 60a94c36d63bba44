//! Types every tfgrid component shares: who acts (keys, twin ids), how signed things are
//! encoded and hashed, what capacity is, and what the registry stores and accepts.

pub mod canonical;
pub mod capacity;
pub mod checks;
pub mod contract;
pub mod deployment;
pub mod error;
pub mod faults;
pub mod filter;
pub mod keys;
pub mod network;
pub mod node_api;
pub mod prefix;
pub mod records;
pub mod tx;

pub use canonical::Hash;
pub use capacity::Capacity;
pub use error::CoreError;
pub use keys::{Identity, PublicKey, Signature};

pub type TwinId = u32;
pub type FarmId = u32;
pub type NodeId = u32;
pub type ContractId = u64;

/// Milliseconds since the Unix epoch: the registry's clock for every timestamp it records.
pub type Millis = u64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Implements `From` for every redb error type into `$err::Db(String)`, for crates whose store
/// wraps redb (the caller depends on redb; the error keeps redb's message).
#[macro_export]
macro_rules! redb_errors_into {
    ($err:ident) => {
        $crate::redb_errors_into!(@each $err, redb::DatabaseError, redb::TransactionError,
            redb::TableError, redb::StorageError, redb::CommitError);
    };
    (@each $err:ident, $($t:ty),*) => {$(
        impl From<$t> for $err {
            fn from(e: $t) -> Self {
                $err::Db(e.to_string())
            }
        }
    )*};
}
