//! Repository metadata: repositories and their keys, tokens, stored NARs, published narinfos,
//! unfinished uploads and the object keys the janitor must account for. [`Metadata`] is the
//! interface the server sees, whichever database holds the data:
//!
//! ```text
//!   routes, auth, publish, janitor ──► Metadata (sync; async callers use spawn_blocking)
//!                                        ├─► sqlite.rs    embedded default: one file in the data dir
//!                                        └─► postgres.rs  shared by any number of replicas
//! ```
//! Errors are [`MetaError`], which says what a caller can do about them (retry, free space,
//! upgrade) without knowing which database produced them.

pub mod postgres;
pub mod sqlite;

pub use postgres::PostgresMetadata;
pub use sqlite::SqliteMetadata;

/// What went wrong in the metadata database, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The database cannot be reached or dropped the connection (restarting, network): the
    /// request may succeed if retried shortly, so clients get 503 with Retry-After.
    #[error("the metadata database is unavailable: {0}")]
    Unavailable(String),
    /// No space left for the database: no retry helps until an administrator frees space.
    #[error("the metadata database is full: {0}")]
    Full(String),
    /// The database was migrated by a newer Stowix; this binary would misread it.
    #[error(
        "the metadata database has schema version {found}, newer than the {supported} this \
         stowix understands: upgrade stowix on this machine"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("metadata database: {0}")]
    Other(String),
}

pub type MetaResult<T> = Result<T, MetaError>;

#[derive(Clone, Debug)]
pub struct RepoRecord {
    pub name: String,
    pub private: bool,
    /// Nix secret key text `name:base64`.
    pub secret_key: String,
    pub priority: u32,
    /// Public keys (`name:base64`) of upstream caches whose signatures prove a reference the
    /// repository does not hold itself (clients skip pushing such paths).
    pub upstream_keys: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Read,
    Push,
}

impl Scope {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Push => "push",
        }
    }
    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "push" => Some(Scope::Push),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TokenRecord {
    pub id: String,
    /// sha256 of the secret part; the secret itself is never stored.
    pub secret_sha256: [u8; 32],
    pub scope: Scope,
    pub repos: Vec<String>,
    pub description: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarRecord {
    /// Relative to the repository URL: `nar/<nix32 file hash>.nar.xz`.
    pub url: String,
    /// Where the bytes are in [`crate::server::storage::Storage`]. Not derived from `url`: a
    /// chunked upload on S3 is assembled under its upload's key and stays there, so completing
    /// it costs no server-side copy.
    pub object_key: String,
    pub compression: String,
    /// `sha256:<nix32>`.
    pub nar_hash: String,
    pub nar_size: u64,
    pub file_hash: String,
    pub file_size: u64,
}

#[derive(Clone, Debug)]
pub struct UploadRecord {
    pub id: String,
    pub repo: String,
    pub nar_hash: String,
    pub nar_size: u64,
    pub compression: String,
    pub encoder: String,
    pub created_at: i64,
    /// The storage backend's handle for the staged bytes (the S3 multipart upload id); `None`
    /// where staging needs none (local files).
    pub staging_id: Option<String>,
    /// When the last chunk arrived: expiry counts from here, so a slow upload of a huge NAR
    /// survives, on whichever replica its chunks land.
    pub updated_at: i64,
}

/// One chunk of a chunked upload as the storage backend holds it (an S3 part).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadPart {
    /// 1-based, consecutive.
    pub number: u32,
    pub size: u64,
    /// The backend's identifier of the part (the S3 ETag), needed to assemble the object.
    pub etag: String,
}

/// Held by the one process (across all replicas) allowed to run a singleton task such as the
/// janitor; dropping it lets another take over.
pub struct SingletonGuard {
    _held: Box<dyn Send>,
}

impl SingletonGuard {
    pub fn new(held: impl Send + 'static) -> Self {
        SingletonGuard {
            _held: Box::new(held),
        }
    }
}

/// How many unfinished chunked uploads one token, and one repository, may hold.
#[derive(Clone, Copy, Debug)]
pub struct SessionCaps {
    pub per_token: u64,
    pub per_repo: u64,
}

/// What [`Metadata::open_upload`] did.
#[derive(Clone, Debug)]
pub enum OpenedUpload {
    Created(UploadRecord),
    /// A session for the same NAR, compression and encoder existed: resume it.
    Existing(UploadRecord),
    TokenFull,
    RepoFull,
}

#[derive(Clone, Debug)]
pub struct PublishedNarInfo {
    pub hash: String,
    pub store_path: String,
    pub nar_hash: String,
    /// The signed narinfo text, served as is.
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    Published,
    NarStored,
    Missing,
}

