//! `stowix nix push` sends small NARs in batches (`POST api/v1/nar-batch`): a closure of many
//! small paths goes in a few requests and substitutes with real Nix; a NAR the server refuses
//! fails alone while the rest of its batch publishes; `--no-batch`, and a server that takes no
//! batches, send each NAR on its own.

mod common;
mod push_common;

use common::*;
use push_common::*;

const BATCH_ROUTE: &str = "stowix_server_http_requests_total{route=\"/{repo}/api/v1/nar-batch\"}";
const SINGLE_ROUTE: &str = "stowix_server_http_requests_total{route=\"/{repo}/api/v1/nars\"}";

/// `count` small content-addressed paths with distinct contents.
fn small_paths(prefix: &str, count: usize) -> Vec<String> {
    let salt = nonce();
    let contents: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| {
            (
                format!("{prefix}-{i}"),
                format!("{prefix} {i} {salt}\n").into_bytes(),
            )
        })
        .collect();
    let files: Vec<(&str, &[u8])> = contents
        .iter()
        .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
        .collect();
    add_to_store(&files)
}

#[tokio::test(flavor = "multi_thread")]
async fn many_small_paths_go_in_a_few_batches_and_substitute() {
    let fixture = Fixture::new();
    let paths = small_paths("batched", 120);
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    let (batches_before, singles_before) = (
        fixture.server.metric(BATCH_ROUTE).await,
        fixture.server.metric(SINGLE_ROUTE).await,
    );
    let received_before = fixture.received_bytes().await;
    let pushed = fixture.push(&args);
    pushed.assert_code(0);
    assert_eq!(pushed.summary_count("uploaded"), 120, "{}", pushed.stderr);
    // Batches count in the received-bytes metric like every other upload: at least the
    // smallest xz file (~100 bytes) per NAR.
    let received = fixture.received_bytes().await - received_before;
    assert!(received >= 120.0 * 100.0, "{received} bytes received");
    let batches = fixture.server.metric(BATCH_ROUTE).await - batches_before;
    let singles = fixture.server.metric(SINGLE_ROUTE).await - singles_before;
    assert_eq!(singles, 0.0, "small NARs went alone:\n{}", pushed.stderr);
    // 120 NARs of under 200 bytes: one batch, or a few when the compressors are slower than
    // the batcher's wait; never one request per path.
    assert!(
        (1.0..=30.0).contains(&batches),
        "{batches} batch requests for 120 small NARs"
    );
    fixture.substitute(&paths);

    // --no-batch sends each NAR on its own, into another repository of the same server.
    let repo = unique_name("unbatched");
    let key = fixture.server.create_repo(&repo, false);
    let token = fixture.server.create_token(&repo, "push");
    let url = fixture.server.repo_url(&repo);
    let batches_before = fixture.server.metric(BATCH_ROUTE).await;
    let few = &args[..10];
    let mut no_batch = vec!["--no-batch"];
    no_batch.extend_from_slice(few);
    push_with(&url, Some(&token), &no_batch, &[]).assert_code(0);
    assert_eq!(fixture.server.metric(BATCH_ROUTE).await, batches_before);
    assert_eq!(
        fixture.server.metric(SINGLE_ROUTE).await - singles_before,
        10.0
    );
    let few: Vec<String> = few.iter().map(|p| p.to_string()).collect();
    nix_copy_from(&url, &key, &few, None).expect("nix copy --from the unbatched push");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nar_the_server_refuses_fails_alone_and_the_rest_of_its_batch_publishes() {
    // NARs over 64 KiB are refused; the random one compresses to ~100 KB, small enough for a
    // batch, so it travels with the others and is refused there.
    let fixture = Fixture::with_config("max_nar_bytes = 65536\n");
    let server = &fixture.server;
    let small = small_paths("fits", 20);
    let big = build_random("batch-too-big", 100_000);
    let mut args: Vec<&str> = small.iter().map(String::as_str).collect();
    args.push(&big);
    let batches_before = server.metric(BATCH_ROUTE).await;
    let pushed = fixture.push(&args);
    pushed.assert_code(4);
    assert!(server.metric(BATCH_ROUTE).await > batches_before);
    assert!(
        pushed.stderr.contains(&big) && pushed.stderr.contains("max_nar_bytes"),
        "the refused path and why are not named:\n{}",
        pushed.stderr
    );
    assert_eq!(pushed.summary_count("uploaded"), 20, "{}", pushed.stderr);
    fixture.substitute(&small);
    let big_narinfo = http()
        .get(format!("{}/{}.narinfo", fixture.url, hash_part(&big)))
        .send()
        .await
        .unwrap();
    assert_eq!(big_narinfo.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_takes_no_batches_gets_single_uploads() {
    let fixture = Fixture::with_config("max_batch_nars = 0\n");
    let paths = small_paths("alone", 8);
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    fixture.push(&args).assert_code(0);
    assert_eq!(fixture.server.metric(BATCH_ROUTE).await, 0.0);
    assert_eq!(fixture.server.metric(SINGLE_ROUTE).await, 8.0);
    fixture.substitute(&paths);
}
