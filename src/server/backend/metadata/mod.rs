//! Repository metadata: repositories and their keys, tokens, stored NARs, published narinfos,
//! unfinished uploads and the object keys the janitor must account for. [`Metadata`] is the
//! interface the server sees, whichever database holds the data:
//!
//! ```text
//!   routes, auth, publish, janitor ──► Metadata (sync; async callers use spawn_blocking)
//!                                      timed.rs (latency and errors per operation, on /metrics)
//!                                        ├─► sqlite.rs    embedded default: one file in the data dir
//!                                        └─► postgres.rs  shared by any number of replicas
//! ```
//! Errors are [`MetaError`], which says what a caller can do about them (retry, free space,
//! upgrade) without knowing which database produced them.

pub mod postgres;
pub mod sqlite;
pub mod timed;

use std::collections::{HashMap, HashSet};

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

/// One chunk of a chunked upload as the storage backend holds it (an S3 part), or the
/// upload's tail: bytes too few for an S3 part yet, waiting in a small object of their own
/// until the next chunk (or the completion) makes them one (see `staging.rs`). Only the last
/// part may be a tail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadPart {
    /// 1-based, consecutive.
    pub number: u32,
    pub size: u64,
    /// The backend's identifier of the part (the S3 ETag), needed to assemble the object; for
    /// a tail, [`TAIL_ETAG_PREFIX`] and the tail object's key. Kept in the one column so the
    /// offset stays the sum of the sizes, under the same compare-and-set.
    pub etag: String,
}

/// Marks a tail in [`UploadPart::etag`]. S3 ETags are quoted hex, so none starts like this.
pub const TAIL_ETAG_PREFIX: &str = "tail:";

impl UploadPart {
    /// The tail object's key, when this part is a tail.
    pub fn tail_key(&self) -> Option<&str> {
        self.etag.strip_prefix(TAIL_ETAG_PREFIX)
    }
}

/// Held by the one process (across all replicas) allowed to run a singleton task such as the
/// janitor; dropping it lets another take over.
pub struct SingletonGuard {
    held: Box<dyn SingletonHold>,
}

/// What keeps a singleton, and whether it still does.
pub trait SingletonHold: Send {
    /// False once the singleton may be another process's: a lock that lives on a database
    /// connection is gone with the connection, silently, until someone asks. Blocking.
    fn still_held(&self) -> bool;
}

/// A hold that cannot be lost while it exists (a `flock` on a file this process has open).
struct Unlosable<T>(#[allow(dead_code)] T);

impl<T: Send> SingletonHold for Unlosable<T> {
    fn still_held(&self) -> bool {
        true
    }
}

impl SingletonGuard {
    pub fn new(held: impl Send + 'static) -> Self {
        SingletonGuard {
            held: Box::new(Unlosable(held)),
        }
    }

    /// A guard whose hold can be lost, and says so.
    pub fn watched(held: impl SingletonHold + 'static) -> Self {
        SingletonGuard {
            held: Box::new(held),
        }
    }

    /// Whether this process still holds the singleton (a round trip to the database where the
    /// hold lives there). Blocking.
    pub fn still_held(&self) -> bool {
        self.held.still_held()
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

/// What a narinfo text says that retention needs: the NAR it names and the hash parts of the
/// paths it references (itself excluded). Read from the signed text, so what the collector
/// walks is exactly what substituters see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NarInfoFacts {
    /// `nar/<file>` relative to the repository; empty when the text names none.
    pub nar_url: String,
    pub references: Vec<String>,
}

impl NarInfoFacts {
    pub fn of(hash: &str, text: &str) -> NarInfoFacts {
        let mut facts = NarInfoFacts::default();
        for line in text.lines() {
            if let Some(url) = line.strip_prefix("URL: ") {
                facts.nar_url = url.trim().to_string();
            } else if let Some(references) = line.strip_prefix("References: ") {
                facts.references = references
                    .split_ascii_whitespace()
                    .filter_map(|basename| basename.get(..32))
                    .filter(|reference| *reference != hash)
                    .map(str::to_string)
                    .collect();
                facts.references.sort();
                facts.references.dedup();
            }
        }
        facts
    }
}

/// What [`Metadata::publish_checked`] did with one narinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublishState {
    New,
    /// Published before (by this request or another): left as it was.
    Already,
    /// Not published: these references (hash parts) are not published in the repository,
    /// checked inside the publishing transaction, so a collector cannot remove them between
    /// the check and the write.
    MissingReferences(Vec<String>),
    /// Not published: the NAR it names is no longer stored (collected after its grace).
    NarGone(String),
}

/// A repository's retention policy; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Paths not used for this long are collected (unless pinned or referenced by a kept path).
    pub retention_secs: Option<u64>,
    /// Least recently used paths are collected until the kept closure's NARs fit.
    pub max_size_bytes: Option<u64>,
}

