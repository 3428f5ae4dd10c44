//! Stage 5: uploads, `jobs` at a time on tokio.
//!
//! ```text
//!   CompressedStream ──► fill one chunk ──┬─ stream ended, fits ──► POST nars (one request)
//!                                         └─ more ──► open session (maybe resumed at offset O)
//!        for each chunk [start, end): hash it; skip if end ≤ O; else send_chunk ──► PATCH …
//!        stream End(Ok) ──► complete(file_hash, file_size) ──► publish
//!        stream End(Err) ──► abort the session ──► publish learns the path failed
//! ```
//! Memory: one chunk per job (the chunk is kept until the server acknowledged all of it, so
//! any suffix can be resent after a broken connection).
//!
//! Small NARs (a whole file of at most [`BatchLimits::file_bytes`]) skip their own request:
//! their job hands them to the batcher and ends, and the batcher sends them
//! [`BatchLimits::nars`] (or [`BatchLimits::bytes`]) at a time in one `POST nar-batch`,
//! [`BATCH_REQUESTS`] batches in flight:
//!
//! ```text
//!   job ──► small whole file ──► batch queue (bounded: a slow server backs up the jobs)
//!       ──► batcher: full, or nothing more within BATCH_LINGER ──► POST nar-batch
//!       ──► per entry: stored ──► publish; refused ──► sent again alone (POST nars)
//! ```
//! An entry the server refused is sent again on its own, under the failure policy like any
//! single upload: a transient refusal is retried there, and a bad NAR fails alone with the
//! server's own answer. A batch the server cannot take at all (an older server, a changed
//! limit) is sent as single uploads the same way.
//!
//! Every request runs under the failure policy ([`super::failure`]): it waits while the server
//! is silent, is tried again once the server answers after an outage (the session resumes from
//! the server's offset), and a fatal answer ends the run without reporting the path.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::failure::{Failed, Health, PathFailure, Stop};
use super::metrics::stage;
use super::progress::Progress;
use super::{CompressedStream, PathRef, Piece, PublishEvent};
use crate::api::{CreateUpload, NarUploadParams, PresenceQuery, PresenceRequest};
use crate::client::{ClientError, OpenedUpload, PushClient};
use crate::nix::Sha256Hash;

#[derive(Clone, Copy, Debug)]
pub struct UploadConfig {
    pub jobs: usize,
    /// Bytes per PATCH, and the largest NAR sent in one request.
    pub chunk_size: u64,
    /// Where small NARs are sent together; `None` sends every NAR on its own.
    pub batch: Option<BatchLimits>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most NARs in one batch request.
    pub nars: usize,
    /// Most bytes of files in one batch request.
    pub bytes: u64,
    /// Largest compressed file that goes into a batch.
    pub file_bytes: u64,
}

impl BatchLimits {
    /// What a push uses against a server that takes up to `max_nars` and `max_bytes` per
    /// batch; `None` when it takes no batches.
    pub fn for_server(max_nars: usize, max_bytes: u64) -> Option<Self> {
        // A batch of one is a single upload with extra framing.
        if max_nars < 2 || max_bytes == 0 {
            return None;
        }
        let bytes = max_bytes.min(BATCH_BYTES);
        Some(BatchLimits {
            nars: max_nars.min(BATCH_NARS),
            bytes,
            // A file of a quarter batch still shares its request with others.
            file_bytes: (bytes / 4).min(BATCH_FILE_BYTES),
        })
    }
}

/// Batch sizes a push asks for at most. 512 NARs of ~1 KiB is a request of well under a MiB:
/// enough to amortise the request and the server's transaction and flush over hundreds of
/// paths, small enough that two batches in flight keep both ends busy.
const BATCH_NARS: usize = 512;
const BATCH_BYTES: u64 = 4 << 20;
/// Past this a NAR's own transfer dwarfs the cost of its request: it goes alone.
const BATCH_FILE_BYTES: u64 = 256 << 10;
/// How long the batcher waits for more NARs before it sends a batch that is not full: long
/// enough to gather what the compressors produce in a burst, short enough to be invisible
/// next to a request.
const BATCH_LINGER: std::time::Duration = std::time::Duration::from_millis(20);
/// Batch requests in flight at once: one being answered while the next is sent.
pub const BATCH_REQUESTS: usize = 2;

