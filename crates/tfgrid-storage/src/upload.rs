//! Multipart uploads: each part is a segment of its own; completing an upload writes one
//! object record whose segments are the parts', so nothing is copied.

use crate::meta::{Body, Name, ObjectMeta, PartMeta, UploadMeta};
use crate::store::{check_key, new_uid, now_ms, SegmentOrInline, Store};
use crate::Error;
use bytes::Bytes;
use futures::Stream;
use md5::{Digest, Md5};
use std::collections::BTreeMap;
use std::sync::Arc;

/// S3's limit on part numbers.
const MAX_PART: u32 = 10_000;

#[derive(Debug, Clone)]
pub struct PartInfo {
    pub number: u32,
    pub etag: String,
    pub size: u64,
    pub modified_ms: i64,
}

impl Store {
    pub async fn create_upload(
        &self,
        bucket: &str,
        key: &str,
        content_type: Option<String>,
        user: BTreeMap<String, String>,
    ) -> Result<String, Error> {
        self.need_bucket(bucket)?;
        check_key(key)?;
        let id = hex::encode(new_uid());
        let rec = self
            .put_record(
                Name::Upload(id.clone()),
                Body::Upload(UploadMeta {
                    bucket: bucket.into(),
                    key: key.into(),
                    content_type,
                    started_ms: now_ms(),
                    user,
                }),
            )
            .await?;
        self.apply(rec);
        Ok(id)
    }

    fn upload(&self, id: &str) -> Result<UploadMeta, Error> {
        self.index
            .read()
            .unwrap()
            .uploads
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NoSuchUpload(id.into()))
    }

    pub async fn upload_part<S, E>(
        self: &Arc<Self>,
        id: &str,
        number: u32,
        body: S,
    ) -> Result<String, Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.upload(id)?;
        if !(1..=MAX_PART).contains(&number) {
            return Err(Error::Invalid(format!(
                "part number {number}: 1 to {MAX_PART}"
            )));
        }
        let (seg, md5) = self.write_segment(body, false).await?;
        let SegmentOrInline::Segment(segment) = seg else {
            unreachable!("parts are never inline")
        };
        let etag = hex::encode(md5);
        let part = PartMeta {
            etag: etag.clone(),
            md5,
            segment: segment.clone(),
            modified_ms: now_ms(),
        };
        let rec = match self
            .put_record(Name::Part(id.into(), number), Body::Part(part))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.forget_segments(vec![segment]);
                return Err(e);
            }
        };
        let old = self.apply(rec);
        self.forget_segments(old);
        Ok(etag)
    }

    pub fn list_parts(&self, id: &str) -> Result<Vec<PartInfo>, Error> {
        self.upload(id)?;
        let index = self.index.read().unwrap();
        Ok(index
            .parts
            .range((id.to_string(), 0)..=(id.to_string(), u32::MAX))
            .map(|((_, n), p)| PartInfo {
                number: *n,
                etag: p.etag.clone(),
                size: p.segment.len(),
                modified_ms: p.modified_ms,
            })
            .collect())
    }

    /// Makes the object of `parts` (number and ETag, ascending), as S3 does; answers its
    /// bucket, key and metadata.
    pub async fn complete_upload(
        self: &Arc<Self>,
        id: &str,
        parts: &[(u32, String)],
    ) -> Result<(String, String, ObjectMeta), Error> {
        let up = self.upload(id)?;
        if parts.is_empty() {
            return Err(Error::Invalid("an upload needs at least one part".into()));
        }
        let mut segments = Vec::new();
        let mut md5s = Md5::new();
        let mut used = Vec::new();
        {
            let index = self.index.read().unwrap();
            let mut last = 0;
            for (n, etag) in parts {
                if *n <= last {
                    return Err(Error::Invalid(
                        "parts must be listed in ascending order".into(),
                    ));
                }
                last = *n;
                let p = index
                    .parts
                    .get(&(id.to_string(), *n))
                    .ok_or_else(|| Error::Invalid(format!("part {n} was not uploaded")))?;
                if etag.trim_matches('"') != p.etag {
                    return Err(Error::Invalid(format!(
                        "part {n}: ETag {etag} does not match"
                    )));
                }
                md5s.update(p.md5);
                segments.push(p.segment.clone());
                used.push(*n);
            }
        }
        let size = segments.iter().map(|s| s.len()).sum();
        let o = ObjectMeta {
            size,
            etag: format!("{}-{}", hex::encode(md5s.finalize()), parts.len()),
            content_type: up.content_type.clone(),
            modified_ms: now_ms(),
            segments,
            inline: None,
            user: up.user.clone(),
        };
        let name = Name::Object(up.bucket.clone(), up.key.clone());
        let rec = self.put_record(name, Body::Object(o.clone())).await?;
        let old = self.apply(rec);
        self.forget_segments(old);
        // The parts now belong to the object: their records go, their shards stay. Parts not
        // named in the list are deleted.
        self.end_upload(id, &used).await;
        Ok((up.bucket, up.key, o))
    }

    pub async fn abort_upload(self: &Arc<Self>, id: &str) -> Result<(), Error> {
        self.upload(id)?;
        self.end_upload(id, &[]).await;
        Ok(())
    }

    /// Removes an upload's records; the shards of parts not in `keep` are deleted.
    async fn end_upload(self: &Arc<Self>, id: &str, keep: &[u32]) {
        let parts: Vec<(u32, PartMeta)> = {
            let index = self.index.read().unwrap();
            index
                .parts
                .range((id.to_string(), 0)..=(id.to_string(), u32::MAX))
                .map(|((_, n), p)| (*n, p.clone()))
                .collect()
        };
        let mut drop_segments = Vec::new();
        for (n, p) in parts {
            if let Ok(rec) = self.put_record(Name::Part(id.into(), n), Body::Gone).await {
                self.apply(rec);
            }
            if !keep.contains(&n) {
                drop_segments.push(p.segment);
            }
        }
        if let Ok(rec) = self.put_record(Name::Upload(id.into()), Body::Gone).await {
            self.apply(rec);
        }
        self.forget_segments(drop_segments);
    }
}
