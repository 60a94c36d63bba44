//! Faults in the deploy, update, heal and remove flows of a whole `tfgrid up` grid: real
//! processes killed (SIGKILL) or held at chosen steps (`TFGRID_CRASH_AT` / `TFGRID_PAUSE_AT`
//! crash and pause points), and after each fault the grid converges: every live contract of the
//! user's twin is held by a deployment record, every workload on a live node by a live contract,
//! and the deployment is fully there or fully gone.

mod common;
mod grid;
use grid::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Crash and pause points fire once each: a marker file in this directory says a point has
/// fired. The test makes every marker up front (nothing fires) and arms a point by removing it.
struct Points {
    dir: PathBuf,
}

impl Points {
    fn new(dir: &Path, names: &[&str]) -> Points {
        let dir = dir.join("points");
        std::fs::create_dir_all(&dir).unwrap();
        for n in names {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        Points { dir }
    }

    fn arm(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).unwrap();
    }

    fn fired(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }

    /// Waits until a pause point holds its process.
    fn wait_paused(&self, name: &str) {
        let flag = self.dir.join(format!("{name}.paused"));
        wait_for(&format!("pause at {name}"), Duration::from_secs(30), || {
            flag.exists()
        });
    }

    fn release(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(format!("{name}.paused")));
    }
}

fn spec(g: &Grid, name: &str, replicas: u32, expose: bool) -> String {
    let mut s = format!(
        "name: {name}\nservices:\n  web:\n    image: {}\n    memory: 32M\n    replicas: {replicas}\n    volumes: [{{name: data, size: 16M, path: /data}}]\n",
        g.image
    );
    if expose {
        s.push_str(&format!("    expose: {{name: {name}, port: 8080}}\n"));
    }
    s
}

fn deploy_file(g: &Grid, dir: &Path, file: &str, text: &str) -> std::process::Output {
    let p = spec_file(dir, file, text);
    cli(g, &["deploy", p.to_str().unwrap()])
}

fn bot_back(g: &Grid) {
    wait_for("the bot to answer again", Duration::from_secs(30), || {
        cli(g, &["ps"]).status.success()
    });
}

fn events(g: &Grid) -> String {
    ok(cli(g, &["events"]))
}

