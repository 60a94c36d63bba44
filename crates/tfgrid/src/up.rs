//! `tfgrid up`: a whole grid on this machine. The relay runs in this process; the registry, a local
//! image registry (Debian's docker-registry, with an example image), the node agents (one of them a
//! gateway) and your bot run as child processes with their logs in `<data>/logs` (each its own
//! process, so each can fail on its own as on separate machines). Ctrl-C stops
//! them all and the workloads the nodes ran; the data stays, and the next `up` brings it back.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::Identity;
use tfgrid_registry_client::{RegistryClient, TwinSigner};

#[derive(Args)]
pub struct UpArgs {
    /// Where the grid keeps its data, keys and logs.
    #[arg(long, default_value = "tfgrid-data")]
    data: PathBuf,
    /// Node agents to run (the last one is the gateway). They need root; 0 runs the rest.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// The registry (the first validator; the others listen on the following ports).
    #[arg(long, default_value = "127.0.0.1:8080")]
    registry_listen: SocketAddr,
    /// Registry validators: processes that replicate the registry with raft. With 3, any one
    /// of them can die and the grid goes on. Above 1, each runs on a public host of its own
    /// (`v1`, `v2`, ...) unless --one-host.
    #[arg(long, default_value_t = 1)]
    validators: u64,
    #[arg(long, default_value = "127.0.0.1:9000")]
    relay_listen: SocketAddr,
    /// Your bot's API and dashboard.
    #[arg(long, default_value = "127.0.0.1:8090")]
    bot_listen: SocketAddr,
    /// The S3 API of your storage pools (served by the bot).
    #[arg(long, default_value = "127.0.0.1:8333")]
    s3_listen: SocketAddr,
    /// The local image registry (the example image is pushed there).
    #[arg(long, default_value = "127.0.0.1:5000")]
    images_listen: SocketAddr,
    /// The gateway node's HTTP proxy; further gateways take the next ports.
    #[arg(long, default_value = "127.0.0.1:8000")]
    gateway_listen: SocketAddr,
    /// How many of the nodes (the last ones) are gateways.
    #[arg(long, default_value_t = 1)]
    gateways: u32,
    /// Names are served as <name>.<domain> by the gateway.
    #[arg(long, default_value = "gw.local")]
    domain: String,
    /// How long a node may miss uptime reports before the registry calls it down.
    #[arg(long, default_value_t = 30_000)]
    down_after_ms: u64,
    /// How often nodes write an uptime report to the ledger. The bot does not wait for the
    /// ledger to notice a dead node (it pings its nodes), so this is slow: the ledger grows by
    /// one entry per node per 10 s, not per second.
    #[arg(long, default_value_t = 10_000)]
    report_interval_ms: u64,
    /// Run every node on this machine's own network instead of a host of its own. By default
    /// each node is a separate host: a network namespace on a simulated WAN (198.18.x.0/24);
    /// hosts take turns being behind a NAT router, public with UDP blocked (so only the relay
    /// reaches it), public and behind another NAT, and gateways are public. The registry, relay
    /// and image registry then listen on this machine's address on that WAN, and the addresses
    /// above (registry, relay, images, gateways) forward to them, so they work as printed.
    #[arg(long)]
    one_host: bool,
}

/// Where each node runs in `--hosts` mode, and the machine's own address on the WAN.
struct Hosts {
    // Held for its drop: it kills what runs on the hosts and deletes their namespaces.
    lab: tfgrid_net::hosts::Lab,
    machine: std::net::Ipv4Addr,
    nodes: Vec<tfgrid_net::hosts::Host>,
    /// With `--validators` above 1, each validator's own public host (none: the registry
    /// runs on the machine).
    validators: Vec<tfgrid_net::hosts::Host>,
}

