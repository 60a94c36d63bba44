//! Private networks (ThreeFold's `network` workload): a user's named network gets its own range
//! from the registry, one subnet of it on each node that hosts the network's workloads, and one
//! address in its first subnet for each of the user's own machines that joins it with WireGuard.
//!
//! Every position is computed from ids, as node prefixes are: network `id` holds the `(id - 1)`th
//! prefix of the grid's network range, subnet `i + 1` of it is on `nodes[i]`, and access peer `i`
//! has the address `i + 1` of subnet 0. So any node maps a destination address to the node that
//! holds it with one record look-up, and no index of addresses is needed.

use crate::prefix::Ipv4Prefix;
use crate::records::{RegistryConfig, X25519Key};
use crate::{Millis, NodeId, TwinId};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

pub type NetworkId = u32;

/// Names of a network's services, each with every replica's address (what its containers'
/// `/etc/hosts` lists). At most this many names, and this many addresses per name.
pub const MAX_HOSTS: usize = 256;
pub const MAX_HOST_ADDRS: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Network {
    pub id: NetworkId,
    pub twin_id: TwinId,
    pub name: String,
    pub range: Ipv4Prefix,
    /// The node of subnet `i + 1` is `nodes[i]`; a node is in the list once.
    pub nodes: Vec<NodeId>,
    /// Access peer `i` has host `i + 1` of subnet 0.
    pub access: Vec<NetworkAccess>,
    pub hosts: Vec<NetworkHost>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// One of the user's own machines in the network: its WireGuard key and the node it peers with
/// (a node the machine can reach, normally one with a public endpoint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAccess {
    pub wg_key: X25519Key,
    pub node_id: NodeId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkHost {
    pub name: String,
    pub addrs: Vec<Ipv4Addr>,
}

/// Where an address of the network range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// On a node's subnet: the network and the node's index in `nodes`.
    Node { network: NetworkId, index: usize },
    /// An access peer's address: the network and the index in `access`.
    Access { network: NetworkId, index: usize },
}

/// The address arithmetic of the grid's networks, from the registry's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub range: Ipv4Prefix,
    pub network_len: u8,
    pub subnet_len: u8,
}

impl Layout {
    pub fn of(c: &RegistryConfig) -> Self {
        Self {
            range: c.network_range,
            network_len: c.network_prefix_len,
            subnet_len: c.network_subnet_len,
        }
    }

    pub fn valid(&self) -> Result<(), String> {
        if self.network_len < self.range.prefix_len()
            || self.subnet_len <= self.network_len
            || self.subnet_len > 29
        {
            return Err(format!(
                "networks /{} in {} with subnets /{}: need range <= network < subnet <= 29",
                self.network_len, self.range, self.subnet_len
            ));
        }
        Ok(())
    }

    /// How many networks the range holds.
    pub fn networks(&self) -> u64 {
        self.range.count(self.network_len)
    }

    pub fn network_range(&self, id: NetworkId) -> Option<Ipv4Prefix> {
        self.range
            .nth(self.network_len, u64::from(id).checked_sub(1)?)
    }

    /// Subnets per network, the access subnet included.
    pub fn subnets(&self) -> u64 {
        1u64 << (self.subnet_len - self.network_len)
    }

    /// Subnet `i + 1` of network `id`: the one on its `i`th node.
    pub fn node_subnet(&self, id: NetworkId, index: usize) -> Option<Ipv4Prefix> {
        self.network_range(id)?
            .nth(self.subnet_len, index as u64 + 1)
    }

    /// Addresses per subnet that are neither its network, its first (the node's bridge) nor
    /// broadcast address; also how many access peers a network takes.
    pub fn hosts_per_subnet(&self) -> usize {
        (1usize << (32 - self.subnet_len)) - 3
    }

    pub fn access_addr(&self, id: NetworkId, index: usize) -> Option<Ipv4Addr> {
        if index >= self.hosts_per_subnet() {
            return None;
        }
        let s = self.network_range(id)?;
        Some(Ipv4Addr::from(u32::from(s.addr()) + 1 + index as u32))
    }

