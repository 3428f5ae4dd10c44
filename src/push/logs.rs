//! `--logs`: the build logs of the derivations whose outputs this run published, read from the
//! local Nix store and stored in the repository, so `nix log --store URL PATH` shows them on a
//! machine that never ran the build.
//!
//! ```text
//!   publish stage ── deriver of each newly published path ─[LOG_QUEUE]─► logs (task)
//!       ──► nix-store --read-log DRV (≤ MAX_LOG_BYTES) ──► PUT <repo>/log/<drv> (LOG_JOBS at once)
//! ```
//! Logs are a convenience next to the closure: a derivation without a local log is skipped,
//! and a log that cannot be stored is reported and counted, but neither fails the push.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::progress::Progress;
use crate::client::PushClient;
use crate::nix::StorePath;

/// Derivations waiting for their log: store paths only.
pub const LOG_QUEUE: usize = 1024;
/// Logs read and uploaded at once: each holds its log in memory.
const LOG_JOBS: usize = 4;
/// The server's default `max_log_bytes`: a longer log would be refused.
pub const MAX_LOG_BYTES: u64 = 64 << 20;

/// What happened to one derivation's log.
enum Outcome {
    Stored,
    NoLocalLog,
    Failed(String),
}

pub async fn run(
    client: Arc<PushClient>,
    input: mpsc::Receiver<StorePath>,
    progress: Arc<Progress>,
) {
    let mut seen = HashSet::new();
    let derivations = futures_util::stream::unfold(input, |mut input| async move {
        let drv = input.recv().await?;
        Some((drv, input))
    })
    // Several outputs of one derivation share its log.
    .filter(move |drv| std::future::ready(seen.insert(drv.clone())));
    derivations
        .map(|drv| {
            let client = Arc::clone(&client);
            async move {
                let outcome = match read_log(&drv).await {
                    Ok(None) => Outcome::NoLocalLog,
                    Ok(Some(log)) => match client.put_log(&drv, log.into()).await {
                        Ok(()) => Outcome::Stored,
                        Err(err) => Outcome::Failed(err.to_string()),
                    },
                    Err(err) => Outcome::Failed(err),
                };
                (drv, outcome)
            }
        })
        .buffer_unordered(LOG_JOBS)
        .for_each(|(drv, outcome)| {
            match outcome {
                Outcome::Stored => progress.log_stored(&drv),
                Outcome::NoLocalLog => progress.log_missing(&drv),
                Outcome::Failed(reason) => progress.log_failed(&drv, &reason),
            }
            std::future::ready(())
        })
        .await;
}

/// The log Nix kept for `drv`, or `None` when it has none (substituted, or built with
/// `keep-build-log = false`).
async fn read_log(drv: &StorePath) -> Result<Option<Vec<u8>>, String> {
    let mut child = tokio::process::Command::new("nix-store")
        .arg("--read-log")
        .arg(drv.to_absolute())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot run nix-store --read-log: {err}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut log = Vec::new();
    stdout
        .take(MAX_LOG_BYTES + 1)
        .read_to_end(&mut log)
        .await
        .map_err(|err| format!("reading the log of {drv}: {err}"))?;
    if log.len() as u64 > MAX_LOG_BYTES {
        let _ = child.kill().await;
        return Err(format!(
            "its log is larger than the server's default limit of {MAX_LOG_BYTES} bytes: not uploaded"
        ));
    }
    let status = child
        .wait()
        .await
        .map_err(|err| format!("nix-store --read-log: {err}"))?;
    Ok(status.success().then_some(log))
}
