//! The store: its slots, its index of records (in memory, rebuilt from the slots at open), and
//! objects in and out.

use crate::codec::{self, Layout, StripeMeta};
use crate::keys::StorageKey;
use crate::meta::{self, Body, Name, ObjectMeta, Record, Segment};
use crate::repair::Repair;
use crate::slot::{Slot, SlotAddr};
use crate::Error;
use bytes::Bytes;
use futures::stream::{self, FuturesOrdered, StreamExt};
use futures::Stream;
use md5::{Digest, Md5};
use rand::RngCore;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Objects up to this size live inside their metadata record (on every slot) instead of in
/// shards: one write per slot instead of two, which is what makes small PUTs fast.
pub(crate) const INLINE_MAX: usize = 16 << 10;
/// Stripes sealed and written at once by one PUT, and read ahead by one GET.
const IN_FLIGHT: usize = 4;
/// Metadata records read at once from one slot at open.
const READS_AT_ONCE: usize = 64;

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The pool's name: part of every slot's marker.
    pub name: String,
    pub layout: Layout,
    /// Slot i holds shard i of every stripe; `layout.n()` of them.
    pub slots: Vec<SlotAddr>,
    /// Plain bytes per stripe.
    pub stripe_size: usize,
}

impl PoolConfig {
    /// Stripes of 4 MiB (shards of 4 MiB / k): small enough to stay in cache while they are
    /// sealed and coded (16 MiB stripes of 16+4 halved the codec's speed), large enough that
    /// requests per byte are few.
    pub fn default_stripe(layout: Layout) -> usize {
        let _ = layout;
        4 << 20
    }
}

#[derive(Default)]
pub(crate) struct Index {
    pub buckets: BTreeMap<String, i64>,
    pub objects: BTreeMap<(String, String), ObjectMeta>,
    pub uploads: BTreeMap<String, meta::UploadMeta>,
    pub parts: BTreeMap<(String, u32), meta::PartMeta>,
    /// The newest record of every name, deleted ones too (repair writes them to new slots).
    pub records: HashMap<Name, Record>,
}

impl Index {
    /// Takes `rec` if it is newer than what the index has; answers whether it did.
    pub fn apply(&mut self, rec: Record) -> bool {
        if let Some(have) = self.records.get(&rec.name) {
            if have.seq >= rec.seq {
                return false;
            }
        }
        match (&rec.name, &rec.body) {
            (Name::Bucket(b), Body::Bucket { created_ms }) => {
                self.buckets.insert(b.clone(), *created_ms);
            }
            (Name::Bucket(b), _) => {
                self.buckets.remove(b);
            }
            (Name::Object(b, k), Body::Object(o)) => {
                self.objects.insert((b.clone(), k.clone()), o.clone());
            }
            (Name::Object(b, k), _) => {
                self.objects.remove(&(b.clone(), k.clone()));
            }
            (Name::Upload(u), Body::Upload(m)) => {
                self.uploads.insert(u.clone(), m.clone());
            }
            (Name::Upload(u), _) => {
                self.uploads.remove(u);
            }
            (Name::Part(u, n), Body::Part(p)) => {
                self.parts.insert((u.clone(), *n), p.clone());
            }
            (Name::Part(u, n), _) => {
                self.parts.remove(&(u.clone(), *n));
            }
        }
        self.records.insert(rec.name.clone(), rec);
        true
    }

    /// Every segment a live record refers to.
    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.objects
            .values()
            .flat_map(|o| o.segments.iter())
            .chain(self.parts.values().map(|p| &p.segment))
    }
}

pub struct Store {
    pub(crate) key: StorageKey,
    pub(crate) pool: String,
    pub(crate) layout: Layout,
    pub(crate) stripe_size: usize,
    pub(crate) slots: RwLock<Vec<Arc<Slot>>>,
    pub(crate) index: RwLock<Index>,
    seq: AtomicU64,
    /// Segments being written: the orphan sweep leaves their shards alone.
    pub(crate) pending: Mutex<HashSet<[u8; 16]>>,
    pub(crate) repair: Repair,
}

