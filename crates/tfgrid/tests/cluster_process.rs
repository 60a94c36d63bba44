//! The registry replicated: three (then four) `tfgrid registry` processes on loopback, killed
//! with SIGKILL while clients write.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tfgrid_core::tx::{Call, Outcome, SignedTx};
use tfgrid_core::{Hash, Identity};
use tfgrid_registry::cluster::api::LogEntry;
use tfgrid_registry::cluster::ClusterStatus;
use tfgrid_registry_client::RegistryClient;

const BIN: &str = env!("CARGO_BIN_EXE_tfgrid");

struct Validator {
    id: u64,
    port: u16,
    data: PathBuf,
    child: Option<Child>,
}

impl Validator {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits for its first line (it listens from then on).
    fn start(&mut self, key: &Path, peers: Option<&str>, extra: &[&str]) {
        let mut cmd = Command::new(BIN);
        cmd.args(["registry", "--data"])
            .arg(&self.data)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--id", &self.id.to_string(), "--cluster-key"])
            .arg(key)
            .args(["--down-after-ms", "600000"])
            .args(extra);
        match peers {
            Some(p) => cmd.args(["--peers", p]),
            None => cmd.arg("--join"),
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tfgrid registry");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("registry listening on "),
            "validator {}: {line:?}",
            self.id
        );
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let ok = Command::new("kill")
                .args(["-9", &c.id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok);
            let _ = c.wait();
        }
    }
}

impl Drop for Validator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Cluster {
    _dir: tempfile::TempDir,
    key: PathBuf,
    vs: Vec<Validator>,
    peers: String,
}

fn cluster(n: u64, extra: &[&str]) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    std::fs::write(&key, format!("{}\n", hex::encode([7u8; 32]))).unwrap();
    let mut vs: Vec<Validator> = (1..=n)
        .map(|id| Validator {
            id,
            port: free_port(),
            data: dir.path().join(format!("v{id}")),
            child: None,
        })
        .collect();
    let peers = vs
        .iter()
        .map(|v| format!("{}={}", v.id, v.url()))
        .collect::<Vec<_>>()
        .join(",");
    for v in &mut vs {
        v.start(&key, Some(&peers), extra);
    }
    Cluster {
        _dir: dir,
        key,
        vs,
        peers,
    }
}

