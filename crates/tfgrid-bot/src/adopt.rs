//! A bot started on an empty data dir with a key that already has deployments (its machine was
//! lost) takes them over instead of cancelling them as orphans: each replica's deployment on its
//! node names its deployment, service and index (`metadata`) and carries the spec (`description`,
//! when it is at most `ADOPTABLE_YAML`), so the records are made again from the nodes alone.
//! Storage pools come back this way, and with them every object (see `storage`).

use crate::bot::{Bot, BotError};
use crate::spec::Spec;
use crate::store::{Record, Replica, State};
use futures::stream::{self, StreamExt};
use std::collections::BTreeMap;
use std::time::Duration;
use tfgrid_core::contract::ContractKind;
use tfgrid_core::node_api::{self, ContractRef, DeploymentInfo};
use tfgrid_core::now_millis;

const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// `owner/service/index@millis`
fn parse_metadata(m: &str) -> Option<(String, String, u32, u64)> {
    let (rest, at) = m.rsplit_once('@')?;
    let mut parts = rest.splitn(3, '/');
    let owner = parts.next()?.to_string();
    let service = parts.next()?.to_string();
    let index = parts.next()?.parse().ok()?;
    Some((owner, service, index, at.parse().ok()?))
}

impl Bot {
    /// Adopts the deployments found on nodes, when this bot has no record at all. Answers how
    /// many were adopted; what cannot be (a node that does not answer, a spec too large to be
    /// carried) is left to the orphan sweep.
    pub(crate) async fn adopt(&self) -> Result<usize, BotError> {
        if !self.store.all()?.is_empty() {
            return Ok(0);
        }
        // Contracts this bot is cancelling are not taken back.
        let cancelling: std::collections::HashSet<_> = self
            .store
            .pending_cancels()?
            .into_iter()
            .map(|j| j.0)
            .collect();
        let mut live = self.live_contracts().await?;
        live.retain(|c| !cancelling.contains(&c.id));
        let node_ids: Vec<_> = live
            .iter()
            .filter_map(|c| match &c.kind {
                ContractKind::Node(n) => Some(n.node_id),
                _ => None,
            })
            .collect();
        if node_ids.is_empty() {
            return Ok(0);
        }
        let twins: BTreeMap<_, _> = self
            .nodes_by_id(&node_ids)
            .await?
            .into_iter()
            .map(|v| (v.node.id, v.node.twin_id))
            .collect();
        // Collected first: a lazy iterator over borrowed contracts inside the stream makes the
        // future not `Send` for every lifetime (a rustc limitation).
        let asks: Vec<(u64, u32, u32)> = live
            .iter()
            .filter_map(|c| match &c.kind {
                ContractKind::Node(n) => Some((c.id, n.node_id, *twins.get(&n.node_id)?)),
                _ => None,
            })
            .collect();
        let found: Vec<(u64, u32, u32, Result<DeploymentInfo, String>)> = stream::iter(asks)
            .map(|(id, node, twin)| async move {
                let r = self
                    .peer
                    .call_json(
                        twin,
                        node_api::GET,
                        &ContractRef { contract_id: id },
                        ASK_TIMEOUT,
                    )
                    .await
                    .map_err(|e| e.to_string());
                (id, node, twin, r)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        // Per deployment name: its newest spec, and per (service, index) the newest replica.
        type Newest = BTreeMap<(String, u32), (u64, Replica)>;
        let mut by_owner: BTreeMap<String, (u64, String, Newest)> = BTreeMap::new();
        for (id, node, twin, r) in found {
            let Ok(info) = r else { continue };
            let d = &info.deployment;
            let Some((owner, service, index, at)) = parse_metadata(&d.metadata) else {
                continue;
            };
            let e = by_owner
                .entry(owner)
                .or_insert_with(|| (0, String::new(), BTreeMap::new()));
            if at > e.0 && !d.description.is_empty() {
                e.0 = at;
                e.1 = d.description.clone();
            }
            let rep = Bot::replica_of(&service, index, (node, twin), id, d, &info);
            let slot = e.2.entry((service, index)).or_insert((0, rep.clone()));
            if at >= slot.0 {
                *slot = (at, rep);
            }
        }
        let mut adopted = 0;
        for (name, (_, yaml, replicas)) in by_owner {
            match Spec::parse(&yaml) {
                Ok(spec) if spec.name == name => {}
                _ => continue,
            }
            let rec = Record {
                name: name.clone(),
                yaml,
                state: State::Running,
                replicas: replicas.into_values().map(|(_, r)| r).collect(),
                routes: Vec::new(),
                created_at: now_millis(),
                updated_at: now_millis(),
                made: Vec::new(),
            };
            let n = rec.replicas.len();
            self.store.put(&rec)?;
            self.event(
                &name,
                "adopted",
                format!("{n} replicas found on their nodes, taken over by this bot"),
            );
            adopted += 1;
        }
        Ok(adopted)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_metadata;

    #[test]
    fn metadata_names_deployment_service_and_index() {
        assert_eq!(
            parse_metadata("files/storage/3@1700000000000"),
            Some(("files".into(), "storage".into(), 3, 1_700_000_000_000))
        );
        assert_eq!(parse_metadata("files/storage@1"), None);
        assert_eq!(parse_metadata("files/storage/x@1"), None);
        assert_eq!(parse_metadata(""), None);
    }
}
