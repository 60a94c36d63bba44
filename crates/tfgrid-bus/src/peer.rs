//! A twin on the bus: connects out to its relay (reconnecting with backoff), calls other twins by
//! id and serves the commands it has handlers for. Every incoming envelope's signature is checked
//! against the sender's registered key; bad ones are dropped and logged.

use crate::crypto::{EncKeys, SharedKey};
use crate::envelope::{random_id, Body, Envelope, Header};
use crate::error::BusError;
use crate::frame::{self, Frame};
use crate::twins::TwinCache;
use futures_util::future::BoxFuture;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tfgrid_core::{now_millis, Identity, TwinId};
use tfgrid_registry_client::RegistryClient;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Handles one command: gets the caller's twin and the payload, answers bytes or an error message.
pub type Handler =
    Arc<dyn Fn(TwinId, Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, String>> + Send + Sync>;

/// Takes a one-way message: the sender's twin and the payload. Nothing is answered.
pub type Notify = Arc<dyn Fn(TwinId, Vec<u8>) + Send + Sync>;

/// Connects to `url` and answers its challenge as `twin`. Returns the authenticated socket halves.
/// Also returns the relay's own twin id, which it signs its error envelopes with.
pub async fn open(
    url: &str,
    id: &Identity,
    twin: TwinId,
) -> Result<(SplitSink<Ws, Message>, SplitStream<Ws>, TwinId), BusError> {
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        // Small frames (calls, relayed datagrams) must not wait for Nagle's algorithm. Buffers
        // as small as the relay's: a node's connection is idle most of the time.
        tokio_tungstenite::connect_async_with_config(
            url,
            Some(
                tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                    .read_buffer_size(crate::relay::SOCKET_BUFFER)
                    .write_buffer_size(crate::relay::SOCKET_BUFFER)
                    .max_message_size(Some(crate::relay::MAX_MESSAGE))
                    .max_frame_size(Some(crate::relay::MAX_MESSAGE)),
            ),
            true,
        ),
    )
    .await
    .map_err(|_| BusError::Auth(format!("connect {url}: no answer within 5 s")))?
    .map_err(|e| BusError::Auth(format!("connect {url}: {e}")))?;
    let (mut sink, mut stream) = ws.split();
    let (nonce, relay_twin) = match next_frame(&mut stream).await? {
        Frame::Challenge { nonce, relay_twin } => (nonce, relay_twin),
        _ => return Err(BusError::Auth("relay did not send a challenge".into())),
    };
    let auth = frame::sign_auth(id, &nonce, twin, relay_twin);
    sink.send(Message::Binary(auth.to_bytes().into()))
        .await
        .map_err(|e| BusError::Auth(e.to_string()))?;
    match next_frame(&mut stream).await? {
        Frame::Ready => Ok((sink, stream, relay_twin)),
        Frame::Denied(why) => Err(BusError::Auth(format!("relay refused: {why}"))),
        _ => Err(BusError::Auth("unexpected answer to auth".into())),
    }
}

async fn next_frame(stream: &mut SplitStream<Ws>) -> Result<Frame, BusError> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Err(_) => {
                return Err(BusError::Auth(
                    "relay went quiet during the handshake".into(),
                ))
            }
            Ok(None) | Ok(Some(Err(_))) => return Err(BusError::NotConnected),
            Ok(Some(Ok(Message::Binary(b)))) => return Frame::from_bytes(&b),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Envelopes may not claim to stay valid longer than this: the replay memory keeps each one
/// until it expires, and this bounds that memory.
pub const MAX_TTL_MS: u64 = 3_600_000;

/// Every peer answers this with `pong`: a liveness probe by twin id.
pub const PING: &str = "bus.ping";

/// Makes sure `signer`'s twin exists and its registry record names `relay_url` and this key's
/// bus encryption key, so others can reach it and seal for it. Returns the twin id.
pub async fn ensure_registered(
    signer: &tfgrid_registry_client::TwinSigner,
    relay_url: &str,
) -> Result<TwinId, BusError> {
    let enc = EncKeys::derive(signer.identity()).public;
    let reg = |e: tfgrid_registry_client::ClientError| BusError::Registry(e.to_string());
    let acct = signer
        .client()
        .account(&signer.identity().public_key())
        .await
        .map_err(reg)?;
    let call = match acct.twin_id {
        None => tfgrid_core::tx::Call::CreateTwin {
            relay: relay_url.into(),
            enc_key: Some(enc),
        },
        Some(id) => {
            let t = signer.client().twin(id).await.map_err(reg)?;
            if t.relay == relay_url && t.enc_key == Some(enc) {
                return Ok(id);
            }
            tfgrid_core::tx::Call::UpdateTwin {
                relay: relay_url.into(),
                enc_key: Some(enc),
            }
        }
    };
    signer.submit(call).await.map_err(reg)?;
    signer
        .client()
        .account(&signer.identity().public_key())
        .await
        .map_err(reg)?
        .twin_id
        .ok_or_else(|| BusError::Registry("twin missing after create_twin".into()))
}

