//! The push flags nothing else exercises, each against the real server and real Nix:
//! `--compression-level`, `--max-requests-per-second`, `--metrics-listen`,
//! `--metrics-push-gateway` (a real Prometheus Pushgateway, on every exit path), `--token` and
//! `--target` as flags, the progress bar under a pseudo-terminal, and the upload stall watchdog.

mod common;
mod fault_proxy;
mod push_common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::monitoring::{blocking_get, free_port, Pushgateway};
use fault_proxy::{Fault, FaultProxy, Rule};
use push_common::{finished, push_command, Fixture, Pushed};
use stowix::cli::exit;

/// Longest any push in this file may run before the test kills it and fails.
const DEADLINE: Duration = Duration::from_secs(120);

/// Waits for `child` up to [`DEADLINE`]; kills it and fails if it is still running then.
fn wait_bounded(mut child: Child, what: &str) -> Pushed {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > DEADLINE {
            child.kill().unwrap();
            let out = finished(child.wait_with_output().unwrap());
            panic!(
                "{what}: still running after {DEADLINE:?}; killed:\n{}",
                out.stderr
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    finished(child.wait_with_output().unwrap())
}

/// Polls `condition` every 50 ms until it holds; fails after [`DEADLINE`].
fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stowix nix push")
}

fn file_size(url: &str, path: &str) -> u64 {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (status, narinfo) = runtime.block_on(common::get_narinfo(url, common::hash_part(path)));
    assert_eq!(status, 200, "narinfo of {path} at {url}: {narinfo}");
    assert_eq!(common::narinfo_field(&narinfo, "Compression"), Some("xz"));
    common::narinfo_field(&narinfo, "FileSize")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no FileSize in {narinfo}"))
}

#[test]
fn compression_level_changes_what_is_stored_and_both_substitute() {
    let fx = Fixture::new();
    let other = common::unique_name("level9");
    let other_key = fx.server.create_repo(&other, false);
    let other_token = fx.server.create_token(&other, "push");
    let other_url = fx.server.repo_url(&other);
    // 1 MiB of random bytes twice: preset 0's 256 KiB dictionary cannot see the repetition,
    // preset 9's can, so the stored sizes differ by about half.
    let path = common::build_derivations(&[common::Drv::new(
        "twice",
        "/usr/bin/head -c 1048576 /dev/urandom > $NIX_BUILD_TOP/r && /bin/cat $NIX_BUILD_TOP/r $NIX_BUILD_TOP/r > $out",
    )])
    .remove(0);

    fx.push(&["--compression-level", "0", &path])
        .assert_code(exit::SUCCESS);
    push_common::push_with(
        &other_url,
        Some(&other_token),
        &["--compression-level", "9", &path],
        &[],
    )
    .assert_code(exit::SUCCESS);

    let level0 = file_size(&fx.url, &path);
    let level9 = file_size(&other_url, &path);
    println!("stored: preset 0 {level0} bytes, preset 9 {level9} bytes");
    assert!(level0 > 2_000_000, "preset 0 stored {level0} bytes");
    assert!(
        level9 * 4 < level0 * 3,
        "preset 9 stored {level9} bytes, preset 0 {level0}: the level changed nothing"
    );
    fx.substitute(std::slice::from_ref(&path));
    common::nix_copy_from(&other_url, &other_key, std::slice::from_ref(&path), None)
        .unwrap_or_else(|e| panic!("nix copy --from the preset 9 repository: {e}"));

    let bad = fx.push(&["--compression-level", "10", &path]);
    bad.assert_code(exit::USAGE);
}

#[test]
fn max_requests_per_second_paces_every_request() {
    let fx = Fixture::new();
    let proxy = FaultProxy::start(fx.server.url(), vec![]);
    let target = format!("{}/{}", proxy.url, fx.repo);
    // Sixteen small paths and a root, each NAR in a request of its own (--no-batch): at least
    // one upload request each, plus info, presence and publication.
    let mut drvs: Vec<common::Drv> = (0..16)
        .map(|i| common::Drv::new(&format!("leaf{i}"), &format!("echo leaf {i} > $out")))
        .collect();
    let deps: Vec<usize> = (0..16).collect();
    let refer_all: String = (0..16).map(|i| format!(" $dep{i}")).collect();
    drvs.push(common::Drv::new("root", &format!("echo{refer_all} > $out")).deps(&deps));
    let root = common::build_derivations(&drvs).remove(16);

    const RATE: u32 = 4;
    let started = Instant::now();
    let pushed = push_common::push_with(
        &target,
        Some(&fx.token),
        &[
            "--no-batch",
            "--max-requests-per-second",
            &RATE.to_string(),
            &root,
        ],
        &[],
    );
    let elapsed = started.elapsed();
    pushed.assert_code(exit::SUCCESS);
    let requests = proxy.requests();
    // The limiter lets a burst of RATE through at once, then one per 1/RATE s: whatever else
    // the machine does, the requests cannot have been spread over less time than this (less
    // 10% for the limiter's clock not being ours).
    let least =
        Duration::from_secs_f64(0.9 * (requests as f64 - f64::from(RATE)) / f64::from(RATE));
    println!("{requests} requests in {elapsed:?} (at least {least:?} at {RATE}/s)");
    assert!(
        requests >= 19,
        "only {requests} requests reached the server"
    );
    assert!(
        elapsed >= least,
        "{requests} requests in {elapsed:?}: faster than {RATE} per second"
    );
    fx.substitute(&[root]);
}

#[test]
fn metrics_listen_serves_the_push_while_it_runs() {
    let fx = Fixture::new();
    // The first publication answer is held back: the push is then certainly still running,
    // with its uploads done, when the test scrapes it.
    let proxy = FaultProxy::start(
        fx.server.url(),
        vec![Rule::new(Fault::Stall(Duration::from_secs(20)))
            .on_path("/api/v1/narinfos")
            .times(1)],
    );
    let target = format!("{}/{}", proxy.url, fx.repo);
    let (dep, top) = common::build_pair();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = spawn(push_command(
        &target,
        Some(&fx.token),
        &["--metrics-listen", &listen, &top],
    ));
    wait_for("the publication request to be held", || {
        proxy.faults_injected() >= 1
    });
    let (status, text) = blocking_get(&format!("http://{listen}/metrics"))
        .expect("GET /metrics from the running push");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the push ended before the scrape"
    );
    assert_eq!(status, 200, "{text}");
    assert!(
        common::sum_metric(&text, "stowix_push_uploaded_bytes_total") > 0.0,
        "{text}"
    );
    assert_eq!(
        common::sum_metric(
            &text,
            "stowix_push_http_request_duration_seconds_count{endpoint=\"presence\"}"
        ),
        1.0,
        "{text}"
    );
    assert!(
        text.contains("# TYPE stowix_push_http_request_duration_seconds histogram"),
        "{text}"
    );
    let pushed = wait_bounded(child, "push with --metrics-listen");
    pushed.assert_code(exit::SUCCESS);
    fx.substitute(&[dep, top]);
}

