//! Last use, batched: NAR downloads and presence answers that find a path published refresh
//! its last use (what `--retention` and `--max-size` go by), without a database write per
//! request.
//!
//! ```text
//!   GET nar/<file> ──► record_nar(repo, url, now) ─┐
//!   presence: Published ──► record_paths(repo, hashes, now) ┤► in memory: latest time per key
//!                                                          │
//!   every last_use_flush_secs, before each collection, at shutdown ──► flush ──► touch_nars /
//!   touch_paths (one statement per repository and kind; last_used_at only ever rises)
//! ```
//! A use not yet flushed cannot protect a path, so `gc_grace_secs` (default an hour) must stay
//! far above `last_use_flush_secs` (default 30 s): a path used within the grace period is kept
//! whether or not its use was written yet. Uses recorded on a replica that dies before its flush
//! are lost; the path then ages from its previous use.

use std::collections::HashMap;
use std::sync::Mutex;

use super::AppState;

/// Keys held before a flush is due anyway: a burst of distinct downloads cannot grow the map
/// without bound between ticks (a flush of this many is a few statements).
const MAX_PENDING: usize = 100_000;

#[derive(Default)]
struct Pending {
    /// `(repo, hash part)` → latest use.
    paths: HashMap<(String, String), i64>,
    /// `(repo, NAR URL)` → latest use.
    nars: HashMap<(String, String), i64>,
}

impl Pending {
    fn count(&self) -> usize {
        self.paths.len() + self.nars.len()
    }
}

#[derive(Default)]
pub struct LastUse {
    pending: Mutex<Pending>,
    flush_due: tokio::sync::Notify,
}

impl LastUse {
    /// Uses of published paths (hash parts) of `repo` at `at`, under one lock: a presence
    /// answer holds up to thousands of them.
    pub fn record_paths<'a>(&self, repo: &str, hashes: impl IntoIterator<Item = &'a str>, at: i64) {
        self.record(|p| &mut p.paths, repo, hashes, at);
    }

    pub fn record_nar(&self, repo: &str, url: &str, at: i64) {
        self.record(|p| &mut p.nars, repo, [url], at);
    }

    fn record<'a>(
        &self,
        map: impl FnOnce(&mut Pending) -> &mut HashMap<(String, String), i64>,
        repo: &str,
        keys: impl IntoIterator<Item = &'a str>,
        at: i64,
    ) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let uses = map(&mut pending);
        for key in keys {
            let slot = uses
                .entry((repo.to_string(), key.to_string()))
                .or_insert(at);
            *slot = (*slot).max(at);
        }
        if pending.count() >= MAX_PENDING {
            self.flush_due.notify_one();
        }
    }

    /// Resolves when the pending uses outgrow [`MAX_PENDING`].
    pub async fn overflowing(&self) {
        self.flush_due.notified().await;
    }

    /// Writes what was recorded. A failed write is logged and dropped: a lost use only makes a
    /// path age from its previous one.
    pub async fn flush(&self, state: &AppState) {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if taken.count() == 0 {
            return;
        }
        for (nars, map) in [(false, taken.paths), (true, taken.nars)] {
            let mut by_repo: HashMap<String, Vec<(String, i64)>> = HashMap::new();
            for ((repo, key), at) in map {
                by_repo.entry(repo).or_default().push((key, at));
            }
            for (repo, uses) in by_repo {
                let result = state
                    .db(move |meta| {
                        if nars {
                            meta.touch_nars(&repo, &uses)
                        } else {
                            meta.touch_paths(&repo, &uses)
                        }
                    })
                    .await;
                if let Err(err) = result {
                    tracing::warn!("could not record last uses: {}", err.body.message);
                }
            }
        }
        // Counted for every flush that had uses to write, whether or not the writes succeeded
        // (tests wait on it to know a use was handed to the database).
        ::metrics::counter!(super::metrics::LAST_USE_FLUSHES_TOTAL).increment(1);
    }
}
