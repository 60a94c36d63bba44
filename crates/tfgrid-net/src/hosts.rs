//! Separate machines on one: each host is a network namespace with its own address on a simulated
//! WAN (a bridge in a namespace of its own). A host is public, behind a NAT router (its own
//! namespace, MASQUERADE), or public with UDP dropped on its uplink, so it can only reach peers
//! through the relay. `tfgrid up`, the overlay's tests and `tfgrid bench net` build their hosts
//! with this, so they all mean the same thing by "another machine".
//!
//! Addresses come from 198.18.0.0/15, the range set aside for benchmarking networks (RFC 2544):
//! the WAN of a lab is one /24 of it, chosen so that two labs on one machine do not overlap.
//! Nothing here sends a packet: it only makes namespaces, links, addresses and firewall rules.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Its own address on the WAN.
    Public,
    /// Behind a router that masquerades it: nothing on the WAN can open a connection to it.
    Nat,
    /// Its own address on the WAN, but UDP in and out of its uplink is dropped.
    UdpBlocked,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// The network namespace (`ip netns`) the host's processes run in.
    pub ns: String,
    pub kind: HostKind,
    /// The host's own address (a private one behind NAT).
    pub addr: Ipv4Addr,
    /// Where the WAN sees it: its own address, or its router's.
    pub wan_addr: Ipv4Addr,
    /// The namespace of its NAT router, behind NAT.
    pub router: Option<String>,
}

/// A set of hosts on one WAN. Dropping it kills every process in its namespaces and deletes them.
pub struct Lab {
    tag: String,
    wan_ns: String,
    third: u8,
    namespaces: Vec<String>,
    hosts: Vec<Host>,
    root: Option<Ipv4Addr>,
}

static LABS: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "tfl";

fn ip(args: &[&str]) -> Result<String, Error> {
    run("ip", args)
}

fn run(prog: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(Error::io(prog.to_string()))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft(ns: &str, ruleset: &str) -> Result<(), Error> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "nft", "-f", "-"]);
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().map_err(Error::io("nft"))?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(ruleset.as_bytes())
        .map_err(Error::io("nft stdin"))?;
    let out = child.wait_with_output().map_err(Error::io("nft"))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "nft in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// What a lab needs from the machine, or why it cannot be built here.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces)".into());
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("needs `{tool}` (iproute2, nftables)"));
        }
    }
    None
}

impl Lab {
    pub fn new() -> Result<Lab, Error> {
        sweep_stale();
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{PREFIX}{:x}x{n:x}", std::process::id());
        // The WAN /24: the first 198.18.x.0/24 no route on this machine already covers.
        let routes = ip(&["-4", "route", "show"]).unwrap_or_default();
        let seed = blake3::hash(tag.as_bytes()).as_bytes()[0];
        let third = (0..=255u8)
            .map(|k| seed.wrapping_add(k))
            .find(|k| !routes.contains(&format!("198.18.{k}.")))
            .ok_or_else(|| Error::Invalid("no free 198.18.x.0/24 for a lab's WAN".into()))?;
        let wan_ns = format!("{tag}-wan");
        let mut lab = Lab {
            tag,
            wan_ns: wan_ns.clone(),
            third,
            namespaces: Vec::new(),
            hosts: Vec::new(),
            root: None,
        };
        lab.add_ns(&wan_ns)?;
        ip(&["-n", &wan_ns, "link", "add", "wan", "type", "bridge"])?;
        ip(&["-n", &wan_ns, "link", "set", "wan", "up"])?;
        Ok(lab)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The WAN's address for the `i`th thing on it (1: the machine itself, 10+: hosts and
    /// routers).
    fn wan(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.third, i as u8)
    }

    fn wan_net(&self) -> String {
        format!("198.18.{}.0/24", self.third)
    }

