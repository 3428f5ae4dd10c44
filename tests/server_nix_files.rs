//! Real Nix against the files it writes beside NARs: `nix copy --to
//! '...?write-nar-listing=1&index-debug-info=true'`, `nix store copy-log --to`, then
//! `nix log --store`, `nix store ls --store` and the listings the server writes itself,
//! compared with the ones Nix writes into a `file://` cache, on public and private
//! repositories.

mod common;
mod push_common;

use common::*;

/// A derivation whose output has what a listing describes (nested directories, an
/// executable, a symlink, an empty file) and a debug file under lib/debug/.build-id, and
/// whose build writes a log line carrying `marker`.
fn build_with_log_and_debuginfo(marker: &str) -> (String, String, String) {
    // Each test has its own repository, so one build id serves them all.
    let build_id = "ab0123456789abcdef0123456789abcdef012345".to_string();
    let script = format!(
        "echo 'building {marker}'; \
         /bin/mkdir -p $out/bin $out/share/doc $out/lib/debug/.build-id/ab; \
         echo '#!/bin/sh' > $out/bin/tool; /bin/chmod +x $out/bin/tool; \
         echo 'readme {marker}' > $out/share/doc/README; : > $out/share/doc/empty; \
         /bin/ln -s ../share/doc/README $out/bin/readme-link; \
         echo debug > $out/lib/debug/.build-id/ab/{}.debug",
        &build_id[2..]
    );
    let out = build_derivations(&[Drv::new("with-log", &script)]).remove(0);
    let drv = deriver(&out);
    (out, drv, build_id)
}

/// The listing Nix itself writes for `path`, from a `file://` cache.
fn listing_by_nix(path: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let to = format!("file://{}?write-nar-listing=1", dir.path().display());
    nix(&["copy", "--to", &to, path], None).expect("nix copy to a file:// cache");
    let text = std::fs::read_to_string(dir.path().join(format!("{}.ls", hash_part(path))))
        .expect("Nix wrote a listing");
    serde_json::from_str(&text).expect("Nix's listing is JSON")
}

async fn get(url: &str, token: Option<&str>) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut request = http().get(url);
    if let Some(token) = token {
        request = request.header("Authorization", basic(token));
    }
    let resp = request.send().await.expect("GET");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

async fn nix_copy_writes_logs_listings_and_debuginfo(private: bool) {
    let server = TestServer::start();
    let repo = unique_name(if private { "files-private" } else { "files" });
    let key = server.create_repo(&repo, private);
    let push = server.create_token(&repo, "push");
    let read = server.create_token(&repo, "read");
    let url = server.repo_url(&repo);
    let marker = nonce();
    let (out, drv, build_id) = build_with_log_and_debuginfo(&marker);
    let dir = tempfile::tempdir().unwrap();
    let push_netrc = netrc_file(dir.path(), &url, &push);

    let to = format!("{url}?write-nar-listing=1&index-debug-info=true");
    nix(
        &["copy", "--to", &to, "--option", "substituters", "", &out],
        Some(&push_netrc),
    )
    .expect("nix copy --to with listing and debug info");
    nix(
        &["store", "copy-log", "--to", &url, &drv],
        Some(&push_netrc),
    )
    .expect("nix store copy-log --to");

    let reader = if private { Some(read.as_str()) } else { None };
    let read_dir = tempfile::tempdir().unwrap();
    let read_netrc = reader.map(|token| netrc_file(read_dir.path(), &url, token));

    // `nix log` finds the log through the narinfo's Deriver.
    let log = nix(&["log", "--store", &url, &out], read_netrc.as_deref()).expect("nix log --store");
    assert!(
        log.contains(&format!("building {marker}")),
        "nix log printed:\n{log}"
    );
    let listed = nix(
        &["store", "ls", "--store", &url, "-R", &out],
        read_netrc.as_deref(),
    )
    .expect("nix store ls --store");
    for file in ["/bin/tool", "/share/doc/README", "/bin/readme-link"] {
        assert!(
            listed.contains(file),
            "nix store ls lacks {file}:\n{listed}"
        );
    }

    // The server's own listing is Nix's, field for field.
    let ls_url = format!("{url}/{}.ls", hash_part(&out));
    let (status, headers, body) = get(&ls_url, reader).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/json");
    let ours: serde_json::Value = serde_json::from_slice(&body).expect("listing is JSON");
    assert_eq!(ours, listing_by_nix(&out));

    // Nix writes `<build id>.debug`; readers may ask for the bare id.
    let (status, _, named) = get(&format!("{url}/debuginfo/{build_id}.debug"), reader).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&named));
    let (status, _, body) = get(&format!("{url}/debuginfo/{build_id}"), reader).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(named, body);
    let link: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        link["member"],
        format!("lib/debug/.build-id/ab/{}.debug", &build_id[2..])
    );
    let narinfo = get(&format!("{url}/{}.narinfo", hash_part(&out)), reader)
        .await
        .2;
    let narinfo = String::from_utf8(narinfo).unwrap();
    let nar_url = narinfo_field(&narinfo, "URL")
        .expect("narinfo URL")
        .to_string();
    assert_eq!(link["archive"], format!("../{nar_url}"));

    if private {
        // Outsiders learn nothing: the answers of an absent repository.
        for path in [
            format!("{}.ls", hash_part(&out)),
            format!("log/{}", drv.trim_start_matches("/nix/store/")),
            format!("debuginfo/{build_id}"),
        ] {
            let (status, _, _) = get(&format!("{url}/{path}"), None).await;
            assert_eq!(status, 404, "{path} without a token");
        }
    }
    // Substitution still works with the repository key alone.
    nix_copy_from(&url, &key, std::slice::from_ref(&out), reader).expect("nix copy --from");
}

