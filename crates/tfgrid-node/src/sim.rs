//! Simulated nodes (`tfgrid node --simulate N`): many node agents in one process, for measuring
//! the grid at thousands of nodes on one machine. Each runs the real agent's code for what the
//! grid sees of a node (its twin and registration, its uptime reports, its bus connection and
//! handlers, the engine with its registry checks and store, the cancelled-contract sweep) with
//! [`Simulated`] in place of the host's workload kinds, so nothing is started on the host. Keys
//! and stores live in memory: a simulated node lives as long as its process, and a process that
//! dies is its nodes losing power.

use crate::agent::{self, AgentError, RunningNode};
use crate::engine::{Engine, Kinds};
use crate::kinds::simulated::Simulated;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tfgrid_bus::peer::ensure_registered;
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::records::{Location, Overlay, PublicConfig, X25519Key};
use tfgrid_core::tx::NodeSpec;
use tfgrid_core::{Capacity, FarmId, Identity};
use tfgrid_registry_client::{RegistryClient, TwinSigner};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub relay: String,
    pub farm: FarmId,
    /// What each node offers.
    pub total: Capacity,
    pub country: String,
    pub city: String,
    /// See [`agent::NodeConfig::report_every`].
    pub report_every: Option<Duration>,
    /// See [`agent::NodeConfig::sweep_every`].
    pub sweep_every: Duration,
}

/// Starts one simulated node. The nodes of a process share `client` (one connection pool to
/// the registry, as one host would have), and each has its own key, twin, relay connection,
/// engine and store. `index` only tells them apart in the overlay record they publish.
pub async fn start(
    cfg: &SimConfig,
    client: RegistryClient,
    index: u32,
) -> Result<RunningNode, AgentError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| AgentError::Setup(format!("{what}: {e}"));
    let reg = |e: &dyn std::fmt::Display| AgentError::Registry(e.to_string());
    let identity = Identity::generate();
    let signer = TwinSigner::new(identity.clone(), client.clone());
    let twin = ensure_registered(&signer, &cfg.relay)
        .await
        .map_err(|e| reg(&e))?;
    let range = client.config().await.map_err(|e| reg(&e))?;
    // Private networks take only nodes on the overlay: a simulated node publishes an overlay
    // key (derived as a real node's is) and an endpoint no one will reach, and runs no device.
    let wg = tfgrid_net::WgSecret::derive(&identity.seed()).public();
    let overlay = Overlay {
        wg_key: X25519Key(wg.0),
        endpoints: vec![std::net::SocketAddr::from((
            [127, 0, 0, 1],
            1024 + (index % 60000) as u16,
        ))],
    };
    let node_id = agent::register(
        &signer,
        twin,
        NodeSpec {
            farm_id: cfg.farm,
            total: cfg.total,
            gpus: Vec::new(),
            location: Location {
                country: cfg.country.clone(),
                city: cfg.city.clone(),
                ..Default::default()
            },
            public_config: PublicConfig::default(),
            overlay: Some(overlay),
        },
    )
    .await?;
    let prefix = client
        .node(node_id)
        .await
        .map_err(|e| reg(&e))?
        .node
        .workload_prefix;
    let layout = tfgrid_core::network::Layout::of(&range);
    let kinds = Kinds::Simulated(Simulated::new(
        node_id,
        prefix,
        Some((layout, client.clone())),
    ));
    let store = Store::in_memory()?;
    let engine = Arc::new(Engine::new(
        node_id,
        cfg.total,
        client.clone(),
        store,
        kinds,
    ));
    let peer = Peer::start(PeerConfig {
        identity,
        twin,
        relay_url: cfg.relay.clone(),
        registry: client.clone(),
    });
    agent::serve_bus(&peer, engine.clone(), None);
    if let Err(e) = peer.connected(Duration::from_secs(30)).await {
        return Err(setup(&format!("the relay {}", cfg.relay), &e));
    }
    let tasks = vec![
        agent::spawn_uptime(signer, cfg.report_every).await,
        agent::spawn_sweep(engine.clone(), client, cfg.sweep_every),
    ];
    Ok(RunningNode {
        node_id,
        twin_id: twin,
        engine,
        gateway: None,
        zdb: None,
        total: cfg.total,
        overlay: None,
        _grid: None,
        _peer: peer,
        tasks,
    })
}
