//! Retention under load, with real Nix: the server collects every second with an aggressive
//! policy while pushes and substitutions run. Throughout and afterwards the repository must
//! never serve a narinfo whose NAR or references are missing, every push must finish (a repair
//! round would re-upload what the collector took under it; presence answers protect the
//! shared base, so the rounds are rare here and `push_pin.rs` forces one) or finish on a re-run,
//! and a pinned closure must substitute with signatures every time.

mod common;
mod push_common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use push_common::*;

/// How long pushes and substitutions race the collector.
const LOAD: Duration = Duration::from_secs(30);

/// The invariant (`common::invariants`) over every path pushed so far: paths no longer served
/// are fine (collecting is allowed), a served one with a missing NAR or reference is not.
async fn check_whole(url: &str, public_key: &str, paths: &BTreeSet<String>) -> Result<(), String> {
    let hashes: Vec<String> = paths.iter().map(|p| hash_part(p).to_string()).collect();
    invariants::check_served(url, public_key, None, &hashes)
        .await
        .map(|_| ())
}

/// Most pushes one run makes: their closures are built up front, in one `nix-build`.
const ROUNDS: usize = 40;

/// `[base, (mid_i, top_i) for each round]`: every mid refers to the one shared base, and every
/// top to its mid plus `size` random bytes, so that its upload takes a while at a limited rate.
/// Pushes after the first find the base present, and the collector may take it before their
/// publication: what repair rounds are for.
fn load_closures(size: u64) -> Vec<String> {
    let mut drvs = vec![Drv::new("load-base", "echo base > $out")];
    for round in 0..ROUNDS {
        let mid = drvs.len();
        drvs.push(Drv::new(&format!("load-mid-{round}"), "echo $dep0 > $out").deps(&[0]));
        drvs.push(
            Drv::new(
                &format!("load-top-{round}"),
                &format!("{{ echo $dep0; /usr/bin/head -c {size} /dev/urandom; }} > $out"),
            )
            .deps(&[mid]),
        );
    }
    build_derivations(&drvs)
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_and_substitutions_stay_whole_while_the_collector_runs_every_second() {
    require_nix();
    // No grace beyond the policy: the collector may take any path not used for 2 s, and
    // last uses are written every second.
    let server = TestServer::start_with_config(
        "gc_interval_secs = 1\ngc_grace_secs = 1\nlast_use_flush_secs = 1\n",
    );
    let repo = unique_name("load");
    let public_key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    server.admin(&["repo", "configure", &repo, "--retention", "2s"]);

    let pinned = build_derivations(&[
        Drv::new("pinned-lib", "echo lib > $out"),
        Drv::new("pinned-app", "echo $dep0 > $out").deps(&[0]),
    ]);
    push_with(&url, Some(&token), &["--pin", "stable", &pinned[1]], &[]).assert_code(0);
    let closures = load_closures(150_000);

    let pushed: Arc<Mutex<BTreeSet<String>>> =
        Arc::new(Mutex::new(pinned.iter().cloned().collect()));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + LOAD;

    // One push per round, each ~1.5 s long at this rate, with pauses between them: the shared
    // base, present since the first, is collectible 2 s after its last use.
    let pusher = {
        let (url, token, pushed, stop) = (
            url.clone(),
            token.clone(),
            Arc::clone(&pushed),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            let (mut runs, mut repairs, mut reruns) = (0, 0, 0);
            for round in 0..ROUNDS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let closure = [
                    &closures[0],
                    &closures[1 + 2 * round],
                    &closures[2 + 2 * round],
                ];
                let args = ["--max-upload-rate", "100K", closure[2].as_str()];
                let first = push_with(&url, Some(&token), &args, &[]);
                runs += 1;
                if first.stderr.contains("repair round") {
                    repairs += 1;
                }
                if first.code != 0 {
                    // Failing cleanly is allowed; not finishing on a re-run is not.
                    reruns += 1;
                    let again = push_with(&url, Some(&token), &args, &[]);
                    assert_eq!(
                        again.code, 0,
                        "a re-run did not finish the push.\nfirst run:\n{}\nre-run:\n{}",
                        first.stderr, again.stderr
                    );
                }
                pushed.lock().unwrap().extend(closure.map(String::clone));
                // Pauses of varied length let the shared base's last use age past the
                // retention by different margins, so some pushes find it present just before
                // the collector takes it.
                std::thread::sleep(Duration::from_millis(500 * (1 + round as u64 % 6)));
            }
            (runs, repairs, reruns)
        })
    };
    // Substitutions of the pinned closure, with signatures required, the whole time.
    let substituter = {
        let (url, public_key, stop) = (url.clone(), public_key.clone(), Arc::clone(&stop));
        let top = pinned[1].clone();
        std::thread::spawn(move || {
            let mut copies = 0;
            while !stop.load(Ordering::Relaxed) {
                nix_copy_from(&url, &public_key, std::slice::from_ref(&top), None)
                    .unwrap_or_else(|e| panic!("substituting the pinned closure failed: {e}"));
                copies += 1;
            }
            copies
        })
    };

    // The invariant at sampled moments while everything runs.
    let mut samples = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let paths = pushed.lock().unwrap().clone();
        if let Err(problems) = check_whole(&url, &public_key, &paths).await {
            panic!("mid-run: {problems}");
        }
        samples += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (runs, repairs, reruns) = pusher.join().expect("pusher");
    let copies = substituter.join().expect("substituter");

    // Let the collector take what it will, then the invariant once more.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let paths = pushed.lock().unwrap().clone();
    if let Err(problems) = check_whole(&url, &public_key, &paths).await {
        panic!("after the run: {problems}");
    }
    let removed = server.metric("stowix_server_gc_paths_removed_total").await;
    eprintln!(
        "{runs} pushes ({repairs} with a repair round, {reruns} re-run), {copies} substitutions, \
         {samples} invariant samples, {removed} paths collected"
    );
    assert!(
        removed > 0.0,
        "the collector removed nothing: the test proved nothing"
    );
    assert!(
        runs >= 3 && copies >= 3,
        "too little load: {runs} pushes, {copies} substitutions"
    );
    nix_copy_from(&url, &public_key, &[pinned[1].clone()], None)
        .expect("the pinned closure after the run");
}
