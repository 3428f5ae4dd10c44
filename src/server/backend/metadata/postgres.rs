//! PostgreSQL metadata: the backend that lets any number of `stowix serve` replicas (and
//! `stowix admin`) share one database. Same tables and the same answers as the SQLite backend;
//! the atomic steps (`open_upload`'s caps, `add_upload_part`'s compare-and-set, `publish`) are
//! made atomic across replicas with row locks and transaction-scoped advisory locks.
//!
//! ```text
//!  caller thread (spawn_blocking, admin, test)   background runtime (1 thread, owned here)
//!  ───────────────────────────────────────────   ──────────────────────────────────────────
//!  Metadata call
//!    └─► Pool::get ── idle connection ─────┐
//!          └── none idle: connect ───────────►  tokio_postgres::connect, then one task per
//!                                           │   connection drives its socket (and notices a
//!    block_on(client future) ◄── channels ──┴─► lost connection at once: is_closed() is true,
//!      (on the caller's thread;                 so the pool drops it instead of handing it out)
//!       a deadline bounds it)                                  │
//!                                                              ▼
//!                                                          PostgreSQL
//! ```
//!
//! The client half of a `tokio_postgres` connection is runtime-agnostic (it only talks to the
//! connection task through channels), so the calling thread polls it with a tiny `block_on` of
//! its own. That works from any thread, including tokio's `spawn_blocking` threads and a thread
//! inside another runtime, which a `Runtime::block_on` per call (the `postgres` crate) would not.
//!
//! Schema: numbered migration steps applied in one transaction under an advisory lock, so
//! replicas starting together migrate once; the version is the single row of
//! `stowix_schema_version`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    now_unix, publication_verdicts, to_i64, DeadSet, GcSession, LiveSet, MetaError, MetaResult,
    Metadata, NarInfoFacts, NarRecord, OpenedUpload, PathDeletion, PinCreated, PinRecord, Presence,
    PublishState, PublishedNarInfo, RemovedPath, RepoRecord, RepoUsage, RetentionPolicy, Scope,
    SessionCaps, SingletonGuard, Swept, TokenRecord, UploadPart, UploadRecord,
};

/// A statement on the `nars` rows no narinfo names (`$1` is the repository): `$head`'s
/// conditions, that one, then `$tail` (ordering, locking, returning).
macro_rules! unnamed_nars {
    ($head:literal, $tail:literal) => {
        concat!(
            $head,
            " AND NOT EXISTS (SELECT 1 FROM narinfos n WHERE n.repo = $1 AND n.nar_url = nars.url) ",
            $tail
        )
    };
}

/// The schema this binary writes. A database at a higher version was migrated by a newer
/// binary, and this one refuses it rather than misread it.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Step N takes the schema from version N-1 to N.
const MIGRATIONS: &[&str] = &[
    // 1: the schema as the embedded backend had it before versioning.
    r#"
    CREATE TABLE repos (
        name TEXT COLLATE "C" PRIMARY KEY,
        private BOOLEAN NOT NULL,
        secret_key TEXT NOT NULL,
        priority BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT COLLATE "C" PRIMARY KEY,
        secret_sha256 BYTEA NOT NULL,
        scope TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        revoked_at BIGINT
    );
    CREATE TABLE token_repos (
        token_id TEXT COLLATE "C" NOT NULL REFERENCES tokens(id),
        repo TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (token_id, repo)
    );
    CREATE TABLE nars (
        repo TEXT COLLATE "C" NOT NULL,
        url TEXT COLLATE "C" NOT NULL,
        compression TEXT NOT NULL,
        nar_hash TEXT COLLATE "C" NOT NULL,
        nar_size BIGINT NOT NULL,
        file_hash TEXT NOT NULL,
        file_size BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (repo, url)
    );
    CREATE INDEX nars_by_nar_hash ON nars (repo, nar_hash);
    CREATE TABLE narinfos (
        repo TEXT COLLATE "C" NOT NULL,
        hash TEXT COLLATE "C" NOT NULL,
        store_path TEXT NOT NULL,
        nar_hash TEXT NOT NULL,
        text TEXT NOT NULL,
        published_at BIGINT NOT NULL,
        PRIMARY KEY (repo, hash)
    );
    CREATE TABLE uploads (
        id TEXT COLLATE "C" PRIMARY KEY,
        repo TEXT COLLATE "C" NOT NULL,
        nar_hash TEXT COLLATE "C" NOT NULL,
        nar_size BIGINT NOT NULL,
        compression TEXT COLLATE "C" NOT NULL,
        encoder TEXT COLLATE "C" NOT NULL,
        created_at BIGINT NOT NULL,
        token_id TEXT COLLATE "C" NOT NULL DEFAULT ''
    );
    CREATE UNIQUE INDEX uploads_one_per_key ON uploads (repo, nar_hash, compression, encoder);
    CREATE INDEX uploads_by_token ON uploads (token_id);
    "#,
    // 2: objects in a Storage that may be shared (S3), multipart staging, and write intents.
    r#"
    ALTER TABLE nars ADD COLUMN object_key TEXT COLLATE "C";
    UPDATE nars SET object_key = repo || '/' || url;
    ALTER TABLE nars ALTER COLUMN object_key SET NOT NULL;
    CREATE INDEX nars_by_object_key ON nars (object_key);
    ALTER TABLE uploads ADD COLUMN staging_id TEXT;
    ALTER TABLE uploads ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0;
    UPDATE uploads SET updated_at = created_at;
    CREATE INDEX uploads_by_activity ON uploads (updated_at);
    CREATE TABLE upload_parts (
        upload_id TEXT COLLATE "C" NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
        number BIGINT NOT NULL,
        size BIGINT NOT NULL,
        etag TEXT NOT NULL,
        PRIMARY KEY (upload_id, number)
    );
    CREATE TABLE object_intents (
        key TEXT COLLATE "C" PRIMARY KEY,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX object_intents_by_age ON object_intents (created_at);
    "#,
    // 3: upstream caches a repository trusts. Repositories from before keep none: filtering
    // would change what their pushes upload.
    r#"
    ALTER TABLE repos ADD COLUMN upstream_keys TEXT[] NOT NULL DEFAULT '{}';
    "#,
    // 4: retention (`gc.rs`): last use, who references whom (filled from the texts of the
    // narinfos published so far), the NAR each narinfo names, policies, pins, and NARs marked
    // unreferenced.
    r#"
    ALTER TABLE narinfos ADD COLUMN last_used_at BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE narinfos ADD COLUMN nar_url TEXT COLLATE "C" NOT NULL DEFAULT '';
    UPDATE narinfos SET last_used_at = published_at,
        nar_url = COALESCE(substring(text from '(?n)^URL: ([^\s]+)'), '');
    CREATE INDEX narinfos_by_last_use ON narinfos (repo, last_used_at);
    CREATE INDEX narinfos_by_nar_url ON narinfos (repo, nar_url);
    CREATE TABLE narinfo_refs (
        repo TEXT COLLATE "C" NOT NULL,
        hash TEXT COLLATE "C" NOT NULL,
        ref_hash TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (repo, hash, ref_hash)
    );
    INSERT INTO narinfo_refs (repo, hash, ref_hash)
    SELECT DISTINCT n.repo, n.hash, substr(r.basename, 1, 32)
    FROM narinfos n,
         regexp_split_to_table(
             COALESCE(substring(n.text from '(?n)^References: ([^\n]*)$'), ''), ' ')
             AS r(basename)
    WHERE length(r.basename) >= 32 AND substr(r.basename, 1, 32) <> n.hash;
    CREATE INDEX narinfo_refs_by_ref ON narinfo_refs (repo, ref_hash);
    ALTER TABLE repos ADD COLUMN retention_secs BIGINT;
    ALTER TABLE repos ADD COLUMN max_size_bytes BIGINT;
    ALTER TABLE nars ADD COLUMN orphaned_at BIGINT;
    CREATE INDEX nars_by_orphaned ON nars (repo, orphaned_at);
    CREATE TABLE pins (
        repo TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        keep BIGINT,
        next_revision BIGINT NOT NULL,
        PRIMARY KEY (repo, name)
    );
    CREATE TABLE pin_revisions (
        repo TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        revision BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (repo, name, revision)
    );
    CREATE TABLE pin_roots (
        repo TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        revision BIGINT NOT NULL,
        hash TEXT COLLATE "C" NOT NULL,
        store_path TEXT NOT NULL,
        PRIMARY KEY (repo, name, revision, hash)
    );
    CREATE INDEX pin_roots_by_repo ON pin_roots (repo, hash);
    "#,
];

/// Longest a single metadata call may take, waiting for a connection included. A database
/// that hangs (rather than refusing) turns into `Unavailable` instead of a stuck request.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Used when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Advisory-lock namespaces: each lock key is a hash of (namespace, name).
const MIGRATION_LOCK: &str = "stowix schema migration";
const SINGLETON_LOCK: &str = "stowix singleton";
const TOKEN_SESSIONS_LOCK: &str = "stowix upload sessions of token";
const REPO_SESSIONS_LOCK: &str = "stowix upload sessions of repository";

fn advisory_key(namespace: &str, name: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(namespace.as_bytes())
        .chain_update([0u8])
        .chain_update(name.as_bytes())
        .finalize();
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(key)
}

/// PostgreSQL behind the [`Metadata`] trait, with a pool of at most `pool_size` connections.
pub struct PostgresMetadata {
    pool: Pool,
}

impl std::fmt::Debug for PostgresMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresMetadata")
            .field("database", &self.pool.target.shown)
            .finish()
    }
}

