//! The users' private networks on this node. A container of network N sits on N's own bridge,
//! whose subnet the registry gave this node in N; a gateway that proxies to N's workloads gets
//! the bridge too, and dials them from its address. nftables keeps the networks apart:
//!
//! - into N's bridge only from N's range (its other nodes' subnets, its users' machines): not
//!   another network's containers, not the containers of the node's own workload subnet, not
//!   other hosts (their traffic into the overlay comes from their workload prefix). The node's
//!   own host can still open connections to its bridges, as the node's operator (root) can enter
//!   any container anyway;
//! - out of N's bridge only from its own subnet (no container speaks for another address);
//! - to the node host, from any network address (containers, users' machines), only the zdb port
//!   (zdb workloads) and answers;
//! - to the world outside the grid through the node's address (MASQUERADE), or not at all when
//!   the node is started with `--no-masquerade`.
//!
//! Service names are the network's `hosts` in the registry, written into a hosts file that each
//! of its containers has as /etc/hosts (rewritten in place, so they see changes).

use crate::kinds::run;
use crate::net::Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tfgrid_core::network::{Layout, Network, NetworkId, Place};
use tfgrid_core::prefix::Ipv4Prefix;
use tfgrid_core::records::X25519Key;
use tfgrid_core::{NodeId, TwinId};
use tfgrid_registry_client::RegistryClient;

const REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);

/// The users' machines that join through this node (their keys and addresses), handed to the
/// overlay each time the registry is read.
pub type AccessSink = Box<dyn Fn(&[(X25519Key, Ipv4Addr)]) + Send + Sync>;

#[derive(Clone)]
pub struct Networks {
    inner: Arc<Inner>,
}

struct Inner {
    node_bridge: String,
    own: NodeId,
    layout: Layout,
    workload_range: Ipv4Prefix,
    registry: RegistryClient,
    dir: PathBuf,
    masquerade: bool,
    zdb_port: u16,
    joined: Mutex<BTreeMap<NetworkId, Joined>>,
    access: Mutex<Option<AccessSink>>,
}

struct Joined {
    net: Network,
    bridge: Net,
    /// Workload keys using the bridge; it goes when the last one leaves.
    users: BTreeSet<String>,
}

pub struct Options {
    pub node_bridge: String,
    pub own: NodeId,
    pub layout: Layout,
    pub workload_range: Ipv4Prefix,
    pub dir: PathBuf,
    pub masquerade: bool,
    pub zdb_port: u16,
}

impl Networks {
    pub fn new(o: Options, registry: RegistryClient) -> Networks {
        Networks {
            inner: Arc::new(Inner {
                node_bridge: o.node_bridge,
                own: o.own,
                layout: o.layout,
                workload_range: o.workload_range,
                registry,
                dir: o.dir,
                masquerade: o.masquerade,
                zdb_port: o.zdb_port,
                joined: Mutex::default(),
                access: Mutex::default(),
            }),
        }
    }

    pub fn layout(&self) -> Layout {
        self.inner.layout
    }

    pub fn set_access_sink(&self, sink: AccessSink) {
        *self.inner.access.lock().unwrap() = Some(sink);
    }

    /// The bridge of network `id` on the node named `node_bridge`.
    pub fn bridge_name(node_bridge: &str, id: NetworkId) -> String {
        let h = blake3::hash(format!("{node_bridge}/net{id}").as_bytes());
        format!("tn{}", &h.to_hex()[..12])
    }

    pub fn hosts_file(&self, id: NetworkId) -> PathBuf {
        self.inner.dir.join(id.to_string()).join("hosts")
    }

