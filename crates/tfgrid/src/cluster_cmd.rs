//! `tfgrid registry`'s cluster flags and `tfgrid cluster`: the registry's validators.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tfgrid_registry::cluster::network::Network;
use tfgrid_registry::cluster::{load_key, ClusterConfig, ClusterStatus, MemberChange};

/// How a validator takes part in the registry's cluster. With none of these flags the registry
/// is a cluster of one.
#[derive(Args, Clone)]
pub struct ClusterArgs {
    /// This validator's id in the cluster.
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    /// The founding validators, `ID=URL` separated by commas, this one included (e.g.
    /// `1=http://10.0.0.1:8080,2=http://10.0.0.2:8080,3=http://10.0.0.3:8080`). Start each
    /// with the same list; the lowest id founds the cluster.
    #[arg(long)]
    pub peers: Option<String>,
    /// Start empty and wait to be added with `tfgrid cluster add` (a validator joining later).
    #[arg(long, conflicts_with = "peers")]
    pub join: bool,
    /// The URL the other validators reach this one at (default: http:// and --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// The file with the key the validators share (64 hex digits). Default: DATA/cluster.key,
    /// made when a registry of one starts for the first time.
    #[arg(long)]
    pub cluster_key: Option<PathBuf>,
    /// Take a snapshot (and drop the raft log before it) every this many raft entries.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_every: u64,
    /// A follower that hears no leader for this long (to twice as long) starts an election.
    #[arg(long, default_value_t = 400)]
    pub election_timeout_ms: u64,
}

fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, url) = part
            .split_once('=')
            .with_context(|| format!("--peers: {part:?} is not ID=URL"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("--peers: {id:?} is not a validator id"))?;
        let url = url.trim().trim_end_matches('/');
        if !url.starts_with("http://") && !url.starts_with("https://") {
            bail!("--peers: {url:?} is not an http(s) URL");
        }
        if out.insert(id, url.to_string()).is_some() {
            bail!("--peers: validator {id} is listed twice");
        }
    }
    Ok(out)
}

impl ClusterArgs {
    pub fn config(&self, data: &Path, listen: SocketAddr) -> Result<ClusterConfig> {
        let advertise = self
            .advertise
            .clone()
            .unwrap_or_else(|| format!("http://{listen}"))
            .trim_end_matches('/')
            .to_string();
        let peers = match &self.peers {
            Some(p) => parse_peers(p)?,
            None if self.join => BTreeMap::new(),
            None => BTreeMap::from([(self.id, advertise.clone())]),
        };
        if !peers.is_empty() && !peers.contains_key(&self.id) {
            bail!("--peers does not list this validator's --id {}", self.id);
        }
        // A shared key must be given; only a registry of one may make its own.
        let alone = peers.len() == 1 && !self.join;
        let key_path = match &self.cluster_key {
            Some(p) => p.clone(),
            None if alone => data.join("cluster.key"),
            None => {
                bail!("a validator of a cluster needs --cluster-key (the key all of them share)")
            }
        };
        let key = load_key(&key_path, alone && self.cluster_key.is_none())
            .with_context(|| format!("reading the cluster key {}", key_path.display()))?;
        if self.election_timeout_ms < 150 {
            bail!("--election-timeout-ms must be at least 150");
        }
        Ok(ClusterConfig {
            id: self.id,
            advertise,
            peers,
            key,
            snapshot_every: self.snapshot_every,
            heartbeat_ms: (self.election_timeout_ms / 4).max(50),
            election_timeout_ms: self.election_timeout_ms,
        })
    }
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Members, leader, term and each validator's progress.
    Status {
        #[arg(long, env = "TFGRID_REGISTRY", default_value = "http://127.0.0.1:8080")]
        registry: String,
    },
    /// Add a validator (started with `tfgrid registry --join`): it catches up, from a snapshot
    /// when the log was compacted, then votes.
    Add {
        #[arg(long, env = "TFGRID_REGISTRY", default_value = "http://127.0.0.1:8080")]
        registry: String,
        #[arg(long)]
        id: u64,
        /// The new validator's URL.
        #[arg(long)]
        url: String,
        #[arg(long)]
        cluster_key: PathBuf,
    },
    /// Remove a validator from the voters.
    Remove {
        #[arg(long, env = "TFGRID_REGISTRY", default_value = "http://127.0.0.1:8080")]
        registry: String,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        cluster_key: PathBuf,
    },
}

fn print(s: &ClusterStatus) {
    println!(
        "validator {} sees leader {} (term {}), height {}",
        s.id,
        s.leader.map_or("none".to_string(), |l| l.to_string()),
        s.term,
        s.height
    );
    println!("{:<4} {:<8} {:<32} {:>10}", "ID", "ROLE", "URL", "MATCHED");
    for m in &s.members {
        let role = if Some(m.id) == s.leader {
            "leader"
        } else if m.voter {
            "voter"
        } else {
            "learner"
        };
        let matched = s
            .replication
            .get(&m.id)
            .map(|x| x.map_or("-".to_string(), |i| i.to_string()))
            .unwrap_or_default();
        println!("{:<4} {:<8} {:<32} {:>10}", m.id, role, m.url, matched);
    }
}

async fn change(registry: &str, key: &Path, change: MemberChange) -> Result<()> {
    let key = load_key(key, false)?;
    let body = serde_json::to_vec(&change)?;
    let (status, bytes) = Network::new(key)
        .post(
            registry,
            "/cluster/members",
            body,
            Duration::from_secs(180),
            None,
        )
        .await
        .with_context(|| format!("sending the change to {registry}"))?;
    if status != 200 {
        bail!(
            "the registry refused ({status}): {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    print(&serde_json::from_slice(&bytes).context("the answer")?);
    Ok(())
}

pub async fn cluster(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Status { registry } => {
            let url = format!("{}/cluster", registry.trim_end_matches('/'));
            let s: ClusterStatus = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .with_context(|| format!("GET {url}"))?
                .error_for_status()?
                .json()
                .await?;
            print(&s);
            Ok(())
        }
        ClusterCmd::Add {
            registry,
            id,
            url,
            cluster_key,
        } => change(&registry, &cluster_key, MemberChange::Add { id, url }).await,
        ClusterCmd::Remove {
            registry,
            id,
            cluster_key,
        } => change(&registry, &cluster_key, MemberChange::Remove { id }).await,
    }
}
