//! The node agent as operators run it: real registry, relay and node processes, a user twin
//! talking to the node over the bus, images from a real OCI registry (Debian's docker-registry),
//! containers run by runc. Tests that need root or those tools say why they skip.

mod common;
use common::{have, is_root};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tfgrid_bus::peer::ensure_registered;
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::capacity::{GIB, MIB};
use tfgrid_core::deployment::{
    ContainerSpec, Deployment, GatewayNameProxySpec, Mount, ResultState, VolumeSpec, Workload,
    WorkloadData, WorkloadResult, ZdbMode, ZdbSpec,
};
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::{ContractId, Identity, TwinId};
use tfgrid_node::api::{self, ContractRef, DeploymentInfo, Statistics};
use tfgrid_registry_client::{RegistryClient, TwinSigner};

const BIN: &str = env!("CARGO_BIN_EXE_tfgrid");
static SEQ: AtomicU32 = AtomicU32::new(0);
static GRIDS: AtomicU32 = AtomicU32::new(0);

struct Proc {
    child: Child,
    first_line: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Starts `tfgrid args...` and waits for its first stdout line (each command prints one when
/// it is ready). Its stderr goes to `log`.
fn spawn(args: &[&str], log: &Path) -> Proc {
    spawn_env(args, log, &[])
}

fn spawn_env(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn tfgrid");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        !line.is_empty(),
        "tfgrid {args:?} exited before it was ready: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    Proc {
        child,
        first_line: line.trim().to_string(),
    }
}

/// Why a container test cannot run here, if it cannot.
fn container_skip() -> Option<String> {
    if !is_root() {
        return Some("containers need root (namespaces, mounts, cgroups)".into());
    }
    for c in ["runc", "docker-registry", "busybox", "ip", "mkfs.ext4"] {
        if !have(c) {
            return Some(format!(
                "{c} is not installed (apt-get install runc docker-registry busybox-static)"
            ));
        }
    }
    None
}

struct Grid {
    dir: tempfile::TempDir,
    _registry: Proc,
    _relay: Proc,
    registry_url: String,
    relay_url: String,
    client: RegistryClient,
    farm: u32,
    user: Identity,
    user_twin: TwinId,
    peer: Peer,
    bridges: std::sync::Mutex<Vec<String>>,
}

struct Node {
    proc: Proc,
    args: Vec<String>,
    log: PathBuf,
    node_id: u32,
    twin: TwinId,
    gateway: Option<SocketAddr>,
}

impl Grid {
    async fn start() -> Grid {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let reg_data = d.join("registry");
        let k = (std::process::id() + GRIDS.fetch_add(1, Ordering::Relaxed)) % 50;
        let registry = spawn(
            &[
                "registry",
                "--data",
                reg_data.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--report-interval-ms",
                "500",
                "--down-after-ms",
                "5000",
                // Bridges share the host: each test's grid its own range.
                "--workload-range",
                &format!("10.{}.0.0/16", 100 + k),
                "--network-range",
                &format!("10.{}.0.0/16", 150 + k),
                "--network-prefix-len",
                "22",
            ],
            &d.join("registry.log"),
        );
        let registry_url = registry
            .first_line
            .strip_prefix("registry listening on ")
            .unwrap()
            .to_string();
        let relay_key = d.join("relay.key");
        let relay = spawn(
            &[
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--registry",
                &registry_url,
                "--key",
                relay_key.to_str().unwrap(),
            ],
            &d.join("relay.log"),
        );
        let relay_url = relay
            .first_line
            .strip_prefix("relay listening on ")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        let client = RegistryClient::new(&registry_url);
        let farmer = TwinSigner::new(Identity::generate(), client.clone());
        farmer.ensure_twin("").await.unwrap();
        let farm = match farmer
            .submit(Call::CreateFarm {
                name: format!("farm{}", SEQ.fetch_add(1, Ordering::Relaxed)),
                dedicated: false,
            })
            .await
            .unwrap()
            .outcome
        {
            Outcome::FarmCreated { farm_id } => farm_id,
            o => panic!("{o:?}"),
        };
        let user = Identity::generate();
        let signer = TwinSigner::new(user.clone(), client.clone());
        let user_twin = ensure_registered(&signer, &relay_url).await.unwrap();
        let peer = Peer::start(PeerConfig {
            identity: user.clone(),
            twin: user_twin,
            relay_url: relay_url.clone(),
            registry: client.clone(),
        });
        peer.connected(Duration::from_secs(10)).await.unwrap();
        Grid {
            dir,
            _registry: registry,
            _relay: relay,
            registry_url,
            relay_url,
            client,
            farm,
            user,
            user_twin,
            peer,
            bridges: Default::default(),
        }
    }

    fn node_args(&self, name: &str, domain: Option<&str>) -> Vec<String> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let mut a: Vec<String> = [
            "node",
            "--registry",
            &self.registry_url,
            "--relay",
            &self.relay_url,
            "--farm",
            &self.farm.to_string(),
            "--data",
            self.dir.path().join(name).to_str().unwrap(),
            "--zdb-listen",
            "127.0.0.1:0",
            "--gateway-listen",
            "127.0.0.1:0",
            "--bridge",
            &format!("tfgt{}x{n}", pid % 10000),
            "--sru",
            "8G",
            "--hru",
            "8G",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(d) = domain {
            a.extend(["--domain".to_string(), d.to_string()]);
        }
        self.bridges
            .lock()
            .unwrap()
            .push(a[a.iter().position(|x| x == "--bridge").unwrap() + 1].clone());
        a
    }

    fn start_node_with(&self, args: Vec<String>, name: &str) -> Node {
        self.start_node_env(args, name, &[])
    }

    fn start_node_env(&self, args: Vec<String>, name: &str, env: &[(&str, &str)]) -> Node {
        let log = self.dir.path().join(format!("{name}.log"));
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let proc = spawn_env(&refs, &log, env);
        // "node N (twin T) up; zdb on ADDR[; gateway proxy on ADDR]"
        let l = proc.first_line.clone();
        let words: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(words[0], "node", "{l}");
        let node_id = words[1].parse().unwrap();
        let twin = words[3].trim_end_matches(')').parse().unwrap();
        let gateway = l
            .split("gateway proxy on ")
            .nth(1)
            .map(|a| a.trim().parse().unwrap());
        Node {
            proc,
            args,
            log,
            node_id,
            twin,
            gateway,
        }
    }

    fn start_node(&self, name: &str, domain: Option<&str>) -> Node {
        let args = self.node_args(name, domain);
        self.start_node_with(args, name)
    }

    fn signer(&self) -> TwinSigner {
        TwinSigner::new(self.user.clone(), self.client.clone())
    }

    /// Creates the node contract for `d` and sends it signed by the user.
    async fn deploy(&self, node: &Node, mut d: Deployment) -> Result<DeploymentInfo, String> {
        let id = self.contract(node, &d).await;
        d.contract_id = id;
        d.sign(&self.user);
        self.send(node, api::DEPLOY, &d).await
    }

    /// A second user: a twin of its own on the bus.
    async fn other_user(&self) -> (Identity, TwinId, Peer) {
        let id = Identity::generate();
        let signer = TwinSigner::new(id.clone(), self.client.clone());
        let twin = ensure_registered(&signer, &self.relay_url).await.unwrap();
        let peer = Peer::start(PeerConfig {
            identity: id.clone(),
            twin,
            relay_url: self.relay_url.clone(),
            registry: self.client.clone(),
        });
        peer.connected(Duration::from_secs(10)).await.unwrap();
        (id, twin, peer)
    }

    /// [`deploy`](Self::deploy) as another user.
    async fn deploy_as(
        &self,
        who: &(Identity, TwinId, Peer),
        node: &Node,
        mut d: Deployment,
    ) -> Result<DeploymentInfo, String> {
        let signer = TwinSigner::new(who.0.clone(), self.client.clone());
        d.twin_id = who.1;
        d.contract_id = contract_by(&signer, node, &d).await;
        d.sign(&who.0);
        who.2
            .call_json(node.twin, api::DEPLOY, &d, Duration::from_secs(120))
            .await
            .map_err(|e| e.to_string())
    }

