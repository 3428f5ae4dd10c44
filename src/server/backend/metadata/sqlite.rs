//! The embedded metadata database: one SQLite file in the data dir, in WAL mode so `stowix
//! admin` can write while the server runs, with one writing connection and a pool of reading
//! ones. One machine only: replicas share PostgreSQL instead (`postgres.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use rusqlite::{params, Connection, OptionalExtension};

use std::collections::HashSet;

use super::{
    now_unix, publication_verdicts, to_i64, DeadSet, GcSession, LiveSet, MetaError, MetaResult,
    Metadata, NarInfoFacts, NarRecord, OpenedUpload, PathDeletion, PinCreated, PinRecord, Presence,
    PublishState, PublishedNarInfo, RemovedPath, RepoRecord, RepoUsage, RetentionPolicy, Scope,
    SessionCaps, SingletonGuard, Swept, TokenRecord, UploadPart, UploadRecord,
};

impl From<rusqlite::Error> for MetaError {
    fn from(err: rusqlite::Error) -> Self {
        match err.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => MetaError::Full(err.to_string()),
            // Still locked after the busy timeout: another process holds the file for long.
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                MetaError::Unavailable(err.to_string())
            }
            _ => MetaError::Other(err.to_string()),
        }
    }
}

/// Version 1 is the schema of every release before versioning (its statements are idempotent,
/// so an unversioned database of any age passes through it); each later entry is one step.
/// `PRAGMA user_version` records how far a database has come.
const MIGRATIONS: &[&str] = &[V1_SCHEMA, V2_SCALE_OUT, V3_UPSTREAM_KEYS, V4_RETENTION];

/// The newest schema this binary knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const V1_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS repos (
    name TEXT PRIMARY KEY,
    private INTEGER NOT NULL,
    secret_key TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 BLOB NOT NULL,
    scope TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS token_repos (
    token_id TEXT NOT NULL REFERENCES tokens(id),
    repo TEXT NOT NULL,
    PRIMARY KEY (token_id, repo)
);
CREATE TABLE IF NOT EXISTS nars (
    repo TEXT NOT NULL,
    url TEXT NOT NULL,
    compression TEXT NOT NULL,
    nar_hash TEXT NOT NULL,
    nar_size INTEGER NOT NULL,
    file_hash TEXT NOT NULL,
    file_size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (repo, url)
);
CREATE INDEX IF NOT EXISTS nars_by_nar_hash ON nars (repo, nar_hash);
CREATE TABLE IF NOT EXISTS narinfos (
    repo TEXT NOT NULL,
    hash TEXT NOT NULL,
    store_path TEXT NOT NULL,
    nar_hash TEXT NOT NULL,
    text TEXT NOT NULL,
    published_at INTEGER NOT NULL,
    PRIMARY KEY (repo, hash)
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    nar_hash TEXT NOT NULL,
    nar_size INTEGER NOT NULL,
    compression TEXT NOT NULL,
    encoder TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_by_key ON uploads (repo, nar_hash, compression, encoder);
";

/// Object keys apart from URLs (S3 assembles a chunked upload under its own key), staging
/// state that any replica can read, and the intents the janitor settles.
const V2_SCALE_OUT: &str = "
ALTER TABLE nars ADD COLUMN object_key TEXT NOT NULL DEFAULT '';
UPDATE nars SET object_key = repo || '/' || url;
CREATE INDEX nars_by_object_key ON nars (object_key);
ALTER TABLE uploads ADD COLUMN staging_id TEXT;
ALTER TABLE uploads ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
UPDATE uploads SET updated_at = created_at;
CREATE TABLE upload_parts (
    upload_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT NOT NULL,
    PRIMARY KEY (upload_id, number)
);
CREATE TABLE object_intents (
    key TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL
);
CREATE INDEX object_intents_by_age ON object_intents (created_at);
";

/// Upstream caches a repository trusts (one `name:base64` key per line). Repositories from
/// before keep none: filtering would change what their pushes upload.
const V3_UPSTREAM_KEYS: &str = "
ALTER TABLE repos ADD COLUMN upstream_keys TEXT NOT NULL DEFAULT '';
";

/// Retention (`gc.rs`): when each path was last used, who references whom (so the collector
/// walks closures in the database), the NAR each narinfo names, repository policies, pins, and
/// NARs marked unreferenced (deleted once `orphan_grace_secs` has passed). The references and
/// NAR URLs of existing narinfos are filled from their texts by [`backfill_retention`].
const V4_RETENTION: &str = "
ALTER TABLE narinfos ADD COLUMN last_used_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE narinfos ADD COLUMN nar_url TEXT NOT NULL DEFAULT '';
UPDATE narinfos SET last_used_at = published_at;
CREATE INDEX narinfos_by_last_use ON narinfos (repo, last_used_at);
CREATE INDEX narinfos_by_nar_url ON narinfos (repo, nar_url);
CREATE TABLE narinfo_refs (
    repo TEXT NOT NULL,
    hash TEXT NOT NULL,
    ref_hash TEXT NOT NULL,
    PRIMARY KEY (repo, hash, ref_hash)
);
CREATE INDEX narinfo_refs_by_ref ON narinfo_refs (repo, ref_hash);
ALTER TABLE repos ADD COLUMN retention_secs INTEGER;
ALTER TABLE repos ADD COLUMN max_size_bytes INTEGER;
ALTER TABLE nars ADD COLUMN orphaned_at INTEGER;
CREATE INDEX nars_by_orphaned ON nars (repo, orphaned_at);
CREATE TABLE pins (
    repo TEXT NOT NULL,
    name TEXT NOT NULL,
    keep INTEGER,
    next_revision INTEGER NOT NULL,
    PRIMARY KEY (repo, name)
);
CREATE TABLE pin_revisions (
    repo TEXT NOT NULL,
    name TEXT NOT NULL,
    revision INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (repo, name, revision)
);
CREATE TABLE pin_roots (
    repo TEXT NOT NULL,
    name TEXT NOT NULL,
    revision INTEGER NOT NULL,
    hash TEXT NOT NULL,
    store_path TEXT NOT NULL,
    PRIMARY KEY (repo, name, revision, hash)
);
CREATE INDEX pin_roots_by_repo ON pin_roots (repo, hash);
";

/// Fills `nar_url` and `narinfo_refs` from the texts of narinfos published before v4, row by
/// row (nothing is held in memory but the current row).
fn backfill_retention(conn: &Connection) -> rusqlite::Result<()> {
    let mut select = conn.prepare("SELECT repo, hash, text FROM narinfos")?;
    let mut set_url =
        conn.prepare("UPDATE narinfos SET nar_url = ?3 WHERE repo = ?1 AND hash = ?2")?;
    let mut add_ref = conn
        .prepare("INSERT OR IGNORE INTO narinfo_refs (repo, hash, ref_hash) VALUES (?1, ?2, ?3)")?;
    let mut rows = select.query([])?;
    while let Some(row) = rows.next()? {
        let (repo, hash, text): (String, String, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
        let facts = super::NarInfoFacts::of(&hash, &text);
        set_url.execute(params![repo, hash, facts.nar_url])?;
        for reference in &facts.references {
            add_ref.execute(params![repo, hash, reference])?;
        }
    }
    Ok(())
}

pub(crate) const REPO_COLUMNS: &str = "name, private, secret_key, priority, upstream_keys";

/// A repository's retention policy; `None` when there is no such repository. Shared with
/// `stowix admin migrate`, which reads a data dir's database through its own connection.
pub(crate) fn read_policy(
    conn: &Connection,
    repo: &str,
) -> rusqlite::Result<Option<RetentionPolicy>> {
    conn.prepare_cached("SELECT retention_secs, max_size_bytes FROM repos WHERE name = ?1")?
        .query_row([repo], |row| {
            Ok(RetentionPolicy {
                retention_secs: row.get::<_, Option<i64>>(0)?.map(|v| v as u64),
                max_size_bytes: row.get::<_, Option<i64>>(1)?.map(|v| v as u64),
            })
        })
        .optional()
}

/// The live revisions of every pin (of `repo`, or of all repositories), in repository, name
/// and revision order. Shared with `stowix admin migrate`.
pub(crate) fn read_pins(conn: &Connection, repo: Option<&str>) -> rusqlite::Result<Vec<PinRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT v.repo, v.name, v.revision, v.created_at, p.keep,
                (SELECT group_concat(store_path, ' ') FROM
                    (SELECT store_path FROM pin_roots r
                     WHERE r.repo = v.repo AND r.name = v.name AND r.revision = v.revision
                     ORDER BY store_path))
         FROM pin_revisions v JOIN pins p ON p.repo = v.repo AND p.name = v.name
         WHERE ?1 IS NULL OR v.repo = ?1
         ORDER BY v.repo, v.name, v.revision",
    )?;
    let rows = stmt.query_map([repo], |row| {
        let paths: Option<String> = row.get(5)?;
        Ok(PinRecord {
            repo: row.get(0)?,
            name: row.get(1)?,
            revision: row.get::<_, i64>(2)? as u64,
            created_at: row.get(3)?,
            keep: row.get(4)?,
            store_paths: paths
                .unwrap_or_default()
                .split(' ')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
        })
    })?;
    rows.collect()
}

