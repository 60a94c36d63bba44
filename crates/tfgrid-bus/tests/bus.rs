//! Real relays and peers over loopback websockets, against a real registry.

use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tfgrid_bus::frame::Frame;
use tfgrid_bus::relay::{self, RelayConfig, RelayStop};
use tfgrid_bus::{Body, BusError, Envelope, Header, Peer, PeerConfig};
use tfgrid_core::records::{RegistryConfig, X25519Key};
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::{now_millis, Identity, TwinId};
use tfgrid_registry::Registry;
use tfgrid_registry_client::{RegistryClient, TwinSigner};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(5);

struct Net {
    registry: RegistryClient,
    _dir: tempfile::TempDir,
}

async fn registry() -> Net {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path(), RegistryConfig::default())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(reg.serve(listener, std::future::pending()));
    Net {
        registry: RegistryClient::new(&url),
        _dir: dir,
    }
}

async fn register(net: &Net, id: &Identity, relay: &str, enc_key: Option<X25519Key>) -> TwinId {
    let s = TwinSigner::new(id.clone(), net.registry.clone());
    match s
        .submit(Call::CreateTwin {
            relay: relay.into(),
            enc_key,
        })
        .await
        .unwrap()
        .outcome
    {
        Outcome::TwinCreated { twin_id } => twin_id,
        o => panic!("{o:?}"),
    }
}

struct RelayProc {
    url: String,
    addr: std::net::SocketAddr,
    stop: Option<RelayStop>,
    server: tokio::task::JoinHandle<()>,
}

impl RelayProc {
    fn shutdown(&mut self) {
        self.stop.take();
        self.server.abort();
    }
}

async fn serve_relay(
    net: &Net,
    id: &Identity,
    twin: TwinId,
    listener: tokio::net::TcpListener,
    tap: Option<mpsc::UnboundedSender<Envelope>>,
) -> RelayProc {
    let addr = listener.local_addr().unwrap();
    let url = format!("ws://{addr}/");
    let (router, stop) = relay::router(RelayConfig {
        identity: id.clone(),
        twin,
        public_url: url.clone(),
        registry: net.registry.clone(),
        tap,
    });
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    RelayProc {
        url,
        addr,
        stop: Some(stop),
        server,
    }
}

async fn start_relay(net: &Net, tap: Option<mpsc::UnboundedSender<Envelope>>) -> RelayProc {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let id = Identity::generate();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let twin = register(net, &id, &url, None).await;
    serve_relay(net, &id, twin, listener, tap).await
}

async fn peer(net: &Net, relay: &RelayProc) -> (Peer, Identity) {
    let id = Identity::generate();
    let enc = tfgrid_bus::crypto::EncKeys::derive(&id).public;
    let twin = register(net, &id, &relay.url, Some(enc)).await;
    let p = Peer::start(PeerConfig {
        identity: id.clone(),
        twin,
        relay_url: relay.url.clone(),
        registry: net.registry.clone(),
    });
    p.connected(T).await.unwrap();
    (p, id)
}

/// An `echo` handler that counts how often it ran.
fn counting_echo(p: &Peer) -> Arc<AtomicUsize> {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    p.handle("echo", move |_, payload| {
        r.fetch_add(1, Ordering::SeqCst);
        async move { Ok(payload) }
    });
    runs
}

fn echo(p: &Peer) {
    p.handle("echo", |_src, payload| async move {
        Ok(payload.to_ascii_uppercase())
    });
}

