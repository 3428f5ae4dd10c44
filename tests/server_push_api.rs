//! The push API with real store paths: presence, single-request uploads, verification of
//! uploaded NARs, publication and its reference rule, then substitution by real Nix with
//! only the repository key trusted.

mod common;

use common::*;
use stowix::api;

/// Other key, to show that substitution really depends on the repository's signature.
const UNRELATED_KEY: &str = "unrelated-1:2qJ3/6PZ7u5Sc5cUUmWFk2sYlK10OGsAb3mNe4KoOb0=";

#[tokio::test]
async fn realistic_closure_pushed_through_api_is_substitutable() {
    let server = TestServer::start();
    let repo = unique_name("api");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let closure = realistic_closure();
    let paths: Vec<LocalPath> = closure.iter().map(|p| LocalPath::load(p)).collect();
    let refs: Vec<&LocalPath> = paths.iter().collect();

    let before = presence(&url, &token, &refs).await;
    let mut missing = before.missing.clone();
    missing.sort();
    let mut all: Vec<String> = paths.iter().map(|p| p.hash.clone()).collect();
    all.sort();
    assert_eq!(missing, all, "fresh paths are not all missing: {before:?}");
    assert!(before.nar_stored.is_empty());

    for p in &paths {
        let stored = upload_single(&url, &token, p).await;
        assert!(stored.newly_stored, "{} was not newly stored", p.path);
        assert!(stored.url.starts_with("nar/") && stored.url.ends_with(".nar.xz"));
    }
    let mid = presence(&url, &token, &refs).await;
    let mut nar_stored = mid.nar_stored.clone();
    nar_stored.sort();
    assert_eq!(
        nar_stored, all,
        "uploaded NARs not reported as stored: {mid:?}"
    );
    assert!(mid.missing.is_empty());

    // One request, roots first: references resolve within the request whatever the order.
    let rev: Vec<&LocalPath> = paths.iter().rev().collect();
    let resp = publish(&url, &token, &rev).await;
    assert!(resp.rejected.is_empty(), "{resp:?}");
    let mut published = resp.published.clone();
    published.sort();
    assert_eq!(published, all);

    let after = presence(&url, &token, &refs).await;
    assert!(
        after.missing.is_empty() && after.nar_stored.is_empty(),
        "{after:?}"
    );

    let root = closure.last().unwrap().clone();
    nix_copy_from(&url, &key, std::slice::from_ref(&root), None)
        .expect("nix copy --from the repository");
    let err = nix_copy_from(&url, UNRELATED_KEY, std::slice::from_ref(&root), None)
        .expect_err("substitution succeeded without trusting the repository key");
    assert!(err.contains("signature"), "unexpected failure: {err}");

    // Publishing again changes nothing.
    let again = publish(&url, &token, &refs).await;
    assert!(
        again.published.is_empty() && again.rejected.is_empty(),
        "{again:?}"
    );
    let mut already = again.already_published.clone();
    already.sort();
    assert_eq!(already, all);
}

