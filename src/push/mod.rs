//! The push pipeline: six stages, each a module with one `run`, joined by bounded channels so
//! memory stays flat whatever the closure size.
//!
//! ```text
//!  closure (task) ─[CLOSURE_BATCHES]─► presence (task) ─[DUMP_QUEUE]─► dump (threads)
//!                                         │                              │ NarStream ─[NAR_STREAMS]─┐
//!                                         │ present / nar_stored         │   └ pieces ─[NAR_PIECES_PER_PATH]
//!                                         ▼                              ▼                          │
//!                                    publish (task) ◄─[PUBLISH_EVENTS]─ upload (tasks, --jobs) ◄─[COMPRESSED_STREAMS]─ compress (threads)
//!                                                                                        └ pieces ─[COMPRESSED_PIECES_PER_PATH]
//! ```
//!
//! Memory bound, independent of closure size: the closure metadata, plus per dump worker
//! `NAR_PIECES_PER_PATH × PIECE_SIZE` (1 MiB), per compression worker
//! `COMPRESSED_PIECES_PER_PATH × PIECE_SIZE` (1 MiB) and one encoder, plus one chunk per upload
//! job (`--jobs × chunk size`).
//!
//! Failures: each path's failure is a typed [`PathFailure`] from dump to publication; one
//! policy ([`failure::judge`]) decides whether a failed request fails its path, pauses the
//! pipeline while the server is silent, or ends the run ([`RunFailure`]).
//!
//! Cancellation: the stop token (a fatal failure or Ctrl-C) stops the async stages at once;
//! each dropped receiver makes the upstream thread's next send fail, so the threads stop too.
//! Unfinished uploads stay on the server and the next run resumes them.

pub mod closure;
pub mod compress;
pub mod dump;
pub mod failure;
pub mod logs;
pub mod metrics;
pub mod presence;
pub mod progress;
pub mod publish;
pub mod report;
pub mod upload;
pub mod watch;

use std::io::Write;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::RepoInfo;
use crate::client::PushClient;
use crate::nix::path_info::PathInfo;
pub use closure::{ClosureError, Roots};
pub use compress::CompressConfig;
pub use failure::{Health, PathFailure, RunFailure};
pub use progress::{Progress, Snapshot};

pub type PathRef = Arc<PathInfo>;

/// Size of the pieces NAR and compressed bytes travel in: large enough that channel overhead
/// is noise, small enough that 4 per NAR in flight is 1 MiB.
pub const PIECE_SIZE: usize = 256 * 1024;
/// Closure batches (one per `nix path-info` call) waiting for presence: metadata only.
const CLOSURE_BATCHES: usize = 4;
/// Missing paths waiting for a dump worker: `Arc`s, so a deep queue costs nothing, and it lets
/// presence answers run ahead of the dumps.
const DUMP_QUEUE: usize = 1024;
/// NAR pieces buffered per path between dump and compression (1 MiB): the dump reads ahead of
/// the encoder by this much, no more.
pub const NAR_PIECES_PER_PATH: usize = 4;
/// NARs a dump worker has opened that no compressor has taken yet: keeps the next NAR ready
/// when a compressor frees up, each holding at most `NAR_PIECES_PER_PATH` pieces.
const NAR_STREAMS: usize = 2;
/// Compressed pieces buffered per path between compression and upload (1 MiB).
pub const COMPRESSED_PIECES_PER_PATH: usize = 4;
/// Compressed NARs waiting for an upload slot, each holding at most
/// `COMPRESSED_PIECES_PER_PATH` pieces.
const COMPRESSED_STREAMS: usize = 2;
/// Outcomes waiting for the publish stage: small structs; deep enough that uploads do not stall
/// while a narinfo batch is in flight.
const PUBLISH_EVENTS: usize = 4096;

/// Default bytes per PATCH (and largest single-request upload): few requests per large NAR,
/// and 8 MiB per job of memory. Capped by the server's limits.
pub const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;
/// Hidden override of the chunk size in bytes (tests use it to keep "larger than a chunk" small).
pub const CHUNK_SIZE_ENV: &str = "STOWIX_CHUNK_SIZE";

/// Everything the pipeline needs besides the client; see `cli::push` for the defaults.
#[derive(Clone, Debug)]
pub struct PushConfig {
    pub jobs: usize,
    pub compression: CompressConfig,
    pub chunk_size: u64,
    /// How long the server may answer nothing before the run fails (`--retry-timeout`).
    pub retry_timeout: std::time::Duration,
    /// Paths signed by one of these keys are not pushed (an upstream cache serves them); their
    /// signatures prove them to the server when a pushed path refers to them. Empty: push all.
    pub upstream_keys: Vec<crate::nix::signing::PublicKey>,
    /// Also store the build logs of the derivations of newly published paths (`--logs`).
    pub logs: bool,
    /// Send small NARs in batches where the server takes them (not `--no-batch`).
    pub batch_small_nars: bool,
}

/// A NAR being dumped, handed to compression.
pub struct NarStream {
    pub info: PathRef,
    pub pieces: crossbeam_channel::Receiver<Piece>,
}

