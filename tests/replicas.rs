//! Several `stowix serve` replicas behind nginx, sharing one PostgreSQL database and one S3
//! bucket prefix: what issue 10 promises of the scale-out backend, with real components only.
//!
//! ```text
//!   stowix nix push / nix copy ──► nginx (config/nginx-stowix.conf, round robin)
//!                                    ├──► replica A ──┐
//!                                    └──► replica B ──┴──► PostgreSQL stowix_t_<nonce>
//!                                                          SeaweedFS s3://stowix-test/t-<nonce>
//!   stowix admin (same backend flags) ─────────────────────┘
//! ```
//!
//! These tests always run on the scale-out backend, whatever STOWIX_TEST_BACKEND says:
//! replicas only exist there. nginx's access log (method, status, bytes read, upstream) tells
//! which replica got which request.

mod common;
mod invariants;
mod push_common;

use std::time::{Duration, Instant};

use common::backends::{Balancer, Proxied};
use common::TestServer;
use push_common::{push_command, BackgroundPush};
use stowix::cli::exit;

/// S3's smallest multipart part: chunks this small make a push of one large NAR take several
/// requests (so they can alternate) while each stays a valid part.
const CHUNK: u64 = 5 * 1024 * 1024;
const RECEIVED: &str = "stowix_server_upload_received_bytes_total";

/// Settings of every replica: small chunks, and the client address taken from nginx's header.
fn replica_config() -> String {
    format!("max_chunk_bytes = {CHUNK}\nclient_ip_header = \"X-Forwarded-For\"\n")
}

/// Two replicas on one database and bucket prefix, nginx in front, one public repository.
struct Cluster {
    a: TestServer,
    b: TestServer,
    lb: Balancer,
    repo: String,
    public_key: String,
    token: String,
}

impl Cluster {
    fn start() -> Self {
        common::require_nix();
        let config = replica_config();
        let a = TestServer::start_scaleout(Some(&config));
        let b = TestServer::start_replica_of(&a, Some(&config));
        let lb = Balancer::start(&[a.addr(), b.addr()]);
        let repo = common::unique_name("replicas");
        // Created while both replicas run, through the shared database.
        let public_key = a.create_repo(&repo, false);
        let token = b.create_token(&repo, "push");
        Cluster {
            a,
            b,
            lb,
            repo,
            public_key,
            token,
        }
    }

    /// The repository through the balancer: what clients use.
    fn url(&self) -> String {
        self.lb.repo_url(&self.repo)
    }

    /// Requests of `method` that nginx passed to `replica` and that succeeded there.
    fn served_by(&self, method: &str, replica: &TestServer) -> Vec<Proxied> {
        let addr = replica.addr();
        self.lb
            .access_log()
            .into_iter()
            .filter(|r| r.method == method && (200..300).contains(&r.status))
            .filter(|r| r.upstreams.last() == Some(&addr))
            .collect()
    }
}

/// A 24 MiB store path of random bytes (five chunks), a small library, and a root on both.
fn closure_with_large_nar() -> (String, String, Vec<String>) {
    let built = common::build_derivations(&[
        common::Drv::new("big", "/usr/bin/head -c 25165824 /dev/urandom > $out"),
        common::Drv::new(
            "lib",
            "/usr/bin/mkdir -p $out/lib && echo one > $out/lib/x && echo $out > $out/self",
        ),
        common::Drv::new("top", "echo $dep0 $dep1 > $out").deps(&[0, 1]),
    ]);
    let big = built[0].clone();
    let root = built[2].clone();
    let closure = common::closure_of(std::slice::from_ref(&root));
    assert_eq!(closure.len(), 3, "{closure:?}");
    (big, root, closure)
}

