//! Where the server keeps its state, chosen by configuration: one factory, [`open`], used by
//! `stowix serve` and `stowix admin` alike, so both always see the same repositories.
//!
//! ```text
//!   ServerConfig.database ──► metadata::{sqlite, postgres}  ─┐
//!   ServerConfig.storage  ──► storage::{local, s3}           ─┴─► Backends ──► AppState / admin
//! ```
//! The embedded default (nothing configured) is SQLite and files under the data dir: one
//! machine, nothing to run besides `stowix serve`. PostgreSQL and an S3-compatible bucket hold
//! everything that matters, so any number of replicas can share them.

pub mod metadata;
pub mod storage;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::ServerConfig;
use metadata::{MetaError, MetaResult, Metadata, PostgresMetadata, SqliteMetadata};
use storage::{LocalStorage, S3Storage, Storage};

/// The embedded database's file name in the data dir.
pub const DATABASE_FILE: &str = "stowix.db";

/// The embedded storage's directory in the data dir.
pub const STORE_DIR: &str = "store";

pub struct Backends {
    pub meta: Arc<dyn Metadata>,
    pub storage: Arc<dyn Storage>,
}

/// What `database` names, once parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

/// What `storage` names, once parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageUrl {
    Files(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl DatabaseUrl {
    pub fn of(config: &ServerConfig) -> Result<Self, String> {
        match &config.database {
            None => Ok(DatabaseUrl::Sqlite(config.data_dir.join(DATABASE_FILE))),
            Some(url) => Self::parse(url),
        }
    }

    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            return absolute(path, "database", url).map(DatabaseUrl::Sqlite);
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url.to_string()));
        }
        Err(format!(
            "database URL {:?} is neither sqlite:///ABSOLUTE/PATH nor postgres://USER@HOST:PORT/DB: fix --database (STOWIX_DATABASE_URL) or `database` in the config file",
            redact(url)
        ))
    }
}

impl StorageUrl {
    pub fn of(config: &ServerConfig) -> Result<Self, String> {
        match &config.storage {
            None => Ok(StorageUrl::Files(config.data_dir.join(STORE_DIR))),
            Some(url) => Self::parse(url),
        }
    }

    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("file://") {
            return absolute(path, "storage", url).map(StorageUrl::Files);
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            if bucket.is_empty() || (!prefix.is_empty() && !storage::is_safe_key(prefix)) {
                return Err(format!(
                    "storage URL {url:?} needs a bucket name and an optional prefix of plain path segments: s3://BUCKET[/PREFIX]"
                ));
            }
            return Ok(StorageUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        Err(format!(
            "storage URL {url:?} is neither file:///ABSOLUTE/DIR nor s3://BUCKET[/PREFIX]: fix --storage (STOWIX_STORAGE_URL) or `storage` in the config file"
        ))
    }
}

fn absolute(path: &str, what: &str, url: &str) -> Result<PathBuf, String> {
    let path = Path::new(path);
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Err(format!(
            "{what} URL {url:?} must name an absolute path, with three slashes: {}:///abs/path",
            url.split(':').next().unwrap_or("")
        ))
    }
}

/// A database URL fit for an error message or a log line: without its password.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// Opens the configured metadata database (migrating its schema) and storage.
pub fn open(config: &ServerConfig) -> Result<Backends, String> {
    // A malformed URL is reported as it is, not as a database that failed to open.
    DatabaseUrl::of(config)?;
    let meta = open_metadata(config)
        .map(|meta| -> Arc<dyn Metadata> { Arc::new(metadata::timed::Timed::new(meta)) });
    let meta = meta.map_err(|err| {
        format!(
            "cannot open the metadata database {}: {err}",
            database_label(config)
        )
    })?;
    let storage = open_storage(config)?;
    Ok(Backends { meta, storage })
}

/// The configured storage alone; nothing is contacted yet (S3 answers on first use).
pub fn open_storage(config: &ServerConfig) -> Result<Arc<dyn Storage>, String> {
    Ok(match StorageUrl::of(config)? {
        StorageUrl::Files(root) => Arc::new(
            LocalStorage::new(root.clone())
                .map_err(|err| format!("cannot create storage in {}: {err}", root.display()))?,
        ),
        StorageUrl::S3 { bucket, prefix } => {
            let url = if prefix.is_empty() {
                format!("s3://{bucket}")
            } else {
                format!("s3://{bucket}/{prefix}")
            };
            let endpoint = config.s3_endpoint.as_deref().unwrap_or("");
            Arc::new(S3Storage::new(storage::s3::S3Store::open(
                &url,
                endpoint,
                &config.s3_region,
            )?))
        }
    })
}

