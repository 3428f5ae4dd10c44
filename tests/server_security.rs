//! Hostile requests against the real `stowix serve` (issue 5, server side): oversized bodies,
//! chunk offsets that skip or overlap, declared sizes that lie, hash parts that are not
//! nixbase32, path traversal in every name taken from a request, HTTP header abuse, token
//! guessing, and where tokens must never show up (log, metrics, database file).
//!
//! docs/security.md maps each claim of the threat model to the test here that shows it. NARs
//! are built from temp trees with `nix::nar::dump_path`, and store paths are made up (the
//! server never looks at a local store), so these tests need no Nix.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rand::Rng as _;
use stowix::api::{self, codes};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `/nix/store/<32 random nixbase32 characters>-<name>`.
fn fake_store_path(name: &str) -> String {
    const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut rng = rand::thread_rng();
    let hash: String = (0..32)
        .map(|_| NIX32[rng.gen_range(0..32)] as char)
        .collect();
    format!("/nix/store/{hash}-{name}")
}

/// A path whose NAR is a regular file holding `contents` (random bytes appended, so every
/// test has its own NAR hash), ready for the push helpers of `common`.
fn made_up_path(name: &str, contents: &[u8]) -> LocalPath {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    let mut data = contents.to_vec();
    data.extend(nonce().bytes());
    std::fs::write(&file, &data).unwrap();
    let mut nar = Vec::new();
    stowix::nix::nar::dump_path(&file, &mut nar).unwrap();
    let path = fake_store_path(name);
    LocalPath {
        hash: hash_part(&path).to_string(),
        path,
        nar_hash: sha256_nix32(&nar),
        nar,
        references: Vec::new(),
        deriver: None,
        ca: None,
    }
}

/// `len` bytes that xz cannot shrink, so a compressed NAR has a predictable size.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut rng = rand::thread_rng();
    (0..len).map(|_| rng.gen()).collect()
}

/// A fresh server with a public repository and a push token: (server, repo, token, repo url).
fn server_with_repo(config: Option<&str>, prefix: &str) -> (TestServer, String, String, String) {
    let server = match config {
        Some(toml) => TestServer::start_with_config(toml),
        None => TestServer::start(),
    };
    let repo = unique_name(prefix);
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    (server, repo, token, url)
}

/// Writes `request` on a fresh connection (then closes the sending side when `close_write`),
/// and returns the status and body of the answer, or `None` when the server closed the
/// connection without answering. Blocking: for requests no HTTP client would send.
fn raw_exchange(addr: &str, request: &[u8], close_write: bool) -> Option<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).expect("connect to server");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The server may answer and close before reading everything we send.
    let _ = stream.write_all(request);
    if close_write {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut answer = Vec::new();
    let started = Instant::now();
    loop {
        let mut buf = [0u8; 8192];
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the answer after {:?}: {e}", started.elapsed()),
        }
        // One answer is enough: the server may keep the connection open.
        if let Some(end) = complete_response_len(&answer) {
            answer.truncate(end);
            break;
        }
    }
    if answer.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body_start = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |p| p + 4);
    Some((status, answer[body_start..].to_vec()))
}

/// The length of the first complete response in `data` (head + Content-Length body).
fn complete_response_len(data: &[u8]) -> Option<usize> {
    let head_end = data.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())?;
    (data.len() >= head_end + len).then_some(head_end + len)
}

