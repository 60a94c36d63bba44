//! The bot's HTTP API (what the CLI and the dashboard use) and the dashboard itself. Errors are
//! JSON `{error, message}` with a status that says whose fault it is.

use crate::bot::{Bot, BotError};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Clone)]
struct App {
    bot: Arc<Bot>,
    http: reqwest::Client,
    registry: String,
}

pub fn router(bot: Arc<Bot>, registry_url: &str) -> Router {
    let app = App {
        bot,
        http: reqwest::Client::new(),
        registry: registry_url.trim_end_matches('/').to_string(),
    };
    Router::new()
        .route("/", get(dashboard))
        .route("/api/info", get(info))
        .route("/api/deployments", get(list).post(create))
        .route("/api/deployments/{name}", get(inspect).delete(remove))
        .route("/api/deployments/{name}/logs", get(logs))
        .route("/api/events", get(events))
        .route("/api/nodes", get(nodes))
        .with_state(app)
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

async fn create(State(a): State<App>, body: String) -> Response {
    match a.bot.deploy(&body).await {
        Ok(r) => (StatusCode::CREATED, Json(r)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn inspect(State(a): State<App>, Path(name): Path<String>) -> Response {
    match a.bot.get(&name) {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn remove(State(a): State<App>, Path(name): Path<String>) -> Response {
    match a.bot.remove(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
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

/// The registry's node search, with the same filters (`free_mru`, `farm_ids`, `status`, ...).
async fn nodes(State(a): State<App>, RawQuery(q): RawQuery) -> Response {
    let url = format!("{}/nodes?{}", a.registry, q.unwrap_or_default());
    match a.http.get(&url).send().await {
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "registry",
            format!("registry at {}: {e}", a.registry),
        ),
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = r.bytes().await.unwrap_or_default();
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    }
}
