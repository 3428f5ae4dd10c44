//! Request bodies and shared resources under hostile clients, against the real `stowix serve`:
//! anonymous presence bodies (size, trickle, memory), upload slots held by slow uploads of one
//! repository, and what anonymous callers learn about private repositories and `/metrics`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use stowix::api::{self, codes};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A presence query of `n` made-up entries, as JSON.
fn presence_body(n: usize) -> Vec<u8> {
    let paths = (0..n)
        .map(|i| api::PresenceQuery {
            hash: format!("{:0>32}", nix32(&(i as u64).to_be_bytes()))[..32].to_string(),
            nar_hash: format!("sha256:{}", nix32(&[i as u8; 32])),
        })
        .collect();
    serde_json::to_vec(&api::PresenceRequest { paths }).unwrap()
}

/// Sends the head of `POST <repo>/api/v1/presence` announcing `announced` bytes, then
/// `sent` of the body; returns the open connection.
async fn start_presence(
    server: &TestServer,
    repo: &str,
    token: Option<&str>,
    announced: usize,
    sent: &[u8],
) -> TcpStream {
    let addr = server.addr();
    let mut stream = TcpStream::connect(&addr).await.expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST /{repo}/{}/presence HTTP/1.1\r\nHost: {addr}\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {announced}\r\n\r\n",
        api::API_PREFIX
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(sent).await.unwrap();
    stream
}

/// Reads the server's answer until it closes or `patience` runs out (then `None`).
async fn answer_within(stream: &mut TcpStream, patience: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                // A complete answer with a Content-Length body is enough.
                let text = String::from_utf8_lossy(&got);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok());
                    if len.is_some_and(|len| body.len() >= len) {
                        return Some(text.into_owned());
                    }
                }
            }
        }
    }
}

fn server_rss_kib(server: &TestServer) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid().unwrap()))
        .expect("read /proc/<server>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn anonymous_presence_is_bounded_in_size_and_rate() {
    let server = TestServer::start_with_config(
        "min_body_bytes_per_sec = 1000\nbody_rate_grace_secs = 2\nupload_idle_timeout_secs = 120\n\
         anonymous_presence_batch = 100\n",
    );
    let repo = unique_name("pres");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);

    // Within the anonymous batch: answered.
    let resp = http()
        .post(api_url(&url, "presence"))
        .header("Content-Type", "application/json")
        .body(presence_body(100))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    // Over it without a token: refused; the same query with a token: answered.
    let resp = http()
        .post(api_url(&url, "presence"))
        .header("Content-Type", "application/json")
        .body(presence_body(101))
        .send()
        .await
        .unwrap();
    let (status, err) = api_error(resp).await;
    assert_eq!(
        (status, err.code.as_str()),
        (413, codes::PAYLOAD_TOO_LARGE),
        "{err:?}"
    );
    let resp = http()
        .post(api_url(&url, "presence"))
        .header("Authorization", bearer(&token))
        .header("Content-Type", "application/json")
        .body(presence_body(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());

    // An announced body over the limit is refused before it is sent: the answer comes while
    // the client has sent only the head.
    let mut oversize = start_presence(&server, &repo, None, 10 << 20, b"").await;
    let answer = answer_within(&mut oversize, Duration::from_secs(20))
        .await
        .expect("no answer to a 10 MiB announced body within 20 s: it is being waited for");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // A trickle (10 bytes every 500 ms, 20 B/s against a minimum of 1000 B/s) is cut off soon
    // after the grace period, long before the 120 s idle timeout.
    let body = presence_body(50);
    let mut trickle = start_presence(&server, &repo, None, body.len(), &body[..10]).await;
    let started = Instant::now();
    let mut sent = 10;
    let answer = loop {
        if let Some(answer) = answer_within(&mut trickle, Duration::from_millis(500)).await {
            break answer;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a 20 B/s body was still being read after 30 s"
        );
        if sent < body.len() && trickle.write_all(&body[sent..sent + 10]).await.is_ok() {
            sent += 10;
        }
    };
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(sent < body.len(), "the whole trickled body was read");
}