impl PostgresMetadata {
    /// The compare-and-set behind chunk appends and tail replacements. The session's row lock
    /// serialises them across replicas, and the parts' sum is read after it is granted, so it
    /// includes what the previous holder committed. If the session exists, its parts total
    /// exactly `offset` bytes and `fits` accepts their count, `write` (with `params`) must
    /// change exactly one part row; then the session is touched. False otherwise, with
    /// nothing written.
    fn write_part_at(
        &self,
        id: &str,
        offset: u64,
        at: i64,
        fits: impl Fn(i64) -> bool,
        write: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> MetaResult<bool> {
        self.call(false, async |c| {
            let lock = c
                .prepare("SELECT 1 FROM uploads WHERE id = $1 FOR UPDATE")
                .await?;
            let recorded = c
                .prepare(
                    "SELECT COALESCE(SUM(size), 0)::BIGINT, COUNT(*) FROM upload_parts
                     WHERE upload_id = $1",
                )
                .await?;
            let write = c.prepare(write).await?;
            let touch = c
                .prepare("UPDATE uploads SET updated_at = GREATEST(updated_at, $2) WHERE id = $1")
                .await?;
            let tx = c.client.transaction().await?;
            if tx.query_opt(&lock, &[&id]).await?.is_none() {
                return Ok(false);
            }
            let row = tx.query_one(&recorded, &[&id]).await?;
            let (held, parts): (i64, i64) = (row.get(0), row.get(1));
            if held != to_i64(offset) || !fits(parts) || tx.execute(&write, params).await? != 1 {
                return Ok(false);
            }
            tx.execute(&touch, &[&id, &at]).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Connects, applies pending migrations, and refuses a schema newer than this binary's.
    pub fn open(url: &str, pool_size: usize) -> MetaResult<Self> {
        let meta = Self::connect(url, pool_size)?;
        let (before, after) = meta.migrate()?;
        if before != after {
            tracing::info!(
                "migrated the PostgreSQL schema at {} from version {before} to {after}",
                meta.pool.target
            );
        }
        tracing::info!(
            "metadata: PostgreSQL at {}, schema version {after}, up to {} connections",
            meta.pool.target,
            meta.pool.max
        );
        Ok(meta)
    }

    /// Connects without touching the schema (for `stowix admin db status`). One connection is
    /// made at once, so a wrong URL or a database that is down fails here, not at first use.
    pub fn connect(url: &str, pool_size: usize) -> MetaResult<Self> {
        let target = ConnectTarget::parse(url).map_err(MetaError::Other)?;
        let runtime = BackgroundRuntime::start()?;
        let pool = Pool {
            target,
            runtime,
            max: pool_size.max(1),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        };
        let first = pool.connect()?;
        pool.put_back(first, false);
        Ok(PostgresMetadata { pool })
    }

    /// The version recorded in the database; 0 for a database Stowix never migrated.
    pub fn stored_version(&self) -> MetaResult<i64> {
        self.call(true, async |c| {
            let exists = c
                .client
                .query_one(
                    "SELECT to_regclass('stowix_schema_version') IS NOT NULL",
                    &[],
                )
                .await?
                .get::<_, bool>(0);
            if !exists {
                return Ok(0);
            }
            let row = c
                .client
                .query_opt("SELECT version FROM stowix_schema_version", &[])
                .await?;
            Ok(row.map(|r| r.get::<_, i64>(0)).unwrap_or(0))
        })
    }

    /// Applies the steps the database lacks, all in one transaction under an advisory lock (a
    /// second replica starting at the same moment waits, then finds nothing left to do).
    /// Returns the version before and after.
    pub fn migrate(&self) -> MetaResult<(i64, i64)> {
        self.call(false, async |c| {
            let tx = c.client.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&advisory_key(MIGRATION_LOCK, "")],
            )
            .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS stowix_schema_version (
                     one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
                     version BIGINT NOT NULL,
                     migrated_at BIGINT NOT NULL
                 )",
            )
            .await?;
            let found = tx
                .query_opt("SELECT version FROM stowix_schema_version", &[])
                .await?
                .map(|row| row.get::<_, i64>(0))
                .unwrap_or(0);
            if found > SCHEMA_VERSION {
                return Err(Fail::Meta(MetaError::SchemaTooNew {
                    found,
                    supported: SCHEMA_VERSION,
                }));
            }
            for step in MIGRATIONS.iter().skip(found.max(0) as usize) {
                tx.batch_execute(step).await?;
            }
            if found < SCHEMA_VERSION {
                tx.execute(
                    "INSERT INTO stowix_schema_version (one, version, migrated_at)
                     VALUES (TRUE, $1, $2)
                     ON CONFLICT (one) DO UPDATE SET version = $1, migrated_at = $2",
                    &[&SCHEMA_VERSION, &now_unix()],
                )
                .await?;
            }
            tx.commit().await?;
            Ok((found, SCHEMA_VERSION))
        })
    }

    /// Runs `op` on a pooled connection, on this thread, within [`CALL_TIMEOUT`]. With `retry`
    /// (reads only: a write whose reply was lost may have committed), a connection that turns
    /// out dead after sitting idle is replaced once, so a restarted database costs no failed read.
    fn call<T>(
        &self,
        retry: bool,
        op: impl AsyncFn(&mut Conn) -> Result<T, Fail>,
    ) -> MetaResult<T> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let mut attempts = if retry { 2 } else { 1 };
        loop {
            attempts -= 1;
            let mut pooled = self.pool.get(deadline)?;
            let outcome = block_on(op(pooled.conn()), deadline);
            let failure = match outcome {
                Some(Ok(value)) => {
                    pooled.release();
                    return Ok(value);
                }
                Some(Err(Fail::Meta(err))) => {
                    pooled.release();
                    return Err(err);
                }
                Some(Err(Fail::Pg(err))) => err,
                None => {
                    pooled.discard();
                    return Err(MetaError::Unavailable(format!(
                        "PostgreSQL at {} did not answer within {} s",
                        self.pool.target,
                        CALL_TIMEOUT.as_secs()
                    )));
                }
            };
            let lost = connection_lost(&failure);
            let reused = pooled.reused;
            if lost || pooled.is_closed() {
                pooled.discard();
            } else {
                pooled.release();
            }
            if lost {
                // What killed one idle connection (a restart, a failover) killed the others
                // too: a retry on one of them would fail the same way.
                self.pool.discard_idle();
            }
            if lost && reused && attempts > 0 {
                tracing::debug!("PostgreSQL connection lost while idle, retrying: {failure}");
                continue;
            }
            return Err(meta_error(&failure, &self.pool.target));
        }
    }
}

/// A failure inside a call: from PostgreSQL, or decided by the call itself.
enum Fail {
    Pg(tokio_postgres::Error),
    Meta(MetaError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(err: tokio_postgres::Error) -> Self {
        Fail::Pg(err)
    }
}

/// SQLSTATEs that mean the connection (or the server) went away, not that the statement was
/// wrong: class 08 (connection exception), the 57P0x shutdowns (a restart, or
/// `pg_terminate_backend`), and too many connections.
fn lost_state(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

fn connection_lost(err: &tokio_postgres::Error) -> bool {
    match err.code() {
        Some(code) => lost_state(code.code()),
        None => {
            err.is_closed()
                || std::error::Error::source(err)
                    .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some())
        }
    }
}

/// What a client sees (through `ServerError`, which logs it): the server's message and
/// SQLSTATE, never the SQL text or the URL's password.
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => err.to_string(),
    }
}

fn meta_error(err: &tokio_postgres::Error, target: &ConnectTarget) -> MetaError {
    let code = err.code().map(|code| code.code());
    if code == Some("53100") {
        return MetaError::Full(format!(
            "PostgreSQL at {target} is out of disk space: {}",
            describe(err)
        ));
    }
    if connection_lost(err) {
        return MetaError::Unavailable(format!(
            "lost the connection to PostgreSQL at {target}: {}",
            describe(err)
        ));
    }
    MetaError::Other(format!("PostgreSQL at {target}: {}", describe(err)))
}

// ---------------------------------------------------------------------------------------------
// Connecting: the URL, TLS, and the runtime that drives the sockets.

/// Where to connect, parsed once. `sslmode` and `sslrootcert` are read here (tokio-postgres
/// knows neither `verify-ca`/`verify-full` nor `sslrootcert`); the rest of the URL is
/// tokio-postgres's to parse.
struct ConnectTarget {
    config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    /// `host:port/dbname` for messages: never the password.
    shown: String,
}

