//! NAR objects in an S3-compatible bucket (`--storage s3://bucket[/prefix]`), through
//! `object_store`: whole-object puts and streamed gets, deletes, listings for the janitor,
//! presigned GET URLs, a readiness probe, and the raw multipart calls resumable uploads map
//! onto (one S3 part per chunk; see `staging.rs`).
//!
//! ```text
//!   key "<repo>/nar/<hash>.nar.xz" ──► "<prefix>/<key>" ──► object_store::aws ──► bucket
//!   every call ──► stowix_server_storage_seconds{op} / stowix_server_storage_errors_total{op}
//! ```
//! Credentials come only from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
//! `AWS_SESSION_TOKEN` (or the instance's role on AWS when those are unset); they are never
//! logged, and no error message built here contains them.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

use crate::server::metrics;

/// Smallest part S3 accepts for any part but the last.
pub const MIN_PART_BYTES: u64 = 5 << 20;
/// Most parts in one multipart upload.
pub const MAX_PARTS: u32 = 10_000;
/// Part size for whole-file puts (single-request uploads, migration).
const PUT_PART_BYTES: usize = 8 << 20;

/// An object found by [`S3Store::list`].
#[derive(Clone, Debug)]
pub struct Listed {
    /// The storage key (without the bucket prefix).
    pub key: String,
    pub size: u64,
    /// Unix seconds.
    pub last_modified: i64,
}

pub struct S3Store {
    store: Arc<AmazonS3>,
    /// Where the bucket was named, for error messages (`s3://bucket/prefix`).
    url: String,
    /// `""` or `"prefix/"`.
    prefix: String,
}

/// Runs one object-store call, timing it into the per-operation histogram and counting errors.
async fn timed<T>(
    op: &'static str,
    call: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    let started = Instant::now();
    let result = call.await;
    ::metrics::histogram!(metrics::STORAGE_SECONDS, "op" => op)
        .record(started.elapsed().as_secs_f64());
    // An absent object is an answer, not a failure of the store.
    if let Err(err) = &result {
        if !matches!(err, object_store::Error::NotFound { .. }) {
            ::metrics::counter!(metrics::STORAGE_ERRORS_TOTAL, "op" => op).increment(1);
        }
    }
    result
}

/// An object-store failure a retry may cure: the store unreachable, timing out, or answering
/// with an error object_store does not name (5xx, after its own retries). The server answers
/// it with 503 and Retry-After, which a pushing client rides out like a server restart.
#[derive(Debug)]
pub struct StorageUnavailable(pub String);

impl std::fmt::Display for StorageUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StorageUnavailable {}

/// Whether `err` is a [`StorageUnavailable`].
pub fn is_unavailable(err: &io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.is::<StorageUnavailable>())
}

/// Static credentials. Without them, object_store looks for an instance role (on AWS).
#[derive(Clone)]
pub struct AwsKeys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl AwsKeys {
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, when set.
    pub fn from_env() -> Result<Option<Self>, String> {
        let Ok(access_key_id) = std::env::var("AWS_ACCESS_KEY_ID") else {
            return Ok(None);
        };
        let secret_access_key = std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| {
            "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both".to_string()
        })?;
        Ok(Some(AwsKeys {
            access_key_id,
            secret_access_key,
            session_token: std::env::var("AWS_SESSION_TOKEN").ok(),
        }))
    }
}

impl S3Store {
    /// `url` is `s3://bucket[/prefix]`; an empty `endpoint` means AWS itself. Credentials come
    /// from the environment.
    pub fn open(url: &str, endpoint: &str, region: &str) -> Result<Self, String> {
        Self::open_with_keys(url, endpoint, region, AwsKeys::from_env()?)
    }

