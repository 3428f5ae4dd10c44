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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::{
    GcSession, MetaResult, Metadata, NarRecord, OpenedUpload, PathDeletion, PinCreated, PinRecord,
    Presence, PublishState, PublishedNarInfo, RepoRecord, RepoUsage, RetentionPolicy, SessionCaps,
    SingletonGuard, TokenRecord, UploadPart, UploadRecord,
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
    fn publish_checked(
        &self,
        repo: &str,
        narinfos: &[PublishedNarInfo],
        exempt: &HashSet<String>,
        at: i64,
    ) -> MetaResult<Vec<PublishState>> {
        timed("publish_checked", || {
            self.inner.publish_checked(repo, narinfos, exempt, at)
        })
    }

    fn policy(&self, repo: &str) -> MetaResult<Option<RetentionPolicy>> {
        timed("policy", || self.inner.policy(repo))
    }

    fn set_policy(&self, repo: &str, policy: &RetentionPolicy) -> MetaResult<bool> {
        timed("set_policy", || self.inner.set_policy(repo, policy))
    }

    fn usage(&self, repo: &str) -> MetaResult<RepoUsage> {
        timed("usage", || self.inner.usage(repo))
    }

    fn touch_paths(&self, repo: &str, uses: &[(String, i64)]) -> MetaResult<()> {
        timed("touch_paths", || self.inner.touch_paths(repo, uses))
    }

    fn touch_nars(&self, repo: &str, uses: &[(String, i64)]) -> MetaResult<()> {
        timed("touch_nars", || self.inner.touch_nars(repo, uses))
    }

    /// Only opening the session is timed: its steps are a collection's, measured by
    /// `stowix_server_gc_duration_seconds`.
    fn gc_session(&self, repo: &str) -> MetaResult<Box<dyn GcSession + '_>> {
        timed("gc_session", || self.inner.gc_session(repo))
    }

    fn mark_unpublished_nars(
        &self,
        repo: &str,
        created_before: i64,
        now: i64,
        dry_run: bool,
    ) -> MetaResult<u64> {
        timed("mark_unpublished_nars", || {
            self.inner
                .mark_unpublished_nars(repo, created_before, now, dry_run)
        })
    }

    fn collectible_nars(&self, repo: &str, orphaned_before: i64) -> MetaResult<(u64, u64)> {
        timed("collectible_nars", || {
            self.inner.collectible_nars(repo, orphaned_before)
        })
    }

    fn take_collectible_nars(
        &self,
        repo: &str,
        orphaned_before: i64,
        limit: usize,
    ) -> MetaResult<Vec<NarRecord>> {
        timed("take_collectible_nars", || {
            self.inner
                .take_collectible_nars(repo, orphaned_before, limit)
        })
    }

    fn delete_paths(
        &self,
        repo: &str,
        hashes: &[String],
        with_dependents: bool,
    ) -> MetaResult<PathDeletion> {
        timed("delete_paths", || {
            self.inner.delete_paths(repo, hashes, with_dependents)
        })
    }

    fn create_pin(
        &self,
        repo: &str,
        name: &str,
        hashes: &[String],
        keep: Option<u32>,
        at: i64,
    ) -> MetaResult<PinCreated> {
        timed("create_pin", || {
            self.inner.create_pin(repo, name, hashes, keep, at)
        })
    }

    fn pins(&self, repo: Option<&str>) -> MetaResult<Vec<PinRecord>> {
        timed("pins", || self.inner.pins(repo))
    }

    fn delete_pin(&self, repo: &str, name: &str, revision: Option<u64>) -> MetaResult<u64> {
        timed("delete_pin", || self.inner.delete_pin(repo, name, revision))
    }

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

    fn insert_nars(&self, repo: &str, nars: &[NarRecord]) -> MetaResult<Vec<bool>> {
        timed("insert_nars", || self.inner.insert_nars(repo, nars))
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

    fn record_object_intents(&self, keys: &[String], at: i64) -> MetaResult<()> {
        timed("record_object_intents", || {
            self.inner.record_object_intents(keys, at)
        })
    }

    fn clear_object_intents(&self, keys: &[String]) -> MetaResult<()> {
        timed("clear_object_intents", || {
            self.inner.clear_object_intents(keys)
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