/// One entry of a listing.
#[derive(Debug, Clone)]
pub enum Listed {
    Object {
        key: String,
        size: u64,
        etag: String,
        modified_ms: i64,
    },
    Prefix(String),
}

#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub entries: Vec<Listed>,
    /// The last key or prefix listed, when more follow.
    pub next: Option<String>,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(crate) fn new_uid() -> [u8; 16] {
    let mut u = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut u);
    u
}

impl Store {
    /// Opens a pool: reads every record from the slots that answer (at least m + 1, so the
    /// newest of every record is among them), removes shards no record refers to (left by a
    /// write cut short), and marks slots that lack their marker for repair.
    pub async fn open(key: StorageKey, cfg: PoolConfig) -> Result<Arc<Store>, Error> {
        if cfg.slots.len() != cfg.layout.n() {
            return Err(Error::Invalid(format!(
                "pool {}: {} slots for shards {}",
                cfg.name,
                cfg.slots.len(),
                cfg.layout
            )));
        }
        if cfg.stripe_size == 0 || cfg.stripe_size / cfg.layout.k() > 4 << 20 {
            return Err(Error::Invalid(format!(
                "stripe size {}: shards must be at most 4 MiB",
                cfg.stripe_size
            )));
        }
        let slots: Vec<Arc<Slot>> = cfg
            .slots
            .iter()
            .cloned()
            .map(|a| Arc::new(Slot::new(a)))
            .collect();
        let store = Arc::new(Store {
            key,
            pool: cfg.name.clone(),
            layout: cfg.layout,
            stripe_size: cfg.stripe_size,
            slots: RwLock::new(slots.clone()),
            index: RwLock::default(),
            seq: AtomicU64::new(0),
            pending: Mutex::default(),
            repair: Repair::new(cfg.layout.n()),
        });
        let scans = futures::future::join_all((0..slots.len()).map(|i| store.scan_slot(i))).await;
        let need = usize::from(cfg.layout.m) + 1;
        let answered = scans.iter().filter(|s| s.is_ok()).count();
        if answered < need {
            let why = scans
                .iter()
                .filter_map(|s| s.as_ref().err().map(|e| e.to_string()))
                .next()
                .unwrap_or_default();
            return Err(Error::Quorum {
                have: answered,
                need,
                why,
            });
        }
        let mut shard_keys = Vec::new();
        let mut unopened = 0;
        let mut unmarked = Vec::new();
        {
            let mut index = store.index.write().unwrap();
            let mut max = 0;
            for (i, scan) in scans.into_iter().enumerate() {
                let Ok(scan) = scan else {
                    store.repair.mark(i, "did not answer at open");
                    continue;
                };
                for rec in scan.records {
                    max = max.max(rec.seq);
                    index.apply(rec);
                }
                if !scan.marker {
                    unmarked.push(i);
                }
                unopened += scan.corrupt;
                if scan.corrupt > 0 {
                    store.repair.mark(
                        i,
                        &format!("{} metadata records fail authentication", scan.corrupt),
                    );
                }
                shard_keys.push((i, scan.shards));
            }
            store.seq.store(max, Ordering::SeqCst);
        }
        if unopened > 0 && store.index.read().unwrap().records.is_empty() {
            return Err(Error::Corrupt(format!(
                "pool {}: none of its {unopened} metadata records opens with this key (another key's store, or every record altered)",
                store.pool
            )));
        }
        // A pool that holds nothing: a slot without its marker has nothing to be rebuilt, and
        // gets the marker now. Otherwise such a slot is new or lost its namespace: repair.
        let empty = store.index.read().unwrap().records.is_empty()
            && unopened == 0
            && shard_keys.iter().all(|(_, s)| s.is_empty());
        for i in unmarked {
            if !(empty && store.write_marker(i).await.is_ok()) {
                store.repair.mark(
                    i,
                    "has no marker (a new namespace, or one that lost its data)",
                );
            }
        }
        // Records that do not open may be another key's (a wrong key) or altered: until repair
        // has rewritten them, no shard is taken for an orphan.
        if unopened == 0 {
            store.sweep_orphans(shard_keys).await;
        }
        store.repair.event(format!(
            "opened pool {} ({}): {} buckets, {} objects",
            store.pool,
            store.layout,
            store.index.read().unwrap().buckets.len(),
            store.index.read().unwrap().objects.len()
        ));
        Ok(store)
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    pub(crate) fn slot(&self, i: usize) -> Arc<Slot> {
        self.slots.read().unwrap()[i].clone()
    }

    pub(crate) fn all_slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().unwrap().clone()
    }