#[tokio::test]
async fn presence_classifies_missing_nar_stored_and_published() {
    let server = TestServer::start();
    let repo = unique_name("presence");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let paths = build_derivations(&[
        Drv::new("published", "echo published > $out"),
        Drv::new("stored", "echo stored > $out"),
        Drv::new("missing", "echo missing > $out"),
    ]);
    let published = LocalPath::load(&paths[0]);
    let stored = LocalPath::load(&paths[1]);
    let missing = LocalPath::load(&paths[2]);
    push_paths(&url, &token, &[&published]).await;
    upload_single(&url, &token, &stored).await;

    let resp = presence(&url, &token, &[&published, &stored, &missing]).await;
    assert_eq!(resp.missing, vec![missing.hash.clone()], "{resp:?}");
    assert_eq!(resp.nar_stored, vec![stored.hash.clone()], "{resp:?}");

    // A NAR the server holds is never taken again: the single upload says so, and a
    // resumable upload is born complete.
    let again = upload_single(&url, &token, &stored).await;
    assert!(!again.newly_stored, "re-upload reported as newly stored");
    let state = create_upload(&url, &token, &xz_create_upload(&stored)).await;
    assert!(state.already_stored, "upload of a stored NAR: {state:?}");

    let (status, _) = get_narinfo(&url, &stored.hash).await;
    assert_eq!(status, 404, "a NAR-only path must not be served");
    let (status, _) = get_narinfo(&url, &published.hash).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn publication_with_missing_reference_is_refused() {
    let server = TestServer::start();
    let repo = unique_name("refs");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let (dep, top) = build_pair();
    let dep = LocalPath::load(&dep);
    let top = LocalPath::load(&top);
    assert!(top.references.contains(&dep.path));
    upload_single(&url, &token, &dep).await;
    upload_single(&url, &token, &top).await;

    let resp = publish(&url, &token, &[&top]).await;
    assert!(resp.published.is_empty(), "{resp:?}");
    let rejection = resp
        .rejected
        .iter()
        .find(|r| r.hash == top.hash)
        .unwrap_or_else(|| panic!("{} not rejected: {resp:?}", top.path));
    assert_eq!(rejection.code, api::codes::MISSING_REFERENCES, "{resp:?}");
    let (status, _) = get_narinfo(&url, &top.hash).await;
    assert_eq!(status, 404, "narinfo served without its reference");

    // The path and its reference together: accepted.
    let resp = publish(&url, &token, &[&top, &dep]).await;
    assert!(resp.rejected.is_empty(), "{resp:?}");
    assert_eq!(resp.published.len(), 2, "{resp:?}");
    nix_copy_from(&url, &key, std::slice::from_ref(&top.path), None).expect("substitute");
}

#[tokio::test]
async fn publication_of_a_path_whose_nar_is_not_stored_is_refused() {
    let server = TestServer::start();
    let repo = unique_name("nonar");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let path = LocalPath::load(&build_text("no-nar", &nonce()));

    let resp = publish(&url, &token, &[&path]).await;
    assert!(resp.published.is_empty(), "{resp:?}");
    assert_eq!(resp.rejected.len(), 1, "{resp:?}");
    assert_eq!(
        resp.rejected[0].code,
        api::codes::NAR_NOT_STORED,
        "{resp:?}"
    );

    // Right NAR, wrong size in the entry.
    upload_single(&url, &token, &path).await;
    let mut entry = path.publish_entry();
    entry.nar_size += 1;
    let resp = post_publish(&url, &token, vec![entry]).await;
    let body = resp.text().await.unwrap();
    let resp: api::PublishResponse =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(resp.published.is_empty(), "{resp:?}");
    assert_eq!(resp.rejected.len(), 1, "{resp:?}");
    let (status, _) = get_narinfo(&url, &path.hash).await;
    assert_eq!(status, 404);
}

/// A NAR whose decompressed bytes do not hash to the declared NarHash is refused, through
/// both upload routes, and nothing of it is kept or served.
#[tokio::test]
async fn nar_not_matching_its_nar_hash_is_rejected_and_nothing_stored() {
    let server = TestServer::start();
    let repo = unique_name("badhash");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let path = LocalPath::load(&build_random("bad-hash", 20_000));
    // Declared: the hash of a NAR differing in one byte, same size.
    let mut other = path.nar.clone();
    let last = other.len() - 9;
    other[last] ^= 1;
    let wrong_hash = sha256_nix32(&other);
    let (file, mut params) = path.xz_upload();
    params.nar_hash = wrong_hash.clone();

    let resp = post_nar(&url, &token, &params, file.clone()).await;
    let (status, err) = api_error(resp).await;
    assert_eq!(status, 422, "{err:?}");
    assert_eq!(err.code, api::codes::NAR_HASH_MISMATCH);

    // Same through a resumable upload.
    let mut create = xz_create_upload(&path);
    create.nar_hash = wrong_hash.clone();
    let state = create_upload(&url, &token, &create).await;
    assert_eq!(state.offset, 0);
    patch_rest(&url, &token, &state.upload_id, &file, 0, file.len()).await;
    let resp = complete_upload(
        &url,
        &token,
        &state.upload_id,
        &api::CompleteUpload {
            file_hash: params.file_hash.clone(),
            file_size: params.file_size,
        },
    )
    .await;
    let (status, err) = api_error(resp).await;
    assert_eq!(status, 422, "{err:?}");
    assert_eq!(err.code, api::codes::NAR_HASH_MISMATCH);

    // Nothing stored: not present, not served, not publishable, no file holds those bytes.
    let pres = presence(&url, &token, &[&path]).await;
    assert_eq!(pres.missing, vec![path.hash.clone()], "{pres:?}");
    let mut lying = path.clone();
    lying.nar_hash = wrong_hash;
    let pres = presence(&url, &token, &[&lying]).await;
    assert_eq!(pres.missing, vec![path.hash.clone()], "{pres:?}");
    let nar_url = format!(
        "{url}/nar/{}.nar.xz",
        params.file_hash.trim_start_matches("sha256:")
    );
    let resp = http().get(&nar_url).send().await.unwrap();
    assert_eq!(resp.status(), 404, "rejected NAR served at {nar_url}");
    let resp = publish(&url, &token, &[&lying]).await;
    assert!(resp.published.is_empty(), "{resp:?}");
    let (status, _) = get_narinfo(&url, &path.hash).await;
    assert_eq!(status, 404);
    assert!(
        !server.stores_file_with(&file),
        "the rejected NAR file is still stored"
    );

    // The honest upload then works.
    upload_single(&url, &token, &path).await;
}

#[tokio::test]
async fn file_hash_and_size_are_checked() {
    let server = TestServer::start();
    let repo = unique_name("filehash");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let path = LocalPath::load(&build_random("file-hash", 5_000));
    let (file, params) = path.xz_upload();

    let mut bad = params.clone();
    bad.file_hash = sha256_nix32(b"something else");
    let (status, err) = api_error(post_nar(&url, &token, &bad, file.clone()).await).await;
    assert!((400..500).contains(&status), "{status} {err:?}");
    assert_eq!(err.code, api::codes::FILE_HASH_MISMATCH);

    let mut bad = params.clone();
    bad.file_size += 1;
    let (status, err) = api_error(post_nar(&url, &token, &bad, file.clone()).await).await;
    assert!((400..500).contains(&status), "{status} {err:?}");
    assert_eq!(err.code, api::codes::FILE_SIZE_MISMATCH);

    let mut bad = params.clone();
    bad.nar_size += 1;
    let (status, err) = api_error(post_nar(&url, &token, &bad, file.clone()).await).await;
    assert!((400..500).contains(&status), "{status} {err:?}");
    assert_eq!(err.code, api::codes::NAR_SIZE_MISMATCH);

    assert!(!server.stores_file_with(&file));
    let pres = presence(&url, &token, &[&path]).await;
    assert_eq!(pres.missing, vec![path.hash.clone()]);
}

/// NARs compressed with zstd or not at all are stored under their own extensions, labelled
/// correctly, and substitutable.
#[tokio::test]
async fn zstd_and_uncompressed_nars() {
    let server = TestServer::start();
    let repo = unique_name("compress");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let paths = build_derivations(&[
        Drv::new("zstd-path", "/usr/bin/head -c 30000 /dev/urandom > $out"),
        Drv::new("plain-path", "echo $dep0 > $out").deps(&[0]),
    ]);
    let zpath = LocalPath::load(&paths[0]);
    let plain = LocalPath::load(&paths[1]);

    for (p, compression, file, ext) in [
        (
            &zpath,
            "zstd",
            zstd::encode_all(&zpath.nar[..], 3).unwrap(),
            ".nar.zst",
        ),
        (&plain, "none", plain.nar.clone(), ".nar"),
    ] {
        let params = api::NarUploadParams {
            nar_hash: p.nar_hash.clone(),
            nar_size: p.nar_size(),
            compression: compression.to_string(),
            file_hash: sha256_nix32(&file),
            file_size: file.len() as u64,
        };
        let stored: api::NarStored = parse_ok(
            post_nar(&url, &token, &params, file.clone()).await,
            "upload",
        )
        .await;
        assert!(
            stored.url.ends_with(ext),
            "{compression}: URL {}",
            stored.url
        );
        let resp = http()
            .get(format!("{url}/{}", stored.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.unwrap()[..] == file[..]);
    }
    let resp = publish(&url, &token, &[&plain, &zpath]).await;
    assert!(resp.rejected.is_empty(), "{resp:?}");
    for (p, compression) in [(&zpath, "zstd"), (&plain, "none")] {
        let (status, narinfo) = get_narinfo(&url, &p.hash).await;
        assert_eq!(status, 200);
        assert_eq!(narinfo_field(&narinfo, "Compression"), Some(compression));
    }
    nix_copy_from(&url, &key, std::slice::from_ref(&plain.path), None).expect("substitute");
}
