//! What the server signs and how it keeps upload sessions, against the real binary:
//! references must name published (or same-batch) store paths exactly, on both publication
//! routes; chunked-upload sessions are unique per NAR, capped per token and per repository,
//! and their sizes cannot wrap.

mod common;

use common::*;
use stowix::api::{self, codes};

/// `path` with its name replaced: same hash part, another store path.
fn renamed(path: &str, name: &str) -> String {
    format!("/nix/store/{}-{name}", hash_part(path))
}

/// The publication entry of `path` with `refs` as its references.
fn entry_with_refs(path: &LocalPath, refs: Vec<String>) -> api::PublishEntry {
    api::PublishEntry {
        references: refs,
        ..path.publish_entry()
    }
}

fn assert_refused_for_missing(resp: &api::PublishResponse, hash: &str, missing: &str) {
    assert!(resp.published.is_empty(), "{resp:?}");
    let rejection = resp
        .rejected
        .iter()
        .find(|r| r.hash == hash)
        .unwrap_or_else(|| panic!("{hash} not rejected: {resp:?}"));
    assert_eq!(rejection.code, codes::MISSING_REFERENCES, "{rejection:?}");
    assert!(rejection.message.contains(missing), "{rejection:?}");
}

#[tokio::test]
async fn push_api_refuses_references_that_match_only_by_hash_part() {
    let server = TestServer::start();
    let repo = unique_name("exact");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let (dep_path, top_path) = build_pair();
    let (dep, top) = (LocalPath::load(&dep_path), LocalPath::load(&top_path));
    assert_eq!(top.references, vec![dep_path.clone()]);
    push_paths(&url, &token, &[&dep]).await;
    upload_single(&url, &token, &top).await;

    // A published hash part under another name is not the published path.
    let wrong_dep = renamed(&dep_path, "not-the-dependency");
    let resp = post_publish(
        &url,
        &token,
        vec![entry_with_refs(&top, vec![wrong_dep.clone()])],
    )
    .await;
    let resp: api::PublishResponse = parse_ok(resp, "publish with a renamed reference").await;
    assert_refused_for_missing(&resp, &top.hash, &wrong_dep);

    // Nor is the path's own hash part under another name.
    let wrong_self = renamed(&top_path, "not-me");
    let refs = vec![dep_path.clone(), wrong_self.clone()];
    let resp = post_publish(&url, &token, vec![entry_with_refs(&top, refs)]).await;
    let resp: api::PublishResponse = parse_ok(resp, "publish with a renamed self-reference").await;
    assert_refused_for_missing(&resp, &top.hash, &wrong_self);
    assert_eq!(
        get_narinfo(&url, &top.hash).await.0,
        404,
        "a refused path was published"
    );

    // The true closure publishes, and real Nix substitutes it with only the repository key.
    let resp = publish(&url, &token, &[&top]).await;
    assert_eq!(resp.published, vec![top.hash.clone()], "{resp:?}");
    nix_copy_from(&url, &key, &[top_path], None).expect("nix copy --from the true closure");
}

#[tokio::test]
async fn push_api_refuses_a_batch_member_named_differently_from_the_reference() {
    let server = TestServer::start();
    let repo = unique_name("batch");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let (dep_path, top_path) = build_pair();
    let (dep, top) = (LocalPath::load(&dep_path), LocalPath::load(&top_path));
    upload_single(&url, &token, &dep).await;
    upload_single(&url, &token, &top).await;
    let wrong_dep = renamed(&dep_path, "renamed");
    let entries = vec![
        dep.publish_entry(),
        entry_with_refs(&top, vec![wrong_dep.clone()]),
    ];
    let resp = post_publish(&url, &token, entries).await;
    let resp: api::PublishResponse = parse_ok(resp, "publish a batch").await;
    assert_eq!(resp.published, vec![dep.hash.clone()], "{resp:?}");
    assert_eq!(resp.rejected.len(), 1, "{resp:?}");
    assert_eq!(resp.rejected[0].code, codes::MISSING_REFERENCES);
    assert!(resp.rejected[0].message.contains(&wrong_dep), "{resp:?}");
}

