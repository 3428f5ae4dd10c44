//! The one place stages report to. Each call updates the run's tally, the Prometheus metrics
//! and the [`Reporter`](super::report::Reporter); stages never print and never touch metric
//! names themselves.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};

use super::failure::{self, Health, PathFailure, ProbeEvent};
use super::metrics::{self as m, outcome};
use super::report::{PathEvent, Reporter};
use crate::client::{ClientError, ClientObserver, Endpoint, RetryReason};
use crate::nix::path_info::PathInfo;
use crate::nix::StorePath;

/// Counters of one run, readable at any time for status lines and the summary.
#[derive(Default)]
struct Tally {
    closure_paths: AtomicU64,
    closure_nar_bytes: AtomicU64,
    present: AtomicU64,
    to_upload: AtomicU64,
    to_upload_nar_bytes: AtomicU64,
    nar_bytes_read: AtomicU64,
    compressed_bytes: AtomicU64,
    uploaded_paths: AtomicU64,
    uploaded_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    published: AtomicU64,
    published_after_upload: AtomicU64,
    failed: AtomicU64,
    rejected_lines: AtomicU64,
    retries: AtomicU64,
    upstream: AtomicU64,
    upstream_nar_bytes: AtomicU64,
    logs_stored: AtomicU64,
    logs_failed: AtomicU64,
}

/// A consistent-enough copy of the tally (each field read once).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub elapsed: Duration,
    pub closure_paths: u64,
    pub closure_nar_bytes: u64,
    pub present: u64,
    pub to_upload: u64,
    pub to_upload_nar_bytes: u64,
    pub nar_bytes_read: u64,
    pub compressed_bytes: u64,
    /// NARs sent and stored by this run.
    pub uploaded_paths: u64,
    /// Compressed bytes of those NARs.
    pub uploaded_bytes: u64,
    /// Body bytes sent, retries included.
    pub wire_bytes: u64,
    pub published: u64,
    pub published_after_upload: u64,
    pub failed: u64,
    /// `--stdin` lines that were not store paths or whose `nix path-info` failed.
    pub rejected_lines: u64,
    pub retries: u64,
    /// Paths not pushed because an upstream cache signed them, and their NAR bytes.
    pub upstream: u64,
    pub upstream_nar_bytes: u64,
    /// `--logs`: build logs stored, and those that could not be.
    pub logs_stored: u64,
    pub logs_failed: u64,
}

impl Snapshot {
    /// Paths with a final outcome.
    pub fn done_paths(&self) -> u64 {
        self.present + self.published + self.failed + self.upstream
    }
}

pub struct Progress {
    reporter: Arc<dyn Reporter>,
    tally: Tally,
    started: Instant,
    /// Causes of failures in order of first appearance, with how many shared each.
    causes: Mutex<Vec<(String, u64)>>,
    /// The current run's health while a pipeline runs: retries that hint at an outage pause
    /// it. Replaced by each run of a long-lived pusher (`watch-store`).
    health: RwLock<Option<Arc<Health>>>,
    /// Told every path's final outcome, and asked which paths are known to be published.
    follower: OnceLock<Arc<dyn Follower>>,
    /// During a repair round: the hash parts it repairs. Every path of its closure was already
    /// counted by an earlier round, so only these paths' outcomes count as new; a path outside
    /// them that the round uploads again moves from "present" to its new outcome.
    repairing: RwLock<Option<HashSet<String>>>,
}

