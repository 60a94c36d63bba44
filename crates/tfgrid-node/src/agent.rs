//! The node agent's life: key and twin, registration, the zdb server, the engine with its bus
//! handlers, and the background loops (uptime reports, cancelled-contract sweep, kind reports).

use crate::api::{self, ContractRef, DeploymentInfo, Logs, LogsRequest, Version};
use crate::capacity::{self, Discovered};
use crate::engine::{Engine, HostKinds, Kinds};
use crate::images::Images;
use crate::kinds::{container::Container, gateway::Gateway, volume::Volume, zdb::Zdb};
use crate::net::Net;
use crate::store::Store;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tfgrid_bus::peer::ensure_registered;
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::capacity::human_bytes;
use tfgrid_core::deployment::Deployment;
use tfgrid_core::filter::NodeFilter;
use tfgrid_core::records::{Overlay, PublicConfig};
use tfgrid_core::tx::{Call, NodeSpec, Outcome};
use tfgrid_core::{Capacity, FarmId, Identity, NodeId, TwinId};
use tfgrid_registry_client::{RegistryClient, TwinSigner};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Setup(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error(transparent)]
    Capacity(#[from] capacity::CapacityError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub registry: String,
    pub relay: String,
    pub farm: FarmId,
    pub data: PathBuf,
    /// Gateway nodes serve `name.<domain>`.
    pub domain: Option<String>,
    /// Where the gateway proxy listens (gateway nodes).
    pub gateway_listen: SocketAddr,
    pub zdb_listen: SocketAddr,
    /// The zdb address users are given, when it is not `zdb_listen` (a port a router forwards,
    /// or a public address while listening on all).
    pub zdb_public: Option<SocketAddr>,
    pub bridge: String,
    /// OCI runtime binary: runc or crun.
    pub oci_runtime: String,
    /// Registries spoken to over plain HTTP (host:port).
    pub insecure_registries: Vec<String>,
    /// PEM files of CAs trusted for HTTPS image registries, besides the system's.
    pub registry_cas: Vec<PathBuf>,
    /// Basic-auth logins per registry host:port.
    pub registry_logins: HashMap<String, (String, String)>,
    /// Registry host:port -> mirror host:port images of it are pulled from.
    pub registry_mirrors: HashMap<String, String>,
    /// Overrides for what discovery found (e.g. to offer part of a disk).
    pub sru: Option<u64>,
    pub hru: Option<u64>,
    pub mru: Option<u64>,
    pub country: String,
    pub city: String,
    /// UDP address of the grid overlay (port 0: one picked at first start and kept); None runs
    /// no overlay (workloads are then reachable only from this host).
    pub overlay_listen: Option<SocketAddr>,
    /// Endpoints to publish for the overlay instead of this host's own addresses (a port
    /// forwarded on a router, say).
    pub overlay_endpoints: Vec<SocketAddr>,
    /// Containers in private networks reach the world outside the grid through this host's
    /// address; false keeps them inside the grid.
    pub masquerade: bool,
    /// How often uptime goes to the ledger; None: the registry's `report_interval_ms`.
    pub report_every: Option<Duration>,
    /// How often the node looks for contracts cancelled on the registry (a safety net: a bot
    /// that cancels a contract also asks the node to delete the deployment).
    pub sweep_every: Duration,
    pub vm: crate::kinds::vm::VmOptions,
}

/// The default of [`NodeConfig::sweep_every`].
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

