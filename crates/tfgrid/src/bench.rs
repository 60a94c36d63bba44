//! `tfgrid bench registry`: durable transaction throughput and node search over HTTP, against a
//! registry started in this process on loopback with its store in a temporary directory. The
//! load generator runs on the same cores as the registry, so HTTP figures include its cost.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tfgrid_core::capacity::GIB;
use tfgrid_core::filter::{NodeFilter, SortBy, SortOrder};
use tfgrid_core::records::{Gpu, Location, NodeStatus, PublicConfig, RegistryConfig};
use tfgrid_core::tx::{Call, NodeSpec, SignedTx};
use tfgrid_core::{Capacity, Hash, Identity};
use tfgrid_registry::ledger::Ledger;
use tfgrid_registry::Registry;
use tfgrid_registry_client::{BatchResult, RegistryClient};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Signed transactions committed per second, and /nodes search latency and throughput.
    Registry(RegistryBench),
    /// The registry replicated: commits per second through N validator processes, and how
    /// long writes stop when the leader is killed (kill -9) under load.
    Cluster(crate::bench_cluster::ClusterBench),
    /// Bus round trips per second and their latency through one relay, signed and sealed.
    Bus(BusBench),
    /// redis-benchmark SET/GET against tfgrid zdb and redis-server, and zdb's idle RSS.
    Zdb(crate::bench_zdb::ZdbBench),
    /// Deploy latency of a container with a cached image, and the node agent's idle RSS (root).
    Node(crate::bench_node::NodeBench),
    /// The bot's scheduler: placements per second over simulated nodes.
    Scheduler(crate::bench_bot::SchedulerBench),
    /// Deploy latency through the bot's API on a local grid, cached image (root).
    Deploy(crate::bench_bot::DeployBench),
    /// Self-heal time: a node dies, its service answers again from another node (root).
    Heal(crate::bench_bot::HealBench),
    /// The gateway proxy: large downloads (throughput, peak memory) and failover latency.
    Gateway(crate::bench_gateway::GatewayBench),
    /// Overlay throughput and latency between two hosts: plain, ours, wireguard-go (root).
    Net(crate::bench_net::NetBench),
    /// The grid at thousands of simulated nodes: ledger writes at rest, the relay's load, a
    /// reconcile pass over every replica, and the heal when a tenth of the nodes die at once.
    Grid(crate::bench_grid::GridBench),
    /// Object storage: the codec per core, then S3 PUT/GET of large and 4 KiB objects on a pool
    /// of zdb processes, a lost slot's repair, and reads with m slots lost.
    Storage(crate::bench_storage::StorageBench),
    /// VMs: deploy to the first answer of the VM's service through the gateway, beside the same
    /// service as a container, and QEMU's memory beyond the guest's.
    Vm(crate::bench_vm::VmBench),
}

#[derive(Args)]
pub struct BusBench {
    /// Concurrent callers, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    clients: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Payload bytes per call.
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

#[derive(Args)]
pub struct RegistryBench {
    /// Transactions to commit in each throughput phase.
    #[arg(long, default_value_t = 50_000)]
    txs: usize,
    /// Nodes to register before the search phase.
    #[arg(long, default_value_t = 100_000)]
    nodes: usize,
    /// Concurrent HTTP clients for the one-transaction-per-request phase.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Concurrent HTTP clients for the search phase, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64")]
    search_clients: Vec<usize>,
    /// Seconds of search load per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

pub async fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Registry(b) => registry(b).await,
        BenchCmd::Bus(b) => bus(b).await,
        BenchCmd::Cluster(b) => crate::bench_cluster::run(b).await,
        BenchCmd::Zdb(b) => tokio::task::spawn_blocking(move || crate::bench_zdb::run(b)).await?,
        BenchCmd::Node(b) => crate::bench_node::run(b).await,
        BenchCmd::Scheduler(b) => crate::bench_bot::scheduler(b),
        BenchCmd::Deploy(b) => crate::bench_bot::deploy(b).await,
        BenchCmd::Heal(b) => crate::bench_bot::heal(b).await,
        BenchCmd::Gateway(b) => crate::bench_gateway::run(b).await,
        BenchCmd::Grid(b) => crate::bench_grid::run(b).await,
        BenchCmd::Storage(b) => crate::bench_storage::run(b).await,
        BenchCmd::Vm(b) => crate::bench_vm::run(b).await,
        BenchCmd::Net(b) => tokio::task::spawn_blocking(move || crate::bench_net::run(b)).await?,
    }
}

const COUNTRIES: [&str; 12] = [
    "Belgium", "Egypt", "Germany", "Austria", "Tanzania", "India", "USA", "Brazil", "Japan",
    "Finland", "Spain", "Kenya",
];

