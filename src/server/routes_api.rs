//! The Stowix push API (`<repo>/api/v1/...`): presence queries, single-request and resumable
//! chunked NAR uploads, and batched publication. `docs/protocol.md` documents each route.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;

use super::error::{ServerError, ServerResult};
use super::metadata::{now_unix, OpenedUpload, Presence, SessionCaps, UploadRecord};
use super::publish::{self, Candidate};
use super::upload::{self, Expected};
use super::{ApiReadAccess, Authorized, PushAccess, SharedState};
use crate::api::{
    codes, CompleteUpload, CreateUpload, NarBatchError, NarBatchManifest, NarBatchResponse,
    NarBatchResult, NarStored, NarUploadParams, PresenceRequest, PresenceResponse, PublishRequest,
    PublishResponse, RepoInfo, ServerLimits, UploadState, UPLOAD_OFFSET_HEADER,
};
use crate::nix::signing::SecretKey;
use crate::nix::store_path::is_valid_hash_part;
use crate::nix::{NarInfo, Sha256Hash, StorePath};

/// JSON bodies of the push API are parsed only after the credentials are checked, so an
/// unauthenticated client cannot make the server buffer or parse anything, and a malformed body
/// gets the same `{code, message}` answer as every other error.
async fn read_json<T: serde::de::DeserializeOwned + Send + 'static>(
    state: &SharedState,
    body: Body,
) -> ServerResult<T> {
    let bytes = upload::read_small_body(
        body,
        super::JSON_BODY_LIMIT,
        upload::BodyPace::new(&state.config),
    )
    .await?;
    let inline = bytes.len() <= JSON_INLINE_PARSE_BYTES;
    let parse = move || {
        serde_json::from_slice(&bytes).map_err(|err| {
            ServerError::bad_request(
                codes::BAD_REQUEST,
                format!("the JSON body is invalid: {err}"),
            )
        })
    };
    // Parsing tens of MB takes a good fraction of a second: off the async workers. A small body
    // parses faster than a hop to the blocking pool would take.
    if inline {
        parse()
    } else {
        tokio::task::spawn_blocking(parse).await?
    }
}

const JSON_INLINE_PARSE_BYTES: usize = 64 << 10;

/// Batches over the configured size are refused whole, so one request's work stays bounded.
fn check_batch(len: usize, limit: usize, what: &str) -> ServerResult<()> {
    if len > limit {
        return Err(ServerError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!("at most {limit} {what}"),
        ));
    }
    Ok(())
}

fn check_compression(compression: &str) -> ServerResult<()> {
    upload::compression_suffix(compression).map(drop)
}

pub async fn info(
    State(state): State<SharedState>,
    Authorized { repo, scope, .. }: ApiReadAccess,
) -> ServerResult<Json<RepoInfo>> {
    let key = SecretKey::parse(&repo.secret_key)
        .map_err(|err| ServerError::internal(format!("repository {} key: {err}", repo.name)))?;
    // A client probing during an outage resumes when this answers: only once the bucket (and
    // the database) answer again, or its retries would fail at once on the same outage.
    if let Some(reason) = super::unready(&state).await {
        return Err(ServerError::unavailable(format!(
            "this server's backends are not ready ({reason}); retry shortly"
        )));
    }
    let config = &state.config;
    Ok(Json(RepoInfo {
        repository: repo.name.clone(),
        public_key: key.public_key().to_text(),
        private: repo.private,
        token_scope: scope.map(|s| s.as_str().to_string()),
        limits: ServerLimits {
            max_chunk_bytes: config.max_chunk_bytes,
            max_single_upload_bytes: config.max_single_upload_bytes,
            max_presence_batch: config.max_presence_batch,
            max_publish_batch: config.max_publish_batch,
            max_batch_nars: config.max_batch_nars,
            max_batch_bytes: config.max_batch_bytes,
        },
        upstream_keys: repo.upstream_keys.clone(),
    }))
}

/// The largest body a presence query of `batch` entries can need: an entry is at most ~130
/// bytes (`{"hash":"<32>","nar_hash":"sha256:<64 hex>"},`); 160 leaves room for whitespace.
pub(crate) fn presence_body_limit(batch: usize) -> usize {
    4096 + batch.saturating_mul(160)
}

