//! Hostile and bad input on the client side not covered by `tests/push_errors.rs`: a store path
//! whose contents no longer match its recorded narHash, an unreadable file, servers that are not
//! Stowix servers, and a TLS error. Each gets its exit code and a message that names the
//! problem, and nothing of it is published.

mod common;
mod invariants;
mod push_common;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use push_common::{finished, push_command, push_with, Fixture, Pushed};
use stowix::cli::exit;

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_store_path_fails_alone_with_a_repair_hint() {
    let fx = Fixture::new();
    let built = common::build_derivations(&[
        common::Drv::new("victim", "echo original-contents > $out"),
        common::Drv::new("needs-victim", "echo $dep0 > $out").deps(&[0]),
        common::Drv::new("bystander", "echo fine > $out"),
    ]);
    let (victim, dependent, bystander) = (built[0].clone(), built[1].clone(), built[2].clone());
    let _cleanup = common::DeleteOnDrop(vec![dependent.clone(), victim.clone()]);
    // Same size, other bytes: only the hash can tell.
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&victim, "tampered-contents\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o444)).unwrap();
    assert_eq!(
        std::fs::metadata(&victim).unwrap().len(),
        "original-contents\n".len() as u64
    );

    let pushed = fx.push(&["--verbose", &dependent, &bystander]);
    pushed.assert_code(exit::PARTIAL);
    let failure = pushed
        .stderr
        .lines()
        .find(|l| l.starts_with(&format!("failed: {victim}")))
        .unwrap_or_else(|| panic!("no failure line for {victim}:\n{}", pushed.stderr));
    assert!(failure.contains("corrupt"), "{}", pushed.stderr);
    assert!(
        pushed
            .stderr
            .contains("nix-store --verify --check-contents --repair"),
        "{}",
        pushed.stderr
    );
    assert!(
        pushed.stderr.contains(&format!("failed: {dependent}")),
        "{}",
        pushed.stderr
    );
    assert!(
        pushed.stderr.contains(&format!("published: {bystander}")),
        "{}",
        pushed.stderr
    );
    let report = invariants::check(
        &fx.url,
        &fx.public_key,
        Some(&fx.server),
        &[victim.clone(), dependent.clone(), bystander.clone()],
    )
    .await;
    assert!(
        report.serves_none_of(&[victim.clone(), dependent.clone()]),
        "{report:?}"
    );
    assert!(report.serves_all_of(std::slice::from_ref(&bystander)));
    // No NAR of the victim was kept, neither of its recorded nor of its current contents.
    let tampered = common::sha256_nix32(&common::nix_store_dump(std::path::Path::new(&victim)));
    let stored = fx.server.stored_nar_hashes(&fx.repo);
    assert!(!stored.contains(&tampered), "{stored:?}");
    let recorded = Command::new("nix-store")
        .args(["-q", "--hash", &victim])
        .output()
        .unwrap();
    let recorded = String::from_utf8_lossy(&recorded.stdout).trim().to_string();
    assert!(recorded.starts_with("sha256:"), "{recorded}");
    assert!(!stored.contains(&recorded), "{stored:?}");
}

/// Runs `cmd` as root without the capabilities that let root read any file
/// (`CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`): file modes apply, as for an ordinary user,
/// while the Nix database (owned by root) stays usable.
fn without_dac_override(cmd: &Command) -> Command {
    let mut wrapped = Command::new("setpriv");
    wrapped
        .args([
            "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search",
            "--",
        ])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_file_fails_its_path_naming_the_file() {
    let fx = Fixture::new();
    let built = common::build_derivations(&[
        common::Drv::new(
            "has-secret",
            "/usr/bin/mkdir -p $out && echo secret > $out/secret && echo open > $out/open",
        ),
        common::Drv::new("bystander", "echo fine > $out"),
    ]);
    let (victim, bystander) = (built[0].clone(), built[1].clone());
    let secret = format!("{victim}/secret");
    let _cleanup = common::DeleteOnDrop(vec![victim.clone()]);
    // Mode 000 does not change the NAR (only the executable bit is recorded): the path is
    // valid, just unreadable to a process without CAP_DAC_OVERRIDE.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();

    let cmd = push_command(
        &fx.url,
        Some(&fx.token),
        &["--verbose", &victim, &bystander],
    );
    let pushed = finished(without_dac_override(&cmd).output().unwrap());
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o444)).unwrap();
    pushed.assert_code(exit::PARTIAL);
    let failure = pushed
        .stderr
        .lines()
        .find(|l| l.starts_with(&format!("failed: {victim}")))
        .unwrap_or_else(|| panic!("no failure line for {victim}:\n{}", pushed.stderr));
    assert!(
        failure.contains("secret") && failure.to_lowercase().contains("permission denied"),
        "the message should name the unreadable file and why: {failure}"
    );
    assert!(
        pushed.stderr.contains(&format!("published: {bystander}")),
        "{}",
        pushed.stderr
    );
    let report = invariants::check(
        &fx.url,
        &fx.public_key,
        Some(&fx.server),
        &[victim.clone(), bystander.clone()],
    )
    .await;
    assert!(
        report.serves_none_of(std::slice::from_ref(&victim)),
        "{report:?}"
    );
}

