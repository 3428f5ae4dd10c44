//! Wire types of the Stowix push API, shared by the client and the server.
//! `docs/protocol.md` documents every route with examples; this module is its source of truth.
//!
//! All routes live under a repository URL `http(s)://HOST/<repo>`:
//!
//! | method | route | body -> answer |
//! |---|---|---|
//! | GET | `api/v1/info` | - -> [`RepoInfo`] |
//! | POST | `api/v1/presence` | [`PresenceRequest`] -> [`PresenceResponse`] |
//! | POST | `api/v1/nars?`[`NarUploadParams`] | compressed NAR -> [`NarStored`] |
//! | POST | `api/v1/nar-batch` | [`NarBatchManifest`] line + files -> [`NarBatchResponse`] |
//! | POST | `api/v1/uploads` | [`CreateUpload`] -> [`UploadState`] |
//! | GET | `api/v1/uploads/<id>` | - -> [`UploadState`] |
//! | PATCH | `api/v1/uploads/<id>` + `Upload-Offset: N` | bytes -> [`UploadState`] |
//! | POST | `api/v1/uploads/<id>/complete` | [`CompleteUpload`] -> [`NarStored`] |
//! | DELETE | `api/v1/uploads/<id>` | - -> 204 |
//! | POST | `api/v1/narinfos` | [`PublishRequest`] -> [`PublishResponse`] |
//!
//! Errors are [`ApiError`] JSON with a non-2xx status.

use serde::{Deserialize, Serialize};

/// Path prefix of the push API below a repository URL.
pub const API_PREFIX: &str = "api/v1";
/// Header carrying the byte offset a PATCH chunk starts at (and, in answers, the offset now held).
pub const UPLOAD_OFFSET_HEADER: &str = "Upload-Offset";

/// How a NAR file is compressed: the narinfo's `Compression` field, the upload's `compression`,
/// and the file suffix Nix expects. The one list of what client and server support.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    Xz,
    Zstd,
    None,
}

impl Compression {
    pub const ALL: [Self; 3] = [Self::Xz, Self::Zstd, Self::None];
    /// For messages that list the choices.
    pub const CHOICES: &'static str = "xz, zstd or none";

    /// The name in narinfos and in the API.
    pub fn name(self) -> &'static str {
        match self {
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::None => "none",
        }
    }

    /// The suffix of the NAR file's name, as Nix writes it.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Xz => ".nar.xz",
            Self::Zstd => ".nar.zst",
            Self::None => ".nar",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The one-line refusal of an unsupported name.
    pub fn unsupported(name: &str) -> String {
        format!(
            "compression {name:?} is not supported: use {}",
            Self::CHOICES
        )
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::from_name(name).ok_or_else(|| Self::unsupported(name))
    }
}

/// Every error answer: a stable machine-readable `code` and a message for humans.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    /// Set with `offset_mismatch`: the offset the server holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Stable error codes.
/// Length of an upload id: 32 lowercase hex digits (128 random bits).
pub const UPLOAD_ID_LEN: usize = 32;