pub struct RunningNode {
    pub node_id: NodeId,
    pub twin_id: TwinId,
    pub engine: Arc<Engine>,
    pub gateway: Option<SocketAddr>,
    /// The node's 0-db (none on a simulated node).
    pub zdb: Option<SocketAddr>,
    pub total: Capacity,
    /// The overlay's device, for status (its peers and their paths).
    pub overlay: Option<Arc<tfgrid_net::Device>>,
    // Dropped before the device: the route into it goes first.
    pub(crate) _grid: Option<Arc<tfgrid_net::grid::Grid>>,
    pub(crate) _peer: Peer,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What the node offers: discovery, with the operator's overrides applied. Disk overrides never
/// offer more than the data filesystem holds (SSD and HDD together, less the node's reserve):
/// a contract must be able to get what it was sold.
pub fn offered(d: &Discovered, cfg: &NodeConfig) -> Capacity {
    let mut c = d.offered();
    if let Some(v) = cfg.sru {
        c.sru = v;
    }
    if let Some(v) = cfg.hru {
        c.hru = v;
    }
    if let Some(v) = cfg.mru {
        c.mru = v.min(d.memory);
    }
    let disk = d.disk.size.saturating_sub(crate::capacity::DISK_RESERVE);
    if c.sru.saturating_add(c.hru) > disk {
        let (sru, hru) = (c.sru.min(disk), c.hru.min(disk - c.sru.min(disk)));
        tracing::warn!(
            "offering sru {} and hru {} instead of {} and {}: the data filesystem holds {}",
            human_bytes(sru),
            human_bytes(hru),
            human_bytes(c.sru),
            human_bytes(c.hru),
            human_bytes(d.disk.size)
        );
        (c.sru, c.hru) = (sru, hru);
    }
    c
}

fn secret(path: &std::path::Path) -> Result<String, AgentError> {
    if let Ok(s) = std::fs::read_to_string(path) {
        if !s.trim().is_empty() {
            return Ok(s.trim().to_string());
        }
    }
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| AgentError::Setup(format!("randomness: {e}")))?;
    let s = hex::encode(b);
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| AgentError::Setup(format!("{}: {e}", path.display())))?;
    std::io::Write::write_all(&mut f, s.as_bytes())
        .map_err(|e| AgentError::Setup(format!("{}: {e}", path.display())))?;
    Ok(s)
}

pub(crate) async fn register(
    signer: &TwinSigner,
    twin: TwinId,
    spec: NodeSpec,
) -> Result<NodeId, AgentError> {
    let reg = |e: tfgrid_registry_client::ClientError| AgentError::Registry(e.to_string());
    let existing = signer
        .client()
        .nodes(&NodeFilter {
            twin_id: Some(twin),
            ..Default::default()
        })
        .await
        .map_err(reg)?
        .nodes
        .into_iter()
        .next();
    if let Some(n) = &existing {
        let same = n.node.farm_id == spec.farm_id
            && n.node.total == spec.total
            && n.node.gpus == spec.gpus
            && n.node.location == spec.location
            && n.node.public_config == spec.public_config
            && n.node.overlay == spec.overlay;
        if same {
            return Ok(n.node.id);
        }
    }
    match signer
        .submit(Call::RegisterNode(spec))
        .await
        .map_err(reg)?
        .outcome
    {
        Outcome::NodeRegistered { node_id } | Outcome::NodeUpdated { node_id } => Ok(node_id),
        other => Err(AgentError::Registry(format!(
            "register_node answered {other:?}"
        ))),
    }
}