impl Hosts {
    fn make(a: &UpArgs) -> Result<Hosts> {
        use tfgrid_net::hosts::{HostKind, Lab};
        if let Some(why) = tfgrid_net::hosts::unavailable() {
            bail!("--hosts {why}");
        }
        let mut lab = Lab::new()?;
        let machine = lab.connect_machine()?;
        // A replicated registry is worth something only if its validators fail apart. They are
        // made first, so their addresses (which the cluster's membership records) do not move
        // when the grid is started again with another --nodes.
        let mut validators = Vec::new();
        if a.validators > 1 {
            for i in 1..=a.validators {
                validators.push(lab.add_host(&format!("v{i}"), HostKind::Public)?);
            }
        }
        let first_gateway = a.first_gateway();
        let mut nodes = Vec::new();
        for i in 1..=a.nodes {
            let kind = if i >= first_gateway {
                HostKind::Public
            } else {
                // The default three nodes: two replicas of the example, one behind NAT and
                // one that only the relay reaches, served by a public gateway.
                [
                    HostKind::Nat,
                    HostKind::UdpBlocked,
                    HostKind::Public,
                    HostKind::Nat,
                ][(i as usize - 1) % 4]
            };
            nodes.push(lab.add_host(&format!("n{i}"), kind)?);
        }
        Ok(Hosts {
            lab,
            machine,
            nodes,
            validators,
        })
    }

    /// `addr` moved onto the machine's WAN address (same port).
    fn on_machine(&self, addr: SocketAddr) -> SocketAddr {
        SocketAddr::new(self.machine.into(), addr.port())
    }
}

struct Proc {
    name: String,
    child: Child,
}

/// The addresses a user was given: registry, relay, images, gateway.
#[derive(Clone, Copy)]
struct Addrs {
    registry: SocketAddr,
    relay: SocketAddr,
    images: SocketAddr,
    gateway: SocketAddr,
}

impl UpArgs {
    /// The gateways are the last `--gateways` nodes (at least one).
    fn first_gateway(&self) -> u32 {
        self.nodes.saturating_sub(self.gateways.max(1)) + 1
    }

    fn clone_addrs(&self) -> Addrs {
        Addrs {
            registry: self.registry_listen,
            relay: self.relay_listen,
            images: self.images_listen,
            gateway: self.gateway_listen,
        }
    }
}

/// Forwards TCP connections to `listen` on to `to` (the machine's loopback to a host's address
/// on the simulated WAN). Both directions are copied as they come; the dial has a deadline.
async fn forward(listen: SocketAddr, to: SocketAddr) -> Result<tokio::task::JoinHandle<()>> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("forwarding {listen} to {to}: is another grid using it?"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(async move {
                let dial = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(to),
                );
                if let Ok(Ok(mut u)) = dial.await {
                    let _ = c.set_nodelay(true);
                    let _ = u.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
            });
        }
    }))
}

/// Starts `tfgrid args...` with stderr to `<logs>/<name>.log` and returns it with its first
/// stdout line (each command prints one when it is ready).
fn spawn(name: &str, args: &[String], logs: &Path) -> Result<(Proc, String)> {
    spawn_in(None, name, args, logs)
}

/// [`spawn`] on one of the lab's hosts.
fn spawn_in(
    host: Option<(&Hosts, &tfgrid_net::hosts::Host)>,
    name: &str,
    args: &[String],
    logs: &Path,
) -> Result<(Proc, String)> {
    let log = logs.join(format!("{name}.log"));
    let mut cmd = Command::new(std::env::current_exe()?);
    if let Some((h, host)) = host {
        h.lab.enter(host, &mut cmd)?;
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?,
        )
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .ok();
    if line.trim().is_empty() {
        let _ = child.wait();
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        bail!("{name} did not start: {last} (log: {})", log.display());
    }
    Ok((
        Proc {
            name: name.to_string(),
            child,
        },
        line.trim().to_string(),
    ))
}