pub async fn run(
    client: Arc<PushClient>,
    config: UploadConfig,
    mut input: mpsc::Receiver<CompressedStream>,
    to_publish: mpsc::Sender<PublishEvent>,
    progress: Arc<Progress>,
    health: Arc<Health>,
) {
    let cancel = health.stop_token().clone();
    let slots = Arc::new(Semaphore::new(config.jobs.max(1)));
    let mut running = JoinSet::new();
    let (batch_tx, batcher) = match config.batch {
        Some(limits) => {
            let (tx, rx) = mpsc::channel(limits.nars.saturating_mul(2));
            let batcher = tokio::spawn(run_batches(
                Batcher {
                    client: Arc::clone(&client),
                    health: Arc::clone(&health),
                    progress: Arc::clone(&progress),
                    to_publish: to_publish.clone(),
                    limits,
                },
                rx,
            ));
            (Some(tx), Some(batcher))
        }
        None => (None, None),
    };
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => permit.expect("semaphore never closed"),
            () = cancel.cancelled() => break,
        };
        // Taking no new stream while the server is silent keeps compression blocked on the
        // full channel: the pause reaches back through the pipeline.
        if health.online().await.is_err() {
            break;
        }
        let stream = tokio::select! {
            stream = input.recv() => stream,
            () = cancel.cancelled() => break,
        };
        let Some(stream) = stream else { break };
        progress.queue_depth(stage::UPLOAD, input.len());
        let (client, progress, to_publish, health, batch_tx) = (
            Arc::clone(&client),
            Arc::clone(&progress),
            to_publish.clone(),
            Arc::clone(&health),
            batch_tx.clone(),
        );
        running.spawn(async move {
            let info = Arc::clone(&stream.info);
            let started = Instant::now();
            let job = Job {
                client: &client,
                health: &health,
                progress: &progress,
                config,
                batch: batch_tx.as_ref(),
            };
            let event = match upload_one(job, stream).await {
                Ok(Uploaded::Stored) => PublishEvent::Stored {
                    info,
                    uploaded: true,
                },
                // The batcher reports it.
                Ok(Uploaded::Batched) => {
                    progress.busy(stage::UPLOAD, started.elapsed());
                    return;
                }
                Err(Outcome::Failed(failure)) => PublishEvent::Failed { info, failure },
                // The run is over: the path is neither done nor failed.
                Err(Outcome::Abandoned) => return,
            };
            progress.busy(stage::UPLOAD, started.elapsed());
            let _ = to_publish.send(event).await;
            drop(permit);
        });
        // Reap finished tasks so the set does not grow with the closure.
        while running.try_join_next().is_some() {}
    }
    if cancel.is_cancelled() {
        // Dropping the tasks leaves their uploads unfinished on the server: resumable.
        running.abort_all();
    }
    while running.join_next().await.is_some() {}
    // Every job has handed over its NAR: the batcher sends what is left, then ends.
    drop(batch_tx);
    if let Some(batcher) = batcher {
        let _ = batcher.await;
    }
}

/// How an upload ended when it did not store the NAR.
enum Outcome {
    Failed(PathFailure),
    /// The run stopped (fatal failure elsewhere, or Ctrl-C).
    Abandoned,
}

impl From<PathFailure> for Outcome {
    fn from(failure: PathFailure) -> Self {
        Self::Failed(failure)
    }
}

/// Runs one request under the failure policy: waits while the server is silent, tries again
/// when it is back, and ends the run on a fatal answer. `$call` is evaluated per attempt.
macro_rules! request {
    ($health:expr, $step:expr, $call:expr) => {{
        let mut rounds = 0;
        loop {
            match $health.guarded($call).await {
                Ok(Ok(value)) => break Ok(value),
                Ok(Err(error)) => match $health.after_failure(error, &mut rounds).await {
                    Ok(()) => continue,
                    Err(Stop::Run) => break Err(Outcome::Abandoned),
                    Err(Stop::Path(error)) => {
                        break Err(Outcome::Failed(PathFailure::from_client($step, error)))
                    }
                },
                Err(_) => break Err(Outcome::Abandoned),
            }
        }
    }};
}

/// Receives the next piece; `Ok(None)` at a successful end of stream.
async fn next_piece(pieces: &mut mpsc::Receiver<Piece>) -> Result<Option<Bytes>, Outcome> {
    match pieces.recv().await {
        Some(Piece::Data(data)) => Ok(Some(data)),
        Some(Piece::End(Ok(()))) => Ok(None),
        Some(Piece::End(Err(failure))) => Err(Outcome::Failed(failure)),
        // Compression dropped the stream without a verdict: only when the run stops.
        None => Err(Outcome::Abandoned),
    }
}

