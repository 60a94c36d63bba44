//! Object storage on `tfgrid up`, end to end: eight nodes on hosts of their own (some behind
//! NAT), a 4+2 pool made with `tfgrid storage create`, objects put, listed, read and deleted with
//! Debian's s3cmd and rclone through the bot's S3 endpoint; two nodes holding shards killed with
//! kill -9: every object reads back identical, the bot moves the two namespaces and repair brings
//! the pool back to full redundancy; a bot started afresh on another data dir with the same key
//! lists and reads every object; wrong credentials refused. The bot is killed (crash points)
//! after a PUT's shards are written but before its record, and after a slot's repair but before
//! its marker: the restarted bot sweeps the orphan shards and repairs the slot again.

mod common;
mod grid;
use common::have;
use grid::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn s3cmd(cfg: &Path, args: &[&str]) -> Output {
    Command::new("s3cmd")
        .arg("-c")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

fn s3ok(cfg: &Path, args: &[&str]) -> String {
    ok(s3cmd(cfg, args))
}

fn s3cfg(dir: &Path, name: &str, endpoint: &str, id: &str, secret: &str) -> PathBuf {
    let p = dir.join(name);
    let host = endpoint.trim_start_matches("http://");
    std::fs::write(
        &p,
        format!("[default]\naccess_key = {id}\nsecret_key = {secret}\nhost_base = {host}\nhost_bucket = {host}\nuse_https = False\nsignature_v2 = False\nbucket_location = us-east-1\n"),
    )
    .unwrap();
    p
}

fn rclone(endpoint: &str, id: &str, secret: &str, args: &[&str]) -> String {
    ok(Command::new("rclone")
        .args(args)
        .env("RCLONE_CONFIG", "/dev/null")
        .env("RCLONE_CONFIG_TF_TYPE", "s3")
        .env("RCLONE_CONFIG_TF_PROVIDER", "Other")
        .env("RCLONE_CONFIG_TF_ENDPOINT", endpoint)
        .env("RCLONE_CONFIG_TF_ACCESS_KEY_ID", id)
        .env("RCLONE_CONFIG_TF_SECRET_ACCESS_KEY", secret)
        .env("RCLONE_CONFIG_TF_FORCE_PATH_STYLE", "true")
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .unwrap())
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The pool's status (Null while the bot is down: it is killed on purpose here).
fn status(g: &Grid) -> serde_json::Value {
    let o = cli(g, &["storage", "status", "--json"]);
    if !o.status.success() {
        return serde_json::Value::Null;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v.as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "files").cloned())
        .unwrap_or_default()
}

fn healthy(g: &Grid) -> bool {
    status(g)["status"]["healthy"].as_bool() == Some(true)
}

/// Every object of the test, read back and compared.
fn read_back(cfg: &Path, dir: &Path, files: &[(String, Vec<u8>)], what: &str) {
    let got = dir.join("got");
    for (key, want) in files {
        s3ok(
            cfg,
            &[
                "get",
                "--force",
                &format!("s3://photos/{key}"),
                got.to_str().unwrap(),
            ],
        );
        assert!(
            std::fs::read(&got).unwrap() == *want,
            "{key} differs {what}"
        );
    }
}

#[test]
fn storage_survives_two_dead_nodes_repairs_and_comes_back_with_the_key_alone() {
    if let Some(why) = grid_skip() {
        eprintln!("skipped: {why}");
        return;
    }
    for tool in ["s3cmd", "rclone"] {
        if !have(tool) {
            eprintln!("skipped: {tool} is not installed (apt-get install {tool})");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let once = dir.path().join("crashed");
    std::fs::create_dir_all(&once).unwrap();
    let g = up_with(
        dir.path(),
        free_port(),
        &["--nodes", "8"],
        &[
            (
                "TFGRID_CRASH_AT",
                "storage-put-after-shards,storage-repair-before-marker",
            ),
            ("TFGRID_CRASH_ONCE_DIR", once.to_str().unwrap()),
        ],
    );
    let out = ok(cli(
        &g,
        &[
            "storage", "create", "files", "--size", "2G", "--shards", "4+2",
        ],
    ));
    assert!(out.contains("deployed files"), "{out}");
    // Namespaces only: no private network is made for the pool.
    let nets = ok(cli(&g, &["network", "ls"]));
    assert!(!nets.contains("files"), "{nets}");
    wait_for("the pool to open", Duration::from_secs(60), || healthy(&g));
    // A pool's layout does not change under it (that would replace every namespace).
    let o = cli(
        &g,
        &[
            "storage", "create", "files", "--size", "4G", "--shards", "4+2",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot change"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let creds: serde_json::Value =
        serde_json::from_str(&ok(cli(&g, &["storage", "credentials", "--json"]))).unwrap();
    let (endpoint, id, secret) = (
        creds["endpoint"].as_str().unwrap().to_string(),
        creds["access_key"].as_str().unwrap().to_string(),
        creds["secret_key"].as_str().unwrap().to_string(),
    );
    assert_eq!(endpoint, format!("http://{}", g.s3));
    let cfg = s3cfg(dir.path(), "s3cfg", &endpoint, &id, &secret);

    // Wrong credentials change nothing.
    let bad = s3cfg(dir.path(), "bad", &endpoint, &id, &"0".repeat(40));
    let o = s3cmd(&bad, &["mb", "s3://photos"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("SignatureDoesNotMatch"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    s3ok(&cfg, &["mb", "s3://photos"]);
    let files: Vec<(String, Vec<u8>)> = vec![
        ("small.txt".into(), b"a small object\n".to_vec()),
        ("a/one.bin".into(), random(3 << 20, 1)),
        ("a/big.bin".into(), random(20 << 20, 2)),
    ];
    for (key, data) in &files {
        let f = dir.path().join("put");
        std::fs::write(&f, data).unwrap();
        let put = || {
            s3cmd(
                &cfg,
                &[
                    "put",
                    "--multipart-chunk-size-mb=8",
                    f.to_str().unwrap(),
                    &format!("s3://photos/{key}"),
                ],
            )
        };
        // The first PUT with shards kills the bot before its record: s3cmd retries, and may
        // give up before up has the bot back.
        if !put().status.success() {
            wait_for(
                "the bot back with the pool",
                Duration::from_secs(60),
                || healthy(&g),
            );
            ok(put());
        }
    }
    assert!(
        once.join("storage-put-after-shards").exists(),
        "the bot was not killed during a PUT"
    );
    // The restarted bot swept the shards that PUT had written.
    wait_for("the orphan shards swept", Duration::from_secs(30), || {
        status(&g)["status"]["events"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e[1].as_str().unwrap_or("").contains("no object refers to"))
        })
    });
    // rclone puts a directory of its own.
    let src = dir.path().join("docs");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..5 {
        std::fs::write(
            src.join(format!("doc{i}.txt")),
            random(10_000 + i, 10 + i as u64),
        )
        .unwrap();
    }
    rclone(
        &endpoint,
        &id,
        &secret,
        &["copy", src.to_str().unwrap(), "tf:photos/docs"],
    );
    let ls = s3ok(&cfg, &["ls", "--recursive", "s3://photos"]);
    assert_eq!(ls.lines().count(), 8, "{ls}");
    read_back(&cfg, dir.path(), &files, "before any node died");

    // kill -9 the agents (and with them the zdbs) of two nodes holding shards.
    let rec = inspect(&g, "files");
    let holders: Vec<u32> = rec["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node_id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(holders.len(), 6);
    let dead: Vec<u32> = holders[1..3].to_vec();
    for d in &dead {
        let pid = g.node_pids.iter().find(|(n, _)| n == d).unwrap().1;
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    // Every object reads back identical from the four left, at once.
    read_back(&cfg, dir.path(), &files, "with two nodes dead");
    rclone(
        &endpoint,
        &id,
        &secret,
        &["check", src.to_str().unwrap(), "tf:photos/docs"],
    );
    // The bot moves the two namespaces to live nodes and repair fills them.
    wait_for("full redundancy again", Duration::from_secs(90), || {
        let s = status(&g);
        // The bot is killed during the repair: it may not answer for a moment.
        let o = cli(&g, &["inspect", "files", "--json"]);
        let rec: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let moved = rec["replicas"].as_array().is_some_and(|r| {
            r.iter()
                .all(|r| !dead.contains(&(r["node_id"].as_u64().unwrap_or(0) as u32)))
        });
        moved && s["status"]["healthy"].as_bool() == Some(true)
    });
    let text = ok(cli(&g, &["storage", "status", "files"]));
    assert!(
        text.contains("healthy") && text.contains("repaired"),
        "{text}"
    );
    read_back(&cfg, dir.path(), &files, "after repair");
    if have("chromium") {
        // The dashboard shows the pool, healthy, with its six slots and the repair.
        let profile = tempfile::tempdir().unwrap();
        let dom = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--virtual-time-budget=4000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("{}/", g.bot))
            .output()
            .unwrap();
        let dom = String::from_utf8_lossy(&dom.stdout);
        assert!(
            dom.contains("<div class=\"pool\" data-pool=\"files\">"),
            "{dom}"
        );
        // The rendered pool (the page's script holds the same markup as a template, after it).
        let pool = dom
            .split("data-pool=\"files\"")
            .nth(1)
            .and_then(|p| p.split("</table>").next())
            .unwrap();
        assert!(
            pool.contains(">healthy<") && pool.contains("repaired"),
            "{pool}"
        );
        assert_eq!(
            pool.matches("<span class=\"pill ok\">ok</span>").count(),
            6,
            "{pool}"
        );
    }

    // A bot started afresh on another data dir with the same key finds every object.
    let (api, s3) = (free_port(), free_port());
    let registry = g.registry.clone();
    let relay = g
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("relay"))
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    let mut fresh = Command::new(BIN)
        .args(["bot", "--registry", &registry, "--relay", &relay])
        .arg("--key")
        .arg(g.data.join("user.key"))
        .arg("--data")
        .arg(dir.path().join("fresh-bot"))
        .args(["--listen", &api.to_string(), "--s3-listen", &s3.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("fresh-bot.log")).unwrap())
        .spawn()
        .unwrap();
    let fresh_cfg = s3cfg(dir.path(), "fresh", &format!("http://{s3}"), &id, &secret);
    wait_for(
        "the fresh bot to list the objects",
        Duration::from_secs(60),
        || {
            s3cmd(&fresh_cfg, &["ls", "--recursive", "s3://photos"])
                .stdout
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count()
                == 8
        },
    );
    read_back(&fresh_cfg, dir.path(), &files, "through a fresh bot");
    let _ = fresh.kill();
    let _ = fresh.wait();

    // Delete: objects and bucket go.
    s3ok(&cfg, &["del", "--recursive", "--force", "s3://photos"]);
    s3ok(&cfg, &["rb", "s3://photos"]);
    assert!(!s3ok(&cfg, &["ls"]).contains("s3://photos"));

    tampered_shards_are_read_around_rewritten_and_refused(&g, &cfg, dir.path());
    ok(cli(&g, &["storage", "rm", "files"]));
}

/// Someone on a node (with the namespace's password, here derived from the user's key as the
/// bot derives it) alters shards: one is read around and rewritten by repair; three of a
/// stripe are refused with the reason.
fn tampered_shards_are_read_around_rewritten_and_refused(g: &Grid, cfg: &Path, dir: &Path) {
    let seed = tfgrid_core::Identity::load(&g.data.join("user.key"))
        .unwrap()
        .seed();
    let password = tfgrid_storage::StorageKey::from_seed(&seed).zdb_password("files");
    s3ok(cfg, &["mb", "s3://vault"]);
    let data = random(1 << 20, 77);
    let f = dir.join("vault.bin");
    std::fs::write(&f, &data).unwrap();
    s3ok(cfg, &["put", f.to_str().unwrap(), "s3://vault/x"]);
    let slots: Vec<(String, String)> = status(g)["status"]["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let (ep, ns) = s["zdb"].as_str().unwrap().split_once('/').unwrap();
            (ep.to_string(), ns.to_string())
        })
        .collect();
    let conn = |i: usize| {
        let (ep, ns) = &slots[i];
        let mut c = redis::Client::open(format!("redis://{ep}/"))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap();
        redis::cmd("SELECT")
            .arg(ns)
            .arg(&password)
            .query::<()>(&mut c)
            .unwrap();
        c
    };
    // The only shards left are x's (the deleted objects' went in the background).
    let key = {
        let mut c = conn(0);
        let mut keys = Vec::new();
        wait_for(
            "deleted objects' shards gone",
            Duration::from_secs(20),
            || {
                type Scan = (Vec<u8>, Vec<(Vec<u8>, u64, u64)>);
                let (_, batch): Scan = redis::cmd("SCAN").query(&mut c).unwrap_or_default();
                keys = batch
                    .into_iter()
                    .map(|(k, _, _)| k)
                    .filter(|k| k[0] == b's')
                    .collect();
                keys.len() == 1
            },
        );
        keys.remove(0)
    };
    let read = |i: usize| -> Vec<u8> { redis::cmd("GET").arg(&key).query(&mut conn(i)).unwrap() };
    let alter = |i: usize| {
        let mut v = read(i);
        v[3] ^= 0x5a;
        redis::cmd("SET")
            .arg(&key)
            .arg(v)
            .query::<()>(&mut conn(i))
            .unwrap();
    };
    let good = read(1);
    alter(1);
    let got = dir.join("vault.got");
    s3ok(
        cfg,
        &["get", "--force", "s3://vault/x", got.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&got).unwrap() == data,
        "read around an altered shard"
    );
    wait_for(
        "the altered shard rewritten",
        Duration::from_secs(20),
        || read(1) == good,
    );
    let events = status(g)["status"]["events"].to_string();
    assert!(events.contains("altered"), "{events}");
    for i in [0, 2, 3] {
        alter(i);
    }
    let o = s3cmd(
        cfg,
        &["get", "--force", "s3://vault/x", got.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "served with 3 of 6 shards altered");
    assert!(
        err.contains("unreadable") && err.contains("3 altered"),
        "{err}"
    );
    s3ok(cfg, &["del", "s3://vault/x"]);
    s3ok(cfg, &["rb", "s3://vault"]);
}
