//! The gateway's HTTP reverse proxy: picks the route by the Host header and forwards to one of its
//! backends. Bodies stream both ways (a 400 MB download costs the gateway a few buffers, not
//! 400 MB); a backend that fails is marked down for a while, logged once, and the request goes to
//! the next one; clients that stall are cut off.

use super::gateway::Routes;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Request bodies up to this size are held so a failed backend can be retried on the next one;
/// larger ones stream to one backend.
const REPLAYABLE: usize = 1 << 20;
/// The most a request body may be.
const MAX_BODY: u64 = 1 << 30;
/// A backend must accept the connection within this (backends are one hop away).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// ... and answer with its headers within this.
const HEADERS_TIMEOUT: Duration = Duration::from_secs(30);
/// A backend streaming a body may pause this long between chunks.
const BACKEND_IDLE: Duration = Duration::from_secs(60);
/// A failed backend is skipped for this long before it is tried again.
const DOWN_FOR: Duration = Duration::from_secs(5);
/// A client must send its request head within this...
const CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// ... and may not stall a read or write on its connection longer than this (an idle
/// keep-alive connection is closed then too).
const CLIENT_IDLE: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct Proxy {
    routes: Routes,
    /// One client per source address: a backend in a private network is dialled from this
    /// node's address in that network (the network takes nothing from outside its range).
    http: Arc<Mutex<HashMap<Option<std::net::Ipv4Addr>, reqwest::Client>>>,
    /// Backends that failed, and until when they are skipped.
    down: Arc<Mutex<HashMap<String, Instant>>>,
}

fn client(source: Option<std::net::Ipv4Addr>) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(30))
        .local_address(source.map(std::net::IpAddr::V4))
        .build()
        .expect("reqwest client")
}

impl Proxy {
    fn http_for(&self, backend: &str) -> reqwest::Client {
        let source = self.routes.source_for(backend);
        self.http
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(source)
            .or_insert_with(|| client(source))
            .clone()
    }

    fn is_down(&self, b: &str) -> bool {
        let mut d = self.down.lock().unwrap_or_else(|p| p.into_inner());
        match d.get(b) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                d.remove(b);
                false
            }
            None => false,
        }
    }

    fn mark_down(&self, host: &str, b: &str, why: &str) {
        let mut d = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if d.insert(b.to_string(), Instant::now() + DOWN_FOR).is_none() {
            tracing::warn!(
                name = host,
                backend = b,
                "backend failed, skipped for {} s: {why}",
                DOWN_FOR.as_secs()
            );
        }
    }
}

pub fn router(routes: Routes) -> axum::Router {
    let proxy = Proxy {
        routes,
        http: Default::default(),
        down: Default::default(),
    };
    axum::Router::new()
        .fallback(proxy_request)
        .with_state(proxy)
}

/// Serves the proxy on `listener` until the task is dropped. hyper directly rather than
/// `axum::serve`, for the client-side limits: a deadline for the request head (slowloris) and
/// read/write timeouts on every connection (tokio-io-timeout).
pub async fn serve(listener: tokio::net::TcpListener, routes: Routes) {
    let app = router(routes);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("gateway accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut io = tokio_io_timeout::TimeoutStream::new(stream);
        io.set_read_timeout(Some(CLIENT_IDLE));
        io.set_write_timeout(Some(CLIENT_IDLE));
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut b =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            b.http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(CLIENT_HEADER_TIMEOUT);
            let io = hyper_util::rt::TokioIo::new(Box::pin(io));
            if let Err(e) = b.serve_connection(io, service).await {
                tracing::debug!("gateway connection: {e}");
            }
        });
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

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, keep_length: bool) {
    for (k, v) in from {
        if !HOP_BY_HOP.contains(&k.as_str())
            && k != header::HOST
            && (keep_length || k != header::CONTENT_LENGTH)
        {
            to.append(k.clone(), v.clone());
        }
    }
}