/// What a repository holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepoUsage {
    /// Published narinfos.
    pub paths: u64,
    /// Stored NARs, published or not, marked unreferenced or not.
    pub nars: u64,
    /// Their compressed size (what storage holds).
    pub bytes: u64,
}

/// The paths kept by one mark: the roots and their closure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveSet {
    pub paths: u64,
    /// Compressed size of the NARs those paths name.
    pub bytes: u64,
}

/// What the last mark leaves to collect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeadSet {
    pub paths: u64,
    /// NARs that no kept narinfo names: marked unreferenced when their paths go.
    pub nars: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedPath {
    pub hash: String,
    pub store_path: String,
}

/// One collection of one repository, on one database session (its working tables live there).
/// The engine in `server::gc` drives it: `mark` as often as its search needs, then `dead`,
/// then `sweep` until it returns nothing.
pub trait GcSession {
    /// The oldest last use among the repository's published paths.
    fn oldest_use(&mut self) -> MetaResult<Option<i64>>;
    /// Rebuilds the live set: every pinned root and every path last used at or after
    /// `cutoff`, closed under references (in the database: nothing is loaded here).
    fn mark(&mut self, cutoff: i64) -> MetaResult<LiveSet>;
    /// Records the published paths the last mark left out: the candidates `sweep` removes.
    fn dead(&mut self) -> MetaResult<DeadSet>;
    /// The store paths of the first `limit` candidates [`GcSession::dead`] recorded, sorted:
    /// what a dry run lists.
    fn dead_paths(&mut self, limit: usize) -> MetaResult<Vec<String>>;
    /// Removes at most `limit` candidates that no published path references any more (so a
    /// path goes only after, or together with, everything that references it; a path published
    /// meanwhile that references a candidate keeps it, and its closure). Their NARs, once no
    /// narinfo names them, are marked unreferenced at `now`. Empty when nothing more can go.
    fn sweep(&mut self, limit: usize, now: i64) -> MetaResult<Swept>;
}

/// One [`GcSession::sweep`] batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub paths: Vec<RemovedPath>,
    /// NARs this batch left without a narinfo, now marked unreferenced.
    pub nars_orphaned: u64,
}

