//! Resumable uploads: chunks, the offset the server holds, a chunk cut off mid-way and
//! resumed, a client that restarts and finds its upload again, and the configured limits.

mod common;

use common::*;
use stowix::api::{self, codes};

/// Small limits so a 1 MiB NAR takes several chunks.
const CHUNK: usize = 256 * 1024;
const CONFIG: &str = "max_chunk_bytes = 262144\nmax_single_upload_bytes = 131072\n";

#[tokio::test]
async fn chunked_upload_interrupted_and_resumed_from_server_offset() {
    let server = TestServer::start_with_config(CONFIG);
    let repo = unique_name("chunks");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let info = repo_info(&url, &token).await;
    assert_eq!(
        info.limits.max_chunk_bytes, CHUNK as u64,
        "config not applied: {info:?}"
    );
    assert_eq!(info.limits.max_single_upload_bytes, 131072, "{info:?}");

    let path = LocalPath::load(&build_random("chunked", 1024 * 1024));
    let (file, params) = path.xz_upload();
    assert!(file.len() > 3 * CHUNK);
    let received_before = server
        .metric("stowix_server_upload_received_bytes_total")
        .await;

    // Too big for one request: the single-request route refuses it.
    let resp = http()
        .post(api_url(&url, "nars"))
        .query(&params)
        .header("Authorization", bearer(&token))
        .body(file.clone())
        .send()
        .await;
    assert_too_large(resp, "single upload over max_single_upload_bytes").await;

    let create = xz_create_upload(&path);
    let state = create_upload(&url, &token, &create).await;
    assert_eq!(state.offset, 0);
    assert!(!state.already_stored);
    let id = state.upload_id.clone();

    // First chunk arrives whole.
    let resp = patch_chunk(&url, &token, &id, 0, file[..CHUNK].to_vec()).await;
    let state: api::UploadState = parse_ok(resp, "PATCH first chunk").await;
    assert_eq!(state.offset, CHUNK as u64);

    // A chunk over the limit is refused and changes nothing.
    let resp = http()
        .patch(api_url(&url, &format!("uploads/{id}")))
        .header("Authorization", bearer(&token))
        .header(api::UPLOAD_OFFSET_HEADER, CHUNK.to_string())
        .body(file[CHUNK..3 * CHUNK].to_vec())
        .send()
        .await;
    assert_too_large(resp, "PATCH over max_chunk_bytes").await;
    assert_eq!(get_upload(&url, &token, &id).await.offset, CHUNK as u64);
    // A chunk at the wrong offset is refused with the offset the server holds.
    let resp = patch_chunk(&url, &token, &id, 10, file[10..100].to_vec()).await;
    let (status, err) = api_error(resp).await;
    assert_eq!(
        (status, err.code.as_str()),
        (409, codes::OFFSET_MISMATCH),
        "{err:?}"
    );
    assert_eq!(err.offset, Some(CHUNK as u64), "{err:?}");
    assert_eq!(get_upload(&url, &token, &id).await.offset, CHUNK as u64);

    // Second chunk: the connection drops after 100 KiB of 256 KiB.
    let partial = 100 * 1024;
    patch_then_drop_connection(
        &url,
        &token,
        &id,
        CHUNK as u64,
        CHUNK,
        &file[CHUNK..CHUNK + partial],
    )
    .await;
    let state = settled_upload_state(&url, &token, &id).await;
    assert_eq!(state.upload_id, id);
    assert!(
        state.offset >= CHUNK as u64 && state.offset <= (CHUNK + partial) as u64,
        "after a cut chunk the server holds {} bytes, expected {CHUNK}..={}",
        state.offset,
        CHUNK + partial
    );

    // A restarted client asks for the same upload and gets it back with the offset.
    let again = create_upload(&url, &token, &create).await;
    assert_eq!(again.upload_id, id, "a new upload instead of resuming");
    assert_eq!(again.offset, state.offset);
    // Another encoder descriptor is another byte stream: never resumed into this one.
    let mut other_encoder = create.clone();
    other_encoder.encoder = "another-encoder".to_string();
    let other = create_upload(&url, &token, &other_encoder).await;
    assert_ne!(other.upload_id, id);
    assert_eq!(other.offset, 0);

    // Resume from the server's offset to the end, then complete.
    patch_rest(&url, &token, &id, &file, state.offset, CHUNK).await;
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
    let stored: api::NarStored = parse_ok(resp, "complete").await;
    assert!(stored.newly_stored);
    assert_eq!(stored.file_hash, params.file_hash);
    assert_eq!(stored.file_size, params.file_size);
    let received_after = server
        .metric("stowix_server_upload_received_bytes_total")
        .await;
    assert!(
        received_after >= received_before + file.len() as f64,
        "upload_received_bytes_total grew by {} for a {}-byte file",
        received_after - received_before,
        file.len()
    );

    let resp = publish(&url, &token, &[&path]).await;
    assert_eq!(resp.published, vec![path.hash.clone()], "{resp:?}");
    nix_copy_from(&url, &key, std::slice::from_ref(&path.path), None).expect("substitute");

    // The finished upload is gone; a cancelled one too.
    let resp = get_upload_raw(&url, &token, &id).await;
    assert_eq!(resp.status(), 404, "finished upload still answers");
    let resp = http()
        .delete(api_url(&url, &format!("uploads/{}", other.upload_id)))
        .header("Authorization", bearer(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204, "DELETE upload");
    let resp = get_upload_raw(&url, &token, &other.upload_id).await;
    assert_eq!(resp.status(), 404, "deleted upload still answers");
}

#[tokio::test]
async fn completing_with_wrong_file_hash_or_size_fails_and_stores_nothing() {
    let server = TestServer::start_with_config(CONFIG);
    let repo = unique_name("complete");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let path = LocalPath::load(&build_random("complete", 300_000));
    let (file, params) = path.xz_upload();

    for (what, complete, code) in [
        (
            "file hash",
            api::CompleteUpload {
                file_hash: sha256_nix32(b"other"),
                file_size: params.file_size,
            },
            codes::FILE_HASH_MISMATCH,
        ),
        (
            "file size (larger than held)",
            api::CompleteUpload {
                file_hash: params.file_hash.clone(),
                file_size: params.file_size + 1,
            },
            // Declaring more than was sent may also be answered "send the rest from here".
            codes::FILE_SIZE_MISMATCH,
        ),
        (
            "file size (smaller than held)",
            api::CompleteUpload {
                file_hash: params.file_hash.clone(),
                file_size: params.file_size - 1,
            },
            codes::FILE_SIZE_MISMATCH,
        ),
    ] {
        let state = create_upload(&url, &token, &xz_create_upload(&path)).await;
        patch_rest(&url, &token, &state.upload_id, &file, state.offset, CHUNK).await;
        let resp = complete_upload(&url, &token, &state.upload_id, &complete).await;
        let (status, err) = api_error(resp).await;
        assert!(
            (400..500).contains(&status),
            "wrong {what}: {status} {err:?}"
        );
        if what.contains("larger") && err.code == codes::OFFSET_MISMATCH {
            assert_eq!(err.offset, Some(params.file_size), "wrong {what}: {err:?}");
        } else {
            assert_eq!(err.code, code, "wrong {what}: {err:?}");
        }
        let pres = presence(&url, &token, &[&path]).await;
        assert_eq!(pres.missing, vec![path.hash.clone()], "after wrong {what}");
    }
    assert!(!server.stores_file_with(&file));
}

#[tokio::test]
async fn single_upload_over_the_limit_is_refused() {
    let server = TestServer::start_with_config(CONFIG);
    let repo = unique_name("single");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let path = LocalPath::load(&build_random("too-big", 200_000));
    let (file, params) = path.xz_upload();
    let resp = http()
        .post(api_url(&url, "nars"))
        .query(&params)
        .header("Authorization", bearer(&token))
        .body(file.clone())
        .send()
        .await;
    assert_too_large(resp, "single upload over max_single_upload_bytes").await;
    assert!(!server.stores_file_with(&file));
    let pres = presence(&url, &token, &[&path]).await;
    assert_eq!(pres.missing, vec![path.hash.clone()]);
    // Under the limit is fine.
    let small = LocalPath::load(&build_random("small", 1000));
    upload_single(&url, &token, &small).await;
}

/// A completion that arrives once the NAR is stored (its first answer was lost, or the
/// session's row outlived the completion because the database dropped the connection) is
/// answered with the stored NAR, whatever the session holds, and ends the session.
#[tokio::test]
async fn completing_an_upload_whose_nar_is_already_stored_answers_the_stored_nar() {
    let server = TestServer::start_with_config(CONFIG);
    let repo = unique_name("complete-stored");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let path = LocalPath::load(&build_random("complete-stored", 600_000));
    let (file, params) = path.xz_upload();

    // Two sessions for one NAR (different encoders): the second holds one chunk when the
    // first completes.
    let first = create_upload(&url, &token, &xz_create_upload(&path)).await;
    let mut other = xz_create_upload(&path);
    other.encoder.push_str("-other");
    let second = create_upload(&url, &token, &other).await;
    assert_ne!(first.upload_id, second.upload_id);
    let resp = patch_chunk(&url, &token, &second.upload_id, 0, file[..CHUNK].to_vec()).await;
    let _: api::UploadState = parse_ok(resp, "PATCH the second session").await;
    patch_rest(&url, &token, &first.upload_id, &file, 0, CHUNK).await;
    let complete = api::CompleteUpload {
        file_hash: params.file_hash.clone(),
        file_size: params.file_size,
    };
    let resp = complete_upload(&url, &token, &first.upload_id, &complete).await;
    assert_eq!(resp.status(), 201);

    // Holding a quarter of the file, the second session would be told to send the rest.
    let resp = complete_upload(&url, &token, &second.upload_id, &complete).await;
    let stored: api::NarStored = parse_ok(resp, "completing the second session").await;
    assert_eq!(stored.nar_hash, params.nar_hash);
    assert_eq!(stored.file_hash, params.file_hash);
    assert!(!stored.newly_stored);
    // The session is gone.
    let resp = http()
        .get(api_url(&url, &format!("uploads/{}", second.upload_id)))
        .header("Authorization", bearer(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let pres = presence(&url, &token, &[&path]).await;
    assert_eq!(pres.nar_stored, vec![path.hash.clone()], "{pres:?}");
}