/// Signs on every core: signing is the clients' cost, kept out of every measured window.
fn sign_all(items: Vec<(Identity, u64, Call)>) -> Vec<SignedTx> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let chunk = items.len().div_ceil(threads).max(1);
    let mut parts: Vec<Vec<(Identity, u64, Call)>> = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        parts.push(items.by_ref().take(chunk).collect());
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|p| {
                s.spawn(move || {
                    p.into_iter()
                        .map(|(id, n, c)| SignedTx::new(&id, n, c))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("signing thread"))
            .collect()
    })
}

pub(crate) fn new_twins(n: usize) -> Vec<SignedTx> {
    sign_all(
        (0..n)
            .map(|_| {
                (
                    Identity::generate(),
                    1,
                    Call::CreateTwin {
                        relay: "ws://127.0.0.1:9000".into(),
                        enc_key: None,
                    },
                )
            })
            .collect(),
    )
}

pub(crate) fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

pub(crate) fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

pub(crate) async fn submit_in_batches(
    client: &RegistryClient,
    txs: &[SignedTx],
    per: usize,
) -> Result<()> {
    for chunk in txs.chunks(per) {
        for (i, r) in client.submit_batch(chunk).await?.into_iter().enumerate() {
            if let BatchResult::Err(e) = r {
                bail!(
                    "transaction {} ({}) refused: {}",
                    i,
                    chunk[i].tx.call.name(),
                    e.message
                );
            }
        }
    }
    Ok(())
}

async fn registry(b: RegistryBench) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Nodes in this benchmark send no uptime reports; keep them up for the whole run.
    let config = RegistryConfig {
        down_after_ms: 24 * 3600 * 1000,
        ..Default::default()
    };
    let registry = Registry::open(dir.path(), config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let ledger = registry.ledger.clone();
    tokio::spawn(registry.serve(listener, std::future::pending()));
    let client = RegistryClient::new(&url);
    client.health().await.context("registry did not come up")?;
    println!(
        "tfgrid bench registry: {} cores, store (fsync on every commit) in {}",
        std::thread::available_parallelism()?.get(),
        dir.path().display()
    );
    println!();
    println!("durable commits (create_twin, each from a new key; acknowledged only after fsync):");
    commits_one_per_request(&client, b.txs, b.concurrency).await?;
    commits_bulk(&client, b.txs).await?;
    commits_validator_only(&ledger, &b).await?;
    let farm_ids = build_grid(&client, &b).await?;
    println!();
    search(&ledger, &url, &farm_ids, &b).await
}

pub(crate) async fn commits_one_per_request(
    client: &RegistryClient,
    n: usize,
    concurrency: usize,
) -> Result<()> {
    let txs = Arc::new(new_twins(n));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (txs, next, client) = (txs.clone(), next.clone(), client.clone());
        workers.push(tokio::spawn(async move {
            let mut h = hist();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= txs.len() {
                    return Ok::<_, anyhow::Error>(h);
                }
                let t = Instant::now();
                client.submit_binary(&txs[i]).await?;
                h.record(t.elapsed().as_micros() as u64)?;
            }
        }));
    }
    let mut lat = hist();
    for w in workers {
        lat.add(w.await??)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "  one per HTTP request, {} clients:  {:>8.0} tx/s   latency p50 {}  p99 {}",
        concurrency,
        n as f64 / secs,
        ms(lat.value_at_quantile(0.5)),
        ms(lat.value_at_quantile(0.99))
    );
    Ok(())
}

/// /txs requests of 1000, four in flight: how a bulk importer would load the registry.
pub(crate) async fn commits_bulk(client: &RegistryClient, n: usize) -> Result<()> {
    let txs = Arc::new(new_twins(n));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (txs, next, client) = (txs.clone(), next.clone(), client.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1000, Ordering::Relaxed);
                if i >= txs.len() {
                    return Ok::<_, anyhow::Error>(());
                }
                submit_in_batches(&client, &txs[i..(i + 1000).min(txs.len())], 1000).await?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "  1000 per /txs request, 4 in flight: {:>8.0} tx/s",
        n as f64 / secs
    );
    Ok(())
}

