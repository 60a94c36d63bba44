//! Gateway name proxies (gateway nodes only): one HTTP reverse proxy per node serving
//! `name.<domain>` to the workload's backends. Routes change live as workloads come and go; a
//! name is served only for the twin holding its name contract on the registry.

use super::{Ctx, Kind, Output, WorkloadId};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use tfgrid_core::deployment::{ResultState, WorkloadData};
use tfgrid_core::filter::ContractFilter;
use tfgrid_registry_client::RegistryClient;

/// Request bodies larger than this are refused: the proxy buffers a body before forwarding it.
const MAX_BODY: usize = 16 << 20;

struct Route {
    owner: WorkloadId,
    backends: Vec<String>,
    next: AtomicUsize,
}

#[derive(Clone)]
pub struct Routes {
    domain: String,
    map: Arc<RwLock<HashMap<String, Arc<Route>>>>,
    http: reqwest::Client,
}

pub struct Gateway {
    routes: Routes,
    registry: RegistryClient,
    /// The address people reach the proxy at, for the URL in results (`http://name.domain:port`).
    public_port: Option<u16>,
}

impl Gateway {
    pub fn new(domain: Option<String>, registry: RegistryClient, public_port: Option<u16>) -> Self {
        Self {
            routes: Routes {
                domain: domain.unwrap_or_default(),
                map: Default::default(),
                http: reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .expect("reqwest client"),
            },
            registry,
            public_port,
        }
    }

    pub fn routes(&self) -> Routes {
        self.routes.clone()
    }

    async fn holds_name(&self, twin: u32, name: &str) -> Result<(), String> {
        let f = ContractFilter {
            twin_id: Some(twin),
            kind: Some("name".into()),
            name: Some(name.into()),
            state: Some("live".into()),
            ..Default::default()
        };
        let cs = self
            .registry
            .contracts(&f)
            .await
            .map_err(|e| format!("checking the name contract: {e}"))?;
        if cs.iter().any(|c| c.is_live() && c.name() == Some(name)) {
            Ok(())
        } else {
            Err(format!(
                "twin {twin} holds no name contract for {name:?}; create one first"
            ))
        }
    }

    async fn make(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        let WorkloadData::GatewayNameProxy(g) = &ctx.workload.data else {
            return Err("not a gateway workload".into());
        };
        if self.routes.domain.is_empty() {
            return Err("this node is not a gateway (it has no domain)".into());
        }
        self.holds_name(ctx.deployment.twin_id, &g.name).await?;
        {
            let mut map = self.routes.map.write().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = map.get(&g.name) {
                if r.owner != ctx.id {
                    return Err(format!(
                        "{} is already served for workload {}",
                        g.name,
                        r.owner.key()
                    ));
                }
            }
            map.insert(
                g.name.clone(),
                Arc::new(Route {
                    owner: ctx.id.clone(),
                    backends: g.backends.clone(),
                    next: AtomicUsize::new(0),
                }),
            );
        }
        let fqdn = format!("{}.{}", g.name, self.routes.domain);
        let url = match self.public_port {
            Some(80) | None => format!("http://{fqdn}/"),
            Some(p) => format!("http://{fqdn}:{p}/"),
        };
        Ok([("fqdn".to_string(), fqdn), ("url".to_string(), url)].into())
    }
}

impl Kind for Gateway {
    async fn provision(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx).await
    }

    async fn deprovision(&self, id: &WorkloadId) -> Result<(), String> {
        self.routes
            .map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, r| r.owner != *id);
        Ok(())
    }

    async fn inspect(&self, id: &WorkloadId) -> (ResultState, String) {
        let map = self.routes.map.read().unwrap_or_else(|p| p.into_inner());
        if map.values().any(|r| r.owner == *id) {
            (ResultState::Ok, String::new())
        } else {
            (ResultState::Error, "no route".into())
        }
    }

    /// New backends replace the route at once; requests in flight finish on the old one.
    async fn update(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx).await
    }

    async fn recover(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx).await
    }
}

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !HOP_BY_HOP.contains(&k.as_str()) && k != header::HOST && k != header::CONTENT_LENGTH {
            to.append(k.clone(), v.clone());
        }
    }
}

fn fail(status: StatusCode, msg: String) -> Response {
    (status, msg).into_response()
}

/// The proxy: picks the route by the Host header and forwards the request to one backend
/// (round robin over the route's backends).
pub fn router(routes: Routes) -> axum::Router {
    axum::Router::new().fallback(proxy).with_state(routes)
}

async fn proxy(State(routes): State<Routes>, req: Request) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let host = host
        .split(':')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let suffix = format!(".{}", routes.domain);
    let Some(name) = host.strip_suffix(&suffix) else {
        return fail(
            StatusCode::NOT_FOUND,
            format!(
                "{host} is not under this gateway's domain {}\n",
                routes.domain
            ),
        );
    };
    let route = routes
        .map
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .cloned();
    let Some(route) = route else {
        return fail(
            StatusCode::NOT_FOUND,
            format!("no service is named {host}\n"),
        );
    };
    let backend =
        &route.backends[route.next.fetch_add(1, Ordering::Relaxed) % route.backends.len()];
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("{}{}", backend.trim_end_matches('/'), path);
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return fail(StatusCode::PAYLOAD_TOO_LARGE, format!("{e}\n")),
    };
    let mut headers = HeaderMap::new();
    copy_headers(&parts.headers, &mut headers);
    if let Ok(v) = host.parse() {
        headers.insert(HeaderName::from_static("x-forwarded-host"), v);
    }
    let resp = routes
        .http
        .request(parts.method, &url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    match resp {
        Err(e) => fail(
            StatusCode::BAD_GATEWAY,
            format!("backend {backend} did not answer: {e}\n"),
        ),
        Ok(r) => {
            let status = r.status();
            let mut out = HeaderMap::new();
            copy_headers(r.headers(), &mut out);
            match r.bytes().await {
                Ok(b) => {
                    let mut resp = Response::new(Body::from(b));
                    *resp.status_mut() = status;
                    *resp.headers_mut() = out;
                    resp
                }
                Err(e) => fail(StatusCode::BAD_GATEWAY, format!("backend {backend}: {e}\n")),
            }
        }
    }
}