/// What [`Metadata::delete_paths`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathDeletion {
    /// Nothing deleted: these published store paths reference the targets.
    Refused { dependents: Vec<String> },
    /// Deleted (the targets first, then dependents), with the NAR records no narinfo names
    /// any more, already removed from the database: their objects are the caller's to delete.
    Deleted {
        paths: Vec<RemovedPath>,
        nars: Vec<NarRecord>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinRecord {
    pub repo: String,
    pub name: String,
    pub revision: u64,
    pub created_at: i64,
    pub keep: Option<u32>,
    /// Absolute store paths, sorted.
    pub store_paths: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinCreated {
    Created {
        pin: PinRecord,
        /// Older revisions `keep` dropped.
        dropped: Vec<u64>,
    },
    /// Nothing pinned: these hash parts are not published.
    NotPublished(Vec<String>),
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
    /// Returns, per entry, whether it was newly published. Entries whose references or NAR are
    /// missing are not published ([`Metadata::publish_checked`] says why).
    fn publish(&self, repo: &str, narinfos: &[PublishedNarInfo]) -> MetaResult<Vec<bool>> {
        Ok(self
            .publish_checked(repo, narinfos, &HashSet::new(), now_unix())?
            .into_iter()
            .map(|state| state == PublishState::New)
            .collect())
    }

    fn nar_by_hash(&self, repo: &str, nar_hash: &str) -> MetaResult<Option<NarRecord>>;
    fn nar_by_url(&self, repo: &str, url: &str) -> MetaResult<Option<NarRecord>>;
    /// False when a NAR with that URL was already recorded.
    fn insert_nar(&self, repo: &str, nar: &NarRecord) -> MetaResult<bool> {
        Ok(self.insert_nars(repo, std::slice::from_ref(nar))?[0])
    }
    /// [`Metadata::insert_nar`] for many, in one transaction: for each, in order, whether it is
    /// new (of two with one URL, only the first).
    fn insert_nars(&self, repo: &str, nars: &[NarRecord]) -> MetaResult<Vec<bool>>;

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
    /// Replaces the session's last part, `last`, by `part` (the same number) only if the
    /// parts recorded so far total exactly `offset` bytes and the last one is still `last`
    /// (number and etag), and touches the session: the compare-and-set of
    /// [`Metadata::add_upload_part`] for a tail that grows or becomes a whole part.
    fn replace_last_upload_part(
        &self,
        id: &str,
        offset: u64,
        last: &UploadPart,
        part: &UploadPart,
        at: i64,
    ) -> MetaResult<bool>;

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
    fn record_object_intent(&self, key: &str, at: i64) -> MetaResult<()> {
        self.record_object_intents(&[key.to_string()], at)
    }
    fn clear_object_intent(&self, key: &str) -> MetaResult<()> {
        self.clear_object_intents(&[key.to_string()])
    }
    /// The intents of a batch of objects, in one transaction.
    fn record_object_intents(&self, keys: &[String], at: i64) -> MetaResult<()>;
    fn clear_object_intents(&self, keys: &[String]) -> MetaResult<()>;
    /// Keys whose intent is older than `at`, at most `limit`.
    fn object_intents_before(&self, at: i64, limit: usize) -> MetaResult<Vec<String>>;
    /// For each key, in order, whether a stored NAR lives there.
    fn known_object_keys(&self, keys: &[String]) -> MetaResult<Vec<bool>>;

    /// Publishes in one transaction that also checks, under locks a collector must wait for,
    /// that every reference (outside the batch) is published and every named NAR stored; a
    /// NAR marked unreferenced is revived. `at` is the publication time and first use.
    /// `exempt`: references (hash parts) a trusted upstream cache serves, proven by the
    /// publication: they need not be published here.
    fn publish_checked(
        &self,
        repo: &str,
        narinfos: &[PublishedNarInfo],
        exempt: &HashSet<String>,
        at: i64,
    ) -> MetaResult<Vec<PublishState>>;

    fn policy(&self, repo: &str) -> MetaResult<Option<RetentionPolicy>>;
    /// False when there is no such repository.
    fn set_policy(&self, repo: &str, policy: &RetentionPolicy) -> MetaResult<bool>;
    fn usage(&self, repo: &str) -> MetaResult<RepoUsage>;
    /// Raises the last use of these published paths (hash parts) to the given times.
    fn touch_paths(&self, repo: &str, uses: &[(String, i64)]) -> MetaResult<()>;
    /// Raises the last use of the paths whose narinfos name these NAR URLs.
    fn touch_nars(&self, repo: &str, uses: &[(String, i64)]) -> MetaResult<()>;
    fn gc_session(&self, repo: &str) -> MetaResult<Box<dyn GcSession + '_>>;
    /// Marks unreferenced, at `now`, the NARs stored before `created_before` that no narinfo
    /// names and that are not marked yet (uploads never published). Returns how many; with
    /// `dry_run`, counts without marking.
    fn mark_unpublished_nars(
        &self,
        repo: &str,
        created_before: i64,
        now: i64,
        dry_run: bool,
    ) -> MetaResult<u64>;
    /// NARs marked unreferenced before `orphaned_before` that no narinfo names: count and bytes.
    fn collectible_nars(&self, repo: &str, orphaned_before: i64) -> MetaResult<(u64, u64)>;
    /// Deletes at most `limit` of those NAR records (rechecked under lock: a publication that
    /// revived one keeps it) and returns them; their objects are the caller's to delete.
    fn take_collectible_nars(
        &self,
        repo: &str,
        orphaned_before: i64,
        limit: usize,
    ) -> MetaResult<Vec<NarRecord>>;
    /// Deletes published paths (hash parts) now, with their NAR records when no other narinfo
    /// names them. Refuses while other published paths reference them, unless
    /// `with_dependents`, which deletes those (transitively) too.
    fn delete_paths(
        &self,
        repo: &str,
        hashes: &[String],
        with_dependents: bool,
    ) -> MetaResult<PathDeletion>;
    /// Pins published paths (hash parts) as the next revision of `name`; `keep` (when given)
    /// becomes the pin's setting and drops older revisions beyond it.
    fn create_pin(
        &self,
        repo: &str,
        name: &str,
        hashes: &[String],
        keep: Option<u32>,
        at: i64,
    ) -> MetaResult<PinCreated>;
    /// Live pin revisions of `repo` (every repository when `None`), by repository, name, revision.
    fn pins(&self, repo: Option<&str>) -> MetaResult<Vec<PinRecord>>;
    /// Deletes a pin's revision, or all of them; returns how many revisions went.
    fn delete_pin(&self, repo: &str, name: &str, revision: Option<u64>) -> MetaResult<u64>;

    /// A cheap round trip: readiness for `/healthz`.
    fn ping(&self) -> MetaResult<()>;
    fn schema_version(&self) -> MetaResult<i64>;
    /// The singleton named `name`, if no other process holds it now.
    fn try_singleton(&self, name: &str) -> MetaResult<Option<SingletonGuard>>;
}

/// The closure check, to its fixed point: a candidate `(key, references)` is accepted when
/// every reference is the key itself, one in `present`, or an accepted candidate. Returns, per
/// candidate, the references found missing (empty when accepted). Refusals propagate: a
/// candidate whose reference is refused is refused too. The push API checks whole store paths
/// (a hash part alone is not enough: `<hash>-other` is a different path, and Nix refuses a
/// closure that names it); the backends recheck hash parts under their locks.
pub fn closure_check<'a, K: Eq + std::hash::Hash>(
    candidates: &[(&'a K, &'a [K])],
    present: &HashSet<&K>,
) -> Vec<Vec<&'a K>> {
    let mut accepted: HashMap<&K, usize> = HashMap::new();
    for (key, _) in candidates {
        *accepted.entry(*key).or_default() += 1;
    }
    // Who references whom among the candidates, so a refusal only revisits its dependents.
    let mut dependents: HashMap<&K, Vec<usize>> = HashMap::new();
    for (i, (key, references)) in candidates.iter().enumerate() {
        for reference in references.iter() {
            if reference != *key {
                dependents.entry(reference).or_default().push(i);
            }
        }
    }
    let mut missing: Vec<Vec<&'a K>> = vec![Vec::new(); candidates.len()];
    let unresolved = |i: usize, accepted: &HashMap<&K, usize>| {
        let (key, references) = candidates[i];
        references
            .iter()
            .filter(|r| *r != key && !present.contains(r) && !accepted.contains_key(r))
            .collect::<Vec<_>>()
    };
    let mut queue: Vec<usize> = (0..candidates.len()).collect();
    while let Some(i) = queue.pop() {
        if !missing[i].is_empty() {
            continue;
        }
        let found = unresolved(i, &accepted);
        if found.is_empty() {
            continue;
        }
        missing[i] = found;
        let key = candidates[i].0;
        if let Some(count) = accepted.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                accepted.remove(key);
                queue.extend(dependents.get(key).into_iter().flatten().copied());
            }
        }
    }
    missing
}

