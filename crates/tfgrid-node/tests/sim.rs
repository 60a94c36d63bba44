//! Simulated nodes (`tfgrid node --simulate`) against a real registry and relay in this
//! process: they register, answer the bus, check deployments on the registry as a real node
//! does (contract, owner, capacity, network), and remove what the registry cancelled. No root
//! is needed: a simulated node starts nothing on the host.

use std::time::{Duration, Instant};
use tfgrid_bus::relay::{self, RelayConfig};
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::deployment::{ContainerSpec, Deployment, Workload, WorkloadData};
use tfgrid_core::node_api::{self as api, ContractRef, DeploymentInfo};
use tfgrid_core::records::RegistryConfig;
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::{Capacity, ContractId, Identity};
use tfgrid_node::sim::{self, SimConfig};
use tfgrid_registry::Registry;
use tfgrid_registry_client::{RegistryClient, TwinSigner};

const T: Duration = Duration::from_secs(10);

struct Grid {
    _dir: tempfile::TempDir,
    client: RegistryClient,
    relay_url: String,
    _relay: relay::RelayStop,
}

async fn grid() -> Grid {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path(), RegistryConfig::default())
        .await
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = RegistryClient::new(&format!("http://{}", l.local_addr().unwrap()));
    tokio::spawn(reg.serve(l, std::future::pending()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("ws://{}/", l.local_addr().unwrap());
    let id = Identity::generate();
    let twin = TwinSigner::new(id.clone(), client.clone())
        .ensure_twin(&relay_url)
        .await
        .unwrap();
    let (router, stop) = relay::router(RelayConfig {
        identity: id,
        twin,
        public_url: relay_url.clone(),
        registry: client.clone(),
        tap: None,
    });
    tokio::spawn(async move { axum::serve(l, router).await });
    Grid {
        _dir: dir,
        client,
        relay_url,
        _relay: stop,
    }
}

async fn submit(s: &TwinSigner, call: Call) -> Outcome {
    s.submit(call).await.unwrap().outcome
}

/// A container deployment; each one made is distinct (the registry holds one contract per
/// deployment hash and node).
fn container(twin: u32, memory: u64, network: Option<u32>) -> Deployment {
    static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    Deployment {
        version: 0,
        twin_id: twin,
        contract_id: 0,
        metadata: MADE
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string(),
        description: String::new(),
        workloads: vec![Workload {
            version: 0,
            name: "web".into(),
            data: WorkloadData::Container(ContainerSpec {
                image: "127.0.0.1:5000/web:latest".into(),
                entrypoint: None,
                cmd: None,
                env: Default::default(),
                cpu: 1,
                memory,
                rootfs_size: 0,
                mounts: Vec::new(),
                network,
            }),
            metadata: String::new(),
            description: String::new(),
        }],
        signature: None,
    }
}

#[tokio::test]
async fn simulated_nodes_deploy_check_and_sweep_like_real_ones() {
    let g = grid().await;
    let farmer = TwinSigner::new(Identity::generate(), g.client.clone());
    farmer.ensure_twin("").await.unwrap();
    let Outcome::FarmCreated { farm_id } = submit(
        &farmer,
        Call::CreateFarm {
            name: "sim".into(),
            dedicated: false,
        },
    )
    .await
    else {
        panic!("no farm")
    };
    let gib = 1u64 << 30;
    let cfg = SimConfig {
        relay: g.relay_url.clone(),
        farm: farm_id,
        total: Capacity {
            cru: 4,
            mru: 4 * gib,
            sru: 10 * gib,
            ..Default::default()
        },
        country: "BE".into(),
        city: String::new(),
        report_every: Some(Duration::from_secs(60)),
        sweep_every: Duration::from_millis(200),
    };
    let a = sim::start(&cfg, g.client.clone(), 0).await.unwrap();
    let b = sim::start(&cfg, g.client.clone(), 1).await.unwrap();
    let view = g.client.node(a.node_id).await.unwrap();
    assert_eq!(view.node.total, cfg.total);
    assert!(
        view.node.overlay.is_some(),
        "networks take only overlay nodes"
    );

    let user_id = Identity::generate();
    let user = TwinSigner::new(user_id.clone(), g.client.clone());
    let peer = {
        let twin = tfgrid_bus::peer::ensure_registered(&user, &g.relay_url)
            .await
            .unwrap();
        let p = Peer::start(PeerConfig {
            identity: user_id.clone(),
            twin,
            relay_url: g.relay_url.clone(),
            registry: g.client.clone(),
        });
        p.connected(T).await.unwrap();
        p
    };
    let me = peer.twin();
    let deploy = |mut d: Deployment, node: &tfgrid_node::agent::RunningNode| {
        let (user, peer, uid) = (&user, &peer, &user_id);
        let (node_id, twin) = (node.node_id, node.twin_id);
        async move {
            let Outcome::ContractCreated { contract_id, .. } = submit(
                user,
                Call::CreateNodeContract {
                    node_id,
                    deployment_hash: d.hash(),
                    capacity: d.capacity().unwrap(),
                },
            )
            .await
            else {
                panic!("no contract")
            };
            d.contract_id = contract_id;
            d.sign(uid);
            let r: Result<DeploymentInfo, _> = peer.call_json(twin, api::DEPLOY, &d, T).await;
            (contract_id, r.map_err(|e| e.to_string()))
        }
    };

    // A container outside any network gets an address in its node's workload prefix.
    let (c1, r) = deploy(container(me, gib, None), &a).await;
    let ip1: std::net::Ipv4Addr = r.unwrap().results["web"].data["ip"].parse().unwrap();
    assert!(view.node.workload_prefix.contains(ip1), "{ip1}");

    // In a network: refused until the network has a subnet on the node, then in that subnet.
    let Outcome::NetworkCreated { network_id, .. } =
        submit(&user, Call::CreateNetwork { name: "n".into() }).await
    else {
        panic!("no network")
    };
    let (_, r) = deploy(container(me, 256 << 20, Some(network_id)), &b).await;
    let web = &r.unwrap().results["web"];
    assert_eq!(web.state, tfgrid_core::deployment::ResultState::Error);
    assert!(
        web.message.contains("has no subnet on node"),
        "{}",
        web.message
    );
    submit(
        &user,
        Call::AddNetworkNode {
            network_id,
            node_id: b.node_id,
        },
    )
    .await;
    let (c2, r) = deploy(container(me, 256 << 20, Some(network_id)), &b).await;
    let ip: std::net::Ipv4Addr = r.unwrap().results["web"].data["ip"].parse().unwrap();
    let net = g.client.network(network_id).await.unwrap();
    let layout = tfgrid_core::network::Layout::of(&g.client.config().await.unwrap());
    assert!(
        net.subnet_of(&layout, b.node_id).unwrap().contains(ip),
        "{ip}"
    );

    // A second container on the same node gets an address of its own.
    let (_, r) = deploy(container(me, gib, None), &a).await;
    let ip2: std::net::Ipv4Addr = r.unwrap().results["web"].data["ip"].parse().unwrap();
    assert!(
        view.node.workload_prefix.contains(ip2) && ip2 != ip1,
        "{ip2}"
    );

    // A contract cancelled on the registry only is removed by the node's sweep.
    submit(&user, Call::CancelContract { contract_id: c1 }).await;
    let gone = |c: ContractId| {
        let peer = &peer;
        let twin = a.twin_id;
        async move {
            let r: Result<DeploymentInfo, _> = peer
                .call_json(twin, api::GET, &ContractRef { contract_id: c }, T)
                .await;
            matches!(r, Err(e) if e.to_string().contains("not found"))
        }
    };
    let deadline = Instant::now() + T;
    while !gone(c1).await {
        assert!(
            Instant::now() < deadline,
            "the sweep left cancelled contract {c1}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What is live stays.
    let info: DeploymentInfo = peer
        .call_json(b.twin_id, api::GET, &ContractRef { contract_id: c2 }, T)
        .await
        .unwrap();
    assert_eq!(info.deployment.contract_id, c2);
}