fn fail(status: StatusCode, msg: String) -> Response {
    (status, msg).into_response()
}

/// What goes to the backend: held bytes (can be sent again) or a stream (once).
enum Outgoing {
    Held(axum::body::Bytes),
    Stream(Option<Body>),
}

async fn proxy_request(State(p): State<Proxy>, req: Request) -> Response {
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
    let suffix = format!(".{}", p.routes.domain);
    let Some(name) = host.strip_suffix(&suffix) else {
        return fail(
            StatusCode::NOT_FOUND,
            format!(
                "{host} is not under this gateway's domain {}\n",
                p.routes.domain
            ),
        );
    };
    let route = p
        .routes
        .map
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .cloned();
    let Some(route) = route else {
        return fail(
            StatusCode::NOT_FOUND,
            format!("no service is named {host}\n"),
        );
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|x| x.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let (parts, body) = req.into_parts();
    let length: Option<u64> = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if length.is_some_and(|l| l > MAX_BODY) {
        return fail(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies are at most {MAX_BODY} bytes\n"),
        );
    }
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    let mut outgoing = if !chunked && length.unwrap_or(0) <= REPLAYABLE as u64 {
        match tokio::time::timeout(CLIENT_IDLE, axum::body::to_bytes(body, REPLAYABLE)).await {
            Ok(Ok(b)) => Outgoing::Held(b),
            Ok(Err(e)) => return fail(StatusCode::BAD_REQUEST, format!("request body: {e}\n")),
            Err(_) => {
                return fail(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive in time\n".into(),
                )
            }
        }
    } else {
        Outgoing::Stream(Some(body))
    };
    let mut headers = HeaderMap::new();
    copy_headers(
        &parts.headers,
        &mut headers,
        matches!(outgoing, Outgoing::Stream(_)),
    );
    if let Ok(v) = host.parse() {
        headers.insert(HeaderName::from_static("x-forwarded-host"), v);
    }

    // Round robin from the route's next backend; backends marked down are tried last.
    let n = route.backends.len();
    let start = route.next.fetch_add(1, Ordering::Relaxed);
    let mut order: Vec<&String> = (0..n).map(|i| &route.backends[(start + i) % n]).collect();
    order.sort_by_key(|b| p.is_down(b) || p.routes.health.is_down(b));
    let mut errors = Vec::new();
    for backend in order {
        let body = match &mut outgoing {
            Outgoing::Held(b) => reqwest::Body::from(b.clone()),
            Outgoing::Stream(s) => match s.take() {
                Some(b) => reqwest::Body::wrap_stream(b.into_data_stream()),
                // A streamed body went to a backend that failed: it cannot be sent again.
                None => break,
            },
        };
        let url = format!("{}{}", backend.trim_end_matches('/'), path);
        let send = p
            .http_for(backend)
            .request(parts.method.clone(), &url)
            .headers(headers.clone())
            .body(body)
            .send();
        let why = match tokio::time::timeout(HEADERS_TIMEOUT, send).await {
            Ok(Ok(r)) => return stream_back(r, backend.clone(), host.clone()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} s", HEADERS_TIMEOUT.as_secs()),
        };
        p.mark_down(&host, backend, &why);
        errors.push(format!("{backend}: {why}"));
    }
    tracing::warn!(name = %host, "no backend answered: {}", errors.join("; "));
    fail(
        StatusCode::BAD_GATEWAY,
        format!("no backend of {host} answered: {}\n", errors.join("; ")),
    )
}

/// The backend's answer, its body streamed through (a stall of BACKEND_IDLE ends it).
fn stream_back(r: reqwest::Response, backend: String, host: String) -> Response {
    let status = r.status();
    let mut out = HeaderMap::new();
    copy_headers(r.headers(), &mut out, true);
    let chunks = r.bytes_stream().map_err(std::io::Error::other);
    let idle = futures_util::stream::unfold(
        (Box::pin(chunks), backend, host),
        |(mut s, backend, host)| async move {
            match tokio::time::timeout(BACKEND_IDLE, futures_util::StreamExt::next(&mut s)).await {
                Ok(Some(item)) => {
                    if let Err(e) = &item {
                        tracing::warn!(name = %host, backend = %backend, "body cut off: {e}");
                    }
                    Some((item, (s, backend, host)))
                }
                Ok(None) => None,
                Err(_) => {
                    tracing::warn!(name = %host, backend = %backend, "body stalled; cut off");
                    Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the backend stalled",
                        )),
                        (s, backend, host),
                    ))
                }
            }
        },
    );
    let mut resp = Response::new(Body::from_stream(idle));
    *resp.status_mut() = status;
    *resp.headers_mut() = out;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn gateway(backends: Vec<String>) -> std::net::SocketAddr {
        let routes = Routes::fixed("gw.test", &[("app", backends)]);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, routes));
        addr
    }

    /// A raw HTTP/1.1 GET through the gateway; returns the stream after the request is sent.
    async fn get(gw: std::net::SocketAddr) -> tokio::net::TcpStream {
        let mut s = tokio::net::TcpStream::connect(gw).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: app.gw.test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        s
    }

    async fn read_all(mut s: tokio::net::TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A backend whose body comes in two parts, the second only when `go` fires.
    async fn two_part_backend(go: Arc<tokio::sync::Notify>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = axum::Router::new().fallback(move || {
            let go = go.clone();
            async move {
                let s = futures_util::stream::unfold(0, move |i| {
                    let go = go.clone();
                    async move {
                        match i {
                            0 => Some((Ok::<_, std::io::Error>("first part;".to_string()), 1)),
                            1 => {
                                go.notified().await;
                                Some((Ok("second part".to_string()), 2))
                            }
                            _ => None,
                        }
                    }
                });
                Body::from_stream(s)
            }
        });
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("http://{addr}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bodies_stream_through() {
        let go = Arc::new(tokio::sync::Notify::new());
        let backend = two_part_backend(go.clone()).await;
        let gw = gateway(vec![backend]).await;
        let mut s = get(gw).await;
        // The first part reaches the client while the backend still holds the rest: nothing
        // waits for the whole body.
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("first part;") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("the first part was held back")
                .unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(!String::from_utf8_lossy(&seen).contains("second part"));
        go.notify_one();
        let rest = read_all(s).await;
        assert!(rest.contains("second part"), "{rest}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_backend_is_skipped_and_the_next_one_answers() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let alive = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(l, axum::Router::new().fallback(|| async { "alive" })).await
        });
        // A port nothing listens on.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let gw = gateway(vec![dead.clone(), alive]).await;
        for i in 0..10 {
            let out = read_all(get(gw).await).await;
            assert!(out.starts_with("HTTP/1.1 200"), "request {i}: {out}");
            assert!(out.ends_with("alive"), "{out}");
        }
        // Every backend dead: 502 with each backend's reason.
        let gw = gateway(vec![dead.clone()]).await;
        let out = read_all(get(gw).await).await;
        assert!(out.starts_with("HTTP/1.1 502"), "{out}");
        assert!(out.contains(&dead), "{out}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_finishes_its_request_is_cut_off() {
        let gw = gateway(vec!["http://127.0.0.1:9".into()]).await;
        let mut s = tokio::net::TcpStream::connect(gw).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: app.gw")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            CLIENT_HEADER_TIMEOUT + Duration::from_secs(5),
            s.read(&mut buf),
        )
        .await
        .expect("the gateway kept a stalled client");
        // Closed (0 bytes, an error, or hyper's 408).
        match r {
            Ok(0) | Err(_) => {}
            Ok(n) => assert!(
                String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
                "{}",
                String::from_utf8_lossy(&buf[..n])
            ),
        }
        assert!(t0.elapsed() >= CLIENT_HEADER_TIMEOUT - Duration::from_secs(1));
    }
}
