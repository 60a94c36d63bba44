//! The bot itself and what its flows share: registry and bus calls, contracts made under a
//! journal, the persisted cancel queue, one lock per deployment name, events. The flows are in
//! their own modules: `deploy` (deploy and update), `routes` (gateway names), `reconcile`
//! (self-healing), `recovery` (remove, roll back, the orphan sweep, what a restart finishes).

use crate::spec::SpecError;
use crate::store::{Event, Made, Record, Store, StoreError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tfgrid_bus::peer::ensure_registered;
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::filter::{NodeFilter, MAX_PAGE_SIZE};
use tfgrid_core::node_api::{self, ContractRef};
use tfgrid_core::records::NodeView;
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::{ContractId, Identity, TwinId};
use tfgrid_registry_client::{ClientError, RegistryClient, TwinSigner};

#[derive(Debug, thiserror::Error)]
pub enum BotError {
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    NoFit(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ClientError> for BotError {
    fn from(e: ClientError) -> Self {
        BotError::Registry(e.to_string())
    }
}

pub struct BotConfig {
    pub registry: String,
    pub relay: String,
    pub key: PathBuf,
    pub data: PathBuf,
}

pub struct Bot {
    pub(crate) registry: RegistryClient,
    pub(crate) signer: TwinSigner,
    pub(crate) identity: Identity,
    pub(crate) twin: TwinId,
    pub(crate) peer: Peer,
    pub store: Store,
    /// One operation at a time per deployment name (deploy, update, remove, a heal): operations
    /// on different deployments never wait for each other.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Contracts being created right now, by deployment hash or name: the registry may hold
    /// one before the journal names it, and the orphan sweep must leave it alone.
    inflight: std::sync::Mutex<HashMap<String, usize>>,
    /// User operations begun, and running now (see `recovery::Operation`).
    pub(crate) ops_started: std::sync::atomic::AtomicU64,
    pub(crate) ops_running: std::sync::atomic::AtomicUsize,
    /// The twin's networks by name, as last read or written (the bot is their only writer).
    pub(crate) nets: std::sync::Mutex<HashMap<String, tfgrid_core::network::Network>>,
    pub(crate) layout: std::sync::OnceLock<tfgrid_core::network::Layout>,
    /// What the reconciler's pings said about nodes (see `liveness`), and the nodes gone now.
    pub(crate) liveness: std::sync::Mutex<crate::liveness::Liveness>,
    pub(crate) gone: std::sync::Mutex<HashMap<tfgrid_core::NodeId, String>>,
    /// Capacity placed but perhaps not in the registry's views yet (see `placement`).
    pub(crate) placements: crate::placement::Placements,
    /// The storage pools and their S3 endpoint (see `storage`).
    pub(crate) storage: crate::storage::Storage,
}

/// How long a node may take for a deploy (an image pull can be slow); a node that dies meanwhile
/// is noticed within seconds by [`Bot::call_node`].
pub(crate) const DEPLOY_TIMEOUT: Duration = Duration::from_secs(120);
pub(crate) const QUICK: Duration = Duration::from_secs(5);
/// How often a node that is working on a request is pinged, and how many missed pings fail it.
const WATCH_EVERY: Duration = Duration::from_millis(700);
const WATCH_MISSES: u32 = 2;

/// " at <ip>" for a replica with an address (namespaces-only replicas have none).
pub(crate) fn at_ip(ip: &str) -> String {
    if ip.is_empty() {
        String::new()
    } else {
        format!(" at {ip}")
    }
}

/// Workload names allow letters, digits and `_`; spec names use `-`.
pub(crate) fn wname(s: &str) -> String {
    s.replace('-', "_")
}

/// The orphan sweep's key for a contract being created.
pub(crate) fn inflight_key(call: &Call) -> Option<String> {
    match call {
        Call::CreateNodeContract {
            node_id,
            deployment_hash,
            ..
        } => Some(format!("node:{node_id}:{deployment_hash}")),
        Call::CreateNameContract { name } => Some(format!("name:{name}")),
        _ => None,
    }
}

/// Node ids per `/nodes?node_ids=` read: at most 11 characters each, so under 6 KiB.
const IDS_PER_READ: usize = 500;

/// The nodes matching `f`, all pages.
pub(crate) async fn nodes_where(
    registry: &RegistryClient,
    f: NodeFilter,
) -> Result<Vec<NodeView>, BotError> {
    let mut out = Vec::new();
    for page in 1.. {
        let p = registry
            .nodes(&NodeFilter {
                page: Some(page),
                size: Some(MAX_PAGE_SIZE),
                ..f.clone()
            })
            .await?;
        let n = p.nodes.len();
        out.extend(p.nodes);
        if n < MAX_PAGE_SIZE as usize {
            break;
        }
    }
    Ok(out)
}

/// Where the contracts an operation makes are written down, the moment each exists: the stored
/// record under `name` (its `made` list). The record must exist before the operation starts.
pub(crate) struct Journal<'a> {
    bot: &'a Bot,
    name: String,
    /// Parallel replica deploys add to one record: read-modify-write one at a time.
    write: std::sync::Mutex<()>,
}

impl Journal<'_> {
    fn edit(&self, f: impl FnOnce(&mut Record)) -> Result<(), BotError> {
        let _g = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut r = self.bot.store.get(&self.name)?.ok_or_else(|| {
            BotError::Failed(format!("the record of {} is gone mid-operation", self.name))
        })?;
        f(&mut r);
        self.bot.store.put(&r)?;
        Ok(())
    }

    pub(crate) fn made(&self, m: Made) -> Result<(), BotError> {
        self.edit(|r| r.made.push(m))
    }

    /// Drops contracts from the journal: they are in the cancel queue or in the record proper.
    pub(crate) fn forget(&self, ids: &[ContractId]) -> Result<(), BotError> {
        self.edit(|r| r.made.retain(|m| !ids.contains(&m.contract_id)))
    }
}

impl Bot {
    pub async fn start(cfg: BotConfig) -> Result<Arc<Bot>, BotError> {
        std::fs::create_dir_all(&cfg.data)
            .map_err(|e| BotError::Failed(format!("{}: {e}", cfg.data.display())))?;
        let (identity, _) = Identity::load_or_generate(&cfg.key)
            .map_err(|e| BotError::Failed(format!("key {}: {e}", cfg.key.display())))?;
        let registry = RegistryClient::new(&cfg.registry);
        let signer = TwinSigner::new(identity.clone(), registry.clone());
        let twin = ensure_registered(&signer, &cfg.relay)
            .await
            .map_err(|e| BotError::Registry(e.to_string()))?;
        let peer = Peer::start(PeerConfig {
            identity: identity.clone(),
            twin,
            relay_url: cfg.relay.clone(),
            registry: registry.clone(),
        });
        if let Err(e) = peer.connected(Duration::from_secs(10)).await {
            tracing::warn!("bus: not connected to {} yet: {e}", cfg.relay);
        }
        let store = Store::open(&cfg.data.join("bot.redb"))?;
        let identity_seed = identity.seed();
        let bot = Arc::new(Bot {
            registry,
            signer,
            identity,
            twin,
            peer,
            store,
            locks: Default::default(),
            inflight: Default::default(),
            ops_started: Default::default(),
            ops_running: Default::default(),
            nets: Default::default(),
            layout: Default::default(),
            liveness: Default::default(),
            gone: Default::default(),
            placements: Default::default(),
            storage: crate::storage::Storage::new(tfgrid_storage::StorageKey::from_seed(
                &identity_seed,
            )),
        });
        bot.recover().await?;
        Ok(bot)
    }

    pub fn twin(&self) -> TwinId {
        self.twin
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    pub(crate) fn event(&self, dep: &str, kind: &str, message: String) {
        if let Err(e) = self.store.event(dep, kind, message) {
            tracing::error!("recording an event: {e}");
        }
    }

    pub(crate) fn lock_of(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    pub(crate) fn journal(&self, name: &str) -> Journal<'_> {
        Journal {
            bot: self,
            name: name.to_string(),
            write: std::sync::Mutex::new(()),
        }
    }

    pub(crate) fn inflight_keys(&self) -> std::collections::HashSet<String> {
        let m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        m.keys().cloned().collect()
    }

    fn inflight_add(&self, key: &str, delta: isize) {
        let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.to_string()).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            m.remove(key);
        }
    }

    /// Every node the registry knows, page by page.
    pub async fn all_nodes(&self) -> Result<Vec<NodeView>, BotError> {
        self.nodes_where(NodeFilter::default()).await
    }

    /// The nodes matching `f`, all pages.
    pub(crate) async fn nodes_where(&self, f: NodeFilter) -> Result<Vec<NodeView>, BotError> {
        nodes_where(&self.registry, f).await
    }

    /// The nodes with these ids, asked for in groups that keep each request's URL short (the
    /// registry takes at most 8 KiB), all groups at once.
    pub(crate) async fn nodes_by_id(
        &self,
        ids: &[tfgrid_core::NodeId],
    ) -> Result<Vec<NodeView>, BotError> {
        let reads = ids.chunks(IDS_PER_READ).map(|c| {
            self.nodes_where(NodeFilter {
                node_ids: Some(c.to_vec()),
                ..Default::default()
            })
        });
        let mut out = Vec::with_capacity(ids.len());
        for r in futures::future::join_all(reads).await {
            out.extend(r?);
        }
        Ok(out)
    }

    /// Makes a contract and writes it into `journal` before returning, so no crash can leave a
    /// contract that no record names (the in-flight mark covers the moment in between).
    pub(crate) async fn create_contract(
        &self,
        journal: &Journal<'_>,
        call: Call,
        node_twin: TwinId,
    ) -> Result<ContractId, String> {
        let key = inflight_key(&call).expect("a contract-creating call");
        self.inflight_add(&key, 1);
        let r = self.create_contract_inner(journal, call, node_twin).await;
        self.inflight_add(&key, -1);
        r
    }

    async fn create_contract_inner(
        &self,
        journal: &Journal<'_>,
        call: Call,
        node_twin: TwinId,
    ) -> Result<ContractId, String> {
        let receipt = self.signer.submit(call).await.map_err(|e| e.to_string())?;
        let contract_id = match receipt.outcome {
            Outcome::ContractCreated { contract_id, .. } => contract_id,
            o => return Err(format!("the registry answered {o:?}")),
        };
        if let Err(e) = journal.made(Made {
            contract_id,
            node_twin,
        }) {
            // Not written down: take it back now (the cancel queue is in the same store, so
            // it may fail too; then the orphan sweep finds it).
            self.cancel_all(&[(contract_id, node_twin)]).await;
            return Err(e.to_string());
        }
        tfgrid_core::faults::crash_point("bot-after-contract");
        Ok(contract_id)
    }

    /// Cancels contracts (and asks their nodes to delete them) through the persisted queue:
    /// each is queued first, and what the registry does not confirm now is retried by
    /// [`Bot::retry_cancels`] until it does. Returns how many are still queued.
    pub(crate) async fn cancel_all(&self, jobs: &[(ContractId, TwinId)]) -> usize {
        if jobs.is_empty() {
            return 0;
        }
        if let Err(e) = self.store.queue_cancels(jobs) {
            tracing::error!("queueing cancels: {e}");
        }
        let tries = jobs.iter().map(|&(c, twin)| async move {
            if twin != 0 {
                self.delete_on_node(twin, c).await;
            }
            self.cancel_now(c).await
        });
        futures::future::join_all(tries)
            .await
            .into_iter()
            .filter(|done| !done)
            .count()
    }

    /// One try at cancelling: true when the registry holds the contract cancelled (now or before).
    pub(crate) async fn cancel_now(&self, contract_id: ContractId) -> bool {
        let done = match self
            .signer
            .submit(Call::CancelContract { contract_id })
            .await
        {
            Ok(_) => true,
            Err(ClientError::Rejected { code, message, .. })
                if code == "not_found" || (code == "conflict" && message.contains("canceled")) =>
            {
                true
            }
            Err(e) => {
                tracing::warn!(contract_id, "cancel (queued, will retry): {e}");
                false
            }
        };
        if done {
            if let Err(e) = self.store.cancel_done(contract_id) {
                tracing::error!(contract_id, "dequeueing a cancel: {e}");
            }
        }
        done
    }

    pub(crate) async fn delete_on_node(&self, twin: TwinId, contract_id: ContractId) {
        let r: Result<serde_json::Value, _> = self
            .peer
            .call_json(twin, node_api::DELETE, &ContractRef { contract_id }, QUICK)
            .await;
        if let Err(e) = r {
            tracing::debug!(contract_id, "delete on node twin {twin}: {e}");
        }
    }

    /// A call to a node that may take long (a deploy pulls images) but fails within about two
    /// seconds once the node is gone: the node is pinged over the bus while the call runs, and the
    /// relay answers at once for a twin that is not connected.
    pub(crate) async fn call_node<Req, Resp>(
        &self,
        node_twin: TwinId,
        cmd: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, String>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let call = self.peer.call_json(node_twin, cmd, req, timeout);
        let watch = async {
            let mut misses = 0;
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                match self
                    .peer
                    .call(node_twin, "bus.ping", b"", Duration::from_secs(1))
                    .await
                {
                    Ok(_) => misses = 0,
                    Err(e) => {
                        misses += 1;
                        if misses >= WATCH_MISSES {
                            return e;
                        }
                    }
                }
            }
        };
        tokio::select! {
            r = call => r.map_err(|e| e.to_string()),
            e = watch => Err(format!("the node stopped answering during {cmd} ({e})")),
        }
    }

    pub fn get(&self, name: &str) -> Result<Record, BotError> {
        self.store
            .get(name)?
            .ok_or_else(|| BotError::NotFound(format!("no deployment named {name:?}")))
    }

    pub fn list(&self) -> Result<Vec<Record>, BotError> {
        Ok(self.store.all()?)
    }

    pub fn events(&self, since: u64, deployment: Option<&str>) -> Result<Vec<Event>, BotError> {
        Ok(self.store.events(since, deployment, 1000)?)
    }

    /// The container log of one replica, from its node.
    pub async fn logs(
        &self,
        name: &str,
        service: Option<&str>,
        index: u32,
        tail: Option<u64>,
    ) -> Result<String, BotError> {
        let rec = self.get(name)?;
        let r = rec
            .replicas
            .iter()
            .find(|r| service.is_none_or(|s| s == r.service) && r.index == index)
            .ok_or_else(|| BotError::NotFound(format!("{name} has no such replica")))?;
        let logs: node_api::Logs = self
            .peer
            .call_json(
                r.node_twin,
                node_api::LOGS,
                &node_api::LogsRequest {
                    contract_id: r.contract_id,
                    name: wname(&r.service),
                    tail,
                },
                QUICK,
            )
            .await
            .map_err(|e| BotError::Failed(format!("node {}: {e}", r.node_id)))?;
        Ok(logs.text)
    }

    /// A node's overlay peers and their paths, from the node itself.
    pub async fn overlay(
        &self,
        node: tfgrid_core::NodeId,
    ) -> Result<node_api::OverlayStatus, BotError> {
        let n = self.registry.node(node).await.map_err(|e| match e.code() {
            Some("not_found") => BotError::NotFound(format!("no node {node}")),
            _ => BotError::Registry(e.to_string()),
        })?;
        self.peer
            .call_json(
                n.node.twin_id,
                node_api::OVERLAY,
                &serde_json::json!({}),
                QUICK,
            )
            .await
            .map_err(|e| BotError::Failed(format!("node {node}: {e}")))
    }
}