    pub(crate) fn marker(&self, i: usize) -> (Vec<u8>, Vec<u8>) {
        (
            b"_tfgrid_slot".to_vec(),
            format!("{} {}", self.pool, i).into_bytes(),
        )
    }

    pub(crate) async fn write_marker(&self, i: usize) -> Result<(), Error> {
        let (k, v) = self.marker(i);
        self.slot(i).set(&k, &v).await
    }

    fn next_seq(&self) -> u64 {
        let now = now_ns();
        let mut cur = self.seq.load(Ordering::SeqCst);
        loop {
            let next = now.max(cur + 1);
            match self
                .seq
                .compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next,
                Err(c) => cur = c,
            }
        }
    }

    /// Writes a record to every slot; it counts once k slots have it (so a reader of any
    /// m + 1 slots sees it). Slots that missed it are marked for repair.
    pub(crate) async fn put_record(&self, name: Name, body: Body) -> Result<Record, Error> {
        let rec = Record {
            seq: self.next_seq(),
            name,
            body,
        };
        let zkey = rec.name.zdb_key(&self.key);
        let value = meta::seal(&self.key, &rec);
        let slots = self.all_slots();
        let results = futures::future::join_all(slots.iter().map(|s| s.set(&zkey, &value))).await;
        self.count_writes(&results, "a metadata record")?;
        Ok(rec)
    }

    pub(crate) fn count_writes(
        &self,
        results: &[Result<(), Error>],
        what: &str,
    ) -> Result<(), Error> {
        let ok = results.iter().filter(|r| r.is_ok()).count();
        for (i, r) in results.iter().enumerate() {
            if let Err(e) = r {
                self.repair.mark(i, &format!("missed {what}: {e}"));
            }
        }
        let need = self.layout.k();
        if ok < need {
            let why = results
                .iter()
                .find_map(|r| r.as_ref().err().map(|e| e.to_string()))
                .unwrap_or_default();
            return Err(Error::Quorum {
                have: ok,
                need,
                why: format!("writing {what}: {why}"),
            });
        }
        Ok(())
    }

    /// Applies a record this store wrote; answers the segments it made unreachable (an
    /// overwritten object's) for the caller to delete.
    pub(crate) fn apply(&self, rec: Record) -> Vec<Segment> {
        let mut index = self.index.write().unwrap();
        let old: Vec<Segment> = match &rec.name {
            Name::Object(b, k) => index
                .objects
                .get(&(b.clone(), k.clone()))
                .map(|o| o.segments.clone())
                .unwrap_or_default(),
            Name::Part(u, n) => index
                .parts
                .get(&(u.clone(), *n))
                .map(|p| vec![p.segment.clone()])
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let keep: HashSet<[u8; 16]> = match &rec.body {
            Body::Object(o) => o.segments.iter().map(|s| s.uid).collect(),
            Body::Part(p) => [p.segment.uid].into(),
            _ => HashSet::new(),
        };
        if !index.apply(rec) {
            return Vec::new();
        }
        old.into_iter().filter(|s| !keep.contains(&s.uid)).collect()
    }

    // ---- buckets ----

    pub async fn create_bucket(&self, bucket: &str) -> Result<(), Error> {
        check_bucket(bucket)?;
        if self.index.read().unwrap().buckets.contains_key(bucket) {
            return Err(Error::BucketExists(bucket.into()));
        }
        let rec = self
            .put_record(
                Name::Bucket(bucket.into()),
                Body::Bucket {
                    created_ms: now_ms(),
                },
            )
            .await?;
        self.apply(rec);
        Ok(())
    }

    pub async fn delete_bucket(&self, bucket: &str) -> Result<(), Error> {
        {
            let index = self.index.read().unwrap();
            if !index.buckets.contains_key(bucket) {
                return Err(Error::NoSuchBucket(bucket.into()));
            }
            let has = index
                .objects
                .range((bucket.to_string(), String::new())..)
                .next()
                .is_some_and(|((b, _), _)| b == bucket);
            if has || index.uploads.values().any(|u| u.bucket == bucket) {
                return Err(Error::BucketNotEmpty(bucket.into()));
            }
        }
        let rec = self
            .put_record(Name::Bucket(bucket.into()), Body::Gone)
            .await?;
        self.apply(rec);
        Ok(())
    }

    pub fn buckets(&self) -> Vec<(String, i64)> {
        let index = self.index.read().unwrap();
        index.buckets.iter().map(|(b, t)| (b.clone(), *t)).collect()
    }

    pub fn has_bucket(&self, bucket: &str) -> bool {
        self.index.read().unwrap().buckets.contains_key(bucket)
    }

    pub(crate) fn need_bucket(&self, bucket: &str) -> Result<(), Error> {
        if self.has_bucket(bucket) {
            Ok(())
        } else {
            Err(Error::NoSuchBucket(bucket.into()))
        }
    }

    // ---- objects ----

    /// Stores `body` as one segment: stripes sealed and written `IN_FLIGHT` at a time. On an
    /// error, the shards written so far are deleted (and a crash leaves them to the sweep at the
    /// next open). Answers the segment and the body's MD5 (or the bytes, when small enough to
    /// live in the record).
    pub(crate) async fn write_segment<S, E>(
        self: &Arc<Self>,
        body: S,
        inline: bool,
    ) -> Result<(SegmentOrInline, [u8; 16]), Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let uid = new_uid();
        self.pending.lock().unwrap().insert(uid);
        let mut started = 0;
        let r = self
            .write_segment_inner(uid, body, inline, &mut started)
            .await;
        if r.is_err() {
            self.delete_segment_shards(uid, started).await;
        }
        self.pending.lock().unwrap().remove(&uid);
        r
    }

    async fn write_segment_inner<S, E>(
        self: &Arc<Self>,
        uid: [u8; 16],
        mut body: S,
        inline: bool,
        started: &mut u32,
    ) -> Result<(SegmentOrInline, [u8; 16]), Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut md5 = BodyMd5::Here(Md5::new());
        let room = codec::seal_room(self.layout);
        let new_buf = || Vec::with_capacity(self.stripe_size + room);
        let mut buf = new_buf();
        let mut writes = FuturesOrdered::new();
        let mut stripes: Vec<StripeMeta> = Vec::new();
        let mut idx: u32 = 0;
        let mut first = true;
        loop {
            let chunk = match body.next().await {
                Some(Ok(c)) => Some(c),
                Some(Err(e)) => return Err(Error::Invalid(format!("reading the body: {e}"))),
                None => None,
            };
            let done = chunk.is_none();
            if let Some(c) = chunk {
                md5.update(&c, !first);
                let mut c = &c[..];
                while !c.is_empty() {
                    let take = c.len().min(self.stripe_size - buf.len());
                    buf.extend_from_slice(&c[..take]);
                    c = &c[take..];
                    if buf.len() == self.stripe_size {
                        let stripe = std::mem::replace(&mut buf, new_buf());
                        writes.push_back(self.clone().write_stripe(uid, idx, stripe));
                        idx += 1;
                        *started = idx;
                        first = false;
                        while writes.len() >= IN_FLIGHT {
                            stripes.push(writes.next().await.unwrap()?);
                        }
                    }
                }
            }
            if done {
                break;
            }
        }
        let md5 = md5.finish().await?;
        if inline && first && buf.len() <= INLINE_MAX {
            return Ok((SegmentOrInline::Inline(buf), md5));
        }
        if !buf.is_empty() {
            writes.push_back(self.clone().write_stripe(uid, idx, buf));
            *started = idx + 1;
        }
        while let Some(s) = writes.next().await {
            stripes.push(s?);
        }
        Ok((
            SegmentOrInline::Segment(Segment {
                uid,
                stripe_size: self.stripe_size as u32,
                stripes,
            }),
            md5,
        ))
    }

    async fn write_stripe(
        self: Arc<Self>,
        uid: [u8; 16],
        idx: u32,
        plain: Vec<u8>,
    ) -> Result<StripeMeta, Error> {
        let key = self.key.segment_key(&uid);
        let layout = self.layout;
        let enc = tokio::task::spawn_blocking(move || codec::seal_owned(&key, idx, plain, layout))
            .await
            .map_err(|e| Error::Invalid(format!("sealing: {e}")))??;
        let zkey = meta::shard_key(&uid, idx);
        let slots = self.all_slots();
        let results = futures::future::join_all(
            slots
                .iter()
                .zip(&enc.shards)
                .map(|(s, shard)| s.set(&zkey, shard)),
        )
        .await;
        self.count_writes(&results, "a shard")?;
        Ok(enc.meta)
    }

    /// Deletes the shards of a segment's first `stripes` stripes from every slot (best effort:
    /// what a slot misses, the sweep at the next open removes).
    pub(crate) async fn delete_segment_shards(&self, uid: [u8; 16], stripes: u32) {
        let slots = self.all_slots();
        // Collected first: a lazy iterator of borrows inside the stream makes the future not
        // `Send` for every lifetime (a rustc limitation).
        let dels: Vec<(Arc<Slot>, [u8; 21])> = (0..stripes)
            .flat_map(|idx| {
                slots
                    .iter()
                    .map(move |s| (s.clone(), meta::shard_key(&uid, idx)))
            })
            .collect();
        let _: Vec<_> = stream::iter(dels)
            .map(|(s, zkey)| async move { s.del(&zkey).await })
            .buffer_unordered(READS_AT_ONCE)
            .collect()
            .await;
    }

    pub(crate) fn forget_segments(self: &Arc<Self>, segments: Vec<Segment>) {
        if segments.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            for s in segments {
                me.delete_segment_shards(s.uid, s.stripes.len() as u32)
                    .await;
            }
        });
    }

    pub async fn put_object<S, E>(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        body: S,
        content_type: Option<String>,
        user: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.need_bucket(bucket)?;
        check_key(key)?;
        let (seg, md5) = self.write_segment(body, true).await?;
        let (segments, inline, size) = match seg {
            SegmentOrInline::Inline(b) => (Vec::new(), Some(b.clone()), b.len() as u64),
            SegmentOrInline::Segment(s) => {
                // A bot killed here leaves shards no record names: the next open sweeps them.
                tfgrid_core::faults::crash_point("storage-put-after-shards");
                let n = s.len();
                (vec![s], None, n)
            }
        };
        let o = ObjectMeta {
            size,
            etag: hex::encode(md5),
            content_type,
            modified_ms: now_ms(),
            segments,
            inline,
            user,
        };
        self.commit_object(bucket, key, o).await
    }

    pub(crate) async fn commit_object(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        o: ObjectMeta,
    ) -> Result<ObjectMeta, Error> {
        let name = Name::Object(bucket.into(), key.into());
        let rec = match self.put_record(name, Body::Object(o.clone())).await {
            Ok(r) => r,
            Err(e) => {
                self.forget_segments(o.segments.clone());
                return Err(e);
            }
        };
        let old = self.apply(rec);
        self.forget_segments(old);
        Ok(o)
    }

    pub fn head(&self, bucket: &str, key: &str) -> Result<ObjectMeta, Error> {
        self.need_bucket(bucket)?;
        self.index
            .read()
            .unwrap()
            .objects
            .get(&(bucket.to_string(), key.to_string()))
            .cloned()
            .ok_or_else(|| Error::NoSuchKey(key.into()))
    }

    /// The bytes `range` (end excluded) of an object, as a stream that reads `IN_FLIGHT`
    /// stripes ahead.
    pub fn read(
        self: &Arc<Self>,
        o: &ObjectMeta,
        range: std::ops::Range<u64>,
    ) -> impl Stream<Item = Result<Bytes, Error>> + Send + 'static {
        let mut parts = Vec::new();
        if let Some(b) = &o.inline {
            let s = (range.start as usize).min(b.len());
            let e = (range.end as usize).min(b.len());
            parts.push(Piece::Inline(Bytes::copy_from_slice(&b[s..e])));
        } else {
            let mut at = 0u64;
            for seg in &o.segments {
                for (i, st) in seg.stripes.iter().enumerate() {
                    let end = at + u64::from(st.len);
                    if end > range.start && at < range.end {
                        let from = range.start.saturating_sub(at) as usize;
                        let to = (range.end.min(end) - at) as usize;
                        parts.push(Piece::Stripe {
                            uid: seg.uid,
                            idx: i as u32,
                            meta: st.clone(),
                            from,
                            to,
                        });
                    }
                    at = end;
                }
            }
        }
        let me = self.clone();
        stream::iter(parts)
            .map(move |p| {
                let me = me.clone();
                async move {
                    match p {
                        Piece::Inline(b) => Ok(b),
                        Piece::Stripe {
                            uid,
                            idx,
                            meta,
                            from,
                            to,
                        } => {
                            let plain = me.read_stripe(uid, idx, &meta).await?;
                            Ok(plain.slice(from..to))
                        }
                    }
                }
            })
            .buffered(IN_FLIGHT)
    }

    /// Fetches the data shards first; only when one is missing or altered are the parity
    /// shards fetched too, and the stripe decoded from any k good ones.
    pub(crate) async fn read_stripe(
        &self,
        uid: [u8; 16],
        idx: u32,
        meta: &StripeMeta,
    ) -> Result<Bytes, Error> {
        let k = self.layout.k();
        let n = self.layout.n();
        let zkey = meta::shard_key(&uid, idx);
        let slots = self.all_slots();
        let mut shards: Vec<Option<Bytes>> = vec![None; n];
        let got = futures::future::join_all(slots[..k].iter().map(|s| s.get(&zkey))).await;
        let mut whole = true;
        for (i, g) in got.into_iter().enumerate() {
            match g {
                Ok(Some(b)) if codec::sum(&b) == meta.sums[i] => shards[i] = Some(b),
                Ok(Some(b)) => {
                    whole = false;
                    shards[i] = Some(b);
                }
                _ => whole = false,
            }
        }
        if !whole {
            let got = futures::future::join_all(slots[k..].iter().map(|s| s.get(&zkey))).await;
            for (i, g) in got.into_iter().enumerate() {
                if let Ok(Some(b)) = g {
                    shards[k + i] = Some(b);
                }
            }
        }
        let key = self.key.segment_key(&uid);
        let layout = self.layout;
        let meta = meta.clone();
        let opened = tokio::task::spawn_blocking(move || {
            codec::open(&key, idx, &meta, &shards, layout).map(|o| (o, shards))
        })
        .await
        .map_err(|e| Error::Invalid(format!("opening: {e}")))?;
        let (o, shards) = opened?;
        for (i, s) in shards.iter().enumerate() {
            // A parity shard not asked for is not known to be missing.
            if (s.is_none() || o.bad.contains(&i)) && (i < k || !whole) {
                self.repair.shard_missing(i, uid, idx, o.bad.contains(&i));
            }
        }
        Ok(Bytes::from(o.plain))
    }

    pub async fn delete_object(self: &Arc<Self>, bucket: &str, key: &str) -> Result<(), Error> {
        self.need_bucket(bucket)?;
        let exists = self
            .index
            .read()
            .unwrap()
            .objects
            .contains_key(&(bucket.to_string(), key.to_string()));
        if !exists {
            // S3 answers a delete of what is not there with success.
            return Ok(());
        }
        let rec = self
            .put_record(Name::Object(bucket.into(), key.into()), Body::Gone)
            .await?;
        let old = self.apply(rec);
        self.forget_segments(old);
        Ok(())
    }

    /// Keys after `after` that start with `prefix`, keys sharing a part up to `delimiter`
    /// folded into one prefix, at most `max` entries.
    pub fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&str>,
        max: usize,
    ) -> Result<ListPage, Error> {
        self.need_bucket(bucket)?;
        let index = self.index.read().unwrap();
        let start = (bucket.to_string(), prefix.to_string());
        let mut page = ListPage::default();
        let mut last_prefix: Option<String> = None;
        for ((b, k), o) in index.objects.range(start..) {
            if b != bucket || !k.starts_with(prefix) {
                break;
            }
            if let Some(a) = after {
                if k.as_str() <= a {
                    continue;
                }
            }
            let folded = delimiter.filter(|d| !d.is_empty()).and_then(|d| {
                k[prefix.len()..]
                    .find(d)
                    .map(|at| k[..prefix.len() + at + d.len()].to_string())
            });
            if let Some(p) = folded {
                if last_prefix.as_deref() == Some(p.as_str()) {
                    continue;
                }
                if let Some(a) = after {
                    // A prefix listed on an earlier page: `after` is within it.
                    if a.starts_with(&p) {
                        continue;
                    }
                }
                if page.entries.len() == max {
                    page.next = last_key(&page);
                    return Ok(page);
                }
                last_prefix = Some(p.clone());
                page.entries.push(Listed::Prefix(p));
                continue;
            }
            if page.entries.len() == max {
                page.next = last_key(&page);
                return Ok(page);
            }
            page.entries.push(Listed::Object {
                key: k.clone(),
                size: o.size,
                etag: o.etag.clone(),
                modified_ms: o.modified_ms,
            });
        }
        Ok(page)
    }
}