/// A request head with `Connection: close` and the given extra header lines (raw bytes).
fn head(method: &str, target: &str, addr: &str, extra: &[&[u8]]) -> Vec<u8> {
    let mut out =
        format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n").into_bytes();
    for line in extra {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn json_code(body: &[u8]) -> String {
    serde_json::from_slice::<api::ApiError>(body)
        .map(|e| e.code)
        .unwrap_or_else(|_| format!("<not an ApiError: {:?}>", String::from_utf8_lossy(body)))
}

async fn upload_offset(url: &str, token: &str, id: &str) -> u64 {
    get_upload(url, token, id).await.offset
}

/// Files of the data dir, without SQLite's journal files (which come and go by themselves).
fn data_files(dir: &Path) -> Vec<std::path::PathBuf> {
    list_tree(dir)
        .into_iter()
        .filter(|p| !p.to_string_lossy().starts_with("stowix.db"))
        .collect()
}

/// The server still answers: a health check succeeds.
async fn assert_alive(server: &TestServer) {
    let resp = http()
        .get(format!("{}/healthz", server.url()))
        .send()
        .await
        .expect("server still answers");
    assert_eq!(resp.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Body sizes
// ---------------------------------------------------------------------------------------------

const SMALL_LIMITS: &str = "max_chunk_bytes = 4096\nmax_single_upload_bytes = 65536\n";

/// Why `resp` is not a refusal of an oversized body (413 `payload_too_large` as an
/// `ApiError`, or the connection closed while the body was still being sent), if it is not.
async fn not_too_large(resp: reqwest::Result<reqwest::Response>) -> Option<String> {
    match resp {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            let code = json_code(body.as_bytes());
            (status != 413 || code != codes::PAYLOAD_TOO_LARGE).then(|| format!("{status} {code}"))
        }
        Err(e) if !e.is_timeout() && (e.is_request() || e.is_body()) => None,
        Err(e) => Some(format!("transport error {e}")),
    }
}

#[tokio::test]
async fn oversized_json_and_narinfo_bodies_get_413() {
    let (server, _repo, token, url) = server_with_repo(None, "big-json");
    let mut failures = Vec::new();
    // Past the 64 MiB JSON limit: a presence query and a publication of one huge string.
    let huge = "x".repeat(65 << 20);
    for route in ["presence", "narinfos"] {
        let body = if route == "presence" {
            format!("{{\"paths\":[{{\"hash\":\"{huge}\",\"nar_hash\":\"\"}}]}}")
        } else {
            format!("{{\"narinfos\":[{{\"store_path\":\"{huge}\"}}]}}")
        };
        let resp = http()
            .post(api_url(&url, route))
            .header("Authorization", bearer(&token))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await;
        if let Some(why) = not_too_large(resp).await {
            failures.push(format!("POST {route} over the JSON limit: {why}"));
        }
    }
    // A narinfo PUT over 1 MiB (well-formed up to the padding, so only the size is wrong).
    let path = made_up_path("big-narinfo", b"x");
    let narinfo = format!(
        "StorePath: {}\nURL: nar/x.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: \nX-Padding: {}\n",
        path.path,
        path.nar_hash,
        path.nar_size(),
        "p".repeat((1 << 20) + 1)
    );
    let resp = http()
        .put(format!("{url}/{}.narinfo", path.hash))
        .header("Authorization", bearer(&token))
        .header("Content-Type", "text/x-nix-narinfo")
        .body(narinfo)
        .send()
        .await;
    if let Some(why) = not_too_large(resp).await {
        failures.push(format!("narinfo PUT over 1 MiB: {why}"));
    }
    assert!(
        failures.is_empty(),
        "oversized bodies not refused with a 413 ApiError:\n{}",
        failures.join("\n")
    );
    let (status, _) = get_narinfo(&url, &path.hash).await;
    assert_eq!(status, 404, "the oversized narinfo was published");
    assert_alive(&server).await;
}

#[tokio::test]
async fn oversized_uploads_get_413_and_the_offset_does_not_move() {
    let (server, _repo, token, url) = server_with_repo(Some(SMALL_LIMITS), "big-up");
    let info = repo_info(&url, &token).await;
    assert_eq!(info.limits.max_chunk_bytes, 4096, "config not applied");

    let path = made_up_path("big-up", &random_bytes(20_000));
    let (file, params) = path.xz_upload();
    assert!(file.len() > 3 * 4096);
    let id = create_upload(&url, &token, &xz_create_upload(&path))
        .await
        .upload_id;
    patch_rest(&url, &token, &id, &file[..4096], 0, 4096).await;
    assert_eq!(upload_offset(&url, &token, &id).await, 4096);

    // One byte over max_chunk_bytes, and far over it.
    for end in [4096 + 4097, file.len()] {
        let resp = http()
            .patch(api_url(&url, &format!("uploads/{id}")))
            .header("Authorization", bearer(&token))
            .header(api::UPLOAD_OFFSET_HEADER, "4096")
            .body(file[4096..end].to_vec())
            .send()
            .await;
        assert_too_large(resp, &format!("chunk of {} bytes", end - 4096)).await;
        assert_eq!(
            upload_offset(&url, &token, &id).await,
            4096,
            "an oversized chunk moved the offset"
        );
    }
    // The right chunks still work, and the NAR verifies.
    patch_rest(&url, &token, &id, &file, 4096, 4096).await;
    let resp = complete_upload(
        &url,
        &token,
        &id,
        &api::CompleteUpload {
            file_hash: params.file_hash.clone(),
            file_size: params.file_size,
        },
    )
    .await;
    let stored: api::NarStored = parse_ok(resp, "complete after refused chunks").await;
    assert_eq!(stored.file_hash, params.file_hash);

    // Single-request uploads over max_single_upload_bytes: declared, and as PUT (nix copy).
    let big = made_up_path("big-single", &random_bytes(70_000));
    let (big_file, big_params) = big.xz_upload();
    let resp = http()
        .post(api_url(&url, "nars"))
        .query(&big_params)
        .header("Authorization", bearer(&token))
        .body(big_file.clone())
        .send()
        .await;
    assert_too_large(resp, "POST nars over max_single_upload_bytes").await;
    let resp = http()
        .put(format!(
            "{url}/nar/{}.nar.xz",
            big_params.file_hash.trim_start_matches("sha256:")
        ))
        .header("Authorization", bearer(&token))
        .body(big_file.clone())
        .send()
        .await;
    assert_too_large(resp, "PUT nar over max_single_upload_bytes").await;
    assert!(!dir_contains_file_with(server.data_dir(), &big_file));
    assert!(
        list_tree(&server.data_dir().join("tmp")).is_empty(),
        "staged files left behind"
    );
}

// ---------------------------------------------------------------------------------------------
// Offsets and sizes that lie
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn chunk_offsets_that_skip_or_overlap_get_409_with_the_servers_offset() {
    let (_server, _repo, token, url) = server_with_repo(None, "offsets");
    let path = made_up_path("offsets", &random_bytes(8000));
    let (file, params) = path.xz_upload();
    let id = create_upload(&url, &token, &xz_create_upload(&path))
        .await
        .upload_id;
    patch_rest(&url, &token, &id, &file[..1000], 0, 1000).await;

    // Ahead (a gap), behind (an overlap), from the start, one past, and the end of the file.
    for declared in [2000, 999, 500, 0, 1001, file.len() as u64, u64::MAX] {
        let resp = patch_chunk(&url, &token, &id, declared, file[1000..1500].to_vec()).await;
        let (status, err) = api_error(resp).await;
        assert_eq!(
            (status, err.code.as_str(), err.offset),
            (409, codes::OFFSET_MISMATCH, Some(1000)),
            "chunk declared at {declared}: {err:?}"
        );
        assert_eq!(upload_offset(&url, &token, &id).await, 1000);
    }
    // The server's offset works, and the result is byte-identical.
    patch_rest(&url, &token, &id, &file, 1000, 3000).await;
    let resp = complete_upload(
        &url,
        &token,
        &id,
        &api::CompleteUpload {
            file_hash: params.file_hash.clone(),
            file_size: params.file_size,
        },
    )
    .await;
    let stored: api::NarStored = parse_ok(resp, "complete").await;
    let resp = http()
        .get(format!("{url}/{}", stored.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), file.as_slice());
}

#[tokio::test]
async fn uploads_that_lie_about_their_size_are_refused_and_store_nothing() {
    let (server, _repo, token, url) = server_with_repo(None, "sizes");
    let path = made_up_path("sizes", &random_bytes(3000));
    let (file, params) = path.xz_upload();

    // Single request: the body is longer, or shorter, than the declared file_size.
    for declared in [
        params.file_size - 1,
        params.file_size / 2,
        1,
        params.file_size + 1,
        params.file_size * 2,
    ] {
        let mut lying = params.clone();
        lying.file_size = declared;
        let resp = post_nar(&url, &token, &lying, file.clone()).await;
        let (status, err) = api_error(resp).await;
        assert_eq!(
            (status, err.code.as_str()),
            (422, codes::FILE_SIZE_MISMATCH),
            "file_size {declared} for {} bytes: {err:?}",
            file.len()
        );
    }
    // NarSize that does not match what the bytes decompress to.
    let mut lying = params.clone();
    lying.nar_size += 8;
    let (status, err) = api_error(post_nar(&url, &token, &lying, file.clone()).await).await;
    assert_eq!(
        (status, err.code.as_str()),
        (422, codes::NAR_SIZE_MISMATCH),
        "{err:?}"
    );
    let presence = presence(&url, &token, &[&path]).await;
    assert_eq!(
        presence.missing,
        vec![path.hash.clone()],
        "something was stored"
    );
    assert!(!dir_contains_file_with(server.data_dir(), &file));
    assert!(list_tree(&server.data_dir().join("tmp")).is_empty());

    // Chunked: completion declaring more than the server holds is a 409 that names the held
    // offset ("send the rest") and keeps the upload.
    let id = create_upload(&url, &token, &xz_create_upload(&path))
        .await
        .upload_id;
    patch_rest(&url, &token, &id, &file, 0, 1024).await;
    for declared in [params.file_size + 1, u64::MAX] {
        let resp = complete_upload(
            &url,
            &token,
            &id,
            &api::CompleteUpload {
                file_hash: params.file_hash.clone(),
                file_size: declared,
            },
        )
        .await;
        let (status, err) = api_error(resp).await;
        assert_eq!(
            (status, err.code.as_str(), err.offset),
            (409, codes::OFFSET_MISMATCH, Some(params.file_size)),
            "complete declaring {declared}: {err:?}"
        );
    }
    assert_eq!(upload_offset(&url, &token, &id).await, params.file_size);
    // Declaring less than the server holds can never verify (the server holds bytes past the
    // client's end): 422 and the upload is discarded, so nothing half-made lingers.
    for declared in [params.file_size - 1, 0] {
        let id = create_upload(&url, &token, &xz_create_upload(&path))
            .await
            .upload_id;
        let held = upload_offset(&url, &token, &id).await;
        patch_rest(&url, &token, &id, &file, held, 1024).await;
        let resp = complete_upload(
            &url,
            &token,
            &id,
            &api::CompleteUpload {
                file_hash: params.file_hash.clone(),
                file_size: declared,
            },
        )
        .await;
        let (status, err) = api_error(resp).await;
        assert_eq!(
            (status, err.code.as_str()),
            (422, codes::FILE_SIZE_MISMATCH),
            "complete declaring {declared}: {err:?}"
        );
        let state = create_upload(&url, &token, &xz_create_upload(&path)).await;
        assert_ne!(
            state.upload_id, id,
            "the discarded upload must not be resumed"
        );
        assert_eq!(state.offset, 0);
    }
    let id = create_upload(&url, &token, &xz_create_upload(&path))
        .await
        .upload_id;
    patch_rest(&url, &token, &id, &file, 0, 1024).await;
    let resp = complete_upload(
        &url,
        &token,
        &id,
        &api::CompleteUpload {
            file_hash: params.file_hash.clone(),
            file_size: params.file_size,
        },
    )
    .await;
    let _: api::NarStored = parse_ok(resp, "complete with the true size").await;
}

#[tokio::test]
async fn content_length_lies_store_nothing() {
    let (server, repo, token, url) = server_with_repo(None, "cl-lies");
    let addr = server.addr();
    let path = made_up_path("cl-lies", &random_bytes(2000));
    let (file, params) = path.xz_upload();
    let query = serde_urlencoded_query(&params);
    let target = format!("/{repo}/api/v1/nars?{query}");
    let auth = format!("Authorization: Bearer {token}");

    // Announces more than it sends, then stops sending.
    let mut request = head(
        "POST",
        &target,
        &addr,
        &[
            auth.as_bytes(),
            format!("Content-Length: {}", file.len() + 100).as_bytes(),
        ],
    );
    request.extend_from_slice(&file);
    let answer = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || raw_exchange(&addr, &request, true)
    })
    .await
    .unwrap();
    if let Some((status, body)) = &answer {
        assert!(
            (400..500).contains(status),
            "short body answered {status}: {}",
            String::from_utf8_lossy(body)
        );
    }
    // Announces less than it sends: the body is cut at Content-Length, which is not the file.
    let mut request = head(
        "POST",
        &target,
        &addr,
        &[
            auth.as_bytes(),
            format!("Content-Length: {}", file.len() - 10).as_bytes(),
        ],
    );
    request.extend_from_slice(&file);
    let answer = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || raw_exchange(&addr, &request, false)
    })
    .await
    .unwrap();
    let (status, body) = answer.expect("an answer to a body shorter than its file");
    assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
    // Malformed, negative and conflicting Content-Length headers are refused by the HTTP layer.
    for lines in [
        vec!["Content-Length: abc".to_string()],
        vec!["Content-Length: -1".to_string()],
        vec!["Content-Length: 18446744073709551616".to_string()],
        vec![
            format!("Content-Length: {}", file.len()),
            "Content-Length: 5".to_string(),
        ],
    ] {
        let mut extra: Vec<&[u8]> = vec![auth.as_bytes()];
        extra.extend(lines.iter().map(|l| l.as_bytes()));
        let mut request = head("POST", &target, &addr, &extra);
        request.extend_from_slice(&file);
        let answer = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || raw_exchange(&addr, &request, true)
        })
        .await
        .unwrap();
        if let Some((status, _)) = answer {
            assert_eq!(status, 400, "{lines:?}");
        }
    }
    let presence = presence(&url, &token, &[&path]).await;
    assert_eq!(
        presence.missing,
        vec![path.hash.clone()],
        "a lying upload was stored"
    );
    assert!(!dir_contains_file_with(server.data_dir(), &file));
    assert_alive(&server).await;
}