/// `nix copy --to`'s route: the NAR by `PUT nar/<file>`, then `PUT <hash>.narinfo`.
async fn put(url: &str, token: &str, what: &str, body: Vec<u8>) -> (u16, String) {
    let resp = http()
        .put(format!("{url}/{what}"))
        .header("Authorization", basic(token))
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {what}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// The narinfo `nix copy` would write for `path` (stored as `file`), with `references`.
fn narinfo_text(path: &LocalPath, file: &[u8], references: &[String]) -> String {
    let file_hash = sha256_nix32(file);
    let basenames: Vec<&str> = references
        .iter()
        .map(|r| r.trim_start_matches("/nix/store/"))
        .collect();
    format!(
        "StorePath: {}\nURL: nar/{}.nar.xz\nCompression: xz\nFileHash: {file_hash}\nFileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
        path.path,
        file_hash.trim_start_matches("sha256:"),
        file.len(),
        path.nar_hash,
        path.nar_size(),
        basenames.join(" "),
    )
}

#[tokio::test]
async fn nix_copy_route_refuses_references_that_match_only_by_hash_part() {
    let server = TestServer::start();
    let repo = unique_name("exactput");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let (dep_path, top_path) = build_pair();
    let (dep, top) = (LocalPath::load(&dep_path), LocalPath::load(&top_path));
    let (dep_file, top_file) = (xz(&dep.nar), xz(&top.nar));
    for file in [&dep_file, &top_file] {
        let name = format!(
            "nar/{}.nar.xz",
            sha256_nix32(file).trim_start_matches("sha256:")
        );
        let (status, body) = put(&url, &token, &name, file.clone()).await;
        assert_eq!(status, 200, "PUT {name}: {body}");
    }
    let (status, body) = put(
        &url,
        &token,
        &format!("{}.narinfo", dep.hash),
        narinfo_text(&dep, &dep_file, &[]).into_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let narinfo = format!("{}.narinfo", top.hash);
    for wrong in [
        vec![renamed(&dep_path, "renamed")],
        vec![dep_path.clone(), renamed(&top_path, "not-me")],
    ] {
        let text = narinfo_text(&top, &top_file, &wrong);
        let (status, body) = put(&url, &token, &narinfo, text.into_bytes()).await;
        assert_eq!(status, 422, "{wrong:?} was accepted: {body}");
        assert!(
            body.contains(codes::MISSING_REFERENCES) && body.contains(wrong.last().unwrap()),
            "{body}"
        );
        assert_eq!(get_narinfo(&url, &top.hash).await.0, 404);
    }
    let text = narinfo_text(&top, &top_file, std::slice::from_ref(&dep_path));
    let (status, body) = put(&url, &token, &narinfo, text.into_bytes()).await;
    assert_eq!(status, 200, "{body}");
    nix_copy_from(&url, &key, &[top_path], None).expect("nix copy --from the true closure");
}

fn create_for(hash_seed: &str, nar_size: u64) -> api::CreateUpload {
    api::CreateUpload {
        nar_hash: sha256_nix32(hash_seed.as_bytes()),
        nar_size,
        compression: "xz".into(),
        encoder: "integrity-tests".into(),
    }
}

#[tokio::test]
async fn chunked_upload_sizes_cannot_wrap() {
    let server = TestServer::start();
    let repo = unique_name("wrap");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    // u64::MAX once made the file-size bound wrap to a tiny number (release) or panic (debug).
    for nar_size in [u64::MAX, u64::MAX / 2, (32u64 << 30) + 1] {
        let resp = post_create_upload(&url, &token, &create_for(&nonce(), nar_size)).await;
        let (status, err) = api_error(resp).await;
        assert_eq!(
            (status, err.code.as_str()),
            (413, codes::PAYLOAD_TOO_LARGE),
            "{nar_size}: {err:?}"
        );
        assert!(err.message.contains("max_nar_bytes"), "{err:?}");
    }
    let params = api::NarUploadParams {
        nar_hash: sha256_nix32(b"x"),
        nar_size: u64::MAX,
        compression: "xz".into(),
        file_hash: sha256_nix32(b"y"),
        file_size: 10,
    };
    let (status, err) = api_error(post_nar(&url, &token, &params, vec![0; 10]).await).await;
    assert_eq!(
        (status, err.code.as_str()),
        (413, codes::PAYLOAD_TOO_LARGE),
        "{err:?}"
    );

    // The largest allowed NarSize still gets a working session whose bound does not wrap.
    let state = create_upload(&url, &token, &create_for(&nonce(), 32u64 << 30)).await;
    let resp = patch_chunk(&url, &token, &state.upload_id, 0, vec![7; 4096]).await;
    let state: api::UploadState = parse_ok(resp, "PATCH under the largest NarSize").await;
    assert_eq!(state.offset, 4096);
}

#[tokio::test]
async fn upload_sessions_are_capped_per_token_and_per_repository() {
    let server = TestServer::start_with_config(
        "max_upload_sessions_per_token = 3\nmax_upload_sessions_per_repo = 5\n",
    );
    let repo = unique_name("caps");
    server.create_repo(&repo, false);
    let (a, b) = (
        server.create_token(&repo, "push"),
        server.create_token(&repo, "push"),
    );
    let url = server.repo_url(&repo);
    let mut of_a = Vec::new();
    for i in 0..3 {
        of_a.push(
            create_upload(&url, &a, &create_for(&format!("a{i}"), 1000))
                .await
                .upload_id,
        );
    }
    let resp = post_create_upload(&url, &a, &create_for("a3", 1000)).await;
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("10")
    );
    let (status, err) = api_error(resp).await;
    assert_eq!(
        (status, err.code.as_str()),
        (429, codes::TOO_MANY_UPLOAD_SESSIONS),
        "{err:?}"
    );
    assert!(
        err.message.contains("this token") && err.message.contains('3'),
        "{err:?}"
    );
    // A session the token holds is still handed back: a resumed push is never refused.
    let again = create_upload(&url, &a, &create_for("a1", 1000)).await;
    assert_eq!(again.upload_id, of_a[1]);

    for i in 0..2 {
        create_upload(&url, &b, &create_for(&format!("b{i}"), 1000)).await;
    }
    let (status, err) =
        api_error(post_create_upload(&url, &b, &create_for("b2", 1000)).await).await;
    assert_eq!(
        (status, err.code.as_str()),
        (429, codes::TOO_MANY_UPLOAD_SESSIONS),
        "{err:?}"
    );
    assert!(
        err.message.contains("this repository") && err.message.contains('5'),
        "{err:?}"
    );

    // Aborting one frees a place for the token and for the repository.
    let resp = http()
        .delete(api_url(&url, &format!("uploads/{}", of_a[0])))
        .header("Authorization", bearer(&a))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    create_upload(&url, &a, &create_for("a3", 1000)).await;
}

#[tokio::test]
async fn concurrent_creates_for_one_nar_get_one_session() {
    let server = TestServer::start();
    let repo = unique_name("unique");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    const NARS: usize = 16;
    const CALLS: usize = 24;
    for n in 0..NARS {
        let create = create_for(&format!("nar {n} {}", nonce()), 1 << 20);
        let answers = futures_util::future::join_all(
            (0..CALLS).map(|_| post_create_upload(&url, &token, &create)),
        )
        .await;
        let mut created = 0;
        let mut ids = std::collections::BTreeSet::new();
        for resp in answers {
            if resp.status() == 201 {
                created += 1;
            }
            let state: api::UploadState = parse_ok(resp, "concurrent create").await;
            ids.insert(state.upload_id);
        }
        assert_eq!(
            ids.len(),
            1,
            "NAR {n}: {CALLS} concurrent creates made sessions {ids:?}"
        );
        assert_eq!(created, 1, "NAR {n}: {created} answers said 201 Created");
    }
}