pub async fn start(cfg: NodeConfig) -> Result<RunningNode, AgentError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| AgentError::Setup(format!("{what}: {e}"));
    std::fs::create_dir_all(&cfg.data).map_err(|e| setup("data directory", &e))?;
    let (identity, _) = Identity::load_or_generate(&cfg.data.join("node.key"))
        .map_err(|e| setup("node key", &e))?;
    let discovered = capacity::discover(&cfg.data)?;
    let total = offered(&discovered, &cfg);
    let client = RegistryClient::new(&cfg.registry);
    let signer = TwinSigner::new(identity.clone(), client.clone());
    let twin = ensure_registered(&signer, &cfg.relay)
        .await
        .map_err(|e| AgentError::Registry(e.to_string()))?;
    let range = client
        .config()
        .await
        .map_err(|e| AgentError::Registry(e.to_string()))?;
    let root = nix::unistd::geteuid().is_root();
    let overlay = match (&cfg.overlay_listen, root) {
        (Some(listen), true) => {
            // Where the registry sees us from: behind NAT, the router's address.
            let observed = tokio::time::timeout(Duration::from_secs(3), client.whoami())
                .await
                .ok()
                .and_then(Result::ok);
            Some(start_overlay(&cfg, &identity, *listen, &range, observed)?)
        }
        (Some(_), false) => {
            tracing::warn!("not root: no overlay (it needs a TUN device)");
            None
        }
        _ => None,
    };
    let node_id = register(
        &signer,
        twin,
        NodeSpec {
            farm_id: cfg.farm,
            total,
            gpus: discovered.gpus.clone(),
            location: tfgrid_core::records::Location {
                country: cfg.country.clone(),
                city: cfg.city.clone(),
                ..Default::default()
            },
            public_config: PublicConfig {
                domain: cfg.domain.clone(),
                ..Default::default()
            },
            overlay: overlay.as_ref().map(|(_, o)| o.clone()),
        },
    )
    .await?;
    tracing::info!(node_id, twin, "registered");

    // The node's own 0-db: zdb workloads are namespaces on it.
    let zdb_admin = secret(&cfg.data.join("zdb-admin"))?;
    let zdb_server = tfgrid_zdb::Server::open(tfgrid_zdb::Config {
        data: cfg.data.join("zdb"),
        admin_password: Some(zdb_admin.clone()),
        mode: tfgrid_zdb::Mode::User,
        store: Default::default(),
    })
    .map_err(|e| setup("zdb", &e))?;
    let zdb_listener = tokio::net::TcpListener::bind(cfg.zdb_listen)
        .await
        .map_err(|e| setup(&format!("binding zdb to {}", cfg.zdb_listen), &e))?;
    let zdb_addr = zdb_listener.local_addr().map_err(|e| setup("zdb", &e))?;
    let mut tasks = vec![tokio::spawn(async move {
        if let Err(e) = zdb_server.serve(zdb_listener).await {
            tracing::error!("zdb stopped: {e}");
        }
    })];

    // The registry hands out each node's share of the grid's workload range, so no two
    // workloads on the grid share an address.
    let prefix = client
        .node(node_id)
        .await
        .map_err(|e| AgentError::Registry(e.to_string()))?
        .node
        .workload_prefix;
    let net = Net::new(&cfg.bridge, &prefix.to_string()).map_err(|e| setup("network", &e))?;
    let net_gateway = net.gateway();
    tracing::info!(%prefix, "workload prefix");
    if root {
        net.setup().await.map_err(|e| setup("node bridge", &e))?;
    } else {
        tracing::warn!(
            "not root: containers and volumes will fail (they need namespaces and mounts)"
        );
    }
    let gateway_listener = match &cfg.domain {
        Some(_) => Some(
            tokio::net::TcpListener::bind(cfg.gateway_listen)
                .await
                .map_err(|e| {
                    setup(
                        &format!("binding the gateway to {}", cfg.gateway_listen),
                        &e,
                    )
                })?,
        ),
        None => None,
    };
    let gateway_addr = gateway_listener.as_ref().and_then(|l| l.local_addr().ok());
    let (report_tx, mut report_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut cas = Vec::new();
    for p in &cfg.registry_cas {
        cas.push(std::fs::read(p).map_err(|e| setup(&format!("registry CA {}", p.display()), &e))?);
    }
    let images = Arc::new(
        Images::new(
            cfg.data.join("images"),
            cfg.insecure_registries.clone(),
            cfg.registry_logins.clone(),
            cas,
        )
        .with_mirrors(cfg.registry_mirrors.clone()),
    );
    let layout = tfgrid_core::network::Layout::of(&range);
    // Private networks span hosts over the overlay: a node without one takes none.
    let networks = (overlay.is_some() && root).then(|| {
        crate::networks::Networks::new(
            crate::networks::Options {
                node_bridge: cfg.bridge.clone(),
                own: node_id,
                layout,
                workload_range: range.workload_range,
                dir: cfg.data.join("networks"),
                masquerade: cfg.masquerade,
                zdb_port: zdb_addr.port(),
            },
            client.clone(),
        )
    });
    let owners = crate::kinds::backends::Owners::new(
        range.workload_range,
        range.node_prefix_len,
        Some(layout),
        node_id,
        client.clone(),
    );
    let gateway = Gateway::new(
        cfg.domain.clone(),
        client.clone(),
        gateway_addr.map(|a| a.port()),
        owners.clone(),
        networks.clone(),
    );
    if let Some(l) = gateway_listener {
        tasks.push(tokio::spawn(crate::kinds::proxy::serve(
            l,
            gateway.routes(),
        )));
        tasks.push(tokio::spawn(crate::kinds::health::run(gateway.routes())));
    }
    let routes = gateway.routes();
    let (vm_images, vm_net, vm_reports) = (images.clone(), net.clone(), report_tx.clone());
    let kinds = Kinds::Host(Box::new(HostKinds {
        volume: Volume::new(cfg.data.join("volumes")),
        zdb: Zdb::new(zdb_addr, cfg.zdb_public, zdb_admin),
        container: Container::new(
            cfg.oci_runtime.clone(),
            cfg.data.join("containers"),
            cfg.data.join("runtime"),
            cfg.data.join("volumes"),
            images,
            net,
            report_tx,
        )
        .with_networks(networks.clone())
        .with_peer_dir(cfg.data.join("vms")),
        gateway,
        vm: crate::kinds::vm::Vm::new(
            cfg.data.join("vms"),
            cfg.data.join("volumes"),
            cfg.data.join("containers"),
            vm_images,
            vm_net,
            networks.clone(),
            vm_reports,
            cfg.vm.clone(),
        ),
    }));
    let store = Store::open(&cfg.data.join("node.redb"))?;
    let engine = Arc::new(Engine::new(node_id, total, client.clone(), store, kinds));
    // A contract cancelled while the agent was down is removed, not brought back first.
    sweep_cancelled(&engine, &client).await;
    engine
        .recover()
        .await
        .map_err(|e| setup("recovering workloads", &e))?;
    if let Some(n) = &networks {
        n.sweep_unused().await;
    }

    let e = engine.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(r) = report_rx.recv().await {
            if let Err(err) = e.report(r) {
                tracing::error!("recording a workload state: {err}");
            }
        }
    }));

    let peer = Peer::start(PeerConfig {
        identity,
        twin,
        relay_url: cfg.relay.clone(),
        registry: client.clone(),
    });
    serve_bus(&peer, engine.clone(), cfg.domain.clone());
    serve_backends(&peer, engine.clone(), routes);
    owners.bind(&engine, &peer);
    let grid = match &overlay {
        Some((dev, _)) => {
            // Workload packets cross the host between the bridge and the overlay.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(|e| setup("enabling IPv4 forwarding", &e))?;
            Some(Arc::new(
                tfgrid_net::grid::Grid::attach(
                    dev.clone(),
                    &peer,
                    client.clone(),
                    tfgrid_net::grid::GridOptions {
                        range: range.workload_range,
                        node_prefix_len: range.node_prefix_len,
                        own_node: node_id,
                        src: net_gateway,
                        metric: 100 + node_id,
                        networks: Some(layout),
                    },
                )
                .map_err(|e| setup("overlay route", &e))?,
            ))
        }
        None => None,
    };
    serve_overlay(&peer, grid.clone());
    if let (Some(n), Some(g)) = (&networks, &grid) {
        let g = Arc::downgrade(g);
        n.set_access_sink(Box::new(move |machines| {
            if let Some(g) = g.upgrade() {
                let m: Vec<(tfgrid_net::WgPublic, std::net::Ipv4Addr)> = machines
                    .iter()
                    .map(|(k, a)| (tfgrid_net::WgPublic(k.0), *a))
                    .collect();
                g.set_access(&m);
            }
        }));
        n.refresh().await;
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                n.refresh().await;
            }
        }));
    }
    // Ready means reachable: callers may deploy as soon as start returns.
    if let Err(e) = peer.connected(Duration::from_secs(10)).await {
        tracing::warn!("not connected to the relay {} yet: {e}", cfg.relay);
    }

    tasks.push(spawn_uptime(signer, cfg.report_every).await);
    tasks.push(spawn_sweep(engine.clone(), client, cfg.sweep_every));
    Ok(RunningNode {
        node_id,
        twin_id: twin,
        engine,
        gateway: gateway_addr,
        zdb: Some(zdb_addr),
        total,
        overlay: overlay.map(|(d, _)| d),
        _grid: grid,
        _peer: peer,
        tasks,
    })
}

