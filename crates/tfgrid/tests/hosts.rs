//! A grid whose nodes are separate hosts (`tfgrid up`, which makes each node a host of its own): network namespaces on a
//! simulated WAN, nodes 1, 4 and 5 each behind a NAT router of its own, node 2 with UDP
//! blocked, node 3 public, node 6 the public gateway. Workloads reach each other across hosts over the overlay, the gateway reaches every
//! replica, each peer uses the path its hosts allow, and a node killed with -9 is healed around
//! with its replacement reachable too.

mod common;
mod grid;

use grid::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

fn skip() -> Option<String> {
    grid_skip().or_else(tfgrid_net::hosts::unavailable)
}

/// GET `http://{ip}:8080/` from inside a network namespace.
fn get_in(ns: &str, ip: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "-m", "5"])
        .arg(format!("http://{ip}:8080/"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (node, address) of each replica of `web`.
fn replicas(g: &Grid) -> Vec<(u64, String)> {
    let d = inspect(g, "web");
    d["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node_id"].as_u64().unwrap(),
                r["ip"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// The network namespace of the container a node runs: the one made for its bridge (the only
/// bridge on that node's host).
fn container_ns(g: &Grid, node: usize) -> String {
    let out = Command::new("ip")
        .args([
            "-n",
            &g.host_ns[node - 1],
            "-o",
            "link",
            "show",
            "type",
            "bridge",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let bridge = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no bridge on node {node}'s host: {text}"))
        .trim_end_matches(':')
        .to_string();
    let prefix = format!("tfgrid-{bridge}-");
    std::fs::read_dir("/var/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no container namespace {prefix}*"))
}

fn paths(g: &Grid, node: u32) -> Vec<(u64, String)> {
    let v: Value =
        serde_json::from_str(&ok(cli(g, &["overlay", &node.to_string(), "--json"]))).unwrap();
    let mut p: Vec<(u64, String)> = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["node_id"].as_u64().unwrap(),
                p["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    p.sort();
    p
}

#[test]
fn workloads_on_separate_hosts_reach_each_other_over_the_overlay() {
    if let Some(why) = skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = up_with(dir.path(), free_port(), &["--nodes", "6"], &[]);
    assert_eq!(g.host_ns.len(), 6, "{:?}", g.lines);
    let spec = spec_file(
        dir.path(),
        "web.yaml",
        &format!(
            "name: web\nservices:\n  web:\n    image: {}\n    command: [/bin/httpd, -f, -p, \"8080\", -h, /www]\n    memory: 64M\n    replicas: 4\n    expose: {{name: web, port: 8080}}\n",
            g.image
        ),
    );
    ok(cli(&g, &["deploy", spec.to_str().unwrap()]));
    let reps = replicas(&g);
    let mut nodes: Vec<u64> = reps.iter().map(|(n, _)| *n).collect();
    nodes.sort();
    // Placement spreads replicas over distinct nodes, lowest id first on a tie: the public, the
    // two NATed and the UDP-blocked host each run one; the gateway's host runs none yet.
    assert_eq!(nodes, [1, 2, 3, 4], "{reps:?}");

    // The very first request through the gateway is answered: the packets that found no peer
    // wait for the look-up instead of being lost to it.
    let first = fetch(g.gateway, "web.gw.local");
    assert_eq!(
        first.as_ref().map(|(c, b)| (*c, b.trim())),
        Some((200, "hello from tfgrid")),
        "{first:?}"
    );
    // The gateway's host reaches every replica, whichever host it is on.
    let gw_ns = &g.host_ns[5];
    for (node, ip) in &reps {
        assert_eq!(
            get_in(gw_ns, ip).as_deref().map(str::trim),
            Some("hello from tfgrid"),
            "replica on node {node} ({ip}) from the gateway's host"
        );
    }
    // Container to container: behind NAT to UDP-blocked (relayed), public to NAT, and between
    // the two NATs.
    let ip_of = |n: u64| reps.iter().find(|(m, _)| *m == n).unwrap().1.clone();
    for (from, to) in [(1, 2), (3, 1), (2, 3), (1, 4)] {
        let ns = container_ns(&g, from);
        assert_eq!(
            get_in(&ns, &ip_of(to as u64)).as_deref().map(str::trim),
            Some("hello from tfgrid"),
            "from node {from}'s container to node {to}'s"
        );
    }
    // Each pair uses the path its hosts allow: UDP between public hosts and from behind NAT
    // (the NAT's mapping is learnt from the node inside), the relay for the UDP-blocked host.
    let direct = |n: u64| (n, "direct".to_string());
    wait_for("the gateway's paths", Duration::from_secs(10), || {
        paths(&g, 6) == [direct(1), (2, "relay".into()), direct(3), direct(4)]
    });
    // A NATed node publishes first the address the registry saw it come from: its router's on
    // the WAN, not its own 192.168 one.
    for n in [1, 4] {
        let rec = registry_get(&g, &format!("/nodes/{n}"));
        let first = rec["overlay"]["endpoints"][0].as_str().unwrap_or_default();
        assert!(first.starts_with("198.18."), "node {n}: {rec}");
    }
    // Two NATed hosts punch through to each other: each publishes its router's address (as the
    // registry sees it) and both send first, so each NAT lets the other's datagrams in.
    let t0 = std::time::Instant::now();
    while !(paths(&g, 1).contains(&direct(4)) && paths(&g, 4).contains(&direct(1))) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no direct path between the NATed hosts:\n{}\n{}",
            ok(cli(&g, &["overlay", "1"])),
            ok(cli(&g, &["overlay", "4"]))
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Node 3's replica loses its network while its node and container stay up: its gateway
    // stops reaching it, and the bot heals it onto a free host (node 5).
    let ns3 = container_ns(&g, 3);
    Command::new("ip")
        .args(["netns", "exec", &ns3, "ip", "link", "set", "eth0", "down"])
        .status()
        .unwrap();
    wait_for(
        "the heal of the unreachable replica",
        Duration::from_secs(30),
        || {
            let r = replicas(&g);
            r.len() == 4 && r.iter().all(|(n, _)| *n != 3)
        },
    );
    let events = ok(cli(&g, &["events", "--deployment", "web"]));
    assert!(
        events.contains("not reachable from its gateway (node 6)"),
        "{events}"
    );
    assert_eq!(fetch(g.gateway, "web.gw.local").map(|r| r.0), Some(200));

    // Node 1 (behind NAT) dies: its replica is healed onto the one host left (the gateway's),
    // and every replica is reachable again.
    let pid1 = g.node_pids.iter().find(|(n, _)| *n == 1).unwrap().1;
    Command::new("kill")
        .args(["-9", &pid1.to_string()])
        .status()
        .unwrap();
    wait_for("the heal off node 1", Duration::from_secs(30), || {
        let r = replicas(&g);
        r.len() == 4 && r.iter().all(|(n, _)| *n != 1)
    });
    for (node, ip) in replicas(&g) {
        assert_eq!(
            get_in(gw_ns, &ip).as_deref().map(str::trim),
            Some("hello from tfgrid"),
            "replica on node {node} ({ip}) after the heal"
        );
    }
    for _ in 0..5 {
        let r = fetch(g.gateway, "web.gw.local");
        assert_eq!(r.as_ref().map(|(c, _)| *c), Some(200), "{r:?}");
    }
}
