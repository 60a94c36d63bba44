//! What placements start from: the registry's node views, less the capacity this bot has just
//! placed that those views may not show yet. Without that, placements running side by side (a
//! heal of every replica a dead rack held, many deploys at once) all read the same views and
//! all choose the same least-loaded node, which then refuses all but the first few and takes
//! them one at a time.
//!
//! A hold is taken on a node when a placement chooses it and marked done when that replica's
//! contract exists (or its creation failed): views read after that show the contract. Views read
//! before it do not, so for them the hold still counts. (A hold kept to the end of the deploy
//! would count twice in views that already show the contract: a deploy paused after its
//! contracts would make its nodes look full.)
//!
//! Heals read every node; views of the whole grid are shared for [`VIEWS_FOR`], and a read in
//! flight is awaited by every heal that wants one, so a hundred heals cost one read.

use crate::bot::{Bot, BotError};
use crate::scheduler::Candidate;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tfgrid_core::records::NodeView;
use tfgrid_core::{Capacity, NodeId};

/// How long views of every node are reused by heals.
pub(crate) const VIEWS_FOR: Duration = Duration::from_secs(1);
/// A finished hold is forgotten after this long: every view read since shows it.
const FORGET_AFTER: Duration = Duration::from_secs(60);

type Views = Result<Arc<Vec<NodeView>>, String>;

struct Entry {
    node: NodeId,
    capacity: Capacity,
    done: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct Placements {
    holds: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
    /// The last read of every node: when it started, and its outcome (shared while in flight).
    all: Mutex<Option<(Instant, Shared<BoxFuture<'static, Views>>)>>,
}

/// Capacity a placement took on a node; done when dropped (once the contract exists).
pub(crate) struct Hold<'a> {
    of: &'a Placements,
    id: u64,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut h = self.of.holds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = h.get_mut(&self.id) {
            e.done = Some(Instant::now());
        }
    }
}

impl Hold<'_> {
    /// The placement was not used (its plan was made again): the hold never happened.
    pub(crate) fn discard(self) {
        self.of
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        std::mem::forget(self);
    }
}

impl Placements {
    pub(crate) fn hold(&self, node: NodeId, capacity: Capacity) -> Hold<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.holds.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Entry {
                node,
                capacity,
                done: None,
            },
        );
        Hold { of: self, id }
    }

    /// Candidates from views whose read started at `read_at`: each node's free capacity less
    /// the holds those views may not show.
    pub(crate) fn candidates(&self, views: &[NodeView], read_at: Instant) -> Vec<Candidate> {
        let mut held: HashMap<NodeId, Capacity> = HashMap::new();
        {
            let mut h = self.holds.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            h.retain(|_, e| e.done.is_none_or(|d| now.duration_since(d) < FORGET_AFTER));
            for e in h.values() {
                if e.done.is_none_or(|d| d > read_at) {
                    let c = held.entry(e.node).or_default();
                    *c = c.checked_add(&e.capacity).unwrap_or(*c);
                }
            }
        }
        views
            .iter()
            .map(|v| {
                let mut c = Candidate::from(v);
                if let Some(h) = held.get(&c.id) {
                    c.free = c.free.saturating_sub(h);
                }
                c
            })
            .collect()
    }
}

impl Bot {
    /// Every node, as read at most [`VIEWS_FOR`] ago, and when that read started.
    pub(crate) async fn recent_nodes(&self) -> Result<(Arc<Vec<NodeView>>, Instant), BotError> {
        let (at, read) = {
            let mut all = self
                .placements
                .all
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match &*all {
                Some((at, read)) if at.elapsed() < VIEWS_FOR => (*at, read.clone()),
                _ => {
                    let registry = self.registry.clone();
                    let read = async move {
                        crate::bot::nodes_where(&registry, Default::default())
                            .await
                            .map(Arc::new)
                            .map_err(|e| e.to_string())
                    }
                    .boxed()
                    .shared();
                    let at = Instant::now();
                    *all = Some((at, read.clone()));
                    (at, read)
                }
            }
        };
        match read.await {
            Ok(v) => Ok((v, at)),
            Err(e) => {
                // A failed read is not shared beyond those already waiting on it.
                let mut all = self
                    .placements
                    .all
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if all.as_ref().is_some_and(|(t, _)| *t == at) {
                    *all = None;
                }
                Err(BotError::Registry(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfgrid_core::records::{Location, NodeStatus};

    fn view(id: NodeId, mru: u64) -> NodeView {
        let total = Capacity {
            cru: 8,
            mru,
            ..Default::default()
        };
        serde_json::from_value(serde_json::json!({
            "id": id, "farm_id": 1, "twin_id": id + 100,
            "total": total, "reserved": Capacity::default(), "free": total,
            "gpus": [], "location": Location::default(),
            "created_at": 0, "updated_at": 0, "last_seen": 0, "uptime": 0,
            "workload_prefix": "10.0.0.0/24", "status": NodeStatus::Up,
        }))
        .expect("a node view")
    }

    #[test]
    fn a_hold_counts_for_views_read_before_it_ended_and_not_after() {
        let p = Placements::default();
        let gib = 1 << 30;
        let views = vec![view(1, 8 * gib), view(2, 8 * gib)];
        let want = Capacity {
            cru: 1,
            mru: 3 * gib,
            ..Default::default()
        };
        let before = Instant::now();
        let a = p.hold(1, want);
        let b = p.hold(1, want);
        let free = |at| {
            p.candidates(&views, at)
                .into_iter()
                .map(|c| c.free.mru / gib)
                .collect::<Vec<_>>()
        };
        assert_eq!(free(before), [2, 8]);
        drop(a);
        b.discard();
        // A read that started before the contract existed may miss it; one after has it.
        assert_eq!(free(before), [5, 8]);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(free(Instant::now()), [8, 8]);
    }
}
