//! The server crashing (SIGKILL) or stopping (SIGTERM): uploads in progress resume from the
//! bytes held on disk, published paths and tokens survive, shutdown is clean, and unfinished
//! uploads past `upload_expiry_hours` are gone after the next start.

mod common;

use std::time::Duration;

use common::*;
use stowix::api;

#[tokio::test]
async fn server_killed_mid_upload_resumes_from_held_offset() {
    let mut server = TestServer::start();
    let repo = unique_name("crash");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let path = LocalPath::load(&build_random("crash-upload", 1024 * 1024));
    let (file, params) = path.xz_upload();
    let url = server.repo_url(&repo);
    let limits = repo_info(&url, &token).await.limits;
    let chunk = (limits.max_chunk_bytes as usize).min(300 * 1024);
    assert!(file.len() > chunk, "the NAR fits one chunk of {chunk}");

    let create = xz_create_upload(&path);
    let state = create_upload(&url, &token, &create).await;
    let id = state.upload_id.clone();
    let resp = patch_chunk(&url, &token, &id, 0, file[..chunk].to_vec()).await;
    let state: api::UploadState = parse_ok(resp, "PATCH first chunk").await;
    assert_eq!(state.offset, chunk as u64);

    server.kill();
    server.restart();
    let url = server.repo_url(&repo);

    // The acknowledged chunk is held, under the same upload id.
    let state = get_upload(&url, &token, &id).await;
    assert_eq!(state.offset, chunk as u64, "offset after restart");
    let again = create_upload(&url, &token, &create).await;
    assert_eq!(again.upload_id, id, "restart lost the upload");
    assert_eq!(again.offset, chunk as u64);

    patch_rest(&url, &token, &id, &file, chunk as u64, chunk).await;
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
    let stored: api::NarStored = parse_ok(resp, "complete after restart").await;
    assert!(stored.newly_stored);
    let resp = publish(&url, &token, &[&path]).await;
    assert_eq!(resp.published, vec![path.hash.clone()], "{resp:?}");
    nix_copy_from(&url, &key, std::slice::from_ref(&path.path), None).expect("substitute");
}

