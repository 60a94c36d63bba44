//! `tfgrid`: the one command of the grid. A thin clap layer over the crates.

mod bench;
mod bench_bot;
mod bench_cluster;
mod bench_gateway;
mod bench_grid;
mod bench_net;
mod bench_node;
mod bench_storage;
mod bench_vm;
mod bench_zdb;
mod bot_cmd;
mod bus_cmd;
mod cluster_cmd;
mod net_cmd;
mod network_cmd;
mod node_cmd;
mod storage_cmd;
mod up;
mod vm_cmd;
mod zdb_cmd;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::Identity;
use tfgrid_registry::{Registry, RegistryConfig};
use tfgrid_registry_client::{RegistryClient, TwinSigner};

#[derive(Parser)]
#[command(
    name = "tfgrid",
    version,
    about = "A peer-to-peer grid of compute, storage and network capacity"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local grid on this machine (for now: a registry and a relay) and keep it up until Ctrl-C.
    Up(up::UpArgs),
    /// Run the registry: the grid's source of truth for twins, farms, nodes and contracts. One
    /// process is one validator; several (--peers) replicate it with raft.
    Registry(RegistryArgs),
    /// Object storage pools (erasure coded, encrypted, S3): create, status, credentials, rm.
    Storage {
        #[command(subcommand)]
        cmd: storage_cmd::StorageCmd,
    },
    /// The registry's validators: status, add, remove.
    Cluster {
        #[command(subcommand)]
        cmd: cluster_cmd::ClusterCmd,
    },
    /// Run a relay of the message bus.
    Relay(bus_cmd::RelayArgs),
    /// Run a 0-db compatible key-value server (RESP; redis-cli and redis clients work).
    Zdb(zdb_cmd::ZdbArgs),
    /// Run your bot: the agent that deploys your specs and keeps them running.
    Bot(bot_cmd::BotArgs),
    /// Deploy a spec (YAML) through your bot, printing progress.
    Deploy {
        file: PathBuf,
        #[command(flatten)]
        opt: bot_cmd::BotOpt,
    },
    /// List your deployments.
    Ps {
        #[command(flatten)]
        opt: bot_cmd::BotOpt,
    },
    /// Show one deployment: replicas, nodes, addresses, URLs and its spec.
    Inspect {
        name: String,
        #[command(flatten)]
        opt: bot_cmd::BotOpt,
    },
    /// Print a replica's container log.
    Logs {
        name: String,
        /// Which service (the first replica of any service when absent).
        #[arg(long)]
        service: Option<String>,
        #[arg(long, default_value_t = 0)]
        replica: u32,
        /// Keep printing as the log grows.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        opt: bot_cmd::BotOpt,
    },
    /// SSH into a vm replica over the deployment's private network (join it first with
    /// `tfgrid network access NAME`).
    Ssh(vm_cmd::SshArgs),
    /// Disk images for vms (`disk_image`): push one to an OCI registry.
    Disk {
        #[command(subcommand)]
        cmd: vm_cmd::DiskCmd,
    },
    /// Remove a deployment: its workloads on every node and its contracts.
    Rm {
        name: String,
        #[command(flatten)]
        opt: bot_cmd::BotOpt,
    },
    /// What your bot did and why: deploys, healing, removals.
    Events {
        #[arg(long)]
        deployment: Option<String>,
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        opt: bot_cmd::BotOpt,
    },
    /// Search the grid's nodes (the registry's /nodes filters).
    Nodes {
        #[command(flatten)]
        query: bot_cmd::NodeQuery,
        #[command(flatten)]
        opt: bot_cmd::BotOpt,
    },
    /// A node's overlay peers: which nodes it reaches and by which path (direct UDP or the relay).
    Overlay {
        node: u32,
        #[command(flatten)]
        opt: bot_cmd::BotOpt,
    },
    /// Your private networks; join one from this machine with standard WireGuard.
    Network {
        #[command(subcommand)]
        cmd: network_cmd::NetworkCmd,
    },
    /// Run the node agent: this host becomes capacity on the grid.
    Node(Box<node_cmd::NodeArgs>),
    /// The overlay: run a userspace WireGuard interface, make keys.
    Net {
        #[command(subcommand)]
        cmd: net_cmd::NetCmd,
    },
    /// Talk to twins over the bus.
    Bus {
        #[command(subcommand)]
        cmd: bus_cmd::BusCmd,
    },
    /// Manage your identity key.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Register or show your twin on a registry.
    Twin {
        #[command(subcommand)]
        cmd: TwinCmd,
    },
    /// Create or list farms you own.
    Farm {
        #[command(subcommand)]
        cmd: FarmCmd,
    },
    /// Benchmarks that print their figures.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
}

