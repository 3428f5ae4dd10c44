//! `stowix nix watch-exec` and `stowix nix watch-store` against a real `stowix serve` and real
//! Nix: paths built, added and imported while they run are published (and substitutable with
//! signatures checked), a failing command's status passes through, an outage is waited out,
//! SIGTERM drains, a restart re-uploads nothing, and memory stays flat over many builds.
//!
//! The Nix store is shared with every other test running at the same time, so a watcher also
//! pushes their paths: assertions name this test's paths (by their narinfo on the server, or
//! by the watcher's own per-path lines), never totals that other tests could move.

mod common;
mod push_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::backends::free_port;
use common::{hash_part, stowix_bin, Drv};
use push_common::{BackgroundPush, Fixture};

/// Longest a path may take to be published in these tests: the goal is 2 s when the server
/// keeps up, but two cores are shared by several test binaries building at once.
const PUBLISH_WITHIN: Duration = Duration::from_secs(15);

/// A `stowix nix SUBCOMMAND` with a clean environment aimed at the fixture's repository.
fn stowix_nix(fx: &Fixture, subcommand: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(stowix_bin());
    cmd.args(["nix", subcommand, "--no-progress"]).args(args);
    for var in [
        "STOWIX_TARGET",
        "STOWIX_TOKEN",
        "STOWIX_JOBS",
        "STOWIX_CHUNK_SIZE",
        "STOWIX_MAX_UPLOAD_RATE",
        "STOWIX_METRICS_LISTEN",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("STOWIX_TARGET", &fx.url)
        .env("STOWIX_TOKEN", &fx.token)
        .env("STOWIX_RETRY_BASE_DELAY_MS", "20")
        .stdin(Stdio::null());
    cmd
}

/// Starts `watch-store` and waits until it has taken its mark (its "watching" line).
async fn watch_store(fx: &Fixture, args: &[&str]) -> BackgroundPush {
    let mut all = vec!["--verbose"];
    all.extend_from_slice(args);
    let mut watcher = BackgroundPush::spawn(stowix_nix(fx, "watch-store", &all));
    watcher
        .wait_for_line("watching", |l| l.contains("watching the Nix store"))
        .await;
    watcher
}

fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal})");
}

