//! Replication: the registry's validators run raft (the openraft crate) over HTTP. The leader
//! batches verified transactions into one raft entry; once a majority holds the entry, every
//! validator's state machine applies it to the same state with the same registry time, so every
//! validator answers reads and any of them forwards writes to the leader.
//!
//! One validator alone is a cluster of one: the same code path, so the single-machine grid and
//! the replicated one differ only in their member lists.

pub mod api;
pub mod log_store;
pub mod machine;
pub mod network;

use crate::error::TxError;
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use tfgrid_core::tx::{Receipt, SignedTx};
use tfgrid_core::Millis;

/// A validator's id in the cluster.
pub type ValidatorId = u64;

/// What the leader proposes: transactions it verified, in the order they arrived, and the
/// registry time they are applied at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    pub at: Millis,
    pub txs: Vec<SignedTx>,
}

/// What applying a batch did, transaction by transaction (only the proposing leader reads it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied(pub Vec<Result<Receipt, TxError>>);

openraft::declare_raft_types!(
    pub Tc:
        D = Batch,
        R = Applied,
        NodeId = ValidatorId,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<Tc>;
pub type Entry = openraft::Entry<Tc>;
pub type LogId = openraft::LogId<ValidatorId>;
pub type StoredMembership = openraft::StoredMembership<ValidatorId, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<ValidatorId, BasicNode>;
pub type StorageError = openraft::StorageError<ValidatorId>;

/// How this validator takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub id: ValidatorId,
    /// The URL the other validators and clients reach this one at.
    pub advertise: String,
    /// The founding members (id -> URL), this one included; the lowest id initializes the
    /// cluster when its log is empty. Empty: this validator waits to be added to a cluster.
    pub peers: BTreeMap<ValidatorId, String>,
    /// The key the validators authenticate their raft messages with (the same on all).
    pub key: [u8; 32],
    /// A snapshot is taken after this many entries, and the log before it is dropped.
    pub snapshot_every: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
}

impl ClusterConfig {
    /// A cluster of one (this validator, id 1), with a key that only this process knows.
    pub fn single(advertise: &str) -> Self {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).expect("the OS random source");
        Self {
            id: 1,
            advertise: advertise.to_string(),
            peers: BTreeMap::from([(1, advertise.to_string())]),
            key,
            snapshot_every: 10_000,
            heartbeat_ms: 100,
            election_timeout_ms: 400,
        }
    }

    pub(crate) fn raft_config(&self) -> Result<openraft::Config, String> {
        let c = openraft::Config {
            cluster_name: "tfgrid-registry".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_ms,
            election_timeout_max: self.election_timeout_ms * 2,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: (self.snapshot_every / 2).min(1000),
            // A batch entry can hold thousands of transactions: send fewer entries at once.
            max_payload_entries: 64,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        };
        c.validate().map_err(|e| e.to_string())
    }
}

/// Reads a cluster key file (64 hex digits), or makes one (mode 0600) when `create`.
pub fn load_key(path: &Path, create: bool) -> std::io::Result<[u8; 32]> {
    use std::io::{Error, ErrorKind};
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let mut key = [0u8; 32];
            hex::decode_to_slice(s.trim(), &mut key).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidData,
                    format!("{}: not a 64-hex-digit key: {e}", path.display()),
                )
            })?;
            Ok(key)
        }
        Err(e) if e.kind() == ErrorKind::NotFound && create => {
            let mut key = [0u8; 32];
            getrandom::getrandom(&mut key).map_err(|e| Error::other(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            writeln!(f, "{}", hex::encode(key))?;
            f.sync_all()?;
            Ok(key)
        }
        Err(e) => Err(Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// One member as `GET /cluster` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub id: ValidatorId,
    pub url: String,
    /// A voter counts towards the majority; a learner only receives the log.
    pub voter: bool,
}

/// `GET /cluster`: the members, the leader, and this validator's view of its own progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub id: ValidatorId,
    pub leader: Option<ValidatorId>,
    pub term: u64,
    pub members: Vec<Member>,
    /// This validator's registry height (transactions applied).
    pub height: u64,
    /// The raft index of the last entry applied here, and of the last snapshot.
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    /// The leader's replication progress per member (raft index), known on the leader only.
    pub replication: BTreeMap<ValidatorId, Option<u64>>,
}

/// `POST /cluster/members`: add a validator (as a learner that catches up, then as a voter) or
/// remove one. Authenticated with the cluster key like raft messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberChange {
    Add { id: ValidatorId, url: String },
    Remove { id: ValidatorId },
}
