//! The upstream filter with real Nix: part of a closure is signed by a test "upstream" key
//! (`nix-store --generate-binary-cache-key`, `nix store sign`), the push skips that part and
//! proves it to the server, the server refuses forged or unknown-key proofs, and real Nix
//! substitutes the whole closure from the repository plus a `file://` cache holding the
//! upstream part, with both keys trusted and signatures required.

mod common;
mod push_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use push_common::*;
use stowix::api;

struct UpstreamKey {
    _dir: tempfile::TempDir,
    secret: PathBuf,
    public: String,
    name: String,
}

fn upstream_key(name: &str) -> UpstreamKey {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    let public = dir.path().join("public");
    let status = Command::new("nix-store")
        .args(["--generate-binary-cache-key", name])
        .arg(&secret)
        .arg(&public)
        .status()
        .expect("nix-store --generate-binary-cache-key");
    assert!(status.success());
    UpstreamKey {
        public: std::fs::read_to_string(&public).unwrap().trim().to_string(),
        secret,
        name: name.to_string(),
        _dir: dir,
    }
}

fn nix_sign(key: &Path, paths: &[String]) {
    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "store",
            "sign",
            "--key-file",
        ])
        .arg(key)
        .args(paths)
        .output()
        .expect("nix store sign");
    assert!(
        out.status.success(),
        "nix store sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `[lib, tool, app]`: app refers to both, tool to lib.
fn closure() -> Vec<String> {
    build_derivations(&[
        Drv::new("up-lib", "echo lib > $out"),
        Drv::new("up-tool", "echo $dep0 > $out").deps(&[0]),
        Drv::new("up-app", "echo $dep0 $dep1 > $out").deps(&[0, 1]),
    ])
}

fn fixture_with_upstream(keys: &[&str]) -> Fixture {
    let fixture = Fixture::new();
    let mut args = vec!["repo", "configure", fixture.repo.as_str()];
    for key in keys {
        args.extend(["--upstream-key", key]);
    }
    fixture.server.admin(&args);
    fixture
}

#[tokio::test]
async fn signed_paths_are_skipped_proven_and_substituted_from_upstream() {
    let upstream = upstream_key(&unique_name("upstream-test"));
    let fixture = fixture_with_upstream(&[&upstream.public]);
    let paths = closure();
    let (lib, tool, app) = (&paths[0], &paths[1], &paths[2]);
    nix_sign(&upstream.secret, &[lib.clone(), tool.clone()]);

    let pushed = fixture.push(&["--verbose", app]);
    pushed.assert_code(0);
    for skipped in [lib, tool] {
        let line = format!("skipped: {skipped} (signed by {})", upstream.name);
        assert!(
            pushed.stderr.contains(&line),
            "no {line:?} in:\n{}",
            pushed.stderr
        );
        assert_eq!(get_narinfo(&fixture.url, hash_part(skipped)).await.0, 404);
    }
    assert!(
        pushed.stderr.contains("summary: 2 paths skipped"),
        "{}",
        pushed.stderr
    );
    assert_eq!(pushed.summary_count("uploaded"), 1);
    assert_eq!(get_narinfo(&fixture.url, hash_part(app)).await.0, 200);

    // Real Nix gets the whole closure: the app from the repository, the rest from a file://
    // cache that plays cache.nixos.org, each checked against its own key.
    let upstream_cache = tempfile::tempdir().unwrap();
    let upstream_url = format!("file://{}", upstream_cache.path().display());
    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
            &upstream_url,
        ])
        .args([lib, tool])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new("nix")
        .env("XDG_CACHE_HOME", cache.path())
        .args([
            "--extra-experimental-features",
            "nix-command",
            "build",
            "--no-link",
        ])
        .arg("--store")
        .arg(store.path())
        .args([
            "--option",
            "substituters",
            &format!("{} {upstream_url}", fixture.url),
        ])
        .args([
            "--option",
            "trusted-public-keys",
            &format!("{} {}", fixture.public_key, upstream.public),
        ])
        .args(["--option", "require-sigs", "true"])
        .args(["--option", "narinfo-cache-negative-ttl", "0"])
        .arg(app)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix build --store: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for path in &paths {
        let copied = store.path().join(path.trim_start_matches('/'));
        assert!(copied.exists(), "{path} was not substituted");
    }

    // --no-upstream-filter pushes everything.
    let everything = fixture.push(&["--no-upstream-filter", app]);
    everything.assert_code(0);
    assert_eq!(get_narinfo(&fixture.url, hash_part(lib)).await.0, 200);
}

