//! `tfgrid net ...`: run one overlay interface from a wg-quick file (what a node does for itself,
//! by hand), and make keys the way `wg genkey` / `wg pubkey` do.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::collections::HashMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tfgrid_bus::peer::ensure_registered;
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::Identity;
use tfgrid_net::{batch, Config, Device, DeviceOptions, RelaySink, WgPublic, WgSecret};
use tfgrid_registry_client::{RegistryClient, TwinSigner};

/// The bus command that carries WireGuard datagrams (one-way, sealed).
const WG_CMD: &str = "net.wg";
/// Datagrams waiting for the bus; past this they are dropped, as a full link drops them.
const RELAY_QUEUE: usize = 4096;

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

async fn send_batch(p: &Peer, twin: u32, b: &mut Vec<u8>) {
    if b.is_empty() {
        return;
    }
    if let Err(e) = p.notify(twin, WG_CMD, b, Duration::from_secs(5)).await {
        tracing::debug!("relaying {} bytes to twin {twin}: {e}", b.len());
    }
    b.clear();
}

/// Joins the bus and makes it the device's relayed path: datagrams for a peer go to its twin as
/// one-way sealed messages, and messages from a peer's twin are fed to the device as that peer's.
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
    let twin_of: HashMap<WgPublic, u32> = a.peer_twins.iter().copied().collect();
    let key_of: HashMap<u32, WgPublic> = a.peer_twins.iter().map(|(k, t)| (*t, *k)).collect();
    let d = dev.clone();
    peer.on_notify(WG_CMD, move |src, batch| {
        let (Some(k), Some(datagrams)) = (key_of.get(&src), batch::unpack(&batch)) else {
            return;
        };
        for datagram in datagrams {
            d.receive_relayed(*k, datagram);
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u32, Vec<u8>)>(RELAY_QUEUE);
    let sink: RelaySink = Arc::new(move |key, datagram| {
        if let Some(t) = twin_of.get(&key) {
            // Called on the data path: never wait for the bus.
            let _ = tx.try_send((*t, datagram.to_vec()));
        }
    });
    dev.set_relay(Some(sink));
    let p = peer.clone();
    tokio::spawn(async move {
        // What queued while the last message went out goes in the next, one batch per twin.
        let mut batches: Vec<(u32, Vec<u8>)> = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some((twin, datagram)) = next.take().or_else(|| rx.try_recv().ok()) {
                match batches.iter_mut().find(|(t, _)| *t == twin) {
                    Some((_, b)) => {
                        if !batch::push(b, &datagram) {
                            send_batch(&p, twin, b).await;
                            batch::push(b, &datagram);
                        }
                    }
                    None => {
                        let mut b = Vec::new();
                        batch::push(&mut b, &datagram);
                        batches.push((twin, b));
                    }
                }
                if batches.len() > 64 {
                    break;
                }
            }
            for (twin, b) in batches.iter_mut() {
                send_batch(&p, *twin, b).await;
            }
            batches.clear();
        }
    });
    Ok(peer)
}