#[test]
fn pushgateway_receives_the_final_metrics_on_every_exit_path() {
    let gateway = Pushgateway::start();
    let fx = Fixture::new();
    let proxy = FaultProxy::start(fx.server.url(), vec![]);
    let target = format!("{}/{}", proxy.url, fx.repo);
    let gateway_arg = ["--metrics-push-gateway", gateway.url.as_str()];

    // Success.
    let (_, top) = common::build_pair();
    let mut args = gateway_arg.to_vec();
    args.push(&top);
    push_common::push_with(&target, Some(&fx.token), &args, &[]).assert_code(exit::SUCCESS);
    assert_eq!(
        gateway.value("stowix_push_paths_total{outcome=\"uploaded\"}"),
        2.0
    );
    gateway.clear();

    // Partial failure: the server refuses one upload for good (each NAR in a request of its
    // own, so the refusal hits one path).
    proxy.set_rules(vec![Rule::new(Fault::Status {
        status: 422,
        retry_after: None,
    })
    .on_path("/api/v1/nars")
    .times(1)]);
    let (_, top) = common::build_pair();
    let mut args = gateway_arg.to_vec();
    args.extend(["--no-batch", &top]);
    push_common::push_with(&target, Some(&fx.token), &args, &[]).assert_code(exit::PARTIAL);
    assert_eq!(proxy.faults_injected(), 1);
    assert!(gateway.value("stowix_push_paths_total{outcome=\"failed\"}") >= 1.0);
    gateway.clear();

    // Fatal: the token is revoked while the info answer is held back, so the next request
    // (presence) is refused with 401.
    let revoked = fx.server.create_token(&fx.repo, "push");
    let injected = proxy.faults_injected();
    // Held long enough for `stowix admin token revoke` to finish on a busy machine.
    proxy.set_rules(vec![Rule::new(Fault::Stall(Duration::from_secs(15)))
        .on_path("/api/v1/info")
        .times(1)]);
    let (_, top) = common::build_pair();
    let mut args = gateway_arg.to_vec();
    args.push(&top);
    let child = spawn(push_command(&target, Some(&revoked), &args));
    wait_for("the info request to be held", || {
        proxy.faults_injected() > injected
    });
    fx.server
        .admin(&["token", "revoke", common::token_id(&revoked).unwrap()]);
    let pushed = wait_bounded(child, "push with a token revoked");
    pushed.assert_code(exit::AUTH);
    assert!(pushed.stderr.contains("revoked"), "{}", pushed.stderr);
    assert_eq!(
        gateway.value("stowix_push_http_request_duration_seconds_count{endpoint=\"presence\"}"),
        1.0
    );
    gateway.clear();

    // Fatal before the pipeline starts: the token was revoked before the push, so `info`
    // itself is refused. The job still shows up on the dashboard.
    proxy.set_rules(vec![]);
    let (_, top) = common::build_pair();
    let mut args = gateway_arg.to_vec();
    args.push(&top);
    push_common::push_with(&target, Some(&revoked), &args, &[]).assert_code(exit::AUTH);
    assert_eq!(
        gateway.value("stowix_push_http_request_duration_seconds_count{endpoint=\"info\"}"),
        1.0
    );
    gateway.clear();

    // Interrupted: SIGINT while a rate-limited upload runs.
    proxy.set_rules(vec![]);
    let big = common::build_random("interrupted", 2 << 20);
    let mut args = gateway_arg.to_vec();
    args.extend(["--max-upload-rate", "64K", "--chunk-size", "65536", &big]);
    let requests = proxy.requests();
    let child = spawn(push_command(&target, Some(&fx.token), &args));
    // info, presence, create upload, then the first PATCH: the upload is running.
    wait_for("the upload to start", || proxy.requests() >= requests + 4);
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let interrupted = Instant::now();
    let pushed = wait_bounded(child, "interrupted push");
    println!("exited {:?} after SIGINT", interrupted.elapsed());
    pushed.assert_code(exit::INTERRUPTED);
    assert!(
        gateway.value("stowix_push_uploaded_bytes_total") > 0.0,
        "{}",
        pushed.stderr
    );
}

