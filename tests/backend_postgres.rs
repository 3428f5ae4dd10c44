//! `stowix serve --database postgres://…` end to end, with local file storage: `stowix admin`
//! manages repositories and tokens in the same database, the real `stowix nix push` uploads a
//! real closure, and `nix copy --from` substitutes it with signatures required. Also
//! `stowix admin db migrate` / `db status` on PostgreSQL.
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

#[test]
fn push_and_substitute_through_a_server_on_postgres() {
    common::require_nix();
    let db = TestDatabase::create();
    let server = TestServer::start_with_config(&format!("database = \"{}\"\n", db.url()));
    let data_dir = server.data_dir().to_path_buf();
    let repo = common::unique_name("pg");
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
    let migrated = admin_ok(&db, dir.path(), &["db", "migrate"]);
    assert!(migrated.contains("0 -> 2"), "{migrated}");
    let again = admin_ok(&db, dir.path(), &["db", "migrate"]);
    assert!(again.contains("2 -> 2"), "{again}");
    let status = admin_ok(&db, dir.path(), &["db", "status"]);
    assert!(status.contains("schema version: 2"), "{status}");

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