/// `NarUploadParams` as a query string (what reqwest's `.query` would send).
fn serde_urlencoded_query(params: &api::NarUploadParams) -> String {
    let enc = |s: &str| s.replace(':', "%3A");
    format!(
        "nar_hash={}&nar_size={}&compression={}&file_hash={}&file_size={}",
        enc(&params.nar_hash),
        params.nar_size,
        params.compression,
        enc(&params.file_hash),
        params.file_size
    )
}

// ---------------------------------------------------------------------------------------------
// Hash parts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn hash_parts_that_are_not_nixbase32_get_400() {
    let (server, _repo, token, url) = server_with_repo(None, "hashes");
    let path = made_up_path("hashes", b"published");
    push_paths(&url, &token, &[&path]).await;
    let good = path.hash.clone();
    // `e`, `o`, `u` and `t` are not in the nixbase32 alphabet; nor is upper case.
    let mut bad: Vec<String> = ['e', 'o', 'u', 't']
        .iter()
        .map(|c| format!("{c}{}", &good[1..]))
        .collect();
    bad.push(good.to_ascii_uppercase());
    bad.push(good[..31].to_string());
    bad.push(format!("{good}0"));
    bad.push(format!("{}_", &good[..31]));
    bad.push(format!("{}%20", &good[..31]));
    let narinfo_text = |hash: &str| {
        format!(
            "StorePath: /nix/store/{hash}-x\nURL: nar/x.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: \n",
            path.nar_hash,
            path.nar_size()
        )
    };
    let mut failures = Vec::new();
    for hash in &bad {
        let target = format!("{url}/{hash}.narinfo");
        for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
            let resp = http()
                .request(method.clone(), &target)
                .send()
                .await
                .unwrap();
            if resp.status() != 400 {
                failures.push(format!("{method} {hash}.narinfo: {}", resp.status()));
            }
        }
        let resp = http()
            .put(&target)
            .header("Authorization", bearer(&token))
            .body(narinfo_text(hash))
            .send()
            .await
            .unwrap();
        let (status, err) = api_error(resp).await;
        if (status, err.code.as_str()) != (400, codes::INVALID_HASH_PART) {
            failures.push(format!("PUT {hash}.narinfo: {status} {err:?}"));
        }
        let resp = http()
            .post(api_url(&url, "presence"))
            .header("Authorization", bearer(&token))
            .json(&api::PresenceRequest {
                paths: vec![
                    path.presence_query(),
                    api::PresenceQuery {
                        hash: hash.clone(),
                        nar_hash: path.nar_hash.clone(),
                    },
                ],
            })
            .send()
            .await
            .unwrap();
        let (status, err) = api_error(resp).await;
        if (status, err.code.as_str()) != (400, codes::INVALID_HASH_PART) {
            failures.push(format!("presence of {hash:?}: {status} {err:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "not refused with 400:\n{}",
        failures.join("\n")
    );
    // The valid form of the same hash still works.
    let (status, _) = get_narinfo(&url, &good).await;
    assert_eq!(status, 200);
    assert_alive(&server).await;
}

// ---------------------------------------------------------------------------------------------
// Path traversal
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn traversal_in_any_request_name_is_4xx_and_creates_no_file() {
    let (server, repo, token, url) = server_with_repo(None, "trav");
    let addr = server.addr();
    let path = made_up_path("trav", b"bait");
    push_paths(&url, &token, &[&path]).await;
    let id = create_upload(
        &url,
        &token,
        &xz_create_upload(&made_up_path("trav-up", b"x")),
    )
    .await
    .upload_id;
    let marker = format!("pwn{}", nonce());
    let data_before = data_files(server.data_dir());
    let root_before = list_tree(server.root());
    let tmp_before: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains(&marker))
        .collect();
    assert!(tmp_before.is_empty());

    let m = &marker;
    let long = "a".repeat(10_000);
    // Every shape of a hostile name, to put in each place the server reads a name from.
    let names: Vec<String> = vec![
        "..".into(),
        "%2e%2e".into(),
        "%2E%2E".into(),
        format!("..%2f..%2f{m}"),
        format!("%2e%2e%2f%2e%2e%2f{m}"),
        format!("..%5c..%5c{m}"),
        format!("..\\..\\{m}"),
        format!("{m}%00"),
        format!("%00{m}"),
        format!("%252e%252e%252f{m}"),
        format!("%2ftmp%2f{m}"),
        format!("{m}%2f..%2f..%2f{m}"),
        long.clone(),
        format!("{long}%2f{m}"),
    ];
    let auth = format!("Authorization: Bearer {token}");
    let mut requests: Vec<(String, String)> = Vec::new();
    for n in &names {
        let h = &path.hash;
        // Repository name.
        for route in ["nix-cache-info", &format!("{h}.narinfo"), "api/v1/info"] {
            requests.push(("GET".into(), format!("/{n}/{route}")));
        }
        requests.push(("PUT".into(), format!("/{n}/{h}.narinfo")));
        requests.push(("POST".into(), format!("/{n}/api/v1/uploads")));
        // Narinfo name, NAR file name, upload id.
        for suffix in [".narinfo", ""] {
            requests.push(("GET".into(), format!("/{repo}/{n}{suffix}")));
            requests.push(("PUT".into(), format!("/{repo}/{n}{suffix}")));
        }
        for suffix in [".nar.xz", ".nar.zst", ".nar"] {
            requests.push(("GET".into(), format!("/{repo}/nar/{n}{suffix}")));
            requests.push(("PUT".into(), format!("/{repo}/nar/{n}{suffix}")));
        }
        for method in ["GET", "PATCH", "DELETE"] {
            requests.push((method.into(), format!("/{repo}/api/v1/uploads/{n}")));
        }
        requests.push((
            "POST".into(),
            format!("/{repo}/api/v1/uploads/{n}/complete"),
        ));
        requests.push(("PATCH".into(), format!("/{repo}/api/v1/uploads/{id}{n}")));
    }
    let body = format!("{marker}\n").into_bytes();
    let mut failures = Vec::new();
    let mut answered = 0;
    for (method, target) in &requests {
        let request = {
            let mut r = head(
                method,
                target,
                &addr,
                &[
                    auth.as_bytes(),
                    b"Upload-Offset: 0",
                    b"Content-Type: application/json",
                    format!("Content-Length: {}", body.len()).as_bytes(),
                ],
            );
            r.extend_from_slice(&body);
            r
        };
        let answer = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || raw_exchange(&addr, &request, false)
        })
        .await
        .unwrap();
        match answer {
            Some((status, _)) if (400..500).contains(&status) => answered += 1,
            // Closing the connection on an unparsable request line is a refusal too.
            None => {}
            Some((status, body)) => failures.push(format!(
                "{method} {}: {status} {}",
                target.chars().take(120).collect::<String>(),
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile requests not refused with 4xx:\n{}",
        failures.len(),
        requests.len(),
        failures.join("\n")
    );
    // Most are answered by the routes themselves (not just dropped by the HTTP layer), so the
    // name checks of every route are exercised.
    assert!(
        answered * 4 > requests.len() * 3,
        "only {answered} of {} requests got an answer",
        requests.len()
    );
    assert_eq!(
        data_files(server.data_dir()),
        data_before,
        "the data dir changed"
    );
    assert_eq!(
        list_tree(server.root()),
        root_before,
        "files appeared next to the data dir"
    );
    let tmp_after: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains(&marker))
        .collect();
    assert!(
        tmp_after.is_empty(),
        "created in the temp dir: {tmp_after:?}"
    );
    assert!(
        !dir_contains_file_with(server.root(), &body),
        "a hostile body was stored"
    );
    let (status, _) = get_narinfo(&url, &path.hash).await;
    assert_eq!(status, 200);
}

