//! `tfgrid bench node`: deploy latency of a container with a cached image (from the bus request to
//! the answer that says it runs), and the node agent's idle RSS. The agent is a real `tfgrid node`
//! process; the registry and relay run in this process; the image comes from a local
//! docker-registry.

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tfgrid_bus::peer::ensure_registered;
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::capacity::MIB;
use tfgrid_core::deployment::{ContainerSpec, Deployment, ResultState, Workload, WorkloadData};
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::Identity;
use tfgrid_node::api::{self, ContractRef, DeploymentInfo};
use tfgrid_node::images::{push_busybox_image, LocalRegistry};
use tfgrid_registry::{Registry, RegistryConfig};
use tfgrid_registry_client::{RegistryClient, TwinSigner};

#[derive(Args)]
pub struct NodeBench {
    /// Deployments to time.
    #[arg(long, default_value_t = 50)]
    deploys: usize,
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(b: NodeBench) -> Result<()> {
    if !nix_is_root() {
        bail!("tfgrid bench node runs containers: run it as root");
    }
    let dir = tempfile::tempdir()?;
    let registry = Registry::open(&dir.path().join("registry"), RegistryConfig::default())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(registry.serve(listener, std::future::pending()));
    let client = RegistryClient::new(&url);
    let (relay_url, _, _server, _stop) = crate::bus_cmd::start_relay(
        "127.0.0.1:0".parse()?,
        None,
        &dir.path().join("relay.key"),
        &url,
    )
    .await?;
    let oci = LocalRegistry::start(&dir.path().join("oci")).map_err(anyhow::Error::msg)?;
    let image = push_busybox_image(
        &oci.addr,
        "web",
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
        "bench\n",
    )
    .await
    .map_err(anyhow::Error::msg)?;

    let farmer = TwinSigner::new(Identity::generate(), client.clone());
    farmer.ensure_twin("").await?;
    let farm = match farmer
        .submit(Call::CreateFarm {
            name: "bench".into(),
            dedicated: false,
        })
        .await?
        .outcome
    {
        Outcome::FarmCreated { farm_id } => farm_id,
        o => bail!("{o:?}"),
    };
    let node_data = dir.path().join("node");
    let mut child = Command::new(std::env::current_exe()?)
        .args(["node", "--registry", &url, "--relay", &relay_url])
        .args(["--farm", &farm.to_string(), "--data"])
        .arg(&node_data)
        .args(["--zdb-listen", "127.0.0.1:0", "--bridge", "tfgbench0"])
        .args([
            "--subnet",
            "10.250.0.0/24",
            "--insecure-registry",
            &oci.addr,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("node stdout")?).read_line(&mut line)?;
    let node = Child(child);
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.first() != Some(&"node") || words.len() < 4 {
        bail!("the node agent did not start: {line:?}");
    }
    let node_id: u32 = words[1].parse()?;
    let node_twin: u32 = words[3].trim_end_matches(')').parse()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(node.0.id())?;

    let user = Identity::generate();
    let signer = TwinSigner::new(user.clone(), client.clone());
    let twin = ensure_registered(&signer, &relay_url).await?;
    let peer = Peer::start(PeerConfig {
        identity: user.clone(),
        twin,
        relay_url: relay_url.clone(),
        registry: client.clone(),
    });
    peer.connected(Duration::from_secs(10)).await?;

    let mut deploy_hist = Histogram::<u64>::new(3)?;
    let mut delete_hist = Histogram::<u64>::new(3)?;
    // The first deploy pulls the image; it is not counted.
    for i in 0..=b.deploys {
        let mut d = Deployment {
            version: 0,
            twin_id: twin,
            contract_id: 0,
            metadata: String::new(),
            description: format!("bench {i}"),
            workloads: vec![Workload {
                version: 0,
                name: "web".into(),
                data: WorkloadData::Container(ContainerSpec {
                    image: image.clone(),
                    entrypoint: None,
                    cmd: None,
                    env: Default::default(),
                    cpu: 1,
                    memory: 64 * MIB,
                    rootfs_size: 0,
                    mounts: vec![],
                }),
                metadata: String::new(),
                description: String::new(),
            }],
            signature: None,
        };
        let contract_id = match signer
            .submit(Call::CreateNodeContract {
                node_id,
                deployment_hash: d.hash(),
                capacity: d.capacity()?,
            })
            .await?
            .outcome
        {
            Outcome::ContractCreated { contract_id, .. } => contract_id,
            o => bail!("{o:?}"),
        };
        d.contract_id = contract_id;
        d.sign(&user);
        let t0 = Instant::now();
        let info: DeploymentInfo = peer
            .call_json(node_twin, api::DEPLOY, &d, Duration::from_secs(120))
            .await?;
        let took = t0.elapsed();
        let r = &info.results["web"];
        if r.state != ResultState::Ok {
            bail!("deploy {i} failed: {}", r.message);
        }
        let t1 = Instant::now();
        let _: serde_json::Value = peer
            .call_json(
                node_twin,
                api::DELETE,
                &ContractRef { contract_id },
                Duration::from_secs(60),
            )
            .await?;
        let del = t1.elapsed();
        signer.submit(Call::CancelContract { contract_id }).await?;
        if i > 0 {
            deploy_hist.record(took.as_micros() as u64)?;
            delete_hist.record(del.as_micros() as u64)?;
        }
    }
    let rss_after = rss_kib(node.0.id())?;
    let ms = |us: u64| format!("{:.1} ms", us as f64 / 1000.0);
    println!(
        "tfgrid bench node: {} deploys of one container (busybox httpd, cached image, runc), one node agent process",
        b.deploys
    );
    println!(
        "deploy request -> container running: p50 {}  p99 {}  max {}",
        ms(deploy_hist.value_at_quantile(0.5)),
        ms(deploy_hist.value_at_quantile(0.99)),
        ms(deploy_hist.max())
    );
    println!(
        "delete (everything removed):         p50 {}  p99 {}  max {}",
        ms(delete_hist.value_at_quantile(0.5)),
        ms(delete_hist.value_at_quantile(0.99)),
        ms(delete_hist.max())
    );
    println!(
        "node agent RSS: idle {:.1} MB, after the deploys {:.1} MB",
        rss_idle as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    drop(node);
    let _ = Command::new("ip")
        .args(["link", "del", "tfgbench0"])
        .status();
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