async fn file_size(repo_url: &str, path: &str) -> u64 {
    let (status, narinfo) = common::get_narinfo(repo_url, common::hash_part(path)).await;
    assert_eq!(status, 200, "narinfo of {path}: {narinfo}");
    common::narinfo_field(&narinfo, "FileSize")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no FileSize in {narinfo}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_of_one_push_alternate_between_replicas() {
    let c = Cluster::start();
    let (big, root, closure) = closure_with_large_nar();

    let pushed = push_common::push_with(&c.url(), Some(&c.token), &["--verbose", &root], &[]);
    pushed.assert_code(exit::SUCCESS);

    // The large NAR went up in chunks, and nginx sent some of them to each replica: each chunk
    // was appended by whichever replica got it, to one upload the other replica had started.
    let (to_a, to_b) = (c.served_by("PATCH", &c.a), c.served_by("PATCH", &c.b));
    assert!(
        to_a.len() + to_b.len() >= 5,
        "a 24 MiB NAR in 5 MiB chunks took {} PATCH requests: {:?}",
        to_a.len() + to_b.len(),
        c.lb.access_log()
    );
    assert!(
        !to_a.is_empty() && !to_b.is_empty(),
        "chunks did not reach both replicas: {} to A, {} to B\n{:?}",
        to_a.len(),
        to_b.len(),
        c.lb.access_log()
    );
    // Both replicas counted upload bytes of their own (the replicas' view, not nginx's).
    let (got_a, got_b) = (c.a.metric(RECEIVED).await, c.b.metric(RECEIVED).await);
    assert!(
        got_a >= CHUNK as f64 && got_b >= CHUNK as f64,
        "upload bytes received: A {got_a}, B {got_b}; each should hold at least one chunk"
    );

    let big_size = file_size(&c.url(), &big).await;
    assert!(big_size > 4 * CHUNK, "FileSize {big_size} of the large NAR");
    let report = invariants::check(&c.url(), &c.public_key, Some(&c.a), &closure).await;
    assert!(report.serves_all_of(&closure), "{report:?}");
    // Either replica serves what the other stored.
    for replica in [&c.a, &c.b] {
        let (status, _) =
            common::get_narinfo(&replica.repo_url(&c.repo), common::hash_part(&root)).await;
        assert_eq!(status, 200, "narinfo of the root from {}", replica.url());
    }
    common::nix_copy_from(&c.url(), &c.public_key, std::slice::from_ref(&root), None)
        .unwrap_or_else(|e| panic!("nix copy --from through the balancer: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn replica_killed_mid_push_the_push_goes_on_through_the_other() {
    let mut c = Cluster::start();
    let (big, root, closure) = closure_with_large_nar();

    // 2 MiB/s: the large NAR takes ~12 s, so the kill lands mid-upload.
    let mut cmd = push_command(
        &c.url(),
        Some(&c.token),
        &["--verbose", "--max-upload-rate", "2MiB", &root],
    );
    cmd.env("STOWIX_RETRY_BASE_DELAY_MS", "100");
    let mut run = BackgroundPush::spawn(cmd);

    // Kill B once it has taken a chunk of the large NAR: the upload is then half on B's
    // account, and B may be receiving the next chunk.
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.b.metric(RECEIVED).await < CHUNK as f64 {
        assert!(
            !run.exited(),
            "the push ended before B got a chunk:\n{}",
            run.text()
        );
        assert!(
            Instant::now() < deadline,
            "B got no chunk in 120 s:\n{}",
            run.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a_at_kill = c.a.metric(RECEIVED).await;
    c.b.kill();
    assert!(
        !run.exited(),
        "the push ended before B was killed:\n{}",
        run.text()
    );
    let (status, _) = common::get_narinfo(&c.a.repo_url(&c.repo), common::hash_part(&big)).await;
    assert_eq!(
        status, 404,
        "the large NAR was published before B was killed: too late a kill"
    );

    let ended = run.wait(Duration::from_secs(300));
    ended.pushed.assert_code(exit::SUCCESS);
    assert!(
        c.a.metric(RECEIVED).await > a_at_kill,
        "A received nothing after the kill: the push did not go on through it"
    );

    // The kill cost at most the chunk in flight: everything the client sent as chunks, as
    // nginx counted it (request heads included), is the NAR's file plus at most one chunk.
    let big_size = file_size(&c.url(), &big).await;
    let patches: Vec<Proxied> =
        c.lb.access_log()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .collect();
    let sent: u64 = patches.iter().map(|r| r.request_length).sum();
    let heads = 2048 * patches.len() as u64;
    assert!(
        sent <= big_size + CHUNK + heads,
        "clients sent {sent} bytes of chunks for a {big_size}-byte file: more than one chunk \
         was lost to the kill\n{patches:?}"
    );

    let report = invariants::check(&c.url(), &c.public_key, Some(&c.a), &closure).await;
    assert!(report.serves_all_of(&closure), "{report:?}");
    common::nix_copy_from(&c.url(), &c.public_key, std::slice::from_ref(&root), None)
        .unwrap_or_else(|e| panic!("nix copy --from through the balancer after the kill: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn nix_copy_to_and_from_through_the_balancer_with_signatures() {
    let c = Cluster::start();
    let closure = common::closure_of(&common::realistic_closure());

    common::nix_copy_to(&c.url(), &c.token, &closure)
        .unwrap_or_else(|e| panic!("nix copy --to through the balancer: {e}"));
    // Nix uploads each NAR and its narinfo in separate requests, and nginx spreads them: a
    // narinfo often lands on the replica that did not receive its NAR.
    let (puts_a, puts_b) = (c.served_by("PUT", &c.a), c.served_by("PUT", &c.b));
    assert!(
        !puts_a.is_empty() && !puts_b.is_empty(),
        "PUTs did not reach both replicas: {} to A, {} to B\n{:?}",
        puts_a.len(),
        puts_b.len(),
        c.lb.access_log()
    );

    let report = invariants::check(&c.url(), &c.public_key, Some(&c.a), &closure).await;
    assert!(report.serves_all_of(&closure), "{report:?}");
    // Signatures are checked: only the repository's key is trusted, and with another
    // repository's key the same copy fails.
    common::nix_copy_from(&c.url(), &c.public_key, &closure, None)
        .unwrap_or_else(|e| panic!("nix copy --from through the balancer: {e}"));
    let other = common::unique_name("other");
    let other_key = c.a.create_repo(&other, false);
    let wrong = common::nix_copy_from(&c.url(), &other_key, &closure, None);
    assert!(
        wrong.is_err(),
        "nix copy --from succeeded while trusting only another repository's key"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_token_created_while_replicas_run_works_at_once_on_both() {
    let c = Cluster::start();
    let private = common::unique_name("private");
    c.a.create_repo(&private, true);
    let http = common::http();
    let cache_info =
        |replica: &TestServer| format!("{}/nix-cache-info", replica.repo_url(&private));

    // A private repository answers 404 without a token, on both replicas alike.
    for replica in [&c.a, &c.b] {
        let resp = http.get(cache_info(replica)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "no token, {}", replica.url());
    }

    // Created by `stowix admin` with both replicas running, and used at once on each.
    let token = c.b.create_token(&private, "read");
    for replica in [&c.a, &c.b] {
        let resp = http
            .get(cache_info(replica))
            .header("Authorization", common::bearer(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "new token on {}", replica.url());
    }

    // Revoked the same way: refused at once on each.
    let id = common::token_id(&token).unwrap().to_string();
    c.a.admin(&["token", "revoke", &id]);
    for replica in [&c.a, &c.b] {
        let resp = http
            .get(cache_info(replica))
            .header("Authorization", common::bearer(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "revoked token on {}", replica.url());
    }
}