    fn add_ns(&mut self, ns: &str) -> Result<(), Error> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Plugs `ns` into the WAN bridge as `dev` with address `addr`.
    fn uplink(&self, ns: &str, port: &str, dev: &str, addr: Ipv4Addr) -> Result<(), Error> {
        let w = &self.wan_ns;
        ip(&[
            "-n", w, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns,
        ])?;
        ip(&["-n", w, "link", "set", port, "master", "wan", "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        Ok(())
    }

    pub fn add_host(&mut self, name: &str, kind: HostKind) -> Result<Host, Error> {
        if self.hosts.len() >= 80 || name.is_empty() || name.len() > 20 {
            return Err(Error::Invalid(format!(
                "host {name:?}: 1 to 20 bytes, 80 hosts"
            )));
        }
        let i = self.hosts.len() + 1;
        let ns = format!("{}-{name}", self.tag);
        self.add_ns(&ns)?;
        let host = match kind {
            HostKind::Public | HostKind::UdpBlocked => {
                let addr = self.wan(10 + i);
                // No default route: the WAN's /24 is all a host can reach, so nothing a test runs
                // can send a packet past the lab.
                self.uplink(&ns, &format!("h{i}"), "eth0", addr)?;
                if kind == HostKind::UdpBlocked {
                    nft(
                        &ns,
                        "table inet tfgrid_lab {\n\
                         chain in { type filter hook input priority 0; iifname \"eth0\" meta l4proto udp drop; }\n\
                         chain out { type filter hook output priority 0; oifname \"eth0\" meta l4proto udp drop; }\n\
                         }\n",
                    )?;
                }
                Host {
                    name: name.into(),
                    ns,
                    kind,
                    addr,
                    wan_addr: addr,
                    router: None,
                }
            }
            HostKind::Nat => {
                let router = format!("{}-r{i}", self.tag);
                self.add_ns(&router)?;
                let wan_addr = self.wan(100 + i);
                self.uplink(&router, &format!("r{i}"), "wan0", wan_addr)?;
                let lan = Ipv4Addr::new(192, 168, i as u8, 1);
                let addr = Ipv4Addr::new(192, 168, i as u8, 2);
                ip(&[
                    "-n", &router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ])?;
                ip(&[
                    "-n",
                    &router,
                    "addr",
                    "add",
                    &format!("{lan}/24"),
                    "dev",
                    "lan0",
                ])?;
                ip(&["-n", &router, "link", "set", "lan0", "up"])?;
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
                ip(&[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &self.wan_net(),
                    "via",
                    &lan.to_string(),
                ])?;
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &router,
                        "sysctl",
                        "-qw",
                        "net.ipv4.ip_forward=1",
                    ],
                )?;
                // Inbound only for what the host opened, as a home router does. Unsolicited
                // datagrams to the router itself are dropped too: one that reached no socket
                // would otherwise leave a conntrack entry that makes the masquerade give the
                // host's next outbound flow to that sender a different port (Linux's clash
                // handling), which is what breaks hole punching through real Linux routers
                // without such a rule.
                nft(
                    &router,
                    "table ip tfgrid_nat {\n\
                     chain post { type nat hook postrouting priority 100; oifname \"wan0\" masquerade; }\n\
                     chain forward { type filter hook forward priority 0; policy drop;\n\
                       iifname \"lan0\" accept; ct state established,related accept; }\n\
                     chain input { type filter hook input priority 0; policy drop;\n\
                       iifname \"lan0\" accept; iifname \"lo\" accept; ct state established,related accept; }\n\
                     }\n",
                )?;
                Host {
                    name: name.into(),
                    ns,
                    kind,
                    addr,
                    wan_addr,
                    router: Some(router),
                }
            }
        };
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Forwards TCP `port` of a NAT host's router to the same port of the host, as a farmer
    /// sets up a home router for a service that must be reachable (a node's zdb). Nothing else
    /// gets in. A host with its own address needs none.
    pub fn forward_tcp(&self, host: &Host, port: u16) -> Result<(), Error> {
        let Some(router) = &host.router else {
            return Ok(());
        };
        nft(
            router,
            &format!(
                "table ip tfgrid_fwd {{\n\
                 chain pre {{ type nat hook prerouting priority -100; iifname \"wan0\" tcp dport {port} dnat to {addr}; }}\n\
                 }}\n\
                 add rule ip tfgrid_nat forward iifname \"wan0\" ip daddr {addr} tcp dport {port} accept\n",
                addr = host.addr
            ),
        )
    }

    /// Joins the machine itself to the WAN (at `198.18.x.1`), so processes outside every host
    /// (a registry, a relay, a browser) reach the hosts and the hosts reach them. Returns that
    /// address.
    pub fn connect_machine(&mut self) -> Result<Ipv4Addr, Error> {
        if let Some(a) = self.root {
            return Ok(a);
        }
        let dev = format!("{}m", self.tag);
        let dev = &dev[dev.len().saturating_sub(15)..];
        let a = self.wan(1);
        ip(&[
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            "machine0",
            "netns",
            &self.wan_ns,
        ])?;
        ip(&[
            "-n",
            &self.wan_ns,
            "link",
            "set",
            "machine0",
            "master",
            "wan",
            "up",
        ])?;
        ip(&["addr", "add", &format!("{a}/24"), "dev", dev])?;
        ip(&["link", "set", dev, "up"])?;
        self.root = Some(a);
        Ok(a)
    }

    /// Makes `cmd` run on `host` by entering its network namespace alone. Unlike `ip netns
    /// exec` (see [`command`](Self::command)), which also remounts /sys for the namespace and so
    /// hides the cgroup mounts under it, this leaves the mounts as they are: what a node agent
    /// needs to run containers.
    pub fn enter(&self, host: &Host, cmd: &mut Command) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let path = format!("/var/run/netns/{}", host.ns);
        let f = std::fs::File::open(&path).map_err(Error::io(path))?;
        // SAFETY: setns is async-signal-safe and the closure allocates nothing; the file stays
        // open (close-on-exec) for as long as the command does.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// A command that runs on `host`.
    pub fn command(&self, host: &Host, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host.ns, program]);
        c
    }
}

fn delete_ns(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Deletes the namespaces of labs whose process is gone (a test that was killed cannot run its
/// drop).
fn sweep_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = ns.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest
            .split('x')
            .next()
            .and_then(|h| u32::from_str_radix(h, 16).ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete_ns(ns);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            delete_ns(ns);
        }
    }
}
