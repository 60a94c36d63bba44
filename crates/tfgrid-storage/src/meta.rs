//! Metadata records: what a bucket, object, multipart upload or part is. Each record is sealed
//! under a key of its own (AES-256-GCM, bound to the zdb key it is stored at) and written to
//! every slot of the pool, so any slot that holds it can give it back, and a bot with the same
//! key finds every record by scanning the slots.

use crate::codec::StripeMeta;
use crate::keys::StorageKey;
use crate::Error;
use rand::RngCore;
use ring::aead;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Prefix of metadata records in a namespace.
pub const META: u8 = b'm';
/// Prefix of shards: `s` + segment uid + stripe index (big-endian).
pub const SHARD: u8 = b's';
/// A record's format.
const VERSION: u8 = 1;

/// A run of an object's bytes sealed under one key (a PUT is one segment; a multipart
/// upload's object is its parts' segments in order, so completing one copies nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub uid: [u8; 16],
    pub stripe_size: u32,
    pub stripes: Vec<StripeMeta>,
}

impl Segment {
    pub fn len(&self) -> u64 {
        self.stripes.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub size: u64,
    pub etag: String,
    pub content_type: Option<String>,
    pub modified_ms: i64,
    pub segments: Vec<Segment>,
    /// A small object's bytes, held in the record itself (so on every slot) instead of shards.
    pub inline: Option<Vec<u8>>,
    pub user: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadMeta {
    pub bucket: String,
    pub key: String,
    pub content_type: Option<String>,
    pub started_ms: i64,
    pub user: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartMeta {
    pub etag: String,
    /// MD5 of the part, for the multipart ETag.
    pub md5: [u8; 16],
    pub segment: Segment,
    pub modified_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Bucket {
        created_ms: i64,
    },
    Object(ObjectMeta),
    Upload(UploadMeta),
    Part(PartMeta),
    /// Deleted: kept so a slot that missed the delete cannot bring the name back.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Newer wins where slots disagree.
    pub seq: u64,
    pub name: Name,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Name {
    Bucket(String),
    Object(String, String),
    Upload(String),
    Part(String, u32),
}

impl Name {
    fn bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("names serialize")
    }

    /// The zdb key of this name's record.
    pub fn zdb_key(&self, key: &StorageKey) -> Vec<u8> {
        let mut k = Vec::with_capacity(33);
        k.push(META);
        k.extend_from_slice(&key.name_id(&self.bytes()));
        k
    }
}

pub fn seal(key: &StorageKey, rec: &Record) -> Vec<u8> {
    let zkey = rec.name.zdb_key(key);
    let mut salt = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    let mut body = postcard::to_stdvec(rec).expect("records serialize");
    // Each record has a key of its own (from its salt), so a zero nonce is used once.
    let tag = key
        .record_key(&salt)
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(&zkey),
            &mut body,
        )
        .expect("sealing a record");
    let mut out = Vec::with_capacity(1 + 16 + body.len() + 16);
    out.push(VERSION);
    out.extend_from_slice(&salt);
    out.extend_from_slice(&body);
    out.extend_from_slice(tag.as_ref());
    out
}

/// Opens a record read at `zkey`; a record moved from another key, altered, or sealed with
/// another key is refused.
pub fn open(key: &StorageKey, zkey: &[u8], value: &[u8]) -> Result<Record, Error> {
    if value.len() < 1 + 16 + 16 || value[0] != VERSION {
        return Err(Error::Corrupt("a metadata record of unknown format".into()));
    }
    let salt: [u8; 16] = value[1..17].try_into().unwrap();
    let mut body = value[17..].to_vec();
    let plain = key
        .record_key(&salt)
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(zkey),
            &mut body,
        )
        .map_err(|_| {
            Error::Corrupt(
                "a metadata record fails authentication (altered, or another key's)".into(),
            )
        })?;
    let rec: Record = postcard::from_bytes(plain)
        .map_err(|e| Error::Corrupt(format!("a metadata record: {e}")))?;
    if rec.name.zdb_key(key) != zkey {
        return Err(Error::Corrupt(
            "a metadata record stored under another name".into(),
        ));
    }
    Ok(rec)
}

pub fn shard_key(uid: &[u8; 16], stripe: u32) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[0] = SHARD;
    k[1..17].copy_from_slice(uid);
    k[17..].copy_from_slice(&stripe.to_be_bytes());
    k
}

/// The segment uid of a shard key.
pub fn shard_uid(zkey: &[u8]) -> Option<[u8; 16]> {
    (zkey.len() == 21 && zkey[0] == SHARD).then(|| zkey[1..17].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_open_only_where_they_were_sealed() {
        let k = StorageKey::from_seed(&[3; 32]);
        let rec = Record {
            seq: 5,
            name: Name::Object("b".into(), "a/b.txt".into()),
            body: Body::Gone,
        };
        let z = rec.name.zdb_key(&k);
        let v = seal(&k, &rec);
        assert_eq!(open(&k, &z, &v).unwrap(), rec);
        // Two seals of one record differ (fresh salt).
        assert_ne!(seal(&k, &rec), v);
        let other = Name::Bucket("b".into()).zdb_key(&k);
        assert!(matches!(open(&k, &other, &v), Err(Error::Corrupt(_))));
        let mut t = v.clone();
        t[20] ^= 1;
        assert!(matches!(open(&k, &z, &t), Err(Error::Corrupt(_))));
        let k2 = StorageKey::from_seed(&[4; 32]);
        assert!(open(&k2, &z, &v).is_err());
        assert!(open(&k, &z, &v[..10]).is_err());
    }
}