/// What travels per path from dump to compression and from compression to upload.
pub enum Piece {
    Data(Bytes),
    /// `Ok` only after the NAR matched path-info's narHash and narSize (and, after
    /// compression, was fully compressed).
    End(Result<(), PathFailure>),
}

/// A NAR being compressed, handed to upload.
pub struct CompressedStream {
    pub info: PathRef,
    pub plan: compress::EncoderPlan,
    pub pieces: mpsc::Receiver<Piece>,
}

pub enum PublishEvent {
    /// Already published before this run.
    Present(PathRef),
    /// Not pushed: a trusted upstream cache signed it. References to it carry the proof.
    Upstream(PathRef),
    /// The server holds the NAR.
    Stored {
        info: PathRef,
        uploaded: bool,
    },
    Failed {
        info: PathRef,
        failure: PathFailure,
    },
}

/// Why a path's stream ended early in dump or compression.
pub enum Halt {
    /// Downstream gave up on the path (the run stopped): nothing to report.
    Gone,
    Failed(PathFailure),
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Closure(#[from] ClosureError),
    /// Nothing more could succeed; see [`failure::judge`].
    #[error(transparent)]
    Fatal(#[from] RunFailure),
    #[error("interrupted")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
}

/// An `io::Write` that cuts what it receives into [`PIECE_SIZE`] pieces for `send`.
pub struct PieceWriter<F: FnMut(Bytes) -> std::io::Result<()>> {
    buffer: BytesMut,
    send: F,
}

impl<F: FnMut(Bytes) -> std::io::Result<()>> PieceWriter<F> {
    pub fn new(send: F) -> Self {
        Self {
            buffer: BytesMut::new(),
            send,
        }
    }

    /// Sends what is buffered (call at the end of a stream).
    pub fn flush_piece(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let piece = self.buffer.split().freeze();
        (self.send)(piece)
    }
}

impl<F: FnMut(Bytes) -> std::io::Result<()>> Write for PieceWriter<F> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buffer.capacity() == 0 {
            self.buffer.reserve(PIECE_SIZE);
        }
        let take = data.len().min(PIECE_SIZE - self.buffer.len());
        self.buffer.extend_from_slice(&data[..take]);
        if self.buffer.len() >= PIECE_SIZE {
            let piece = self.buffer.split().freeze();
            (self.send)(piece)?;
        }
        Ok(take)
    }