/// Connections a server's metadata may use at once: the readers, plus one for writes
/// (PostgreSQL does both on every connection of its pool).
pub fn metadata_connections(config: &ServerConfig) -> usize {
    config.metadata_readers + 1
}

/// The metadata database alone, migrated to this binary's schema; the error keeps its kind
/// (a schema too new, an unreachable server) for callers that act on it.
pub fn open_metadata(config: &ServerConfig) -> MetaResult<Arc<dyn Metadata>> {
    Ok(match DatabaseUrl::of(config).map_err(MetaError::Other)? {
        DatabaseUrl::Sqlite(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|err| {
                    MetaError::Other(format!(
                        "cannot create the database directory {}: {err}",
                        dir.display()
                    ))
                })?;
            }
            Arc::new(SqliteMetadata::open_with_readers(
                &path,
                config.metadata_readers,
            )?)
        }
        DatabaseUrl::Postgres(url) => {
            Arc::new(PostgresMetadata::open(&url, metadata_connections(config))?)
        }
    })
}

/// The database named in `config`, fit for a message: a path, or a URL without its password.
pub fn database_label(config: &ServerConfig) -> String {
    match DatabaseUrl::of(config) {
        Ok(DatabaseUrl::Sqlite(path)) => path.display().to_string(),
        Ok(DatabaseUrl::Postgres(url)) => redact(&url),
        Err(_) => config.database.as_deref().map(redact).unwrap_or_default(),
    }
}

/// Where a database's schema stands, read without changing anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchemaStatus {
    /// 0: nothing created yet.
    pub stored: i64,
    /// What this binary migrates to.
    pub supported: i64,
}

/// The schema version stored in the configured database, without migrating it (a missing
/// SQLite file is version 0 and is not created).
pub fn schema_status(config: &ServerConfig) -> MetaResult<SchemaStatus> {
    match DatabaseUrl::of(config).map_err(MetaError::Other)? {
        DatabaseUrl::Sqlite(path) => {
            let stored = if path.exists() {
                let conn = rusqlite::Connection::open_with_flags(
                    &path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .map_err(|err| MetaError::Other(format!("{}: {err}", path.display())))?;
                conn.query_row("PRAGMA user_version", [], |row| row.get(0))
                    .map_err(|err| MetaError::Other(format!("{}: {err}", path.display())))?
            } else {
                0
            };
            Ok(SchemaStatus {
                stored,
                supported: metadata::sqlite::SCHEMA_VERSION,
            })
        }
        DatabaseUrl::Postgres(url) => Ok(SchemaStatus {
            stored: PostgresMetadata::connect(&url, 1)?.stored_version()?,
            supported: metadata::postgres::SCHEMA_VERSION,
        }),
    }
}

/// Applies the migrations the configured database lacks; returns the versions before and after.
pub fn migrate(config: &ServerConfig) -> MetaResult<(i64, i64)> {
    let before = schema_status(config)?.stored;
    let after = open_metadata(config)?.schema_version()?;
    Ok((before, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_what_is_wrong() {
        assert_eq!(
            DatabaseUrl::parse("sqlite:///var/lib/s.db").unwrap(),
            DatabaseUrl::Sqlite("/var/lib/s.db".into())
        );
        assert!(DatabaseUrl::parse("sqlite://rel.db")
            .unwrap_err()
            .contains("absolute"));
        assert!(matches!(
            DatabaseUrl::parse("postgresql://u@h/db").unwrap(),
            DatabaseUrl::Postgres(_)
        ));
        let err = DatabaseUrl::parse("mysql://u:secret@h/db").unwrap_err();
        assert!(
            err.contains("--database") && !err.contains("secret"),
            "{err}"
        );
        assert_eq!(
            StorageUrl::parse("s3://nars/prod/x").unwrap(),
            StorageUrl::S3 {
                bucket: "nars".into(),
                prefix: "prod/x".into()
            }
        );
        assert_eq!(
            StorageUrl::parse("s3://nars").unwrap(),
            StorageUrl::S3 {
                bucket: "nars".into(),
                prefix: String::new()
            }
        );
        assert!(StorageUrl::parse("s3://nars/../x").is_err());
        assert!(StorageUrl::parse("gs://x")
            .unwrap_err()
            .contains("--storage"));
    }
}
