//! Where NAR files live. [`Storage`] is the small interface the HTTP layer sees; [`LocalStorage`]
//! is the embedded default (files under `<data dir>/store`), and an S3-compatible bucket plugs
//! in behind the same trait.
//!
//! Uploads are staged as local files first (see `upload.rs`) and verified before
//! [`Storage::put_file`] makes them visible, so a reader never sees a partial or unverified NAR.

pub mod local;

use std::path::Path;
use std::pin::Pin;

use async_trait::async_trait;
use tokio::io::AsyncRead;

pub use local::LocalStorage;

pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

#[async_trait]
pub trait Storage: Send + Sync {
    /// Makes the verified file at `staged` visible under `key`, atomically: readers see the whole
    /// object or nothing. `staged` is consumed (moved or deleted).
    async fn put_file(&self, key: &str, staged: &Path) -> std::io::Result<()>;
    /// The object's length and a reader, or `None` when absent.
    async fn get(&self, key: &str) -> std::io::Result<Option<(u64, ObjectReader)>>;
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
