//! `tfgrid bench registry`: durable transaction throughput and node search over HTTP, against a
//! registry started in this process on loopback with its store in a temporary directory.

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
use tfgrid_registry::Registry;
use tfgrid_registry_client::{BatchResult, RegistryClient};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Signed transactions committed per second, and /nodes search latency and throughput.
    Registry(RegistryBench),
}

#[derive(Args)]
pub struct RegistryBench {
    /// Transactions to commit in the throughput phase.
    #[arg(long, default_value_t = 50_000)]
    txs: usize,
    /// Nodes to register before the search phase.
    #[arg(long, default_value_t = 100_000)]
    nodes: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of search load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

pub async fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Registry(b) => registry(b).await,
    }
}

const COUNTRIES: [&str; 12] = [
    "Belgium", "Egypt", "Germany", "Austria", "Tanzania", "India", "USA", "Brazil", "Japan",
    "Finland", "Spain", "Kenya",
];

/// Signs on every core: signing is the client's cost, kept out of the measured window.
fn sign_all(items: Vec<(Identity, u64, Call)>) -> Vec<SignedTx> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let chunk = items.len().div_ceil(threads).max(1);
    let mut items = items;
    let mut parts = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(chunk.min(items.len()));
        parts.push(std::mem::replace(&mut items, rest));
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

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

async fn submit_in_batches(client: &RegistryClient, txs: &[SignedTx], per: usize) -> Result<()> {
    for chunk in txs.chunks(per) {
        for (i, r) in client.submit_batch(chunk).await?.into_iter().enumerate() {
            if let BatchResult::Err(e) = r {
                bail!(
                    "setup transaction {} ({}) refused: {}",
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
    let registry = Registry::open(dir.path(), config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let ledger = registry.ledger.clone();
    tokio::spawn(registry.serve(listener, std::future::pending()));
    let client = RegistryClient::new(&url);
    client.health().await.context("registry did not come up")?;
    println!(
        "tfgrid bench registry: {} cores, store in {}",
        std::thread::available_parallelism()?.get(),
        dir.path().display()
    );

    // 1. Durable commits: one create_twin per fresh key, each its own HTTP request (binary body).
    let txs = sign_all(
        (0..b.txs)
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
    );
    let txs = Arc::new(txs);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..b.concurrency {
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
    println!();
    println!(
        "durable commits, one transaction per HTTP request ({} clients):",
        b.concurrency
    );
    println!(
        "  {:>10.0} tx/s   ({} txs in {:.2} s)   latency p50 {}  p99 {}",
        b.txs as f64 / secs,
        b.txs,
        secs,
        ms(lat.value_at_quantile(0.5)),
        ms(lat.value_at_quantile(0.99))
    );

    let txs = sign_all(
        (0..b.txs)
            .map(|_| {
                (
                    Identity::generate(),
                    1,
                    Call::CreateTwin {
                        relay: String::new(),
                        enc_key: None,
                    },
                )
            })
            .collect(),
    );
    let start = Instant::now();
    submit_in_batches(&client, &txs, 1000).await?;
    let secs = start.elapsed().as_secs_f64();
    println!("durable commits, 1000 transactions per HTTP request (/txs):");
    println!(
        "  {:>10.0} tx/s   ({} txs in {:.2} s)",
        b.txs as f64 / secs,
        b.txs,
        secs
    );

    // 2. A grid of b.nodes nodes in 100 farms, a fifth of them with a contract on them.
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
    submit_in_batches(&client, &sign_all(items), 1000).await?;
    let farm_ids: Vec<u32> = {
        let mut ids = Vec::new();
        for f in &farmers {
            let twin = client
                .account(&f.public_key())
                .await?
                .twin_id
                .context("farmer twin")?;
            ids.push(client.farms_of(twin).await?[0].id);
        }
        ids
    };
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
    submit_in_batches(&client, &sign_all(items), 2000).await?;
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
    let contracts = sign_all(items);
    for chunk in contracts.chunks(2000) {
        // Random picks may land on a node too small for another contract; those refusals are fine.
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

    // 3. Search load: a mix of the queries a bot's scheduler and the explorer make.
    let mix = query_mix(&farm_ids);
    {
        let read = ledger.read();
        let now = tfgrid_core::now_millis();
        let mut h = hist();
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(2) {
            for f in &mix {
                let t = Instant::now();
                std::hint::black_box(read.search(f, now));
                h.record(t.elapsed().as_micros().max(1) as u64)?;
                n += 1;
            }
        }
        println!(
            "index only (no HTTP, one core): {:.0} queries/s, p50 {} p99 {}",
            n as f64 / start.elapsed().as_secs_f64(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99))
        );
    }
    let mix = Arc::new(
        mix.iter()
            .map(|f| format!("{url}/nodes?{}", f.to_query()))
            .collect::<Vec<_>>(),
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(b.seconds);
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..b.concurrency {
        let (mix, http) = (mix.clone(), http.clone());
        workers.push(tokio::spawn(async move {
            let mut h = hist();
            let mut i = w;
            let mut bytes = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                let resp = http.get(&mix[i % mix.len()]).send().await?;
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
    let secs = start.elapsed().as_secs_f64();
    println!(
        "/nodes search over HTTP ({} clients, {} s, {} query shapes, avg response {} bytes):",
        b.concurrency,
        b.seconds,
        mix.len(),
        bytes / lat.len().max(1) as usize
    );
    println!(
        "  {:>10.0} queries/s   latency p50 {}  p99 {}  p99.9 {}  max {}",
        lat.len() as f64 / secs,
        ms(lat.value_at_quantile(0.5)),
        ms(lat.value_at_quantile(0.99)),
        ms(lat.value_at_quantile(0.999)),
        ms(lat.max())
    );
    Ok(())
}

fn query_mix(farms: &[u32]) -> Vec<NodeFilter> {
    let up = Some(NodeStatus::Up);
    let mut mix = Vec::new();
    for k in 0..4u64 {
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
            farm_ids: Some(vec![farms[k as usize], farms[k as usize + 10]]),
            free_mru: Some(4 * GIB),
            ..Default::default()
        });
        mix.push(NodeFilter {
            country: Some(COUNTRIES[k as usize].into()),
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
    // Counting every match is the expensive shape: one in eight queries asks for it.
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