/// Fills `buffer` up to `chunk_size`; returns whether the stream ended.
async fn fill(
    buffer: &mut BytesMut,
    chunk_size: usize,
    pieces: &mut mpsc::Receiver<Piece>,
) -> Result<bool, Outcome> {
    while buffer.len() < chunk_size {
        match next_piece(pieces).await? {
            Some(data) => buffer.extend_from_slice(&data),
            None => return Ok(true),
        }
    }
    Ok(false)
}

async fn upload_one(job: Job<'_>, stream: CompressedStream) -> Result<Uploaded, Outcome> {
    let Job {
        client,
        health,
        progress,
        config,
        batch,
    } = job;
    let CompressedStream {
        info,
        plan,
        mut pieces,
    } = stream;
    let started = Instant::now();
    let chunk_size = config.chunk_size as usize;
    let nar_hash = info.nar_hash.to_typed_nix32();
    let mut buffer = BytesMut::with_capacity(chunk_size.min(info.nar_size as usize + 4096));
    let mut ended = fill(&mut buffer, chunk_size, &mut pieces).await?;

    if ended && buffer.len() <= chunk_size {
        let body = buffer.freeze();
        let params = NarUploadParams {
            nar_hash,
            nar_size: info.nar_size,
            compression: plan.compression().name().to_owned(),
            file_hash: Sha256Hash(Sha256::digest(&body).into()).to_typed_nix32(),
            file_size: body.len() as u64,
        };
        if let Some(queue) = batch.filter(|_| {
            config
                .batch
                .is_some_and(|limits| params.file_size <= limits.file_bytes)
        }) {
            let item = BatchItem {
                info,
                params,
                file: body,
                started,
            };
            // Closed only when the run stops.
            return match queue.send(item).await {
                Ok(()) => Ok(Uploaded::Batched),
                Err(_) => Err(Outcome::Abandoned),
            };
        }
        let (_, retries) = request!(health, "upload", client.upload_nar(&params, body.clone()))?;
        progress.uploaded(&info, params.file_size, started.elapsed(), retries);
        return Ok(Uploaded::Stored);
    }

    let request = CreateUpload {
        nar_hash,
        nar_size: info.nar_size,
        compression: plan.compression().name().to_owned(),
        encoder: plan.descriptor(),
    };
    let mut session = match request!(health, "upload", client.open_upload(&request))? {
        OpenedUpload::Session(session) => session,
        // Stored meanwhile (another client, or an earlier run that completed it).
        OpenedUpload::AlreadyStored => return Ok(Uploaded::Stored),
    };
    let mut hasher = Sha256::new();
    let mut position = 0u64;
    loop {
        while buffer.len() >= chunk_size || (ended && !buffer.is_empty()) {
            let take = buffer.len().min(chunk_size);
            let chunk = buffer.split_to(take).freeze();
            hasher.update(&chunk);
            // Bytes a previous run already delivered are regenerated only for the hash.
            if position + chunk.len() as u64 > session.offset() {
                // The session resynchronises with the server's offset on every attempt, so a
                // chunk interrupted by an outage resumes where it stopped.
                match request!(health, "upload", session.send_chunk(position, &chunk)) {
                    Ok(()) => {}
                    Err(Outcome::Failed(PathFailure::Refused {
                        status: Some(404), ..
                    })) => {
                        return stored_by_someone_else(client, health, &request)
                            .await
                            .map(|()| Uploaded::Stored);
                    }
                    // The server holds less than it acknowledged: while another client
                    // completes the shared upload, its state reads as empty for a moment.
                    Err(Outcome::Failed(failure @ PathFailure::Transfer { .. }))
                        if matches!(
                            &failure,
                            PathFailure::Transfer { error, .. }
                                if matches!(error.as_ref(), ClientError::Protocol(_))
                        ) =>
                    {
                        return stored_meanwhile(client, health, &info, failure)
                            .await
                            .map(|()| Uploaded::Stored);
                    }
                    Err(outcome) => return Err(outcome),
                }
            }
            position += chunk.len() as u64;
        }
        if ended {
            break;
        }
        ended = match fill(&mut buffer, chunk_size, &mut pieces).await {
            Ok(ended) => ended,
            Err(Outcome::Abandoned) => return Err(Outcome::Abandoned),
            Err(failure) => {
                // Never complete an upload of a NAR that failed verification or compression.
                session.abort().await;
                return Err(failure);
            }
        };
    }
    if session.offset() != position {
        return Err(PathFailure::EncoderChanged {
            held: session.offset(),
            produced: position,
        }
        .into());
    }
    let file_hash = Sha256Hash(hasher.finalize().into()).to_typed_nix32();
    let retries = match health
        .guarded(session.complete(file_hash.clone(), position))
        .await
    {
        Ok(Ok((_, retries))) => retries,
        Ok(Err(failed)) => {
            complete_again(client, health, &request, failed, file_hash, position).await?
        }
        Err(_) => return Err(Outcome::Abandoned),
    };
    progress.uploaded(&info, position, started.elapsed(), retries);
    Ok(Uploaded::Stored)
}