    pub fn open_with_keys(
        url: &str,
        endpoint: &str,
        region: &str,
        keys: Option<AwsKeys>,
    ) -> Result<Self, String> {
        install_crypto_provider();
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("storage URL {url:?} must start with s3://"))?;
        let (bucket, prefix) = match rest.split_once('/') {
            Some((bucket, prefix)) => (bucket, prefix.trim_matches('/')),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(format!(
                "storage URL {url:?} names no bucket: use s3://BUCKET[/PREFIX]"
            ));
        }
        if !prefix.is_empty() && !super::is_safe_key(prefix) {
            return Err(format!(
                "storage URL {url:?}: the prefix may hold only letters, digits, '.', '-', '_' and '/'"
            ));
        }
        let mut options = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            // A NAR GET streams to a client at the client's pace, and a part upload may be
            // large: the whole-request timeout only has to catch a store that stopped answering.
            .with_timeout(Duration::from_secs(3600));
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_retry(RetryConfig {
                max_retries: 6,
                retry_timeout: Duration::from_secs(60),
                ..RetryConfig::default()
            });
        if !endpoint.is_empty() {
            // Self-hosted stores (SeaweedFS, Garage, Ceph) rarely have per-bucket host names.
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
            if endpoint.starts_with("http://") {
                options = options.with_allow_http(true);
            }
        }
        if let Some(keys) = keys {
            builder = builder
                .with_access_key_id(keys.access_key_id)
                .with_secret_access_key(keys.secret_access_key);
            if let Some(token) = keys.session_token {
                builder = builder.with_token(token);
            }
        }
        let store = builder
            .with_client_options(options)
            .build()
            .map_err(|err| format!("cannot set up S3 storage {url}: {err}"))?;
        Ok(S3Store {
            store: Arc::new(store),
            url: url.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        })
    }

    fn path(&self, key: &str) -> io::Result<ObjectPath> {
        if !super::is_safe_key(key) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsafe storage key {key:?}"),
            ));
        }
        ObjectPath::parse(format!("{}{key}", self.prefix))
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err.to_string()))
    }

    /// One line naming the store and the operation; object_store's own text says what failed.
    fn error(&self, op: &str, key: &str, err: object_store::Error) -> io::Error {
        let kind = match &err {
            object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => io::ErrorKind::AlreadyExists,
            _ => io::ErrorKind::Other,
        };
        let detail = err.to_string().replace('\n', " ");
        let message = format!("S3 storage {}: {op} {key}: {detail}", self.url);
        // Transport failures and unnamed HTTP errors; refusals with a meaning of their own
        // (credentials, a missing object) are not cured by waiting.
        if matches!(err, object_store::Error::Generic { .. }) {
            return io::Error::other(StorageUnavailable(message));
        }
        io::Error::new(kind, message)
    }

    /// Uploads a local file as one object: one PUT when small, else a multipart upload with at
    /// most two 8 MiB parts in flight, so a large NAR never sits in memory whole. A failed
    /// multipart upload is aborted, so it leaves no parts behind.
    pub async fn put_file(&self, key: &str, file: &std::path::Path) -> io::Result<()> {
        let path = self.path(key)?;
        let len = tokio::fs::metadata(file).await?.len();
        if len <= PUT_PART_BYTES as u64 {
            let bytes = Bytes::from(tokio::fs::read(file).await?);
            timed("put", self.store.put(&path, bytes.into()))
                .await
                .map_err(|err| self.error("put", key, err))?;
            return Ok(());
        }
        let upload = timed("create_multipart", self.store.put_multipart(&path))
            .await
            .map_err(|err| self.error("put", key, err))?;
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PUT_PART_BYTES);
        let written = async {
            let mut source = tokio::fs::File::open(file).await?;
            let mut buffer = vec![0u8; 1 << 20];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut source, &mut buffer).await?;
                if n == 0 {
                    return Ok::<_, io::Error>(());
                }
                timed("put_part", writer.wait_for_capacity(2))
                    .await
                    .map_err(|err| self.error("put", key, err))?;
                writer.write(&buffer[..n]);
            }
        }
        .await;
        match written {
            Ok(()) => timed("complete_multipart", writer.finish())
                .await
                .map(|_| ())
                .map_err(|err| self.error("put", key, err)),
            Err(err) => {
                let _ = timed("abort_multipart", writer.abort()).await;
                Err(err)
            }
        }
    }

    /// Stores a small object in one PUT (a listing, a log, a debuginfo link).
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> io::Result<()> {
        let path = self.path(key)?;
        timed("put", self.store.put(&path, bytes.into()))
            .await
            .map(|_| ())
            .map_err(|err| self.error("put", key, err))
    }

    /// The object's length and its bytes as a stream, or `None` when absent.
    pub async fn get(
        &self,
        key: &str,
    ) -> io::Result<
        Option<(
            u64,
            futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
        )>,
    > {
        let path = self.path(key)?;
        match timed("get", self.store.get(&path)).await {
            Ok(result) => {
                let len = result.meta.size;
                let url = self.url.clone();
                let owned_key = key.to_string();
                let stream = result
                    .into_stream()
                    .map_err(move |err| {
                        ::metrics::counter!(metrics::STORAGE_ERRORS_TOTAL, "op" => "get")
                            .increment(1);
                        io::Error::other(StorageUnavailable(format!(
                            "S3 storage {url}: reading {owned_key}: {err}"
                        )))
                    })
                    .boxed();
                Ok(Some((len, stream)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(self.error("get", key, err)),
        }
    }

    /// The object's size, or `None` when absent.
    pub async fn head(&self, key: &str) -> io::Result<Option<u64>> {
        let path = self.path(key)?;
        match timed("head", self.store.head(&path)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(self.error("head", key, err)),
        }
    }

    /// Deletes the object; deleting an absent one succeeds.
    pub async fn delete(&self, key: &str) -> io::Result<()> {
        let path = self.path(key)?;
        match timed("delete", self.store.delete(&path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(self.error("delete", key, err)),
        }
    }

    /// Every object under `prefix` (a key prefix ending in `/`, or empty for all).
    pub async fn list(&self, prefix: &str) -> io::Result<Vec<Listed>> {
        let full = format!("{}{prefix}", self.prefix);
        let full = full.trim_end_matches('/');
        let path = if full.is_empty() {
            None
        } else {
            Some(
                ObjectPath::parse(full)
                    .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err.to_string()))?,
            )
        };
        let started = Instant::now();
        let listed: Result<Vec<_>, _> = self.store.list(path.as_ref()).try_collect().await;
        ::metrics::histogram!(metrics::STORAGE_SECONDS, "op" => "list")
            .record(started.elapsed().as_secs_f64());
        let listed = listed.map_err(|err| {
            ::metrics::counter!(metrics::STORAGE_ERRORS_TOTAL, "op" => "list").increment(1);
            self.error("list", prefix, err)
        })?;
        Ok(listed
            .into_iter()
            .filter_map(|meta| {
                let key = meta
                    .location
                    .as_ref()
                    .strip_prefix(&self.prefix)?
                    .to_string();
                Some(Listed {
                    key,
                    size: meta.size,
                    last_modified: meta.last_modified.timestamp(),
                })
            })
            .collect())
    }

    /// A URL anyone can GET the object from for `expires`.
    pub async fn presign_get(&self, key: &str, expires: Duration) -> io::Result<String> {
        let path = self.path(key)?;
        let url = timed(
            "presign",
            self.store
                .signed_url(object_store::signer::Method::GET, &path, expires),
        )
        .await
        .map_err(|err| self.error("presign", key, err))?;
        Ok(url.to_string())
    }

    /// Reachable, the bucket exists and the credentials work: a LIST of the top level under
    /// the prefix (one entry per repository) succeeds. A HEAD would not do: it answers 404
    /// alike for an absent key and an absent bucket.
    pub async fn health(&self) -> io::Result<()> {
        let prefix = self.prefix.trim_end_matches('/');
        let path = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
        let probe = timed("health", self.store.list_with_delimiter(path.as_ref()));
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(self.error("list", "/", err)),
            Err(_) => {
                ::metrics::counter!(metrics::STORAGE_ERRORS_TOTAL, "op" => "health").increment(1);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("S3 storage {}: no answer within 5 s", self.url),
                ))
            }
        }
    }

    pub async fn create_multipart(&self, key: &str) -> io::Result<String> {
        let path = self.path(key)?;
        timed("create_multipart", self.store.create_multipart(&path))
            .await
            .map_err(|err| self.error("create_multipart", key, err))
    }

    /// Uploads part `number` (1-based, as S3 counts) and returns its ETag.
    pub async fn put_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        data: Vec<Bytes>,
    ) -> io::Result<String> {
        let path = self.path(key)?;
        let payload: object_store::PutPayload = data.into_iter().collect();
        let id = upload_id.to_string();
        timed(
            "put_part",
            self.store
                .put_part(&path, &id, number as usize - 1, payload),
        )
        .await
        .map(|part| part.content_id)
        .map_err(|err| self.error("put_part", key, err))
    }

    /// Assembles the object from `etags`, in part order.
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        etags: Vec<String>,
    ) -> io::Result<()> {
        let path = self.path(key)?;
        let id = upload_id.to_string();
        let parts = etags
            .into_iter()
            .map(|content_id| PartId { content_id })
            .collect();
        timed(
            "complete_multipart",
            self.store.complete_multipart(&path, &id, parts),
        )
        .await
        .map(|_| ())
        .map_err(|err| self.error("complete_multipart", key, err))
    }

    /// Aborts the multipart upload, dropping its parts; an upload already gone is success.
    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> io::Result<()> {
        let path = self.path(key)?;
        let id = upload_id.to_string();
        match timed("abort_multipart", self.store.abort_multipart(&path, &id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(self.error("abort_multipart", key, err)),
        }
    }
}

