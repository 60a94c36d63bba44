//! The HTTP API: POST signed transactions, GET records and GridProxy-style searches.

use crate::error::TxError;
use crate::ledger::{Ledger, Route};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tfgrid_core::filter::{ContractFilter, NodeFilter};
use tfgrid_core::records::ErrorBody;
use tfgrid_core::tx::{SignedTx, BINARY_CONTENT_TYPE};
use tfgrid_core::{now_millis, PublicKey};

const MAX_BATCH_TXS: usize = 10_000;
/// A batch of MAX_BATCH_TXS transactions in JSON is about 5 MB; one transaction far less.
const MAX_BATCH_BODY: usize = 16 << 20;
const MAX_TX_BODY: usize = 256 << 10;
/// Longer request lines and header blocks are refused (414, 431) before any handler runs.
const MAX_URI: usize = 8 << 10;
const MAX_HEADERS: usize = 32 << 10;

pub struct ApiError(StatusCode, ErrorBody);

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, msg: impl Into<String>) -> Self {
        Self(
            status,
            ErrorBody {
                error: code.into(),
                message: msg.into(),
            },
        )
    }
    pub(crate) fn malformed(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed", msg)
    }
    pub(crate) fn not_found(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", msg)
    }
}

impl From<TxError> for ApiError {
    fn from(e: TxError) -> Self {
        let status = match e {
            TxError::Malformed(_) => StatusCode::BAD_REQUEST,
            TxError::BadSignature(_) => StatusCode::UNAUTHORIZED,
            TxError::Forbidden(_) => StatusCode::FORBIDDEN,
            TxError::NotFound(_) => StatusCode::NOT_FOUND,
            TxError::Nonce { .. } | TxError::Conflict(_) | TxError::Capacity { .. } => {
                StatusCode::CONFLICT
            }
            TxError::Unavailable(_) | TxError::NotLeader(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

pub(crate) type Api = Arc<Ledger>;
pub(crate) type Result<T> = std::result::Result<T, ApiError>;

pub fn router(ledger: Arc<Ledger>) -> Router {
    Router::new()
        .route(
            "/tx",
            post(submit).layer(axum::extract::DefaultBodyLimit::max(MAX_TX_BODY)),
        )
        .route(
            "/txs",
            post(submit_batch).layer(axum::extract::DefaultBodyLimit::max(MAX_BATCH_BODY)),
        )
        .route("/health", get(|| async { "ok" }))
        .route("/whoami", get(whoami))
        .route("/config", get(config))
        .route("/stats", get(stats))
        .route("/accounts/{key}", get(account))
        .route("/twins", get(twins))
        .route("/twins/{id}", get(twin))
        .route("/farms", get(farms))
        .route("/farms/{id}", get(farm))
        .route("/nodes", get(nodes))
        .route("/nodes/{id}", get(node))
        .route("/contracts", get(contracts))
        .route("/contracts/{id}", get(contract))
        .route("/networks", get(networks))
        .route("/networks/{id}", get(network))
        .merge(crate::cluster::api::routes())
        .layer(axum::middleware::from_fn(limits))
        .with_state(ledger)
}

/// Every refusal is the documented `{error, message}` JSON, also the ones about the request's
/// size: the request line and headers are measured here, and a body over its route's limit
/// (which the extractor answers as plain text) is turned into JSON on the way out. (Lines and
/// headers past hyper's own buffer, about 400 KB, are refused by hyper before this runs.)
async fn limits(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let uri = req.uri().to_string().len();
    if uri > MAX_URI {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "too_large",
            format!("the request target is {uri} bytes; at most {MAX_URI} are accepted"),
        )
        .into_response();
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers > MAX_HEADERS {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_large",
            format!("the request headers are {headers} bytes; at most {MAX_HEADERS} are accepted"),
        )
        .into_response();
    }
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
        let limit = if path == "/txs" {
            MAX_BATCH_BODY
        } else {
            MAX_TX_BODY
        };
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is over {limit} bytes, the limit of {path}"),
        )
        .into_response();
    }
    resp
}

fn parse_tx(headers: &HeaderMap, body: &[u8]) -> Result<SignedTx> {
    let binary = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(BINARY_CONTENT_TYPE.as_bytes()));
    if binary {
        SignedTx::from_bytes(body)
            .map_err(|e| ApiError::malformed(format!("binary transaction: {e}")))
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::malformed(format!("transaction JSON: {e}")))
    }
}