/// A completion that failed: the server may have stored the NAR before the answer was lost,
/// another client may have completed the shared upload (404 for the upload), or the server is
/// gone for now. Reopening the upload (once the server answers) tells which: already stored,
/// or the same unfinished upload, which is completed again.
async fn complete_again(
    client: &PushClient,
    health: &Health,
    request: &CreateUpload,
    mut failed: Failed,
    file_hash: String,
    size: u64,
) -> Result<u32, Outcome> {
    let mut rounds = 0;
    let mut vanished = false;
    loop {
        if upload_vanished(&failed.error) {
            if vanished {
                return Err(PathFailure::UploadVanished.into());
            }
            vanished = true;
        } else {
            match health.after_failure(failed, &mut rounds).await {
                Ok(()) => {}
                Err(Stop::Run) => return Err(Outcome::Abandoned),
                Err(Stop::Path(error)) => {
                    return Err(PathFailure::from_client("upload completion", error).into())
                }
            }
        }
        let session = match request!(health, "upload", client.open_upload(request))? {
            OpenedUpload::AlreadyStored => return Ok(0),
            OpenedUpload::Session(session) => session,
        };
        if session.offset() != size {
            // Not the upload this stream filled (another client's, started after ours ended
            // without storing the NAR): this stream is consumed, so a re-run uploads it.
            return Err(PathFailure::UploadVanished.into());
        }
        match health
            .guarded(session.complete(file_hash.clone(), size))
            .await
        {
            Ok(Ok((_, retries))) => return Ok(retries),
            Ok(Err(next)) => failed = next,
            Err(_) => return Err(Outcome::Abandoned),
        }
    }
}

/// The server resumes one upload per NAR and encoder for every client that asks, so concurrent
/// pushes of overlapping closures share it; whoever completes it first ends it, and the others
/// then get 404 for the upload.
fn upload_vanished(err: &ClientError) -> bool {
    matches!(
        err,
        ClientError::Api { status, api, .. }
            if *status == reqwest::StatusCode::NOT_FOUND
                && api.code != crate::api::codes::NO_SUCH_REPOSITORY
    )
}

/// After the shared upload vanished: the NAR is stored if another client completed it. If it
/// is not (the other client's upload failed verification and was discarded), this stream is
/// already consumed, so the path fails and a re-run uploads it.
async fn stored_by_someone_else(
    client: &PushClient,
    health: &Health,
    request: &CreateUpload,
) -> Result<(), Outcome> {
    match request!(health, "upload", client.open_upload(request))? {
        OpenedUpload::AlreadyStored => Ok(()),
        OpenedUpload::Session(session) => {
            session.abort().await;
            Err(PathFailure::UploadVanished.into())
        }
    }
}

/// Presence checks after the server reported fewer bytes than it had acknowledged: another
/// client completing the shared upload makes it read as empty until the NAR is stored, which
/// takes one verification (well under a second for NARs of a few MiB).
const STORED_RECHECKS: u32 = 10;
const STORED_RECHECK_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

/// Asks (read-only: no upload is created or aborted) whether the NAR of `info` got stored
/// meanwhile; the path fails with `failure` if it does not within the rechecks.
async fn stored_meanwhile(
    client: &PushClient,
    health: &Health,
    info: &PathRef,
    failure: PathFailure,
) -> Result<(), Outcome> {
    let query = PresenceRequest {
        paths: vec![PresenceQuery {
            hash: info.path.hash_part().to_owned(),
            nar_hash: info.nar_hash.to_typed_nix32(),
        }],
    };
    for _ in 0..STORED_RECHECKS {
        let answer = request!(health, "presence query", client.presence(&query))?;
        if !answer.missing.iter().any(|h| h == info.path.hash_part()) {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(STORED_RECHECK_DELAY) => {}
            () = health.stop_token().cancelled() => return Err(Outcome::Abandoned),
        }
    }
    Err(failure.into())
}

