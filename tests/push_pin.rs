//! The client side of retention with real Nix and a real server: `stowix nix push --pin`,
//! `stowix nix pin`, and a push that repairs a closure whose reference the repository lost
//! between the presence answer and the publication (an administrator's `admin path delete`,
//! standing in for garbage collection, which removes paths the same way).

mod common;
mod push_common;

use std::time::{Duration, Instant};

use common::*;
use push_common::*;

fn pin_command(fixture: &Fixture, token: &str, args: &[&str]) -> Pushed {
    let mut cmd = nix_command("pin", &fixture.url, Some(token), args);
    finished(cmd.output().expect("run stowix nix pin"))
}

fn pin_list(fixture: &Fixture) -> String {
    fixture
        .server
        .admin(&["pin", "list", "--repo", fixture.repo.as_str()])
}

#[test]
fn push_pin_makes_revisions_and_keep_drops_the_oldest() {
    let fixture = Fixture::new();
    let first = build_text("pin-first", "first release");
    let second = build_text("pin-second", "second release");
    let third = build_text("pin-third", "third release");

    let pushed = fixture.push(&["--pin", "release", &first]);
    pushed.assert_code(0);
    assert!(
        pushed.stderr.contains("as release revision 1"),
        "{}",
        pushed.stderr
    );
    fixture.push(&["--pin", "release", &second]).assert_code(0);
    let pushed = fixture.push(&["--pin", "release", "--keep", "2", &third]);
    pushed.assert_code(0);
    assert!(
        pushed
            .stderr
            .contains("as release revision 3; dropped revision 1"),
        "{}",
        pushed.stderr
    );
    let list = pin_list(&fixture);
    assert!(
        list.contains(&second) && list.contains(&third) && !list.contains(&first),
        "admin pin list after --keep 2:\n{list}"
    );
}

#[test]
fn a_push_with_failed_paths_does_not_pin() {
    require_nix();
    // A server that refuses NARs over 64 KiB: of two roots, one publishes and one fails.
    let server = TestServer::start_with_config("max_nar_bytes = 65536\n");
    let repo = unique_name("pin-partial");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let small = build_text("pin-small", "fits");
    let big = build_random("pin-big", 200_000);
    let pushed = push_with(&url, Some(&token), &["--pin", "release", &small, &big], &[]);
    pushed.assert_code(4);
    assert!(
        pushed.stderr.contains("not pinned as release"),
        "{}",
        pushed.stderr
    );
    let list = server.admin(&["pin", "list", "--repo", &repo]);
    assert!(
        !list.contains(&small),
        "the published root was pinned by a partial push:\n{list}"
    );
}

#[test]
fn nix_pin_pins_published_paths_and_refuses_others_with_their_own_exit_codes() {
    let fixture = Fixture::new();
    let published = build_text("pin-published", "published");
    let unpublished = build_text("pin-unpublished", "not published");
    fixture.push(&[&published]).assert_code(0);

    let pinned = pin_command(&fixture, &fixture.token, &["stable", &published]);
    pinned.assert_code(0);
    assert!(
        pinned.stderr.contains("pinned 1 path as stable revision 1"),
        "{}",
        pinned.stderr
    );
    assert!(pin_list(&fixture).contains(&published));

    let refused = pin_command(&fixture, &fixture.token, &["stable", &unpublished]);
    refused.assert_code(9);
    assert!(
        refused.stderr.contains(&unpublished) && refused.stderr.contains("push the path first"),
        "{}",
        refused.stderr
    );
    assert!(!pin_list(&fixture).contains(&unpublished));

    let bad_name = pin_command(&fixture, &fixture.token, &["../etc", &published]);
    bad_name.assert_code(2);
    assert!(bad_name.stderr.contains("pin name"), "{}", bad_name.stderr);

    let read = fixture.server.create_token(&fixture.repo, "read");
    pin_command(&fixture, &read, &["stable", &published]).assert_code(3);
}

/// The repository loses a path after telling the push it holds it: the publication that
/// refers to it is refused (`missing_references`), and the push uploads the lost path again
/// in a repair round instead of failing. Real Nix then substitutes the whole closure.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_repairs_a_reference_deleted_while_it_ran() {
    let fixture = Fixture::new();
    let paths = build_derivations(&[
        Drv::new("repair-lib", "echo lib > $out"),
        // 1.5 MB of incompressible bytes: at 300 KiB/s the upload takes ~5 s, time enough to
        // delete the reference after presence answered and before publication.
        Drv::new(
            "repair-app",
            "{ echo $dep0; /usr/bin/head -c 1500000 /dev/urandom; } > $out",
        )
        .deps(&[0]),
    ]);
    let (lib, app) = (&paths[0], &paths[1]);
    fixture.push(&[lib]).assert_code(0);

    let mut push = BackgroundPush::spawn(push_command(
        &fixture.url,
        Some(&fixture.token),
        &["--verbose", "--max-upload-rate", "300K", app],
    ));
    push.wait_for_line("already present: lib", |l| {
        l.contains("already present") && l.contains(lib.as_str())
    })
    .await;
    fixture
        .server
        .admin(&["path", "delete", "--repo", fixture.repo.as_str(), lib]);
    let started = Instant::now();
    let ended = push.wait(Duration::from_secs(120)).pushed;
    ended.assert_code(0);
    assert!(
        ended.stderr.contains("repair round 1"),
        "the push never needed a repair round (ended {:?} after the delete):\n{}",
        started.elapsed(),
        ended.stderr
    );
    fixture.substitute(std::slice::from_ref(app));
}