#[test]
fn token_and_target_flags_work_and_win_over_the_environment() {
    let fx = Fixture::new();
    let (dep, top) = common::build_pair();
    let mut cmd = push_command("", None, &["--target", &fx.url, "--token", &fx.token, &top]);
    // Both flags must win over a wrong environment.
    cmd.env("STOWIX_TARGET", "http://127.0.0.1:1/nowhere")
        .env("STOWIX_TOKEN", "stx_live_malformed");
    let pushed = finished(cmd.output().unwrap());
    pushed.assert_code(exit::SUCCESS);
    assert_eq!(pushed.summary_count("uploaded"), 2);
    assert!(
        !pushed.stderr.contains(&fx.token[20..]),
        "token echoed:\n{}",
        pushed.stderr
    );
    fx.substitute(&[dep, top]);
}

/// Width of the pseudo-terminal the progress test gives the push.
const PTY_COLUMNS: usize = 120;

/// What a terminal of [`PTY_COLUMNS`] columns shows after `raw`, every line that ever scrolled
/// past included: printable characters (wrapping at the last column), `\r`, `\n`, and the CSI
/// sequences indicatif uses (`K` erase line, `A`/`B` cursor up/down); other sequences are
/// ignored. A log line that a bar redraw broke into shows here as a mixed row.
fn screen_rows(raw: &str) -> Vec<String> {
    let mut rows: Vec<Vec<char>> = vec![Vec::new()];
    let (mut row, mut col) = (0usize, 0usize);
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => col = 0,
            '\n' => row += 1,
            '\u{1b}' => {
                if chars.peek() != Some(&'[') {
                    chars.next();
                    continue;
                }
                chars.next();
                let mut params = String::new();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        last = c;
                        break;
                    }
                    params.push(c);
                }
                let n = params.parse::<usize>().unwrap_or(1).max(1);
                match last {
                    'A' => row = row.saturating_sub(n),
                    'B' => row += n,
                    'K' => {
                        if let Some(line) = rows.get_mut(row) {
                            line.clear();
                        }
                    }
                    _ => {}
                }
                col = col.min(PTY_COLUMNS - 1);
            }
            c if c.is_control() => {}
            c => {
                if col >= PTY_COLUMNS {
                    row += 1;
                    col = 0;
                }
                while rows.len() <= row {
                    rows.push(Vec::new());
                }
                let line = &mut rows[row];
                while line.len() < col {
                    line.push(' ');
                }
                if col < line.len() {
                    line[col] = c;
                } else {
                    line.push(c);
                }
                col += 1;
            }
        }
        while rows.len() <= row {
            rows.push(Vec::new());
        }
    }
    rows.into_iter()
        .map(|line| line.into_iter().collect::<String>().trim_end().to_owned())
        .collect()
}

