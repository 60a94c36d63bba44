//! `tfgrid bot` (the user's agent) and the commands that talk to it: deploy, ps, inspect, logs,
//! rm, events, nodes. They speak the bot's HTTP API; `--json` prints what it answered.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tfgrid_bot::bot::{Bot, BotConfig};
use tfgrid_bot::store::{Event, Record};
use tfgrid_core::capacity::human_bytes;
use tfgrid_core::records::NodeView;

#[derive(Args)]
pub struct BotArgs {
    #[arg(long, env = "TFGRID_REGISTRY", default_value = "http://127.0.0.1:8080")]
    registry: String,
    #[arg(long, env = "TFGRID_RELAY", default_value = "ws://127.0.0.1:9000/")]
    relay: String,
    /// Your key: it signs contracts and deployments and never leaves this process.
    #[arg(long, env = "TFGRID_KEY", default_value_os_t = crate::default_key_path())]
    key: PathBuf,
    #[arg(long, default_value_os_t = crate::default_key_dir().join("bot"))]
    data: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// How often the reconciler checks nodes and workloads.
    #[arg(long, default_value_t = 1000)]
    reconcile_ms: u64,
    /// A secret every API request must carry (`Authorization: Bearer`); required when the bot
    /// listens on anything but loopback. The dashboard is then opened as `/#token=<token>`.
    #[arg(long, env = "TFGRID_BOT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the S3 API of your storage pools is served (SigV4 with the keys of `tfgrid
    /// storage credentials`); `off` serves none.
    #[arg(long, default_value = "127.0.0.1:8333")]
    s3_listen: String,
}

pub async fn bot(a: BotArgs) -> Result<()> {
    if a.token.as_deref().is_some_and(|t| t.len() < 16) {
        bail!("--token: use at least 16 characters (e.g. `openssl rand -hex 16`)");
    }
    if !a.listen.ip().is_loopback() && a.token.is_none() {
        bail!(
            "the bot would listen on {} with no token: anyone who reaches it could deploy and remove with your key; set --token (or TFGRID_BOT_TOKEN), or listen on 127.0.0.1",
            a.listen
        );
    }
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding the bot to {}", a.listen))?;
    let bot = Bot::start(BotConfig {
        registry: a.registry.clone(),
        relay: a.relay,
        key: a.key,
        data: a.data,
    })
    .await
    .context("starting the bot")?;
    let app = tfgrid_bot::api::router(bot.clone(), &a.registry, a.token);
    println!(
        "bot listening on http://{} (twin {})",
        listener.local_addr()?,
        bot.twin()
    );
    let reconciler = tokio::spawn(
        bot.clone()
            .run_reconciler(Duration::from_millis(a.reconcile_ms)),
    );
    let storage = tokio::spawn(bot.clone().run_storage(Duration::from_secs(1)));
    let s3 = if a.s3_listen != "off" {
        let l = tokio::net::TcpListener::bind(&a.s3_listen)
            .await
            .with_context(|| format!("binding S3 to {}", a.s3_listen))?;
        let endpoint = format!("http://{}", l.local_addr()?);
        // Not on stdout: `up` reads the bot's first line there and closes the pipe.
        tracing::info!("S3 on {endpoint} (keys: `tfgrid storage credentials`)");
        let _ = bot.storage().endpoint.set(endpoint);
        Some(tokio::spawn(tfgrid_storage::s3::serve(
            l,
            bot.storage().pools.clone(),
        )))
    } else {
        None
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::shutdown_signal())
        .await?;
    reconciler.abort();
    storage.abort();
    if let Some(s) = s3 {
        s.abort();
    }
    Ok(())
}

#[derive(Args, Clone)]
pub struct BotOpt {
    /// Your bot's address.
    #[arg(long, env = "TFGRID_BOT", default_value = "http://127.0.0.1:8090")]
    bot: String,
    /// Print the bot's JSON answer instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// The bot's token, when it has one.
    #[arg(long, env = "TFGRID_BOT_TOKEN", hide_env_values = true)]
    bot_token: Option<String>,
}

pub(crate) struct Client {
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
}

