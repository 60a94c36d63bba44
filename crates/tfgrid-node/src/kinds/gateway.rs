//! Gateway name proxies (gateway nodes only): one HTTP reverse proxy per node serving
//! `name.<domain>` to the workload's backends. Routes change live as workloads come and go; a
//! name is served only for the twin holding its name contract on the registry.

use super::{Ctx, Kind, Output, WorkloadId};
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use tfgrid_core::deployment::{ResultState, WorkloadData};
use tfgrid_core::filter::ContractFilter;
use tfgrid_core::network::{NetworkId, Place};
use tfgrid_registry_client::RegistryClient;

pub(crate) struct Route {
    pub(crate) owner: WorkloadId,
    pub(crate) backends: Vec<String>,
    pub(crate) next: AtomicUsize,
}

#[derive(Clone)]
pub struct Routes {
    pub(crate) domain: String,
    pub(crate) map: Arc<RwLock<HashMap<String, Arc<Route>>>>,
    pub(crate) health: super::health::Health,
    pub(crate) networks: Option<crate::networks::Networks>,
}

impl Routes {
    /// Where this node dials `backend` from (its address in the backend's network), if not the
    /// default.
    pub(crate) fn source_for(&self, backend: &str) -> Option<std::net::Ipv4Addr> {
        let ip = super::backends::parse(backend).ok()?;
        self.networks.as_ref()?.source_for(ip)
    }

    /// The contract whose workload serves `name`, and how its backends do.
    pub fn backends(&self, name: &str) -> Option<(u64, Vec<tfgrid_core::node_api::BackendHealth>)> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        let r = m.get(name)?;
        Some((r.owner.contract, self.health.report(&r.backends)))
    }

    /// A proxy's routes set by hand, not by workloads (for benchmarks): `name -> backends`.
    pub fn fixed(domain: &str, routes: &[(&str, Vec<String>)]) -> Routes {
        let map = routes
            .iter()
            .map(|(name, backends)| {
                (
                    name.to_string(),
                    Arc::new(Route {
                        owner: WorkloadId::new(0, name),
                        backends: backends.clone(),
                        next: AtomicUsize::new(0),
                    }),
                )
            })
            .collect();
        Routes {
            domain: domain.to_string(),
            map: Arc::new(RwLock::new(map)),
            health: Default::default(),
            networks: None,
        }
    }
}

pub struct Gateway {
    routes: Routes,
    /// The networks each route's backends are in (its node joined them for it).
    joined: std::sync::Mutex<HashMap<WorkloadId, std::collections::BTreeSet<NetworkId>>>,
    owners: super::backends::Owners,
    registry: RegistryClient,
    /// The address people reach the proxy at, for the URL in results (`http://name.domain:port`).
    public_port: Option<u16>,
}

impl Gateway {
    /// `owners` decides which backends a twin may use.
    pub fn new(
        domain: Option<String>,
        registry: RegistryClient,
        public_port: Option<u16>,
        owners: super::backends::Owners,
        networks: Option<crate::networks::Networks>,
    ) -> Self {
        Self {
            owners,
            joined: Default::default(),
            routes: Routes {
                domain: domain.unwrap_or_default(),
                map: Default::default(),
                health: Default::default(),
                networks,
            },
            registry,
            public_port,
        }
    }

    pub fn routes(&self) -> Routes {
        self.routes.clone()
    }

    async fn holds_name(&self, twin: u32, name: &str) -> Result<(), String> {
        let f = ContractFilter {
            twin_id: Some(twin),
            kind: Some("name".into()),
            name: Some(name.into()),
            state: Some("live".into()),
            ..Default::default()
        };
        let cs = self
            .registry
            .contracts(&f)
            .await
            .map_err(|e| format!("checking the name contract: {e}"))?;
        if cs.iter().any(|c| c.is_live() && c.name() == Some(name)) {
            Ok(())
        } else {
            Err(format!(
                "twin {twin} holds no name contract for {name:?}; create one first"
            ))
        }
    }

    /// `check`: whether the backends are checked (not on recovery: they were when the route was
    /// made, and at an agent's start neither its bus nor the backends' nodes may be up yet).
    async fn make(&self, ctx: &Ctx<'_>, check: bool) -> Result<Output, String> {
        let WorkloadData::GatewayNameProxy(g) = &ctx.workload.data else {
            return Err("not a gateway workload".into());
        };
        if self.routes.domain.is_empty() {
            return Err("this node is not a gateway (it has no domain)".into());
        }
        self.holds_name(ctx.deployment.twin_id, &g.name).await?;
        if check {
            for b in &g.backends {
                self.owners.check(ctx.deployment.twin_id, b).await?;
            }
        }
        self.join_networks(ctx, &g.backends).await?;
        {
            let mut map = self.routes.map.write().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = map.get(&g.name) {
                if r.owner != ctx.id {
                    return Err(format!(
                        "{} is already served for workload {}",
                        g.name,
                        r.owner.key()
                    ));
                }
            }
            map.insert(
                g.name.clone(),
                Arc::new(Route {
                    owner: ctx.id.clone(),
                    backends: g.backends.clone(),
                    next: AtomicUsize::new(0),
                }),
            );
        }
        let fqdn = format!("{}.{}", g.name, self.routes.domain);
        let url = match self.public_port {
            Some(80) | None => format!("http://{fqdn}/"),
            Some(p) => format!("http://{fqdn}:{p}/"),
        };
        Ok([("fqdn".to_string(), fqdn), ("url".to_string(), url)].into())
    }
}

impl Gateway {
    /// The node joins the networks of the route's backends (and leaves those it no longer
    /// needs), so it dials them from inside.
    async fn join_networks(&self, ctx: &Ctx<'_>, backends: &[String]) -> Result<(), String> {
        let Some(n) = &self.routes.networks else {
            return Ok(());
        };
        let l = n.layout();
        let want: std::collections::BTreeSet<NetworkId> = backends
            .iter()
            .filter_map(|b| super::backends::parse(b).ok())
            .filter_map(|ip| match l.place(ip)? {
                Place::Node { network, .. } | Place::Access { network, .. } => Some(network),
            })
            .collect();
        let key = ctx.id.key();
        for id in &want {
            n.join(ctx.deployment.twin_id, *id, &key).await?;
        }
        let had = self
            .joined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ctx.id.clone(), want.clone())
            .unwrap_or_default();
        for id in had.difference(&want) {
            n.leave(*id, &key).await;
        }
        Ok(())
    }
}

impl Kind for Gateway {
    async fn provision(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx, true).await
    }

    async fn deprovision(&self, id: &WorkloadId) -> Result<(), String> {
        self.routes
            .map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, r| r.owner != *id);
        let had = self
            .joined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .unwrap_or_default();
        if let Some(n) = &self.routes.networks {
            for net in had {
                n.leave(net, &id.key()).await;
            }
        }
        Ok(())
    }

    async fn inspect(&self, id: &WorkloadId) -> (ResultState, String) {
        let map = self.routes.map.read().unwrap_or_else(|p| p.into_inner());
        if map.values().any(|r| r.owner == *id) {
            (ResultState::Ok, String::new())
        } else {
            (ResultState::Error, "no route".into())
        }
    }

    /// New backends replace the route at once; requests in flight finish on the old one.
    async fn update(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx, true).await
    }

    async fn recover(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx, false).await
    }
}