#[tokio::test]
async fn forty_unfinished_anonymous_presence_bodies_hold_little_memory() {
    let server = TestServer::start_with_config("body_rate_grace_secs = 60\n");
    let repo = unique_name("pmem");
    server.create_repo(&repo, false);
    assert_eq!(
        http()
            .get(format!("{}/nix-cache-info", server.repo_url(&repo)))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let before = server_rss_kib(&server);
    // Each sends 2 MiB of a body it never finishes (a legal size before the fix): half
    // announce 4 MiB with Content-Length, half send one chunk of chunked encoding, which no
    // announced length can refuse up front.
    let addr = server.addr();
    let sends: Vec<_> = (0..40)
        .map(|i| {
            let (addr, repo) = (addr.clone(), repo.clone());
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(&addr).await.expect("connect");
                let framing = if i % 2 == 0 {
                    format!("Content-Length: {}", 4 << 20)
                } else {
                    "Transfer-Encoding: chunked".to_string()
                };
                let head = format!(
                    "POST /{repo}/{}/presence HTTP/1.1\r\nHost: {addr}\r\n\
                     Content-Type: application/json\r\n{framing}\r\n\r\n",
                    api::API_PREFIX,
                );
                stream.write_all(head.as_bytes()).await.unwrap();
                let mut body = Vec::new();
                if i % 2 == 1 {
                    body.extend_from_slice(format!("{:x}\r\n", 2 << 20).as_bytes());
                }
                body.resize(body.len() + (2 << 20), b' ');
                // The server may refuse (and close) before the body is sent: fine.
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), stream.write_all(&body)).await;
                stream
            })
        })
        .collect();
    let mut conns = Vec::new();
    for send in sends {
        conns.push(send.await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = server_rss_kib(&server);
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "server RSS with 40 anonymous presence bodies of 2 MiB: {} -> {} MiB (+{grown_mib})",
        before / 1024,
        peak / 1024
    );
    // Before the fix each held its 2 MiB (80 MiB); the anonymous limit is ~164 KB.
    assert!(
        grown_mib < 40,
        "40 anonymous presence bodies grew the server by {grown_mib} MiB"
    );
    drop(conns);
}

#[tokio::test]
async fn slow_uploads_of_one_repository_leave_slots_for_another() {
    let server = TestServer::start_with_config(
        "max_concurrent_uploads = 4\nmax_concurrent_uploads_per_repo = 2\n\
         min_body_bytes_per_sec = 1000\nbody_rate_grace_secs = 10\nupload_idle_timeout_secs = 120\n",
    );
    let hog = unique_name("hog");
    let other = unique_name("other");
    server.create_repo(&hog, false);
    server.create_repo(&other, false);
    let hog_token = server.create_token(&hog, "push");
    let other_token = server.create_token(&other, "push");
    let hog_url = server.repo_url(&hog);
    let other_url = server.repo_url(&other);

    // Everything is built and created first, so the timing below is only the server's.
    let mut hog_uploads = Vec::new();
    for i in 0..4 {
        let path = LocalPath::load(&build_random(&format!("hog{i}"), 60_000));
        let (file, _) = path.xz_upload();
        let id = create_upload(&hog_url, &hog_token, &xz_create_upload(&path))
            .await
            .upload_id;
        hog_uploads.push((id, file));
    }
    let fair = LocalPath::load(&build_random("fair", 2_000));
    let after = LocalPath::load(&build_random("hog-after", 2_000));

    // One token opens four uploads (the server-wide cap) that send 100 bytes and stall.
    let mut stalled = Vec::new();
    let mut refused = 0;
    for (id, file) in &hog_uploads {
        let mut stream =
            start_partial_patch(&hog_url, &hog_token, id, 0, file.len(), &file[..100]).await;
        match answer_within(&mut stream, Duration::from_millis(500)).await {
            Some(answer) => {
                assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
                refused += 1;
            }
            None => stalled.push(stream),
        }
    }
    assert_eq!(
        refused, 2,
        "one repository got more than its share of slots"
    );

    // Another repository's upload is stored while the hog's uploads hold their slots.
    let (file, params) = fair.xz_upload();
    let resp = post_nar(&other_url, &other_token, &params, file).await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());

    // The stalled uploads (100 bytes in 10 s of grace, then nothing) are cut off for their rate
    // long before the 120 s idle timeout, and their slots come back.
    let started = Instant::now();
    for (i, stream) in stalled.iter_mut().enumerate() {
        let answer = answer_within(stream, Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("stalled upload {i} still held after 60 s"));
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    upload_single(&hog_url, &hog_token, &after).await;
}