/// A crash in the middle of a chunk: the server holds some prefix of what was sent, says so
/// after restarting, and the upload completes from there.
#[tokio::test]
async fn server_killed_during_a_chunk_resumes_from_what_it_holds() {
    let mut server = TestServer::start();
    let repo = unique_name("crashchunk");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let path = LocalPath::load(&build_random("crash-chunk", 600 * 1024));
    let (file, params) = path.xz_upload();
    let url = server.repo_url(&repo);
    let limits = repo_info(&url, &token).await.limits;
    let chunk = (limits.max_chunk_bytes as usize).min(file.len());

    let create = xz_create_upload(&path);
    let id = create_upload(&url, &token, &create).await.upload_id;
    // Send half a chunk, then kill the server while the request is open, once the server has
    // read all of it.
    let half = chunk / 2;
    let open = start_partial_patch(&url, &token, &id, 0, chunk, &file[..half]).await;
    server.wait_for_received_bytes(half as u64).await;
    server.kill();
    drop(open);
    server.restart();
    let url = server.repo_url(&repo);

    let state = settled_upload_state(&url, &token, &id).await;
    assert!(
        state.offset <= half as u64,
        "server claims {} bytes, only {half} were sent",
        state.offset
    );
    // The bytes it read were written before the crash: a SIGKILL loses no written data, so a
    // server holding nothing lost what it had received. S3 staging keeps whole chunks only
    // (a part is sent once its chunk is complete), so there the broken chunk is gone whole.
    if backends::backend() == backends::Backend::Scaleout {
        assert_eq!(state.offset, 0, "S3 staging kept part of a broken chunk");
    } else {
        assert!(
            state.offset > 0,
            "the server read {half} bytes of the chunk before it was killed, and holds none of \
             them after the restart"
        );
    }
    patch_rest(&url, &token, &id, &file, state.offset, chunk).await;
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
async fn published_paths_and_tokens_survive_a_restart() {
    let mut server = TestServer::start();
    let repo = unique_name("persist");
    let key = server.create_repo(&repo, true);
    let token = server.create_token(&repo, "push");
    let (dep, top) = build_pair();
    let dep = LocalPath::load(&dep);
    let top = LocalPath::load(&top);
    push_paths(&server.repo_url(&repo), &token, &[&dep, &top]).await;

    server.restart();
    let url = server.repo_url(&repo);
    let info = repo_info(&url, &token).await;
    assert_eq!(
        info.public_key, key,
        "repository key changed across a restart"
    );
    assert!(info.private);
    let pres = presence(&url, &token, &[&dep, &top]).await;
    assert!(
        pres.missing.is_empty() && pres.nar_stored.is_empty(),
        "{pres:?}"
    );
    nix_copy_from(&url, &key, std::slice::from_ref(&top.path), Some(&token)).expect("substitute");
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    let mut server = TestServer::start();
    let repo = unique_name("term");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let path = LocalPath::load(&build_random("term", 400 * 1024));
    let (file, _) = path.xz_upload();
    let url = server.repo_url(&repo);
    let limits = repo_info(&url, &token).await.limits;
    let chunk = (limits.max_chunk_bytes as usize).min(100 * 1024);
    let id = create_upload(&url, &token, &xz_create_upload(&path))
        .await
        .upload_id;
    let resp = patch_chunk(&url, &token, &id, 0, file[..chunk].to_vec()).await;
    parse_ok::<api::UploadState>(resp, "PATCH").await;

    let status = server.terminate(Duration::from_secs(60));
    assert!(status.success(), "SIGTERM exit status {status}");

    // Nothing was corrupted: the server starts again and the upload is where it was.
    server.restart();
    let url = server.repo_url(&repo);
    let state = get_upload(&url, &token, &id).await;
    assert_eq!(state.offset, chunk as u64);
}

/// Unfinished uploads expire `upload_expiry_hours` after their last chunk (clean-up runs at
/// start and hourly). Hours are not waited out: while the server is stopped, the uploads are
/// backdated in its database (created_at) and on disk (the part file's mtime).
#[tokio::test]
async fn unfinished_uploads_past_their_expiry_are_deleted_at_start() {
    let mut server = TestServer::start_with_config("upload_expiry_hours = 1\n");
    let repo = unique_name("expiry");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    // stale: created and last written 2 h ago. slow: created 2 h ago, written just now (a
    // large NAR on a slow link). fresh: neither.
    let mut uploads = Vec::new();
    for name in ["stale", "slow", "fresh"] {
        let path = LocalPath::load(&build_random(&format!("expiry-{name}"), 2_000));
        let (file, _) = path.xz_upload();
        let id = create_upload(&url, &token, &xz_create_upload(&path))
            .await
            .upload_id;
        patch_rest(&url, &token, &id, &file[..100], 0, 100).await;
        uploads.push((name, path, id));
    }
    let status = server.terminate(Duration::from_secs(60));
    assert!(status.success(), "SIGTERM exit status {status}");

    let two_hours = Duration::from_secs(2 * 3600);
    let db = rusqlite::Connection::open(server.data_dir().join("stowix.db")).expect("open db");
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    for (name, _, id) in &uploads[..2] {
        let changed = db
            .execute(
                "UPDATE uploads SET created_at = created_at - ?1, updated_at = updated_at - ?1 WHERE id = ?2",
                rusqlite::params![two_hours.as_secs() as i64, id],
            )
            .expect("backdate upload row");
        assert_eq!(changed, 1, "no database row for the {name} upload {id}");
    }
    drop(db);
    let part = |id: &str| server.data_dir().join("uploads").join(format!("{id}.part"));
    let stale_part = part(&uploads[0].2);
    std::fs::File::options()
        .write(true)
        .open(&stale_part)
        .unwrap_or_else(|e| panic!("open {}: {e}", stale_part.display()))
        .set_modified(std::time::SystemTime::now() - two_hours)
        .expect("backdate part file");

    server.restart();
    let url = server.repo_url(&repo);
    let (stale_path, stale_id) = (&uploads[0].1, &uploads[0].2);
    let resp = get_upload_raw(&url, &token, stale_id).await;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(
        status, 404,
        "the upload that expired an hour ago is still there after a restart: {body}"
    );
    assert!(body.contains(api::codes::NOT_FOUND), "{body}");
    assert!(
        !stale_part.exists(),
        "the expired upload's part file is left behind"
    );
    let db = rusqlite::Connection::open(server.data_dir().join("stowix.db")).expect("open db");
    let rows: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM uploads WHERE id = ?1",
            [stale_id],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(rows, 0, "the expired upload's database row is left behind");
    for (name, _, id) in &uploads[1..] {
        let state = get_upload(&url, &token, id).await;
        assert_eq!(
            state.offset, 100,
            "the {name} upload lost its bytes: {state:?}"
        );
    }
    // Asking again for the expired NAR starts over under a new id.
    let again = create_upload(&url, &token, &xz_create_upload(stale_path)).await;
    assert_ne!(&again.upload_id, stale_id);
    assert_eq!(again.offset, 0);
}
