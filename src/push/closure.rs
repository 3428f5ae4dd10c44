//! Stage 1: closure resolution.
//!
//! ```text
//!   args / stdin lines ──► resolve_root (symlinks, paths below a root) ──► batches
//!        ──► nix path-info --recursive --json ──► dedupe ──► sort largest NAR first ──► presence
//! ```
//! With `--stdin`, lines are batched into one `nix path-info` call per batch or per
//! [`STDIN_LINGER`] of quiet, so a path is in the pipeline moments after it is printed. Batches
//! start at [`STDIN_FIRST_BATCH`] lines (the first uploads start early) and double up to
//! [`STDIN_MAX_BATCH`], because each call costs a Nix start-up (~25 ms): 10 000 piped paths
//! take 6 calls, not 40.
//!
//! A `--stdin` line that is not a store path, or whose `nix path-info` fails, fails alone: it is
//! reported (exit 4 at the end) and the other lines are pushed. A failing batch is split in
//! halves until the failing lines are isolated, so k bad lines among n cost O(k log n) calls.
//! Command-line arguments are checked before anything is sent and fail the run (exit 2 or 5).

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::failure::PathFailure;
use super::progress::Progress;
use super::PathRef;
use crate::nix::path_info::{parse_path_info_json, PathInfo};
use crate::nix::store_path::STORE_DIR;
use crate::nix::StorePath;

/// Paths in the first `nix path-info` call in `--stdin` mode: small, so uploads start early.
const STDIN_FIRST_BATCH: usize = 256;
/// Largest batch: the JSON of 8192 paths is a few MiB, and the call still returns in well under
/// a second.
const STDIN_MAX_BATCH: usize = 8192;
/// How long to wait for more stdin lines before resolving what has arrived.
const STDIN_LINGER: Duration = Duration::from_millis(100);
/// Lines read ahead of path resolution, enough to fill the largest batch while the previous
/// call runs: paths are short, so this is about 1 MiB at most.
const STDIN_LINES: usize = STDIN_MAX_BATCH;
/// Symlinks followed when resolving one argument before giving up (a loop).
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    #[error("{arg:?} is not in the Nix store{resolved}\nhint: pass a store path such as /nix/store/…-name, or a symlink to one such as ./result")]
    NotAStorePath { arg: String, resolved: String },
    #[error("cannot read {arg:?}: {source}")]
    Unreadable { arg: String, source: std::io::Error },
    #[error(
        "`nix` was not found on PATH\nhint: install Nix, or run stowix where `nix` is available"
    )]
    NixMissing,
    #[error("cannot run `nix`: {0}")]
    NixSpawn(std::io::Error),
    #[error("{path} is not valid in the local Nix store (not built or garbage-collected)\nhint: build it first, e.g. `nix-store --realise {path}`")]
    NotInStore { path: String },
    #[error("`nix path-info` failed ({status}): {stderr}")]
    NixFailed { status: String, stderr: String },
    #[error("{0}")]
    Parse(String),
    #[error("cannot read paths from standard input: {0}")]
    Stdin(std::io::Error),
}

impl ClosureError {
    /// Usage errors (the argument itself is wrong) versus Nix errors.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::NotAStorePath { .. } | Self::Unreadable { .. })
    }
}

pub struct Roots {
    /// Resolved (see [`resolve_root`]) before any request was made.
    pub paths: Vec<StorePath>,
    /// Then the lines of standard input, resolved as they arrive.
    pub stdin: bool,
    /// `paths` come from a watcher, not the user: one that is no longer valid (collected
    /// since it was seen) is reported and skipped, like a bad `--stdin` line, instead of
    /// failing the run.
    pub tolerant: bool,
}

/// The store path an argument stands for: a store path, a path below one (resolved to its
/// root), or a symlink chain (like `./result`) leading to either. A store path's root may itself
/// be a symlink, so symlinks are followed only until the path enters the store.
pub fn resolve_root(arg: &str) -> Result<StorePath, ClosureError> {
    let not_in_store = |resolved: &Path| ClosureError::NotAStorePath {
        arg: arg.to_owned(),
        resolved: if resolved == Path::new(arg) {
            String::new()
        } else {
            format!(" (it resolves to {})", resolved.display())
        },
    };
    let mut path = absolute(Path::new(arg));
    for _ in 0..MAX_SYMLINKS {
        if let Some(text) = path.to_str() {
            if text.starts_with(STORE_DIR) {
                if let Ok(store_path) = StorePath::from_path_below(text) {
                    return Ok(store_path);
                }
            }
        }
        // Find the first component that is a symlink and substitute its target.
        let mut prefix = PathBuf::new();
        let mut replaced = None;
        let components: Vec<Component<'_>> = path.components().collect();
        for (index, component) in components.iter().enumerate() {
            prefix.push(component);
            let metadata = match std::fs::symlink_metadata(&prefix) {
                Ok(metadata) => metadata,
                Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
                    return Err(not_in_store(&path))
                }
                Err(source) => {
                    return Err(ClosureError::Unreadable {
                        arg: arg.to_owned(),
                        source,
                    })
                }
            };
            if metadata.file_type().is_symlink() {
                let target =
                    std::fs::read_link(&prefix).map_err(|source| ClosureError::Unreadable {
                        arg: arg.to_owned(),
                        source,
                    })?;
                let mut next = prefix.parent().map(Path::to_path_buf).unwrap_or_default();
                next.push(target);
                for rest in &components[index + 1..] {
                    next.push(rest);
                }
                replaced = Some(normalise(&next));
                break;
            }
        }
        match replaced {
            Some(next) => path = next,
            None => return Err(not_in_store(&path)),
        }
    }
    Err(not_in_store(&path))
}

