//! Hostile input: garbage narinfos and NARs, unsupported compression, oversized batches, and
//! path traversal in every name the server accepts (repository names, hash parts, NAR file
//! names, upload ids), sent raw so no client normalises them away.

mod common;

use std::fs;

use common::*;
use stowix::api::{self, codes};

fn is_client_error(status: u16) -> bool {
    (400..500).contains(&status)
}

#[tokio::test]
async fn garbage_narinfo_put_is_rejected() {
    let server = TestServer::start();
    let repo = unique_name("garbage");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let path = LocalPath::load(&build_text("garbage-target", &nonce()));
    let other = LocalPath::load(&build_text("garbage-other", &nonce()));
    let (file, params) = path.xz_upload();
    let file_nix32 = params.file_hash.trim_start_matches("sha256:").to_string();
    // The NAR is there (as `nix copy` would PUT it first), so only the narinfo is wrong.
    let resp = http()
        .put(format!("{url}/nar/{file_nix32}.nar.xz"))
        .header("Authorization", basic(&token))
        .header("Content-Type", "application/x-nix-nar")
        .body(file)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "PUT nar: {}", resp.status());

    let good = format!(
        "StorePath: {}\nURL: nar/{file_nix32}.nar.xz\nCompression: xz\nFileHash: {}\n\
         FileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: \n",
        path.path,
        params.file_hash,
        params.file_size,
        path.nar_hash,
        path.nar_size()
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("text", b"this is not a narinfo at all".to_vec()),
        ("binary", vec![0, 159, 146, 150, 255, 0, 10]),
        ("empty", Vec::new()),
        (
            "no NarHash",
            good.replace(&format!("NarHash: {}\n", path.nar_hash), "")
                .into_bytes(),
        ),
        (
            "bad NarHash",
            good.replace(&path.nar_hash, "sha256:zzzz").into_bytes(),
        ),
        (
            "NarSize 0",
            good.replace(&format!("NarSize: {}", path.nar_size()), "NarSize: 0")
                .into_bytes(),
        ),
        (
            "bad StorePath",
            good.replace(&path.path, "/etc/passwd").into_bytes(),
        ),
        (
            "StorePath of another hash",
            good.replace(&path.path, &other.path).into_bytes(),
        ),
        (
            "reference not a store path",
            good.replace("References: \n", "References: ../../etc\n")
                .into_bytes(),
        ),
    ];
    for (what, body) in cases {
        let resp = http()
            .put(format!("{url}/{}.narinfo", path.hash))
            .header("Authorization", basic(&token))
            .header("Content-Type", "text/x-nix-narinfo")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, err) = api_error(resp).await;
        assert_eq!(status, 400, "{what}: {err:?}");
        let (status, _) = get_narinfo(&url, &path.hash).await;
        assert_eq!(status, 404, "{what}: a narinfo got published");
    }
    // A narinfo whose NarHash does not match the NAR it names is refused too.
    let lying = good.replace(&path.nar_hash, &other.nar_hash);
    let resp = http()
        .put(format!("{url}/{}.narinfo", path.hash))
        .header("Authorization", basic(&token))
        .body(lying)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert!(is_client_error(status), "lying NarHash: {status}");
    let (status, _) = get_narinfo(&url, &path.hash).await;
    assert_eq!(status, 404);

    // The honest one is accepted and served with the server's own signature.
    let resp = http()
        .put(format!("{url}/{}.narinfo", path.hash))
        .header("Authorization", basic(&token))
        .body(good)
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "honest narinfo: {}",
        resp.status()
    );
    let (status, narinfo) = get_narinfo(&url, &path.hash).await;
    assert_eq!(status, 200);
    assert!(narinfo.contains("\nSig: "), "{narinfo}");
}