    /// Deliberately does not send a partial piece: encoders flush often, and pieces should stay
    /// large. [`PieceWriter::flush_piece`] ends a stream.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Repair rounds after the first: enough for a collector that runs again while a repair round
/// pushes, few enough that a repository that keeps losing paths fails the push instead of
/// looping.
pub const REPAIR_ROUNDS: u32 = 2;

/// Runs the whole pipeline for `roots` against the repository described by `info`.
/// Per-path failures are counted in `progress`; only run-wide failures are errors. Every stage,
/// thread and helper task has ended when this returns, whatever the outcome.
///
/// A path the server refuses because it no longer holds a reference or NAR that presence
/// reported (garbage collection ran in between) is not a failure: a repair round pushes it
/// again, and its new presence answers name what must be uploaded again.
pub async fn run(
    client: Arc<PushClient>,
    info: &RepoInfo,
    roots: Roots,
    config: PushConfig,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<(), PushError> {
    let mut roots = roots;
    let mut round = 0;
    loop {
        let (result, deferred) = run_round(
            Arc::clone(&client),
            info,
            roots,
            config.clone(),
            Arc::clone(&progress),
            cancel.clone(),
        )
        .await;
        if result.is_err() || deferred.is_empty() || round == REPAIR_ROUNDS {
            // Out of rounds (or the run failed): what is still deferred fails with its refusal.
            for (info, failure) in deferred {
                progress.failed(&info.path, &failure);
            }
            progress.end_repair();
            return result;
        }
        round += 1;
        progress.warn(&format!(
            "{} {} could not be published because the repository collected paths they need \
             while this push ran: pushing them again (repair round {round} of {REPAIR_ROUNDS})",
            deferred.len(),
            if deferred.len() == 1 { "path" } else { "paths" },
        ));
        progress.start_repair(deferred.iter().map(|(info, _)| &info.path));
        roots = Roots {
            paths: deferred.iter().map(|(info, _)| info.path.clone()).collect(),
            stdin: false,
            tolerant: false,
        };
    }
}

/// One run of the pipeline; beside its outcome, the paths it deferred to a repair round.
async fn run_round(
    client: Arc<PushClient>,
    info: &RepoInfo,
    roots: Roots,
    config: PushConfig,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> (Result<(), PushError>, Vec<publish::Deferred>) {
    let limits = &info.limits;
    let chunk_size = config
        .chunk_size
        .min(limits.max_chunk_bytes)
        .min(limits.max_single_upload_bytes)
        .max(1);
    let presence_batch = presence::DEFAULT_BATCH.min(limits.max_presence_batch);
    let publish_batch = publish::DEFAULT_BATCH.min(limits.max_publish_batch);

    let (closure_tx, closure_rx) = mpsc::channel(CLOSURE_BATCHES);
    let (dump_tx, dump_rx) = mpsc::channel(DUMP_QUEUE);
    let (nar_tx, nar_rx) = crossbeam_channel::bounded(NAR_STREAMS);
    let (compressed_tx, compressed_rx) = mpsc::channel(COMPRESSED_STREAMS);
    let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_EVENTS);

    // A fatal failure in any stage stops the others through this child token; the caller's
    // token (Ctrl-C) cancels it too.
    let stop = cancel.child_token();
    let health = Arc::new(Health::new(stop.clone(), config.retry_timeout));
    progress.watch(Arc::clone(&health));

    let prober = {
        let progress = Arc::clone(&progress);
        tokio::spawn(
            Arc::clone(&health).run_prober(Arc::clone(&client), move |event| {
                progress.probe_event(event)
            }),
        )
    };
    let closure = tokio::spawn(closure::run(
        roots,
        closure_tx,
        Arc::clone(&progress),
        stop.clone(),
    ));
    let presence = tokio::spawn(presence::run(
        Arc::clone(&client),
        presence::PresenceConfig {
            batch_size: presence_batch,
            upstream_keys: config.upstream_keys.clone().into(),
        },
        closure_rx,
        dump_tx,
        publish_tx.clone(),
        Arc::clone(&progress),
        Arc::clone(&health),
    ));
    let workers = config.compression.threads as usize;
    let dump = {
        let (progress, health) = (Arc::clone(&progress), Arc::clone(&health));
        tokio::task::spawn_blocking(move || dump::run(workers, dump_rx, nar_tx, progress, health))
    };
    let compress = {
        let (progress, health) = (Arc::clone(&progress), Arc::clone(&health));
        let compression = config.compression;
        tokio::task::spawn_blocking(move || {
            compress::run(compression, nar_rx, compressed_tx, progress, health)
        })
    };
    let upload = tokio::spawn(upload::run(
        Arc::clone(&client),
        upload::UploadConfig {
            jobs: config.jobs,
            chunk_size,
            batch: upload::BatchLimits::for_server(limits.max_batch_nars, limits.max_batch_bytes)
                .filter(|_| config.batch_small_nars),
        },
        compressed_rx,
        publish_tx,
        Arc::clone(&progress),
        Arc::clone(&health),
    ));
    let (log_tx, logs) = if config.logs {
        let (tx, rx) = mpsc::channel(logs::LOG_QUEUE);
        let task = tokio::spawn(logs::run(Arc::clone(&client), rx, Arc::clone(&progress)));
        (Some(tx), Some(task))
    } else {
        (None, None)
    };
    let publish = tokio::spawn(publish::run(
        client,
        publish::PublishConfig {
            max_batch: publish_batch,
            logs: log_tx,
        },
        publish_rx,
        Arc::clone(&progress),
        Arc::clone(&health),
    ));
    let ticker = {
        let (progress, stop) = (Arc::clone(&progress), stop.clone());
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = interval.tick() => progress.tick(),
                    () = stop.cancelled() => return,
                }
            }
        })
    };

    // Every stage is joined, in pipeline order, whatever happens to the others: an error or
    // a panic stops the rest first, so no join waits on a stage that still has work.
    let mut first_error: Option<PushError> = None;
    let mut note = |result: Result<Result<(), PushError>, tokio::task::JoinError>| {
        let error = match result {
            Ok(Ok(())) => return,
            Ok(Err(err)) => err,
            Err(err) => PushError::Internal(format!("a pipeline stage failed: {err}")),
        };
        stop.cancel();
        first_error.get_or_insert(error);
    };
    note(closure.await.map(|r| r.map_err(PushError::from)));
    note(presence.await.map(Ok));
    note(dump.await.map(Ok));
    note(compress.await.map(Ok));
    note(upload.await.map(Ok));
    let deferred = match publish.await {
        Ok(deferred) => deferred,
        Err(err) => {
            note(Err(err));
            Vec::new()
        }
    };
    // The publish stage dropped its sender: the logs task ends once its queue is done (or at
    // once when the run stopped, as nothing waits for it then).
    if let Some(logs) = logs {
        if stop.is_cancelled() {
            logs.abort();
        }
        let _ = logs.await;
    }
    // The helpers end with the stop token; the caller's token is not touched.
    stop.cancel();
    note(ticker.await.map(Ok));
    note(prober.await.map(Ok));

    let result = if let Some(failure) = health.take_fatal() {
        Err(PushError::Fatal(failure))
    } else if let Some(err) = first_error {
        Err(err)
    } else if cancel.is_cancelled() {
        Err(PushError::Cancelled)
    } else {
        Ok(())
    };
    (result, deferred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_writer_cuts_fixed_pieces_and_flushes_the_rest() {
        let mut pieces = Vec::new();
        {
            let mut writer = PieceWriter::new(|piece: Bytes| {
                pieces.push(piece.len());
                Ok(())
            });
            writer.write_all(&vec![7u8; PIECE_SIZE * 2 + 10]).unwrap();
            writer.flush().unwrap();
            writer.flush_piece().unwrap();
        }
        assert_eq!(pieces, vec![PIECE_SIZE, PIECE_SIZE, 10]);
    }
}
