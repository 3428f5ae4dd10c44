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
}

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
        let (client, progress, to_publish, health) = (
            Arc::clone(&client),
            Arc::clone(&progress),
            to_publish.clone(),
            Arc::clone(&health),
        );
        running.spawn(async move {
            let info = Arc::clone(&stream.info);
            let started = Instant::now();
            let event = match upload_one(&client, &health, config, stream, &progress).await {
                Ok(()) => PublishEvent::Stored {
                    info,
                    uploaded: true,
                },
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

async fn upload_one(
    client: &PushClient,
    health: &Health,
    config: UploadConfig,
    stream: CompressedStream,
    progress: &Progress,
) -> Result<(), Outcome> {
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
        let (_, retries) = request!(health, "upload", client.upload_nar(&params, body.clone()))?;
        progress.uploaded(&info, params.file_size, started.elapsed(), retries);
        return Ok(());
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
        OpenedUpload::AlreadyStored => return Ok(()),
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
                        return stored_by_someone_else(client, health, &request).await;
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
                        return stored_meanwhile(client, health, &info, failure).await;
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
    Ok(())
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