/// A presence query from a token holder (every `stowix nix push`) may be as large as the
/// batch limit; one without a token (anyone, on a public repository) is held to
/// `anonymous_presence_batch`, so anonymous clients cannot make the server buffer megabytes.
/// Nix substituters never ask presence; they read narinfos.
pub async fn presence(
    State(state): State<SharedState>,
    Authorized { repo, scope, .. }: ApiReadAccess,
    body: Body,
) -> ServerResult<Response> {
    let batch = match scope {
        Some(_) => state.config.max_presence_batch,
        None => state
            .config
            .anonymous_presence_batch
            .min(state.config.max_presence_batch),
    };
    let bytes = upload::read_small_body(
        body,
        presence_body_limit(batch),
        upload::BodyPace::new(&state.config),
    )
    .await?;
    let what = match scope {
        Some(_) => "paths per presence query",
        None => "paths per presence query without a token",
    };
    let name = repo.name.clone();
    let state = std::sync::Arc::clone(&state);
    // Parsing up to 20 000 entries, the lookups and the answer's serialisation are CPU and
    // database work: off the async workers, so they never delay other requests' I/O.
    let answer = tokio::task::spawn_blocking(move || -> ServerResult<Vec<u8>> {
        let request: PresenceRequest = serde_json::from_slice(&bytes).map_err(|err| {
            ServerError::bad_request(
                codes::BAD_REQUEST,
                format!("the JSON body is invalid: {err}"),
            )
        })?;
        drop(bytes);
        check_batch(request.paths.len(), batch, what)?;
        let mut queries = Vec::with_capacity(request.paths.len());
        for query in &request.paths {
            if !is_valid_hash_part(&query.hash) {
                return Err(ServerError::bad_request(
                    codes::INVALID_HASH_PART,
                    format!(
                        "{:?} is not a store path hash part",
                        query.hash.chars().take(80).collect::<String>()
                    ),
                ));
            }
            queries.push((
                query.hash.clone(),
                upload::parse_hash(&query.nar_hash)?.to_typed_nix32(),
            ));
        }
        let answers = state.meta.presence(&name, &queries)?;
        // A push told "present" relies on the path staying until it publishes: the use (and
        // the grace period until it is written) protects it.
        let published = queries
            .iter()
            .zip(&answers)
            .filter(|(_, answer)| **answer == Presence::Published)
            .map(|((hash, _), _)| hash.as_str());
        state
            .last_use
            .record_paths(&name, published, super::gc::now());
        let mut response = PresenceResponse::default();
        for (query, answer) in request.paths.into_iter().zip(answers) {
            match answer {
                Presence::Published => {}
                Presence::NarStored => response.nar_stored.push(query.hash),
                Presence::Missing => response.missing.push(query.hash),
            }
        }
        serde_json::to_vec(&response).map_err(|err| ServerError::internal(err.to_string()))
    })
    .await??;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        answer,
    )
        .into_response())
}

fn stored_answer(record: &super::metadata::NarRecord, newly_stored: bool) -> NarStored {
    NarStored {
        nar_hash: record.nar_hash.clone(),
        url: record.url.clone(),
        file_hash: record.file_hash.clone(),
        file_size: record.file_size,
        newly_stored,
    }
}

