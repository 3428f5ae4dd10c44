//! Where the chunks of a resumable upload wait until completion, behind one interface the
//! upload handlers (`routes_api.rs`) call, whichever storage backend is configured.
//!
//! ```text
//!             create          PATCH chunk (offset CAS)          complete                 abort/expiry
//!  local:  (nothing)   ──►  append to <uploads>/<id>.part ──► verify file ──► rename     remove .part
//!                           offset = the file's length          into the store
//!  S3:     intent(key),  ──► body in memory ──► UploadPart n ──► CompleteMultipart(key) ──► AbortMultipart,
//!          CreateMultipart    ──► add_upload_part(offset CAS)    ──► stream key back once   delete key,
//!          (staging_id)       offset = Σ part sizes (database)     through the verifier     clear intent
//!                                                                ──► nars row (object_key)
//! ```
//! Local staging is today's behaviour exactly: the bytes of a chunk that broke off are kept.
//! S3 staging keeps every piece of state in the shared database and bucket, so each chunk and
//! the completion may land on any replica: a chunk that breaks off is dropped whole (the offset
//! stays at the last part), and two replicas racing on one offset cannot both append, because
//! `Metadata::add_upload_part` only appends at the offset it was given. Every part but the last
//! must be at least 5 MiB (S3's rule): a shorter chunk ends the upload.
//!
//! Memory: an S3 chunk is held whole before it is sent as a part, so S3 staging holds at most
//! `max_concurrent_uploads × max_chunk_bytes` (64 × 64 MiB = 4 GiB with the defaults; lower
//! `max_chunk_bytes` to 16 MiB for 1 GiB) of chunk data. Completion streams the object back
//! once through the verifier and holds nothing whole.

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::StatusCode;

use super::backend::metadata::{now_unix, NarRecord, UploadPart, UploadRecord};
use super::backend::storage::s3::{S3Store, MAX_PARTS, MIN_PART_BYTES};
use super::error::{ServerError, ServerResult};
use super::upload::{self, Expected};
use super::{metrics, verify, AppState};
use crate::api::codes;

#[async_trait]
pub trait ChunkStaging: Send + Sync {
    /// Prepares a session the database just opened (or found unprepared).
    async fn open(&self, state: &AppState, upload: &UploadRecord) -> ServerResult<()>;
    /// The bytes held: where the next chunk must start.
    async fn offset(&self, state: &AppState, upload: &UploadRecord) -> ServerResult<u64>;
    /// Appends `body` if it starts at `declared`, and returns the new offset. `max_file_size`
    /// bounds the whole upload.
    async fn append(
        &self,
        state: &AppState,
        upload: &UploadRecord,
        declared: u64,
        body: Body,
        max_file_size: u64,
    ) -> ServerResult<u64>;
    /// Verifies the held bytes against `expected` and stores them as a NAR of `repo`. On a
    /// verification failure nothing is stored; the caller discards the upload.
    async fn complete(
        &self,
        state: &AppState,
        repo: &str,
        upload: &UploadRecord,
        expected: Expected,
    ) -> ServerResult<(NarRecord, bool)>;
    /// Drops whatever is held for the upload (its database row is the caller's).
    async fn discard(&self, state: &AppState, upload: &UploadRecord) -> ServerResult<()>;
    /// When the staged bytes last changed, where the staging knows better than the session's
    /// `updated_at` (Unix seconds); the janitor keeps an upload active since its cutoff.
    async fn last_activity(&self, _state: &AppState, _upload: &UploadRecord) -> Option<i64> {
        None
    }
}

/// The 409 a chunk or completion gets when it does not start where the server is.
pub fn offset_mismatch(message: String, held: u64) -> ServerError {
    let mut err = ServerError::new(StatusCode::CONFLICT, codes::OFFSET_MISMATCH, message);
    err.body.offset = Some(held);
    err
}

fn chunk_offset_mismatch(declared: u64, held: u64) -> ServerError {
    offset_mismatch(
        format!("this chunk starts at {declared}, but the server holds {held} bytes: resend from {held}"),
        held,
    )
}

