//! Receiving upload bodies onto local disk, and turning a verified staged file into a stored NAR.
//!
//! ```text
//!   request body ──► receive_into (limit, idle timeout, received-bytes metric) ──► staged file
//!   staged file ──► verify::verify_file (spawn_blocking) ──► Storage::put_file ──► nars row
//! ```
//! Chunked uploads append to `<data dir>/uploads/<id>.part`; their offset is the file's length,
//! so it survives a server restart with no other bookkeeping. Single-request uploads go to a
//! temporary file that is deleted when dropped, so an abandoned request leaves nothing behind.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::StatusCode;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::error::{ServerError, ServerResult};
use super::metadata::{now_unix, NarRecord};
use super::metrics;
use super::verify::{self, Verified};
use super::AppState;
use crate::api::{codes, NarUploadParams};
use crate::nix::Sha256Hash;

/// Why a body stopped before its end.
#[derive(Debug)]
pub enum ReceiveError {
    TooLarge {
        limit: u64,
    },
    Idle,
    /// The body arrived slower than the minimum rate, on average, after the grace period.
    TooSlow {
        min_rate: u64,
    },
    /// The client went away or sent a broken body.
    Client(String),
    Io(std::io::Error),
}

impl From<ReceiveError> for ServerError {
    fn from(err: ReceiveError) -> Self {
        match err {
            ReceiveError::TooLarge { limit } => ServerError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::PAYLOAD_TOO_LARGE,
                format!("the body is larger than this server's limit of {limit} bytes"),
            ),
            ReceiveError::Idle => ServerError::new(
                StatusCode::REQUEST_TIMEOUT,
                codes::BAD_REQUEST,
                "the body stalled; the bytes received so far are kept",
            ),
            ReceiveError::TooSlow { min_rate } => ServerError::new(
                StatusCode::REQUEST_TIMEOUT,
                codes::BAD_REQUEST,
                format!(
                    "the body arrived slower than this server's minimum of {min_rate} bytes/s; \
                     the bytes received so far are kept"
                ),
            ),
            ReceiveError::Client(detail) => ServerError::bad_request(
                codes::BAD_REQUEST,
                format!("the request body broke off: {detail}"),
            ),
            ReceiveError::Io(err) => ServerError::from(err),
        }
    }
}

/// How long a request body may take: no gap longer than `idle`, and once `grace` has passed,
/// an average of at least `min_rate` bytes per second. The rate rule is what stops a trickle
/// (one byte just inside every idle timeout) from holding an upload slot or a buffer for hours;
/// the grace period lets a connection start up (TCP slow start, a proxy) before it counts.
#[derive(Clone, Copy, Debug)]
pub struct BodyPace {
    pub idle: Duration,
    pub min_rate: u64,
    pub grace: Duration,
}

impl BodyPace {
    pub fn new(config: &super::config::ServerConfig) -> Self {
        BodyPace {
            idle: Duration::from_secs(config.upload_idle_timeout_secs),
            min_rate: config.min_body_bytes_per_sec,
            grace: Duration::from_secs(config.body_rate_grace_secs),
        }
    }

    /// When the body must have delivered more than `received` bytes to stay at the rate.
    fn deadline(&self, started: Instant, received: u64) -> Option<Instant> {
        if self.min_rate == 0 {
            return None;
        }
        let earned = Duration::from_secs_f64(received as f64 / self.min_rate as f64);
        started.checked_add(self.grace.saturating_add(earned))
    }

    /// Waits for the next piece of `stream`, within the idle timeout and the rate deadline.
    async fn next<S: futures_util::Stream + Unpin>(
        &self,
        stream: &mut S,
        started: Instant,
        received: u64,
    ) -> Result<Option<S::Item>, ReceiveError> {
        let now = Instant::now();
        let (wait, slow) = match self.deadline(started, received) {
            Some(deadline) if deadline.saturating_duration_since(now) < self.idle => {
                (deadline.saturating_duration_since(now), true)
            }
            _ => (self.idle, false),
        };
        match tokio::time::timeout(wait, stream.next()).await {
            Ok(next) => Ok(next),
            Err(_) if slow => {
                ::metrics::counter!(metrics::SLOW_BODIES_TOTAL).increment(1);
                Err(ReceiveError::TooSlow {
                    min_rate: self.min_rate,
                })
            }
            Err(_) => Err(ReceiveError::Idle),
        }
    }
}

/// A body whose declared length is over `limit` is refused before any of it is read.
fn declared_too_large(body: &Body, limit: u64) -> bool {
    hyper::body::Body::size_hint(body).lower() > limit
}

