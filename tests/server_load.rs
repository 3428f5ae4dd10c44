//! Load: an honest `stowix nix push` and Nix-style narinfo reads while anonymous clients flood
//! the server with narinfo lookups and presence queries, and token holders with full-size
//! (20 000-entry) presence queries. The push must complete and narinfo reads keep a median
//! latency under 10 ms (the bound issue 8 sets): presence queries hold one pooled SQLite reader
//! each, not the connection narinfo lookups need.

mod common;
mod push_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use stowix::api;

fn presence_body(n: usize, salt: u8) -> bytes::Bytes {
    let paths = (0..n)
        .map(|i| api::PresenceQuery {
            hash: format!("{:0>32}", nix32(&(i as u64).to_be_bytes()))[..32].to_string(),
            nar_hash: format!(
                "sha256:{}",
                nix32(&sha2::Digest::finalize(sha2::Digest::chain_update(
                    <sha2::Sha256 as sha2::Digest>::new(),
                    [salt, (i >> 8) as u8, i as u8]
                )))
            ),
        })
        .collect();
    serde_json::to_vec(&api::PresenceRequest { paths })
        .unwrap()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn narinfo_reads_stay_fast_and_a_push_completes_under_presence_floods() {
    let fx = push_common::Fixture::new();
    let read_token = fx.server.create_token(&fx.repo, "read");
    // One published path whose narinfo the reader below fetches, as Nix would.
    let probe = LocalPath::load(&build_random("load-probe", 4_000));
    push_paths(&fx.url, &fx.token, &[&probe]).await;
    let closure = realistic_closure();
    let root = closure.last().unwrap().clone();

    let stop = Arc::new(AtomicBool::new(false));
    let flood_requests = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    // Two token holders asking 20 000 paths at a time, two anonymous clients asking the
    // anonymous maximum, two anonymous clients looking up narinfos that do not exist.
    for (token, entries) in [
        (Some(read_token.clone()), 20_000),
        (Some(read_token.clone()), 20_000),
        (None, 1_000),
        (None, 1_000),
    ] {
        let (stop, count, url) = (
            Arc::clone(&stop),
            Arc::clone(&flood_requests),
            fx.url.clone(),
        );
        let body = presence_body(entries, floods.len() as u8);
        floods.push(tokio::spawn(async move {
            let client = http();
            while !stop.load(Ordering::Relaxed) {
                let mut req = client
                    .post(api_url(&url, "presence"))
                    .header("Content-Type", "application/json")
                    .body(body.clone());
                if let Some(token) = &token {
                    req = req.header("Authorization", bearer(token));
                }
                let resp = req.send().await.expect("presence flood request");
                assert_eq!(
                    resp.status(),
                    200,
                    "presence flood answered {}",
                    resp.status()
                );
                let _ = resp.bytes().await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for salt in 0..2u64 {
        let (stop, count, url) = (
            Arc::clone(&stop),
            Arc::clone(&flood_requests),
            fx.url.clone(),
        );
        floods.push(tokio::spawn(async move {
            let client = http();
            let mut i = salt << 40;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let hash = format!("{:0>32}", nix32(&i.to_be_bytes()));
                let resp = client
                    .get(format!("{url}/{}.narinfo", &hash[..32]))
                    .send()
                    .await
                    .expect("narinfo flood request");
                assert_eq!(resp.status(), 404);
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Let the floods reach full speed before measuring.
    let warm = Instant::now();
    while flood_requests.load(Ordering::Relaxed) < 20 {
        assert!(
            warm.elapsed() < Duration::from_secs(30),
            "the floods made no progress"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (url, token) = (fx.url.clone(), fx.token.clone());
    let push = tokio::task::spawn_blocking(move || {
        push_common::push_with(&url, Some(&token), &[&root], &[])
    });

    let client = http();
    let narinfo_url = format!("{}/{}.narinfo", fx.url, probe.hash);
    let mut latencies = Vec::new();
    for _ in 0..300 {
        let started = Instant::now();
        let resp = client.get(&narinfo_url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        latencies.push(started.elapsed());
        assert!(text.contains(&probe.path));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pushed = push.await.unwrap();
    let floods_done = flood_requests.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for flood in floods {
        flood.await.unwrap();
    }

    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let p90 = latencies[latencies.len() * 9 / 10];
    eprintln!(
        "narinfo latency under floods: median {median:?}, p90 {p90:?}, max {:?}; \
         {floods_done} flood requests; push exit {}",
        latencies.last().unwrap(),
        pushed.code
    );
    pushed.assert_code(0);
    fx.substitute(&closure);
    assert!(
        median < Duration::from_millis(10),
        "median narinfo latency {median:?} under presence floods (p90 {p90:?})"
    );
}
