//! The client's failure policy, with the real binary against a real server: a push that cannot
//! succeed stops fast and says why once (token revoked, server gone for good), a server that
//! comes back within `--retry-timeout` is ridden out, a bad `--stdin` line fails alone, Ctrl-C
//! stops within 2 s, and failures with one cause are reported once with a count. After every
//! interruption the repository invariant holds and the re-run resumes, resending at most one
//! chunk per interrupted NAR.

mod common;
mod invariants;
mod push_common;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Drv;
use push_common::{finished, push_command, BackgroundPush, Fixture};
use stowix::cli::exit;

const CHUNK: u64 = 64 * 1024;
/// Upload jobs of the interrupted pushes: each may have one NAR in flight.
const JOBS: u64 = 2;

fn start(fx: &Fixture, args: &[&str]) -> BackgroundPush {
    start_with(fx, args, &[])
}

fn start_with(fx: &Fixture, args: &[&str], envs: &[(&str, &str)]) -> BackgroundPush {
    let mut cmd = push_command(&fx.url, Some(&fx.token), args);
    cmd.env("STOWIX_CHUNK_SIZE", CHUNK.to_string())
        .envs(envs.iter().copied());
    BackgroundPush::spawn(cmd)
}

/// Waits until the server has received at least `bytes` upload bytes; panics if the push
/// ends first.
async fn until_received(fx: &Fixture, run: &mut BackgroundPush, bytes: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while fx.received_bytes().await < bytes {
        assert!(
            !run.exited(),
            "the push ended before {bytes} bytes arrived:\n{}",
            run.text()
        );
        assert!(Instant::now() < deadline, "{}", run.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A closure of several incompressible NARs, each larger than one chunk, and small ones: at the
/// rate limit below it takes far longer than any of the tests wait, and keeps every stage busy.
fn slow_closure() -> (String, Vec<String>) {
    let mut drvs: Vec<Drv> = (0..6)
        .map(|i| {
            Drv::new(
                &format!("big-{i}"),
                "/usr/bin/head -c 524288 /dev/urandom > $out",
            )
        })
        .collect();
    for i in 0..4 {
        drvs.push(Drv::new(&format!("small-{i}"), &format!("echo {i} > $out")));
    }
    let all: Vec<usize> = (0..drvs.len()).collect();
    // Writing every dependency's path makes each a runtime reference of the root.
    let refs: Vec<String> = all.iter().map(|i| format!("$dep{i}")).collect();
    drvs.push(Drv::new("top", &format!("echo {} > $out", refs.join(" "))).deps(&all));
    let built = common::build_derivations(&drvs);
    let root = built.last().unwrap().clone();
    let closure = common::closure_of(std::slice::from_ref(&root));
    assert_eq!(closure.len(), 11, "{closure:?}");
    (root, closure)
}

fn slow_args(root: &str) -> Vec<&str> {
    vec![
        "--verbose",
        "--max-upload-rate",
        "256KiB",
        "--jobs",
        "2",
        "--compression-threads",
        "2",
        root,
    ]
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("error:")).collect()
}

/// Bytes of unfinished chunked uploads the server holds (`uploads/<id>.part`), and their number.
fn partial_uploads(data_dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut count = 0;
    if let Ok(entries) = std::fs::read_dir(data_dir.join("uploads")) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "part") {
                bytes += entry.metadata().unwrap().len();
                count += 1;
            }
        }
    }
    (bytes, count)
}

/// FileSize of each path's narinfo (all must be served).
async fn file_size(fx: &Fixture, path: &str) -> f64 {
    let (status, narinfo) = common::get_narinfo(&fx.url, common::hash_part(path)).await;
    assert_eq!(status, 200, "{path}");
    common::narinfo_field(&narinfo, "FileSize")
        .unwrap()
        .parse()
        .unwrap()
}

