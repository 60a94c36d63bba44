//! `tfgrid bench node`: deploy latency of a container with a cached image (from the bus request to
//! the answer that says it runs), and the node agent's idle RSS. The agent is a real `tfgrid node`
//! process; the registry and relay run in this process; the image comes from a local
//! docker-registry.

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};
use tfgrid_bus::peer::ensure_registered;
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::capacity::MIB;
use tfgrid_core::deployment::{ContainerSpec, Deployment, ResultState, Workload, WorkloadData};
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::Identity;
use tfgrid_node::api::{self, ContractRef, DeploymentInfo};
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

pub async fn run(b: NodeBench) -> Result<()> {
    let g = crate::bench_bot::grid(1, 3000, 1000).await?;
    let (node_id, node_twin, pid) = g.node(0).context("the node agent")?;
    let (url, relay_url, image) = (g.url.clone(), g.relay.clone(), g.image.clone());
    let client = RegistryClient::new(&url);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(pid)?;

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
                    network: None,
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
    let rss_after = rss_kib(pid)?;
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
    drop(g);
    Ok(())
}
