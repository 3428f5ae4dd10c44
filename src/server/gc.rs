//! Garbage collection: removes the published paths a repository's retention policy no longer
//! keeps, then the NARs nothing names any more, without ever leaving a narinfo whose NAR or
//! references are gone. At most one collector runs at a time across all replicas
//! (`Metadata::try_singleton("gc")`); `serve` runs one every `gc_interval_secs`, and
//! `stowix admin gc` runs one now.
//!
//! ```text
//!  per repository, on one database session (GcSession: the working tables live there)
//!
//!  policy (retention, max size) ──► cutoff T: paths last used at or after T are roots
//!     retention: T = now - retention            never later than now - gc_grace_secs
//!     max size:  binary search on T: the largest closure that fits (LRU goes first)
//!                              │
//!  mark(T): roots = pinned paths ∪ last use >= T ──► closure over narinfo_refs, one
//!           generation per statement, in the database (memory: nothing per path)
//!                              │
//!  dead(): published, not live, last use < T ──► gc_dead (the candidates)
//!                              │
//!  sweep(batch) until empty: a candidate goes only when no published path references it
//!           any more and no pin holds it (rechecked under lock: see the backends), so
//!           referrers go first and a path published meanwhile keeps what it references;
//!           NARs left without a narinfo are marked unreferenced (orphaned_at = now)
//!                              │
//!  NARs stored but never published, older than gc_grace_secs ──► marked unreferenced
//!  NARs marked before now - orphan_grace_secs, still unnamed ──► row deleted, then object
//! ```
//! A substituter that read a narinfo just before its path was collected still gets the NAR:
//! objects outlive their narinfos by `orphan_grace_secs`. A publication that names a marked NAR
//! revives it; one whose references were collected is refused (`missing_references`) and the
//! client uploads them again.
//!
//! Cost: each mark reads the live closure once through indexes (`narinfo_refs` by referrer),
//! one statement per generation of the reference graph; `--max-size` repeats the mark for each
//! step of its binary search (about 30 for a span of years). docs/retention.md has the figures.

use std::sync::Arc;
use std::time::Instant;

use super::error::ServerResult;
use super::metadata::{Metadata, NarRecord, RetentionPolicy};
use super::AppState;

/// Paths removed per sweep transaction: big enough to amortise the round trips, small enough
/// that a publication waiting for the collector's locks waits milliseconds, not seconds.
const SWEEP_BATCH: usize = 1000;
/// NAR records deleted per transaction (their objects are deleted after it commits).
const NAR_BATCH: usize = 500;
/// Store paths a collection reports by name per repository; the rest are counted. Keeps a
/// collection of millions of paths bounded in memory, and its output readable.
pub const LISTED_PATHS: usize = 10_000;

/// When a collection runs and what it may remove.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// One repository, or all of them.
    pub repo: Option<String>,
    /// Count what a real run would remove, changing nothing.
    pub dry_run: bool,
    /// The collection's clock (Unix seconds): `stowix admin gc --now` sets it.
    pub now: i64,
    /// Paths published or used within this many seconds are never collected.
    pub grace_secs: u64,
    /// NARs marked unreferenced stay this long before their objects are deleted.
    pub orphan_grace_secs: u64,
}

/// What one collection did to one repository (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepoCollected {
    pub repo: String,
    pub policy: RetentionPolicy,
    /// Paths kept by the policy (the roots' closure) when it has limits; all paths otherwise.
    pub kept_paths: u64,
    pub kept_bytes: u64,
    /// Paths removed (a dry run: that a real run at the same moment would remove).
    pub paths_removed: u64,
    /// The first [`LISTED_PATHS`] of their store paths, sorted.
    pub removed: Vec<String>,
    /// NARs newly marked unreferenced (deleted after `orphan_grace_secs`).
    pub nars_marked: u64,
    /// NARs whose objects were deleted (marked more than `orphan_grace_secs` ago).
    pub nars_deleted: u64,
    /// Compressed bytes of those objects.
    pub bytes_freed: u64,
    /// `--max-size` could not be met: pins and the grace period alone keep more.
    pub over_max_size: bool,
}

/// The clock the server stamps publications and uses with. Tests point `STOWIX_CLOCK_FILE` at
/// a file holding Unix seconds to move time without sleeping; nothing else should set it.
pub fn now() -> i64 {
    static CLOCK_FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let file = CLOCK_FILE.get_or_init(|| std::env::var_os("STOWIX_CLOCK_FILE").map(Into::into));
    if let Some(path) = file {
        if let Some(at) = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            return at;
        }
    }
    super::metadata::now_unix()
}

