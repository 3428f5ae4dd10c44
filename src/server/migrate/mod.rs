//! `stowix admin migrate`: copies an embedded installation (SQLite + files under the data dir)
//! into the configured backends (PostgreSQL + S3, or any other pair), kind by kind.
//!
//! ```text
//!   <data dir>/stowix.db (read-only) ─► Source ─┐
//!   <data dir>/store/<key>           ─► Source ─┤  for each kind in KINDS, in order:
//!                                               ▼
//!   repositories ─► retention policies ─► tokens ─► NARs ─► narinfos ─► pin revisions
//!     ─► listings ─► logs ─► debuginfo links
//!                                               │
//!                                               ▼
//!   Target { Metadata, Storage } ◄─ rows and objects the target lacks; what it has stays
//! ```
//! The rules that make it idempotent and resumable (killed at any moment, a rerun finishes):
//! - A row the target has is left alone; one that contradicts the source (another secret key
//!   under a repository name, another secret under a token id) stops the run with
//!   [`MigrateError::Conflict`], never an overwrite.
//! - A NAR goes: intent recorded ─► source bytes checked against FileSize/FileHash ─► object
//!   written (atomically: whole or absent) ─► its size checked in the target ─► `nars` row ─►
//!   intent cleared. A run killed in between leaves an intent the janitor settles (or the
//!   rerun finds the whole object, refreshes the intent and records the row).
//! - A narinfo is published only when the target's `nars` table has its NAR, which by the
//!   order above means the object is complete. A NAR the source stored after the NAR pass (a
//!   server still running) is copied on demand before its narinfo.
//! - Unfinished chunked uploads are not copied: their clients push them again.
//!
//! To migrate another table or object kind: add its reads to `source.rs`, a [`Kind`] in
//! `kinds.rs`, and a line in [`KINDS`] after every kind it refers to.

mod kinds;
pub mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::server::backend::metadata::{MetaError, Metadata};
use crate::server::backend::storage::Storage;
use crate::server::backend::{self, DatabaseUrl, StorageUrl};
use crate::server::config::ServerConfig;
pub use source::Source;

/// What stops a migration, in terms the command line maps to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("bad arguments: {0}")]
    Usage(String),
    #[error("source data dir {}: {why}", dir.display())]
    NoSource { dir: PathBuf, why: String },
    #[error("source data dir {} is not an embedded stowix installation: it {why}", dir.display())]
    NotEmbedded { dir: PathBuf, why: String },
    #[error(
        "source data dir {}: its database has schema version {found}, this stowix reads {supported}",
        dir.display()
    )]
    SourceSchema {
        dir: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("the target is the source: {0}")]
    SameAsTarget(String),
    #[error("the target is unreachable: {0}")]
    Unreachable(String),
    #[error("the target already holds {0}")]
    Conflict(String),
    #[error("reading the source: {0}")]
    Source(String),
    #[error("writing the target: {0}")]
    Target(String),
}

impl From<MetaError> for MigrateError {
    fn from(err: MetaError) -> Self {
        match err {
            MetaError::Unavailable(_) => MigrateError::Unreachable(err.to_string()),
            other => MigrateError::Target(other.to_string()),
        }
    }
}

/// The backends being migrated into, with the runtime their storage calls run on (the
/// metadata calls are synchronous).
pub struct Target {
    pub meta: Arc<dyn Metadata>,
    pub storage: Arc<dyn Storage>,
    runtime: tokio::runtime::Runtime,
    /// The database and storage, for messages (no password).
    pub label: String,
}

impl Target {
    /// The size of the object under `key`, `None` when there is none.
    fn size(&self, key: &str) -> Result<Option<u64>, MigrateError> {
        self.runtime
            .block_on(self.storage.size(key))
            .map_err(|err| MigrateError::Target(err.to_string()))
    }

    /// Writes the object under `key` from the file at `path` (left in place), then checks that
    /// the target holds `size` bytes there.
    fn put_checked(&self, key: &str, path: &Path, size: u64) -> Result<(), MigrateError> {
        self.runtime
            .block_on(self.storage.put_copy(key, path))
            .map_err(|err| MigrateError::Target(err.to_string()))?;
        let stored = self.size(key)?;
        if stored != Some(size) {
            return Err(MigrateError::Target(format!(
                "object {key} holds {stored:?} bytes after writing {size}"
            )));
        }
        Ok(())
    }
}

/// What one kind's copy did.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Written to the target by this run.
    pub copied: u64,
    /// Already in the target: left alone.
    pub present: u64,
    /// Object bytes written by this run.
    pub bytes: u64,
    /// Items the source could not give (a NAR file missing or not matching its row).
    pub failed: u64,
    /// The first few of those, for the summary.
    pub failures: Vec<String>,
}

/// Failures listed by name in the summary; the count covers the rest.
const FAILURES_SHOWN: usize = 10;

impl Tally {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < FAILURES_SHOWN {
            self.failures.push(what);
        }
    }
}

