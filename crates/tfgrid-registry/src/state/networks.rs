//! Private networks: the user's named networks, the nodes each one has a subnet on, the user's
//! own machines that join it and its service names. Every address is computed from positions
//! (see `tfgrid_core::network`), so applying a call only appends to lists and checks limits.

use super::{malformed, Changes, State};
use crate::error::TxError;
use tfgrid_core::network::{
    self, Layout, Network, NetworkHost, NetworkId, MAX_HOSTS, MAX_HOST_ADDRS,
};
use tfgrid_core::records::X25519Key;
use tfgrid_core::tx::Outcome;
use tfgrid_core::{Millis, NodeId, TwinId};

impl State {
    pub(super) fn create_network(
        &mut self,
        twin: TwinId,
        name: &str,
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        network::check_name(name).map_err(malformed)?;
        if let Some(id) = self.network_by_name.get(&(twin, name.to_string())) {
            return Err(TxError::Conflict(format!(
                "twin {twin} already has a network {name:?} (network {id})"
            )));
        }
        let l = Layout::of(&self.config);
        let id = super::next_id(&self.networks) as NetworkId;
        let range = l.network_range(id).ok_or_else(|| {
            TxError::Conflict(format!(
                "the grid's network range {} is used up ({} networks)",
                l.range,
                l.networks()
            ))
        })?;
        self.networks.insert(
            id,
            Network {
                id,
                twin_id: twin,
                name: name.to_string(),
                range,
                nodes: vec![],
                access: vec![],
                hosts: vec![],
                created_at: now,
                updated_at: now,
            },
        );
        self.network_by_name.insert((twin, name.to_string()), id);
        ch.networks.insert(id);
        Ok(Outcome::NetworkCreated { network_id: id })
    }

    fn owned_network(&self, twin: TwinId, id: NetworkId) -> Result<&Network, TxError> {
        let n = self
            .networks
            .get(&id)
            .ok_or_else(|| TxError::NotFound(format!("network {id}")))?;
        if n.twin_id != twin {
            return Err(TxError::Forbidden(format!(
                "network {id} belongs to twin {}, not {twin}",
                n.twin_id
            )));
        }
        Ok(n)
    }

    /// The node must be on the overlay: other members reach the subnet only through it.
    fn overlay_node(&self, node_id: NodeId) -> Result<(), TxError> {
        let node = self
            .nodes
            .get(&node_id)
            .ok_or_else(|| TxError::NotFound(format!("node {node_id}")))?;
        if node.overlay.is_none() {
            return Err(TxError::Conflict(format!(
                "node {node_id} is not on the grid overlay, so it cannot be in a network"
            )));
        }
        Ok(())
    }

    pub(super) fn add_network_node(
        &mut self,
        twin: TwinId,
        id: NetworkId,
        node_id: NodeId,
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        let n = self.owned_network(twin, id)?;
        if n.nodes.contains(&node_id) {
            return Ok(Outcome::NetworkUpdated { network_id: id });
        }
        self.overlay_node(node_id)?;
        let l = Layout::of(&self.config);
        if l.node_subnet(id, n.nodes.len()).is_none() {
            return Err(TxError::Conflict(format!(
                "network {id} is on {} nodes already, all its subnets",
                n.nodes.len()
            )));
        }
        let n = self.networks.get_mut(&id).expect("checked above");
        n.nodes.push(node_id);
        n.updated_at = now;
        ch.networks.insert(id);
        Ok(Outcome::NetworkUpdated { network_id: id })
    }

    pub(super) fn add_network_access(
        &mut self,
        twin: TwinId,
        id: NetworkId,
        wg_key: X25519Key,
        node_id: NodeId,
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        let n = self.owned_network(twin, id)?;
        let existing = n.access.iter().position(|a| a.wg_key == wg_key);
        if existing.is_none() && n.access.len() >= Layout::of(&self.config).hosts_per_subnet() {
            return Err(TxError::Conflict(format!(
                "network {id} has {} machines joined, as many as it takes",
                n.access.len()
            )));
        }
        // A node key may not be an access key too: the node would answer for two places.
        if self
            .nodes
            .values()
            .any(|x| x.overlay.as_ref().is_some_and(|o| o.wg_key == wg_key))
        {
            return Err(TxError::Conflict(format!(
                "key {wg_key} is a node's overlay key"
            )));
        }
        self.overlay_node(node_id)?;
        let n = self.networks.get_mut(&id).expect("checked above");
        match existing {
            Some(i) => n.access[i].node_id = node_id,
            None => n
                .access
                .push(tfgrid_core::network::NetworkAccess { wg_key, node_id }),
        }
        n.updated_at = now;
        ch.networks.insert(id);
        Ok(Outcome::NetworkUpdated { network_id: id })
    }

    pub(super) fn set_network_hosts(
        &mut self,
        twin: TwinId,
        id: NetworkId,
        hosts: &[NetworkHost],
        now: Millis,
        ch: &mut Changes,
    ) -> Result<Outcome, TxError> {
        let n = self.owned_network(twin, id)?;
        if hosts.len() > MAX_HOSTS {
            return Err(malformed(format!(
                "{} host names; a network takes at most {MAX_HOSTS}",
                hosts.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for h in hosts {
            network::check_host_name(&h.name).map_err(malformed)?;
            if !seen.insert(h.name.as_str()) {
                return Err(malformed(format!("host name {:?} given twice", h.name)));
            }
            if h.addrs.len() > MAX_HOST_ADDRS {
                return Err(malformed(format!(
                    "host {:?} has {} addresses; at most {MAX_HOST_ADDRS}",
                    h.name,
                    h.addrs.len()
                )));
            }
            if let Some(a) = h.addrs.iter().find(|a| !n.range.contains(**a)) {
                return Err(malformed(format!(
                    "host {:?}: {a} is not in the network's range {}",
                    h.name, n.range
                )));
            }
        }
        let n = self.networks.get_mut(&id).expect("checked above");
        n.hosts = hosts.to_vec();
        n.updated_at = now;
        ch.networks.insert(id);
        Ok(Outcome::NetworkUpdated { network_id: id })
    }
}
