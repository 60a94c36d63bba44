//! `tfgrid bench gateway`: the gateway proxy in this process, busybox httpd as the backend and curl
//! as the clients (separate processes, so this process's peak RSS is the proxy's own). It
//! measures large downloads through the proxy (throughput and the proxy's peak memory) and the
//! latency of small requests with a dead backend in the route against a route without one.

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tfgrid_node::kinds::gateway::Routes;

#[derive(Args)]
pub struct GatewayBench {
    /// Size of each large download, in MiB.
    #[arg(long, default_value_t = 400)]
    mib: u64,
    /// Concurrent large downloads.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Small requests per latency run.
    #[arg(long, default_value_t = 500)]
    requests: usize,
}

fn status_kib(field: &str) -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Small GETs through the proxy, one at a time: latency percentiles in µs.
async fn latency(proxy: std::net::SocketAddr, host: &str, n: usize) -> Result<Histogram<u64>> {
    let http = reqwest::Client::new();
    let mut h = Histogram::<u64>::new(3)?;
    for _ in 0..n {
        let t0 = Instant::now();
        let r = http
            .get(format!("http://{proxy}/small"))
            .header("host", host)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("{host}: {}", r.status());
        }
        r.bytes().await?;
        h.record(t0.elapsed().as_micros() as u64)?;
    }
    Ok(h)
}

pub async fn run(b: GatewayBench) -> Result<()> {
    for tool in ["busybox", "curl"] {
        if Command::new(tool)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            bail!("tfgrid bench gateway needs {tool} (apt-get install busybox-static curl)");
        }
    }
    let www = tempfile::tempdir()?;
    std::fs::File::create(www.path().join("big"))?.set_len(b.mib << 20)?;
    std::fs::write(www.path().join("small"), "hello from the backend\n")?;
    let port = free_port()?;
    let mut httpd = Command::new("busybox")
        .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
        .arg(www.path())
        .spawn()
        .context("busybox httpd")?;
    let alive = format!("http://127.0.0.1:{port}");
    let dead = format!("http://127.0.0.1:{}", free_port()?);
    let routes = Routes::fixed(
        "gw.bench",
        &[
            ("big", vec![alive.clone()]),
            ("failover", vec![dead, alive.clone()]),
        ],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy = listener.local_addr()?;
    let server = tokio::spawn(tfgrid_node::kinds::proxy::serve(listener, routes));
    // The backend is up when it answers directly.
    let t0 = Instant::now();
    while reqwest::get(format!("{alive}/small")).await.is_err() {
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("busybox httpd did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_before = status_kib("VmRSS:")?;

    let t0 = Instant::now();
    let mut downloads = Vec::new();
    for _ in 0..b.clients {
        let child = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                "-H",
                "Host: big.gw.bench",
            ])
            .arg(format!("http://{proxy}/big"))
            .stdout(Stdio::piped())
            .spawn()
            .context("curl")?;
        downloads.push(tokio::task::spawn_blocking(move || {
            child.wait_with_output()
        }));
    }
    let mut total = 0u64;
    for d in downloads {
        let out = d.await?.context("curl")?;
        let got: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if got != b.mib << 20 {
            bail!("a download got {got} bytes of {}", b.mib << 20);
        }
        total += got;
    }
    let took = t0.elapsed();
    let peak = status_kib("VmHWM:")?;

    let direct = latency(proxy, "big.gw.bench", b.requests).await?;
    let failover = latency(proxy, "failover.gw.bench", b.requests).await?;
    server.abort();
    let _ = httpd.kill();
    let _ = httpd.wait();

    println!(
        "tfgrid bench gateway: the proxy in this process, busybox httpd behind it, curl in front"
    );
    println!(
        "  {} x {} MiB downloads at once: {:.0} MiB/s in all ({:.2} s); this process's RSS {:.1} MB before, peak {:.1} MB",
        b.clients,
        b.mib,
        total as f64 / (1 << 20) as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    for (what, h) in [
        ("one live backend", &direct),
        ("a dead backend first in the round robin", &failover),
    ] {
        println!(
            "  {} small GETs, {what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            b.requests,
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
    }
    Ok(())
}
