//! What the user sees, behind one trait so the engine never prints.
//!
//! ```text
//!   stages ──► Progress (tally, metrics) ──► dyn Reporter ──┬─ TerminalReporter: indicatif bar, lines above it
//!                                                           ├─ LineReporter: plain lines + status every 10 s (CI)
//!                                                           └─ SilentReporter (library use, tests)
//! ```
//! `--verbose` adds one line per path per event to either of the first two. A failure is
//! printed in full the first time its cause appears; later ones with the same cause are
//! counted and reported once, with the count, before the summary (see `Progress::failed`).

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{
    HumanBytes, HumanDuration, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle,
};

use super::progress::Snapshot;
use crate::nix::StorePath;

pub enum PathEvent<'a> {
    /// A dump or compression began (`--verbose`: shows what a stage did while the server was
    /// unreachable).
    Started {
        stage: &'static str,
        path: &'a StorePath,
    },
    Present {
        path: &'a StorePath,
    },
    /// `--logs`: what became of a derivation's build log.
    Log {
        drv: &'a StorePath,
        outcome: &'static str,
    },
    /// Skipped: signed by the upstream key named `key`.
    Upstream {
        path: &'a StorePath,
        key: &'a str,
    },
    Compressed {
        path: &'a StorePath,
        nar_size: u64,
        compressed_size: u64,
        elapsed: Duration,
    },
    Uploaded {
        path: &'a StorePath,
        bytes: u64,
        elapsed: Duration,
        retries: u32,
    },
    Published {
        path: &'a StorePath,
    },
    /// Not published in this round because the repository no longer holds something the path
    /// needs (collected while the push ran): the push sends it again in a repair round.
    Deferred {
        path: &'a StorePath,
        reason: &'a str,
    },
    /// The first failure with its cause; `subject` is the store path or the input line.
    Failed {
        subject: &'a str,
        reason: &'a str,
    },
    /// Failures after the first with the same cause, reported once at the end.
    FailedAlike {
        more: u64,
        cause: &'a str,
    },
}

