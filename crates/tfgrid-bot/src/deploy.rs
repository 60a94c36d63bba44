//! The deploy flow: place every replica, then per replica a contract (written into the journal the
//! moment it exists) and the signed deployment over the bus, then the gateway names. A failure
//! cancels everything the journal holds; success commits the record and cancels, in the same
//! store transaction's queue, what an update replaced.

use crate::bot::{wname, Bot, BotError, Journal, DEPLOY_TIMEOUT};
use crate::scheduler::{Candidate, Scheduler, Want};
use crate::spec::{Service, Spec};
use crate::store::{Record, Replica, State, WorkloadView};
use std::collections::HashSet;
use std::time::Instant;
use tfgrid_core::deployment::{
    ContainerSpec, Deployment, Mount, ResultState, VmSpec, VolumeSpec, Workload, WorkloadData,
    ZdbSpec,
};
use tfgrid_core::faults::crash_point;
use tfgrid_core::filter::NodeFilter;
use tfgrid_core::network::NetworkId;
use tfgrid_core::node_api::{self, DeploymentInfo};
use tfgrid_core::records::{NodeStatus, NodeView};
use tfgrid_core::tx::Call;
use tfgrid_core::{now_millis, ContractId, NodeId, TwinId};

/// Specs up to this size are carried in each replica's deployment.
pub(crate) const ADOPTABLE_YAML: usize = 8 << 10;

/// What a deploy left to the cancel queue because the registry did not confirm the cancels.
fn left_over(queued: usize) -> String {
    if queued == 0 {
        "nothing left behind".into()
    } else {
        format!("{queued} contracts are not cancelled yet (the registry did not answer); the bot retries until they are")
    }
}

/// Where each replica goes (service, index, node), and the capacity held on each of those nodes
/// until its contract exists.
struct Plan<'a> {
    plan: Vec<(String, u32, NodeId)>,
    holds: Vec<crate::placement::Hold<'a>>,
}

impl Bot {
    /// Places every service of `spec`. Candidates are first the nodes that are up and have at
    /// least the smallest replica's capacity free (the registry filters, so a grid of 100,000
    /// nodes is not fetched for every deploy); only when that fails is every node fetched, so
    /// the "no node fits" message counts every node's reason.
    async fn place_spec(&self, spec: &Spec) -> Result<(Scheduler, Plan<'_>), BotError> {
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
        // Placed replicas are held at once (no await in between): deploys running beside this
        // one place around them.
        let attempt = |nodes: &[NodeView], read_at: Instant, exclude: &HashSet<NodeId>| {
            let mut sched = Scheduler::new(self.placements.candidates(nodes, read_at));
            let mut plan = Vec::new();
            for (sname, want, replicas) in &wants {
                let placed =
                    sched.place(&format!("service {sname}"), want, *replicas, &[], exclude)?;
                for (i, id) in placed.into_iter().enumerate() {
                    plan.push((sname.clone(), i as u32, id));
                }
            }
            let holds = plan
                .iter()
                .map(|(s, _, id)| {
                    let w = &wants.iter().find(|(n, _, _)| n == s).expect("a service").1;
                    self.placements.hold(*id, w.capacity)
                })
                .collect();
            Ok::<_, crate::scheduler::NoFit>((sched, Plan { plan, holds }))
        };
        // The ledger may still call a dead node up: the chosen nodes are pinged, and a plan
        // with one that does not answer is made again without it.
        let mut exclude = self.gone_nodes();
        let mut read_at = Instant::now();
        let mut nodes = self.nodes_where(prefilter).await?;
        let mut all = false;
        for _ in 0..3 {
            let (sched, plan) = match attempt(&nodes, read_at, &exclude) {
                Ok(v) => v,
                Err(_) if !all => {
                    all = true;
                    read_at = Instant::now();
                    nodes = self.all_nodes().await?;
                    attempt(&nodes, read_at, &exclude).map_err(|e| BotError::NoFit(e.message))?
                }
                Err(e) => return Err(BotError::NoFit(e.message)),
            };
            let chosen: Vec<(NodeId, TwinId)> = nodes
                .iter()
                .filter(|n| plan.plan.iter().any(|(_, _, id)| *id == n.node.id))
                .map(|n| (n.node.id, n.node.twin_id))
                .collect();
            let dead = self.not_answering(&chosen).await;
            if dead.is_empty() {
                return Ok((sched, plan));
            }
            for h in plan.holds {
                h.discard();
            }
            exclude.extend(dead);
        }
        Err(BotError::NoFit(
            "the nodes chosen do not answer (three plans in a row)".into(),
        ))
    }

