//! Keeping a pool whole: each pass checks every slot (reachable, and holding its marker); a
//! slot that is new (moved by the bot to another node), lost its namespace, or missed writes
//! gets every record and every shard it should hold, rebuilt from the other slots; shards found
//! missing or altered by reads are rewritten. Reads go on meanwhile from any k good shards.

use crate::codec::{self, StripeMeta};
use crate::meta;
use crate::slot::{Slot, SlotAddr};
use crate::store::{now_ms, Store};
use crate::{Error, Layout};
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use serde::Serialize;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Stripes rebuilt at once.
const REBUILDS_AT_ONCE: usize = 8;
const EVENTS_KEPT: usize = 200;

#[derive(Debug, Clone, Serialize)]
pub struct RepairProgress {
    pub slot: usize,
    pub stripes_done: u64,
    pub stripes: u64,
    pub bytes_written: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub index: usize,
    pub zdb: String,
    /// Answered the last check.
    pub up: bool,
    /// Holds all it should (not waiting for repair).
    pub whole: bool,
    /// Why it waits for repair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub pool: String,
    pub shards: String,
    pub buckets: usize,
    pub objects: usize,
    pub bytes: u64,
    /// Slots that may still be lost without losing data: whole and up slots beyond k.
    pub redundancy: usize,
    pub parity: usize,
    pub healthy: bool,
    pub slots: Vec<SlotStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repairing: Option<RepairProgress>,
    pub repaired_shards: u64,
    pub events: Vec<(i64, String)>,
}

#[derive(Default)]
struct State {
    /// Per slot: why it needs a whole pass (None: it is whole).
    need: Vec<Option<String>>,
    /// Per slot: whether it has never been checked since it got this address (all of it is
    /// missing: no need to ask what it has).
    empty: Vec<bool>,
    /// Per slot: single shards to rewrite (found missing or altered by a read).
    shards: Vec<HashSet<([u8; 16], u32)>>,
    up: Vec<bool>,
    /// Per slot: marks so far. A repair clears the slot's need only if no mark came while it
    /// ran (a write that missed the slot after the repair listed its stripes).
    marks: Vec<u64>,
    progress: Option<RepairProgress>,
    repaired: u64,
    events: VecDeque<(i64, String)>,
}

pub(crate) struct Repair {
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    /// One pass at a time.
    running: tokio::sync::Mutex<()>,
}

impl Repair {
    pub fn new(n: usize) -> Repair {
        Repair {
            state: Mutex::new(State {
                need: vec![None; n],
                empty: vec![false; n],
                shards: vec![HashSet::new(); n],
                up: vec![true; n],
                marks: vec![0; n],
                ..Default::default()
            }),
            wake: tokio::sync::Notify::new(),
            running: tokio::sync::Mutex::new(()),
        }
    }

    pub fn mark(&self, slot: usize, why: &str) {
        let mut s = self.state.lock().unwrap();
        s.marks[slot] += 1;
        if s.need[slot].is_none() {
            s.need[slot] = Some(why.to_string());
            drop(s);
            self.event(format!("slot {slot} needs repair: {why}"));
        }
        self.wake.notify_one();
    }

    fn marks(&self, slot: usize) -> u64 {
        self.state.lock().unwrap().marks[slot]
    }

    /// Clears the slot's need if nothing marked it since `marks` was read; otherwise the next
    /// pass looks again (asking the slot what it has: it is no longer empty).
    fn clear_since(&self, slot: usize, marks: u64) -> bool {
        let mut s = self.state.lock().unwrap();
        s.empty[slot] = false;
        if s.marks[slot] == marks {
            s.need[slot] = None;
            true
        } else {
            false
        }
    }

    pub fn shard_missing(&self, slot: usize, uid: [u8; 16], idx: u32, altered: bool) {
        let new = self.state.lock().unwrap().shards[slot].insert((uid, idx));
        if new && altered {
            self.event(format!(
                "slot {slot}: shard {} of stripe {idx} fails its checksum (altered); it will be rewritten",
                hex::encode(&uid[..4])
            ));
        }
        self.wake.notify_one();
    }

    pub fn event(&self, what: String) {
        tracing::info!("storage: {what}");
        let mut s = self.state.lock().unwrap();
        if s.events.len() == EVENTS_KEPT {
            s.events.pop_front();
        }
        s.events.push_back((now_ms(), what));
    }
}

impl Store {
    /// Points slot `i` at another namespace (the bot moved it to a live node): it starts
    /// empty, and the next pass fills it.
    pub fn replace_slot(&self, i: usize, addr: SlotAddr) -> Result<(), Error> {
        let mut slots = self.slots.write().unwrap();
        let Some(old) = slots.get(i) else {
            return Err(Error::Invalid(format!("no slot {i}")));
        };
        if old.addr == addr {
            return Ok(());
        }
        let from = old.addr.to_string();
        slots[i] = Arc::new(Slot::new(addr.clone()));
        drop(slots);
        {
            let mut s = self.repair.state.lock().unwrap();
            s.empty[i] = true;
            s.shards[i].clear();
            // Its new namespace has not been checked yet: no "answers again" for it.
            s.up[i] = true;
        }
        self.repair
            .event(format!("slot {i} moved from {from} to {addr}"));
        self.repair.mark(i, "moved to a new namespace");
        Ok(())
    }

