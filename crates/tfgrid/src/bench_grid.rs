//! `tfgrid bench grid`: the grid at thousands of nodes on one machine. A registry and a relay
//! (processes), simulated nodes (`tfgrid node --simulate`, spread over several processes) and a
//! bot (in this process) that deploys replicas over them, then:
//! - the grid at rest: ledger writes per second, the relay's connections and memory;
//! - the bot's reconcile pass over every replica;
//! - one node process killed (kill -9: its share of the nodes dies at once) and the time until
//!   the bot has every replica running on a live node again, with nothing left on the ledger
//!   holding capacity for the dead ones.

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::StreamExt;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tfgrid_bot::bot::{Bot, BotConfig};
use tfgrid_bot::store::State;
use tfgrid_bus::relay::RelayStats;
use tfgrid_core::records::Stats;
use tfgrid_core::NodeId;
use tfgrid_registry_client::RegistryClient;

#[derive(Args)]
pub struct GridBench {
    /// Simulated nodes.
    #[arg(long, default_value_t = 5000)]
    nodes: u32,
    /// Replicas the bot deploys over them.
    #[arg(long, default_value_t = 10_000)]
    replicas: u32,
    /// Replicas per deployment (one service each, on distinct nodes).
    #[arg(long, default_value_t = 10)]
    per_deployment: u32,
    /// Processes the nodes are spread over; the heal phase kills one of them.
    #[arg(long, default_value_t = 10)]
    processes: u32,
    /// How often each node reports uptime to the ledger.
    #[arg(long, default_value_t = 600_000)]
    report_interval_ms: u64,
    /// How long the ledger waits for a report before it calls a node down.
    #[arg(long, default_value_t = 1_800_000)]
    down_after_ms: u64,
    /// How often each node looks for cancelled contracts.
    #[arg(long, default_value_t = 30_000)]
    sweep_interval_ms: u64,
    /// Seconds the grid is watched at rest.
    #[arg(long, default_value_t = 30)]
    rest_secs: u64,
    /// Reconcile passes timed.
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// The longest the heal may take before the bench gives up.
    #[arg(long, default_value_t = 300)]
    heal_timeout_secs: u64,
}