// ---------------------------------------------------------------------------------------------
// Header abuse
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn huge_many_and_non_utf8_authorization_headers_are_refused() {
    let (server, repo, token, _url) = server_with_repo(None, "headers");
    let addr = server.addr();
    let target = format!("/{repo}/api/v1/info");
    let exchange = |request: Vec<u8>| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || raw_exchange(&addr, &request, false))
    };
    let good = format!("Authorization: Bearer {token}");
    let junk = format!(
        "Authorization: Bearer stx_live_{}_{}",
        "a".repeat(26),
        "B".repeat(24)
    );

    // The right token works over this raw path (so the refusals below are about the headers).
    let (status, _) = exchange(head("GET", &target, &addr, &[good.as_bytes()]))
        .await
        .unwrap()
        .expect("an answer");
    assert_eq!(status, 200);

    let mut failures = Vec::new();
    // Huge: 64 KiB and 1 MiB Authorization values.
    for size in [64 << 10, 1 << 20] {
        let line = format!("Authorization: Bearer {}", "A".repeat(size));
        match exchange(head("GET", &target, &addr, &[line.as_bytes()]))
            .await
            .unwrap()
        {
            Some((status, _)) if (400..500).contains(&status) => {}
            None => {}
            Some((status, body)) => failures.push(format!(
                "{size}-byte Authorization: {status} {}",
                json_code(&body)
            )),
        }
    }
    // Many: the right token among other credentials is ambiguous, and must not be taken.
    for lines in [
        vec![good.clone(), junk.clone()],
        vec![junk.clone(), good.clone()],
        vec![good.clone(); 2],
        std::iter::repeat_n(junk.clone(), 50).collect::<Vec<_>>(),
        std::iter::repeat_n(junk.clone(), 500).collect::<Vec<_>>(),
    ] {
        let extra: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        let what = format!(
            "{} Authorization headers ({} right)",
            lines.len(),
            lines.iter().filter(|l| **l == good).count()
        );
        match exchange(head("GET", &target, &addr, &extra)).await.unwrap() {
            Some((status, _)) if (400..500).contains(&status) => {}
            // The same credentials twice are not ambiguous.
            Some((200, _)) if lines.iter().all(|l| *l == good) => {}
            None => {}
            Some((status, body)) => failures.push(format!("{what}: {status} {}", json_code(&body))),
        }
    }
    // Non-UTF-8 bytes in the credentials: malformed, not a crash or a pass.
    for value in [&b"Bearer \xff\xfe\xfd"[..], b"Basic \xc3\x28", b"\x80\x81"] {
        let mut line = b"Authorization: ".to_vec();
        line.extend_from_slice(value);
        match exchange(head("GET", &target, &addr, &[&line]))
            .await
            .unwrap()
        {
            Some((401, body)) if json_code(&body) == codes::MALFORMED_TOKEN => {}
            Some((400, _)) | None => {}
            Some((status, body)) => failures.push(format!(
                "Authorization {value:?}: {status} {}",
                json_code(&body)
            )),
        }
    }
    // Non-UTF-8 bytes in an unrelated header do not get in the way of a good request.
    match exchange(head(
        "GET",
        &target,
        &addr,
        &[good.as_bytes(), b"X-Junk: \xff\xfe"],
    ))
    .await
    .unwrap()
    {
        Some((200, _)) | Some((400, _)) => {}
        other => failures.push(format!("non-UTF-8 X-Junk: {:?}", other.map(|a| a.0))),
    }
    assert!(
        failures.is_empty(),
        "header abuse not refused:\n{}",
        failures.join("\n")
    );
    assert_alive(&server).await;
}

