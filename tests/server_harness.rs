//! Checks of the test harness itself, against real Nix and no Stowix server: the nix32
//! oracle, the fixtures, and that `nix_copy_from` really fails on a bad signature (so the
//! server tests that rely on it can fail).

mod common;

use std::process::Command;

use common::*;

#[test]
fn nix32_oracle_matches_reference_vectors() {
    use sha2::{Digest as _, Sha256};
    assert_eq!(
        nix32(&Sha256::digest(b"")),
        "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    );
    assert_eq!(
        nix32(&Sha256::digest(b"abc")),
        "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
    );
    assert_eq!(nix32(&[0u8; 20]).len(), 32);
}

#[test]
fn metric_parser_sums_label_sets() {
    let text = "# TYPE x counter\n\
                x{route=\"a\",status=\"200\"} 3\n\
                x{route=\"b\",status=\"200\"} 4\n\
                x{route=\"a\",status=\"404\"} 1\n\
                x_count 9\n";
    assert_eq!(sum_metric(text, "x"), 8.0);
    assert_eq!(sum_metric(text, "x{status=\"200\"}"), 7.0);
    assert_eq!(sum_metric(text, "x{route=\"a\",status=\"404\"}"), 1.0);
    assert_eq!(sum_metric(text, "x_count"), 9.0);
    assert_eq!(sum_metric(text, "y"), 0.0);
}

#[test]
fn token_shape() {
    assert_eq!(
        token_id("stx_live_abcdefghijklmnopqrstuvwxy0_ABCDEFGHIJKLMNOPqrstuvwx"),
        Some("abcdefghijklmnopqrstuvwxy0")
    );
    assert_eq!(token_id("stx_live_short_ABCDEFGHIJKLMNOPqrstuvwx"), None);
    assert_eq!(token_id("bearer"), None);
}

#[test]
fn fixtures_are_fresh_input_addressed_and_reference_each_other() {
    let closure = realistic_closure();
    assert_eq!(closure.len(), 5);
    let again = realistic_closure();
    assert!(
        closure.iter().all(|p| !again.contains(p)),
        "two fixture builds share paths: the nonce does not work"
    );
    let infos: Vec<LocalPath> = closure.iter().map(|p| LocalPath::load(p)).collect();
    // tool++ refers to libfoo and data, and to itself.
    let tool = &infos[2];
    assert!(tool.path.ends_with("-tool++"));
    assert!(tool.references.contains(&infos[0].path));
    assert!(tool.references.contains(&infos[1].path));
    assert!(tool.references.contains(&tool.path), "no self-reference");
    assert!(tool.deriver.is_some(), "not input-addressed");
    assert!(tool.ca.is_none(), "not input-addressed");
    // The root closure is all five paths.
    let mut all = closure_of(&[closure[4].clone()]);
    all.sort();
    let mut expected = closure.clone();
    expected.sort();
    assert_eq!(all, expected);

    let ca = add_to_store(&[("ca-file", nonce().as_bytes())]);
    let info = LocalPath::load(&ca[0]);
    assert!(info.ca.is_some(), "nix-store --add path has no CA");
}

/// `nix_copy_from` against a signed `file://` cache: the right key passes, another key fails.
#[test]
fn nix_copy_from_enforces_signatures() {
    require_nix();
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret");
    let name = unique_name("harness");
    let out = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "key"])
        .args(["generate-secret", "--key-name", &name])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&secret, &out.stdout).unwrap();
    let public = {
        let mut child = Command::new("nix")
            .args(["--extra-experimental-features", "nix-command", "key"])
            .arg("convert-secret-to-public")
            .stdin(std::fs::File::open(&secret).unwrap())
            .output()
            .unwrap();
        assert!(child.status.success());
        String::from_utf8(std::mem::take(&mut child.stdout))
            .unwrap()
            .trim()
            .to_string()
    };
    let (dep, top) = build_pair();
    let cache = format!("file://{}", tmp.path().join("cache").display());
    let status = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "copy"])
        .arg("--to")
        .arg(format!("{cache}?secret-key={}", secret.display()))
        .arg(&top)
        .status()
        .unwrap();
    assert!(status.success());

    nix_copy_from(&cache, &public, std::slice::from_ref(&top), None)
        .expect("copy with the right key");
    let other = "other-key-1:2qJ3/6PZ7u5Sc5cUUmWFk2sYlK10OGsAb3mNe4KoOb0=";
    let err = nix_copy_from(&cache, other, std::slice::from_ref(&top), None)
        .expect_err("a path signed by an untrusted key was accepted");
    assert!(err.contains("signature"), "unexpected error: {err}");
    let _ = dep;
}
