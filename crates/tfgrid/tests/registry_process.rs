//! The registry as users run it: the real binary, killed and restarted.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tfgrid_core::capacity::GIB;
use tfgrid_core::records::{Location, PublicConfig};
use tfgrid_core::tx::{Call, NodeSpec, Outcome, SignedTx};
use tfgrid_core::{Capacity, Hash, Identity};
use tfgrid_registry_client::RegistryClient;

const BIN: &str = env!("CARGO_BIN_EXE_tfgrid");

struct Proc {
    child: Child,
    url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &Path) -> Proc {
    let mut child = Command::new(BIN)
        .args(["registry", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--down-after-ms", "600000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tfgrid registry");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("registry listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Proc { child, url }
}

fn kill9(p: &mut Proc) {
    unsafe_kill(p.child.id(), 9);
    let _ = p.child.wait();
}

fn unsafe_kill(pid: u32, sig: i32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

async fn ok(c: &RegistryClient, stx: SignedTx) -> Outcome {
    c.submit(&stx)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", stx.tx.call.name()))
        .outcome
}

#[tokio::test]
async fn graceful_restart_keeps_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path());
    let c = RegistryClient::new(&p.url);
    let farmer = Identity::generate();
    let node = Identity::generate();
    let user = Identity::generate();
    ok(
        &c,
        SignedTx::new(
            &farmer,
            1,
            Call::CreateTwin {
                relay: "ws://r1".into(),
                enc_key: None,
            },
        ),
    )
    .await;
    ok(
        &c,
        SignedTx::new(
            &farmer,
            2,
            Call::CreateFarm {
                name: "restartfarm".into(),
                dedicated: false,
            },
        ),
    )
    .await;
    ok(
        &c,
        SignedTx::new(
            &farmer,
            3,
            Call::AddFarmIp {
                farm_id: 1,
                ip: "185.3.3.3/24".into(),
                gateway: "185.3.3.1".into(),
            },
        ),
    )
    .await;
    ok(
        &c,
        SignedTx::new(
            &node,
            1,
            Call::CreateTwin {
                relay: "ws://r1".into(),
                enc_key: None,
            },
        ),
    )
    .await;
    let spec = NodeSpec {
        farm_id: 1,
        total: Capacity {
            cru: 8,
            mru: 16 * GIB,
            sru: 500 * GIB,
            hru: 0,
            gpu: 0,
            ipv4: 0,
        },
        gpus: vec![],
        location: Location {
            country: "Belgium".into(),
            city: "Lochristi".into(),
            latitude: Some(51.1),
            longitude: Some(3.83),
        },
        public_config: PublicConfig {
            domain: Some("gw.grid.test".into()),
            ..Default::default()
        },
        overlay: None,
    };
    ok(&c, SignedTx::new(&node, 2, Call::RegisterNode(spec))).await;
    ok(
        &c,
        SignedTx::new(
            &user,
            1,
            Call::CreateTwin {
                relay: String::new(),
                enc_key: None,
            },
        ),
    )
    .await;
    let cap = Capacity {
        cru: 2,
        mru: 4 * GIB,
        ipv4: 1,
        ..Default::default()
    };
    let replay = SignedTx::new(
        &user,
        2,
        Call::CreateNodeContract {
            node_id: 1,
            deployment_hash: Hash([9; 32]),
            capacity: cap,
        },
    );
    ok(&c, replay.clone()).await;
    ok(
        &c,
        SignedTx::new(
            &user,
            3,
            Call::CreateNameContract {
                name: "myweb".into(),
            },
        ),
    )
    .await;
    ok(
        &c,
        SignedTx::new(&user, 4, Call::CancelContract { contract_id: 2 }),
    )
    .await;

    let snapshot = |url: String| async move {
        let http = reqwest::Client::new();
        let mut out = Vec::new();
        for path in [
            "/twins",
            "/farms",
            "/nodes?ret_count=true",
            "/contracts",
            "/accounts/".to_string().as_str(),
        ] {
            let path = if path == "/accounts/" {
                format!("/accounts/{}", Identity::from_seed([0; 32]).public_key())
            } else {
                path.to_string()
            };
            let v: serde_json::Value = http
                .get(format!("{url}{path}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            out.push(v);
        }
        let mut stats: serde_json::Value = http
            .get(format!("{url}/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        stats.as_object_mut().unwrap().remove("nodes_up");
        out.push(stats);
        out
    };
    let before = snapshot(p.url.clone()).await;
    let mut p = p;
    unsafe_kill(p.child.id(), 15);
    let status = p.child.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean shutdown: {status}");

    let p2 = start(dir.path());
    let after = snapshot(p2.url.clone()).await;
    assert_eq!(before, after);
    let c2 = RegistryClient::new(&p2.url);
    assert_eq!(c2.stats().await.unwrap().height, 9);
    let r = c2.submit(&replay).await.unwrap_err();
    assert_eq!(r.code(), Some("nonce"), "replay after restart: {r}");
    assert_eq!(c2.account(&user.public_key()).await.unwrap().nonce, 4);
    // The restarted registry keeps counting ids from where it was.
    match ok(
        &c2,
        SignedTx::new(
            &user,
            5,
            Call::CreateNameContract {
                name: "second".into(),
            },
        ),
    )
    .await
    {
        Outcome::ContractCreated { contract_id, .. } => assert_eq!(contract_id, 3),
        o => panic!("{o:?}"),
    }
}

#[tokio::test]
async fn kill_9_during_a_write_burst_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<Vec<(Identity, u32)>>> = Arc::default();
    for round in 0..3 {
        let mut p = start(dir.path());
        let c = RegistryClient::new(&p.url);
        let stop_at = Instant::now() + Duration::from_millis(800);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (c, acked) = (c.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let id = Identity::generate();
                    let stx = SignedTx::new(
                        &id,
                        1,
                        Call::CreateTwin {
                            relay: String::new(),
                            enc_key: None,
                        },
                    );
                    match c.submit(&stx).await {
                        Ok(r) => match r.outcome {
                            Outcome::TwinCreated { twin_id } => {
                                acked.lock().unwrap().push((id, twin_id))
                            }
                            o => panic!("{o:?}"),
                        },
                        Err(_) => return, // the registry is gone
                    }
                }
            }));
        }
        while Instant::now() < stop_at {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill9(&mut p); // mid-burst: requests are in flight
        for t in tasks {
            t.await.unwrap();
        }
        let n = acked.lock().unwrap().len();
        assert!(
            n > 100 * (round + 1),
            "round {round}: only {n} acknowledged in total"
        );
    }
    let p = start(dir.path());
    let c = RegistryClient::new(&p.url);
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    for (id, twin) in &acked {
        let a = c.account(&id.public_key()).await.unwrap();
        assert_eq!(a.twin_id, Some(*twin), "acknowledged twin {twin} lost");
        assert_eq!(a.nonce, 1);
    }
    let stats = c.stats().await.unwrap();
    assert!(stats.twins >= acked.len() as u64);
    assert_eq!(
        stats.height, stats.twins,
        "every committed create_twin is in the log exactly once"
    );
}

#[test]
fn corrupt_store_is_reported_not_served() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("registry.redb"), vec![0x5a; 64 * 1024]).unwrap();
    let out = Command::new(BIN)
        .args(["registry", "--data"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("registry.redb"),
        "stderr names the file: {err}"
    );
    assert!(out.stdout.is_empty(), "never started listening");
}

