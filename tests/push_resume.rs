//! A push killed (SIGKILL) in the middle of a large NAR resumes where the server's offset says:
//! the next run sends at most one chunk again, and the repository never served a narinfo whose
//! NAR or references were missing.

mod common;
mod push_common;

use std::time::{Duration, Instant};

use push_common::{finished, push_command, Fixture};
use stowix::cli::exit;

const CHUNK: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn killed_push_resumes_sending_at_most_one_chunk_again() {
    let fx = Fixture::new();
    // Random bytes: the compressed NAR is as large as the NAR (~1.5 MiB, 24 chunks).
    let mut built = common::build_derivations(&[
        common::Drv::new("big", "/usr/bin/head -c 1572864 /dev/urandom > $out"),
        common::Drv::new("needs-big", "echo $dep0 > $out").deps(&[0]),
    ]);
    let top = built.pop().unwrap();
    let big = built.pop().unwrap();
    let chunk = CHUNK.to_string();

    // 256 KiB/s: the upload takes ~6 s, so the kill lands in the middle.
    let mut child = push_command(
        &fx.url,
        Some(&fx.token),
        &["--max-upload-rate", "256KiB", &top],
    )
    .env("STOWIX_CHUNK_SIZE", &chunk)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let received = fx.received_bytes().await;
        if received >= 3.0 * CHUNK as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "the upload never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the push ended before it could be killed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = fx.received_bytes().await;

    // Nothing of the interrupted NAR nor of its dependent may be visible.
    assert_eq!(
        common::get_narinfo(&fx.url, common::hash_part(&big))
            .await
            .0,
        404
    );
    assert_eq!(
        common::get_narinfo(&fx.url, common::hash_part(&top))
            .await
            .0,
        404
    );

    let mut cmd = push_command(&fx.url, Some(&fx.token), &["--verbose", &top]);
    cmd.env("STOWIX_CHUNK_SIZE", &chunk);
    let rerun = finished(cmd.output().unwrap());
    rerun.assert_code(exit::SUCCESS);
    let after = fx.received_bytes().await;

    let (status, narinfo) = common::get_narinfo(&fx.url, common::hash_part(&big)).await;
    assert_eq!(status, 200);
    let file_size: f64 = common::narinfo_field(&narinfo, "FileSize")
        .unwrap()
        .parse()
        .unwrap();
    let (_, top_narinfo) = common::get_narinfo(&fx.url, common::hash_part(&top)).await;
    let top_size: f64 = common::narinfo_field(&top_narinfo, "FileSize")
        .unwrap()
        .parse()
        .unwrap();
    // Everything the server received over both runs: each byte once, plus at most one chunk
    // resent after the kill.
    assert!(
        after <= file_size + top_size + CHUNK as f64,
        "received {after} bytes in total for {file_size} + {top_size} (first run: {before})\n{}",
        rerun.stderr
    );
    assert!(
        after - before < file_size,
        "the re-run started over:\n{}",
        rerun.stderr
    );
    fx.substitute(&[top]);
}