pub(crate) fn repo_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RepoRecord> {
    let keys: String = row.get(4)?;
    Ok(RepoRecord {
        name: row.get(0)?,
        private: row.get(1)?,
        secret_key: row.get(2)?,
        priority: row.get(3)?,
        upstream_keys: keys.lines().map(str::to_string).collect(),
    })
}

/// The embedded default. One writing connection behind a mutex (SQLite serialises writers
/// anyway), and a pool of reading connections: in WAL mode readers see every committed write and
/// neither block nor wait for the writer, so a 20 000-entry presence query holds one reader and
/// narinfo lookups go on in the others.
pub struct SqliteMetadata {
    path: PathBuf,
    conn: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl SqliteMetadata {
    /// The compare-and-set behind chunk appends and tail replacements: in one write
    /// transaction, if the session exists, its parts total exactly `offset` bytes and `fits`
    /// accepts their count, `write` changes exactly one part row and the session is touched.
    /// False otherwise, with nothing written.
    fn write_part_at(
        &self,
        id: &str,
        offset: u64,
        at: i64,
        fits: impl FnOnce(i64) -> bool,
        write: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<usize>,
    ) -> MetaResult<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let exists = tx
            .prepare_cached("SELECT 1 FROM uploads WHERE id = ?1")?
            .exists([id])?;
        let (held, parts): (i64, i64) = tx.query_row(
            "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM upload_parts WHERE upload_id = ?1",
            [id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        if !exists || held != offset as i64 || !fits(parts) || write(&tx)? != 1 {
            return Ok(false);
        }
        tx.execute(
            "UPDATE uploads SET updated_at = MAX(updated_at, ?2) WHERE id = ?1",
            params![id, at],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Raises last uses in one transaction: `update` takes the repository, the key and the
    /// time as `?1`, `?2` and `?3`.
    fn touch(&self, update: &str, repo: &str, uses: &[(String, i64)]) -> MetaResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut touch = tx.prepare_cached(update)?;
            for (key, at) in uses {
                touch.execute(params![repo, key, at])?;
            }
        }
        Ok(tx.commit()?)
    }

    /// One connection for everything: what `stowix admin` needs.
    pub fn open(path: &Path) -> MetaResult<Self> {
        Self::open_with_readers(path, 0)
    }

    /// A writer and `readers` reading connections (none: reads go through the writer).
    pub fn open_with_readers(path: &Path, readers: usize) -> MetaResult<Self> {
        let mut conn = Connection::open(path)?;
        // WAL lets `stowix admin` and the server use the file at once; NORMAL sync is durable
        // across process crashes, which is what a killed server needs.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrate(&mut conn)?;
        let readers = (0..readers)
            .map(|_| {
                let reader = Connection::open(path)?;
                reader.busy_timeout(std::time::Duration::from_secs(10))?;
                // A reader that tried to write would race the writer's transactions.
                reader.pragma_update(None, "query_only", "ON")?;
                Ok(Mutex::new(reader))
            })
            .collect::<MetaResult<Vec<_>>>()?;
        Ok(SqliteMetadata {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            readers,
            next_reader: AtomicUsize::new(0),
        })
    }

    /// The writing connection.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (statements are atomic).
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A reading connection: the first free one from a rotating start, else a wait for one.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        let count = self.readers.len();
        if count == 0 {
            return self.conn();
        }
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..count {
            match self.readers[(start + i) % count].try_lock() {
                Ok(guard) => return guard,
                Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.readers[start % count]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Brings the database to [`SCHEMA_VERSION`], one step per transaction. IMMEDIATE takes the
/// write lock before the version is read, so a server and `stowix admin` opening one file at
/// once cannot both apply a step.
fn migrate(conn: &mut Connection) -> MetaResult<()> {
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let found: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(MetaError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        tx.execute_batch(MIGRATIONS[found as usize])?;
        if found == 0 {
            migrate_uploads(&tx)?;
        }
        if found == 3 {
            backfill_retention(&tx)?;
        }
        tx.pragma_update(None, "user_version", found + 1)?;
        tx.commit()?;
    }
}

/// Sessions remember the token that opened them (for its cap), and one NAR key has at most one
/// session. Databases from before either rule get the column, and lose duplicate sessions
/// (the oldest is kept; a client resumes or restarts whichever it is handed).
fn migrate_uploads(conn: &Connection) -> rusqlite::Result<()> {
    let has_token_id = conn
        .prepare("SELECT 1 FROM pragma_table_info('uploads') WHERE name = 'token_id'")?
        .exists([])?;
    if !has_token_id {
        conn.execute_batch("ALTER TABLE uploads ADD COLUMN token_id TEXT NOT NULL DEFAULT ''")?;
    }
    conn.execute_batch(
        "DELETE FROM uploads WHERE rowid NOT IN (
             SELECT MIN(rowid) FROM uploads GROUP BY repo, nar_hash, compression, encoder);
         CREATE UNIQUE INDEX IF NOT EXISTS uploads_one_per_key
             ON uploads (repo, nar_hash, compression, encoder);
         CREATE INDEX IF NOT EXISTS uploads_by_token ON uploads (token_id);",
    )
}

pub(crate) fn token_from_row(
    conn: &Connection,
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<TokenRecord> {
    let id: String = row.get(0)?;
    let secret: Vec<u8> = row.get(1)?;
    let scope: String = row.get(2)?;
    let mut secret_sha256 = [0u8; 32];
    if secret.len() == 32 {
        secret_sha256.copy_from_slice(&secret);
    }
    let mut stmt =
        conn.prepare_cached("SELECT repo FROM token_repos WHERE token_id = ?1 ORDER BY repo")?;
    let repos = stmt
        .query_map([&id], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(TokenRecord {
        id,
        secret_sha256,
        // An unknown scope string can only come from a newer version; read-only is the safe reading.
        scope: Scope::parse(&scope).unwrap_or(Scope::Read),
        repos,
        description: row.get(3)?,
        created_at: row.get(4)?,
        revoked_at: row.get(5)?,
    })
}

pub(crate) fn nar_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<NarRecord> {
    Ok(NarRecord {
        url: row.get(0)?,
        object_key: row.get(6)?,
        compression: row.get(1)?,
        nar_hash: row.get(2)?,
        nar_size: row.get::<_, i64>(3)? as u64,
        file_hash: row.get(4)?,
        file_size: row.get::<_, i64>(5)? as u64,
    })
}

fn upload_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UploadRecord> {
    Ok(UploadRecord {
        id: row.get(0)?,
        repo: row.get(1)?,
        nar_hash: row.get(2)?,
        nar_size: row.get::<_, i64>(3)? as u64,
        compression: row.get(4)?,
        encoder: row.get(5)?,
        created_at: row.get(6)?,
        staging_id: row.get(7)?,
        updated_at: row.get(8)?,
    })
}

pub(crate) const NAR_COLUMNS: &str =
    "url, compression, nar_hash, nar_size, file_hash, file_size, object_key";
const UPLOAD_COLUMNS: &str =
    "id, repo, nar_hash, nar_size, compression, encoder, created_at, staging_id, updated_at";

impl Metadata for SqliteMetadata {
    fn create_repo(&self, repo: &RepoRecord) -> MetaResult<bool> {
        let inserted = self.conn().execute(
            "INSERT OR IGNORE INTO repos (name, private, secret_key, priority, created_at, upstream_keys)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                repo.name,
                repo.private,
                repo.secret_key,
                repo.priority,
                now_unix(),
                repo.upstream_keys.join("\n")
            ],
        )?;
        Ok(inserted == 1)
    }

    fn repo(&self, name: &str) -> MetaResult<Option<RepoRecord>> {
        self.reader()
            .prepare_cached(&format!("SELECT {REPO_COLUMNS} FROM repos WHERE name = ?1"))?
            .query_row([name], repo_from_row)
            .optional()
            .map_err(MetaError::from)
    }

    fn repos(&self) -> MetaResult<Vec<RepoRecord>> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {REPO_COLUMNS} FROM repos ORDER BY name"))?;
        let rows = stmt.query_map([], repo_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn set_upstream_keys(&self, name: &str, keys: &[String]) -> MetaResult<bool> {
        let changed = self.conn().execute(
            "UPDATE repos SET upstream_keys = ?2 WHERE name = ?1",
            params![name, keys.join("\n")],
        )?;
        Ok(changed == 1)
    }

    fn create_token(&self, token: &TokenRecord) -> MetaResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO tokens (id, secret_sha256, scope, description, created_at, revoked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                token.id,
                token.secret_sha256.as_slice(),
                token.scope.as_str(),
                token.description,
                token.created_at,
                token.revoked_at
            ],
        )?;
        for repo in &token.repos {
            tx.execute(
                "INSERT INTO token_repos (token_id, repo) VALUES (?1, ?2)",
                params![token.id, repo],
            )?;
        }
        Ok(tx.commit()?)
    }

    fn token(&self, id: &str) -> MetaResult<Option<TokenRecord>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT id, secret_sha256, scope, description, created_at, revoked_at
             FROM tokens WHERE id = ?1",
        )?;
        stmt.query_row([id], |row| token_from_row(&conn, row))
            .optional()
            .map_err(MetaError::from)
    }

    fn tokens(&self) -> MetaResult<Vec<TokenRecord>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT id, secret_sha256, scope, description, created_at, revoked_at
             FROM tokens ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], |row| token_from_row(&conn, row))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn revoke_token(&self, id: &str, at: i64) -> MetaResult<bool> {
        let conn = self.conn();
        let exists = conn
            .prepare_cached("SELECT 1 FROM tokens WHERE id = ?1")?
            .exists([id])?;
        conn.execute(
            "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, at],
        )?;
        Ok(exists)
    }

