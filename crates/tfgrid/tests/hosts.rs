//! A grid whose nodes are separate hosts (`tfgrid up`, which makes each node a host of its own): network namespaces on a
//! simulated WAN, nodes 1, 4 and 5 each behind a NAT router of its own, node 2 with UDP
//! blocked, node 3 public, node 6 the public gateway. Workloads reach each other across hosts over the overlay, the gateway reaches every
//! replica, each peer uses the path its hosts allow, and a node killed with -9 is healed around
//! with its replacement reachable too.
//!
//! The replicas live in their deployment's private network: services reach each other there by
//! name, another user's containers (on the same node or not) and the hosts themselves do not
//! reach them, and the user's own machine joins the network with wireguard-go through
//! `tfgrid network access`.

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

/// GET `http://{host}:8080/` from inside a container (its own /etc/hosts names the services),
/// with the image's busybox nc (its wget crashes in Debian's static build).
fn get_by_name(g: &Grid, node: u32, container: &str, host: &str) -> Option<String> {
    let cmd = format!("(printf 'GET / HTTP/1.0\\r\\n\\r\\n'; sleep 1) | nc -w 3 {host} 8080");
    let out = Command::new("runc")
        .arg("--root")
        .arg(g.data.join(format!("nodes/node{node}/runtime")))
        .args(["exec", container, "/bin/sh", "-c", &cmd])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.contains("200 OK")
        .then(|| text.lines().last().unwrap_or_default().to_string())
}

