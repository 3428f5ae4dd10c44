//! Resumable upload sessions: the part of the protocol that survives broken connections and
//! client restarts.
//!
//! ```text
//!   open(nar_hash, encoder) ──► server: new upload, or the unfinished one with its offset
//!   send_chunk(start, bytes) ──► PATCH from the server's offset ──► new offset
//!        │ failure: back off, GET the state, resend only the suffix the server lacks
//!        │ 409 offset_mismatch: jump to the offset the server names
//!   complete(file_hash, file_size) ──► server verifies and stores the NAR
//! ```
//!
//! The caller keeps the current chunk in memory until `send_chunk` returns, so any suffix of it
//! can be sent again; bytes before the chunk are never needed again because the server
//! acknowledged them.
//!
//! The upload id is the one value from the server that goes into URLs: it is checked against
//! the server's id format before any use, so a hostile id (`../../x`, `a?b`) cannot send the
//! next request elsewhere.

use bytes::Bytes;

use super::{ClientError, Endpoint, PushClient};
use crate::api::{self, codes};

/// Consecutive answers that move the offset nowhere (or only via 409) before we give up: a
/// server that keeps disagreeing is broken, and looping forever would hide that.
const MAX_RESYNCS_WITHOUT_PROGRESS: u32 = 5;
/// A Stowix upload id is 128 random bits in lowercase hex (`server::routes_api`).
pub use crate::api::{is_valid_upload_id, UPLOAD_ID_LEN};

pub enum OpenedUpload<'c> {
    Session(UploadSession<'c>),
    /// The server already holds this NAR: nothing to send.
    AlreadyStored,
}

pub struct UploadSession<'c> {
    client: &'c PushClient,
    id: String,
    /// Bytes the server has acknowledged.
    offset: u64,
    /// Retries spent on this upload (failed attempts that were tried again).
    pub retries: u32,
}

impl PushClient {
    /// Creates an upload, or resumes the server's unfinished upload of the same NAR made with
    /// the same encoder (its offset then says how much to skip).
    pub async fn open_upload(
        &self,
        request: &api::CreateUpload,
    ) -> Result<OpenedUpload<'_>, ClientError> {
        let state = self.create_upload(request).await?;
        if state.already_stored {
            return Ok(OpenedUpload::AlreadyStored);
        }
        if !is_valid_upload_id(&state.upload_id) {
            return Err(ClientError::Protocol(format!(
                "the server named the upload \"{}\", which is not a Stowix upload id \
                 ({UPLOAD_ID_LEN} lowercase hex digits); refusing to put it into a URL",
                super::error::escape_server_text(&truncated(&state.upload_id))
            )));
        }
        Ok(OpenedUpload::Session(UploadSession {
            client: self,
            id: state.upload_id,
            offset: state.offset,
            retries: 0,
        }))
    }
}

/// An id for an error message: a hostile one may be up to a whole answer long.
fn truncated(id: &str) -> String {
    const SHOWN: usize = 80;
    match id.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", &id[..end]),
        None => id.to_owned(),
    }
}

impl UploadSession<'_> {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes of the compressed stream the server holds; everything before it is skipped.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Makes the server hold `chunk`, which starts at stream offset `start` (`start <=
    /// offset()`): sends the part the server lacks, resynchronising after any failure.
    pub async fn send_chunk(&mut self, start: u64, chunk: &Bytes) -> Result<(), ClientError> {
        let end = start + chunk.len() as u64;
        let mut retry = self.client.retry.start();
        let mut resyncs = 0;
        while self.offset < end {
            if self.offset < start {
                return Err(ClientError::Protocol(format!(
                    "upload {}: the server holds {} bytes but had acknowledged {start}; it lost data",
                    self.id, self.offset
                )));
            }
            let body = chunk.slice((self.offset - start) as usize..);
            let sent_from = self.offset;
            match self.client.patch_upload(&self.id, self.offset, body).await {
                Ok(state) => {
                    self.accept_offset(state.offset);
                    if self.offset <= sent_from {
                        resyncs += 1;
                    } else {
                        resyncs = 0;
                    }
                }
                Err(ClientError::Api { api, .. })
                    if api.code == codes::OFFSET_MISMATCH && api.offset.is_some() =>
                {
                    resyncs += 1;
                    self.accept_offset(api.offset.unwrap_or_default());
                }
                Err(err) => {
                    let Some((reason, delay)) = retry.next_delay(&err) else {
                        return Err(err);
                    };
                    self.retries += 1;
                    self.client
                        .observer
                        .retrying(Endpoint::UploadPatch, reason, delay, &err);
                    tokio::time::sleep(delay).await;
                    // A cut connection may have delivered part of the body: ask what arrived.
                    let state = self.client.upload_state(&self.id).await?;
                    self.accept_offset(state.offset);
                }
            }
            if resyncs > MAX_RESYNCS_WITHOUT_PROGRESS {
                return Err(ClientError::Protocol(format!(
                    "upload {}: the server keeps rejecting offset {} without progress",
                    self.id, self.offset
                )));
            }
        }
        Ok(())
    }

    /// Takes the server's offset as the truth. It may be past what this client sent: concurrent
    /// pushes of the same NAR share one upload (same NAR hash and encoder, so byte-identical
    /// streams), and another client may be ahead. Completion checks FileHash over the whole
    /// file, so a server holding different bytes is caught there, never published.
    fn accept_offset(&mut self, offset: u64) {
        self.offset = offset;
    }

    /// Asks the server to verify and store the NAR. `file_hash`/`file_size` cover the whole
    /// compressed stream, including bytes a previous run sent.
    pub async fn complete(
        mut self,
        file_hash: String,
        file_size: u64,
    ) -> Result<(api::NarStored, u32), ClientError> {
        let request = api::CompleteUpload {
            file_hash,
            file_size,
        };
        let stored = self
            .client
            .complete_upload(&self.id, &request, &mut self.retries)
            .await?;
        Ok((stored, self.retries))
    }

    /// Discards the upload on the server (e.g. the local store path turned out corrupt).
    /// Best effort: an upload left behind expires on the server.
    pub async fn abort(self) {
        if let Err(err) = self.client.abort_upload(&self.id).await {
            tracing::debug!("aborting upload {}: {err}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_server_shaped_upload_ids_are_accepted() {
        assert!(is_valid_upload_id("0123456789abcdef0123456789abcdef"));
        for hostile in [
            "",
            "../../x",
            "a?b",
            "0123456789abcdef0123456789abcde/",
            "0123456789abcdef0123456789abcde?",
            "0123456789abcdef0123456789abcde#",
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef0123456789abcdef0",
            "0123456789abcdef0123456789abcde",
            "..%2F..%2F0123456789abcdef0123456",
            "0123456789abcdef0123456789abcd\u{e9}",
        ] {
            assert!(!is_valid_upload_id(hostile), "{hostile:?}");
        }
        assert_eq!(truncated(&"a".repeat(100)).chars().count(), 81);
        assert_eq!(truncated("short"), "short");
    }
}