fn last_key(page: &ListPage) -> Option<String> {
    page.entries.last().map(|e| match e {
        Listed::Object { key, .. } => key.clone(),
        Listed::Prefix(p) => p.clone(),
    })
}

/// The body's MD5 (the ETag clients check). It is sequential and costs as much as sealing, so
/// once a body is past its first stripe the hashing moves to a thread of its own, fed the
/// chunks, while stripes are sealed beside it; a small body is hashed where it is read (a
/// thread per small PUT cost a fifth of their rate).
enum BodyMd5 {
    Here(Md5),
    Thread(
        std::sync::mpsc::Sender<Bytes>,
        tokio::task::JoinHandle<[u8; 16]>,
    ),
}

impl BodyMd5 {
    fn update(&mut self, chunk: &Bytes, large: bool) {
        if let (BodyMd5::Here(h), true) = (&*self, large) {
            let mut h = h.clone();
            let (tx, rx) = std::sync::mpsc::channel::<Bytes>();
            let task = tokio::task::spawn_blocking(move || {
                for c in rx {
                    h.update(&c);
                }
                <[u8; 16]>::from(h.finalize())
            });
            *self = BodyMd5::Thread(tx, task);
        }
        match self {
            BodyMd5::Here(h) => h.update(chunk),
            BodyMd5::Thread(tx, _) => {
                let _ = tx.send(chunk.clone());
            }
        }
    }

