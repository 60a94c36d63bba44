//! `tfgrid net ...`: run one overlay interface from a wg-quick file (what a node does for itself,
//! by hand), and make keys the way `wg genkey` / `wg pubkey` do.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tfgrid_bus::peer::ensure_registered;
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::Identity;
use tfgrid_net::{Config, Device, DeviceOptions, WgPublic, WgSecret};
use tfgrid_registry_client::{RegistryClient, TwinSigner};

#[derive(Subcommand)]
pub enum NetCmd {
    /// Bring up a userspace WireGuard interface from a wg-quick file and run it until stopped.
    Run(RunArgs),
    /// Print a new private key (base64, as `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (as `wg pubkey`).
    Pubkey,
}

#[derive(Args)]
pub struct RunArgs {
    /// wg-quick file: [Interface] PrivateKey, Address, ListenPort, MTU; [Peer] PublicKey,
    /// Endpoint, AllowedIPs, PersistentKeepalive.
    #[arg(long)]
    config: PathBuf,
    /// Interface name.
    #[arg(long, default_value = "tfg0")]
    name: String,
    /// Rewrite this file with the peers' state (JSON) every second.
    #[arg(long)]
    status: Option<PathBuf>,
    /// Relay (bus) URL: datagrams for peers that UDP does not reach go through it, sealed for
    /// the peer's twin. Needs --registry, --key and a --peer-twin for each such peer.
    #[arg(long, requires_all = ["registry", "key"])]
    relay: Option<String>,
    #[arg(long, env = "TFGRID_REGISTRY")]
    registry: Option<String>,
    /// This side's twin key (created if missing) for the bus.
    #[arg(long)]
    key: Option<PathBuf>,
    /// `PUBLIC_KEY=TWIN`: the twin that speaks for a peer's WireGuard key on the bus. Relayed
    /// datagrams are taken from a twin only as its own peer's.
    #[arg(long = "peer-twin", value_parser = parse_peer_twin)]
    peer_twins: Vec<(WgPublic, u32)>,
}

fn parse_peer_twin(s: &str) -> Result<(WgPublic, u32), String> {
    let (k, t) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("{s:?}: expected PUBLIC_KEY=TWIN"))?;
    let key: WgPublic = k.parse().map_err(|e| format!("{e}"))?;
    let twin = t.parse().map_err(|e| format!("twin {t:?}: {e}"))?;
    Ok((key, twin))
}

pub async fn run(cmd: NetCmd) -> Result<()> {
    match cmd {
        NetCmd::Genkey => {
            println!("{}", WgSecret::generate().to_base64());
            Ok(())
        }
        NetCmd::Pubkey => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            let k: WgSecret = s.parse()?;
            println!("{}", k.public());
            Ok(())
        }
        NetCmd::Run(a) => run_device(a).await,
    }
}

async fn run_device(a: RunArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let cfg = Config::parse(&text).with_context(|| format!("{}", a.config.display()))?;
    let dev = Device::start(DeviceOptions {
        name: a.name.clone(),
        secret: cfg.interface.private_key.clone(),
        listen: SocketAddr::from((
            Ipv4Addr::UNSPECIFIED,
            cfg.interface.listen_port.unwrap_or(0),
        )),
        addresses: cfg.interface.addresses.clone(),
        mtu: cfg.interface.mtu.unwrap_or(1420),
        routes: true,
    })?;
    for p in &cfg.peers {
        dev.set_peer(p)
            .with_context(|| format!("peer {}", p.public_key))?;
    }
    let dev = Arc::new(dev);
    let bus = match &a.relay {
        Some(relay) => Some(relay_path(&a, relay, &dev).await?),
        None => None,
    };
    println!(
        "tfgrid net: {} up, public key {}, UDP port {}, {} peers{}",
        dev.name(),
        dev.public_key(),
        dev.listen_port(),
        cfg.peers.len(),
        bus.as_ref()
            .map(|p| format!(", relay as twin {}", p.twin()))
            .unwrap_or_default()
    );
    let status = a.status.clone();
    let d2 = dev.clone();
    let writer = tokio::spawn(async move {
        let Some(path) = status else { return };
        loop {
            let json = serde_json::to_vec_pretty(&d2.peers()).expect("status is JSON");
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    crate::shutdown_signal().await;
    writer.abort();
    let _ = writer.await;
    dev.set_relay(None);
    drop(bus);
    // The device's threads stop and the interface goes with its file descriptor.
    drop(dev);
    Ok(())
}

/// Joins the bus and makes it the device's relayed path for the `--peer-twin` pairs.
async fn relay_path(a: &RunArgs, relay: &str, dev: &Arc<Device>) -> Result<Peer> {
    let (registry, key) = (
        a.registry.as_deref().context("--relay needs --registry")?,
        a.key.as_deref().context("--relay needs --key")?,
    );
    let (identity, _) = Identity::load_or_generate(key)?;
    let client = RegistryClient::new(registry);
    let twin = ensure_registered(&TwinSigner::new(identity.clone(), client.clone()), relay)
        .await
        .context("registering the twin")?;
    let peer = Peer::start(PeerConfig {
        identity,
        twin,
        relay_url: relay.to_string(),
        registry: client,
    });
    peer.connected(Duration::from_secs(10))
        .await
        .with_context(|| format!("connecting to the relay {relay}"))?;
    tfgrid_net::relay::attach(
        &peer,
        dev,
        Arc::new(tfgrid_net::relay::Fixed(a.peer_twins.clone())),
    );
    Ok(peer)
}
