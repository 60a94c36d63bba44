//! `tfgrid bench net`: throughput (iperf3, one TCP stream) and round-trip latency (ping) between
//! two hosts (network namespaces on a veth WAN, `tfgrid_net::hosts`), in one run: the plain
//! routed path, our overlay (`tfgrid net run` on each host), and Debian's wireguard-go configured
//! with `wg` on the same hosts. Root, iperf3, wireguard-go and wg are needed.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tfgrid_net::hosts::{Host, HostKind, Lab};
use tfgrid_net::WgSecret;

#[derive(Args)]
pub struct NetBench {
    /// Seconds of iperf3 per path.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Pings per path (5 ms apart).
    #[arg(long, default_value_t = 200)]
    pings: usize,
    /// MTU of the overlay interfaces (both ours and wireguard-go's).
    #[arg(long, default_value_t = 1420)]
    mtu: u16,
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Figures {
    gbit: f64,
    rtt_p50_ms: f64,
    rtt_p99_ms: f64,
}

fn out(mut c: Command) -> Result<String> {
    let o = c.output()?;
    if !o.status.success() {
        bail!(
            "{:?}: {}{}",
            c,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn sh(lab: &Lab, h: &Host, script: &str) -> Result<String> {
    let mut c = lab.command(h, "sh");
    c.args(["-c", script]);
    out(c)
}

fn measure(lab: &Lab, a: &Host, b: &Host, addr: &str, b_: &NetBench) -> Result<Figures> {
    let _server = Killed(
        lab.command(b, "iperf3")
            .args(["-s", "-B", addr, "-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // The first pings also wait for a handshake; ping until one answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sh(lab, a, &format!("ping -c 1 -W 1 {addr}")).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} never answered a ping");
        }
    }
    let mut json = String::new();
    for _ in 0..50 {
        let mut c = lab.command(a, "iperf3");
        c.args(["-c", addr, "-J", "-t", &b_.seconds.to_string()]);
        match out(c) {
            Ok(j) => {
                json = j;
                break;
            }
            // The server may not be listening yet.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let v: serde_json::Value = serde_json::from_str(&json).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received")?;
    let pings = sh(
        lab,
        a,
        &format!("ping -n -c {} -i 0.005 -W 1 {addr}", b_.pings),
    )?;
    let mut rtts: Vec<f64> = pings
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if rtts.is_empty() {
        bail!("no ping answers from {addr}");
    }
    rtts.sort_by(f64::total_cmp);
    let q = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p).round() as usize];
    Ok(Figures {
        gbit: bps / 1e9,
        rtt_p50_ms: q(0.5),
        rtt_p99_ms: q(0.99),
    })
}

fn conf(
    key: &WgSecret,
    addr: &str,
    port: u16,
    peer: &WgSecret,
    ep: String,
    allowed: &str,
    mtu: u16,
) -> String {
    format!(
        "[Interface]\nPrivateKey = {}\nAddress = {addr}/24\nListenPort = {port}\nMTU = {mtu}\n\n[Peer]\nPublicKey = {}\nEndpoint = {ep}\nAllowedIPs = {allowed}/32\n",
        key.to_base64(),
        peer.public()
    )
}

fn ours(lab: &Lab, h: &Host, dir: &std::path::Path, name: &str, text: String) -> Result<Killed> {
    ours_with(lab, h, dir, name, text, &[])
}

fn ours_with(
    lab: &Lab,
    h: &Host,
    dir: &std::path::Path,
    name: &str,
    text: String,
    extra: &[String],
) -> Result<Killed> {
    let f = dir.join(format!("{name}.conf"));
    std::fs::write(&f, text)?;
    let exe = std::env::current_exe()?;
    let mut child = lab
        .command(h, exe.to_str().context("exe path")?)
        .args(["net", "run", "--name", name, "--config"])
        .arg(&f)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().context("stdout")?),
        &mut line,
    )?;
    if !line.contains(" up,") {
        bail!("tfgrid net run on {}: {line:?}", h.name);
    }
    Ok(Killed(child))
}

fn wireguard_go(
    lab: &Lab,
    h: &Host,
    dir: &std::path::Path,
    iface: &str,
    text: String,
    addr: &str,
    mtu: u16,
) -> Result<Killed> {
    let child = Killed(
        lab.command(h, "wireguard-go")
            .args(["-f", iface])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while sh(lab, h, &format!("wg show {iface}")).is_err() {
        if Instant::now() > deadline {
            bail!("wireguard-go made no {iface}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = dir.join(format!("{iface}.conf"));
    std::fs::write(&f, tfgrid_net::Config::parse(&text)?.to_setconf())?;
    sh(
        lab,
        h,
        &format!(
            "wg setconf {iface} {} && ip addr add {addr}/24 dev {iface} && ip link set {iface} mtu {mtu} up",
            f.display()
        ),
    )?;
    Ok(child)
}

pub fn run(b: NetBench) -> Result<()> {
    if let Some(why) = tfgrid_net::hosts::unavailable() {
        bail!("bench net {why}");
    }
    for t in ["iperf3", "wireguard-go", "wg", "ping"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            bail!("bench net needs `{t}`");
        }
    }
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::new()?;
    let a = lab.add_host("a", HostKind::Public)?;
    let h = lab.add_host("b", HostKind::Public)?;
    let r = lab.add_host("r", HostKind::UdpBlocked)?;
    println!(
        "net: two hosts on a veth WAN; iperf3 1 TCP stream for {} s, {} pings 5 ms apart, overlay MTU {}",
        b.seconds, b.pings, b.mtu
    );
    let print = |what: &str, f: &Figures| {
        println!(
            "  {what:<28} {:>7.2} Gbit/s   rtt p50 {:.3} ms  p99 {:.3} ms",
            f.gbit, f.rtt_p50_ms, f.rtt_p99_ms
        )
    };
    let base = measure(&lab, &a, &h, &h.addr.to_string(), &b)?;
    print("plain routed (baseline)", &base);

    let (ka, kb) = (WgSecret::generate(), WgSecret::generate());
    let ov = {
        let _x = ours(
            &lab,
            &a,
            dir.path(),
            "tfbench",
            conf(
                &ka,
                "10.77.0.1",
                51830,
                &kb,
                format!("{}:51830", h.addr),
                "10.77.0.2",
                b.mtu,
            ),
        )?;
        let _y = ours(
            &lab,
            &h,
            dir.path(),
            "tfbench",
            conf(
                &kb,
                "10.77.0.2",
                51830,
                &ka,
                format!("{}:51830", a.addr),
                "10.77.0.1",
                b.mtu,
            ),
        )?;
        measure(&lab, &a, &h, "10.77.0.2", &b)?
    };
    print("tfgrid overlay, direct", &ov);

    // wireguard-go's control socket is /run/wireguard/<iface>.sock on every namespace: one name
    // per host.
    let iface = format!("wgb{:x}", std::process::id() & 0xffff);
    let (ia, ib) = (format!("{iface}a"), format!("{iface}b"));
    let wg = {
        let _x = wireguard_go(
            &lab,
            &a,
            dir.path(),
            &ia,
            conf(
                &ka,
                "10.78.0.1",
                51840,
                &kb,
                format!("{}:51840", h.addr),
                "10.78.0.2",
                b.mtu,
            ),
            "10.78.0.1",
            b.mtu,
        )?;
        let _y = wireguard_go(
            &lab,
            &h,
            dir.path(),
            &ib,
            conf(
                &kb,
                "10.78.0.2",
                51840,
                &ka,
                format!("{}:51840", a.addr),
                "10.78.0.1",
                b.mtu,
            ),
            "10.78.0.2",
            b.mtu,
        )?;
        measure(&lab, &a, &h, "10.78.0.2", &b)?
    };
    print("wireguard-go (Debian)", &wg);

    let rel = relayed(&mut lab, &a, &r, dir.path(), &b)?;
    print("tfgrid overlay, relayed", &rel);
    println!(
        "  overlay / wireguard-go: throughput {:.2}x, rtt p50 {:.2}x; overlay adds {:.3} ms p50 over the baseline",
        ov.gbit / wg.gbit,
        ov.rtt_p50_ms / wg.rtt_p50_ms,
        ov.rtt_p50_ms - base.rtt_p50_ms
    );
    println!(
        "  relayed / direct: throughput {:.2}x; relayed adds {:.3} ms p50 over the baseline",
        rel.gbit / ov.gbit,
        rel.rtt_p50_ms - base.rtt_p50_ms
    );
    Ok(())
}

/// Our overlay between `a` and a host whose UDP is blocked, so every datagram goes through a
/// relay (and a registry for the twins) on the machine.
fn relayed(
    lab: &mut Lab,
    a: &Host,
    r: &Host,
    dir: &std::path::Path,
    b: &NetBench,
) -> Result<Figures> {
    let exe = std::env::current_exe()?;
    let m = lab.connect_machine()?;
    let port =
        |ip| -> Result<u16> { Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port()) };
    let reg_addr = format!("{m}:{}", port(m)?);
    let reg = format!("http://{reg_addr}");
    let _registry = Killed(
        Command::new(&exe)
            .args(["registry", "--listen", &reg_addr, "--data"])
            .arg(dir.join("registry"))
            .stderr(Stdio::null())
            .spawn()?,
    );
    let relay_addr = format!("{m}:{}", port(m)?);
    let relay = format!("ws://{relay_addr}/");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&reg_addr).is_err() {
        if Instant::now() > deadline {
            bail!("the registry never listened");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _relay = Killed(
        Command::new(&exe)
            .args([
                "relay",
                "--listen",
                &relay_addr,
                "--registry",
                &reg,
                "--key",
            ])
            .arg(dir.join("relay.key"))
            .stderr(Stdio::null())
            .spawn()?,
    );
    while std::net::TcpStream::connect(&relay_addr).is_err() {
        if Instant::now() > deadline {
            bail!("the relay never listened");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let twin = |name: &str| -> Result<u32> {
        let key = dir.join(format!("{name}.key"));
        let mut c = Command::new(&exe);
        c.args(["key", "new", "--key"]).arg(&key);
        out(c)?;
        let mut c = Command::new(&exe);
        c.args([
            "twin",
            "register",
            "--registry",
            &reg,
            "--relay",
            &relay,
            "--key",
        ])
        .arg(&key);
        Ok(out(c)?.trim().trim_start_matches("twin id: ").parse()?)
    };
    let (ta, tr) = (twin("ra")?, twin("rr")?);
    let (ka, kr) = (WgSecret::generate(), WgSecret::generate());
    let bus = |name: &str, peer: &WgSecret, t: u32| -> Vec<String> {
        vec![
            "--relay".into(),
            relay.clone(),
            "--registry".into(),
            reg.clone(),
            "--key".into(),
            dir.join(format!("{name}.key")).display().to_string(),
            "--peer-twin".into(),
            format!("{}={t}", peer.public()),
        ]
    };
    let _x = ours_with(
        lab,
        a,
        dir,
        "tfrelay",
        conf(
            &ka,
            "10.79.0.1",
            51850,
            &kr,
            format!("{}:51850", r.addr),
            "10.79.0.2",
            b.mtu,
        ),
        &bus("ra", &kr, tr),
    )?;
    let _y = ours_with(
        lab,
        r,
        dir,
        "tfrelay",
        conf(
            &kr,
            "10.79.0.2",
            51850,
            &ka,
            format!("{}:51850", a.addr),
            "10.79.0.1",
            b.mtu,
        ),
        &bus("rr", &ka, ta),
    )?;
    measure(lab, a, r, "10.79.0.2", b)
}