/// Small NARs in one request: the body is the whole compressed file.
pub async fn upload_whole(
    State(state): State<SharedState>,
    Authorized { repo, token_id, .. }: PushAccess,
    uri: Uri,
    body: Body,
) -> ServerResult<Response> {
    let Query(params) = Query::<NarUploadParams>::try_from_uri(&uri).map_err(|err| {
        ServerError::bad_request(
            codes::BAD_REQUEST,
            format!("the query must carry nar_hash, nar_size, compression, file_hash and file_size: {err}"),
        )
    })?;
    check_compression(&params.compression)?;
    upload::check_nar_size(&state.config, params.nar_size)?;
    let nar_hash = upload::parse_hash(&params.nar_hash)?;
    let file_hash = upload::parse_hash(&params.file_hash)?;
    if params.file_size > state.config.max_single_upload_bytes {
        return Err(ServerError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!(
                "{} bytes is over this server's single-request limit of {}: use a chunked upload",
                params.file_size, state.config.max_single_upload_bytes
            ),
        ));
    }
    let name = repo.name.clone();
    let typed = nar_hash.to_typed_nix32();
    if let Some(existing) = state
        .db(move |meta| meta.nar_by_hash(&name, &typed))
        .await?
    {
        return Ok((StatusCode::OK, Json(stored_answer(&existing, false))).into_response());
    }
    let expected = Expected {
        file_hash: Some(file_hash),
        file_size: Some(params.file_size),
        nar_hash: Some(nar_hash),
        nar_size: Some(params.nar_size),
    };
    // One byte over the declared size is enough to know the client lied about it.
    let file_size = params.file_size;
    let result = upload::receive_verify_store(
        &state,
        upload::Uploader {
            repo: &repo.name,
            token_id: token_id.as_deref(),
        },
        body,
        params.file_size + 1,
        &params.compression,
        expected,
        || {
            ::metrics::counter!(super::metrics::UPLOADS_REJECTED_TOTAL, "reason" => "file_size")
                .increment(1);
            ServerError::unprocessable(
                codes::FILE_SIZE_MISMATCH,
                format!("the body is longer than the declared file_size {file_size}"),
            )
        },
    )
    .await;
    let (record, newly) = result?;
    Ok((StatusCode::CREATED, Json(stored_answer(&record, newly))).into_response())
}

/// The longest manifest line a batch of `nars` entries can need: an entry is at most ~330
/// bytes (two hashes of up to 71 characters, sizes, a compression name, the keys).
fn batch_manifest_limit(nars: usize) -> usize {
    4096 + nars.saturating_mul(400)
}

/// Many small NARs in one request ([`NarBatchManifest`]): each is verified on its own and
/// answered on its own, and those that pass are stored together.
pub async fn upload_batch(
    State(state): State<SharedState>,
    Authorized { repo, token_id, .. }: PushAccess,
    body: Body,
) -> ServerResult<Json<NarBatchResponse>> {
    let config = &state.config;
    let _slot = state.upload_slot(&repo.name, token_id.as_deref())?;
    let manifest_limit = batch_manifest_limit(config.max_batch_nars);
    let limit = manifest_limit.saturating_add(config.max_batch_bytes as usize);
    let body = upload::read_small_body(body, limit, upload::BodyPace::new(config)).await?;
    let batch_refused = |message: String| ServerError::bad_request(codes::BAD_REQUEST, message);
    let Some(end) = body.iter().take(manifest_limit).position(|b| *b == b'\n') else {
        return Err(batch_refused(format!(
            "the body must start with the batch manifest, one line of JSON of at most {manifest_limit} bytes ending in a newline"
        )));
    };
    let manifest: NarBatchManifest = serde_json::from_slice(&body[..end])
        .map_err(|err| batch_refused(format!("the batch manifest is invalid: {err}")))?;
    check_batch(
        manifest.nars.len(),
        config.max_batch_nars,
        "NARs in one batch",
    )?;
    let files = body.slice(end + 1..);
    // The files' bytes, as POST nars counts its body; a batch that breaks off is dropped
    // whole and counts nothing.
    super::metrics::record_received(files.len() as u64);
    let declared = manifest
        .nars
        .iter()
        .try_fold(0u64, |sum, nar| sum.checked_add(nar.file_size));
    if declared.is_none_or(|declared| declared > config.max_batch_bytes) {
        return Err(ServerError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!(
                "the batch's files total more than this server's max_batch_bytes of {}: send fewer per batch",
                config.max_batch_bytes
            ),
        ));
    }
    // Without every file's end, no entry can be told from the next: the whole batch is refused.
    if declared != Some(files.len() as u64) {
        return Err(batch_refused(format!(
            "the manifest's file_size values total {}, but {} bytes of files follow it",
            declared.unwrap_or(u64::MAX),
            files.len()
        )));
    }
    let mut offset = 0;
    let entries = manifest
        .nars
        .into_iter()
        .map(|params| {
            let size = params.file_size as usize;
            let file = files.slice(offset..offset + size);
            offset += size;
            upload::BatchEntry { params, file }
        })
        .collect();
    let results = upload::verify_and_store_batch(&state, &repo.name, entries).await?;
    Ok(Json(NarBatchResponse {
        results: results
            .into_iter()
            .map(|result| match result {
                Ok((record, newly)) => NarBatchResult {
                    stored: Some(stored_answer(&record, newly)),
                    error: None,
                },
                Err(err) => NarBatchResult {
                    stored: None,
                    error: Some(NarBatchError {
                        status: err.status.as_u16(),
                        error: err.body,
                    }),
                },
            })
            .collect(),
    }))
}