pub struct PeerConfig {
    pub identity: Identity,
    pub twin: TwinId,
    pub relay_url: String,
    pub registry: RegistryClient,
}

/// A call waiting for its answer: the twin it went to, and where its payload (or error) goes.
type Pending = (TwinId, oneshot::Sender<Result<Vec<u8>, BusError>>);

struct Inner {
    id: Identity,
    twin: TwinId,
    enc: EncKeys,
    relay_url: String,
    twins: TwinCache,
    out: Mutex<Option<mpsc::Sender<Frame>>>,
    relay_twin: Mutex<Option<TwinId>>,
    pending: Mutex<HashMap<u64, Pending>>,
    handlers: std::sync::RwLock<HashMap<String, Handler>>,
    notifies: std::sync::RwLock<HashMap<String, Notify>>,
    shared: Mutex<HashMap<TwinId, (tfgrid_core::records::X25519Key, SharedKey)>>,
    /// (source, id) of every envelope accepted and not yet expired: a second copy (a relay
    /// replaying it) is dropped.
    seen: Mutex<HashMap<(TwinId, u64), tfgrid_core::Millis>>,
    connected: watch::Sender<bool>,
}

#[derive(Clone)]
pub struct Peer {
    inner: Arc<Inner>,
    _stop: Arc<StopOnDrop>,
}

struct StopOnDrop(tokio::task::JoinHandle<()>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Peer {
    /// Starts the connection loop. The twin's registry record should name `relay_url` and this
    /// twin's encryption key ([`Peer::enc_key`]) so others can reach it and seal for it.
    pub fn start(cfg: PeerConfig) -> Self {
        let (connected, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            enc: EncKeys::derive(&cfg.identity),
            id: cfg.identity,
            twin: cfg.twin,
            relay_url: cfg.relay_url,
            twins: TwinCache::new(cfg.registry),
            out: Mutex::new(None),
            relay_twin: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            handlers: Default::default(),
            notifies: Default::default(),
            shared: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            connected,
        });
        let task = tokio::spawn(run(inner.clone()));
        let peer = Self {
            inner,
            _stop: Arc::new(StopOnDrop(task)),
        };
        peer.handle(PING, |_, _| async { Ok(b"pong".to_vec()) });
        peer
    }

    pub fn twin(&self) -> TwinId {
        self.inner.twin
    }

    pub fn enc_key(&self) -> tfgrid_core::records::X25519Key {
        self.inner.enc.public
    }

    /// Waits until the relay has accepted this twin (or `timeout` passes).
    pub async fn connected(&self, timeout: Duration) -> Result<(), BusError> {
        let mut rx = self.inner.connected.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .map_err(|_| BusError::NotConnected)?
            .map_err(|_| BusError::NotConnected)?;
        Ok(())
    }

    pub fn handle<F, Fut>(&self, cmd: &str, f: F)
    where
        F: Fn(TwinId, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Vec<u8>, String>> + Send + 'static,
    {
        let h: Handler = Arc::new(move |src, p| Box::pin(f(src, p)));
        self.inner
            .handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cmd.to_string(), h);
    }

    /// [`handle`](Self::handle) with JSON in and out: a payload that does not parse as `Req` is
    /// answered with an error naming the command and the parse failure.
    pub fn handle_json<Req, Resp, F, Fut>(&self, cmd: &str, f: F)
    where
        Req: serde::de::DeserializeOwned + Send + 'static,
        Resp: serde::Serialize + Send + 'static,
        F: Fn(TwinId, Req) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Resp, String>> + Send + 'static,
    {
        let f = Arc::new(f);
        let name = cmd.to_string();
        self.handle(cmd, move |src, payload| {
            let (f, name) = (f.clone(), name.clone());
            async move {
                let req: Req = serde_json::from_slice(&payload)
                    .map_err(|e| format!("{name}: bad request: {e}"))?;
                let resp = f(src, req).await?;
                serde_json::to_vec(&resp)
                    .map_err(|e| format!("{name}: cannot encode the answer: {e}"))
            }
        });
    }

    /// Takes one-way messages for `cmd` (see [`notify`](Self::notify)): authenticated like any
    /// envelope, never answered, not even with an error.
    pub fn on_notify<F>(&self, cmd: &str, f: F)
    where
        F: Fn(TwinId, Vec<u8>) + Send + Sync + 'static,
    {
        self.inner
            .notifies
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cmd.to_string(), Arc::new(f));
    }

    /// Sends a one-way message (sealed when `dst` has an encryption key; signed otherwise) valid
    /// for `ttl`. For traffic that carries its own acknowledgements, such as the overlay's
    /// relayed WireGuard datagrams: an answer per message would double the load.
    pub async fn notify(
        &self,
        dst: TwinId,
        cmd: &str,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<(), BusError> {
        let env = self.inner.request(dst, cmd, payload, ttl).await?;
        self.inner.send(Frame::Envelope(env)).await
    }

    /// [`call`](Self::call) with a JSON request and a typed JSON answer.
    pub async fn call_json<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        dst: TwinId,
        cmd: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, BusError> {
        let payload =
            serde_json::to_vec(req).map_err(|e| BusError::Malformed(format!("request: {e}")))?;
        let answer = self.call(dst, cmd, &payload, timeout).await?;
        serde_json::from_slice(&answer)
            .map_err(|e| BusError::Malformed(format!("answer to {cmd}: {e}")))
    }

    /// Calls `cmd` on twin `dst` and waits for its answer. The payload is sealed end to end when
    /// `dst` has published an encryption key.
    pub async fn call(
        &self,
        dst: TwinId,
        cmd: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, BusError> {
        let inner = &self.inner;
        let env = inner.request(dst, cmd, payload, timeout).await?;
        let id = env.header.id;
        let (tx, rx) = oneshot::channel();
        inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (dst, tx));
        let sent = inner.send(Frame::Envelope(env)).await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(timeout, rx).await,
            Err(e) => {
                inner
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Err(e);
            }
        };
        inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match answer {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BusError::NotConnected),
            Err(_) => Err(BusError::Timeout(timeout.as_millis() as u64)),
        }
    }
}