#[tokio::test]
async fn invalid_nar_and_unsupported_compression_are_rejected() {
    let server = TestServer::start();
    let repo = unique_name("badnar");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);

    // Bytes that hash and size as declared but are no NAR.
    let mut not_nar = b"nix-archive-2 definitely not a NAR".to_vec();
    not_nar.extend_from_slice(nonce().as_bytes());
    let file = xz(&not_nar);
    let params = api::NarUploadParams {
        nar_hash: sha256_nix32(&not_nar),
        nar_size: not_nar.len() as u64,
        compression: "xz".into(),
        file_hash: sha256_nix32(&file),
        file_size: file.len() as u64,
    };
    let (status, err) = api_error(post_nar(&url, &token, &params, file.clone()).await).await;
    assert!(is_client_error(status), "{status} {err:?}");
    assert_eq!(err.code, codes::INVALID_NAR);
    assert!(!dir_contains_file_with(server.data_dir(), &file));

    // Declared xz, but not xz.
    let path = LocalPath::load(&build_text("not-xz", &nonce()));
    let raw = path.nar.clone();
    let params = api::NarUploadParams {
        nar_hash: path.nar_hash.clone(),
        nar_size: path.nar_size(),
        compression: "xz".into(),
        file_hash: sha256_nix32(&raw),
        file_size: raw.len() as u64,
    };
    let (status, err) = api_error(post_nar(&url, &token, &params, raw.clone()).await).await;
    assert!(is_client_error(status), "{status} {err:?}");

    for compression in ["bzip2", "br", "../../xz", ""] {
        let mut p = params.clone();
        p.compression = compression.into();
        let (status, err) = api_error(post_nar(&url, &token, &p, raw.clone()).await).await;
        assert!(is_client_error(status), "{compression:?}: {status} {err:?}");
        if !compression.is_empty() {
            assert_eq!(err.code, codes::UNSUPPORTED_COMPRESSION, "{compression:?}");
        }
    }
    let pres = presence(&url, &token, &[&path]).await;
    assert_eq!(pres.missing, vec![path.hash.clone()]);

    // Bad hash parts in API bodies.
    for bad_hash in [
        "../../../etc/passwd",
        "short",
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    ] {
        let req = api::PresenceRequest {
            paths: vec![api::PresenceQuery {
                hash: bad_hash.into(),
                nar_hash: path.nar_hash.clone(),
            }],
        };
        let resp = http()
            .post(api_url(&url, "presence"))
            .header("Authorization", bearer(&token))
            .json(&req)
            .send()
            .await
            .unwrap();
        let (status, _) = api_error(resp).await;
        assert!(
            is_client_error(status),
            "presence of {bad_hash:?}: {status}"
        );
    }
    let mut entry = path.publish_entry();
    entry.store_path = "/nix/store/../../etc/passwd".into();
    let resp = post_publish(&url, &token, vec![entry]).await;
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    let refused = is_client_error(status)
        || serde_json::from_str::<api::PublishResponse>(&body)
            .map(|r| r.published.is_empty() && !r.rejected.is_empty())
            .unwrap_or(false);
    assert!(
        refused,
        "publication of a traversal store path: {status} {body}"
    );
}

#[tokio::test]
async fn oversized_batches_are_refused() {
    let server = TestServer::start_with_config("max_presence_batch = 3\nmax_publish_batch = 2\n");
    let repo = unique_name("batch");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let info = repo_info(&url, &token).await;
    assert_eq!(info.limits.max_presence_batch, 3, "{info:?}");
    assert_eq!(info.limits.max_publish_batch, 2, "{info:?}");
    let paths: Vec<LocalPath> = build_derivations(&[
        Drv::new("b1", "echo 1 > $out"),
        Drv::new("b2", "echo 2 > $out"),
        Drv::new("b3", "echo 3 > $out"),
        Drv::new("b4", "echo 4 > $out"),
    ])
    .iter()
    .map(|p| LocalPath::load(p))
    .collect();
    let refs: Vec<&LocalPath> = paths.iter().collect();

    let req = api::PresenceRequest {
        paths: refs.iter().map(|p| p.presence_query()).collect(),
    };
    let resp = http()
        .post(api_url(&url, "presence"))
        .header("Authorization", bearer(&token))
        .json(&req)
        .send()
        .await
        .unwrap();
    let (status, _) = api_error(resp).await;
    assert!(
        is_client_error(status),
        "4 presence queries over a limit of 3: {status}"
    );
    presence(&url, &token, &refs[..3]).await;

    for p in &refs[..3] {
        upload_single(&url, &token, p).await;
    }
    let entries = refs[..3].iter().map(|p| p.publish_entry()).collect();
    let resp = post_publish(&url, &token, entries).await;
    let (status, _) = api_error(resp).await;
    assert!(
        is_client_error(status),
        "3 narinfos over a limit of 2: {status}"
    );
    for p in &refs[..3] {
        let (status, _) = get_narinfo(&url, &p.hash).await;
        assert_eq!(status, 404, "published from an oversized batch");
    }
}