    fn narinfo(&self, repo: &str, hash: &str) -> MetaResult<Option<String>> {
        self.reader()
            .prepare_cached("SELECT text FROM narinfos WHERE repo = ?1 AND hash = ?2")?
            .query_row([repo, hash], |row| row.get(0))
            .optional()
            .map_err(MetaError::from)
    }

    fn presence(&self, repo: &str, queries: &[(String, String)]) -> MetaResult<Vec<Presence>> {
        let conn = self.reader();
        let mut published =
            conn.prepare_cached("SELECT 1 FROM narinfos WHERE repo = ?1 AND hash = ?2")?;
        let mut nar =
            conn.prepare_cached("SELECT 1 FROM nars WHERE repo = ?1 AND nar_hash = ?2")?;
        let mut answers = Vec::with_capacity(queries.len());
        for (hash, nar_hash) in queries {
            let state = if published.exists([repo, hash])? {
                Presence::Published
            } else if nar.exists([repo, nar_hash])? {
                Presence::NarStored
            } else {
                Presence::Missing
            };
            answers.push(state);
        }
        Ok(answers)
    }

    fn nar_by_hash(&self, repo: &str, nar_hash: &str) -> MetaResult<Option<NarRecord>> {
        self.reader()
            .prepare_cached(&format!(
                "SELECT {NAR_COLUMNS} FROM nars WHERE repo = ?1 AND nar_hash = ?2 ORDER BY created_at LIMIT 1"
            ))?
            .query_row([repo, nar_hash], nar_from_row)
            .optional()
        .map_err(MetaError::from)
    }

