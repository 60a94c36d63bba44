//! `tfgrid relay` and `tfgrid bus ...`: run a relay, and talk to twins by id from a terminal.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tfgrid_bus::peer::{ensure_registered, PING};
use tfgrid_bus::relay::{self, RelayConfig, RelayStop};
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::Identity;
use tfgrid_registry_client::{RegistryClient, TwinSigner};

#[derive(Args)]
pub struct RelayArgs {
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    #[arg(long, env = "TFGRID_REGISTRY", default_value = "http://127.0.0.1:8080")]
    registry: String,
    /// The relay's own key (created if missing); its twin signs the relay's error answers.
    #[arg(long, default_value_os_t = crate::default_key_dir().join("relay.key"))]
    key: PathBuf,
    /// The address twins reach this relay at, if not ws://<listen>/.
    #[arg(long)]
    public_url: Option<String>,
}

/// Binds, registers the relay's twin and serves until `stop` resolves.
pub async fn start_relay(
    listen: SocketAddr,
    public_url: Option<String>,
    key: &std::path::Path,
    registry: &str,
) -> Result<(String, u32, tokio::task::JoinHandle<()>, RelayStop)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the relay to {listen}"))?;
    let url = public_url
        .unwrap_or_else(|| format!("ws://{}/", listener.local_addr().expect("bound address")));
    let (identity, _) = Identity::load_or_generate(key)?;
    let client = RegistryClient::new(registry);
    let twin = ensure_registered(&TwinSigner::new(identity.clone(), client.clone()), &url)
        .await
        .context("registering the relay's twin")?;
    let (router, stop) = relay::router(RelayConfig {
        identity,
        twin,
        public_url: url.clone(),
        registry: client,
        tap: None,
    });
    let server = tokio::spawn(async move {
        use axum::serve::ListenerExt;
        // Small frames (calls, relayed datagrams) must not wait for Nagle's algorithm.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("relay stopped: {e}");
        }
    });
    Ok((url, twin, server, stop))
}

pub async fn relay(a: RelayArgs) -> Result<()> {
    let (url, twin, server, stop) =
        start_relay(a.listen, a.public_url, &a.key, &a.registry).await?;
    println!("relay listening on {url} (twin {twin})");
    crate::shutdown_signal().await;
    stop.stop();
    server.abort();
    Ok(())
}

#[derive(Args)]
pub struct BusOpts {
    #[arg(long, env = "TFGRID_KEY", default_value_os_t = crate::default_key_dir().join("key"))]
    key: PathBuf,
    #[arg(long, env = "TFGRID_REGISTRY", default_value = "http://127.0.0.1:8080")]
    registry: String,
    /// Your relay; your twin's registry record is pointed at it.
    #[arg(long, env = "TFGRID_RELAY", default_value = "ws://127.0.0.1:9000/")]
    relay: String,
}

#[derive(Subcommand)]
pub enum BusCmd {
    /// Round trip to a twin: every peer answers bus.ping.
    Ping {
        #[arg(long)]
        to: u32,
        #[arg(long, default_value_t = 3)]
        count: u32,
        #[command(flatten)]
        opts: BusOpts,
    },
    /// Call a command on a twin and print its answer.
    Call {
        #[arg(long)]
        to: u32,
        #[arg(long)]
        cmd: String,
        /// Payload, sent as its bytes (JSON by convention).
        #[arg(long, default_value = "{}")]
        data: String,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        #[command(flatten)]
        opts: BusOpts,
    },
    /// Stay connected and answer `echo` calls, printing each one.
    Listen {
        #[command(flatten)]
        opts: BusOpts,
    },
}

async fn connect(o: &BusOpts) -> Result<Peer> {
    let id = Identity::load(&o.key).context("run `tfgrid key new` to create a key")?;
    let signer = TwinSigner::new(id.clone(), RegistryClient::new(&o.registry));
    let twin = ensure_registered(&signer, &o.relay).await?;
    let peer = Peer::start(PeerConfig {
        identity: id,
        twin,
        relay_url: o.relay.clone(),
        registry: RegistryClient::new(&o.registry),
    });
    peer.connected(Duration::from_secs(10))
        .await
        .with_context(|| format!("connecting to the relay {}", o.relay))?;
    Ok(peer)
}

pub async fn bus(cmd: BusCmd) -> Result<()> {
    match cmd {
        BusCmd::Ping { to, count, opts } => {
            let peer = connect(&opts).await?;
            for _ in 0..count {
                let t = Instant::now();
                let out = peer.call(to, PING, b"", Duration::from_secs(5)).await?;
                println!(
                    "{} from twin {to}: {:.2} ms",
                    String::from_utf8_lossy(&out),
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            Ok(())
        }
        BusCmd::Call {
            to,
            cmd,
            data,
            timeout_ms,
            opts,
        } => {
            let peer = connect(&opts).await?;
            let out = peer
                .call(to, &cmd, data.as_bytes(), Duration::from_millis(timeout_ms))
                .await?;
            println!("{}", String::from_utf8_lossy(&out));
            Ok(())
        }
        BusCmd::Listen { opts } => {
            let peer = connect(&opts).await?;
            peer.handle("echo", |src, payload| async move {
                println!(
                    "echo from twin {src}: {}",
                    String::from_utf8_lossy(&payload)
                );
                Ok(payload)
            });
            println!(
                "twin {} listening on {} (answers echo and bus.ping); Ctrl-C to stop",
                peer.twin(),
                opts.relay
            );
            crate::shutdown_signal().await;
            Ok(())
        }
    }
}