async fn narinfo_status(fx: &Fixture, path: &str) -> u16 {
    common::http()
        .get(format!("{}/{}.narinfo", fx.url, hash_part(path)))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Polls the server until every path's narinfo is served; returns how long that took.
async fn wait_published(
    fx: &Fixture,
    paths: &[String],
    within: Duration,
    log: &dyn Fn() -> String,
) -> Duration {
    let started = Instant::now();
    for path in paths {
        loop {
            if narinfo_status(fx, path).await == 200 {
                break;
            }
            assert!(
                started.elapsed() < within,
                "{path} was not published within {within:?}\n--- watcher ---\n{}\n--- server ---\n{}",
                log(),
                fx.server.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    started.elapsed()
}

/// Writes a Nix file whose attributes `d0`, `d1`, ... are `drvs` (builder /bin/sh, a fresh
/// nonce so nothing is built before) and `all` lists them; `nix-build` runs inside the
/// commands under test.
fn write_expr(dir: &Path, drvs: &[Drv]) -> PathBuf {
    let file = dir.join("fixture.nix");
    std::fs::write(&file, common::derivations_expr(drvs)).expect("write fixture.nix");
    file
}

/// `nix-build FILE -A ATTR` (already built or not); its output paths.
fn nix_build(file: &Path, attr: &str) -> Vec<String> {
    let out = Command::new("nix-build")
        .arg(file)
        .args(["-A", attr, "--no-out-link", "--option", "substituters", ""])
        .output()
        .expect("run nix-build");
    assert!(
        out.status.success(),
        "nix-build -A {attr} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn a_closure() -> Vec<Drv> {
    vec![
        Drv::new("watch-lib", "/usr/bin/mkdir -p $out/lib && /usr/bin/head -c 20000 /dev/urandom > $out/lib/libw.so"),
        Drv::new("watch-data", "/usr/bin/head -c 70000 /dev/urandom > $out"),
        Drv::new("watch-tool", "/usr/bin/mkdir -p $out/bin && echo \"$dep0 $dep1\" > $out/bin/tool && echo $out > $out/self").deps(&[0, 1]),
        Drv::new("watch-app", "echo $dep0 > $out").deps(&[2]),
    ]
}

#[tokio::test]
async fn watch_exec_publishes_everything_a_nix_build_built() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let file = write_expr(dir.path(), &a_closure());
    let output = stowix_nix(&fx, "watch-exec", &["--verbose", "--"])
        .arg("nix-build")
        .arg(&file)
        .args(["-A", "all", "--no-out-link", "--option", "substituters", ""])
        .output()
        .expect("run stowix nix watch-exec");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    // The command's stdout passes through untouched: exactly nix-build's output paths.
    let built: Vec<String> = stdout.lines().map(str::to_owned).collect();
    assert_eq!(built.len(), 4, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        built.iter().all(|p| p.starts_with("/nix/store/")),
        "{stdout}"
    );
    assert!(
        stderr.lines().any(|l| l.starts_with("stowix: summary:")),
        "Stowix's own lines carry the prefix:\n{stderr}"
    );
    assert!(
        !stderr
            .lines()
            .any(|l| l.starts_with("summary:") || l.starts_with("published:")),
        "an unprefixed Stowix line:\n{stderr}"
    );
    // Published by the time it exited: no waiting here.
    for path in common::closure_of(&built) {
        assert_eq!(
            narinfo_status(&fx, &path).await,
            200,
            "{path} is not published\n{stderr}"
        );
    }
    fx.substitute(&built);
}

#[tokio::test]
async fn watch_exec_passes_a_failing_status_through_and_pushes_what_was_built() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let file = write_expr(
        dir.path(),
        &[
            Drv::new("watch-ok", "echo built > $out"),
            Drv::new("watch-broken", "echo $dep0 > $out; exit 3").deps(&[0]),
        ],
    );
    let script = format!(
        "nix-build {} -A d1 --no-out-link --option substituters '' ; exit 42",
        file.display()
    );
    let output = stowix_nix(&fx, "watch-exec", &["--"])
        .args(["/bin/sh", "-c", &script])
        .output()
        .expect("run stowix nix watch-exec");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(42), "stderr:\n{stderr}");
    assert!(
        stderr.contains("watch-broken"),
        "nix-build's own failure is shown:\n{stderr}"
    );
    // The dependency was built before the failure: it was pushed all the same.
    let ok = nix_build(&file, "d0");
    assert_eq!(narinfo_status(&fx, &ok[0]).await, 200, "{stderr}");
    fx.substitute(&ok);

    // A command that cannot start is a clear error, and no push is needed for it.
    let output = stowix_nix(&fx, "watch-exec", &["--", "/nonexistent/command"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(127));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("stowix: error: cannot run \"/nonexistent/command\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_revoked_token_ends_both_watchers_with_the_auth_code() {
    let fx = Fixture::new();
    let id = common::token_id(&fx.token).expect("token id").to_owned();
    let dir = tempfile::tempdir().unwrap();
    let file = write_expr(
        dir.path(),
        &[Drv::new("watch-after-revoke", "echo built > $out")],
    );
    // The command succeeds, but the token is revoked before it builds: the push's code wins.
    let script = format!(
        "'{}' admin --data-dir '{}' token revoke {id} >/dev/null && nix-build '{}' -A d0 --no-out-link --option substituters ''",
        stowix_bin().display(),
        fx.server.data_dir().display(),
        file.display()
    );
    let output = stowix_nix(&fx, "watch-exec", &["--"])
        .args(["/bin/sh", "-c", &script])
        .output()
        .expect("run stowix nix watch-exec");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "stderr:\n{stderr}");
    assert!(stderr.contains("stowix: error:"), "{stderr}");

    // watch-store does not wait out a revoked token: it is not an outage.
    let token = fx.server.create_token(&fx.repo, "push");
    let mut cmd = stowix_nix(&fx, "watch-store", &[]);
    cmd.env("STOWIX_TOKEN", &token);
    let mut watcher = BackgroundPush::spawn(cmd);
    watcher
        .wait_for_line("watching", |l| l.contains("watching the Nix store"))
        .await;
    fx.server
        .admin(&["token", "revoke", common::token_id(&token).unwrap()]);
    common::add_to_store(&[("watch-revoked.txt", common::nonce().as_bytes())]);
    let ended = watcher.wait(Duration::from_secs(60));
    ended.pushed.assert_code(3);
}

#[tokio::test]
async fn watch_store_publishes_built_added_and_imported_paths_within_seconds() {
    let fx = Fixture::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let watcher = watch_store(&fx, &["--metrics-listen", &listen]).await;
    let log = || watcher.text();

    // Built: a pair, the top referring to the dependency.
    let (dep, top) = common::build_pair();
    let took = wait_published(&fx, &[dep.clone(), top.clone()], PUBLISH_WITHIN, &log).await;
    eprintln!("built pair published {took:?} after nix-build returned");
    let first = scrape(&listen).await;

    // Added.
    let added = common::add_to_store(&[("watch-added.txt", common::nonce().as_bytes())]);
    let took = wait_published(&fx, &added, PUBLISH_WITHIN, &log).await;
    eprintln!("added path published {took:?} after nix-store --add returned");

    // Imported: exported, deleted, then imported back (it becomes valid again, with a new id).
    let text = common::build_text("watch-imported", &common::nonce());
    wait_published(&fx, std::slice::from_ref(&text), PUBLISH_WITHIN, &log).await;
    let export = Command::new("nix-store")
        .args(["--export", &text])
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let deleted = Command::new("nix-store")
        .args(["--delete", &text])
        .output()
        .unwrap();
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let mut import = Command::new("nix-store")
        .arg("--import")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        import
            .stdin
            .take()
            .unwrap()
            .write_all(&export.stdout)
            .unwrap();
    }
    let imported = import.wait_with_output().unwrap();
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let seen_before = common::sum_metric(&scrape(&listen).await, "stowix_watch_paths_seen_total");
    let deadline = Instant::now() + PUBLISH_WITHIN;
    // Already on the server, so the proof is the watcher seeing it again and finding it
    // present, not a new narinfo.
    loop {
        let text_now = watcher.text();
        let again = text_now
            .lines()
            .filter(|l| {
                l.contains(&format!("already present: {text}"))
                    || l.contains(&format!("published: {text}"))
            })
            .count();
        if again >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the imported path was not seen again:\n{text_now}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // The metrics of the whole life: counters keep growing across batches, and the watch
    // gauges and lag histogram are there.
    let last = scrape(&listen).await;
    let count = |text: &str, q: &str| common::sum_metric(text, q);
    assert!(
        count(&last, "stowix_watch_paths_seen_total") >= seen_before,
        "{last}"
    );
    assert!(
        count(&last, "stowix_watch_paths_seen_total") >= 4.0,
        "{last}"
    );
    assert!(count(&last, "stowix_watch_batches_total") >= 3.0, "{last}");
    assert!(
        count(&last, "stowix_push_paths_total") > count(&first, "stowix_push_paths_total"),
        "first:\n{first}\nlast:\n{last}"
    );
    assert!(
        count(&last, "stowix_watch_publication_lag_seconds_count") >= 4.0,
        "{last}"
    );
    assert!(last.contains("stowix_watch_paths_waiting"), "{last}");
    assert!(
        last.contains("stowix_watch_publication_lag_seconds_bucket{le=\"2\"}"),
        "{last}"
    );
    drop(watcher);
}

#[tokio::test]
async fn watch_store_publishes_what_became_valid_while_the_server_was_down() {
    let mut fx = Fixture::new();
    let mut watcher = watch_store(&fx, &["--retry-timeout", "2s"]).await;
    fx.server.kill();
    let added = common::add_to_store(&[("watch-outage.txt", common::nonce().as_bytes())]);
    // The run gives up on the silent server after --retry-timeout; the watcher keeps the path.
    watcher
        .wait_for_line("the watcher keeping its paths", |l| {
            l.contains("keeping the") && l.contains("waiting paths")
        })
        .await;
    assert!(
        !watcher.exited(),
        "the watcher must outlive the outage:\n{}",
        watcher.text()
    );
    fx.server.restart_same_port();
    let log = || watcher.text();
    wait_published(&fx, &added, Duration::from_secs(60), &log).await;
    fx.substitute(&added);
    drop(watcher);

    // A watcher started while the server is down waits for it, and misses nothing meanwhile.
    fx.server.kill();
    let mut late = BackgroundPush::spawn(stowix_nix(&fx, "watch-store", &[]));
    late.wait_for_line("the first connection failing", |l| {
        l.contains("asking again every")
    })
    .await;
    let meanwhile = common::add_to_store(&[("watch-meanwhile.txt", common::nonce().as_bytes())]);
    fx.server.restart_same_port();
    let log = || late.text();
    wait_published(&fx, &meanwhile, Duration::from_secs(60), &log).await;
}

#[tokio::test]
async fn sigterm_drains_what_was_seen_and_exits_0_and_a_second_signal_stops_at_once() {
    let fx = Fixture::new();
    // A big incompressible path on one compression thread: seconds of work still ahead when
    // the signal arrives. (Not a rate limit: the store is shared, and the watcher must push
    // the other tests' paths too before it can exit.)
    let watcher = watch_store(&fx, &["--compression-threads", "1"]).await;
    let big = common::build_random("watch-drain", 4 << 20);
    assert_ne!(
        narinfo_status(&fx, &big).await,
        200,
        "published before the signal: the test proves nothing"
    );
    send_signal(watcher.id(), libc::SIGTERM);
    let ended = watcher.wait(Duration::from_secs(90));
    ended.pushed.assert_code(0);
    assert!(
        ended
            .pushed
            .stderr
            .contains("stopping: publishing the paths already seen"),
        "{}",
        ended.pushed.stderr
    );
    assert_eq!(
        narinfo_status(&fx, &big).await,
        200,
        "{}",
        ended.pushed.stderr
    );

    let mut watcher =
        watch_store(&fx, &["--max-upload-rate", "10K", "--compression", "none"]).await;
    let slow = common::build_random("watch-abort", 300_000);
    send_signal(watcher.id(), libc::SIGTERM);
    // Two signals sent back to back arrive as one (the kernel keeps one pending SIGTERM): the
    // second is sent once the first was handled, as a user pressing Ctrl-C again would.
    watcher
        .wait_for_line("the first signal handled", |l| {
            l.contains("stopping: publishing the paths already seen")
        })
        .await;
    send_signal(watcher.id(), libc::SIGTERM);
    let ended = watcher.wait(Duration::from_secs(20));
    ended.pushed.assert_code(130);
    assert_ne!(
        narinfo_status(&fx, &slow).await,
        200,
        "30 s of upload cannot have finished"
    );
}

#[tokio::test]
async fn a_restarted_watcher_uploads_nothing_again() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let file = write_expr(
        dir.path(),
        &[
            Drv::new("watch-base", "/usr/bin/head -c 50000 /dev/urandom > $out"),
            Drv::new("watch-top", "echo $dep0 > $out").deps(&[0]),
        ],
    );
    let first = watch_store(&fx, &[]).await;
    let base = nix_build(&file, "d0");
    let log = || first.text();
    wait_published(&fx, &base, PUBLISH_WITHIN, &log).await;
    send_signal(first.id(), libc::SIGTERM);
    let first = first.wait(Duration::from_secs(60));
    first.pushed.assert_code(0);
    assert!(
        first
            .pushed
            .stderr
            .contains(&format!("uploaded: {}", base[0])),
        "{}",
        first.pushed.stderr
    );

    let second = watch_store(&fx, &[]).await;
    let top = nix_build(&file, "d1");
    let log = || second.text();
    wait_published(&fx, &top, PUBLISH_WITHIN, &log).await;
    send_signal(second.id(), libc::SIGTERM);
    let second = second.wait(Duration::from_secs(60));
    second.pushed.assert_code(0);
    let text = &second.pushed.stderr;
    assert!(text.contains(&format!("uploaded: {}", top[0])), "{text}");
    // The base is in the new path's closure: the server's presence answer covers it.
    assert!(
        text.contains(&format!("already present: {}", base[0])),
        "{text}"
    );
    assert!(!text.contains(&format!("uploaded: {}", base[0])), "{text}");
    fx.substitute(&top);
}

#[tokio::test]
async fn since_start_false_also_pushes_what_was_valid_before() {
    let fx = Fixture::new();
    let before = common::add_to_store(&[("watch-before.txt", common::nonce().as_bytes())]);
    // Without compression: the whole shared store goes first, and CPU is scarce here.
    let mut watcher = watch_store(&fx, &["--since-start=false", "--compression", "none"]).await;
    watcher
        .wait_for_line("the mark at 0", |l| l.contains("registered after #0"))
        .await;
    let log = || watcher.text();
    wait_published(&fx, &before, Duration::from_secs(120), &log).await;

    // The default leaves it alone.
    let older = common::add_to_store(&[("watch-older.txt", common::nonce().as_bytes())]);
    let newer_watcher = watch_store(&fx, &[]).await;
    let newer = common::add_to_store(&[("watch-newer.txt", common::nonce().as_bytes())]);
    let log = || newer_watcher.text();
    wait_published(&fx, &newer, PUBLISH_WITHIN, &log).await;
    assert!(
        !newer_watcher.text().contains(&older[0]),
        "a path valid before the start was pushed:\n{}",
        newer_watcher.text()
    );
    drop(watcher);
}

/// 200 small builds (20 `nix-build` calls of 10 derivations, each a chain) while one watcher
/// runs; the floor of its resident memory in the last third of the run stays within a few MiB
/// of the first third's, so nothing is kept per path beyond a hash.
///
/// The store is shared with other tests, so the watcher also pushes their paths, some large:
/// glibc is told to map large blocks separately and to return freed memory, so RSS follows
/// live memory instead of the allocator's high-water mark, and each third is judged by its
/// lowest sample, which a transient large upload does not move but a leak does.
#[tokio::test]
async fn watch_store_memory_stays_flat_over_many_builds() {
    let fx = Fixture::new();
    let mut cmd = stowix_nix(&fx, "watch-store", &["--verbose"]);
    cmd.env("MALLOC_MMAP_THRESHOLD_", "65536")
        .env("MALLOC_TRIM_THRESHOLD_", "65536")
        .env("MALLOC_ARENA_MAX", "2");
    let mut watcher = BackgroundPush::spawn(cmd);
    watcher
        .wait_for_line("watching", |l| l.contains("watching the Nix store"))
        .await;
    let pid = watcher.id();
    let log = || watcher.text();
    let mut samples = Vec::new();
    let started = Instant::now();
    for round in 0..20 {
        let drvs: Vec<Drv> = (0..10)
            .map(|i| {
                let drv = Drv::new(
                    &format!("soak-{round}-{i}"),
                    "/usr/bin/head -c 3000 /dev/urandom > $out; echo $dep0 >> $out",
                );
                if i == 0 {
                    Drv::new(
                        &format!("soak-{round}-0"),
                        "/usr/bin/head -c 3000 /dev/urandom > $out",
                    )
                } else {
                    drv.deps(&[i - 1])
                }
            })
            .collect();
        let paths = common::build_derivations(&drvs);
        wait_published(&fx, &paths[9..], PUBLISH_WITHIN, &log).await;
        samples.push(vm_rss_kib(pid));
    }
    eprintln!(
        "200 builds published in {:?}; VmRSS samples (KiB): {samples:?}",
        started.elapsed()
    );
    let third = samples.len() / 3;
    let first = *samples[..third].iter().min().unwrap();
    let last = *samples[samples.len() - third..].iter().min().unwrap();
    // A leak of 32 KiB per path would raise the floor by more than 8 MiB over the ~270 paths
    // (outputs and .drv files) between the thirds.
    assert!(
        last <= first + 8 * 1024,
        "resident memory grew from {first} KiB to {last} KiB: {samples:?}"
    );
    drop(watcher);
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

async fn scrape(listen: &str) -> String {
    let resp = common::http()
        .get(format!("http://{listen}/metrics"))
        .send()
        .await
        .expect("GET the watcher's /metrics");
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}