impl Client {
    pub(crate) fn new(o: &BotOpt) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = &o.bot_token {
            if let Ok(v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")) {
                headers.insert(reqwest::header::AUTHORIZATION, v);
            }
        }
        Self {
            base: o.bot.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .default_headers(headers)
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client"),
        }
    }

    pub(crate) async fn check(
        &self,
        r: reqwest::Result<reqwest::Response>,
    ) -> Result<reqwest::Response> {
        let r = r.with_context(|| {
            format!(
                "cannot reach your bot at {} (is `tfgrid up` or `tfgrid bot` running?)",
                self.base
            )
        })?;
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status();
        let body: Value = r.json().await.unwrap_or_default();
        match body["message"].as_str() {
            Some(m) => bail!("{m}"),
            None => bail!("the bot answered {status}"),
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Result<reqwest::Response> {
        self.check(self.http.get(format!("{}{path}", self.base)).send().await)
            .await
    }

    /// GETs `path`: with `--json` prints the answer and gives None, else gives it for a table.
    pub(crate) async fn get_for_table(&self, o: &BotOpt, path: &str) -> Result<Option<Value>> {
        let v: Value = self.get(path).await?.json().await?;
        if o.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(None);
        }
        Ok(Some(v))
    }

    pub(crate) async fn post_json<T: serde::Serialize>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<reqwest::Response> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await;
        self.check(r).await
    }
}

fn ago(ms: u64) -> String {
    let s = tfgrid_core::now_millis().saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn time_of(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        ms % 1000
    )
}

fn print_event(e: &Event) {
    println!(
        "{}  {:<12} {:<11} {}",
        time_of(e.at),
        e.deployment,
        e.kind,
        e.message
    );
}

async fn last_seq(c: &Client, deployment: &str) -> u64 {
    match c.get(&format!("/api/events?deployment={deployment}")).await {
        Ok(r) => r
            .json::<Vec<Event>>()
            .await
            .ok()
            .and_then(|v| v.last().map(|e| e.seq))
            .unwrap_or(0),
        Err(_) => 0,
    }
}

pub async fn deploy(o: BotOpt, file: PathBuf) -> Result<()> {
    let yaml =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    deploy_yaml(o, yaml, &file.display().to_string()).await
}

/// Deploys `yaml` (read from `from`), printing the bot's events as they come.
pub(crate) async fn deploy_yaml(o: BotOpt, yaml: String, from: &str) -> Result<()> {
    // Checked here first, so a mistake is reported with its line before anything is sent.
    let spec = tfgrid_bot::spec::Spec::parse(&yaml).map_err(|e| anyhow::anyhow!("{from}: {e}"))?;
    let c = Client::new(&o);
    let since = last_seq(&c, &spec.name).await;
    let progress = {
        let (name, quiet) = (spec.name.clone(), o.json);
        let c = Client::new(&o);
        tokio::spawn(async move {
            let mut since = since;
            loop {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let Ok(r) = c
                    .get(&format!("/api/events?deployment={name}&since={since}"))
                    .await
                else {
                    continue;
                };
                for e in r.json::<Vec<Event>>().await.unwrap_or_default() {
                    since = e.seq;
                    if !quiet {
                        println!("  {:<9} {}", e.kind, e.message);
                    }
                }
            }
        })
    };
    if !o.json {
        println!("deploying {} from {from}", spec.name);
    }
    let send = c
        .http
        .post(format!("{}/api/deployments", c.base))
        .header(reqwest::header::CONTENT_TYPE, "application/yaml")
        .body(yaml)
        .timeout(Duration::from_secs(600))
        .send();
    let r = tokio::select! {
        r = send => c.check(r).await,
        _ = tokio::signal::ctrl_c() => {
            progress.abort();
            eprintln!(
                "\ninterrupted: the deploy of {0} goes on in your bot (it does not depend on this command);\n`tfgrid ps` shows how it ends, and `tfgrid rm {0}` takes it back",
                spec.name
            );
            std::process::exit(130);
        }
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    progress.abort();
    let rec: Record = r?.json().await?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&rec)?);
        return Ok(());
    }
    println!("deployed {}", rec.name);
    for route in &rec.routes {
        println!("  {} -> {}", route.service, route.url);
    }
    Ok(())
}

