//! `stowix serve --database postgres://…` end to end, with local file storage: `stowix admin`
//! manages repositories and tokens in the same database, the real `stowix nix push` uploads a
//! real closure, and `nix copy --from` substitutes it with signatures required. Also
//! `stowix admin db migrate` / `db status` (on PostgreSQL, and on the embedded default), and a
//! push that goes on while PostgreSQL drops every connection under the server.
//!
//! ```text
//!   TestDatabase (CREATE DATABASE) ◄── stowix admin --database URL (repo, token, db …)
//!        ▲
//!        └── stowix serve --config {database = URL} ◄── stowix nix push ── nix copy --from
//! ```

mod common;
mod pg_support;
mod push_common;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use pg_support::TestDatabase;
use stowix::cli::exit;

fn admin(db: &TestDatabase, data_dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(common::stowix_bin())
        .arg("admin")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--database")
        .arg(db.url())
        .args(args)
        .env_remove("STOWIX_DATABASE_URL")
        .env_remove("STOWIX_STORAGE_URL")
        .output()
        .expect("run `stowix admin`")
}

fn admin_ok(db: &TestDatabase, data_dir: &std::path::Path, args: &[&str]) -> String {
    let out = admin(db, data_dir, args);
    assert!(
        out.status.success(),
        "`stowix admin {}` failed with {}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("admin stdout is UTF-8")
}

fn count(db: &TestDatabase, table: &str) -> u64 {
    db.sql(&format!("SELECT count(*)::text FROM {table}"))[0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

/// A server on a fresh PostgreSQL database, with a repository and a push token made by
/// `stowix admin` on the same database.
struct OnPostgres {
    db: TestDatabase,
    server: TestServer,
    data_dir: std::path::PathBuf,
    repo: String,
    public_key: String,
    token: String,
}

impl OnPostgres {
    fn start(prefix: &str) -> Self {
        let db = TestDatabase::create();
        let server = TestServer::start_with_config(&format!("database = \"{}\"\n", db.url()));
        let data_dir = server.data_dir().to_path_buf();
        let repo = common::unique_name(prefix);
        let public_key = admin_ok(&db, &data_dir, &["repo", "create", &repo])
            .trim()
            .to_string();
        let token = admin_ok(
            &db,
            &data_dir,
            &["token", "create", "--repo", &repo, "--scope", "push"],
        )
        .trim()
        .to_string();
        OnPostgres {
            db,
            server,
            data_dir,
            repo,
            public_key,
            token,
        }
    }
}

#[test]
fn push_and_substitute_through_a_server_on_postgres() {
    common::require_nix();
    let OnPostgres {
        db,
        server,
        data_dir,
        repo,
        public_key,
        token,
    } = OnPostgres::start("pg");
    assert_eq!(count(&db, "repos"), 1, "the repository is in PostgreSQL");
    assert!(
        admin_ok(&db, &data_dir, &["repo", "list"]).contains(&repo),
        "admin reads it back"
    );

    let closure = common::realistic_closure();
    let root = closure.last().unwrap().clone();
    let expected = common::closure_of(std::slice::from_ref(&root)).len() as u64;
    let url = server.repo_url(&repo);
    let first = push_common::push_with(&url, Some(&token), &[&root], &[]);
    first.assert_code(exit::SUCCESS);
    assert_eq!(
        first.summary_count("uploaded"),
        expected,
        "{}",
        first.stderr
    );
    assert_eq!(count(&db, "narinfos"), expected);
    assert_eq!(count(&db, "nars"), expected);
    assert_eq!(count(&db, "uploads"), 0, "no session left open");
    assert!(
        !data_dir.join("stowix.db").exists(),
        "the server wrote an SQLite database although it was given PostgreSQL"
    );

    common::nix_copy_from(&url, &public_key, std::slice::from_ref(&root), None)
        .unwrap_or_else(|err| panic!("nix copy --from failed: {err}"));

    let second = push_common::push_with(&url, Some(&token), &[&root], &[]);
    second.assert_code(exit::SUCCESS);
    assert_eq!(second.summary_count("uploaded"), 0, "{}", second.stderr);
    assert_eq!(
        second.summary_count("already present"),
        expected,
        "{}",
        second.stderr
    );
}

#[test]
fn admin_db_migrate_and_status_on_postgres() {
    let db = TestDatabase::create();
    let dir = tempfile::tempdir().unwrap();
    let status = admin_ok(&db, dir.path(), &["db", "status"]);
    assert!(status.contains("schema version: 0"), "{status}");
    let latest = stowix::server::backend::metadata::postgres::SCHEMA_VERSION;
    let migrated = admin_ok(&db, dir.path(), &["db", "migrate"]);
    assert!(migrated.contains(&format!("0 -> {latest}")), "{migrated}");
    let again = admin_ok(&db, dir.path(), &["db", "migrate"]);
    assert!(again.contains(&format!("{latest} -> {latest}")), "{again}");
    let status = admin_ok(&db, dir.path(), &["db", "status"]);
    assert!(
        status.contains(&format!("schema version: {latest} (")),
        "{status}"
    );
    assert!(status.contains("up to date"), "{status}");

    // A database migrated by a newer release: admin and serve both refuse it, saying why.
    db.sql("UPDATE stowix_schema_version SET version = 999");
    let refused = admin(&db, dir.path(), &["repo", "list"]);
    assert_eq!(refused.status.code(), Some(exit::FAILURE));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("999"), "{stderr}");
    let status = admin_ok(&db, dir.path(), &["db", "status"]);
    assert!(status.contains("schema version: 999"), "{status}");
    let serve = Command::new(common::stowix_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--database")
        .arg(db.url())
        .output()
        .expect("run `stowix serve`");
    assert!(!serve.status.success());
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert!(stderr.contains("999"), "{stderr}");
}

#[test]
fn a_push_survives_the_database_dropping_every_connection() {
    common::require_nix();
    let OnPostgres {
        db,
        server,
        repo,
        public_key,
        token,
        ..
    } = OnPostgres::start("pgloss");
    let closure = common::realistic_closure();
    let small_root = closure.last().unwrap().clone();
    // Incompressible, in 64 KiB chunks: dozens of metadata calls per upload.
    let big = common::build_random("pgloss-big", 3 << 20);
    let roots = [small_root, big];

    // What a database restart or failover does to the replica: every connection closed
    // under it, again and again, while the push runs.
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let stop = Arc::clone(&stop);
        let name = db.name().to_string();
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                pg_support::query(
                    &pg_support::admin_url(),
                    &format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = '{name}' AND application_name = 'stowix'"
                    ),
                )
                .expect("terminate the server's connections");
                rounds += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            rounds
        })
    };
    let url = server.repo_url(&repo);
    let pushed = push_common::push_with(
        &url,
        Some(&token),
        &["--jobs", "4", &roots[0], &roots[1]],
        &[("STOWIX_CHUNK_SIZE", "65536")],
    );
    stop.store(true, Ordering::Relaxed);
    let rounds = killer.join().unwrap();
    pushed.assert_code(exit::SUCCESS);
    assert!(rounds >= 3, "connections were dropped only {rounds} times");
    let expected = common::closure_of(&roots).len() as u64;
    assert_eq!(count(&db, "narinfos"), expected);
    common::nix_copy_from(&url, &public_key, &roots, None)
        .unwrap_or_else(|err| panic!("nix copy --from failed: {err}"));
}