async fn status(url: &str) -> Option<ClusterStatus> {
    reqwest::Client::new()
        .get(format!("{url}/cluster"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// The leader every running validator agrees on (waits for one).
async fn leader(vs: &[Validator]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen = Vec::new();
        for v in vs.iter().filter(|v| v.child.is_some()) {
            seen.push(status(&v.url()).await.and_then(|s| s.leader));
        }
        if let Some(Some(l)) = seen.first() {
            if seen.iter().all(|s| *s == Some(*l))
                && vs.iter().any(|v| v.id == *l && v.child.is_some())
            {
                return *l;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every running validator has applied `height`.
async fn converge(vs: &[Validator], height: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut hs = Vec::new();
        for v in vs.iter().filter(|v| v.child.is_some()) {
            hs.push(status(&v.url()).await.map(|s| s.height));
        }
        if hs.iter().all(|h| h.is_some_and(|h| h >= height)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "validators stuck at {hs:?}, want {height}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn log(url: &str) -> Vec<LogEntry> {
    let mut out: Vec<LogEntry> = Vec::new();
    let mut from = 1;
    loop {
        let page: Vec<LogEntry> = reqwest::get(format!("{url}/log?from={from}&limit=10000"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let Some(last) = page.last() else {
            return out;
        };
        from = last.height + 1;
        out.extend(page);
    }
}

fn new_twin(id: &Identity) -> SignedTx {
    SignedTx::new(
        id,
        1,
        Call::CreateTwin {
            relay: String::new(),
            enc_key: None,
        },
    )
}

/// Acknowledged writes: (height, tx hash, when).
type Acked = Arc<Mutex<Vec<(u64, Hash, Instant)>>>;

/// Clients writing new twins to every validator URL until `stop` (each through its own client,
/// so they fail over on their own).
fn burst(
    urls: &str,
    clients: usize,
    acked: Acked,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|_| {
            let (c, acked, stop) = (RegistryClient::new(urls), acked.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let stx = new_twin(&Identity::generate());
                    // An error (the validator died mid-request) leaves the write unacknowledged.
                    if let Ok(r) = c.submit(&stx).await {
                        assert!(matches!(r.outcome, Outcome::TwinCreated { .. }), "{r:?}");
                        acked
                            .lock()
                            .unwrap()
                            .push((r.height, r.tx_hash, Instant::now()));
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_validators_lose_nothing_acknowledged_when_the_leader_or_a_follower_is_killed() {
    let mut c = cluster(3, &[]);
    let urls = c.vs.iter().map(|v| v.url()).collect::<Vec<_>>().join(",");
    let acked: Acked = Arc::default();
    for round in ["leader", "follower"] {
        let l = leader(&c.vs).await;
        let victim =
            c.vs.iter()
                .position(|v| {
                    if round == "leader" {
                        v.id == l
                    } else {
                        v.id != l
                    }
                })
                .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = burst(&urls, 16, acked.clone(), stop.clone());
        tokio::time::sleep(Duration::from_millis(700)).await;
        let before = acked.lock().unwrap().len();
        let killed_at = Instant::now();
        c.vs[victim].kill9();
        // Writes must go on; how soon is `bench cluster`'s to measure (a loaded machine takes
        // longer), so the burst runs until 50 more are acknowledged, or 20 s.
        let deadline = killed_at + Duration::from_secs(20);
        while Instant::now() < deadline
            && acked
                .lock()
                .unwrap()
                .iter()
                .filter(|a| a.2 > killed_at)
                .count()
                <= 50
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let after: Vec<Instant> = acked
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.2)
            .filter(|t| *t > killed_at)
            .collect();
        assert!(before > 50, "{round}: only {before} writes before the kill");
        assert!(
            after.len() > 50,
            "{round}: writes did not go on after validator {} was killed ({} acknowledged after)",
            c.vs[victim].id,
            after.len()
        );
        eprintln!(
            "{round} killed: first write acknowledged {} ms later",
            after
                .iter()
                .min()
                .unwrap()
                .duration_since(killed_at)
                .as_millis()
        );
        let peers = c.peers.clone();
        let key = c.key.clone();
        c.vs[victim].start(&key, Some(&peers), &[]);
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let top = acked.iter().map(|a| a.0).max().unwrap();
    converge(&c.vs, top).await;
    // Every validator holds the same history, and every acknowledged receipt is in it at its
    // height.
    let logs: Vec<Vec<LogEntry>> = {
        let mut l = Vec::new();
        for v in &c.vs {
            l.push(log(&v.url()).await);
        }
        l
    };
    for (v, l) in c.vs.iter().zip(&logs) {
        assert_eq!(
            l.first().map(|e| e.height),
            Some(1),
            "validator {} holds the whole history",
            v.id
        );
        assert_eq!(
            l, &logs[0],
            "validator {} has the same log as validator 1",
            v.id
        );
    }
    let by_height: BTreeMap<u64, Hash> = logs[0].iter().map(|e| (e.height, e.tx_hash)).collect();
    for (h, hash, _) in &acked {
        assert_eq!(
            by_height.get(h),
            Some(hash),
            "acknowledged transaction at height {h} is in the log"
        );
    }
    eprintln!("{} acknowledged, log height {}", acked.len(), logs[0].len());
}

fn cli_cluster(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("cluster")
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_added_later_catches_up_from_a_snapshot_and_one_can_be_removed() {
    let mut c = cluster(3, &["--snapshot-every", "5"]);
    leader(&c.vs).await;
    let urls = c.vs.iter().map(|v| v.url()).collect::<Vec<_>>().join(",");
    let client = RegistryClient::new(&urls);
    let ids: Vec<Identity> = (0..30).map(|_| Identity::generate()).collect();
    for id in &ids {
        client.submit(&new_twin(id)).await.unwrap();
    }
    let first = status(&c.vs[0].url()).await.unwrap();
    assert!(
        first.snapshot_index.is_some(),
        "snapshots were taken: {first:?}"
    );

    let dir = c.vs[0].data.parent().unwrap().to_path_buf();
    let mut v4 = Validator {
        id: 4,
        port: free_port(),
        data: dir.join("v4"),
        child: None,
    };
    v4.start(&c.key, None, &["--snapshot-every", "5"]);
    // Another key is refused and changes nothing.
    let wrong = dir.join("wrong.key");
    std::fs::write(&wrong, hex::encode([8u8; 32])).unwrap();
    let out = cli_cluster(&[
        "add",
        "--registry",
        &c.vs[1].url(),
        "--id",
        "4",
        "--url",
        &v4.url(),
        "--cluster-key",
        wrong.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    assert_eq!(status(&c.vs[1].url()).await.unwrap().members.len(), 3);
    // Added through a follower (sent on to the leader).
    let l = leader(&c.vs).await;
    let follower = c.vs.iter().find(|v| v.id != l).unwrap().url();
    let out = cli_cluster(&[
        "add",
        "--registry",
        &follower,
        "--id",
        "4",
        "--url",
        &v4.url(),
        "--cluster-key",
        c.key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let s = status(&v4.url()).await.unwrap();
    assert!(s.members.iter().any(|m| m.id == 4 && m.voter), "{s:?}");
    // It joined from a snapshot: its history starts after height 1, and it has every twin.
    let l4 = log(&v4.url()).await;
    assert!(
        l4.first().is_none_or(|e| e.height > 1),
        "v4 log starts at {:?}",
        l4.first()
    );
    let c4 = RegistryClient::new(&v4.url());
    for id in &ids {
        assert!(c4
            .account(&id.public_key())
            .await
            .unwrap()
            .twin_id
            .is_some());
    }
    // Four voters: one down still leaves a majority, and the newcomer takes writes.
    c.vs[0].kill9();
    let late = Identity::generate();
    let r = c4.submit(&new_twin(&late)).await.unwrap();
    c.vs.push(v4);
    converge(&c.vs, r.height).await;
    // Removed: the cluster goes on with the rest.
    let out = cli_cluster(&[
        "remove",
        "--registry",
        &c.vs[3].url(),
        "--id",
        "1",
        "--cluster-key",
        c.key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let s = status(&c.vs[3].url()).await.unwrap();
    assert_eq!(
        s.members.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    c.vs[1].kill9();
    // Two of three voters remain.
    let r = c4.submit(&new_twin(&Identity::generate())).await.unwrap();
    assert!(r.height > 31);
    // A validator with another config is refused.
    let mut v5 = Validator {
        id: 5,
        port: free_port(),
        data: dir.join("v5"),
        child: None,
    };
    v5.start(&c.key, None, &["--report-interval-ms", "777"]);
    let out = cli_cluster(&[
        "add",
        "--registry",
        &c.vs[3].url(),
        "--id",
        "5",
        "--url",
        &v5.url(),
        "--cluster-key",
        c.key.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another registry config"),
        "{out:?}"
    );
    let _ = urls;
}