/// [`S3Store`] behind the [`super::Storage`] trait.
pub struct S3Storage {
    store: Arc<S3Store>,
}

impl S3Storage {
    pub fn new(store: S3Store) -> Self {
        S3Storage {
            store: Arc::new(store),
        }
    }
}

#[async_trait::async_trait]
impl super::Storage for S3Storage {
    async fn put_file(&self, key: &str, staged: &std::path::Path) -> io::Result<()> {
        self.store.put_file(key, staged).await?;
        // Local storage moves the staged file; here it is deleted, as the trait promises.
        let _ = tokio::fs::remove_file(staged).await;
        Ok(())
    }

    async fn put_copy(&self, key: &str, source: &std::path::Path) -> io::Result<()> {
        self.store.put_file(key, source).await
    }

    async fn size(&self, key: &str) -> io::Result<Option<u64>> {
        self.store.head(key).await
    }

    async fn get(&self, key: &str) -> io::Result<Option<(u64, super::ObjectReader)>> {
        Ok(self.store.get(key).await?.map(|(len, stream)| {
            let reader: super::ObjectReader = Box::pin(tokio_util::io::StreamReader::new(stream));
            (len, reader)
        }))
    }

    async fn delete(&self, key: &str) -> io::Result<()> {
        self.store.delete(key).await
    }

    async fn put_bytes(&self, key: &str, bytes: Bytes) -> io::Result<()> {
        self.store.put_bytes(key, bytes).await
    }

    async fn list(&self, prefix: &str) -> io::Result<Option<Vec<Listed>>> {
        self.store.list(prefix).await.map(Some)
    }

    async fn presign_get(&self, key: &str, expires: Duration) -> io::Result<Option<String>> {
        self.store.presign_get(key, expires).await.map(Some)
    }

    async fn health(&self) -> io::Result<()> {
        self.store.health().await
    }

    fn chunk_staging(&self) -> Arc<dyn crate::server::staging::ChunkStaging> {
        Arc::new(crate::server::staging::S3Staging {
            store: Arc::clone(&self.store),
        })
    }
}

/// object_store's HTTP client uses rustls without a built-in provider; ring is the one the
/// rest of the binary already links. Installing twice is harmless (the first one stays).
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