impl Inner {
    /// A new envelope from this twin to `dst`, valid for `ttl`: sealed when `dst` has published
    /// an encryption key, signed otherwise.
    async fn request(
        &self,
        dst: TwinId,
        cmd: &str,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<Envelope, BusError> {
        let key = self.shared_key(dst).await?;
        let header = Header {
            id: random_id(),
            src: self.twin,
            dst,
            cmd: cmd.to_string(),
            expiry: now_millis() + ttl.as_millis() as u64,
            reply_to: None,
        };
        Ok(match &key {
            Some(k) => Envelope::sealed(header, k, payload),
            None => Envelope::new(&self.id, header, Body::Plain(payload.to_vec())),
        })
    }

    async fn send(&self, f: Frame) -> Result<(), BusError> {
        let out = self
            .out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(BusError::NotConnected)?;
        out.send(f).await.map_err(|_| BusError::NotConnected)
    }

    /// The key shared with `other`, or `None` when `other` has published no encryption key.
    async fn shared_key(&self, other: TwinId) -> Result<Option<SharedKey>, BusError> {
        let record = self
            .twins
            .get(other)
            .await?
            .ok_or_else(|| BusError::Remote(format!("twin {other} does not exist")))?;
        let Some(theirs) = record.enc_key else {
            return Ok(None);
        };
        let mut cache = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, s)) = cache.get(&other) {
            if *k == theirs {
                return Ok(Some(s.clone()));
            }
        }
        let s = self.enc.shared(&theirs);
        cache.insert(other, (theirs, s.clone()));
        Ok(Some(s))
    }

    async fn incoming(self: Arc<Self>, env: Envelope) {
        let h = &env.header;
        if h.dst != self.twin {
            return tracing::warn!(dst = h.dst, "envelope for another twin dropped");
        }
        let key = match self.twins.get(h.src).await {
            Ok(Some(t)) => t.public_key,
            _ => return tracing::warn!(src = h.src, "envelope from an unknown twin dropped"),
        };
        if let Err(e) = env.verify(&key) {
            return tracing::warn!(src = h.src, "envelope dropped: {e}");
        }
        let now = now_millis();
        if env.is_expired(now) {
            return tracing::debug!(src = h.src, "expired envelope dropped");
        }
        if h.expiry > now + MAX_TTL_MS {
            return tracing::warn!(
                src = h.src,
                "envelope valid for more than {MAX_TTL_MS} ms dropped"
            );
        }
        // An unsigned sealed envelope is authentic only if it opens under the key we share with
        // its claimed source: open it before anything trusts it.
        let shared = match self.shared_key(h.src).await {
            Ok(k) => k,
            Err(e) => return tracing::warn!(src = h.src, "cannot authenticate: {e}"),
        };
        let opened = env.open(shared.as_ref());
        if matches!(env.body, Body::Sealed { .. }) && opened.is_err() {
            return tracing::warn!(
                src = h.src,
                "sealed envelope does not open under the key shared with its source; dropped"
            );
        }
        // Only authentic envelopes are remembered, so forgeries cannot fill this memory.
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.insert((h.src, h.id), h.expiry).is_some() {
                return tracing::warn!(src = h.src, id = h.id, "replayed envelope dropped");
            }
            if seen.len().is_multiple_of(4096) {
                seen.retain(|_, expiry| *expiry >= now);
            }
        }
        if let Some(req) = h.reply_to {
            let relay = *self.relay_twin.lock().unwrap_or_else(|p| p.into_inner());
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            // Only the callee, or our relay reporting it could not deliver, may answer a call.
            if pending
                .get(&req)
                .is_some_and(|(dst, _)| *dst == h.src || Some(h.src) == relay)
            {
                if let Some((_, tx)) = pending.remove(&req) {
                    let _ = tx.send(opened);
                }
            }
            return;
        }
        let notify = self
            .notifies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&h.cmd)
            .cloned();
        if let Some(f) = notify {
            if let Ok(payload) = opened {
                f(h.src, payload);
            }
            return;
        }
        let handler = self
            .handlers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&h.cmd)
            .cloned();
        let key = match self.shared_key(h.src).await {
            Ok(k) => k,
            Err(e) => return tracing::warn!(src = h.src, "cannot answer: {e}"),
        };
        let sealed = matches!(env.body, Body::Sealed { .. });
        let result = match (handler, env.open(key.as_ref())) {
            (None, _) => Err(format!("twin {} has no handler for {:?}", self.twin, h.cmd)),
            (_, Err(e)) => Err(e.to_string()),
            (Some(handler), Ok(payload)) => handler(h.src, payload).await,
        };
        let header = Header {
            id: random_id(),
            src: self.twin,
            dst: h.src,
            cmd: h.cmd.clone(),
            expiry: h.expiry,
            reply_to: Some(h.id),
        };
        let reply = match (result, key) {
            (Ok(p), Some(k)) if sealed => Envelope::sealed(header, &k, &p),
            (Ok(p), _) => Envelope::new(&self.id, header, Body::Plain(p)),
            (Err(e), _) => Envelope::new(&self.id, header, Body::Error(e)),
        };
        let _ = self.send(Frame::Envelope(reply)).await;
    }
}

