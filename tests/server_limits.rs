//! Protection against clients that would exhaust the server: the cap on concurrent uploads,
//! the idle timeout on a stalled body, a shutdown that waits the grace period for one and no
//! longer, and the limit on failed authentications per client address (behind a trusted proxy
//! with `client_ip_header`, and without it). Waits are on events (metrics, answers), never on
//! fixed pauses.

mod common;

use std::time::{Duration, Instant};

use common::*;
use stowix::api::{self, codes};
use tokio::io::AsyncReadExt as _;

#[tokio::test]
async fn concurrent_upload_cap_answers_too_many_uploads() {
    let server = TestServer::start_with_config("max_concurrent_uploads = 1\n");
    let repo = unique_name("cap");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let slow = LocalPath::load(&build_random("cap-slow", 200_000));
    let other = LocalPath::load(&build_random("cap-other", 2_000));
    let (file, _) = slow.xz_upload();
    let id = create_upload(&url, &token, &xz_create_upload(&slow))
        .await
        .upload_id;

    // One upload in progress, stalled mid-body, holds the only slot (taken before the server
    // reads the body: once bytes arrive, the slot is held).
    let stalled = start_partial_patch(&url, &token, &id, 0, file.len(), &file[..10_000]).await;
    server.wait_for_received_bytes(10_000).await;
    let (other_file, params) = other.xz_upload();
    let resp = post_nar(&url, &token, &params, other_file).await;
    let retry_after = resp.headers().get("retry-after").cloned();
    let (status, err) = api_error(resp).await;
    assert_eq!(
        (status, err.code.as_str()),
        (503, codes::TOO_MANY_UPLOADS),
        "{err:?}"
    );
    assert!(retry_after.is_some(), "503 without Retry-After");
    // Reads are not uploads: still served.
    let resp = http()
        .get(format!("{url}/nix-cache-info"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // The slot comes back when the stalled client goes away.
    drop(stalled);
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let (other_file, params) = other.xz_upload();
        let resp = post_nar(&url, &token, &params, other_file).await;
        if resp.status().is_success() {
            break;
        }
        let (status, err) = api_error(resp).await;
        assert_eq!(err.code, codes::TOO_MANY_UPLOADS, "{status} {err:?}");
        assert!(Instant::now() < deadline, "upload slot never released");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn stalled_upload_body_is_cut_off_after_the_idle_timeout() {
    let server = TestServer::start_with_config("upload_idle_timeout_secs = 1\n");
    let repo = unique_name("idle");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let path = LocalPath::load(&build_random("idle", 100_000));
    let (file, params) = path.xz_upload();
    let id = create_upload(&url, &token, &xz_create_upload(&path))
        .await
        .upload_id;

    let sent = 40_000;
    let mut stalled = start_partial_patch(&url, &token, &id, 0, file.len(), &file[..sent]).await;
    // The server must answer or hang up on its own, well before this test's patience ends.
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), stalled.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "a stalled upload body was not cut off within 60 s (idle timeout 1 s)"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "cut off after {:?}, before the idle timeout",
        started.elapsed()
    );
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        !answer.starts_with("HTTP/1.1 2"),
        "a cut-off chunk was acknowledged: {answer}"
    );

    // What arrived is kept (or dropped), never more; the upload completes from there.
    let state = settled_upload_state(&url, &token, &id).await;
    assert!(state.offset <= sent as u64, "{state:?}");
    patch_rest(&url, &token, &id, &file, state.offset, file.len()).await;
    let resp = complete_upload(
        &url,
        &token,
        &id,
        &api::CompleteUpload {
            file_hash: params.file_hash.clone(),
            file_size: params.file_size,
        },
    )
    .await;
    parse_ok::<api::NarStored>(resp, "complete").await;
    let resp = publish(&url, &token, &[&path]).await;
    assert!(resp.rejected.is_empty(), "{resp:?}");
    nix_copy_from(&url, &key, std::slice::from_ref(&path.path), None).expect("substitute");
}

#[tokio::test]
async fn sigterm_with_a_stalled_upload_exits_after_the_grace_period() {
    // The stalled body would hold the request for the whole idle timeout (10 min): only the
    // grace period can end the shutdown within the test's bound.
    let grace = Duration::from_secs(2);
    let mut server = TestServer::start_with_config(&format!(
        "shutdown_grace_secs = {}\nupload_idle_timeout_secs = 600\n",
        grace.as_secs()
    ));
    let repo = unique_name("grace");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let path = LocalPath::load(&build_random("grace", 100_000));
    let (file, _) = path.xz_upload();
    let id = create_upload(&url, &token, &xz_create_upload(&path))
        .await
        .upload_id;
    let stalled = start_partial_patch(&url, &token, &id, 0, file.len(), &file[..30_000]).await;
    server.wait_for_received_bytes(30_000).await;

    let started = Instant::now();
    // Far below the idle timeout, far above the grace period: a generous bound that still
    // fails a shutdown waiting for the stalled body.
    let status = server.terminate(Duration::from_secs(60));
    let took = started.elapsed();
    assert!(
        status.success(),
        "SIGTERM with a stalled upload: exit status {status}\n{}",
        server.log_text()
    );
    assert!(
        took >= grace,
        "exited {took:?} after SIGTERM: it did not wait the {grace:?} grace period for the \
         request in flight\n{}",
        server.log_text()
    );
    drop(stalled);

    // The abandoned upload is still resumable after a restart, holding what arrived.
    server.restart();
    let url = server.repo_url(&repo);
    let state = get_upload(&url, &token, &id).await;
    assert!(state.offset <= 30_000, "{state:?}");
}

