//! Push while building: `watch-store` and `watch-exec` feed every store path that becomes valid
//! in the local Nix store to the push pipeline, batch after batch, for as long as they run.
//!
//! ```text
//!   Nix database (ValidPaths, read-only)
//!      │ scanner thread: every POLL, rows with id > high-water mark
//!      ▼
//!   Tracker.pending  {path -> seen at, attempts}        ──► gauge stowix_watch_paths_waiting
//!      │ batch loop: wake on new paths, LINGER to coalesce near-simultaneous builds,
//!      │ take every pending path as the roots of one batch
//!      ▼
//!   push::run(roots, tolerant) ── closure ─► presence ─► dump ─► compress ─► upload ─► publish
//!      (one client, rate limiters, Progress and metrics for the whole process)        │
//!      ▲                                                                               │
//!      └── Follower::settled(path, published) ◄── Progress.present / published / failed ┘
//!            published: leaves pending (lag histogram), joins `known` (presence skips it)
//!            failed: retried with backoff, given up after MAX_ATTEMPTS
//! ```
//!
//! Why the database, polled, and not inotify: every way a path becomes valid (a build, a
//! substitution, `nix-store --add`, `--import`, a copy into the local store) ends in one row of
//! `ValidPaths`, committed in id order, so a high-water mark on `id` misses nothing: not a path
//! that became valid while a batch ran, nor while the server was down (the rows wait in the
//! database; the mark only says what was seen). cachix and attic watch the store directory with
//! inotify for the removal of `<path>.lock`; that is fast, but an inotify queue that overflows
//! drops events, nothing is remembered while the watcher is busy elsewhere unless it queues
//! every event itself, and a lock's removal alone does not say the path is valid, so the
//! database must be read anyway. A poll of an indexed primary key every [`POLL`] is one index
//! lookup and keeps latency well inside the 2 s goal (measured: 0.1 to 0.6 s from `nix-build`
//! returning to the narinfo being served; `tests/watch.rs` prints it), so the database alone
//! is both the trigger and the source of truth.
//!
//! What is pushed: paths that become valid after the watcher started (the mark is taken before
//! anything else happens: `watch-exec` takes it before it starts the command); with
//! `watch-store --since-start=false` the mark starts at 0, so the whole store is pushed first.
//! Their closures come along, as with `stowix nix push`. A restart does not re-upload anything: presence
//! answers say what the repository has, and within one process `known` skips even the
//! question (bounded to [`KNOWN_CAP`] hashes, then forgotten wholesale: the server answers).
//!
//! Outages: the pipeline's failure policy pauses while the server is silent; a run that ends
//! with `Unreachable` (after `--retry-timeout`) or `StorageFull` leaves its roots pending and
//! the loop tries again, so a watcher outlives any outage (`watch-exec`, once its command has
//! ended, gives up instead and exits with the push's failure code). Authorization failures,
//! a deleted repository or a non-Stowix server end the watcher.
//!
//! Stopping: [`Control::drain`] (first SIGTERM/SIGINT, or `watch-exec`'s command ending)
//! makes the scanner look one last time and stop, and the loop ends once everything seen is
//! published or given up. [`Control::cancel`] (a second signal) stops the pipeline at once;
//! unfinished uploads stay on the server and the next run resumes them.

pub mod store_db;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::metrics as m;
use super::progress::{Follower, Progress};
use super::{PushConfig, PushError, Roots, RunFailure};
use crate::api::RepoInfo;
use crate::client::PushClient;
use crate::nix::StorePath;
use store_db::StoreDb;

/// How often the scanner reads new rows: a fifth of a second is far inside the 2 s goal, and
/// the query reads a few index pages.
pub const POLL: Duration = Duration::from_millis(200);
/// How long a batch waits for more paths once the first one arrived: the outputs of one
/// `nix-build` and of builds finishing together share one closure query and one presence query.
const LINGER: Duration = Duration::from_millis(50);
/// Rows read per query: bounds the memory of a burst (a `nix copy` of thousands of paths into
/// the local store) to one page at a time.
const SCAN_PAGE: usize = 4096;
/// Attempts per path before it is given up (reported, counted, not tried again).
const MAX_ATTEMPTS: u32 = 3;
/// First pause before a failed path is tried again, doubled per attempt.
const RETRY_FIRST_DELAY: Duration = Duration::from_secs(2);
/// Pause before a run that ended on an outage is tried again (the run itself already waited
/// `--retry-timeout` for the server).
const OUTAGE_PAUSE: Duration = Duration::from_secs(5);
/// Consecutive runs that may fail on Nix itself (`nix path-info` failing for no path's fault)
/// before the watcher gives up.
const MAX_NIX_FAILURES: u32 = 5;
/// Hashes of published paths remembered: 48 bytes each, so 1 M is ~50 MiB at most; beyond
/// that the set is cleared and the server's presence answers take over.
pub const KNOWN_CAP: usize = 1_000_000;