/// A publication's verdicts, decided under the backend's locks from what it found there:
/// `published` holds the hash parts already published among the entries and their references,
/// `stored` the NAR URLs stored, `exempt` the references an upstream cache proves. An entry
/// left `None` may be inserted.
pub(crate) fn publication_verdicts(
    narinfos: &[PublishedNarInfo],
    facts: &[NarInfoFacts],
    published: &HashSet<String>,
    stored: &HashSet<String>,
    exempt: &HashSet<String>,
) -> Vec<Option<PublishState>> {
    let mut states: Vec<Option<PublishState>> = narinfos
        .iter()
        .zip(facts)
        .map(|(info, facts)| {
            if published.contains(&info.hash) {
                Some(PublishState::Already)
            } else if !facts.nar_url.is_empty() && !stored.contains(&facts.nar_url) {
                Some(PublishState::NarGone(facts.nar_url.clone()))
            } else {
                None
            }
        })
        .collect();
    let open: Vec<usize> = (0..narinfos.len())
        .filter(|&i| states[i].is_none())
        .collect();
    let entries: Vec<(&String, &[String])> = open
        .iter()
        .map(|&i| (&narinfos[i].hash, facts[i].references.as_slice()))
        .collect();
    let present: HashSet<&String> = published.iter().chain(exempt).collect();
    for (&i, missing) in open.iter().zip(closure_check(&entries, &present)) {
        if !missing.is_empty() {
            states[i] = Some(PublishState::MissingReferences(
                missing.into_iter().cloned().collect(),
            ));
        }
    }
    states
}

/// Counts and sizes are stored as SQL BIGINT: a `u64` past its range saturates.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