    async fn contract(&self, node: &Node, d: &Deployment) -> ContractId {
        contract_by(&self.signer(), node, d).await
    }

    async fn send<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        node: &Node,
        cmd: &str,
        req: &Req,
    ) -> Result<Resp, String> {
        self.peer
            .call_json(node.twin, cmd, req, Duration::from_secs(120))
            .await
            .map_err(|e| e.to_string())
    }

    async fn delete(&self, node: &Node, id: ContractId) {
        let _: serde_json::Value = self
            .send(node, api::DELETE, &ContractRef { contract_id: id })
            .await
            .unwrap();
    }

    async fn get(&self, node: &Node, id: ContractId) -> Result<DeploymentInfo, String> {
        self.send(node, api::GET, &ContractRef { contract_id: id })
            .await
    }

    /// Polls until workload `name` reaches `state`, returning its result message.
    async fn wait_state(
        &self,
        node: &Node,
        id: ContractId,
        name: &str,
        want: impl Fn(ResultState, &str) -> bool,
        timeout: Duration,
    ) -> String {
        let t0 = Instant::now();
        loop {
            let info = self.get(node, id).await.unwrap();
            let r = &info.results[name];
            if want(r.state, &r.message) {
                return r.message.clone();
            }
            assert!(
                t0.elapsed() < timeout,
                "{name} stayed {:?}: {}",
                r.state,
                r.message
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The node contract for `d`, made by `signer`.
async fn contract_by(signer: &TwinSigner, node: &Node, d: &Deployment) -> ContractId {
    match signer
        .submit(Call::CreateNodeContract {
            node_id: node.node_id,
            deployment_hash: d.hash(),
            capacity: d.capacity().unwrap(),
        })
        .await
        .unwrap()
        .outcome
    {
        Outcome::ContractCreated { contract_id, .. } => contract_id,
        o => panic!("{o:?}"),
    }
}

fn deployment(twin: TwinId, workloads: Vec<(&str, WorkloadData)>) -> Deployment {
    Deployment {
        version: 0,
        twin_id: twin,
        contract_id: 0,
        metadata: String::new(),
        description: String::new(),
        workloads: workloads
            .into_iter()
            .map(|(n, data)| Workload {
                version: 0,
                name: n.into(),
                data,
                metadata: String::new(),
                description: String::new(),
            })
            .collect(),
        signature: None,
    }
}

fn zdb_workload(size: u64, password: &str) -> WorkloadData {
    WorkloadData::Zdb(ZdbSpec {
        size,
        mode: ZdbMode::User,
        password: password.into(),
        public: false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zdb_namespaces_are_deployed_checked_and_removed() {
    let g = Grid::start().await;
    let node = g.start_node("n1", None);

    // A zdb namespace, reachable with its password.
    let d = deployment(g.user_twin, vec![("store", zdb_workload(GIB, "s3cret"))]);
    let info = g.deploy(&node, d).await.unwrap();
    let r = &info.results["store"];
    assert_eq!(r.state, ResultState::Ok, "{}", r.message);
    let (endpoint, ns) = (r.data["endpoint"].clone(), r.data["namespace"].clone());
    let mut c = redis::Client::open(format!("redis://{endpoint}/"))
        .unwrap()
        .get_connection()
        .unwrap();
    let denied: redis::RedisResult<()> = redis::cmd("SELECT").arg(&ns).arg("wrong").query(&mut c);
    assert!(denied.is_err(), "a wrong password opens the namespace");
    let _: () = redis::cmd("SELECT")
        .arg(&ns)
        .arg("s3cret")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");
    let id = info.deployment.contract_id;

    let stats: Statistics = g
        .send(&node, api::STATISTICS, &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(stats.reserved.hru, GIB);
    assert_eq!(stats.used.hru, GIB);
    assert_eq!(stats.deployments, 1);
    let list: Vec<DeploymentInfo> = g
        .send(&node, api::LIST, &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    let changes: api::Changes = g
        .send(&node, api::CHANGES, &ContractRef { contract_id: id })
        .await
        .unwrap();
    let states: Vec<_> = changes.changes.iter().map(|c| c.result.state).collect();
    assert_eq!(states, vec![ResultState::Init, ResultState::Ok]);

    // Bad deployments are refused and change nothing.
    let before = g.get(&node, id).await.unwrap();
    // Signed by someone else.
    let mut d2 = deployment(g.user_twin, vec![("other", zdb_workload(MIB, ""))]);
    d2.contract_id = g.contract(&node, &d2).await;
    let intruder = Identity::generate();
    d2.sign(&intruder);
    let e = g
        .send::<_, DeploymentInfo>(&node, api::DEPLOY, &d2)
        .await
        .unwrap_err();
    assert!(e.contains("forbidden") && e.contains("not signed"), "{e}");
    // A hash that is not the contract's.
    let mut d3 = d2.clone();
    d3.workloads[0].data = zdb_workload(2 * MIB, "");
    d3.sign(&g.user);
    let e = g
        .send::<_, DeploymentInfo>(&node, api::DEPLOY, &d3)
        .await
        .unwrap_err();
    assert!(e.contains("hash"), "{e}");
    // A contract that does not exist.
    let mut d4 = d2.clone();
    d4.contract_id = 999_999;
    d4.sign(&g.user);
    let e = g
        .send::<_, DeploymentInfo>(&node, api::DEPLOY, &d4)
        .await
        .unwrap_err();
    assert!(e.contains("not found"), "{e}");
    // Malformed: not a deployment at all, and a bad workload name.
    let e = g
        .peer
        .call(
            node.twin,
            api::DEPLOY,
            b"{not json",
            Duration::from_secs(10),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad request"), "{e}");
    let mut d5 = deployment(g.user_twin, vec![("bad name!", zdb_workload(MIB, ""))]);
    d5.contract_id = 1;
    d5.sign(&g.user);
    let e = g
        .send::<_, DeploymentInfo>(&node, api::DEPLOY, &d5)
        .await
        .unwrap_err();
    assert!(e.contains("malformed") && e.contains("bad name!"), "{e}");
    // The same contract twice.
    let mut again = before.deployment.clone();
    again.sign(&g.user);
    let e = g
        .send::<_, DeploymentInfo>(&node, api::DEPLOY, &again)
        .await
        .unwrap_err();
    assert!(e.contains("already deployed"), "{e}");
    // Another twin cannot read or delete it.
    assert_eq!(g.get(&node, id).await.unwrap(), before);

    // An update changes the namespace in place: bigger, same data.
    let mut up = before.deployment.clone();
    up.version = 1;
    up.workloads[0].data = zdb_workload(2 * GIB, "s3cret");
    let stale = up.clone();
    let e = g
        .send::<_, DeploymentInfo>(&node, api::UPDATE, &{
            let mut s = stale.clone();
            s.sign(&g.user);
            s
        })
        .await
        .unwrap_err();
    assert!(
        e.contains("hash"),
        "an update the contract does not carry: {e}"
    );
    g.signer()
        .submit(Call::UpdateNodeContract {
            contract_id: id,
            deployment_hash: up.hash(),
            capacity: up.capacity().unwrap(),
        })
        .await
        .unwrap();
    up.sign(&g.user);
    let updated: DeploymentInfo = g.send(&node, api::UPDATE, &up).await.unwrap();
    assert_eq!(updated.results["store"].state, ResultState::Ok);
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v", "the update lost the namespace's data");
    let nsinfo: String = redis::cmd("NSINFO").arg(&ns).query(&mut c).unwrap();
    assert!(
        nsinfo.contains(&format!("data_limits_bytes: {}", 2 * GIB)),
        "{nsinfo}"
    );
    let e = g
        .send::<_, DeploymentInfo>(&node, api::UPDATE, &up)
        .await
        .unwrap_err();
    assert!(e.contains("raise the version"), "{e}");

    // Cancelling the contract on the registry removes the namespace.
    g.signer()
        .submit(Call::CancelContract { contract_id: id })
        .await
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Err(e) = g.get(&node, id).await {
            assert!(e.contains("not found"), "{e}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "not removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut admin = redis::Client::open(format!("redis://{endpoint}/"))
        .unwrap()
        .get_connection()
        .unwrap();
    let gone: redis::RedisResult<String> = redis::cmd("NSINFO").arg(&ns).query(&mut admin);
    assert!(gone.is_err(), "namespace {ns} still exists");
    drop(node);
}

async fn push_image(registry: &str, name: &str, cmd: &[&str]) -> String {
    tfgrid_node::images::push_busybox_image(registry, name, cmd, "hello from tfgrid\n")
        .await
        .unwrap()
}

fn start_oci_registry(dir: &Path) -> tfgrid_node::images::LocalRegistry {
    tfgrid_node::images::LocalRegistry::start(&dir.join("oci")).unwrap()
}

/// An image registry with the web image (busybox httpd on 8080) and node `n1` pulling from it:
/// the registry (keep it), the image, the node's arguments and the node.
async fn web_node(
    g: &Grid,
) -> (
    tfgrid_node::images::LocalRegistry,
    String,
    Vec<String>,
    Node,
) {
    let oci = start_oci_registry(g.dir.path());
    let image = push_image(
        &oci.addr,
        "web",
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    )
    .await;
    let mut args = g.node_args("n1", None);
    args.extend(["--insecure-registry".to_string(), oci.addr.clone()]);
    let node = g.start_node_with(args.clone(), "n1");
    (oci, image, args, node)
}

/// `who`'s gateway workload for the name `evil` with `backend` is refused on `gw`, saying `why`.
async fn route_refused(
    g: &Grid,
    who: &(Identity, TwinId, Peer),
    gw: &Node,
    backend: &str,
    why: &str,
) {
    let d = deployment(
        who.1,
        vec![(
            "evil_gw",
            WorkloadData::GatewayNameProxy(GatewayNameProxySpec {
                name: "evil".into(),
                backends: vec![backend.to_string()],
            }),
        )],
    );
    let info = g.deploy_as(who, gw, d).await.unwrap();
    let r = &info.results["evil_gw"];
    assert_eq!(r.state, ResultState::Error, "{backend} was accepted");
    assert!(r.message.contains(why), "{backend}: {}", r.message);
}

/// Deploys one small container of `image`: its result and contract.
async fn deploy_app(g: &Grid, node: &Node, image: &str) -> (WorkloadResult, ContractId) {
    let d = deployment(
        g.user_twin,
        vec![("app", container(image, None, 1, 32 * MIB))],
    );
    let info = g.deploy(node, d).await.unwrap();
    (info.results["app"].clone(), info.deployment.contract_id)
}

fn with_rootfs(mut w: WorkloadData, size: u64) -> WorkloadData {
    if let WorkloadData::Container(c) = &mut w {
        c.rootfs_size = size;
    }
    w
}

fn with_mount(mut w: WorkloadData, volume: &str, path: &str) -> WorkloadData {
    if let WorkloadData::Container(c) = &mut w {
        c.mounts.push(Mount {
            volume: volume.into(),
            path: path.into(),
        });
    }
    w
}

fn container(image: &str, cmd: Option<Vec<&str>>, cpu: u32, memory: u64) -> WorkloadData {
    WorkloadData::Container(ContainerSpec {
        image: image.into(),
        entrypoint: None,
        cmd: cmd.map(|c| c.into_iter().map(String::from).collect()),
        env: [("NAME".to_string(), "tfgrid".to_string())].into(),
        cpu,
        memory,
        rootfs_size: 0,
        mounts: vec![],
        network: None,
    })
}

async fn http_get(addr: SocketAddr, host: &str) -> Result<(u16, String), String> {
    let r = reqwest::Client::new()
        .get(format!("http://{addr}/"))
        .header("host", host)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.map_err(|e| e.to_string())?))
}

/// What a workload may have left on the host: mounts, cgroups, its network namespace, processes.
fn leftovers(base: &Path, bridge: &str, key: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let base = base.to_string_lossy().into_owned();
    // Only this test's mounts: other tests on the host use the same workload keys.
    for l in mounts
        .lines()
        .filter(|l| l.contains(&format!("/{key}/")) && l.contains(&base))
    {
        found.push(format!("mount: {l}"));
    }
    let cgroup = format!("tfgrid/{bridge}/{key}");
    for c in ["memory", "cpu", "cpuacct", "pids"] {
        let p = format!("/sys/fs/cgroup/{c}/{cgroup}");
        if Path::new(&p).exists() {
            found.push(format!("cgroup {p}"));
        }
    }
    if Path::new(&format!("/var/run/netns/tfgrid-{bridge}-{key}")).exists() {
        found.push("netns".into());
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cg) = std::fs::read_to_string(e.path().join("cgroup")) {
            // A zombie waiting for pid 1 to reap it holds nothing but its pid.
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z');
            if cg.contains(&cgroup) && !zombie {
                found.push(format!("process {:?}", e.file_name()));
            }
        }
    }
    found
}

impl Node {
    fn bridge(&self) -> String {
        self.args[self.args.iter().position(|a| a == "--bridge").unwrap() + 1].clone()
    }
}

/// Whatever a failed test left running on the host (containers outlive their agent by design).
impl Drop for Grid {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for e in rd.flatten() {
            let root = e.path().join("runtime");
            if !root.is_dir() {
                continue;
            }
            let out = Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["list", "-q"])
                .output();
            for id in out
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
                .lines()
            {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", id])
                    .status();
            }
        }
        // VMs (QEMU outlives its agent by design) and their taps.
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for v in std::fs::read_dir(e.path().join("vms"))
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Ok(pid) = std::fs::read_to_string(v.path().join("pid")) {
                    let cmd =
                        std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
                    if String::from_utf8_lossy(&cmd).contains("tfgrid-") {
                        let _ = Command::new("kill").args(["-9", pid.trim()]).status();
                    }
                }
            }
        }
        let links = Command::new("ip").args(["-o", "link"]).output();
        let links = links
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for b in self.bridges.lock().unwrap().iter() {
            for l in links
                .lines()
                .filter(|l| l.contains(&format!("master {b} ")))
            {
                let name = l
                    .split(": ")
                    .nth(1)
                    .unwrap_or_default()
                    .split('@')
                    .next()
                    .unwrap_or_default();
                if name.starts_with("tt") {
                    let _ = Command::new("ip").args(["link", "del", name]).status();
                }
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let base = self.dir.path().to_string_lossy().into_owned();
        for m in mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&base))
        {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        for b in self.bridges.lock().unwrap().iter() {
            let ns = Command::new("ip").args(["netns", "list"]).output();
            for l in ns
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
                .lines()
            {
                let name = l.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&format!("tfgrid-{b}-")) {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["link", "del", b])
                .stderr(Stdio::null())
                .status();
            // The users' networks' bridges and rules (a test that failed half-way).
            for e in std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                for n in std::fs::read_dir(e.path().join("networks"))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if let Ok(id) = n.file_name().to_string_lossy().parse() {
                        let nb = tfgrid_node::networks::Networks::bridge_name(b, id);
                        let _ = Command::new("ip")
                            .args(["link", "del", &nb])
                            .stderr(Stdio::null())
                            .status();
                    }
                }
            }
            let _ = Command::new("nft")
                .args(["delete", "table", "ip", &format!("tfgrid_{b}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_served_through_the_gateway_survives_an_agent_kill_and_is_removed_cleanly() {
    if let Some(why) = container_skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let g = Grid::start().await;
    let (oci, image, args, mut node) = web_node(&g).await;
    let gw_args = g.node_args("gw", Some("gw.test"));
    let mut gw = g.start_node_with(gw_args.clone(), "gw");

    // An unknown image is refused with the registry's reason, and leaves nothing behind.
    let bad = deployment(
        g.user_twin,
        vec![(
            "web",
            container(&format!("{}/nope:1", oci.addr), None, 1, 64 * MIB),
        )],
    );
    let info = g.deploy(&node, bad).await.unwrap();
    let r = &info.results["web"];
    assert_eq!(r.state, ResultState::Error);
    assert!(r.message.contains("nope"), "{}", r.message);
    assert_eq!(
        leftovers(
            g.dir.path(),
            &node.bridge(),
            &format!("c{}-web", info.deployment.contract_id)
        ),
        Vec::<String>::new()
    );

    let d = deployment(
        g.user_twin,
        vec![("web", container(&image, None, 1, 64 * MIB))],
    );
    let info = g.deploy(&node, d).await.unwrap();
    let id = info.deployment.contract_id;
    let r = &info.results["web"];
    assert_eq!(r.state, ResultState::Ok, "{}", r.message);
    let ip = r.data["ip"].clone();
    // Its address is from the prefix the registry gave this node (and only this node).
    let prefix = g
        .client
        .node(node.node_id)
        .await
        .unwrap()
        .node
        .workload_prefix;
    assert!(
        prefix.contains(ip.parse().unwrap()),
        "{ip} is not in the node's workload prefix {prefix}"
    );

    // The gateway serves it by name, for the twin holding the name contract only.
    let route = deployment(
        g.user_twin,
        vec![(
            "web_gw",
            WorkloadData::GatewayNameProxy(GatewayNameProxySpec {
                name: "web".into(),
                backends: vec![format!("http://{ip}:8080")],
            }),
        )],
    );
    let info = g.deploy(&gw, route.clone()).await.unwrap();
    let r = &info.results["web_gw"];
    assert_eq!(
        r.state,
        ResultState::Error,
        "served without a name contract"
    );
    assert!(r.message.contains("name contract"), "{}", r.message);
    g.signer()
        .submit(Call::CreateNameContract { name: "web".into() })
        .await
        .unwrap();
    let mut route2 = route.clone();
    route2.description = "with name".into();
    let info = g.deploy(&gw, route2).await.unwrap();
    let r = &info.results["web_gw"];
    assert_eq!(r.state, ResultState::Ok, "{}", r.message);
    assert!(
        r.data["url"].starts_with("http://web.gw.test:"),
        "{:?}",
        r.data
    );
    let gw_addr = gw.gateway.unwrap();
    let t0 = Instant::now();
    let body = loop {
        match http_get(gw_addr, "web.gw.test").await {
            Ok((200, b)) => break b,
            other => {
                assert!(t0.elapsed() < Duration::from_secs(10), "{other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(body, "hello from tfgrid\n");
    let (status, _) = http_get(gw_addr, "other.gw.test").await.unwrap();
    assert_eq!(status, 404);

    // A gateway serves only the deploying twin's own workloads: not the gateway host's loopback
    // (where the bot API and the node's zdb listen), not the host's bridge address, not an
    // address no workload has, and not another twin's container (by its real address).
    let bridge_ip = prefix.nth(32, 1).unwrap().addr();
    let unused = prefix.nth(32, 200).unwrap().addr();
    let mut bad_backends = vec![
        (
            format!("http://127.0.0.1:{}", gw_addr.port()),
            "not a workload address",
        ),
        (format!("http://{bridge_ip}:8080"), "not a workload of twin"),
        (format!("http://{unused}:8080"), "not a workload of twin"),
        (
            "http://10.64.0.2:8080/admin".to_string(),
            "expected http://",
        ),
    ];
    let other = g.other_user().await;
    TwinSigner::new(other.0.clone(), g.client.clone())
        .submit(Call::CreateNameContract {
            name: "evil".into(),
        })
        .await
        .unwrap();
    bad_backends.push((format!("http://{ip}:8080"), "not a workload of twin"));
    for (backend, why) in bad_backends {
        route_refused(&g, &other, &gw, &backend, why).await;
        assert_eq!(http_get(gw_addr, "evil.gw.test").await.unwrap().0, 404);
    }
    // A restarted gateway agent brings back the route it served, not the ones it refused.
    gw.proc.kill9();
    gw = g.start_node_with(gw_args, "gw");
    let gw_addr = gw.gateway.unwrap();
    assert_eq!(http_get(gw_addr, "web.gw.test").await.unwrap().0, 200);
    assert_eq!(http_get(gw_addr, "evil.gw.test").await.unwrap().0, 404);

    // The gateway's health checks reach the backend, and say so to the route's owner only.
    let t0 = Instant::now();
    loop {
        let h: Vec<api::BackendHealth> = g
            .send(
                &gw,
                api::GATEWAY_BACKENDS,
                &api::BackendsRequest { name: "web".into() },
            )
            .await
            .unwrap();
        if h.len() == 1 && h[0].reachable == Some(true) && h[0].ever_reachable {
            assert_eq!(h[0].backend, format!("http://{ip}:8080"));
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{h:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let theirs: Result<Vec<api::BackendHealth>, _> = other
        .2
        .call_json(
            gw.twin,
            api::GATEWAY_BACKENDS,
            &api::BackendsRequest { name: "web".into() },
            Duration::from_secs(10),
        )
        .await;
    assert!(theirs.is_err(), "another twin was told: {theirs:?}");

    // kill -9 the agent: the container keeps serving; the restarted agent adopts it (one copy).
    // Its overlay key and endpoints (the port it kept) are what the registry has.
    let overlay_of = |n: u32| {
        let c = g.client.clone();
        async move { c.node(n).await.unwrap().node.overlay.unwrap() }
    };
    let overlay_before = overlay_of(node.node_id).await;
    node.proc.kill9();
    assert_eq!(http_get(gw_addr, "web.gw.test").await.unwrap().0, 200);
    let runtime_root = g.dir.path().join("n1/runtime");
    let count = || {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&runtime_root)
            .arg("list")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&format!("c{id}-web")))
            .count()
    };
    assert_eq!(count(), 1);
    let pid_before = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/tfgrid/{}/c{id}-web/cgroup.procs",
        node.bridge()
    ))
    .unwrap();
    node = g.start_node_with(args.clone(), "n1");
    // The same key and port (the host's other addresses may differ: tests running beside this
    // one add and remove bridges of their own grids).
    let overlay_after = overlay_of(node.node_id).await;
    assert_eq!(overlay_after.wg_key, overlay_before.wg_key);
    assert_eq!(overlay_after.endpoints[0], overlay_before.endpoints[0]);
    let info = g.get(&node, id).await.unwrap();
    assert_eq!(info.results["web"].state, ResultState::Ok);
    assert_eq!(count(), 1);
    let pid_after = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/tfgrid/{}/c{id}-web/cgroup.procs",
        node.bridge()
    ))
    .unwrap();
    assert_eq!(
        pid_before, pid_after,
        "the container was restarted, not adopted"
    );
    assert_eq!(http_get(gw_addr, "web.gw.test").await.unwrap().0, 200);

    // Logs are there; delete leaves nothing behind.
    let key = format!("c{id}-web");
    let _: api::Logs = g
        .send(
            &node,
            api::LOGS,
            &api::LogsRequest {
                contract_id: id,
                name: "web".into(),
                tail: None,
            },
        )
        .await
        .unwrap();
    g.delete(&node, id).await;
    assert_eq!(
        leftovers(g.dir.path(), &node.bridge(), &key),
        Vec::<String>::new(),
        "{}",
        std::fs::read_to_string(&node.log).unwrap()
    );
    assert!(!g.dir.path().join("n1/containers").join(&key).exists());
    assert_eq!(count(), 0);
    let veth_prefix = "tv";
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    let bridge = &args[args.iter().position(|a| a == "--bridge").unwrap() + 1];
    assert!(
        !links
            .lines()
            .any(|l| l.contains(veth_prefix) && l.contains(&format!("master {bridge}"))),
        "a veth is left on {bridge}: {links}"
    );

    // A contract cancelled while its agent is down: the restarted agent removes it before it
    // recovers anything (it is gone by the time the agent is ready), never brings it back first.
    let mut d = deployment(
        g.user_twin,
        vec![("web", container(&image, None, 1, 64 * MIB))],
    );
    d.description = "cancelled while the agent is down".into();
    g.signer()
        .submit(Call::CancelContract { contract_id: id })
        .await
        .unwrap();
    let info = g.deploy(&node, d).await.unwrap();
    let id2 = info.deployment.contract_id;
    assert_eq!(info.results["web"].state, ResultState::Ok);
    node.proc.kill9();
    g.signer()
        .submit(Call::CancelContract { contract_id: id2 })
        .await
        .unwrap();
    let node = g.start_node_with(args.clone(), "n1");
    let key2 = format!("c{id2}-web");
    let out = Command::new("runc")
        .arg("--root")
        .arg(&runtime_root)
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&key2),
        "the cancelled contract's container runs after the restart"
    );
    assert_eq!(
        leftovers(g.dir.path(), &node.bridge(), &key2),
        Vec::<String>::new()
    );
    let log = std::fs::read_to_string(&node.log).unwrap();
    let recovered = log
        .lines()
        .any(|l| l.contains("recovered") && l.contains(&format!("contract={id2}")));
    assert!(
        !recovered,
        "the cancelled contract was recovered first: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_cpu_limits_are_enforced() {
    if let Some(why) = container_skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let g = Grid::start().await;
    let oci = start_oci_registry(g.dir.path());
    let image = push_image(&oci.addr, "tools", &["/bin/sleep", "1000"]).await;
    let mut args = g.node_args("n1", None);
    args.extend(["--insecure-registry".to_string(), oci.addr.clone()]);
    let node = g.start_node_with(args, "n1");
    let d = deployment(
        g.user_twin,
        vec![
            (
                // tail keeps one endless line in memory: it grows past the limit.
                "hog",
                container(
                    &image,
                    Some(vec!["/bin/sh", "-c", "head -c 400000000 /dev/zero | tail"]),
                    1,
                    32 * MIB,
                ),
            ),
            ("vol", WorkloadData::Volume(VolumeSpec { size: 64 * MIB })),
            (
                "spin",
                with_mount(
                    container(
                        &image,
                        Some(vec![
                            "/bin/sh",
                            "-c",
                            "echo kept > /data/file; while :; do :; done & while :; do :; done",
                        ]),
                        1,
                        32 * MIB,
                    ),
                    "vol",
                    "/data",
                ),
            ),
        ],
    );
    let info = g.deploy(&node, d).await.unwrap();
    let id = info.deployment.contract_id;
    for w in ["hog", "vol", "spin"] {
        assert_eq!(
            info.results[w].state,
            ResultState::Ok,
            "{}",
            info.results[w].message
        );
    }
    let msg = g
        .wait_state(
            &node,
            id,
            "hog",
            |s, m| s == ResultState::Error && m.contains("out of memory"),
            Duration::from_secs(30),
        )
        .await;
    assert!(msg.contains("32.0 MiB"), "{msg}");

    // The volume is an ext4 filesystem of its size, mounted into the container.
    let vol = g.dir.path().join(format!("n1/volumes/c{id}-vol"));
    let t0 = Instant::now();
    while std::fs::read_to_string(vol.join("file")).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the container did not write to its volume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(std::fs::read_to_string(vol.join("file")).unwrap(), "kept\n");
    let df = Command::new("df")
        .args(["-B1", "--output=size,fstype"])
        .arg(&vol)
        .output()
        .unwrap();
    let df = String::from_utf8_lossy(&df.stdout).into_owned();
    let size: u64 = df
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(size > 40 * MIB && size <= 64 * MIB, "{df}");

    // One core's quota: two busy loops get one core's worth of time between them.
    let quota = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/cpu/tfgrid/{}/c{id}-spin/cpu.cfs_quota_us",
        node.bridge()
    ))
    .unwrap();
    assert_eq!(quota.trim(), "100000");
    let usage = || -> u64 {
        std::fs::read_to_string(format!(
            "/sys/fs/cgroup/cpuacct/tfgrid/{}/c{id}-spin/cpuacct.usage",
            node.bridge()
        ))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
    };
    // The window lasts until the loops have used 2 s of cpu, so a machine busy with other
    // tests stretches it instead of failing it; unthrottled, two loops on two cores would
    // use that in about 1 s.
    let (u0, t0) = (usage(), Instant::now());
    let (used, wall) = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let used = (usage() - u0) as f64 / 1e9;
        if used >= 2.0 {
            break (used, t0.elapsed().as_secs_f64());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the loops hardly ran: {used:.2}s of cpu in 60 s"
        );
    };
    assert!(
        used < wall * 1.25,
        "two loops used {used:.2}s of cpu in {wall:.2}s under a one-core quota"
    );
    g.delete(&node, id).await;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let base = g.dir.path().to_string_lossy().into_owned();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains(&base) && l.contains(&format!("/c{id}-vol "))),
        "the volume is still mounted"
    );
    assert!(!vol.exists() && !vol.with_extension("img").exists());
    assert_eq!(
        leftovers(g.dir.path(), &node.bridge(), &format!("c{id}-spin")),
        Vec::<String>::new(),
        "{}",
        std::fs::read_to_string(&node.log).unwrap()
    );

    // A sized writable layer stops the writes at its size; the node's disk is untouched.
    g.signer()
        .submit(Call::CancelContract { contract_id: id })
        .await
        .unwrap();
    let d = deployment(
        g.user_twin,
        vec![(
            // A 16 MiB writable layer: writing 32 MiB into its rootfs runs out of space.
            "small",
            with_rootfs(
                container(
                    &image,
                    Some(vec![
                        "/bin/sh",
                        "-c",
                        "head -c 33554432 /dev/zero > /big; echo wrote $?; sleep 1000",
                    ]),
                    1,
                    32 * MIB,
                ),
                16 * MIB,
            ),
        )],
    );
    let info = g.deploy(&node, d).await.unwrap();
    let id = info.deployment.contract_id;
    assert_eq!(
        info.results["small"].state,
        ResultState::Ok,
        "{}",
        info.results["small"].message
    );
    let t0 = Instant::now();
    let small_log = loop {
        let l: api::Logs = g
            .send(
                &node,
                api::LOGS,
                &api::LogsRequest {
                    contract_id: id,
                    name: "small".into(),
                    tail: None,
                },
            )
            .await
            .unwrap();
        if l.text.contains("wrote") {
            break l.text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no output: {}",
            l.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // busybox head reports the ENOSPC as "I/O error"; what matters is that the write failed
    // and the file stopped within the layer.
    assert!(small_log.contains("wrote 1"), "{small_log}");
    let big = g
        .dir
        .path()
        .join(format!("n1/containers/c{id}-small/rw/upper/big"));
    let size = std::fs::metadata(&big).unwrap().len();
    assert!(size < 16 * MIB, "{size} bytes written into a 16 MiB layer");

    g.delete(&node, id).await;
    assert_eq!(
        leftovers(g.dir.path(), &node.bridge(), &format!("c{id}-small")),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_from_a_registry_with_basic_auth() {
    if let Some(why) = container_skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let g = Grid::start().await;
    let htpasswd = g.dir.path().join("htpasswd");
    let hash = bcrypt::hash("pull-secret", 4).unwrap();
    std::fs::write(&htpasswd, format!("puller:{hash}\n")).unwrap();
    let oci = tfgrid_node::images::LocalRegistry::start_with(
        &g.dir.path().join("oci"),
        None,
        Some(&htpasswd),
        None,
    )
    .unwrap();
    let auth = tfgrid_node::images::RegistryAuth::Basic("puller".into(), "pull-secret".into());
    let image = tfgrid_node::images::push_busybox_image_as(
        &oci.addr,
        "private",
        &["/bin/sleep", "1000"],
        "",
        &auth,
        None,
    )
    .await
    .unwrap();
    // Anonymous pulls are refused by the registry, and the workload says so.
    let mut anon = g.node_args("anon", None);
    anon.extend(["--insecure-registry".to_string(), oci.addr.clone()]);
    let anon = g.start_node_with(anon, "anon");
    let (r, _) = deploy_app(&g, &anon, &image).await;
    assert_eq!(r.state, ResultState::Error);
    assert!(
        r.message.to_lowercase().contains("authorized"),
        "{}",
        r.message
    );
    // With the login, the same image runs.
    let mut args = g.node_args("authed", None);
    args.extend([
        "--insecure-registry".to_string(),
        oci.addr.clone(),
        "--registry-login".to_string(),
        format!("{}=puller:pull-secret", oci.addr),
    ]);
    let node = g.start_node_with(args, "authed");
    let (r, app_contract) = deploy_app(&g, &node, &image).await;
    assert_eq!(r.state, ResultState::Ok, "{}", r.message);
    g.delete(&node, app_contract).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_from_an_https_registry_with_a_private_ca() {
    if let Some(why) = container_skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let g = Grid::start().await;
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let (cert_file, key_file) = (g.dir.path().join("tls.crt"), g.dir.path().join("tls.key"));
    std::fs::write(&cert_file, &cert_pem).unwrap();
    std::fs::write(&key_file, &key_pem).unwrap();
    let oci = tfgrid_node::images::LocalRegistry::start_with(
        &g.dir.path().join("oci"),
        None,
        None,
        Some((&cert_file, &key_file)),
    )
    .unwrap();
    let image = tfgrid_node::images::push_busybox_image_as(
        &oci.addr,
        "tls",
        &["/bin/sleep", "1000"],
        "",
        &tfgrid_node::images::RegistryAuth::Anonymous,
        Some(cert_pem.as_bytes()),
    )
    .await
    .unwrap();
    // Without the CA the certificate is not trusted; with --registry-ca the image runs.
    let plain = g.start_node("untrusting", None);
    let (r, _) = deploy_app(&g, &plain, &image).await;
    assert_eq!(r.state, ResultState::Error);
    assert!(r.message.contains("pulling"), "{}", r.message);
    let mut args = g.node_args("trusting", None);
    args.extend([
        "--registry-ca".to_string(),
        cert_file.to_string_lossy().into_owned(),
    ]);
    let node = g.start_node_with(args, "trusting");
    let (r, app_contract) = deploy_app(&g, &node, &image).await;
    assert_eq!(r.state, ResultState::Ok, "{}", r.message);
    g.delete(&node, app_contract).await;
}

/// Files under `dir` (recursively), as paths relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out
}

/// A node whose data filesystem is small (an 800 MiB tmpfs): it offers no more disk than that
/// holds; a pull that cannot fit is refused before it downloads; a pull that fails when the disk
/// fills up mid-way leaves no blob and no half-unpacked layer; afterwards the node deploys as
/// before and stops promptly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_pulls_cleanly_and_never_wedges_the_node() {
    if let Some(why) = container_skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let g = Grid::start().await;
    let oci = start_oci_registry(g.dir.path());
    let small = g.dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=800m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success());
    let points = g.dir.path().join("points");
    std::fs::create_dir_all(&points).unwrap();
    let mut args = g.node_args("small", None);
    args.extend(["--insecure-registry".to_string(), oci.addr.clone()]);
    let mut node = g.start_node_env(
        args,
        "small",
        &[
            ("TFGRID_PAUSE_AT", "node-before-blob"),
            ("TFGRID_CRASH_ONCE_DIR", points.to_str().unwrap()),
        ],
    );
    // Each pause point fires once: disarmed until the test removes its marker.
    std::fs::write(points.join("node-before-blob"), b"").unwrap();
    let rec = g.client.node(node.node_id).await.unwrap();
    assert!(
        rec.node.total.sru + rec.node.total.hru <= 800 * MIB,
        "the node offers {} + {} bytes of disk on an 800 MiB filesystem",
        rec.node.total.sru,
        rec.node.total.hru
    );

    // 300 MiB of layer cannot fit (blob and unpacked files): refused before any download.
    let big = tfgrid_node::images::push_busybox_image(
        &oci.addr,
        "big",
        &["/bin/sleep", "1000"],
        &"a".repeat(300 << 20),
    )
    .await
    .unwrap();
    // A cancelled contract's deployment goes when the node sees the cancel (its 2 s sweep).
    let signer = g.signer();
    let cancel = |id: ContractId| {
        let (s, g, node) = (&signer, &g, &node);
        async move {
            s.submit(Call::CancelContract { contract_id: id })
                .await
                .unwrap();
            let t0 = Instant::now();
            while g.get(node, id).await.is_ok() {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "contract {id} stays"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (r, id) = deploy_app(&g, &node, &big).await;
    assert_eq!(r.state, ResultState::Error);
    assert!(r.message.contains("not enough disk"), "{}", r.message);
    cancel(id).await;
    let images = small.join("images");
    assert!(
        files_under(&images.join("blobs")).is_empty(),
        "{:?}",
        files_under(&images)
    );

    // 100 MiB fits, but the disk fills up while it downloads: the pull fails and leaves nothing.
    let medium = tfgrid_node::images::push_busybox_image(
        &oci.addr,
        "medium",
        &["/bin/sleep", "1000"],
        &"b".repeat(100 << 20),
    )
    .await
    .unwrap();
    std::fs::remove_file(points.join("node-before-blob")).unwrap();
    let pending = {
        let (g2, n2, img) = (&g, &node, medium.clone());
        async move { deploy_app(g2, n2, &img).await }
    };
    let filler = small.join("filler");
    let fill = async {
        let flag = points.join("node-before-blob.paused");
        while !flag.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let free = tfgrid_node::capacity::free_space(&small).unwrap();
        let f = std::fs::File::create(&filler).unwrap();
        // tmpfs allocates on write: write, not set_len.
        let mut w = std::io::BufWriter::new(f);
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..(free.saturating_sub(40 * MIB) >> 20) {
            std::io::Write::write_all(&mut w, &chunk).unwrap();
        }
        drop(w);
        std::fs::remove_file(&flag).unwrap();
    };
    let ((r, id), ()) = tokio::join!(pending, fill);
    assert_eq!(r.state, ResultState::Error);
    assert!(
        !r.message.contains("not enough disk")
            && (r.message.contains("pulling layer") || r.message.contains("unpacking layer")),
        "not the mid-pull failure: {}",
        r.message
    );
    cancel(id).await;
    std::fs::remove_file(&filler).unwrap();
    assert!(
        files_under(&images.join("blobs")).is_empty(),
        "a partial blob is left: {:?}",
        files_under(&images)
    );
    let layers = files_under(&images.join("layers"));
    assert!(
        !layers.iter().any(|l| l.ends_with(".partial")),
        "a half-unpacked layer is left: {layers:?}"
    );

    // The node is not wedged: it deploys, and stops at once when told to.
    let web = push_image(
        &oci.addr,
        "web",
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    )
    .await;
    let (r, _) = deploy_app(&g, &node, &web).await;
    assert_eq!(r.state, ResultState::Ok, "{}", r.message);
    let t0 = Instant::now();
    Command::new("kill")
        .args(["-TERM", &node.proc.child.id().to_string()])
        .status()
        .unwrap();
    let st = node.proc.child.wait().unwrap();
    assert!(st.success() || st.code().is_some(), "{st:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        t0.elapsed()
    );
    drop(node);
}

/// A host outside the grid: a network namespace on a veth from this machine (203.0.113.1 here,
/// .2 there), serving `outside` over HTTP on port 18080. Removed on drop.
struct Outside {
    ns: String,
    server: Child,
}

impl Outside {
    const ADDR: &str = "203.0.113.2";

    fn new(www: &Path) -> Outside {
        std::fs::create_dir_all(www).unwrap();
        std::fs::write(www.join("index.html"), "outside\n").unwrap();
        let ns = format!("tfgt-out{}", std::process::id() % 100_000);
        let host = format!("tfgto{}", std::process::id() % 100_000);
        let run = |a: &[&str]| {
            let st = Command::new("ip").args(a).status().unwrap();
            assert!(st.success(), "ip {a:?}");
        };
        run(&["netns", "add", &ns]);
        run(&[
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        run(&["addr", "add", "203.0.113.1/30", "dev", &host]);
        run(&["link", "set", &host, "up"]);
        run(&["-n", &ns, "addr", "add", "203.0.113.2/30", "dev", "eth0"]);
        run(&["-n", &ns, "link", "set", "eth0", "up"]);
        run(&["-n", &ns, "link", "set", "lo", "up"]);
        let server = Command::new("ip")
            .args([
                "netns", "exec", &ns, "busybox", "httpd", "-f", "-p", "18080", "-h",
            ])
            .arg(www)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        Outside { ns, server }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

async fn create_network(signer: &TwinSigner, name: &str) -> u32 {
    match signer
        .submit(Call::CreateNetwork { name: name.into() })
        .await
        .unwrap()
        .outcome
    {
        Outcome::NetworkCreated { network_id } => network_id,
        o => panic!("{o:?}"),
    }
}

/// The users' private networks on one node: a container joins only a network of its own twin
/// that has a subnet on the node; it sits on that network's bridge with an address of the
/// subnet and the network's names in /etc/hosts; another user's container on the same node does
/// not reach it (the node's host does); and the bridge goes with its last container, also when
/// that container's contract was cancelled while the agent was down (the sweep at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_network_keeps_its_containers_apart_and_its_bridge_goes_with_them() {
    use tfgrid_core::network::{Layout, NetworkHost};
    if let Some(why) = container_skip().or_else(|| (!have("nft")).then(|| "needs nft".into())) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = Grid::start().await;
    let (_oci, image, args, mut node) = web_node(&g).await;
    let layout = Layout::of(&g.client.config().await.unwrap());
    let user = g.signer();
    let app = create_network(&user, "app").await;
    let empty = create_network(&user, "empty").await;
    user.submit(Call::AddNetworkNode {
        network_id: app,
        node_id: node.node_id,
    })
    .await
    .unwrap();
    let in_net = |net| {
        let mut w = container(&image, None, 1, 32 * MIB);
        if let WorkloadData::Container(c) = &mut w {
            c.network = Some(net);
        }
        w
    };
    // Refused: another twin's network, and a network with no subnet on this node.
    let other = g.other_user().await;
    let info = g
        .deploy_as(
            &other,
            &node,
            deployment(other.1, vec![("web", in_net(app))]),
        )
        .await
        .unwrap();
    let r = &info.results["web"];
    assert_eq!(r.state, ResultState::Error);
    assert!(r.message.contains("belongs to twin"), "{}", r.message);
    let other_signer = TwinSigner::new(other.0.clone(), g.client.clone());
    other_signer
        .submit(Call::CancelContract {
            contract_id: info.deployment.contract_id,
        })
        .await
        .unwrap();
    let _: serde_json::Value = other
        .2
        .call_json(
            node.twin,
            api::DELETE,
            &ContractRef {
                contract_id: info.deployment.contract_id,
            },
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let info = g
        .deploy(&node, deployment(g.user_twin, vec![("web", in_net(empty))]))
        .await
        .unwrap();
    let r = &info.results["web"];
    assert_eq!(r.state, ResultState::Error);
    assert!(r.message.contains("no subnet on node"), "{}", r.message);
    user.submit(Call::CancelContract {
        contract_id: info.deployment.contract_id,
    })
    .await
    .unwrap();
    g.delete(&node, info.deployment.contract_id).await;

    // The user's container: on the network's bridge, an address of its subnet.
    let info = g
        .deploy(&node, deployment(g.user_twin, vec![("web", in_net(app))]))
        .await
        .unwrap();
    let r = &info.results["web"];
    assert_eq!(r.state, ResultState::Ok, "{}", r.message);
    let contract = info.deployment.contract_id;
    let ip: std::net::Ipv4Addr = r.data["ip"].parse().unwrap();
    let net = g.client.network(app).await.unwrap();
    let subnet = net.subnet_of(&layout, node.node_id).unwrap();
    assert!(subnet.contains(ip), "{ip} not in {subnet}");
    let bridge = tfgrid_node::networks::Networks::bridge_name(&node.bridge(), app);
    let link_up = |b: &str| {
        Command::new("ip")
            .args(["link", "show", b])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(link_up(&bridge), "no bridge {bridge}");
    // Its /etc/hosts follows the network's names in the registry.
    user.submit(Call::SetNetworkHosts {
        network_id: app,
        hosts: vec![NetworkHost {
            name: "db".into(),
            addrs: vec![ip],
        }],
    })
    .await
    .unwrap();
    let key = format!("c{contract}-web");
    let runtime = g.dir.path().join("n1").join("runtime");
    let t0 = Instant::now();
    loop {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&runtime)
            .args(["exec", &key, "cat", "/etc/hosts"])
            .output()
            .unwrap();
        let hosts = String::from_utf8_lossy(&out.stdout).into_owned();
        if hosts.contains(&format!("{ip}\tdb")) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{hosts}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Another user's container on the same node (no network: the node's own subnet) does not
    // reach it; the node's host does.
    let info = g
        .deploy_as(
            &other,
            &node,
            deployment(
                other.1,
                vec![("probe", container(&image, None, 1, 32 * MIB))],
            ),
        )
        .await
        .unwrap();
    assert_eq!(info.results["probe"].state, ResultState::Ok);
    let probe_ns = format!(
        "tfgrid-{}-c{}-probe",
        node.bridge(),
        info.deployment.contract_id
    );
    let url = format!("http://{ip}:8080/");
    let get = |ns: Option<&str>| {
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "curl"]);
                c
            }
            None => Command::new("curl"),
        };
        c.args(["-s", "-m", "3", &url]).output().unwrap()
    };
    let from_probe = get(Some(&probe_ns));
    assert!(
        !from_probe.status.success(),
        "another user's container reached {ip}: {}",
        String::from_utf8_lossy(&from_probe.stdout)
    );
    let from_host = get(None);
    assert_eq!(
        String::from_utf8_lossy(&from_host.stdout).trim(),
        "hello from tfgrid"
    );

    // A gateway serves a network's workload only for the network's owner, through its node's
    // own subnet in the network.
    let gw = g.start_node("gw", Some("gw.test"));
    let gw_addr = gw.gateway.unwrap();
    other_signer
        .submit(Call::CreateNameContract {
            name: "evil".into(),
        })
        .await
        .unwrap();
    user.submit(Call::AddNetworkAccess {
        network_id: app,
        wg_key: tfgrid_core::records::X25519Key([9; 32]),
        node_id: node.node_id,
    })
    .await
    .unwrap();
    let machine = layout.access_addr(app, 0).unwrap();
    for (backend, why) in [
        (format!("http://{ip}:8080"), "another twin's network"),
        (format!("http://{machine}:8080"), "a user's machine"),
    ] {
        route_refused(&g, &other, &gw, &backend, why).await;
    }
    user.submit(Call::CreateNameContract { name: "app".into() })
        .await
        .unwrap();
    user.submit(Call::AddNetworkNode {
        network_id: app,
        node_id: gw.node_id,
    })
    .await
    .unwrap();
    let d = deployment(
        g.user_twin,
        vec![(
            "app_gw",
            WorkloadData::GatewayNameProxy(GatewayNameProxySpec {
                name: "app".into(),
                backends: vec![format!("http://{ip}:8080")],
            }),
        )],
    );
    let info = g.deploy(&gw, d).await.unwrap();
    assert_eq!(
        info.results["app_gw"].state,
        ResultState::Ok,
        "{:?}",
        info.results
    );
    let (code, body) = http_get(gw_addr, "app.gw.test").await.unwrap();
    assert_eq!((code, body.trim()), (200, "hello from tfgrid"));
    assert!(
        link_up(&tfgrid_node::networks::Networks::bridge_name(
            &gw.bridge(),
            app
        )),
        "the gateway's node did not join the network"
    );

    // The world outside the grid (a host of the test's own on a veth) is reached through the
    // node's address; a node started with --no-masquerade keeps its containers inside.
    let outside = Outside::new(&g.dir.path().join("www"));
    let web_ns = format!("tfgrid-{}-{key}", node.bridge());
    let out_url = format!("http://{}:18080/", Outside::ADDR);
    let curl_in = |ns: &str| {
        Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-s", "-m", "3", &out_url])
            .output()
            .unwrap()
    };
    let o = curl_in(&web_ns);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "outside",
        "{o:?}"
    );
    node.proc.kill9();
    let mut closed = args.clone();
    closed.push("--no-masquerade".into());
    node = g.start_node_with(closed, "n1");
    assert_eq!(
        g.get(&node, contract).await.unwrap().results["web"].state,
        ResultState::Ok
    );
    let o = curl_in(&web_ns);
    assert!(
        !o.status.success(),
        "reached outside with --no-masquerade: {o:?}"
    );
    drop(outside);

    // The contract is cancelled while the agent is down: at start the deployment is removed,
    // and with it the bridge no workload uses any more.
    node.proc.kill9();
    user.submit(Call::CancelContract {
        contract_id: contract,
    })
    .await
    .unwrap();
    node = g.start_node_with(args, "n1");
    let t0 = Instant::now();
    while link_up(&bridge) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "bridge {bridge} left after its last container went"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rules = Command::new("nft")
        .args(["list", "table", "ip", &format!("tfgrid_{}", node.bridge())])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains(&bridge),
        "rules for {bridge} left"
    );
}

/// Why a VM test cannot run here, if it cannot.
fn vm_skip() -> Option<String> {
    if let Some(why) = container_skip() {
        return Some(why);
    }
    if !have("qemu-system-x86_64") {
        return Some(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into(),
        );
    }
    if tfgrid_node::kinds::vm::boot::find_kernel().is_err() {
        return Some("no kernel in /boot with modules (apt-get install linux-image-amd64)".into());
    }
    None
}

fn vm(image: &str, cmd: Option<Vec<&str>>) -> WorkloadData {
    WorkloadData::Vm(tfgrid_core::deployment::VmSpec {
        image: Some(image.into()),
        disk_image: None,
        entrypoint: None,
        cmd: cmd.map(|c| c.into_iter().map(String::from).collect()),
        env: [("NAME".to_string(), "tfgrid".to_string())].into(),
        cpu: 1,
        memory: 128 * MIB,
        disk_size: 64 * MIB,
        kernel_args: vec![],
        ssh_keys: vec![],
        mounts: vec![],
        network: None,
    })
}

/// The pids of the QEMU processes named `name` (its `-name`).
fn qemu_pids(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmd.split(|b| *b == 0).any(|a| a == name.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// A VM from the web image behind a gateway: the node agent killed right after it started QEMU
/// (before it answered) brings it up on restart without a second copy; killed while the VM
/// serves, it adopts the running VM; QEMU killed with kill -9 is started again by the node;
/// delete leaves no process, tap, mount, cgroup or file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_served_through_the_gateway_survives_kills_and_is_removed_cleanly() {
    if let Some(why) = vm_skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let g = Grid::start().await;
    let oci = start_oci_registry(g.dir.path());
    let image = push_image(
        &oci.addr,
        "web",
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    )
    .await;
    let mut args = g.node_args("n1", None);
    args.extend(["--insecure-registry".to_string(), oci.addr.clone()]);
    let points = g.dir.path().join("points");
    std::fs::create_dir_all(&points).unwrap();
    let env = [
        ("TFGRID_CRASH_AT", "node-vm-after-start"),
        ("TFGRID_CRASH_ONCE_DIR", points.to_str().unwrap()),
    ];
    let mut node = g.start_node_env(args.clone(), "n1", &env);
    let gw = g.start_node("gw", Some("gw.test"));

    // Bad input changes nothing: both boot modes at once, too little memory.
    for (bad, why) in [
        (
            {
                let mut w = vm(&image, None);
                if let WorkloadData::Vm(v) = &mut w {
                    v.disk_image = Some(image.clone());
                }
                w
            },
            "exactly one of image and disk_image",
        ),
        (
            {
                let mut w = vm(&image, None);
                if let WorkloadData::Vm(v) = &mut w {
                    v.memory = 32 * MIB;
                }
                w
            },
            "64 MiB",
        ),
    ] {
        let mut d = deployment(g.user_twin, vec![("web", bad)]);
        d.contract_id = 1;
        d.sign(&g.user);
        let e = g
            .send::<_, DeploymentInfo>(&node, api::DEPLOY, &d)
            .await
            .unwrap_err();
        assert!(e.contains(why), "{e}");
    }

    // The agent dies right after QEMU started: the deploy gets no answer.
    let mut d = deployment(g.user_twin, vec![("web", vm(&image, None))]);
    let id = g.contract(&node, &d).await;
    d.contract_id = id;
    d.sign(&g.user);
    let twin = node.twin;
    let sent = tokio::time::timeout(
        Duration::from_secs(60),
        g.peer
            .call_json::<_, DeploymentInfo>(twin, api::DEPLOY, &d, Duration::from_secs(60)),
    );
    let t0 = Instant::now();
    let child = &mut node.proc.child;
    tokio::select! {
        r = sent => panic!("the deploy was answered: {r:?}"),
        _ = async {
            while child.try_wait().unwrap().is_none() {
                assert!(t0.elapsed() < Duration::from_secs(60), "the crash point never fired");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        } => {}
    }
    assert!(points.join("node-vm-after-start").exists());
    let name = format!("tfgrid-{}-c{id}-web", node.bridge());
    assert_eq!(qemu_pids(&name).len(), 1, "QEMU outlives its agent");
    node = g.start_node_env(args.clone(), "n1", &env);
    g.wait_state(
        &node,
        id,
        "web",
        |s, _| s == ResultState::Ok,
        Duration::from_secs(30),
    )
    .await;
    let pids = qemu_pids(&name);
    assert_eq!(pids.len(), 1, "a second QEMU for one VM");
    let info = g.get(&node, id).await.unwrap();
    let r = &info.results["web"];
    assert_eq!(r.data["boot"], "image");
    assert!(
        ["kvm", "tcg"].contains(&r.data["accel"].as_str()),
        "{:?}",
        r.data
    );
    let ip = r.data["ip"].clone();

    g.signer()
        .submit(Call::CreateNameContract {
            name: "vmweb".into(),
        })
        .await
        .unwrap();
    let route = deployment(
        g.user_twin,
        vec![(
            "vm_gw",
            WorkloadData::GatewayNameProxy(GatewayNameProxySpec {
                name: "vmweb".into(),
                backends: vec![format!("http://{ip}:8080")],
            }),
        )],
    );
    let info = g.deploy(&gw, route).await.unwrap();
    assert_eq!(info.results["vm_gw"].state, ResultState::Ok);
    let gw_addr = gw.gateway.unwrap();
    let serves = || async {
        let t0 = Instant::now();
        loop {
            match http_get(gw_addr, "vmweb.gw.test").await {
                Ok((200, b)) => return b,
                other => {
                    assert!(t0.elapsed() < Duration::from_secs(90), "{other:?}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    };
    assert_eq!(serves().await, "hello from tfgrid\n");

    // kill -9 the agent: the VM keeps serving; the restarted agent adopts the same QEMU.
    node.proc.kill9();
    assert_eq!(http_get(gw_addr, "vmweb.gw.test").await.unwrap().0, 200);
    node = g.start_node_env(args.clone(), "n1", &env);
    g.wait_state(
        &node,
        id,
        "web",
        |s, _| s == ResultState::Ok,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(qemu_pids(&name), pids, "the VM was restarted, not adopted");

    // kill -9 QEMU (the VM dies as a crashed host process would): the node boots it again.
    Command::new("kill")
        .args(["-9", &pids[0].to_string()])
        .status()
        .unwrap();
    let msg = g
        .wait_state(
            &node,
            id,
            "web",
            |s, m| s == ResultState::Ok && m.contains("restarted after"),
            Duration::from_secs(30),
        )
        .await;
    assert!(msg.contains("the VM stopped"), "{msg}");
    let again = qemu_pids(&name);
    assert_eq!(again.len(), 1);
    assert_ne!(again, pids);
    assert_eq!(serves().await, "hello from tfgrid\n");

    // The console is the workload's log.
    let logs: api::Logs = g
        .send(
            &node,
            api::LOGS,
            &api::LogsRequest {
                contract_id: id,
                name: "web".into(),
                tail: None,
            },
        )
        .await
        .unwrap();
    assert!(
        logs.text.contains("tfgrid: starting the entrypoint"),
        "{}",
        logs.text
    );

    // Delete leaves nothing: no QEMU, tap, mount, cgroup or directory.
    let key = format!("c{id}-web");
    g.delete(&node, id).await;
    assert_eq!(qemu_pids(&name), Vec::<u32>::new());
    assert_eq!(
        leftovers(g.dir.path(), &node.bridge(), &key),
        Vec::<String>::new()
    );
    assert!(!g.dir.path().join("n1/vms").join(&key).exists());
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links
            .lines()
            .any(|l| l.contains(": tt") && l.contains(&format!("master {}", node.bridge()))),
        "a tap is left on {}: {links}",
        node.bridge()
    );
}
