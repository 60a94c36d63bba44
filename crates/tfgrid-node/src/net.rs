//! Workload networking: one Linux bridge per node holding the first address of the node's workload
//! subnet; each container gets its own network namespace with a veth pair into that bridge. Done
//! with iproute2, as the kernel's own tool for it, rather than hand-built netlink messages.

use crate::kinds::run;
use std::net::Ipv4Addr;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Net {
    pub bridge: String,
    network: u32,
    prefix: u8,
}

impl Net {
    /// `subnet` like `10.42.1.0/24`; prefixes /16 to /29.
    pub fn new(bridge: &str, subnet: &str) -> Result<Self, String> {
        if bridge.is_empty() || bridge.len() > 15 {
            return Err(format!(
                "bridge name {bridge:?}: 1 to 15 characters (a Linux limit)"
            ));
        }
        let (addr, prefix) = subnet
            .split_once('/')
            .ok_or_else(|| format!("subnet {subnet:?}: expected address/prefix"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|e| format!("subnet {subnet:?}: {e}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (16..=29).contains(p))
            .ok_or_else(|| format!("subnet {subnet:?}: prefix must be 16 to 29"))?;
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            bridge: bridge.to_string(),
            network: u32::from(addr) & mask,
            prefix,
        })
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    /// Addresses workloads may have: after the gateway, before broadcast.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let size = 1u32 << (32 - self.prefix);
        (self.network + 2..self.network + size - 1).map(Ipv4Addr::from)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == self.network
    }

    /// Creates the bridge with the gateway address, or finds it there already.
    pub async fn setup(&self) -> Result<(), String> {
        if !link_exists(&self.bridge).await {
            run("ip", &["link", "add", &self.bridge, "type", "bridge"]).await?;
        }
        let cidr = format!("{}/{}", self.gateway(), self.prefix);
        let addrs = run("ip", &["-o", "addr", "show", "dev", &self.bridge]).await?;
        if !addrs.contains(&format!(" {cidr} ")) {
            run("ip", &["addr", "add", &cidr, "dev", &self.bridge]).await?;
        }
        run("ip", &["link", "set", &self.bridge, "up"]).await?;
        Ok(())
    }

    /// Namespaces and links are host-wide while workload keys are per node: the bridge name
    /// (one per node on a host) scopes them, so several nodes can share a host.
    pub fn netns(&self, key: &str) -> String {
        format!("tfgrid-{}-{key}", self.bridge)
    }

    pub fn netns_path(&self, key: &str) -> PathBuf {
        PathBuf::from("/var/run/netns").join(self.netns(key))
    }

    /// Host side of the veth: interface names stop at 15 characters, so it is a hash.
    pub fn veth(&self, key: &str) -> String {
        let h = blake3::hash(format!("{}/{key}", self.bridge).as_bytes());
        format!("tv{}", &h.to_hex()[..12])
    }

    /// A fresh namespace for `key` with `ip` on its eth0 and a default route via the bridge.
    pub async fn attach(&self, key: &str, ip: Ipv4Addr) -> Result<PathBuf, String> {
        self.attach_via(key, ip, self).await
    }

    /// As [`attach`](Self::attach), named as this node's, on the bridge and subnet of `via` (a
    /// private network's bridge).
    pub async fn attach_via(&self, key: &str, ip: Ipv4Addr, via: &Net) -> Result<PathBuf, String> {
        self.detach(key).await?;
        let ns = self.netns(key);
        let host = self.veth(key);
        let peer = format!("{host}p");
        run("ip", &["netns", "add", &ns]).await?;
        let made = async {
            run(
                "ip",
                &[
                    "link", "add", &host, "type", "veth", "peer", "name", &peer, "netns", &ns,
                ],
            )
            .await?;
            run("ip", &["link", "set", &host, "master", &via.bridge, "up"]).await?;
            run("ip", &["-n", &ns, "link", "set", &peer, "name", "eth0"]).await?;
            let cidr = format!("{ip}/{}", via.prefix);
            run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]).await?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]).await?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]).await?;
            let gw = via.gateway().to_string();
            run("ip", &["-n", &ns, "route", "add", "default", "via", &gw]).await
        }
        .await;
        if let Err(e) = made {
            let _ = self.detach(key).await;
            return Err(e);
        }
        Ok(self.netns_path(key))
    }

    /// Removes the namespace and the host end of the veth (gone with the namespace normally; a
    /// half-made attach can leave it behind).
    pub async fn detach(&self, key: &str) -> Result<(), String> {
        if self.netns_path(key).exists() {
            run("ip", &["netns", "del", &self.netns(key)]).await?;
        }
        let host = self.veth(key);
        if link_exists(&host).await {
            // The kernel removes the host end with the namespace, asynchronously: it may vanish
            // between the check and the delete.
            match run("ip", &["link", "del", &host]).await {
                Err(e) if !e.contains("Cannot find device") => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn attached(&self, key: &str) -> bool {
        self.netns_path(key).exists()
    }

    /// The cgroup (under each controller) of a workload of this node.
    pub fn cgroup(&self, key: &str) -> String {
        format!("/tfgrid/{}/{key}", self.bridge)
    }
}

/// Whether this network namespace has a link of that name. Asked of the kernel, not read from
/// /sys/class/net: a process that entered a namespace with setns alone (as `tfgrid up --hosts`
/// starts nodes, keeping the host's cgroup mounts) still sees the sysfs of the one it came from.
pub async fn link_exists(name: &str) -> bool {
    run("ip", &["link", "show", "dev", name]).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let n = Net::new("tfg0", "10.42.1.77/24").unwrap();
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 42, 1, 1));
        let hosts: Vec<_> = n.hosts().collect();
        assert_eq!(hosts.first(), Some(&Ipv4Addr::new(10, 42, 1, 2)));
        assert_eq!(hosts.last(), Some(&Ipv4Addr::new(10, 42, 1, 254)));
        assert!(n.contains(Ipv4Addr::new(10, 42, 1, 9)));
        assert!(!n.contains(Ipv4Addr::new(10, 42, 2, 9)));
        assert!(Net::new("tfg0", "10.42.1.0").is_err());
        assert!(Net::new("tfg0", "10.42.1.0/8").is_err());
        assert!(Net::new("a-very-long-bridge-name", "10.0.0.0/24").is_err());
        assert!(n.veth("c123-some_long_workload_name").len() <= 14);
    }
}