impl std::fmt::Display for ConnectTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl ConnectTarget {
    fn parse(text: &str) -> Result<ConnectTarget, String> {
        let mut url = url::Url::parse(text).map_err(|err| {
            format!("the database URL is not a valid postgres:// URL ({err}); expected postgres://user@host:5432/dbname")
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!(
                "the database URL must start with postgres://, not {}://",
                url.scheme()
            ));
        }
        let mut sslmode = String::from("prefer");
        let mut root_cert = None;
        let mut has_connect_timeout = false;
        let mut has_application_name = false;
        let mut kept = Vec::new();
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "sslmode" => sslmode = value.into_owned(),
                "sslrootcert" => root_cert = Some(value.into_owned()),
                _ => {
                    has_connect_timeout |= key == "connect_timeout";
                    has_application_name |= key == "application_name";
                    kept.push((key.into_owned(), value.into_owned()));
                }
            }
        }
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        let shown = format!(
            "{}:{}{}",
            url.host_str().unwrap_or("localhost"),
            url.port().unwrap_or(5432),
            url.path()
        );
        let mut config: tokio_postgres::Config = url
            .as_str()
            .parse()
            .map_err(|err| format!("the database URL for {shown} is not valid: {err}"))?;
        if !has_connect_timeout {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if !has_application_name {
            config.application_name("stowix");
        }
        let (mode, tls) = match sslmode.as_str() {
            "disable" => (SslMode::Disable, None),
            // libpq's meaning: encrypt, but check the certificate only when a CA is given.
            "prefer" | "require" => {
                let verify = root_cert.is_some();
                let mode = if sslmode == "prefer" {
                    SslMode::Prefer
                } else {
                    SslMode::Require
                };
                (mode, Some(tls_config(root_cert.as_deref(), verify)?))
            }
            "verify-ca" | "verify-full" => (
                SslMode::Require,
                Some(tls_config(root_cert.as_deref(), true)?),
            ),
            other => {
                return Err(format!(
                    "sslmode={other} in the database URL is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            }
        };
        config.ssl_mode(mode);
        Ok(ConnectTarget {
            config,
            tls: tls.map(MakeRustlsConnect::new),
            shown,
        })
    }
}

/// rustls settings for the connection. Verified: against `root_cert` (a PEM file, as libpq's
/// `sslrootcert`) or else the public web roots, host name included (so `verify-ca` is as strict
/// as `verify-full`). Not verified: encrypted against passive eavesdropping only, which is what
/// libpq's `sslmode=require` gives.
fn tls_config(root_cert: Option<&str>, verify: bool) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS setup for PostgreSQL failed: {err}"))?;
    if !verify {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|err| format!("cannot read sslrootcert {path}: {err}"))?;
            for cert in certs {
                let cert = cert.map_err(|err| format!("cannot read sslrootcert {path}: {err}"))?;
                roots.add(cert).map_err(|err| {
                    format!("sslrootcert {path} holds an unusable certificate: {err}")
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Accepts any server certificate but still checks the handshake signatures.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One worker thread that drives every connection's socket. Shut down without waiting when
/// the last holder goes, which may be inside another runtime (where a plain drop would panic).
struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl BackgroundRuntime {
    fn start() -> MetaResult<Arc<BackgroundRuntime>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("stowix-postgres")
            .enable_all()
            .build()
            .map_err(|err| {
                MetaError::Other(format!("cannot start the PostgreSQL I/O thread: {err}"))
            })?;
        Ok(Arc::new(BackgroundRuntime(Some(runtime))))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("runtime present until drop")
            .handle()
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// One connection and the statements prepared on it.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    /// Keeps the runtime driving this connection alive while the connection is.
    _runtime: Arc<BackgroundRuntime>,
}

impl Conn {
    /// Prepared once per connection: later calls skip the parse round trip.
    async fn prepare(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// Opens a connection on the background runtime and waits for it on this thread.
fn open_connection(target: &ConnectTarget, runtime: &Arc<BackgroundRuntime>) -> MetaResult<Conn> {
    let (sender, receiver) = std::sync::mpsc::channel();
    let config = target.config.clone();
    let tls = target.tls.clone();
    runtime.handle().spawn(async move {
        // Each arm spawns its own connection type; the client halves are the same type.
        let connected = match tls {
            Some(tls) => config.connect(tls).await.map(|(client, connection)| {
                tokio::spawn(drive(connection));
                client
            }),
            None => config.connect(NoTls).await.map(|(client, connection)| {
                tokio::spawn(drive(connection));
                client
            }),
        };
        let _ = sender.send(connected);
    });
    let waited = target
        .config
        .get_connect_timeout()
        .copied()
        .unwrap_or(CONNECT_TIMEOUT)
        + Duration::from_secs(5);
    match receiver.recv_timeout(waited) {
        Ok(Ok(client)) => Ok(Conn {
            client,
            statements: HashMap::new(),
            _runtime: runtime.clone(),
        }),
        Ok(Err(err)) => Err(connect_error(&err, target)),
        Err(_) => Err(MetaError::Unavailable(format!(
            "PostgreSQL at {target} did not accept a connection within {} s",
            waited.as_secs()
        ))),
    }
}

async fn drive<F: Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(err) = connection.await {
        tracing::debug!("PostgreSQL connection ended: {err}");
    }
}

/// Refused, unreachable, timed out or shutting down: `Unavailable` (worth retrying). A wrong
/// password, user or database name: `Other` (retrying will not help).
fn connect_error(err: &tokio_postgres::Error, target: &ConnectTarget) -> MetaError {
    match err.code().map(|code| code.code()) {
        Some(code) if lost_state(code) => MetaError::Unavailable(format!(
            "PostgreSQL at {target} refused the connection: {}",
            describe(err)
        )),
        Some(_) => MetaError::Other(format!(
            "PostgreSQL at {target} refused the connection: {}; check the user, password and database name in the database URL",
            describe(err)
        )),
        // A certificate that does not verify stays so on retry: a settings problem.
        None if is_tls_failure(err) => MetaError::Other(format!(
            "TLS with PostgreSQL at {target} failed: {}; check sslmode and sslrootcert in the database URL",
            error_chain(err)
        )),
        None => MetaError::Unavailable(format!(
            "cannot connect to PostgreSQL at {target}: {}; is the server running and reachable?",
            error_chain(err)
        )),
    }
}

fn is_tls_failure(err: &tokio_postgres::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(current) = source {
        if current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<rustls::Error>())
            || current.is::<rustls::Error>()
        {
            return true;
        }
        source = current.source();
    }
    err.to_string().contains("TLS")
}

/// `err` and its causes, one after another: tokio-postgres puts the useful part (refused,
/// certificate unknown) in the source.
fn error_chain(err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(current) = source {
        let part = current.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = current.source();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// The pool.

struct Pool {
    target: ConnectTarget,
    runtime: Arc<BackgroundRuntime>,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Conn>,
    /// Connections in existence: idle, lent out, or being opened.
    open: usize,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn connect(&self) -> MetaResult<Conn> {
        self.lock().open += 1;
        let conn = open_connection(&self.target, &self.runtime);
        if conn.is_err() {
            self.lock().open -= 1;
            self.freed.notify_one();
        }
        conn
    }

    /// An idle live connection, else a new one while under `max`, else the first one freed.
    fn get(&self, deadline: Instant) -> MetaResult<Pooled<'_>> {
        let mut state = self.lock();
        loop {
            while let Some(conn) = state.idle.pop() {
                if conn.client.is_closed() {
                    state.open -= 1;
                    continue;
                }
                return Ok(Pooled {
                    pool: self,
                    conn: Some(conn),
                    reused: true,
                });
            }
            if state.open < self.max {
                drop(state);
                let conn = self.connect()?;
                return Ok(Pooled {
                    pool: self,
                    conn: Some(conn),
                    reused: false,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MetaError::Unavailable(format!(
                    "all {} connections to PostgreSQL at {} stayed busy for {} s; raise metadata_readers if this persists",
                    self.max,
                    self.target,
                    CALL_TIMEOUT.as_secs()
                )));
            }
            state = self
                .freed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Closes every idle connection; new ones are opened as calls need them.
    fn discard_idle(&self) {
        let mut state = self.lock();
        let idle = std::mem::take(&mut state.idle);
        state.open -= idle.len();
        drop(state);
        drop(idle);
        self.freed.notify_all();
    }

    fn put_back(&self, conn: Conn, broken: bool) {
        let mut state = self.lock();
        if broken || conn.client.is_closed() {
            state.open -= 1;
        } else {
            state.idle.push(conn);
        }
        drop(state);
        self.freed.notify_one();
    }
}

/// A lent connection: back to the pool when released, closed when discarded (or dropped
/// during a panic, when its state is unknown).
struct Pooled<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
    /// Taken from the idle list rather than opened for this call.
    reused: bool,
}

impl Pooled<'_> {
    fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("connection present until released")
    }

    fn is_closed(&self) -> bool {
        self.conn.as_ref().is_none_or(|c| c.client.is_closed())
    }

    fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_back(conn, false);
        }
    }

    fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_back(conn, true);
        }
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_back(conn, true);
        }
    }
}

/// Polls `future` on this thread until it completes or `deadline` passes. The connection task
/// on the background runtime wakes it when a reply arrives.
fn block_on<F: Future>(future: F, deadline: Instant) -> Option<F::Output> {
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return Some(output);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        // A wake before this park makes it return at once; a spurious return just polls again.
        std::thread::park_timeout(deadline - now);
    }
}

// ---------------------------------------------------------------------------------------------
// The exclusive lock behind `try_singleton`.

/// Holds a session advisory lock on a connection of its own (outside the pool, so a long
/// janitor run does not shrink it). Dropping it unlocks; if the process dies the connection
/// closes and PostgreSQL releases the lock itself.
struct AdvisoryLockHolder {
    conn: Option<Conn>,
    key: i64,
}

impl Drop for AdvisoryLockHolder {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            // Explicitly, so the next holder need not wait for the disconnect to be noticed.
            let _ = block_on(
                conn.client
                    .execute("SELECT pg_advisory_unlock($1)", &[&self.key]),
                deadline,
            );
        }
    }
}

impl super::SingletonHold for AdvisoryLockHolder {
    /// Asks the holding session itself: a terminated backend, a dropped connection or an
    /// unlock elsewhere all read as lost.
    fn still_held(&self) -> bool {
        let Some(conn) = &self.conn else {
            return false;
        };
        if conn.client.is_closed() {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let held = block_on(
            conn.client.query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'
                 AND pid = pg_backend_pid() AND granted)",
                &[],
            ),
            deadline,
        );
        matches!(held, Some(Ok(row)) if row.get::<_, bool>(0))
    }
}

// ---------------------------------------------------------------------------------------------
// A collection's session.

/// How long one step of a collection may take: marking a repository of millions of paths is
/// minutes of work, not a request.
const GC_STEP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// One connection for the whole collection: `gc_live` and `gc_dead` are temporary tables of
/// that session. The connection is closed at the end rather than returned to the pool.
struct PgGc<'a> {
    pooled: Option<Pooled<'a>>,
    target: &'a ConnectTarget,
    repo: String,
    cutoff: i64,
}

impl Drop for PgGc<'_> {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            pooled.discard();
        }
    }
}