#[tokio::test]
async fn admin_refuses_unsafe_repository_names() {
    let server = TestServer::start();
    let marker = format!("evil-{}", nonce());
    for name in [
        "..".to_string(),
        ".".to_string(),
        String::new(),
        format!("../{marker}"),
        format!("../../{marker}"),
        format!("a/{marker}"),
        format!("/tmp/{marker}"),
        "%2e%2e".to_string(),
        format!("{marker}\0x"),
    ] {
        if name.contains('\0') {
            continue; // cannot be an argv element
        }
        let out = server.admin_output(&["repo", "create", &name]);
        assert!(
            !out.status.success(),
            "`repo create {name:?}` succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let out = server.admin_output(&["token", "create", "--repo", &name, "--scope", "push"]);
        assert!(
            !out.status.success(),
            "`token create --repo {name:?}` succeeded"
        );
    }
    assert_no_file_named(server.root(), &marker);
    assert_no_file_named(std::path::Path::new("/tmp"), &marker);
}

/// Fails when a file or directory whose name contains `marker` exists under `dir` (only
/// the top two levels of `/tmp`).
fn assert_no_file_named(dir: &std::path::Path, marker: &str) {
    let found: Vec<_> = if dir == std::path::Path::new("/tmp") {
        let mut v = Vec::new();
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            v.push(e.path());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                for e2 in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                    v.push(e2.path());
                }
            }
        }
        v
    } else {
        list_tree(dir).into_iter().map(|p| dir.join(p)).collect()
    };
    let bad: Vec<_> = found
        .iter()
        .filter(|p| p.to_string_lossy().contains(marker))
        .collect();
    assert!(bad.is_empty(), "files created by hostile names: {bad:?}");
}