#[tokio::test]
async fn nix_copy_writes_logs_listings_and_debuginfo_public() {
    nix_copy_writes_logs_listings_and_debuginfo(false).await;
}

#[tokio::test]
async fn nix_copy_writes_logs_listings_and_debuginfo_private() {
    nix_copy_writes_logs_listings_and_debuginfo(true).await;
}

/// A path pushed through the push API (as `stowix nix push` does) gets the listing too: the
/// server writes it while verifying the NAR, whatever the client asked.
#[tokio::test]
async fn the_push_api_gets_a_listing_for_every_path() {
    let server = TestServer::start();
    let repo = unique_name("pushls");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let (out, _, _) = build_with_log_and_debuginfo(&nonce());
    let local = LocalPath::load(&out);
    let ls_url = format!("{url}/{}.ls", local.hash);

    upload_single(&url, &token, &local).await;
    // Not published yet: no listing either.
    assert_eq!(get(&ls_url, None).await.0, 404);
    let answer = publish(&url, &token, &[&local]).await;
    assert!(answer.rejected.is_empty(), "{answer:?}");
    let (status, _, body) = get(&ls_url, None).await;
    assert_eq!(status, 200);
    let ours: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ours, listing_by_nix(&out));
}

#[tokio::test]
async fn logs_and_links_are_checked_and_bounded() {
    let server = TestServer::start_with_config("max_log_bytes = 1024\n");
    let repo = unique_name("filesbad");
    server.create_repo(&repo, false);
    let push = server.create_token(&repo, "push");
    let read = server.create_token(&repo, "read");
    let url = server.repo_url(&repo);
    let drv_name = format!("{}-x.drv", "0".repeat(32));
    let put = |path: String, token: String, body: Vec<u8>| {
        let url = url.clone();
        async move {
            http()
                .put(format!("{url}/{path}"))
                .header("Authorization", basic(&token))
                .body(body)
                .send()
                .await
                .expect("PUT")
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        put(format!("log/{drv_name}"), push.clone(), vec![b'x'; 2048]).await,
        413
    );
    assert_eq!(
        put(format!("log/{drv_name}"), read.clone(), b"log".to_vec()).await,
        403
    );
    assert_eq!(
        put("log/not-a-drv".into(), push.clone(), b"log".to_vec()).await,
        404
    );
    assert_eq!(
        put(format!("log/{drv_name}"), push.clone(), b"ok log".to_vec()).await,
        204
    );
    let (status, _, body) = get(&format!("{url}/log/{drv_name}"), None).await;
    assert_eq!((status, body.as_slice()), (200, b"ok log".as_slice()));

    let id = "c".repeat(40);
    for bad in [
        r#"{"archive":"../../etc/passwd","member":"lib/debug/.build-id/cc/x.debug"}"#,
        r#"{"archive":"../nar/x.nar.xz","member":"../../x"}"#,
        "not json",
    ] {
        assert_eq!(
            put(format!("debuginfo/{id}"), push.clone(), bad.into()).await,
            400,
            "{bad}"
        );
    }
    assert_eq!(get(&format!("{url}/debuginfo/{id}"), None).await.0, 404);
    assert_eq!(
        put("debuginfo/short".into(), push.clone(), b"{}".to_vec()).await,
        404
    );
}

/// `stowix nix push --logs` stores the build logs of what it publishes, and `nix log --store`
/// prints them on a machine that never ran the build.
#[tokio::test]
async fn push_with_logs_stores_the_build_logs() {
    let server = TestServer::start();
    let repo = unique_name("pushlogs");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let marker = nonce();
    let (out, drv, _) = build_with_log_and_debuginfo(&marker);
    // A path with no deriver has no log to look for.
    let added = add_to_store(&[("no-deriver", marker.as_bytes())]).remove(0);

    let pushed = push_common::push_with(
        &url,
        Some(&token),
        &["--logs", "--verbose", &out, &added],
        &[],
    );
    pushed.assert_code(0);
    assert!(
        pushed.stderr.contains(&format!("build log: {drv}: stored")),
        "{}",
        pushed.stderr
    );
    assert!(
        pushed
            .stderr
            .contains("summary: build logs: 1 stored, 0 not stored"),
        "{}",
        pushed.stderr
    );
    let log = nix(&["log", "--store", &url, &out], None).expect("nix log --store");
    assert!(
        log.contains(&format!("building {marker}")),
        "nix log printed:\n{log}"
    );

    // Without --logs nothing is looked up.
    let again = unique_name("nologs");
    server.create_repo(&again, false);
    let token = server.create_token(&again, "push");
    let pushed = push_common::push_with(
        &server.repo_url(&again),
        Some(&token),
        &["--verbose", &out],
        &[],
    );
    pushed.assert_code(0);
    assert!(!pushed.stderr.contains("build log:"), "{}", pushed.stderr);
    assert!(nix(&["log", "--store", &server.repo_url(&again), &out], None).is_err());
}
