//! Protection against clients that would exhaust the server: the cap on concurrent uploads,
//! the idle timeout on a stalled body, a shutdown that does not wait forever for one, and the
//! limit on failed authentications.

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

    // One upload in progress, stalled mid-body, holds the only slot.
    let stalled = start_partial_patch(&url, &token, &id, 0, file.len(), &file[..10_000]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    let deadline = Instant::now() + Duration::from_secs(10);
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
    let read = tokio::time::timeout(Duration::from_secs(15), stalled.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "a stalled upload body was not cut off within 15 s (idle timeout 1 s)"
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
    let mut server = TestServer::start_with_config("shutdown_grace_secs = 2\n");
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
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    server.terminate(Duration::from_secs(15));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?} with a 2 s grace period",
        started.elapsed()
    );
    drop(stalled);

    // The abandoned upload is still resumable after a restart.
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
            .json(&api::PublishRequest { narinfos: vec![] })
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
