//! The user's private networks. A deployment's services live in one (by default its own, named
//! after it): the bot makes the network in the registry when first used, gives it a subnet on each
//! node a replica or a gateway route of it lands on before that node is asked anything, keeps its
//! service names (every replica's address) in the registry for the nodes to serve, and lets the
//! user's own machines join it with standard WireGuard.
//!
//! Networks are kept when a deployment is removed: they hold no capacity, and a machine that
//! joined keeps its address and its config.

use crate::bot::{Bot, BotError};
use crate::spec::Spec;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use tfgrid_core::network::{Layout, Network, NetworkHost, NetworkId, Place};
use tfgrid_core::records::{NodeStatus, X25519Key};
use tfgrid_core::tx::{Call, Outcome};
use tfgrid_core::NodeId;

/// What a machine needs to join a network (`tfgrid network access` turns it into a wg-quick
/// file with the machine's own private key, which never reaches the bot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Access {
    pub network: String,
    pub network_id: NetworkId,
    /// The machine's address and the network's whole range (its AllowedIPs).
    pub address: Ipv4Addr,
    pub range: String,
    /// The node the machine peers with.
    pub node_id: NodeId,
    pub node_key: X25519Key,
    pub endpoint: SocketAddr,
    /// Each service with its replicas' addresses.
    pub hosts: Vec<NetworkHost>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessRequest {
    /// The machine's WireGuard public key (base64, as `wg pubkey` prints it, or hex).
    pub public_key: String,
    /// The node to peer with; by default the lowest-id gateway node that is up (gateways are
    /// public), else the network's first node that is up.
    #[serde(default)]
    pub node: Option<NodeId>,
}

impl Bot {
    pub(crate) async fn layout(&self) -> Result<Layout, String> {
        if let Some(l) = self.layout.get() {
            return Ok(*l);
        }
        let c = self.registry.config().await.map_err(|e| e.to_string())?;
        let l = Layout::of(&c);
        let _ = self.layout.set(l);
        Ok(l)
    }

    /// The twin's network of that name, made if it does not exist.
    pub(crate) async fn ensure_network(&self, name: &str) -> Result<Network, String> {
        if let Some(n) = self.nets.lock().unwrap().get(name) {
            return Ok(n.clone());
        }
        let found = self
            .registry
            .network_by_name(self.twin, name)
            .await
            .map_err(|e| e.to_string())?;
        let n = match found {
            Some(n) => n,
            None => {
                let r = self
                    .signer
                    .submit(Call::CreateNetwork { name: name.into() })
                    .await;
                let id = match r {
                    Ok(rc) => match rc.outcome {
                        Outcome::NetworkCreated { network_id } => network_id,
                        o => return Err(format!("network {name}: unexpected outcome {o:?}")),
                    },
                    // Made meanwhile by another of this twin's operations.
                    Err(e) if e.code() == Some("conflict") => {
                        self.registry
                            .network_by_name(self.twin, name)
                            .await
                            .map_err(|e| e.to_string())?
                            .ok_or_else(|| format!("network {name}: {e}"))?
                            .id
                    }
                    Err(e) => return Err(format!("network {name}: {e}")),
                };
                self.registry.network(id).await.map_err(|e| e.to_string())?
            }
        };
        self.nets
            .lock()
            .unwrap()
            .insert(name.to_string(), n.clone());
        Ok(n)
    }

    async fn refresh_network(&self, id: NetworkId) -> Result<Network, String> {
        let n = self.registry.network(id).await.map_err(|e| e.to_string())?;
        self.nets.lock().unwrap().insert(n.name.clone(), n.clone());
        Ok(n)
    }

    /// Gives network `id` a subnet on `node` (nothing to do when it has one).
    pub(crate) async fn join_network(&self, id: NetworkId, node: NodeId) -> Result<(), String> {
        let known = self
            .nets
            .lock()
            .unwrap()
            .values()
            .any(|n| n.id == id && n.nodes.contains(&node));
        if known {
            return Ok(());
        }
        self.signer
            .submit(Call::AddNetworkNode {
                network_id: id,
                node_id: node,
            })
            .await
            .map_err(|e| format!("network {id} on node {node}: {e}"))?;
        self.refresh_network(id).await?;
        Ok(())
    }

    /// A gateway reaches its backends from the network they are in: its node joins each one.
    pub(crate) async fn join_for_backends(
        &self,
        node: NodeId,
        backends: &[String],
    ) -> Result<(), String> {
        let l = self.layout().await?;
        let nets: BTreeSet<NetworkId> = backends
            .iter()
            .filter_map(|b| tfgrid_core::checks::backend_ip(b).ok())
            .filter_map(|ip| match l.place(ip)? {
                Place::Node { network, .. } | Place::Access { network, .. } => Some(network),
            })
            .collect();
        for id in nets {
            self.join_network(id, node).await?;
        }
        Ok(())
    }

    /// The network a spec's services live in.
    pub(crate) async fn network_of(&self, spec: &Spec) -> Result<Network, String> {
        self.ensure_network(spec.network_name()).await
    }