/// The network namespace of node `node`'s container whose workload key ends in `-{workload}`.
fn ns_of(g: &Grid, node: u32, workload: &str) -> String {
    let id = containers_of(&g.data, node)
        .into_iter()
        .find(|c| c.ends_with(&format!("-{workload}")))
        .unwrap_or_else(|| panic!("no {workload} container on node {node}"));
    std::fs::read_dir("/var/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("tfgrid-") && n.ends_with(&format!("-{id}")))
        .unwrap_or_else(|| panic!("no namespace for {id}"))
}

/// A second user: their own key and bot, on the same grid.
struct OtherBot {
    child: std::process::Child,
    url: String,
}

impl Drop for OtherBot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn other_bot(g: &Grid, dir: &std::path::Path) -> OtherBot {
    let relay = g
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("relay"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let listen = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tfgrid"))
        .args([
            "bot",
            "--s3-listen",
            "off",
            "--registry",
            &g.registry,
            "--relay",
            &relay,
        ])
        .arg("--key")
        .arg(dir.join("bob.key"))
        .arg("--data")
        .arg(dir.join("bob"))
        .args(["--listen", &listen.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("bob.stderr")).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://{listen}");
    wait_for("the second user's bot", Duration::from_secs(20), || {
        Command::new("curl")
            .args(["-sf", "-m", "1", &format!("{url}/api/info")])
            .status()
            .is_ok_and(|s| s.success())
    });
    OtherBot { child, url }
}

/// GET `http://{ip}:8080/` from this machine, through its WireGuard interface only (never its
/// default route).
fn get_here(m: &Machine, ip: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "--interface", &m.iface])
        .arg(format!("http://{ip}:8080/"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
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

fn paths(g: &Grid, node: u32) -> Vec<(u64, String)> {
    let v: Value =
        serde_json::from_str(&ok(cli(g, &["overlay", &node.to_string(), "--json"]))).unwrap();
    let mut p: Vec<(u64, String)> = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        // Peers that are not nodes (the users' machines that join a network here) left out.
        .filter_map(|p| Some((p["node_id"].as_u64()?, p["path"].as_str()?.to_string())))
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
    // The replicas are in the deployment's network: the gateway's host itself does not reach
    // them (only its proxy does, from its address in the network).
    let gw_ns = &g.host_ns[5];
    for (node, ip) in &reps {
        assert_eq!(
            get_in(gw_ns, ip),
            None,
            "replica on node {node} ({ip}) reached from the gateway's host"
        );
    }
    // The user's own machine joins the network with standard WireGuard (Debian's wireguard-go
    // and wg) through a public node, and reaches every replica, whichever host it is on.
    let conf = ok(cli(
        &g,
        &[
            "network",
            "access",
            "web",
            "--key",
            dir.path().join("machine.key").to_str().unwrap(),
        ],
    ));
    assert!(conf.contains("through node 6"), "{conf}");
    let machine = join_machine(dir.path(), &conf);
    for (node, ip) in &reps {
        wait_for(
            &format!("the replica on node {node} from the user's machine"),
            Duration::from_secs(10),
            || get_here(&machine, ip).as_deref() == Some("hello from tfgrid"),
        );
    }
    // A service of another deployment in the same network reaches web by name, across hosts
    // (its /etc/hosts lists every replica of each service of the network); web reaches it back.
    let api = spec_file(
        dir.path(),
        "api.yaml",
        &format!(
            "name: api\nnetwork: web\nservices:\n  api:\n    image: {}\n    command: [/bin/httpd, -f, -p, \"8080\", -h, /www]\n    memory: 32M\n",
            g.image
        ),
    );
    ok(cli(&g, &["deploy", api.to_str().unwrap()]));
    let api_node = inspect(&g, "api")["replicas"][0]["node_id"]
        .as_u64()
        .unwrap() as u32;
    assert!(
        !nodes.contains(&(api_node as u64)),
        "api on node {api_node}"
    );
    let api_c = containers_of(&g.data, api_node)
        .into_iter()
        .find(|c| c.ends_with("-api"))
        .unwrap();
    wait_for("api reaching web by name", Duration::from_secs(10), || {
        get_by_name(&g, api_node, &api_c, "web").as_deref() == Some("hello from tfgrid")
    });
    let web_c = containers_of(&g.data, 2)
        .into_iter()
        .find(|c| c.ends_with("-web"))
        .unwrap();
    wait_for(
        "web (relayed host) reaching api by name",
        Duration::from_secs(10),
        || get_by_name(&g, 2, &web_c, "api").as_deref() == Some("hello from tfgrid"),
    );
    let hosts = Command::new("runc")
        .arg("--root")
        .arg(g.data.join("nodes/node2/runtime"))
        .args(["exec", &web_c, "cat", "/etc/hosts"])
        .output()
        .unwrap();
    let hosts = String::from_utf8_lossy(&hosts.stdout);
    for (_, ip) in &reps {
        assert!(hosts.contains(&format!("{ip}\tweb")), "{hosts}");
    }

    // Container to container: behind NAT to UDP-blocked (relayed), public to NAT, and between
    // the two NATs.
    let ip_of = |n: u64| reps.iter().find(|(m, _)| *m == n).unwrap().1.clone();
    for (from, to) in [(1, 2), (3, 1), (2, 3), (1, 4)] {
        let ns = ns_of(&g, from, "web");
        assert_eq!(
            get_in(&ns, &ip_of(to as u64)).as_deref().map(str::trim),
            Some("hello from tfgrid"),
            "from node {from}'s container to node {to}'s"
        );
    }
    // Another user's containers, one on every host: they reach their own (node 1 and 2 are
    // peers already, so each widens the other's addresses to the new network's subnets), never
    // the first user's, not on the same node and not across hosts.
    let bob = other_bot(&g, dir.path());
    let probe = spec_file(
        dir.path(),
        "probe.yaml",
        &format!(
            "name: probe\nservices:\n  probe:\n    image: {}\n    command: [/bin/httpd, -f, -p, \"8080\", -h, /www]\n    memory: 16M\n    replicas: 6\n",
            g.image
        ),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tfgrid"))
        .args(["deploy", probe.to_str().unwrap(), "--bot", &bob.url])
        .output()
        .unwrap();
    ok(out);
    let bob_d: Value = serde_json::from_str(&ok(Command::new(env!("CARGO_BIN_EXE_tfgrid"))
        .args(["inspect", "probe", "--json", "--bot", &bob.url])
        .output()
        .unwrap()))
    .unwrap();
    let bob_ip = |n: u64| {
        bob_d["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node_id"].as_u64() == Some(n))
            .map(|r| r["ip"].as_str().unwrap().to_string())
            .unwrap()
    };
    let bob_ns = ns_of(&g, 1, "probe");
    assert_eq!(
        get_in(&bob_ns, &bob_ip(2)).as_deref().map(str::trim),
        Some("hello from tfgrid"),
        "bob's own replica across hosts"
    );
    for to in [1, 2, 3] {
        assert_eq!(
            get_in(&bob_ns, &ip_of(to)),
            None,
            "bob's container on node 1 reached web's replica on node {to}"
        );
    }
    // ... nor the node's own host (only its zdb port is open to containers): a server there
    // answers the host itself, not the container.
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "host\n").unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &g.host_ns[0],
                "busybox",
                "httpd",
                "-f",
                "-p",
                "18181",
                "-h",
            ])
            .arg(&www)
            .spawn()
            .unwrap(),
    );
    let bridge_addr = {
        let v = registry_get(&g, "/nodes/1");
        let p = v["workload_prefix"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let mut o: Vec<u8> = p.split('.').map(|x| x.parse().unwrap()).collect();
        o[3] += 1;
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])
    };
    let from_ns = |ns: &str| {
        Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-s", "-m", "3"])
            .arg(format!("http://{bridge_addr}:18181/"))
            .output()
            .unwrap()
    };
    wait_for("the host's own server", Duration::from_secs(5), || {
        from_ns(&g.host_ns[0]).status.success()
    });
    let to_host = from_ns(&bob_ns);
    assert!(
        !to_host.status.success(),
        "a container reached its node's host"
    );
    // Containers reach the world outside the grid through their node (MASQUERADE): here the
    // registry, on this machine's WAN address, from behind node 1's NAT.
    let outside = g.registry.trim_start_matches("http://").to_string();
    let wan = Command::new("ip")
        .args(["netns", "exec", &bob_ns, "curl", "-s", "-m", "5"])
        .arg(format!("http://{outside}/health"))
        .output()
        .unwrap();
    assert!(wan.status.success(), "{wan:?}");
    drop(bob);

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
    let ns3 = ns_of(&g, 3, "web");
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
        wait_for(
            &format!("the healed replica on node {node} from the user's machine"),
            Duration::from_secs(10),
            || get_here(&machine, &ip).as_deref() == Some("hello from tfgrid"),
        );
    }
    drop(machine);
    for _ in 0..5 {
        let r = fetch(g.gateway, "web.gw.local");
        assert_eq!(r.as_ref().map(|(c, _)| *c), Some(200), "{r:?}");
    }
}