#[tokio::test]
async fn call_through_one_relay_is_sealed_end_to_end() {
    let net = registry().await;
    let (tap_tx, mut tap) = mpsc::unbounded_channel();
    let relay = start_relay(&net, Some(tap_tx)).await;
    let (a, _) = peer(&net, &relay).await;
    let (b, _) = peer(&net, &relay).await;
    echo(&b);
    let out = a
        .call(b.twin(), "echo", b"attack at dawn", T)
        .await
        .unwrap();
    assert_eq!(out, b"ATTACK AT DAWN");
    let back = b.call(a.twin(), "echo", b"x", T).await;
    assert!(
        matches!(back, Err(BusError::Remote(ref m)) if m.contains("no handler")),
        "{back:?}"
    );

    // What the relay saw: routing data in clear, payloads sealed.
    let req = tap.recv().await.unwrap();
    let resp = tap.recv().await.unwrap();
    assert_eq!(
        (req.header.src, req.header.dst, req.header.cmd.as_str()),
        (a.twin(), b.twin(), "echo")
    );
    assert_eq!(resp.header.reply_to, Some(req.header.id));
    for env in [&req, &resp] {
        match &env.body {
            Body::Sealed { ciphertext, .. } => {
                let bytes = env.to_bytes();
                for needle in [&b"attack at dawn"[..], b"ATTACK AT DAWN"] {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle),
                        "plaintext visible to the relay"
                    );
                }
                assert!(ciphertext.len() >= 14 + 16);
            }
            other => panic!("relay saw an unsealed body: {other:?}"),
        }
    }
}

#[tokio::test]
async fn typed_json_calls() {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Add {
        a: u32,
        b: u32,
    }
    let net = registry().await;
    let relay = start_relay(&net, None).await;
    let (a, _) = peer(&net, &relay).await;
    let (b, _) = peer(&net, &relay).await;
    b.handle_json("math.add", |_, req: Add| async move { Ok(req.a + req.b) });
    let sum: u32 = a
        .call_json(b.twin(), "math.add", &Add { a: 2, b: 40 }, T)
        .await
        .unwrap();
    assert_eq!(sum, 42);
    let e = a
        .call_json::<_, u32>(b.twin(), "math.add", &"not an Add", T)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BusError::Remote(m) if m.contains("math.add: bad request")),
        "{e:?}"
    );
}

#[tokio::test]
async fn call_through_two_federated_relays() {
    let net = registry().await;
    let r1 = start_relay(&net, None).await;
    let r2 = start_relay(&net, None).await;
    let (a, _) = peer(&net, &r1).await;
    let (b, _) = peer(&net, &r2).await;
    echo(&a);
    echo(&b);
    assert_eq!(
        a.call(b.twin(), "echo", b"over two relays", T)
            .await
            .unwrap(),
        b"OVER TWO RELAYS"
    );
    assert_eq!(
        b.call(a.twin(), "echo", b"and back", T).await.unwrap(),
        b"AND BACK"
    );
    for i in 0..50u32 {
        let msg = format!("m{i}");
        assert_eq!(
            a.call(b.twin(), "echo", msg.as_bytes(), T).await.unwrap(),
            msg.to_uppercase().as_bytes()
        );
    }
    // A twin registered at r2 but not connected: r2 answers through r1, signed by r1 for a.
    let ghost = register(&net, &Identity::generate(), &r2.url, None).await;
    let e = a.call(ghost, "echo", b"?", T).await.unwrap_err();
    assert!(
        matches!(&e, BusError::Remote(m) if m.contains("not connected")),
        "{e:?}"
    );
}