/// One collection; `None` when another process's collector holds the lock.
pub async fn run(
    state: &AppState,
    options: &GcOptions,
) -> ServerResult<Option<Vec<RepoCollected>>> {
    let Some(guard) = state.db(|meta| meta.try_singleton("gc")).await? else {
        return Ok(None);
    };
    let started = Instant::now();
    // Uses recorded in this process count before the mark.
    state.last_use.flush(state).await;
    let repos: Vec<String> = match &options.repo {
        Some(name) => vec![name.clone()],
        None => state
            .db(|meta| meta.repos())
            .await?
            .into_iter()
            .map(|r| r.name)
            .collect(),
    };
    let mut done = Vec::with_capacity(repos.len());
    for repo in repos {
        let meta = Arc::clone(&state.meta);
        let storage = Arc::clone(&state.storage);
        let runtime = tokio::runtime::Handle::current();
        let opts = options.clone();
        let collected = tokio::task::spawn_blocking(move || {
            collect_repo(meta.as_ref(), &repo, &opts, |nar: &NarRecord| {
                // Objects go after their rows: a crash in between leaves an object the janitor
                // (bucket listing) or a later collection never sees again, not a broken row.
                if let Err(err) = runtime.block_on(storage.delete(&nar.object_key)) {
                    tracing::warn!("gc: could not delete object {}: {err}", nar.object_key);
                }
            })
        })
        .await??;
        if !options.dry_run {
            forget_removed(state, &collected);
            ::metrics::counter!(super::metrics::GC_PATHS_REMOVED_TOTAL)
                .increment(collected.paths_removed);
            ::metrics::counter!(super::metrics::GC_BYTES_FREED_TOTAL)
                .increment(collected.bytes_freed);
            let name = collected.repo.clone();
            if let Ok(usage) = state.db(move |meta| meta.usage(&name)).await {
                super::metrics::record_usage(&collected.repo, &usage);
            }
        }
        done.push(collected);
    }
    if !options.dry_run {
        ::metrics::counter!(super::metrics::GC_RUNS_TOTAL).increment(1);
        ::metrics::histogram!(super::metrics::GC_DURATION_SECONDS)
            .record(started.elapsed().as_secs_f64());
    }
    drop(guard);
    Ok(Some(done))
}

/// This replica stops serving what the collection removed from its read cache at once (other
/// replicas within `narinfo_cache_secs`). When not every removed path is named, the whole
/// cache goes.
fn forget_removed(state: &AppState, collected: &RepoCollected) {
    if collected.paths_removed > collected.removed.len() as u64 {
        state.narinfos.clear();
        return;
    }
    for path in &collected.removed {
        if let Ok(path) = crate::nix::StorePath::from_absolute(path) {
            state
                .narinfos
                .forget(&format!("{}/{}", collected.repo, path.hash_part()));
        }
    }
}

/// The cutoff for `policy` (which sets a limit) at `now`: paths last used at or after it are
/// roots. True beside it when `--max-size` cannot be met.
fn cutoff_for(
    session: &mut dyn super::metadata::GcSession,
    policy: &RetentionPolicy,
    now: i64,
    grace_secs: u64,
) -> super::metadata::MetaResult<(i64, bool)> {
    let latest = now.saturating_sub(grace_secs as i64);
    let by_age = policy
        .retention_secs
        .map_or(i64::MIN, |r| now.saturating_sub(r as i64))
        .min(latest);
    let Some(max) = policy.max_size_bytes else {
        return Ok((by_age, false));
    };
    if session.mark(by_age)?.bytes <= max {
        return Ok((by_age, false));
    }
    if session.mark(latest)?.bytes > max {
        return Ok((latest, true));
    }
    // The kept size only shrinks as the cutoff moves later: the earliest cutoff that fits
    // keeps the most recently used paths and evicts the least recently used first.
    let (mut low, mut high) = (by_age.max(session.oldest_use()?.unwrap_or(latest)), latest);
    while low < high {
        let mid = low + (high - low) / 2;
        if session.mark(mid)?.bytes <= max {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    Ok((high, false))
}

/// Collects one repository, synchronously (on a blocking thread); `delete_object` removes a
/// NAR's object once its row is gone.
pub fn collect_repo(
    meta: &dyn Metadata,
    repo: &str,
    options: &GcOptions,
    mut delete_object: impl FnMut(&NarRecord),
) -> super::metadata::MetaResult<RepoCollected> {
    let policy = meta.policy(repo)?.unwrap_or_default();
    let now = options.now;
    let mut collected = RepoCollected {
        repo: repo.to_string(),
        policy,
        ..RepoCollected::default()
    };
    if policy == RetentionPolicy::default() {
        // No limit: every path stays, and no session (on PostgreSQL a connection and two
        // temporary tables) is opened for nothing.
        collected.kept_paths = meta.usage(repo)?.paths;
    } else {
        let mut session = meta.gc_session(repo)?;
        let (cutoff, over) = cutoff_for(session.as_mut(), &policy, now, options.grace_secs)?;
        collected.over_max_size = over;
        let live = session.mark(cutoff)?;
        collected.kept_paths = live.paths;
        collected.kept_bytes = live.bytes;
        let dead = session.dead()?;
        if options.dry_run {
            collected.nars_marked += dead.nars;
            collected.paths_removed = dead.paths;
            collected.removed = session.dead_paths(LISTED_PATHS)?;
        } else {
            loop {
                let swept = session.sweep(SWEEP_BATCH, now)?;
                if swept.paths.is_empty() {
                    break;
                }
                collected.nars_marked += swept.nars_orphaned;
                collected.paths_removed += swept.paths.len() as u64;
                let room = LISTED_PATHS.saturating_sub(collected.removed.len());
                let named = swept.paths.into_iter().take(room).map(|p| p.store_path);
                collected.removed.extend(named);
            }
        }
    }
    // The session is closed: everything below needs the connection (`stowix admin` has one).
    let grace_cutoff = now.saturating_sub(options.grace_secs as i64);
    collected.nars_marked +=
        meta.mark_unpublished_nars(repo, grace_cutoff, now, options.dry_run)?;
    let orphaned_before = now.saturating_sub(options.orphan_grace_secs as i64);
    if options.dry_run {
        let (count, bytes) = meta.collectible_nars(repo, orphaned_before)?;
        collected.nars_deleted = count;
        collected.bytes_freed = bytes;
    } else {
        loop {
            let taken = meta.take_collectible_nars(repo, orphaned_before, NAR_BATCH)?;
            if taken.is_empty() {
                break;
            }
            for nar in &taken {
                delete_object(nar);
                collected.nars_deleted += 1;
                collected.bytes_freed += nar.file_size;
            }
        }
    }
    collected.removed.sort();
    Ok(collected)
}
