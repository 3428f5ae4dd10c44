//! Checks of the scale-out test harness itself (tests/common/backends.rs), so that the tests
//! built on it can fail: a PostgreSQL database per test that really goes away, a SeaweedFS that
//! checks signatures, a watchdog that stops what it guards when the test process is gone, and
//! the committed nginx configuration streaming request bodies to the replica.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::backends::{self, Balancer, TestDatabase};
use common::*;

#[test]
fn each_test_database_is_its_own_and_is_dropped_with_its_guard() {
    let one = TestDatabase::create();
    let two = TestDatabase::create();
    assert_ne!(one.name(), two.name());
    assert_eq!(one.query("SELECT current_database()"), vec![one.name()]);
    one.query("CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
    assert_eq!(one.query("SELECT x FROM t"), vec!["7"]);
    // Another test's database does not see it.
    let other = common::backends::psql(
        two.url(),
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 't'",
    );
    assert_eq!(other.trim(), "0");

    let name = one.name().to_string();
    let admin = std::env::var("STOWIX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let count = |name: &str| {
        backends::psql(
            &admin,
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
        )
        .trim()
        .to_string()
    };
    assert_eq!(count(&name), "1");
    drop(one);
    assert_eq!(count(&name), "0", "database {name} outlived its guard");
}

#[test]
fn s3_stores_what_is_signed_and_refuses_what_is_not() {
    let s3 = backends::s3();
    let prefix = format!("harness-{}/", nonce());
    let key = format!("{prefix}dir/object.bin");
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    s3.put(&key, &bytes);
    assert_eq!(s3.get(&key), bytes);
    assert_eq!(
        s3.list_sized(&prefix),
        vec![(key.clone(), bytes.len() as u64)]
    );
    assert!(s3.list(&format!("{prefix}elsewhere/")).is_empty());

    // Unsigned, and signed with a wrong secret: refused.
    let url = format!("{}/{}/{key}", s3.endpoint, s3.bucket);
    let unsigned = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&unsigned.stdout), "403");
    let forged = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{}:s3", s3.region))
        .arg("--user")
        .arg(format!("{}:not-the-secret", s3.access_key))
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&forged.stdout), "403");
}

#[test]
fn the_watchdog_stops_its_program_and_cleans_up_when_its_pipe_closes() {
    let dir = tempfile::Builder::new()
        .prefix("stowix-watchdog-")
        .tempdir()
        .unwrap()
        .keep();
    let (mut watchdog, lifeline, pid) = backends::watchdog(
        &dir,
        "",
        std::path::Path::new("/bin/sleep"),
        &["1000".to_string()],
    )
    .expect("start the watchdog");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        backends::process_alive(pid),
        "the guarded program is not running"
    );

    // What happens to the pipe when the test process exits, however it exits.
    drop(lifeline);
    let deadline = Instant::now() + Duration::from_secs(20);
    while watchdog.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the watchdog did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !backends::process_alive(pid),
        "the guarded program outlived its pipe"
    );
    assert!(!dir.exists(), "the watchdog left {} behind", dir.display());
}

#[test]
fn the_nginx_template_needs_its_upstream_and_listen_lines() {
    let template = fs::read_to_string(backends::nginx_template()).unwrap();
    let rendered = backends::render_nginx_conf(
        &template,
        &["127.0.0.1:1001".into(), "127.0.0.1:1002".into()],
        "127.0.0.1:2000",
    );
    assert!(rendered.contains("server 127.0.0.1:1001 max_fails=1 fail_timeout=10s;"));
    assert!(rendered.contains("server 127.0.0.1:1002 max_fails=1 fail_timeout=10s;"));
    assert!(rendered.contains("listen 127.0.0.1:2000;"));
    assert!(!rendered.contains("10.0.0.11"), "{rendered}");
    let without_listen = template.replace("    listen 80;", "");
    let refused = std::panic::catch_unwind(|| {
        backends::render_nginx_conf(&without_listen, &["127.0.0.1:1".into()], "127.0.0.1:2")
    });
    assert!(refused.is_err(), "a template without `listen` was rendered");
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_streams_chunk_bodies_to_the_replica_as_they_arrive() {
    require_nix();
    let server = TestServer::start();
    let lb = Balancer::start(&[server.addr()]);
    let repo = unique_name("nginx");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = lb.repo_url(&repo);

    let path = LocalPath::load(&build_random("streamed", 2 << 20));
    let (file, _) = path.xz_upload();
    let upload = create_upload(&url, &token, &xz_create_upload(&path)).await;
    // A quarter of a chunk sent, the rest held back: only a proxy that streams the body lets
    // the replica see those bytes before the body is complete.
    let quarter = file.len() / 4;
    let _held = start_partial_patch(
        &url,
        &token,
        &upload.upload_id,
        0,
        file.len(),
        &file[..quarter],
    )
    .await;
    server.wait_for_received_bytes(quarter as u64).await;

    // The upload was created through nginx, not around it.
    let log = lb.access_log();
    assert!(
        log.iter()
            .any(|r| r.method == "POST" && r.upstreams == [server.addr()]),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_spreads_requests_over_all_replicas() {
    let a = TestServer::start();
    let b = TestServer::start();
    let lb = Balancer::start(&[a.addr(), b.addr()]);
    let http = http();
    for _ in 0..6 {
        let resp = http
            .get(format!("{}/healthz", lb.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let log = lb.access_log();
    for replica in [&a, &b] {
        let n = log
            .iter()
            .filter(|r| r.upstreams == [replica.addr()])
            .count();
        assert_eq!(n, 3, "requests to {}: {log:?}", replica.addr());
    }
}
