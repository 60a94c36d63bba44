//! Gateway names: a name contract (ours, or new), a gateway deployment on a gateway node that is
//! up, and re-pointing a name at new backends (a new deployment version on the same contract).

use crate::bot::{wname, Bot, Journal, DEPLOY_TIMEOUT};
use crate::spec::Service;
use crate::store::{Record, Route};
use tfgrid_core::contract::Contract;
use tfgrid_core::deployment::{
    Deployment, GatewayNameProxySpec, ResultState, Workload, WorkloadData,
};
use tfgrid_core::filter::{ContractFilter, NodeFilter};
use tfgrid_core::node_api::{self, DeploymentInfo};
use tfgrid_core::records::{NodeStatus, NodeView};
use tfgrid_core::tx::Call;
use tfgrid_core::{ContractId, TwinId};

impl Bot {
    /// A contract of a step that failed: cancelled (through the queue) and out of the journal.
    pub(crate) async fn take_back(
        &self,
        journal: &Journal<'_>,
        contract_id: ContractId,
        node_twin: TwinId,
    ) {
        self.cancel_all(&[(contract_id, node_twin)]).await;
        if let Err(e) = journal.forget(&[contract_id]) {
            tracing::error!(contract_id, "journal: {e}");
        }
    }

    pub(crate) fn backends(rec: &Record, service: &str, port: u16) -> Vec<String> {
        rec.replicas
            .iter()
            .filter(|r| r.service == service && !r.ip.is_empty())
            .map(|r| format!("http://{}:{port}", r.ip))
            .collect()
    }

    fn gateway_deployment(
        twin: TwinId,
        service: &str,
        name: &str,
        backends: Vec<String>,
        version: u32,
    ) -> Deployment {
        Deployment {
            version,
            twin_id: twin,
            contract_id: 0,
            metadata: String::new(),
            description: format!("gateway for {service}"),
            workloads: vec![Workload {
                version,
                name: wname(&format!("gw_{service}")),
                data: WorkloadData::GatewayNameProxy(GatewayNameProxySpec {
                    name: name.to_string(),
                    backends,
                }),
                metadata: String::new(),
                description: String::new(),
            }],
            signature: None,
        }
    }