/// Progress of a migration, called by the engine; the command line prints it.
pub trait Reporter {
    /// After each item of `kind` (implementations throttle).
    fn progress(&self, kind: &str, tally: &Tally);
    /// When `kind` is finished.
    fn done(&self, kind: &str, tally: &Tally);
}

/// A kind of thing a migration copies: one table, or one family of objects.
trait Kind: Sync {
    /// Plural, as the summary prints it.
    fn name(&self) -> &'static str;
    fn copy(&self, run: &Migration<'_>, tally: &mut Tally) -> Result<(), MigrateError>;
}

/// The kinds, in copy order: each refers only to kinds before it (tokens name repositories,
/// narinfos name NARs, listings and debuginfo links describe NARs). Add new kinds here.
const KINDS: &[&dyn Kind] = &[
    &kinds::Repos,
    &kinds::Policies,
    &kinds::Tokens,
    &kinds::Nars,
    &kinds::Narinfos,
    &kinds::Pins,
    &kinds::Objects::LISTINGS,
    &kinds::Objects::LOGS,
    &kinds::Objects::DEBUGINFO,
];

/// One run: the source, the target and where progress goes.
pub struct Migration<'a> {
    source: &'a Source,
    target: &'a Target,
    reporter: &'a dyn Reporter,
}

/// What a whole run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub kinds: Vec<(&'static str, Tally)>,
    /// Chunked uploads left behind in the source.
    pub unfinished_uploads: u64,
}

impl Summary {
    pub fn copied(&self) -> u64 {
        self.kinds.iter().map(|(_, t)| t.copied).sum()
    }
    pub fn failed(&self) -> u64 {
        self.kinds.iter().map(|(_, t)| t.failed).sum()
    }
}

/// Opens the source and the target `config` names, refusing a target that is the source
/// and checking that both backends of the target answer.
pub fn prepare(config: &ServerConfig, from: &Path) -> Result<(Source, Target), MigrateError> {
    if config.database.is_none() || config.storage.is_none() {
        return Err(MigrateError::Usage(
            "the target needs both --database and --storage (or STOWIX_DATABASE_URL and STOWIX_STORAGE_URL, or `database` and `storage` in --config)".into(),
        ));
    }
    let database = DatabaseUrl::of(config).map_err(MigrateError::Usage)?;
    let storage_url = StorageUrl::of(config).map_err(MigrateError::Usage)?;
    let source = Source::open(from)?;
    if let DatabaseUrl::Sqlite(path) = &database {
        if same_path(path, &source.db_path) {
            return Err(MigrateError::SameAsTarget(format!(
                "--database names the source's own {}",
                source.db_path.display()
            )));
        }
    }
    if let StorageUrl::Files(root) = &storage_url {
        let (root, store) = (canonical(root), canonical(&source.store));
        if root.starts_with(&store) || store.starts_with(&root) {
            return Err(MigrateError::SameAsTarget(format!(
                "--storage {} overlaps the source's store {}",
                root.display(),
                store.display()
            )));
        }
    }
    let label = format!(
        "{} + {}",
        backend::database_label(config),
        config.storage.as_deref().unwrap_or_default()
    );
    let meta = backend::open_metadata(config)?;
    let storage = backend::open_storage(config).map_err(MigrateError::Usage)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| MigrateError::Target(format!("cannot start a runtime: {err}")))?;
    runtime
        .block_on(storage.health())
        .map_err(|err| MigrateError::Unreachable(err.to_string()))?;
    Ok((
        source,
        Target {
            meta,
            storage,
            runtime,
            label,
        },
    ))
}

/// Copies every kind; stops at the first error that no item-by-item skip can answer.
pub fn run(
    source: &Source,
    target: &Target,
    reporter: &dyn Reporter,
) -> Result<Summary, MigrateError> {
    let run = Migration {
        source,
        target,
        reporter,
    };
    let mut summary = Summary {
        unfinished_uploads: source.unfinished_uploads()?,
        ..Summary::default()
    };
    for kind in KINDS {
        let mut tally = Tally::default();
        kind.copy(&run, &mut tally)?;
        reporter.done(kind.name(), &tally);
        summary.kinds.push((kind.name(), tally));
    }
    Ok(summary)
}

