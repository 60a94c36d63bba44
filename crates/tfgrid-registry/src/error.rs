use thiserror::Error;

/// Why a transaction was refused. A refused transaction changes nothing, its nonce included.
#[derive(Debug, Clone, Error, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TxError {
    #[error("malformed transaction: {0}")]
    Malformed(String),
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("not allowed: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error(
        "nonce {got} must be greater than this key's last nonce {last} (replayed or out of order)"
    )]
    Nonce { got: u64, last: u64 },
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not enough capacity on node {node}: {detail}")]
    Capacity { node: u32, detail: String },
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// Nothing was written: this validator does not lead (any more). Sending the same
    /// transaction again is safe.
    #[error("not the leader: {0}")]
    NotLeader(String),
}

impl TxError {
    pub fn code(&self) -> &'static str {
        match self {
            TxError::Malformed(_) => "malformed",
            TxError::BadSignature(_) => "bad_signature",
            TxError::Forbidden(_) => "forbidden",
            TxError::NotFound(_) => "not_found",
            TxError::Nonce { .. } => "nonce",
            TxError::Conflict(_) => "conflict",
            TxError::Capacity { .. } => "capacity",
            TxError::Unavailable(_) => "internal",
            TxError::NotLeader(_) => "not_leader",
        }
    }
}

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("store: {0}")]
    Store(String),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("config: {0}")]
    Config(String),
}

macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for RegistryError {
            fn from(e: $t) -> Self {
                RegistryError::Store(e.to_string())
            }
        }
    )*};
}
store_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