#[tokio::test]
async fn private_and_absent_repositories_look_the_same_to_outsiders() {
    let server = TestServer::start();
    let private = unique_name("secret");
    let public = unique_name("open");
    let absent = unique_name("absent");
    server.create_repo(&private, true);
    server.create_repo(&public, false);
    let read = server.create_token(&private, "read");
    let other = server.create_token(&public, "push");
    let wrong = format!("stx_live_{}_{}", "a".repeat(26), "B".repeat(24));

    let answer = |repo: String, route: &'static str, auth: Option<String>| {
        let url = format!("{}/{repo}/{route}", server.url());
        async move {
            let mut req = if route.ends_with("presence") {
                http()
                    .post(&url)
                    .json(&api::PresenceRequest { paths: vec![] })
            } else {
                http().get(&url)
            };
            if let Some(auth) = auth {
                req = req.header("Authorization", auth);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap();
            (status, body.replace(&repo, "NAME"))
        }
    };
    for route in ["nix-cache-info", "api/v1/info", "api/v1/presence"] {
        for auth in [None, Some(bearer(&other)), Some(basic(&other))] {
            let hidden = answer(private.clone(), route, auth.clone()).await;
            let missing = answer(absent.clone(), route, auth.clone()).await;
            assert_eq!(hidden.0, 404, "{route} {auth:?}: {hidden:?}");
            assert_eq!(hidden, missing, "{route} with {auth:?}");
        }
        // A wrong token is refused alike, whether or not the repository exists.
        let hidden = answer(private.clone(), route, Some(bearer(&wrong))).await;
        let missing = answer(absent.clone(), route, Some(bearer(&wrong))).await;
        assert_eq!(hidden.0, 401, "{route}: {hidden:?}");
        assert_eq!(hidden, missing, "{route} with a wrong token");
        // The repository's own token still reads it.
        let (status, body) = answer(private.clone(), route, Some(bearer(&read))).await;
        assert_eq!(status, 200, "{route}: {body}");
    }
}

#[tokio::test]
async fn metrics_on_their_own_address_leave_the_public_one() {
    let server = TestServer::start_with_config("metrics_listen = \"127.0.0.1:0\"\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics_url = loop {
        let log = server.log_text();
        if let Some(url) = log
            .lines()
            .find_map(|l| l.strip_prefix("[stdout] metrics on "))
        {
            break url.trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no `metrics on` line on stdout:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let resp = http()
        .get(format!("{}/metrics", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "/metrics still on the public address");
    let resp = http().get(&metrics_url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("stowix_server_nars_stored_total"), "{text}");
    // This scrape's own connection is open while it is answered.
    assert!(
        sum_metric(&text, "stowix_server_connections_open") >= 1.0,
        "{text}"
    );
    // The public address still serves everything else.
    let resp = http()
        .get(format!("{}/healthz", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_token_for_several_repositories_cannot_take_every_slot() {
    // Repository shares alone would let a token for two repositories hold 2 × 4 = all slots:
    // the token's own share stops it at 2.
    let server = TestServer::start_with_config(
        "max_concurrent_uploads = 4\nmax_concurrent_uploads_per_repo = 4\n\
         max_concurrent_uploads_per_token = 2\nupload_idle_timeout_secs = 120\n",
    );
    let (a, b, c) = (unique_name("a"), unique_name("b"), unique_name("c"));
    for name in [&a, &b, &c] {
        server.create_repo(name, false);
    }
    let wide = server
        .admin(&[
            "token", "create", "--repo", &a, "--repo", &b, "--scope", "push",
        ])
        .trim()
        .to_string();
    let other_token = server.create_token(&c, "push");

    let mut uploads = Vec::new();
    for (i, repo) in [&a, &b, &a, &b].into_iter().enumerate() {
        let url = server.repo_url(repo);
        let path = LocalPath::load(&build_random(&format!("wide{i}"), 60_000));
        let (file, _) = path.xz_upload();
        let id = create_upload(&url, &wide, &xz_create_upload(&path))
            .await
            .upload_id;
        uploads.push((url, id, file));
    }
    let fair = LocalPath::load(&build_random("fair-c", 2_000));

    let mut stalled = Vec::new();
    let mut refused = Vec::new();
    for (url, id, file) in &uploads {
        let mut stream = start_partial_patch(url, &wide, id, 0, file.len(), &file[..100]).await;
        match answer_within(&mut stream, Duration::from_millis(500)).await {
            Some(answer) => refused.push(answer),
            None => stalled.push(stream),
        }
    }
    assert_eq!(stalled.len(), 2, "the token held more than its share");
    for answer in &refused {
        assert!(
            answer.starts_with("HTTP/1.1 503") && answer.contains("token"),
            "{answer}"
        );
    }
    // A third repository's upload goes through while the token holds its two.
    let (file, params) = fair.xz_upload();
    let resp = post_nar(&server.repo_url(&c), &other_token, &params, file).await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    drop(stalled);
}