/// A path seen becoming valid, not yet published.
struct Pending {
    seen: Instant,
    attempts: u32,
    /// It failed in the current attempt (set by `settled`, judged after the run).
    failed: bool,
    /// Not to be tried again before this.
    not_before: Instant,
}

/// What the watcher knows about paths: the ones waiting and the ones published.
#[derive(Default)]
pub struct Tracker {
    pending: Mutex<HashMap<StorePath, Pending>>,
    known: Mutex<HashSet<String>>,
    given_up: AtomicU64,
    /// Rung when new paths arrive.
    arrived: Notify,
}

impl Tracker {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Paths seen becoming valid now.
    fn add(&self, paths: impl IntoIterator<Item = StorePath>) {
        let now = Instant::now();
        let mut pending = self.pending.lock().expect("pending lock");
        let mut added = 0;
        for path in paths {
            pending.entry(path).or_insert_with(|| {
                added += 1;
                Pending {
                    seen: now,
                    attempts: 0,
                    failed: false,
                    not_before: now,
                }
            });
        }
        gauge!(m::WATCH_PATHS_WAITING).set(pending.len() as f64);
        drop(pending);
        if added > 0 {
            counter!(m::WATCH_PATHS_SEEN_TOTAL).increment(added);
            self.arrived.notify_one();
        }
    }

    /// Paths waiting (failed ones included until they are given up).
    pub fn waiting(&self) -> usize {
        self.pending.lock().expect("pending lock").len()
    }

    /// Paths that failed every attempt.
    pub fn given_up(&self) -> u64 {
        self.given_up.load(Ordering::Relaxed)
    }

    /// The roots of the next batch: every pending path that may be tried now, and when the
    /// earliest deferred one may be.
    fn ready(&self) -> (Vec<StorePath>, Option<Instant>) {
        let now = Instant::now();
        let pending = self.pending.lock().expect("pending lock");
        let mut roots = Vec::new();
        let mut next: Option<Instant> = None;
        for (path, entry) in pending.iter() {
            if entry.not_before <= now {
                roots.push(path.clone());
            } else {
                next = Some(next.map_or(entry.not_before, |n| n.min(entry.not_before)));
            }
        }
        roots.sort_unstable();
        (roots, next)
    }

    /// `roots` are about to be pushed: a failure recorded before (a path that failed as a
    /// dependency in an earlier run) must not be judged as theirs.
    fn begin(&self, roots: &[StorePath]) {
        let mut pending = self.pending.lock().expect("pending lock");
        for root in roots {
            if let Some(entry) = pending.get_mut(root) {
                entry.failed = false;
            }
        }
    }

    /// After a run that completed: roots that failed are deferred or given up; roots with no
    /// outcome were no longer valid (collected since they were seen) or were skipped as signed
    /// by an upstream cache, and are dropped. (Upstream paths never join `known`: a dependent's
    /// publication must carry their proof, which only the upstream route adds.)
    fn judge(&self, roots: &[StorePath], progress: &Progress) {
        let now = Instant::now();
        let mut pending = self.pending.lock().expect("pending lock");
        for root in roots {
            let Some(entry) = pending.get_mut(root) else {
                continue;
            };
            if !entry.failed {
                pending.remove(root);
                continue;
            }
            entry.failed = false;
            entry.attempts += 1;
            if entry.attempts >= MAX_ATTEMPTS {
                pending.remove(root);
                self.given_up.fetch_add(1, Ordering::Relaxed);
                counter!(m::WATCH_PATHS_GIVEN_UP_TOTAL).increment(1);
                progress.warn(&format!(
                    "giving up on {root} after {MAX_ATTEMPTS} attempts (see the failures above)"
                ));
            } else {
                entry.not_before = now + RETRY_FIRST_DELAY * 2u32.pow(entry.attempts - 1);
            }
        }
        gauge!(m::WATCH_PATHS_WAITING).set(pending.len() as f64);
    }
}

impl Follower for Tracker {
    fn settled(&self, path: &StorePath, published: bool) {
        if published {
            let mut known = self.known.lock().expect("known lock");
            if known.len() >= KNOWN_CAP {
                known.clear();
            }
            known.insert(path.hash_part().to_owned());
        }
        let mut pending = self.pending.lock().expect("pending lock");
        if published {
            if let Some(entry) = pending.remove(path) {
                histogram!(m::WATCH_PUBLICATION_LAG_SECONDS)
                    .record(entry.seen.elapsed().as_secs_f64());
            }
        } else if let Some(entry) = pending.get_mut(path) {
            entry.failed = true;
        }
        gauge!(m::WATCH_PATHS_WAITING).set(pending.len() as f64);
    }