fn new_upload_id() -> String {
    let bytes: [u8; 16] = rand::rngs::OsRng.gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The upload named by the path, if it belongs to this repository.
async fn find_upload(state: &SharedState, repo: &str, id: &str) -> ServerResult<UploadRecord> {
    let not_found = || {
        ServerError::not_found(format!(
            "no unfinished upload {id:?} in this repository; create a new one"
        ))
    };
    if !crate::api::is_valid_upload_id(id) {
        return Err(not_found());
    }
    let lookup = id.to_string();
    match state.db(move |meta| meta.upload(&lookup)).await? {
        Some(record) if record.repo == repo => Ok(record),
        _ => Err(not_found()),
    }
}

fn state_response(status: StatusCode, state: UploadState) -> Response {
    let offset = HeaderValue::from(state.offset);
    let mut response = (status, Json(state)).into_response();
    response.headers_mut().insert(UPLOAD_OFFSET_HEADER, offset);
    response
}

pub async fn create_upload(
    State(state): State<SharedState>,
    Authorized { repo, token_id, .. }: PushAccess,
    body: Body,
) -> ServerResult<Response> {
    let request: CreateUpload = read_json(&state, body).await?;
    check_compression(&request.compression)?;
    upload::check_nar_size(&state.config, request.nar_size)?;
    let nar_hash = upload::parse_hash(&request.nar_hash)?.to_typed_nix32();
    if request.encoder.len() > 200 {
        return Err(ServerError::bad_request(
            codes::BAD_REQUEST,
            "encoder descriptor too long",
        ));
    }
    let name = repo.name.clone();
    let lookup_hash = nar_hash.clone();
    if state
        .db(move |meta| meta.nar_by_hash(&name, &lookup_hash))
        .await?
        .is_some()
    {
        return Ok(state_response(
            StatusCode::OK,
            UploadState {
                upload_id: String::new(),
                offset: 0,
                already_stored: true,
            },
        ));
    }
    let record = UploadRecord {
        id: new_upload_id(),
        repo: repo.name.clone(),
        nar_hash,
        nar_size: request.nar_size,
        compression: request.compression,
        encoder: request.encoder,
        created_at: now_unix(),
        staging_id: None,
        updated_at: now_unix(),
    };
    // The token's id counts its sessions; a push route always has one.
    let token_id = token_id.unwrap_or_default();
    let caps = SessionCaps {
        per_token: state.config.max_upload_sessions_per_token,
        per_repo: state.config.max_upload_sessions_per_repo,
    };
    // One statement decides, under the database's uniqueness rule for (repository, NarHash,
    // compression, encoder): concurrent creates for one NAR all get the same session.
    let opened = state
        .db(move |meta| meta.open_upload(&record, &token_id, caps))
        .await?;
    let (status, upload) = match opened {
        OpenedUpload::Created(upload) => (StatusCode::CREATED, upload),
        OpenedUpload::Existing(upload) => (StatusCode::OK, upload),
        OpenedUpload::TokenFull => return Err(too_many_sessions("this token", caps.per_token)),
        OpenedUpload::RepoFull => return Err(too_many_sessions("this repository", caps.per_repo)),
    };
    // S3: the multipart upload is created here (intent first), or on a later request if the
    // replica that opened the session died before doing it.
    state.staging.open(&state, &upload).await?;
    let offset = state.staging.offset(&state, &upload).await?;
    Ok(state_response(
        status,
        UploadState {
            upload_id: upload.id,
            offset,
            already_stored: false,
        },
    ))
}

/// Sessions free up as uploads complete, are aborted or expire: worth retrying later.
fn too_many_sessions(holder: &str, cap: u64) -> ServerError {
    ServerError::new(
        StatusCode::TOO_MANY_REQUESTS,
        codes::TOO_MANY_UPLOAD_SESSIONS,
        format!(
            "{holder} already holds its maximum of {cap} unfinished uploads: complete or abort some (DELETE uploads/<id>), or retry once they expire"
        ),
    )
    .with_retry_after(SESSIONS_RETRY_AFTER_SECS)
}

/// Long enough that a client waiting for a session does not hammer the server, short enough
/// that a push whose own uploads complete meanwhile carries on promptly.
const SESSIONS_RETRY_AFTER_SECS: u64 = 10;

pub async fn upload_state(
    State(state): State<SharedState>,
    Authorized { repo, .. }: PushAccess,
    Path((_, id)): Path<(String, String)>,
) -> ServerResult<Response> {
    let record = find_upload(&state, &repo.name, &id).await?;
    let offset = state.staging.offset(&state, &record).await?;
    Ok(state_response(
        StatusCode::OK,
        UploadState {
            upload_id: record.id,
            offset,
            already_stored: false,
        },
    ))
}

pub async fn upload_chunk(
    State(state): State<SharedState>,
    Authorized { repo, token_id, .. }: PushAccess,
    Path((_, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ServerResult<Response> {
    let mut offsets = headers.get_all(UPLOAD_OFFSET_HEADER).iter();
    let declared = match (offsets.next(), offsets.next()) {
        (Some(value), None) => value
            .to_str()
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok()),
        _ => None,
    };
    let declared = declared.ok_or_else(|| {
        ServerError::bad_request(
            codes::BAD_REQUEST,
            format!("a chunk needs exactly one {UPLOAD_OFFSET_HEADER} header: the decimal byte offset it starts at"),
        )
    })?;
    let record = find_upload(&state, &repo.name, &id).await?;
    let slot = state.upload_slot(&repo.name, token_id.as_deref())?;
    let guard = state.upload_lock(&record.id).lock_owned().await;
    // Completion may have finished (and removed the upload) while this request waited.
    let record = find_upload(&state, &repo.name, &record.id).await?;
    // Sessions from before `max_nar_bytes` was checked at creation may declare any NarSize.
    let max_file_size = max_compressed_size(record.nar_size.min(state.config.max_nar_bytes));
    // On a task of its own, holding the slot and the lock: a client that goes away once its
    // chunk is received (killed, or timing out while S3 takes the part) does not cancel the
    // append halfway, so the bytes it sent are kept and its re-run resumes after them.
    let task_state = Arc::clone(&state);
    let task_record = record.clone();
    let offset = tokio::spawn(async move {
        let _held = (slot, guard);
        let offset = task_state
            .staging
            .append(&task_state, &task_record, declared, body, max_file_size)
            .await?;
        let touched = task_record.id.clone();
        task_state
            .db(move |meta| meta.touch_upload(&touched, now_unix()))
            .await?;
        ServerResult::Ok(offset)
    })
    .await??;
    Ok(state_response(
        StatusCode::OK,
        UploadState {
            upload_id: record.id,
            offset,
            already_stored: false,
        },
    ))
}

/// The largest compressed file a NAR of `nar_size` bytes may upload as: xz and zstd add well
/// under 1% to incompressible data, so this bounds the disk one upload can take. Saturates
/// rather than wrapping on a hostile NarSize.
fn max_compressed_size(nar_size: u64) -> u64 {
    nar_size
        .checked_add(nar_size / 64)
        .and_then(|size| size.checked_add(64 << 10))
        .unwrap_or(u64::MAX)
}

/// Drops the held bytes (the `.part` file; the multipart upload and any assembled object on
/// S3), then the session.
async fn discard_upload(state: &SharedState, record: &UploadRecord) -> ServerResult<()> {
    state.staging.discard(state, record).await?;
    let id = record.id.clone();
    state.db(move |meta| meta.delete_upload(&id)).await
}

pub async fn complete_upload(
    State(state): State<SharedState>,
    Authorized { repo, token_id, .. }: PushAccess,
    Path((_, id)): Path<(String, String)>,
    body: Body,
) -> ServerResult<Response> {
    let request: CompleteUpload = read_json(&state, body).await?;
    let file_hash = upload::parse_hash(&request.file_hash)?;
    let record = find_upload(&state, &repo.name, &id).await?;
    // Verification reads and decompresses the whole file: it counts as an upload in flight.
    let _slot = state.upload_slot(&repo.name, token_id.as_deref())?;
    let lock = state.upload_lock(&record.id);
    let _guard = lock.lock().await;
    let record = find_upload(&state, &repo.name, &record.id).await?;
    let (name, nar_hash) = (repo.name.clone(), record.nar_hash.clone());
    if let Some(stored) = state
        .db(move |meta| meta.nar_by_hash(&name, &nar_hash))
        .await?
    {
        // Completed already: a retry after the answer was lost, or after the session's row
        // could not be deleted (the database dropped the connection). The session's bytes are
        // the stored NAR's own object (S3), gone with it (local), or made redundant by another
        // upload of the same NAR.
        if stored.object_key == crate::server::staging::upload_object_key(&repo.name, &record.id) {
            let id = record.id.clone();
            state.db(move |meta| meta.delete_upload(&id)).await?;
        } else {
            discard_upload(&state, &record).await?;
        }
        return Ok((StatusCode::OK, Json(stored_answer(&stored, false))).into_response());
    }
    let held = state.staging.offset(&state, &record).await?;
    if held > request.file_size {
        // The server holds bytes beyond the end of the client's file: this upload can never
        // verify, so it is dropped and the client starts over.
        discard_upload(&state, &record).await?;
        return Err(ServerError::unprocessable(
            codes::FILE_SIZE_MISMATCH,
            format!(
                "completion declares {} bytes, but the server holds {held}: the upload was discarded; start a new one",
                request.file_size
            ),
        ));
    }
    if held < request.file_size {
        let mut err = ServerError::new(
            StatusCode::CONFLICT,
            codes::OFFSET_MISMATCH,
            format!(
                "completion declares {} bytes, but the server holds {held}: send the rest from {held}",
                request.file_size
            ),
        );
        err.body.offset = Some(held);
        return Err(err);
    }
    let expected = Expected {
        file_hash: Some(file_hash),
        file_size: Some(request.file_size),
        nar_hash: Some(upload::parse_hash(&record.nar_hash)?),
        nar_size: Some(record.nar_size),
    };
    match state
        .staging
        .complete(&state, &repo.name, &record, expected)
        .await
    {
        Ok((stored, newly)) => {
            // The bytes now belong to the stored NAR: only the session goes.
            let id = record.id.clone();
            state.db(move |meta| meta.delete_upload(&id)).await?;
            Ok((StatusCode::CREATED, Json(stored_answer(&stored, newly))).into_response())
        }
        Err(err) => {
            // A verified mismatch means these bytes can never become a valid NAR: start over.
            if err.status == StatusCode::UNPROCESSABLE_ENTITY {
                discard_upload(&state, &record).await?;
            }
            Err(err)
        }
    }
}

pub async fn abort_upload(
    State(state): State<SharedState>,
    Authorized { repo, .. }: PushAccess,
    Path((_, id)): Path<(String, String)>,
) -> ServerResult<StatusCode> {
    let record = find_upload(&state, &repo.name, &id).await?;
    let lock = state.upload_lock(&record.id);
    let _guard = lock.lock().await;
    discard_upload(&state, &record).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn publish(
    State(state): State<SharedState>,
    Authorized { repo, .. }: PushAccess,
    body: Body,
) -> ServerResult<Json<PublishResponse>> {
    let mut request: PublishRequest = read_json(&state, body).await?;
    check_batch(
        request.narinfos.len(),
        state.config.max_publish_batch,
        "narinfos per request",
    )?;
    // A proof per reference at most, so the batch limit bounds them too.
    check_batch(
        request.upstream.len(),
        state.config.max_publish_batch,
        "upstream proofs per request",
    )?;
    let upstream = std::mem::take(&mut request.upstream);
    // Validating every store path of a large batch is CPU work like the JSON parse before it.
    let (mut response, parsed) =
        tokio::task::spawn_blocking(move || parse_entries(request)).await?;
    let name = repo.name.clone();
    let nar_hashes: Vec<String> = parsed
        .iter()
        .map(|info| info.nar_hash.to_typed_nix32())
        .collect();
    let nars = state
        .db(move |meta| {
            nar_hashes
                .iter()
                .map(|h| meta.nar_by_hash(&name, h))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    let mut candidates = Vec::with_capacity(parsed.len());
    for (info, nar) in parsed.into_iter().zip(nars) {
        let hash = info.store_path.hash_part().to_string();
        match nar {
            None => response.rejected.push(crate::api::PublishRejection {
                hash,
                code: codes::NAR_NOT_STORED.into(),
                message: format!(
                    "no NAR with NarHash {} is stored: upload it first",
                    info.nar_hash
                ),
            }),
            Some(nar) if nar.nar_size != info.nar_size => {
                response.rejected.push(crate::api::PublishRejection {
                    hash,
                    code: codes::NAR_SIZE_MISMATCH.into(),
                    message: format!(
                        "NarSize {} does not match the stored NAR's {}",
                        info.nar_size, nar.nar_size
                    ),
                })
            }
            Some(nar) => candidates.push(Candidate { info, nar }),
        }
    }
    let outcome = publish::publish(&state, &repo, candidates, upstream).await?;
    response.published = outcome.published;
    response.already_published = outcome.already_published;
    response.rejected.extend(outcome.rejected);
    Ok(Json(response))
}

/// The request's entries as narinfos, and a response already holding the malformed and
/// duplicate ones.
fn parse_entries(request: PublishRequest) -> (PublishResponse, Vec<NarInfo>) {
    let mut response = PublishResponse::default();
    let mut parsed = Vec::with_capacity(request.narinfos.len());
    let mut seen = HashSet::new();
    for entry in request.narinfos {
        let hash_hint = entry
            .store_path
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .chars()
            .take(32)
            .collect::<String>();
        match parse_entry(&entry) {
            Ok(info) if seen.insert(info.store_path.hash_part().to_string()) => parsed.push(info),
            Ok(info) => response.rejected.push(crate::api::PublishRejection {
                hash: info.store_path.hash_part().to_string(),
                code: codes::BAD_REQUEST.into(),
                message: format!("{} appears twice in this request", info.store_path),
            }),
            Err(message) => response.rejected.push(crate::api::PublishRejection {
                hash: hash_hint,
                code: codes::BAD_REQUEST.into(),
                message,
            }),
        }
    }
    (response, parsed)
}

fn parse_entry(entry: &crate::api::PublishEntry) -> Result<NarInfo, String> {
    let store_path = StorePath::from_absolute(&entry.store_path).map_err(|e| e.to_string())?;
    let nar_hash = Sha256Hash::parse(&entry.nar_hash).map_err(|e| e.to_string())?;
    if entry.nar_size == 0 {
        return Err(format!("{}: NarSize must be positive", entry.store_path));
    }
    let mut references = entry
        .references
        .iter()
        .map(|r| StorePath::from_absolute(r).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    references.sort();
    references.dedup();
    let deriver = entry
        .deriver
        .as_deref()
        .map(|d| StorePath::from_absolute(d).map_err(|e| e.to_string()))
        .transpose()?;
    if let Some(ca) = &entry.ca {
        if ca.contains('\n') {
            return Err("CA must be one line".into());
        }
    }
    if entry
        .signatures
        .iter()
        .any(|s| s.contains('\n') || !s.contains(':'))
    {
        return Err("signatures must be single-line `name:base64`".into());
    }
    Ok(NarInfo {
        store_path,
        url: String::new(),
        compression: String::new(),
        file_hash: None,
        file_size: None,
        nar_hash,
        nar_size: entry.nar_size,
        references,
        deriver,
        sigs: entry.signatures.clone(),
        ca: entry.ca.clone(),
    })
}

/// `POST api/v1/pins/{name}`: the store paths become the pin's next revision; each must be
/// published here, whole path included (a path under the same hash part with another name is
/// not the one published).
pub async fn create_pin(
    State(state): State<SharedState>,
    Authorized { repo, .. }: PushAccess,
    Path((_, name)): Path<(String, String)>,
    body: Body,
) -> ServerResult<Json<crate::api::PinResponse>> {
    // The same rule as the client's, so a name the CLI accepts is never refused here.
    if let Err(why) = crate::api::check_pin_name(&name) {
        let shown: String = why.chars().take(300).collect();
        return Err(ServerError::bad_request(codes::BAD_REQUEST, shown));
    }
    let request: crate::api::PinRequest = read_json(&state, body).await?;
    check_batch(
        request.store_paths.len(),
        state.config.max_publish_batch,
        "store paths per pin",
    )?;
    if request.store_paths.is_empty() {
        return Err(ServerError::bad_request(
            codes::BAD_REQUEST,
            "a pin needs at least one store path",
        ));
    }
    let mut paths = Vec::with_capacity(request.store_paths.len());
    for text in &request.store_paths {
        let path = StorePath::from_absolute(text).map_err(|err| {
            ServerError::bad_request(codes::BAD_REQUEST, format!("{text:?}: {err}"))
        })?;
        paths.push(path);
    }
    paths.sort();
    paths.dedup();
    let hashes: Vec<String> = paths.iter().map(|p| p.hash_part().to_string()).collect();
    let (lookup, repo_name) = (hashes.clone(), repo.name.clone());
    let stored = state
        .db(move |meta| meta.published_store_paths(&repo_name, &lookup))
        .await?;
    let not_published: Vec<String> = paths
        .iter()
        .zip(&stored)
        .filter(|(path, stored)| stored.as_deref() != Some(path.to_absolute().as_str()))
        .map(|(path, _)| path.to_absolute())
        .collect();
    let not_published_error = |paths: Vec<String>| {
        ServerError::unprocessable(
            codes::NOT_PUBLISHED,
            format!(
                "cannot pin what this repository does not publish: {}; push it first",
                paths.join(", ")
            ),
        )
    };
    if !not_published.is_empty() {
        return Err(not_published_error(not_published));
    }
    let (pin_name, repo_name, keep) = (name.clone(), repo.name.clone(), request.keep);
    let at = super::gc::now();
    let created = state
        .db(move |meta| meta.create_pin(&repo_name, &pin_name, &hashes, keep, at))
        .await?;
    match created {
        super::metadata::PinCreated::Created { pin, dropped } => {
            Ok(Json(crate::api::PinResponse {
                created: pin_revision(pin),
                dropped_revisions: dropped,
            }))
        }
        // Collected (or deleted) between the lookup and the pin's transaction.
        super::metadata::PinCreated::NotPublished(gone) => {
            let gone: Vec<String> = paths
                .iter()
                .filter(|p| gone.iter().any(|h| h == p.hash_part()))
                .map(|p| p.to_absolute())
                .collect();
            Err(not_published_error(gone))
        }
    }
}

fn pin_revision(pin: super::metadata::PinRecord) -> crate::api::PinRevision {
    crate::api::PinRevision {
        name: pin.name,
        revision: pin.revision,
        store_paths: pin.store_paths,
        created_at: pin.created_at,
        keep: pin.keep,
    }
}

/// `GET api/v1/pins`: every live revision of every pin of the repository.
pub async fn list_pins(
    State(state): State<SharedState>,
    Authorized { repo, .. }: ApiReadAccess,
) -> ServerResult<Json<crate::api::PinList>> {
    let name = repo.name.clone();
    let pins = state.db(move |meta| meta.pins(Some(&name))).await?;
    Ok(Json(crate::api::PinList {
        pins: pins.into_iter().map(pin_revision).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compressed_size_bound_saturates_instead_of_wrapping() {
        assert_eq!(max_compressed_size(u64::MAX), u64::MAX);
        assert_eq!(max_compressed_size(u64::MAX - (64 << 10)), u64::MAX);
        assert_eq!(max_compressed_size(6400), 6400 + 100 + (64 << 10));
    }
}
