//! Benchmarks of the bot over a real local grid, and of its scheduler alone:
//! - `tfgrid bench scheduler`: placements per second over many simulated nodes;
//! - `tfgrid bench deploy`: the bot API's deploy (contract, bus, container running) with a cached
//!   image, to the answer that says every workload is ok;
//! - `tfgrid bench heal`: a node dies (its agent and its containers, as a machine losing power);
//!   the time until the service answers through its gateway name from another node.

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tfgrid_bot::bot::{Bot, BotConfig};
use tfgrid_bot::scheduler::{Candidate, Scheduler, Want};
use tfgrid_core::capacity::{GIB, MIB};
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::{Capacity, Identity};
use tfgrid_node::images::{push_busybox_image, LocalRegistry};
use tfgrid_registry::{Registry, RegistryConfig};
use tfgrid_registry_client::{RegistryClient, TwinSigner};

#[derive(Args)]
pub struct SchedulerBench {
    #[arg(long, default_value_t = 100_000)]
    nodes: u32,
    #[arg(long, default_value_t = 200_000)]
    placements: u32,
}

#[derive(Args)]
pub struct DeployBench {
    #[arg(long, default_value_t = 30)]
    deploys: usize,
}

#[derive(Args)]
pub struct HealBench {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The registry's down_after_ms: how long a node may be silent before it counts as down.
    #[arg(long, default_value_t = 3000)]
    down_after_ms: u64,
    /// How often nodes write uptime to the ledger. With a slow period (say 20000, down after
    /// 60000) the heal comes from the bot's pings alone.
    #[arg(long, default_value_t = 1000)]
    report_interval_ms: u64,
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// A farm named `name`, owned by a twin made for it.
pub async fn new_farm(client: &RegistryClient, name: &str) -> Result<tfgrid_core::FarmId> {
    let farmer = TwinSigner::new(Identity::generate(), client.clone());
    farmer.ensure_twin("").await?;
    match farmer
        .submit(Call::CreateFarm {
            name: name.into(),
            dedicated: false,
        })
        .await?
        .outcome
    {
        Outcome::FarmCreated { farm_id } => Ok(farm_id),
        o => bail!("create_farm answered {o:?}"),
    }
}

pub fn scheduler(b: SchedulerBench) -> Result<()> {
    let countries = ["BE", "EG", "DE", "AT", "TZ", "IN", "US", "BR"];
    // A grid with every load level: free memory from 0 to all of it, in 200 farms.
    let nodes = (1..=b.nodes).map(|id| {
        let total = Capacity {
            cru: 8 + u64::from(id % 4) * 8,
            mru: 32 * GIB,
            sru: 512 * GIB,
            hru: 4096 * GIB,
            ..Default::default()
        };
        let used = u64::from(id % 11) * 3 * GIB;
        Candidate {
            id,
            twin: id + 1_000_000,
            farm: id % 200 + 1,
            country: countries[(id % 8) as usize].into(),
            up: id % 17 != 0,
            gpus: usize::from(id % 50 == 0),
            total,
            free: Capacity {
                mru: total.mru - used,
                ..total
            },
        }
    });
    let t0 = Instant::now();
    let mut s = Scheduler::new(nodes);
    let built = t0.elapsed();
    // Mostly small services, some of three replicas, one in ten by country, one in a hundred
    // needing a GPU (2% of the nodes have one).
    let mut wants: Vec<(Want, u32)> = Vec::new();
    for i in 0..100 {
        wants.push(match i {
            0 => (want(2, GIB, None, true), 1),
            1..=10 => (want(1, 512 * MIB, Some(countries[i % 8]), false), 1),
            11..=30 => (want(2, 2 * GIB, None, false), 3),
            _ => (want(1, 256 * MIB, None, false), 1),
        });
    }
    let none = HashSet::new();
    let mut placed = 0u64;
    let mut failed = 0u64;
    let t0 = Instant::now();
    let mut i = 0usize;
    while placed + failed < u64::from(b.placements) {
        let (w, n) = &wants[i % wants.len()];
        i += 1;
        match s.place("bench", w, *n, &[], &none) {
            Ok(v) => placed += v.len() as u64,
            Err(_) => failed += 1,
        }
    }
    let took = t0.elapsed();
    println!(
        "tfgrid bench scheduler: {} nodes (index built in {:.0} ms), a mix of 1- and 3-replica services, \
         one in ten by country, one in a hundred needing a GPU",
        b.nodes,
        built.as_secs_f64() * 1000.0
    );
    println!(
        "placements: {placed} in {:.2} s = {:.0}/s ({failed} requests found no node)",
        took.as_secs_f64(),
        placed as f64 / took.as_secs_f64()
    );
    Ok(())
}

fn want(cru: u64, mru: u64, country: Option<&str>, gpu: bool) -> Want {
    Want {
        capacity: Capacity {
            cru,
            mru,
            ..Default::default()
        },
        country: country.map(str::to_string),
        farms: None,
        gpu,
        distinct: true,
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A grid for the benchmarks: registry, relay and bot in this process, an image registry, and
/// node agents as processes (so one can die).
pub struct Grid {
    dir: tempfile::TempDir,
    pub url: String,
    pub relay: String,
    pub image: String,
    _oci: LocalRegistry,
    /// Dropping it stops the relay: kept for as long as the grid.
    _relay_stop: tfgrid_bus::relay::RelayStop,
    /// (the agent process while it lives, its arguments, node id, node twin)
    nodes: Vec<(Option<Proc>, Vec<String>, u32, u32)>,
    bot: Arc<Bot>,
    pub(crate) api: String,
    pub(crate) gateway: std::net::SocketAddr,
}

impl Drop for Grid {
    fn drop(&mut self) {
        for (p, ..) in &mut self.nodes {
            drop(p.take());
        }
        let rt = tokio::runtime::Handle::current();
        for (i, _) in self.nodes.iter().enumerate() {
            let dir = self.dir.path().join(format!("node{i}"));
            let bridge = format!("tfgbench{i}");
            let _ = std::thread::scope(|s| {
                s.spawn(|| rt.block_on(tfgrid_node::agent::stop_workloads(&dir, "runc", &bridge)))
                    .join()
            });
        }
    }
}

impl Grid {
    /// Node `i`'s data directory.
    pub(crate) fn node_dir(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("node{i}"))
    }

    /// Node `i`'s id, twin and agent pid.
    pub fn node(&self, i: usize) -> Option<(u32, u32, u32)> {
        let (p, _, id, twin) = &self.nodes[i];
        Some((*id, *twin, p.as_ref()?.0.id()))
    }
}

/// Starts a node agent; returns it with its node id and twin (from its ready line).
fn spawn_node(args: &[String]) -> Result<(Proc, u32, u32)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    // "node N (twin T) up; ..."
    let w: Vec<&str> = line.split_whitespace().collect();
    if w.first() != Some(&"node") || w.len() < 4 {
        bail!("a node did not start: {line:?}");
    }
    Ok((
        Proc(child),
        w[1].parse()?,
        w[3].trim_end_matches(')').parse()?,
    ))
}

pub async fn grid(nodes: usize, down_after_ms: u64, report_interval_ms: u64) -> Result<Grid> {
    if !nix::unistd::geteuid().is_root() {
        bail!("this benchmark runs node agents: run it as root");
    }
    let dir = tempfile::tempdir()?;
    let config = RegistryConfig {
        down_after_ms,
        report_interval_ms,
        // Bridges share this host with any other grid: the bench's nodes get 10.251.<n-1>.0/24.
        workload_range: "10.251.0.0/16".parse().expect("a valid prefix"),
        // ... and the users' networks 10.252.<4k>.0/22.
        network_range: "10.252.0.0/16".parse().expect("a valid prefix"),
        network_prefix_len: 22,
        ..Default::default()
    };
    let registry = Registry::open(&dir.path().join("registry"), config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(registry.serve(listener, std::future::pending()));
    let (relay, _, _server, relay_stop) = crate::bus_cmd::start_relay(
        "127.0.0.1:0".parse()?,
        None,
        &dir.path().join("relay.key"),
        &url,
    )
    .await?;
    let oci = LocalRegistry::start(&dir.path().join("oci")).map_err(anyhow::Error::msg)?;
    let image = push_busybox_image(
        &oci.addr,
        "web",
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
        "bench\n",
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let client = RegistryClient::new(&url);
    let farm = new_farm(&client, "bench").await?;
    let gw_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut node_procs = Vec::new();
    for i in 0..nodes {
        let mut args: Vec<String> = [
            "node",
            "--registry",
            &url,
            "--relay",
            &relay,
            "--farm",
            &farm.to_string(),
            "--data",
            &dir.path().join(format!("node{i}")).to_string_lossy(),
            "--zdb-listen",
            "127.0.0.1:0",
            "--bridge",
            &format!("tfgbench{i}"),
            "--insecure-registry",
            &oci.addr,
            "--mru",
            "4G",
            // Containers reserve their writable layer as SSD; this VM's disk says it rotates.
            "--sru",
            "8G",
            "--hru",
            "8G",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if i == nodes - 1 {
            args.extend([
                "--domain".into(),
                "gw.bench".into(),
                "--gateway-listen".into(),
                gw_port.to_string(),
            ]);
        }
        let (p, id, twin) = spawn_node(&args)?;
        node_procs.push((Some(p), args, id, twin));
    }
    let bot = Bot::start(BotConfig {
        registry: url.clone(),
        relay: relay.clone(),
        key: dir.path().join("user.key"),
        data: dir.path().join("bot"),
    })
    .await?;
    tokio::spawn(bot.clone().run_reconciler(Duration::from_millis(250)));
    let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = format!("http://{}", api_listener.local_addr()?);
    let app = tfgrid_bot::api::router(bot.clone(), &url, None);
    tokio::spawn(async move { axum::serve(api_listener, app).await });
    Ok(Grid {
        dir,
        url,
        relay,
        image,
        _oci: oci,
        _relay_stop: relay_stop,
        nodes: node_procs,
        bot,
        api,
        gateway: gw_port,
    })
}

fn spec(name: &str, image: &str, expose: bool) -> String {
    let mut s = format!(
        "name: {name}\nservices:\n  web:\n    image: {image}\n    cpu: 1\n    memory: 32M\n    replicas: 1\n"
    );
    if expose {
        s.push_str(&format!("    expose: {{name: {name}, port: 8080}}\n"));
    }
    s
}

pub async fn deploy(b: DeployBench) -> Result<()> {
    let g = grid(2, 3000, 1000).await?;
    let http = reqwest::Client::new();
    let mut hist = Histogram::<u64>::new(3)?;
    // The first deploy on each node pulls the image; they are not counted.
    for i in 0..b.deploys + 2 {
        let name = format!("d{i}");
        let t0 = Instant::now();
        let r = http
            .post(format!("{}/api/deployments", g.api))
            .header("content-type", "application/yaml")
            .body(spec(&name, &g.image, false))
            .send()
            .await?;
        let took = t0.elapsed();
        if !r.status().is_success() {
            bail!("deploy {i}: {}", r.text().await?);
        }
        if i >= 2 {
            hist.record(took.as_micros() as u64)?;
        }
        http.delete(format!("{}/api/deployments/{name}", g.api))
            .send()
            .await?;
    }
    println!(
        "tfgrid bench deploy: {} deploys of a one-container spec through the bot's API \
         (place, contract, signed deployment over the bus, container running), cached image",
        b.deploys
    );
    println!(
        "deploy -> every workload ok: p50 {}  p99 {}  max {}",
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.max())
    );
    drop(g);
    Ok(())
}

async fn answers(http: &reqwest::Client, gw: std::net::SocketAddr, host: &str) -> Option<String> {
    let r = http
        .get(format!("http://{gw}/"))
        .header("host", host)
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?;
    if r.status().is_success() {
        r.text().await.ok()
    } else {
        None
    }
}

/// Kills a node as a power cut would: the agent, and every container it ran.
fn power_off(dir: &Path, proc: Proc) {
    drop(proc);
    let root = dir.join("runtime");
    let out = Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["list", "-q"])
        .output();
    for id in out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
    {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["kill", id, "KILL"])
            .status();
    }
}

pub async fn heal(b: HealBench) -> Result<()> {
    let mut g = grid(3, b.down_after_ms, b.report_interval_ms).await?;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/api/deployments", g.api))
        .header("content-type", "application/yaml")
        .body(spec("heal", &g.image, true))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("deploy: {}", r.text().await?);
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let mut detect = Histogram::<u64>::new(3)?;
    for round in 0..b.rounds {
        if answers(&http, g.gateway, "heal.gw.bench").await.is_none() {
            bail!("round {round}: the service does not answer before the kill");
        }
        let rec = g.bot.get("heal")?;
        let victim = rec.replicas[0].node_id;
        // Node ids follow start order: node i is the (i-1)th process.
        let idx = (victim - 1) as usize;
        let dir = g.dir.path().join(format!("node{idx}"));
        let proc = g.nodes[idx].0.take().context("node already dead")?;
        let t0 = Instant::now();
        power_off(&dir, proc);
        let mut healed_at = None;
        loop {
            if answers(&http, g.gateway, "heal.gw.bench").await.is_some() {
                let rec = g.bot.get("heal")?;
                if rec.replicas[0].node_id != victim {
                    break;
                }
            }
            if healed_at.is_none() && g.bot.get("heal")?.replicas[0].node_id != victim {
                healed_at = Some(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("round {round}: not healed within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = t0.elapsed();
        hist.record(took.as_micros() as u64)?;
        detect.record(healed_at.unwrap_or(took).as_micros() as u64)?;
        println!(
            "round {}: node {victim} died; answering from node {} after {:.2} s",
            round + 1,
            g.bot.get("heal")?.replicas[0].node_id,
            took.as_secs_f64()
        );
        // The dead node comes back (clean), ready to be a target for the next round.
        tfgrid_node::agent::stop_workloads(&dir, "runc", &format!("tfgbench{idx}")).await;
        let args = g.nodes[idx].1.clone();
        g.nodes[idx].0 = Some(spawn_node(&args)?.0);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    println!(
        "tfgrid bench heal: {} rounds; a node loses power (agent and containers killed), nodes \
         report uptime every {} ms, registry down_after_ms {}, bot reconciling (and pinging its \
         nodes) every 250 ms",
        b.rounds, b.report_interval_ms, b.down_after_ms
    );
    println!(
        "kill -> answering again elsewhere: p50 {:.2} s  max {:.2} s",
        hist.value_at_quantile(0.5) as f64 / 1e6,
        hist.max() as f64 / 1e6
    );
    println!(
        "of which until the bot had the replacement running: p50 {:.2} s",
        detect.value_at_quantile(0.5) as f64 / 1e6
    );
    drop(g);
    Ok(())
}