fn terminate(procs: &mut Vec<Proc>) {
    for p in procs.iter() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let t0 = Instant::now();
    for p in procs.iter_mut() {
        while p.child.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if p.child.try_wait().ok().flatten().is_none() {
            tracing::warn!("{} did not stop on SIGTERM; killing it", p.name);
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
    procs.clear();
}

pub async fn up(mut a: UpArgs) -> Result<()> {
    let root = nix::unistd::geteuid().is_root();
    if a.gateways > a.nodes && a.nodes > 0 {
        bail!("--gateways {} is more than --nodes {}", a.gateways, a.nodes);
    }
    if a.nodes > 0 && !root {
        bail!(
            "tfgrid up runs node agents, and a node needs root: it makes network namespaces, \
             mounts overlay and ext4 filesystems and sets cgroup limits. Run it as root \
             (sudo), or with --nodes 0 for the registry, relay and bot alone."
        );
    }
    // What the user reaches things at; in multi-host mode these forward to the WAN addresses.
    let local = a.clone_addrs();
    let hosts = if !a.one_host && a.nodes > 0 {
        let h = Hosts::make(&a).context(
            "making the simulated hosts (network namespaces, nftables); --one-host runs every node on this machine's network",
        )?;
        a.registry_listen = h.on_machine(a.registry_listen);
        a.relay_listen = h.on_machine(a.relay_listen);
        a.images_listen = h.on_machine(a.images_listen);
        Some(h)
    } else {
        None
    };
    let data = std::path::absolute(&a.data)?;
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let (mut procs, url, registry_lines) = start_registry(&a, &data, &logs, hosts.as_ref())?;
    let (relay_url, relay_twin, relay_server, relay_stop) = match crate::bus_cmd::start_relay(
        a.relay_listen,
        None,
        &data.join("relay.key"),
        &url,
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            terminate(&mut procs);
            return Err(e);
        }
    };

    let key_path = data.join("user.key");
    let (id, created) = Identity::load_or_generate(&key_path)?;
    let client = RegistryClient::new(&url);
    let signer = TwinSigner::new(id, client.clone());
    let twin = match tfgrid_bus::peer::ensure_registered(&signer, &relay_url).await {
        Ok(t) => t,
        Err(e) => {
            terminate(&mut procs);
            return Err(anyhow::Error::from(e).context("registering your twin"));
        }
    };

    // Held until the grid stops: dropping it stops docker-registry.
    let mut oci = None;
    let result = start_children(
        &a,
        local,
        &data,
        &logs,
        &url,
        &relay_url,
        &signer,
        twin,
        &mut procs,
        &mut oci,
        hosts.as_ref(),
    )
    .await;
    let (images, mut node_lines, bot_url, bot_args) = match result {
        Ok(v) => v,
        Err(e) => {
            terminate(&mut procs);
            stop_nodes(&a, &data).await;
            drop(hosts);
            return Err(e);
        }
    };

    for (i, l) in registry_lines.into_iter().enumerate() {
        node_lines.insert(i, l);
    }
    let mut forwards = Vec::new();
    if let Some(h) = &hosts {
        let reg_addrs: Vec<Option<SocketAddr>> = url
            .split(',')
            .map(|u| u.trim_start_matches("http://").parse().ok())
            .collect();
        let relay_addr: Option<SocketAddr> = relay_url
            .trim_start_matches("ws://")
            .trim_end_matches('/')
            .parse()
            .ok();
        let first_gateway = a.first_gateway();
        // Validator i on the registry port + i - 1, as on the WAN.
        let mut pairs: Vec<(SocketAddr, Option<SocketAddr>)> = reg_addrs
            .iter()
            .enumerate()
            .map(|(i, to)| {
                let port = local.registry.port().checked_add(i as u16).unwrap_or(0);
                (SocketAddr::new(local.registry.ip(), port), *to)
            })
            .collect();
        pairs.extend([
            (local.relay, relay_addr),
            (local.images, Some(a.images_listen)),
        ]);
        for i in first_gateway..=a.nodes {
            let port = local.gateway.port() + (i - first_gateway) as u16;
            pairs.push((
                SocketAddr::new(local.gateway.ip(), port),
                Some(gateway_addr(&a, Some(h), i)),
            ));
        }
        for (from, to) in pairs {
            // Port 0 (tests) asks for no fixed address: nothing to forward.
            let (Some(to), true) = (to, from.port() != 0) else {
                continue;
            };
            match forward(from, to).await {
                Ok(t) => forwards.push(t),
                Err(e) => {
                    terminate(&mut procs);
                    stop_nodes(&a, &data).await;
                    return Err(e);
                }
            }
            node_lines.push(format!("{:<10} {from} -> {to}", "forward"));
        }
    }
    println!("tfgrid local grid is up");
    println!("  registry   {url}");
    println!("  relay      {relay_url}   (twin {relay_twin})");
    if let Some(img) = &images {
        println!("  images     {}   (example image {img})", a.images_listen);
    }
    println!(
        "  s3         http://{}   (storage: tfgrid storage create NAME --size 10G --shards 4+2; keys: tfgrid storage credentials)",
        a.s3_listen
    );
    for l in &node_lines {
        println!("  {l}");
    }
    if let Some(h) = &hosts {
        for (i, host) in h.nodes.iter().enumerate() {
            println!(
                "  host n{:<7} {:?} at {} (namespace {})",
                i + 1,
                host.kind,
                host.addr,
                host.ns
            );
        }
    }
    println!(
        "  your key   {} ({})",
        key_path.display(),
        if created { "new" } else { "existing" }
    );
    println!("  your twin  {twin}");
    println!("  dashboard  {bot_url}/");
    println!("  logs       {}", logs.display());
    println!();
    println!("Try:");
    if a.nodes > 0 {
        println!("  tfgrid deploy examples/web.yaml");
        println!(
            "  curl -H 'Host: web.{}' http://{}/",
            a.domain,
            if hosts.is_some() && local.gateway.port() != 0 {
                local.gateway
            } else {
                gateway_addr(&a, hosts.as_ref(), a.nodes)
            }
        );
        println!("  tfgrid ps; tfgrid events; tfgrid nodes");
        println!("  tfgrid deploy examples/vm.yaml   (the web service as a virtual machine)");
        println!("  tfgrid network access web   (a WireGuard config: join web's private network from here)");
    } else {
        println!("  tfgrid nodes   (this grid has no nodes: `tfgrid up` as root runs some)");
    }
    println!();
    println!(
        "Ctrl-C stops the grid; its data stays in {}.",
        data.display()
    );

    tokio::select! {
        _ = crate::shutdown_signal() => {}
        _ = watch_children(&mut procs, &bot_args, &logs) => {}
    }
    println!("stopping...");
    for f in forwards {
        f.abort();
    }
    terminate(&mut procs);
    stop_nodes(&a, &data).await;
    // Kills what is left in the hosts' namespaces and deletes them.
    drop(hosts);
    drop(oci);
    relay_stop.stop();
    relay_server.abort();
    println!("stopped");
    Ok(())
}

/// Starts the registry: one validator, or `--validators` of them founding a cluster (a key
/// they share in DATA/cluster.key, validator i on the registry port + i - 1, or any free port
/// when that is 0). On the lab's hosts each validator runs on its own public host (`v<i>`), so
/// one can fail apart from the others and from the machine. Returns their processes, the URLs
/// (comma-separated, as every client takes them) and a line per validator.
fn start_registry(
    a: &UpArgs,
    data: &Path,
    logs: &Path,
    hosts: Option<&Hosts>,
) -> Result<(Vec<Proc>, String, Vec<String>)> {
    let n = a.validators.max(1);
    let dir = |i: u64| {
        if i == 1 {
            data.join("registry")
        } else {
            data.join(format!("registry-{i}"))
        }
    };
    if n > 1 && dir(1).exists() && !dir(2).exists() {
        bail!(
            "{} holds a registry of one validator; run this grid with --validators 1 or use a new --data",
            dir(1).display()
        );
    }
    let mut common: Vec<String> = [
        "--down-after-ms",
        &a.down_after_ms.to_string(),
        "--report-interval-ms",
        &a.report_interval_ms.to_string(),
        // Addresses are host-wide while these hosts share one: each grid its own range.
        "--workload-range",
        &workload_range(data),
        "--network-range",
        &network_range(data),
        "--network-prefix-len",
        "22",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut listens = vec![a.registry_listen];
    if n > 1 {
        let key = data.join("cluster.key");
        tfgrid_registry::cluster::load_key(&key, true)
            .with_context(|| format!("making {}", key.display()))?;
        listens.clear();
        for i in 0..n {
            let listen = match hosts.and_then(|h| h.validators.get(i as usize)) {
                // Its own host: any port is free there.
                Some(host) => SocketAddr::new(
                    host.addr.into(),
                    match a.registry_listen.port() {
                        0 => 8080,
                        p => p + i as u16,
                    },
                ),
                None if a.registry_listen.port() == 0 => {
                    std::net::TcpListener::bind(SocketAddr::new(a.registry_listen.ip(), 0))?
                        .local_addr()?
                }
                None => {
                    SocketAddr::new(a.registry_listen.ip(), a.registry_listen.port() + i as u16)
                }
            };
            listens.push(listen);
        }
        let peers = listens
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{}=http://{l}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        common.extend([
            "--peers".into(),
            peers,
            "--cluster-key".into(),
            key.to_string_lossy().into_owned(),
        ]);
    }
    let mut procs = Vec::new();
    let mut urls = Vec::new();
    let mut lines = Vec::new();
    for (i, listen) in (1..=n).zip(&listens) {
        let mut args: Vec<String> = vec![
            "registry".into(),
            "--data".into(),
            dir(i).to_string_lossy().into_owned(),
            "--listen".into(),
            listen.to_string(),
            "--id".into(),
            i.to_string(),
        ];
        args.extend(common.iter().cloned());
        let name = if i == 1 {
            "registry".to_string()
        } else {
            format!("registry-{i}")
        };
        let host = hosts.and_then(|h| Some((h, h.validators.get(i as usize - 1)?)));
        let (p, line) = match spawn_in(host, &name, &args, logs) {
            Ok(v) => v,
            Err(e) => {
                terminate(&mut procs);
                return Err(e.context(format!("is another grid using {listen}?")));
            }
        };
        urls.push(
            line.strip_prefix("registry listening on ")
                .unwrap_or_default()
                .to_string(),
        );
        lines.push(format!("{:<10} pid {:<7} {line}", name, p.child.id()));
        procs.push(p);
    }
    Ok((procs, urls.join(","), lines))
}

