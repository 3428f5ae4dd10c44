//! Per-operation latency and error metrics for whichever database holds the metadata: one
//! decorator over [`Metadata`], put around every backend by `backend::open`, so SQLite and
//! PostgreSQL are measured the same way and neither backend knows about metrics.
//!
//! ```text
//!   caller ──► Timed::<op> ──► inner.<op> (sqlite.rs | postgres.rs)
//!                 └─► stowix_server_database_seconds{op}        every call
//!                     stowix_server_database_errors_total{op}   calls that returned an error
//! ```
//! `op` is the trait method's name: a fixed, small set. The time includes waiting for a
//! connection (the pool, or SQLite's writer mutex), which is what a request waits too.

use std::sync::Arc;
use std::time::Instant;

use super::{
    MetaResult, Metadata, NarRecord, OpenedUpload, Presence, PublishedNarInfo, RepoRecord,
    SessionCaps, SingletonGuard, TokenRecord, UploadPart, UploadRecord,
};
use crate::server::metrics;

/// [`Metadata`] with every call timed and its failures counted.
pub struct Timed {
    inner: Arc<dyn Metadata>,
}

impl Timed {
    pub fn new(inner: Arc<dyn Metadata>) -> Self {
        Timed { inner }
    }
}

fn timed<T>(op: &'static str, call: impl FnOnce() -> MetaResult<T>) -> MetaResult<T> {
    let started = Instant::now();
    let result = call();
    ::metrics::histogram!(metrics::DATABASE_SECONDS, "op" => op)
        .record(started.elapsed().as_secs_f64());
    if result.is_err() {
        ::metrics::counter!(metrics::DATABASE_ERRORS_TOTAL, "op" => op).increment(1);
    }
    result
}

impl Metadata for Timed {
    fn create_repo(&self, repo: &RepoRecord) -> MetaResult<bool> {
        timed("create_repo", || self.inner.create_repo(repo))
    }

    fn repo(&self, name: &str) -> MetaResult<Option<RepoRecord>> {
        timed("repo", || self.inner.repo(name))
    }

    fn repos(&self) -> MetaResult<Vec<RepoRecord>> {
        timed("repos", || self.inner.repos())
    }

    fn set_upstream_keys(&self, name: &str, keys: &[String]) -> MetaResult<bool> {
        timed("set_upstream_keys", || {
            self.inner.set_upstream_keys(name, keys)
        })
    }

    fn create_token(&self, token: &TokenRecord) -> MetaResult<()> {
        timed("create_token", || self.inner.create_token(token))
    }

    fn token(&self, id: &str) -> MetaResult<Option<TokenRecord>> {
        timed("token", || self.inner.token(id))
    }

    fn tokens(&self) -> MetaResult<Vec<TokenRecord>> {
        timed("tokens", || self.inner.tokens())
    }

    fn revoke_token(&self, id: &str, at: i64) -> MetaResult<bool> {
        timed("revoke_token", || self.inner.revoke_token(id, at))
    }

    fn narinfo(&self, repo: &str, hash: &str) -> MetaResult<Option<String>> {
        timed("narinfo", || self.inner.narinfo(repo, hash))
    }

    fn presence(&self, repo: &str, queries: &[(String, String)]) -> MetaResult<Vec<Presence>> {
        timed("presence", || self.inner.presence(repo, queries))
    }

    fn publish(&self, repo: &str, narinfos: &[PublishedNarInfo]) -> MetaResult<Vec<bool>> {
        timed("publish", || self.inner.publish(repo, narinfos))
    }

    fn nar_by_hash(&self, repo: &str, nar_hash: &str) -> MetaResult<Option<NarRecord>> {
        timed("nar_by_hash", || self.inner.nar_by_hash(repo, nar_hash))
    }

    fn nar_by_url(&self, repo: &str, url: &str) -> MetaResult<Option<NarRecord>> {
        timed("nar_by_url", || self.inner.nar_by_url(repo, url))
    }

    fn insert_nar(&self, repo: &str, nar: &NarRecord) -> MetaResult<bool> {
        timed("insert_nar", || self.inner.insert_nar(repo, nar))
    }

    fn upload(&self, id: &str) -> MetaResult<Option<UploadRecord>> {
        timed("upload", || self.inner.upload(id))
    }

    fn delete_upload(&self, id: &str) -> MetaResult<()> {
        timed("delete_upload", || self.inner.delete_upload(id))
    }

    fn uploads_inactive_since(&self, at: i64) -> MetaResult<Vec<UploadRecord>> {
        timed("uploads_inactive_since", || {
            self.inner.uploads_inactive_since(at)
        })
    }

    fn touch_upload(&self, id: &str, at: i64) -> MetaResult<()> {
        timed("touch_upload", || self.inner.touch_upload(id, at))
    }

    fn set_upload_staging_id(&self, id: &str, staging_id: &str) -> MetaResult<()> {
        timed("set_upload_staging_id", || {
            self.inner.set_upload_staging_id(id, staging_id)
        })
    }

    fn add_upload_part(
        &self,
        id: &str,
        offset: u64,
        part: &UploadPart,
        at: i64,
    ) -> MetaResult<bool> {
        timed("add_upload_part", || {
            self.inner.add_upload_part(id, offset, part, at)
        })
    }

    fn upload_parts(&self, id: &str) -> MetaResult<Vec<UploadPart>> {
        timed("upload_parts", || self.inner.upload_parts(id))
    }

    fn replace_last_upload_part(
        &self,
        id: &str,
        offset: u64,
        last: &UploadPart,
        part: &UploadPart,
        at: i64,
    ) -> MetaResult<bool> {
        timed("replace_last_upload_part", || {
            self.inner
                .replace_last_upload_part(id, offset, last, part, at)
        })
    }

    fn open_upload(
        &self,
        upload: &UploadRecord,
        token_id: &str,
        caps: SessionCaps,
    ) -> MetaResult<OpenedUpload> {
        timed("open_upload", || {
            self.inner.open_upload(upload, token_id, caps)
        })
    }

    fn published_store_paths(
        &self,
        repo: &str,
        hashes: &[String],
    ) -> MetaResult<Vec<Option<String>>> {
        timed("published_store_paths", || {
            self.inner.published_store_paths(repo, hashes)
        })
    }

    fn record_object_intent(&self, key: &str, at: i64) -> MetaResult<()> {
        timed("record_object_intent", || {
            self.inner.record_object_intent(key, at)
        })
    }

    fn clear_object_intent(&self, key: &str) -> MetaResult<()> {
        timed("clear_object_intent", || {
            self.inner.clear_object_intent(key)
        })
    }

    fn object_intents_before(&self, at: i64, limit: usize) -> MetaResult<Vec<String>> {
        timed("object_intents_before", || {
            self.inner.object_intents_before(at, limit)
        })
    }

    fn known_object_keys(&self, keys: &[String]) -> MetaResult<Vec<bool>> {
        timed("known_object_keys", || self.inner.known_object_keys(keys))
    }

    fn ping(&self) -> MetaResult<()> {
        timed("ping", || self.inner.ping())
    }

    fn schema_version(&self) -> MetaResult<i64> {
        timed("schema_version", || self.inner.schema_version())
    }

    fn try_singleton(&self, name: &str) -> MetaResult<Option<SingletonGuard>> {
        timed("try_singleton", || self.inner.try_singleton(name))
    }
}