impl PgGc<'_> {
    fn run<T>(&mut self, op: impl AsyncFn(&mut Conn) -> Result<T, Fail>) -> MetaResult<T> {
        let pooled = self.pooled.as_mut().expect("present until dropped");
        match block_on(op(pooled.conn()), Instant::now() + GC_STEP_TIMEOUT) {
            Some(Ok(value)) => Ok(value),
            Some(Err(Fail::Meta(err))) => Err(err),
            Some(Err(Fail::Pg(err))) => Err(meta_error(&err, self.target)),
            None => Err(MetaError::Unavailable(format!(
                "PostgreSQL at {} did not finish a collection step within {} s",
                self.target,
                GC_STEP_TIMEOUT.as_secs()
            ))),
        }
    }
}

impl GcSession for PgGc<'_> {
    fn oldest_use(&mut self) -> MetaResult<Option<i64>> {
        let repo = self.repo.clone();
        self.run(async |c| {
            let row = c
                .client
                .query_one(
                    "SELECT MIN(last_used_at) FROM narinfos WHERE repo = $1",
                    &[&repo],
                )
                .await?;
            Ok(row.get(0))
        })
    }

    fn mark(&mut self, cutoff: i64) -> MetaResult<LiveSet> {
        self.cutoff = cutoff;
        let repo = self.repo.clone();
        self.run(async |c| {
            c.client.batch_execute("TRUNCATE gc_live").await?;
            c.client
                .execute(
                    "INSERT INTO gc_live (hash, gen)
                     SELECT hash, 0 FROM narinfos WHERE repo = $1 AND last_used_at >= $2
                     UNION SELECT hash, 0 FROM pin_roots WHERE repo = $1
                     ON CONFLICT DO NOTHING",
                    &[&repo, &cutoff],
                )
                .await?;
            // One generation per statement (see the SQLite backend): memory stays bounded,
            // where a recursive CTE's UNION keeps its whole working set in a hash table.
            // Prepared once per session, not once per mark: `--max-size` marks ~30 times.
            let step = c
                .prepare(
                    "INSERT INTO gc_live (hash, gen)
                     SELECT DISTINCT r.ref_hash, $3::bigint FROM gc_live l
                     JOIN narinfo_refs r ON r.repo = $1 AND r.hash = l.hash
                     WHERE l.gen = $2
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            let mut generation = 0i64;
            loop {
                let added = c
                    .client
                    .execute(&step, &[&repo, &generation, &(generation + 1)])
                    .await?;
                if added == 0 {
                    break;
                }
                generation += 1;
            }
            c.client.batch_execute("ANALYZE gc_live").await?;
            let row = c
                .client
                .query_one(
                    "SELECT COUNT(*), COALESCE(SUM(s.file_size), 0)::BIGINT FROM gc_live l
                     JOIN narinfos n ON n.repo = $1 AND n.hash = l.hash
                     LEFT JOIN nars s ON s.repo = $1 AND s.url = n.nar_url",
                    &[&repo],
                )
                .await?;
            Ok(LiveSet {
                paths: row.get::<_, i64>(0) as u64,
                bytes: row.get::<_, i64>(1) as u64,
            })
        })
    }

    fn dead_paths(&mut self, limit: usize) -> MetaResult<Vec<String>> {
        let repo = self.repo.clone();
        let limit = to_i64(limit as u64);
        self.run(async |c| {
            Ok(c.client
                .query(
                    "SELECT n.store_path FROM gc_dead d JOIN narinfos n ON n.repo = $1 AND n.hash = d.hash
                     ORDER BY n.store_path LIMIT $2",
                    &[&repo, &limit],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect())
        })
    }

    fn dead(&mut self) -> MetaResult<DeadSet> {
        let repo = self.repo.clone();
        let cutoff = self.cutoff;
        self.run(async |c| {
            c.client.batch_execute("TRUNCATE gc_dead").await?;
            // One row per published path (the hash part is the key): the insert counts them.
            let paths = c
                .client
                .execute(
                    "INSERT INTO gc_dead (hash)
                     SELECT n.hash FROM narinfos n WHERE n.repo = $1 AND n.last_used_at < $2
                     AND NOT EXISTS (SELECT 1 FROM gc_live l WHERE l.hash = n.hash)",
                    &[&repo, &cutoff],
                )
                .await?;
            c.client.batch_execute("ANALYZE gc_dead").await?;
            let row = c
                .client
                .query_one(
                    "SELECT COUNT(*), COALESCE(SUM(s.file_size), 0)::BIGINT FROM nars s
                     WHERE s.repo = $1 AND s.orphaned_at IS NULL
                     AND EXISTS (SELECT 1 FROM narinfos n JOIN gc_dead d ON d.hash = n.hash
                                 WHERE n.repo = $1 AND n.nar_url = s.url)
                     AND NOT EXISTS (SELECT 1 FROM narinfos n WHERE n.repo = $1 AND n.nar_url = s.url
                                     AND NOT EXISTS (SELECT 1 FROM gc_dead d WHERE d.hash = n.hash))",
                    &[&repo],
                )
                .await?;
            Ok(DeadSet {
                paths,
                nars: row.get::<_, i64>(0) as u64,
                bytes: row.get::<_, i64>(1) as u64,
            })
        })
    }

    fn sweep(&mut self, limit: usize, now: i64) -> MetaResult<Swept> {
        let repo = self.repo.clone();
        let cutoff = self.cutoff;
        let limit = to_i64(limit as u64);
        self.run(async |c| {
            const ELIGIBLE: &str = "n.last_used_at < $2
                 AND NOT EXISTS (SELECT 1 FROM narinfo_refs r
                                 WHERE r.repo = $1 AND r.ref_hash = n.hash AND r.hash <> n.hash)
                 AND NOT EXISTS (SELECT 1 FROM pin_roots p WHERE p.repo = $1 AND p.hash = n.hash)";
            let candidates: Vec<String> = c
                .client
                .query(
                    &format!(
                        "SELECT d.hash FROM gc_dead d JOIN narinfos n ON n.repo = $1 AND n.hash = d.hash
                         WHERE {ELIGIBLE} ORDER BY d.hash LIMIT $3"
                    ),
                    &[&repo, &cutoff, &limit],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if candidates.is_empty() {
                return Ok(Swept::default());
            }
            let tx = c.client.transaction().await?;
            // FOR UPDATE waits for every publication holding KEY SHARE on a candidate; the
            // check after it is a new statement, so it sees what those publications committed.
            tx.execute(
                "SELECT 1 FROM narinfos WHERE repo = $1 AND hash = ANY($2) ORDER BY hash FOR UPDATE",
                &[&repo, &candidates],
            )
            .await?;
            let removed = tx
                .query(
                    &format!(
                        "DELETE FROM narinfos n WHERE n.repo = $1 AND n.hash = ANY($3) AND {ELIGIBLE}
                         RETURNING n.hash, n.store_path, n.nar_url"
                    ),
                    &[&repo, &cutoff, &candidates],
                )
                .await?;
            let hashes: Vec<String> = removed.iter().map(|row| row.get(0)).collect();
            let urls: Vec<String> = removed.iter().map(|row| row.get(2)).collect();
            tx.execute(
                "DELETE FROM narinfo_refs WHERE repo = $1 AND hash = ANY($2)",
                &[&repo, &hashes],
            )
            .await?;
            let nars_orphaned = tx.execute(
                unnamed_nars!(
                    "UPDATE nars SET orphaned_at = $3
                     WHERE repo = $1 AND url = ANY($2) AND orphaned_at IS NULL",
                    ""
                ),
                &[&repo, &urls, &now],
            )
            .await?;
            // Candidates kept (used or referenced since the mark) leave the list too: they
            // stay, and so does what they reference.
            tx.execute("DELETE FROM gc_dead WHERE hash = ANY($1)", &[&candidates])
                .await?;
            tx.commit().await?;
            Ok(Swept {
                paths: removed
                    .iter()
                    .map(|row| RemovedPath {
                        hash: row.get(0),
                        store_path: row.get(1),
                    })
                    .collect(),
                nars_orphaned,
            })
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Rows.

fn nar_from_row(row: &tokio_postgres::Row) -> NarRecord {
    NarRecord {
        url: row.get(0),
        compression: row.get(1),
        nar_hash: row.get(2),
        nar_size: row.get::<_, i64>(3) as u64,
        file_hash: row.get(4),
        file_size: row.get::<_, i64>(5) as u64,
        object_key: row.get(6),
    }
}

fn upload_from_row(row: &tokio_postgres::Row) -> UploadRecord {
    UploadRecord {
        id: row.get(0),
        repo: row.get(1),
        nar_hash: row.get(2),
        nar_size: row.get::<_, i64>(3) as u64,
        compression: row.get(4),
        encoder: row.get(5),
        created_at: row.get(6),
        staging_id: row.get(7),
        updated_at: row.get(8),
    }
}

fn repo_from_row(row: &tokio_postgres::Row) -> RepoRecord {
    RepoRecord {
        name: row.get(0),
        private: row.get(1),
        secret_key: row.get(2),
        priority: u32::try_from(row.get::<_, i64>(3)).unwrap_or(u32::MAX),
        upstream_keys: row.get(4),
    }
}

fn token_from_row(row: &tokio_postgres::Row) -> TokenRecord {
    let secret: Vec<u8> = row.get(1);
    let mut secret_sha256 = [0u8; 32];
    if secret.len() == 32 {
        secret_sha256.copy_from_slice(&secret);
    }
    let scope: String = row.get(2);
    TokenRecord {
        id: row.get(0),
        secret_sha256,
        // An unknown scope string can only come from a newer version; read-only is the safe reading.
        scope: Scope::parse(&scope).unwrap_or(Scope::Read),
        description: row.get(3),
        created_at: row.get(4),
        revoked_at: row.get(5),
        repos: row.get(6),
    }
}

macro_rules! upload_select {
    ($where:literal) => {
        concat!(
            "SELECT id, repo, nar_hash, nar_size, compression, encoder, created_at, staging_id, updated_at
             FROM uploads ",
            $where
        )
    };
}

macro_rules! token_select {
    ($tail:literal) => {
        concat!(
            "SELECT t.id, t.secret_sha256, t.scope, t.description, t.created_at, t.revoked_at,
                    COALESCE(array_agg(r.repo ORDER BY r.repo) FILTER (WHERE r.repo IS NOT NULL),
                             '{}'::text[])
             FROM tokens t LEFT JOIN token_repos r ON r.token_id = t.id ",
            $tail
        )
    };
}

macro_rules! nar_select {
    ($tail:literal) => {
        concat!(
            "SELECT url, compression, nar_hash, nar_size, file_hash, file_size, object_key
             FROM nars ",
            $tail
        )
    };
}

impl Metadata for PostgresMetadata {
    fn create_repo(&self, repo: &RepoRecord) -> MetaResult<bool> {
        self.call(false, async |c| {
            let statement = c
                .prepare(
                    "INSERT INTO repos (name, private, secret_key, priority, created_at, upstream_keys)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
                )
                .await?;
            let inserted = c
                .client
                .execute(
                    &statement,
                    &[
                        &repo.name,
                        &repo.private,
                        &repo.secret_key,
                        &i64::from(repo.priority),
                        &now_unix(),
                        &repo.upstream_keys,
                    ],
                )
                .await?;
            Ok(inserted == 1)
        })
    }

    fn repo(&self, name: &str) -> MetaResult<Option<RepoRecord>> {
        self.call(true, async |c| {
            let statement = c
                .prepare("SELECT name, private, secret_key, priority, upstream_keys FROM repos WHERE name = $1")
                .await?;
            let row = c.client.query_opt(&statement, &[&name]).await?;
            Ok(row.as_ref().map(repo_from_row))
        })
    }

    fn repos(&self) -> MetaResult<Vec<RepoRecord>> {
        self.call(true, async |c| {
            let statement = c
                .prepare("SELECT name, private, secret_key, priority, upstream_keys FROM repos ORDER BY name")
                .await?;
            let rows = c.client.query(&statement, &[]).await?;
            Ok(rows.iter().map(repo_from_row).collect())
        })
    }

    fn set_upstream_keys(&self, name: &str, keys: &[String]) -> MetaResult<bool> {
        self.call(false, async |c| {
            let statement = c
                .prepare("UPDATE repos SET upstream_keys = $2 WHERE name = $1")
                .await?;
            Ok(c.client.execute(&statement, &[&name, &keys]).await? == 1)
        })
    }

    fn create_token(&self, token: &TokenRecord) -> MetaResult<()> {
        self.call(false, async |c| {
            let insert_token = c
                .prepare(
                    "INSERT INTO tokens (id, secret_sha256, scope, description, created_at, revoked_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .await?;
            let insert_repo = c
                .prepare("INSERT INTO token_repos (token_id, repo) VALUES ($1, $2)")
                .await?;
            let tx = c.client.transaction().await?;
            tx.execute(
                &insert_token,
                &[
                    &token.id,
                    &token.secret_sha256.as_slice(),
                    &token.scope.as_str(),
                    &token.description,
                    &token.created_at,
                    &token.revoked_at,
                ],
            )
            .await?;
            for repo in &token.repos {
                tx.execute(&insert_repo, &[&token.id, repo]).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn token(&self, id: &str) -> MetaResult<Option<TokenRecord>> {
        self.call(true, async |c| {
            let statement = c
                .prepare(token_select!("WHERE t.id = $1 GROUP BY t.id"))
                .await?;
            let row = c.client.query_opt(&statement, &[&id]).await?;
            Ok(row.as_ref().map(token_from_row))
        })
    }

    fn tokens(&self) -> MetaResult<Vec<TokenRecord>> {
        self.call(true, async |c| {
            let statement = c
                .prepare(token_select!("GROUP BY t.id ORDER BY t.created_at, t.id"))
                .await?;
            let rows = c.client.query(&statement, &[]).await?;
            Ok(rows.iter().map(token_from_row).collect())
        })
    }

    fn revoke_token(&self, id: &str, at: i64) -> MetaResult<bool> {
        self.call(false, async |c| {
            // An earlier revocation time stays: revoking twice does not move it.
            let statement = c
                .prepare("UPDATE tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1")
                .await?;
            Ok(c.client.execute(&statement, &[&id, &at]).await? == 1)
        })
    }

    fn narinfo(&self, repo: &str, hash: &str) -> MetaResult<Option<String>> {
        self.call(true, async |c| {
            let statement = c
                .prepare("SELECT text FROM narinfos WHERE repo = $1 AND hash = $2")
                .await?;
            let row = c.client.query_opt(&statement, &[&repo, &hash]).await?;
            Ok(row.map(|row| row.get(0)))
        })
    }

    fn presence(&self, repo: &str, queries: &[(String, String)]) -> MetaResult<Vec<Presence>> {
        let hashes: Vec<&str> = queries.iter().map(|(hash, _)| hash.as_str()).collect();
        let nar_hashes: Vec<&str> = queries.iter().map(|(_, nar)| nar.as_str()).collect();
        self.call(true, async |c| {
            // One round trip for the whole batch: a 20 000-path query is one statement.
            let statement = c
                .prepare(
                    "SELECT EXISTS (SELECT 1 FROM narinfos n WHERE n.repo = $1 AND n.hash = q.hash),
                            EXISTS (SELECT 1 FROM nars s WHERE s.repo = $1 AND s.nar_hash = q.nar_hash)
                     FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS q(hash, nar_hash, i)
                     ORDER BY q.i",
                )
                .await?;
            let rows = c
                .client
                .query(&statement, &[&repo, &hashes, &nar_hashes])
                .await?;
            Ok(rows
                .iter()
                .map(|row| {
                    if row.get::<_, bool>(0) {
                        Presence::Published
                    } else if row.get::<_, bool>(1) {
                        Presence::NarStored
                    } else {
                        Presence::Missing
                    }
                })
                .collect())
        })
    }

    fn nar_by_hash(&self, repo: &str, nar_hash: &str) -> MetaResult<Option<NarRecord>> {
        self.call(true, async |c| {
            let statement = c
                .prepare(nar_select!(
                    "WHERE repo = $1 AND nar_hash = $2 ORDER BY created_at, url LIMIT 1"
                ))
                .await?;
            let row = c.client.query_opt(&statement, &[&repo, &nar_hash]).await?;
            Ok(row.as_ref().map(nar_from_row))
        })
    }

    fn nar_by_url(&self, repo: &str, url: &str) -> MetaResult<Option<NarRecord>> {
        self.call(true, async |c| {
            let statement = c
                .prepare(nar_select!("WHERE repo = $1 AND url = $2"))
                .await?;
            let row = c.client.query_opt(&statement, &[&repo, &url]).await?;
            Ok(row.as_ref().map(nar_from_row))
        })
    }

    fn insert_nars(&self, repo: &str, nars: &[NarRecord]) -> MetaResult<Vec<bool>> {
        let column = |field: fn(&NarRecord) -> &str| nars.iter().map(field).collect::<Vec<_>>();
        let (urls, compressions, nar_hashes, file_hashes, keys) = (
            column(|n| &n.url),
            column(|n| &n.compression),
            column(|n| &n.nar_hash),
            column(|n| &n.file_hash),
            column(|n| &n.object_key),
        );
        let nar_sizes: Vec<i64> = nars.iter().map(|n| to_i64(n.nar_size)).collect();
        let file_sizes: Vec<i64> = nars.iter().map(|n| to_i64(n.file_size)).collect();
        self.call(false, async |c| {
            // One statement for the batch: a row per element of the arrays.
            let statement = c
                .prepare(
                    "INSERT INTO nars (repo, url, compression, nar_hash, nar_size, file_hash,
                                       file_size, object_key, created_at)
                     SELECT $1, * , $9 FROM UNNEST($2::text[], $3::text[], $4::text[],
                                                   $5::bigint[], $6::text[], $7::bigint[],
                                                   $8::text[])
                     ON CONFLICT (repo, url) DO NOTHING
                     RETURNING url",
                )
                .await?;
            let inserted: HashSet<String> = c
                .client
                .query(
                    &statement,
                    &[
                        &repo,
                        &urls,
                        &compressions,
                        &nar_hashes,
                        &nar_sizes,
                        &file_hashes,
                        &file_sizes,
                        &keys,
                        &now_unix(),
                    ],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let mut seen = HashSet::new();
            Ok(urls
                .iter()
                .map(|url| inserted.contains(*url) && seen.insert(*url))
                .collect())
        })
    }

    fn upload(&self, id: &str) -> MetaResult<Option<UploadRecord>> {
        self.call(true, async |c| {
            let statement = c.prepare(upload_select!("WHERE id = $1")).await?;
            let row = c.client.query_opt(&statement, &[&id]).await?;
            Ok(row.as_ref().map(upload_from_row))
        })
    }

    fn delete_upload(&self, id: &str) -> MetaResult<()> {
        self.call(false, async |c| {
            // Its parts go with it (ON DELETE CASCADE).
            let statement = c.prepare("DELETE FROM uploads WHERE id = $1").await?;
            c.client.execute(&statement, &[&id]).await?;
            Ok(())
        })
    }

    fn uploads_inactive_since(&self, at: i64) -> MetaResult<Vec<UploadRecord>> {
        self.call(true, async |c| {
            let statement = c
                .prepare(upload_select!("WHERE updated_at < $1 ORDER BY updated_at"))
                .await?;
            let rows = c.client.query(&statement, &[&at]).await?;
            Ok(rows.iter().map(upload_from_row).collect())
        })
    }

    fn open_upload(
        &self,
        upload: &UploadRecord,
        token_id: &str,
        caps: SessionCaps,
    ) -> MetaResult<OpenedUpload> {
        self.call(false, async |c| {
            let lock = c
                .prepare("SELECT pg_advisory_xact_lock($1), pg_advisory_xact_lock($2)")
                .await?;
            let insert = c
                .prepare(
                    "INSERT INTO uploads (id, repo, nar_hash, nar_size, compression, encoder,
                                          created_at, token_id, staging_id, updated_at)
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $7
                     WHERE (SELECT COUNT(*) FROM uploads WHERE token_id = $8) < $10
                       AND (SELECT COUNT(*) FROM uploads WHERE repo = $2) < $11
                     ON CONFLICT (repo, nar_hash, compression, encoder) DO NOTHING",
                )
                .await?;
            let current = c
                .prepare(upload_select!(
                    "WHERE repo = $1 AND nar_hash = $2 AND compression = $3 AND encoder = $4"
                ))
                .await?;
            let held = c
                .prepare("SELECT COUNT(*) FROM uploads WHERE token_id = $1")
                .await?;
            let tx = c.client.transaction().await?;
            // The counts and the insert must see one state across replicas: READ COMMITTED
            // alone would let two replicas both see room for the last session. Every opener
            // takes its token's lock, then its repository's (one order: no deadlock); the
            // statements after the locks see whatever the previous holder committed.
            tx.execute(
                &lock,
                &[
                    &advisory_key(TOKEN_SESSIONS_LOCK, token_id),
                    &advisory_key(REPO_SESSIONS_LOCK, &upload.repo),
                ],
            )
            .await?;
            tx.execute(
                &insert,
                &[
                    &upload.id,
                    &upload.repo,
                    &upload.nar_hash,
                    &to_i64(upload.nar_size),
                    &upload.compression,
                    &upload.encoder,
                    &upload.created_at,
                    &token_id,
                    &upload.staging_id,
                    &to_i64(caps.per_token),
                    &to_i64(caps.per_repo),
                ],
            )
            .await?;
            let row = tx
                .query_opt(
                    &current,
                    &[
                        &upload.repo,
                        &upload.nar_hash,
                        &upload.compression,
                        &upload.encoder,
                    ],
                )
                .await?;
            let opened = match row.as_ref().map(upload_from_row) {
                Some(row) if row.id == upload.id => OpenedUpload::Created(row),
                Some(row) => OpenedUpload::Existing(row),
                None => {
                    let held: i64 = tx.query_one(&held, &[&token_id]).await?.get(0);
                    if u64::try_from(held).unwrap_or(0) >= caps.per_token {
                        OpenedUpload::TokenFull
                    } else {
                        OpenedUpload::RepoFull
                    }
                }
            };
            tx.commit().await?;
            Ok(opened)
        })
    }

    fn published_store_paths(
        &self,
        repo: &str,
        hashes: &[String],
    ) -> MetaResult<Vec<Option<String>>> {
        self.call(true, async |c| {
            let statement = c
                .prepare(
                    "SELECT n.store_path
                     FROM unnest($2::text[]) WITH ORDINALITY AS q(hash, i)
                     LEFT JOIN narinfos n ON n.repo = $1 AND n.hash = q.hash
                     ORDER BY q.i",
                )
                .await?;
            let rows = c.client.query(&statement, &[&repo, &hashes]).await?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
    }

    fn set_upload_staging_id(&self, id: &str, staging_id: &str) -> MetaResult<()> {
        self.call(false, async |c| {
            let statement = c
                .prepare("UPDATE uploads SET staging_id = $2 WHERE id = $1")
                .await?;
            c.client.execute(&statement, &[&id, &staging_id]).await?;
            Ok(())
        })
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
            "INSERT INTO upload_parts (upload_id, number, size, etag)
             VALUES ($1, $2, $3, $4) ON CONFLICT (upload_id, number) DO NOTHING",
            &[&id, &i64::from(part.number), &to_i64(part.size), &part.etag],
        )
    }

    fn upload_parts(&self, id: &str) -> MetaResult<Vec<UploadPart>> {
        self.call(true, async |c| {
            let statement = c
                .prepare(
                    "SELECT number, size, etag FROM upload_parts WHERE upload_id = $1 ORDER BY number",
                )
                .await?;
            let rows = c.client.query(&statement, &[&id]).await?;
            Ok(rows
                .iter()
                .map(|row| UploadPart {
                    number: u32::try_from(row.get::<_, i64>(0)).unwrap_or(u32::MAX),
                    size: row.get::<_, i64>(1) as u64,
                    etag: row.get(2),
                })
                .collect())
        })
    }

    fn touch_upload(&self, id: &str, at: i64) -> MetaResult<()> {
        self.call(false, async |c| {
            let statement = c
                .prepare("UPDATE uploads SET updated_at = GREATEST(updated_at, $2) WHERE id = $1")
                .await?;
            c.client.execute(&statement, &[&id, &at]).await?;
            Ok(())
        })
    }

    fn record_object_intents(&self, keys: &[String], at: i64) -> MetaResult<()> {
        // ON CONFLICT DO UPDATE may not touch one row twice in a statement.
        let keys: Vec<&str> = keys
            .iter()
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        self.call(false, async |c| {
            // A retried write refreshes its intent, so the janitor's grace period restarts.
            let statement = c
                .prepare(
                    "INSERT INTO object_intents (key, created_at)
                     SELECT key, $2 FROM UNNEST($1::text[]) AS key
                     ON CONFLICT (key) DO UPDATE SET created_at = EXCLUDED.created_at",
                )
                .await?;
            c.client.execute(&statement, &[&keys, &at]).await?;
            Ok(())
        })
    }

    fn clear_object_intents(&self, keys: &[String]) -> MetaResult<()> {
        self.call(false, async |c| {
            let statement = c
                .prepare("DELETE FROM object_intents WHERE key = ANY($1)")
                .await?;
            c.client.execute(&statement, &[&keys]).await?;
            Ok(())
        })
    }

    fn object_intents_before(&self, at: i64, limit: usize) -> MetaResult<Vec<String>> {
        self.call(true, async |c| {
            let statement = c
                .prepare(
                    "SELECT key FROM object_intents WHERE created_at < $1
                     ORDER BY created_at, key LIMIT $2",
                )
                .await?;
            let rows = c
                .client
                .query(&statement, &[&at, &to_i64(limit as u64)])
                .await?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
    }

    fn known_object_keys(&self, keys: &[String]) -> MetaResult<Vec<bool>> {
        self.call(true, async |c| {
            let statement = c
                .prepare(
                    "SELECT EXISTS (SELECT 1 FROM nars WHERE object_key = q.key)
                     FROM unnest($1::text[]) WITH ORDINALITY AS q(key, i)
                     ORDER BY q.i",
                )
                .await?;
            let rows = c.client.query(&statement, &[&keys]).await?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
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
        let own: Vec<&str> = narinfos.iter().map(|n| n.hash.as_str()).collect();
        let mut wanted: Vec<&str> = facts
            .iter()
            .flat_map(|f| f.references.iter().map(String::as_str))
            .chain(own.iter().copied())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        wanted.sort_unstable();
        let mut urls: Vec<&str> = facts
            .iter()
            .map(|f| f.nar_url.as_str())
            .filter(|u| !u.is_empty())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        urls.sort_unstable();
        self.call(false, async |c| {
            // KEY SHARE on every referenced narinfo and SHARE on every named NAR: a collector
            // deletes under FOR UPDATE, so it waits for this transaction (and then sees what it
            // published), or this one waits for it (and then finds the rows gone). In hash
            // order, the collector's order too, so the two cannot deadlock.
            let lock_paths = c
                .prepare(
                    "SELECT hash FROM narinfos WHERE repo = $1 AND hash = ANY($2)
                     ORDER BY hash FOR KEY SHARE",
                )
                .await?;
            let lock_nars = c
                .prepare(
                    "SELECT url FROM nars WHERE repo = $1 AND url = ANY($2)
                     ORDER BY url FOR SHARE",
                )
                .await?;
            let insert = c
                .prepare(
                    "INSERT INTO narinfos (repo, hash, store_path, nar_hash, text, published_at,
                                           last_used_at, nar_url)
                     SELECT $1, q.hash, q.store_path, q.nar_hash, q.text, $6, $6, q.nar_url
                     FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $7::text[])
                          WITH ORDINALITY AS q(hash, store_path, nar_hash, text, nar_url, i)
                     ORDER BY q.i
                     ON CONFLICT (repo, hash) DO NOTHING
                     RETURNING hash",
                )
                .await?;
            let add_refs = c
                .prepare(
                    "INSERT INTO narinfo_refs (repo, hash, ref_hash)
                     SELECT $1, q.hash, q.ref_hash FROM unnest($2::text[], $3::text[]) AS q(hash, ref_hash)
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            let revive = c
                .prepare(
                    "UPDATE nars SET orphaned_at = NULL
                     WHERE repo = $1 AND url = ANY($2) AND orphaned_at IS NOT NULL",
                )
                .await?;
            let tx = c.client.transaction().await?;
            let locked: HashSet<String> = tx
                .query(&lock_paths, &[&repo, &wanted])
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let stored: HashSet<String> = tx
                .query(&lock_nars, &[&repo, &urls])
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let mut states = publication_verdicts(narinfos, &facts, &locked, &stored, exempt);
            let go: Vec<usize> = (0..narinfos.len()).filter(|&i| states[i].is_none()).collect();
            let hashes: Vec<&str> = go.iter().map(|&i| narinfos[i].hash.as_str()).collect();
            let paths: Vec<&str> = go.iter().map(|&i| narinfos[i].store_path.as_str()).collect();
            let nar_hashes: Vec<&str> = go.iter().map(|&i| narinfos[i].nar_hash.as_str()).collect();
            let texts: Vec<&str> = go.iter().map(|&i| narinfos[i].text.as_str()).collect();
            let nar_urls: Vec<&str> = go.iter().map(|&i| facts[i].nar_url.as_str()).collect();
            let mut inserted: HashSet<String> = tx
                .query(
                    &insert,
                    &[&repo, &hashes, &paths, &nar_hashes, &texts, &at, &nar_urls],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let (mut ref_from, mut ref_to) = (Vec::new(), Vec::new());
            let mut revived = Vec::new();
            for &i in &go {
                // A hash twice in one batch: the first occurrence is the one that published.
                if inserted.remove(&narinfos[i].hash) {
                    for reference in &facts[i].references {
                        ref_from.push(narinfos[i].hash.clone());
                        ref_to.push(reference.clone());
                    }
                    revived.push(facts[i].nar_url.clone());
                    states[i] = Some(PublishState::New);
                } else {
                    states[i] = Some(PublishState::Already);
                }
            }
            tx.execute(&add_refs, &[&repo, &ref_from, &ref_to]).await?;
            tx.execute(&revive, &[&repo, &revived]).await?;
            tx.commit().await?;
            Ok(states
                .into_iter()
                .map(|s| s.unwrap_or(PublishState::Already))
                .collect())
        })
    }

    fn policy(&self, repo: &str) -> MetaResult<Option<RetentionPolicy>> {
        self.call(true, async |c| {
            let statement = c
                .prepare("SELECT retention_secs, max_size_bytes FROM repos WHERE name = $1")
                .await?;
            let row = c.client.query_opt(&statement, &[&repo]).await?;
            Ok(row.map(|row| RetentionPolicy {
                retention_secs: row.get::<_, Option<i64>>(0).map(|v| v as u64),
                max_size_bytes: row.get::<_, Option<i64>>(1).map(|v| v as u64),
            }))
        })
    }

    fn set_policy(&self, repo: &str, policy: &RetentionPolicy) -> MetaResult<bool> {
        let retention = policy.retention_secs.map(to_i64);
        let max_size = policy.max_size_bytes.map(to_i64);
        self.call(false, async |c| {
            let statement = c
                .prepare(
                    "UPDATE repos SET retention_secs = $2, max_size_bytes = $3 WHERE name = $1",
                )
                .await?;
            Ok(c.client
                .execute(&statement, &[&repo, &retention, &max_size])
                .await?
                == 1)
        })
    }

    fn usage(&self, repo: &str) -> MetaResult<RepoUsage> {
        self.call(true, async |c| {
            let statement = c
                .prepare(
                    "SELECT (SELECT COUNT(*) FROM narinfos WHERE repo = $1),
                            (SELECT COUNT(*) FROM nars WHERE repo = $1),
                            (SELECT COALESCE(SUM(file_size), 0)::BIGINT FROM nars WHERE repo = $1)",
                )
                .await?;
            let row = c.client.query_one(&statement, &[&repo]).await?;
            Ok(RepoUsage {
                paths: row.get::<_, i64>(0) as u64,
                nars: row.get::<_, i64>(1) as u64,
                bytes: row.get::<_, i64>(2) as u64,
            })
        })
    }

    fn touch_paths(&self, repo: &str, uses: &[(String, i64)]) -> MetaResult<()> {
        let hashes: Vec<&str> = uses.iter().map(|(h, _)| h.as_str()).collect();
        let times: Vec<i64> = uses.iter().map(|(_, t)| *t).collect();
        self.call(false, async |c| {
            let statement = c
                .prepare(
                    "UPDATE narinfos n SET last_used_at = q.at
                     FROM (SELECT hash, MAX(at) AS at FROM unnest($2::text[], $3::bigint[]) AS u(hash, at)
                           GROUP BY hash) q
                     WHERE n.repo = $1 AND n.hash = q.hash AND n.last_used_at < q.at",
                )
                .await?;
            c.client.execute(&statement, &[&repo, &hashes, &times]).await?;
            Ok(())
        })
    }

    fn touch_nars(&self, repo: &str, uses: &[(String, i64)]) -> MetaResult<()> {
        let urls: Vec<&str> = uses.iter().map(|(u, _)| u.as_str()).collect();
        let times: Vec<i64> = uses.iter().map(|(_, t)| *t).collect();
        self.call(false, async |c| {
            let statement = c
                .prepare(
                    "UPDATE narinfos n SET last_used_at = q.at
                     FROM (SELECT url, MAX(at) AS at FROM unnest($2::text[], $3::bigint[]) AS u(url, at)
                           GROUP BY url) q
                     WHERE n.repo = $1 AND n.nar_url = q.url AND n.last_used_at < q.at",
                )
                .await?;
            c.client.execute(&statement, &[&repo, &urls, &times]).await?;
            Ok(())
        })
    }

    fn gc_session(&self, repo: &str) -> MetaResult<Box<dyn GcSession + '_>> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let mut pooled = self.pool.get(deadline)?;
        let created = block_on(
            pooled.conn().client.batch_execute(
                "DROP TABLE IF EXISTS pg_temp.gc_live, pg_temp.gc_dead;
                 CREATE TEMP TABLE gc_live (hash TEXT COLLATE \"C\" PRIMARY KEY, gen BIGINT NOT NULL);
                 CREATE INDEX ON gc_live (gen);
                 CREATE TEMP TABLE gc_dead (hash TEXT COLLATE \"C\" PRIMARY KEY);",
            ),
            deadline,
        );
        match created {
            Some(Ok(())) => {}
            Some(Err(err)) => return Err(meta_error(&err, &self.pool.target)),
            None => {
                return Err(MetaError::Unavailable(format!(
                    "PostgreSQL at {} did not answer within {} s",
                    self.pool.target,
                    CALL_TIMEOUT.as_secs()
                )))
            }
        }
        Ok(Box::new(PgGc {
            pooled: Some(pooled),
            target: &self.pool.target,
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
        self.call(false, async |c| {
            if dry_run {
                let statement = c
                    .prepare(unnamed_nars!(
                        "SELECT COUNT(*) FROM nars WHERE repo = $1 AND orphaned_at IS NULL AND created_at < $2",
                        ""
                    ))
                    .await?;
                let row = c.client.query_one(&statement, &[&repo, &created_before]).await?;
                return Ok(row.get::<_, i64>(0) as u64);
            }
            let statement = c
                .prepare(unnamed_nars!(
                    "UPDATE nars SET orphaned_at = $3
                     WHERE repo = $1 AND orphaned_at IS NULL AND created_at < $2",
                    ""
                ))
                .await?;
            Ok(c.client
                .execute(&statement, &[&repo, &created_before, &now])
                .await?)
        })
    }

    fn collectible_nars(&self, repo: &str, orphaned_before: i64) -> MetaResult<(u64, u64)> {
        self.call(true, async |c| {
            let statement = c
                .prepare(unnamed_nars!(
                    "SELECT COUNT(*), COALESCE(SUM(file_size), 0)::BIGINT FROM nars
                     WHERE repo = $1 AND orphaned_at < $2",
                    ""
                ))
                .await?;
            let row = c
                .client
                .query_one(&statement, &[&repo, &orphaned_before])
                .await?;
            Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
        })
    }

    fn take_collectible_nars(
        &self,
        repo: &str,
        orphaned_before: i64,
        limit: usize,
    ) -> MetaResult<Vec<NarRecord>> {
        let limit = to_i64(limit as u64);
        self.call(false, async |c| {
            let lock = c
                .prepare(unnamed_nars!(
                    "SELECT url FROM nars WHERE repo = $1 AND orphaned_at < $2",
                    "ORDER BY url LIMIT $3 FOR UPDATE"
                ))
                .await?;
            // A new statement, so a new snapshot: a publication that revived one of them while
            // this waited for its lock is seen here.
            let delete = c
                .prepare(unnamed_nars!(
                    "DELETE FROM nars WHERE repo = $1 AND url = ANY($3) AND orphaned_at < $2",
                    "RETURNING url, compression, nar_hash, nar_size, file_hash, file_size, object_key"
                ))
                .await?;
            let tx = c.client.transaction().await?;
            let locked: Vec<String> = tx
                .query(&lock, &[&repo, &orphaned_before, &limit])
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let rows = tx.query(&delete, &[&repo, &orphaned_before, &locked]).await?;
            tx.commit().await?;
            Ok(rows.iter().map(nar_from_row).collect())
        })
    }

    fn delete_paths(
        &self,
        repo: &str,
        hashes: &[String],
        with_dependents: bool,
    ) -> MetaResult<PathDeletion> {
        self.call(false, async |c| {
            let dependents_of = c
                .prepare(
                    "WITH RECURSIVE dep(hash) AS (
                         SELECT unnest($2::text[]) COLLATE \"C\"
                         UNION
                         SELECT r.hash FROM narinfo_refs r JOIN dep ON r.repo = $1 AND r.ref_hash = dep.hash
                     )
                     SELECT n.hash, n.store_path, n.nar_url FROM dep
                     JOIN narinfos n ON n.repo = $1 AND n.hash = dep.hash ORDER BY n.hash",
                )
                .await?;
            let lock = c
                .prepare(
                    "SELECT hash FROM narinfos WHERE repo = $1 AND hash = ANY($2) ORDER BY hash FOR UPDATE",
                )
                .await?;
            let delete = c
                .prepare("DELETE FROM narinfos WHERE repo = $1 AND hash = ANY($2)")
                .await?;
            let delete_refs = c
                .prepare("DELETE FROM narinfo_refs WHERE repo = $1 AND hash = ANY($2)")
                .await?;
            let delete_nars = c
                .prepare(unnamed_nars!(
                    "DELETE FROM nars WHERE repo = $1 AND url = ANY($2)",
                    "RETURNING url, compression, nar_hash, nar_size, file_hash, file_size, object_key"
                ))
                .await?;
            let tx = c.client.transaction().await?;
            // Lock what depends on the targets, then look again: a publication that committed
            // meanwhile (it held KEY SHARE on what it references) is found the second time.
            let mut closure: Vec<(String, String, String)>;
            let mut locked: Vec<String> = Vec::new();
            loop {
                closure = tx
                    .query(&dependents_of, &[&repo, &hashes])
                    .await?
                    .iter()
                    .map(|row| (row.get(0), row.get(1), row.get(2)))
                    .collect();
                let all: Vec<String> = closure.iter().map(|(h, _, _)| h.clone()).collect();
                if all == locked {
                    break;
                }
                tx.query(&lock, &[&repo, &all]).await?;
                locked = all;
            }
            let targets: HashSet<&str> = hashes.iter().map(String::as_str).collect();
            let dependents: Vec<String> = closure
                .iter()
                .filter(|(h, _, _)| !targets.contains(h.as_str()))
                .map(|(_, p, _)| p.clone())
                .collect();
            if !dependents.is_empty() && !with_dependents {
                return Ok(PathDeletion::Refused { dependents });
            }
            let urls: Vec<String> = closure.iter().map(|(_, _, u)| u.clone()).collect();
            tx.execute(&delete, &[&repo, &locked]).await?;
            tx.execute(&delete_refs, &[&repo, &locked]).await?;
            let nars = tx.query(&delete_nars, &[&repo, &urls]).await?;
            tx.commit().await?;
            Ok(PathDeletion::Deleted {
                paths: closure
                    .into_iter()
                    .map(|(hash, store_path, _)| RemovedPath { hash, store_path })
                    .collect(),
                nars: nars.iter().map(nar_from_row).collect(),
            })
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
        let keep = keep.map(i64::from);
        self.call(false, async |c| {
            let lock_paths = c
                .prepare(
                    "SELECT hash, store_path FROM narinfos WHERE repo = $1 AND hash = ANY($2)
                     ORDER BY hash FOR KEY SHARE",
                )
                .await?;
            let upsert = c
                .prepare(
                    "INSERT INTO pins (repo, name, keep, next_revision) VALUES ($1, $2, $3, 2)
                     ON CONFLICT (repo, name) DO UPDATE
                     SET keep = COALESCE($3, pins.keep), next_revision = pins.next_revision + 1
                     RETURNING next_revision - 1, keep",
                )
                .await?;
            let add_revision = c
                .prepare(
                    "INSERT INTO pin_revisions (repo, name, revision, created_at) VALUES ($1, $2, $3, $4)",
                )
                .await?;
            let add_roots = c
                .prepare(
                    "INSERT INTO pin_roots (repo, name, revision, hash, store_path)
                     SELECT $1, $2, $3, q.hash, q.path FROM unnest($4::text[], $5::text[]) AS q(hash, path)
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            let drop_revisions = c
                .prepare(
                    "DELETE FROM pin_revisions WHERE repo = $1 AND name = $2 AND revision < $3
                     RETURNING revision",
                )
                .await?;
            let drop_roots = c
                .prepare("DELETE FROM pin_roots WHERE repo = $1 AND name = $2 AND revision < $3")
                .await?;
            let tx = c.client.transaction().await?;
            let found: HashMap<String, String> = tx
                .query(&lock_paths, &[&repo, &hashes])
                .await?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            let missing: Vec<String> = hashes
                .iter()
                .filter(|h| !found.contains_key(*h))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Ok(PinCreated::NotPublished(missing));
            }
            let row = tx.query_one(&upsert, &[&repo, &name, &keep]).await?;
            let (revision, keep): (i64, Option<i64>) = (row.get(0), row.get(1));
            tx.execute(&add_revision, &[&repo, &name, &revision, &at]).await?;
            let (root_hashes, root_paths): (Vec<String>, Vec<String>) = found.into_iter().unzip();
            tx.execute(&add_roots, &[&repo, &name, &revision, &root_hashes, &root_paths])
                .await?;
            let mut dropped = Vec::new();
            if let Some(keep) = keep {
                let below = revision - keep.max(1) + 1;
                dropped = tx
                    .query(&drop_revisions, &[&repo, &name, &below])
                    .await?
                    .iter()
                    .map(|row| row.get::<_, i64>(0) as u64)
                    .collect();
                dropped.sort_unstable();
                tx.execute(&drop_roots, &[&repo, &name, &below]).await?;
            }
            tx.commit().await?;
            let mut store_paths = root_paths;
            store_paths.sort();
            store_paths.dedup();
            Ok(PinCreated::Created {
                pin: PinRecord {
                    repo: repo.to_string(),
                    name: name.to_string(),
                    revision: revision as u64,
                    created_at: at,
                    keep: keep.map(|k| u32::try_from(k).unwrap_or(u32::MAX)),
                    store_paths,
                },
                dropped,
            })
        })
    }

    fn pins(&self, repo: Option<&str>) -> MetaResult<Vec<PinRecord>> {
        self.call(true, async |c| {
            let statement = c
                .prepare(
                    "SELECT v.repo, v.name, v.revision, v.created_at, p.keep,
                            COALESCE((SELECT array_agg(r.store_path ORDER BY r.store_path) FROM pin_roots r
                                      WHERE r.repo = v.repo AND r.name = v.name AND r.revision = v.revision),
                                     '{}'::text[])
                     FROM pin_revisions v JOIN pins p ON p.repo = v.repo AND p.name = v.name
                     WHERE $1::text IS NULL OR v.repo = $1
                     ORDER BY v.repo, v.name, v.revision",
                )
                .await?;
            let rows = c.client.query(&statement, &[&repo]).await?;
            Ok(rows
                .iter()
                .map(|row| PinRecord {
                    repo: row.get(0),
                    name: row.get(1),
                    revision: row.get::<_, i64>(2) as u64,
                    created_at: row.get(3),
                    keep: row
                        .get::<_, Option<i64>>(4)
                        .map(|k| u32::try_from(k).unwrap_or(u32::MAX)),
                    store_paths: row.get(5),
                })
                .collect())
        })
    }

    fn delete_pin(&self, repo: &str, name: &str, revision: Option<u64>) -> MetaResult<u64> {
        let revision = revision.map(to_i64);
        self.call(false, async |c| {
            let revisions = c
                .prepare(
                    "DELETE FROM pin_revisions WHERE repo = $1 AND name = $2
                     AND ($3::bigint IS NULL OR revision = $3)",
                )
                .await?;
            let roots = c
                .prepare(
                    "DELETE FROM pin_roots WHERE repo = $1 AND name = $2
                     AND ($3::bigint IS NULL OR revision = $3)",
                )
                .await?;
            let pin = c
                .prepare("DELETE FROM pins WHERE repo = $1 AND name = $2 AND $3::bigint IS NULL")
                .await?;
            let tx = c.client.transaction().await?;
            let removed = tx.execute(&revisions, &[&repo, &name, &revision]).await?;
            tx.execute(&roots, &[&repo, &name, &revision]).await?;
            tx.execute(&pin, &[&repo, &name, &revision]).await?;
            tx.commit().await?;
            Ok(removed)
        })
    }

    fn ping(&self) -> MetaResult<()> {
        self.call(true, async |c| {
            c.client.simple_query("SELECT 1").await?;
            Ok(())
        })
    }

    fn schema_version(&self) -> MetaResult<i64> {
        self.stored_version()
    }

    fn try_singleton(&self, name: &str) -> MetaResult<Option<SingletonGuard>> {
        let key = advisory_key(SINGLETON_LOCK, name);
        // Not from the pool: the lock lives as long as this connection, and the guard keeps it.
        let conn = open_connection(&self.pool.target, &self.pool.runtime)?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        let granted = block_on(
            conn.client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key]),
            deadline,
        );
        match granted {
            Some(Ok(row)) if row.get::<_, bool>(0) => {
                Ok(Some(SingletonGuard::watched(AdvisoryLockHolder {
                    conn: Some(conn),
                    key,
                })))
            }
            Some(Ok(_)) => Ok(None),
            Some(Err(err)) => Err(meta_error(&err, &self.pool.target)),
            None => Err(MetaError::Unavailable(format!(
                "PostgreSQL at {} did not answer within {} s",
                self.pool.target,
                CALL_TIMEOUT.as_secs()
            ))),
        }
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
            "UPDATE upload_parts SET size = $4, etag = $5
             WHERE upload_id = $1 AND number = $2 AND etag = $3",
            &[
                &id,
                &i64::from(last.number),
                &last.etag,
                &to_i64(part.size),
                &part.etag,
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_keeps_its_options_and_loses_the_ones_handled_here() {
        let target = ConnectTarget::parse(
            "postgres://stowix:secret@db.example:6543/cache?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(target.to_string(), "db.example:6543/cache");
        assert_eq!(target.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(target.config.get_application_name(), Some("x"));
        assert_eq!(target.config.get_dbname(), Some("cache"));
        assert!(target.tls.is_some());
        let plain = ConnectTarget::parse("postgres://u@h/d?sslmode=disable").unwrap();
        assert!(plain.tls.is_none());
        assert_eq!(plain.config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
    }

    #[test]
    fn a_bad_url_is_refused_without_showing_the_password() {
        let err = ConnectTarget::parse("postgres://u:hunter2@h/d?sslmode=sometimes")
            .err()
            .unwrap();
        assert!(err.contains("sslmode=sometimes"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = ConnectTarget::parse("mysql://u@h/d").err().unwrap();
        assert!(err.contains("postgres://"), "{err}");
        let err = ConnectTarget::parse("postgres://u:hunter2@h/d?nonsense=1")
            .err()
            .unwrap();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn advisory_keys_differ_by_namespace_and_name() {
        assert_ne!(
            advisory_key(TOKEN_SESSIONS_LOCK, "a"),
            advisory_key(REPO_SESSIONS_LOCK, "a")
        );
        assert_ne!(
            advisory_key(SINGLETON_LOCK, "a"),
            advisory_key(SINGLETON_LOCK, "b")
        );
        assert_eq!(
            advisory_key(SINGLETON_LOCK, "a"),
            advisory_key(SINGLETON_LOCK, "a")
        );
    }
}
