//! Batched uploads of small NARs (`POST api/v1/nar-batch`): every NAR of a batch is verified
//! and answered on its own, the good ones are stored together and substitute with real Nix,
//! a bad one fails alone and leaves nothing behind, and a body whose framing is wrong is
//! refused whole.

mod common;

use common::*;
use stowix::api::{self, codes};

/// The body of a batch: the manifest line, then the files back to back.
fn batch_body(entries: &[(api::NarUploadParams, Vec<u8>)]) -> Vec<u8> {
    let manifest = api::NarBatchManifest {
        nars: entries.iter().map(|(params, _)| params.clone()).collect(),
    };
    let mut body = serde_json::to_vec(&manifest).unwrap();
    body.push(b'\n');
    for (_, file) in entries {
        body.extend_from_slice(file);
    }
    body
}

/// `count` small store paths of distinct contents, loaded with their NARs.
fn small_paths(prefix: &str, count: usize) -> Vec<LocalPath> {
    (0..count)
        .map(|i| {
            LocalPath::load(&build_text(
                &format!("{prefix}-{i}"),
                &format!("{prefix} {i} {}", nonce()),
            ))
        })
        .collect()
}

/// The xz upload of `path` as a batch entry: its parameters and its file.
fn xz_entry(path: &LocalPath) -> (api::NarUploadParams, Vec<u8>) {
    let (file, params) = path.xz_upload();
    (params, file)
}

async fn post_batch(repo_url: &str, token: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut request = http().post(api_url(repo_url, "nar-batch")).body(body);
    if let Some(token) = token {
        request = request.header("Authorization", bearer(token));
    }
    request.send().await.expect("POST api/v1/nar-batch")
}

/// Asserts the answer's status and error code, and returns its message.
async fn refused(resp: reqwest::Response, status: u16, code: &str, what: &str) -> String {
    let actual = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    assert_eq!(actual, status, "{what}: {body}");
    let error: api::ApiError = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{what}: not an ApiError ({e}): {body}"));
    assert_eq!(error.code, code, "{what}: {body}");
    error.message
}

#[tokio::test]
async fn each_nar_of_a_batch_is_verified_alone_and_the_good_ones_substitute() {
    require_nix();
    let server = TestServer::start();
    let repo = unique_name("batch");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let limits = repo_info(&url, &token).await.limits;
    assert!(
        limits.max_batch_nars >= 2 && limits.max_batch_bytes > 0,
        "{limits:?}"
    );

    let good = small_paths("batch-good", 6);
    let mut bad = small_paths("batch-bad", 3).into_iter();
    let mut next_bad = || bad.next().expect("three paths");
    let (lying, corrupt, odd) = (next_bad(), next_bad(), next_bad());

    let mut entries: Vec<(api::NarUploadParams, Vec<u8>)> = good.iter().map(xz_entry).collect();
    // Declares another path's NarHash: verification tells.
    let (file, mut params) = lying.xz_upload();
    params.nar_hash = good[0].nar_hash.clone();
    entries.insert(2, (params, file));
    // Bytes that are not xz, declared truthfully (the file hash matches them).
    let (mut file, mut params) = corrupt.xz_upload();
    let middle = file.len() / 2;
    file[middle] ^= 0xff;
    params.file_hash = sha256_nix32(&file);
    entries.insert(4, (params, file));
    // A compression the repository format does not know.
    let (file, mut params) = odd.xz_upload();
    params.compression = "gzip".into();
    entries.push((params, file));
    // The first good NAR again: stored once, answered twice.
    entries.push(entries[0].clone());

    let stored_before = server.metric("stowix_server_nars_stored_total").await;
    let resp = post_batch(&url, Some(&token), batch_body(&entries)).await;
    let answer: api::NarBatchResponse = parse_ok(resp, "POST nar-batch").await;
    assert_eq!(answer.results.len(), entries.len(), "{answer:?}");
    let code_of = |i: usize| {
        answer.results[i]
            .error
            .as_ref()
            .map(|e| (e.status, e.error.code.as_str()))
    };
    assert_eq!(
        code_of(2),
        Some((422, codes::NAR_HASH_MISMATCH)),
        "{answer:?}"
    );
    assert_eq!(code_of(4), Some((422, codes::INVALID_NAR)), "{answer:?}");
    assert_eq!(
        code_of(8),
        Some((422, codes::UNSUPPORTED_COMPRESSION)),
        "{answer:?}"
    );
    for (i, (params, _)) in entries.iter().enumerate() {
        if [2, 4, 8].contains(&i) {
            assert!(answer.results[i].stored.is_none(), "{i}: {answer:?}");
            continue;
        }
        let stored = answer.results[i]
            .stored
            .as_ref()
            .unwrap_or_else(|| panic!("entry {i} was not stored: {answer:?}"));
        assert_eq!(stored.nar_hash, params.nar_hash);
        assert_eq!(stored.file_hash, params.file_hash);
        assert_eq!(stored.file_size, params.file_size);
        assert_eq!(
            stored.url,
            format!(
                "nar/{}.nar.xz",
                params.file_hash.trim_start_matches("sha256:")
            )
        );
        // The repeated entry is the same NAR: not stored a second time.
        assert_eq!(stored.newly_stored, i != 9, "{i}: {answer:?}");
    }
    let stored_after = server.metric("stowix_server_nars_stored_total").await;
    assert_eq!(stored_after - stored_before, good.len() as f64);

    // The refused ones left nothing: still missing, NAR and all.
    let refused_paths = [&lying, &corrupt, &odd];
    let missing = presence(&url, &token, &refused_paths).await.missing;
    for path in refused_paths {
        assert!(
            missing.contains(&path.hash),
            "{} is not missing: {missing:?}",
            path.path
        );
    }
    // The good ones publish without another upload, and real Nix substitutes them, signed.
    let good_refs: Vec<&LocalPath> = good.iter().collect();
    let published = publish(&url, &token, &good_refs).await;
    assert!(published.rejected.is_empty(), "{published:?}");
    assert_eq!(published.published.len(), good.len(), "{published:?}");
    let paths: Vec<String> = good.iter().map(|p| p.path.clone()).collect();
    nix_copy_from(&url, &key, &paths, None).expect("nix copy --from the batch's paths");
    // And `<hash>.ls`, written with each NAR, answers.
    let listing = http()
        .get(format!("{url}/{}.ls", good[1].hash))
        .send()
        .await
        .unwrap();
    assert_eq!(listing.status(), 200);
}