    fn is_published(&self, path: &StorePath) -> bool {
        self.known
            .lock()
            .expect("known lock")
            .contains(path.hash_part())
    }
}

/// How the watcher is told to stop, and what it does when the server stays silent.
#[derive(Clone)]
pub struct Control {
    /// Stop looking for new paths; publish what was seen, then end.
    pub drain: CancellationToken,
    /// Stop at once.
    pub cancel: CancellationToken,
    pub outage: OutagePolicy,
}

impl Control {
    pub fn new(outage: OutagePolicy) -> Self {
        Self {
            drain: CancellationToken::new(),
            cancel: CancellationToken::new(),
            outage,
        }
    }
}

/// What to do when the server stays silent past `--retry-timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutagePolicy {
    /// Keep the paths and try again, forever (`watch-store`).
    Wait,
    /// Wait while not draining; once draining, end with the failure (`watch-exec`: the job
    /// must end, and its log says the push failed).
    GiveUpWhenDraining,
}

/// Reads new rows of the Nix database on its own thread (rusqlite is blocking) and hands them
/// to the tracker. Stops after one last scan once `drain` is set, or on `cancel`.
pub struct Scanner {
    db: StoreDb,
    mark: i64,
}

impl Scanner {
    /// Takes the high-water mark now: only paths that become valid from here on are pushed.
    pub fn start_now(db: StoreDb) -> Result<Self, String> {
        let mark = db.high_water()?;
        Ok(Self { db, mark })
    }

    /// Pushes every path registered after `mark` (0: the whole store).
    pub fn start_at(db: StoreDb, mark: i64) -> Self {
        Self { db, mark }
    }

    pub fn mark(&self) -> i64 {
        self.mark
    }

    /// One pass: every row above the mark, page by page.
    fn scan(&mut self, tracker: &Tracker) -> Result<(), String> {
        loop {
            let rows = self.db.since(self.mark, SCAN_PAGE)?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            self.mark = last.id;
            let full = rows.len() == SCAN_PAGE;
            tracker.add(rows.into_iter().filter_map(|row| row.path));
            if !full {
                return Ok(());
            }
        }
    }