    pub fn slot_addrs(&self) -> Vec<SlotAddr> {
        self.all_slots().iter().map(|s| s.addr.clone()).collect()
    }

    pub fn status(&self) -> Status {
        let s = self.repair.state.lock().unwrap();
        let index = self.index.read().unwrap();
        let slots: Vec<SlotStatus> = self
            .all_slots()
            .iter()
            .enumerate()
            .map(|(i, slot)| SlotStatus {
                index: i,
                zdb: slot.addr.to_string(),
                up: s.up[i],
                whole: s.need[i].is_none() && s.shards[i].is_empty(),
                repair: s.need[i].clone(),
            })
            .collect();
        let good = slots.iter().filter(|x| x.up && x.whole).count();
        let redundancy = good.saturating_sub(self.layout.k());
        Status {
            pool: self.pool.clone(),
            shards: self.layout.to_string(),
            buckets: index.buckets.len(),
            objects: index.objects.len(),
            bytes: index.objects.values().map(|o| o.size).sum(),
            redundancy,
            parity: usize::from(self.layout.m),
            healthy: redundancy == usize::from(self.layout.m),
            slots,
            repairing: s.progress.clone(),
            repaired_shards: s.repaired,
            events: s.events.iter().cloned().collect(),
        }
    }

    /// Repairs in the background: a pass every `every`, or sooner when something is found
    /// missing. Ends when the store is dropped.
    pub fn spawn_repair(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                if let Err(e) = me.repair_pass().await {
                    me.repair.event(format!("repair pass: {e}"));
                }
                let wait = async {
                    let _ = tokio::time::timeout(every, me.repair.wake.notified()).await;
                };
                wait.await;
                drop(me);
            }
        })
    }

    /// One pass: checks every slot, then brings each reachable slot that needs it up to date.
    pub async fn repair_pass(self: &Arc<Self>) -> Result<(), Error> {
        let _one = self.repair.running.lock().await;
        let slots = self.all_slots();
        let checks = futures::future::join_all(slots.iter().enumerate().map(|(i, s)| async move {
            s.ping().await?;
            let (k, v) = self.marker(i);
            Ok::<bool, Error>(s.get(&k).await?.as_deref() == Some(&v[..]))
        }))
        .await;
        for (i, c) in checks.iter().enumerate() {
            let was = self.repair.state.lock().unwrap().up[i];
            let up = c.is_ok();
            self.repair.state.lock().unwrap().up[i] = up;
            if was != up {
                self.repair.event(match c {
                    Ok(_) => format!("slot {i} ({}) answers again", slots[i].addr),
                    Err(e) => format!("slot {i} is down: {e}"),
                });
            }
            if let Ok(false) = c {
                self.repair
                    .mark(i, "its namespace lacks the pool's marker (new or lost)");
            }
        }
        for (i, c) in checks.iter().enumerate() {
            if c.is_err() {
                continue;
            }
            let need = self.repair.state.lock().unwrap().need[i].clone();
            if need.is_some() {
                self.repair_slot(i).await?;
            }
            let shards: Vec<([u8; 16], u32)> = {
                let mut s = self.repair.state.lock().unwrap();
                std::mem::take(&mut s.shards[i]).into_iter().collect()
            };
            if !shards.is_empty() {
                self.rewrite_shards(i, shards).await?;
            }
        }
        Ok(())
    }

    /// Everything slot `i` should hold: every record, then every shard it lacks.
    async fn repair_slot(self: &Arc<Self>, i: usize) -> Result<(), Error> {
        let slot = self.slot(i);
        let empty = self.repair.state.lock().unwrap().empty[i];
        let marks = self.repair.marks(i);
        let records: Vec<meta::Record> = self
            .index
            .read()
            .unwrap()
            .records
            .values()
            .cloned()
            .collect();
        let wrote: Vec<Result<(), Error>> = stream::iter(records)
            .map(|r| {
                let slot = slot.clone();
                let zkey = r.name.zdb_key(&self.key);
                let value = meta::seal(&self.key, &r);
                async move { slot.set(&zkey, &value).await }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        if let Some(Err(e)) = wrote.into_iter().find(|r| r.is_err()) {
            return Err(e);
        }
        let stripes: Vec<([u8; 16], u32, StripeMeta)> = {
            let index = self.index.read().unwrap();
            index
                .segments()
                .flat_map(|s| {
                    s.stripes
                        .iter()
                        .enumerate()
                        .map(move |(x, m)| (s.uid, x as u32, m.clone()))
                })
                .collect()
        };
        let total = stripes.len() as u64;
        self.repair.state.lock().unwrap().progress = Some(RepairProgress {
            slot: i,
            stripes_done: 0,
            stripes: total,
            bytes_written: 0,
        });
        self.repair.event(format!(
            "repairing slot {i} ({}): {total} stripes to check",
            slot.addr
        ));
        let started = std::time::Instant::now();
        let results: Vec<Result<u64, Error>> = stream::iter(stripes)
            .map(|(uid, idx, m)| {
                let slot = slot.clone();
                async move {
                    let zkey = meta::shard_key(&uid, idx);
                    let written = if empty || !slot.exists(&zkey).await? {
                        let shard = self.rebuild_shard(i, uid, idx, &m).await?;
                        slot.set(&zkey, &shard).await?;
                        shard.len() as u64
                    } else {
                        0
                    };
                    let mut s = self.repair.state.lock().unwrap();
                    if let Some(p) = s.progress.as_mut() {
                        p.stripes_done += 1;
                        p.bytes_written += written;
                    }
                    if written > 0 {
                        s.repaired += 1;
                    }
                    Ok(written)
                }
            })
            .buffer_unordered(REBUILDS_AT_ONCE)
            .collect()
            .await;
        self.repair.state.lock().unwrap().progress = None;
        let mut bytes = 0;
        let mut failed = None;
        for r in results {
            match r {
                Ok(b) => bytes += b,
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            self.repair.event(format!(
                "repair of slot {i} stopped: {e}; it is tried again"
            ));
            return Err(e);
        }
        // The marker last: a slot cut short in repair is found unmarked and repaired again.
        tfgrid_core::faults::crash_point("storage-repair-before-marker");
        self.write_marker(i).await?;
        if !self.repair.clear_since(i, marks) {
            self.repair.wake.notify_one();
        }
        self.repair.event(format!(
            "slot {i} repaired: {total} stripes checked, {} MiB rebuilt in {:.2} s",
            bytes >> 20,
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    async fn rewrite_shards(
        self: &Arc<Self>,
        i: usize,
        shards: Vec<([u8; 16], u32)>,
    ) -> Result<(), Error> {
        let metas: Vec<([u8; 16], u32, StripeMeta)> = {
            let index = self.index.read().unwrap();
            let segs: std::collections::HashMap<[u8; 16], &meta::Segment> =
                index.segments().map(|s| (s.uid, s)).collect();
            shards
                .into_iter()
                .filter_map(|(uid, idx)| {
                    let m = segs.get(&uid)?.stripes.get(idx as usize)?.clone();
                    Some((uid, idx, m))
                })
                .collect()
        };
        let slot = self.slot(i);
        let n = metas.len();
        for (uid, idx, m) in metas {
            let shard = self.rebuild_shard(i, uid, idx, &m).await?;
            slot.set(&meta::shard_key(&uid, idx), &shard).await?;
            self.repair.state.lock().unwrap().repaired += 1;
        }
        if n > 0 {
            self.repair.event(format!("slot {i}: {n} shards rewritten"));
        }
        Ok(())
    }

    /// Shard `i` of a stripe, made from k good shards of the other slots (the data shards
    /// first; the rest only if one of those fails).
    async fn rebuild_shard(
        &self,
        i: usize,
        uid: [u8; 16],
        idx: u32,
        m: &StripeMeta,
    ) -> Result<Bytes, Error> {
        let layout: Layout = self.layout;
        let n = layout.n();
        let k = layout.k();
        let zkey = meta::shard_key(&uid, idx);
        let slots = self.all_slots();
        let order: Vec<usize> = (0..n).filter(|&j| j != i).collect();
        let mut shards: Vec<Option<Bytes>> = vec![None; n];
        let (first, rest) = order.split_at(k.min(order.len()));
        for batch in [first, rest] {
            let got = futures::future::join_all(batch.iter().map(|&j| slots[j].get(&zkey))).await;
            for (&j, g) in batch.iter().zip(got) {
                if let Ok(Some(b)) = g {
                    if codec::sum(&b) == m.sums[j] {
                        shards[j] = Some(b);
                    }
                }
            }
            if shards.iter().filter(|s| s.is_some()).count() >= k {
                break;
            }
        }
        let m = m.clone();
        tokio::task::spawn_blocking(move || codec::rebuild(&m, &shards, layout, &[i]))
            .await
            .map_err(|e| Error::Invalid(format!("rebuilding: {e}")))?
            .map(|mut v| v.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::Repair;

    #[test]
    fn a_mark_during_a_repair_keeps_the_slot_marked() {
        let r = Repair::new(3);
        r.mark(1, "moved");
        let at_start = r.marks(1);
        // A write misses slot 1 while its repair runs.
        r.mark(1, "missed a shard");
        assert!(!r.clear_since(1, at_start));
        assert!(r.state.lock().unwrap().need[1].is_some());
        // The next repair, with no mark meanwhile, clears it.
        let again = r.marks(1);
        assert!(r.clear_since(1, again));
        assert!(r.state.lock().unwrap().need[1].is_none());
        assert!(!r.state.lock().unwrap().empty[1]);
    }
}
