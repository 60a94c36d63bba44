//! `tfgrid bench vm`: a VM of the example web image deployed through the bot's API, timed to the
//! deploy's answer (QEMU started) and to the first answer of its httpd through the gateway; the
//! same service as a container in the same run as the reference. Then QEMU's resident memory
//! beyond the guest's RAM, idle (the guest RAM is the one anonymous mapping of its exact size).

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct VmBench {
    /// VMs (and containers) to deploy and time, one after another.
    #[arg(long, default_value_t = 5)]
    boots: usize,
    /// Guest memory of each VM, MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
}

fn spec(name: &str, image: &str, vm: bool, memory_mib: u64) -> String {
    format!(
        "name: {name}\nservices:\n  web:\n{}    image: {image}\n    memory: {memory_mib}M\n    expose: {{name: {name}, port: 8080}}\n",
        if vm { "    kind: vm\n" } else { "" }
    )
}

fn ms(d: u64) -> String {
    format!("{:.0} ms", d as f64 / 1000.0)
}

/// (deploy answered, first answer through the gateway) in µs.
async fn boot(
    http: &reqwest::Client,
    g: &crate::bench_bot::Grid,
    name: &str,
    yaml: String,
) -> Result<(u64, u64)> {
    let t0 = Instant::now();
    let r = http
        .post(format!("{}/api/deployments", g.api))
        .header("content-type", "application/yaml")
        .body(yaml)
        .send()
        .await?;
    let deployed = t0.elapsed();
    if !r.status().is_success() {
        bail!("deploying {name}: {}", r.text().await?);
    }
    loop {
        let r = http
            .get(format!("http://{}/", g.gateway))
            .header("host", format!("{name}.gw.bench"))
            .timeout(Duration::from_millis(500))
            .send()
            .await;
        if r.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("{name} did not answer within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((deployed.as_micros() as u64, t0.elapsed().as_micros() as u64))
}

/// QEMU's resident memory in KiB: (all, the guest's RAM, QEMU's own anonymous memory, file
/// pages). The guest RAM is the anonymous mapping of exactly its size; file pages (the kernel
/// image, QEMU's binary and libraries) are page cache every VM shares.
fn qemu_rss(pid: u32, guest: u64) -> Result<(u64, u64, u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut total, mut ram, mut anon, mut file) = (0u64, 0u64, 0u64, 0u64);
    let (mut is_ram, mut is_file) = (false, false);
    for l in smaps.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let header = w
            .first()
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| {
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            });
        if let Some((a, b)) = header {
            is_ram = b - a == guest;
            is_file = w.get(5).is_some_and(|p| p.starts_with('/'));
            continue;
        }
        let kib = || w.get(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match w.first() {
            Some(&"Rss:") => {
                total += kib();
                if is_ram {
                    ram += kib();
                } else if is_file {
                    file += kib();
                }
            }
            Some(&"Anonymous:") if !is_ram => anon += kib(),
            _ => {}
        }
    }
    Ok((total, ram, anon, file))
}

pub async fn run(b: VmBench) -> Result<()> {
    let g = crate::bench_bot::grid(2, 3000, 1000).await?;
    let http = reqwest::Client::new();
    let (mut vm_ok, mut vm_answer, mut c_answer) = (
        Histogram::<u64>::new(3)?,
        Histogram::<u64>::new(3)?,
        Histogram::<u64>::new(3)?,
    );
    // The first of each pulls the image (and, for VMs, makes the kernel and initramfs and probes
    // KVM): not counted.
    for i in 0..=b.boots {
        let name = format!("vm{i}");
        let (ok, answer) =
            boot(&http, &g, &name, spec(&name, &g.image, true, b.memory_mib)).await?;
        if i > 0 {
            vm_ok.record(ok)?;
            vm_answer.record(answer)?;
        }
        if i < b.boots {
            http.delete(format!("{}/api/deployments/{name}", g.api))
                .send()
                .await?;
        }
        let cname = format!("ct{i}");
        let (_, answer) = boot(&http, &g, &cname, spec(&cname, &g.image, false, 32)).await?;
        if i > 0 {
            c_answer.record(answer)?;
        }
        http.delete(format!("{}/api/deployments/{cname}", g.api))
            .send()
            .await?;
    }
    // The last VM idles, then its QEMU is measured.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut accel = String::from("?");
    let mut found = None;
    for i in 0..2 {
        let vms = g.node_dir(i).join("vms");
        for e in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
            if let Ok(pid) = std::fs::read_to_string(e.path().join("pid")) {
                found = Some(pid.trim().parse::<u32>()?);
                let out = std::fs::read_to_string(e.path().join("output")).unwrap_or_default();
                let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                accel = v["accel"].as_str().unwrap_or("?").to_string();
            }
        }
    }
    let pid = found.context("no running VM to measure")?;
    let (total, ram, anon, file) = qemu_rss(pid, b.memory_mib << 20)?;
    println!(
        "tfgrid bench vm: {} boots of the example web image (busybox httpd) as a {} MiB, 1 vCPU VM \
         ({accel}) and as a container, through the bot's API, each deployed, timed, removed",
        b.boots, b.memory_mib
    );
    println!(
        "vm:        deploy -> QEMU running p50 {}  max {};  deploy -> first answer through the gateway p50 {}  p99 {}  max {}",
        ms(vm_ok.value_at_quantile(0.5)),
        ms(vm_ok.max()),
        ms(vm_answer.value_at_quantile(0.5)),
        ms(vm_answer.value_at_quantile(0.99)),
        ms(vm_answer.max())
    );
    println!(
        "              boot (QEMU running -> first answer) p50 {}",
        ms(vm_answer
            .value_at_quantile(0.5)
            .saturating_sub(vm_ok.value_at_quantile(0.5)))
    );
    println!(
        "container: deploy -> first answer through the gateway p50 {}  max {}",
        ms(c_answer.value_at_quantile(0.5)),
        ms(c_answer.max())
    );
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "idle QEMU: resident {:.1} MiB = guest RAM {:.1} + QEMU's own memory {:.1} (this VM's alone) + file pages {:.1} (kernel image, QEMU and its libraries: page cache all VMs share)",
        mib(total),
        mib(ram),
        mib(anon),
        mib(file)
    );
    http.delete(format!("{}/api/deployments/vm{}", g.api, b.boots))
        .send()
        .await?;
    drop(g);
    Ok(())
}
