//! The cluster's HTTP routes: raft messages between validators (`/raft/*`, MAC-authenticated),
//! `GET /cluster`, `POST /cluster/members` (MAC-authenticated) and `GET /log` (the history).

use super::network::{mac_ok, MAC_HEADER};
use super::{ClusterStatus, Member, MemberChange, ValidatorId};
use crate::api::{query, Api, ApiError, Result};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;
use tfgrid_core::{Hash, Millis};

/// Snapshot chunks and batch entries are larger than transactions.
const MAX_RAFT_BODY: usize = 64 << 20;
/// How long a new validator may take to catch up before it is made a voter.
const CATCH_UP: Duration = Duration::from_secs(120);

pub fn routes() -> Router<Api> {
    Router::new()
        .route("/cluster", get(status))
        .route("/cluster/members", post(members))
        .route("/log", get(log))
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_RAFT_BODY))
}

fn authenticated(l: &Api, path: &str, headers: &HeaderMap, body: &[u8]) -> Result<()> {
    let got = headers.get(MAC_HEADER).and_then(|v| v.to_str().ok());
    if mac_ok(&l.cluster.key, path, body, got) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            format!("{path} needs the cluster key's MAC in {MAC_HEADER}"),
        ))
    }
}

fn decode<T: serde::de::DeserializeOwned>(path: &str, body: &[u8]) -> Result<T> {
    postcard::from_bytes(body).map_err(|e| ApiError::malformed(format!("{path}: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Response {
    match postcard::to_stdvec(v) {
        Ok(b) => (StatusCode::OK, b).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn append(State(l): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response> {
    authenticated(&l, "/raft/append", &headers, &body)?;
    let req = decode("/raft/append", &body)?;
    Ok(encode(&l.raft().append_entries(req).await))
}

async fn vote(State(l): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response> {
    authenticated(&l, "/raft/vote", &headers, &body)?;
    let req = decode("/raft/vote", &body)?;
    Ok(encode(&l.raft().vote(req).await))
}

async fn snapshot(State(l): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response> {
    authenticated(&l, "/raft/snapshot", &headers, &body)?;
    let req = decode("/raft/snapshot", &body)?;
    Ok(encode(&l.raft().install_snapshot(req).await))
}

pub(crate) fn cluster_status(l: &Api) -> ClusterStatus {
    let m = l.raft().metrics().borrow().clone();
    let voters: BTreeSet<ValidatorId> = m.membership_config.voter_ids().collect();
    ClusterStatus {
        id: l.id(),
        leader: m.current_leader,
        term: m.current_term,
        members: m
            .membership_config
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                url: n.addr.clone(),
                voter: voters.contains(id),
            })
            .collect(),
        height: l.read().height,
        applied_index: m.last_applied.map(|x| x.index),
        snapshot_index: m.snapshot.map(|x| x.index),
        replication: m
            .replication
            .map(|r| {
                r.into_iter()
                    .map(|(id, x)| (id, x.map(|x| x.index)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

async fn status(State(l): State<Api>) -> Response {
    Json(cluster_status(&l)).into_response()
}

/// Adds or removes a validator. Sent on to the leader when this validator does not lead.
async fn members(State(l): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response> {
    authenticated(&l, "/cluster/members", &headers, &body)?;
    let change: MemberChange = serde_json::from_slice(&body)
        .map_err(|e| ApiError::malformed(format!("membership change JSON: {e}")))?;
    match l.route() {
        crate::ledger::Route::Local => {}
        crate::ledger::Route::Leader(id, url) if !headers.contains_key("x-tfgrid-forwarded") => {
            let (status, bytes) = l
                .net
                .post(
                    &url,
                    "/cluster/members",
                    body.to_vec(),
                    CATCH_UP + Duration::from_secs(30),
                    Some(l.id()),
                )
                .await
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not_leader",
                        format!("leader {id} at {url}: {e}"),
                    )
                })?;
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            return Ok((
                status,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                bytes,
            )
                .into_response());
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_leader",
                "no leader is known; try again",
            ))
        }
    }
    let m = l.raft().metrics().borrow().clone();
    let mut voters: BTreeSet<ValidatorId> = m.membership_config.voter_ids().collect();
    let change_err = |e: String| ApiError::new(StatusCode::CONFLICT, "conflict", e);
    match change {
        MemberChange::Add { id, url } => {
            let url = url.trim_end_matches('/').to_string();
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(ApiError::malformed(format!(
                    "{url:?} is not an http(s) URL"
                )));
            }
            check_config(&l, &url).await?;
            l.raft()
                .add_learner(id, BasicNode::new(&url), false)
                .await
                .map_err(|e| change_err(format!("adding validator {id}: {e}")))?;
            wait_caught_up(&l, id).await?;
            voters.insert(id);
            l.raft()
                .change_membership(voters, false)
                .await
                .map_err(|e| change_err(format!("making validator {id} a voter: {e}")))?;
        }
        MemberChange::Remove { id } => {
            if !voters.remove(&id) {
                return Err(ApiError::not_found(format!(
                    "validator {id} is not a voter"
                )));
            }
            if voters.is_empty() {
                return Err(change_err("the last validator cannot be removed".into()));
            }
            l.raft()
                .change_membership(voters, false)
                .await
                .map_err(|e| change_err(format!("removing validator {id}: {e}")))?;
        }
    }
    Ok(Json(cluster_status(&l)).into_response())
}

/// A validator started with another config would apply the same log differently: refused.
async fn check_config(l: &Api, url: &str) -> Result<()> {
    let theirs: serde_json::Value = async {
        l.forwarder()
            .get(format!("{url}/config"))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .json()
            .await
    }
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "unreachable",
            format!("the new validator at {url} does not answer /config: {e}"),
        )
    })?;
    let ours = serde_json::to_value(&l.read().config).unwrap_or_default();
    if theirs != ours {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("the validator at {url} runs another registry config: {theirs} (the cluster's: {ours})"),
        ));
    }
    Ok(())
}

/// Waits until the learner's replicated index reaches the leader's applied index.
async fn wait_caught_up(l: &Api, id: ValidatorId) -> Result<()> {
    let mut m = l.raft().metrics();
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        {
            let x = m.borrow();
            let target = x.last_applied.map(|a| a.index);
            let at = x
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned())
                .flatten()
                .map(|a| a.index);
            if at.is_some() && at >= target {
                return Ok(());
            }
        }
        if tokio::time::timeout_at(deadline, m.changed())
            .await
            .is_err()
        {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "unavailable",
                format!(
                    "validator {id} did not catch up within {} s; it stays a learner",
                    CATCH_UP.as_secs()
                ),
            ));
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct LogQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

/// One transaction of the history, as `GET /log` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogEntry {
    pub height: u64,
    pub at: Millis,
    pub tx_hash: Hash,
}

/// The history this validator holds, from `from` (default 1), at most `limit` (≤ 10,000).
async fn log(State(l): State<Api>, RawQuery(q): RawQuery) -> Result<Response> {
    let q: LogQuery = query(q)?;
    let from = q.from.unwrap_or(1).max(1);
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let store = l.store.clone();
    let rows = tokio::task::spawn_blocking(move || store.log(from, limit))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let out: Vec<LogEntry> = rows
        .into_iter()
        .map(|(height, at, stx)| LogEntry {
            height,
            at,
            tx_hash: stx.hash(),
        })
        .collect();
    Ok(Json(out).into_response())
}
