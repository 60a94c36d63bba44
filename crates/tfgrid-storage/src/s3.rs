//! The S3 API over a store: s3s parses requests and checks SigV4 signatures; this maps each
//! operation onto the store.

use crate::store::{ListPage, Listed, Store};
use crate::Error;
use bytes::Bytes;
use s3s::dto::*;
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

/// The pools one S3 endpoint serves. A bucket lives in one pool; a new bucket goes to the pool
/// its location constraint names (S3's region), else to the first pool by name.
pub struct Pools {
    key: crate::StorageKey,
    pools: RwLock<BTreeMap<String, Arc<Store>>>,
}

impl Pools {
    pub fn new(key: crate::StorageKey) -> Arc<Pools> {
        Arc::new(Pools {
            key,
            pools: RwLock::default(),
        })
    }

    pub fn insert(&self, store: Arc<Store>) {
        self.pools
            .write()
            .unwrap()
            .insert(store.pool().to_string(), store);
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Store>> {
        self.pools.write().unwrap().remove(name)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Store>> {
        self.pools.read().unwrap().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Store>> {
        self.pools.read().unwrap().values().cloned().collect()
    }

    /// The S3 access key id and secret (one pair for every pool of this key).
    pub fn credentials(&self) -> (String, String) {
        self.key.credentials()
    }

    fn of_bucket(&self, bucket: &str) -> Result<Arc<Store>, Error> {
        self.all()
            .into_iter()
            .find(|s| s.has_bucket(bucket))
            .ok_or_else(|| Error::NoSuchBucket(bucket.into()))
    }

    fn for_new_bucket(&self, bucket: &str, location: Option<&str>) -> Result<Arc<Store>, Error> {
        if self.of_bucket(bucket).is_ok() {
            return Err(Error::BucketExists(bucket.into()));
        }
        let pools = self.pools.read().unwrap();
        match location.filter(|l| !l.is_empty() && *l != "us-east-1") {
            Some(l) => pools.get(l).cloned().ok_or_else(|| {
                Error::Invalid(format!(
                    "no storage pool {l:?} (pools: {})",
                    pools.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            }),
            None => pools.values().next().cloned().ok_or_else(|| {
                Error::Invalid(
                    "no storage pool is ready yet: make one with `tfgrid storage create`".into(),
                )
            }),
        }
    }
}

#[derive(Clone)]
pub struct S3Store(pub Arc<Pools>);

fn s3err(e: Error) -> S3Error {
    let msg = e.to_string();
    let code = match &e {
        Error::NoSuchBucket(_) => S3ErrorCode::NoSuchBucket,
        Error::NoSuchKey(_) => S3ErrorCode::NoSuchKey,
        Error::NoSuchUpload(_) => S3ErrorCode::NoSuchUpload,
        Error::BucketNotEmpty(_) => S3ErrorCode::BucketNotEmpty,
        Error::BucketExists(_) => S3ErrorCode::BucketAlreadyOwnedByYou,
        Error::Invalid(_) => S3ErrorCode::InvalidArgument,
        Error::Backend(_) | Error::Quorum { .. } => S3ErrorCode::ServiceUnavailable,
        Error::Unreadable { .. } | Error::Corrupt(_) => S3ErrorCode::InternalError,
    };
    S3Error::with_message(code, msg)
}

fn ts(ms: i64) -> Timestamp {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    Timestamp::from(t)
}

fn etag(e: &str) -> ETag {
    ETag::Strong(e.to_string())
}

fn user_meta(m: Option<Metadata>) -> BTreeMap<String, String> {
    m.map(|m| m.into_iter().collect()).unwrap_or_default()
}

fn meta_out(m: &BTreeMap<String, String>) -> Option<Metadata> {
    (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

fn content_type(c: &Option<String>) -> Option<ContentType> {
    c.as_deref().and_then(|c| c.parse().ok())
}

/// The body stream handed to s3s must be `Sync`; a channel fed by a task is, and it lets the
/// store read ahead while the client takes what came before.
struct Rx(tokio::sync::mpsc::Receiver<Result<Bytes, Error>>);

impl futures::Stream for Rx {
    type Item = Result<Bytes, Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

fn page_entries(page: &ListPage) -> (Vec<Object>, Vec<CommonPrefix>) {
    let mut objects = Vec::new();
    let mut prefixes = Vec::new();
    for e in &page.entries {
        match e {
            Listed::Object {
                key,
                size,
                etag: e,
                modified_ms,
            } => objects.push(Object {
                key: Some(key.clone()),
                size: Some(*size as i64),
                e_tag: Some(etag(e)),
                last_modified: Some(ts(*modified_ms)),
                storage_class: Some(ObjectStorageClass::from_static(
                    ObjectStorageClass::STANDARD,
                )),
                ..Default::default()
            }),
            Listed::Prefix(p) => prefixes.push(CommonPrefix {
                prefix: Some(p.clone()),
            }),
        }
    }
    (objects, prefixes)
}

fn max_keys(m: Option<i32>) -> usize {
    m.map(|m| m.clamp(0, 1000) as usize).unwrap_or(1000)
}

impl S3Store {
    fn pool(&self, bucket: &str) -> S3Result<Arc<Store>> {
        self.0.of_bucket(bucket).map_err(s3err)
    }
}

#[async_trait::async_trait]
impl s3s::S3 for S3Store {
    async fn list_buckets(
        &self,
        _req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let mut all: Vec<(String, i64)> = self.0.all().iter().flat_map(|p| p.buckets()).collect();
        all.sort();
        let buckets = all
            .into_iter()
            .map(|(name, t)| Bucket {
                name: Some(name),
                creation_date: Some(ts(t)),
                bucket_region: None,
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            ..Default::default()
        }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let location = req
            .input
            .create_bucket_configuration
            .as_ref()
            .and_then(|c| c.location_constraint.as_ref())
            .map(|l| l.as_str().to_string());
        self.0
            .for_new_bucket(&req.input.bucket, location.as_deref())
            .map_err(s3err)?
            .create_bucket(&req.input.bucket)
            .await
            .map_err(s3err)?;
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{}", req.input.bucket)),
        }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.pool(&req.input.bucket)?
            .delete_bucket(&req.input.bucket)
            .await
            .map_err(s3err)?;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.pool(&req.input.bucket)?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let p = self.pool(&req.input.bucket)?;
        Ok(S3Response::new(GetBucketLocationOutput {
            location_constraint: Some(BucketLocationConstraint::from(p.pool().to_string())),
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let i = req.input;
        let body = i
            .body
            .ok_or_else(|| s3_error!(IncompleteBody, "a PUT needs a body"))?;
        let o = self
            .pool(&i.bucket)?
            .put_object(
                &i.bucket,
                &i.key,
                body,
                i.content_type.map(|c| c.to_string()),
                user_meta(i.metadata),
            )
            .await
            .map_err(s3err)?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(etag(&o.etag)),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let i = req.input;
        let store = self.pool(&i.bucket)?;
        let o = store.head(&i.bucket, &i.key).map_err(s3err)?;
        let (range, content_range) = match &i.range {
            Some(r) => {
                let r = r
                    .check(o.size)
                    .map_err(|_| s3_error!(InvalidRange, "the range is outside the object"))?;
                let cr = format!("bytes {}-{}/{}", r.start, r.end.saturating_sub(1), o.size);
                (r, Some(cr))
            }
            None => (0..o.size, None),
        };
        let len = range.end - range.start;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let stream = store.read(&o, range);
        use futures::StreamExt;
        let mut stream = Box::pin(stream);
        // The first piece is read before answering: an object whose first stripe cannot be
        // read gets an S3 error with the reason, not a 200 with a cut body. (A later stripe
        // can only cut the body short, as any S3 server must once it has answered.)
        let first = match stream.next().await {
            Some(Err(e)) => return Err(s3err(e)),
            other => other,
        };
        tokio::spawn(async move {
            if let Some(item) = first {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            while let Some(item) = stream.next().await {
                let failed = item.is_err();
                if let Err(e) = &item {
                    tracing::warn!("storage read: {e}");
                }
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(Rx(rx))),
            content_length: Some(len as i64),
            content_range,
            content_type: content_type(&o.content_type),
            e_tag: Some(etag(&o.etag)),
            last_modified: Some(ts(o.modified_ms)),
            metadata: meta_out(&o.user),
            accept_ranges: Some("bytes".into()),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let o = self
            .pool(&req.input.bucket)?
            .head(&req.input.bucket, &req.input.key)
            .map_err(s3err)?;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(o.size as i64),
            content_type: content_type(&o.content_type),
            e_tag: Some(etag(&o.etag)),
            last_modified: Some(ts(o.modified_ms)),
            metadata: meta_out(&o.user),
            accept_ranges: Some("bytes".into()),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.pool(&req.input.bucket)?
            .delete_object(&req.input.bucket, &req.input.key)
            .await
            .map_err(s3err)?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let i = req.input;
        let store = self.pool(&i.bucket)?;
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for o in i.delete.objects {
            match store.delete_object(&i.bucket, &o.key).await {
                Ok(()) => deleted.push(DeletedObject {
                    key: Some(o.key),
                    ..Default::default()
                }),
                Err(e) => errors.push(s3s::dto::Error {
                    key: Some(o.key),
                    message: Some(e.to_string()),
                    code: Some(s3err(e).code().as_str().to_string()),
                    ..Default::default()
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let i = req.input;
        let prefix = i.prefix.clone().unwrap_or_default();
        let page = self
            .pool(&i.bucket)?
            .list(
                &i.bucket,
                &prefix,
                i.delimiter.as_deref(),
                i.marker.as_deref(),
                max_keys(i.max_keys),
            )
            .map_err(s3err)?;
        let (objects, prefixes) = page_entries(&page);
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(i.bucket),
            prefix: Some(prefix),
            delimiter: i.delimiter,
            marker: i.marker,
            max_keys: Some(max_keys(i.max_keys) as i32),
            is_truncated: Some(page.next.is_some()),
            next_marker: page.next.clone(),
            contents: Some(objects),
            common_prefixes: Some(prefixes),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let i = req.input;
        let prefix = i.prefix.clone().unwrap_or_default();
        let after = i.continuation_token.as_deref().or(i.start_after.as_deref());
        let page = self
            .pool(&i.bucket)?
            .list(
                &i.bucket,
                &prefix,
                i.delimiter.as_deref(),
                after,
                max_keys(i.max_keys),
            )
            .map_err(s3err)?;
        let (objects, prefixes) = page_entries(&page);
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(i.bucket),
            prefix: Some(prefix),
            delimiter: i.delimiter,
            max_keys: Some(max_keys(i.max_keys) as i32),
            key_count: Some(page.entries.len() as i32),
            is_truncated: Some(page.next.is_some()),
            continuation_token: i.continuation_token,
            next_continuation_token: page.next.clone(),
            start_after: i.start_after,
            contents: Some(objects),
            common_prefixes: Some(prefixes),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let i = req.input;
        let id = self
            .pool(&i.bucket)?
            .create_upload(
                &i.bucket,
                &i.key,
                i.content_type.map(|c| c.to_string()),
                user_meta(i.metadata),
            )
            .await
            .map_err(s3err)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let i = req.input;
        let body = i
            .body
            .ok_or_else(|| s3_error!(IncompleteBody, "a part needs a body"))?;
        let number = u32::try_from(i.part_number)
            .map_err(|_| s3_error!(InvalidArgument, "part number {}", i.part_number))?;
        let e = self
            .pool(&i.bucket)?
            .upload_part(&i.upload_id, number, body)
            .await
            .map_err(s3err)?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(etag(&e)),
            ..Default::default()
        }))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let i = req.input;
        let parts = self
            .pool(&i.bucket)?
            .list_parts(&i.upload_id)
            .map_err(s3err)?;
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(i.upload_id),
            is_truncated: Some(false),
            parts: Some(
                parts
                    .into_iter()
                    .map(|p| Part {
                        part_number: Some(p.number as i32),
                        e_tag: Some(etag(&p.etag)),
                        size: Some(p.size as i64),
                        last_modified: Some(ts(p.modified_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let i = req.input;
        let parts: Vec<(u32, String)> = i
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let e = match p.e_tag {
                    Some(ETag::Strong(s)) | Some(ETag::Weak(s)) => s,
                    None => String::new(),
                };
                (p.part_number.unwrap_or(0).max(0) as u32, e)
            })
            .collect();
        let (bucket, key, o) = self
            .pool(&i.bucket)?
            .complete_upload(&i.upload_id, &parts)
            .await
            .map_err(|e| match e {
                Error::Invalid(m) if m.contains("ascending") => {
                    S3Error::with_message(S3ErrorCode::InvalidPartOrder, m)
                }
                Error::Invalid(m) => S3Error::with_message(S3ErrorCode::InvalidPart, m),
                e => s3err(e),
            })?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(bucket),
            key: Some(key),
            e_tag: Some(etag(&o.etag)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.pool(&req.input.bucket)?
            .abort_upload(&req.input.upload_id)
            .await
            .map_err(s3err)?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }
}

/// The S3 service of some pools, with SigV4 checked against their key's credentials.
pub fn service(pools: Arc<Pools>) -> s3s::service::S3Service {
    let (id, secret) = pools.credentials();
    let mut b = s3s::service::S3ServiceBuilder::new(S3Store(pools));
    b.set_auth(s3s::auth::SimpleAuth::from_single(id, secret));
    b.build()
}

const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves S3 on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, pools: Arc<Pools>) {
    serve_with(listener, pools, HEADER_TIMEOUT).await
}

/// [`serve`], closing connections that send no whole request header within `header_timeout`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    pools: Arc<Pools>,
    header_timeout: Duration,
) {
    let svc = service(pools);
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("s3 accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let svc = svc.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(sock);
            let mut b =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            // A client that opens a connection and sends no request does not hold it forever.
            b.http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            if let Err(e) = b.serve_connection(io, svc).await {
                tracing::debug!("s3 connection: {e}");
            }
        });
    }
}