#[derive(Args)]
struct KeyOpt {
    /// Key file (created with mode 0600).
    #[arg(long, env = "TFGRID_KEY", default_value_os_t = default_key_path())]
    key: PathBuf,
}

#[derive(Args)]
struct RegistryOpt {
    #[arg(long, env = "TFGRID_REGISTRY", default_value = "http://127.0.0.1:8080")]
    registry: String,
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Generate a new key pair.
    New(KeyOpt),
    /// Print the public key, and the twin id when the registry knows the key.
    Show {
        #[command(flatten)]
        key: KeyOpt,
        #[command(flatten)]
        reg: RegistryOpt,
    },
}

#[derive(Subcommand)]
enum TwinCmd {
    /// Create this key's twin (idempotent: prints the existing twin if there is one).
    Register {
        #[command(flatten)]
        key: KeyOpt,
        #[command(flatten)]
        reg: RegistryOpt,
        /// Relay address others reach this twin through.
        #[arg(long, default_value = "")]
        relay: String,
    },
}

#[derive(Subcommand)]
enum FarmCmd {
    /// Create a farm owned by your twin.
    Create {
        name: String,
        #[command(flatten)]
        key: KeyOpt,
        #[command(flatten)]
        reg: RegistryOpt,
    },
    /// List the farms your twin owns.
    List {
        #[command(flatten)]
        key: KeyOpt,
        #[command(flatten)]
        reg: RegistryOpt,
    },
}

#[derive(Args, Clone)]
struct RegistryTuning {
    /// How often nodes report uptime (milliseconds).
    #[arg(long, default_value_t = RegistryConfig::default().report_interval_ms)]
    report_interval_ms: u64,
    /// A node with no uptime report for this long is down (milliseconds).
    #[arg(long, default_value_t = RegistryConfig::default().down_after_ms)]
    down_after_ms: u64,
    /// Smallest memory a node may register with (bytes).
    #[arg(long, default_value_t = RegistryConfig::default().min_node.mru)]
    min_node_mru: u64,
    /// Fewest cores a node may register with.
    #[arg(long, default_value_t = RegistryConfig::default().min_node.cru)]
    min_node_cru: u64,
    /// The grid's workload addresses: each node gets one prefix of it.
    #[arg(long, default_value_t = RegistryConfig::default().workload_range)]
    workload_range: tfgrid_core::prefix::Ipv4Prefix,
    /// Length of each node's prefix (16 to 29: its bridge takes the first address).
    #[arg(long, default_value_t = RegistryConfig::default().node_prefix_len)]
    node_prefix_len: u8,
    /// The users' private networks: each network gets one prefix of it.
    #[arg(long, default_value_t = RegistryConfig::default().network_range)]
    network_range: tfgrid_core::prefix::Ipv4Prefix,
    /// Length of each network's prefix.
    #[arg(long, default_value_t = RegistryConfig::default().network_prefix_len)]
    network_prefix_len: u8,
    /// Length of each subnet of a network (one per node it is on; the first for the user's own
    /// machines).
    #[arg(long, default_value_t = RegistryConfig::default().network_subnet_len)]
    network_subnet_len: u8,
}

impl RegistryTuning {
    fn config(&self) -> Result<RegistryConfig> {
        if self.down_after_ms < self.report_interval_ms {
            bail!("--down-after-ms must be at least --report-interval-ms, or every node flaps to down");
        }
        if self.node_prefix_len < self.workload_range.prefix_len() || self.node_prefix_len > 29 {
            bail!(
                "--node-prefix-len {} must be between the range's length ({}) and 29",
                self.node_prefix_len,
                self.workload_range.prefix_len()
            );
        }
        let mut c = RegistryConfig {
            report_interval_ms: self.report_interval_ms,
            down_after_ms: self.down_after_ms,
            workload_range: self.workload_range,
            node_prefix_len: self.node_prefix_len,
            network_range: self.network_range,
            network_prefix_len: self.network_prefix_len,
            network_subnet_len: self.network_subnet_len,
            ..Default::default()
        };

        c.min_node.mru = self.min_node_mru;
        c.min_node.cru = self.min_node_cru;
        Ok(c)
    }
}

#[derive(Args)]
struct RegistryArgs {
    /// Directory for the registry's database.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    tuning: RegistryTuning,
    #[command(flatten)]
    cluster: cluster_cmd::ClusterArgs,
}

fn default_key_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".tfgrid")
}