    /// Scans every [`POLL`] until told to stop; a read error (the database locked for longer
    /// than the busy timeout, say) is reported and the next poll tries again from the same mark.
    fn run(mut self, tracker: Arc<Tracker>, stop: Arc<AtomicBool>, progress: Arc<Progress>) {
        let mut failing = false;
        loop {
            let last = stop.load(Ordering::Acquire);
            match self.scan(&tracker) {
                Ok(()) => failing = false,
                Err(err) if !failing => {
                    failing = true;
                    progress.warn(&format!("{err}; trying again"));
                }
                Err(_) => {}
            }
            if last {
                return;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Watches until drained (or cancelled), pushing batch after batch through one pipeline setup.
/// `Ok` once everything seen was published or given up (see [`Tracker::given_up`]).
pub async fn run(
    client: Arc<PushClient>,
    info: &RepoInfo,
    config: PushConfig,
    progress: Arc<Progress>,
    tracker: Arc<Tracker>,
    scanner: Scanner,
    control: Control,
) -> Result<(), PushError> {
    let stop_scanning = Arc::new(AtomicBool::new(false));
    // However the loop ends, the scanner thread ends at its next poll.
    let _stop_guard = SetOnDrop(Arc::clone(&stop_scanning));
    let mut scanner = Some({
        let (tracker, stop, progress) = (
            Arc::clone(&tracker),
            Arc::clone(&stop_scanning),
            Arc::clone(&progress),
        );
        tokio::task::spawn_blocking(move || scanner.run(tracker, stop, progress))
    });
    let mut nix_failures = 0;
    loop {
        if control.cancel.is_cancelled() {
            return Err(PushError::Cancelled);
        }
        let draining = control.drain.is_cancelled();
        if draining {
            if let Some(scanner) = scanner.take() {
                // The last scan: whatever became valid before the drain is pushed.
                stop_scanning.store(true, Ordering::Release);
                tokio::select! {
                    joined = scanner => joined.map_err(|e| PushError::Internal(format!("the store scanner failed: {e}")))?,
                    () = control.cancel.cancelled() => return Err(PushError::Cancelled),
                }
            }
        }
        let (roots, next) = tracker.ready();
        if roots.is_empty() {
            if draining && next.is_none() {
                return Ok(());
            }
            // Wait for new paths, a deferred retry, or a stop.
            let arrived = tracker.arrived.notified();
            tokio::select! {
                () = arrived => {}
                () = sleep_until(next) => {}
                () = control.drain.cancelled(), if !draining => {}
                () = control.cancel.cancelled() => {}
            }
            continue;
        }
        // Near-simultaneous builds share this batch.
        if !draining {
            tokio::time::sleep(LINGER).await;
        }
        let (roots, _) = tracker.ready();
        tracker.begin(&roots);
        counter!(m::WATCH_BATCHES_TOTAL).increment(1);
        let result = super::run(
            Arc::clone(&client),
            info,
            Roots {
                paths: roots.clone(),
                stdin: false,
                tolerant: true,
            },
            config.clone(),
            Arc::clone(&progress),
            control.cancel.child_token(),
        )
        .await;
        match result {
            Ok(()) => {
                nix_failures = 0;
                tracker.judge(&roots, &progress);
            }
            Err(PushError::Cancelled) => return Err(PushError::Cancelled),
            Err(PushError::Fatal(
                failure @ (RunFailure::Unreachable { .. } | RunFailure::StorageFull(_)),
            )) => {
                if control.outage == OutagePolicy::GiveUpWhenDraining
                    && control.drain.is_cancelled()
                {
                    return Err(PushError::Fatal(failure));
                }
                progress.warn(&format!(
                    "{}; keeping the {} waiting paths and trying again",
                    first_line(&failure.to_string()),
                    tracker.waiting()
                ));
                pause(OUTAGE_PAUSE, &control.cancel).await;
            }
            Err(PushError::Closure(err)) if !err.is_usage() => {
                nix_failures += 1;
                if nix_failures >= MAX_NIX_FAILURES {
                    return Err(PushError::Closure(err));
                }
                progress.warn(&format!("{}; trying again", first_line(&err.to_string())));
                pause(RETRY_FIRST_DELAY * nix_failures, &control.cancel).await;
            }
            Err(err) => return Err(err),
        }
    }
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

async fn pause(time: Duration, cancel: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(time) => {}
        () = cancel.cancelled() => {}
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::report::SilentReporter;

    fn path(c: char, name: &str) -> StorePath {
        StorePath::from_basename(&format!("{}-{name}", c.to_string().repeat(32))).unwrap()
    }

    #[test]
    fn published_paths_leave_the_queue_and_are_remembered() {
        let tracker = Tracker::new();
        let (a, b) = (path('a', "a"), path('b', "b"));
        tracker.add([a.clone(), b.clone()]);
        assert_eq!(tracker.waiting(), 2);
        tracker.settled(&a, true);
        assert_eq!(tracker.waiting(), 1);
        assert!(tracker.is_published(&a));
        assert!(!tracker.is_published(&b));
        // Seen again (collected and rebuilt): waits again, though the server may have it.
        tracker.add([a.clone()]);
        assert_eq!(tracker.waiting(), 2);
    }

    #[test]
    fn a_failure_from_an_earlier_run_is_not_counted_against_the_next() {
        let progress = Progress::new(Arc::new(SilentReporter));
        let tracker = Tracker::new();
        let dep = path('f', "dep");
        tracker.add([dep.clone()]);
        // It failed as a dependency of another root, before it was a root itself.
        tracker.settled(&dep, false);
        let (roots, _) = tracker.ready();
        tracker.begin(&roots);
        // This run gives it no outcome (it was collected meanwhile): dropped, not retried as
        // if it had failed again.
        tracker.judge(&roots, &progress);
        assert_eq!(tracker.waiting(), 0);
        assert_eq!(tracker.given_up(), 0);
    }

    #[test]
    fn failed_roots_are_deferred_then_given_up_and_vanished_ones_dropped() {
        let progress = Progress::new(Arc::new(SilentReporter));
        let tracker = Tracker::new();
        let (bad, gone) = (path('c', "bad"), path('d', "gone"));
        tracker.add([bad.clone(), gone.clone()]);
        for attempt in 1..=MAX_ATTEMPTS {
            let (roots, _) = tracker.ready();
            assert!(roots.contains(&bad), "attempt {attempt}: {roots:?}");
            tracker.settled(&bad, false);
            tracker.judge(&roots, &progress);
            assert!(!tracker.ready().0.contains(&gone), "no outcome: dropped");
            if attempt < MAX_ATTEMPTS {
                let (ready, next) = tracker.ready();
                assert!(ready.is_empty(), "deferred, not retried at once");
                assert!(next.is_some());
                // Let the deferral pass.
                let mut pending = tracker.pending.lock().unwrap();
                pending.get_mut(&bad).unwrap().not_before = Instant::now();
            }
        }
        assert_eq!(tracker.waiting(), 0);
        assert_eq!(tracker.given_up(), 1);
    }
}
