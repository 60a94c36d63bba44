//! The store against real zdb servers on loopback.

mod common;

use bytes::Bytes;
use common::{keys, pool, Pool, Zdb};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tfgrid_storage::{Error, StorageKey, Store};

fn body(data: &[u8]) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
    // Chunks of odd sizes, as a network delivers them.
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(70_001)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(chunks)
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

async fn read_all(store: &Arc<Store>, bucket: &str, key: &str) -> Result<Vec<u8>, Error> {
    let o = store.head(bucket, key)?;
    let mut s = Box::pin(store.read(&o, 0..o.size));
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

async fn put(store: &Arc<Store>, bucket: &str, key: &str, data: &[u8]) {
    store
        .put_object(bucket, key, body(data), None, BTreeMap::new())
        .await
        .unwrap();
}

/// Objects of every shape: empty, inline, one short stripe, many stripes with a short last one,
/// compressible.
fn objects() -> Vec<(String, Vec<u8>)> {
    vec![
        ("empty".into(), Vec::new()),
        ("small".into(), random(4096, 1)),
        ("one-stripe".into(), random(100_000, 2)),
        ("many/stripes".into(), random(3 * 262_144 + 12_345, 3)),
        ("many/text".into(), b"tfgrid ".repeat(200_000)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_read_back_whole_and_in_ranges_and_list_and_delete() {
    let p = pool(4, 2, 262_144);
    let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    assert!(matches!(
        store
            .put_object("nob", "x", body(b"x"), None, BTreeMap::new())
            .await,
        Err(Error::NoSuchBucket(_))
    ));
    store.create_bucket("photos").await.unwrap();
    assert!(matches!(
        store.create_bucket("photos").await,
        Err(Error::BucketExists(_))
    ));
    assert!(matches!(
        store.create_bucket("No_Such").await,
        Err(Error::Invalid(_))
    ));
    for (k, v) in objects() {
        put(&store, "photos", &k, &v).await;
    }
    for (k, v) in objects() {
        assert_eq!(read_all(&store, "photos", &k).await.unwrap(), v, "{k}");
        let o = store.head("photos", &k).unwrap();
        assert_eq!(o.size, v.len() as u64);
        assert_eq!(o.etag, hex::encode(md5_of(&v)));
    }
    // Ranges across stripe edges.
    let big = random(3 * 262_144 + 12_345, 3);
    let o = store.head("photos", "many/stripes").unwrap();
    for r in [
        0..1,
        262_140..262_150,
        100..700_000,
        786_000..big.len() as u64,
    ] {
        let got: Vec<u8> = store
            .read(&o, r.clone())
            .map(|c| c.unwrap().to_vec())
            .concat()
            .await;
        assert_eq!(got, &big[r.start as usize..r.end as usize]);
    }
    // Listing: a delimiter folds "many/", pages continue after their last entry.
    let page = store.list("photos", "", Some("/"), None, 1000).unwrap();
    let names: Vec<String> = page.entries.iter().map(listed).collect();
    assert_eq!(names, ["empty", "many/", "one-stripe", "small"]);
    let page = store.list("photos", "many/", None, None, 1).unwrap();
    assert_eq!(page.next.as_deref(), Some("many/stripes"));
    let page = store
        .list("photos", "many/", None, page.next.as_deref(), 1)
        .unwrap();
    assert_eq!(
        page.entries.iter().map(listed).collect::<Vec<_>>(),
        ["many/text"]
    );
    // Overwrite, delete; a bucket with objects is not deleted.
    put(&store, "photos", "small", b"new").await;
    assert_eq!(read_all(&store, "photos", "small").await.unwrap(), b"new");
    assert!(matches!(
        store.delete_bucket("photos").await,
        Err(Error::BucketNotEmpty(_))
    ));
    for (k, _) in objects() {
        store.delete_object("photos", &k).await.unwrap();
    }
    assert!(matches!(
        read_all(&store, "photos", "small").await,
        Err(Error::NoSuchKey(_))
    ));
    store.delete_bucket("photos").await.unwrap();
    // Deleted objects' shards are gone from every slot (deletes run in the background).
    let mut left = usize::MAX;
    for _ in 0..50 {
        left = shard_count(&p);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "shards left behind after every object was deleted");
}

fn listed(e: &tfgrid_storage::Listed) -> String {
    match e {
        tfgrid_storage::Listed::Object { key, .. } => key.clone(),
        tfgrid_storage::Listed::Prefix(p) => p.clone(),
    }
}

fn md5_of(d: &[u8]) -> [u8; 16] {
    use md5::Digest;
    md5::Md5::digest(d).into()
}

/// Shard keys on all slots.
fn shard_count(p: &Pool) -> usize {
    p.zdbs
        .iter()
        .zip(&p.cfg.slots)
        .filter(|(z, _)| z.rt.is_some())
        .map(|(z, s)| keys(&mut z.conn(s)).iter().filter(|k| k[0] == b's').count())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_m_slots_loses_nothing_and_repair_restores_full_redundancy() {
    let mut p = pool(4, 2, 262_144);
    let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    store.create_bucket("bkt").await.unwrap();
    for (k, v) in objects() {
        put(&store, "bkt", &k, &v).await;
    }
    // Two nodes die: a data slot and a parity slot.
    p.zdbs[1].kill();
    p.zdbs[4].kill();
    for (k, v) in objects() {
        assert_eq!(
            read_all(&store, "bkt", &k).await.unwrap(),
            v,
            "{k} after losing 2 of 6"
        );
    }
    // Writes go on with k slots.
    put(&store, "bkt", "during", &random(500_000, 9)).await;
    store.repair_pass().await.unwrap();
    let s = store.status();
    assert_eq!(s.redundancy, 0);
    assert!(!s.healthy);
    assert!(!s.slots[1].up && !s.slots[4].up);
    // The bot moves the two slots to new namespaces on live nodes; repair fills them.
    for i in [1, 4] {
        p.zdbs[i] = Zdb::start();
        let addr = p.zdbs[i].namespace(&format!("p-{i}-new"), &p.key.zdb_password("p"));
        p.cfg.slots[i] = addr.clone();
        store.replace_slot(i, addr).unwrap();
    }
    store.repair_pass().await.unwrap();
    let s = store.status();
    assert!(s.healthy, "{s:?}");
    assert_eq!(s.redundancy, 2);
    assert!(s.events.iter().any(|(_, e)| e.contains("slot 1 repaired")));
    // Full redundancy for real: two other slots die and everything still reads.
    p.zdbs[0].kill();
    p.zdbs[5].kill();
    for (k, v) in objects() {
        assert_eq!(
            read_all(&store, "bkt", &k).await.unwrap(),
            v,
            "{k} after repair and 2 more lost"
        );
    }
    assert_eq!(
        read_all(&store, "bkt", "during").await.unwrap(),
        random(500_000, 9)
    );
    // One more is too many: the error says so.
    p.zdbs[2].kill();
    match read_all(&store, "bkt", "many/stripes").await {
        Err(e @ Error::Unreadable { .. }) => {
            assert!(e.to_string().contains("unreadable"), "{e}");
        }
        other => panic!("read with 3 of 6 slots: {:?}", other.map(|v| v.len())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_store_with_the_same_key_finds_everything_and_another_key_nothing() {
    let p = pool(4, 2, 262_144);
    {
        let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
        store.create_bucket("bkt").await.unwrap();
        store.create_bucket("cat").await.unwrap();
        for (k, v) in objects() {
            put(&store, "bkt", &k, &v).await;
        }
        store.delete_object("bkt", "small").await.unwrap();
    }
    // The bot's machine is gone: a store opened afresh from the slots alone.
    let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    assert_eq!(
        store.buckets().into_iter().map(|b| b.0).collect::<Vec<_>>(),
        ["bkt", "cat"]
    );
    for (k, v) in objects() {
        if k == "small" {
            assert!(store.head("bkt", &k).is_err(), "a deleted object came back");
            continue;
        }
        assert_eq!(read_all(&store, "bkt", &k).await.unwrap(), v, "{k}");
    }
    // Another user's key opens no record of this store, and says so.
    let e = Store::open(StorageKey::from_seed(&[1; 32]), p.cfg.clone())
        .await
        .err()
        .expect("another key opened the store");
    assert!(e.to_string().contains("opens with this key"), "{e}");
    // ... and removes nothing.
    let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    assert_eq!(
        read_all(&store, "bkt", "many/stripes").await.unwrap(),
        random(3 * 262_144 + 12_345, 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_shards_are_refused_read_around_and_rewritten() {
    let p = pool(4, 2, 262_144);
    let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    store.create_bucket("bkt").await.unwrap();
    let data = random(600_000, 5);
    put(&store, "bkt", "x", &data).await;
    // Someone with the namespace password alters a data shard on slot 2.
    let mut c = p.zdbs[2].conn(&p.cfg.slots[2]);
    let shard_keys: Vec<Vec<u8>> = keys(&mut c).into_iter().filter(|k| k[0] == b's').collect();
    let target = shard_keys[0].clone();
    let good: Vec<u8> = redis::cmd("GET").arg(&target).query(&mut c).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 0x55;
    redis::cmd("SET")
        .arg(&target)
        .arg(&bad)
        .query::<()>(&mut c)
        .unwrap();
    // The read is still right, and the altered shard is named.
    assert_eq!(read_all(&store, "bkt", "x").await.unwrap(), data);
    assert!(store
        .status()
        .events
        .iter()
        .any(|(_, e)| e.contains("slot 2") && e.contains("altered")));
    store.repair_pass().await.unwrap();
    let now: Vec<u8> = redis::cmd("GET").arg(&target).query(&mut c).unwrap();
    assert_eq!(now, good, "repair did not rewrite the altered shard");
    // Three altered shards of one stripe: refused with a clear error.
    let stripe = &target[..];
    for i in [0, 3, 5] {
        let mut c = p.zdbs[i].conn(&p.cfg.slots[i]);
        redis::cmd("SET")
            .arg(stripe)
            .arg(vec![0u8; good.len()])
            .query::<()>(&mut c)
            .unwrap();
    }
    let e = read_all(&store, "bkt", "x").await.unwrap_err();
    assert!(
        e.to_string().contains("3 altered") || e.to_string().contains("altered"),
        "{e}"
    );
    // A metadata record altered on one slot is refused at open, and that slot is repaired.
    let mut c = p.zdbs[1].conn(&p.cfg.slots[1]);
    let meta_key = keys(&mut c).into_iter().find(|k| k[0] == b'm').unwrap();
    let mut v: Vec<u8> = redis::cmd("GET").arg(&meta_key).query(&mut c).unwrap();
    let at = v.len() - 3;
    v[at] ^= 1;
    redis::cmd("SET")
        .arg(&meta_key)
        .arg(&v)
        .query::<()>(&mut c)
        .unwrap();
    let again = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    assert!(again.head("bkt", "x").is_ok());
    assert!(again.status().slots[1]
        .repair
        .as_deref()
        .is_some_and(|r| r.contains("authentication")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_of_a_write_cut_short_are_swept_at_open() {
    let p = pool(2, 1, 65_536);
    let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    store.create_bucket("bkt").await.unwrap();
    put(&store, "bkt", "kept", &random(200_000, 7)).await;
    let kept = shard_count(&p);
    drop(store);
    // What a bot killed between its shards and its record leaves: shards no record names.
    for (z, s) in p.zdbs.iter().zip(&p.cfg.slots) {
        let mut c = z.conn(s);
        for stripe in 0u32..3 {
            let mut k = vec![b's'];
            k.extend_from_slice(&[9u8; 16]);
            k.extend_from_slice(&stripe.to_be_bytes());
            redis::cmd("SET")
                .arg(&k)
                .arg(b"orphan")
                .query::<()>(&mut c)
                .unwrap();
        }
    }
    assert_eq!(shard_count(&p), kept + 9);
    let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    assert_eq!(shard_count(&p), kept);
    assert_eq!(
        read_all(&store, "bkt", "kept").await.unwrap(),
        random(200_000, 7)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_uploads_complete_into_one_object_and_abort_leaves_nothing() {
    let p = pool(4, 2, 262_144);
    let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    store.create_bucket("bkt").await.unwrap();
    let id = store
        .create_upload("bkt", "big", Some("video/mp4".into()), BTreeMap::new())
        .await
        .unwrap();
    let parts: Vec<Vec<u8>> = (0..3)
        .map(|i| random(300_000 + i * 1000, 10 + i as u64))
        .collect();
    let mut etags = Vec::new();
    // Out of order, as parallel clients send them.
    for i in [2usize, 0, 1] {
        let e = store
            .upload_part(&id, i as u32 + 1, body(&parts[i]))
            .await
            .unwrap();
        etags.push((i as u32 + 1, e));
    }
    etags.sort();
    assert_eq!(store.list_parts(&id).unwrap().len(), 3);
    let wrong = vec![(1, etags[0].1.clone()), (2, "nope".to_string())];
    assert!(store.complete_upload(&id, &wrong).await.is_err());
    let (_, _, o) = store.complete_upload(&id, &etags).await.unwrap();
    assert!(o.etag.ends_with("-3"));
    assert_eq!(
        read_all(&store, "bkt", "big").await.unwrap(),
        parts.concat()
    );
    assert!(matches!(store.list_parts(&id), Err(Error::NoSuchUpload(_))));
    let reopened = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    assert_eq!(
        read_all(&reopened, "bkt", "big").await.unwrap(),
        parts.concat()
    );
    drop(reopened);
    // An aborted upload's parts are deleted.
    let before = shard_count(&p);
    let id = store
        .create_upload("bkt", "gone", None, BTreeMap::new())
        .await
        .unwrap();
    store.upload_part(&id, 1, body(&parts[0])).await.unwrap();
    assert!(shard_count(&p) > before);
    store.abort_upload(&id).await.unwrap();
    let mut left = 0;
    for _ in 0..50 {
        left = shard_count(&p);
        if left == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_refuses_the_put_with_the_reason_and_keeps_nothing_of_it() {
    let p = pool(2, 1, 65_536);
    // Namespaces of 300 KB each (as a zdb contract's size bounds them).
    for (z, s) in p.zdbs.iter().zip(&p.cfg.slots) {
        let mut c = redis::Client::open(format!("redis://{}/", z.addr))
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("AUTH").arg("admin").query::<()>(&mut c).unwrap();
        redis::cmd("NSSET")
            .arg(&s.namespace)
            .arg("maxsize")
            .arg(300_000)
            .query::<()>(&mut c)
            .unwrap();
    }
    let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    store.create_bucket("bkt").await.unwrap();
    put(&store, "bkt", "fits", &random(100_000, 1)).await;
    let before = shard_count(&p);
    let e = store
        .put_object(
            "bkt",
            "big",
            body(&random(1_000_000, 2)),
            None,
            BTreeMap::new(),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("No space left"), "{e}");
    assert!(store.head("bkt", "big").is_err());
    assert_eq!(shard_count(&p), before, "the refused PUT's shards stayed");
    assert_eq!(
        read_all(&store, "bkt", "fits").await.unwrap(),
        random(100_000, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_lost_its_data_is_refilled_in_place() {
    let mut p = pool(4, 2, 262_144);
    let store = Store::open(p.key.clone(), p.cfg.clone()).await.unwrap();
    store.create_bucket("bkt").await.unwrap();
    for (k, v) in objects() {
        put(&store, "bkt", &k, &v).await;
    }
    // Slot 3's namespace is wiped and made again at the same address (a disk replaced).
    {
        let mut c = redis::Client::open(format!("redis://{}/", p.zdbs[3].addr))
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("AUTH").arg("admin").query::<()>(&mut c).unwrap();
        redis::cmd("NSDEL").arg("p-3").query::<()>(&mut c).unwrap();
    }
    p.zdbs[3].namespace("p-3", &p.key.zdb_password("p"));
    store.repair_pass().await.unwrap();
    let s = store.status();
    assert!(s.healthy, "{s:?}");
    assert!(s
        .events
        .iter()
        .any(|(_, e)| e.contains("slot 3") && e.contains("marker")));
    // Refilled for real: two other slots go and everything still reads.
    p.zdbs[0].kill();
    p.zdbs[1].kill();
    for (k, v) in objects() {
        assert_eq!(read_all(&store, "bkt", &k).await.unwrap(), v, "{k}");
    }
}
