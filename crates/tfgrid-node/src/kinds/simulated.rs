//! Every workload kind of a simulated node (`tfgrid node --simulate`): nothing is started on the
//! host, but each workload gets what its real kind would answer, after the same registry checks
//! (a container in a private network is refused unless its twin owns the network and the
//! network has a subnet here, and gets an address in that subnet; any other container gets one
//! in the node's workload prefix). So the engine, the bus and the bot above it run their real
//! code. What a simulated node holds lives in memory and goes with its process.

use super::{Ctx, Kind, Output, WorkloadId};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use tfgrid_core::deployment::{ResultState, WorkloadData};
use tfgrid_core::network::Layout;
use tfgrid_core::prefix::Ipv4Prefix;
use tfgrid_core::NodeId;
use tfgrid_registry_client::RegistryClient;

pub struct Simulated {
    node: NodeId,
    prefix: Ipv4Prefix,
    /// Private networks: None checks nothing and puts every container in `prefix` (a test's).
    networks: Option<(Layout, RegistryClient)>,
    /// Each container's address, as the real kind keeps one per workload.
    ips: Mutex<HashMap<WorkloadId, Ipv4Addr>>,
}

impl Simulated {
    pub fn new(
        node: NodeId,
        prefix: Ipv4Prefix,
        networks: Option<(Layout, RegistryClient)>,
    ) -> Self {
        Self {
            node,
            prefix,
            networks,
            ips: Mutex::new(HashMap::new()),
        }
    }

    /// The lowest free host address of `pool` after its gateway (.1), as the real container
    /// kind allocates.
    fn allocate(&self, id: &WorkloadId, pool: Ipv4Prefix) -> Result<Ipv4Addr, String> {
        let mut ips = self.ips.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ip) = ips.get(id) {
            return Ok(*ip);
        }
        let base = u32::from(pool.addr());
        let size = 1u32 << (32 - pool.prefix_len());
        let used: std::collections::HashSet<Ipv4Addr> = ips.values().copied().collect();
        let ip = (2..size.saturating_sub(1))
            .map(|i| Ipv4Addr::from(base + i))
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| format!("no free address left in {pool}"))?;
        ips.insert(id.clone(), ip);
        Ok(ip)
    }

    /// Where a container's address comes from: its network's subnet on this node (checked on
    /// the registry as the real kind does), or the node's workload prefix.
    async fn pool(
        &self,
        ctx: &Ctx<'_>,
        network: Option<tfgrid_core::network::NetworkId>,
    ) -> Result<Ipv4Prefix, String> {
        let (Some(id), Some((layout, client))) = (network, &self.networks) else {
            return Ok(self.prefix);
        };
        let net = client
            .network(id)
            .await
            .map_err(|e| format!("network {id}: registry: {e}"))?;
        if net.twin_id != ctx.deployment.twin_id {
            return Err(format!(
                "network {id} belongs to twin {}, not to twin {}",
                net.twin_id, ctx.deployment.twin_id
            ));
        }
        net.subnet_of(layout, self.node).ok_or_else(|| {
            format!(
                "network {id} has no subnet on node {} (its owner adds the node to it first)",
                self.node
            )
        })
    }

    async fn make(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        let mut out = Output::new();
        match &ctx.workload.data {
            WorkloadData::Container(c) => {
                let pool = self.pool(ctx, c.network).await?;
                out.insert("ip".into(), self.allocate(&ctx.id, pool)?.to_string());
            }
            WorkloadData::Vm(v) => {
                let pool = self.pool(ctx, v.network).await?;
                out.insert("ip".into(), self.allocate(&ctx.id, pool)?.to_string());
            }
            WorkloadData::Zdb(_) => {
                out.insert("namespace".into(), ctx.id.key());
            }
            WorkloadData::Volume(_) | WorkloadData::GatewayNameProxy(_) => {}
        }
        Ok(out)
    }
}

impl Kind for Simulated {
    async fn provision(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx).await
    }

    async fn deprovision(&self, id: &WorkloadId) -> Result<(), String> {
        self.ips
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    async fn inspect(&self, id: &WorkloadId) -> (ResultState, String) {
        let _ = id;
        (ResultState::Ok, String::new())
    }

    async fn recover(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfgrid_core::deployment::{Deployment, Workload};

    #[tokio::test]
    async fn containers_get_distinct_addresses_in_the_prefix_and_give_them_back() {
        let k = Simulated::new(1, "10.20.3.0/29".parse().unwrap(), None);
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "version": 0, "twin_id": 7, "contract_id": 1, "workloads": []
        }))
        .unwrap();
        let w: Workload = serde_json::from_value(serde_json::json!({
            "version": 0, "name": "web",
            "data": {"container": {"image": "x/y:1", "cpu": 1, "memory": 16777216}}
        }))
        .unwrap();
        let ctx = |c| Ctx {
            id: WorkloadId::new(c, "web"),
            deployment: &d,
            workload: &w,
        };
        let mut seen = Vec::new();
        for c in 1..=5 {
            seen.push(k.provision(&ctx(c)).await.unwrap()["ip"].clone());
        }
        assert_eq!(
            seen,
            [
                "10.20.3.2",
                "10.20.3.3",
                "10.20.3.4",
                "10.20.3.5",
                "10.20.3.6"
            ]
        );
        // The prefix is full (.7 is its broadcast address).
        assert!(k
            .provision(&ctx(6))
            .await
            .unwrap_err()
            .contains("no free address"));
        // The same workload again keeps its address; one removed frees it.
        assert_eq!(k.recover(&ctx(3)).await.unwrap()["ip"], "10.20.3.4");
        k.deprovision(&WorkloadId::new(2, "web")).await.unwrap();
        assert_eq!(k.provision(&ctx(6)).await.unwrap()["ip"], "10.20.3.3");
    }
}