async fn run(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match open(&inner.relay_url, &inner.id, inner.twin).await {
            Ok((mut sink, mut stream, relay_twin)) => {
                backoff = Duration::from_millis(50);
                *inner.relay_twin.lock().unwrap_or_else(|p| p.into_inner()) = Some(relay_twin);
                let (tx, mut rx) = mpsc::channel::<Frame>(crate::relay::QUEUE);
                *inner.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
                inner.connected.send_replace(true);
                tracing::debug!(twin = inner.twin, "connected to {}", inner.relay_url);
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
                while let Some(Ok(msg)) = stream.next().await {
                    if let Message::Binary(b) = msg {
                        match Frame::from_bytes(&b) {
                            Ok(Frame::Envelope(env)) => {
                                tokio::spawn(inner.clone().incoming(env));
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!("bad frame from relay: {e}"),
                        }
                    }
                }
                writer.abort();
                *inner.out.lock().unwrap_or_else(|p| p.into_inner()) = None;
                inner.connected.send_replace(false);
                // Calls in flight cannot be answered on a new connection: fail them now.
                inner
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                tracing::info!(
                    twin = inner.twin,
                    "lost the relay {}; reconnecting",
                    inner.relay_url
                );
            }
            Err(e) => tracing::debug!(
                twin = inner.twin,
                "relay {} unreachable: {e}",
                inner.relay_url
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