fn listed(g: &Grid, name: &str) -> bool {
    ok(cli(g, &["ps"]))
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn contracts_of(rec: &serde_json::Value) -> Vec<u64> {
    let mut v: Vec<u64> = rec["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["contract_id"].as_u64().unwrap())
        .collect();
    v.sort_unstable();
    v
}

const BOT_POINTS: [&str; 6] = [
    "bot-after-contract",
    "bot-after-node-deploy",
    "bot-after-replicas",
    "bot-after-commit",
    "bot-heal-after-commit",
    "bot-during-remove",
];

#[test]
fn the_bot_killed_at_each_step_leaves_the_grid_fully_done_or_fully_undone() {
    if let Some(why) = grid_skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let points = Points::new(dir.path(), &BOT_POINTS);
    let once = points.dir.to_string_lossy().into_owned();
    let g = up_with(
        dir.path(),
        free_port(),
        &[],
        &[
            ("TFGRID_CRASH_AT", &BOT_POINTS.join(",")),
            ("TFGRID_CRASH_ONCE_DIR", &once),
        ],
    );
    let v1 = spec(&g, "web", 2, true);

    // A first deploy, killed after its first contract, after a node ran a replica, and after
    // every replica ran: each time the restarted bot takes all of it back.
    for point in [
        "bot-after-contract",
        "bot-after-node-deploy",
        "bot-after-replicas",
    ] {
        points.arm(point);
        let o = deploy_file(&g, dir.path(), "web.yaml", &v1);
        assert!(!o.status.success(), "{point}: the deploy survived its bot");
        assert!(points.fired(point), "{point} was not reached");
        bot_back(&g);
        let live = converged(&g, &[], point);
        assert!(live.is_empty(), "{point}: contracts left live: {live:?}");
        assert!(!listed(&g, "web"), "{point}: web is still listed");
        let ev = events(&g);
        assert!(
            ev.contains("the bot stopped during the deploy; rolled back"),
            "{point}: {ev}"
        );
    }

    // Orphans: a live contract of the twin that no record holds (made here with the user's key,
    // as a crash between a contract and its record, or an answer lost on the way, leaves one)
    // is cancelled by the sweep of a starting bot, and by the running bot's periodic sweep.
    let first = make_orphan(&g, "orphan-a");
    Command::new("pkill")
        .args([
            "-KILL",
            "-f",
            &format!("--data {}", g.data.join("bot").display()),
        ])
        .status()
        .unwrap();
    bot_back(&g);
    wait_for("the start-up sweep", Duration::from_secs(20), || {
        !live_contracts(&g).contains(&first)
    });
    let second = make_orphan(&g, "orphan-b");
    wait_for("the periodic sweep", Duration::from_secs(30), || {
        !live_contracts(&g).contains(&second)
    });
    let ev = events(&g);
    assert!(
        ev.contains(&format!("no deployment holds: [{first}]"))
            && ev.contains(&format!("no deployment holds: [{second}]")),
        "{ev}"
    );

    // Deployed for real; then an update killed before it committed keeps the old version.
    ok(deploy_file(&g, dir.path(), "web.yaml", &v1));
    let before = inspect(&g, "web");
    assert_eq!(fetch(g.gateway, "web.gw.local").map(|r| r.0), Some(200));
    // The new version: the same two replicas with more memory.
    let v2 = spec(&g, "web", 2, true).replace("memory: 32M", "memory: 48M");
    points.arm("bot-after-replicas");
    assert!(!deploy_file(&g, dir.path(), "web2.yaml", &v2)
        .status
        .success());
    bot_back(&g);
    converged(&g, &[], "update killed before its commit");
    let after = inspect(&g, "web");
    assert_eq!(
        contracts_of(&after),
        contracts_of(&before),
        "the old version changed"
    );
    assert_eq!(after["yaml"], before["yaml"]);
    assert!(
        events(&g).contains("the bot stopped during an update or heal"),
        "{}",
        events(&g)
    );
    assert_eq!(fetch(g.gateway, "web.gw.local").map(|r| r.0), Some(200));

    // An update killed right after it committed: the new version stands, the old replicas go.
    points.arm("bot-after-commit");
    assert!(!deploy_file(&g, dir.path(), "web2.yaml", &v2)
        .status
        .success());
    bot_back(&g);
    let live = converged(&g, &[], "update killed after its commit");
    let now = inspect(&g, "web");
    assert!(now["yaml"].as_str().unwrap().contains("48M"));
    for c in contracts_of(&before) {
        assert!(!live.contains(&c), "old replica contract {c} is still live");
    }
    assert_eq!(fetch(g.gateway, "web.gw.local").map(|r| r.0), Some(200));

    // A heal killed after it stored the replacement, before it cancelled the old replica: the
    // restarted bot's queue cancels the old one.
    points.arm("bot-heal-after-commit");
    // A replica that is not on the gateway node (the last one), so the name keeps its gateway.
    let gateway_node = now["routes"][0]["node_id"].as_u64().unwrap();
    let idx = (0..2)
        .find(|i| now["replicas"][*i]["node_id"].as_u64() != Some(gateway_node))
        .unwrap();
    let victim = now["replicas"][idx]["node_id"].as_u64().unwrap() as u32;
    let old = now["replicas"][idx]["contract_id"].as_u64().unwrap();
    let pid = g.node_pids.iter().find(|(n, _)| *n == victim).unwrap().1;
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    wait_for(
        "the heal to reach its crash point",
        Duration::from_secs(30),
        || points.fired("bot-heal-after-commit"),
    );
    bot_back(&g);
    let live = converged(&g, &[victim], "heal killed after its commit");
    assert!(
        !live.contains(&old),
        "the replaced replica's contract {old} is live"
    );
    let healed = inspect(&g, "web");
    assert_ne!(
        healed["replicas"][idx]["node_id"].as_u64(),
        Some(victim.into())
    );
    // The name points at the replicas as they are now (the re-point the crash cut short).
    let backends_match = || {
        let w = inspect(&g, "web");
        let mut want: Vec<String> = w["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("http://{}:8080", r["ip"].as_str().unwrap()))
            .collect();
        let mut have: Vec<String> = w["routes"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().to_string())
            .collect();
        want.sort();
        have.sort();
        want == have
    };
    wait_for(
        "the route to point at the healed replicas",
        Duration::from_secs(10),
        backends_match,
    );
    let t0 = Instant::now();
    while fetch(g.gateway, "web.gw.local").map(|r| r.0) != Some(200) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the healed web does not serve: {:?}\n{}\n{}",
            fetch(g.gateway, "web.gw.local"),
            events(&g),
            inspect(&g, "web")
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // rm killed mid-way: the restarted bot finishes it and never redeploys.
    points.arm("bot-during-remove");
    assert!(!cli(&g, &["rm", "web"]).status.success());
    bot_back(&g);
    let live = converged(&g, &[victim], "rm killed mid-way");
    assert!(live.is_empty(), "contracts left live after rm: {live:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(!listed(&g, "web"), "the removed deployment came back");
    assert!(live_contracts(&g).is_empty());
    assert!(workload_contracts(&g, &[victim]).is_empty());
    assert_eq!(fetch(g.gateway, "web.gw.local").map(|r| r.0), Some(404));
}

/// `tfgrid deploy FILE` on a thread; join it for the output.
fn deploy_in_background(g: &Grid, file: PathBuf) -> std::thread::JoinHandle<std::process::Output> {
    let bot = g.bot.clone();
    std::thread::spawn(move || {
        Command::new(BIN)
            .args(["deploy", file.to_str().unwrap(), "--bot", &bot])
            .output()
            .unwrap()
    })
}

/// A name contract made with the user's key, outside the bot: an orphan to the bot.
fn make_orphan(g: &Grid, name: &str) -> u64 {
    let id = tfgrid_core::Identity::load(&g.data.join("user.key")).unwrap();
    let signer = tfgrid_registry_client::TwinSigner::new(
        id,
        tfgrid_registry_client::RegistryClient::new(&g.registry),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt
        .block_on(signer.submit(tfgrid_core::tx::Call::CreateNameContract { name: name.into() }))
        .unwrap();
    match r.outcome {
        tfgrid_core::tx::Outcome::ContractCreated { contract_id, .. } => contract_id,
        o => panic!("{o:?}"),
    }
}

/// A started child that is killed when the test ends, also when it panics.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn clients_registries_and_nodes_that_fail_mid_deploy() {
    if let Some(why) = grid_skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let points = Points::new(d, &["bot-after-replicas", "node-during-deploy"]);
    let once = points.dir.to_string_lossy().into_owned();
    let g = up_with(
        d,
        free_port(),
        &[],
        &[
            ("TFGRID_PAUSE_AT", "bot-after-replicas"),
            ("TFGRID_CRASH_AT", "node-during-deploy"),
            ("TFGRID_CRASH_ONCE_DIR", &once),
        ],
    );

    // A client that gives up (curl -m 1) does not cut the deploy short.
    points.arm("bot-after-replicas");
    let file = spec_file(d, "web.yaml", &spec(&g, "web", 2, true));
    let mut curl = Command::new("curl")
        .args([
            "-s",
            "-m",
            "1",
            "-X",
            "POST",
            "-H",
            "content-type: application/yaml",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("{}/api/deployments", g.bot))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    points.wait_paused("bot-after-replicas");
    let st = curl.wait().unwrap();
    assert_eq!(st.code(), Some(28), "curl did not time out");
    points.release("bot-after-replicas");
    wait_for("web to run", Duration::from_secs(30), || {
        let ps = ok(cli(&g, &["ps"]));
        ps.contains("running") && ps.contains("2/2")
    });
    assert_eq!(fetch(g.gateway, "web.gw.local").map(|r| r.0), Some(200));
    converged(&g, &[], "client gave up");

    // Ctrl-C on `tfgrid deploy` says what it leaves, and the deploy goes on.
    points.arm("bot-after-replicas");
    let other = spec_file(d, "other.yaml", &spec(&g, "other", 1, false));
    let mut child = Command::new(BIN)
        .args(["deploy", other.to_str().unwrap(), "--bot", &g.bot])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    points.wait_paused("bot-after-replicas");
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let st = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(st.code(), Some(130), "{err}");
    assert!(
        err.contains("goes on in your bot") && err.contains("tfgrid rm other"),
        "{err}"
    );
    // `tfgrid rm` of a deployment still being made waits for it, then takes all of it back.
    let bot = g.bot.clone();
    let rm = std::thread::spawn(move || {
        Command::new(BIN)
            .args(["rm", "other", "--bot", &bot])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!rm.is_finished(), "rm did not wait for the deploy");
    points.release("bot-after-replicas");
    let o = rm.join().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("removed other") && out.contains("contracts cancelled"),
        "{out}"
    );
    let ev = ok(cli(&g, &["events", "--deployment", "other"]));
    let (deployed, removed) = (ev.find("deployed").unwrap(), ev.find("removed").unwrap());
    assert!(deployed < removed, "{ev}");
    let live = converged(&g, &[], "after rm other");
    assert!(!listed(&g, "other"));
    assert_eq!(
        live.len(),
        contracts_of(&inspect(&g, "web")).len() + 2,
        "{live:?}"
    );

    // The registry killed mid-deploy: the cancels of the rollback are queued, said so, and
    // done once a registry answers again.
    points.arm("bot-after-replicas");
    let deploy = deploy_in_background(&g, spec_file(d, "rk.yaml", &spec(&g, "rk", 1, true)));
    points.wait_paused("bot-after-replicas");
    Command::new("kill")
        .args(["-9", &g.registry_pid.to_string()])
        .status()
        .unwrap();
    wait_for("the registry to die", Duration::from_secs(5), || {
        !alive(g.registry_pid)
    });
    points.release("bot-after-replicas");
    let o = deploy.join().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(
        err.contains("deploy failed") && err.contains("not cancelled yet"),
        "{err}"
    );
    assert!(!listed(&g, "rk"));
    let addr = g.registry.trim_start_matches("http://").to_string();
    let _registry = Killed(
        Command::new(BIN)
            .args(["registry", "--data"])
            .arg(g.data.join("registry"))
            // As `up` runs it: nodes report every 10 s.
            .args(["--listen", &addr, "--down-after-ms", "30000"])
            .args(["--report-interval-ms", "10000"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("registry2.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the registry to answer", Duration::from_secs(10), || {
        !registry_get(&g, "/stats").is_null()
    });
    converged(&g, &[], "registry killed mid-deploy");
    assert!(
        events(&g).contains("rk") && !listed(&g, "rk"),
        "{}",
        events(&g)
    );

    // Healing goes on while another deployment's deploy is held mid-way.
    points.arm("bot-after-replicas");
    let slow_deploy =
        deploy_in_background(&g, spec_file(d, "slow.yaml", &spec(&g, "slow", 1, false)));
    points.wait_paused("bot-after-replicas");
    let web = inspect(&g, "web");
    let victim = web["replicas"][0]["node_id"].as_u64().unwrap() as u32;
    let pid = g.node_pids.iter().find(|(n, _)| *n == victim).unwrap().1;
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    wait_for("web/0 to move", Duration::from_secs(30), || {
        inspect(&g, "web")["replicas"][0]["node_id"].as_u64() != Some(victim.into())
    });
    assert!(
        points.dir.join("bot-after-replicas.paused").exists(),
        "the heal waited for the other deploy"
    );
    points.release("bot-after-replicas");
    let o = slow_deploy.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    converged(&g, &[victim], "heal beside a held deploy");
    ok(cli(&g, &["rm", "slow"]));

    // A node killed while it deploys: its replica fails within seconds (the bot pings the node
    // while it waits), not after the 120 s deploy timeout, and nothing is left behind.
    points.arm("node-during-deploy");
    let t0 = Instant::now();
    let o = deploy_file(&g, d, "nd.yaml", &spec(&g, "nd", 1, false));
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(points.fired("node-during-deploy"));
    assert!(err.contains("stopped answering"), "{err}");
    // Behaviour, not a benchmark: the old code waited the whole 120 s deploy timeout.
    assert!(took < Duration::from_secs(30), "the deploy took {took:?}");
    let dead: Vec<u32> = g
        .node_pids
        .iter()
        .filter(|(_, p)| !alive(*p))
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    converged(&g, &dead, "node killed mid-deploy");
    assert!(!listed(&g, "nd"));
}

/// `curl` with `args`, returning (status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "20", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap_or(0), body.to_string())
}

/// The bot's API takes orders only from its user: cross-origin writes, specs in a type a page can
/// send, bad specs and huge or deep YAML are refused with a clear error and change nothing; a bot
/// with a token answers nobody without it, and no bot listens beyond loopback without one.
#[test]
fn the_bot_api_refuses_what_its_user_did_not_send() {
    if !common::have("curl") {
        eprintln!("skipped: curl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (bot, reg, relay, s3) = (free_port(), free_port(), free_port(), free_port());
    let mut up = Killed(
        Command::new(BIN)
            .args(["up", "--nodes", "0", "--data"])
            .arg(dir.path().join("grid"))
            .args(["--bot-listen", &bot.to_string()])
            .args(["--s3-listen", &s3.to_string()])
            .args(["--registry-listen", &reg.to_string()])
            .args(["--relay-listen", &relay.to_string()])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("up.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut out = std::io::BufReader::new(up.0.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        if std::io::BufRead::read_line(&mut out, &mut l).unwrap() == 0 {
            panic!(
                "up stopped: {lines:?} {}",
                std::fs::read_to_string(dir.path().join("up.log")).unwrap()
            );
        }
        if l.starts_with("Ctrl-C") {
            break;
        }
        lines.push(l);
    }
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let api = format!("http://{bot}/api/deployments");
    let good = "name: a\nservices:\n  s:\n    image: 127.0.0.1:5000/web:latest\n";

    // A page on another site POSTs a spec as text/plain (no preflight): refused.
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Origin: http://evil.example",
        "-H",
        "content-type: text/plain",
        "--data-binary",
        good,
        &api,
    ]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("cross_origin"), "{body}");
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        &format!("Origin: http://{bot}"),
        "-H",
        "Sec-Fetch-Site: cross-site",
        "-H",
        "content-type: application/yaml",
        "--data-binary",
        good,
        &api,
    ]);
    assert_eq!(code, 403, "{body}");
    let (code, body) = curl(&[
        "-X",
        "DELETE",
        "-H",
        "Origin: http://evil.example",
        &format!("{api}/a"),
    ]);
    assert_eq!(code, 403, "{body}");
    // Types a form can send are not specs.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ] {
        let (code, body) = curl(&[
            "-X",
            "POST",
            "-H",
            &format!("content-type: {ct}"),
            "--data-binary",
            good,
            &api,
        ]);
        assert_eq!(code, 415, "{ct}: {body}");
    }
    // A bad spec: 400 naming the field, before anything is placed or contracted.
    let bad = "name: a\nservices:\n  s:\n    image: 127.0.0.1:5000/web:latest\n    volumes: [{name: v, size: 1G, path: /proc}]\n";
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/yaml",
        "--data-binary",
        bad,
        &api,
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("services.s.volumes[0].path"), "{body}");
    // The same through JSON.
    let json = serde_json::json!({ "yaml": bad }).to_string();
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "--data-binary",
        &json,
        &api,
    ]);
    assert_eq!(code, 400, "{body}");
    // Huge and deep YAML are refused; the API keeps answering while they are.
    let deep = format!(
        "name: a\nservices: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_file = dir.path().join("deep.yaml");
    std::fs::write(&deep_file, &deep).unwrap();
    let api2 = api.clone();
    let df = deep_file.clone();
    let floods: Vec<_> = (0..2)
        .map(|_| {
            let (api, df) = (api2.clone(), df.clone());
            std::thread::spawn(move || {
                curl(&[
                    "-X",
                    "POST",
                    "-H",
                    "content-type: application/yaml",
                    "--data-binary",
                    &format!("@{}", df.display()),
                    &api,
                ])
            })
        })
        .collect();
    let (code, _) = curl(&[&api]);
    assert_eq!(code, 200);
    for f in floods {
        let (code, body) = f.join().unwrap();
        assert_eq!(code, 400, "{body}");
        assert!(
            body.contains("at most") || body.contains("levels deep"),
            "{body}"
        );
    }
    let nested = format!(
        "name: a\nservices: {}{}\n",
        "[".repeat(100),
        "]".repeat(100)
    );
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/yaml",
        "--data-binary",
        &nested,
        &api,
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("levels deep"), "{body}");
    let (code, body) = curl(&[&api]);
    assert_eq!((code, body.trim()), (200, "[]"), "something was made");

    // A bot with a token answers nobody without it.
    let relay_url = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("relay"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let reg_url = format!("http://{reg}");
    let token = "0123456789abcdef0123";
    let tb = free_port();
    let key = dir.path().join("k2");
    // `tfgrid bot` against this grid, with its own data directory.
    let bot_cmd = |data: &str| {
        let mut c = Command::new(BIN);
        c.args([
            "bot",
            "--s3-listen",
            "off",
            "--registry",
            &reg_url,
            "--relay",
            &relay_url,
            "--key",
        ])
        .arg(&key)
        .arg("--data")
        .arg(dir.path().join(data));
        c
    };
    let mut bot2 = Killed(
        bot_cmd("b2")
            .args(["--listen", &tb.to_string(), "--token", token])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("bot2.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(bot2.0.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.starts_with("bot listening"), "{first}");
    let (code, body) = curl(&[&format!("http://{tb}/api/deployments")]);
    assert_eq!(code, 401, "{body}");
    let (code, _) = curl(&[
        "-H",
        "Authorization: Bearer wrong-token-wrong-t",
        &format!("http://{tb}/api/deployments"),
    ]);
    assert_eq!(code, 401);
    let (code, _) = curl(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        &format!("http://{tb}/api/deployments"),
    ]);
    assert_eq!(code, 200);
    let o = Command::new(BIN)
        .args(["ps", "--bot", &format!("http://{tb}")])
        .env("TFGRID_BOT_TOKEN", token)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Beyond loopback without a token: refused before it listens.
    let o = bot_cmd("b3")
        .args(["--listen", "0.0.0.0:0"])
        .env_remove("TFGRID_BOT_TOKEN")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no token"), "{err}");
    drop(bot2);
    let _ = Command::new("kill")
        .args(["-INT", &up.0.id().to_string()])
        .status();
    let _ = up.0.wait();
}
