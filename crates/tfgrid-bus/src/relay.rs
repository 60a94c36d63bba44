//! The relay: twins connect out to it over a websocket and prove who they are; it routes each
//! envelope to the destination's session, or to the relay the destination's registry record names.
//! It never sees inside a sealed payload, and every envelope it cannot deliver comes back to its
//! sender as a signed error, never silence.

use crate::envelope::{random_id, Body, Envelope, Header};
use crate::frame::{self, Frame};
use crate::twins::TwinCache;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tfgrid_core::{now_millis, Identity, TwinId};
use tfgrid_registry_client::RegistryClient;
use tokio::sync::{mpsc, watch};

/// Frames waiting for one connection. A full queue means that side is not keeping up: what is
/// routed to it then is refused with an error instead of piling up in the relay's memory.
pub const QUEUE: usize = 1024;
/// A connection must authenticate this soon after the challenge, or it is closed.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many connections may wait to authenticate at once; more are refused (503), so
/// unauthenticated sockets cannot hold the relay's memory.
pub const MAX_UNAUTHENTICATED: usize = 256;
/// Dialling another relay (TCP, websocket upgrade, challenge and auth) must finish this soon.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed dial, envelopes for that relay are refused at once for this long.
const DIAL_BACKOFF: Duration = Duration::from_secs(5);
/// The largest websocket message (an envelope); bus payloads are far smaller.
pub(crate) const MAX_MESSAGE: usize = 4 << 20;
/// Per-connection socket buffers: small, since most connections are idle twins.
pub(crate) const SOCKET_BUFFER: usize = 16 << 10;

pub struct RelayConfig {
    pub identity: Identity,
    pub twin: TwinId,
    /// The address twins put in their registry record to be reached through this relay.
    pub public_url: String,
    pub registry: RegistryClient,
    /// Diagnostics: a copy of every envelope the relay routes (what a relay operator can see).
    pub tap: Option<mpsc::UnboundedSender<Envelope>>,
}

type Sessions = HashMap<TwinId, Vec<(u64, mpsc::Sender<Frame>)>>;

/// The outcome of a dial, once there is one.
type DialOutcome = Option<Result<mpsc::Sender<Frame>, String>>;

enum Dial {
    InFlight(watch::Receiver<DialOutcome>),
    Failed(std::time::Instant),
}

/// What a caller of `link` does about a URL with no open link.
enum Claim {
    Lead(watch::Sender<DialOutcome>),
    Follow(watch::Receiver<DialOutcome>),
    Refuse(String),
}

struct Relay {
    cfg: RelayConfig,
    twins: TwinCache,
    /// Every session of each twin, oldest first: one key may be connected several times (a bot,
    /// and a `tfgrid bus ping` with the same key), and none takes over another.
    sessions: std::sync::RwLock<Sessions>,
    /// Open links to other relays.
    links: std::sync::Mutex<HashMap<String, mpsc::Sender<Frame>>>,
    /// Dials in flight (callers for the same URL wait for its outcome) and recent failures.
    /// No lock is held while a dial runs.
    dialing: std::sync::Mutex<HashMap<String, Dial>>,
    unauthenticated: Arc<tokio::sync::Semaphore>,
    stop: watch::Receiver<bool>,
}

/// Ends every session and link of a relay: serving stops when the router's server stops, but
/// upgraded websockets outlive it.
pub struct RelayStop(watch::Sender<bool>);

impl RelayStop {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

impl Drop for RelayStop {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn router(cfg: RelayConfig) -> (Router, RelayStop) {
    let twins = TwinCache::new(cfg.registry.clone());
    let (stop_tx, stop) = watch::channel(false);
    let relay = Arc::new(Relay {
        cfg,
        twins,
        sessions: Default::default(),
        links: Default::default(),
        dialing: Default::default(),
        unauthenticated: Arc::new(tokio::sync::Semaphore::new(MAX_UNAUTHENTICATED)),
        stop,
    });
    (
        Router::new()
            .route("/", get(upgrade))
            .route("/stats", get(stats))
            .with_state(relay),
        RelayStop(stop_tx),
    )
}

async fn upgrade(State(r): State<Arc<Relay>>, ws: WebSocketUpgrade) -> Response {
    let Ok(permit) = r.unauthenticated.clone().try_acquire_owned() else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_UNAUTHENTICATED} connections are waiting to authenticate; try again"),
        )
            .into_response();
    };
    ws.read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            if let Err(e) = r.session(socket, permit).await {
                tracing::debug!("relay session ended: {e}");
            }
        })
}

