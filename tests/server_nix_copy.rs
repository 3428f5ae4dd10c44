//! Real Nix against the server: `nix copy --to http://ADDR/<repo>` with a push token from a
//! netrc file, and `nix copy --from` with `require-sigs = true` and only the repository key
//! trusted.

mod common;

use common::*;

#[tokio::test]
async fn nix_copy_to_then_from_realistic_closure() {
    let server = TestServer::start();
    let repo = unique_name("copy");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let closure = realistic_closure();
    let root = closure.last().unwrap().clone();

    nix_copy_to(&url, &token, std::slice::from_ref(&root)).expect("nix copy --to");

    // Every path of the closure is published, with the server's signature (Nix pushed none).
    let key_name = key.split_once(':').unwrap().0;
    for p in &closure {
        let (status, narinfo) = get_narinfo(&url, hash_part(p)).await;
        assert_eq!(status, 200, "{p} not published by nix copy --to");
        assert_eq!(narinfo_field(&narinfo, "StorePath"), Some(p.as_str()));
        assert!(
            narinfo
                .lines()
                .any(|l| l.starts_with(&format!("Sig: {key_name}:"))),
            "{p}: no signature by {key_name}:\n{narinfo}"
        );
    }
    nix_copy_from(&url, &key, std::slice::from_ref(&root), None).expect("nix copy --from");

    // The push API sees what nix copy put there as published.
    let infos: Vec<LocalPath> = closure.iter().map(|p| LocalPath::load(p)).collect();
    let refs: Vec<&LocalPath> = infos.iter().collect();
    let pres = presence(&url, &token, &refs).await;
    assert!(
        pres.missing.is_empty() && pres.nar_stored.is_empty(),
        "{pres:?}"
    );

    // Copying again is a no-op that succeeds.
    nix_copy_to(&url, &token, std::slice::from_ref(&root)).expect("second nix copy --to");
}

/// Content-addressed paths keep their `CA` field; Nix accepts them on their own merit.
#[tokio::test]
async fn nix_copy_to_content_addressed_paths() {
    let server = TestServer::start();
    let repo = unique_name("ca");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let n = nonce();
    let paths = add_to_store(&[
        ("ca-one", format!("one {n}").as_bytes()),
        ("ca+two", format!("two {n}").as_bytes()),
    ]);
    nix_copy_to(&url, &token, &paths).expect("nix copy --to");
    for p in &paths {
        let local = LocalPath::load(p);
        let (status, narinfo) = get_narinfo(&url, &local.hash).await;
        assert_eq!(status, 200);
        assert_eq!(
            narinfo_field(&narinfo, "CA"),
            local.ca.as_deref(),
            "{narinfo}"
        );
    }
    nix_copy_from(&url, &key, &paths, None).expect("nix copy --from");
}

#[tokio::test]
async fn nix_copy_to_needs_a_push_token_of_the_repository() {
    let server = TestServer::start();
    let repo = unique_name("copyauth");
    let other = unique_name("copyother");
    server.create_repo(&repo, false);
    server.create_repo(&other, false);
    let read = server.create_token(&repo, "read");
    let other_push = server.create_token(&other, "push");
    let url = server.repo_url(&repo);
    let path = build_text("copy-denied", &nonce());

    for (what, token) in [
        ("a read token", read.as_str()),
        ("another repository's token", other_push.as_str()),
        (
            "an unknown token",
            "stx_live_aaaaaaaaaaaaaaaaaaaaaaaaaa_AAAAAAAAAAAAAAAAAAAAAAAA",
        ),
    ] {
        let res = nix_copy_to(&url, token, std::slice::from_ref(&path));
        assert!(res.is_err(), "nix copy --to with {what} succeeded");
        let (status, _) = get_narinfo(&url, hash_part(&path)).await;
        assert_eq!(status, 404, "published with {what}");
    }
}

#[tokio::test]
async fn nix_copy_from_a_private_repository_needs_a_token() {
    let server = TestServer::start();
    let repo = unique_name("private");
    let key = server.create_repo(&repo, true);
    let push = server.create_token(&repo, "push");
    let read = server.create_token(&repo, "read");
    let url = server.repo_url(&repo);
    let (_, top) = build_pair();

    nix_copy_to(&url, &push, std::slice::from_ref(&top)).expect("nix copy --to a private repo");
    let res = nix_copy_from(&url, &key, std::slice::from_ref(&top), None);
    assert!(
        res.is_err(),
        "substituted from a private repository without a token"
    );
    nix_copy_from(&url, &key, std::slice::from_ref(&top), Some(&read))
        .expect("nix copy --from with a read token");
}
