//! The `tfgrid up` harness the process tests of whole grids share: start a grid, drive its CLI,
//! read its registry, and check that the grid holds nothing it should not.
#![allow(dead_code)] // each test crate uses its own part of it

use super::common::{have, is_root};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tfgrid");

/// A port free now, below the kernel's ephemeral range (32768 and up): a port handed out by
/// binding port 0 is one the kernel may hand again to any listener of a grid starting beside this
/// one before `up` binds it (a CI run failed on that). Ports here come from a per-process
/// sequence, so tests of one binary never pick the same one.
pub fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base.wrapping_add(n.wrapping_mul(131)) % 12_000) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
}

/// Why a test of a full grid cannot run here, if it cannot.
pub fn grid_skip() -> Option<String> {
    if !is_root() {
        return Some("tfgrid up runs nodes, which need root".into());
    }
    ["runc", "docker-registry", "busybox", "curl"]
        .into_iter()
        .find(|c| !have(c))
        .map(|c| format!("{c} is not installed"))
}

pub struct Grid {
    pub child: Child,
    pub data: PathBuf,
    pub bot: String,
    pub gateway: SocketAddr,
    pub image: String,
    /// node id -> agent pid
    pub node_pids: Vec<(u32, u32)>,
    pub bot_pid: u32,
    /// The bot's S3 endpoint.
    pub s3: SocketAddr,
    pub registry_pid: u32,
    /// Every validator's pid, by validator id (1 first).
    pub registry_pids: Vec<u32>,
    /// The registry's URLs (comma-separated with several validators) and the user's twin, as `up` printed them.
    pub registry: String,
    pub twin: u32,
    pub lines: Vec<String>,
    /// In `--hosts` mode: each node's host namespace, by node number.
    pub host_ns: Vec<String>,
}

impl Drop for Grid {
    fn drop(&mut self) {
        // SIGINT, as Ctrl-C: up stops its children and their workloads.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let t0 = Instant::now();
        while self.child.try_wait().ok().flatten().is_none()
            && t0.elapsed() < Duration::from_secs(15)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn up(dir: &Path) -> Grid {
    up_with(dir, free_port(), &[], &[])
}

/// `tfgrid up` with extra arguments and environment (crash and pause points reach every child).
pub fn up_with(dir: &Path, gw: SocketAddr, extra: &[&str], env: &[(&str, &str)]) -> Grid {
    let data = dir.join("grid");
    let (bot, images, s3) = (free_port(), free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["up", "--data"])
        .arg(&data)
        .args([
            "--registry-listen",
            "127.0.0.1:0",
            "--relay-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--bot-listen",
            &bot.to_string(),
            "--gateway-listen",
            &gw.to_string(),
        ])
        .args(["--images-listen", &images.to_string()])
        .args(["--s3-listen", &s3.to_string()])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("up.stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        lines.push(line.trim().to_string());
        line.clear();
        if lines.last().unwrap().starts_with("Ctrl-C stops the grid") {
            break;
        }
    }
    assert!(
        lines.iter().any(|l| l.starts_with("Ctrl-C")),
        "up did not come up: {lines:?} {}",
        std::fs::read_to_string(dir.join("up.stderr")).unwrap_or_default()
    );
    // Keep reading stdout so up never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while out.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    let field = |prefix: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:?}"))
            .trim()
            .to_string()
    };
    let dashboard = field("dashboard");
    let image = field("images")
        .split("example image ")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .to_string();
    let mut node_pids = Vec::new();
    let (mut bot_pid, mut registry_pid) = (0, 0);
    let mut registry_pids = Vec::new();
    for l in &lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.len() > 4 && w[0].starts_with("node") && w[1] == "pid" {
            node_pids.push((w[4].parse().unwrap(), w[2].parse().unwrap()));
        }
        if w.len() > 2 && w[0] == "bot" && w[1] == "pid" {
            bot_pid = w[2].parse().unwrap();
        }
        if w.len() > 2 && w[0] == "registry" && w[1] == "pid" {
            registry_pid = w[2].parse().unwrap();
        }
        if w.len() > 2 && w[0].starts_with("registry") && w[1] == "pid" {
            registry_pids.push(w[2].parse().unwrap());
        }
    }
    let nodes = extra
        .iter()
        .position(|a| *a == "--nodes")
        .map_or(3, |i| extra[i + 1].parse().unwrap());
    assert_eq!(node_pids.len(), nodes, "{lines:?}");
    // The first gateway's address as it printed it (a host's address in --hosts mode).
    let gateway = lines
        .iter()
        .find_map(|l| l.split("gateway proxy on ").nth(1))
        .map_or(gw, |a| a.trim().parse().unwrap());
    let host_ns = lines
        .iter()
        .filter(|l| l.starts_with("host n"))
        .filter_map(|l| l.split("(namespace ").nth(1))
        .map(|n| n.trim_end_matches(')').to_string())
        .collect();
    let registry = field("registry");
    let twin = field("your twin").parse().unwrap();
    Grid {
        child,
        data,
        bot: dashboard.trim_end_matches('/').to_string(),
        gateway,
        image,
        node_pids,
        bot_pid,
        s3,
        registry_pid,
        registry_pids,
        registry,
        twin,
        lines,
        host_ns,
    }
}

