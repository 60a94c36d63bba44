//! Raft messages between validators: postcard bodies over HTTP POST, each authenticated with a
//! keyed BLAKE3 MAC of its path and body under the cluster key. Raft itself tolerates lost,
//! repeated and reordered messages, so a MAC (no nonce) is all a message needs: a stranger can
//! neither forge nor alter one.

use super::{Tc, ValidatorId};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

pub const MAC_HEADER: &str = "x-tfgrid-cluster-mac";
pub const BINARY: &str = "application/x-tfgrid-raft";

/// The MAC of one message: it binds the path, so a vote cannot be replayed as an append.
fn digest(key: &[u8; 32], path: &str, body: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&(path.len() as u64).to_le_bytes());
    h.update(path.as_bytes());
    h.update(body);
    h.finalize()
}

pub fn mac(key: &[u8; 32], path: &str, body: &[u8]) -> String {
    digest(key, path, body).to_hex().to_string()
}

/// Checks a message's MAC in constant time (blake3's `Hash` compares so).
pub fn mac_ok(key: &[u8; 32], path: &str, body: &[u8], got: Option<&str>) -> bool {
    got.and_then(|g| blake3::Hash::from_hex(g).ok())
        .is_some_and(|g| digest(key, path, body) == g)
}

#[derive(Clone)]
pub struct Network {
    key: Arc<[u8; 32]>,
    http: reqwest::Client,
}

impl Network {
    pub fn new(key: [u8; 32]) -> Self {
        Self {
            key: Arc::new(key),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_millis(500))
                .pool_max_idle_per_host(4)
                .build()
                .expect("an HTTP client with default settings"),
        }
    }

    /// Sends an authenticated request to `url` and returns the answer (used by the membership
    /// commands as well as by raft). `forwarded_by`: the validator passing it on to the leader.
    pub async fn post(
        &self,
        url: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
        forwarded_by: Option<ValidatorId>,
    ) -> Result<(u16, Vec<u8>), reqwest::Error> {
        let m = mac(&self.key, path, &body);
        let mut req = self
            .http
            .post(format!("{}{path}", url.trim_end_matches('/')))
            .header(MAC_HEADER, m)
            .header(reqwest::header::CONTENT_TYPE, BINARY)
            .body(body)
            .timeout(timeout);
        if let Some(v) = forwarded_by {
            req = req.header("x-tfgrid-forwarded", v.to_string());
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?.to_vec()))
    }
}

pub struct Peer {
    target: ValidatorId,
    url: String,
    net: Network,
}

impl RaftNetworkFactory<Tc> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: ValidatorId, node: &BasicNode) -> Peer {
        Peer {
            target,
            url: node.addr.clone(),
            net: self.clone(),
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<ValidatorId, BasicNode, RaftError<ValidatorId, E>>>;

impl Peer {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body =
            postcard::to_stdvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let (status, bytes) = self
            .net
            .post(&self.url, path, body, option.hard_ttl(), None)
            .await
            .map_err(|e| {
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        if status != 200 {
            let msg = String::from_utf8_lossy(&bytes).into_owned();
            return Err(RPCError::Network(NetworkError::new(
                &std::io::Error::other(format!(
                    "validator {} at {} answered {status}: {msg}",
                    self.target, self.url
                )),
            )));
        }
        let r: Result<Resp, RaftError<ValidatorId, E>> =
            postcard::from_bytes(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<Tc> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<Tc>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<ValidatorId>, openraft::error::Infallible> {
        self.call("/raft/append", &rpc, option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<Tc>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<ValidatorId>, InstallSnapshotError> {
        self.call("/raft/snapshot", &rpc, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<ValidatorId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<ValidatorId>, openraft::error::Infallible> {
        self.call("/raft/vote", &rpc, option).await
    }
}