fn past_max_size(max_file_size: u64, upload: &UploadRecord) -> ServerError {
    ServerError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        codes::PAYLOAD_TOO_LARGE,
        format!(
            "this chunk takes the upload past {max_file_size} bytes, the most a NAR of NarSize {} may compress to",
            upload.nar_size
        ),
    )
}

/// `.part` files under the data directory: one machine, the embedded default.
pub struct LocalStaging;

impl LocalStaging {
    fn path(state: &AppState, id: &str) -> std::path::PathBuf {
        state.uploads_dir.join(format!("{id}.part"))
    }

    async fn held(state: &AppState, id: &str) -> ServerResult<u64> {
        match tokio::fs::metadata(Self::path(state, id)).await {
            Ok(meta) => Ok(meta.len()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(err) => Err(err.into()),
        }
    }
}

#[async_trait]
impl ChunkStaging for LocalStaging {
    async fn open(&self, _state: &AppState, _upload: &UploadRecord) -> ServerResult<()> {
        Ok(())
    }

    async fn offset(&self, state: &AppState, upload: &UploadRecord) -> ServerResult<u64> {
        Self::held(state, &upload.id).await
    }

    async fn append(
        &self,
        state: &AppState,
        upload: &UploadRecord,
        declared: u64,
        body: Body,
        max_file_size: u64,
    ) -> ServerResult<u64> {
        let held = Self::held(state, &upload.id).await?;
        if declared != held {
            return Err(chunk_offset_mismatch(declared, held));
        }
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(Self::path(state, &upload.id))
            .await?;
        let room = max_file_size.saturating_sub(held);
        let received = upload::receive_into(
            body,
            &mut file,
            state.config.max_chunk_bytes.min(room),
            upload::BodyPace::new(&state.config),
        )
        .await;
        if let Err(upload::ReceiveError::TooLarge { .. }) = &received {
            // An oversized chunk is refused whole, so the offset stays where the client expects it.
            file.set_len(held).await?;
        }
        // Every offset this server states (here, in GET, in a 409) is the file's length: the
        // bytes below it reach the disk before any of those answers, so a power loss cannot take
        // back an acknowledged chunk. Also after a failed chunk, whose kept bytes a GET reports.
        file.sync_data().await?;
        drop(file);
        match received {
            Err(upload::ReceiveError::TooLarge { .. }) if room < state.config.max_chunk_bytes => {
                return Err(past_max_size(max_file_size, upload))
            }
            other => other?,
        };
        Self::held(state, &upload.id).await
    }

    async fn complete(
        &self,
        state: &AppState,
        repo: &str,
        upload: &UploadRecord,
        expected: Expected,
    ) -> ServerResult<(NarRecord, bool)> {
        let path = Self::path(state, &upload.id);
        upload::verify_and_store(state, repo, &path, &upload.compression, expected).await
    }

    async fn discard(&self, state: &AppState, upload: &UploadRecord) -> ServerResult<()> {
        let _ = tokio::fs::remove_file(Self::path(state, &upload.id)).await;
        Ok(())
    }

    /// The part file's modification time: sessions from before `updated_at` was recorded
    /// (schema 1) count their activity from there.
    async fn last_activity(&self, state: &AppState, upload: &UploadRecord) -> Option<i64> {
        tokio::fs::metadata(Self::path(state, &upload.id))
            .await
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64)
    }
}

/// One S3 multipart upload per chunked upload; the part list lives in the database.
pub struct S3Staging {
    pub store: Arc<S3Store>,
}

/// Where a chunked upload's object is assembled, and where its NAR stays once verified: S3 has
/// no rename, and copying would cost a second write of every byte. The narinfo still says
/// `nar/<FileHash>.nar.xz`; NAR GETs find the object through the nars row.
pub fn upload_object_key(repo: &str, upload_id: &str) -> String {
    format!("{repo}/uploads/{upload_id}")
}