/// Appends the body to `file`, at most `limit` bytes, and returns how many were written. Bytes
/// written before an error stay written (and flushed): a resumable upload keeps them.
pub async fn receive_into(
    body: Body,
    file: &mut tokio::fs::File,
    limit: u64,
    pace: BodyPace,
) -> Result<u64, ReceiveError> {
    let outcome = receive_with(body, limit, pace, Sink::File(file)).await;
    file.flush().await.map_err(ReceiveError::Io)?;
    outcome
}

/// Collects the whole body (at most `limit` bytes) in memory, as the pieces it arrived in: an
/// S3 part must be complete before it is sent, and a body that breaks off is dropped whole.
pub async fn receive_to_memory(
    body: Body,
    limit: u64,
    pace: BodyPace,
) -> Result<(Vec<bytes::Bytes>, u64), ReceiveError> {
    let mut pieces = Vec::new();
    let received = receive_with(body, limit, pace, Sink::Memory(&mut pieces)).await?;
    Ok((pieces, received))
}

/// Where [`receive_with`] puts the body's pieces.
enum Sink<'a> {
    File(&'a mut tokio::fs::File),
    Memory(&'a mut Vec<bytes::Bytes>),
}

impl Sink<'_> {
    async fn put(&mut self, bytes: bytes::Bytes) -> Result<(), ReceiveError> {
        match self {
            Sink::File(file) => file.write_all(&bytes).await.map_err(ReceiveError::Io),
            Sink::Memory(pieces) => {
                pieces.push(bytes);
                Ok(())
            }
        }
    }
}

/// Hands each piece of the body to `sink`, at most `limit` bytes in all, at `pace`.
async fn receive_with(
    body: Body,
    limit: u64,
    pace: BodyPace,
    mut sink: Sink<'_>,
) -> Result<u64, ReceiveError> {
    if declared_too_large(&body, limit) {
        return Err(ReceiveError::TooLarge { limit });
    }
    let mut stream = body.into_data_stream();
    let started = Instant::now();
    let mut written = 0u64;
    loop {
        let next = match pace.next(&mut stream, started, written).await? {
            None => return Ok(written),
            Some(Err(err)) => return Err(ReceiveError::Client(err.to_string())),
            Some(Ok(bytes)) => bytes,
        };
        metrics::record_received(next.len() as u64);
        if written.saturating_add(next.len() as u64) > limit {
            return Err(ReceiveError::TooLarge { limit });
        }
        let len = next.len() as u64;
        sink.put(next).await?;
        written += len;
    }
}

/// Reads a small body (JSON, a narinfo) into memory, at most `limit` bytes, at the same pace as
/// uploads, so a client that stops or trickles cannot hold a connection and its buffer.
pub async fn read_small_body(
    body: Body,
    limit: usize,
    pace: BodyPace,
) -> ServerResult<bytes::Bytes> {
    if declared_too_large(&body, limit as u64) {
        return Err(ReceiveError::TooLarge {
            limit: limit as u64,
        }
        .into());
    }
    let mut stream = body.into_data_stream();
    let started = Instant::now();
    let mut collected = bytes::BytesMut::new();
    loop {
        match pace
            .next(&mut stream, started, collected.len() as u64)
            .await?
        {
            None => return Ok(collected.freeze()),
            Some(Err(err)) => return Err(ReceiveError::Client(err.to_string()).into()),
            Some(Ok(piece)) => {
                if collected.len() + piece.len() > limit {
                    return Err(ReceiveError::TooLarge {
                        limit: limit as u64,
                    }
                    .into());
                }
                collected.extend_from_slice(&piece);
            }
        }
    }
}

/// The expectations a staged file is checked against; `None` fields are not checked.
#[derive(Default)]
pub struct Expected {
    pub file_hash: Option<Sha256Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Option<Sha256Hash>,
    pub nar_size: Option<u64>,
}

/// Who an upload is for: the repository, and the token whose share of the slots it takes.
#[derive(Clone, Copy)]
pub struct Uploader<'a> {
    pub repo: &'a str,
    pub token_id: Option<&'a str>,
}

