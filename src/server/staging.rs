//! Where the chunks of a resumable upload wait until completion, behind one interface the
//! upload handlers (`routes_api.rs`) call, whichever storage backend is configured.
//!
//! ```text
//!             create          PATCH chunk (offset CAS)          complete                 abort/expiry
//!  local:  (nothing)   ──►  append to <uploads>/<id>.part ──► hard link, verify ──► remove .part
//!                           offset = the file's length          ──► rename the link
//!                                                                   into the store
//!  S3:     intent(key),  ──► body in memory ──┐                ──► tail? UploadPart n ──► AbortMultipart,
//!          CreateMultipart  tail? + its bytes ┤                ──► CompleteMultipart(key) delete key and
//!          (staging_id)   ≥ 5 MiB: UploadPart n                ──► stream key back once   tail, clear
//!                         < 5 MiB: intent, PUT new tail object    through the verifier    intents
//!                         ──► add/replace_last_upload_part (CAS)  ──► nars row (object_key)
//!                         ──► delete the old tail              ──► delete the tail
//!                         offset = Σ part and tail sizes (database)
//! ```
//! Local staging is today's behaviour exactly: the bytes of a chunk that broke off are kept.
//! S3 staging keeps every piece of state in the shared database and bucket, so each chunk and
//! the completion may land on any replica: a chunk that breaks off is dropped whole (the offset
//! stays at the last part), and two replicas racing on one offset cannot both append, because
//! `Metadata::add_upload_part` and `replace_last_upload_part` only write at the offset they
//! were given.
//!
//! Chunks of any size: S3 wants every part but the last to be at least 5 MiB, so bytes that
//! would make a shorter part wait as the upload's *tail*, a small object
//! (`<repo>/uploads/<id>.tail-<nonce>`, a fresh key per write, its intent recorded first)
//! listed as the last entry of the part list. The next chunk, on whichever replica, reads the
//! tail back, puts the two together and uploads them as part n (or as a new, longer tail);
//! completion uploads the tail as the last part. A replica killed mid-chunk leaves at most a
//! tail object nothing refers to, which the janitor deletes after the grace period.
//!
//! Memory: an S3 chunk is held whole, with the tail it joins, before it is sent:
//! `max_concurrent_uploads × (max_chunk_bytes + 5 MiB)` at most (64 × 69 MiB ≈ 4.3 GiB with the
//! defaults; lower `max_chunk_bytes` to 16 MiB for 1.3 GiB). Completion streams the object back
//! once through the verifier and holds nothing whole but the tail.

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::StatusCode;

use super::backend::metadata::{now_unix, NarRecord, UploadPart, UploadRecord, TAIL_ETAG_PREFIX};
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
        // `verify_and_store` moves the file it is given into the store. It gets a hard link
        // to the part instead (no copy), so when a step after the move fails (the database
        // dropping its connection before the `nars` row), the part is still whole here and the
        // retried completion finds the full offset instead of answering "send from 0". The
        // link lives in tmp/, which the server empties at start should it die meanwhile.
        let link = state.tmp_dir.join(format!("{}.completing", upload.id));
        let _ = tokio::fs::remove_file(&link).await;
        tokio::fs::hard_link(&path, &link).await?;
        let result =
            upload::verify_and_store(state, repo, &link, &upload.compression, expected).await;
        let _ = tokio::fs::remove_file(&link).await;
        if result.is_ok() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        result
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

/// Hex digits of the nonce in a tail key.
const TAIL_NONCE_LEN: usize = 16;

/// A fresh key for an upload's tail. Each write gets its own (the nonce), so a replica that
/// loses the race for an offset never overwrites the tail the winner recorded, and a tail is
/// never rewritten in place while another replica may be reading it.
fn new_tail_key(repo: &str, upload_id: &str) -> String {
    use rand::Rng;
    let nonce: [u8; TAIL_NONCE_LEN / 2] = rand::rngs::OsRng.gen();
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    format!("{repo}/uploads/{upload_id}.tail-{nonce}")
}

