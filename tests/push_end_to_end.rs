//! `stowix nix push` end to end: real Nix builds input-addressed closures, the real binary pushes
//! them to a real `stowix serve`, and `nix copy --from` substitutes them into a fresh store that
//! trusts only the repository's key.

mod common;
mod push_common;

use std::io::Write;
use std::process::Stdio;

use push_common::{finished, push_command, Fixture};
use stowix::cli::exit;

#[tokio::test(flavor = "multi_thread")]
async fn push_then_substitute_with_signatures_and_rerun_uploads_nothing() {
    let fx = Fixture::new();
    let closure = common::realistic_closure();
    let root = closure.last().unwrap().clone();

    let first = fx.push(&["--verbose", &root]);
    first.assert_code(exit::SUCCESS);
    let expected = common::closure_of(std::slice::from_ref(&root)).len() as u64;
    assert_eq!(
        first.summary_count("paths in closure"),
        expected,
        "{}",
        first.stderr
    );
    assert_eq!(
        first.summary_count("uploaded"),
        expected,
        "{}",
        first.stderr
    );
    for path in common::closure_of(std::slice::from_ref(&root)) {
        assert!(
            first.stderr.contains(&format!("published: {path}")),
            "{}",
            first.stderr
        );
    }
    fx.substitute(std::slice::from_ref(&root));

    let received = fx.received_bytes().await;
    assert!(received > 0.0);
    let second = fx.push(&[&root]);
    second.assert_code(exit::SUCCESS);
    assert_eq!(
        second.summary_count("already present"),
        expected,
        "{}",
        second.stderr
    );
    assert_eq!(second.summary_count("uploaded"), 0, "{}", second.stderr);
    assert_eq!(
        fx.received_bytes().await,
        received,
        "a re-run sent NAR bytes"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn several_roots_with_shared_dependencies() {
    let fx = Fixture::new();
    let paths = common::build_derivations(&[
        common::Drv::new("shared", "echo shared > $out"),
        common::Drv::new("left", "echo $dep0 > $out").deps(&[0]),
        common::Drv::new("right", "echo $dep0 > $out").deps(&[0]),
    ]);
    let pushed = fx.push(&[&paths[1], &paths[2]]);
    pushed.assert_code(exit::SUCCESS);
    assert_eq!(
        pushed.summary_count("paths in closure"),
        3,
        "{}",
        pushed.stderr
    );
    fx.substitute(&[paths[1].clone(), paths[2].clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn result_symlink_and_path_below_the_root() {
    let fx = Fixture::new();
    let closure = common::realistic_closure();
    let tool = closure[2].clone(); // tool++ has bin/hello
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("result");
    std::os::unix::fs::symlink(&tool, &result).unwrap();

    let mut cmd = push_command(&fx.url, Some(&fx.token), &["./result/bin/hello"]);
    cmd.current_dir(dir.path());
    let below = finished(cmd.output().unwrap());
    below.assert_code(exit::SUCCESS);
    assert_eq!(
        below.summary_count("paths in closure"),
        common::closure_of(std::slice::from_ref(&tool)).len() as u64
    );
    let mut cmd = push_command(&fx.url, Some(&fx.token), &["./result"]);
    cmd.current_dir(dir.path());
    finished(cmd.output().unwrap()).assert_code(exit::SUCCESS);
    fx.substitute(&[tool]);
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_paths_are_pushed_as_they_arrive() {
    let fx = Fixture::new();
    let (dep, top) = common::build_pair();
    let other = common::build_text("other", "from stdin");
    let mut child = push_command(&fx.url, Some(&fx.token), &["--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{top}").unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        writeln!(stdin, "\n{other}\n{dep}").unwrap();
    }
    let pushed = finished(child.wait_with_output().unwrap());
    pushed.assert_code(exit::SUCCESS);
    assert_eq!(
        pushed.summary_count("paths in closure"),
        3,
        "{}",
        pushed.stderr
    );
    fx.substitute(&[top, other]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nar_larger_than_the_chunk_size_goes_up_in_chunks() {
    let fx = Fixture::new();
    // 700 KiB of random bytes compress to about as much: eleven 64 KiB chunks.
    let top = common::build_derivations(&[
        common::Drv::new("big", "/usr/bin/head -c 716800 /dev/urandom > $out"),
        common::Drv::new("uses-big", "echo $dep0 > $out").deps(&[0]),
    ])
    .split_off(1);
    let pushed = push_push_common(&fx, &[&top[0]], &[("STOWIX_CHUNK_SIZE", "65536")]);
    pushed.assert_code(exit::SUCCESS);
    let patches = fx
        .server
        .metric("stowix_server_http_requests_total{route=\"/{repo}/api/v1/uploads/{id}\"}")
        .await;
    let received = fx.received_bytes().await;
    assert!(received >= 700.0 * 1024.0, "received {received}");
    // Eleven or so PATCHes (the route also serves GET and DELETE, which a clean run never sends).
    assert!(patches >= 10.0, "PATCH count {patches}");
    fx.substitute(&top);
}

fn push_push_common(fx: &Fixture, args: &[&str], envs: &[(&str, &str)]) -> push_common::Pushed {
    push_common::push_with(&fx.url, Some(&fx.token), args, envs)
}

#[tokio::test(flavor = "multi_thread")]
async fn database_calls_are_timed_per_operation_on_metrics() {
    let fx = Fixture::new();
    // 300 KiB in 64 KiB chunks: a chunked upload, so its operations show up too.
    let top = common::build_derivations(&[
        common::Drv::new("timed", "/usr/bin/head -c 307200 /dev/urandom > $out"),
        common::Drv::new("uses-timed", "echo $dep0 > $out").deps(&[0]),
    ])
    .split_off(1);
    let pushed = push_push_common(&fx, &[&top[0]], &[("STOWIX_CHUNK_SIZE", "65536")]);
    pushed.assert_code(exit::SUCCESS);
    let text = fx.server.metrics_text().await;
    assert!(
        text.contains("# TYPE stowix_server_database_seconds histogram"),
        "{text}"
    );
    let count = |op: &str| {
        common::sum_metric(
            &text,
            &format!("stowix_server_database_seconds_count{{op=\"{op}\"}}"),
        )
    };
    // What every push does: presence, one session per NAR, the NARs' rows, one publication.
    for op in [
        "presence",
        "open_upload",
        "insert_nars",
        "delete_upload",
        "publish_checked",
    ] {
        assert!(count(op) >= 1.0, "no {op} call was timed:\n{text}");
    }
    let counted = common::sum_metric(&text, "stowix_server_database_seconds_count");
    assert!(counted >= 5.0, "{text}");
    if common::backends::backend() == common::backends::Backend::Scaleout {
        // 64 KiB chunks on S3 wait as a growing tail: each chunk after the first replaces it.
        assert!(
            count("replace_last_upload_part") >= 3.0,
            "short chunks did not go through the tail:\n{text}"
        );
    }
    assert_eq!(
        common::sum_metric(&text, "stowix_server_database_errors_total"),
        0.0,
        "a clean push fails no database call:\n{text}"
    );
    fx.substitute(&top);
}