/// Single-request uploads: receives `body` (at most `limit` bytes; more answers `too_large()`)
/// into a temporary file that is deleted whatever happens, then verifies and stores it.
pub async fn receive_verify_store(
    state: &AppState,
    uploader: Uploader<'_>,
    body: Body,
    limit: u64,
    compression: &str,
    expected: Expected,
    too_large: impl FnOnce() -> ServerError,
) -> ServerResult<(NarRecord, bool)> {
    let _slot = state.upload_slot(uploader.repo, uploader.token_id)?;
    let staged = tempfile::NamedTempFile::new_in(&state.tmp_dir)?;
    let mut file = tokio::fs::File::from_std(staged.reopen()?);
    match receive_into(body, &mut file, limit, BodyPace::new(&state.config)).await {
        Err(ReceiveError::TooLarge { .. }) => return Err(too_large()),
        other => other?,
    };
    drop(file);
    let (staged_file, staged_path) = staged.into_parts();
    drop(staged_file);
    let result = verify_and_store(state, uploader.repo, &staged_path, compression, expected).await;
    // On success the file was moved into storage and this finds nothing to delete.
    let _ = staged_path.close();
    result
}

/// Verifies the staged file, then stores it and records the NAR. On any mismatch nothing is
/// stored and the staged file is left for the caller to delete.
pub async fn verify_and_store(
    state: &AppState,
    repo: &str,
    staged: &Path,
    compression: &str,
    expected: Expected,
) -> ServerResult<(NarRecord, bool)> {
    let suffix = compression_suffix(compression)?;
    let path = staged.to_path_buf();
    let compression_owned = compression.to_string();
    let limit = output_limit(&state.config, expected.nar_size)?;
    let mut verified =
        tokio::task::spawn_blocking(move || verify::verify_file(&path, &compression_owned, limit))
            .await?
            .map_err(verification_failed)?;
    check_expectations(&verified, &expected)?;
    let record = nar_record(repo, compression, suffix, &verified);
    let key = record.object_key.clone();
    // Intent first: a crash between the write and the row leaves a key the janitor knows.
    let intent = key.clone();
    state
        .db(move |meta| meta.record_object_intent(&intent, now_unix()))
        .await?;
    // The listing first: once the NAR's row exists a narinfo may name it, and `<hash>.ls`
    // should answer from then on.
    if let Some(listing) = verified.listing.take() {
        let listing_key = listing_key(repo, &verified.nar.nar_hash);
        state
            .storage
            .put_bytes(&listing_key, bytes::Bytes::from(listing))
            .await?;
    }
    state.storage.put_file(&key, staged).await?;
    let newly = record_stored(state, repo, vec![record.clone()]).await?[0];
    Ok((record, newly))
}

/// The file suffix of a compression the repository accepts, or the refusal of any other.
pub(crate) fn compression_suffix(compression: &str) -> ServerResult<&'static str> {
    verify::compression_suffix(compression).ok_or_else(|| {
        ServerError::unprocessable(
            codes::UNSUPPORTED_COMPRESSION,
            crate::api::Compression::unsupported(compression),
        )
    })
}

/// A declared hash (`sha256:` in any encoding Nix accepts), or a 400 saying what is wrong.
pub(crate) fn parse_hash(text: &str) -> ServerResult<Sha256Hash> {
    Sha256Hash::parse(text)
        .map_err(|err| ServerError::bad_request(codes::BAD_REQUEST, err.to_string()))
}

/// The row of a verified NAR: its URL (and key) named by the hash of its bytes.
fn nar_record(repo: &str, compression: &str, suffix: &str, verified: &Verified) -> NarRecord {
    let url = format!("nar/{}{suffix}", verified.file_hash.to_nix32());
    NarRecord {
        object_key: format!("{repo}/{url}"),
        url,
        compression: compression.to_string(),
        nar_hash: verified.nar.nar_hash.to_typed_nix32(),
        nar_size: verified.nar.nar_size,
        file_hash: verified.file_hash.to_typed_nix32(),
        file_size: verified.file_size,
    }
}

/// Records NARs whose objects (and intents) are written, in one transaction, then clears the
/// intents; for each, whether it is new.
async fn record_stored(
    state: &AppState,
    repo: &str,
    records: Vec<NarRecord>,
) -> ServerResult<Vec<bool>> {
    let repo_owned = repo.to_string();
    let to_insert = records.clone();
    let newly = state
        .db(move |meta| meta.insert_nars(&repo_owned, &to_insert))
        .await?;
    ::metrics::counter!(metrics::NARS_STORED_TOTAL)
        .increment(newly.iter().filter(|new| **new).count() as u64);
    for (record, _) in records.iter().zip(&newly).filter(|(_, new)| !**new) {
        // Stored meanwhile by another request; if its bytes live elsewhere (an assembled
        // chunked upload), the copy just written is nobody's.
        let (repo_owned, url) = (repo.to_string(), record.url.clone());
        let existing = state
            .db(move |meta| meta.nar_by_url(&repo_owned, &url))
            .await?;
        if existing.is_some_and(|nar| nar.object_key != record.object_key) {
            state.storage.delete(&record.object_key).await?;
        }
    }
    let keys: Vec<String> = records.into_iter().map(|r| r.object_key).collect();
    state
        .db(move |meta| meta.clear_object_intents(&keys))
        .await?;
    Ok(newly)
}

