//! Helpers of the `push_*` tests on top of `tests/common`: a server with one repository and a
//! push token, and a runner for the real `stowix nix push` binary.

#![allow(dead_code)]

use std::process::{Command, Output, Stdio};

use crate::common::{self, TestServer};

/// A running server with one public repository and tokens for it.
pub struct Fixture {
    pub server: TestServer,
    pub repo: String,
    pub url: String,
    pub public_key: String,
    pub token: String,
}

impl Fixture {
    pub fn new() -> Self {
        Self::on(TestServer::start())
    }

    /// A fixture whose server runs with `toml` as its config file.
    pub fn with_config(toml: &str) -> Self {
        Self::on(TestServer::start_with_config(toml))
    }

    fn on(server: TestServer) -> Self {
        common::require_nix();
        let repo = common::unique_name("push");
        let public_key = server.create_repo(&repo, false);
        let token = server.create_token(&repo, "push");
        let url = server.repo_url(&repo);
        Fixture {
            server,
            repo,
            url,
            public_key,
            token,
        }
    }

    /// `stowix nix push --no-progress ARGS` against this repository with the push token.
    pub fn push(&self, args: &[&str]) -> Pushed {
        push_with(&self.url, Some(&self.token), args, &[])
    }

    /// Substitutes `paths` into a fresh store with signatures required.
    pub fn substitute(&self, paths: &[String]) {
        common::nix_copy_from(&self.url, &self.public_key, paths, None)
            .unwrap_or_else(|e| panic!("nix copy --from failed: {e}"));
    }

    pub async fn received_bytes(&self) -> f64 {
        self.server
            .metric("stowix_server_upload_received_bytes_total")
            .await
    }
}

/// What a `stowix nix push` run left behind.
#[derive(Debug)]
pub struct Pushed {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Pushed {
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "exit code; stderr:\n{}", self.stderr);
        self
    }

    /// The number after `label` in the summary, e.g. `uploaded` in "3 uploaded".
    pub fn summary_count(&self, label: &str) -> u64 {
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("summary:") && l.contains("paths in closure"))
            .unwrap_or_else(|| panic!("no summary in stderr:\n{}", self.stderr));
        line.split([':', ','])
            .filter_map(|part| part.trim().split_once(' '))
            .find(|(_, rest)| rest.starts_with(label))
            .and_then(|(count, _)| count.parse().ok())
            .unwrap_or_else(|| panic!("no count of {label:?} in {line:?}"))
    }
}

/// A push command with a clean environment: only the given target/token and fast retries.
pub fn push_command(target: &str, token: Option<&str>, args: &[&str]) -> Command {
    let mut all = vec!["--no-progress"];
    all.extend_from_slice(args);
    nix_command("push", target, token, &all)
}

/// `stowix nix SUBCOMMAND ARGS` with the clean environment of [`push_command`].
pub fn nix_command(subcommand: &str, target: &str, token: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(common::stowix_bin());
    cmd.args(["nix", subcommand]).args(args);
    for var in [
        "STOWIX_TARGET",
        "STOWIX_TOKEN",
        "STOWIX_JOBS",
        "STOWIX_CHUNK_SIZE",
        "STOWIX_MAX_UPLOAD_RATE",
        "STOWIX_UPSTREAM_KEYS",
        "STOWIX_NO_UPSTREAM_FILTER",
        "STOWIX_NO_BATCH",
    ] {
        cmd.env_remove(var);
    }
    if !target.is_empty() {
        cmd.env("STOWIX_TARGET", target);
    }
    if let Some(token) = token {
        cmd.env("STOWIX_TOKEN", token);
    }
    cmd.env("STOWIX_RETRY_BASE_DELAY_MS", "20");
    cmd.stdin(Stdio::null());
    cmd
}

pub fn push_with(
    target: &str,
    token: Option<&str>,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Pushed {
    let mut cmd = push_command(target, token, args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    finished(cmd.output().expect("run stowix nix push"))
}

pub fn finished(output: Output) -> Pushed {
    Pushed {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// [`push_with`], but a push still running after `limit` is killed and fails the test: for
/// tests whose point is that the push stops (a hang must not hang the suite).
pub fn push_within(
    target: &str,
    token: Option<&str>,
    args: &[&str],
    envs: &[(&str, &str)],
    limit: std::time::Duration,
) -> Pushed {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut cmd = push_command(target, token, args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"));
    let mut child = cmd.spawn().expect("run stowix nix push");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for stowix nix push") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "stowix nix push was still running after {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    Pushed {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// How a background push ended, and when (measured as it was seen to exit).
pub struct Ended {
    pub pushed: Pushed,
    pub at: std::time::Instant,
}

/// A push running in the background whose stderr lines are collected as they come, killed on
/// drop: for tests that act while a push runs (kill it, revoke its token, stop the server).
pub struct BackgroundPush {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundPush {
    pub fn spawn(mut cmd: Command) -> Self {
        use std::io::BufRead as _;
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stowix nix push");
        let stderr = child.stderr.take().expect("child stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        BackgroundPush {
            child,
            lines,
            reader: Some(reader),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything printed so far.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits (polling every 10 ms, up to 60 s) until a line satisfies `cond`; panics if the
    /// push ends first.
    pub async fn wait_for_line(&mut self, what: &str, cond: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.lines.lock().unwrap().iter().any(|l| cond(l)) {
            assert!(
                !self.exited() && std::time::Instant::now() < deadline,
                "no {what} line:\n{}",
                self.text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, then everything it printed. Panics unless the push was still running and
    /// died of the signal: a kill that lands after the push ended on its own tests nothing.
    pub fn kill(mut self, what: &str) -> String {
        use std::os::unix::process::ExitStatusExt as _;
        if let Some(status) = self.child.try_wait().unwrap() {
            self.join_reader();
            panic!(
                "{what}: the push had already ended ({status}) when it was to be killed:\n{}",
                self.text()
            );
        }
        self.child.kill().expect("send SIGKILL");
        let status = self.child.wait().unwrap();
        self.join_reader();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{what}: the push ended with {status}, not by the kill:\n{}",
            self.text()
        );
        self.text()
    }

    /// SIGKILL without checks, for a push that failed a test already.
    pub fn abandon(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_reader();
        self.text()
    }

    /// Waits for the process to exit by itself; past `timeout` it is killed and the test fails.
    pub fn wait(mut self, timeout: std::time::Duration) -> Ended {
        let deadline = std::time::Instant::now() + timeout;
        let (status, at) = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break (status, std::time::Instant::now());
            }
            if std::time::Instant::now() > deadline {
                let text = self.abandon();
                panic!("the push did not end within {timeout:?}:\n{text}");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        self.join_reader();
        Ended {
            pushed: Pushed {
                code: status.code().unwrap_or(-1),
                stdout: String::new(),
                stderr: self.text(),
            },
            at,
        }
    }

    fn join_reader(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for BackgroundPush {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