/// A child process killed when dropped (the bench may fail at any step).
struct Proc(Option<Child>);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `tfgrid ARGS` and waits for the first line of its output that starts with `ready`.
fn spawn(args: &[String], ready: &str) -> Result<(Proc, String)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting tfgrid {}", args[0]))?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut p = Proc(Some(child));
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            p.kill();
            bail!("tfgrid {} exited before it was ready", args.join(" "));
        }
        if line.starts_with(ready) {
            break;
        }
    }
    // Later output is drained, so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    Ok((p, line.trim().to_string()))
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The sequence number of the bot's newest event.
fn last_event(bot: &Bot) -> Result<u64> {
    let mut seq = 0;
    loop {
        let page = bot.store.events(seq, None, 10_000)?;
        match page.last() {
            Some(e) => seq = e.seq,
            None => return Ok(seq),
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// "N simulated nodes up in S s (node ids A to B)" -> A..=B.
fn node_ids(line: &str) -> Result<std::ops::RangeInclusive<NodeId>> {
    let ids = line
        .rsplit_once("(node ids ")
        .and_then(|(_, r)| r.strip_suffix(')'))
        .and_then(|r| r.split_once(" to "))
        .and_then(|(a, b)| Some(a.parse().ok()?..=b.parse().ok()?))
        .with_context(|| format!("no node ids in {line:?}"))?;
    Ok(ids)
}

fn spec(i: u32, replicas: u32) -> String {
    // The image is never pulled: simulated nodes start nothing.
    format!(
        "name: app-{i}\nservices:\n  app:\n    image: 127.0.0.1:5000/app:latest\n    cpu: 1\n    memory: 256M\n    replicas: {replicas}\n"
    )
}

pub async fn run(b: GridBench) -> Result<()> {
    if b.processes == 0 || b.nodes < b.processes || b.per_deployment == 0 {
        bail!("--nodes must be at least --processes, and both and --per-deployment above 0");
    }
    if !b.replicas.is_multiple_of(b.per_deployment) {
        bail!("--replicas must be a multiple of --per-deployment");
    }
    let dir = tempfile::tempdir()?;
    let path = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let reg_addr = format!("127.0.0.1:{}", free_port()?);
    let url = format!("http://{reg_addr}");
    let (registry, _) = spawn(
        &s(&[
            "registry",
            "--data",
            &path("registry"),
            "--listen",
            &reg_addr,
            "--report-interval-ms",
            &b.report_interval_ms.to_string(),
            "--down-after-ms",
            &b.down_after_ms.to_string(),
        ]),
        "registry listening on",
    )?;
    let relay_addr = format!("127.0.0.1:{}", free_port()?);
    let relay_url = format!("ws://{relay_addr}/");
    let (relay, _) = spawn(
        &s(&[
            "relay",
            "--listen",
            &relay_addr,
            "--registry",
            &url,
            "--key",
            &path("relay.key"),
        ]),
        "relay listening on",
    )?;
    let client = RegistryClient::new(&url);
    let farm = crate::bench_bot::new_farm(&client, "simulated").await?;

    // One process after another, so each holds a contiguous range of node ids.
    let t0 = Instant::now();
    let mut procs = Vec::new();
    for p in 0..b.processes {
        let n = b.nodes / b.processes + u32::from(p < b.nodes % b.processes);
        let (proc_, line) = spawn(
            &s(&[
                "node",
                "--simulate",
                &n.to_string(),
                "--registry",
                &url,
                "--relay",
                &relay_url,
                "--farm",
                &farm.to_string(),
                "--sweep-interval-ms",
                &b.sweep_interval_ms.to_string(),
            ]),
            "",
        )
        .and_then(|(p, l)| {
            if l.contains("simulated nodes up") {
                Ok((p, l))
            } else {
                bail!("a simulated node process said {l:?}")
            }
        })?;
        procs.push((proc_, node_ids(&line)?));
    }
    println!(
        "{} simulated nodes in {} processes up in {:.1} s",
        b.nodes,
        b.processes,
        t0.elapsed().as_secs_f64()
    );

    let bot = Bot::start(BotConfig {
        registry: url.clone(),
        relay: relay_url.clone(),
        key: dir.path().join("bot.key"),
        data: dir.path().join("bot"),
    })
    .await?;
    let deployments = b.replicas / b.per_deployment;
    let t0 = Instant::now();
    let mut deploys = futures::stream::iter(0..deployments)
        .map(|i| {
            let bot = bot.clone();
            async move { bot.deploy(&spec(i, b.per_deployment)).await }
        })
        .buffer_unordered(16);
    while let Some(r) = deploys.next().await {
        r.context("a deploy")?;
    }
    drop(deploys);
    println!(
        "deployed {} replicas in {deployments} deployments in {:.1} s",
        b.replicas,
        t0.elapsed().as_secs_f64()
    );

    // The reconcile pass alone, back to back.
    let mut took = Vec::new();
    for _ in 0..b.passes {
        let t = Instant::now();
        bot.reconcile().await?;
        took.push(t.elapsed());
    }
    took.sort();
    println!(
        "reconcile pass over {} replicas on {} nodes: p50 {:.0} ms, max {:.0} ms ({} passes)",
        b.replicas,
        b.nodes,
        took[took.len() / 2].as_secs_f64() * 1e3,
        took[took.len() - 1].as_secs_f64() * 1e3,
        took.len()
    );

    // At rest, with the bot's reconciler running as `tfgrid bot` runs it.
    let reconciler = tokio::spawn(bot.clone().run_reconciler(Duration::from_secs(1)));
    let stats = |c: RegistryClient| async move { c.stats().await };
    let seq0 = last_event(&bot)?;
    let before: Stats = stats(client.clone()).await?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(b.rest_secs)).await;
    let after: Stats = stats(client.clone()).await?;
    let secs = t.elapsed().as_secs_f64();
    let rs: RelayStats = reqwest::get(format!("http://{relay_addr}/stats"))
        .await?
        .json()
        .await?;
    let sim_rss: f64 = procs.iter().map(|(p, _)| rss_mb(p.pid())).sum();
    // At rest nothing is moved: a heal here is a live node taken for dead.
    let moved: Vec<_> = bot
        .store
        .events(seq0, None, 100_000)?
        .into_iter()
        .filter(|e| e.kind.starts_with("heal"))
        .collect();
    if let Some(e) = moved.first() {
        println!(
            "at rest the bot moved {} replicas; the first: {}: {}",
            moved.len(),
            e.deployment,
            e.message
        );
    }
    println!(
        "at rest ({secs:.0} s): ledger writes {:.2}/s (uptime every {} s per node: {:.2}/s expected); \
         relay {} sessions, {:.0} MB RSS; registry {:.0} MB RSS; simulated nodes {:.0} KB RSS each",
        (after.height - before.height) as f64 / secs,
        b.report_interval_ms / 1000,
        b.nodes as f64 * 1000.0 / b.report_interval_ms as f64,
        rs.sessions,
        rss_mb(relay.pid()),
        rss_mb(registry.pid()),
        sim_rss * 1024.0 / b.nodes as f64,
    );

    // 1/processes of the nodes lose power at once.
    let (mut victim, dead) = procs.swap_remove(0);
    let dead: HashSet<NodeId> = dead.collect();
    let on_dead = |bot: &Bot| -> Result<(usize, usize)> {
        let recs = bot.store.all()?;
        let moved = recs
            .iter()
            .flat_map(|r| &r.replicas)
            .filter(|x| dead.contains(&x.node_id))
            .count();
        let degraded = recs.iter().filter(|r| r.state != State::Running).count();
        Ok((moved, degraded))
    };
    let (to_heal, _) = on_dead(&bot)?;
    let t0 = Instant::now();
    victim.kill();
    let deadline = t0 + Duration::from_secs(b.heal_timeout_secs);
    let mut last = (to_heal, 0);
    loop {
        let now = on_dead(&bot)?;
        if now.0 != last.0 {
            tracing::info!("{} replicas still on dead nodes", now.0);
        }
        last = now;
        if now == (0, 0) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after {} s, {} replicas are still on dead nodes and {} deployments are not running",
                b.heal_timeout_secs,
                now.0,
                now.1
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let healed = t0.elapsed();
    // Nothing on the ledger holds capacity for a dead node's replicas once the cancels are in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let live = loop {
        let s = client.stats().await?;
        if s.node_contracts_live == b.replicas as u64 || Instant::now() > deadline {
            break s.node_contracts_live;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    reconciler.abort();
    if live != b.replicas as u64 {
        bail!(
            "{live} node contracts are live after the heal, for {} replicas",
            b.replicas
        );
    }
    println!(
        "heal: {} nodes killed at once (kill -9 of a process), {to_heal} replicas on them, all running on live nodes after {:.1} s; {live} node contracts live",
        dead.len(),
        healed.as_secs_f64()
    );
    drop(procs);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_ids_come_from_the_ready_line() {
        assert_eq!(
            super::node_ids("500 simulated nodes up in 3.1 s (node ids 2 to 501)").unwrap(),
            2..=501
        );
        assert!(super::node_ids("500 simulated nodes up").is_err());
    }
}
