//! `tfgrid node`: run the node agent, or print the capacity it would offer.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tfgrid_core::capacity::human_bytes;
use tfgrid_node::agent::{self, NodeConfig};
use tfgrid_node::capacity::{self, parse_size};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    #[command(subcommand)]
    cmd: Option<NodeSub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum NodeSub {
    /// Print the capacity this host would offer (cores, memory, disk, GPUs) and exit.
    Capacity {
        #[arg(long, default_value = "/var/lib/tfgrid/node")]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    #[arg(long, env = "TFGRID_REGISTRY", default_value = "http://127.0.0.1:8080")]
    registry: String,
    #[arg(long, env = "TFGRID_RELAY", default_value = "ws://127.0.0.1:9000/")]
    relay: String,
    /// The farm this node belongs to.
    #[arg(long, default_value_t = 1)]
    farm: u32,
    /// Key, database, images, containers, volumes and zdb data live here.
    #[arg(long, default_value = "/var/lib/tfgrid/node")]
    data: PathBuf,
    /// Makes this a gateway node serving `name.<domain>`.
    #[arg(long)]
    domain: Option<String>,
    #[arg(long, default_value = "127.0.0.1:8000")]
    gateway_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9900")]
    zdb_listen: SocketAddr,
    /// The zdb address users are given for their namespaces, when it differs from
    /// --zdb-listen (e.g. the port your router forwards to it).
    #[arg(long)]
    zdb_public: Option<SocketAddr>,
    /// Linux bridge for this node's workloads (at most 15 characters).
    #[arg(long, default_value = "tfgrid0")]
    bridge: String,
    /// OCI runtime that runs containers (runc or crun), by name or path.
    #[arg(long, default_value = "runc")]
    oci_runtime: String,
    /// Registry (host:port) to pull images from over plain HTTP; repeatable.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// PEM file of a CA to trust for HTTPS image registries (besides the system's); repeatable.
    #[arg(long = "registry-ca")]
    registry_cas: Vec<PathBuf>,
    /// Basic-auth login for an image registry: host:port=user:password; repeatable.
    #[arg(
        long = "registry-login",
        env = "TFGRID_REGISTRY_LOGIN",
        value_delimiter = ','
    )]
    registry_logins: Vec<String>,
    /// Pull images of one registry from another: host:port=mirror-host:port; repeatable. The
    /// mirror is spoken to as the registry would be (HTTP if it is an --insecure-registry).
    #[arg(long = "registry-mirror")]
    registry_mirrors: Vec<String>,
    /// SSD capacity to offer instead of what discovery found (e.g. 20G).
    #[arg(long, value_parser = parse_size)]
    sru: Option<u64>,
    /// HDD capacity to offer instead of what discovery found.
    #[arg(long, value_parser = parse_size)]
    hru: Option<u64>,
    /// Memory to offer (at most what the host has).
    #[arg(long, value_parser = parse_size)]
    mru: Option<u64>,
    #[arg(long, default_value = "")]
    country: String,
    #[arg(long, default_value = "")]
    city: String,
    /// UDP address of the grid overlay (userspace WireGuard) that makes this node's workloads
    /// reachable from other hosts; port 0 picks one at first start and keeps it.
    #[arg(long, default_value = "0.0.0.0:0")]
    overlay_listen: SocketAddr,
    /// Run no overlay: workloads are reachable from this host only.
    #[arg(long)]
    no_overlay: bool,
    /// Endpoint (ip:port) to publish for the overlay instead of this host's addresses, e.g. a
    /// port forwarded on the router; repeatable.
    #[arg(long = "overlay-endpoint")]
    overlay_endpoints: Vec<SocketAddr>,
    /// Keep containers of private networks inside the grid: no MASQUERADE through this host to
    /// addresses outside it.
    #[arg(long)]
    no_masquerade: bool,
    /// How often uptime goes to the ledger (default: the registry's report_interval_ms).
    #[arg(long)]
    report_interval_ms: Option<u64>,
    /// How often the node looks for contracts cancelled on the registry.
    #[arg(long, default_value_t = agent::SWEEP_EVERY.as_millis() as u64)]
    sweep_interval_ms: u64,
    /// QEMU for VM workloads.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// The kernel image-mode VMs boot (default: the newest /boot/vmlinuz-* with modules).
    #[arg(long)]
    vm_kernel: Option<PathBuf>,
    /// A static busybox for the VMs' initramfs (Debian's busybox-static).
    #[arg(long, default_value = "/bin/busybox")]
    vm_busybox: PathBuf,
    /// VM acceleration: auto (KVM when it boots the kernel, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    vm_accel: String,
    /// Run N simulated nodes in this process instead of a real one: each registers, reports
    /// uptime, keeps a bus connection and runs the engine, but starts nothing on the host (see
    /// ARCHITECTURE.md). They offer --cru, --mru, --sru and --hru each, and live in memory.
    #[arg(long, value_name = "N")]
    simulate: Option<u32>,
    /// Cores each simulated node offers.
    #[arg(long, default_value_t = 16)]
    cru: u32,
}

fn logins(v: &[String]) -> Result<HashMap<String, (String, String)>> {
    v.iter()
        .map(|s| {
            let (host, cred) = s.split_once('=').with_context(|| {
                format!("--registry-login {s:?}: expected host:port=user:password")
            })?;
            let (u, p) = cred.split_once(':').with_context(|| {
                format!("--registry-login {s:?}: expected host:port=user:password")
            })?;
            Ok((host.to_string(), (u.to_string(), p.to_string())))
        })
        .collect()
}