/// The upload id a tail key made by [`new_tail_key`] belongs to.
pub fn upload_id_of_tail_key(key: &str) -> Option<&str> {
    let (_, rest) = key.split_once("/uploads/")?;
    let (id, nonce) = rest.split_once(".tail-")?;
    let hex = nonce.len() == TAIL_NONCE_LEN && nonce.bytes().all(|b| b.is_ascii_hexdigit());
    (crate::api::is_valid_upload_id(id) && hex).then_some(id)
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

    /// The bytes of `tail`, an upload's tail part. A tail that is gone was replaced by a
    /// request on another replica, which moved the offset: that is a 409, as for any race.
    async fn read_tail(
        &self,
        state: &AppState,
        upload: &UploadRecord,
        tail: &UploadPart,
        declared: u64,
    ) -> ServerResult<Vec<bytes::Bytes>> {
        let key = tail.tail_key().unwrap_or_default();
        let Some((len, stream)) = self.store.get(key).await? else {
            let now = held_by(&self.parts(state, &upload.id).await?);
            if now != declared {
                return Err(chunk_offset_mismatch(declared, now));
            }
            return Err(ServerError::internal(format!(
                "the tail {key} of upload {} is missing from the bucket",
                upload.id
            )));
        };
        let pieces: Vec<bytes::Bytes> = futures_util::TryStreamExt::try_collect(stream).await?;
        if len != tail.size || pieces.iter().map(|p| p.len() as u64).sum::<u64>() != tail.size {
            return Err(ServerError::internal(format!(
                "the tail {key} of upload {} holds {len} bytes, not the {} recorded",
                upload.id, tail.size
            )));
        }
        Ok(pieces)
    }

    /// Writes `pieces` as a new tail object, its intent recorded first.
    async fn write_tail(
        &self,
        state: &AppState,
        upload: &UploadRecord,
        number: u32,
        pieces: Vec<bytes::Bytes>,
        size: u64,
    ) -> ServerResult<UploadPart> {
        let key = new_tail_key(&upload.repo, &upload.id);
        let intent = key.clone();
        state
            .db(move |meta| meta.record_object_intent(&intent, now_unix()))
            .await?;
        let mut whole = bytes::BytesMut::with_capacity(size as usize);
        for piece in pieces {
            whole.extend_from_slice(&piece);
        }
        self.store.put_bytes(&key, whole.freeze()).await?;
        Ok(UploadPart {
            number,
            size,
            etag: format!("{TAIL_ETAG_PREFIX}{key}"),
        })
    }

    /// Deletes a tail object nothing refers to any more, then its intent. Best effort: a
    /// failure leaves the intent, and the janitor deletes the object after the grace period.
    async fn drop_tail(&self, state: &AppState, key: &str) {
        if let Err(err) = self.store.delete(key).await {
            tracing::warn!("leaving the superseded tail {key} to the janitor: {err}");
            return;
        }
        let intent = key.to_string();
        if let Err(err) = state
            .db(move |meta| meta.clear_object_intent(&intent))
            .await
        {
            tracing::warn!(
                "leaving the intent of the deleted tail {key} to the janitor: {}",
                err.body.message
            );
        }
    }
}

fn held_by(parts: &[UploadPart]) -> u64 {
    parts.iter().map(|part| part.size).sum()
}

/// The upload's last part when it is a tail.
fn tail_of(parts: &[UploadPart]) -> Option<&UploadPart> {
    parts.last().filter(|part| part.tail_key().is_some())
}