/// The overlay's TUN name: the bridge's with a suffix, kept within Linux's 15 bytes.
pub fn overlay_name(bridge: &str) -> String {
    let h = blake3::hash(bridge.as_bytes());
    if bridge.len() <= 14 {
        format!("{bridge}w")
    } else {
        format!("tw{}", &h.to_hex()[..12])
    }
}

/// Starts the overlay's device with the node's WireGuard key (derived from its twin key, so it
/// lasts as long as the node) on the port it had before, and says how peers reach it.
fn start_overlay(
    cfg: &NodeConfig,
    identity: &Identity,
    listen: SocketAddr,
    reg: &tfgrid_core::records::RegistryConfig,
    observed: Option<std::net::IpAddr>,
) -> Result<(Arc<tfgrid_net::Device>, Overlay), AgentError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| AgentError::Setup(format!("{what}: {e}"));
    let port_file = cfg.data.join("overlay-port");
    let kept: Option<u16> = std::fs::read_to_string(&port_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let secret = tfgrid_net::WgSecret::derive(&identity.seed());
    let opts = |port: u16| tfgrid_net::DeviceOptions {
        name: overlay_name(&cfg.bridge),
        secret: secret.clone(),
        listen: SocketAddr::new(listen.ip(), port),
        addresses: Vec::new(),
        mtu: 1420,
        routes: false,
    };
    let dev = match (listen.port(), kept) {
        (0, Some(p)) => tfgrid_net::Device::start(opts(p)).or_else(|e| {
            tracing::warn!("overlay port {p} (kept from the last start): {e}; taking another");
            tfgrid_net::Device::start(opts(0))
        }),
        (p, _) => tfgrid_net::Device::start(opts(p)),
    }
    .map_err(|e| setup("overlay device", &e))?;
    let port = dev.listen_port();
    std::fs::write(&port_file, port.to_string()).map_err(|e| setup("overlay port", &e))?;
    let endpoints = if !cfg.overlay_endpoints.is_empty() {
        cfg.overlay_endpoints.clone()
    } else if !listen.ip().is_unspecified() {
        vec![SocketAddr::new(listen.ip(), port)]
    } else {
        auto_endpoints(
            host_addresses(&[reg.workload_range, reg.network_range]),
            observed,
            port,
        )
    };
    tracing::info!(key = %dev.public_key(), ?endpoints, "overlay up on {}", dev.name());
    let overlay = Overlay {
        wg_key: tfgrid_core::records::X25519Key(dev.public_key().0),
        endpoints,
    };
    Ok((Arc::new(dev), overlay))
}