#[tokio::test]
async fn path_traversal_is_refused_in_every_name() {
    let server = TestServer::start();
    let repo = unique_name("trav");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let addr = server.addr();
    let marker = format!("pwned-{}", nonce());
    let secret = format!("SECRET-{}", nonce());

    // Bait outside the data dir, where a traversal from it would land.
    let root = server.root();
    for name in [
        "secret.narinfo",
        "secret.nar.xz",
        "secret.nar",
        "nix-cache-info",
        "secret",
    ] {
        fs::write(root.join(name), &secret).unwrap();
    }
    let before_root: Vec<_> = list_tree(root)
        .into_iter()
        .filter(|p| !p.starts_with("data"))
        .collect();

    // A real upload, so an upload id and a stored NAR exist to aim next to.
    let path = LocalPath::load(&build_text("trav", &nonce()));
    push_paths(&url, &token, &[&path]).await;
    let upload_id = create_upload(
        &url,
        &token,
        &xz_create_upload(&LocalPath::load(&build_random("trav-up", 2000))),
    )
    .await
    .upload_id;
    assert!(!upload_id.contains('/'));

    let r = &repo;
    let h = &path.hash;
    let m = &marker;
    let gets: Vec<String> = vec![
        "/../nix-cache-info".into(),
        "/%2e%2e/nix-cache-info".into(),
        "/%2E%2E/nix-cache-info".into(),
        "/..%2f..%2f/nix-cache-info".into(),
        "/..%2fsecret.narinfo".into(),
        format!("/{r}/../secret.narinfo"),
        format!("/{r}/..%2fsecret.narinfo"),
        format!("/{r}/%2e%2e%2fsecret.narinfo"),
        format!("/{r}/..%2f..%2fsecret.narinfo"),
        format!("/{r}/%2e%2e%2f%2e%2e%2fsecret.narinfo"),
        format!("/{r}/..%5c..%5csecret.narinfo"),
        format!("/{r}/{h}%2f..%2f..%2fsecret.narinfo"),
        format!("/{r}/{}%2f{}.narinfo", &h[..16], &h[16..]),
        format!("/{r}/{}.narinfo", "..".repeat(16)),
        format!("/{r}/nar/../../secret.nar.xz"),
        format!("/{r}/nar/..%2f..%2fsecret.nar.xz"),
        format!("/{r}/nar/..%2f..%2f..%2fsecret.nar.xz"),
        format!("/{r}/nar/%2e%2e%2f%2e%2e%2fsecret.nar.xz"),
        format!("/{r}/nar/..%2f..%2fsecret"),
        format!("/{r}/nar/..%2f..%2fsecret.nar"),
        format!("/{r}/nar/%2fetc%2fpasswd"),
        format!("/{r}/nar/.nar.xz"),
        format!("/{r}/nar/..nar.xz"),
        format!("/{r}/nar/../../../../../../etc/passwd"),
        format!("/{r}/api/v1/uploads/..%2f..%2f..%2fsecret"),
        format!("/{r}/api/v1/uploads/%2e%2e%2f%2e%2e%2fetc"),
        format!("/{r}/api/v1/uploads/../../etc"),
        format!("/{r}/api/v1/uploads/{upload_id}%2f..%2f..%2f..%2fsecret"),
        format!("/{r}/api/v1/uploads/.."),
        format!("/{r}/api/v1/uploads/%2e%2e"),
    ];
    let mut failures = Vec::new();
    let auth = bearer(&token);
    for target in &gets {
        for method in ["GET", "HEAD", "DELETE"] {
            let (status, body) =
                raw_request(&addr, method, target, &[("Authorization", &auth)], b"").await;
            if !is_client_error(status) || String::from_utf8_lossy(&body).contains(&secret) {
                failures.push(format!("{method} {target}: {status}"));
            }
        }
    }
    // Writes with every name the server takes from the URL.
    let writes: Vec<(&str, String)> = vec![
        ("PUT", format!("/{r}/nar/..%2f..%2f{m}.nar.xz")),
        (
            "PUT",
            format!("/{r}/nar/..%2f..%2f..%2f..%2f..%2ftmp%2f{m}.nar.xz"),
        ),
        ("PUT", format!("/{r}/nar/%2e%2e%2f%2e%2e%2f{m}.nar")),
        ("PUT", format!("/{r}/nar/../../{m}.nar.xz")),
        ("PUT", format!("/{r}/nar/%2ftmp%2f{m}.nar.xz")),
        ("PUT", format!("/{r}/..%2f..%2f{m}.narinfo")),
        ("PUT", format!("/{r}/%2e%2e%2f{m}.narinfo")),
        ("PUT", format!("/..%2f..%2f{m}/nix-cache-info")),
        ("PUT", format!("/%2e%2e/{m}.narinfo")),
        ("PUT", format!("/{r}/log/..%2f..%2f{m}")),
        ("PUT", format!("/{r}/{m}%2f..%2f..%2f{m}.ls")),
        ("POST", format!("/..%2f..%2f{m}/api/v1/nars?nar_hash=x")),
        ("POST", "/%2e%2e/api/v1/uploads".to_string()),
        ("PATCH", format!("/{r}/api/v1/uploads/..%2f..%2f{m}")),
        (
            "PATCH",
            format!("/{r}/api/v1/uploads/%2e%2e%2f%2e%2e%2f{m}"),
        ),
        (
            "PATCH",
            format!("/{r}/api/v1/uploads/{upload_id}%2f..%2f..%2f{m}"),
        ),
        (
            "POST",
            format!("/{r}/api/v1/uploads/..%2f..%2f{m}/complete"),
        ),
        ("POST", format!("/{r}/api/v1/uploads/%2e%2e/complete")),
    ];
    let body = format!("{marker} {secret}\n");
    for (method, target) in &writes {
        let (status, resp) = raw_request(
            &addr,
            method,
            target,
            &[
                ("Authorization", &auth),
                ("Upload-Offset", "0"),
                ("Content-Type", "application/octet-stream"),
            ],
            body.as_bytes(),
        )
        .await;
        if !is_client_error(status) || String::from_utf8_lossy(&resp).contains(&secret) {
            failures.push(format!("{method} {target}: {status}"));
        }
    }
    assert!(
        failures.is_empty(),
        "traversal attempts not refused with 4xx:\n{}",
        failures.join("\n")
    );

    // Nothing appeared outside the data dir, and no file holds what was sent.
    let after_root: Vec<_> = list_tree(root)
        .into_iter()
        .filter(|p| !p.starts_with("data"))
        .collect();
    assert_eq!(
        before_root, after_root,
        "files appeared next to the data dir"
    );
    assert_no_file_named(std::path::Path::new("/tmp"), &marker);
    assert!(
        !dir_contains_file_with(server.data_dir(), body.as_bytes()),
        "a traversal body was stored in the data dir"
    );
    // The server is still well.
    let (status, _) = get_narinfo(&url, &path.hash).await;
    assert_eq!(status, 200);
}

/// Bodies and queries the API cannot parse get the same `{code, message}` errors as the rest.
#[tokio::test]
async fn unparsable_api_requests_get_api_errors() {
    let server = TestServer::start();
    let repo = unique_name("json");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let mut failures = Vec::new();
    for route in ["presence", "narinfos", "uploads"] {
        for body in ["{not json", "[]", "{\"paths\": 5}", ""] {
            let resp = http()
                .post(api_url(&url, route))
                .header("Authorization", bearer(&token))
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            let ok =
                is_client_error(status) && serde_json::from_str::<api::ApiError>(&text).is_ok();
            if !ok {
                failures.push(format!("POST {route} {body:?}: {status} {text:?}"));
            }
        }
    }
    // The single upload without its query parameters.
    let resp = http()
        .post(api_url(&url, "nars"))
        .header("Authorization", bearer(&token))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    if !(is_client_error(status) && serde_json::from_str::<api::ApiError>(&text).is_ok()) {
        failures.push(format!("POST nars without a query: {status} {text:?}"));
    }
    assert!(
        failures.is_empty(),
        "answers that are not ApiError JSON:\n{}",
        failures.join("\n")
    );
}