/// A write that reached a validator that does not lead is sent on to the leader once (marked,
/// so it is never sent on twice). While an election is on, the write waits for a leader, up to
/// WRITE_WAIT; a write raft refused as "not the leader" was not written and is sent again.
const WRITE_WAIT: Duration = Duration::from_secs(5);
const FORWARDED: &str = "x-tfgrid-forwarded";

enum Step<T> {
    Done(T),
    Again,
}

async fn routed<T, F, Fut>(
    l: &Api,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
    local: F,
) -> Result<Response>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Step<T>>,
    T: IntoResponse,
{
    let forwarded = headers.contains_key(FORWARDED);
    let deadline = Instant::now() + WRITE_WAIT;
    loop {
        match l.route() {
            Route::Local => {
                if let Step::Done(r) = local().await {
                    return Ok(r.into_response());
                }
            }
            Route::Leader(id, url) if !forwarded => {
                if let Step::Done(r) = forward(l, id, &url, path, headers, body).await? {
                    return Ok(r);
                }
            }
            Route::Leader(id, _) => {
                return Err(TxError::NotLeader(format!("validator {id} leads")).into());
            }
            Route::Nobody => {}
        }
        if Instant::now() >= deadline {
            return Err(TxError::NotLeader(format!(
                "no validator took the write within {} s (is a majority up?)",
                WRITE_WAIT.as_secs()
            ))
            .into());
        }
        l.settle(deadline).await;
    }
}