    pub(crate) fn want(svc: &Service) -> Result<Want, BotError> {
        Ok(Want {
            capacity: Self::replica_deployment(0, "x", svc, None)
                .capacity()
                .map_err(|e| BotError::Failed(e.to_string()))?,
            country: svc.placement.country.clone(),
            farms: svc.placement.farms.clone(),
            gpu: svc.placement.gpu,
            distinct: svc.placement.distinct_nodes,
        })
    }

    /// One replica of a service as a node deployment: its volumes, zdbs and the container.
    fn replica_deployment(
        twin: TwinId,
        service: &str,
        svc: &Service,
        network: Option<NetworkId>,
    ) -> Deployment {
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
        // A service without an image is its namespaces only.
        if svc.kind == crate::spec::ServiceKind::Vm {
            workloads.push(wl(
                wname(service),
                WorkloadData::Vm(VmSpec {
                    image: (!svc.image.is_empty()).then(|| svc.image.clone()),
                    disk_image: svc.disk_image.clone(),
                    entrypoint: svc.entrypoint.clone(),
                    cmd: svc.command.clone(),
                    env: svc.env.clone(),
                    cpu: svc.cpu,
                    memory: svc.memory.0,
                    disk_size: svc.disk.0,
                    kernel_args: svc.kernel_args.clone(),
                    ssh_keys: svc.ssh_keys.clone(),
                    mounts,
                    network,
                }),
            ));
        } else if !svc.image.is_empty() {
            workloads.push(wl(
                wname(service),
                WorkloadData::Container(ContainerSpec {
                    image: svc.image.clone(),
                    entrypoint: svc.entrypoint.clone(),
                    cmd: svc.command.clone(),
                    env: svc.env.clone(),
                    cpu: svc.cpu,
                    memory: svc.memory.0,
                    rootfs_size: svc.disk.0,
                    mounts,
                    network,
                }),
            ));
        }
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

    /// Contract (journaled), then the signed deployment over the bus. Anything short of every
    /// workload ok takes the contract (and whatever the node made) back before returning.
    pub(crate) async fn deploy_replica(
        &self,
        journal: &Journal<'_>,
        (owner, yaml): (&str, &str),
        (service, index): (&str, u32),
        svc: &Service,
        (node, hold): (&Candidate, crate::placement::Hold<'_>),
        network: Option<NetworkId>,
    ) -> Result<Replica, String> {
        // The node's subnet in the network exists before the node is asked to use it (a
        // replica of namespaces only is in no network).
        let network = network.filter(|_| svc.runs());
        if let Some(id) = network {
            self.join_network(id, node.id).await?;
        }
        let mut d = Self::replica_deployment(self.twin, service, svc, network);
        if service == crate::spec::STORAGE_SERVICE {
            // Storage namespaces get a password from the user's key: a bot started afresh with
            // the key opens them again, and nothing stores it.
            let password = self.storage_key().zdb_password(owner);
            for w in &mut d.workloads {
                if let WorkloadData::Zdb(z) = &mut w.data {
                    if z.password.is_empty() {
                        z.password = password.clone();
                    }
                }
            }
        }
        // The registry holds one contract per deployment hash and node; the metadata (which the
        // hash covers) makes each replica, and each version of it, its own deployment.
        d.metadata = format!("{owner}/{service}/{index}@{}", now_millis());
        // The spec rides along (when small), so a bot started afresh with the same key can
        // adopt the deployment from its nodes (see `adopt`).
        if yaml.len() <= ADOPTABLE_YAML {
            d.description = yaml.to_string();
        }
        let contract_id = self
            .create_contract(
                journal,
                Call::CreateNodeContract {
                    node_id: node.id,
                    deployment_hash: d.hash(),
                    capacity: d.capacity().map_err(|e| e.to_string())?,
                },
                node.twin,
            )
            .await
            .map_err(|e| format!("contract on node {}: {e}", node.id));
        // The registry counts the contract from now on (or there is none): the hold is done.
        drop(hold);
        let contract_id = contract_id?;
        d.contract_id = contract_id;
        d.sign(&self.identity);
        let answer: Result<DeploymentInfo, _> = self
            .call_node(node.twin, node_api::DEPLOY, &d, DEPLOY_TIMEOUT)
            .await;
        crash_point("bot-after-node-deploy");
        let failed = match answer {
            Err(e) => format!("node {}: {e}", node.id),
            Ok(info) => {
                let bad: Vec<String> = info
                    .results
                    .iter()
                    .filter(|(_, r)| r.state != ResultState::Ok)
                    .map(|(n, r)| format!("{n}: {}", r.message))
                    .collect();
                if bad.is_empty() {
                    return Ok(Self::replica_of(
                        service,
                        index,
                        (node.id, node.twin),
                        contract_id,
                        &d,
                        &info,
                    ));
                }
                format!("node {}: {}", node.id, bad.join("; "))
            }
        };
        self.take_back(journal, contract_id, node.twin).await;
        Err(failed)
    }

    pub(crate) fn replica_of(
        service: &str,
        index: u32,
        (node_id, node_twin): (NodeId, TwinId),
        contract_id: ContractId,
        d: &Deployment,
        info: &DeploymentInfo,
    ) -> Replica {
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
        Replica {
            service: service.to_string(),
            index,
            node_id,
            node_twin,
            contract_id,
            ip,
            state: "ok".into(),
            message: String::new(),
            workloads,
        }
    }

    /// Deploys a spec; for a name that exists with a different spec, deploys the new one beside
    /// it, moves its gateway names over, then removes the old replicas (no downtime for exposed
    /// services). The same spec again changes nothing. Deployments of different names run side
    /// by side; the same name waits for the operation before it.
    pub async fn deploy(&self, yaml: &str) -> Result<Record, BotError> {
        let spec = Spec::parse_blocking(yaml.to_string()).await?;
        let lock = self.lock_of(&spec.name);
        let _g = lock.lock().await;
        let _op = self.operation();
        let old = self.store.get(&spec.name)?;
        if let Some(old) = &old {
            if old.state == State::Removing {
                return Err(BotError::Conflict(format!(
                    "{} is being removed (its cancels wait for the registry); deploy it again once `tfgrid ps` no longer lists it",
                    spec.name
                )));
            }
            if old.yaml == yaml {
                self.event(&spec.name, "unchanged", "the same spec is deployed".into());
                return Ok(old.clone());
            }
            // An update deploys changed services anew and removes the old replicas: for a
            // storage pool that would be new, empty namespaces and the data gone.
            let before = Spec::parse(&old.yaml).ok().and_then(|s| s.storage);
            if before.is_some() && before != spec.storage {
                return Err(BotError::Conflict(format!(
                    "{}: a storage pool's shards, size and placement cannot change (that would move every namespace); make another pool and copy the objects over",
                    spec.name
                )));
            }
        }
        let t0 = Instant::now();
        // A spec of namespaces only (a storage pool) needs no private network.
        let net = match spec.needs_network() {
            true => Some(self.network_of(&spec).await.map_err(BotError::Registry)?.id),
            false => None,
        };
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
        let (sched, Plan { plan, holds }) = if todo.services.is_empty() {
            (
                Scheduler::new([]),
                Plan {
                    plan: Vec::new(),
                    holds: Vec::new(),
                },
            )
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
            made: Vec::new(),
        };
        // The journal: a new deployment's own record (Deploying), or the deployed version's.
        if old.is_none() {
            self.store.put(&rec)?;
        }
        let journal = self.journal(&spec.name);
        let placed: Vec<String> = plan
            .iter()
            .map(|(s, i, n)| format!("{s}/{i} on node {n}"))
            .collect();
        if !placed.is_empty() {
            self.event(&spec.name, "placed", placed.join(", "));
        }
        let owner = spec.name.as_str();
        let jobs = plan.iter().zip(holds).map(|((s, i, id), hold)| {
            let node = sched.node(*id).cloned().expect("placed on a known node");
            let svc = &spec.services[s];
            let journal = &journal;
            async move {
                (
                    s,
                    *i,
                    self.deploy_replica(journal, (owner, yaml), (s, *i), svc, (&node, hold), net)
                        .await,
                )
            }
        });
        let results = futures::future::join_all(jobs).await;
        let mut errors = Vec::new();
        for (s, i, r) in results {
            match r {
                Ok(rep) => {
                    self.event(
                        &spec.name,
                        "running",
                        format!(
                            "{s}/{i} running on node {}{}",
                            rep.node_id,
                            crate::bot::at_ip(&rep.ip)
                        ),
                    );
                    rec.replicas.push(rep);
                }
                Err(e) => errors.push(format!("{s}/{i}: {e}")),
            }
        }
        crash_point("bot-after-replicas");
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
                match self.make_route(&journal, sname, &ex.name, backends).await {
                    Ok(route) => {
                        self.event(&spec.name, "exposed", format!("{sname} at {}", route.url));
                        rec.routes.push(route);
                    }
                    Err(e) => errors.push(format!("{sname}: gateway: {e}")),
                }
            }
        }
        if !errors.is_empty() {
            // Undo: everything this deploy made is in the journal, and only that.
            let made = self
                .store
                .get(&spec.name)?
                .map(|r| r.made)
                .unwrap_or_default();
            let jobs: Vec<(ContractId, TwinId)> =
                made.iter().map(|m| (m.contract_id, m.node_twin)).collect();
            let queued = self.cancel_all(&jobs).await;
            let msg = match &old {
                None => {
                    self.store.remove(&rec.name)?;
                    format!(
                        "deploy failed, {}: {}",
                        left_over(queued),
                        errors.join("; ")
                    )
                }
                Some(_) => {
                    let ids: Vec<ContractId> = jobs.iter().map(|j| j.0).collect();
                    journal.forget(&ids)?;
                    format!(
                        "update failed, the deployed version is unchanged ({}): {}",
                        left_over(queued),
                        errors.join("; ")
                    )
                }
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
        // What the new version does not keep goes: the replicas of changed or dropped services,
        // and the routes whose names it no longer exposes (with their names). Queued in the same
        // transaction that stores the new version, so no crash leaves them held by nothing.
        let gone: Vec<(ContractId, TwinId)> = old
            .iter()
            .flat_map(|o| {
                let reps = o
                    .replicas
                    .iter()
                    .filter(|r| !kept.contains(&r.service))
                    .map(|r| (r.contract_id, r.node_twin));
                let routes = o
                    .routes
                    .iter()
                    .filter(|r| !rec.routes.iter().any(|n| n.contract_id == r.contract_id))
                    .flat_map(|r| [(r.contract_id, r.node_twin), (r.name_contract, 0)]);
                reps.chain(routes).collect::<Vec<_>>()
            })
            .collect();
        self.store.put_with_cancels(&rec, &gone)?;
        crash_point("bot-after-commit");
        self.sync_hosts().await;
        self.cancel_all(&gone).await;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every container's writable layer is bounded (256M unless the spec says `disk`) and
    /// reserved on its contract as SSD, with its volumes.
    #[test]
    fn the_writable_layer_is_bounded_and_reserved() {
        let spec = Spec::parse(
            "name: a\nservices:\n  s:\n    image: x\n    volumes: [{name: v, size: 1G, path: /v}]\n  t:\n    image: x\n    disk: 2G\n",
        )
        .unwrap();
        let d = Bot::replica_deployment(1, "s", &spec.services["s"], None);
        let rootfs = d.workloads.iter().find_map(|w| match &w.data {
            WorkloadData::Container(c) => Some(c.rootfs_size),
            _ => None,
        });
        assert_eq!(rootfs, Some(256 << 20));
        assert_eq!(d.capacity().unwrap().sru, (256 << 20) + (1 << 30));
        let t = Bot::want(&spec.services["t"]).unwrap();
        assert_eq!(t.capacity.sru, 2 << 30);
    }

    /// A vm service is one vm workload: its disk reserved as SSD, its volumes as virtio disks.
    #[test]
    fn a_vm_service_is_a_vm_workload() {
        let spec = Spec::parse(
            "name: a\nservices:\n  s:\n    kind: vm\n    image: x\n    memory: 512M\n    disk: 2G\n    volumes: [{name: v, size: 1G, path: /v}]\n",
        )
        .unwrap();
        let d = Bot::replica_deployment(1, "s", &spec.services["s"], Some(7));
        let vm = d
            .workloads
            .iter()
            .find_map(|w| match &w.data {
                WorkloadData::Vm(v) => Some(v.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(vm.image.as_deref(), Some("x"));
        assert_eq!(vm.disk_image, None);
        assert_eq!(vm.mounts[0].volume, "s_v");
        assert_eq!(vm.network, Some(7));
        let c = d.capacity().unwrap();
        assert_eq!((c.mru, c.sru), (512 << 20, (2 << 30) + (1 << 30)));
        assert!(!d
            .workloads
            .iter()
            .any(|w| matches!(w.data, WorkloadData::Container(_))));
    }
}
