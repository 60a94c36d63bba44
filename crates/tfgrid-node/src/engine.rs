//! The provisioning engine: checks every deployment against the registry, persists it, and drives
//! the workload kinds. One mutation at a time (a node-wide lock), so two deployments can never both
//! take the last free capacity.

use crate::api::{DeploymentInfo, Statistics};
use crate::kinds::container::Container;
use crate::kinds::gateway::Gateway;
use crate::kinds::volume::Volume;
use crate::kinds::zdb::Zdb;
use crate::kinds::{Ctx, Kind, Output, Report, WorkloadId};
use crate::store::{Change, Store, StoreError};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tfgrid_core::checks;
use tfgrid_core::deployment::{Deployment, ResultState, Workload, WorkloadData, WorkloadResult};
use tfgrid_core::{now_millis, Capacity, ContractId, NodeId, TwinId};
use tfgrid_registry_client::{ClientError, RegistryClient};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("capacity: {0}")]
    Capacity(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What makes workloads exist: this host's kinds, or a simulation of all of them.
pub enum Kinds {
    // One per node, held for its life: its size does not matter.
    Host(Box<HostKinds>),
    Simulated(crate::kinds::simulated::Simulated),
}

pub struct HostKinds {
    pub volume: Volume,
    pub zdb: Zdb,
    pub container: Container,
    pub gateway: Gateway,
    pub vm: crate::kinds::vm::Vm,
}

pub struct Engine {
    node_id: NodeId,
    total: Capacity,
    registry: RegistryClient,
    store: Store,
    pub kinds: Kinds,
    lock: tokio::sync::Mutex<()>,
}

/// What the engine asks of a workload's kind.
#[derive(Clone, Copy)]
enum Op {
    Provision,
    Recover,
    Update,
}

impl Op {
    async fn run<K: Kind>(self, k: &K, ctx: &Ctx<'_>) -> Result<Output, String> {
        match self {
            Op::Provision => k.provision(ctx).await,
            Op::Recover => k.recover(ctx).await,
            Op::Update => k.update(ctx).await,
        }
    }
}

/// The order workloads come up in: what others mount or point at first.
fn rank(w: &Workload) -> u8 {
    match w.data {
        WorkloadData::Volume(_) => 0,
        WorkloadData::Zdb(_) => 1,
        WorkloadData::Container(_) | WorkloadData::Vm(_) => 2,
        WorkloadData::GatewayNameProxy(_) => 3,
    }
}

fn ordered(d: &Deployment) -> Vec<&Workload> {
    let mut v: Vec<&Workload> = d.workloads.iter().collect();
    v.sort_by_key(|w| rank(w));
    v
}

/// The checks containers and image VMs share: mounts name volumes of the deployment at distinct
/// paths, env names and values, entrypoint and cmd.
fn check_process(
    n: &str,
    mounts: &[tfgrid_core::deployment::Mount],
    volumes: &HashSet<&str>,
    env: &BTreeMap<String, String>,
    entrypoint: &Option<Vec<String>>,
    cmd: &Option<Vec<String>>,
) -> Result<(), EngineError> {
    let bad = |m: String| Err(EngineError::Malformed(m));
    let mut paths = HashSet::new();
    for m in mounts {
        if !volumes.contains(m.volume.as_str()) {
            return bad(format!(
                "{n}: mount names volume {:?}, which is not a volume workload of this deployment",
                m.volume
            ));
        }
        checks::mount_path(&m.path)
            .or_else(|e| bad(format!("{n}: mount path {:?}: {e}", m.path)))?;
        if !paths.insert(m.path.as_str()) {
            return bad(format!("{n}: two mounts on {:?}", m.path));
        }
    }
    for (k, v) in env {
        checks::env_name(k).or_else(|e| bad(format!("{n}: env {k:?} {e}")))?;
        checks::arg(v).or_else(|e| bad(format!("{n}: env {k}: {e}")))?;
    }
    for (what, args) in [("entrypoint", entrypoint), ("cmd", cmd)] {
        if let Some(a) = args {
            checks::command(a).or_else(|(i, e)| bad(format!("{n}: {what}[{i}] {e}")))?;
        }
    }
    Ok(())
}

fn result(state: ResultState, message: String, data: Output) -> WorkloadResult {
    WorkloadResult {
        created: now_millis(),
        state,
        message,
        data,
    }
}

/// Checks what a deployment says about itself, before anything is asked of the registry.
pub fn validate(d: &Deployment, gateway_domain: Option<&str>) -> Result<(), EngineError> {
    let bad = |m: String| Err(EngineError::Malformed(m));
    if d.contract_id == 0 {
        return bad("contract_id is 0: create the node contract first".into());
    }
    if d.workloads.is_empty() {
        return bad("a deployment needs at least one workload".into());
    }
    let mut names = HashSet::new();
    let volumes: HashSet<&str> = d
        .workloads
        .iter()
        .filter(|w| matches!(w.data, WorkloadData::Volume(_)))
        .map(|w| w.name.as_str())
        .collect();
    // A VM's volume is a disk only it writes: no container or other VM may mount it too.
    let mut users: BTreeMap<&str, Vec<(&str, bool)>> = BTreeMap::new();
    for w in &d.workloads {
        let (mounts, vm) = match &w.data {
            WorkloadData::Container(c) => (&c.mounts, false),
            WorkloadData::Vm(v) => (&v.mounts, true),
            _ => continue,
        };
        for m in mounts {
            users
                .entry(m.volume.as_str())
                .or_default()
                .push((w.name.as_str(), vm));
        }
    }
    for (vol, u) in &users {
        if u.len() > 1 && u.iter().any(|(_, vm)| *vm) {
            let names: Vec<&str> = u.iter().map(|(n, _)| *n).collect();
            return bad(format!(
                "volume {vol} is mounted by {}: a volume a vm mounts is its disk alone",
                names.join(" and ")
            ));
        }
    }
    for w in &d.workloads {
        let n = &w.name;
        if n.is_empty() || n.len() > 36 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad(format!(
                "workload name {n:?}: use 1 to 36 letters, digits or _"
            ));
        }
        if !names.insert(n.as_str()) {
            return bad(format!("workload name {n:?} is used twice"));
        }
        match &w.data {
            WorkloadData::Container(c) => {
                checks::image_ref(&c.image).or_else(|e| bad(format!("{n}: image: {e}")))?;
                if c.cpu == 0 || c.cpu > 1024 {
                    return bad(format!("{n}: cpu must be 1 to 1024"));
                }
                checks::size(c.memory, 16 << 20).or_else(|e| bad(format!("{n}: memory {e}")))?;
                if c.rootfs_size > 0 {
                    checks::size(c.rootfs_size, 1 << 20)
                        .or_else(|e| bad(format!("{n}: rootfs_size {e}")))?;
                }
                check_process(n, &c.mounts, &volumes, &c.env, &c.entrypoint, &c.cmd)?;
            }
            WorkloadData::Vm(v) => {
                match (&v.image, &v.disk_image) {
                    (Some(i), None) | (None, Some(i)) => {
                        checks::image_ref(i).or_else(|e| bad(format!("{n}: image: {e}")))?
                    }
                    _ => {
                        return bad(format!(
                            "{n}: a vm needs exactly one of image and disk_image"
                        ))
                    }
                }
                if v.cpu == 0 || v.cpu > 64 {
                    return bad(format!("{n}: a vm has 1 to 64 vcpus"));
                }
                checks::size(v.memory, 64 << 20)
                    .or_else(|e| bad(format!("{n}: memory {e} (a vm needs 64 MiB or more)")))?;
                if v.disk_image.is_some() || v.disk_size > 0 {
                    checks::size(v.disk_size, 1 << 20)
                        .or_else(|e| bad(format!("{n}: disk_size {e}")))?;
                }
                if v.disk_image.is_some() && (v.entrypoint.is_some() || v.cmd.is_some()) {
                    return bad(format!(
                        "{n}: a disk image boots its own system: entrypoint and cmd are for image VMs"
                    ));
                }
                if v.disk_image.is_some() && !v.kernel_args.is_empty() {
                    return bad(format!(
                        "{n}: a disk image boots its own kernel: kernel_args are for image VMs"
                    ));
                }
                if v.kernel_args.len() > 32 {
                    return bad(format!("{n}: at most 32 kernel_args"));
                }
                for a in &v.kernel_args {
                    checks::kernel_arg(a)
                        .or_else(|e| bad(format!("{n}: kernel arg {a:?}: {e}")))?;
                }
                if v.ssh_keys.len() > 64 {
                    return bad(format!("{n}: at most 64 ssh_keys"));
                }
                for k in &v.ssh_keys {
                    checks::ssh_key(k).or_else(|e| bad(format!("{n}: ssh key: {e}")))?;
                }
                check_process(n, &v.mounts, &volumes, &v.env, &v.entrypoint, &v.cmd)?;
            }
            WorkloadData::Volume(v) => {
                checks::size(v.size, 1 << 20).or_else(|e| bad(format!("{n}: volume size {e}")))?;
            }
            WorkloadData::Zdb(z) => {
                checks::size(z.size, 1).or_else(|e| bad(format!("{n}: zdb size {e}")))?;
                checks::zdb_password(&z.password)
                    .or_else(|e| bad(format!("{n}: zdb password {e}")))?;
            }
            WorkloadData::GatewayNameProxy(g) => {
                if gateway_domain.is_none() {
                    return bad(format!(
                        "{n}: this node is not a gateway (it has no domain)"
                    ));
                }
                if g.name.is_empty()
                    || g.name.len() > 63
                    || !g
                        .name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                {
                    return bad(format!(
                        "{n}: gateway name {:?}: use 1 to 63 lowercase letters, digits or -",
                        g.name
                    ));
                }
                if g.backends.is_empty() {
                    return bad(format!("{n}: a gateway needs at least one backend"));
                }
                for b in &g.backends {
                    if !b.starts_with("http://") || b.len() <= "http://".len() {
                        return bad(format!("{n}: backend {b:?} must be an http:// address"));
                    }
                }
            }
        }
    }
    Ok(())
}