/// The validator's own capacity: signature check, state machine and fsynced commit, no HTTP.
async fn commits_validator_only(ledger: &Arc<Ledger>, b: &RegistryBench) -> Result<()> {
    let txs = new_twins(b.txs);
    let start = Instant::now();
    let mut inflight = Vec::new();
    for chunk in txs.chunks(1000) {
        let (l, chunk) = (ledger.clone(), chunk.to_vec());
        inflight.push(tokio::spawn(async move { l.submit_many(chunk).await }));
    }
    for r in inflight {
        if let Some(Err(e)) = r.await?.into_iter().find(|r| r.is_err()) {
            bail!("validator phase: {e}");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "  validator alone (no HTTP):          {:>8.0} tx/s",
        b.txs as f64 / secs
    );
    Ok(())
}

/// A grid of `b.nodes` nodes in 100 farms, with contracts on a fifth of them.
async fn build_grid(client: &RegistryClient, b: &RegistryBench) -> Result<Vec<u32>> {
    let setup = Instant::now();
    let mut rng = StdRng::seed_from_u64(7);
    let farmers: Vec<Identity> = (0..100).map(|_| Identity::generate()).collect();
    let mut items = Vec::new();
    for (i, f) in farmers.iter().enumerate() {
        items.push((
            f.clone(),
            1,
            Call::CreateTwin {
                relay: String::new(),
                enc_key: None,
            },
        ));
        items.push((
            f.clone(),
            2,
            Call::CreateFarm {
                name: format!("bench_farm_{i}"),
                dedicated: false,
            },
        ));
    }
    submit_in_batches(client, &sign_all(items), 1000).await?;
    let mut farm_ids = Vec::new();
    for f in &farmers {
        let twin = client
            .account(&f.public_key())
            .await?
            .twin_id
            .context("farmer twin")?;
        farm_ids.push(client.farms_of(twin).await?[0].id);
    }
    let mut items = Vec::with_capacity(b.nodes * 2);
    for i in 0..b.nodes {
        let id = Identity::generate();
        let gpus: Vec<Gpu> = if rng.gen_ratio(1, 20) {
            vec![Gpu {
                vendor: "NVIDIA".into(),
                model: "RTX 4090".into(),
                memory: 24 * GIB,
            }]
        } else {
            vec![]
        };
        let spec = NodeSpec {
            farm_id: farm_ids[i % farm_ids.len()],
            total: Capacity {
                cru: rng.gen_range(2..=64),
                mru: rng.gen_range(4..=512) * GIB,
                sru: rng.gen_range(0..=4096) * GIB,
                hru: rng.gen_range(0..=16384) * GIB,
                gpu: gpus.len() as u32,
                ipv4: 0,
            },
            gpus,
            location: Location {
                country: COUNTRIES[rng.gen_range(0..COUNTRIES.len())].into(),
                city: format!("city{}", rng.gen_range(0..200)),
                latitude: None,
                longitude: None,
            },
            public_config: PublicConfig {
                domain: rng.gen_ratio(1, 100).then(|| format!("gw{i}.grid.test")),
                ..Default::default()
            },
            overlay: None,
        };
        items.push((
            id.clone(),
            1,
            Call::CreateTwin {
                relay: String::new(),
                enc_key: None,
            },
        ));
        items.push((id, 2, Call::RegisterNode(spec)));
    }
    submit_in_batches(client, &sign_all(items), 2000).await?;
    let user = Identity::generate();
    let mut items = vec![(
        user.clone(),
        1,
        Call::CreateTwin {
            relay: String::new(),
            enc_key: None,
        },
    )];
    for k in 0..b.nodes / 5 {
        let node_id = rng.gen_range(1..=b.nodes as u32);
        let cap = Capacity {
            cru: 1,
            mru: GIB,
            sru: 10 * GIB,
            ..Default::default()
        };
        items.push((
            user.clone(),
            2 + k as u64,
            Call::CreateNodeContract {
                node_id,
                deployment_hash: Hash(rng.gen()),
                capacity: cap,
            },
        ));
    }
    for chunk in sign_all(items).chunks(2000) {
        // Random picks may land on a node too small for one more contract; those refusals are fine.
        client.submit_batch(chunk).await?;
    }
    let stats = client.stats().await?;
    println!();
    println!(
        "search grid: {} nodes, {} farms, {} live contracts (set up in {:.1} s)",
        stats.nodes,
        stats.farms,
        stats.contracts_live,
        setup.elapsed().as_secs_f64()
    );
    Ok(farm_ids)
}

async fn search(
    ledger: &Arc<Ledger>,
    url: &str,
    farm_ids: &[u32],
    b: &RegistryBench,
) -> Result<()> {
    let mix = query_mix(farm_ids);
    {
        let read = ledger.read();
        let now = tfgrid_core::now_millis();
        let mut h = hist();
        let start = Instant::now();
        let mut n = 0u64;
        let mut per_shape = vec![Duration::ZERO; mix.len()];
        while start.elapsed() < Duration::from_secs(2) {
            for (k, f) in mix.iter().enumerate() {
                let t = Instant::now();
                let (ids, _) = read.search_ids(f, now);
                std::hint::black_box(read.render_views(&ids, now));
                let e = t.elapsed();
                per_shape[k] += e;
                h.record(e.as_micros().max(1) as u64)?;
                n += 1;
            }
        }
        println!(
            "/nodes search in the index (no HTTP, one core): {:.0} queries/s, p50 {} p99 {}",
            n as f64 / start.elapsed().as_secs_f64(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99))
        );
        let rounds = (n / mix.len() as u64).max(1) as u32;
        let mut slow: Vec<(Duration, &NodeFilter)> =
            per_shape.iter().map(|d| *d / rounds).zip(&mix).collect();
        slow.sort_by_key(|s| std::cmp::Reverse(s.0));
        for (d, f) in slow.iter().take(3) {
            println!(
                "  slowest shape {:>6.0} us: {}",
                d.as_secs_f64() * 1e6,
                f.to_query()
            );
        }
    }
    let urls = Arc::new(
        mix.iter()
            .map(|f| format!("{url}/nodes?{}", f.to_query()))
            .collect::<Vec<_>>(),
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    println!("/nodes search over HTTP ({} s per run, {} query shapes, one in nine counting every match):", b.seconds, urls.len());
    for clients in &b.search_clients {
        let (qps, lat, avg_bytes) = search_load(
            &http,
            urls.clone(),
            *clients,
            Duration::from_secs(b.seconds),
        )
        .await?;
        println!(
            "  {clients:>3} clients: {qps:>7.0} queries/s   p50 {}  p99 {}  p99.9 {}  max {}   (avg response {avg_bytes} B)",
            ms(lat.value_at_quantile(0.5)),
            ms(lat.value_at_quantile(0.99)),
            ms(lat.value_at_quantile(0.999)),
            ms(lat.max())
        );
    }
    Ok(())
}

async fn search_load(
    http: &reqwest::Client,
    urls: Arc<Vec<String>>,
    clients: usize,
    run: Duration,
) -> Result<(f64, Histogram<u64>, usize)> {
    let deadline = Instant::now() + run;
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..clients {
        let (urls, http) = (urls.clone(), http.clone());
        workers.push(tokio::spawn(async move {
            let mut h = hist();
            let mut i = w;
            let mut bytes = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                let resp = http.get(&urls[i % urls.len()]).send().await?;
                if !resp.status().is_success() {
                    bail!("search failed: {}", resp.status());
                }
                bytes += resp.bytes().await?.len();
                h.record(t.elapsed().as_micros() as u64)?;
                i += 1;
            }
            Ok::<_, anyhow::Error>((h, bytes))
        }));
    }
    let mut lat = hist();
    let mut bytes = 0;
    for w in workers {
        let (h, b) = w.await??;
        lat.add(h)?;
        bytes += b;
    }
    let qps = lat.len() as f64 / start.elapsed().as_secs_f64();
    let avg = bytes / lat.len().max(1) as usize;
    Ok((qps, lat, avg))
}