pub async fn run(a: NodeArgs) -> Result<()> {
    if let Some(NodeSub::Capacity { data, json }) = a.cmd {
        let d = capacity::discover(&data)?;
        let o = d.offered();
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"discovered": d, "offered": o}))?
            );
            return Ok(());
        }
        println!("cores:   {}", d.cores);
        println!(
            "memory:  {} ({} kept for the host, {} offered)",
            human_bytes(d.memory),
            human_bytes(d.memory_reserved),
            human_bytes(o.mru)
        );
        println!(
            "disk:    {} {:?} on {} (under {})",
            human_bytes(d.disk.size),
            d.disk.kind,
            d.disk.device,
            d.disk.mount.display()
        );
        if d.gpus.is_empty() {
            println!("gpus:    none");
        }
        for g in &d.gpus {
            println!(
                "gpu:     {} {} ({})",
                g.vendor,
                g.model,
                human_bytes(g.memory)
            );
        }
        println!(
            "offered: cru {} mru {} sru {} hru {} gpu {}",
            o.cru,
            human_bytes(o.mru),
            human_bytes(o.sru),
            human_bytes(o.hru),
            o.gpu
        );
        return Ok(());
    }
    let r = a.run;
    if let Some(n) = r.simulate {
        return simulate(r, n).await;
    }
    let cfg = NodeConfig {
        registry: r.registry,
        relay: r.relay,
        farm: r.farm,
        data: r.data,
        domain: r.domain,
        gateway_listen: r.gateway_listen,
        zdb_listen: r.zdb_listen,
        zdb_public: r.zdb_public,
        bridge: r.bridge,
        oci_runtime: r.oci_runtime,
        insecure_registries: r.insecure_registries,
        registry_logins: logins(&r.registry_logins)?,
        registry_mirrors: r
            .registry_mirrors
            .iter()
            .map(|m| {
                m.split_once('=')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .with_context(|| {
                        format!("--registry-mirror {m:?}: expected host:port=host:port")
                    })
            })
            .collect::<Result<_>>()?,
        registry_cas: r.registry_cas,
        sru: r.sru,
        hru: r.hru,
        mru: r.mru,
        country: r.country,
        city: r.city,
        overlay_listen: (!r.no_overlay).then_some(r.overlay_listen),
        overlay_endpoints: r.overlay_endpoints,
        masquerade: !r.no_masquerade,
        report_every: r.report_interval_ms.map(Duration::from_millis),
        sweep_every: Duration::from_millis(r.sweep_interval_ms),
        vm: tfgrid_node::kinds::vm::VmOptions {
            qemu: r.qemu,
            kernel: r.vm_kernel,
            busybox: r.vm_busybox,
            accel: match r.vm_accel.as_str() {
                "kvm" => Some(tfgrid_node::kinds::vm::boot::Accel::Kvm),
                "tcg" => Some(tfgrid_node::kinds::vm::boot::Accel::Tcg),
                _ => None,
            },
        },
    };
    let node = agent::start(cfg).await.context("starting the node agent")?;
    println!(
        "node {} (twin {}) up; zdb on {}{}",
        node.node_id,
        node.twin_id,
        node.zdb.map(|a| a.to_string()).unwrap_or_default(),
        node.gateway
            .map(|g| format!("; gateway proxy on {g}"))
            .unwrap_or_default()
    );
    crate::shutdown_signal().await;
    Ok(())
}

/// How many simulated nodes start at once: enough to keep the registry's batches full.
const SIM_STARTS: usize = 128;

async fn simulate(r: RunArgs, n: u32) -> Result<()> {
    use futures::StreamExt;
    raise_open_files();
    let gib = 1u64 << 30;
    let cfg = tfgrid_node::sim::SimConfig {
        relay: r.relay,
        farm: r.farm,
        total: tfgrid_core::Capacity {
            cru: r.cru as u64,
            mru: r.mru.unwrap_or(64 * gib),
            sru: r.sru.unwrap_or(1024 * gib),
            hru: r.hru.unwrap_or(0),
            ..Default::default()
        },
        country: r.country,
        city: r.city,
        report_every: r.report_interval_ms.map(Duration::from_millis),
        sweep_every: Duration::from_millis(r.sweep_interval_ms),
    };
    let client = tfgrid_registry_client::RegistryClient::new(&r.registry);
    let t0 = std::time::Instant::now();
    let mut starts = futures::stream::iter(0..n)
        .map(|i| {
            let (cfg, client) = (&cfg, client.clone());
            async move { tfgrid_node::sim::start(cfg, client, i).await }
        })
        .buffer_unordered(SIM_STARTS);
    let mut nodes = Vec::with_capacity(n as usize);
    while let Some(node) = starts.next().await {
        nodes.push(node.context("starting a simulated node")?);
        if nodes.len() % 1000 == 0 {
            tracing::info!("{} of {n} simulated nodes up", nodes.len());
        }
    }
    drop(starts);
    let (lo, hi) = nodes.iter().fold((u32::MAX, 0), |(lo, hi), x| {
        (lo.min(x.node_id), hi.max(x.node_id))
    });
    // The line `tfgrid bench grid` waits for.
    println!(
        "{} simulated nodes up in {:.1} s (node ids {lo} to {hi})",
        nodes.len(),
        t0.elapsed().as_secs_f64()
    );
    crate::shutdown_signal().await;
    Ok(())
}

/// Each simulated node holds a relay connection: lift the soft limit on open files to the hard one.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!("raising the open-file limit to {hard}: {e}");
        }
    }
}