#[tokio::test]
async fn failed_authentications_are_rate_limited_per_client() {
    let server = TestServer::start_with_config("auth_failures_per_minute = 3\n");
    let repo = unique_name("brute");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let wrong = format!("stx_live_{}_{}", "a".repeat(26), "B".repeat(24));

    let mut codes_seen = Vec::new();
    for _ in 0..6 {
        let resp = http()
            .post(api_url(&url, "narinfos"))
            .header("Authorization", bearer(&wrong))
            .json(&api::PublishRequest {
                narinfos: vec![],
                upstream: vec![],
            })
            .send()
            .await
            .unwrap();
        let (status, err) = api_error(resp).await;
        codes_seen.push((status, err.code));
    }
    assert_eq!(
        codes_seen[0],
        (401, codes::INVALID_TOKEN.to_string()),
        "{codes_seen:?}"
    );
    assert_eq!(
        codes_seen.last().unwrap(),
        &(429, codes::TOO_MANY_ATTEMPTS.to_string()),
        "guessing went on unchecked: {codes_seen:?}"
    );
    // While limited, even the right token waits: guessing cannot be confirmed.
    let resp = http()
        .get(api_url(&url, "info"))
        .header("Authorization", bearer(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        429,
        "the limit does not hold for a right guess"
    );
}

/// One failed authentication through `GET api/v1/info` with a wrong token and `forwarded_for`
/// (None: no header); returns (status, code).
async fn guess(url: &str, forwarded_for: Option<&str>) -> (u16, String) {
    let wrong = format!("stx_live_{}_{}", "a".repeat(26), "B".repeat(24));
    let mut req = http()
        .get(api_url(url, "info"))
        .header("Authorization", bearer(&wrong));
    if let Some(value) = forwarded_for {
        req = req.header("X-Forwarded-For", value);
    }
    let (status, err) = api_error(req.send().await.unwrap()).await;
    (status, err.code)
}

/// Behind a reverse proxy every connection comes from the proxy: with `client_ip_header` the
/// failure budget belongs to the address the proxy appended (the right-most one); what a
/// client writes to the left of it cannot buy it a fresh budget.
#[tokio::test]
async fn behind_a_trusted_proxy_the_right_most_forwarded_address_is_the_client() {
    let server = TestServer::start_with_config(
        "auth_failures_per_minute = 3\nclient_ip_header = \"X-Forwarded-For\"\n",
    );
    let repo = unique_name("proxied");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let invalid = (401, codes::INVALID_TOKEN.to_string());
    let limited = (429, codes::TOO_MANY_ATTEMPTS.to_string());

    // One client (10.0.0.1 as the proxy saw it) spoofing a new address to the left each time.
    for i in 0..3 {
        let spoofed = format!("198.51.100.{i}, 10.0.0.1");
        assert_eq!(guess(&url, Some(&spoofed)).await, invalid, "guess {i}");
    }
    assert_eq!(
        guess(&url, Some("198.51.100.99, 10.0.0.1")).await,
        limited,
        "a spoofed left-most address bought a fresh failure budget"
    );
    // Even the right token waits while that client is limited.
    let resp = http()
        .get(api_url(&url, "info"))
        .header("Authorization", bearer(&token))
        .header("X-Forwarded-For", "10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        429,
        "the limit does not hold for a right guess"
    );

    // Other clients behind the same proxy keep their own budgets, even one that names the
    // limited address to the left of its own.
    assert_eq!(guess(&url, Some("10.0.0.1, 10.0.0.2")).await, invalid);
    assert_eq!(guess(&url, Some("10.0.0.3")).await, invalid);
    // A request without the header is the TCP peer (the proxy's own address here).
    assert_eq!(guess(&url, None).await, invalid);
    repo_info(&url, &token).await;
}

/// Without `client_ip_header` the header is whatever a client wrote: it is ignored, and every
/// guess from this connection's address counts against the same budget.
#[tokio::test]
async fn without_client_ip_header_forwarded_addresses_are_ignored() {
    let server = TestServer::start_with_config("auth_failures_per_minute = 3\n");
    let repo = unique_name("direct");
    server.create_repo(&repo, false);
    let url = server.repo_url(&repo);
    for i in 0..3 {
        let (status, code) = guess(&url, Some(&format!("10.0.0.{i}"))).await;
        assert_eq!(
            (status, code.as_str()),
            (401, codes::INVALID_TOKEN),
            "guess {i}"
        );
    }
    let (status, code) = guess(&url, Some("10.0.0.200")).await;
    assert_eq!(
        (status, code.as_str()),
        (429, codes::TOO_MANY_ATTEMPTS),
        "an X-Forwarded-For header the server was not told to trust bought a fresh budget"
    );
}