#[tokio::test]
async fn proofs_by_an_untrusted_key_or_of_other_contents_are_refused() {
    let trusted = upstream_key(&unique_name("trusted-up"));
    let stranger = upstream_key(&unique_name("stranger-up"));
    let fixture = fixture_with_upstream(&[&trusted.public]);
    let paths = closure();
    let (lib, tool) = (&paths[0], &paths[1]);
    // Signed by a key the repository does not trust: the client trusts it, the server won't.
    nix_sign(&stranger.secret, std::slice::from_ref(lib));
    let pushed = fixture.push(&["--upstream-key", &stranger.public, tool]);
    assert_ne!(pushed.code, 0, "{}", pushed.stderr);
    assert!(
        pushed.stderr.contains("missing_references") || pushed.stderr.contains("does not have"),
        "{}",
        pushed.stderr
    );
    assert_eq!(get_narinfo(&fixture.url, hash_part(tool)).await.0, 404);

    // A valid upstream signature over different contents proves nothing: forge the NarSize.
    nix_sign(&trusted.secret, std::slice::from_ref(lib));
    let lib_info = LocalPath::load(lib);
    let tool_info = LocalPath::load(tool);
    // The refused push stored the tool's NAR; only its publication failed.
    let stored = presence(&fixture.url, &fixture.token, &[&tool_info]).await;
    assert_eq!(
        stored.nar_stored,
        vec![tool_info.hash.clone()],
        "{stored:?}"
    );
    let signatures: Vec<String> = lib_info_signatures(lib);
    assert!(signatures
        .iter()
        .any(|s| s.starts_with(&format!("{}:", trusted.name))));
    let proof = |nar_size: u64| api::UpstreamProof {
        store_path: lib.clone(),
        nar_hash: lib_info.publish_entry().nar_hash,
        nar_size,
        references: vec![],
        signatures: signatures.clone(),
    };
    let request = |proof: api::UpstreamProof| api::PublishRequest {
        narinfos: vec![tool_info.publish_entry()],
        upstream: vec![proof],
    };
    let send = |body: api::PublishRequest| {
        let url = api_url(&fixture.url, "narinfos");
        let token = fixture.token.clone();
        async move {
            http()
                .post(url)
                .header("Authorization", bearer(&token))
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<api::PublishResponse>()
                .await
                .unwrap()
        }
    };
    let forged = send(request(proof(lib_info.nar_size() + 1))).await;
    assert_eq!(forged.rejected.len(), 1, "{forged:?}");
    assert_eq!(forged.rejected[0].code, "missing_references");
    let genuine = send(request(proof(lib_info.nar_size()))).await;
    assert!(genuine.rejected.is_empty(), "{genuine:?}");
    assert_eq!(genuine.published, vec![tool_info.hash.clone()]);
}

fn lib_info_signatures(path: &str) -> Vec<String> {
    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            path,
        ])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json[0]["signatures"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn repositories_announce_their_upstream_keys() {
    let server = TestServer::start();
    let repo = unique_name("upinfo");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let info = repo_info(&server.repo_url(&repo), &token).await;
    assert_eq!(info.upstream_keys, vec![api::NIXOS_CACHE_KEY.to_string()]);
    let shown = server.admin(&["repo", "show", &repo]);
    assert!(shown.contains(api::NIXOS_CACHE_KEY), "{shown}");

    let bad = server.admin_output(&["repo", "configure", &repo, "--upstream-key", "not-a-key"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--upstream-key"));
    server.admin(&["repo", "configure", &repo, "--no-upstream-keys"]);
    // Servers reread a repository's settings at least every second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !repo_info(&server.repo_url(&repo), &token)
        .await
        .upstream_keys
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the change never showed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