pub trait Reporter: Send + Sync {
    fn path(&self, event: PathEvent<'_>);
    /// A request failed and will be tried again after `delay`.
    fn retrying(&self, endpoint: &str, error: &str, delay: Duration);
    fn warn(&self, message: &str);
    /// A plain line about what the process does (a watcher starting, the server answering).
    fn note(&self, message: &str) {
        self.warn(message);
    }
    /// Called about once a second with the current tally.
    fn status(&self, snapshot: &Snapshot);
    /// The final summary.
    fn finish(&self, snapshot: &Snapshot);
}

/// The line for a path event, or `None` for events only `--verbose` shows.
fn event_line(event: &PathEvent<'_>, verbose: bool) -> Option<String> {
    match *event {
        PathEvent::Failed { subject, reason } => Some(format!("failed: {subject}: {reason}")),
        PathEvent::FailedAlike { more, cause } => Some(format!(
            "failed: {more} more {} with the same cause: {cause}",
            if more == 1 { "path" } else { "paths" }
        )),
        _ if !verbose => None,
        PathEvent::Started { stage, path } => Some(format!("{stage} started: {path}")),
        PathEvent::Present { path } => Some(format!("already present: {path}")),
        PathEvent::Upstream { path, key } => Some(format!("skipped: {path} (signed by {key})")),
        PathEvent::Log { drv, outcome } => Some(format!("build log: {drv}: {outcome}")),
        PathEvent::Compressed {
            path,
            nar_size,
            compressed_size,
            elapsed,
        } => Some(format!(
            "compressed: {path}: {} -> {} in {:.2} s",
            HumanBytes(nar_size),
            HumanBytes(compressed_size),
            elapsed.as_secs_f64()
        )),
        PathEvent::Uploaded {
            path,
            bytes,
            elapsed,
            retries,
        } => Some(format!(
            "uploaded: {path}: {} in {:.2} s, {retries} {}",
            HumanBytes(bytes),
            elapsed.as_secs_f64(),
            if retries == 1 { "retry" } else { "retries" }
        )),
        PathEvent::Published { path } => Some(format!("published: {path}")),
        PathEvent::Deferred { path, reason } => {
            Some(format!("deferred to a repair round: {path}: {reason}"))
        }
    }
}

fn retry_line(endpoint: &str, error: &str, delay: Duration) -> String {
    format!(
        "warning: {endpoint}: {error}; retrying in {:.1} s",
        delay.as_secs_f64()
    )
}

fn rate(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    format!("{}/s", HumanBytes((bytes as f64 / secs) as u64))
}

fn status_line(s: &Snapshot) -> String {
    format!(
        "[{}] paths: {}/{} done ({} present, {} published, {} failed); NAR {} of {} read; sent {} ({})",
        HumanDuration(s.elapsed),
        s.done_paths(),
        s.closure_paths,
        s.present,
        s.published,
        s.failed,
        HumanBytes(s.nar_bytes_read),
        HumanBytes(s.to_upload_nar_bytes),
        HumanBytes(s.wire_bytes),
        rate(s.wire_bytes, s.elapsed),
    )
}

/// The summary every reporter except the silent one prints last.
pub fn summary_lines(s: &Snapshot) -> String {
    let ratio = if s.nar_bytes_read > 0 {
        format!(
            " ({:.0}%)",
            100.0 * s.compressed_bytes as f64 / s.nar_bytes_read as f64
        )
    } else {
        String::new()
    };
    let rejected = if s.rejected_lines > 0 {
        format!(
            "\nsummary: {} input {} rejected",
            s.rejected_lines,
            if s.rejected_lines == 1 {
                "line"
            } else {
                "lines"
            }
        )
    } else {
        String::new()
    };
    let upstream = if s.upstream > 0 {
        format!(
            "\nsummary: {} {} skipped (NAR {}): signed by an upstream cache the repository trusts",
            s.upstream,
            if s.upstream == 1 { "path" } else { "paths" },
            HumanBytes(s.upstream_nar_bytes)
        )
    } else {
        String::new()
    };
    let logs = if s.logs_stored + s.logs_failed > 0 {
        format!(
            "\nsummary: build logs: {} stored, {} not stored",
            s.logs_stored, s.logs_failed
        )
    } else {
        String::new()
    };
    format!(
        "summary: {} paths in closure: {} already present, {} uploaded, {} published without upload (NAR already stored), {} failed{rejected}{upstream}{logs}\n\
         summary: NAR {} -> {} compressed{ratio}; sent {} in {} ({}), {} retries",
        s.closure_paths,
        s.present,
        s.published_after_upload,
        s.published - s.published_after_upload,
        s.failed,
        HumanBytes(s.nar_bytes_read),
        HumanBytes(s.compressed_bytes),
        HumanBytes(s.wire_bytes),
        HumanDuration(s.elapsed),
        rate(s.wire_bytes, s.elapsed),
        s.retries,
    )
}

/// Plain lines on stderr for logs and CI: no cursor movement, and a status line at least every
/// [`LineReporter::STATUS_INTERVAL`] so a CI watchdog never sees a silent job.
pub struct LineReporter {
    verbose: bool,
    last_status: Mutex<Instant>,
    /// Put before every line (`stowix: ` under `watch-exec`, whose command shares the terminal).
    prefix: &'static str,
}

/// Puts `prefix` before every line of `text`.
pub fn prefixed(prefix: &str, text: &str) -> String {
    if prefix.is_empty() {
        return text.to_owned();
    }
    text.lines()
        .map(|line| format!("{prefix}{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl LineReporter {
    /// Well under the 30 s after which users start to wonder (and CI systems start to kill).
    pub const STATUS_INTERVAL: Duration = Duration::from_secs(10);

    pub fn new(verbose: bool) -> Self {
        Self::with_prefix(verbose, "")
    }

    pub fn with_prefix(verbose: bool, prefix: &'static str) -> Self {
        Self {
            verbose,
            last_status: Mutex::new(Instant::now()),
            prefix,
        }
    }

    fn line(&self, text: &str) {
        let text = prefixed(self.prefix, text);
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "{text}");
    }
}

impl Reporter for LineReporter {
    fn path(&self, event: PathEvent<'_>) {
        if let Some(line) = event_line(&event, self.verbose) {
            self.line(&line);
        }
    }

    fn retrying(&self, endpoint: &str, error: &str, delay: Duration) {
        self.line(&retry_line(endpoint, error, delay));
    }

    fn warn(&self, message: &str) {
        self.line(&format!("warning: {message}"));
    }

    fn note(&self, message: &str) {
        self.line(message);
    }

    fn status(&self, snapshot: &Snapshot) {
        let mut last = self.last_status.lock().expect("status lock");
        if last.elapsed() >= Self::STATUS_INTERVAL {
            *last = Instant::now();
            self.line(&status_line(snapshot));
        }
    }

    fn finish(&self, snapshot: &Snapshot) {
        self.line(&summary_lines(snapshot));
    }
}

/// A progress bar on a terminal; every log line goes through `MultiProgress::println`, which
/// clears the bar, prints, and redraws, so lines are never garbled.
pub struct TerminalReporter {
    verbose: bool,
    multi: MultiProgress,
    bar: ProgressBar,
}

impl TerminalReporter {
    pub fn new(verbose: bool) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let bar = multi.add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} | {msg}",
            )
            .expect("valid template"),
        );
        Self {
            verbose,
            multi,
            bar,
        }
    }

    fn line(&self, text: &str) {
        let _ = self.multi.println(text);
    }
}

impl Reporter for TerminalReporter {
    fn path(&self, event: PathEvent<'_>) {
        if let Some(line) = event_line(&event, self.verbose) {
            self.line(&line);
        }
    }

    fn retrying(&self, endpoint: &str, error: &str, delay: Duration) {
        self.line(&retry_line(endpoint, error, delay));
    }

    fn warn(&self, message: &str) {
        self.line(&format!("warning: {message}"));
    }

    fn status(&self, s: &Snapshot) {
        // NAR bytes read track uploads closely: the pipeline between them holds only a few
        // MiB per job, so this is the best early measure of the work left.
        self.bar.set_length(s.to_upload_nar_bytes);
        self.bar.set_position(s.nar_bytes_read);
        self.bar.set_message(format!(
            "paths {}/{} ({} present, {} failed)",
            s.done_paths(),
            s.closure_paths,
            s.present,
            s.failed
        ));
    }

    fn finish(&self, snapshot: &Snapshot) {
        self.status(snapshot);
        self.bar.finish_and_clear();
        self.line(&summary_lines(snapshot));
    }
}

/// Reports nothing.
pub struct SilentReporter;

impl Reporter for SilentReporter {
    fn path(&self, _event: PathEvent<'_>) {}
    fn retrying(&self, _endpoint: &str, _error: &str, _delay: Duration) {}
    fn warn(&self, _message: &str) {}
    fn status(&self, _snapshot: &Snapshot) {}
    fn finish(&self, _snapshot: &Snapshot) {}
}