    /// The record of network `id` as the registry has it now, or as it was last saved here when
    /// the registry does not answer (a node restarting while the registry is away still brings
    /// its containers back).
    async fn fetch(&self, id: NetworkId) -> Result<Network, String> {
        let saved = self.inner.dir.join(id.to_string()).join("network.json");
        match tokio::time::timeout(REGISTRY_TIMEOUT, self.inner.registry.network(id)).await {
            Ok(Ok(n)) => {
                let _ = std::fs::create_dir_all(saved.parent().expect("a parent"));
                let _ = std::fs::write(&saved, serde_json::to_vec(&n).unwrap_or_default());
                Ok(n)
            }
            Ok(Err(e)) if e.code() == Some("not_found") => {
                Err(format!("network {id} does not exist"))
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".to_string(),
                };
                std::fs::read(&saved)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| format!("network {id}: registry: {why}"))
            }
        }
    }

    /// Puts network `id` (of `twin`) on this node for workload `user`: its bridge, its rules,
    /// its hosts file. Refused unless `twin` owns it and the registry gave it a subnet here.
    pub async fn join(&self, twin: TwinId, id: NetworkId, user: &str) -> Result<Net, String> {
        // A network here already: its owner and this node's subnet in it never change.
        {
            let mut j = self.inner.joined.lock().unwrap();
            if let Some(e) = j.get_mut(&id).filter(|e| e.net.twin_id == twin) {
                e.users.insert(user.to_string());
                return Ok(e.bridge.clone());
            }
        }
        let net = self.fetch(id).await?;
        if net.twin_id != twin {
            return Err(format!(
                "network {id} belongs to twin {}, not to twin {twin}",
                net.twin_id
            ));
        }
        let subnet = net
            .subnet_of(&self.inner.layout, self.inner.own)
            .ok_or_else(|| {
                format!(
                    "network {id} has no subnet on node {} (its owner adds the node to it first)",
                    self.inner.own
                )
            })?;
        let bridge = Net::new(
            &Self::bridge_name(&self.inner.node_bridge, id),
            &subnet.to_string(),
        )?;
        bridge.setup().await?;
        self.write_hosts(&net)?;
        let changed = {
            let mut j = self.inner.joined.lock().unwrap();
            let e = j.entry(id).or_insert_with(|| Joined {
                net: net.clone(),
                bridge: bridge.clone(),
                users: BTreeSet::new(),
            });
            e.net = net;
            let first = e.users.is_empty();
            e.users.insert(user.to_string());
            first
        };
        if changed {
            if let Err(e) = self.apply().await {
                self.leave(id, user).await;
                return Err(e);
            }
        }
        Ok(bridge)
    }

    /// Workload `user` no longer uses network `id`; the bridge goes with the last user.
    pub async fn leave(&self, id: NetworkId, user: &str) {
        let gone = {
            let mut j = self.inner.joined.lock().unwrap();
            match j.get_mut(&id) {
                Some(e) => {
                    e.users.remove(user);
                    if e.users.is_empty() {
                        j.remove(&id).map(|e| e.bridge)
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        if let Some(b) = gone {
            if let Err(e) = self.apply().await {
                tracing::warn!(network = id, "nftables: {e}");
            }
            if crate::net::link_exists(&b.bridge).await {
                if let Err(e) = run("ip", &["link", "del", &b.bridge]).await {
                    tracing::warn!(network = id, "removing bridge {}: {e}", b.bridge);
                }
            }
        }
    }

    /// After the workloads were brought back at start: bridges no workload uses any more (one
    /// whose last container went while the agent was down, or was killed half-way through a
    /// delete) are removed, and the rules are rewritten for the networks in use.
    pub async fn sweep_unused(&self) {
        let in_use: BTreeSet<NetworkId> =
            self.inner.joined.lock().unwrap().keys().copied().collect();
        if let Ok(rd) = std::fs::read_dir(&self.inner.dir) {
            for e in rd.flatten() {
                let Ok(id) = e.file_name().to_string_lossy().parse::<NetworkId>() else {
                    continue;
                };
                let b = Self::bridge_name(&self.inner.node_bridge, id);
                if !in_use.contains(&id) && crate::net::link_exists(&b).await {
                    tracing::info!(network = id, "removing bridge {b}: no workload uses it");
                    if let Err(e) = run("ip", &["link", "del", &b]).await {
                        tracing::warn!(network = id, "removing bridge {b}: {e}");
                    }
                }
            }
        }
        if let Err(e) = self.apply().await {
            tracing::warn!("nftables: {e}");
        }
    }

    /// The address this node dials `backend` from: its own address in the backend's network, if
    /// the network is here (None: the backend is not in a network).
    pub fn source_for(&self, backend: Ipv4Addr) -> Option<Ipv4Addr> {
        let network = match self.inner.layout.place(backend)? {
            Place::Node { network, .. } | Place::Access { network, .. } => network,
        };
        let j = self.inner.joined.lock().unwrap();
        j.get(&network).map(|e| e.bridge.gateway())
    }

    fn write_hosts(&self, net: &Network) -> Result<(), String> {
        let path = self.hosts_file(net.id);
        std::fs::create_dir_all(path.parent().expect("a parent"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
        for h in &net.hosts {
            for a in &h.addrs {
                s.push_str(&format!("{a}\t{}\n", h.name));
            }
        }
        if std::fs::read_to_string(&path).ok().as_deref() == Some(s.as_str()) {
            return Ok(());
        }
        // In place (same inode): containers have the file bind-mounted.
        std::fs::write(&path, s).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads the networks this node serves from the registry: service names of those here, and
    /// the users' machines that join through it (to the overlay).
    pub async fn refresh(&self) {
        let i = &self.inner;
        let list = match tokio::time::timeout(REGISTRY_TIMEOUT, i.registry.networks_on(i.own)).await
        {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::debug!("networks of this node: {e}");
                return;
            }
            Err(_) => return,
        };
        let mut machines = Vec::new();
        for n in &list {
            for (k, a) in n.access.iter().enumerate() {
                if a.node_id == i.own {
                    if let Some(addr) = i.layout.access_addr(n.id, k) {
                        machines.push((a.wg_key, addr));
                    }
                }
            }
            let here = {
                let mut j = i.joined.lock().unwrap();
                match j.get_mut(&n.id) {
                    Some(e) if e.net.twin_id == n.twin_id => {
                        e.net = n.clone();
                        true
                    }
                    _ => false,
                }
            };
            if here {
                if let Err(e) = self.write_hosts(n) {
                    tracing::warn!(network = n.id, "hosts file: {e}");
                }
            }
        }
        if let Some(sink) = i.access.lock().unwrap().as_ref() {
            sink(&machines);
        }
    }

    fn table(&self) -> String {
        format!("tfgrid_{}", self.inner.node_bridge)
    }

    /// Rewrites this node's nftables table from the networks here (one atomic `nft -f`).
    async fn apply(&self) -> Result<(), String> {
        let i = &self.inner;
        let nets: Vec<(String, Ipv4Prefix, Ipv4Prefix)> = {
            let j = i.joined.lock().unwrap();
            j.values()
                .map(|e| {
                    let sub = e
                        .net
                        .subnet_of(&i.layout, i.own)
                        .expect("joined only with a subnet");
                    (e.bridge.bridge.clone(), sub, e.net.range)
                })
                .collect()
        };
        let table = self.table();
        let mut r = format!("table ip {table} {{}}\ndelete table ip {table}\n");
        if nets.is_empty() {
            return nft(&r).await;
        }
        let grid = format!("{{ {}, {} }}", i.workload_range, i.layout.range);
        let bridges = nets
            .iter()
            .map(|(b, _, _)| format!("\"{b}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let bridges = format!("{{ {bridges} }}");
        r.push_str(&format!("table ip {table} {{\n"));
        r.push_str(
            "  chain isolate {\n    type filter hook forward priority filter; policy accept;\n",
        );
        r.push_str("    ct state established,related accept\n");
        for (b, sub, range) in &nets {
            r.push_str(&format!("    iifname \"{b}\" ip saddr != {sub} drop\n"));
            r.push_str(&format!("    oifname \"{b}\" ip saddr != {range} drop\n"));
        }
        if !i.masquerade {
            r.push_str(&format!("    iifname {bridges} ip daddr != {grid} drop\n"));
        }
        r.push_str("  }\n");
        r.push_str("  chain host {\n    type filter hook input priority filter; policy accept;\n");
        r.push_str("    ct state established,related accept\n");
        // By source, not by interface: the users' machines come in through the overlay.
        let networks = i.layout.range;
        r.push_str(&format!(
            "    ip saddr {networks} tcp dport {} accept\n",
            i.zdb_port
        ));
        r.push_str(&format!("    ip saddr {networks} drop\n"));
        r.push_str("  }\n");
        if i.masquerade {
            let subs = nets
                .iter()
                .map(|(_, s, _)| s.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            r.push_str(
                "  chain outside {\n    type nat hook postrouting priority srcnat; policy accept;\n",
            );
            r.push_str(&format!(
                "    ip saddr {{ {subs} }} ip daddr != {grid} masquerade\n"
            ));
            r.push_str("  }\n");
        }
        r.push_str("}\n");
        nft(&r).await
    }
}

/// Removes what networks left on a node that is stopped for good (`tfgrid up`'s Ctrl-C): the
/// bridges of the networks its data names and its nftables table.
pub async fn remove_all(data: &std::path::Path, node_bridge: &str) {
    if let Ok(rd) = std::fs::read_dir(data.join("networks")) {
        for e in rd.flatten() {
            let Ok(id) = e.file_name().to_string_lossy().parse::<NetworkId>() else {
                continue;
            };
            let b = Networks::bridge_name(node_bridge, id);
            if crate::net::link_exists(&b).await {
                let _ = run("ip", &["link", "del", &b]).await;
            }
        }
    }
    let t = format!("tfgrid_{node_bridge}");
    let _ = nft(&format!("table ip {t} {{}}\ndelete table ip {t}\n")).await;
}

async fn nft(ruleset: &str) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft (nftables, which keeps networks apart): {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(ruleset.as_bytes())
        .await
        .map_err(|e| format!("nft: {e}"))?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| "nft: no answer in 10 s".to_string())?
        .map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