    fn nar_by_url(&self, repo: &str, url: &str) -> MetaResult<Option<NarRecord>> {
        self.reader()
            .prepare_cached(&format!(
                "SELECT {NAR_COLUMNS} FROM nars WHERE repo = ?1 AND url = ?2"
            ))?
            .query_row([repo, url], nar_from_row)
            .optional()
            .map_err(MetaError::from)
    }

    fn insert_nars(&self, repo: &str, nars: &[NarRecord]) -> MetaResult<Vec<bool>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut newly = Vec::with_capacity(nars.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO nars (repo, url, compression, nar_hash, nar_size, file_hash, file_size, created_at, object_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            let at = now_unix();
            for nar in nars {
                let inserted = insert.execute(params![
                    repo,
                    nar.url,
                    nar.compression,
                    nar.nar_hash,
                    nar.nar_size as i64,
                    nar.file_hash,
                    nar.file_size as i64,
                    at,
                    nar.object_key
                ])?;
                newly.push(inserted == 1);
            }
        }
        tx.commit()?;
        Ok(newly)
    }

    fn upload(&self, id: &str) -> MetaResult<Option<UploadRecord>> {
        self.reader()
            .prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = ?1"
            ))?
            .query_row([id], upload_from_row)
            .optional()
            .map_err(MetaError::from)
    }

    fn delete_upload(&self, id: &str) -> MetaResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM upload_parts WHERE upload_id = ?1", [id])?;
        tx.execute("DELETE FROM uploads WHERE id = ?1", [id])?;
        Ok(tx.commit()?)
    }

    fn uploads_inactive_since(&self, at: i64) -> MetaResult<Vec<UploadRecord>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE updated_at < ?1"
        ))?;
        let rows = stmt.query_map([at], upload_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn touch_upload(&self, id: &str, at: i64) -> MetaResult<()> {
        self.conn().execute(
            "UPDATE uploads SET updated_at = MAX(updated_at, ?2) WHERE id = ?1",
            params![id, at],
        )?;
        Ok(())
    }

    fn set_upload_staging_id(&self, id: &str, staging_id: &str) -> MetaResult<()> {
        self.conn().execute(
            "UPDATE uploads SET staging_id = ?2 WHERE id = ?1",
            params![id, staging_id],
        )?;
        Ok(())
    }

    fn add_upload_part(
        &self,
        id: &str,
        offset: u64,
        part: &UploadPart,
        at: i64,
    ) -> MetaResult<bool> {
        // Numbers are consecutive, so the part list is exactly what assembles the object.
        self.write_part_at(
            id,
            offset,
            at,
            |parts| i64::from(part.number) == parts + 1,
            |tx| {
                tx.execute(
                    "INSERT INTO upload_parts (upload_id, number, size, etag) VALUES (?1, ?2, ?3, ?4)",
                    params![id, part.number, part.size as i64, part.etag],
                )
            },
        )
    }

    fn upload_parts(&self, id: &str) -> MetaResult<Vec<UploadPart>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT number, size, etag FROM upload_parts WHERE upload_id = ?1 ORDER BY number",
        )?;
        let rows = stmt.query_map([id], |row| {
            Ok(UploadPart {
                number: row.get(0)?,
                size: row.get::<_, i64>(1)? as u64,
                etag: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn open_upload(
        &self,
        upload: &UploadRecord,
        token_id: &str,
        caps: SessionCaps,
    ) -> MetaResult<OpenedUpload> {
        let mut conn = self.conn();
        // IMMEDIATE: the counts, the insert and the read-back see one state, even with another
        // process (`stowix admin`) writing.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            &format!(
                "INSERT INTO uploads ({UPLOAD_COLUMNS}, token_id)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?11, ?7, ?8
                 WHERE (SELECT COUNT(*) FROM uploads WHERE token_id = ?8) < ?9
                   AND (SELECT COUNT(*) FROM uploads WHERE repo = ?2) < ?10
                 ON CONFLICT (repo, nar_hash, compression, encoder) DO NOTHING"
            ),
            params![
                upload.id,
                upload.repo,
                upload.nar_hash,
                upload.nar_size as i64,
                upload.compression,
                upload.encoder,
                upload.created_at,
                token_id,
                i64::try_from(caps.per_token).unwrap_or(i64::MAX),
                i64::try_from(caps.per_repo).unwrap_or(i64::MAX),
                upload.staging_id,
            ],
        )?;
        let current = tx
            .prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads
                 WHERE repo = ?1 AND nar_hash = ?2 AND compression = ?3 AND encoder = ?4"
            ))?
            .query_row(
                [
                    &upload.repo,
                    &upload.nar_hash,
                    &upload.compression,
                    &upload.encoder,
                ],
                upload_from_row,
            )
            .optional()?;
        let opened = match current {
            Some(row) if row.id == upload.id => OpenedUpload::Created(row),
            Some(row) => OpenedUpload::Existing(row),
            None => {
                let held: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM uploads WHERE token_id = ?1",
                    [token_id],
                    |row| row.get(0),
                )?;
                if u64::try_from(held).unwrap_or(0) >= caps.per_token {
                    OpenedUpload::TokenFull
                } else {
                    OpenedUpload::RepoFull
                }
            }
        };
        tx.commit()?;
        Ok(opened)
    }

    fn published_store_paths(
        &self,
        repo: &str,
        hashes: &[String],
    ) -> MetaResult<Vec<Option<String>>> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare_cached("SELECT store_path FROM narinfos WHERE repo = ?1 AND hash = ?2")?;
        hashes
            .iter()
            .map(|hash| {
                stmt.query_row(params![repo, hash], |row| row.get(0))
                    .optional()
                    .map_err(MetaError::from)
            })
            .collect()
    }

    fn record_object_intents(&self, keys: &[String], at: i64) -> MetaResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut record = tx.prepare_cached(
                "INSERT INTO object_intents (key, created_at) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET created_at = excluded.created_at",
            )?;
            for key in keys {
                record.execute(params![key, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn clear_object_intents(&self, keys: &[String]) -> MetaResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut clear = tx.prepare_cached("DELETE FROM object_intents WHERE key = ?1")?;
            for key in keys {
                clear.execute([key])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn object_intents_before(&self, at: i64, limit: usize) -> MetaResult<Vec<String>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT key FROM object_intents WHERE created_at < ?1 ORDER BY created_at LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![at, limit as i64], |row| row.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn known_object_keys(&self, keys: &[String]) -> MetaResult<Vec<bool>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached("SELECT 1 FROM nars WHERE object_key = ?1")?;
        keys.iter().map(|key| Ok(stmt.exists([key])?)).collect()
    }

    fn publish_checked(
        &self,
        repo: &str,
        narinfos: &[PublishedNarInfo],
        exempt: &HashSet<String>,
        at: i64,
    ) -> MetaResult<Vec<PublishState>> {
        let facts: Vec<NarInfoFacts> = narinfos
            .iter()
            .map(|n| NarInfoFacts::of(&n.hash, &n.text))
            .collect();
        let mut conn = self.conn();
        // IMMEDIATE: the checks and the writes see one state; a collector (in this process or
        // in `stowix admin`) writes only in transactions of its own, before or after this one.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (mut published, mut stored) = (HashSet::new(), HashSet::new());
        {
            let mut is_published =
                tx.prepare_cached("SELECT 1 FROM narinfos WHERE repo = ?1 AND hash = ?2")?;
            let mut is_stored =
                tx.prepare_cached("SELECT 1 FROM nars WHERE repo = ?1 AND url = ?2")?;
            let hashes = narinfos.iter().map(|n| &n.hash);
            for hash in hashes.chain(facts.iter().flat_map(|f| &f.references)) {
                if !published.contains(hash) && is_published.exists([repo, hash])? {
                    published.insert(hash.clone());
                }
            }
            for url in facts.iter().map(|f| &f.nar_url).filter(|u| !u.is_empty()) {
                if !stored.contains(url) && is_stored.exists([repo, url])? {
                    stored.insert(url.clone());
                }
            }
        }
        let mut states = publication_verdicts(narinfos, &facts, &published, &stored, exempt);
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO narinfos
                     (repo, hash, store_path, nar_hash, text, published_at, last_used_at, nar_url)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
            )?;
            let mut add_ref = tx.prepare_cached(
                "INSERT OR IGNORE INTO narinfo_refs (repo, hash, ref_hash) VALUES (?1, ?2, ?3)",
            )?;
            let mut revive = tx.prepare_cached(
                "UPDATE nars SET orphaned_at = NULL WHERE repo = ?1 AND url = ?2",
            )?;
            for i in 0..narinfos.len() {
                if states[i].is_some() {
                    continue;
                }
                let info = &narinfos[i];
                let inserted = insert.execute(params![
                    repo,
                    info.hash,
                    info.store_path,
                    info.nar_hash,
                    info.text,
                    at,
                    facts[i].nar_url
                ])?;
                if inserted == 1 {
                    for reference in &facts[i].references {
                        add_ref.execute(params![repo, info.hash, reference])?;
                    }
                    revive.execute(params![repo, facts[i].nar_url])?;
                    states[i] = Some(PublishState::New);
                } else {
                    states[i] = Some(PublishState::Already);
                }
            }
        }
        tx.commit()?;
        Ok(states
            .into_iter()
            .map(|s| s.unwrap_or(PublishState::Already))
            .collect())
    }

    fn policy(&self, repo: &str) -> MetaResult<Option<RetentionPolicy>> {
        read_policy(&self.reader(), repo).map_err(MetaError::from)
    }

    fn set_policy(&self, repo: &str, policy: &RetentionPolicy) -> MetaResult<bool> {
        let changed = self.conn().execute(
            "UPDATE repos SET retention_secs = ?2, max_size_bytes = ?3 WHERE name = ?1",
            params![
                repo,
                policy.retention_secs.map(to_i64),
                policy.max_size_bytes.map(to_i64)
            ],
        )?;
        Ok(changed == 1)
    }

    fn usage(&self, repo: &str) -> MetaResult<RepoUsage> {
        let conn = self.reader();
        let paths: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM narinfos WHERE repo = ?1")?
            .query_row([repo], |row| row.get(0))?;
        let (nars, bytes): (i64, i64) = conn
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(file_size), 0) FROM nars WHERE repo = ?1",
            )?
            .query_row([repo], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(RepoUsage {
            paths: paths as u64,
            nars: nars as u64,
            bytes: bytes as u64,
        })
    }

    fn touch_paths(&self, repo: &str, uses: &[(String, i64)]) -> MetaResult<()> {
        self.touch(
            "UPDATE narinfos SET last_used_at = MAX(last_used_at, ?3) WHERE repo = ?1 AND hash = ?2",
            repo,
            uses,
        )
    }

    fn touch_nars(&self, repo: &str, uses: &[(String, i64)]) -> MetaResult<()> {
        self.touch(
            "UPDATE narinfos SET last_used_at = MAX(last_used_at, ?3) WHERE repo = ?1 AND nar_url = ?2",
            repo,
            uses,
        )
    }

    fn gc_session(&self, repo: &str) -> MetaResult<Box<dyn GcSession + '_>> {
        // A connection of its own: its working tables are temporary (per connection), and the
        // long marking reads do not hold the writer that publications need.
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(std::time::Duration::from_secs(60))?;
        conn.execute_batch(
            "CREATE TEMP TABLE gc_live (hash TEXT PRIMARY KEY, gen INTEGER NOT NULL);
             CREATE INDEX temp.gc_live_by_gen ON gc_live (gen);
             CREATE TEMP TABLE gc_dead (hash TEXT PRIMARY KEY);",
        )?;
        Ok(Box::new(SqliteGc {
            conn,
            repo: repo.to_string(),
            cutoff: i64::MIN,
        }))
    }

    fn mark_unpublished_nars(
        &self,
        repo: &str,
        created_before: i64,
        now: i64,
        dry_run: bool,
    ) -> MetaResult<u64> {
        const UNPUBLISHED: &str = "repo = ?1 AND orphaned_at IS NULL AND created_at < ?2
             AND NOT EXISTS (SELECT 1 FROM narinfos n WHERE n.repo = ?1 AND n.nar_url = nars.url)";
        let count = if dry_run {
            self.reader()
                .prepare_cached(&format!("SELECT COUNT(*) FROM nars WHERE {UNPUBLISHED}"))?
                .query_row(params![repo, created_before], |row| row.get::<_, i64>(0))?
                as usize
        } else {
            self.conn().execute(
                &format!("UPDATE nars SET orphaned_at = ?3 WHERE {UNPUBLISHED}"),
                params![repo, created_before, now],
            )?
        };
        Ok(count as u64)
    }

    fn collectible_nars(&self, repo: &str, orphaned_before: i64) -> MetaResult<(u64, u64)> {
        let (count, bytes): (i64, i64) = self
            .reader()
            .prepare_cached(&format!(
                "SELECT COUNT(*), COALESCE(SUM(file_size), 0) FROM nars WHERE {COLLECTIBLE}"
            ))?
            .query_row(params![repo, orphaned_before], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
        Ok((count as u64, bytes as u64))
    }

    fn take_collectible_nars(
        &self,
        repo: &str,
        orphaned_before: i64,
        limit: usize,
    ) -> MetaResult<Vec<NarRecord>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let taken = {
            let mut select = tx.prepare_cached(&format!(
                "SELECT {NAR_COLUMNS} FROM nars WHERE {COLLECTIBLE} ORDER BY url LIMIT ?3"
            ))?;
            let rows =
                select.query_map(params![repo, orphaned_before, limit as i64], nar_from_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        {
            let mut delete = tx.prepare_cached("DELETE FROM nars WHERE repo = ?1 AND url = ?2")?;
            for nar in &taken {
                delete.execute(params![repo, nar.url])?;
            }
        }
        tx.commit()?;
        Ok(taken)
    }

    fn delete_paths(
        &self,
        repo: &str,
        hashes: &[String],
        with_dependents: bool,
    ) -> MetaResult<PathDeletion> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let targets: HashSet<&str> = hashes.iter().map(String::as_str).collect();
        // Dependents, transitively, nearest first: the order they are listed in.
        let mut closure: Vec<(String, String, String)> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut frontier: Vec<String> = hashes.to_vec();
        {
            let mut path_of = tx.prepare_cached(
                "SELECT store_path, nar_url FROM narinfos WHERE repo = ?1 AND hash = ?2",
            )?;
            let mut referrers = tx.prepare_cached(
                "SELECT hash FROM narinfo_refs INDEXED BY narinfo_refs_by_ref WHERE repo = ?1 AND ref_hash = ?2 AND hash <> ?2 ORDER BY hash",
            )?;
            while let Some(hash) = frontier.pop() {
                if !seen.insert(hash.clone()) {
                    continue;
                }
                let Some((store_path, nar_url)) = path_of
                    .query_row([repo, &hash], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()?
                else {
                    continue;
                };
                closure.push((hash.clone(), store_path, nar_url));
                let found = referrers
                    .query_map([repo, &hash], |row| row.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                frontier.extend(found);
            }
        }
        let dependents: Vec<String> = closure
            .iter()
            .filter(|(hash, _, _)| !targets.contains(hash.as_str()))
            .map(|(_, path, _)| path.clone())
            .collect();
        if !dependents.is_empty() && !with_dependents {
            return Ok(PathDeletion::Refused { dependents });
        }
        let mut nars = Vec::new();
        {
            let mut delete =
                tx.prepare_cached("DELETE FROM narinfos WHERE repo = ?1 AND hash = ?2")?;
            let mut delete_refs =
                tx.prepare_cached("DELETE FROM narinfo_refs WHERE repo = ?1 AND hash = ?2")?;
            for (hash, _, _) in &closure {
                delete.execute([repo, hash])?;
                delete_refs.execute([repo, hash])?;
            }
            let mut unnamed = tx.prepare_cached(&format!(
                "SELECT {NAR_COLUMNS} FROM nars WHERE repo = ?1 AND url = ?2
                 AND NOT EXISTS (SELECT 1 FROM narinfos n WHERE n.repo = ?1 AND n.nar_url = ?2)"
            ))?;
            let mut delete_nar =
                tx.prepare_cached("DELETE FROM nars WHERE repo = ?1 AND url = ?2")?;
            for (_, _, url) in &closure {
                if let Some(nar) = unnamed.query_row([repo, url], nar_from_row).optional()? {
                    delete_nar.execute([repo, url])?;
                    nars.push(nar);
                }
            }
        }
        tx.commit()?;
        Ok(PathDeletion::Deleted {
            paths: closure
                .into_iter()
                .map(|(hash, store_path, _)| RemovedPath { hash, store_path })
                .collect(),
            nars,
        })
    }

    fn create_pin(
        &self,
        repo: &str,
        name: &str,
        hashes: &[String],
        keep: Option<u32>,
        at: i64,
    ) -> MetaResult<PinCreated> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut roots = Vec::new();
        let mut missing = Vec::new();
        {
            let mut path_of =
                tx.prepare_cached("SELECT store_path FROM narinfos WHERE repo = ?1 AND hash = ?2")?;
            for hash in hashes {
                match path_of
                    .query_row([repo, hash], |row| row.get::<_, String>(0))
                    .optional()?
                {
                    Some(path) => roots.push((hash.clone(), path)),
                    None => missing.push(hash.clone()),
                }
            }
        }
        if !missing.is_empty() {
            return Ok(PinCreated::NotPublished(missing));
        }
        tx.execute(
            "INSERT INTO pins (repo, name, keep, next_revision) VALUES (?1, ?2, ?3, 1)
             ON CONFLICT (repo, name) DO UPDATE SET keep = COALESCE(?3, keep)",
            params![repo, name, keep],
        )?;
        let (revision, keep): (i64, Option<u32>) = tx.query_row(
            "SELECT next_revision, keep FROM pins WHERE repo = ?1 AND name = ?2",
            [repo, name],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        tx.execute(
            "UPDATE pins SET next_revision = next_revision + 1 WHERE repo = ?1 AND name = ?2",
            [repo, name],
        )?;
        tx.execute(
            "INSERT INTO pin_revisions (repo, name, revision, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![repo, name, revision, at],
        )?;
        for (hash, path) in &roots {
            tx.execute(
                "INSERT OR IGNORE INTO pin_roots (repo, name, revision, hash, store_path)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![repo, name, revision, hash, path],
            )?;
        }
        let mut dropped = Vec::new();
        if let Some(keep) = keep {
            let below = revision - i64::from(keep.max(1)) + 1;
            let mut stmt = tx.prepare_cached(
                "SELECT revision FROM pin_revisions WHERE repo = ?1 AND name = ?2 AND revision < ?3 ORDER BY revision",
            )?;
            dropped = stmt
                .query_map(params![repo, name, below], |row| row.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            tx.execute(
                "DELETE FROM pin_revisions WHERE repo = ?1 AND name = ?2 AND revision < ?3",
                params![repo, name, below],
            )?;
            tx.execute(
                "DELETE FROM pin_roots WHERE repo = ?1 AND name = ?2 AND revision < ?3",
                params![repo, name, below],
            )?;
        }
        tx.commit()?;
        let mut store_paths: Vec<String> = roots.into_iter().map(|(_, path)| path).collect();
        store_paths.sort();
        store_paths.dedup();
        Ok(PinCreated::Created {
            pin: PinRecord {
                repo: repo.to_string(),
                name: name.to_string(),
                revision: revision as u64,
                created_at: at,
                keep,
                store_paths,
            },
            dropped: dropped.into_iter().map(|r| r as u64).collect(),
        })
    }

    fn pins(&self, repo: Option<&str>) -> MetaResult<Vec<PinRecord>> {
        Ok(read_pins(&self.reader(), repo)?)
    }

    fn delete_pin(&self, repo: &str, name: &str, revision: Option<u64>) -> MetaResult<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let revision = revision.map(to_i64);
        let removed = tx.execute(
            "DELETE FROM pin_revisions WHERE repo = ?1 AND name = ?2 AND (?3 IS NULL OR revision = ?3)",
            params![repo, name, revision],
        )?;
        tx.execute(
            "DELETE FROM pin_roots WHERE repo = ?1 AND name = ?2 AND (?3 IS NULL OR revision = ?3)",
            params![repo, name, revision],
        )?;
        if revision.is_none() {
            tx.execute(
                "DELETE FROM pins WHERE repo = ?1 AND name = ?2",
                [repo, name],
            )?;
        }
        tx.commit()?;
        Ok(removed as u64)
    }

    fn ping(&self) -> MetaResult<()> {
        self.reader().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    fn schema_version(&self) -> MetaResult<i64> {
        Ok(self
            .reader()
            .query_row("PRAGMA user_version", [], |row| row.get(0))?)
    }

    fn try_singleton(&self, name: &str) -> MetaResult<Option<SingletonGuard>> {
        // One SQLite file serves one machine, so a lock file beside it is seen by every process
        // that can open the database.
        let lock_path = self.path.with_extension(format!("{name}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|err| MetaError::Other(format!("{}: {err}", lock_path.display())))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; the lock lives as long as `file`.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        Ok(locked.then(|| SingletonGuard::new(file)))
    }

    fn replace_last_upload_part(
        &self,
        id: &str,
        offset: u64,
        last: &UploadPart,
        part: &UploadPart,
        at: i64,
    ) -> MetaResult<bool> {
        self.write_part_at(
            id,
            offset,
            at,
            |parts| part.number == last.number && i64::from(last.number) == parts,
            |tx| {
                tx.execute(
                    "UPDATE upload_parts SET size = ?4, etag = ?5
                     WHERE upload_id = ?1 AND number = ?2 AND etag = ?3",
                    params![id, last.number, last.etag, part.size as i64, part.etag],
                )
            },
        )
    }
}

/// NARs marked unreferenced before `?2` that no narinfo names.
const COLLECTIBLE: &str = "repo = ?1 AND orphaned_at IS NOT NULL AND orphaned_at < ?2
     AND NOT EXISTS (SELECT 1 FROM narinfos n WHERE n.repo = ?1 AND n.nar_url = nars.url)";

/// A collection's session: its own connection holding the temporary `gc_live` (the mark, with
/// the generation each path was reached in) and `gc_dead` (the candidates).
struct SqliteGc {
    conn: Connection,
    repo: String,
    /// The last mark's cutoff: a candidate used since is not removed.
    cutoff: i64,
}

impl GcSession for SqliteGc {
    fn oldest_use(&mut self) -> MetaResult<Option<i64>> {
        Ok(self.conn.query_row(
            "SELECT MIN(last_used_at) FROM narinfos WHERE repo = ?1",
            [&self.repo],
            |row| row.get(0),
        )?)
    }

    fn mark(&mut self, cutoff: i64) -> MetaResult<LiveSet> {
        self.cutoff = cutoff;
        let conn = &self.conn;
        conn.execute("DELETE FROM gc_live", [])?;
        conn.execute(
            "INSERT OR IGNORE INTO gc_live (hash, gen)
             SELECT hash, 0 FROM narinfos WHERE repo = ?1 AND last_used_at >= ?2",
            params![self.repo, cutoff],
        )?;
        conn.execute(
            "INSERT OR IGNORE INTO gc_live (hash, gen)
             SELECT p.hash, 0 FROM pin_roots p WHERE p.repo = ?1",
            [&self.repo],
        )?;
        // Breadth first, one generation per statement: each reads only the previous frontier
        // (by index), so the work is proportional to the closure, and memory to nothing.
        let mut generation = 0i64;
        loop {
            let added = conn.execute(
                "INSERT OR IGNORE INTO gc_live (hash, gen)
                 SELECT r.ref_hash, ?3 FROM gc_live l
                 JOIN narinfo_refs r ON r.repo = ?1 AND r.hash = l.hash
                 WHERE l.gen = ?2",
                params![self.repo, generation, generation + 1],
            )?;
            if added == 0 {
                break;
            }
            generation += 1;
        }
        let (paths, bytes): (i64, i64) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(s.file_size), 0) FROM gc_live l
             JOIN narinfos n ON n.repo = ?1 AND n.hash = l.hash
             LEFT JOIN nars s ON s.repo = ?1 AND s.url = n.nar_url",
            [&self.repo],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        Ok(LiveSet {
            paths: paths as u64,
            bytes: bytes as u64,
        })
    }

    fn dead_paths(&mut self, limit: usize) -> MetaResult<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT n.store_path FROM gc_dead d JOIN narinfos n ON n.repo = ?1 AND n.hash = d.hash
             ORDER BY n.store_path LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![self.repo, limit as i64], |row| row.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn dead(&mut self) -> MetaResult<DeadSet> {
        let conn = &self.conn;
        conn.execute("DELETE FROM gc_dead", [])?;
        // One row per published path (the hash part is the key): the insert counts them.
        let paths = conn.execute(
            "INSERT INTO gc_dead (hash)
             SELECT n.hash FROM narinfos n WHERE n.repo = ?1 AND n.last_used_at < ?2
             AND NOT EXISTS (SELECT 1 FROM gc_live l WHERE l.hash = n.hash)",
            params![self.repo, self.cutoff],
        )?;
        let (nars, bytes): (i64, i64) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(s.file_size), 0) FROM nars s
             WHERE s.repo = ?1 AND s.orphaned_at IS NULL
             AND EXISTS (SELECT 1 FROM narinfos n JOIN gc_dead d ON d.hash = n.hash
                         WHERE n.repo = ?1 AND n.nar_url = s.url)
             AND NOT EXISTS (SELECT 1 FROM narinfos n WHERE n.repo = ?1 AND n.nar_url = s.url
                             AND NOT EXISTS (SELECT 1 FROM gc_dead d WHERE d.hash = n.hash))",
            [&self.repo],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        Ok(DeadSet {
            paths: paths as u64,
            nars: nars as u64,
            bytes: bytes as u64,
        })
    }

    fn sweep(&mut self, limit: usize, now: i64) -> MetaResult<Swept> {
        let repo = self.repo.clone();
        let mut nars_orphaned = 0;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Inside the write transaction: what references a candidate now (a publication that
        // committed a moment ago included) is what counts.
        let batch: Vec<(String, String, String)> = {
            // INDEXED BY: without statistics SQLite prefers the covering primary key of
            // narinfo_refs (repo, hash, ref_hash), a scan of the repository's every reference
            // per candidate; the reverse index makes it one lookup.
            let mut stmt = tx.prepare_cached(
                "SELECT d.hash, n.store_path, n.nar_url FROM gc_dead d
                 JOIN narinfos n ON n.repo = ?1 AND n.hash = d.hash
                 WHERE n.last_used_at < ?2
                 AND NOT EXISTS (SELECT 1 FROM narinfo_refs r INDEXED BY narinfo_refs_by_ref
                                 WHERE r.repo = ?1 AND r.ref_hash = d.hash AND r.hash <> d.hash)
                 AND NOT EXISTS (SELECT 1 FROM pin_roots p WHERE p.repo = ?1 AND p.hash = d.hash)
                 LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![repo, self.cutoff, limit as i64], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        {
            let mut delete =
                tx.prepare_cached("DELETE FROM narinfos WHERE repo = ?1 AND hash = ?2")?;
            let mut delete_refs =
                tx.prepare_cached("DELETE FROM narinfo_refs WHERE repo = ?1 AND hash = ?2")?;
            let mut done = tx.prepare_cached("DELETE FROM gc_dead WHERE hash = ?1")?;
            let mut orphan = tx.prepare_cached(
                "UPDATE nars SET orphaned_at = ?3 WHERE repo = ?1 AND url = ?2 AND orphaned_at IS NULL
                 AND NOT EXISTS (SELECT 1 FROM narinfos n WHERE n.repo = ?1 AND n.nar_url = ?2)",
            )?;
            for (hash, _, _) in &batch {
                delete.execute([&repo, hash])?;
                delete_refs.execute([&repo, hash])?;
                done.execute([hash])?;
            }
            for (_, _, url) in &batch {
                nars_orphaned += orphan.execute(params![repo, url, now])? as u64;
            }
        }
        tx.commit()?;
        Ok(Swept {
            paths: batch
                .into_iter()
                .map(|(hash, store_path, _)| RemovedPath { hash, store_path })
                .collect(),
            nars_orphaned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(id: &str, nar: &str) -> UploadRecord {
        UploadRecord {
            id: id.into(),
            repo: "r".into(),
            nar_hash: nar.into(),
            nar_size: 1,
            compression: "xz".into(),
            encoder: "e".into(),
            created_at: 0,
            staging_id: None,
            updated_at: 0,
        }
    }

    const CAPS: SessionCaps = SessionCaps {
        per_token: 2,
        per_repo: 3,
    };

    #[test]
    fn a_database_from_before_the_uniqueness_rule_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stowix.db");
        {
            // The uploads table as earlier versions made it, holding a duplicate session.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(V1_SCHEMA).unwrap();
            for id in ["first", "second"] {
                conn.execute(
                    "INSERT INTO uploads (id, repo, nar_hash, nar_size, compression, encoder, created_at) VALUES (?1, 'r', 'n', 1, 'xz', 'e', 0)",
                    [id],
                )
                .unwrap();
            }
        }
        let meta = SqliteMetadata::open(&path).unwrap();
        match meta.open_upload(&upload("third", "n"), "t", CAPS).unwrap() {
            OpenedUpload::Existing(kept) => assert_eq!(kept.id, "first"),
            other => panic!("expected the oldest session back, got {other:?}"),
        }
        assert!(meta.upload("second").unwrap().is_none());
        // Opening again is idempotent.
        drop(meta);
        SqliteMetadata::open(&path).unwrap();
    }

    #[test]
    fn a_database_from_a_newer_stowix_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stowix.db");
        drop(SqliteMetadata::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        match SqliteMetadata::open(&path) {
            Err(MetaError::SchemaTooNew { found, supported }) => {
                assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            }
            Err(other) => panic!("expected SchemaTooNew, got {other}"),
            Ok(_) => panic!("a newer schema was opened"),
        }
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION + 1);
    }

    #[test]
    fn the_singleton_has_one_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stowix.db");
        let first = SqliteMetadata::open(&path).unwrap();
        let second = SqliteMetadata::open(&path).unwrap();
        let held = first
            .try_singleton("janitor")
            .unwrap()
            .expect("free at first");
        assert!(second.try_singleton("janitor").unwrap().is_none());
        assert!(second.try_singleton("other").unwrap().is_some());
        drop(held);
        assert!(second.try_singleton("janitor").unwrap().is_some());
    }

    #[test]
    fn sessions_are_unique_per_key_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMetadata::open(&dir.path().join("stowix.db")).unwrap();
        assert!(matches!(
            meta.open_upload(&upload("a", "n1"), "t", CAPS).unwrap(),
            OpenedUpload::Created(_)
        ));
        match meta.open_upload(&upload("b", "n1"), "t", CAPS).unwrap() {
            OpenedUpload::Existing(existing) => assert_eq!(existing.id, "a"),
            other => panic!("{other:?}"),
        }
        // The unique index refuses a second row for the key, whoever inserts it.
        let duplicate = meta.conn().execute(
            &format!(
                "INSERT INTO uploads ({UPLOAD_COLUMNS}) VALUES ('c', 'r', 'n1', 1, 'xz', 'e', 0, NULL, 0)"
            ),
            [],
        );
        assert!(duplicate.is_err());
        meta.open_upload(&upload("d", "n2"), "t", CAPS).unwrap();
        assert!(matches!(
            meta.open_upload(&upload("e", "n3"), "t", CAPS).unwrap(),
            OpenedUpload::TokenFull
        ));
        assert!(matches!(
            meta.open_upload(&upload("f", "n3"), "u", CAPS).unwrap(),
            OpenedUpload::Created(_)
        ));
        assert!(matches!(
            meta.open_upload(&upload("g", "n4"), "u", CAPS).unwrap(),
            OpenedUpload::RepoFull
        ));
    }

    fn published(hash: &str) -> PublishedNarInfo {
        PublishedNarInfo {
            hash: hash.to_string(),
            store_path: format!("/nix/store/{hash}-x"),
            nar_hash: "sha256:0".into(),
            text: format!("StorePath: /nix/store/{hash}-x\n"),
        }
    }

    #[test]
    fn readers_see_every_committed_write_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMetadata::open_with_readers(&dir.path().join("db"), 3).unwrap();
        for i in 0..20 {
            let hash = format!("{i:0>32}");
            assert_eq!(meta.narinfo("r", &hash).unwrap(), None);
            assert_eq!(meta.publish("r", &[published(&hash)]).unwrap(), vec![true]);
            // Whichever reader answers, the write just committed is visible.
            for _ in 0..3 {
                assert!(meta.narinfo("r", &hash).unwrap().is_some());
            }
        }
    }

    #[test]
    fn a_busy_reader_does_not_hold_up_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let meta = std::sync::Arc::new(
            SqliteMetadata::open_with_readers(&dir.path().join("db"), 2).unwrap(),
        );
        meta.publish("r", &[published(&"a".repeat(32))]).unwrap();
        // A long presence query holds one connection: simulate it by holding one reader, and
        // (so that a single shared connection would block too) the writer.
        let _busy_reader = meta.readers[0].lock().unwrap();
        let _busy_writer = meta.conn.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::sync::Arc::clone(&meta);
        std::thread::spawn(move || {
            for _ in 0..10 {
                let _ = tx.send(reader.narinfo("r", &"a".repeat(32)).unwrap());
            }
        });
        for _ in 0..10 {
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("a narinfo read waited for a busy connection");
            assert!(got.is_some());
        }
    }
}
