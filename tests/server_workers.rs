//! CPU-heavy request work runs off the async workers: a server with a single worker thread
//! keeps answering `/healthz` while it parses and checks a large publication batch.
//!
//! ```text
//!   TOKIO_WORKER_THREADS=1 stowix serve
//!     ├─ POST api/v1/narinfos  (~45 MB of JSON: 50 entries, mostly string escapes)
//!     └─ GET /healthz, one after another, for as long as the POST runs
//! ```
//! Had the parse run on the worker, one `/healthz` would wait for all of it. The bound is
//! relative to the POST's own duration (the slowest `/healthz` under 40% of it), not a fixed
//! number of milliseconds, so a slow machine slows both sides alike.
//!
//! This file holds one test, because it sets `TOKIO_WORKER_THREADS` for the server it starts.

mod common;

use std::time::{Duration, Instant};

use common::*;
use stowix::api;

fn fake_path(i: usize, name: &str) -> String {
    // 32 nixbase32 characters from the index: distinct, valid hash parts.
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut n = i;
    let hash: String = (0..32)
        .map(|_| {
            let c = alphabet[n % 32] as char;
            n /= 32;
            c
        })
        .collect();
    format!("/nix/store/{hash}-{name}")
}

#[tokio::test]
async fn a_large_publication_batch_does_not_stall_other_requests() {
    std::env::set_var("TOKIO_WORKER_THREADS", "1");
    let server = TestServer::start();
    std::env::remove_var("TOKIO_WORKER_THREADS");
    let repo = unique_name("workers");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);

    const ENTRIES: usize = 50;
    // JSON escapes are the slowest text to parse, and the entry checks after parsing are
    // cheap for them: the parse dominates the request.
    let escaped_ca = "\\u0041".repeat(150_000);
    let entries: Vec<String> = (0..ENTRIES)
        .map(|i| {
            format!(
                r#"{{"store_path":"{}","nar_hash":"{}","nar_size":1000,"references":[],"ca":"{escaped_ca}","signatures":[]}}"#,
                fake_path(1_000_000 + i, "entry"),
                sha256_nix32(&i.to_le_bytes()),
            )
        })
        .collect();
    let body = format!(r#"{{"narinfos":[{}]}}"#, entries.join(",")).into_bytes();
    eprintln!("publication body: {} bytes", body.len());

    let healthz = format!("{}/healthz", server.url());
    let client = http();
    // Warm the connection pool, so the loop below measures answers, not connects.
    client.get(&healthz).send().await.unwrap();

    let started = Instant::now();
    let post = tokio::spawn({
        let client = client.clone();
        let url = api_url(&url, "narinfos");
        async move {
            let resp = client
                .post(url)
                .header("Authorization", bearer(&token))
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .expect("POST narinfos");
            let status = resp.status();
            let answer: api::PublishResponse = resp.json().await.expect("PublishResponse");
            (status, answer, started.elapsed())
        }
    });
    let mut latencies = Vec::new();
    while !post.is_finished() {
        let asked = Instant::now();
        let resp = client.get(&healthz).send().await.expect("GET /healthz");
        assert_eq!(resp.status(), 200);
        latencies.push(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, answer, took) = post.await.unwrap();
    assert_eq!(status, 200);
    // Every entry names a NAR the repository does not have: the whole batch was checked.
    assert_eq!(
        answer.rejected.len(),
        ENTRIES,
        "{:?}",
        &answer.rejected[..3]
    );
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "POST took {took:?}; {} /healthz answers meanwhile, slowest {slowest:?}",
        latencies.len()
    );
    assert!(
        latencies.len() >= 3,
        "only {} /healthz answers during a {took:?} POST",
        latencies.len()
    );
    // Unblocked, the slowest answer takes a small share of the POST (at most a fifth measured on
    // a loaded 2-core machine); blocked, it waits for the whole parse (over 60% of the POST).
    assert!(
        slowest * 5 < took * 2,
        "a /healthz answer took {slowest:?} while the POST took {took:?}: the single worker was busy"
    );
}
