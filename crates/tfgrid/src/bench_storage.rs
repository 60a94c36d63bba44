//! `tfgrid bench storage`: the storage pipeline's own speed per core (seal: zstd trial,
//! AES-256-GCM, Reed-Solomon and checksums; open), then end to end through the S3 API: a pool on
//! `k+m` real `tfgrid zdb` processes on loopback, served by the S3 endpoint in this process and
//! driven by an S3 client here (SigV4 presigned requests through reqwest): large PUT and GET,
//! 4 KiB PUTs per second, the repair of one lost slot, and reads with m slots lost, each object
//! checked against the BLAKE3 of what was put. Everything shares this machine's cores.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tfgrid_storage::{codec, Layout, PoolConfig, Pools, SlotAddr, StorageKey, Store};

#[derive(Args)]
pub struct StorageBench {
    /// data+parity of the end-to-end pool (one zdb process each).
    #[arg(long, default_value = "4+2")]
    shards: String,
    /// Large objects put (and read) at once, each of --object-mib.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    #[arg(long, default_value_t = 256)]
    object_mib: usize,
    /// Seconds of 4 KiB PUTs.
    #[arg(long, default_value_t = 5)]
    small_seconds: u64,
    /// Concurrent 4 KiB PUTs.
    #[arg(long, default_value_t = 64)]
    small_clients: usize,
    /// Stripes per codec run.
    #[arg(long, default_value_t = 64)]
    codec_stripes: usize,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `tfgrid zdb` process with one namespace for the pool.
fn zdb(dir: &std::path::Path, i: usize, password: &str) -> Result<(Proc, SlotAddr)> {
    let data = dir.join(format!("zdb{i}"));
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "zdb",
            "--listen",
            "127.0.0.1:0",
            "--admin-password",
            "admin",
            "--data",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tfgrid zdb")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("zdb listening on ")
        .with_context(|| format!("zdb said {line:?}"))?
        .to_string();
    let mut c = redis::Client::open(format!("redis://{addr}/"))?.get_connection()?;
    redis::cmd("AUTH").arg("admin").query::<()>(&mut c)?;
    let ns = format!("bench{i}");
    redis::cmd("NSNEW").arg(&ns).query::<()>(&mut c)?;
    redis::cmd("NSSET")
        .arg(&ns)
        .arg("password")
        .arg(password)
        .query::<()>(&mut c)?;
    Ok((
        Proc(child),
        SlotAddr {
            endpoint: addr,
            namespace: ns,
            password: password.into(),
        },
    ))
}

fn mbs(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e6
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Seal and open throughput on one core, for `layout` and stripes of k MiB.
fn codec_run(layout: Layout, stripes: usize) -> Result<()> {
    let key = codec::segment_key(&StorageKey::from_seed(&[5; 32]), &[1; 16]);
    let size = PoolConfig::default_stripe(layout);
    let plain = random(size, 1);
    let t = Instant::now();
    let mut enc = None;
    for i in 0..stripes {
        enc = Some(codec::seal(&key, i as u32, &plain, layout)?);
    }
    let seal = t.elapsed();
    let enc = enc.unwrap();
    let idx = stripes as u32 - 1;
    let all: Vec<Option<Bytes>> = enc.shards.iter().cloned().map(Some).collect();
    let t = Instant::now();
    for _ in 0..stripes {
        codec::open(&key, idx, &enc.meta, &all, layout)?;
    }
    let open = t.elapsed();
    let mut lost = all.clone();
    for s in lost.iter_mut().take(usize::from(layout.m)) {
        *s = None;
    }
    let t = Instant::now();
    for _ in 0..stripes {
        codec::open(&key, idx, &enc.meta, &lost, layout)?;
    }
    let decode = t.elapsed();
    println!(
        "codec {layout} (stripes of {} MiB, one core): seal {:.0} MB/s, open {:.0} MB/s, open with {} data shards lost {:.0} MB/s",
        size >> 20,
        mbs(size * stripes, seal),
        mbs(size * stripes, open),
        layout.m,
        mbs(size * stripes, decode),
    );
    Ok(())
}

pub async fn run(b: StorageBench) -> Result<()> {
    let layout: Layout = b.shards.parse()?;
    for l in [Layout::new(16, 4)?, layout] {
        let stripes = b.codec_stripes;
        tokio::task::spawn_blocking(move || codec_run(l, stripes)).await??;
    }

    let dir = tempfile::tempdir()?;
    let key = StorageKey::from_seed(&[9; 32]);
    let password = key.zdb_password("bench");
    let mut procs = Vec::new();
    let mut slots = Vec::new();
    for i in 0..layout.n() {
        let (p, s) = zdb(dir.path(), i, &password)?;
        procs.push(p);
        slots.push(s);
    }
    let store = Store::open(
        key.clone(),
        PoolConfig {
            name: "bench".into(),
            layout,
            slots: slots.clone(),
            stripe_size: PoolConfig::default_stripe(layout),
        },
    )
    .await?;
    let pools = Pools::new(key.clone());
    pools.insert(store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(tfgrid_storage::s3::serve(listener, pools));
    let (id, secret) = key.credentials();
    let creds = Credentials::new(id, secret);
    let bucket = Bucket::new(endpoint.parse()?, UrlStyle::Path, "bench", "us-east-1")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let sign = Duration::from_secs(3600);
    let r = http
        .put(bucket.create_bucket(&creds).sign(sign))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("create bucket: {}", r.status());
    }
    println!(
        "pool {layout} on {} tfgrid zdb processes, S3 at {endpoint}",
        layout.n()
    );

    // Large objects, --streams at once.
    let size = b.object_mib << 20;
    let bodies: Vec<Bytes> = (0..b.streams)
        .map(|i| Bytes::from(random(size, 100 + i as u64)))
        .collect();
    let sums: Vec<blake3::Hash> = bodies.iter().map(|d| blake3::hash(d)).collect();
    let t = Instant::now();
    let puts = bodies.iter().enumerate().map(|(i, body)| {
        let url = bucket
            .put_object(Some(&creds), &format!("large/{i}"))
            .sign(sign);
        let http = http.clone();
        let body = body.clone();
        async move {
            let r = http.put(url).body(body).send().await?;
            if !r.status().is_success() {
                bail!("PUT: {} {}", r.status(), r.text().await.unwrap_or_default());
            }
            Ok(())
        }
    });
    for r in futures::future::join_all(puts).await {
        r?;
    }
    let put = t.elapsed();
    drop(bodies);
    let total = size * b.streams;
    println!(
        "PUT  {} x {} MiB: {:.0} MB/s",
        b.streams,
        b.object_mib,
        mbs(total, put)
    );
    let get_all = |what: &'static str| {
        let http = http.clone();
        let urls: Vec<_> = (0..b.streams)
            .map(|i| {
                bucket
                    .get_object(Some(&creds), &format!("large/{i}"))
                    .sign(sign)
            })
            .collect();
        let sums = sums.clone();
        async move {
            let t = Instant::now();
            let gets = urls.into_iter().enumerate().map(|(i, url)| {
                let http = http.clone();
                let want = sums[i];
                async move {
                    let mut r = http.get(url).send().await?;
                    if !r.status().is_success() {
                        bail!("GET {what}: {}", r.status());
                    }
                    let mut h = blake3::Hasher::new();
                    let mut n = 0;
                    while let Some(c) = r.chunk().await? {
                        n += c.len();
                        h.update(&c);
                    }
                    if h.finalize() != want {
                        bail!("GET {what}: object {i} differs from what was put ({n} bytes)");
                    }
                    Ok(())
                }
            });
            for r in futures::future::join_all(gets).await {
                r?;
            }
            Ok::<Duration, anyhow::Error>(t.elapsed())
        }
    };
    let get = get_all("whole").await?;
    println!(
        "GET  {} x {} MiB: {:.0} MB/s (each checked by BLAKE3)",
        b.streams,
        b.object_mib,
        mbs(total, get)
    );

    // Small objects.
    let small = Bytes::from(random(4096, 7));
    let deadline = Instant::now() + Duration::from_secs(b.small_seconds);
    let t = Instant::now();
    let workers = (0..b.small_clients).map(|w| {
        let http = http.clone();
        let bucket = bucket.clone();
        let creds = creds.clone();
        let small = small.clone();
        async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let url = bucket
                    .put_object(Some(&creds), &format!("small/{w}/{n}"))
                    .sign(sign);
                let r = http.put(url).body(small.clone()).send().await?;
                if !r.status().is_success() {
                    bail!("small PUT: {}", r.status());
                }
                n += 1;
            }
            Ok(n)
        }
    });
    let mut count = 0;
    for r in futures::future::join_all(workers).await {
        count += r?;
    }
    println!(
        "PUT  4 KiB x {count} ({} clients): {:.0} objects/s",
        b.small_clients,
        count as f64 / t.elapsed().as_secs_f64()
    );

    // One slot lost: kill -9 its zdb, give the slot a new one, time the repair.
    let _ = procs[0].0.kill();
    let _ = procs[0].0.wait();
    let (p, s) = zdb(dir.path(), layout.n(), &password)?;
    procs[0] = p;
    store.replace_slot(0, s)?;
    let t = Instant::now();
    store.repair_pass().await?;
    let repair = t.elapsed();
    let st = store.status();
    if !st.healthy {
        bail!("the pool is not whole after repair: {st:?}");
    }
    println!(
        "repair of slot 0 after its zdb was killed: {:.2} s for {} MiB of objects ({} small objects)",
        repair.as_secs_f64(),
        total >> 20,
        count
    );

    // m slots lost: every large object still reads back identical.
    for p in procs.iter_mut().skip(1).take(usize::from(layout.m)) {
        let _ = p.0.kill();
        let _ = p.0.wait();
    }
    let degraded = get_all("with m slots lost").await?;
    println!(
        "GET  with {} of {} zdbs killed: {:.0} MB/s, every object identical",
        layout.m,
        layout.n(),
        mbs(total, degraded)
    );
    server.abort();
    Ok(())
}