#[test]
fn key_commands() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let out = Command::new(BIN)
        .args(["key", "new", "--key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let pk = text
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .unwrap()
        .to_string();
    assert_eq!(Identity::load(&key).unwrap().public_key().to_hex(), pk);
    let again = Command::new(BIN)
        .args(["key", "new", "--key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    let show = Command::new(BIN)
        .args(["key", "show", "--key"])
        .arg(&key)
        .args(["--registry", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(show.status.success());
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains(&pk) && text.contains("twin id:    unknown"),
        "{text}"
    );
}

#[tokio::test]
async fn twin_register_and_farm_create_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(&dir.path().join("reg"));
    let key = dir.path().join("k");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--key")
            .arg(&key)
            .args(["--registry", &p.url])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    assert!(Command::new(BIN)
        .args(["key", "new", "--key"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let (ok1, out) = run(&["twin", "register"]);
    assert!(ok1 && out.contains("twin id: 1"), "{out}");
    let (ok2, out) = run(&["twin", "register"]);
    assert!(ok2 && out.contains("twin id: 1"), "idempotent: {out}");
    let (ok3, out) = run(&["farm", "create", "cli_farm"]);
    assert!(ok3 && out.contains("id 1"), "{out}");
    let (ok4, out) = run(&["farm", "create", "cli_farm"]);
    assert!(!ok4 && out.contains("taken"), "{out}");
    let (ok5, out) = run(&["farm", "list"]);
    assert!(ok5 && out.contains("cli_farm"), "{out}");
    let (_, show) = run(&["key", "show"]);
    assert!(show.contains("twin id:    1"), "{show}");
    // Several registry URLs: the first refuses connections, the next answers.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let out = Command::new(BIN)
        .args(["farm", "create", "second_farm", "--key"])
        .arg(&key)
        .args(["--registry", &format!("{dead},{}", p.url)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (_, out) = run(&["farm", "list"]);
    assert!(out.contains("second_farm"), "{out}");
}
