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

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::metrics::stage;
use super::progress::Progress;
use super::{CompressedPiece, CompressedStream, PublishEvent};
use crate::api::{CreateUpload, NarUploadParams};
use crate::client::{OpenedUpload, PushClient};
use crate::nix::Sha256Hash;

/// Compression label of everything this client uploads.
const COMPRESSION: &str = "xz";

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
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.jobs.max(1)));
    let mut running = JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => permit.expect("semaphore never closed"),
            () = cancel.cancelled() => break,
        };
        let stream = tokio::select! {
            stream = input.recv() => stream,
            () = cancel.cancelled() => break,
        };
        let Some(stream) = stream else { break };
        progress.queue_depth(stage::UPLOAD, input.len());
        let (client, progress, to_publish) = (
            Arc::clone(&client),
            Arc::clone(&progress),
            to_publish.clone(),
        );
        running.spawn(async move {
            let info = Arc::clone(&stream.info);
            let started = Instant::now();
            let event = match upload_one(&client, config, stream, &progress).await {
                Ok(()) => PublishEvent::Stored {
                    info,
                    uploaded: true,
                },
                Err(reason) => PublishEvent::Failed { info, reason },
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

/// Receives the next piece; `Ok(None)` at a successful end of stream.
async fn next_piece(pieces: &mut mpsc::Receiver<CompressedPiece>) -> Result<Option<Bytes>, String> {
    match pieces.recv().await {
        Some(CompressedPiece::Data(data)) => Ok(Some(data)),
        Some(CompressedPiece::End(Ok(()))) => Ok(None),
        Some(CompressedPiece::End(Err(reason))) => Err(reason),
        None => Err("compression stopped unexpectedly".to_owned()),
    }
}

/// Fills `buffer` up to `chunk_size`; returns whether the stream ended.
async fn fill(
    buffer: &mut BytesMut,
    chunk_size: usize,
    pieces: &mut mpsc::Receiver<CompressedPiece>,
) -> Result<bool, String> {
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
    config: UploadConfig,
    stream: CompressedStream,
    progress: &Progress,
) -> Result<(), String> {
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
            compression: COMPRESSION.to_owned(),
            file_hash: Sha256Hash(Sha256::digest(&body).into()).to_typed_nix32(),
            file_size: body.len() as u64,
        };
        let (_, retries) = client
            .upload_nar(&params, body)
            .await
            .map_err(|err| format!("upload failed: {err}"))?;
        progress.uploaded(&info, params.file_size, started.elapsed(), retries);
        return Ok(());
    }

    let request = CreateUpload {
        nar_hash,
        nar_size: info.nar_size,
        compression: COMPRESSION.to_owned(),
        encoder: plan.descriptor(),
    };
    let mut session = match client
        .open_upload(&request)
        .await
        .map_err(|err| format!("cannot start the upload: {err}"))?
    {
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
                if let Err(err) = session.send_chunk(position, &chunk).await {
                    if upload_vanished(&err) {
                        return stored_by_someone_else(client, &request, &err).await;
                    }
                    return Err(format!("upload failed at byte {position}: {err}"));
                }
            }
            position += chunk.len() as u64;
        }
        if ended {
            break;
        }
        ended = match fill(&mut buffer, chunk_size, &mut pieces).await {
            Ok(ended) => ended,
            Err(reason) => {
                // Never complete an upload of a NAR that failed verification or compression.
                session.abort().await;
                return Err(reason);
            }
        };
    }
    if session.offset() != position {
        return Err(format!(
            "the server holds {} bytes of a {position}-byte upload; the encoder output changed",
            session.offset()
        ));
    }
    let file_hash = Sha256Hash(hasher.finalize().into()).to_typed_nix32();
    let retries = match session.complete(file_hash, position).await {
        Ok((_, retries)) => retries,
        Err(err) if upload_vanished(&err) => {
            return stored_by_someone_else(client, &request, &err).await
        }
        Err(err) => return Err(format!("completing the upload failed: {err}")),
    };
    progress.uploaded(&info, position, started.elapsed(), retries);
    Ok(())
}

/// The server resumes one upload per NAR and encoder for every client that asks, so concurrent
/// pushes of overlapping closures share it; whoever completes it first ends it, and the others
/// then get 404 for the upload.
fn upload_vanished(err: &crate::client::ClientError) -> bool {
    matches!(
        err,
        crate::client::ClientError::Api { status, .. } if *status == reqwest::StatusCode::NOT_FOUND
    )
}

/// After the shared upload vanished: the NAR is stored if another client completed it. If it
/// is not (the other client's upload failed verification and was discarded), this stream is
/// already consumed, so the path fails and a re-run uploads it.
async fn stored_by_someone_else(
    client: &PushClient,
    request: &CreateUpload,
    vanished: &crate::client::ClientError,
) -> Result<(), String> {
    match client.open_upload(request).await {
        Ok(OpenedUpload::AlreadyStored) => Ok(()),
        Ok(OpenedUpload::Session(session)) => {
            session.abort().await;
            Err(format!(
                "the upload was ended by another client without storing the NAR ({vanished}); run the push again"
            ))
        }
        Err(err) => Err(format!(
            "the upload vanished ({vanished}) and re-checking failed: {err}"
        )),
    }
}