/// One NAR of a batch upload: what the client declared, and the file's bytes.
pub struct BatchEntry {
    pub params: NarUploadParams,
    pub file: bytes::Bytes,
}

/// Verifies every entry on its own and stores the ones that pass together: one transaction
/// for their intents, one batch write of their files (one filesystem flush on local disk),
/// one transaction for their rows. An entry that fails verification or whose write fails
/// gets its own error; a failure of the database fails the request.
pub async fn verify_and_store_batch(
    state: &AppState,
    repo: &str,
    entries: Vec<BatchEntry>,
) -> ServerResult<Vec<ServerResult<(NarRecord, bool)>>> {
    let config = state.config.clone();
    let repo_owned = repo.to_string();
    let checked = tokio::task::spawn_blocking(move || {
        entries
            .into_iter()
            .map(|entry| verify_entry(&config, &repo_owned, entry))
            .collect::<Vec<_>>()
    })
    .await?;
    // Each verified entry: its row and its listing's key, beside the objects to write (the
    // listing first, as in `verify_and_store`).
    let mut objects = Vec::new();
    let mut outcomes: Vec<ServerResult<(NarRecord, Option<String>)>> = checked
        .into_iter()
        .map(|outcome| {
            outcome.map(|entry| {
                let listing_key = entry.listing.map(|(key, bytes)| {
                    objects.push((key.clone(), bytes));
                    key
                });
                objects.push((entry.record.object_key.clone(), entry.file));
                (entry.record, listing_key)
            })
        })
        .collect();
    let intents: Vec<String> = outcomes
        .iter()
        .flatten()
        .map(|(record, _)| record.object_key.clone())
        .collect();
    if !intents.is_empty() {
        state
            .db(move |meta| meta.record_object_intents(&intents, now_unix()))
            .await?;
        let keys: Vec<String> = objects.iter().map(|(key, _)| key.clone()).collect();
        let written = state.storage.put_many(objects).await;
        let mut failed: std::collections::HashMap<String, std::io::Error> = keys
            .into_iter()
            .zip(written)
            .filter_map(|(key, result)| result.err().map(|err| (key, err)))
            .collect();
        // A NAR whose file or listing was not written fails; its intent stays, and the
        // janitor removes whatever part of it was written.
        for outcome in &mut outcomes {
            if let Ok((record, listing_key)) = outcome {
                let listing_failure = listing_key.as_ref().and_then(|key| failed.remove(key));
                if let Some(err) = failed.remove(&record.object_key).or(listing_failure) {
                    *outcome = Err(ServerError::from(err));
                }
            }
        }
    }
    let records: Vec<NarRecord> = outcomes.iter().flatten().map(|(r, _)| r.clone()).collect();
    let mut newly = if records.is_empty() {
        Vec::new()
    } else {
        record_stored(state, repo, records).await?
    }
    .into_iter();
    Ok(outcomes
        .into_iter()
        .map(|outcome| {
            outcome.map(|(record, _)| (record, newly.next().expect("one answer per stored NAR")))
        })
        .collect())
}

/// A batch entry that passed verification: its row, its listing (key and bytes), its file.
struct VerifiedEntry {
    record: NarRecord,
    listing: Option<(String, bytes::Bytes)>,
    file: bytes::Bytes,
}

/// Checks one batch entry's declarations and verifies its bytes (on a blocking thread).
fn verify_entry(
    config: &super::config::ServerConfig,
    repo: &str,
    entry: BatchEntry,
) -> ServerResult<VerifiedEntry> {
    let BatchEntry { params, file } = entry;
    let suffix = compression_suffix(&params.compression)?;
    let expected = Expected {
        file_hash: Some(parse_hash(&params.file_hash)?),
        file_size: Some(params.file_size),
        nar_hash: Some(parse_hash(&params.nar_hash)?),
        nar_size: Some(params.nar_size),
    };
    let limit = output_limit(config, expected.nar_size)?;
    let verified =
        verify::verify_bytes(&file, &params.compression, limit).map_err(verification_failed)?;
    check_expectations(&verified, &expected)?;
    let record = nar_record(repo, &params.compression, suffix, &verified);
    let listing = verified.listing.map(|listing| {
        (
            listing_key(repo, &verified.nar.nar_hash),
            bytes::Bytes::from(listing),
        )
    });
    Ok(VerifiedEntry {
        record,
        listing,
        file,
    })
}