pub fn cli(g: &Grid, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--bot", &g.bot])
        .output()
        .unwrap()
}

pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn inspect(g: &Grid, name: &str) -> serde_json::Value {
    serde_json::from_str(&ok(cli(g, &["inspect", name, "--json"]))).unwrap()
}

pub fn fetch(gw: SocketAddr, host: &str) -> Option<(u16, String)> {
    let out = Command::new("curl")
        .args(["-s", "-m", "3", "-o", "-", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://{gw}/"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.parse().ok()?, body.to_string()))
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn spec_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// GET a registry path as JSON, from the first validator that answers.
pub fn registry_get(g: &Grid, path: &str) -> serde_json::Value {
    for url in g.registry.split(',') {
        let out = Command::new("curl")
            .args(["-s", "-m", "5", &format!("{url}{path}")])
            .output()
            .unwrap();
        if let Ok(v) = serde_json::from_slice(&out.stdout) {
            return v;
        }
    }
    serde_json::Value::Null
}

/// The live contracts of the user's twin, by id.
pub fn live_contracts(g: &Grid) -> Vec<u64> {
    let v = registry_get(
        g,
        &format!("/contracts?twin_id={}&state=live&size=1000", g.twin),
    );
    let mut ids: Vec<u64> = v
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["id"].as_u64()).collect())
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// Every contract the bot's records hold (replicas, gateway routes, names), or None when the bot
/// does not answer.
pub fn held_contracts(g: &Grid) -> Option<Vec<u64>> {
    let o = cli(g, &["ps", "--json"]);
    if !o.status.success() {
        return None;
    }
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    let mut ids = Vec::new();
    for d in list.as_array()? {
        for r in d["replicas"].as_array()? {
            ids.push(r["contract_id"].as_u64()?);
        }
        for r in d["routes"].as_array()? {
            ids.push(r["contract_id"].as_u64()?);
            ids.push(r["name_contract"].as_u64()?);
        }
        for m in d["made"].as_array().into_iter().flatten() {
            ids.push(m["contract_id"].as_u64()?);
        }
    }
    ids.sort_unstable();
    Some(ids)
}

/// The contract ids that workloads on this host still hold, from what the node agents made:
/// runc containers, network namespaces and mounts, each named `c<contract>-<workload>`.
/// Nodes in `dead` (agents killed by the test) are left out: their containers outlive them
/// until the next `up`.
pub fn workload_contracts(g: &Grid, dead: &[u32]) -> Vec<u64> {
    // A workload key: c<contract>-<workload>.
    let contract_of = |s: &str| -> Option<u64> {
        let digits: String = s
            .strip_prefix('c')?
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        s[1 + digits.len()..]
            .starts_with('-')
            .then(|| digits.parse().ok())?
    };
    let mut ids = Vec::new();
    for i in 1..=3u32 {
        if dead.contains(&i) {
            continue;
        }
        let node = g.data.join(format!("nodes/node{i}"));
        for id in containers_of(&g.data, i) {
            ids.extend(contract_of(&id));
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let prefix = node.to_string_lossy().into_owned();
        for m in mounts.lines() {
            let Some(target) = m.split_whitespace().nth(1) else {
                continue;
            };
            if let Some(rest) = target.strip_prefix(&prefix) {
                for part in rest.split('/') {
                    ids.extend(contract_of(part));
                }
            }
        }
    }
    // Network namespaces are named tfgrid-<bridge>-c<contract>-<workload>; this grid's bridges
    // share a prefix derived from its data path.
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let name = l.split_whitespace().next().unwrap_or("");
        let Some((bridge, key)) = name.strip_prefix("tfgrid-").and_then(|r| r.split_once('-'))
        else {
            continue;
        };
        if !bridge.starts_with(&grid_bridge_prefix(g))
            || dead.iter().any(|i| bridge.ends_with(&format!("n{i}")))
        {
            continue;
        }
        ids.extend(contract_of(key));
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `tfg<6 hex>` of this grid's bridges (up derives it from the data path).
fn grid_bridge_prefix(g: &Grid) -> String {
    bridge_prefix(&g.data)
}

pub fn bridge_prefix(data: &Path) -> String {
    let h = blake3::hash(data.to_string_lossy().as_bytes());
    let id = u32::from_le_bytes(h.as_bytes()[..4].try_into().unwrap());
    format!("tfg{:06x}", id & 0xff_ffff)
}

/// Waits until the grid holds exactly what the bot's records name: every live contract of the
/// user's twin is held by a record, and every workload on a live node belongs to a live contract.
/// Returns the live contracts.
pub fn converged(g: &Grid, dead: &[u32], what: &str) -> Vec<u64> {
    let t0 = Instant::now();
    loop {
        let live = live_contracts(g);
        let held = held_contracts(g);
        let workloads = workload_contracts(g, dead);
        let ok = held.as_ref().is_some_and(|h| {
            live.iter().all(|c| h.contains(c)) && workloads.iter().all(|w| live.contains(w))
        });
        if ok {
            return live;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what}: the grid did not converge: live contracts {live:?}, held by records {held:?}, workloads of contracts {workloads:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What a stopped grid left on the host: runc containers of its nodes, mounts under its data,
/// network namespaces and bridges of its nodes.
pub fn host_leftovers(data: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for i in 1..=3u32 {
        for id in containers_of(data, i) {
            found.push(format!("container {id} of node{i}"));
        }
    }
    let base = data.to_string_lossy().into_owned();
    for m in std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
    {
        if m.split_whitespace()
            .nth(1)
            .is_some_and(|t| t.starts_with(&base))
        {
            found.push(format!("mount {m}"));
        }
    }
    let prefix = bridge_prefix(data);
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for l in String::from_utf8_lossy(&ns.stdout).lines() {
        if l.starts_with(&format!("tfgrid-{prefix}")) {
            found.push(format!("netns {l}"));
        }
    }
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    for l in String::from_utf8_lossy(&links.stdout).lines() {
        if l.contains(&format!(": {prefix}")) {
            found.push(format!("link {l}"));
        }
    }
    // VMs: QEMU is named after its node's bridge (`-name tfgrid-<bridge>-<workload>`).
    for pid in qemu_of(&format!("tfgrid-{prefix}")) {
        found.push(format!("qemu process {pid}"));
    }
    found
}

/// Pids of the QEMU processes whose `-name` starts with `prefix`.
pub fn qemu_of(prefix: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"-name" && w[1].starts_with(prefix.as_bytes()))
        {
            pids.push(pid);
        }
    }
    pids
}

/// The runc container ids of node `i` of the grid in `data`.
pub fn containers_of(data: &Path, i: u32) -> Vec<String> {
    let out = Command::new("runc")
        .arg("--root")
        .arg(data.join(format!("nodes/node{i}/runtime")))
        .args(["list", "-q"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// This machine joined to a network with Debian's wireguard-go and wg, from the config
/// `tfgrid network access` printed; removed on drop.
pub struct Machine {
    pub iface: String,
    child: std::process::Child,
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.iface])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn join_machine(dir: &std::path::Path, conf: &str) -> Machine {
    let field = |k: &str| {
        conf.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim_start_matches([' ', '=']).trim().to_string())
            .unwrap_or_else(|| panic!("no {k} in {conf}"))
    };
    let address = field("Address");
    let range = field("AllowedIPs");
    // What `wg setconf` takes: the file less wg-quick's own keys (as `wg-quick strip`).
    let setconf: String = conf
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("Address") && !l.starts_with("MTU"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = dir.join("machine.conf");
    std::fs::write(&path, setconf).unwrap();
    let iface = format!("tfgm{}", std::process::id() % 100_000);
    let child = Command::new("wireguard-go")
        .arg(&iface)
        .env("WG_PROCESS_FOREGROUND", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("wireguard-go");
    let m = Machine { iface, child };
    wait_for("wireguard-go's interface", Duration::from_secs(5), || {
        Command::new("ip")
            .args(["link", "show", &m.iface])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    for args in [
        vec!["wg", "setconf", &m.iface, path.to_str().unwrap()],
        vec!["ip", "addr", "add", &address, "dev", &m.iface],
        vec!["ip", "link", "set", &m.iface, "mtu", "1420", "up"],
        vec!["ip", "route", "add", &range, "dev", &m.iface],
    ] {
        let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
        assert!(st.success(), "{args:?}");
    }
    m
}