    /// Points every network's service names at its replicas as they are now (after a deploy,
    /// a heal, a removal): one registry write per network whose names changed.
    pub(crate) async fn sync_hosts(&self) {
        let Ok(records) = self.store.all() else {
            return;
        };
        let mut want: BTreeMap<String, BTreeMap<String, Vec<Ipv4Addr>>> = BTreeMap::new();
        for r in &records {
            let Ok(spec) = Spec::parse(&r.yaml) else {
                continue;
            };
            if !spec.needs_network() {
                continue;
            }
            let hosts = want.entry(spec.network_name().to_string()).or_default();
            if r.state == crate::store::State::Removing {
                continue;
            }
            for rep in &r.replicas {
                if let Ok(ip) = rep.ip.parse::<Ipv4Addr>() {
                    hosts.entry(rep.service.clone()).or_default().push(ip);
                }
            }
        }
        for (name, hosts) in want {
            let Ok(net) = self.ensure_network(&name).await else {
                continue;
            };
            let mut hosts: Vec<NetworkHost> = hosts
                .into_iter()
                .filter(|(_, a)| !a.is_empty())
                .map(|(name, mut addrs)| {
                    addrs.sort();
                    addrs.dedup();
                    addrs.truncate(tfgrid_core::network::MAX_HOST_ADDRS);
                    NetworkHost { name, addrs }
                })
                .filter(|h| net.range.contains(h.addrs[0]))
                .collect();
            hosts.truncate(tfgrid_core::network::MAX_HOSTS);
            if hosts == net.hosts {
                continue;
            }
            let r = self
                .signer
                .submit(Call::SetNetworkHosts {
                    network_id: net.id,
                    hosts,
                })
                .await;
            match r {
                Ok(_) => {
                    let _ = self.refresh_network(net.id).await;
                }
                Err(e) => tracing::warn!(network = %name, "service names: {e}"),
            }
        }
    }

    pub async fn networks(&self) -> Result<Vec<Network>, BotError> {
        let mut out = Vec::new();
        let mut page = 1;
        loop {
            let batch: Vec<Network> = self
                .registry
                .networks_of(self.twin, page)
                .await
                .map_err(BotError::from)?;
            let n = batch.len();
            out.extend(batch);
            if n < 1000 {
                return Ok(out);
            }
            page += 1;
        }
    }

    /// Joins one of the user's machines (by its WireGuard public key) to a network.
    pub async fn network_access(
        &self,
        name: &str,
        req: &AccessRequest,
    ) -> Result<Access, BotError> {
        let key = parse_wg_key(&req.public_key).map_err(BotError::Invalid)?;
        let net = self
            .registry
            .network_by_name(self.twin, name)
            .await
            .map_err(BotError::from)?
            .ok_or_else(|| BotError::NotFound(format!("network {name}")))?;
        let node = match req.node {
            Some(n) => self.registry.node(n).await.map_err(BotError::from)?,
            None => {
                let nodes = self.all_nodes().await?;
                let up = |n: &&tfgrid_core::records::NodeView| {
                    n.status == NodeStatus::Up && n.node.overlay.is_some()
                };
                nodes
                    .iter()
                    .filter(up)
                    .filter(|n| n.node.public_config.domain.is_some())
                    .min_by_key(|n| n.node.id)
                    .or_else(|| {
                        net.nodes
                            .iter()
                            .find_map(|id| nodes.iter().filter(up).find(|n| n.node.id == *id))
                    })
                    .cloned()
                    .ok_or_else(|| {
                        BotError::Failed(format!(
                            "no node to join network {name} through: no gateway node is up and the network is on no node that is up"
                        ))
                    })?
            }
        };
        let overlay = node.node.overlay.clone().ok_or_else(|| {
            BotError::Invalid(format!("node {} is not on the overlay", node.node.id))
        })?;
        let endpoint = *overlay.endpoints.first().ok_or_else(|| {
            BotError::Invalid(format!("node {} publishes no endpoint", node.node.id))
        })?;
        self.signer
            .submit(Call::AddNetworkAccess {
                network_id: net.id,
                wg_key: key,
                node_id: node.node.id,
            })
            .await
            .map_err(BotError::from)?;
        let net = self
            .refresh_network(net.id)
            .await
            .map_err(BotError::Failed)?;
        let l = self.layout().await.map_err(BotError::Failed)?;
        let index = net
            .access
            .iter()
            .position(|a| a.wg_key == key)
            .ok_or_else(|| BotError::Failed("the registry did not keep the key".into()))?;
        let address = l
            .access_addr(net.id, index)
            .ok_or_else(|| BotError::Failed("no address for the machine".into()))?;
        Ok(Access {
            network: net.name.clone(),
            network_id: net.id,
            address,
            range: net.range.to_string(),
            node_id: node.node.id,
            node_key: overlay.wg_key,
            endpoint,
            hosts: net.hosts.clone(),
        })
    }
}

/// A WireGuard public key as `wg pubkey` prints it (base64) or as hex.
pub fn parse_wg_key(s: &str) -> Result<X25519Key, String> {
    let s = s.trim();
    if let Ok(b) = hex::decode(s) {
        if let Ok(a) = <[u8; 32]>::try_from(b.as_slice()) {
            return Ok(X25519Key(a));
        }
    }
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| {
            format!("public key {s:?}: expected 32 bytes in base64 (as `wg pubkey` prints) or hex")
        })?;
    <[u8; 32]>::try_from(b.as_slice())
        .map(X25519Key)
        .map_err(|_| format!("public key {s:?}: {} bytes, expected 32", b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let k = parse_wg_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        assert_eq!(k.0[31], 31);
        assert_eq!(parse_wg_key(&hex::encode([7u8; 32])).unwrap().0, [7u8; 32]);
        assert!(parse_wg_key("AAEC").is_err());
        assert!(parse_wg_key("not a key!").is_err());
    }
}
