//! Which backends a gateway may serve: only the deploying twin's own workloads, by their grid
//! address. A name proxy with any other backend (the gateway host's loopback, its bridge
//! address, another twin's container, anything outside the grid's workload range) is refused,
//! so a gateway cannot be turned into a way into what its owner never exposed.
//!
//! The node that owns an address (its prefix holds it) is the one that knows which twin's
//! workload has it: this node asks its own engine, or that node over the bus (the bus
//! authenticates the answer as that node's twin, from the registry record).

use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tfgrid_bus::Peer;
use tfgrid_core::network::{Layout, Place};
use tfgrid_core::node_api::{self, Owner, OwnerRequest};
use tfgrid_core::prefix::Ipv4Prefix;
use tfgrid_core::{NodeId, TwinId};
use tfgrid_registry_client::RegistryClient;

use crate::engine::Engine;

const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Set once the engine and the bus exist (they come after the kinds).
#[derive(Clone)]
pub struct Owners {
    inner: Arc<Inner>,
}

struct Inner {
    range: Ipv4Prefix,
    node_prefix_len: u8,
    networks: Option<Layout>,
    own_node: NodeId,
    registry: RegistryClient,
    engine: OnceLock<Weak<Engine>>,
    bus: OnceLock<Peer>,
}

impl Owners {
    pub fn new(
        range: Ipv4Prefix,
        node_prefix_len: u8,
        networks: Option<Layout>,
        own_node: NodeId,
        registry: RegistryClient,
    ) -> Owners {
        Owners {
            inner: Arc::new(Inner {
                range,
                node_prefix_len,
                networks,
                own_node,
                registry,
                engine: OnceLock::new(),
                bus: OnceLock::new(),
            }),
        }
    }

    pub fn bind(&self, engine: &Arc<Engine>, bus: &Peer) {
        let _ = self.inner.engine.set(Arc::downgrade(engine));
        let _ = self.inner.bus.set(bus.clone());
    }

    /// Ok if `backend` is `http://<ip>:<port>` and `ip` is a workload of `twin`.
    pub async fn check(&self, twin: TwinId, backend: &str) -> Result<(), String> {
        let i = &self.inner;
        let ip = parse(backend)?;
        let node = match i.networks.and_then(|l| l.place(ip)) {
            Some(Place::Access { .. }) => {
                return Err(format!(
                    "backend {backend}: the address of a user's machine, not a workload"
                ))
            }
            Some(Place::Node { network, index }) => {
                let n = i
                    .registry
                    .network(network)
                    .await
                    .map_err(|e| format!("backend {backend}: network {network}: {e}"))?;
                if n.twin_id != twin {
                    return Err(format!(
                        "backend {backend} is in another twin's network: a gateway serves only the deploying twin's own workloads"
                    ));
                }
                *n.nodes.get(index).ok_or_else(|| {
                    format!("backend {backend}: no node holds that subnet of network {network}")
                })?
            }
            None => {
                tfgrid_net::grid::node_of(&i.range, i.node_prefix_len, ip).ok_or_else(|| {
                    format!(
                    "backend {backend}: not a workload address (the grid's workloads are in {}{})",
                    i.range,
                    i.networks
                        .map(|l| format!(" and the networks in {}", l.range))
                        .unwrap_or_default()
                )
                })?
            }
        };
        let owner = if node == i.own_node {
            let engine = i
                .engine
                .get()
                .and_then(Weak::upgrade)
                .ok_or("the node is starting")?;
            engine.owner_of(ip).map_err(|e| e.to_string())?
        } else {
            let bus = i.bus.get().ok_or("the node is starting")?;
            let n = i
                .registry
                .node(node)
                .await
                .map_err(|e| format!("backend {backend}: node {node}: {e}"))?;
            let o: Owner = bus
                .call_json(
                    n.node.twin_id,
                    node_api::OWNER,
                    &OwnerRequest { ip },
                    ASK_TIMEOUT,
                )
                .await
                .map_err(|e| format!("backend {backend}: asking node {node}: {e}"))?;
            o.twin_id
        };
        match owner {
            Some(t) if t == twin => Ok(()),
            _ => Err(format!(
                "backend {backend} is not a workload of twin {twin}: a gateway serves only the deploying twin's own workloads"
            )),
        }
    }
}

/// `http://a.b.c.d:port`, with an optional `/` (`tfgrid_core::checks::backend_ip`).
pub(crate) fn parse(backend: &str) -> Result<Ipv4Addr, String> {
    tfgrid_core::checks::backend_ip(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_are_workload_urls() {
        assert_eq!(
            parse("http://10.64.1.2:8080"),
            Ok(Ipv4Addr::new(10, 64, 1, 2))
        );
        assert!(parse("http://10.64.1.2:8080/").is_ok());
        for bad in [
            "https://10.64.1.2:8080",
            "http://10.64.1.2",
            "http://10.64.1.2:0",
            "http://localhost:8080",
            "http://10.64.1.2:8080/admin",
            "http://user@10.64.1.2:8080",
            "10.64.1.2:8080",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