#[tokio::test]
async fn upload_offset_headers_that_are_not_a_u64_get_400_and_move_nothing() {
    let (server, repo, token, url) = server_with_repo(None, "offset-hdr");
    let addr = server.addr();
    let path = made_up_path("offset-hdr", &random_bytes(3000));
    let (file, _) = path.xz_upload();
    let id = create_upload(&url, &token, &xz_create_upload(&path))
        .await
        .upload_id;
    patch_rest(&url, &token, &id, &file[..500], 0, 500).await;
    let target = format!("/{repo}/api/v1/uploads/{id}");
    let auth = format!("Authorization: Bearer {token}");
    let chunk = file[500..1000].to_vec();
    let mut failures = Vec::new();
    let values: Vec<&[u8]> = vec![
        b"-1",
        b"-500",
        b"abc",
        b"500abc",
        b"5 00",
        b"0x1f4",
        b"1e3",
        b"500.0",
        b"18446744073709551616",
        b"99999999999999999999999999999",
        b"",
        b"\xff\xfe",
    ];
    for value in values.iter().copied() {
        let mut line = b"Upload-Offset: ".to_vec();
        line.extend_from_slice(value);
        let mut request = head(
            "PATCH",
            &target,
            &addr,
            &[
                auth.as_bytes(),
                &line,
                format!("Content-Length: {}", chunk.len()).as_bytes(),
            ],
        );
        request.extend_from_slice(&chunk);
        let answer = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || raw_exchange(&addr, &request, false)
        })
        .await
        .unwrap();
        match answer {
            Some((400, _)) => {}
            other => failures.push(format!(
                "Upload-Offset {:?}: {:?}",
                String::from_utf8_lossy(value),
                other.map(|(s, b)| (s, json_code(&b)))
            )),
        }
        assert_eq!(
            upload_offset(&url, &token, &id).await,
            500,
            "{value:?} moved the offset"
        );
    }
    // Two Upload-Offset headers, one right: ambiguous, so not taken.
    let mut request = head(
        "PATCH",
        &target,
        &addr,
        &[
            auth.as_bytes(),
            b"Upload-Offset: 500",
            b"Upload-Offset: 0",
            format!("Content-Length: {}", chunk.len()).as_bytes(),
        ],
    );
    request.extend_from_slice(&chunk);
    let answer = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || raw_exchange(&addr, &request, false)
    })
    .await
    .unwrap();
    match answer {
        Some((status, _)) if (400..500).contains(&status) => {}
        other => failures.push(format!(
            "two Upload-Offset headers: {:?}",
            other.map(|(s, b)| (s, json_code(&b)))
        )),
    }
    assert!(
        failures.is_empty(),
        "bad Upload-Offset accepted:\n{}",
        failures.join("\n")
    );
    assert_eq!(upload_offset(&url, &token, &id).await, 500);
    // The right offset still works.
    patch_rest(&url, &token, &id, &file, 500, 1000).await;
}