/// `GET /stats`: what the relay holds now, for its operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelayStats {
    /// Twins with at least one session.
    pub twins: usize,
    /// Sessions (one twin may be connected more than once).
    pub sessions: usize,
    /// Open links to other relays.
    pub links: usize,
}

async fn stats(State(r): State<Arc<Relay>>) -> axum::Json<RelayStats> {
    let (twins, sessions) = {
        let s = r.sessions.read().unwrap_or_else(|p| p.into_inner());
        (s.len(), s.values().map(Vec::len).sum())
    };
    let links = r.links.lock().unwrap_or_else(|p| p.into_inner()).len();
    axum::Json(RelayStats {
        twins,
        sessions,
        links,
    })
}

fn norm_url(u: &str) -> &str {
    u.trim_end_matches('/')
}

impl Relay {
    async fn session(
        self: Arc<Self>,
        ws: WebSocket,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), String> {
        let (mut sink, mut stream) = ws.split();
        let mut nonce = [0u8; 32];
        getrandom::getrandom(&mut nonce).map_err(|e| e.to_string())?;
        let challenge = Frame::Challenge {
            nonce,
            relay_twin: self.cfg.twin,
        };
        sink.send(Message::Binary(challenge.to_bytes().into()))
            .await
            .map_err(|e| e.to_string())?;
        let auth = tokio::time::timeout(AUTH_TIMEOUT, stream.next())
            .await
            .map_err(|_| "no auth in time".to_string())?;
        let twin = match auth {
            Some(Ok(Message::Binary(b))) => match Frame::from_bytes(&b) {
                Ok(Frame::Auth { twin, signature }) => {
                    let checked = tokio::time::timeout(
                        AUTH_TIMEOUT,
                        self.check_auth(twin, &nonce, &signature),
                    )
                    .await
                    .unwrap_or_else(|_| Err("the twin lookup timed out".into()));
                    match checked {
                        Ok(()) => twin,
                        Err(e) => {
                            let _ = sink
                                .send(Message::Binary(Frame::Denied(e.clone()).to_bytes().into()))
                                .await;
                            return Err(e);
                        }
                    }
                }
                _ => return Err("expected an auth frame".into()),
            },
            _ => return Err("connection closed before auth".into()),
        };
        drop(permit);
        let (tx, mut rx) = mpsc::channel::<Frame>(QUEUE);
        let session_id = random_id();
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(twin)
            .or_default()
            .push((session_id, tx.clone()));
        let _ = tx.send(Frame::Ready).await;
        tracing::debug!(twin, "twin connected");
        let writer = tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                if sink
                    .send(Message::Binary(f.to_bytes().into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let mut stop = self.stop.clone();
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(Ok(msg)) = msg else { break };
            let bytes = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            match Frame::from_bytes(&bytes) {
                Ok(Frame::Envelope(env)) => {
                    if env.header.src != twin {
                        let msg = format!(
                            "envelope claims source twin {} but this session is twin {twin}",
                            env.header.src
                        );
                        self.reply_error(&env, &msg, &tx);
                        continue;
                    }
                    self.clone().route(env, &tx).await;
                }
                // A relay passing on an envelope from one of its twins: the source is not this
                // session, so its signature is checked here before delivery.
                Ok(Frame::Forward(env)) => self.clone().accept_forward(env, twin, &tx).await,
                Ok(_) => tracing::debug!(twin, "unexpected frame ignored"),
                Err(e) => tracing::debug!(twin, "bad frame: {e}"),
            }
        }
        {
            let mut s = self.sessions.write().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = s.get_mut(&twin) {
                v.retain(|(id, _)| *id != session_id);
                if v.is_empty() {
                    s.remove(&twin);
                }
            }
        }
        writer.abort();
        Ok(())
    }

    async fn check_auth(
        &self,
        twin: TwinId,
        nonce: &[u8; 32],
        sig: &tfgrid_core::Signature,
    ) -> Result<(), String> {
        let record = self
            .twins
            .get(twin)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("twin {twin} is not registered"))?;
        frame::verify_auth(&record.public_key, nonce, twin, self.cfg.twin, sig)
            .map_err(|e| e.to_string())
    }

    /// Where an envelope for a local twin goes: a request to the twin's newest session (a
    /// restarted process takes over from a connection that may linger); an answer or error to
    /// every session, since only the one that asked is waiting for it and the others drop it.
    fn local(&self, env: &Envelope) -> Vec<mpsc::Sender<Frame>> {
        let s = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        let Some(v) = s.get(&env.header.dst) else {
            return Vec::new();
        };
        if env.header.reply_to.is_some() || matches!(env.body, Body::Error(_)) {
            v.iter().map(|(_, tx)| tx.clone()).collect()
        } else {
            v.last().map(|(_, tx)| tx.clone()).into_iter().collect()
        }
    }

