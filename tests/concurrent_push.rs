//! Load: ten concurrent `stowix nix push` processes of overlapping closures (shared
//! dependencies, one of them a multi-chunk NAR) into one repository. All finish, every path is
//! published once, every NAR stored once, and the repository stays consistent and substitutable.

mod common;
mod invariants;
mod push_common;

use std::collections::BTreeSet;
use std::process::Stdio;

use push_common::{finished, push_command, Fixture};
use stowix::cli::exit;

const PUSHERS: usize = 10;

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pushes_of_overlapping_closures() {
    let fx = Fixture::new();
    // Shared dependencies: a 300 KiB random NAR (5 chunks of 64 KiB), a library directory, a
    // text file; then one root per pusher using a different mix of them; two pairs of roots
    // with identical contents (same NAR, different store paths).
    let mut drvs = vec![
        common::Drv::new("shared-big", "/usr/bin/head -c 307200 /dev/urandom > $out"),
        common::Drv::new(
            "shared-lib",
            "/usr/bin/mkdir -p $out/lib && echo lib > $out/lib/a && echo $out > $out/self",
        ),
        common::Drv::new("shared-text", "echo same > $out"),
        common::Drv::new("shared-text-twin", "echo same > $out"),
        common::Drv::new("mid", "echo $dep0 $dep1 > $out").deps(&[0, 1]),
    ];
    for i in 0..PUSHERS {
        let deps: Vec<usize> = match i % 4 {
            0 => vec![4],
            1 => vec![0, 2],
            2 => vec![1, 3],
            _ => vec![4, 2, 3],
        };
        let refs: String = (0..deps.len()).map(|k| format!(" $dep{k}")).collect();
        let script = if i % 5 == 4 {
            // Roots 4 and 9 write the same bytes and keep no reference: one NAR for two paths.
            "echo twin > $out".to_string()
        } else {
            format!("echo root{i}{refs} > $out")
        };
        drvs.push(common::Drv::new(&format!("root{i}"), &script).deps(&deps));
    }
    let built = common::build_derivations(&drvs);
    let roots: Vec<String> = built[5..].to_vec();
    let closure = common::closure_of(&roots);
    let nar_hashes: BTreeSet<String> = closure
        .iter()
        .map(|p| common::LocalPath::load(p).nar_hash)
        .collect();
    assert!(nar_hashes.len() < closure.len(), "the twins share a NAR");

    // Each pusher pushes its own root and the next one's: overlapping roots too.
    let children: Vec<_> = (0..PUSHERS)
        .map(|i| {
            let next = &roots[(i + 1) % PUSHERS];
            let mut cmd = push_command(
                &fx.url,
                Some(&fx.token),
                &["--verbose", "--jobs", "4", &roots[i], next],
            );
            cmd.env("STOWIX_CHUNK_SIZE", "65536")
                .env("STOWIX_COMPRESSION_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn().expect("spawn stowix nix push")
        })
        .collect();
    let results: Vec<_> = children
        .into_iter()
        .map(|c| finished(c.wait_with_output().unwrap()))
        .collect();
    for (i, pushed) in results.iter().enumerate() {
        assert_eq!(
            pushed.code,
            exit::SUCCESS,
            "pusher {i} failed:\n{}",
            pushed.stderr
        );
    }

    // Every path published exactly once over all pushers.
    let published = fx
        .server
        .metric("stowix_server_narinfos_published_total")
        .await;
    assert_eq!(published as usize, closure.len(), "narinfos published");
    let report = invariants::check(&fx.url, &fx.public_key, Some(&fx.server), &closure).await;
    assert!(report.serves_all_of(&closure), "{report:?}");
    assert_eq!(report.served.len(), closure.len());

    // Each NAR stored once: one file per distinct NAR hash, and the same count in the database.
    let files = fx.server.stored_nar_objects(&fx.repo);
    assert_eq!(
        files.len(),
        nar_hashes.len(),
        "NAR files {files:?} for {} distinct NARs",
        nar_hashes.len()
    );
    let urls: BTreeSet<&String> = report.nar_urls.values().collect();
    assert_eq!(urls.len(), nar_hashes.len(), "{:?}", report.nar_urls);
    let stored = fx.server.metric("stowix_server_nars_stored_total").await;
    assert_eq!(stored as usize, nar_hashes.len(), "NARs stored");

    fx.substitute(&roots);
}