/// The queries a bot's scheduler and the explorer make, in the proportions this bench uses.
fn query_mix(farms: &[u32]) -> Vec<NodeFilter> {
    let up = Some(NodeStatus::Up);
    let mut mix = Vec::new();
    for k in 0..4u64 {
        let i = k as usize;
        mix.push(NodeFilter {
            status: up,
            free_mru: Some((2 + 8 * k) * GIB),
            free_sru: Some((50 + 100 * k) * GIB),
            ..Default::default()
        });
        mix.push(NodeFilter {
            status: up,
            free_cru: Some(2 + 4 * k),
            free_hru: Some(1000 * GIB),
            size: Some(20),
            ..Default::default()
        });
        mix.push(NodeFilter {
            status: up,
            farm_ids: Some(vec![farms[i], farms[i + 10]]),
            free_mru: Some(4 * GIB),
            ..Default::default()
        });
        mix.push(NodeFilter {
            country: Some(COUNTRIES[i].into()),
            free_cru: Some(4),
            ..Default::default()
        });
        mix.push(NodeFilter {
            status: up,
            sort_by: Some(SortBy::FreeMru),
            sort_order: Some(SortOrder::Desc),
            size: Some(10),
            ..Default::default()
        });
        mix.push(NodeFilter {
            has_gpu: Some(true),
            status: up,
            ..Default::default()
        });
        mix.push(NodeFilter {
            domain: Some(true),
            ..Default::default()
        });
        mix.push(NodeFilter {
            free_mru: Some(8 * GIB),
            page: Some(2 + k as u32),
            ..Default::default()
        });
    }
    mix.push(NodeFilter {
        status: up,
        free_mru: Some(16 * GIB),
        ret_count: true,
        ..Default::default()
    });
    mix.push(NodeFilter {
        free_sru: Some(1000 * GIB),
        free_cru: Some(8),
        ret_count: true,
        ..Default::default()
    });
    mix.push(NodeFilter {
        city: Some("city7".into()),
        ret_count: true,
        ..Default::default()
    });
    mix.push(NodeFilter {
        total_cru: Some(32),
        sort_by: Some(SortBy::TotalCru),
        ret_count: true,
        ..Default::default()
    });
    mix
}