/// Sends the request on to the leader and passes its answer back, once this validator has
/// applied what the answer acknowledges (so the writer reads its write here too).
async fn forward(
    l: &Api,
    id: u64,
    url: &str,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Step<Response>> {
    let mut req = l
        .forwarder()
        .post(format!("{url}{path}"))
        .header(FORWARDED, l.id().to_string())
        .body(body.clone());
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        req = req.header(header::CONTENT_TYPE, ct.clone());
    }
    let resp = match req.send().await {
        Ok(r) => r,
        // Not sent: the leader is gone; wait for the next one.
        Err(e) if e.is_connect() => return Ok(Step::Again),
        Err(e) => {
            return Err(TxError::Unavailable(format!(
                "leader {id} at {url} did not answer ({e}); the write may have been committed"
            ))
            .into())
        }
    };
    let status = resp.status();
    let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
    let bytes = resp.bytes().await.map_err(|e| {
        ApiError::from(TxError::Unavailable(format!(
            "leader {id} at {url} broke off its answer ({e}); the write may have been committed"
        )))
    })?;
    if status == StatusCode::SERVICE_UNAVAILABLE
        && serde_json::from_slice::<ErrorBody>(&bytes).is_ok_and(|e| e.error == "not_leader")
    {
        return Ok(Step::Again);
    }
    if status.is_success() {
        let height = serde_json::from_slice::<tfgrid_core::tx::Receipt>(&bytes)
            .map(|r| r.height)
            .or_else(|_| {
                serde_json::from_slice::<Vec<serde_json::Value>>(&bytes).map(|items| {
                    items
                        .iter()
                        .filter_map(|i| i.get("ok")?.get("height")?.as_u64())
                        .max()
                        .unwrap_or(0)
                })
            })
            .unwrap_or(0);
        l.wait_applied(height, Duration::from_secs(2)).await;
    }
    let mut out = (status, bytes).into_response();
    if let Some(ct) = ct {
        out.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Ok(Step::Done(out))
}

async fn submit(State(l): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response> {
    let stx = parse_tx(&headers, &body)?;
    routed(&l, "/tx", &headers, &body, || async {
        match l.submit(stx.clone()).await {
            Err(TxError::NotLeader(_)) => Step::Again,
            Ok(r) => Step::Done(Json(r).into_response()),
            Err(e) => Step::Done(ApiError::from(e).into_response()),
        }
    })
    .await
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum BatchItem {
    Ok(tfgrid_core::tx::Receipt),
    Err(ErrorBody),
}

/// Many transactions in one request; each gets its own result, in order. Transactions from one
/// signer must carry increasing nonces in the order given.
async fn submit_batch(State(l): State<Api>, headers: HeaderMap, body: Bytes) -> Result<Response> {
    let txs: Vec<SignedTx> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::malformed(format!("transaction batch JSON: {e}")))?;
    if txs.len() > MAX_BATCH_TXS {
        return Err(ApiError::malformed(format!(
            "at most {MAX_BATCH_TXS} transactions per batch"
        )));
    }
    routed(&l, "/txs", &headers, &body, || async {
        let results = l.submit_many(txs.clone()).await;
        // Sent again only when nothing of it was written.
        if !results.is_empty()
            && results
                .iter()
                .all(|r| matches!(r, Err(TxError::NotLeader(_))))
        {
            return Step::Again;
        }
        let out = results
            .into_iter()
            .map(|r| match r {
                Ok(r) => BatchItem::Ok(r),
                Err(e) => BatchItem::Err(ApiError::from(e).1),
            })
            .collect::<Vec<_>>();
        Step::Done(Json(out))
    })
    .await
}

pub(crate) fn query<T: serde::de::DeserializeOwned>(q: Option<String>) -> Result<T> {
    serde_urlencoded::from_str(q.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::malformed(format!("query: {e}")))
}

fn id<T: std::str::FromStr>(what: &str, s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| ApiError::malformed(format!("{what} id {s:?} is not a number")))
}

async fn config(State(l): State<Api>) -> Response {
    Json(l.read().config.clone()).into_response()
}

async fn stats(State(l): State<Api>) -> Response {
    Json(l.read().stats(now_millis())).into_response()
}

async fn account(State(l): State<Api>, Path(key): Path<String>) -> Result<Response> {
    let key: PublicKey = key
        .parse()
        .map_err(|e| ApiError::malformed(format!("{e}")))?;
    Ok(Json(l.read().account(&key)).into_response())
}

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ListQuery {
    public_key: Option<String>,
    twin_id: Option<u32>,
    name: Option<String>,
    page: Option<u32>,
    size: Option<u32>,
}

fn page_of<T: Clone>(items: impl Iterator<Item = T>, q: &ListQuery) -> Vec<T> {
    let size = q.size.unwrap_or(100).clamp(1, 1000) as usize;
    let skip = (q.page.unwrap_or(1).max(1) as usize - 1) * size;
    items.skip(skip).take(size).collect()
}

async fn twins(State(l): State<Api>, RawQuery(q): RawQuery) -> Result<Response> {
    let q: ListQuery = query(q)?;
    let r = l.read();
    if let Some(k) = &q.public_key {
        let key: PublicKey = k.parse().map_err(|e| ApiError::malformed(format!("{e}")))?;
        let found: Vec<_> = r
            .twin_by_key
            .get(&key)
            .and_then(|id| r.twins.get(id))
            .cloned()
            .into_iter()
            .collect();
        return Ok(Json(found).into_response());
    }
    Ok(Json(page_of(r.twins.values().cloned(), &q)).into_response())
}

async fn twin(State(l): State<Api>, Path(s): Path<String>) -> Result<Response> {
    let id: u32 = id("twin", &s)?;
    let r = l.read();
    let t = r
        .twins
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("twin {id}")))?;
    Ok(Json(t).into_response())
}