/// The same commands on the embedded default, where the version lives in the SQLite file.
#[test]
fn admin_db_commands_on_the_embedded_default_too() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(common::stowix_bin())
            .arg("admin")
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("STOWIX_DATABASE_URL")
            .env_remove("STOWIX_STORAGE_URL")
            .output()
            .expect("run `stowix admin`");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let latest = stowix::server::backend::metadata::sqlite::SCHEMA_VERSION;
    assert!(run(&["db", "status"]).contains("schema version: 0 ("));
    assert!(
        !dir.path().join("stowix.db").exists(),
        "status created the database"
    );
    assert!(run(&["db", "migrate"]).contains(&format!("0 -> {latest}")));
    assert!(run(&["db", "status"]).contains("up to date"));
}

#[test]
fn a_janitor_lock_lost_with_its_connection_is_detected() {
    use stowix::server::backend::metadata::{Metadata, PostgresMetadata};
    let db = TestDatabase::create();
    let meta = PostgresMetadata::open(db.url(), 2).expect("open the test database");
    let guard = meta
        .try_singleton("janitor")
        .unwrap()
        .expect("nobody holds the janitor's lock yet");
    assert!(guard.still_held());
    assert!(
        meta.try_singleton("janitor").unwrap().is_none(),
        "the lock is exclusive"
    );
    // The session holding the advisory lock, as an administrator (or a failover) would end it.
    let holders = db.sql(&format!(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
         AND database = (SELECT oid FROM pg_database WHERE datname = '{}')",
        db.name()
    ));
    assert_eq!(holders.len(), 1, "{holders:?}");
    let pid = holders[0].clone().unwrap();
    db.sql(&format!("SELECT pg_terminate_backend({pid})"));
    assert!(
        !guard.still_held(),
        "the guard still claims a lock its terminated session lost"
    );
    assert!(
        meta.try_singleton("janitor").unwrap().is_some(),
        "another process can take the lost lock"
    );
}