/// Whether `id` has the shape of a Stowix upload id, and so is safe as one URL path segment and
/// one file name: the server checks what clients send, the client what servers answer.
pub fn is_valid_upload_id(id: &str) -> bool {
    id.len() == UPLOAD_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub mod codes {
    pub const MISSING_TOKEN: &str = "missing_token";
    pub const MALFORMED_TOKEN: &str = "malformed_token";
    pub const INVALID_TOKEN: &str = "invalid_token";
    pub const REVOKED_TOKEN: &str = "revoked_token";
    pub const INSUFFICIENT_SCOPE: &str = "insufficient_scope";
    pub const WRONG_REPOSITORY: &str = "wrong_repository";
    pub const TOO_MANY_ATTEMPTS: &str = "too_many_attempts";
    pub const NO_SUCH_REPOSITORY: &str = "no_such_repository";
    pub const NOT_FOUND: &str = "not_found";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const INVALID_HASH_PART: &str = "invalid_hash_part";
    pub const INVALID_NARINFO: &str = "invalid_narinfo";
    pub const UNSUPPORTED_COMPRESSION: &str = "unsupported_compression";
    pub const OFFSET_MISMATCH: &str = "offset_mismatch";
    pub const FILE_HASH_MISMATCH: &str = "file_hash_mismatch";
    pub const FILE_SIZE_MISMATCH: &str = "file_size_mismatch";
    pub const NAR_HASH_MISMATCH: &str = "nar_hash_mismatch";
    pub const NAR_SIZE_MISMATCH: &str = "nar_size_mismatch";
    pub const INVALID_NAR: &str = "invalid_nar";
    pub const NAR_NOT_STORED: &str = "nar_not_stored";
    pub const MISSING_REFERENCES: &str = "missing_references";
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    pub const TOO_MANY_UPLOADS: &str = "too_many_uploads";
    /// A compressed NAR whose decoder needs more memory than the server allows.
    pub const DECOMPRESSION_LIMIT: &str = "decompression_limit";
    /// A token or repository already holds its maximum of unfinished chunked uploads.
    pub const TOO_MANY_UPLOAD_SESSIONS: &str = "too_many_upload_sessions";
    /// The server's disk is full (HTTP 507): nothing more can be stored until space is freed.
    pub const INSUFFICIENT_STORAGE: &str = "insufficient_storage";
    pub const INTERNAL: &str = "internal";
    /// A backend (the database, the bucket) cannot be reached now: retry shortly (HTTP 503).
    pub const UNAVAILABLE: &str = "unavailable";
    /// A pin named a store path the repository has not published.
    pub const NOT_PUBLISHED: &str = "not_published";
}

/// `GET api/v1/info`: lets a client check that the target is a Stowix repository and what its
/// token may do there, before it resolves a closure.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoInfo {
    pub repository: String,
    /// `name:base64`, for `trusted-public-keys`.
    pub public_key: String,
    pub private: bool,
    /// `read` or `push`, or absent when no token was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_scope: Option<String>,
    pub limits: ServerLimits,
    /// Public keys (`name:base64`) of upstream caches: paths they signed need not be pushed.
    #[serde(default)]
    pub upstream_keys: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest body of one `PATCH` chunk.
    pub max_chunk_bytes: u64,
    /// Largest body of one single-request `POST api/v1/nars`.
    pub max_single_upload_bytes: u64,
    /// Most entries in one presence query.
    pub max_presence_batch: usize,
    /// Most narinfos in one publication request.
    pub max_publish_batch: usize,
    /// Most NARs in one `POST api/v1/nar-batch`; 0 (a server without the route) means none.
    #[serde(default)]
    pub max_batch_nars: usize,
    /// Most bytes of NAR files in one `POST api/v1/nar-batch`.
    #[serde(default)]
    pub max_batch_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceRequest {
    pub paths: Vec<PresenceQuery>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceQuery {
    /// The 32-character hash part of the store path.
    pub hash: String,
    /// `sha256:<nix32>`: lets the server say whether it already holds this NAR.
    pub nar_hash: String,
}

/// Hash parts not listed in either field are published.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceResponse {
    /// No narinfo and no NAR: upload, then publish.
    pub missing: Vec<String>,
    /// The NAR is stored but no narinfo is published: publish only, never re-upload.
    pub nar_stored: Vec<String>,
}

/// Query of the single-request upload `POST api/v1/nars`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NarUploadParams {
    pub nar_hash: String,
    pub nar_size: u64,
    /// `xz`, `zstd` or `none`.
    pub compression: String,
    pub file_hash: String,
    pub file_size: u64,
}

/// `POST api/v1/uploads`. When an unfinished upload of the same NAR with the same
/// `compression` and `encoder` exists, the server answers with it and its offset, so a
/// restarted client resumes instead of starting over.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreateUpload {
    pub nar_hash: String,
    pub nar_size: u64,
    pub compression: String,
    /// Describes the encoder settings (e.g. `xz-p6-b16777216`): a resumed upload must
    /// continue a byte-identical stream, so only uploads with equal descriptors are resumed.
    pub encoder: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadState {
    pub upload_id: String,
    /// Bytes the server holds; the next chunk must start here.
    pub offset: u64,
    /// True when the NAR is already stored: nothing to upload.
    #[serde(default)]
    pub already_stored: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CompleteUpload {
    pub file_hash: String,
    pub file_size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NarStored {
    pub nar_hash: String,
    /// Relative URL of the file, as narinfos will name it.
    pub url: String,
    pub file_hash: String,
    pub file_size: u64,
    /// False when the NAR was already stored before this request.
    pub newly_stored: bool,
}

/// `POST api/v1/nar-batch`: many small NARs in one request. The body is this manifest as one
/// line of JSON, a `\n`, then each entry's file bytes back to back in the manifest's order;
/// every entry's `file_size` says where its bytes end. Each NAR is verified on its own, and one
/// that fails fails alone.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NarBatchManifest {
    pub nars: Vec<NarUploadParams>,
}

/// One result per manifest entry, in the manifest's order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NarBatchResponse {
    pub results: Vec<NarBatchResult>,
}

