//! The bot's HTTP API (what the CLI and the dashboard use) and the dashboard itself. Errors are
//! JSON `{error, message}` with a status that says whose fault it is.
//!
//! The API acts with the user's key, so it only takes orders from the user: a request that a web
//! page in the user's browser made (an `Origin` that is not the bot's own, or
//! `Sec-Fetch-Site: cross-site`) is refused for every method but GET, and a spec must come as
//! `application/yaml` (or `application/json`), a type no page can send across origins without the
//! bot's consent (which it never gives). With a token (required when the bot listens beyond
//! loopback), every `/api` request must carry `Authorization: Bearer <token>`.

use crate::bot::{Bot, BotError};
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Clone)]
struct App {
    bot: Arc<Bot>,
    registry: String,
    token: Option<Arc<str>>,
}

/// Content types a spec may be posted as.
const SPEC_TYPES: [&str; 5] = [
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/x-yaml",
    "application/json",
];

pub fn router(bot: Arc<Bot>, registry_url: &str, token: Option<String>) -> Router {
    let app = App {
        bot,
        registry: registry_url.trim_end_matches('/').to_string(),
        token: token.map(Into::into),
    };
    Router::new()
        .route("/", get(dashboard))
        .route("/api/info", get(info))
        .route("/api/deployments", get(list).post(create))
        .route("/api/deployments/{name}", get(inspect).delete(remove))
        .route("/api/deployments/{name}/logs", get(logs))
        .route("/api/events", get(events))
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{id}/overlay", get(overlay))
        .route("/api/networks", get(networks))
        .route("/api/storage", get(storage))
        .route("/api/storage/credentials", get(storage_credentials))
        .route(
            "/api/networks/{name}/access",
            axum::routing::post(network_access),
        )
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        // A spec is a few kilobytes; past the parser's bound (spec::MAX_YAML) it gets a clear
        // 400 from the parser, and far past it the body is not even read.
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::spec::MAX_YAML + 1024,
        ))
        .with_state(app)
}

/// Whether the request comes from a page of another origin (a site the user visits).
fn cross_origin(h: &HeaderMap) -> Option<String> {
    if h.get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site" || v == "same-site")
    {
        return Some("the request comes from another site".into());
    }
    let origin = h.get(header::ORIGIN)?.to_str().unwrap_or("?");
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let own = [format!("http://{host}"), format!("https://{host}")];
    (!own.iter().any(|o| o == origin)).then(|| format!("origin {origin} is not this bot's"))
}

async fn guard(State(a): State<App>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !path.starts_with("/api/") {
        return next.run(req).await;
    }
    let h = req.headers();
    if let Some(token) = &a.token {
        let given = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compared in constant time: the token is a secret.
        let ok = given.is_some_and(|g| {
            g.len() == token.len()
                && g.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                    == 0
        });
        if !ok {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this bot needs its token: Authorization: Bearer <token> (tfgrid --bot-token or TFGRID_BOT_TOKEN)".into(),
            );
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        if let Some(why) = cross_origin(h) {
            return error(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!(
                    "refused: {why}; the bot takes changes only from its own dashboard and the CLI"
                ),
            );
        }
        if req.method() == Method::POST {
            let ct = h
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if !SPEC_TYPES.contains(&ct.as_str()) {
                return error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "content_type",
                    format!(
                        "send the spec as content-type application/yaml (got {:?})",
                        if ct.is_empty() { "none" } else { &ct }
                    ),
                );
            }
        }
    }
    next.run(req).await
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(serde_json::json!({"error": kind, "message": message})),
    )
        .into_response()
}

impl IntoResponse for BotError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            BotError::Spec(_) => (StatusCode::BAD_REQUEST, "spec"),
            BotError::NoFit(_) => (StatusCode::UNPROCESSABLE_ENTITY, "no_fit"),
            BotError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            BotError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            BotError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            BotError::Failed(_) => (StatusCode::BAD_GATEWAY, "failed"),
            BotError::Registry(_) => (StatusCode::BAD_GATEWAY, "registry"),
            BotError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        error(status, kind, self.to_string())
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn info(State(a): State<App>) -> Response {
    Json(serde_json::json!({"twin": a.bot.twin(), "registry": a.registry})).into_response()
}

async fn list(State(a): State<App>) -> Response {
    match a.bot.list() {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The body of a JSON deploy: `{"yaml": "..."}`.
#[derive(Deserialize)]
struct SpecBody {
    yaml: String,
}

/// The deploy runs as the bot's own task: a client that goes away does not cut it short (the
/// outcome is in the events and in `tfgrid ps`).
async fn create(State(a): State<App>, headers: HeaderMap, body: String) -> Response {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let yaml = if json {
        match serde_json::from_str::<SpecBody>(&body) {
            Ok(b) => b.yaml,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "spec",
                    format!("a JSON body is {{\"yaml\": \"<the spec>\"}}: {e}"),
                )
            }
        }
    } else {
        body
    };
    let bot = a.bot.clone();
    match tokio::spawn(async move { bot.deploy(&yaml).await }).await {
        Ok(Ok(r)) => (StatusCode::CREATED, Json(r)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the deploy task failed: {e}"),
        ),
    }
}

async fn inspect(State(a): State<App>, Path(name): Path<String>) -> Response {
    match a.bot.get(&name) {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

/// 200 when every contract is cancelled; 202 when some wait in the bot's queue for the registry.
async fn remove(State(a): State<App>, Path(name): Path<String>) -> Response {
    let bot = a.bot.clone();
    match tokio::spawn(async move { bot.remove(&name).await }).await {
        Ok(Ok(r)) if r.pending == 0 => (StatusCode::OK, Json(r)).into_response(),
        Ok(Ok(r)) => (StatusCode::ACCEPTED, Json(r)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the remove task failed: {e}"),
        ),
    }
}

#[derive(Deserialize)]
struct LogsQuery {
    service: Option<String>,
    #[serde(default)]
    replica: u32,
    tail: Option<u64>,
}

async fn logs(
    State(a): State<App>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    match a
        .bot
        .logs(&name, q.service.as_deref(), q.replica, q.tail)
        .await
    {
        Ok(t) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], t).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    since: u64,
    deployment: Option<String>,
}

async fn events(State(a): State<App>, Query(q): Query<EventsQuery>) -> Response {
    match a.bot.events(q.since, q.deployment.as_deref()) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn overlay(State(a): State<App>, Path(id): Path<u32>) -> Response {
    match a.bot.overlay(id).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Every storage pool: its health, slots, redundancy left, repair progress and events.
async fn storage(State(a): State<App>) -> Response {
    Json(a.bot.storage_pools()).into_response()
}

/// The S3 endpoint and the key pair for it (behind the API's guard like everything else).
async fn storage_credentials(State(a): State<App>) -> Response {
    Json(a.bot.storage_credentials()).into_response()
}

async fn networks(State(a): State<App>) -> Response {
    match a.bot.networks().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Joins one of the user's machines to a network: the body names its WireGuard public key (the
/// private key stays on that machine).
async fn network_access(
    State(a): State<App>,
    Path(name): Path<String>,
    body: Result<Json<crate::networks::AccessRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid", e.body_text()),
    };
    match a.bot.network_access(&name, &req).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The registry's node search, with the same filters (`free_mru`, `farm_ids`, `status`, ...).
async fn nodes(State(a): State<App>, RawQuery(q): RawQuery) -> Response {
    let path = format!("/nodes?{}", q.unwrap_or_default());
    match a.bot.registry().get_raw(&path).await {
        Err(e) => error(StatusCode::BAD_GATEWAY, "registry", e.to_string()),
        Ok((status, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    }
}