    /// The name contract for `name`: ours if we hold it, new if nobody does.
    async fn name_contract(&self, journal: &Journal<'_>, name: &str) -> Result<ContractId, String> {
        let live: Vec<Contract> = self
            .registry
            .contracts(&ContractFilter {
                kind: Some("name".into()),
                name: Some(name.into()),
                state: Some("live".into()),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if let Some(c) = live.iter().find(|c| c.is_live()) {
            if c.twin_id == self.twin {
                return Ok(c.id);
            }
            return Err(format!("the name {name:?} is taken by twin {}", c.twin_id));
        }
        self.create_contract(journal, Call::CreateNameContract { name: name.into() }, 0)
            .await
    }

    pub(crate) async fn make_route(
        &self,
        journal: &Journal<'_>,
        service: &str,
        name: &str,
        backends: Vec<String>,
    ) -> Result<Route, String> {
        let nodes = self
            .nodes_where(NodeFilter {
                status: Some(NodeStatus::Up),
                domain: Some(true),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let gone = self.gone_nodes();
        let mut gws: Vec<&NodeView> = nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Up && n.node.public_config.domain.is_some())
            .filter(|n| !gone.contains(&n.node.id))
            .collect();
        gws.sort_by_key(|n| n.node.id);
        // The lowest id that answers a ping: the ledger may still call a dead gateway up.
        let mut gw = None;
        for n in gws.iter().take(3) {
            if self
                .not_answering(&[(n.node.id, n.node.twin_id)])
                .await
                .is_empty()
            {
                gw = Some(*n);
                break;
            }
        }
        let gw = gw.ok_or_else(|| {
            "no gateway node is up and answering (a node registered with --domain)".to_string()
        })?;
        self.join_for_backends(gw.node.id, &backends).await?;
        let name_contract = self.name_contract(journal, name).await?;
        let mut d = Self::gateway_deployment(self.twin, service, name, backends.clone(), 0);
        let contract_id = self
            .create_contract(
                journal,
                Call::CreateNodeContract {
                    node_id: gw.node.id,
                    deployment_hash: d.hash(),
                    capacity: Default::default(),
                },
                gw.node.twin_id,
            )
            .await?;
        d.contract_id = contract_id;
        d.sign(&self.identity);
        let info: DeploymentInfo = match self
            .call_node(gw.node.twin_id, node_api::DEPLOY, &d, DEPLOY_TIMEOUT)
            .await
        {
            Ok(i) => i,
            Err(e) => {
                self.take_back(journal, contract_id, gw.node.twin_id).await;
                return Err(format!("gateway node {}: {e}", gw.node.id));
            }
        };
        let r = info.results.values().next().cloned();
        match r {
            Some(r) if r.state == ResultState::Ok => Ok(Route {
                service: service.into(),
                name: name.into(),
                node_id: gw.node.id,
                node_twin: gw.node.twin_id,
                name_contract,
                contract_id,
                version: 0,
                backends,
                url: r.data.get("url").cloned().unwrap_or_default(),
            }),
            other => {
                self.take_back(journal, contract_id, gw.node.twin_id).await;
                Err(format!(
                    "gateway node {}: {}",
                    gw.node.id,
                    other.map(|r| r.message).unwrap_or_default()
                ))
            }
        }
    }

    /// Points a route at new backends: a new deployment version, the contract updated to its
    /// hash first, then `deployment.update` on the gateway node.
    pub(crate) async fn repoint(
        &self,
        route: &mut Route,
        backends: Vec<String>,
    ) -> Result<(), String> {
        // Higher than any version this route had, also one a crash kept out of the record (the
        // node holds it, and refuses an update that is not higher): seconds since the epoch.
        let version = (route.version + 1).max((tfgrid_core::now_millis() / 1000) as u32);
        self.join_for_backends(route.node_id, &backends).await?;
        let mut d = Self::gateway_deployment(
            self.twin,
            &route.service,
            &route.name,
            backends.clone(),
            version,
        );
        self.signer
            .submit(Call::UpdateNodeContract {
                contract_id: route.contract_id,
                deployment_hash: d.hash(),
                capacity: Default::default(),
            })
            .await
            .map_err(|e| e.to_string())?;
        d.contract_id = route.contract_id;
        d.sign(&self.identity);
        let _: DeploymentInfo = self
            .call_node(route.node_twin, node_api::UPDATE, &d, DEPLOY_TIMEOUT)
            .await?;
        route.version = version;
        route.backends = backends;
        Ok(())
    }

    /// Points every route of `service` whose backends are not its replicas' at them; true when
    /// one changed. Run every reconcile pass, so a re-point a crash cut short is done later.
    pub(crate) async fn repoint_service(
        &self,
        rec: &mut Record,
        svc: &Service,
        service: &str,
    ) -> bool {
        let Some(ex) = &svc.expose else { return false };
        let backends = Self::backends(rec, service, ex.port);
        let mut want = backends.clone();
        want.sort();
        let name = rec.name.clone();
        let mut changed = false;
        for route in rec.routes.iter_mut().filter(|r| r.service == service) {
            let mut have = route.backends.clone();
            have.sort();
            if have == want || want.is_empty() {
                continue;
            }
            changed = true;
            match self.repoint(route, backends.clone()).await {
                Ok(()) => self.event(
                    &name,
                    "repointed",
                    format!("{} -> {}", route.url, backends.join(", ")),
                ),
                Err(e) => self.event(
                    &name,
                    "heal-failed",
                    format!("re-pointing {}: {e}", route.url),
                ),
            }
        }
        changed
    }
}