/// A registry, one relay and two twins in this process; one twin calls `echo` on the other.
async fn bus(b: BusBench) -> Result<()> {
    use tfgrid_bus::peer::ensure_registered;
    use tfgrid_bus::{Peer, PeerConfig};
    use tfgrid_registry_client::TwinSigner;
    let dir = tempfile::tempdir()?;
    let registry = Registry::open(dir.path(), RegistryConfig::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(registry.serve(listener, std::future::pending()));
    let client = RegistryClient::new(&url);
    let relay_addr = "127.0.0.1:0".parse()?;
    let (relay_url, _, _server, _stop) =
        crate::bus_cmd::start_relay(relay_addr, None, &dir.path().join("relay.key"), &url).await?;
    let start_peer = |id: Identity, twin| {
        Peer::start(PeerConfig {
            identity: id,
            twin,
            relay_url: relay_url.clone(),
            registry: client.clone(),
        })
    };
    let caller_id = Identity::generate();
    let caller_twin = ensure_registered(
        &TwinSigner::new(caller_id.clone(), client.clone()),
        &relay_url,
    )
    .await?;
    let caller = start_peer(caller_id, caller_twin);
    // One callee publishes an encryption key (calls to it are sealed); one does not (plain, signed).
    let sealed_id = Identity::generate();
    let sealed_twin = ensure_registered(
        &TwinSigner::new(sealed_id.clone(), client.clone()),
        &relay_url,
    )
    .await?;
    let plain_id = Identity::generate();
    let plain_signer = TwinSigner::new(plain_id.clone(), client.clone());
    let plain_twin = match plain_signer
        .submit(Call::CreateTwin {
            relay: relay_url.clone(),
            enc_key: None,
        })
        .await?
        .outcome
    {
        tfgrid_core::tx::Outcome::TwinCreated { twin_id } => twin_id,
        o => bail!("{o:?}"),
    };
    let callees = [
        start_peer(sealed_id, sealed_twin),
        start_peer(plain_id, plain_twin),
    ];
    caller
        .connected(Duration::from_secs(5))
        .await
        .context("caller connecting")?;
    for c in &callees {
        c.connected(Duration::from_secs(5))
            .await
            .context("callee connecting")?;
        c.handle("echo", |_, p| async move { Ok(p) });
    }
    let payload = Arc::new(vec![0x5au8; b.payload]);
    println!(
        "tfgrid bench bus: {} cores, one relay, {} B payloads, caller and callees in this process",
        std::thread::available_parallelism()?.get(),
        b.payload
    );
    for (callee, what) in [
        (&callees[0], "sealed (XChaCha20-Poly1305 under the twins' x25519 agreement, which also authenticates)"),
        (&callees[1], "plain, every envelope ed25519-signed and verified"),
    ] {
        println!("{what}:");
        caller.call(callee.twin(), "echo", &payload, Duration::from_secs(5)).await?;
        for clients in &b.clients {
            let deadline = Instant::now() + Duration::from_secs(b.seconds);
            let start = Instant::now();
            let mut workers = Vec::new();
            for _ in 0..*clients {
                let (caller, payload, dst) = (caller.clone(), payload.clone(), callee.twin());
                workers.push(tokio::spawn(async move {
                    let mut h = hist();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let out = caller.call(dst, "echo", &payload, Duration::from_secs(10)).await?;
                        if out.len() != payload.len() {
                            bail!("echo returned {} bytes", out.len());
                        }
                        h.record(t.elapsed().as_micros() as u64)?;
                    }
                    Ok::<_, anyhow::Error>(h)
                }));
            }
            let mut lat = hist();
            for w in workers {
                lat.add(w.await??)?;
            }
            println!(
                "  {clients:>3} callers: {:>7.0} round trips/s   p50 {}  p99 {}",
                lat.len() as f64 / start.elapsed().as_secs_f64(),
                ms(lat.value_at_quantile(0.5)),
                ms(lat.value_at_quantile(0.99))
            );
        }
    }
    Ok(())
}