fn default_key_path() -> PathBuf {
    default_key_dir().join("key")
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with every cause, not a backtrace: this is what a user reads.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Registry(a) => {
            let config = a.tuning.config()?;
            // Bound first: with port 0 the advertised URL needs the port it got.
            let listener = tokio::net::TcpListener::bind(a.listen)
                .await
                .with_context(|| format!("binding {}", a.listen))?;
            let cluster = a.cluster.config(&a.data, listener.local_addr()?)?;
            let registry = Registry::open_cluster(&a.data, config, cluster)
                .await
                .with_context(|| format!("opening registry in {}", a.data.display()))?;
            println!("registry listening on http://{}", listener.local_addr()?);
            registry.serve(listener, shutdown_signal()).await?;
            Ok(())
        }
        Cmd::Up(a) => up::up(a).await,
        Cmd::Key {
            cmd: KeyCmd::New(k),
        } => {
            let id = Identity::generate();
            id.save(&k.key)?;
            println!(
                "created {}\npublic key: {}",
                k.key.display(),
                id.public_key()
            );
            Ok(())
        }
        Cmd::Key {
            cmd: KeyCmd::Show { key, reg },
        } => {
            let id = Identity::load(&key.key)?;
            println!("key file:   {}", key.key.display());
            println!("public key: {}", id.public_key());
            match RegistryClient::new(&reg.registry)
                .account(&id.public_key())
                .await
            {
                Ok(a) => match a.twin_id {
                    Some(t) => println!("twin id:    {t} (on {})", reg.registry),
                    None => println!(
                        "twin id:    none on {} (run `tfgrid twin register`)",
                        reg.registry
                    ),
                },
                Err(e) => println!("twin id:    unknown ({e})"),
            }
            Ok(())
        }
        Cmd::Twin {
            cmd: TwinCmd::Register { key, reg, relay },
        } => {
            let signer = signer(&key.key, &reg.registry)?;
            let twin = signer.ensure_twin(&relay).await?;
            println!("twin id: {twin}");
            Ok(())
        }
        Cmd::Farm {
            cmd: FarmCmd::Create { name, key, reg },
        } => {
            let signer = signer(&key.key, &reg.registry)?;
            let r = signer
                .submit(Call::CreateFarm {
                    name: name.clone(),
                    dedicated: false,
                })
                .await?;
            match r.outcome {
                Outcome::FarmCreated { farm_id } => println!("farm {name:?} created: id {farm_id}"),
                other => bail!("unexpected outcome {other:?}"),
            }
            Ok(())
        }
        Cmd::Farm {
            cmd: FarmCmd::List { key, reg },
        } => {
            let signer = signer(&key.key, &reg.registry)?;
            let Some(twin) = signer
                .client()
                .account(&signer.identity().public_key())
                .await?
                .twin_id
            else {
                bail!(
                    "this key has no twin on {} (run `tfgrid twin register`)",
                    reg.registry
                );
            };
            println!("{:>6}  {:<40}  {:>9}", "ID", "NAME", "PUBLIC IPS");
            for f in signer.client().farms_of(twin).await? {
                println!("{:>6}  {:<40}  {:>9}", f.id, f.name, f.public_ips.len());
            }
            Ok(())
        }
        Cmd::Bench { cmd } => bench::run(cmd).await,
        Cmd::Net { cmd } => net_cmd::run(cmd).await,
        Cmd::Relay(a) => bus_cmd::relay(a).await,
        Cmd::Zdb(a) => zdb_cmd::run(a).await,
        Cmd::Node(a) => node_cmd::run(*a).await,
        Cmd::Bot(a) => bot_cmd::bot(a).await,
        Cmd::Deploy { file, opt } => bot_cmd::deploy(opt, file).await,
        Cmd::Ps { opt } => bot_cmd::ps(opt).await,
        Cmd::Inspect { name, opt } => bot_cmd::inspect(opt, name).await,
        Cmd::Logs {
            name,
            service,
            replica,
            follow,
            opt,
        } => bot_cmd::logs(opt, name, service, replica, follow).await,
        Cmd::Rm { name, opt } => bot_cmd::rm(opt, name).await,
        Cmd::Events {
            deployment,
            follow,
            opt,
        } => bot_cmd::events(opt, deployment, follow).await,
        Cmd::Nodes { query, opt } => bot_cmd::nodes(opt, query).await,
        Cmd::Overlay { node, opt } => bot_cmd::overlay(opt, node).await,
        Cmd::Network { cmd } => network_cmd::network(cmd).await,
        Cmd::Cluster { cmd } => cluster_cmd::cluster(cmd).await,
        Cmd::Storage { cmd } => storage_cmd::storage(cmd).await,
        Cmd::Ssh(a) => vm_cmd::ssh(a).await,
        Cmd::Disk { cmd } => vm_cmd::disk(cmd).await,
        Cmd::Bus { cmd } => bus_cmd::bus(cmd).await,
    }
}

fn signer(key: &Path, registry: &str) -> Result<TwinSigner> {
    let id = Identity::load(key).with_context(|| "run `tfgrid key new` to create a key")?;
    Ok(TwinSigner::new(id, RegistryClient::new(registry)))
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