#[test]
fn progress_bar_on_a_pseudo_terminal_keeps_log_lines_whole() {
    let fx = Fixture::new();
    let paths = common::build_derivations(&[
        common::Drv::new("slow", "/usr/bin/head -c 524288 /dev/urandom > $out"),
        common::Drv::new("small", "echo small > $out"),
        common::Drv::new("top", "echo $dep0 $dep1 > $out").deps(&[0, 1]),
    ]);
    let top = &paths[2];
    // `script` gives the push a pseudo-terminal as stdout and stderr; the upload limit keeps
    // the push running for seconds, long enough for the bar to draw several times.
    let command = format!(
        "stty cols {PTY_COLUMNS} rows 40 && exec '{}' nix push --verbose --max-upload-rate 128K '{top}'",
        common::stowix_bin().display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-f", "-e", "-c", &command, "/dev/null"])
        .env("STOWIX_TARGET", &fx.url)
        .env("STOWIX_TOKEN", &fx.token)
        .env("STOWIX_RETRY_BASE_DELAY_MS", "20")
        .env("TERM", "xterm-256color")
        .env_remove("STOWIX_NO_PROGRESS")
        // An open stdin: `script` stops when its input ends.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .expect("run `script` (util-linux; apt-get install -y bsdutils)");
    let pushed = wait_bounded(child, "push under a pseudo-terminal");
    pushed.assert_code(exit::SUCCESS);
    let raw = &pushed.stdout;
    assert!(
        raw.contains("ETA") && raw.contains("paths 1/3"),
        "no progress bar drawn:\n{raw:?}"
    );
    let lines = screen_rows(raw);
    let logged: Vec<&String> = lines
        .iter()
        .filter(|l| {
            ["compressed: ", "uploaded: ", "published: ", "summary: "]
                .iter()
                .any(|word| l.contains(word))
        })
        .collect();
    assert!(
        logged.iter().filter(|l| l.contains("uploaded: ")).count() >= 3,
        "missing log lines:\n{lines:#?}"
    );
    for line in &logged {
        let starts_clean = ["compressed: ", "uploaded: ", "published: ", "summary: "]
            .iter()
            .any(|word| line.starts_with(word));
        assert!(
            starts_clean && !line.contains("ETA"),
            "garbled line {line:?} in:\n{lines:#?}"
        );
    }
    assert!(
        raw.contains("\u{1b}["),
        "no terminal control at all:\n{raw:?}"
    );
    fx.substitute(&paths);
}

#[test]
fn a_stalled_upload_answer_is_abandoned_and_the_chunk_resumed() {
    let fx = Fixture::new();
    let proxy = FaultProxy::start(
        fx.server.url(),
        vec![Rule::new(Fault::Stall(Duration::from_secs(600)))
            .on_path("/api/v1/uploads/")
            .on_method("PATCH")
            .times(1)],
    );
    let target = format!("{}/{}", proxy.url, fx.repo);
    let path = common::build_random("stalled", 400 * 1024);
    let mut cmd = push_command(&target, Some(&fx.token), &["--verbose", &path]);
    cmd.env("STOWIX_CHUNK_SIZE", "65536")
        .env("STOWIX_STALL_TIMEOUT_SECS", "2");
    let pushed = wait_bounded(spawn(cmd), "push with a stalled PATCH answer");
    pushed.assert_code(exit::SUCCESS);
    assert_eq!(proxy.faults_injected(), 1, "the stall never happened");
    assert!(
        pushed
            .stderr
            .lines()
            .any(|l| l.starts_with("warning: upload_patch:") && l.contains("retrying in")),
        "the client did not give up the stalled PATCH and retry:\n{}",
        pushed.stderr
    );
    fx.substitute(&[path]);
}

#[test]
fn metrics_listen_on_an_address_in_use_is_refused_before_any_request() {
    let fx = Fixture::new();
    let (_, top) = common::build_pair();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let pushed = fx.push(&["--metrics-listen", &addr, &top]);
    assert_ne!(pushed.code, exit::SUCCESS, "{}", pushed.stderr);
    assert!(
        pushed.stderr.contains("cannot serve metrics"),
        "{}",
        pushed.stderr
    );
    assert_eq!(
        pushed
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        1,
        "{}",
        pushed.stderr
    );
}

#[test]
fn a_slow_upload_that_keeps_moving_is_not_a_stall() {
    // One request whose body takes about 3 s at the upload limit, with progress every 0.5 s,
    // against a stall timeout (and wait for an answer) of 2 s: only silence may end a request,
    // never its length.
    let fx = Fixture::new();
    let path = common::build_random("slow-moving", 512 * 1024);
    let mut cmd = push_command(
        &fx.url,
        Some(&fx.token),
        &["--verbose", "--max-upload-rate", "128K", &path],
    );
    cmd.env("STOWIX_STALL_TIMEOUT_SECS", "2");
    let pushed = wait_bounded(spawn(cmd), "slow push");
    pushed.assert_code(exit::SUCCESS);
    assert!(
        !pushed.stderr.contains("retrying in"),
        "a moving upload was abandoned:\n{}",
        pushed.stderr
    );
    fx.substitute(&[path]);
}