/// The upload id an object key made by [`upload_object_key`] belongs to.
pub fn upload_id_of_key(key: &str) -> Option<&str> {
    let (_, rest) = key.split_once("/uploads/")?;
    crate::api::is_valid_upload_id(rest).then_some(rest)
}

impl S3Staging {
    /// The multipart upload id, creating the multipart upload first when the session has none
    /// (a replica died between opening the session and creating it). Intent comes first, so a
    /// crash anywhere leaves a key the janitor knows to look at.
    async fn staging_id(&self, state: &AppState, upload: &UploadRecord) -> ServerResult<String> {
        if let Some(id) = &upload.staging_id {
            return Ok(id.clone());
        }
        let key = upload_object_key(&upload.repo, &upload.id);
        let intent = key.clone();
        state
            .db(move |meta| meta.record_object_intent(&intent, now_unix()))
            .await?;
        let staging_id = self.store.create_multipart(&key).await?;
        let id = upload.id.clone();
        let recorded = staging_id.clone();
        state
            .db(move |meta| meta.set_upload_staging_id(&id, &recorded))
            .await?;
        Ok(staging_id)
    }

    async fn parts(&self, state: &AppState, id: &str) -> ServerResult<Vec<UploadPart>> {
        let id = id.to_string();
        state.db(move |meta| meta.upload_parts(&id)).await
    }
}

fn held_by(parts: &[UploadPart]) -> u64 {
    parts.iter().map(|part| part.size).sum()
}

#[async_trait]
impl ChunkStaging for S3Staging {
    async fn open(&self, state: &AppState, upload: &UploadRecord) -> ServerResult<()> {
        self.staging_id(state, upload).await.map(|_| ())
    }

    async fn offset(&self, state: &AppState, upload: &UploadRecord) -> ServerResult<u64> {
        Ok(held_by(&self.parts(state, &upload.id).await?))
    }