/// What a long-lived pusher (the watchers) learns from the pipeline: every path's final outcome,
/// so it knows when the roots it fed are published; and what it knows is already published, so
/// presence need not ask the server again.
pub trait Follower: Send + Sync {
    /// `path` reached its final outcome in this run: published (or present) or failed.
    fn settled(&self, path: &StorePath, published: bool);
    /// Whether `path` is known to be published in the repository.
    fn is_published(&self, path: &StorePath) -> bool;
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Progress {
    pub fn new(reporter: Arc<dyn Reporter>) -> Self {
        Self {
            reporter,
            tally: Tally::default(),
            started: Instant::now(),
            causes: Mutex::new(Vec::new()),
            health: RwLock::new(None),
            follower: OnceLock::new(),
            repairing: RwLock::new(None),
        }
    }

    /// `info` was refused because the repository no longer has one of its references or its
    /// NAR (garbage collection ran between the presence answer and the publication). Not an
    /// outcome: the publish stage hands it to a repair round; `failure` is what it ends with
    /// if none remains.
    pub fn deferred(&self, info: &PathInfo, failure: &PathFailure) {
        self.reporter.path(PathEvent::Deferred {
            path: &info.path,
            reason: &failure.to_string(),
        });
    }

    /// Starts a repair round for `paths` (see the `repairing` field).
    pub fn start_repair<'a>(&self, paths: impl IntoIterator<Item = &'a StorePath>) {
        *self.repairing.write().expect("repairing lock") = Some(
            paths
                .into_iter()
                .map(|p| p.hash_part().to_owned())
                .collect(),
        );
    }

    /// Every outcome counts again.
    pub fn end_repair(&self) {
        *self.repairing.write().expect("repairing lock") = None;
    }

    /// Whether an outcome of `path` was already counted by an earlier round: true in a repair
    /// round for every path but those it repairs.
    fn counted_before(&self, path: &StorePath) -> bool {
        self.repairing
            .read()
            .expect("repairing lock")
            .as_ref()
            .is_some_and(|repairing| !repairing.contains(path.hash_part()))
    }