#[tokio::test]
async fn connected_reports_a_connection_made_before_anyone_asked() {
    let net = registry().await;
    let relay = start_relay(&net, None).await;
    let id = Identity::generate();
    let enc = tfgrid_bus::crypto::EncKeys::derive(&id).public;
    let twin = register(&net, &id, &relay.url, Some(enc)).await;
    let p = Peer::start(PeerConfig {
        identity: id,
        twin,
        relay_url: relay.url.clone(),
        registry: net.registry.clone(),
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.connected(Duration::from_millis(100)).await.unwrap();
}

#[tokio::test]
async fn undeliverable_calls_get_clear_errors() {
    let net = registry().await;
    let relay = start_relay(&net, None).await;
    let (a, _) = peer(&net, &relay).await;
    let ghost = register(&net, &Identity::generate(), &relay.url, None).await;
    let e = a.call(ghost, "echo", b"?", T).await.unwrap_err();
    assert!(
        matches!(&e, BusError::Remote(m) if m.contains(&format!("twin {ghost} is not connected"))),
        "{e:?}"
    );
    let e = a.call(9999, "echo", b"?", T).await.unwrap_err();
    assert!(
        matches!(&e, BusError::Remote(m) if m.contains("does not exist")),
        "{e:?}"
    );
}

/// A raw authenticated connection, to send what a well-behaved peer never would.
async fn raw(
    url: &str,
    id: &Identity,
    twin: TwinId,
) -> (
    impl SinkExt<Message> + Unpin,
    impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
) {
    let (sink, stream, _) = tfgrid_bus::peer::open(url, id, twin).await.unwrap();
    (sink, stream)
}

async fn next_envelope(
    stream: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Envelope {
    loop {
        let msg = tokio::time::timeout(T, stream.next())
            .await
            .expect("an answer")
            .unwrap()
            .unwrap();
        if let Message::Binary(b) = msg {
            if let Frame::Envelope(e) = Frame::from_bytes(&b).unwrap() {
                return e;
            }
        }
    }
}

fn header(src: TwinId, dst: TwinId, expiry: u64) -> Header {
    Header {
        id: tfgrid_bus::envelope::random_id(),
        src,
        dst,
        cmd: "echo".into(),
        expiry,
        reply_to: None,
    }
}

#[tokio::test]
async fn forged_wrong_source_expired_and_unknown_are_refused() {
    let net = registry().await;
    let relay = start_relay(&net, None).await;
    let (b, _) = peer(&net, &relay).await;
    let runs = counting_echo(&b);
    let mallory = Identity::generate();
    let m_twin = register(&net, &mallory, &relay.url, None).await;
    let (mut tx, mut rx) = raw(&relay.url, &mallory, m_twin).await;
    let send = |f: Frame| Message::Binary(f.to_bytes().into());
    let later = now_millis() + 10_000;

    // Wrong source: mallory claims to be b.
    let env = Envelope::new(
        &mallory,
        header(b.twin(), b.twin(), later),
        Body::Plain(b"hi".to_vec()),
    );
    let _ = tx.send(send(Frame::Envelope(env.clone()))).await;
    let err = next_envelope(&mut rx).await;
    assert_eq!(err.header.reply_to, Some(env.header.id));
    assert!(
        matches!(&err.body, Body::Error(m) if m.contains("claims source twin")),
        "{:?}",
        err.body
    );

    // Expired.
    let env = Envelope::new(
        &mallory,
        header(m_twin, b.twin(), now_millis() - 1),
        Body::Plain(b"hi".to_vec()),
    );
    let _ = tx.send(send(Frame::Envelope(env))).await;
    let err = next_envelope(&mut rx).await;
    assert!(
        matches!(&err.body, Body::Error(m) if m.contains("expired")),
        "{:?}",
        err.body
    );

    // Unknown destination.
    let env = Envelope::new(
        &mallory,
        header(m_twin, 4242, later),
        Body::Plain(b"hi".to_vec()),
    );
    let _ = tx.send(send(Frame::Envelope(env))).await;
    let err = next_envelope(&mut rx).await;
    assert!(
        matches!(&err.body, Body::Error(m) if m.contains("twin 4242 does not exist")),
        "{:?}",
        err.body
    );

    // Forged signature: b drops it unanswered, its handler never runs.
    let mut env = Envelope::new(
        &mallory,
        header(m_twin, b.twin(), later),
        Body::Plain(b"forged".to_vec()),
    );
    env.body = Body::Plain(b"tampered".to_vec());
    let _ = tx.send(send(Frame::Envelope(env))).await;
    // Sealed under a key that is not the one mallory shares with b: b drops it too.
    let stray = tfgrid_bus::crypto::EncKeys::derive(&Identity::generate());
    let wrong_key = stray.shared(&b.enc_key());
    let env = Envelope::sealed(
        header(m_twin, b.twin(), later),
        &wrong_key,
        b"sealed forgery",
    );
    let _ = tx.send(send(Frame::Envelope(env))).await;
    // A genuine one right after is served, so the forged ones were seen and dropped, not delayed.
    let env = Envelope::new(
        &mallory,
        header(m_twin, b.twin(), later),
        Body::Plain(b"genuine".to_vec()),
    );
    let _ = tx.send(send(Frame::Envelope(env.clone()))).await;
    let answer = next_envelope(&mut rx).await;
    assert_eq!(answer.header.reply_to, Some(env.header.id));
    assert_eq!(answer.body, Body::Plain(b"genuine".to_vec()));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Authentication: a key that is not the twin's, and a twin that does not exist.
    let e = tfgrid_bus::peer::open(&relay.url, &Identity::generate(), m_twin)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not verify"), "{e}");
    let e = tfgrid_bus::peer::open(&relay.url, &mallory, 7777)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("not registered"), "{e}");
}

#[tokio::test]
async fn replayed_envelopes_are_dropped() {
    let net = registry().await;
    let relay = start_relay(&net, None).await;
    let (b, _) = peer(&net, &relay).await;
    let runs = counting_echo(&b);
    let m = Identity::generate();
    let m_twin = register(&net, &m, &relay.url, None).await;
    let (mut tx, mut rx) = raw(&relay.url, &m, m_twin).await;
    let frame = |e: &Envelope| Message::Binary(Frame::Envelope(e.clone()).to_bytes().into());
    let once = Envelope::new(
        &m,
        header(m_twin, b.twin(), now_millis() + 10_000),
        Body::Plain(b"once".to_vec()),
    );
    let _ = tx.send(frame(&once)).await;
    let _ = tx.send(frame(&once)).await;
    let too_long = Envelope::new(
        &m,
        header(m_twin, b.twin(), now_millis() + 2 * 3_600_000),
        Body::Plain(b"forever".to_vec()),
    );
    let _ = tx.send(frame(&too_long)).await;
    let last = Envelope::new(
        &m,
        header(m_twin, b.twin(), now_millis() + 10_000),
        Body::Plain(b"last".to_vec()),
    );
    let _ = tx.send(frame(&last)).await;
    let mut answers = Vec::new();
    while answers.len() < 2 {
        let e = next_envelope(&mut rx).await;
        answers.push(e.header.reply_to);
    }
    assert!(answers.contains(&Some(once.header.id)) && answers.contains(&Some(last.header.id)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the replay and the over-long envelope never reached the handler"
    );
}

#[tokio::test]
async fn peers_reconnect_after_a_relay_restart() {
    let net = registry().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_id = Identity::generate();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let relay_twin = register(&net, &relay_id, &url, None).await;
    let mut relay = serve_relay(&net, &relay_id, relay_twin, listener, None).await;
    let (a, _) = peer(&net, &relay).await;
    let (b, _) = peer(&net, &relay).await;
    echo(&b);
    assert!(a.call(b.twin(), "echo", b"before", T).await.is_ok());

    relay.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = a
        .call(b.twin(), "echo", b"during", Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(
        matches!(e, BusError::NotConnected | BusError::Timeout(_)),
        "{e:?}"
    );

    let listener = tokio::net::TcpListener::bind(relay.addr).await.unwrap();
    let _relay2 = serve_relay(&net, &relay_id, relay_twin, listener, None).await;
    a.connected(T).await.unwrap();
    b.connected(T).await.unwrap();
    let mut ok = false;
    for _ in 0..50 {
        if a.call(b.twin(), "echo", b"after", T).await.as_deref() == Ok(b"AFTER") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "calls succeed again after the relay restart");
}

#[tokio::test]
async fn a_slow_consumer_does_not_stall_others() {
    let net = registry().await;
    let relay = start_relay(&net, None).await;
    let (a, _) = peer(&net, &relay).await;
    let (b, _) = peer(&net, &relay).await;
    echo(&b);
    // sloth authenticates and then never reads.
    let sloth = Identity::generate();
    let sloth_twin = register(&net, &sloth, &relay.url, None).await;
    let (_sloth_tx, _sloth_rx) = raw(&relay.url, &sloth, sloth_twin).await;
    // flood sends to sloth without waiting for answers, reading only the relay's errors.
    let flood = Identity::generate();
    let flood_twin = register(&net, &flood, &relay.url, None).await;
    let (mut ftx, mut frx) = raw(&relay.url, &flood, flood_twin).await;
    let big = vec![7u8; 32 * 1024];
    let sender = tokio::spawn(async move {
        for _ in 0..4000 {
            let env = Envelope::new(
                &flood,
                header(flood_twin, sloth_twin, now_millis() + 60_000),
                Body::Plain(big.clone()),
            );
            if ftx
                .send(Message::Binary(Frame::Envelope(env).to_bytes().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        ftx
    });
    let refusal = loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), frx.next())
            .await
            .expect("a refusal")
            .unwrap()
            .unwrap();
        if let Message::Binary(b) = msg {
            if let Frame::Envelope(e) = Frame::from_bytes(&b).unwrap() {
                break e;
            }
        }
    };
    assert!(
        matches!(&refusal.body, Body::Error(m) if m.contains("not keeping up")),
        "{:?}",
        refusal.body
    );
    // Meanwhile others are still served (a stalled relay would make these calls time out).
    for i in 0..20 {
        let out = a
            .call(b.twin(), "echo", format!("ping{i}").as_bytes(), T)
            .await
            .unwrap();
        assert_eq!(out, format!("PING{i}").as_bytes());
    }
    let _ = sender.await;
}

/// A twin whose record names a relay that accepts TCP and never answers: envelopes to it are
/// refused within the dial timeout (and at once after that), and meanwhile traffic between other
/// twins across the same relays goes on undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_address_that_never_answers_silences_nobody_else() {
    let net = registry().await;
    let r1 = start_relay(&net, None).await;
    let r2 = start_relay(&net, None).await;
    let (a, _) = peer(&net, &r1).await;
    let (b, _) = peer(&net, &r2).await;
    let (m, _) = peer(&net, &r1).await;
    echo(&b);
    // The black hole: accepts connections, reads nothing, says nothing.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_url = format!("ws://{}/", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let victim = register(&net, &Identity::generate(), &hole_url, None).await;
    // m keeps sending to the black hole while a and b talk across r1 and r2.
    let m2 = Arc::new(m);
    let sender = {
        let m = m2.clone();
        tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let first = m.call(victim, "echo", b"?", Duration::from_secs(20)).await;
            (first, t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..20u32 {
        let t0 = std::time::Instant::now();
        let out = a
            .call(b.twin(), "echo", format!("m{i}").as_bytes(), T)
            .await
            .unwrap();
        assert_eq!(out, format!("M{i}").as_bytes());
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "a call waited {:?} behind the black hole",
            t0.elapsed()
        );
    }
    let (first, took) = sender.await.unwrap();
    assert!(
        matches!(&first, Err(BusError::Remote(e)) if e.contains("cannot reach relay")),
        "{first:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Right after a failed dial, the next envelope is refused at once.
    let t0 = std::time::Instant::now();
    let again = m2.call(victim, "echo", b"?", T).await;
    assert!(again.is_err());
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

/// Two sessions of one twin (a bot and `tfgrid bus ping` with the same key): each gets the
/// answers to its own calls, and when one goes the other stays reachable.
#[tokio::test]
async fn two_sessions_of_one_twin_coexist() {
    let net = registry().await;
    let relay = start_relay(&net, None).await;
    let (first, id) = peer(&net, &relay).await;
    let (b, _) = peer(&net, &relay).await;
    echo(&b);
    echo(&first);
    let second = Peer::start(PeerConfig {
        identity: id.clone(),
        twin: first.twin(),
        relay_url: relay.url.clone(),
        registry: net.registry.clone(),
    });
    second.connected(T).await.unwrap();
    for _ in 0..5 {
        assert_eq!(
            first.call(b.twin(), "echo", b"one", T).await.unwrap(),
            b"ONE"
        );
        assert_eq!(
            second.call(b.twin(), "echo", b"two", T).await.unwrap(),
            b"TWO"
        );
    }
    drop(second);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The first session is still the twin's: calls to it and from it go through.
    assert_eq!(
        b.call(first.twin(), "echo", b"still", T).await.unwrap(),
        b"STILL"
    );
    assert_eq!(first.call(b.twin(), "echo", b"me", T).await.unwrap(), b"ME");
}

/// Connections that never authenticate are bounded and closed after the auth timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_bounded_and_time_out() {
    let net = registry().await;
    let relay = start_relay(&net, None).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..relay::MAX_UNAUTHENTICATED + 20 {
        match tokio_tungstenite::connect_async(&relay.url).await {
            Ok((ws, _)) => held.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 503);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(held.len(), relay::MAX_UNAUTHENTICATED);
    assert_eq!(refused, 20);
    // Each is closed by the relay once its time to authenticate is up.
    let mut closed = 0;
    for ws in held.iter_mut() {
        let end = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(Ok(m)) = ws.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
        if end.is_ok() {
            closed += 1;
        }
    }
    assert_eq!(closed, relay::MAX_UNAUTHENTICATED);
    // And the relay takes new twins again.
    let (p, _) = peer(&net, &relay).await;
    assert!(p.connected(T).await.is_ok());
}

#[tokio::test]
async fn notifications_are_one_way_sealed_and_unanswered() {
    let net = registry().await;
    let (tap_tx, mut tap) = mpsc::unbounded_channel();
    let relay = start_relay(&net, Some(tap_tx)).await;
    let (a, _) = peer(&net, &relay).await;
    let (b, _) = peer(&net, &relay).await;
    let (got_tx, mut got) = mpsc::unbounded_channel();
    b.on_notify("net.wg", move |src, payload| {
        let _ = got_tx.send((src, payload));
    });
    for i in 0..3u8 {
        a.notify(b.twin(), "net.wg", &[i; 100], T).await.unwrap();
    }
    // Each envelope is handled in its own task, so their order is not promised.
    let mut all = Vec::new();
    for _ in 0..3u8 {
        let (src, payload) = tokio::time::timeout(T, got.recv()).await.unwrap().unwrap();
        assert_eq!(src, a.twin());
        all.push(payload);
    }
    all.sort();
    assert_eq!(all, (0..3u8).map(|i| vec![i; 100]).collect::<Vec<_>>());
    // The relay carried three sealed envelopes and nothing came back.
    for _ in 0..3 {
        let env = tap.recv().await.unwrap();
        assert_eq!(env.header.src, a.twin());
        assert!(matches!(env.body, Body::Sealed { .. }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(tap.try_recv().is_err(), "a notification was answered");
    // A call to a one-way command gets no answer either (it times out).
    let r = a
        .call(b.twin(), "net.wg", b"x", Duration::from_millis(300))
        .await;
    assert!(matches!(r, Err(BusError::Timeout(_))), "{r:?}");
}

#[tokio::test]
async fn relay_stats_count_twins_and_sessions_as_they_come_and_go() {
    let net = registry().await;
    let relay = start_relay(&net, None).await;
    let stats = || async {
        reqwest::get(format!("http://{}/stats", relay.addr))
            .await
            .unwrap()
            .json::<tfgrid_bus::relay::RelayStats>()
            .await
            .unwrap()
    };
    let (a, id) = peer(&net, &relay).await;
    let (b, _) = peer(&net, &relay).await;
    // The same key twice is one twin with two sessions.
    let a2 = Peer::start(PeerConfig {
        identity: id,
        twin: a.twin(),
        relay_url: relay.url.clone(),
        registry: net.registry.clone(),
    });
    a2.connected(T).await.unwrap();
    let s = stats().await;
    assert_eq!((s.twins, s.sessions, s.links), (2, 3, 0));
    drop(b);
    drop(a2);
    let deadline = std::time::Instant::now() + T;
    loop {
        let s = stats().await;
        if (s.twins, s.sessions) == (1, 1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {s:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(a);
}