/// What one upload job works with.
#[derive(Clone, Copy)]
struct Job<'a> {
    client: &'a PushClient,
    health: &'a Health,
    progress: &'a Progress,
    config: UploadConfig,
    batch: Option<&'a mpsc::Sender<BatchItem>>,
}

/// How an upload job ended when it did not fail.
enum Uploaded {
    Stored,
    /// Handed to the batcher, which reports it.
    Batched,
}

/// A small NAR waiting for its batch.
struct BatchItem {
    info: PathRef,
    params: NarUploadParams,
    file: Bytes,
    started: Instant,
}

struct Batcher {
    client: Arc<PushClient>,
    health: Arc<Health>,
    progress: Arc<Progress>,
    to_publish: mpsc::Sender<PublishEvent>,
    limits: BatchLimits,
}

/// Gathers small NARs into batches and sends them, [`BATCH_REQUESTS`] at a time, until the
/// queue closes (every job done) or the run stops.
async fn run_batches(batcher: Batcher, mut queue: mpsc::Receiver<BatchItem>) {
    let batcher = Arc::new(batcher);
    let cancel = batcher.health.stop_token().clone();
    let in_flight = Arc::new(Semaphore::new(BATCH_REQUESTS));
    let mut running = JoinSet::new();
    let mut carried: Option<BatchItem> = None;
    loop {
        let first = match carried.take() {
            Some(item) => item,
            None => tokio::select! {
                item = queue.recv() => match item {
                    Some(item) => item,
                    None => break,
                },
                () = cancel.cancelled() => break,
            },
        };
        let mut bytes = first.file.len() as u64;
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_LINGER;
        while batch.len() < batcher.limits.nars {
            let item = match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(item)) => item,
                Ok(None) | Err(_) => break,
            };
            if bytes + item.file.len() as u64 > batcher.limits.bytes {
                carried = Some(item);
                break;
            }
            bytes += item.file.len() as u64;
            batch.push(item);
        }
        let permit = tokio::select! {
            permit = Arc::clone(&in_flight).acquire_owned() => permit.expect("semaphore never closed"),
            () = cancel.cancelled() => break,
        };
        let batcher = Arc::clone(&batcher);
        running.spawn(async move {
            send_batch(&batcher, batch).await;
            drop(permit);
        });
        while running.try_join_next().is_some() {}
    }
    if cancel.is_cancelled() {
        running.abort_all();
    }
    while running.join_next().await.is_some() {}
}

/// Sends one batch and reports each of its paths; what the server refused goes again alone.
async fn send_batch(batcher: &Batcher, batch: Vec<BatchItem>) {
    let Batcher {
        client,
        health,
        progress,
        to_publish,
        ..
    } = batcher;
    let started = Instant::now();
    let nars: Vec<_> = batch
        .iter()
        .map(|item| (item.params.clone(), item.file.clone()))
        .collect();
    let answer = request!(health, "upload", client.upload_batch(&nars));
    progress.busy(stage::UPLOAD, started.elapsed());
    let (results, retries) = match answer {
        Ok((answer, retries)) => (Some(answer.results), retries),
        Err(Outcome::Abandoned) => return,
        // The batch as a whole was refused: every NAR goes on its own.
        Err(Outcome::Failed(_)) => (None, 0),
    };
    let mut results = results.map(Vec::into_iter);
    for item in batch {
        let stored = results
            .as_mut()
            .and_then(Iterator::next)
            .is_some_and(|result| result.stored.is_some());
        let sent = if stored {
            Ok(retries)
        } else {
            request!(
                health,
                "upload",
                client.upload_nar(&item.params, item.file.clone())
            )
            .map(|(_, retries)| retries)
        };
        let event = match sent {
            Ok(retries) => {
                progress.uploaded(
                    &item.info,
                    item.params.file_size,
                    item.started.elapsed(),
                    retries,
                );
                PublishEvent::Stored {
                    info: item.info,
                    uploaded: true,
                }
            }
            Err(Outcome::Failed(failure)) => PublishEvent::Failed {
                info: item.info,
                failure,
            },
            Err(Outcome::Abandoned) => return,
        };
        if to_publish.send(event).await.is_err() {
            return;
        }
    }
}