/// Keeps the bot running: a bot that exits (or is killed) is started again, and carries on from
/// its persisted state. Nodes are not restarted: a dead node is what the bot heals around.
async fn watch_children(procs: &mut [Proc], bot_args: &[String], logs: &Path) {
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for p in procs.iter_mut().filter(|p| p.name == "bot") {
            if let Ok(Some(status)) = p.child.try_wait() {
                eprintln!("the bot exited ({status}); starting it again");
                match spawn("bot", bot_args, logs) {
                    Ok((np, line)) => {
                        eprintln!("bot pid {} {line}", np.child.id());
                        *p = np;
                    }
                    Err(e) => eprintln!("could not restart the bot: {e:#}"),
                }
            }
        }
    }
}

/// Where gateway node `i` listens: the first gateway on --gateway-listen, the next on the
/// following ports; in --hosts mode on the gateway's host address.
fn gateway_addr(a: &UpArgs, hosts: Option<&Hosts>, i: u32) -> SocketAddr {
    let first_gateway = a.first_gateway();
    let port = a.gateway_listen.port() + i.saturating_sub(first_gateway) as u16;
    match hosts {
        Some(h) => SocketAddr::new(h.nodes[i as usize - 1].addr.into(), port),
        None => SocketAddr::new(a.gateway_listen.ip(), port),
    }
}