/// Standard input, line by line, read on its own thread (reads block, and tokio's stdin is the
/// same thing behind a feature this crate does not enable). The channel closes at end of input.
/// The one thread that can outlive `push::run`: a blocked read of standard input cannot be
/// interrupted. It holds nothing but the pipe, ends at its next line (the send fails), and dies
/// with the process, which exits right after the run.
fn stdin_lines() -> mpsc::Receiver<std::io::Result<String>> {
    let (tx, rx) = mpsc::channel(STDIN_LINES);
    std::thread::Builder::new()
        .name("stowix-stdin".into())
        .spawn(move || {
            use std::io::BufRead;
            for line in std::io::stdin().lock().lines() {
                let failed = line.is_err();
                if tx.blocking_send(line).is_err() || failed {
                    return;
                }
            }
        })
        .expect("spawning the stdin reader");
    rx
}

fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    normalise(&joined)
}

/// Removes `.` and resolves `..` lexically (only ever applied after symlinks are substituted
/// up to that point, so `..` means the parent of a real directory).
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

pub async fn run(
    roots: Roots,
    output: mpsc::Sender<Vec<PathRef>>,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<(), ClosureError> {
    let mut seen = HashSet::new();
    if roots.tolerant {
        for chunk in roots.paths.chunks(STDIN_MAX_BATCH) {
            let lines: Vec<(String, StorePath)> = chunk
                .iter()
                .map(|path| (path.to_absolute(), path.clone()))
                .collect();
            let valid = tokio::select! {
                valid = resolve_lines(&lines, &progress) => valid?,
                () = cancel.cancelled() => return Ok(()),
            };
            let batch = fresh(valid, &mut seen);
            if !send(batch, &output, &progress, &cancel).await {
                return Ok(());
            }
        }
    } else if !roots.paths.is_empty() {
        let resolved = tokio::select! {
            resolved = path_info(&roots.paths) => resolved?,
            () = cancel.cancelled() => return Ok(()),
        };
        if let Some(path) = resolved.invalid.into_iter().next() {
            return Err(ClosureError::NotInStore { path });
        }
        let batch = fresh(resolved.valid, &mut seen);
        if !send(batch, &output, &progress, &cancel).await {
            return Ok(());
        }
    }
    if roots.stdin {
        {
            let mut lines = stdin_lines();
            let mut pending = Vec::new();
            let mut batch_size = STDIN_FIRST_BATCH;
            loop {
                let next = if pending.is_empty() {
                    tokio::select! {
                        line = lines.recv() => Some(line.transpose()),
                        () = cancel.cancelled() => return Ok(()),
                    }
                } else {
                    tokio::time::timeout(STDIN_LINGER, lines.recv())
                        .await
                        .ok()
                        .map(Option::transpose)
                };
                let (eof, quiet) = match next {
                    Some(Ok(Some(line))) => {
                        let line = line.trim();
                        if !line.is_empty() {
                            match resolve_root(line) {
                                Ok(path) => pending.push((line.to_owned(), path)),
                                Err(err) => progress.rejected_line(&PathFailure::BadLine {
                                    line: line.to_owned(),
                                    detail: err.to_string(),
                                }),
                            }
                        }
                        (false, false)
                    }
                    Some(Ok(None)) => (true, false),
                    Some(Err(err)) => return Err(ClosureError::Stdin(err)),
                    // No line for STDIN_LINGER: resolve what has arrived.
                    None => (false, true),
                };
                if !pending.is_empty() && (eof || quiet || pending.len() >= batch_size) {
                    let valid = tokio::select! {
                        valid = resolve_lines(&pending, &progress) => valid?,
                        () = cancel.cancelled() => return Ok(()),
                    };
                    let batch = fresh(valid, &mut seen);
                    pending.clear();
                    batch_size = (batch_size * 2).min(STDIN_MAX_BATCH);
                    if !send(batch, &output, &progress, &cancel).await {
                        return Ok(());
                    }
                }
                if eof {
                    break;
                }
            }
        }
    }
    Ok(())
}

async fn send(
    batch: Vec<PathRef>,
    output: &mpsc::Sender<Vec<PathRef>>,
    progress: &Progress,
    cancel: &CancellationToken,
) -> bool {
    if batch.is_empty() {
        return true;
    }
    progress.closure_paths(&batch);
    tokio::select! {
        sent = output.send(batch) => sent.is_ok(),
        () = cancel.cancelled() => false,
    }
}

/// What one `nix path-info --recursive` call found.
struct Resolved {
    valid: Vec<PathInfo>,
    /// Roots Nix reported as not valid (not built, or garbage-collected).
    invalid: Vec<String>,
}

/// One `nix path-info --recursive` over `roots`.
async fn path_info(roots: &[StorePath]) -> Result<Resolved, ClosureError> {
    let mut command = tokio::process::Command::new("nix");
    command
        .args(["path-info", "--recursive", "--json"])
        .args(["--extra-experimental-features", "nix-command"])
        // Only the local store counts: never try to substitute a missing path from elsewhere.
        .args(["--option", "substituters", ""])
        .args(roots.iter().map(StorePath::to_absolute))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = command.output().await.map_err(|err| {
        if err.kind() == std::io::ErrorKind::NotFound {
            ClosureError::NixMissing
        } else {
            ClosureError::NixSpawn(err)
        }
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if let Some(path) = invalid_path_in(&stderr) {
            return Err(ClosureError::NotInStore { path });
        }
        let stderr = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        return Err(ClosureError::NixFailed {
            status: output.status.to_string(),
            stderr,
        });
    }
    let parsed =
        parse_path_info_json(&output.stdout).map_err(|err| ClosureError::Parse(err.to_string()))?;
    Ok(Resolved {
        valid: parsed.valid,
        invalid: parsed.invalid,
    })
}

/// The closures of `lines` (stdin lines and their store paths). A line whose `nix path-info`
/// fails is reported and left out; halves are retried so one bad line cannot sink a batch.
/// Errors that no line causes (Nix missing, unparsable output) end the run.
fn resolve_lines<'a>(
    lines: &'a [(String, StorePath)],
    progress: &'a Progress,
) -> futures_util::future::BoxFuture<'a, Result<Vec<PathInfo>, ClosureError>> {
    Box::pin(async move {
        let roots: Vec<StorePath> = lines.iter().map(|(_, path)| path.clone()).collect();
        match path_info(&roots).await {
            Ok(resolved) => {
                for (line, path) in lines {
                    if resolved.invalid.contains(&path.to_absolute()) {
                        progress.rejected_line(&PathFailure::PathInfo {
                            line: line.clone(),
                            detail: ClosureError::NotInStore {
                                path: path.to_absolute(),
                            }
                            .to_string(),
                        });
                    }
                }
                Ok(resolved.valid)
            }
            Err(err @ (ClosureError::NotInStore { .. } | ClosureError::NixFailed { .. })) => {
                if let [(line, _)] = lines {
                    progress.rejected_line(&PathFailure::PathInfo {
                        line: line.clone(),
                        detail: err.to_string(),
                    });
                    return Ok(Vec::new());
                }
                let (left, right) = lines.split_at(lines.len() / 2);
                let mut valid = resolve_lines(left, progress).await?;
                valid.extend(resolve_lines(right, progress).await?);
                Ok(valid)
            }
            Err(err) => Err(err),
        }
    })
}

