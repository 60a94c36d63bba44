//! `tfgrid net ...`: run one overlay interface from a wg-quick file (what a node does for itself,
//! by hand), and make keys the way `wg genkey` / `wg pubkey` do.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tfgrid_net::{Config, Device, DeviceOptions, WgSecret};

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
    println!(
        "tfgrid net: {} up, public key {}, UDP port {}, {} peers",
        dev.name(),
        dev.public_key(),
        dev.listen_port(),
        cfg.peers.len()
    );
    let status = a.status.clone();
    let dev = std::sync::Arc::new(dev);
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
    // The device's threads stop and the interface goes with its file descriptor.
    drop(dev);
    Ok(())
}