    /// A path counted present by an earlier round that this repair round publishes again or
    /// fails: it leaves "present" for its new outcome.
    fn recount_present(&self, path: &StorePath) {
        if self.counted_before(path) {
            let _ = self
                .tally
                .present
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Connects the client's retry reports to the run's health (see [`failure`]).
    pub fn watch(&self, health: Arc<Health>) {
        *self.health.write().expect("health lock") = Some(health);
    }

    /// Connects the long-lived pusher that feeds this tally's runs (see [`Follower`]).
    pub fn follow(&self, follower: Arc<dyn Follower>) {
        let _ = self.follower.set(follower);
    }

    /// Whether the follower knows `path` is published (never, without a follower).
    pub fn known_published(&self, path: &StorePath) -> bool {
        self.follower.get().is_some_and(|f| f.is_published(path))
    }

    fn settled(&self, path: &StorePath, published: bool) {
        if let Some(follower) = self.follower.get() {
            follower.settled(path, published);
        }
    }

    /// Reports the prober's pauses and resumptions.
    pub fn probe_event(&self, event: ProbeEvent<'_>) {
        match event {
            ProbeEvent::Paused { reason, timeout } => self.reporter.warn(&format!(
                "the server does not answer ({reason}); pausing the push and retrying for up to {} s",
                timeout.as_secs()
            )),
            ProbeEvent::Resumed { after } => self.reporter.warn(&format!(
                "the server answers again after {:.1} s; resuming",
                after.as_secs_f64()
            )),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let t = &self.tally;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            elapsed: self.started.elapsed(),
            closure_paths: get(&t.closure_paths),
            closure_nar_bytes: get(&t.closure_nar_bytes),
            present: get(&t.present),
            to_upload: get(&t.to_upload),
            to_upload_nar_bytes: get(&t.to_upload_nar_bytes),
            nar_bytes_read: get(&t.nar_bytes_read),
            compressed_bytes: get(&t.compressed_bytes),
            uploaded_paths: get(&t.uploaded_paths),
            uploaded_bytes: get(&t.uploaded_bytes),
            wire_bytes: get(&t.wire_bytes),
            published: get(&t.published),
            published_after_upload: get(&t.published_after_upload),
            failed: get(&t.failed),
            rejected_lines: get(&t.rejected_lines),
            retries: get(&t.retries),
            upstream: get(&t.upstream),
            upstream_nar_bytes: get(&t.upstream_nar_bytes),
            logs_stored: get(&t.logs_stored),
            logs_failed: get(&t.logs_failed),
        }
    }

    /// Called about once a second: lets reporters redraw or print a status line.
    pub fn tick(&self) {
        self.reporter.status(&self.snapshot());
    }

    pub fn finish(&self) -> Snapshot {
        for (cause, count) in self.causes.lock().expect("causes lock").iter() {
            if *count > 1 {
                self.reporter.path(PathEvent::FailedAlike {
                    more: count - 1,
                    cause,
                });
            }
        }
        let snapshot = self.snapshot();
        self.reporter.finish(&snapshot);
        snapshot
    }

    pub fn warn(&self, message: &str) {
        self.reporter.warn(message);
    }

    pub fn note(&self, message: &str) {
        self.reporter.note(message);
    }

    /// New paths of the closure (already deduplicated).
    pub fn closure_paths(&self, paths: &[Arc<PathInfo>]) {
        if self.repairing.read().expect("repairing lock").is_some() {
            return;
        }
        add(&self.tally.closure_paths, paths.len() as u64);
        add(
            &self.tally.closure_nar_bytes,
            paths.iter().map(|p| p.nar_size).sum(),
        );
    }

    pub fn present(&self, info: &PathInfo) {
        if self.counted_before(&info.path) {
            self.settled(&info.path, true);
            return;
        }
        add(&self.tally.present, 1);
        counter!(m::PATHS_TOTAL, "outcome" => outcome::PRESENT).increment(1);
        self.reporter.path(PathEvent::Present { path: &info.path });
        self.settled(&info.path, true);
    }

    /// `info` is not pushed: the upstream cache whose key is `key` serves it.
    pub fn upstream(&self, info: &PathInfo, key: &str) {
        if self.counted_before(&info.path) {
            return;
        }
        add(&self.tally.upstream, 1);
        add(&self.tally.upstream_nar_bytes, info.nar_size);
        counter!(m::PATHS_TOTAL, "outcome" => outcome::UPSTREAM).increment(1);
        self.reporter.path(PathEvent::Upstream {
            path: &info.path,
            key,
        });
    }

    pub fn log_stored(&self, drv: &StorePath) {
        add(&self.tally.logs_stored, 1);
        self.reporter.path(PathEvent::Log {
            drv,
            outcome: "stored",
        });
    }

    /// The local store has no log for `drv` (it was substituted, or logs are not kept).
    pub fn log_missing(&self, drv: &StorePath) {
        self.reporter.path(PathEvent::Log {
            drv,
            outcome: "no local log",
        });
    }

    /// Not a path failure: the closure is published whatever happens to its logs.
    pub fn log_failed(&self, drv: &StorePath, reason: &str) {
        add(&self.tally.logs_failed, 1);
        self.reporter
            .warn(&format!("the build log of {drv} was not stored: {reason}"));
    }

    pub fn needs_upload(&self, info: &PathInfo) {
        add(&self.tally.to_upload, 1);
        add(&self.tally.to_upload_nar_bytes, info.nar_size);
    }

    pub fn nar_bytes_read(&self, bytes: u64) {
        add(&self.tally.nar_bytes_read, bytes);
        counter!(m::NAR_BYTES_TOTAL).increment(bytes);
    }

    pub fn compressed(&self, info: &PathInfo, compressed_size: u64, elapsed: Duration) {
        add(&self.tally.compressed_bytes, compressed_size);
        counter!(m::COMPRESSED_BYTES_TOTAL).increment(compressed_size);
        self.reporter.path(PathEvent::Compressed {
            path: &info.path,
            nar_size: info.nar_size,
            compressed_size,
            elapsed,
        });
    }

    pub fn uploaded(&self, info: &PathInfo, file_size: u64, elapsed: Duration, retries: u32) {
        add(&self.tally.uploaded_paths, 1);
        add(&self.tally.uploaded_bytes, file_size);
        self.reporter.path(PathEvent::Uploaded {
            path: &info.path,
            bytes: file_size,
            elapsed,
            retries,
        });
    }

    pub fn published(&self, info: &PathInfo, after_upload: bool) {
        self.recount_present(&info.path);
        add(&self.tally.published, 1);
        let label = if after_upload {
            add(&self.tally.published_after_upload, 1);
            outcome::UPLOADED
        } else {
            outcome::NAR_STORED
        };
        counter!(m::PATHS_TOTAL, "outcome" => label).increment(1);
        self.reporter
            .path(PathEvent::Published { path: &info.path });
        self.settled(&info.path, true);
    }

    pub fn failed(&self, path: &StorePath, failure: &PathFailure) {
        self.recount_present(path);
        add(&self.tally.failed, 1);
        counter!(m::PATHS_TOTAL, "outcome" => outcome::FAILED).increment(1);
        self.report_failure(&path.to_absolute(), failure);
        self.settled(path, false);
    }

    /// A `--stdin` line that could not be pushed; the rest of the input goes on. Each is
    /// printed: unlike a path of a closure, every line is something the user wrote and must fix.
    pub fn rejected_line(&self, failure: &PathFailure) {
        add(&self.tally.rejected_lines, 1);
        let line = match failure {
            PathFailure::BadLine { line, .. } | PathFailure::PathInfo { line, .. } => line.as_str(),
            _ => "",
        };
        self.reporter.path(PathEvent::Failed {
            subject: line,
            reason: &failure.to_string(),
        });
    }

    /// The first failure of each cause is printed in full; the others are only counted.
    fn report_failure(&self, subject: &str, failure: &PathFailure) {
        let cause = failure.cause();
        let first = {
            let mut causes = self.causes.lock().expect("causes lock");
            match causes.iter_mut().find(|(known, _)| *known == cause) {
                Some((_, count)) => {
                    *count += 1;
                    false
                }
                None => {
                    causes.push((cause, 1));
                    true
                }
            }
        };
        if first {
            self.reporter.path(PathEvent::Failed {
                subject,
                reason: &failure.to_string(),
            });
        }
    }

    /// A dump or compression of `info` begins.
    pub fn started(&self, stage: &'static str, info: &PathInfo) {
        self.reporter.path(PathEvent::Started {
            stage,
            path: &info.path,
        });
    }

    pub fn queue_depth(&self, stage: &'static str, depth: usize) {
        gauge!(m::STAGE_QUEUE_DEPTH, "stage" => stage).set(depth as f64);
    }

    pub fn busy(&self, stage: &'static str, time: Duration) {
        // metrics' counters are integers; seconds need fractions, so this monotonic value is
        // kept in a gauge (see docs/metrics.md).
        gauge!(m::STAGE_BUSY_SECONDS_TOTAL, "stage" => stage).increment(time.as_secs_f64());
    }
}

impl ClientObserver for Progress {
    fn request_finished(&self, endpoint: Endpoint, elapsed: Duration) {
        histogram!(m::HTTP_REQUEST_DURATION_SECONDS, "endpoint" => endpoint.label())
            .record(elapsed.as_secs_f64());
    }

    fn retrying(
        &self,
        endpoint: Endpoint,
        reason: RetryReason,
        delay: Duration,
        err: &ClientError,
    ) {
        add(&self.tally.retries, 1);
        counter!(m::RETRIES_TOTAL, "reason" => reason.label()).increment(1);
        let health = self.health.read().expect("health lock").clone();
        if let Some(health) = health {
            if failure::is_outage(err) {
                // The prober reports the pause once; a line per retrying request would repeat
                // the same news for every request in flight.
                health.suspect(err);
            }
            if health.is_paused() || health.is_stopped() {
                return;
            }
        }
        self.reporter
            .retrying(endpoint.label(), &err.to_string(), delay);
    }

    fn bytes_sent(&self, bytes: u64) {
        add(&self.tally.wire_bytes, bytes);
        counter!(m::UPLOADED_BYTES_TOTAL).increment(bytes);
    }

    fn rate_limited(&self, waited: Duration) {
        gauge!(m::RATE_LIMIT_WAIT_SECONDS_TOTAL).increment(waited.as_secs_f64());
    }
}