/// Exactly one of the two is set: what `POST api/v1/nars` would have answered for the entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NarBatchResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<NarStored>,
    /// The refusal, with the HTTP status the single-request route would have answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NarBatchError>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NarBatchError {
    pub status: u16,
    #[serde(flatten)]
    pub error: ApiError,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishRequest {
    pub narinfos: Vec<PublishEntry>,
    /// References the client did not push because an upstream cache the repository trusts
    /// serves them: each proven by that upstream's signature, which the server checks against
    /// the repository's upstream keys before it lets a narinfo refer to the path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<UpstreamProof>,
}

/// A path as an upstream cache signed it: the fields of Nix's signature fingerprint
/// (`1;<path>;<narHash>;<narSize>;<references>`) and the signatures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpstreamProof {
    /// Absolute store path.
    pub store_path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    /// Absolute store paths.
    pub references: Vec<String>,
    pub signatures: Vec<String>,
}

/// cache.nixos.org's key: what new repositories trust as upstream unless told otherwise.
pub const NIXOS_CACHE_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFnspcDJjSY=";

/// What the client knows of a path; the server adds URL, Compression, FileHash and FileSize
/// from the NAR it holds with this `nar_hash`, and its own signature.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishEntry {
    /// Absolute store path.
    pub store_path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    /// Absolute store paths.
    pub references: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deriver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Signatures to carry along (e.g. `cache.nixos.org-1:...`), kept verbatim as Nix does:
    /// the server cannot know every key, and clients check only keys they trust.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishResponse {
    /// Hash parts published by this request.
    pub published: Vec<String>,
    /// Hash parts that were already published (left unchanged).
    pub already_published: Vec<String>,
    pub rejected: Vec<PublishRejection>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishRejection {
    pub hash: String,
    /// `missing_references`, `nar_not_stored`, `nar_size_mismatch`, `bad_request`.
    pub code: String,
    pub message: String,
}

/// Pin names go into URLs and command lines: 1 to 100 of `A-Z a-z 0-9 . _ + -`, not starting
/// with `.` or `-`. `Err` says what is wrong.
pub fn check_pin_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 100 {
        return Err(format!(
            "pin name {name:?} must be 1 to 100 characters long"
        ));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!("pin name {name:?} must not start with '.' or '-'"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')))
    {
        return Err(format!(
            "pin name {name:?} contains {bad:?}: use letters, digits and . _ + -"
        ));
    }
    Ok(())
}

/// `POST api/v1/pins/{name}` (push token): pins published store paths under `name` as its next
/// revision. A pinned path keeps its whole closure whatever the repository's retention policy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PinRequest {
    /// Absolute store paths, each published in the repository (else `not_published`).
    pub store_paths: Vec<String>,
    /// Keep only the newest `keep` revisions of this pin (the new one included); absent keeps
    /// the pin's current setting (all revisions for a new pin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
}

/// One revision of a pin, as `POST` answers it and `GET api/v1/pins` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PinRevision {
    pub name: String,
    /// 1 for a pin's first revision, then one more for each `POST`.
    pub revision: u64,
    /// Absolute store paths.
    pub store_paths: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PinResponse {
    /// The revision this request created.
    pub created: PinRevision,
    /// Revisions of the pin that `keep` dropped.
    #[serde(default)]
    pub dropped_revisions: Vec<u64>,
}

/// `GET api/v1/pins` (read token on a private repository): the live revisions of every pin.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PinList {
    pub pins: Vec<PinRevision>,
}