async fn farms(State(l): State<Api>, RawQuery(q): RawQuery) -> Result<Response> {
    let q: ListQuery = query(q)?;
    let r = l.read();
    let it = r
        .farms
        .values()
        .filter(|f| q.twin_id.is_none_or(|t| f.twin_id == t))
        .filter(|f| {
            q.name
                .as_ref()
                .is_none_or(|n| f.name.eq_ignore_ascii_case(n))
        })
        .cloned();
    Ok(Json(page_of(it, &q)).into_response())
}

async fn farm(State(l): State<Api>, Path(s): Path<String>) -> Result<Response> {
    let id: u32 = id("farm", &s)?;
    let r = l.read();
    let f = r
        .farms
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("farm {id}")))?;
    Ok(Json(f).into_response())
}

async fn nodes(State(l): State<Api>, RawQuery(q): RawQuery) -> Result<Response> {
    let f: NodeFilter = query(q)?;
    f.validate().map_err(ApiError::malformed)?;
    let now = now_millis();
    let body = {
        let read = l.read();
        let (ids, count) = read.search_ids(&f, now);
        (read.render_views(&ids, now), count)
    };
    let (json, count) = body;
    let mut resp = ([(header::CONTENT_TYPE, "application/json")], json).into_response();
    if let Some(c) = count {
        resp.headers_mut().insert("count", HeaderValue::from(c));
    }
    Ok(resp)
}

async fn node(State(l): State<Api>, Path(s): Path<String>) -> Result<Response> {
    let id: u32 = id("node", &s)?;
    let r = l.read();
    let n = r
        .nodes
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("node {id}")))?;
    Ok(Json(r.view(n, now_millis())).into_response())
}

async fn contracts(State(l): State<Api>, RawQuery(q): RawQuery) -> Result<Response> {
    let f: ContractFilter = query(q)?;
    let r = l.read();
    let list = r.contracts(&f).map_err(ApiError::malformed)?;
    Ok(Json(list).into_response())
}

async fn contract(State(l): State<Api>, Path(s): Path<String>) -> Result<Response> {
    let id: u64 = id("contract", &s)?;
    let r = l.read();
    let c = r
        .contracts
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("contract {id}")))?;
    Ok(Json(c).into_response())
}

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct NetworkQuery {
    twin_id: Option<u32>,
    name: Option<String>,
    /// The networks a node has a subnet in or is an access point of: what the node serves.
    node_id: Option<u32>,
    page: Option<u32>,
    size: Option<u32>,
}

async fn networks(State(l): State<Api>, RawQuery(q): RawQuery) -> Result<Response> {
    let q: NetworkQuery = query(q)?;
    let r = l.read();
    let page = ListQuery {
        page: q.page,
        size: q.size,
        ..Default::default()
    };
    if let (Some(t), Some(n)) = (q.twin_id, &q.name) {
        let found: Vec<_> = r.network_by_name(t, n).cloned().into_iter().collect();
        return Ok(Json(found).into_response());
    }
    let all: Vec<&tfgrid_core::network::Network> = match q.node_id {
        Some(node) => r.networks_on(node),
        None => r.networks.values().collect(),
    };
    let it = all
        .into_iter()
        .filter(|n| q.twin_id.is_none_or(|t| n.twin_id == t))
        .filter(|n| q.name.as_ref().is_none_or(|x| &n.name == x))
        .cloned();
    let list = page_of(it, &page);
    Ok(Json(list).into_response())
}

async fn network(State(l): State<Api>, Path(s): Path<String>) -> Result<Response> {
    let id: u32 = id("network", &s)?;
    let r = l.read();
    let n = r
        .networks
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("network {id}")))?;
    Ok(Json(n).into_response())
}

/// The address this request came from, as the registry sees it: a node behind NAT learns its
/// router's public address here (as from a STUN server) and publishes it as an overlay endpoint,
/// so two nodes behind NATs can punch through to each other.
async fn whoami(req: axum::extract::Request) -> Response {
    match req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
    {
        Some(c) => Json(tfgrid_core::records::WhoAmI { ip: c.0.ip() }).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "this registry is served without client addresses",
        )
            .into_response(),
    }
}