    async fn finish(self) -> Result<[u8; 16], Error> {
        match self {
            BodyMd5::Here(h) => Ok(h.finalize().into()),
            BodyMd5::Thread(tx, task) => {
                drop(tx);
                task.await
                    .map_err(|e| Error::Invalid(format!("hashing the body: {e}")))
            }
        }
    }
}

pub(crate) enum SegmentOrInline {
    Segment(Segment),
    Inline(Vec<u8>),
}

enum Piece {
    Inline(Bytes),
    Stripe {
        uid: [u8; 16],
        idx: u32,
        meta: StripeMeta,
        from: usize,
        to: usize,
    },
}

/// What a slot holds, read at open.
pub(crate) struct Scan {
    pub records: Vec<Record>,
    pub shards: Vec<Vec<u8>>,
    pub marker: bool,
    pub corrupt: usize,
}

impl Store {
    pub(crate) async fn scan_slot(&self, i: usize) -> Result<Scan, Error> {
        let slot = &self.slot(i);
        let keys = slot.keys().await?;
        let (marker_key, marker_value) = self.marker(i);
        let mut marker = false;
        let mut metas = Vec::new();
        let mut shards = Vec::new();
        for k in keys {
            if k == marker_key {
                marker = slot.get(&k).await?.as_deref() == Some(&marker_value[..]);
            } else if k.first() == Some(&meta::META) {
                metas.push(k);
            } else if k.first() == Some(&meta::SHARD) {
                shards.push(k);
            }
        }
        type Got = (Vec<u8>, Result<Option<Bytes>, Error>);
        let got: Vec<Got> = stream::iter(metas)
            .map(|k| async move {
                let v = slot.get(&k).await;
                (k, v)
            })
            .buffer_unordered(READS_AT_ONCE)
            .collect()
            .await;
        let mut records = Vec::new();
        let mut corrupt = 0;
        for (k, v) in got {
            if let Some(v) = v? {
                match meta::open(&self.key, &k, &v) {
                    Ok(r) => records.push(r),
                    Err(e) => {
                        tracing::warn!(slot = %slot.addr, "{e}");
                        corrupt += 1;
                    }
                }
            }
        }
        Ok(Scan {
            records,
            shards,
            marker,
            corrupt,
        })
    }

