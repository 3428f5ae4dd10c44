//! Stage 2: presence. Asks the server which closure paths it lacks, in large batches with
//! several queries in flight, and routes every path as soon as its answer arrives.
//!
//! ```text
//!   closure batches ──► signed by an upstream key? ──► publish as upstream (never uploaded)
//!        └─ the rest ──► split into queries of ≤ batch_size ──► POST presence (≤ IN_FLIGHT at once)
//!      ├─ missing ──────► dump queue (upload, then publish)
//!      ├─ nar_stored ───► publish (the NAR is there, only the narinfo is missing)
//!      └─ neither ──────► publish as present (counts as published for its dependents)
//! ```
//! Answers are consumed in query order, so the largest-first order of the closure survives.
//! A query that fails under the failure policy fails the paths it asked about.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::failure::{Health, PathFailure, Stop};
use super::metrics::stage;
use super::progress::Progress;
use super::{PathRef, PublishEvent};
use crate::api::{PresenceQuery, PresenceRequest};
use crate::client::PushClient;
use crate::nix::signing::{signed_by, PublicKey};

/// Queries in flight: hides the round trip of one query behind the others without flooding
/// the server (each query is already up to thousands of paths).
const IN_FLIGHT: usize = 4;
/// Paths per query when the server allows more: big enough that a 100k-path closure is ~50
/// requests, small enough that the first answers arrive (and uploads start) quickly.
pub const DEFAULT_BATCH: usize = 2000;

/// What the stage asks and what it skips.
pub struct PresenceConfig {
    /// Paths per query.
    pub batch_size: usize,
    /// Paths signed by one of these are routed as upstream instead of queried.
    pub upstream_keys: Arc<[PublicKey]>,
}

pub async fn run(
    client: Arc<PushClient>,
    PresenceConfig {
        batch_size,
        upstream_keys,
    }: PresenceConfig,
    input: mpsc::Receiver<Vec<PathRef>>,
    to_dump: mpsc::Sender<PathRef>,
    to_publish: mpsc::Sender<PublishEvent>,
    progress: Arc<Progress>,
    health: Arc<Health>,
) {
    let cancel = health.stop_token().clone();
    let batch_size = batch_size.max(1);
    let closure_batches = futures_util::stream::unfold(input, |mut input| async move {
        let batch = input.recv().await?;
        Some((batch, input))
    });
    let upstream_publish = to_publish.clone();
    let upstream_progress = Arc::clone(&progress);
    // Checked before asking the server: an upstream path costs no query, however large.
    let closure_batches = closure_batches.then(move |batch| {
        let (keys, to_publish, progress) = (
            Arc::clone(&upstream_keys),
            upstream_publish.clone(),
            Arc::clone(&upstream_progress),
        );
        async move {
            if keys.is_empty() {
                return batch;
            }
            let mut rest = Vec::with_capacity(batch.len());
            for info in batch {
                match signed_by(&keys, &info.fingerprint(), &info.signatures) {
                    Some(key) => {
                        progress.upstream(&info, key.name());
                        // A stopped publish stage ends the run; the cancel check below sees it.
                        let _ = to_publish.send(PublishEvent::Upstream(info)).await;
                    }
                    None => rest.push(info),
                }
            }
            rest
        }
    });
    let queries = closure_batches
        // What this process published earlier (a watcher's memory) is routed as present
        // without asking the server again.
        .filter_map(|batch| {
            let (known, unknown): (Vec<PathRef>, Vec<PathRef>) = batch
                .into_iter()
                .partition(|info| progress.known_published(&info.path));
            let to_publish = to_publish.clone();
            async move {
                for info in known {
                    if to_publish.send(PublishEvent::Present(info)).await.is_err() {
                        return None;
                    }
                }
                Some(unknown)
            }
        })
        .flat_map(|batch| {
            let chunks: Vec<Vec<PathRef>> =
                batch.chunks(batch_size).map(<[PathRef]>::to_vec).collect();
            futures_util::stream::iter(chunks)
        })
        .map(|paths| {
            let (client, health) = (Arc::clone(&client), Arc::clone(&health));
            async move {
                let request = PresenceRequest {
                    paths: paths
                        .iter()
                        .map(|info| PresenceQuery {
                            hash: info.path.hash_part().to_owned(),
                            nar_hash: info.nar_hash.to_typed_nix32(),
                        })
                        .collect(),
                };
                let started = Instant::now();
                let mut rounds = 0;
                let answer = loop {
                    match health.guarded(client.presence(&request)).await {
                        Ok(Ok(answer)) => break Ok(answer),
                        Ok(Err(error)) => match health.after_failure(error, &mut rounds).await {
                            Ok(()) => continue,
                            Err(stop) => break Err(stop),
                        },
                        Err(stop) => break Err(stop),
                    }
                };
                (paths, answer, started.elapsed())
            }
        })
        .buffered(IN_FLIGHT);
    tokio::pin!(queries);
    loop {
        let next = tokio::select! {
            next = queries.next() => next,
            () = cancel.cancelled() => return,
        };
        let Some((paths, answer, elapsed)) = next else {
            return;
        };
        progress.busy(stage::PRESENCE, elapsed);
        let answer = match answer {
            Ok(answer) => answer,
            Err(Stop::Run) => return,
            Err(Stop::Path(error)) => {
                let failure = PathFailure::from_client("presence query", error);
                for info in paths {
                    let event = PublishEvent::Failed {
                        info,
                        failure: failure.clone(),
                    };
                    if to_publish.send(event).await.is_err() {
                        return;
                    }
                }
                continue;
            }
        };
        let missing: HashSet<&str> = answer.missing.iter().map(String::as_str).collect();
        let nar_stored: HashSet<&str> = answer.nar_stored.iter().map(String::as_str).collect();
        for info in paths {
            let hash = info.path.hash_part();
            let sent = if missing.contains(hash) {
                progress.needs_upload(&info);
                progress.queue_depth(stage::DUMP, to_dump.max_capacity() - to_dump.capacity());
                to_dump.send(info).await.is_ok()
            } else if nar_stored.contains(hash) {
                to_publish
                    .send(PublishEvent::Stored {
                        info,
                        uploaded: false,
                    })
                    .await
                    .is_ok()
            } else {
                to_publish.send(PublishEvent::Present(info)).await.is_ok()
            };
            if !sent {
                // Downstream stopped (cancelled or failed): nothing more to route.
                return;
            }
        }
    }
}