/// A node's zdb port on its own host.
const ZDB_PORT: u16 = 9900;

fn node_dir(data: &Path, i: u32) -> PathBuf {
    data.join("nodes").join(format!("node{i}"))
}

/// Bridges and subnets are host-wide: derived from the data directory, so two grids on one host
/// (say, a test next to a demo) do not collide.
fn net_id(data: &Path) -> u32 {
    let h = blake3::hash(data.to_string_lossy().as_bytes());
    u32::from_le_bytes(h.as_bytes()[..4].try_into().expect("4 bytes"))
}

fn bridge(data: &Path, i: u32) -> String {
    format!("tfg{:06x}n{i}", net_id(data) & 0xff_ffff)
}

/// The registry gives node `id` the `(id - 1)`th /24 of this.
fn workload_range(data: &Path) -> String {
    format!("10.{}.0.0/16", 64 + net_id(data) % 128)
}

/// The users' networks: 64 of /22, each with 15 node subnets of /26 and one for their machines.
pub(crate) fn network_range(data: &Path) -> String {
    format!("10.{}.0.0/16", 192 + net_id(data) % 64)
}

async fn stop_nodes(a: &UpArgs, data: &Path) {
    for i in 1..=a.nodes {
        tfgrid_node::agent::stop_workloads(&node_dir(data, i), "runc", &bridge(data, i)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn start_children(
    a: &UpArgs,
    local: Addrs,
    data: &Path,
    logs: &Path,
    url: &str,
    relay_url: &str,
    signer: &TwinSigner,
    twin: u32,
    procs: &mut Vec<Proc>,
    oci: &mut Option<tfgrid_node::images::LocalRegistry>,
    hosts: Option<&Hosts>,
) -> Result<(Option<String>, Vec<String>, String, Vec<String>)> {
    let mut node_lines = Vec::new();
    let mut images = None;
    if a.nodes > 0 {
        // The example image, so `tfgrid deploy examples/web.yaml` works without the internet.
        match tfgrid_node::images::LocalRegistry::start_with(
            &data.join("images"),
            Some(a.images_listen),
            None,
            None,
        ) {
            Ok(reg) => {
                let img = tfgrid_node::images::push_busybox_image(
                    &reg.addr,
                    "web",
                    &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
                    "hello from tfgrid\n",
                )
                .await
                .map_err(anyhow::Error::msg)?;
                // Named as the user reaches it: hosts pull it through --registry-mirror.
                let img = match hosts {
                    Some(_) if local.images.port() != 0 => {
                        img.replacen(&reg.addr, &local.images.to_string(), 1)
                    }
                    _ => img,
                };
                images = Some(img);
                *oci = Some(reg);
            }
            Err(e) => eprintln!("no local image registry ({e}); images must come from elsewhere"),
        }
        let farms = signer.client().farms_of(twin).await?;
        let farm = match farms.iter().find(|f| f.name == "local") {
            Some(f) => f.id,
            None => match signer
                .submit(Call::CreateFarm {
                    name: "local".into(),
                    dedicated: false,
                })
                .await?
                .outcome
            {
                Outcome::FarmCreated { farm_id } => farm_id,
                o => bail!("create_farm answered {o:?}"),
            },
        };
        // Nodes share this host: each offers its share of memory, so the grid's total is true.
        let host = tfgrid_node::capacity::discover(data)?;
        let mru = host.offered().mru / u64::from(a.nodes);
        for i in 1..=a.nodes {
            // The last `gateways` nodes; the first of them listens on --gateway-listen.
            let first_gateway = a.first_gateway();
            let gateway = i >= first_gateway;
            let mut args: Vec<String> = [
                "node",
                "--registry",
                url,
                "--relay",
                relay_url,
                "--farm",
                &farm.to_string(),
                "--data",
                &node_dir(data, i).to_string_lossy(),
                "--bridge",
                &bridge(data, i),
                "--mru",
                &mru.to_string(),
                "--sru",
                "20G",
                "--hru",
                "20G",
                "--insecure-registry",
                &a.images_listen.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if gateway {
                args.extend([
                    "--domain".into(),
                    a.domain.clone(),
                    "--gateway-listen".into(),
                    gateway_addr(a, hosts, i).to_string(),
                ]);
            }
            if hosts.is_some() && local.images.port() != 0 {
                // The user's image names use this machine's loopback, which a host cannot reach.
                for from in [
                    local.images.to_string(),
                    format!("localhost:{}", local.images.port()),
                ] {
                    args.extend([
                        "--registry-mirror".into(),
                        format!("{from}={}", a.images_listen),
                    ]);
                }
            }
            let name = format!("node{i}");
            let host = hosts.map(|h| (h, &h.nodes[i as usize - 1]));
            if let Some((h, host)) = host {
                // Users' bots reach zdb namespaces at the host's WAN address (behind NAT, the
                // port its router forwards, as a farmer would set up).
                h.lab.forward_tcp(host, ZDB_PORT)?;
                args.extend([
                    "--zdb-listen".into(),
                    format!("0.0.0.0:{ZDB_PORT}"),
                    "--zdb-public".into(),
                    format!("{}:{ZDB_PORT}", host.wan_addr),
                ]);
            } else {
                args.extend(["--zdb-listen".into(), "127.0.0.1:0".into()]);
            }
            let (p, line) = spawn_in(host, &name, &args, logs)?;
            node_lines.push(format!("{:<10} pid {:<7} {}", name, p.child.id(), line));
            procs.push(p);
        }
    }
    let bot_args: Vec<String> = [
        "bot",
        "--registry",
        url,
        "--relay",
        relay_url,
        "--key",
        &data.join("user.key").to_string_lossy(),
        "--data",
        &data.join("bot").to_string_lossy(),
        "--listen",
        &a.bot_listen.to_string(),
        "--s3-listen",
        &a.s3_listen.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (p, line) = spawn("bot", &bot_args, logs)?;
    let bot_url = line
        .strip_prefix("bot listening on ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    node_lines.push(format!("{:<10} pid {:<7} {line}", "bot", p.child.id()));
    procs.push(p);
    Ok((images, node_lines, bot_url, bot_args))
}