    /// The signed error answering `env`, or `None` when `env` is itself an answer (answering
    /// answers would let two parties bounce errors forever).
    fn error_for(&self, env: &Envelope, msg: &str) -> Option<Envelope> {
        tracing::debug!(
            src = env.header.src,
            dst = env.header.dst,
            "undeliverable: {msg}"
        );
        if env.header.reply_to.is_some() || matches!(env.body, Body::Error(_)) {
            return None;
        }
        let header = Header {
            id: random_id(),
            src: self.cfg.twin,
            dst: env.header.src,
            cmd: env.header.cmd.clone(),
            expiry: now_millis() + 30_000,
            reply_to: Some(env.header.id),
        };
        Some(Envelope::new(
            &self.cfg.identity,
            header,
            Body::Error(format!("relay {}: {msg}", self.cfg.twin)),
        ))
    }

    /// Sends a signed error about `env` back to its source, over `back` (the connection it came in on).
    fn reply_error(&self, env: &Envelope, msg: &str, back: &mpsc::Sender<Frame>) {
        if let Some(err) = self.error_for(env, msg) {
            let _ = back.try_send(Frame::Envelope(err));
        }
    }

    async fn route(self: Arc<Self>, env: Envelope, back: &mpsc::Sender<Frame>) {
        if let Some(tap) = &self.cfg.tap {
            let _ = tap.send(env.clone());
        }
        if env.is_expired(now_millis()) {
            return self.reply_error(&env, "envelope expired before delivery", back);
        }
        let dst = env.header.dst;
        let to = self.local(&env);
        if !to.is_empty() {
            return self.deliver(env, &to, back);
        }
        let record = match self.twins.get(dst).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return self.reply_error(
                    &env,
                    &format!("destination twin {dst} does not exist"),
                    back,
                )
            }
            Err(e) => {
                return self.reply_error(&env, &format!("cannot look up twin {dst}: {e}"), back)
            }
        };
        if record.relay.is_empty() || norm_url(&record.relay) == norm_url(&self.cfg.public_url) {
            return self.reply_error(&env, &format!("twin {dst} is not connected"), back);
        }
        match self.link(&record.relay).await {
            Ok(link) => {
                if link.try_send(Frame::Forward(env.clone())).is_err() {
                    self.links
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&record.relay);
                    self.reply_error(
                        &env,
                        &format!("relay {} is not keeping up or went away", record.relay),
                        back,
                    );
                }
            }
            Err(e) => self.reply_error(
                &env,
                &format!("cannot reach relay {} of twin {dst}: {e}", record.relay),
                back,
            ),
        }
    }

    /// Delivers to each of `to` (one session for a request, all for an answer); the sender hears
    /// of a failure only when no session took it.
    fn deliver(&self, env: Envelope, to: &[mpsc::Sender<Frame>], back: &mpsc::Sender<Frame>) {
        let dst = env.header.dst;
        let mut why = None;
        let mut delivered = false;
        for tx in to {
            match tx.try_send(Frame::Envelope(env.clone())) {
                Ok(()) => delivered = true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    why = Some(format!(
                        "twin {dst} is not keeping up (its queue of {QUEUE} is full)"
                    ))
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    why.get_or_insert(format!("twin {dst} disconnected"));
                }
            }
        }
        if !delivered {
            if let Some(why) = why {
                self.reply_error(&env, &why, back);
            }
        }
    }

    /// `from_relay` is the twin of the relay at the other end of the link it came over.
    async fn accept_forward(
        self: Arc<Self>,
        env: Envelope,
        from_relay: TwinId,
        back: &mpsc::Sender<Frame>,
    ) {
        if let Some(tap) = &self.cfg.tap {
            let _ = tap.send(env.clone());
        }
        let key = match self.twins.get(env.header.src).await {
            Ok(Some(t)) => t.public_key,
            _ => return,
        };
        if env.verify(&key).is_err() {
            tracing::warn!(
                src = env.header.src,
                "forwarded envelope with a bad signature dropped"
            );
            return;
        }
        if env.is_expired(now_millis()) {
            return self.forward_error(&env, "envelope expired before delivery", back);
        }
        // The other relay could not deliver something one of our twins sent: our twins accept
        // answers only from the callee or from their own relay, so we sign the error ourselves.
        let env = match (&env.body, env.header.reply_to) {
            (Body::Error(msg), Some(req)) if env.header.src == from_relay => Envelope::new(
                &self.cfg.identity,
                Header {
                    id: random_id(),
                    src: self.cfg.twin,
                    dst: env.header.dst,
                    cmd: env.header.cmd.clone(),
                    expiry: env.header.expiry,
                    reply_to: Some(req),
                },
                Body::Error(msg.clone()),
            ),
            _ => env,
        };
        let to = self.local(&env);
        let dst = env.header.dst;
        if to.is_empty() {
            // Our own twin answering through this link, or an error for a twin of ours.
            return self.forward_error(&env, &format!("twin {dst} is not connected"), back);
        }
        let delivered = to
            .iter()
            .filter(|tx| tx.try_send(Frame::Envelope(env.clone())).is_ok())
            .count();
        if delivered == 0 {
            self.forward_error(
                &env,
                &format!("twin {dst} is not keeping up or disconnected"),
                back,
            );
        }
    }

    /// An error for an envelope that came over a relay link goes back over that link, to be
    /// delivered by the other relay to its twin.
    fn forward_error(&self, env: &Envelope, msg: &str, back: &mpsc::Sender<Frame>) {
        if let Some(err) = self.error_for(env, msg) {
            let _ = back.try_send(Frame::Forward(err));
        }
    }

    fn open_link(&self, url: &str) -> Option<mpsc::Sender<Frame>> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.get(url).filter(|l| !l.is_closed()).cloned()
    }

    /// The outbound link to another relay, opened on first use and authenticated as this relay's
    /// twin. One dial per URL at a time, run with no lock held (callers for the same URL wait for
    /// its outcome, others are not involved): a relay address that never answers (anyone can put
    /// one in their twin record) delays only envelopes to it, for at most DIAL_TIMEOUT, and then
    /// for DIAL_BACKOFF they are refused at once.
    async fn link(self: &Arc<Self>, url: &str) -> Result<mpsc::Sender<Frame>, String> {
        if let Some(l) = self.open_link(url) {
            return Ok(l);
        }
        let claim = {
            let mut d = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
            match d.get(url) {
                Some(Dial::Failed(at)) if at.elapsed() < DIAL_BACKOFF => Claim::Refuse(format!(
                    "the last dial failed {} ms ago; not retried yet",
                    at.elapsed().as_millis()
                )),
                Some(Dial::InFlight(rx)) => Claim::Follow(rx.clone()),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    d.insert(url.to_string(), Dial::InFlight(rx));
                    Claim::Lead(tx)
                }
            }
        };
        match claim {
            Claim::Refuse(why) => Err(why),
            Claim::Follow(mut rx) => {
                let waited =
                    tokio::time::timeout(DIAL_TIMEOUT * 2, rx.wait_for(|o| o.is_some())).await;
                match waited {
                    Ok(Ok(outcome)) => outcome.clone().expect("waited for an outcome"),
                    _ => Err("the dial in progress did not finish".into()),
                }
            }
            Claim::Lead(tx) => {
                let outcome = self.dial(url).await;
                {
                    let mut d = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
                    match &outcome {
                        Ok(_) => d.remove(url),
                        Err(_) => {
                            d.insert(url.to_string(), Dial::Failed(std::time::Instant::now()))
                        }
                    };
                }
                let _ = tx.send(Some(outcome.clone()));
                outcome
            }
        }
    }

    async fn dial(self: &Arc<Self>, url: &str) -> Result<mpsc::Sender<Frame>, String> {
        let dial = tokio::time::timeout(
            DIAL_TIMEOUT,
            crate::peer::open(url, &self.cfg.identity, self.cfg.twin),
        )
        .await;
        let (mut sink, mut stream, other) = match dial {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no answer within {} s", DIAL_TIMEOUT.as_secs())),
        };
        let (tx, mut rx) = mpsc::channel::<Frame>(QUEUE);
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                if sink
                    .send(tokio_tungstenite::tungstenite::Message::Binary(
                        f.to_bytes().into(),
                    ))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let me = self.clone();
        let back = tx.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = stream.next() => m,
                    _ = stop.wait_for(|s| *s) => None,
                };
                let Some(Ok(msg)) = msg else { break };
                if let tokio_tungstenite::tungstenite::Message::Binary(b) = msg {
                    if let Ok(Frame::Forward(env)) = Frame::from_bytes(&b) {
                        me.clone().accept_forward(env, other, &back).await;
                    }
                }
            }
        });
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(url.to_string(), tx.clone());
        Ok(tx)
    }
}