/// The path with symlinks resolved, as far as it exists (a target not created yet is compared
/// through its existing parent).
fn canonical(path: &Path) -> PathBuf {
    if let Ok(path) = path.canonicalize() {
        return path;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => canonical(parent).join(name),
        _ => path.to_path_buf(),
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    canonical(a) == canonical(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::hash::Sha256Hash;
    use crate::server::backend::metadata::{
        NarRecord, PublishedNarInfo, RepoRecord, Scope, SqliteMetadata, TokenRecord,
    };

    struct Silent;
    impl Reporter for Silent {
        fn progress(&self, _: &str, _: &Tally) {}
        fn done(&self, _: &str, _: &Tally) {}
    }

    fn tally<'a>(summary: &'a Summary, kind: &str) -> &'a Tally {
        &summary.kinds.iter().find(|(k, _)| *k == kind).unwrap().1
    }

    /// A NAR row and its file under `store/`; `damaged` writes other bytes than the row says.
    fn add_nar(meta: &SqliteMetadata, store: &Path, name: &str, damaged: bool) -> NarRecord {
        let bytes = format!("compressed nar of {name}").into_bytes();
        let hash = Sha256Hash::digest(&bytes);
        let url = format!("nar/{}.nar.xz", hash.to_nix32());
        let nar = NarRecord {
            object_key: format!("r/{url}"),
            url,
            compression: "xz".into(),
            nar_hash: Sha256Hash::digest(name.as_bytes()).to_typed_nix32(),
            nar_size: 100,
            file_hash: hash.to_typed_nix32(),
            file_size: bytes.len() as u64,
        };
        let path = store.join(&nar.object_key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, if damaged { b"other".to_vec() } else { bytes }).unwrap();
        assert!(meta.insert_nar("r", &nar).unwrap());
        let hash_part = format!("{:0<32}", name);
        meta.publish(
            "r",
            &[PublishedNarInfo {
                hash: hash_part.clone(),
                store_path: format!("/nix/store/{hash_part}-{name}"),
                nar_hash: nar.nar_hash.clone(),
                text: format!("StorePath: /nix/store/{hash_part}-{name}\n"),
            }],
        )
        .unwrap();
        nar
    }

    #[test]
    fn copies_into_sqlite_and_files_once_and_skips_damaged_nars() {
        let dir = tempfile::tempdir().unwrap();
        let source_dir = dir.path().join("source");
        let store = source_dir.join("store");
        std::fs::create_dir_all(&store).unwrap();
        let meta = SqliteMetadata::open(&source_dir.join("stowix.db")).unwrap();
        let repo = RepoRecord {
            name: "r".into(),
            private: true,
            secret_key: crate::nix::signing::SecretKey::generate("r").to_text(),
            priority: 30,
            upstream_keys: vec![],
        };
        assert!(meta.create_repo(&repo).unwrap());
        meta.create_token(&TokenRecord {
            id: "a".repeat(26),
            secret_sha256: [7; 32],
            scope: Scope::Push,
            repos: vec!["r".into()],
            description: "ci".into(),
            created_at: 5,
            revoked_at: Some(9),
        })
        .unwrap();
        add_nar(&meta, &store, "good", false);
        let bad = add_nar(&meta, &store, "bad", true);
        std::fs::create_dir_all(store.join("r/log/identity")).unwrap();
        std::fs::write(store.join("r/log/identity/x.drv"), b"log").unwrap();
        drop(meta);

        let config = ServerConfig {
            database: Some(format!(
                "sqlite://{}",
                dir.path().join("target.db").display()
            )),
            storage: Some(format!("file://{}", dir.path().join("objects").display())),
            data_dir: dir.path().join("unused"),
            ..ServerConfig::default()
        };
        let (source, target) = prepare(&config, &source_dir).unwrap();
        let first = run(&source, &target, &Silent).unwrap();
        assert_eq!(tally(&first, "repositories").copied, 1);
        assert_eq!(tally(&first, "tokens").copied, 1);
        assert_eq!(tally(&first, "NARs").copied, 1);
        // The damaged file is reported, and its narinfo is not published over nothing.
        assert_eq!(tally(&first, "NARs").failed, 1);
        assert_eq!(tally(&first, "narinfos").copied, 1);
        assert_eq!(tally(&first, "narinfos").failed, 1);
        assert_eq!(tally(&first, "build logs").copied, 1);
        let copied = target.meta.repo("r").unwrap().unwrap();
        assert_eq!(
            (copied.secret_key, copied.private, copied.priority),
            (repo.secret_key.clone(), true, 30)
        );
        let token = target.meta.token(&"a".repeat(26)).unwrap().unwrap();
        assert_eq!((token.revoked_at, token.secret_sha256), (Some(9), [7; 32]));
        assert!(target.meta.nar_by_url("r", &bad.url).unwrap().is_none());
        assert!(dir.path().join("objects/r/log/identity/x.drv").exists());
        assert!(target
            .meta
            .object_intents_before(i64::MAX, 10)
            .unwrap()
            .is_empty());

        let second = run(&source, &target, &Silent).unwrap();
        assert_eq!(second.copied(), 0);
        assert_eq!(tally(&second, "NARs").present, 1);

        // Another key under the same name is a conflict, never an overwrite.
        let other_dir = dir.path().join("other");
        std::fs::create_dir_all(&other_dir).unwrap();
        let other = SqliteMetadata::open(&other_dir.join("stowix.db")).unwrap();
        other
            .create_repo(&RepoRecord {
                secret_key: crate::nix::signing::SecretKey::generate("r").to_text(),
                ..repo
            })
            .unwrap();
        drop(other);
        let (other_source, target) = prepare(&config, &other_dir).unwrap();
        let err = run(&other_source, &target, &Silent).unwrap_err();
        assert!(
            matches!(&err, MigrateError::Conflict(m) if m.contains("'r'")),
            "{err}"
        );
    }
}