pub trait Metadata: Send + Sync {
    /// False when a repository of that name exists already.
    fn create_repo(&self, repo: &RepoRecord) -> MetaResult<bool>;
    fn repo(&self, name: &str) -> MetaResult<Option<RepoRecord>>;
    fn repos(&self) -> MetaResult<Vec<RepoRecord>>;
    /// False when there is no such repository.
    fn set_upstream_keys(&self, name: &str, keys: &[String]) -> MetaResult<bool>;

    /// Stores the token as given, its revocation included (a migrated revoked token never
    /// exists unrevoked).
    fn create_token(&self, token: &TokenRecord) -> MetaResult<()>;
    fn token(&self, id: &str) -> MetaResult<Option<TokenRecord>>;
    fn tokens(&self) -> MetaResult<Vec<TokenRecord>>;
    /// False when there is no such token.
    fn revoke_token(&self, id: &str, at: i64) -> MetaResult<bool>;

    fn narinfo(&self, repo: &str, hash: &str) -> MetaResult<Option<String>>;
    /// For each `(hash part, nar hash)`, in order.
    fn presence(&self, repo: &str, queries: &[(String, String)]) -> MetaResult<Vec<Presence>>;
    /// Publishes all of `narinfos` in one transaction; already published ones are left alone.
    /// Returns, per entry, whether it was newly published.
    fn publish(&self, repo: &str, narinfos: &[PublishedNarInfo]) -> MetaResult<Vec<bool>>;

    fn nar_by_hash(&self, repo: &str, nar_hash: &str) -> MetaResult<Option<NarRecord>>;
    fn nar_by_url(&self, repo: &str, url: &str) -> MetaResult<Option<NarRecord>>;
    /// False when a NAR with that URL was already recorded.
    fn insert_nar(&self, repo: &str, nar: &NarRecord) -> MetaResult<bool>;

    fn upload(&self, id: &str) -> MetaResult<Option<UploadRecord>>;
    /// Deletes the session and its parts.
    fn delete_upload(&self, id: &str) -> MetaResult<()>;
    /// Sessions whose last chunk (or creation) is older than `at`.
    fn uploads_inactive_since(&self, at: i64) -> MetaResult<Vec<UploadRecord>>;
    fn touch_upload(&self, id: &str, at: i64) -> MetaResult<()>;
    fn set_upload_staging_id(&self, id: &str, staging_id: &str) -> MetaResult<()>;
    /// Records `part` only if the parts recorded so far total exactly `offset` bytes, and
    /// touches the session. False when they do not: another request (on any replica) moved
    /// the offset first. This compare-and-set is what serialises chunk appends across replicas.
    fn add_upload_part(
        &self,
        id: &str,
        offset: u64,
        part: &UploadPart,
        at: i64,
    ) -> MetaResult<bool>;
    /// The session's parts, by number.
    fn upload_parts(&self, id: &str) -> MetaResult<Vec<UploadPart>>;

    /// Creates the upload session for `upload`'s (repository, NarHash, compression, encoder),
    /// or returns the one that exists: one atomic step under a uniqueness rule, so concurrent
    /// calls for one NAR get one session. A new session counts against `token_id`'s and the
    /// repository's caps.
    fn open_upload(
        &self,
        upload: &UploadRecord,
        token_id: &str,
        caps: SessionCaps,
    ) -> MetaResult<OpenedUpload>;
    /// Store paths (absolute) of the published narinfos among `hashes`, in order.
    fn published_store_paths(
        &self,
        repo: &str,
        hashes: &[String],
    ) -> MetaResult<Vec<Option<String>>>;

    /// Notes that an object is about to be written under `key`, before a byte of it is: every
    /// object the bucket can hold is then known here, so a crash between the write and its
    /// `nars` row leaves garbage the janitor finds without listing the bucket.
    fn record_object_intent(&self, key: &str, at: i64) -> MetaResult<()>;
    fn clear_object_intent(&self, key: &str) -> MetaResult<()>;
    /// Keys whose intent is older than `at`, at most `limit`.
    fn object_intents_before(&self, at: i64, limit: usize) -> MetaResult<Vec<String>>;
    /// For each key, in order, whether a stored NAR lives there.
    fn known_object_keys(&self, keys: &[String]) -> MetaResult<Vec<bool>>;

    /// A cheap round trip: readiness for `/healthz`.
    fn ping(&self) -> MetaResult<()>;
    fn schema_version(&self) -> MetaResult<i64>;
    /// The singleton named `name`, if no other process holds it now.
    fn try_singleton(&self, name: &str) -> MetaResult<Option<SingletonGuard>>;
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