fn registry_err(what: &str) -> impl Fn(ClientError) -> EngineError + '_ {
    move |e| match e.code() {
        Some("not_found") => EngineError::NotFound(format!("{what}: {e}")),
        _ => EngineError::Registry(format!("{what}: {e}")),
    }
}

impl Engine {
    pub fn new(
        node_id: NodeId,
        total: Capacity,
        registry: RegistryClient,
        store: Store,
        kinds: Kinds,
    ) -> Self {
        Self {
            node_id,
            total,
            registry,
            store,
            kinds,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn total(&self) -> Capacity {
        self.total
    }

    /// The registry's word that `d` is what its owner contracted for on this node.
    async fn check_contract(&self, src: TwinId, d: &Deployment) -> Result<(), EngineError> {
        if src != d.twin_id {
            return Err(EngineError::Forbidden(format!(
                "twin {src} sent a deployment of twin {}",
                d.twin_id
            )));
        }
        let c = self
            .registry
            .contract(d.contract_id)
            .await
            .map_err(registry_err("contract"))?;
        if !c.is_live() {
            return Err(EngineError::Conflict(format!(
                "contract {} is cancelled",
                c.id
            )));
        }
        let Some(nc) = c.node() else {
            return Err(EngineError::Malformed(format!(
                "contract {} is a name contract, not a node contract",
                c.id
            )));
        };
        if nc.node_id != self.node_id {
            return Err(EngineError::Forbidden(format!(
                "contract {} is for node {}, this is node {}",
                c.id, nc.node_id, self.node_id
            )));
        }
        if c.twin_id != d.twin_id {
            return Err(EngineError::Forbidden(format!(
                "contract {} belongs to twin {}, not to twin {}",
                c.id, c.twin_id, d.twin_id
            )));
        }
        let owner = self
            .registry
            .twin(c.twin_id)
            .await
            .map_err(registry_err("owner twin"))?;
        d.verify(&owner.public_key).map_err(|_| {
            EngineError::Forbidden(format!(
                "the deployment is not signed by twin {}, the contract's owner",
                c.twin_id
            ))
        })?;
        let hash = d.hash();
        if hash != nc.deployment_hash {
            return Err(EngineError::Conflict(format!(
                "deployment hash {} differs from contract {}'s hash {}",
                hash.to_hex(),
                c.id,
                nc.deployment_hash.to_hex()
            )));
        }
        let need = d
            .capacity()
            .map_err(|e| EngineError::Malformed(e.to_string()))?;
        if need != nc.capacity {
            return Err(EngineError::Capacity(format!(
                "the deployment needs {need:?} but contract {} reserved {:?}",
                c.id, nc.capacity
            )));
        }
        Ok(())
    }

    /// Capacity held by every deployment here but `except`.
    fn reserved_except(&self, except: Option<ContractId>) -> Result<Capacity, EngineError> {
        let mut sum = Capacity::default();
        for d in self.store.deployments()? {
            if Some(d.contract_id) == except {
                continue;
            }
            let c = d
                .capacity()
                .map_err(|e| EngineError::Store(StoreError::Db(e.to_string())))?;
            sum = sum
                .checked_add(&c)
                .map_err(|e| EngineError::Store(StoreError::Db(e.to_string())))?;
        }
        Ok(sum)
    }

    fn check_free(&self, d: &Deployment, except: Option<ContractId>) -> Result<(), EngineError> {
        let need = d
            .capacity()
            .map_err(|e| EngineError::Malformed(e.to_string()))?;
        let free = self.total.saturating_sub(&self.reserved_except(except)?);
        if !need.fits_in(&free) {
            return Err(EngineError::Capacity(format!(
                "node {} does not have the capacity: {}",
                self.node_id,
                need.shortfall(&free).join("; ")
            )));
        }
        Ok(())
    }

    pub async fn deploy(
        &self,
        src: TwinId,
        d: Deployment,
        domain: Option<&str>,
    ) -> Result<DeploymentInfo, EngineError> {
        validate(&d, domain)?;
        let _g = self.lock.lock().await;
        if self.store.deployment(d.contract_id)?.is_some() {
            return Err(EngineError::Conflict(format!(
                "contract {} is already deployed here; use deployment.update",
                d.contract_id
            )));
        }
        self.check_contract(src, &d).await?;
        self.check_free(&d, None)?;
        let init: Vec<_> = d
            .workloads
            .iter()
            .map(|w| {
                (
                    w.name.clone(),
                    result(ResultState::Init, String::new(), Output::new()),
                )
            })
            .collect();
        self.store.put_deployment(&d, &init)?;
        tfgrid_core::faults::crash_point("node-during-deploy");
        for w in ordered(&d) {
            self.apply(&d, w, Op::Provision).await?;
        }
        self.info(d.contract_id)
    }

    /// Provisions, recovers or updates one workload (by its kind) and records its result.
    async fn apply(
        &self,
        d: &Deployment,
        w: &Workload,
        op: Op,
    ) -> Result<WorkloadResult, EngineError> {
        let ctx = Ctx {
            id: WorkloadId::new(d.contract_id, &w.name),
            deployment: d,
            workload: w,
        };
        let out = match (&self.kinds, &w.data) {
            (Kinds::Simulated(s), _) => op.run(s, &ctx).await,
            (Kinds::Host(k), WorkloadData::Volume(_)) => op.run(&k.volume, &ctx).await,
            (Kinds::Host(k), WorkloadData::Zdb(_)) => op.run(&k.zdb, &ctx).await,
            (Kinds::Host(k), WorkloadData::Container(_)) => op.run(&k.container, &ctx).await,
            (Kinds::Host(k), WorkloadData::GatewayNameProxy(_)) => op.run(&k.gateway, &ctx).await,
            (Kinds::Host(k), WorkloadData::Vm(_)) => op.run(&k.vm, &ctx).await,
        };
        let r = match out {
            Ok(data) => result(ResultState::Ok, String::new(), data),
            Err(msg) => {
                tracing::warn!(workload = %ctx.id.key(), "{msg}");
                result(ResultState::Error, msg, Output::new())
            }
        };
        self.store
            .set_results(d.contract_id, &[(w.name.clone(), r.clone())])?;
        Ok(r)
    }

    async fn take_down(&self, contract: ContractId, w: &Workload) -> Result<(), String> {
        let id = WorkloadId::new(contract, &w.name);
        match (&self.kinds, &w.data) {
            (Kinds::Simulated(s), _) => s.deprovision(&id).await,
            (Kinds::Host(k), WorkloadData::Volume(_)) => k.volume.deprovision(&id).await,
            (Kinds::Host(k), WorkloadData::Zdb(_)) => k.zdb.deprovision(&id).await,
            (Kinds::Host(k), WorkloadData::Container(_)) => k.container.deprovision(&id).await,
            (Kinds::Host(k), WorkloadData::GatewayNameProxy(_)) => k.gateway.deprovision(&id).await,
            (Kinds::Host(k), WorkloadData::Vm(_)) => k.vm.deprovision(&id).await,
        }
    }

    pub async fn update(
        &self,
        src: TwinId,
        d: Deployment,
        domain: Option<&str>,
    ) -> Result<DeploymentInfo, EngineError> {
        validate(&d, domain)?;
        let _g = self.lock.lock().await;
        let old = self.store.deployment(d.contract_id)?.ok_or_else(|| {
            EngineError::NotFound(format!(
                "contract {} has no deployment here; use deployment.deploy",
                d.contract_id
            ))
        })?;
        if d.version <= old.version {
            return Err(EngineError::Conflict(format!(
                "an update must raise the version (deployed {}, sent {})",
                old.version, d.version
            )));
        }
        self.check_contract(src, &d).await?;
        self.check_free(&d, Some(d.contract_id))?;
        let old_by_name: BTreeMap<&str, &Workload> =
            old.workloads.iter().map(|w| (w.name.as_str(), w)).collect();
        let new_names: HashSet<&str> = d.workloads.iter().map(|w| w.name.as_str()).collect();
        // Removed workloads go first (in reverse order) so their capacity is free.
        let mut gone: Vec<&Workload> = old
            .workloads
            .iter()
            .filter(|w| !new_names.contains(w.name.as_str()))
            .collect();
        gone.sort_by_key(|w| std::cmp::Reverse(rank(w)));
        for w in &gone {
            self.take_down(old.contract_id, w)
                .await
                .map_err(|e| EngineError::Conflict(format!("removing {}: {e}", w.name)))?;
            self.store.forget_result(old.contract_id, &w.name)?;
        }
        self.store.put_deployment(&d, &[])?;
        for w in ordered(&d) {
            match old_by_name.get(w.name.as_str()) {
                Some(o) if *o == w => {}
                Some(_) => {
                    self.apply(&d, w, Op::Update).await?;
                }
                None => {
                    self.apply(&d, w, Op::Provision).await?;
                }
            }
        }
        self.info(d.contract_id)
    }

    /// Removes every workload of a deployment (in reverse order) and forgets it. Workloads that
    /// cannot be removed keep the deployment on record, in error, so a later delete retries.
    pub async fn delete(&self, src: Option<TwinId>, id: ContractId) -> Result<(), EngineError> {
        let _g = self.lock.lock().await;
        let d = self.owned(src, id)?;
        let mut failed = Vec::new();
        let mut ws = d.workloads.clone();
        ws.sort_by_key(|w| std::cmp::Reverse(rank(w)));
        for w in &ws {
            if let Err(e) = self.take_down(id, w).await {
                failed.push((
                    w.name.clone(),
                    result(
                        ResultState::Error,
                        format!("delete failed: {e}"),
                        Output::new(),
                    ),
                ));
            }
        }
        if !failed.is_empty() {
            self.store.set_results(id, &failed)?;
            let names: Vec<_> = failed
                .iter()
                .map(|(n, r)| format!("{n}: {}", r.message))
                .collect();
            return Err(EngineError::Conflict(names.join("; ")));
        }
        self.store.remove(id)?;
        tracing::info!(contract = id, "deployment deleted");
        Ok(())
    }

    fn owned(&self, src: Option<TwinId>, id: ContractId) -> Result<Deployment, EngineError> {
        let d = self.store.deployment(id)?.ok_or_else(|| {
            EngineError::NotFound(format!("contract {id} has no deployment here"))
        })?;
        if let Some(src) = src {
            if src != d.twin_id {
                return Err(EngineError::Forbidden(format!(
                    "contract {id} belongs to twin {}, not to twin {src}",
                    d.twin_id
                )));
            }
        }
        Ok(d)
    }

    fn info(&self, id: ContractId) -> Result<DeploymentInfo, EngineError> {
        let deployment = self.owned(None, id)?;
        Ok(DeploymentInfo {
            results: self.store.results(id)?,
            deployment,
        })
    }

    pub fn get(&self, src: TwinId, id: ContractId) -> Result<DeploymentInfo, EngineError> {
        self.owned(Some(src), id)?;
        self.info(id)
    }

    pub fn changes(&self, src: TwinId, id: ContractId) -> Result<Vec<Change>, EngineError> {
        self.owned(Some(src), id)?;
        Ok(self.store.changes(id)?)
    }

    pub fn list(&self, src: TwinId) -> Result<Vec<DeploymentInfo>, EngineError> {
        self.store
            .deployments()?
            .into_iter()
            .filter(|d| d.twin_id == src)
            .map(|d| self.info(d.contract_id))
            .collect()
    }

    /// Each of `src`'s deployments here with its workloads' results.
    pub fn states(&self, src: TwinId) -> Result<Vec<crate::api::DeploymentState>, EngineError> {
        let mut out = Vec::new();
        for d in self.store.deployments()? {
            if d.twin_id == src {
                out.push(crate::api::DeploymentState {
                    contract_id: d.contract_id,
                    results: self.store.results(d.contract_id)?,
                });
            }
        }
        Ok(out)
    }

    /// Every deployment's contract id (for the watcher that removes cancelled contracts).
    pub fn contracts(&self) -> Result<Vec<ContractId>, EngineError> {
        Ok(self
            .store
            .deployments()?
            .iter()
            .map(|d| d.contract_id)
            .collect())
    }

    /// The twin whose workload on this node has `ip` (a result in state ok saying so).
    pub fn owner_of(&self, ip: std::net::Ipv4Addr) -> Result<Option<TwinId>, EngineError> {
        let ip = ip.to_string();
        for d in self.store.deployments()? {
            let results = self.store.results(d.contract_id)?;
            if results
                .values()
                .any(|r| r.state == ResultState::Ok && r.data.get("ip") == Some(&ip))
            {
                return Ok(Some(d.twin_id));
            }
        }
        Ok(None)
    }

    pub fn statistics(&self) -> Result<Statistics, EngineError> {
        let mut s = Statistics {
            total: self.total,
            reserved: Capacity::default(),
            used: Capacity::default(),
            deployments: 0,
            workloads: 0,
        };
        for d in self.store.deployments()? {
            let results = self.store.results(d.contract_id)?;
            s.deployments += 1;
            for w in &d.workloads {
                s.workloads += 1;
                let c = w.data.capacity();
                s.reserved = s.reserved.checked_add(&c).unwrap_or(s.reserved);
                if results.get(&w.name).map(|r| r.state) == Some(ResultState::Ok) {
                    s.used = s.used.checked_add(&c).unwrap_or(s.used);
                }
            }
        }
        Ok(s)
    }

    pub fn logs(
        &self,
        src: TwinId,
        id: ContractId,
        name: &str,
        tail: Option<u64>,
    ) -> Result<String, EngineError> {
        let d = self.owned(Some(src), id)?;
        let w = d.workloads.iter().find(|w| w.name == name).ok_or_else(|| {
            EngineError::NotFound(format!("contract {id} has no workload {name:?}"))
        })?;
        if !matches!(w.data, WorkloadData::Container(_) | WorkloadData::Vm(_)) {
            return Err(EngineError::Malformed(format!(
                "{name} is a {} workload; only containers and vms have logs",
                w.data.kind()
            )));
        }
        let wid = WorkloadId::new(id, name);
        Ok(match &self.kinds {
            Kinds::Host(k) if matches!(w.data, WorkloadData::Vm(_)) => k.vm.logs(&wid, tail),
            Kinds::Host(k) => k.container.logs(&wid, tail),
            Kinds::Simulated(_) => "(a simulated node runs no process, so it has no logs)\n".into(),
        })
    }

    /// After an agent restart: every persisted workload is adopted or remade, in order.
    pub async fn recover(&self) -> Result<(), EngineError> {
        let _g = self.lock.lock().await;
        for d in self.store.deployments()? {
            let before = self.store.results(d.contract_id)?;
            for w in ordered(&d) {
                // A route is recovered without checking its backends again (see the gateway
                // kind), so only one that was up: a refused one stays refused.
                let refused = matches!(w.data, WorkloadData::GatewayNameProxy(_))
                    && before.get(&w.name).map(|r| r.state) != Some(ResultState::Ok);
                if refused {
                    continue;
                }
                let r = self.apply(&d, w, Op::Recover).await?;
                tracing::info!(
                    contract = d.contract_id,
                    workload = %w.name,
                    state = ?r.state,
                    "recovered"
                );
            }
        }
        Ok(())
    }

    /// Records a state change a kind noticed by itself.
    pub fn report(&self, r: Report) -> Result<(), EngineError> {
        let Some(d) = self.store.deployment(r.id.contract)? else {
            return Ok(());
        };
        if !d.workloads.iter().any(|w| w.name == r.id.name) {
            return Ok(());
        }
        let prev = self.store.results(r.id.contract)?.remove(&r.id.name);
        let data = prev.map(|p| p.data).unwrap_or_default();
        self.store.set_results(
            r.id.contract,
            &[(r.id.name.clone(), result(r.state, r.message, data))],
        )?;
        Ok(())
    }
}

pub type SharedEngine = Arc<Engine>;

#[cfg(test)]
mod tests {
    use super::*;
    use tfgrid_core::deployment::{ContainerSpec, Mount, VmSpec, VolumeSpec};

    fn wl(name: &str, data: WorkloadData) -> Workload {
        Workload {
            version: 0,
            name: name.into(),
            data,
            metadata: String::new(),
            description: String::new(),
        }
    }

    fn vm(mounts: &[&str]) -> VmSpec {
        VmSpec {
            image: Some("r/web:1".into()),
            disk_image: None,
            entrypoint: None,
            cmd: None,
            env: BTreeMap::new(),
            cpu: 1,
            memory: 128 << 20,
            disk_size: 64 << 20,
            kernel_args: vec![],
            ssh_keys: vec![],
            mounts: mounts
                .iter()
                .map(|v| Mount {
                    volume: v.to_string(),
                    path: "/data".into(),
                })
                .collect(),
            network: None,
        }
    }

    fn check(workloads: Vec<Workload>) -> Result<(), String> {
        let d = Deployment {
            version: 0,
            twin_id: 1,
            contract_id: 1,
            metadata: String::new(),
            description: String::new(),
            workloads,
            signature: None,
        };
        validate(&d, None).map_err(|e| e.to_string())
    }

    #[test]
    fn vm_workloads_are_checked() {
        let vol = || wl("data", WorkloadData::Volume(VolumeSpec { size: 1 << 30 }));
        check(vec![vol(), wl("vm", WorkloadData::Vm(vm(&["data"])))]).unwrap();
        // A VM's volume is its disk alone.
        let c = ContainerSpec {
            image: "r/web:1".into(),
            entrypoint: None,
            cmd: None,
            env: BTreeMap::new(),
            cpu: 1,
            memory: 64 << 20,
            rootfs_size: 0,
            mounts: vec![Mount {
                volume: "data".into(),
                path: "/d".into(),
            }],
            network: None,
        };
        let e = check(vec![
            vol(),
            wl("vm", WorkloadData::Vm(vm(&["data"]))),
            wl("c", WorkloadData::Container(c)),
        ])
        .unwrap_err();
        assert!(e.contains("volume data is mounted by vm and c"), "{e}");
        let e = check(vec![
            vol(),
            wl("a", WorkloadData::Vm(vm(&["data"]))),
            wl("b", WorkloadData::Vm(vm(&["data"]))),
        ])
        .unwrap_err();
        assert!(e.contains("is its disk alone"), "{e}");
        let mut both = vm(&[]);
        both.disk_image = Some("r/disk:1".into());
        assert!(check(vec![wl("vm", WorkloadData::Vm(both))])
            .unwrap_err()
            .contains("exactly one"));
        let mut disk = vm(&[]);
        disk.image = None;
        disk.disk_image = Some("r/disk:1".into());
        disk.cmd = Some(vec!["x".into()]);
        assert!(check(vec![wl("vm", WorkloadData::Vm(disk.clone()))])
            .unwrap_err()
            .contains("boots its own system"));
        disk.cmd = None;
        disk.disk_size = 0;
        assert!(check(vec![wl("vm", WorkloadData::Vm(disk))])
            .unwrap_err()
            .contains("disk_size"));
        let mut bad = vm(&[]);
        bad.ssh_keys = vec!["not a key".into()];
        assert!(check(vec![wl("vm", WorkloadData::Vm(bad))])
            .unwrap_err()
            .contains("ssh key"));
        let mut bad = vm(&[]);
        bad.kernel_args = vec!["two words".into()];
        assert!(check(vec![wl("vm", WorkloadData::Vm(bad))])
            .unwrap_err()
            .contains("kernel arg"));
    }
}