/// The host's addresses with the overlay port, and first, when the registry sees us from an
/// address that is not ours (a NAT router's), that address with the same port: Linux NAT keeps
/// a source port when it can, so that is where a NATed node's datagrams come from, and where a
/// peer behind another NAT sends its own first ones (both sides sending at once is what opens
/// both NATs).
fn auto_endpoints(
    own: Vec<std::net::Ipv4Addr>,
    observed: Option<std::net::IpAddr>,
    port: u16,
) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = own
        .iter()
        .map(|ip| SocketAddr::new((*ip).into(), port))
        .collect();
    if let Some(std::net::IpAddr::V4(o)) = observed {
        let usable = !o.is_loopback() && !o.is_unspecified() && !o.is_multicast();
        if usable && !own.contains(&o) {
            v.insert(0, SocketAddr::new(o.into(), port));
        }
    }
    v.truncate(tfgrid_core::records::MAX_OVERLAY_ENDPOINTS);
    v
}

/// The host's global IPv4 addresses, less those of the grid's ranges (bridges).
fn host_addresses(ranges: &[tfgrid_core::prefix::Ipv4Prefix]) -> Vec<std::net::Ipv4Addr> {
    let Ok(out) = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "inet")?;
            w.get(i + 1)?.split('/').next()?.parse().ok()
        })
        .filter(|ip| !ranges.iter().any(|r| r.contains(*ip)))
        .collect()
}

/// A deployment whose contract was cancelled (or no longer exists) on the registry is removed.
/// One read lists the node's live contracts; only a deployment missing from it is looked up on
/// its own (a reader that lags the leader may not list a contract made a moment ago).
pub(crate) async fn sweep_cancelled(engine: &Engine, client: &RegistryClient) {
    let Ok(ids) = engine.contracts() else { return };
    if ids.is_empty() {
        return;
    }
    let mut live = std::collections::HashSet::new();
    for page in 1.. {
        let f = tfgrid_core::filter::ContractFilter {
            node_id: Some(engine.node_id()),
            state: Some("live".into()),
            page: Some(page),
            size: Some(1000),
            ..Default::default()
        };
        let Ok(cs) = client.contracts(&f).await else {
            return;
        };
        let n = cs.len();
        live.extend(cs.into_iter().map(|c| c.id));
        if n < 1000 {
            break;
        }
    }
    for id in ids.into_iter().filter(|id| !live.contains(id)) {
        let gone = match client.contract(id).await {
            Ok(c) => !c.is_live(),
            Err(e) => e.code() == Some("not_found"),
        };
        if gone {
            tracing::info!(
                contract = id,
                "contract cancelled on the registry: removing"
            );
            if let Err(e) = engine.delete(None, id).await {
                tracing::warn!(contract = id, "removing: {e}");
            }
        }
    }
}