/// A tiny HTTP server answering every request with `answer(path)`; counts requests that are
/// not GET (a client that goes on to push to it would send some).
struct FakeServer {
    url: String,
    writes: Arc<AtomicU64>,
}

fn fake_server(answer: fn(&str) -> (u16, &'static str, &'static str)) -> FakeServer {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let writes = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&writes);
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let counter = Arc::clone(&counter);
        async move {
            if request.method() != axum::http::Method::GET {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            let (status, content_type, body) = answer(request.uri().path());
            (
                StatusCode::from_u16(status).unwrap(),
                [(header::CONTENT_TYPE, content_type)],
                body,
            )
                .into_response()
        }
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    FakeServer {
        url: format!("http://{addr}/cache"),
        writes,
    }
}

async fn push_blocking(target: String, token: String, root: String) -> Pushed {
    tokio::task::spawn_blocking(move || push_with(&target, Some(&token), &[&root], &[]))
        .await
        .unwrap()
}

const WELL_FORMED: &str = "stx_live_abcdefghijklmnopqrstuvwxy0_ABCDEFGHIJKLmnopqrstuv12";

#[tokio::test(flavor = "multi_thread")]
async fn a_web_server_answering_html_is_not_a_stowix_server() {
    let (_, top) = common::build_pair();
    let html = fake_server(|_| {
        (
            200,
            "text/html",
            "<!doctype html><html><body>Welcome to nginx!</body></html>",
        )
    });
    let pushed = push_blocking(html.url.clone(), WELL_FORMED.into(), top).await;
    pushed.assert_code(exit::UNREACHABLE);
    assert!(
        pushed.stderr.contains("not a Stowix repository") && pushed.stderr.contains(&html.url),
        "{}",
        pushed.stderr
    );
    assert_eq!(html.writes.load(Ordering::SeqCst), 0, "it pushed to it");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_binary_cache_is_not_a_stowix_server() {
    let (_, top) = common::build_pair();
    let cache = fake_server(|path| {
        if path.ends_with("/nix-cache-info") {
            (
                200,
                "text/x-nix-cache-info",
                "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
            )
        } else {
            (404, "text/plain", "404 page not found")
        }
    });
    let pushed = push_blocking(cache.url.clone(), WELL_FORMED.into(), top).await;
    pushed.assert_code(exit::UNREACHABLE);
    assert!(
        pushed.stderr.contains("not a Stowix repository") && pushed.stderr.contains("404"),
        "{}",
        pushed.stderr
    );
    assert_eq!(cache.writes.load(Ordering::SeqCst), 0, "it pushed to it");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_to_a_plain_http_port_is_a_tls_error() {
    let fx = Fixture::new();
    let (dep, top) = common::build_pair();
    let target = format!("https://{}/{}", fx.server.addr(), fx.repo);
    let pushed = push_blocking(target.clone(), fx.token.clone(), top.clone()).await;
    pushed.assert_code(exit::UNREACHABLE);
    let text = pushed.stderr.to_lowercase();
    assert!(
        pushed.stderr.contains("cannot reach") && (text.contains("tls") || text.contains("ssl")),
        "the message should say the TLS handshake failed:\n{}",
        pushed.stderr
    );
    assert!(
        !pushed.stderr.contains("ABCDEFGHIJKL") && !pushed.stderr.contains(&fx.token),
        "token echoed: {}",
        pushed.stderr
    );
    let report = invariants::check(&fx.url, &fx.public_key, Some(&fx.server), &[dep, top]).await;
    assert!(report.served.is_empty(), "{report:?}");
}