/// Whether a tail and a chunk of `total` bytes together go up as a part, or wait as a new tail.
fn makes_a_part(total: u64) -> bool {
    total >= MIN_PART_BYTES
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
        let tail = tail_of(&parts).cloned();
        // Sessions staged by a binary from before tails ended at a short part: S3 would refuse
        // to assemble a part after it.
        if let Some(last) = parts
            .last()
            .filter(|part| tail.is_none() && part.size < MIN_PART_BYTES)
        {
            return Err(offset_mismatch(
                format!(
                    "this upload's last part was {} bytes, under S3's {MIN_PART_BYTES}-byte part minimum, so it ended the upload at {held} bytes: complete it, or abort it and start over",
                    last.size
                ),
                held,
            ));
        }
        // A tail grows (or becomes a part) in place; otherwise the chunk is the next part.
        let number = tail
            .as_ref()
            .map_or(parts.len() as u32 + 1, |tail| tail.number);
        if number > MAX_PARTS {
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
        let mut data = match &tail {
            Some(tail) => self.read_tail(state, upload, tail, declared).await?,
            None => Vec::new(),
        };
        data.extend(pieces);
        let total = tail.as_ref().map_or(0, |tail| tail.size) + size;
        let recorded = if makes_a_part(total) {
            let key = upload_object_key(&upload.repo, &upload.id);
            let etag = self.store.put_part(&key, &staging_id, number, data).await?;
            UploadPart {
                number,
                size: total,
                etag,
            }
        } else {
            self.write_tail(state, upload, number, data, total).await?
        };
        let id = upload.id.clone();
        let (last, part) = (tail.clone(), recorded.clone());
        let appended = state
            .db(move |meta| match &last {
                Some(last) => meta.replace_last_upload_part(&id, held, last, &part, now_unix()),
                None => meta.add_upload_part(&id, held, &part, now_unix()),
            })
            .await?;
        if !appended {
            // Another replica moved the offset first; its part (or tail) is the one recorded.
            if let Some(key) = recorded.tail_key() {
                self.drop_tail(state, key).await;
            }
            let now = held_by(&self.parts(state, &upload.id).await?);
            return Err(chunk_offset_mismatch(declared, now));
        }
        if let Some(old) = tail.as_ref().and_then(UploadPart::tail_key) {
            self.drop_tail(state, old).await;
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
        let tail = tail_of(&parts).cloned();
        let assembled: ServerResult<()> = async {
            let mut etags: Vec<String> = parts.iter().map(|part| part.etag.clone()).collect();
            // The tail goes up as the last part, which S3 lets be short. Not recorded: a
            // retried completion uploads it again under the same number.
            if let Some(tail) = &tail {
                let bytes = self.read_tail(state, upload, tail, held).await?;
                let etag = self
                    .store
                    .put_part(&key, &staging_id, tail.number, bytes)
                    .await?;
                if let Some(last) = etags.last_mut() {
                    *last = etag;
                }
            }
            self.store
                .complete_multipart(&key, &staging_id, etags)
                .await?;
            Ok(())
        }
        .await;
        if let Err(err) = assembled {
            // An earlier completion (on a replica that died before answering) may have
            // assembled the object already; then only the verification is left to do.
            if self.store.head(&key).await? != Some(held) {
                return Err(err);
            }
        }
        let mut verified = self.verify_object(&key, &upload.compression, limit).await?;
        if let Err(err) = upload::check_expectations(&verified, &expected) {
            self.store.delete(&key).await?;
            let intent = key.clone();
            state
                .db(move |meta| meta.clear_object_intent(&intent))
                .await?;
            return Err(err);
        }
        // The listing before the row, as for single-request uploads: once a narinfo can name
        // the NAR, `<hash>.ls` answers.
        if let Some(listing) = verified.listing.take() {
            let listing_key = upload::listing_key(repo, &verified.nar.nar_hash);
            state
                .storage
                .put_bytes(&listing_key, bytes::Bytes::from(listing))
                .await?;
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
            // Unless the row is this upload's own, from a completion that died before
            // answering: then this object is the one it names.
            let (repo_owned, url) = (repo.to_string(), record.url.clone());
            let existing = state
                .db(move |meta| meta.nar_by_url(&repo_owned, &url))
                .await?;
            if existing.is_none_or(|nar| nar.object_key != key) {
                self.store.delete(&key).await?;
            }
        }
        if let Some(tail) = tail.as_ref().and_then(UploadPart::tail_key) {
            self.drop_tail(state, tail).await;
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
        if let Some(tail) = tail_of(&self.parts(state, &upload.id).await?) {
            let tail = tail.tail_key().unwrap_or_default().to_string();
            self.store.delete(&tail).await?;
            state
                .db(move |meta| meta.clear_object_intent(&tail))
                .await?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_object_keys_name_their_upload_and_nothing_else() {
        let id = "0123456789abcdef0123456789abcdef";
        let key = upload_object_key("cache", id);
        assert_eq!(key, format!("cache/uploads/{id}"));
        assert!(crate::server::storage::is_safe_key(&key));
        assert_eq!(upload_id_of_key(&key), Some(id));
        // NAR keys, and look-alikes with something that is not an upload id, own no upload.
        for other in [
            "cache/nar/0abc.nar.xz",
            "cache/uploads/short",
            "cache/uploads/0123456789abcdef0123456789abcdef/x",
        ] {
            assert_eq!(upload_id_of_key(other), None, "{other}");
        }
    }

    #[test]
    fn tail_keys_name_their_upload_and_differ_on_every_write() {
        let id = "0123456789abcdef0123456789abcdef";
        let key = new_tail_key("cache", id);
        assert!(
            key.starts_with(&format!("cache/uploads/{id}.tail-")),
            "{key}"
        );
        assert!(crate::server::storage::is_safe_key(&key));
        assert_eq!(upload_id_of_tail_key(&key), Some(id));
        assert_ne!(key, new_tail_key("cache", id));
        // A tail is not the upload's object, and the upload's object is not a tail.
        assert_eq!(upload_id_of_key(&key), None);
        assert_eq!(upload_id_of_tail_key(&upload_object_key("cache", id)), None);
        for other in [
            "cache/uploads/short.tail-0123456789abcdef",
            &format!("cache/uploads/{id}.tail-0123"),
            &format!("cache/uploads/{id}.tail-0123456789abcdeg"),
        ] {
            assert_eq!(upload_id_of_tail_key(other), None, "{other}");
        }
    }

    #[test]
    fn only_a_last_part_marked_as_a_tail_is_one() {
        let part = |number, etag: &str| UploadPart {
            number,
            size: 10,
            etag: etag.into(),
        };
        let tail = part(2, &format!("{TAIL_ETAG_PREFIX}cache/uploads/x.tail-1"));
        assert_eq!(tail.tail_key(), Some("cache/uploads/x.tail-1"));
        assert_eq!(tail_of(&[part(1, "\"e1\""), tail.clone()]), Some(&tail));
        assert_eq!(tail_of(&[part(1, "\"e1\"")]), None);
        assert_eq!(tail_of(&[]), None);
        assert!(!makes_a_part(MIN_PART_BYTES - 1));
        assert!(makes_a_part(MIN_PART_BYTES));
    }

    #[test]
    fn held_bytes_are_the_sum_of_the_parts() {
        let part = |number, size| UploadPart {
            number,
            size,
            etag: format!("e{number}"),
        };
        assert_eq!(held_by(&[]), 0);
        assert_eq!(
            held_by(&[part(1, MIN_PART_BYTES), part(2, 10)]),
            MIN_PART_BYTES + 10
        );
    }
}