/// Reports uptime to the ledger every `every` (or the registry's period). The first report
/// goes at once (the ledger learns the node is up); later ones start at a random point of the
/// period, so nodes started together do not all write in the same second forever after.
pub(crate) async fn spawn_uptime(
    signer: TwinSigner,
    every: Option<Duration>,
) -> tokio::task::JoinHandle<()> {
    let every = match every {
        Some(d) => d,
        None => signer
            .client()
            .config()
            .await
            .map(|c| Duration::from_millis(c.report_interval_ms))
            .unwrap_or(Duration::from_secs(1)),
    };
    let started = Instant::now();
    tokio::spawn(async move {
        let mut b = [0u8; 8];
        let _ = getrandom::getrandom(&mut b);
        let phase = every.mul_f64((u64::from_le_bytes(b) % 1000) as f64 / 1000.0);
        let mut first = true;
        loop {
            let uptime = started.elapsed().as_secs();
            if let Err(e) = signer.submit(Call::ReportUptime { uptime }).await {
                tracing::warn!("uptime report: {e}");
            }
            let wait = if std::mem::take(&mut first) {
                phase
            } else {
                every
            };
            tokio::time::sleep(wait).await;
        }
    })
}

/// Runs [`sweep_cancelled`] every `every`.
pub(crate) fn spawn_sweep(
    engine: Arc<Engine>,
    client: RegistryClient,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            sweep_cancelled(&engine, &client).await;
        }
    })
}