pub async fn ps(o: BotOpt) -> Result<()> {
    let c = Client::new(&o);
    let list: Vec<Record> = c.get("/api/deployments").await?.json().await?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no deployments (try: tfgrid deploy examples/web.yaml)");
        return Ok(());
    }
    println!(
        "{:<16} {:<9} {:<9} {:<6} URL",
        "NAME", "STATE", "REPLICAS", "AGE"
    );
    for r in list {
        let ok = r.replicas.iter().filter(|x| x.state == "ok").count();
        println!(
            "{:<16} {:<9} {:<9} {:<6} {}",
            r.name,
            format!("{:?}", r.state).to_lowercase(),
            format!("{ok}/{}", r.replicas.len()),
            ago(r.created_at),
            r.routes
                .iter()
                .map(|x| x.url.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

pub async fn inspect(o: BotOpt, name: String) -> Result<()> {
    let c = Client::new(&o);
    let r: Record = c
        .get(&format!("/api/deployments/{name}"))
        .await?
        .json()
        .await?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("name:    {}", r.name);
    println!("state:   {}", format!("{:?}", r.state).to_lowercase());
    println!("created: {} ago", ago(r.created_at));
    for route in &r.routes {
        println!(
            "url:     {} (gateway node {}, -> {})",
            route.url,
            route.node_id,
            route.backends.join(", ")
        );
    }
    println!();
    println!(
        "{:<14} {:<6} {:<10} {:<15} {:<7} MESSAGE",
        "REPLICA", "NODE", "CONTRACT", "ADDRESS", "STATE"
    );
    for x in &r.replicas {
        println!(
            "{:<14} {:<6} {:<10} {:<15} {:<7} {}",
            format!("{}/{}", x.service, x.index),
            x.node_id,
            x.contract_id,
            x.ip,
            x.state,
            x.message
        );
        for w in x.workloads.iter().filter(|w| w.kind != "container") {
            let data: Vec<String> = w.data.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  {:<12} {:<8} {}", w.kind, w.state, data.join(", "));
        }
    }
    println!();
    println!("spec:");
    for l in r.yaml.lines() {
        println!("  {l}");
    }
    Ok(())
}

pub async fn logs(
    o: BotOpt,
    name: String,
    service: Option<String>,
    replica: u32,
    follow: bool,
) -> Result<()> {
    let c = Client::new(&o);
    let q = |tail: Option<u64>| {
        let mut s = format!("/api/deployments/{name}/logs?replica={replica}");
        if let Some(sv) = &service {
            s.push_str(&format!("&service={sv}"));
        }
        if let Some(t) = tail {
            s.push_str(&format!("&tail={t}"));
        }
        s
    };
    let mut last = c.get(&q(None)).await?.text().await?;
    print!("{last}");
    if !follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = c.get(&q(None)).await?.text().await?;
        // The node keeps a bounded log: when it was trimmed, print what is new after the overlap.
        let new = match now.strip_prefix(&last) {
            Some(rest) => rest.to_string(),
            None => match now.find(last.lines().last().unwrap_or("\u{0}")) {
                Some(i) => now[i + last.lines().last().unwrap_or("").len()..].to_string(),
                None => now.clone(),
            },
        };
        print!("{new}");
        last = now;
    }
}

pub async fn rm(o: BotOpt, name: String) -> Result<()> {
    let c = Client::new(&o);
    let r: Value = c
        .check(
            c.http
                .delete(format!("{}/api/deployments/{name}", c.base))
                .send()
                .await,
        )
        .await?
        .json()
        .await?;
    if o.json {
        println!("{r}");
        return Ok(());
    }
    let (cancelled, pending) = (r["cancelled"].as_u64(), r["pending"].as_u64());
    match pending {
        Some(0) => println!(
            "removed {name}: {} contracts cancelled; its nodes delete the workloads",
            cancelled.unwrap_or(0)
        ),
        Some(p) => println!(
            "removing {name}: {} contracts cancelled, {p} wait for the registry (your bot retries until they are cancelled; `tfgrid ps` lists {name} as removing until then)",
            cancelled.unwrap_or(0)
        ),
        None => println!("removed {name}"),
    }
    Ok(())
}

pub async fn events(o: BotOpt, deployment: Option<String>, follow: bool) -> Result<()> {
    let c = Client::new(&o);
    let mut since = 0;
    loop {
        let mut path = format!("/api/events?since={since}");
        if let Some(d) = &deployment {
            path.push_str(&format!("&deployment={d}"));
        }
        let list: Vec<Event> = c.get(&path).await?.json().await?;
        for e in &list {
            if o.json {
                println!("{}", serde_json::to_string(e)?);
            } else {
                print_event(e);
            }
            since = e.seq;
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[derive(Args)]
pub struct NodeQuery {
    /// up or down
    #[arg(long)]
    status: Option<String>,
    #[arg(long)]
    country: Option<String>,
    /// Comma-separated farm ids.
    #[arg(long)]
    farm_ids: Option<String>,
    /// Minimum free memory, e.g. 2G.
    #[arg(long, value_parser = tfgrid_core::capacity::parse_size)]
    free_mru: Option<u64>,
    #[arg(long)]
    has_gpu: Option<bool>,
    /// Only gateway nodes (true) or only others (false).
    #[arg(long)]
    domain: Option<bool>,
    #[arg(long, default_value_t = 50)]
    size: u32,
}

pub async fn nodes(o: BotOpt, q: NodeQuery) -> Result<()> {
    let c = Client::new(&o);
    let mut params = vec![format!("size={}", q.size)];
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            params.push(format!("{k}={v}"));
        }
    };
    add("status", q.status);
    add("country", q.country);
    add("farm_ids", q.farm_ids);
    add("free_mru", q.free_mru.map(|v| v.to_string()));
    add("has_gpu", q.has_gpu.map(|v| v.to_string()));
    add("domain", q.domain.map(|v| v.to_string()));
    let path = format!("/api/nodes?{}", params.join("&"));
    let Some(page) = c.get_for_table(&o, &path).await? else {
        return Ok(());
    };
    let nodes: Vec<NodeView> = serde_json::from_value(page)?;
    println!(
        "{:<5} {:<5} {:<8} {:<6} {:<9} {:<22} {:<20} {:<18} DOMAIN",
        "ID",
        "FARM",
        "COUNTRY",
        "STATUS",
        "CORES",
        "MEMORY free/total",
        "DISK free/total",
        "WORKLOAD PREFIX"
    );
    for n in nodes {
        let (t, f) = (n.node.total, n.free);
        println!(
            "{:<5} {:<5} {:<8} {:<6} {:<9} {:<22} {:<20} {:<18} {}",
            n.node.id,
            n.node.farm_id,
            if n.node.location.country.is_empty() {
                "-"
            } else {
                &n.node.location.country
            },
            format!("{:?}", n.status).to_lowercase(),
            format!("{}/{}", f.cru, t.cru),
            format!("{}/{}", human_bytes(f.mru), human_bytes(t.mru)),
            format!(
                "{}/{}",
                human_bytes(f.sru + f.hru),
                human_bytes(t.sru + t.hru)
            ),
            n.node.workload_prefix.to_string(),
            n.node.public_config.domain.unwrap_or_default()
        );
    }
    Ok(())
}

pub async fn overlay(o: BotOpt, node: u32) -> Result<()> {
    let c = Client::new(&o);
    let path = format!("/api/nodes/{node}/overlay");
    let Some(v) = c.get_for_table(&o, &path).await? else {
        return Ok(());
    };
    let s: tfgrid_core::node_api::OverlayStatus = serde_json::from_value(v)?;
    println!(
        "node {node}: key {}, UDP port {}, {} peers",
        s.public_key,
        s.listen_port,
        s.peers.len()
    );
    if s.peers.is_empty() {
        return Ok(());
    }
    println!(
        "{:<6} {:<7} {:<22} {:<15} {:<10} {:<10} {:<10} KEY",
        "NODE", "PATH", "ENDPOINT", "PREFIX", "HANDSHAKE", "TX", "RX"
    );
    for p in s.peers {
        println!(
            "{:<6} {:<7} {:<22} {:<15} {:<10} {:<10} {:<10} {}",
            p.node_id.map_or("-".into(), |n| n.to_string()),
            p.path,
            p.endpoint.map_or("-".into(), |e| e.to_string()),
            p.allowed_ips.join(","),
            p.last_handshake_s
                .map_or("-".into(), |s| format!("{s:.0}s ago")),
            human_bytes(p.tx_bytes),
            human_bytes(p.rx_bytes),
            p.public_key
        );
    }
    Ok(())
}