/// The paths not seen before, largest NAR first so the longest uploads start first and the
/// run does not end on one big NAR.
fn fresh(valid: Vec<PathInfo>, seen: &mut HashSet<StorePath>) -> Vec<PathRef> {
    let mut fresh: Vec<PathInfo> = valid
        .into_iter()
        .filter(|info| seen.insert(info.path.clone()))
        .collect();
    fresh.sort_by(|a, b| {
        b.nar_size
            .cmp(&a.nar_size)
            .then_with(|| a.path.cmp(&b.path))
    });
    fresh.into_iter().map(Arc::new).collect()
}

/// Nix 2.x: `error: path '/nix/store/…' is not valid`.
fn invalid_path_in(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|line| {
        let rest = line.split("path '").nth(1)?;
        let (path, tail) = rest.split_once('\'')?;
        tail.contains("is not valid").then(|| path.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_invalid_path_errors_are_recognised() {
        let stderr = "don't know how to build these paths:\n  /nix/store/x-foo\nerror: path '/nix/store/00000000000000000000000000000000-foo' is not valid\n";
        assert_eq!(
            invalid_path_in(stderr).as_deref(),
            Some("/nix/store/00000000000000000000000000000000-foo")
        );
        assert_eq!(invalid_path_in("error: something else"), None);
    }

    #[test]
    fn paths_outside_the_store_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_root(dir.path().to_str().unwrap()).unwrap_err();
        assert!(err.is_usage(), "{err}");
        let missing = dir.path().join("missing");
        assert!(resolve_root(missing.to_str().unwrap())
            .unwrap_err()
            .is_usage());
    }

    #[test]
    fn normalise_is_lexical() {
        assert_eq!(normalise(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    }
}
