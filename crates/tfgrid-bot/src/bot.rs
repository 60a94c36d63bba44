//! The bot: deploys specs (place, contract, deploy over the bus, roll back on failure), removes
//! them, and reconciles: a replica whose node is down or whose container gave up is redeployed on
//! another node, its gateway route re-pointed, and the old contract cancelled.

use crate::scheduler::{Candidate, Scheduler, Want};
use crate::spec::{Service, Spec, SpecError};
use crate::store::{Event, Record, Replica, Route, State, Store, StoreError, WorkloadView};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tfgrid_bus::peer::ensure_registered;
use tfgrid_bus::{Peer, PeerConfig};
use tfgrid_core::contract::Contract;
use tfgrid_core::deployment::{
    ContainerSpec, Deployment, GatewayNameProxySpec, Mount, ResultState, VolumeSpec, Workload,
    WorkloadData, ZdbSpec,
};
use tfgrid_core::filter::{ContractFilter, NodeFilter, MAX_PAGE_SIZE};
use tfgrid_core::records::{NodeStatus, NodeView};
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::{now_millis, ContractId, Identity, NodeId, TwinId};
use tfgrid_node::api::{self, ContractRef, DeploymentInfo};
use tfgrid_registry_client::{RegistryClient, TwinSigner};

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
    Failed(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tfgrid_registry_client::ClientError> for BotError {
    fn from(e: tfgrid_registry_client::ClientError) -> Self {
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
    registry: RegistryClient,
    signer: TwinSigner,
    identity: Identity,
    twin: TwinId,
    peer: Peer,
    pub store: Store,
    /// One change at a time: deploys, removals and healing never interleave.
    lock: tokio::sync::Mutex<()>,
}

const DEPLOY_TIMEOUT: Duration = Duration::from_secs(120);
const QUICK: Duration = Duration::from_secs(5);

/// Workload names allow letters, digits and `_`; spec names use `-`.
fn wname(s: &str) -> String {
    s.replace('-', "_")
}

impl Bot {
    pub async fn start(cfg: BotConfig) -> Result<std::sync::Arc<Bot>, BotError> {
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
        let bot = std::sync::Arc::new(Bot {
            registry,
            signer,
            identity,
            twin,
            peer,
            store,
            lock: tokio::sync::Mutex::new(()),
        });
        bot.finish_interrupted().await?;
        Ok(bot)
    }

    pub fn twin(&self) -> TwinId {
        self.twin
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    fn event(&self, dep: &str, kind: &str, message: String) {
        if let Err(e) = self.store.event(dep, kind, message) {
            tracing::error!("recording an event: {e}");
        }
    }

    /// Every node the registry knows, page by page.
    pub async fn all_nodes(&self) -> Result<Vec<NodeView>, BotError> {
        self.nodes_where(NodeFilter::default()).await
    }

    /// The nodes matching `f`, all pages.
    async fn nodes_where(&self, f: NodeFilter) -> Result<Vec<NodeView>, BotError> {
        let mut out = Vec::new();
        for page in 1.. {
            let p = self
                .registry
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

    /// Places every service of `spec`. Candidates are first the nodes that are up and have at
    /// least the smallest replica's capacity free (the registry filters, so a grid of 100,000
    /// nodes is not fetched for every deploy); only when that fails is every node fetched, so
    /// the "no node fits" message counts every node's reason.
    async fn place_spec(
        &self,
        spec: &Spec,
    ) -> Result<(Scheduler, Vec<(String, u32, NodeId)>), BotError> {
        let wants: Vec<(String, Want, u32)> = spec
            .services
            .iter()
            .map(|(n, s)| Ok((n.clone(), Self::want(s)?, s.replicas)))
            .collect::<Result<_, BotError>>()?;
        let min = |f: fn(&Want) -> u64| wants.iter().map(|(_, w, _)| f(w)).min();
        let prefilter = NodeFilter {
            status: Some(NodeStatus::Up),
            free_cru: min(|w| w.capacity.cru),
            free_mru: min(|w| w.capacity.mru),
            free_sru: min(|w| w.capacity.sru).filter(|v| *v > 0),
            free_hru: min(|w| w.capacity.hru).filter(|v| *v > 0),
            ..Default::default()
        };
        let attempt = |nodes: Vec<NodeView>| {
            let mut sched = Scheduler::new(nodes.iter().map(Candidate::from));
            let mut plan = Vec::new();
            for (sname, want, replicas) in &wants {
                let placed = sched.place(
                    &format!("service {sname}"),
                    want,
                    *replicas,
                    &[],
                    &HashSet::new(),
                )?;
                for (i, id) in placed.into_iter().enumerate() {
                    plan.push((sname.clone(), i as u32, id));
                }
            }
            Ok::<_, crate::scheduler::NoFit>((sched, plan))
        };
        match attempt(self.nodes_where(prefilter).await?) {
            Ok(v) => Ok(v),
            Err(_) => attempt(self.all_nodes().await?).map_err(|e| BotError::NoFit(e.message)),
        }
    }

    fn want(svc: &Service) -> Result<Want, BotError> {
        Ok(Want {
            capacity: Self::replica_deployment(0, "x", svc)
                .capacity()
                .map_err(|e| BotError::Failed(e.to_string()))?,
            country: svc.placement.country.clone(),
            farms: svc.placement.farms.clone(),
            gpu: svc.placement.gpu,
            distinct: svc.placement.distinct_nodes,
        })
    }

    /// One replica of a service as a node deployment: its volumes, zdbs and the container.
    fn replica_deployment(twin: TwinId, service: &str, svc: &Service) -> Deployment {
        let wl = |name: String, data: WorkloadData| Workload {
            version: 0,
            name,
            data,
            metadata: String::new(),
            description: String::new(),
        };
        let mut workloads = Vec::new();
        let mut mounts = Vec::new();
        for v in &svc.volumes {
            let name = wname(&format!("{service}_{}", v.name));
            workloads.push(wl(
                name.clone(),
                WorkloadData::Volume(VolumeSpec { size: v.size.0 }),
            ));
            mounts.push(Mount {
                volume: name,
                path: v.path.clone(),
            });
        }
        for z in &svc.zdbs {
            workloads.push(wl(
                wname(&format!("{service}_{}", z.name)),
                WorkloadData::Zdb(ZdbSpec {
                    size: z.size.0,
                    mode: z.mode,
                    password: z.password.clone(),
                    public: false,
                }),
            ));
        }
        workloads.push(wl(
            wname(service),
            WorkloadData::Container(ContainerSpec {
                image: svc.image.clone(),
                entrypoint: svc.entrypoint.clone(),
                cmd: svc.command.clone(),
                env: svc.env.clone(),
                cpu: svc.cpu,
                memory: svc.memory.0,
                rootfs_size: 0,
                mounts,
            }),
        ));
        Deployment {
            version: 0,
            twin_id: twin,
            contract_id: 0,
            metadata: String::new(),
            description: service.to_string(),
            workloads,
            signature: None,
        }
    }

    async fn create_contract(&self, call: Call) -> Result<ContractId, String> {
        match self
            .signer
            .submit(call)
            .await
            .map_err(|e| e.to_string())?
            .outcome
        {
            Outcome::ContractCreated { contract_id, .. } => Ok(contract_id),
            o => Err(format!("the registry answered {o:?}")),
        }
    }

    async fn cancel(&self, contract_id: ContractId) {
        match self
            .signer
            .submit(Call::CancelContract { contract_id })
            .await
        {
            Ok(_) => {}
            Err(e) => tracing::warn!(contract_id, "cancel: {e}"),
        }
    }

    async fn delete_on_node(&self, twin: TwinId, contract_id: ContractId) {
        let r: Result<serde_json::Value, _> = self
            .peer
            .call_json(twin, api::DELETE, &ContractRef { contract_id }, QUICK)
            .await;
        if let Err(e) = r {
            tracing::debug!(contract_id, "delete on node twin {twin}: {e}");
        }
    }

    /// Contract, then the signed deployment over the bus. Anything short of every workload ok
    /// takes the contract (and whatever the node made) back.
    async fn deploy_replica(
        &self,
        owner: &str,
        service: &str,
        index: u32,
        svc: &Service,
        node: &Candidate,
    ) -> Result<Replica, String> {
        let mut d = Self::replica_deployment(self.twin, service, svc);
        // The registry holds one contract per deployment hash and node; the metadata (which the
        // hash covers) makes each replica, and each version of it, its own deployment.
        d.metadata = format!("{owner}/{service}/{index}@{}", now_millis());
        let contract_id = self
            .create_contract(Call::CreateNodeContract {
                node_id: node.id,
                deployment_hash: d.hash(),
                capacity: d.capacity().map_err(|e| e.to_string())?,
            })
            .await
            .map_err(|e| format!("contract on node {}: {e}", node.id))?;
        d.contract_id = contract_id;
        d.sign(&self.identity);
        let answer: Result<DeploymentInfo, _> = self
            .peer
            .call_json(node.twin, api::DEPLOY, &d, DEPLOY_TIMEOUT)
            .await;
        let failed = match answer {
            Err(e) => Some(format!("node {}: {e}", node.id)),
            Ok(info) => {
                let bad: Vec<String> = info
                    .results
                    .iter()
                    .filter(|(_, r)| r.state != ResultState::Ok)
                    .map(|(n, r)| format!("{n}: {}", r.message))
                    .collect();
                if bad.is_empty() {
                    let workloads = d
                        .workloads
                        .iter()
                        .filter_map(|w| {
                            let r = info.results.get(&w.name)?;
                            Some(WorkloadView {
                                name: w.name.clone(),
                                kind: w.data.kind().to_string(),
                                state: format!("{:?}", r.state).to_lowercase(),
                                message: r.message.clone(),
                                data: r.data.clone(),
                            })
                        })
                        .collect();
                    let ip = info
                        .results
                        .get(&wname(service))
                        .and_then(|r| r.data.get("ip").cloned())
                        .unwrap_or_default();
                    return Ok(Replica {
                        service: service.to_string(),
                        index,
                        node_id: node.id,
                        node_twin: node.twin,
                        contract_id,
                        ip,
                        state: "ok".into(),
                        message: String::new(),
                        workloads,
                    });
                }
                Some(format!("node {}: {}", node.id, bad.join("; ")))
            }
        };
        self.delete_on_node(node.twin, contract_id).await;
        self.cancel(contract_id).await;
        Err(failed.unwrap_or_default())
    }

    fn backends(rec: &Record, service: &str, port: u16) -> Vec<String> {
        rec.replicas
            .iter()
            .filter(|r| r.service == service && !r.ip.is_empty())
            .map(|r| format!("http://{}:{port}", r.ip))
            .collect()
    }

    fn gateway_deployment(
        twin: TwinId,
        service: &str,
        name: &str,
        backends: Vec<String>,
        version: u32,
    ) -> Deployment {
        Deployment {
            version,
            twin_id: twin,
            contract_id: 0,
            metadata: String::new(),
            description: format!("gateway for {service}"),
            workloads: vec![Workload {
                version,
                name: wname(&format!("gw_{service}")),
                data: WorkloadData::GatewayNameProxy(GatewayNameProxySpec {
                    name: name.to_string(),
                    backends,
                }),
                metadata: String::new(),
                description: String::new(),
            }],
            signature: None,
        }
    }

    /// The name contract for `name`: ours if we hold it, new if nobody does.
    async fn name_contract(&self, name: &str) -> Result<ContractId, String> {
        let live: Vec<Contract> = self
            .registry
            .contracts(&ContractFilter {
                kind: Some("name".into()),
                name: Some(name.into()),
                state: Some("live".into()),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if let Some(c) = live.iter().find(|c| c.is_live()) {
            if c.twin_id == self.twin {
                return Ok(c.id);
            }
            return Err(format!("the name {name:?} is taken by twin {}", c.twin_id));
        }
        self.create_contract(Call::CreateNameContract { name: name.into() })
            .await
    }

    async fn make_route(
        &self,
        service: &str,
        name: &str,
        backends: Vec<String>,
    ) -> Result<Route, String> {
        let nodes = self
            .nodes_where(NodeFilter {
                status: Some(NodeStatus::Up),
                domain: Some(true),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut gws: Vec<&NodeView> = nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Up && n.node.public_config.domain.is_some())
            .collect();
        gws.sort_by_key(|n| n.node.id);
        let gw = gws
            .first()
            .ok_or_else(|| "no gateway node is up (a node registered with --domain)".to_string())?;
        let name_contract = self.name_contract(name).await?;
        let mut d = Self::gateway_deployment(self.twin, service, name, backends.clone(), 0);
        let contract_id = self
            .create_contract(Call::CreateNodeContract {
                node_id: gw.node.id,
                deployment_hash: d.hash(),
                capacity: Default::default(),
            })
            .await?;
        d.contract_id = contract_id;
        d.sign(&self.identity);
        let info: DeploymentInfo = match self
            .peer
            .call_json(gw.node.twin_id, api::DEPLOY, &d, DEPLOY_TIMEOUT)
            .await
        {
            Ok(i) => i,
            Err(e) => {
                self.cancel(contract_id).await;
                return Err(format!("gateway node {}: {e}", gw.node.id));
            }
        };
        let r = info.results.values().next().cloned();
        match r {
            Some(r) if r.state == ResultState::Ok => Ok(Route {
                service: service.into(),
                name: name.into(),
                node_id: gw.node.id,
                node_twin: gw.node.twin_id,
                name_contract,
                contract_id,
                version: 0,
                backends,
                url: r.data.get("url").cloned().unwrap_or_default(),
            }),
            other => {
                self.delete_on_node(gw.node.twin_id, contract_id).await;
                self.cancel(contract_id).await;
                Err(format!(
                    "gateway node {}: {}",
                    gw.node.id,
                    other.map(|r| r.message).unwrap_or_default()
                ))
            }
        }
    }

    /// Points a route at new backends: a new deployment version, the contract updated to its
    /// hash first, then `deployment.update` on the gateway node.
    async fn repoint(&self, route: &mut Route, backends: Vec<String>) -> Result<(), String> {
        let version = route.version + 1;
        let mut d = Self::gateway_deployment(
            self.twin,
            &route.service,
            &route.name,
            backends.clone(),
            version,
        );
        self.signer
            .submit(Call::UpdateNodeContract {
                contract_id: route.contract_id,
                deployment_hash: d.hash(),
                capacity: Default::default(),
            })
            .await
            .map_err(|e| e.to_string())?;
        d.contract_id = route.contract_id;
        d.sign(&self.identity);
        let _: DeploymentInfo = self
            .peer
            .call_json(route.node_twin, api::UPDATE, &d, DEPLOY_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        route.version = version;
        route.backends = backends;
        Ok(())
    }

    /// Deploys a spec; for a name that exists with a different spec, deploys the new one beside
    /// it, moves its gateway names over, then removes the old replicas (no downtime for exposed
    /// services). The same spec again changes nothing.
    pub async fn deploy(&self, yaml: &str) -> Result<Record, BotError> {
        let spec = Spec::parse(yaml)?;
        let _g = self.lock.lock().await;
        let old = self.store.get(&spec.name)?;
        if let Some(old) = &old {
            if old.yaml == yaml {
                self.event(&spec.name, "unchanged", "the same spec is deployed".into());
                return Ok(old.clone());
            }
        }
        let t0 = Instant::now();
        // Services declared exactly as before keep their replicas and routes.
        let kept: HashSet<String> = old
            .as_ref()
            .and_then(|o| Spec::parse(&o.yaml).ok())
            .map(|os| {
                spec.services
                    .iter()
                    .filter(|(n, s)| os.services.get(*n) == Some(*s))
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut todo = spec.clone();
        todo.services.retain(|n, _| !kept.contains(n));
        let (sched, plan) = if todo.services.is_empty() {
            (Scheduler::new([]), Vec::new())
        } else {
            self.place_spec(&todo).await?
        };
        let mut rec = Record {
            name: spec.name.clone(),
            yaml: yaml.to_string(),
            state: State::Deploying,
            replicas: Vec::new(),
            routes: Vec::new(),
            created_at: old.as_ref().map_or_else(now_millis, |o| o.created_at),
            updated_at: now_millis(),
        };
        if old.is_none() {
            self.store.put(&rec)?;
        }
        let placed: Vec<String> = plan
            .iter()
            .map(|(s, i, n)| format!("{s}/{i} on node {n}"))
            .collect();
        if !placed.is_empty() {
            self.event(&spec.name, "placed", placed.join(", "));
        }
        let owner = spec.name.as_str();
        let jobs = plan.iter().map(|(s, i, id)| {
            let node = sched.node(*id).cloned().expect("placed on a known node");
            let svc = &spec.services[s];
            async move { (s, *i, self.deploy_replica(owner, s, *i, svc, &node).await) }
        });
        let results = futures::future::join_all(jobs).await;
        let mut errors = Vec::new();
        for (s, i, r) in results {
            match r {
                Ok(rep) => {
                    self.event(
                        &spec.name,
                        "running",
                        format!("{s}/{i} running on node {} at {}", rep.node_id, rep.ip),
                    );
                    rec.replicas.push(rep);
                }
                Err(e) => errors.push(format!("{s}/{i}: {e}")),
            }
        }
        // Names the old deployment already serves are re-pointed once everything else is made.
        let mut repoint = Vec::new();
        let mut kept_routes = Vec::new();
        if errors.is_empty() {
            for (sname, svc) in &spec.services {
                let Some(ex) = &svc.expose else { continue };
                if kept.contains(sname) {
                    kept_routes
                        .extend(old.iter().flat_map(|o| {
                            o.routes.iter().filter(|r| r.service == *sname).cloned()
                        }));
                    continue;
                }
                let backends = Self::backends(&rec, sname, ex.port);
                let kept = old
                    .as_ref()
                    .and_then(|o| o.routes.iter().find(|r| r.name == ex.name).cloned());
                if let Some(route) = kept {
                    repoint.push((route, sname.clone(), backends));
                    continue;
                }
                match self.make_route(sname, &ex.name, backends).await {
                    Ok(route) => {
                        self.event(&spec.name, "exposed", format!("{sname} at {}", route.url));
                        rec.routes.push(route);
                    }
                    Err(e) => errors.push(format!("{sname}: gateway: {e}")),
                }
            }
        }
        if !errors.is_empty() {
            if old.is_none() {
                self.store.put(&rec)?;
            }
            self.roll_back(&rec).await;
            let msg = match &old {
                None => {
                    self.store.remove(&rec.name)?;
                    format!("deploy failed, nothing left behind: {}", errors.join("; "))
                }
                Some(_) => format!(
                    "update failed, the deployed version is unchanged: {}",
                    errors.join("; ")
                ),
            };
            self.event(&spec.name, "failed", msg.clone());
            return Err(BotError::Failed(msg));
        }
        rec.routes.extend(kept_routes);
        if let Some(o) = &old {
            rec.replicas.extend(
                o.replicas
                    .iter()
                    .filter(|r| kept.contains(&r.service))
                    .cloned(),
            );
        }
        for (mut route, sname, backends) in repoint {
            route.service = sname;
            match self.repoint(&mut route, backends).await {
                Ok(()) => self.event(
                    &spec.name,
                    "repointed",
                    format!("{} to the new replicas", route.url),
                ),
                Err(e) => self.event(
                    &spec.name,
                    "failed",
                    format!("re-pointing {}: {e}", route.url),
                ),
            }
            rec.routes.push(route);
        }
        rec.state = State::Running;
        rec.updated_at = now_millis();
        rec.replicas
            .sort_by(|a, b| (&a.service, a.index).cmp(&(&b.service, b.index)));
        self.store.put(&rec)?;
        if let Some(mut old) = old {
            // What the new version does not keep goes: the replicas of changed or dropped
            // services, and the routes whose names it no longer exposes (with their names).
            old.replicas.retain(|r| !kept.contains(&r.service));
            old.routes
                .retain(|r| !rec.routes.iter().any(|n| n.contract_id == r.contract_id));
            self.roll_back(&old).await;
        }
        self.event(
            &spec.name,
            "deployed",
            format!(
                "{} replicas in {} ms",
                rec.replicas.len(),
                t0.elapsed().as_millis()
            ),
        );
        Ok(rec)
    }

    /// Takes everything a record holds away: routes, replicas, their contracts, name contracts.
    async fn roll_back(&self, rec: &Record) {
        for r in &rec.routes {
            self.delete_on_node(r.node_twin, r.contract_id).await;
            self.cancel(r.contract_id).await;
            self.cancel(r.name_contract).await;
        }
        let jobs = rec.replicas.iter().map(|r| async move {
            self.delete_on_node(r.node_twin, r.contract_id).await;
            self.cancel(r.contract_id).await;
        });
        futures::future::join_all(jobs).await;
    }

    pub async fn remove(&self, name: &str) -> Result<(), BotError> {
        let _g = self.lock.lock().await;
        let rec = self
            .store
            .get(name)?
            .ok_or_else(|| BotError::NotFound(format!("no deployment named {name:?}")))?;
        self.roll_back(&rec).await;
        self.store.remove(name)?;
        self.event(
            name,
            "removed",
            format!(
                "{} replicas and {} routes removed",
                rec.replicas.len(),
                rec.routes.len()
            ),
        );
        Ok(())
    }

    /// A deploy cut short by a bot crash left a record in Deploying: take it back.
    async fn finish_interrupted(&self) -> Result<(), BotError> {
        for rec in self.store.all()? {
            if rec.state == State::Deploying {
                self.roll_back(&rec).await;
                self.store.remove(&rec.name)?;
                self.event(
                    &rec.name,
                    "failed",
                    "the bot stopped during the deploy; rolled back".into(),
                );
            }
        }
        Ok(())
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
        let logs: api::Logs = self
            .peer
            .call_json(
                r.node_twin,
                api::LOGS,
                &api::LogsRequest {
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

    /// One pass of self-healing over every running deployment.
    pub async fn reconcile(&self) -> Result<(), BotError> {
        let _g = self.lock.lock().await;
        let records = self.store.all()?;
        let used: Vec<NodeId> = records
            .iter()
            .flat_map(|r| {
                r.replicas
                    .iter()
                    .map(|x| x.node_id)
                    .chain(r.routes.iter().map(|x| x.node_id))
                    .collect::<Vec<_>>()
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if used.is_empty() {
            return Ok(());
        }
        let status: std::collections::HashMap<NodeId, NodeStatus> = self
            .nodes_where(NodeFilter {
                node_ids: Some(used),
                ..Default::default()
            })
            .await?
            .iter()
            .map(|n| (n.node.id, n.status))
            .collect();
        for mut rec in records {
            if rec.state == State::Deploying {
                continue;
            }
            let spec = match Spec::parse(&rec.yaml) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(deployment = %rec.name, "stored spec no longer parses: {e}");
                    continue;
                }
            };
            let mut changed = false;
            let mut degraded = false;
            // Every replica's node is asked at once: one slow node does not hold up the others.
            let checks = rec.replicas.iter().map(|r| async {
                match status.get(&r.node_id) {
                    Some(NodeStatus::Up) => self.replica_health(r).await,
                    _ => (None, Some(format!("node {} is down", r.node_id))),
                }
            });
            let health = futures::future::join_all(checks).await;
            for (i, (seen, why)) in health.into_iter().enumerate() {
                if let Some((state, message)) = seen {
                    let r = &mut rec.replicas[i];
                    if state != r.state || message != r.message {
                        (r.state, r.message) = (state, message);
                        changed = true;
                    }
                }
                let r = rec.replicas[i].clone();
                let Some(why) = why else { continue };
                let Some(svc) = spec.services.get(&r.service) else {
                    continue;
                };
                match self.heal(&rec, &r, svc, &why).await {
                    Ok(new) => {
                        rec.replicas[i] = new;
                        changed = true;
                        self.repoint_service(&mut rec, svc, &r.service).await;
                    }
                    Err(e) => {
                        if rec.state != State::Degraded {
                            self.event(
                                &rec.name,
                                "heal-failed",
                                format!("{}/{}: {why}; {e}", r.service, r.index),
                            );
                        }
                        degraded = true;
                    }
                }
            }
            // A route whose gateway node is down moves to another gateway (its URL changes with
            // the gateway's domain and address).
            for j in 0..rec.routes.len() {
                let old = rec.routes[j].clone();
                if status.get(&old.node_id) == Some(&NodeStatus::Up) {
                    continue;
                }
                match self
                    .make_route(&old.service, &old.name, old.backends.clone())
                    .await
                {
                    Ok(mut new) => {
                        new.name_contract = old.name_contract;
                        self.cancel(old.contract_id).await;
                        self.delete_on_node(old.node_twin, old.contract_id).await;
                        self.event(
                            &rec.name,
                            "gateway-moved",
                            format!(
                                "gateway node {} is down; {} is now served at {} by node {}",
                                old.node_id, old.name, new.url, new.node_id
                            ),
                        );
                        rec.routes[j] = new;
                        changed = true;
                    }
                    Err(e) => {
                        // Said once, when the deployment turns degraded; retried every pass.
                        if rec.state != State::Degraded {
                            self.event(
                                &rec.name,
                                "heal-failed",
                                format!("gateway node {} is down; {e}", old.node_id),
                            );
                        }
                        degraded = true;
                    }
                }
            }
            let state = if degraded {
                State::Degraded
            } else {
                State::Running
            };
            if changed || state != rec.state {
                rec.state = state;
                rec.updated_at = now_millis();
                self.store.put(&rec)?;
            }
        }
        Ok(())
    }

    /// Asks the node how the replica is: its container's state and message as the node reports
    /// them, and a reason to heal when the container gave up restarting or the node no longer has
    /// the deployment. A node that does not answer gives neither (the registry decides on it).
    async fn replica_health(&self, r: &Replica) -> (Option<(String, String)>, Option<String>) {
        let info: Result<DeploymentInfo, _> = self
            .peer
            .call_json(
                r.node_twin,
                api::GET,
                &ContractRef {
                    contract_id: r.contract_id,
                },
                Duration::from_secs(2),
            )
            .await;
        match info {
            Err(e) if e.to_string().contains("not found") => (
                None,
                Some(format!("node {} no longer has the deployment", r.node_id)),
            ),
            Err(_) => (None, None),
            Ok(info) => {
                let Some(res) = info.results.get(&wname(&r.service)) else {
                    return (None, None);
                };
                let why = (res.state == ResultState::Error && res.message.contains("gave up"))
                    .then(|| format!("container failed: {}", res.message));
                (
                    Some((
                        format!("{:?}", res.state).to_lowercase(),
                        res.message.clone(),
                    )),
                    why,
                )
            }
        }
    }

    async fn heal(
        &self,
        rec: &Record,
        old: &Replica,
        svc: &Service,
        why: &str,
    ) -> Result<Replica, String> {
        let t0 = Instant::now();
        let nodes = self.all_nodes().await.map_err(|e| e.to_string())?;
        let mut sched = Scheduler::new(nodes.iter().map(Candidate::from));
        let used: Vec<NodeId> = rec
            .replicas
            .iter()
            .filter(|r| r.service == old.service && r.contract_id != old.contract_id)
            .map(|r| r.node_id)
            .collect();
        let exclude: HashSet<NodeId> = [old.node_id].into();
        let want = Self::want(svc).map_err(|e| e.to_string())?;
        let target = sched
            .place(
                &format!("service {}", old.service),
                &want,
                1,
                &used,
                &exclude,
            )
            .map_err(|e| e.message)?[0];
        let node = sched.node(target).cloned().expect("placed on a known node");
        let new = self
            .deploy_replica(&rec.name, &old.service, old.index, svc, &node)
            .await?;
        // The replacement runs: now the old one goes (its node may be gone; the contract must).
        self.cancel(old.contract_id).await;
        self.delete_on_node(old.node_twin, old.contract_id).await;
        self.event(
            &rec.name,
            "healed",
            format!(
                "{}/{}: {why}; redeployed on node {} at {} in {} ms",
                old.service,
                old.index,
                new.node_id,
                new.ip,
                t0.elapsed().as_millis()
            ),
        );
        Ok(new)
    }

    async fn repoint_service(&self, rec: &mut Record, svc: &Service, service: &str) {
        let Some(ex) = &svc.expose else { return };
        let backends = Self::backends(rec, service, ex.port);
        let name = rec.name.clone();
        for route in rec.routes.iter_mut().filter(|r| r.service == service) {
            match self.repoint(route, backends.clone()).await {
                Ok(()) => self.event(
                    &name,
                    "repointed",
                    format!("{} -> {}", route.url, backends.join(", ")),
                ),
                Err(e) => self.event(
                    &name,
                    "heal-failed",
                    format!("re-pointing {}: {e}", route.url),
                ),
            }
        }
    }

    /// Reconciles every `period` until the task is dropped.
    pub async fn run_reconciler(self: std::sync::Arc<Self>, period: Duration) {
        loop {
            tokio::time::sleep(period).await;
            if let Err(e) = self.reconcile().await {
                tracing::warn!("reconcile: {e}");
            }
        }
    }
}