    /// Deletes shards that no record refers to: left by a PUT or a delete cut short.
    pub(crate) async fn sweep_orphans(&self, shard_keys: Vec<(usize, Vec<Vec<u8>>)>) {
        let live: HashSet<[u8; 16]> = {
            let index = self.index.read().unwrap();
            index.segments().map(|s| s.uid).collect()
        };
        let pending = self.pending.lock().unwrap().clone();
        let mut swept = 0;
        for (i, keys) in shard_keys {
            let slot = self.slot(i);
            let orphans: Vec<Vec<u8>> = keys
                .into_iter()
                .filter(|k| {
                    meta::shard_uid(k).is_some_and(|u| !live.contains(&u) && !pending.contains(&u))
                })
                .collect();
            swept += orphans.len();
            let _: Vec<_> = stream::iter(orphans)
                .map(|k| {
                    let slot = slot.clone();
                    async move { slot.del(&k).await }
                })
                .buffer_unordered(READS_AT_ONCE)
                .collect()
                .await;
        }
        if swept > 0 {
            self.repair
                .event(format!("removed {swept} shards no object refers to"));
        }
    }
}

pub(crate) fn check_bucket(b: &str) -> Result<(), Error> {
    let ok = (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && b.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "bucket name {b:?}: 3 to 63 of a-z, 0-9, '-' and '.', starting with a letter or digit"
        )))
    }
}

pub(crate) fn check_key(k: &str) -> Result<(), Error> {
    if k.is_empty() || k.len() > 1024 {
        return Err(Error::Invalid(format!(
            "object key of {} bytes: 1 to 1024",
            k.len()
        )));
    }
    Ok(())
}
