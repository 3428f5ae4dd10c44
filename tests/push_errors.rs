//! Every error a user can run into names the problem and the fix, exits with its own code, and
//! never shows the token.

mod common;
mod push_common;

use push_common::{push_with, Fixture};
use stowix::cli::exit;

const WELL_FORMED_UNKNOWN: &str = "stx_live_abcdefghijklmnopqrstuvwxy0_ABCDEFGHIJKLmnopqrstuv12";

#[test]
fn missing_target_malformed_url_and_malformed_token_are_usage_errors() {
    let path = "/nix/store/00000000000000000000000000000000-x";
    let missing = push_with("", Some(WELL_FORMED_UNKNOWN), &[path], &[]);
    missing.assert_code(exit::USAGE);
    assert!(missing.stderr.contains("--target"), "{}", missing.stderr);

    for bad in ["localhost:8080/main", "ftp://host/main", "http://host:1/"] {
        let run = push_with(bad, Some(WELL_FORMED_UNKNOWN), &[path], &[]);
        run.assert_code(exit::USAGE);
        assert!(
            run.stderr.contains("invalid --target"),
            "{bad}: {}",
            run.stderr
        );
    }

    let secret = "stx_live_SECRETSECRET";
    let run = push_with("http://127.0.0.1:1/main", Some(secret), &[path], &[]);
    run.assert_code(exit::USAGE);
    assert!(run.stderr.contains("malformed"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("SECRETSECRET"),
        "token echoed: {}",
        run.stderr
    );

    let none = push_with("http://127.0.0.1:1/main", None, &[path], &[]);
    none.assert_code(exit::USAGE);
    assert!(none.stderr.contains("STOWIX_TOKEN"), "{}", none.stderr);
}

#[test]
fn unreachable_server_and_non_stowix_target() {
    let path = "/nix/store/00000000000000000000000000000000-x";
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let run = push_with(
        &format!("http://127.0.0.1:{port}/main"),
        Some(WELL_FORMED_UNKNOWN),
        &[path],
        &[],
    );
    run.assert_code(exit::UNREACHABLE);
    assert!(run.stderr.contains("cannot reach"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("ABCDEFGHIJKL"),
        "token echoed: {}",
        run.stderr
    );

    let fx = Fixture::new();
    let (_, top) = common::build_pair();
    let wrong = push_with(
        &format!("{}/no-such-repo", fx.server.url()),
        Some(&fx.token),
        &[&top],
        &[],
    );
    wrong.assert_code(exit::UNREACHABLE);
    assert!(
        wrong.stderr.contains("not a Stowix repository"),
        "{}",
        wrong.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthorized_and_forbidden_are_told_apart() {
    let fx = Fixture::new();
    let (_, top) = common::build_pair();

    let unknown = push_with(&fx.url, Some(WELL_FORMED_UNKNOWN), &[&top], &[]);
    unknown.assert_code(exit::AUTH);
    assert!(unknown.stderr.contains("401"), "{}", unknown.stderr);
    assert!(
        !unknown.stderr.contains("ABCDEFGHIJKL"),
        "token echoed: {}",
        unknown.stderr
    );

    let read = fx.server.create_token(&fx.repo, "read");
    let run = push_with(&fx.url, Some(&read), &[&top], &[]);
    run.assert_code(exit::AUTH);
    assert!(run.stderr.contains("read scope"), "{}", run.stderr);
    assert!(run.stderr.contains(&fx.repo), "{}", run.stderr);

    let other = common::unique_name("other");
    fx.server.create_repo(&other, false);
    let other_token = fx.server.create_token(&other, "push");
    let run = push_with(&fx.url, Some(&other_token), &[&top], &[]);
    run.assert_code(exit::AUTH);
    assert!(
        run.stderr.contains("403") || run.stderr.contains("401"),
        "{}",
        run.stderr
    );
    assert_eq!(
        common::get_narinfo(&fx.url, common::hash_part(&top))
            .await
            .0,
        404
    );
}

#[test]
fn paths_that_are_not_store_paths_or_not_in_the_store() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let run = push_with(
        &fx.url,
        Some(&fx.token),
        &[dir.path().to_str().unwrap()],
        &[],
    );
    run.assert_code(exit::USAGE);
    assert!(
        run.stderr.contains("is not in the Nix store"),
        "{}",
        run.stderr
    );

    let absent = "/nix/store/00000000000000000000000000000000-absent";
    let run = push_with(&fx.url, Some(&fx.token), &[absent], &[]);
    run.assert_code(exit::NIX);
    assert!(run.stderr.contains(absent), "{}", run.stderr);
}

#[test]
fn nix_missing_from_path_is_a_nix_error() {
    let fx = Fixture::new();
    let (_, top) = common::build_pair();
    let empty = tempfile::tempdir().unwrap();
    let run = push_with(
        &fx.url,
        Some(&fx.token),
        &[&top],
        &[("PATH", empty.path().to_str().unwrap())],
    );
    run.assert_code(exit::NIX);
    assert!(run.stderr.contains("`nix` was not found"), "{}", run.stderr);
}