#[tokio::test]
async fn a_batch_whose_framing_or_size_is_wrong_is_refused_whole() {
    require_nix();
    let server = TestServer::start_with_config("max_batch_nars = 3\nmax_batch_bytes = 65536\n");
    let repo = unique_name("batch-frame");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let read = server.create_token(&repo, "read");
    let url = server.repo_url(&repo);
    let limits = repo_info(&url, &token).await.limits;
    assert_eq!((limits.max_batch_nars, limits.max_batch_bytes), (3, 65536));

    let paths = small_paths("frame", 4);
    let entries: Vec<(api::NarUploadParams, Vec<u8>)> = paths.iter().map(xz_entry).collect();

    let resp = post_batch(&url, None, batch_body(&entries[..1])).await;
    refused(resp, 401, codes::MISSING_TOKEN, "no token").await;
    let resp = post_batch(&url, Some(&read), batch_body(&entries[..1])).await;
    refused(resp, 403, codes::INSUFFICIENT_SCOPE, "read token").await;

    let resp = post_batch(&url, Some(&token), batch_body(&entries)).await;
    let message = refused(
        resp,
        413,
        codes::PAYLOAD_TOO_LARGE,
        "4 NARs over max_batch_nars 3",
    )
    .await;
    assert!(message.contains("at most 3"), "{message}");

    // One byte missing from the last file: no entry can be told from the next.
    let mut short = batch_body(&entries[..2]);
    short.pop();
    let resp = post_batch(&url, Some(&token), short).await;
    let message = refused(resp, 400, codes::BAD_REQUEST, "files shorter than declared").await;
    assert!(message.contains("file_size"), "{message}");

    let resp = post_batch(
        &url,
        Some(&token),
        serde_json::to_vec(&api::NarBatchManifest {
            nars: vec![entries[0].0.clone()],
        })
        .unwrap(),
    )
    .await;
    let message = refused(
        resp,
        400,
        codes::BAD_REQUEST,
        "no newline after the manifest",
    )
    .await;
    assert!(message.contains("manifest"), "{message}");

    let resp = post_batch(&url, Some(&token), b"{not json}\n".to_vec()).await;
    refused(resp, 400, codes::BAD_REQUEST, "a manifest that is not JSON").await;

    // Declared sizes over max_batch_bytes are refused before anything is verified.
    let (mut params, _) = entries[0].clone();
    params.file_size = 65537;
    let mut body = batch_body(&[(params, Vec::new())]);
    body.extend(std::iter::repeat_n(0u8, 65537));
    let resp = post_batch(&url, Some(&token), body).await;
    refused(
        resp,
        413,
        codes::PAYLOAD_TOO_LARGE,
        "files over max_batch_bytes",
    )
    .await;

    // Nothing of any refused batch was stored.
    let all: Vec<&LocalPath> = paths.iter().collect();
    let missing = presence(&url, &token, &all).await.missing;
    assert_eq!(missing.len(), paths.len(), "{missing:?}");

    // And a well-formed batch at the limits goes through.
    let resp = post_batch(&url, Some(&token), batch_body(&entries[..3])).await;
    let answer: api::NarBatchResponse = parse_ok(resp, "a batch at max_batch_nars").await;
    assert!(
        answer.results.iter().all(|r| r.stored.is_some()),
        "{answer:?}"
    );
}
