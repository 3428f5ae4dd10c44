//! Where NAR files live. [`Storage`] is the small interface the HTTP layer sees; [`LocalStorage`]
//! is the embedded default (files under `<data dir>/store`), and an S3-compatible bucket plugs
//! in behind the same trait.
//!
//! Single-request uploads are staged as local files first (see `upload.rs`) and verified
//! before [`Storage::put_file`] makes them visible; chunked uploads go through the backend's
//! [`ChunkStaging`] (`staging.rs`: `.part` files locally, multipart uploads on S3). Either way a
//! reader never sees a partial or unverified NAR: NAR GETs find objects through `nars` rows.
//!
//! ```text
//!   handlers ──► Storage ──┬─ local.rs  files under <data dir>/store
//!                          └─ s3.rs     objects under s3://bucket/prefix (object_store)
//!   handlers ──► ChunkStaging (Storage::chunk_staging) ──┬─ LocalStaging
//!                                                        └─ S3Staging (multipart)
//! ```

pub mod local;
pub mod s3;

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncRead;

use crate::server::staging::ChunkStaging;
pub use local::LocalStorage;
pub use s3::{Listed, S3Storage};

pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// Small objects a batch writes at once to a bucket: each PUT is a round trip, so they overlap.
const PUT_MANY_CONCURRENCY: usize = 16;

#[async_trait]
pub trait Storage: Send + Sync {
    /// Makes the verified file at `staged` visible under `key`, atomically: readers see the whole
    /// object or nothing. `staged` is consumed (moved or deleted).
    async fn put_file(&self, key: &str, staged: &Path) -> std::io::Result<()>;
    /// The object's length and a reader, or `None` when absent.
    async fn get(&self, key: &str) -> std::io::Result<Option<(u64, ObjectReader)>>;
    /// Deletes the object; an absent one is not an error.
    async fn delete(&self, key: &str) -> std::io::Result<()>;
    /// Every object under `prefix` with its age, for the janitor's sweep; `None` where the
    /// backend is not swept (local files: nothing there is written without its row's
    /// transaction following on the same machine).
    async fn list(&self, prefix: &str) -> std::io::Result<Option<Vec<Listed>>>;
    /// A URL anyone may GET the object from for `expires`; `None` where there is none (local
    /// files are always served by the server).
    async fn presign_get(&self, key: &str, expires: Duration) -> std::io::Result<Option<String>>;
    /// Readiness: the backend answers (for `/healthz`).
    async fn health(&self) -> std::io::Result<()>;
    /// Where the chunks of resumable uploads wait until completion.
    fn chunk_staging(&self) -> Arc<dyn ChunkStaging>;
    /// Stores a small object (a listing, a debuginfo link) whole, atomically like `put_file`.
    async fn put_bytes(&self, key: &str, bytes: bytes::Bytes) -> std::io::Result<()>;
    /// Stores many small objects, each atomically like `put_bytes`, and answers for each in
    /// order. Backends make the batch cheaper than one `put_bytes` each where they can.
    async fn put_many(&self, objects: Vec<(String, bytes::Bytes)>) -> Vec<std::io::Result<()>> {
        use futures_util::StreamExt;
        futures_util::stream::iter(objects)
            .map(|(key, bytes)| async move { self.put_bytes(&key, bytes).await })
            .buffered(PUT_MANY_CONCURRENCY)
            .collect()
            .await
    }
    /// Stores a copy of the file at `source` under `key`, atomically like `put_file`, leaving
    /// `source` as it is and streaming it (a NAR may be GiBs): `stowix admin migrate`.
    async fn put_copy(&self, key: &str, source: &Path) -> std::io::Result<()>;
    /// The object's size, or `None` when absent: without reading it.
    async fn size(&self, key: &str) -> std::io::Result<Option<u64>>;
}

/// Object keys are built by the server from validated parts (`<repo>/nar/<nix32>.nar.xz`);
/// this is the last line of defence against a key that would escape the storage root.
pub fn is_safe_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 512
        && !key.starts_with('/')
        && key.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        })
}