    async fn append(
        &self,
        state: &AppState,
        upload: &UploadRecord,
        declared: u64,
        body: Body,
        max_file_size: u64,
    ) -> ServerResult<u64> {
        let parts = self.parts(state, &upload.id).await?;
        let held = held_by(&parts);
        if declared != held {
            return Err(chunk_offset_mismatch(declared, held));
        }
        if let Some(last) = parts.last().filter(|part| part.size < MIN_PART_BYTES) {
            return Err(offset_mismatch(
                format!(
                    "this upload's last chunk was {} bytes, under S3's {MIN_PART_BYTES}-byte part minimum, so it ended the upload at {held} bytes: complete it, or abort it and send chunks of at least {MIN_PART_BYTES} bytes",
                    last.size
                ),
                held,
            ));
        }
        if parts.len() >= MAX_PARTS as usize {
            return Err(ServerError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::PAYLOAD_TOO_LARGE,
                format!(
                    "this upload already has S3's maximum of {MAX_PARTS} parts: send larger chunks"
                ),
            ));
        }
        let staging_id = self.staging_id(state, upload).await?;
        let room = max_file_size.saturating_sub(held);
        let (pieces, size) = match upload::receive_to_memory(
            body,
            state.config.max_chunk_bytes.min(room),
            upload::BodyPace::new(&state.config),
        )
        .await
        {
            Ok(received) => received,
            Err(upload::ReceiveError::TooLarge { .. }) if room < state.config.max_chunk_bytes => {
                return Err(past_max_size(max_file_size, upload))
            }
            // Nothing of a broken chunk is kept: the offset stays at the last whole part.
            Err(err) => return Err(err.into()),
        };
        if size == 0 {
            return Ok(held);
        }
        let number = parts.len() as u32 + 1;
        let key = upload_object_key(&upload.repo, &upload.id);
        let etag = self
            .store
            .put_part(&key, &staging_id, number, pieces)
            .await?;
        let id = upload.id.clone();
        let part = UploadPart { number, size, etag };
        let appended = state
            .db(move |meta| meta.add_upload_part(&id, held, &part, now_unix()))
            .await?;
        if !appended {
            // Another replica appended at this offset first; its part is the one recorded.
            let now = held_by(&self.parts(state, &upload.id).await?);
            return Err(chunk_offset_mismatch(declared, now));
        }
        Ok(held + size)
    }

    async fn complete(
        &self,
        state: &AppState,
        repo: &str,
        upload: &UploadRecord,
        expected: Expected,
    ) -> ServerResult<(NarRecord, bool)> {
        let suffix = verify::compression_suffix(&upload.compression).ok_or_else(|| {
            ServerError::unprocessable(
                codes::UNSUPPORTED_COMPRESSION,
                crate::api::Compression::unsupported(&upload.compression),
            )
        })?;
        let limit = upload::output_limit(&state.config, expected.nar_size)?;
        let parts = self.parts(state, &upload.id).await?;
        let held = held_by(&parts);
        if parts.is_empty() {
            return Err(ServerError::unprocessable(
                codes::FILE_SIZE_MISMATCH,
                "this upload holds no bytes, and an empty file is not a NAR; nothing was stored",
            ));
        }
        let staging_id = self.staging_id(state, upload).await?;
        let key = upload_object_key(&upload.repo, &upload.id);
        let etags = parts.into_iter().map(|part| part.etag).collect();
        if let Err(err) = self
            .store
            .complete_multipart(&key, &staging_id, etags)
            .await
        {
            // An earlier completion (on a replica that died before answering) may have
            // assembled the object already; then only the verification is left to do.
            if self.store.head(&key).await? != Some(held) {
                return Err(err.into());
            }
        }
        let verified = self.verify_object(&key, &upload.compression, limit).await?;
        if let Err(err) = upload::check_expectations(&verified, &expected) {
            self.store.delete(&key).await?;
            let intent = key.clone();
            state
                .db(move |meta| meta.clear_object_intent(&intent))
                .await?;
            return Err(err);
        }
        let record = NarRecord {
            url: format!("nar/{}{suffix}", verified.file_hash.to_nix32()),
            compression: upload.compression.clone(),
            nar_hash: verified.nar.nar_hash.to_typed_nix32(),
            nar_size: verified.nar.nar_size,
            file_hash: verified.file_hash.to_typed_nix32(),
            file_size: verified.file_size,
            object_key: key.clone(),
        };
        let repo_owned = repo.to_string();
        let to_insert = record.clone();
        let newly = state
            .db(move |meta| meta.insert_nar(&repo_owned, &to_insert))
            .await?;
        if newly {
            ::metrics::counter!(metrics::NARS_STORED_TOTAL).increment(1);
        } else {
            // The same file was stored meanwhile (another session): its object serves it.
            self.store.delete(&key).await?;
        }
        let intent = key;
        state
            .db(move |meta| meta.clear_object_intent(&intent))
            .await?;
        Ok((record, newly))
    }

    async fn discard(&self, state: &AppState, upload: &UploadRecord) -> ServerResult<()> {
        let key = upload_object_key(&upload.repo, &upload.id);
        if let Some(staging_id) = &upload.staging_id {
            self.store.abort_multipart(&key, staging_id).await?;
        }
        // Completed but refused (or never published): the assembled object goes too.
        self.store.delete(&key).await?;
        state.db(move |meta| meta.clear_object_intent(&key)).await
    }
}

impl S3Staging {
    /// Streams the object back once, through the same verifier local files go through.
    async fn verify_object(
        &self,
        key: &str,
        compression: &str,
        limit: verify::OutputLimit,
    ) -> ServerResult<verify::Verified> {
        let Some((_, stream)) = self.store.get(key).await? else {
            return Err(ServerError::internal(format!(
                "the assembled upload {key} is missing from the bucket"
            )));
        };
        let reader = tokio_util::io::StreamReader::new(stream);
        let compression = compression.to_string();
        tokio::task::spawn_blocking(move || {
            let bridge = tokio_util::io::SyncIoBridge::new(reader);
            verify::verify_reader(bridge, &compression, limit)
        })
        .await?
        .map_err(upload::verification_failed)
    }
}
