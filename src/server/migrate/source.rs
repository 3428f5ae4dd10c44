//! The embedded installation `stowix admin migrate` copies from: `<data dir>/stowix.db`, read
//! through a read-only SQLite connection (the file is never written, and a server running on it
//! goes on undisturbed: WAL readers neither block nor wait), and the files under
//! `<data dir>/store`, named by their storage keys.
//!
//! Every read a kind needs lives here, so a new kind (a new table) is one more query beside
//! these. Large tables are read in pages ordered by their primary key, never whole.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::MigrateError;
use crate::server::backend::metadata::sqlite::{
    nar_from_row, read_pins, read_policy, repo_from_row, token_from_row, NAR_COLUMNS, REPO_COLUMNS,
    SCHEMA_VERSION,
};
use crate::server::backend::metadata::{
    NarRecord, PinRecord, PublishedNarInfo, RepoRecord, RetentionPolicy, TokenRecord,
};
use crate::server::backend::storage::is_safe_key;
use crate::server::backend::{DATABASE_FILE, STORE_DIR};

pub struct Source {
    pub data_dir: PathBuf,
    pub db_path: PathBuf,
    /// `<data dir>/store`: object `key` is the file `store/<key>`.
    pub store: PathBuf,
    conn: Connection,
}

impl Source {
    /// Opens `data_dir` as an embedded installation whose schema is this binary's.
    pub fn open(data_dir: &Path) -> Result<Self, MigrateError> {
        let no_source = |why: String| MigrateError::NoSource {
            dir: data_dir.to_path_buf(),
            why,
        };
        let meta = std::fs::metadata(data_dir).map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => no_source("does not exist".into()),
            _ => no_source(err.to_string()),
        })?;
        if !meta.is_dir() {
            return Err(no_source("is not a directory".into()));
        }
        let not_embedded = |why: String| MigrateError::NotEmbedded {
            dir: data_dir.to_path_buf(),
            why,
        };
        let db_path = data_dir.join(DATABASE_FILE);
        if !db_path.is_file() {
            return Err(not_embedded(format!("holds no {DATABASE_FILE}")));
        }
        let conn = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|err| not_embedded(format!("cannot open {DATABASE_FILE}: {err}")))?;
        // A running server's writer holds the file only for a moment.
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|err| not_embedded(err.to_string()))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|err| not_embedded(format!("{DATABASE_FILE} is not a database: {err}")))?;
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('repos', 'tokens', 'nars', 'narinfos')",
                [],
                |row| row.get(0),
            )
            .map_err(|err| not_embedded(format!("{DATABASE_FILE} is not a database: {err}")))?;
        if tables != 4 {
            return Err(not_embedded(format!(
                "its {DATABASE_FILE} is not a stowix database"
            )));
        }
        if version != SCHEMA_VERSION {
            return Err(MigrateError::SourceSchema {
                dir: data_dir.to_path_buf(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(Source {
            data_dir: data_dir.to_path_buf(),
            store: data_dir.join(STORE_DIR),
            db_path,
            conn,
        })
    }

    fn failed(&self, err: rusqlite::Error) -> MigrateError {
        MigrateError::Source(format!("reading {}: {err}", self.db_path.display()))
    }

    pub fn repos(&self) -> Result<Vec<RepoRecord>, MigrateError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {REPO_COLUMNS} FROM repos ORDER BY name"))
            .map_err(|e| self.failed(e))?;
        let rows = stmt
            .query_map([], repo_from_row)
            .map_err(|e| self.failed(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.failed(e))
    }

    /// `repo`'s retention policy (`--retention`, `--max-size`).
    pub fn policy(&self, repo: &str) -> Result<Option<RetentionPolicy>, MigrateError> {
        read_policy(&self.conn, repo).map_err(|e| self.failed(e))
    }

    /// Every live pin revision (a few per release channel: read whole).
    pub fn pins(&self) -> Result<Vec<PinRecord>, MigrateError> {
        read_pins(&self.conn, None).map_err(|e| self.failed(e))
    }

    /// Every token with its repositories (a few per user: read whole).
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, MigrateError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, secret_sha256, scope, description, created_at, revoked_at
                 FROM tokens ORDER BY id",
            )
            .map_err(|e| self.failed(e))?;
        let rows = stmt
            .query_map([], |row| token_from_row(&self.conn, row))
            .map_err(|e| self.failed(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.failed(e))
    }

    /// Up to `limit` stored NARs (with their repository) after `after` = (repo, url), in
    /// primary-key order.
    pub fn nars_after(
        &self,
        after: Option<&(String, String)>,
        limit: usize,
    ) -> Result<Vec<(String, NarRecord)>, MigrateError> {
        let (repo, url) = after
            .map(|(r, u)| (r.as_str(), u.as_str()))
            .unwrap_or(("", ""));
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {NAR_COLUMNS}, repo FROM nars
                 WHERE (repo, url) > (?1, ?2) ORDER BY repo, url LIMIT ?3"
            ))
            .map_err(|e| self.failed(e))?;
        let rows = stmt
            .query_map(rusqlite::params![repo, url, limit as i64], |row| {
                Ok((row.get::<_, String>(7)?, nar_from_row(row)?))
            })
            .map_err(|e| self.failed(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.failed(e))
    }

    pub fn nar_by_hash(
        &self,
        repo: &str,
        nar_hash: &str,
    ) -> Result<Option<NarRecord>, MigrateError> {
        self.conn
            .query_row(
                &format!(
                    "SELECT {NAR_COLUMNS} FROM nars WHERE repo = ?1 AND nar_hash = ?2
                     ORDER BY created_at LIMIT 1"
                ),
                [repo, nar_hash],
                nar_from_row,
            )
            .optional()
            .map_err(|e| self.failed(e))
    }

    /// Up to `limit` of `repo`'s published narinfos after hash part `after`, by hash part.
    pub fn narinfos_after(
        &self,
        repo: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<PublishedNarInfo>, MigrateError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT hash, store_path, nar_hash, text FROM narinfos
                 WHERE repo = ?1 AND hash > ?2 ORDER BY hash LIMIT ?3",
            )
            .map_err(|e| self.failed(e))?;
        let rows = stmt
            .query_map(rusqlite::params![repo, after, limit as i64], |row| {
                Ok(PublishedNarInfo {
                    hash: row.get(0)?,
                    store_path: row.get(1)?,
                    nar_hash: row.get(2)?,
                    text: row.get(3)?,
                })
            })
            .map_err(|e| self.failed(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.failed(e))
    }

    /// Chunked uploads not completed yet: not migrated (their clients push them again).
    pub fn unfinished_uploads(&self) -> Result<u64, MigrateError> {
        self.conn
            .query_row("SELECT count(*) FROM uploads", [], |row| {
                row.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(|e| self.failed(e))
    }

    /// The file holding object `key`.
    pub fn object_path(&self, key: &str) -> Result<PathBuf, String> {
        if is_safe_key(key) {
            Ok(self.store.join(key))
        } else {
            Err(format!("unsafe storage key {key:?}"))
        }
    }

    /// Every file under `store/<repo>/<dir>/`, as (key, path, size), sorted by key. Objects
    /// without rows (logs, listings, debuginfo links) are found this way.
    pub fn object_files(
        &self,
        repo: &str,
        dir: &str,
    ) -> Result<Vec<(String, PathBuf, u64)>, MigrateError> {
        let mut found = Vec::new();
        let mut pending = vec![format!("{repo}/{dir}")];
        while let Some(prefix) = pending.pop() {
            let path = self.store.join(&prefix);
            let entries = match std::fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(MigrateError::Source(format!(
                        "listing {}: {err}",
                        path.display()
                    )))
                }
            };
            for entry in entries {
                let entry = entry.map_err(|err| {
                    MigrateError::Source(format!("listing {}: {err}", path.display()))
                })?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let key = format!("{prefix}/{name}");
                let meta = entry.metadata().map_err(|err| {
                    MigrateError::Source(format!("{}: {err}", entry.path().display()))
                })?;
                if meta.is_dir() {
                    pending.push(key);
                } else if meta.is_file() && is_safe_key(&key) {
                    // Temporary files of an interrupted write start with '.' (tempfile's
                    // names); they were never objects.
                    if !name.starts_with('.') {
                        found.push((key, entry.path(), meta.len()));
                    }
                }
            }
        }
        found.sort();
        Ok(found)
    }
}
