//! The read side of a repository: a complete Nix HTTP binary cache (`nix-cache-info`,
//! narinfo GET/HEAD, NAR files, 404s), the health endpoint and the metrics.

mod common;

use base64::Engine as _;
use common::*;
use ed25519_dalek::Verifier as _;

#[tokio::test]
async fn health_and_nix_cache_info() {
    let server = TestServer::start();
    let repo = unique_name("info");
    server.create_repo(&repo, false);

    let resp = http()
        .get(format!("{}/healthz", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET /healthz");

    let resp = http()
        .get(format!("{}/nix-cache-info", server.repo_url(&repo)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET nix-cache-info");
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        ctype.starts_with("text/x-nix-cache-info"),
        "nix-cache-info content type {ctype:?}"
    );
    let body = resp.text().await.unwrap();
    assert!(
        body.ends_with('\n'),
        "nix-cache-info lacks a final newline: {body:?}"
    );
    let lines: Vec<&str> = body.lines().collect();
    assert!(lines.contains(&"StoreDir: /nix/store"), "{body:?}");
    assert!(lines.contains(&"WantMassQuery: 1"), "{body:?}");
    let priority = lines
        .iter()
        .find_map(|l| l.strip_prefix("Priority: "))
        .unwrap_or_else(|| panic!("no Priority line in {body:?}"));
    priority
        .parse::<u32>()
        .unwrap_or_else(|_| panic!("Priority {priority:?} is not a number"));

    // An unknown repository is absent, for Nix (404) and for the API.
    let unknown = server.repo_url(&unique_name("nosuch"));
    let resp = http()
        .get(format!("{unknown}/nix-cache-info"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        404,
        "nix-cache-info of an unknown repository"
    );
    let (status, _) = get_narinfo(&unknown, &"0".repeat(32)).await;
    assert_eq!(status, 404, "narinfo of an unknown repository");
}

/// The narinfo a pushed path gets: every field Nix needs, References as basenames, the
/// repository's signature over the fingerprint (checked here with ed25519 directly), and a
/// NAR file whose bytes are exactly the uploaded ones.
#[tokio::test]
async fn narinfo_get_head_and_nar_download() {
    let server = TestServer::start();
    let repo = unique_name("read");
    let key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let (dep, top) = build_pair();
    let dep = LocalPath::load(&dep);
    let top = LocalPath::load(&top);
    let (file, params) = top.xz_upload();
    push_paths(&url, &token, &[&dep, &top]).await;

    // GET narinfo.
    let resp = http()
        .get(format!("{url}/{}.narinfo", top.hash))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        ctype.starts_with("text/x-nix-narinfo"),
        "narinfo type {ctype:?}"
    );
    let narinfo = resp.text().await.unwrap();
    assert!(narinfo.ends_with('\n'), "no final newline: {narinfo:?}");
    let field = |k: &str| {
        narinfo_field(&narinfo, k)
            .unwrap_or_else(|| panic!("no {k} in narinfo:\n{narinfo}"))
            .to_string()
    };
    assert_eq!(field("StorePath"), top.path);
    assert_eq!(field("Compression"), "xz");
    assert_eq!(field("FileHash"), params.file_hash);
    assert_eq!(field("FileSize"), params.file_size.to_string());
    assert_eq!(field("NarHash"), top.nar_hash);
    assert_eq!(field("NarSize"), top.nar_size().to_string());
    let mut refs: Vec<String> = top
        .references
        .iter()
        .map(|r| r.trim_start_matches("/nix/store/").to_string())
        .collect();
    refs.sort();
    assert_eq!(field("References"), refs.join(" "));
    let deriver = top.deriver.clone().unwrap();
    assert_eq!(field("Deriver"), deriver.trim_start_matches("/nix/store/"));
    let nar_url = field("URL");
    assert!(
        nar_url.starts_with("nar/") && nar_url.ends_with(".nar.xz"),
        "URL {nar_url:?}"
    );

    // The repository key signed the fingerprint.
    let mut full_refs = top.references.clone();
    full_refs.sort();
    let fingerprint = format!(
        "1;{};{};{};{}",
        top.path,
        top.nar_hash,
        top.nar_size(),
        full_refs.join(",")
    );
    let (key_name, key_b64) = key.split_once(':').unwrap();
    let vk_bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(key_b64)
        .unwrap()
        .try_into()
        .unwrap();
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&vk_bytes).unwrap();
    let sigs: Vec<&str> = narinfo
        .lines()
        .filter_map(|l| l.strip_prefix("Sig: "))
        .collect();
    let good = sigs.iter().any(|sig| {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return false;
        };
        let Ok(raw) = <[u8; 64]>::try_from(raw.as_slice()) else {
            return false;
        };
        name == key_name
            && vk
                .verify(
                    fingerprint.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&raw),
                )
                .is_ok()
    });
    assert!(
        good,
        "no valid Sig by {key_name} over {fingerprint:?} in:\n{narinfo}"
    );

    // HEAD narinfo: same status and type, no body.
    let resp = http()
        .head(format!("{url}/{}.narinfo", top.hash))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "HEAD narinfo");
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        ctype.starts_with("text/x-nix-narinfo"),
        "HEAD type {ctype:?}"
    );
    assert!(resp.bytes().await.unwrap().is_empty(), "HEAD has a body");

    // The NAR file: exactly the uploaded bytes, not Content-Encoded.
    let resp = http().get(format!("{url}/{nar_url}")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {nar_url}");
    assert!(
        resp.headers().get("content-encoding").is_none(),
        "NAR answer has a Content-Encoding: {:?}",
        resp.headers().get("content-encoding")
    );
    let body = resp.bytes().await.unwrap();
    assert!(
        body[..] == file[..],
        "served NAR file differs from the upload"
    );
    assert_eq!(sha256_nix32(&unxz(&body)), top.nar_hash);
    let resp = http()
        .head(format!("{url}/{nar_url}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "HEAD {nar_url}");
    let length: Option<u64> = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    assert_eq!(
        length,
        Some(params.file_size),
        "HEAD {nar_url} Content-Length"
    );

    // Absent things are 404, for GET and HEAD.
    let absent_hash = hash_part(&build_text("never-pushed", &nonce())).to_string();
    let (status, _) = get_narinfo(&url, &absent_hash).await;
    assert_eq!(status, 404, "GET absent narinfo");
    let resp = http()
        .head(format!("{url}/{absent_hash}.narinfo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "HEAD absent narinfo");
    let absent_nar = format!("nar/{}.nar.xz", nix32(&[7u8; 32]));
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let resp = http()
            .request(method.clone(), format!("{url}/{absent_nar}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{method} {absent_nar}");
    }
    // The stored NAR under another compression's extension is absent too.
    let other_ext = nar_url.replace(".nar.xz", ".nar.zst");
    let resp = http()
        .get(format!("{url}/{other_ext}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "GET {other_ext}");
    // Not a hash part: never 2xx or 5xx.
    for bad in [
        "short",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345",
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    ] {
        let (status, _) = get_narinfo(&url, bad).await;
        assert!(
            (400..500).contains(&status),
            "GET {bad}.narinfo answered {status}"
        );
    }
}

#[tokio::test]
async fn metrics_counters_move() {
    let server = TestServer::start();
    let repo = unique_name("metrics");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    let path = LocalPath::load(&build_random("metrics", 50_000));
    let (file, _) = path.xz_upload();

    let requests = server.metric("stowix_server_http_requests_total").await;
    let not_found = server
        .metric("stowix_server_http_requests_total{status=\"404\"}")
        .await;
    let durations = server
        .metric("stowix_server_http_request_duration_seconds_count")
        .await;
    let received = server
        .metric("stowix_server_upload_received_bytes_total")
        .await;
    let stored = server.metric("stowix_server_nars_stored_total").await;
    let published = server
        .metric("stowix_server_narinfos_published_total")
        .await;

    push_paths(&url, &token, &[&path]).await;
    let (status, _) = get_narinfo(&url, &path.hash).await;
    assert_eq!(status, 200);
    let (status, _) = get_narinfo(&url, &nix32(&[1u8; 20])).await;
    assert_eq!(status, 404);

    let text = server.metrics_text().await;
    assert!(
        sum_metric(&text, "stowix_server_http_requests_total") >= requests + 4.0,
        "http_requests_total did not count 4 requests:\n{text}"
    );
    assert!(
        sum_metric(&text, "stowix_server_http_requests_total{status=\"404\"}") > not_found,
        "no 404 counted:\n{text}"
    );
    assert!(
        sum_metric(&text, "stowix_server_http_request_duration_seconds_count") >= durations + 4.0,
        "request durations not recorded:\n{text}"
    );
    assert!(
        sum_metric(&text, "stowix_server_upload_received_bytes_total")
            >= received + file.len() as f64,
        "upload_received_bytes_total did not grow by {}:\n{text}",
        file.len()
    );
    assert_eq!(
        sum_metric(&text, "stowix_server_nars_stored_total"),
        stored + 1.0,
        "nars_stored_total:\n{text}"
    );
    assert_eq!(
        sum_metric(&text, "stowix_server_narinfos_published_total"),
        published + 1.0,
        "narinfos_published_total:\n{text}"
    );
    // Labels stay low-cardinality: no store path or hash in any series.
    assert!(
        !text.contains(&path.hash),
        "a hash part appears in /metrics:\n{text}"
    );
}