#[tokio::test]
async fn stalled_bodies_on_json_and_narinfo_routes_are_cut_off() {
    // The idle timeout protects the NAR routes; a client that announces a JSON or narinfo
    // body and never sends it must not hold a connection (and a handler) forever either, and
    // one without credentials must be turned away without the server waiting for its body.
    let (server, repo, token, _url) =
        server_with_repo(Some("upload_idle_timeout_secs = 2\n"), "stall");
    let addr = server.addr();
    let hash = hash_part(&fake_store_path("stall")).to_string();
    let routes = [
        ("POST", format!("/{repo}/api/v1/presence")),
        ("POST", format!("/{repo}/api/v1/narinfos")),
        ("POST", format!("/{repo}/api/v1/uploads")),
        ("PUT", format!("/{repo}/{hash}.narinfo")),
    ];
    let auth = format!("Authorization: Bearer {token}");
    let mut waits = Vec::new();
    for (method, target) in &routes {
        for with_token in [true, false] {
            let mut extra: Vec<&[u8]> =
                vec![b"Content-Type: application/json", b"Content-Length: 100000"];
            if with_token {
                extra.push(auth.as_bytes());
            }
            let mut request = head(method, target, &addr, &extra);
            request.extend_from_slice(b"{\"paths\": [");
            let addr = addr.clone();
            let what = format!(
                "{method} {target} {}",
                if with_token {
                    "with a token"
                } else {
                    "without a token"
                }
            );
            // All at once, so the test takes one timeout, not eight.
            waits.push(tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let mut stream = TcpStream::connect(&addr).unwrap();
                stream.write_all(&request).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(12)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                // An answer or a closed connection ends the wait; a read timeout is a stall.
                let outcome = match stream.read(&mut buf) {
                    Ok(n) => Ok(String::from_utf8_lossy(&buf[..n.min(40)]).to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        Ok("reset".to_string())
                    }
                    Err(e) => Err(e),
                };
                (what, started.elapsed(), outcome)
            }));
        }
    }
    let mut stalled = Vec::new();
    for wait in waits {
        let (what, waited, outcome) = wait.await.unwrap();
        match outcome {
            Ok(_) if waited < Duration::from_secs(10) => {}
            other => stalled.push(format!("{what}: no answer after {waited:?} ({other:?})")),
        }
    }
    assert!(
        stalled.is_empty(),
        "stalled bodies hold connections:\n{}",
        stalled.join("\n")
    );
    assert_alive(&server).await;
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn token_guessing_is_rate_limited_per_address_even_for_the_right_token() {
    let (_server, _repo, token, url) =
        server_with_repo(Some("auth_failures_per_minute = 5\n"), "brute");
    let id = token_id(&token).unwrap();
    let guesses = [
        format!("stx_live_{id}_{}", "A".repeat(24)),
        format!("stx_live_{id}_{}", "B".repeat(24)),
        "stx_live_garbage".to_string(),
        format!("stx_live_{}_{}", "z".repeat(26), "C".repeat(24)),
        format!("stx_live_{id}_{}", "D".repeat(24)),
    ];
    for guess in &guesses {
        let resp = http()
            .get(api_url(&url, "info"))
            .header("Authorization", bearer(guess))
            .send()
            .await
            .unwrap();
        let (status, err) = api_error(resp).await;
        assert_eq!(status, 401, "guess {guess}: {err:?}");
    }
    // The sixth guess, and then the right token, from this address: 429 with Retry-After.
    for (what, credential) in [
        (
            "sixth guess",
            bearer(&format!("stx_live_{id}_{}", "E".repeat(24))),
        ),
        ("right token", bearer(&token)),
        ("right token as Basic", basic(&token)),
    ] {
        let resp = http()
            .post(api_url(&url, "presence"))
            .header("Authorization", credential)
            .json(&api::PresenceRequest { paths: vec![] })
            .send()
            .await
            .unwrap();
        let retry_after: Option<u64> = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let (status, err) = api_error(resp).await;
        assert_eq!(
            (status, err.code.as_str()),
            (429, codes::TOO_MANY_ATTEMPTS),
            "{what}: {err:?}"
        );
        assert!(
            retry_after.is_some_and(|s| (1..=60).contains(&s)),
            "{what}: Retry-After {retry_after:?}"
        );
    }
    // The budget is per client address: another loopback address is not locked out.
    let other = reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let resp = other
        .get(api_url(&url, "info"))
        .header("Authorization", bearer(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "one address locked out everyone");
    // Public reads without credentials do not depend on the budget.
    let (status, _) = get_narinfo(&url, &"0".repeat(32)).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn tokens_never_reach_the_log_or_the_metrics() {
    let (server, repo, token, url) = server_with_repo(None, "logs");
    let read = server.create_token(&repo, "read");
    let id = token_id(&token).unwrap().to_string();
    let wrong_secret = format!("stx_live_{id}_{}", "W".repeat(24));
    let path = made_up_path("logs", b"logged?");
    // Successful requests with each token, as Bearer and Basic.
    push_paths(&url, &token, &[&path]).await;
    for credential in [bearer(&read), basic(&read), basic(&token)] {
        let resp = http()
            .get(api_url(&url, "info"))
            .header("Authorization", credential)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // Failed ones: a wrong secret for a real id, the right token on another repository, a
    // token in the URL, and a malformed header.
    for (target, credential) in [
        (api_url(&url, "info"), bearer(&wrong_secret)),
        (
            api_url(&server.repo_url("no-such-repo"), "info"),
            bearer(&token),
        ),
        (
            format!("{}?token={token}", api_url(&url, "info")),
            "Bearer".to_string(),
        ),
        (api_url(&url, "info"), format!("Digest {token}")),
    ] {
        let resp = http()
            .get(&target)
            .header("Authorization", credential)
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_client_error(),
            "{target}: {}",
            resp.status()
        );
    }
    let metrics = server.metrics_text().await;
    let log = server.log_text();
    assert!(
        log.contains("stowix serve started"),
        "the log is not captured: {log}"
    );
    let secret = |t: &str| t.rsplit('_').next().unwrap().to_string();
    for needle in [
        token.clone(),
        read.clone(),
        secret(&token),
        secret(&read),
        secret(&wrong_secret),
        basic(&token).trim_start_matches("Basic ").to_string(),
    ] {
        assert!(
            !log.contains(&needle),
            "the server log holds {needle}:\n{log}"
        );
        assert!(!metrics.contains(&needle), "/metrics holds {needle}");
    }
}

#[tokio::test]
async fn token_secrets_are_stored_only_as_sha256() {
    let (server, repo, token, url) = server_with_repo(None, "at-rest");
    let read = server.create_token(&repo, "read");
    // Use the tokens, so the server has had them in hand too.
    assert_eq!(
        repo_info(&url, &token).await.token_scope.as_deref(),
        Some("push")
    );
    assert_eq!(
        repo_info(&url, &read).await.token_scope.as_deref(),
        Some("read")
    );

    let db = server.data_dir().join("stowix.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open stowix.db");
    for t in [&token, &read] {
        let id = token_id(t).unwrap();
        let secret = t.rsplit('_').next().unwrap();
        let stored: Vec<u8> = conn
            .query_row(
                "SELECT secret_sha256 FROM tokens WHERE id = ?1",
                [id],
                |row| row.get(0),
            )
            .expect("the token's row");
        let digest: [u8; 32] = {
            use sha2::Digest as _;
            sha2::Sha256::digest(secret.as_bytes()).into()
        };
        assert_eq!(
            stored, digest,
            "the stored value is not sha256 of the secret"
        );
    }
    drop(conn);
    // No copy of a secret in any file of the data dir (database, journal, anything else).
    for file in list_tree(server.data_dir()) {
        let full = server.data_dir().join(&file);
        if !full.is_file() {
            continue;
        }
        let bytes = std::fs::read(&full).unwrap();
        for t in [&token, &read] {
            let secret = t.rsplit('_').next().unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds the secret of {}",
                file.display(),
                token_id(t).unwrap()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What a push token can and cannot do
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_push_token_cannot_overwrite_mislabel_delete_or_cross_repositories() {
    let (server, _repo, token, url) = server_with_repo(None, "scope");
    let other_repo = unique_name("scope-other");
    server.create_repo(&other_repo, true);
    let other_url = server.repo_url(&other_repo);
    let path = made_up_path("scope", b"original");
    push_paths(&url, &token, &[&path]).await;
    let (_, published) = get_narinfo(&url, &path.hash).await;

    // Republishing the same path with other metadata leaves the narinfo as it was.
    let decoy = made_up_path("decoy", b"other bytes");
    upload_single(&url, &token, &decoy).await;
    let mut entry = path.publish_entry();
    entry.nar_hash = decoy.nar_hash.clone();
    entry.nar_size = decoy.nar_size();
    entry.references = vec![decoy.path.clone()];
    let resp = post_publish(&url, &token, vec![entry]).await;
    let answer: api::PublishResponse = parse_ok(resp, "republish").await;
    assert!(answer.published.is_empty(), "{answer:?}");
    let (_, now) = get_narinfo(&url, &path.hash).await;
    assert_eq!(now, published, "a published narinfo was overwritten");
    // Same through the nix-copy route.
    let stored = upload_single(&url, &token, &decoy).await;
    let text = format!(
        "StorePath: {}\nURL: {}\nCompression: xz\nNarHash: {}\nNarSize: {}\nReferences: \n",
        path.path,
        stored.url,
        decoy.nar_hash,
        decoy.nar_size()
    );
    let resp = http()
        .put(format!("{url}/{}.narinfo", path.hash))
        .header("Authorization", bearer(&token))
        .body(text)
        .send()
        .await
        .unwrap();
    assert!(resp.status().as_u16() < 500, "{}", resp.status());
    let (_, now) = get_narinfo(&url, &path.hash).await;
    assert_eq!(now, published, "a published narinfo was overwritten by PUT");

    // A narinfo whose NarHash is not the stored NAR's is never signed.
    let fresh = made_up_path("fresh", b"fresh");
    let text = format!(
        "StorePath: {}\nURL: {}\nCompression: xz\nNarHash: {}\nNarSize: {}\nReferences: \n",
        fresh.path,
        stored.url,
        fresh.nar_hash,
        decoy.nar_size()
    );
    let resp = http()
        .put(format!("{url}/{}.narinfo", fresh.hash))
        .header("Authorization", bearer(&token))
        .body(text)
        .send()
        .await
        .unwrap();
    let (status, err) = api_error(resp).await;
    assert_eq!(
        (status, err.code.as_str()),
        (422, codes::NAR_HASH_MISMATCH),
        "{err:?}"
    );
    let mut entry = fresh.publish_entry();
    entry.nar_size = decoy.nar_size();
    entry.nar_hash = decoy.nar_hash.clone();
    entry.nar_size += 1;
    let resp = post_publish(&url, &token, vec![entry]).await;
    let answer: api::PublishResponse = parse_ok(resp, "publish with a wrong NarSize").await;
    assert!(answer.published.is_empty(), "{answer:?}");
    assert_eq!(get_narinfo(&url, &fresh.hash).await.0, 404);

    // No delete.
    for target in [
        format!("{url}/{}.narinfo", path.hash),
        format!(
            "{url}/{}",
            published.lines().find(|l| l.starts_with("URL: ")).unwrap()[5..].trim()
        ),
    ] {
        let resp = http()
            .delete(&target)
            .header("Authorization", bearer(&token))
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_client_error(),
            "DELETE {target}: {}",
            resp.status()
        );
    }
    assert_eq!(get_narinfo(&url, &path.hash).await, (200, published));

    // Another repository: neither readable (it is private) nor writable, and to this token
    // it looks absent.
    let resp = http()
        .get(format!("{other_url}/nix-cache-info"))
        .header("Authorization", bearer(&token))
        .send()
        .await
        .unwrap();
    let (status, err) = api_error(resp).await;
    assert_eq!(
        (status, err.code.as_str()),
        (404, codes::NO_SUCH_REPOSITORY)
    );
    let resp = post_nar(&other_url, &token, &path.xz_upload().1, path.xz_upload().0).await;
    let (status, err) = api_error(resp).await;
    assert_eq!(
        (status, err.code.as_str()),
        (404, codes::NO_SUCH_REPOSITORY)
    );
}