pub(crate) fn serve_bus(peer: &Peer, engine: Arc<Engine>, domain: Option<String>) {
    let e = engine.clone();
    let d = domain.clone();
    peer.handle_json(api::DEPLOY, move |src, dep: Deployment| {
        let (e, d) = (e.clone(), d.clone());
        async move {
            e.deploy(src, dep, d.as_deref())
                .await
                .map_err(|x| x.to_string())
        }
    });
    let e = engine.clone();
    peer.handle_json(api::UPDATE, move |src, dep: Deployment| {
        let (e, d) = (e.clone(), domain.clone());
        async move {
            e.update(src, dep, d.as_deref())
                .await
                .map_err(|x| x.to_string())
        }
    });
    let e = engine.clone();
    peer.handle_json(api::GET, move |src, r: ContractRef| {
        let e = e.clone();
        async move { e.get(src, r.contract_id).map_err(|x| x.to_string()) }
    });
    let e = engine.clone();
    peer.handle_json(api::DELETE, move |src, r: ContractRef| {
        let e = e.clone();
        async move {
            e.delete(Some(src), r.contract_id)
                .await
                .map(|()| serde_json::json!({}))
                .map_err(|x| x.to_string())
        }
    });
    let e = engine.clone();
    peer.handle_json(api::CHANGES, move |src, r: ContractRef| {
        let e = e.clone();
        async move {
            e.changes(src, r.contract_id)
                .map(|changes| api::Changes { changes })
                .map_err(|x| x.to_string())
        }
    });
    let e = engine.clone();
    peer.handle_json(api::LIST, move |src, _: serde_json::Value| {
        let e = e.clone();
        async move { e.list(src).map_err(|x| x.to_string()) as Result<Vec<DeploymentInfo>, String> }
    });
    let e = engine.clone();
    peer.handle_json(api::STATES, move |src, _: serde_json::Value| {
        let e = e.clone();
        async move { e.states(src).map_err(|x| x.to_string()) }
    });
    let e = engine.clone();
    peer.handle_json(api::STATISTICS, move |_, _: serde_json::Value| {
        let e = e.clone();
        async move { e.statistics().map_err(|x| x.to_string()) }
    });
    peer.handle_json(api::VERSION, move |_, _: serde_json::Value| async move {
        Ok(Version {
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
    });
    let e = engine.clone();
    peer.handle_json(api::OWNER, move |_, r: api::OwnerRequest| {
        let e = e.clone();
        async move {
            e.owner_of(r.ip)
                .map(|twin_id| api::Owner { twin_id })
                .map_err(|x| x.to_string())
        }
    });
    let e = engine;
    peer.handle_json(api::LOGS, move |src, r: LogsRequest| {
        let e = e.clone();
        async move {
            e.logs(src, r.contract_id, &r.name, r.tail)
                .map(|text| Logs { text })
                .map_err(|x| x.to_string())
        }
    });
}

/// `gateway.backends`: how a name's backends do, for the twin whose deployment serves it.
fn serve_backends(peer: &Peer, engine: Arc<Engine>, routes: crate::kinds::gateway::Routes) {
    peer.handle_json(
        api::GATEWAY_BACKENDS,
        move |src, r: api::BackendsRequest| {
            let (e, routes) = (engine.clone(), routes.clone());
            async move {
                let (contract, health) = routes
                    .backends(&r.name)
                    .ok_or_else(|| format!("this gateway serves no {:?}", r.name))?;
                // Only the owner learns its backends' addresses and state.
                e.get(src, contract).map_err(|x| x.to_string())?;
                Ok(health)
            }
        },
    );
}

/// `node.overlay`: the node's overlay peers and the path each uses (open to any twin, as
/// statistics are: it says which nodes this one talks to, never what they say).
fn serve_overlay(peer: &Peer, grid: Option<Arc<tfgrid_net::grid::Grid>>) {
    peer.handle_json(api::OVERLAY, move |_, _: serde_json::Value| {
        let grid = grid.clone();
        async move {
            let g = grid.ok_or_else(|| "this node runs no overlay".to_string())?;
            let dev = g.device();
            Ok(api::OverlayStatus {
                public_key: dev.public_key().to_string(),
                listen_port: dev.listen_port(),
                peers: g
                    .peers()
                    .into_iter()
                    .map(|(p, node_id, twin_id)| api::OverlayPeer {
                        node_id,
                        twin_id,
                        public_key: p.public_key.to_string(),
                        endpoint: p.endpoint,
                        allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                        path: p.path.as_str().to_string(),
                        last_handshake_s: p.last_handshake_s,
                        tx_bytes: p.tx_bytes,
                        rx_bytes: p.rx_bytes,
                    })
                    .collect(),
            })
        }
    });
}

/// Stops everything a node agent left running on the host, keeping its persisted state: the
/// runtime's containers, mounts under `data`, the bridge's network namespaces and the bridge.
/// For a local grid shutting down; the next agent start remakes the workloads from its store.
pub async fn stop_workloads(data: &std::path::Path, runtime: &str, bridge: &str) {
    use crate::kinds::run;
    crate::kinds::vm::stop_all(&data.join("vms")).await;
    let root = data.join("runtime");
    let root_s = root.to_string_lossy().into_owned();
    if root.is_dir() {
        let ids = run(runtime, &["--root", &root_s, "list", "-q"])
            .await
            .unwrap_or_default();
        for id in ids.lines().filter(|l| !l.trim().is_empty()) {
            let _ = run(
                runtime,
                &["--root", &root_s, "delete", "--force", id.trim()],
            )
            .await;
        }
    }
    let data_s = data.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&data_s))
        .collect();
    // Deepest first, so nothing is unmounted from under another mount.
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
    let prefix = format!("tfgrid-{bridge}-");
    if let Ok(rd) = std::fs::read_dir("/var/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                let _ = run("ip", &["netns", "del", &name]).await;
            }
        }
    }
    if crate::net::link_exists(bridge).await {
        let _ = run("ip", &["link", "del", bridge]).await;
    }
    crate::networks::remove_all(data, bridge).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_natted_node_publishes_its_routers_address_first() {
        let own = vec!["192.168.2.2".parse().unwrap()];
        let e = |s: &str| -> SocketAddr { s.parse().unwrap() };
        assert_eq!(
            auto_endpoints(own.clone(), Some("198.18.7.102".parse().unwrap()), 5000),
            [e("198.18.7.102:5000"), e("192.168.2.2:5000")]
        );
        // Seen from its own address (public) or over loopback: nothing is added.
        assert_eq!(
            auto_endpoints(own.clone(), Some("192.168.2.2".parse().unwrap()), 5000),
            [e("192.168.2.2:5000")]
        );
        assert_eq!(
            auto_endpoints(own.clone(), Some("127.0.0.1".parse().unwrap()), 5000),
            [e("192.168.2.2:5000")]
        );
        assert_eq!(auto_endpoints(own, None, 5000), [e("192.168.2.2:5000")]);
        let many: Vec<std::net::Ipv4Addr> = (1..20)
            .map(|i| std::net::Ipv4Addr::new(10, 0, 0, i))
            .collect();
        assert_eq!(auto_endpoints(many, None, 1).len(), 8);
    }
}
