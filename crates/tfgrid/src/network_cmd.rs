//! `tfgrid network`: the user's private networks, and joining one from this machine with
//! standard WireGuard. The machine's private key is made and kept here (never sent to the bot);
//! the bot registers its public key and says where to connect.

use crate::bot_cmd::{BotOpt, Client};
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use tfgrid_bot::networks::{Access, AccessRequest};
use tfgrid_core::network::Network;
use tfgrid_net::{Config, InterfaceConfig, PeerConfig};
use tfgrid_net::{WgPublic, WgSecret};

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Your networks: id, range, nodes, machines joined, service names.
    Ls {
        #[command(flatten)]
        opt: BotOpt,
    },
    /// Join this machine (or the one whose key you give) to a network: prints a wg-quick config
    /// for `wg-quick up` or `wg setconf`.
    Access {
        name: String,
        /// The machine's WireGuard private key; made (mode 0600) if the file does not exist.
        /// Default: ~/.tfgrid/network-NAME.key, so running this again gives the same address.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The node to connect through (default: a gateway node, which is public).
        #[arg(long)]
        node: Option<u32>,
        #[command(flatten)]
        opt: BotOpt,
    },
}

pub async fn network(cmd: NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Ls { opt } => ls(opt).await,
        NetworkCmd::Access {
            name,
            key,
            node,
            opt,
        } => access(opt, name, key, node).await,
    }
}

async fn ls(o: BotOpt) -> Result<()> {
    let c = Client::new(&o);
    let Some(v) = c.get_for_table(&o, "/api/networks").await? else {
        return Ok(());
    };
    let nets: Vec<Network> = serde_json::from_value(v)?;
    println!(
        "{:<4} {:<16} {:<18} {:<12} {:<9} HOSTS",
        "ID", "NAME", "RANGE", "NODES", "MACHINES"
    );
    for n in nets {
        let nodes: Vec<String> = n.nodes.iter().map(|x| x.to_string()).collect();
        let hosts: Vec<String> = n
            .hosts
            .iter()
            .map(|h| {
                let a: Vec<String> = h.addrs.iter().map(|a| a.to_string()).collect();
                format!("{}={}", h.name, a.join(","))
            })
            .collect();
        println!(
            "{:<4} {:<16} {:<18} {:<12} {:<9} {}",
            n.id,
            n.name,
            n.range.to_string(),
            nodes.join(","),
            n.access.len(),
            hosts.join(" ")
        );
    }
    Ok(())
}

fn load_or_make(path: &PathBuf) -> Result<WgSecret> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse()
            .with_context(|| format!("{}: not a WireGuard private key", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = WgSecret::generate();
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d).with_context(|| format!("{}", d.display()))?;
            }
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            writeln!(f, "{}", k.to_base64())?;
            Ok(k)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

async fn access(o: BotOpt, name: String, key: Option<PathBuf>, node: Option<u32>) -> Result<()> {
    let path = key.unwrap_or_else(|| crate::default_key_dir().join(format!("network-{name}.key")));
    let secret = load_or_make(&path)?;
    let c = Client::new(&o);
    let req = AccessRequest {
        public_key: secret.public().to_string(),
        node,
    };
    let v: serde_json::Value = c
        .post_json(&format!("/api/networks/{name}/access"), &req)
        .await?
        .json()
        .await?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let a: Access = serde_json::from_value(v)?;
    print!("{}", wg_quick(&a, secret)?);
    Ok(())
}

/// The machine's wg-quick file: its address, and the whole network through the node.
fn wg_quick(a: &Access, secret: WgSecret) -> Result<String> {
    let range: ipnet::IpNet = a.range.parse().context("the network's range")?;
    let cfg = Config {
        interface: InterfaceConfig {
            private_key: secret,
            addresses: vec![ipnet::IpNet::V4(ipnet::Ipv4Net::new(a.address, 32)?)],
            listen_port: None,
            mtu: Some(1420),
        },
        peers: vec![PeerConfig {
            public_key: WgPublic(a.node_key.0),
            endpoint: Some(a.endpoint),
            allowed_ips: vec![range],
            persistent_keepalive: Some(25),
        }],
    };
    let mut out = format!(
        "# network {} ({}): this machine is {}, through node {}\n",
        a.network, a.range, a.address, a.node_id
    );
    for h in &a.hosts {
        let addrs: Vec<String> = h.addrs.iter().map(|x| x.to_string()).collect();
        out.push_str(&format!("# {} = {}\n", h.name, addrs.join(", ")));
    }
    out.push_str(&cfg.to_string());
    Ok(out)
}
