//! `tfgrid bench cluster`: the replicated registry as it runs, N `tfgrid registry` processes on
//! loopback. Commits per second through them, then the write gap when the leader is killed
//! (SIGKILL) under a steady load.

use crate::bench::{commits_bulk, commits_one_per_request, hist, ms, new_twins};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tfgrid_registry::cluster::ClusterStatus;
use tfgrid_registry_client::RegistryClient;

#[derive(Args)]
pub struct ClusterBench {
    /// Validators (processes).
    #[arg(long, default_value_t = 3)]
    validators: u64,
    /// Transactions in each throughput phase.
    #[arg(long, default_value_t = 50_000)]
    txs: usize,
    /// Concurrent HTTP clients for the one-transaction-per-request phase.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Leader kills under load.
    #[arg(long, default_value_t = 3)]
    kills: usize,
}

struct Validator {
    id: u64,
    url: String,
    child: Option<Child>,
}

impl Drop for Validator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(id: u64, url: &str, data: &Path, key: &Path, peers: &str) -> Result<Child> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["registry", "--data"])
        .arg(data.join(format!("v{id}")))
        .args(["--listen", url.trim_start_matches("http://")])
        .args(["--id", &id.to_string(), "--peers", peers, "--cluster-key"])
        .arg(key)
        .args(["--down-after-ms", "86400000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a validator")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    if !line.starts_with("registry listening on") {
        bail!("validator {id} did not start: {line:?}");
    }
    Ok(child)
}

async fn leader(vs: &[Validator]) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let http = reqwest::Client::new();
    loop {
        for v in vs.iter().filter(|v| v.child.is_some()) {
            let s: Option<ClusterStatus> = match http
                .get(format!("{}/cluster", v.url))
                .timeout(Duration::from_secs(1))
                .send()
                .await
            {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            if let Some(l) = s.and_then(|s| s.leader) {
                if vs.iter().any(|v| v.id == l && v.child.is_some()) {
                    return Ok(l);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no leader elected within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(b: ClusterBench) -> Result<()> {
    if b.validators == 0 {
        bail!("--validators must be at least 1");
    }
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("cluster.key");
    let mut k = [0u8; 32];
    getrandom::getrandom(&mut k).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    std::fs::write(&key, hex::encode(k))?;
    let mut vs: Vec<Validator> = Vec::new();
    for id in 1..=b.validators {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        vs.push(Validator {
            id,
            url: format!("http://127.0.0.1:{port}"),
            child: None,
        });
    }
    let peers = vs
        .iter()
        .map(|v| format!("{}={}", v.id, v.url))
        .collect::<Vec<_>>()
        .join(",");
    for v in &mut vs {
        v.child = Some(spawn(v.id, &v.url, dir.path(), &key, &peers)?);
    }
    let l = leader(&vs).await?;
    // The leader's URL first: writes sent to a follower take one more hop.
    let mut urls: Vec<&str> = vs.iter().map(|v| v.url.as_str()).collect();
    urls.sort_by_key(|u| *u != vs[(l - 1) as usize].url);
    let client = RegistryClient::new(&urls.join(","));
    println!(
        "tfgrid bench cluster: {} validators (processes, fsync on every commit), {} cores",
        b.validators,
        std::thread::available_parallelism()?.get()
    );
    println!("durable commits (create_twin, each from a new key; acknowledged once a majority has it on disk and the leader applied it):");
    commits_one_per_request(&client, b.txs, b.concurrency).await?;
    commits_bulk(&client, b.txs).await?;
    if b.validators < 3 {
        return Ok(());
    }
    println!("leader killed (SIGKILL) under 16 writing clients:");
    let all_urls = vs
        .iter()
        .map(|v| v.url.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut gaps = hist();
    for round in 0..b.kills {
        let l = leader(&vs).await?;
        let stop = Arc::new(AtomicBool::new(false));
        // (sent, acknowledged): only a write sent after the kill shows that writes resumed.
        let acked: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
        let failed = Arc::new(AtomicUsize::new(0));
        let txs = Arc::new(new_twins(200_000));
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let c = RegistryClient::new(&all_urls);
            let (stop, acked, failed, txs, next) = (
                stop.clone(),
                acked.clone(),
                failed.clone(),
                txs.clone(),
                next.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(tx) = txs.get(i) else { return };
                    let sent = Instant::now();
                    match c.submit_binary(tx).await {
                        Ok(_) => acked.lock().unwrap().push((sent, Instant::now())),
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let killed = Instant::now();
        let v = vs.iter_mut().find(|v| v.id == l).expect("the leader");
        if let Some(mut c) = v.child.take() {
            c.kill()?; // SIGKILL
            c.wait()?;
        }
        tokio::time::sleep(Duration::from_millis(4000)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await?;
        }
        let first_after = acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(sent, _)| *sent > killed)
            .map(|(_, acked)| *acked)
            .min();
        let Some(first_after) = first_after else {
            bail!("round {round}: no write was acknowledged within 4 s of the kill");
        };
        let gap = first_after.duration_since(killed);
        gaps.record(gap.as_micros() as u64)?;
        println!(
            "  round {}: validator {l} killed; writes resumed after {} ({} requests failed in flight)",
            round + 1,
            ms(gap.as_micros() as u64),
            failed.load(Ordering::Relaxed)
        );
        v.child = Some(spawn(v.id, &v.url, dir.path(), &key, &peers)?);
    }
    println!(
        "  writes resumed after: p50 {}  max {}",
        ms(gaps.value_at_quantile(0.5)),
        ms(gaps.max())
    );
    Ok(())
}
