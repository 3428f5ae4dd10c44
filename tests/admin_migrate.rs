//! `stowix admin migrate`: an embedded installation (a real server's data dir, filled by
//! `stowix nix push`, `nix store copy-log` and `stowix admin`) moved into PostgreSQL + S3
//! (a real database and SeaweedFS, `tests/common/backends.rs`), then served by a scale-out
//! server: Nix substitutes with the same key, tokens keep (or lose) their rights, and a
//! migration killed mid-copy finishes on a rerun without ever publishing a narinfo whose NAR
//! is not complete.

mod common;
mod push_common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::backends::ScaleoutBackends;
use common::*;
use push_common::push_with;
use stowix::cli::exit;

/// An embedded server (SQLite + local files) whatever the run's backend: the source.
fn embedded_server() -> TestServer {
    TestServer::start_with_env("", Vec::new())
}

/// `stowix admin migrate --from-data-dir FROM` into `target`, with `extra` arguments.
fn migrate_command(from: &Path, target: &ScaleoutBackends) -> Command {
    let mut cmd = stowix_command();
    cmd.args(["admin", "migrate", "--from-data-dir"]).arg(from);
    target.apply(&mut cmd);
    for var in ["STOWIX_CONFIG", "STOWIX_DATA_DIR"] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn migrate(from: &Path, target: &ScaleoutBackends) -> Output {
    migrate_command(from, target)
        .output()
        .expect("run stowix admin migrate")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_migrated(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The summary line of `kind`: (copied, already there).
fn counts(summary: &str, kind: &str) -> (u64, u64) {
    let line = summary
        .lines()
        .find(|l| l.starts_with(kind))
        .unwrap_or_else(|| panic!("no {kind:?} line in the summary:\n{summary}"));
    let number_before = |label: &str| -> u64 {
        let before = &line[..line
            .find(label)
            .unwrap_or_else(|| panic!("no {label:?} in {line:?}"))];
        before
            .split_whitespace()
            .rev()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no count before {label:?} in {line:?}"))
    };
    (number_before(" copied"), number_before(" already there"))
}

async fn get(url: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let mut request = http().get(url);
    if let Some(token) = token {
        request = request.header("Authorization", basic(token));
    }
    let resp = request.send().await.expect("GET");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.expect("body").to_vec())
}

/// The repository invariant, through the server: every narinfo its database holds is served,
/// signed by `key`, with its NAR whole and its references served (`invariants::check_served`).
/// Returns how many.
async fn assert_every_narinfo_has_its_nar(
    server: &TestServer,
    repo: &str,
    key: &str,
    token: Option<&str>,
) -> usize {
    let mut hashes = server.published_hashes(repo);
    hashes.sort();
    let served = invariants::check_served(&server.repo_url(repo), key, token, &hashes)
        .await
        .unwrap_or_else(|problems| panic!("the migrated repository is broken:\n{problems}"));
    assert_eq!(served, hashes, "a narinfo in the database is not served");
    hashes.len()
}

/// A fresh scale-out target (PostgreSQL database + bucket prefix) with its schema created by
/// a server that then stops: `restart()` serves the target once migrated.
fn scaleout_target() -> (TestServer, Arc<ScaleoutBackends>) {
    let mut server = TestServer::start_scaleout(None);
    let backends = Arc::clone(server.scaleout().expect("scale-out server"));
    server.kill();
    (server, backends)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_embedded_installation_moves_to_postgres_and_s3_and_keeps_working() {
    require_nix();
    let mut source = embedded_server();
    let public = unique_name("mig");
    let private = unique_name("mig-private");
    let public_key = source.create_repo(&public, false);
    let private_key = source.create_repo(&private, true);
    let push = source.create_token(&public, "push");
    let revoked = source.create_token(&public, "push");
    let private_push = source.create_token(&private, "push");
    let private_read = source.create_token(&private, "read");
    source.admin(&["token", "revoke", token_id(&revoked).expect("token id")]);

    let marker = nonce();
    let paths = build_derivations(&[
        Drv::new(
            "mig-dep",
            &format!("echo 'building dep {marker}'; echo {marker} > $out"),
        ),
        Drv::new("mig-top", "echo 'building top'; echo $dep0 > $out").deps(&[0]),
    ]);
    let top = paths[1].clone();
    let public_url = source.repo_url(&public);
    let private_url = source.repo_url(&private);
    push_with(&public_url, Some(&push), &["--pin", "release", &top], &[])
        .assert_code(exit::SUCCESS);
    source.admin(&["repo", "configure", &public, "--retention", "30d"]);
    let secret = build_text("mig-secret", &format!("secret {marker}"));
    push_with(&private_url, Some(&private_push), &[&secret], &[]).assert_code(exit::SUCCESS);
    // A build log, as Nix uploads it.
    let drv = deriver(&paths[0]);
    let dir = tempfile::tempdir().unwrap();
    let netrc = netrc_file(dir.path(), &public_url, &push);
    nix(
        &["store", "copy-log", "--to", &public_url, &drv],
        Some(&netrc),
    )
    .expect("nix store copy-log --to");
    let log_path = format!("log/{}", drv.trim_start_matches("/nix/store/"));
    let (status, log_before) = get(&format!("{public_url}/{log_path}"), None).await;
    assert_eq!(status, 200);
    source.terminate(Duration::from_secs(20));

    let (mut target, backends) = scaleout_target();
    let first = assert_migrated(&migrate(source.data_dir(), &backends));
    assert_eq!(counts(&first, "repositories"), (2, 0), "{first}");
    assert_eq!(counts(&first, "tokens"), (4, 0), "{first}");
    assert_eq!(counts(&first, "NARs"), (3, 0), "{first}");
    assert_eq!(counts(&first, "narinfos"), (3, 0), "{first}");
    assert_eq!(counts(&first, "listings"), (3, 0), "{first}");
    assert_eq!(counts(&first, "build logs"), (1, 0), "{first}");
    assert_eq!(counts(&first, "retention policies"), (1, 0), "{first}");
    assert_eq!(counts(&first, "pin revisions"), (1, 0), "{first}");

    // Idempotent: a second run finds everything there and says so.
    let second = assert_migrated(&migrate(source.data_dir(), &backends));
    assert!(second.contains("nothing to copy"), "second run:\n{second}");
    assert_eq!(counts(&second, "NARs"), (0, 3), "{second}");
    assert_eq!(counts(&second, "narinfos"), (0, 3), "{second}");
    assert_eq!(counts(&second, "tokens"), (0, 4), "{second}");
    assert_eq!(counts(&second, "pin revisions"), (0, 1), "{second}");

    target.restart();
    let public_url = target.repo_url(&public);
    let private_url = target.repo_url(&private);
    assert_eq!(target.admin(&["repo", "list"]).lines().count(), 2);
    let pins = target.admin(&["pin", "list", "--repo", &public]);
    assert!(
        pins.lines()
            .any(|l| l.contains("\trelease\t") && l.contains(&top)),
        "the pin after migration:\n{pins}"
    );
    let shown = target.admin(&["repo", "show", &public]);
    assert!(
        shown.contains("30d") || shown.contains("2592000"),
        "{shown}"
    );

    // The same substituter keys keep working.
    nix_copy_from(&public_url, &public_key, std::slice::from_ref(&top), None)
        .expect("nix copy --from the migrated public repository");
    nix_copy_from(
        &private_url,
        &private_key,
        std::slice::from_ref(&secret),
        Some(&private_read),
    )
    .expect("nix copy --from the migrated private repository with the read token");
    assert_eq!(
        get(
            &format!("{private_url}/{}.narinfo", hash_part(&secret)),
            None
        )
        .await
        .0,
        404,
        "the private repository stays private"
    );
    assert_eq!(
        assert_every_narinfo_has_its_nar(&target, &public, &public_key, None).await,
        2
    );
    assert_eq!(
        assert_every_narinfo_has_its_nar(&target, &private, &private_key, Some(&private_read))
            .await,
        1
    );

    // The log and the listings are served from the bucket.
    let (status, log) = get(&format!("{public_url}/{log_path}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(log, log_before, "the build log after migration");
    let (status, listing) = get(&format!("{public_url}/{}.ls", hash_part(&top)), None).await;
    assert_eq!(status, 200);
    serde_json::from_slice::<serde_json::Value>(&listing).expect("listing is JSON");

    // The old push token still pushes; the revoked one is refused.
    let more = build_text("mig-after", &format!("after {marker}"));
    push_with(&public_url, Some(&revoked), &[&more], &[]).assert_code(exit::AUTH);
    push_with(&public_url, Some(&push), &[&more], &[]).assert_code(exit::SUCCESS);
    nix_copy_from(&public_url, &public_key, &[more, top], None)
        .expect("nix copy --from after a push to the migrated repository");
}

#[test]
fn bad_sources_and_targets_fail_with_their_own_exit_codes() {
    let mut source = embedded_server();
    let repo = unique_name("mig-err");
    source.create_repo(&repo, false);
    source.terminate(Duration::from_secs(20));
    let data_dir = source.data_dir().to_path_buf();
    let (_target, backends) = scaleout_target();

    let expect = |out: Output, code: i32, needle: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "{}", text(&out));
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
        assert!(error.contains(needle), "{error:?} should name {needle:?}");
    };

    let missing = data_dir.join("nope");
    expect(
        migrate(&missing, &backends),
        exit::NO_SOURCE,
        "does not exist",
    );
    let not_embedded = tempfile::tempdir().unwrap();
    expect(
        migrate(not_embedded.path(), &backends),
        exit::NOT_EMBEDDED,
        "holds no stowix.db",
    );

    // The source's own database or store as the target.
    let mut same = stowix_command();
    same.args(["admin", "migrate", "--from-data-dir"])
        .arg(&data_dir)
        .arg("--database")
        .arg(format!("sqlite://{}", data_dir.join("stowix.db").display()))
        .arg("--storage")
        .arg(format!("file://{}", not_embedded.path().display()));
    expect(same.output().unwrap(), exit::SAME_AS_TARGET, "stowix.db");
    let mut same = stowix_command();
    same.args(["admin", "migrate", "--from-data-dir"])
        .arg(&data_dir)
        .arg("--database")
        .arg(format!(
            "sqlite://{}",
            not_embedded.path().join("t.db").display()
        ))
        .arg("--storage")
        .arg(format!("file://{}", data_dir.join("store").display()));
    expect(same.output().unwrap(), exit::SAME_AS_TARGET, "store");

    // No target storage named.
    let mut half = stowix_command();
    half.args(["admin", "migrate", "--from-data-dir"])
        .arg(&data_dir)
        .arg("--database")
        .arg(backends.db.url())
        .env_remove("STOWIX_STORAGE_URL");
    expect(half.output().unwrap(), exit::USAGE, "--storage");

    // Nothing listens on port 1.
    let mut unreachable = stowix_command();
    unreachable
        .args(["admin", "migrate", "--from-data-dir"])
        .arg(&data_dir)
        .arg("--database")
        .arg("postgres://postgres@127.0.0.1:1/nothing")
        .arg("--storage")
        .arg(backends.storage_url());
    expect(
        unreachable.output().unwrap(),
        exit::UNREACHABLE,
        "unreachable",
    );

    // A source migrated by a newer stowix.
    let newer = tempfile::tempdir().unwrap();
    for file in ["stowix.db", "stowix.db-wal"] {
        if data_dir.join(file).exists() {
            std::fs::copy(data_dir.join(file), newer.path().join(file)).unwrap();
        }
    }
    rusqlite::Connection::open(newer.path().join("stowix.db"))
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    expect(
        migrate(newer.path(), &backends),
        exit::NOT_EMBEDDED,
        "schema version 99",
    );

    // A repository of the same name with another key is never overwritten.
    let mut admin = stowix_command();
    admin.args(["admin", "repo", "create", &repo]);
    backends.apply(&mut admin);
    assert!(admin.output().unwrap().status.success());
    expect(migrate(&data_dir, &backends), exit::CONFLICT, &repo);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_killed_mid_copy_finishes_on_a_rerun() {
    require_nix();
    let mut source = embedded_server();
    let repo = unique_name("mig-kill");
    let key = source.create_repo(&repo, false);
    let token = source.create_token(&repo, "push");
    // Incompressible NARs of 2 MiB: each takes a visible moment to copy.
    const PATHS: usize = 24;
    let marker = nonce();
    let drvs: Vec<Drv> = (0..PATHS)
        .map(|i| {
            Drv::new(
                &format!("mig-kill-{i}"),
                &format!("echo {marker}; /usr/bin/head -c 2097152 /dev/urandom > $out"),
            )
        })
        .collect();
    let paths = build_derivations(&drvs);
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    push_with(&source.repo_url(&repo), Some(&token), &args, &[]).assert_code(exit::SUCCESS);
    source.terminate(Duration::from_secs(20));

    let (mut target, backends) = scaleout_target();
    let copied_nars = || -> usize {
        backends.db.query("SELECT count(*) FROM nars")[0]
            .trim()
            .parse()
            .unwrap()
    };
    let mut child = migrate_command(source.data_dir(), &backends)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stowix admin migrate");
    let deadline = Instant::now() + Duration::from_secs(60);
    while copied_nars() < 3 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "migrate finished before it could be killed: make the NARs larger"
        );
        assert!(Instant::now() < deadline, "migrate copied nothing in 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL migrate");
    child.wait().unwrap();
    let at_kill = copied_nars();
    assert!(
        at_kill < PATHS,
        "migrate had copied all {PATHS} NARs when killed: make the NARs larger"
    );

    // What the killed run was writing is known to the janitor: every NAR object without a
    // row has an intent (one NAR is in flight at a time; a kill between its row and clearing
    // its intent leaves an intent the janitor drops).
    let intents = backends.db.query("SELECT key FROM object_intents");
    assert!(intents.len() <= 1, "one NAR in flight at most: {intents:?}");
    let with_rows = backends.db.query("SELECT object_key FROM nars");
    for object in backends.objects() {
        if object.contains("/nar/") && !with_rows.contains(&object) {
            assert!(
                intents.contains(&object),
                "{object} has neither a row nor an intent"
            );
        }
    }

    // Killed mid-copy, in the NAR pass: narinfos come only after every NAR, so the target
    // publishes nothing yet (and nothing broken).
    target.restart();
    let published = assert_every_narinfo_has_its_nar(&target, &repo, &key, None).await;
    assert_eq!(published, 0, "narinfos published before the NAR pass ended");
    target.kill();

    let rerun = assert_migrated(&migrate(source.data_dir(), &backends));
    let (nars, present) = counts(&rerun, "NARs");
    assert_eq!(nars + present, PATHS as u64, "{rerun}");
    assert!(present >= at_kill as u64, "{rerun}");
    assert_eq!(
        counts(&rerun, "narinfos").0 as usize,
        PATHS - published,
        "{rerun}"
    );
    let again = assert_migrated(&migrate(source.data_dir(), &backends));
    assert!(again.contains("nothing to copy"), "{again}");
    assert!(
        backends
            .db
            .query("SELECT key FROM object_intents")
            .is_empty(),
        "a finished migration leaves no intents"
    );

    target.restart();
    assert_eq!(
        assert_every_narinfo_has_its_nar(&target, &repo, &key, None).await,
        PATHS
    );
    nix_copy_from(&target.repo_url(&repo), &key, &paths, None)
        .expect("nix copy --from after a resumed migration");
}