/// The answer to a file that failed verification (its rejection is counted by reason).
pub fn verification_failed(err: verify::VerifyError) -> ServerError {
    let message = err.to_string();
    let (status, code, reason) = match err {
        // I/O says nothing about the upload's bytes: the shared mapping tells a full disk
        // (507) and a bucket that broke off the read-back (503) from the rest.
        verify::VerifyError::Io(io) => return ServerError::from(io),
        verify::VerifyError::UnsupportedCompression(_) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::UNSUPPORTED_COMPRESSION,
            "compression",
        ),
        verify::VerifyError::InvalidNar(_) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::INVALID_NAR,
            "invalid_nar",
        ),
        verify::VerifyError::Decompress { .. } | verify::VerifyError::TrailingData(_) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::INVALID_NAR,
            "bad_compression",
        ),
        verify::VerifyError::DecoderMemory { .. } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::DECOMPRESSION_LIMIT,
            "decoder_memory",
        ),
        verify::VerifyError::TooMuchOutput(limit) if limit.declared => (
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::NAR_SIZE_MISMATCH,
            "nar_size",
        ),
        verify::VerifyError::TooMuchOutput(_) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            "nar_too_large",
        ),
    };
    reject(reason);
    ServerError::new(status, code, message)
}

/// Where the server keeps the listing it wrote while verifying a NAR: by NarHash, since every
/// store path published with that NAR has that listing.
pub fn listing_key(repo: &str, nar_hash: &Sha256Hash) -> String {
    format!("{repo}/listing/{}.ls", nar_hash.to_nix32())
}

/// Where decompression stops: just past the declared NarSize, else at the server's cap.
pub(crate) fn output_limit(
    config: &super::config::ServerConfig,
    declared: Option<u64>,
) -> ServerResult<verify::OutputLimit> {
    match declared {
        Some(size) => {
            check_nar_size(config, size)?;
            Ok(verify::OutputLimit {
                bytes: size,
                declared: true,
            })
        }
        None => Ok(verify::OutputLimit {
            bytes: config.max_nar_bytes,
            declared: false,
        }),
    }
}

/// Refuses a declared NarSize over `max_nar_bytes` before any byte of the body is read.
pub fn check_nar_size(config: &super::config::ServerConfig, nar_size: u64) -> ServerResult<()> {
    if nar_size > config.max_nar_bytes {
        return Err(ServerError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!(
                "a NarSize of {nar_size} bytes is over this server's max_nar_bytes of {}",
                config.max_nar_bytes
            ),
        ));
    }
    Ok(())
}

fn reject(reason: &'static str) {
    ::metrics::counter!(metrics::UPLOADS_REJECTED_TOTAL, "reason" => reason).increment(1);
}

pub(crate) fn check_expectations(verified: &Verified, expected: &Expected) -> ServerResult<()> {
    let mismatch = |code: &str,
                    reason: &'static str,
                    what: &str,
                    declared: String,
                    actual: String| {
        reject(reason);
        Err(ServerError::unprocessable(
            code,
            format!("{what} mismatch: declared {declared}, but the uploaded data has {actual}; nothing was stored"),
        ))
    };
    if let Some(size) = expected.file_size {
        if size != verified.file_size {
            return mismatch(
                codes::FILE_SIZE_MISMATCH,
                "file_size",
                "FileSize",
                size.to_string(),
                verified.file_size.to_string(),
            );
        }
    }
    if let Some(hash) = expected.file_hash {
        if hash != verified.file_hash {
            return mismatch(
                codes::FILE_HASH_MISMATCH,
                "file_hash",
                "FileHash",
                hash.to_string(),
                verified.file_hash.to_string(),
            );
        }
    }
    if let Some(hash) = expected.nar_hash {
        if hash != verified.nar.nar_hash {
            return mismatch(
                codes::NAR_HASH_MISMATCH,
                "nar_hash",
                "NarHash",
                hash.to_string(),
                verified.nar.nar_hash.to_string(),
            );
        }
    }
    if let Some(size) = expected.nar_size {
        if size != verified.nar.nar_size {
            return mismatch(
                codes::NAR_SIZE_MISMATCH,
                "nar_size",
                "NarSize",
                size.to_string(),
                verified.nar.nar_size.to_string(),
            );
        }
    }
    Ok(())
}