    pub fn place(&self, ip: Ipv4Addr) -> Option<Place> {
        if !self.range.contains(ip) {
            return None;
        }
        let off = u32::from(ip) - u32::from(self.range.addr());
        let network = NetworkId::try_from((off >> (32 - self.network_len)) as u64 + 1).ok()?;
        let in_net = off & (u32::MAX >> self.network_len);
        let subnet = (in_net >> (32 - self.subnet_len)) as usize;
        let host = (in_net & (u32::MAX >> self.subnet_len)) as usize;
        if subnet == 0 {
            (1..=self.hosts_per_subnet())
                .contains(&host)
                .then(|| Place::Access {
                    network,
                    index: host - 1,
                })
        } else {
            Some(Place::Node {
                network,
                index: subnet - 1,
            })
        }
    }
}

impl Network {
    /// This node's subnet in the network, if it is in it.
    pub fn subnet_of(&self, l: &Layout, node: NodeId) -> Option<Ipv4Prefix> {
        let i = self.nodes.iter().position(|n| *n == node)?;
        l.node_subnet(self.id, i)
    }
}

/// A network's name: what `tfgrid network access NAME` and specs use, 1 to 32 of `[a-z0-9-]`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "network name {name:?}: 1 to 32 of a-z, 0-9 and '-', not starting with '-'"
        ))
    }
}

/// A host name in a network (a service name): as a DNS label, 1 to 63 of `[a-z0-9-]`.
pub fn check_host_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host name {name:?}: 1 to 63 of a-z, 0-9, '-' and '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::of(&RegistryConfig::default())
    }

    #[test]
    fn positions_follow_ids() {
        let l = layout();
        l.valid().unwrap();
        assert_eq!(l.networks(), 2048);
        assert_eq!(l.network_range(1).unwrap().to_string(), "10.128.0.0/20");
        assert_eq!(l.network_range(2).unwrap().to_string(), "10.128.16.0/20");
        assert_eq!(l.network_range(0), None);
        assert_eq!(l.network_range(2049), None);
        assert_eq!(l.node_subnet(2, 0).unwrap().to_string(), "10.128.16.64/26");
        assert_eq!(l.access_addr(2, 0), Some("10.128.16.1".parse().unwrap()));
        assert_eq!(l.hosts_per_subnet(), 61);
        let p = |s: &str| l.place(s.parse().unwrap());
        assert_eq!(
            p("10.128.16.70"),
            Some(Place::Node {
                network: 2,
                index: 0
            })
        );
        assert_eq!(
            p("10.128.17.1"),
            Some(Place::Node {
                network: 2,
                index: 3
            })
        );
        assert_eq!(
            p("10.128.16.1"),
            Some(Place::Access {
                network: 2,
                index: 0
            })
        );
        assert_eq!(p("10.128.16.0"), None);
        assert_eq!(p("10.64.0.2"), None);
        for id in [1u32, 7, 2048] {
            for i in [0usize, 5, 62] {
                let s = l.node_subnet(id, i).unwrap();
                let ip = Ipv4Addr::from(u32::from(s.addr()) + 9);
                assert_eq!(
                    l.place(ip),
                    Some(Place::Node {
                        network: id,
                        index: i
                    })
                );
            }
            let a = l.access_addr(id, 60).unwrap();
            assert_eq!(
                l.place(a),
                Some(Place::Access {
                    network: id,
                    index: 60
                })
            );
        }
        assert_eq!(l.node_subnet(1, 63), None);
        assert_eq!(l.access_addr(1, 61), None);
    }

    #[test]
    fn names() {
        assert!(check_name("web-1").is_ok());
        for bad in ["", "Web", "-a", "a_b", &"a".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_host_name("db.shop").is_ok());
        assert!(check_host_name("a b").is_err());
    }
}
