//! The gateway's backend health checks: every route's backends are dialled every 2 s (TCP, 1 s
//! deadline), so a backend that stopped answering is known before a request finds out, the proxy
//! tries it last, the change is logged once, and the deploying twin's bot can ask
//! (`gateway.backends`) and heal a replica its gateway cannot reach.

use super::gateway::Routes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tfgrid_core::node_api::BackendHealth;

const EVERY: Duration = Duration::from_secs(2);
const DIAL: Duration = Duration::from_secs(1);

struct State {
    up: bool,
    since: Instant,
    ever_up: bool,
    error: String,
}

#[derive(Clone, Default)]
pub struct Health {
    map: Arc<Mutex<HashMap<String, State>>>,
}

impl Health {
    /// Whether the last check of `backend` failed (unknown backends are not down).
    pub fn is_down(&self, backend: &str) -> bool {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(backend).is_some_and(|s| !s.up)
    }

    pub fn report(&self, backends: &[String]) -> Vec<BackendHealth> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        backends
            .iter()
            .map(|b| match m.get(b) {
                Some(s) => BackendHealth {
                    backend: b.clone(),
                    reachable: Some(s.up),
                    for_s: s.since.elapsed().as_secs_f64(),
                    ever_reachable: s.ever_up,
                    error: s.error.clone(),
                },
                None => BackendHealth {
                    backend: b.clone(),
                    reachable: None,
                    for_s: 0.0,
                    ever_reachable: false,
                    error: String::new(),
                },
            })
            .collect()
    }

    fn record(&self, backend: &str, result: Result<(), String>) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let up = result.is_ok();
        let error = result.err().unwrap_or_default();
        match m.get_mut(backend) {
            Some(s) if s.up == up => s.error = error,
            Some(s) => {
                if up {
                    tracing::info!(backend, "backend answers again");
                } else {
                    tracing::warn!(backend, "backend does not answer: {error}");
                }
                (s.up, s.since, s.error) = (up, Instant::now(), error);
                s.ever_up |= up;
            }
            None => {
                if !up {
                    tracing::warn!(backend, "backend does not answer: {error}");
                }
                m.insert(
                    backend.to_string(),
                    State {
                        up,
                        since: Instant::now(),
                        ever_up: up,
                        error,
                    },
                );
            }
        }
    }
}

/// Checks every backend of every route, forever.
pub async fn run(routes: Routes) {
    loop {
        let backends: Vec<String> = {
            let m = routes.map.read().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<String> = m.values().flat_map(|r| r.backends.clone()).collect();
            v.sort();
            v.dedup();
            v
        };
        routes
            .health
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|b, _| backends.contains(b));
        let checks = backends.iter().map(|b| {
            let source = routes.source_for(b);
            async move { (b, dial(b, source).await) }
        });
        for (b, r) in futures_util::future::join_all(checks).await {
            routes.health.record(b, r);
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// Dials from `source` when given (this node's address in the backend's network).
async fn dial(backend: &str, source: Option<std::net::Ipv4Addr>) -> Result<(), String> {
    let addr: std::net::SocketAddr = backend
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .map_err(|e| format!("{backend}: {e}"))?;
    let connect = async {
        let s = tokio::net::TcpSocket::new_v4()?;
        if let Some(ip) = source {
            s.bind(std::net::SocketAddr::new(ip.into(), 0))?;
        }
        s.connect(addr).await
    };
    match tokio::time::timeout(DIAL, connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", DIAL.as_secs())),
    }
}