/// Runs the push to completion and checks it resent at most one chunk per interrupted NAR:
/// it receives at most the NARs the server did not hold, less the partial uploads it held,
/// plus one chunk per partial upload and one per upload job (a single-request NAR in flight).
async fn rerun_resumes(fx: &Fixture, root: &str, closure: &[String]) {
    let held = fx.server.stored_nar_hashes(&fx.repo);
    let (partial_bytes, partial_count) = partial_uploads(fx.server.data_dir());
    let before = fx.received_bytes().await;
    let mut cmd = push_command(&fx.url, Some(&fx.token), &["--verbose", root]);
    cmd.env("STOWIX_CHUNK_SIZE", CHUNK.to_string());
    let rerun = finished(cmd.output().unwrap());
    rerun.assert_code(exit::SUCCESS);
    let report = invariants::check(&fx.url, &fx.public_key, Some(&fx.server), closure).await;
    assert!(report.serves_all_of(closure), "{report:?}");
    let mut missing = 0.0;
    for path in closure {
        if !held.contains(&common::LocalPath::load(path).nar_hash) {
            missing += file_size(fx, path).await;
        }
    }
    let received = fx.received_bytes().await - before;
    let allowed = missing - partial_bytes as f64 + ((partial_count + JOBS) * CHUNK) as f64;
    assert!(
        received <= allowed,
        "the re-run sent {received} bytes; the server lacked {missing} bytes of NARs and held \
         {partial_bytes} bytes in {partial_count} partial uploads\n{}",
        rerun.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_revoked_mid_push_ends_it_within_5_s_with_one_error() {
    let fx = Fixture::new();
    let (root, closure) = slow_closure();
    let mut run = start(&fx, &slow_args(&root));
    until_received(&fx, &mut run, 2.0 * CHUNK as f64).await;

    let id = common::token_id(&fx.token).unwrap().to_string();
    fx.server.admin(&["token", "revoke", &id]);
    let revoked_at = Instant::now();
    let received_at_revocation = fx.received_bytes().await;
    let ended = run.wait(Duration::from_secs(120));
    let pushed = &ended.pushed;
    eprintln!("{}", pushed.stderr);
    pushed.assert_code(exit::AUTH);
    let took = ended.at - revoked_at;
    eprintln!("exited {took:?} after the revocation");
    assert!(
        took <= Duration::from_secs(5),
        "exited {took:?} after the revocation\n{}",
        pushed.stderr
    );
    let errors = error_lines(&pushed.stderr);
    assert_eq!(errors.len(), 1, "{}", pushed.stderr);
    assert!(errors[0].contains("revoked_token"), "{}", pushed.stderr);
    assert_eq!(
        pushed.stderr.matches("hint:").count(),
        1,
        "the hint is printed once\n{}",
        pushed.stderr
    );
    assert!(
        !pushed.stderr.lines().any(|l| l.starts_with("failed: ")),
        "no path is reported failed: the run is\n{}",
        pushed.stderr
    );
    assert!(pushed.stderr.contains("summary:"), "{}", pushed.stderr);
    // Bodies the server had authorised before the revocation may finish (one per job); no
    // request made after it was accepted.
    let after = fx.received_bytes().await - received_at_revocation;
    assert!(
        after <= (JOBS * CHUNK) as f64,
        "{after} bytes arrived after the revocation\n{}",
        pushed.stderr
    );
    invariants::check(&fx.url, &fx.public_key, Some(&fx.server), &closure).await;
}

/// Lines starting with `prefix` printed after the first line containing `marker`.
fn lines_after(stderr: &str, marker: &str, prefix: &str) -> Vec<String> {
    stderr
        .lines()
        .skip_while(|l| !l.contains(marker))
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

const PAUSED: &str = "pausing the push";

#[tokio::test(flavor = "multi_thread")]
async fn a_server_gone_for_good_ends_the_push_after_the_retry_timeout() {
    let mut fx = Fixture::new();
    let (root, closure) = slow_closure();
    // The environment variable, where the restart test below uses the flag.
    let mut run = start_with(&fx, &slow_args(&root), &[("STOWIX_RETRY_TIMEOUT", "8")]);
    until_received(&fx, &mut run, 3.0 * CHUNK as f64).await;
    fx.server.kill();
    let killed_at = Instant::now();

    let ended = run.wait(Duration::from_secs(60));
    let pushed = &ended.pushed;
    eprintln!("{}", pushed.stderr);
    pushed.assert_code(exit::UNREACHABLE);
    let took = ended.at - killed_at;
    eprintln!("exited {took:?} after the server was killed");
    assert!(
        took <= Duration::from_secs(8 + 10),
        "exited {took:?} after the server died\n{}",
        pushed.stderr
    );
    assert!(
        took >= Duration::from_secs(8),
        "gave up after {took:?}, before the retry timeout\n{}",
        pushed.stderr
    );
    let errors = error_lines(&pushed.stderr);
    assert_eq!(errors.len(), 1, "{}", pushed.stderr);
    assert!(errors[0].contains("did not answer"), "{}", pushed.stderr);
    assert_eq!(
        pushed.stderr.matches(PAUSED).count(),
        1,
        "the outage is reported once\n{}",
        pushed.stderr
    );
    // The pipeline paused: a stage worker may have been starting its path as the outage was
    // noticed, but none started another.
    for stage in ["dump started:", "compress started:"] {
        let started = lines_after(&pushed.stderr, PAUSED, stage);
        assert!(
            started.len() <= 2,
            "{} {stage} after the pause with 2 workers\n{}",
            started.len(),
            pushed.stderr
        );
    }
    assert!(
        !pushed.stderr.lines().any(|l| l.starts_with("failed: ")),
        "{}",
        pushed.stderr
    );

    fx.server.restart();
    fx.url = fx.server.repo_url(&fx.repo);
    invariants::check(&fx.url, &fx.public_key, Some(&fx.server), &closure).await;
    rerun_resumes(&fx, &root, &closure).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_restarted_within_the_retry_timeout_is_ridden_out() {
    let mut fx = Fixture::new();
    let (root, closure) = slow_closure();
    let mut args = slow_args(&root);
    args.extend(["--retry-timeout", "90s"]);
    let mut run = start(&fx, &args);
    until_received(&fx, &mut run, 3.0 * CHUNK as f64).await;
    let before_kill = fx.received_bytes().await;
    fx.server.kill();
    let (_, interrupted) = partial_uploads(fx.server.data_dir());
    run.wait_for_line("pause", |l| l.contains(PAUSED)).await;
    // A real outage, longer than the client's own retries of one request (about 5 s with the
    // tests' 20 ms base delay): requests give up on their own and must wait for the server.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        !run.exited(),
        "the push ended during the outage:\n{}",
        run.text()
    );
    fx.server.restart_same_port();

    let ended = run.wait(Duration::from_secs(180));
    let pushed = &ended.pushed;
    eprintln!("{}", pushed.stderr);
    pushed.assert_code(exit::SUCCESS);
    assert!(
        pushed.stderr.contains("resuming"),
        "no resumption reported\n{}",
        pushed.stderr
    );
    let report = invariants::check(&fx.url, &fx.public_key, Some(&fx.server), &closure).await;
    assert!(report.serves_all_of(&closure), "{report:?}");
    // Everything arrived once, but for at most one chunk per NAR in flight at the kill.
    let mut stored = 0.0;
    for path in &closure {
        stored += file_size(&fx, path).await;
    }
    let received = before_kill + fx.received_bytes().await;
    let allowed = stored + ((interrupted.max(JOBS) + JOBS) * CHUNK) as f64;
    assert!(
        received <= allowed,
        "received {received} bytes for {stored} stored\n{}",
        pushed.stderr
    );
    rerun_resumes(&fx, &root, &closure).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_stdin_lines_fail_alone_and_the_rest_is_pushed() {
    let fx = Fixture::new();
    let good = common::build_derivations(&[
        Drv::new("good-a", "echo a > $out"),
        Drv::new("good-b", "echo b > $out"),
        Drv::new("good-c", "echo c > $out"),
    ]);
    let gone = format!("/nix/store/{}-gone", "0".repeat(32));
    let outside = tempfile::tempdir().unwrap();
    let outside = outside.path().to_str().unwrap().to_string();
    let input = [
        "not a store path".to_string(),
        good[0].clone(),
        gone.clone(),
        good[1].clone(),
        outside.clone(),
        good[2].clone(),
    ];
    let mut child = push_command(&fx.url, Some(&fx.token), &["--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for line in &input {
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let pushed = finished(child.wait_with_output().unwrap());
    pushed.assert_code(exit::PARTIAL);
    for bad in ["not a store path", &gone, &outside] {
        assert!(
            pushed
                .stderr
                .lines()
                .any(|l| l.starts_with(&format!("failed: {bad}: "))),
            "line {bad:?} is not reported\n{}",
            pushed.stderr
        );
    }
    assert!(
        pushed.stderr.contains("3 input lines rejected"),
        "{}",
        pushed.stderr
    );
    let report = invariants::check(&fx.url, &fx.public_key, Some(&fx.server), &good).await;
    assert!(report.serves_all_of(&good), "{report:?}\n{}", pushed.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_within_2_s_with_the_summary_and_the_rerun_resumes() {
    let fx = Fixture::new();
    let (root, closure) = slow_closure();
    let mut run = start(&fx, &slow_args(&root));
    until_received(&fx, &mut run, 3.0 * CHUNK as f64).await;
    let status = Command::new("kill")
        .args(["-INT", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let interrupted_at = Instant::now();
    let ended = run.wait(Duration::from_secs(30));
    let pushed = &ended.pushed;
    eprintln!("{}", pushed.stderr);
    pushed.assert_code(exit::INTERRUPTED);
    let took = ended.at - interrupted_at;
    eprintln!("exited {took:?} after SIGINT");
    assert!(
        took <= Duration::from_secs(2),
        "exited {took:?} after SIGINT\n{}",
        pushed.stderr
    );
    assert!(pushed.stderr.contains("summary:"), "{}", pushed.stderr);
    invariants::check(&fx.url, &fx.public_key, Some(&fx.server), &closure).await;
    rerun_resumes(&fx, &root, &closure).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_with_one_cause_are_reported_once_with_a_count() {
    let fx = Fixture::new();
    let built = common::build_derivations(&[
        Drv::new("victim-a", "echo original-a > $out"),
        Drv::new("victim-b", "echo original-b > $out"),
        Drv::new("victim-c", "echo original-c > $out"),
        Drv::new("bystander", "echo fine > $out"),
    ]);
    let victims = &built[..3];
    let _cleanup = common::DeleteOnDrop(victims.to_vec());
    for victim in victims {
        // Same size, other bytes: only the hash can tell.
        std::fs::set_permissions(victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let tampered = std::fs::read_to_string(victim)
            .unwrap()
            .replace("original", "tampered");
        std::fs::write(victim, tampered).unwrap();
    }
    for verbose in [false, true] {
        let mut args: Vec<&str> = built.iter().map(String::as_str).collect();
        if verbose {
            args.push("--verbose");
        }
        let pushed = fx.push(&args);
        pushed.assert_code(exit::PARTIAL);
        let corrupt: Vec<&str> = pushed
            .stderr
            .lines()
            .filter(|l| l.starts_with("failed: /nix/store/") && l.contains("corrupt"))
            .collect();
        assert_eq!(
            corrupt.len(),
            1,
            "verbose {verbose}: one line for the first\n{}",
            pushed.stderr
        );
        assert!(
            pushed
                .stderr
                .lines()
                .any(|l| l == "failed: 2 more paths with the same cause: store path corrupt (contents differ from the Nix database)"),
            "verbose {verbose}: no count of the others\n{}",
            pushed.stderr
        );
        assert_eq!(pushed.summary_count("failed"), 3, "{}", pushed.stderr);
    }
}
