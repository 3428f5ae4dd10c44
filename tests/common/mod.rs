//! Shared harness of the integration tests: the real `stowix` binary, real Nix, real HTTP.
//!
//! ```text
//!   TestServer ── spawns `stowix serve --listen 127.0.0.1:0 --data-dir <tmp>/data`
//!      │            first stdout line `listening on http://…` -> url
//!      │            stdout + stderr ──► <tmp>/server.log (printed when a test panics)
//!      ├─ admin(&[..]) / create_repo / create_token   (`stowix admin --data-dir`)
//!      └─ kill / terminate / restart / metric
//!
//!   Nix fixtures ── build_derivations([Drv]) ──► nix-build ──► input-addressed store paths
//!                   add_to_store(files)       ──► nix-store --add ──► content-addressed paths
//!                   realistic_closure()       ──► a small DAG with every kind of file
//!
//!   Checks ── nix_copy_from (fresh chroot store, require-sigs, only the repo key trusted,
//!             NAR hashes compared with the local store), nix_copy_to (netrc token)
//!   Push API by hand ── LocalPath (NAR, xz, hashes), upload_single, publish, presence
//! ```
//!
//! Every helper panics with a message naming what failed: tests never pass silently because
//! Nix or the server is missing. Each test makes its own server, repositories and store paths
//! (a random nonce goes into every derivation), so tests run in parallel.

#![allow(dead_code)]

pub mod backends;
pub mod invariants;
pub mod monitoring;
pub mod s3;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use stowix::api;

/// How long the server may take to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `stowix` binary Cargo built for these tests.
pub fn stowix_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stowix"))
}

/// A `stowix` command with no arguments yet, for tests of other subcommands.
pub fn stowix_command() -> Command {
    Command::new(stowix_bin())
}

/// Panics unless Nix is installed: the tests that need it must fail, not skip, without it.
pub fn require_nix() {
    for tool in ["nix-store", "nix-build", "nix"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "`{tool}` is not installed or not on PATH: these tests need real Nix \
             (`apt-get install nix-bin` on Debian; `.ci/run` does it)"
        );
    }
}

/// A random lowercase alphanumeric string, for unique repository names and derivations.
pub fn nonce() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..12)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// A repository name unique to this test run, starting with `prefix`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", nonce())
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// A running `stowix serve` on 127.0.0.1 with a temporary data directory, killed on drop.
pub struct TestServer {
    /// Holds `data/`, `server.log` and `config.toml`; deleted on drop.
    root: tempfile::TempDir,
    data_dir: PathBuf,
    config: Option<PathBuf>,
    log_path: PathBuf,
    log: Arc<Mutex<fs::File>>,
    child: Option<Child>,
    url: String,
    /// The database and bucket prefix on the scale-out backend (shared with replicas); None on
    /// the embedded one, where everything is under `data_dir`.
    scaleout: Option<Arc<backends::ScaleoutBackends>>,
    /// Extra environment of `serve` and `admin` (S3 credentials).
    env: Vec<(String, String)>,
}

impl TestServer {
    /// Starts a server with default settings, on the backend of this run
    /// ([`backends::backend`]).
    pub fn start() -> Self {
        Self::start_inner(None, Self::run_backends())
    }

    /// Starts a server with `toml` as its `--config` file (`--listen` and `--data-dir` are
    /// still given on the command line and override the file).
    pub fn start_with_config(toml: &str) -> Self {
        Self::start_inner(Some(toml), Self::run_backends())
    }

    /// Starts a server on fresh scale-out backends (PostgreSQL + S3) whatever the run's
    /// backend: for tests of replicas, which only exist there.
    pub fn start_scaleout(toml: Option<&str>) -> Self {
        Self::start_inner(toml, Some(backends::ScaleoutBackends::new()))
    }

    /// Starts another replica sharing `first`'s database and bucket prefix (its own data dir,
    /// log and port). Panics when `first` runs on the embedded backend.
    pub fn start_replica_of(first: &TestServer, toml: Option<&str>) -> Self {
        let shared = first
            .scaleout
            .clone()
            .expect("replicas share scale-out backends: start the first with start_scaleout");
        Self::start_inner(toml, Some(shared))
    }

    /// Starts a server on the run's backend with `toml` as its config and `env` added to its
    /// environment and to that of `stowix admin` runs (e.g. `STOWIX_CLOCK_FILE`).
    pub fn start_with_config_env(toml: &str, env: Vec<(String, String)>) -> Self {
        Self::start_env(Some(toml), Self::run_backends(), env)
    }

    fn run_backends() -> Option<Arc<backends::ScaleoutBackends>> {
        match backends::backend() {
            backends::Backend::Embedded => None,
            backends::Backend::Scaleout => Some(backends::ScaleoutBackends::new()),
        }
    }

    /// Starts a server with `toml` as its config file and `env` added to its environment (and
    /// to that of `stowix admin` runs): how the S3 tests hand over credentials. The backends
    /// are the ones `toml` names, whatever the run's backend.
    pub fn start_with_env(toml: &str, env: Vec<(String, String)>) -> Self {
        Self::start_env(Some(toml), None, env)
    }

    fn start_inner(toml: Option<&str>, scaleout: Option<Arc<backends::ScaleoutBackends>>) -> Self {
        Self::start_env(toml, scaleout, Vec::new())
    }

    fn start_env(
        toml: Option<&str>,
        scaleout: Option<Arc<backends::ScaleoutBackends>>,
        env: Vec<(String, String)>,
    ) -> Self {
        let root = tempfile::Builder::new()
            .prefix("stowix-test-")
            .tempdir()
            .expect("create temp dir");
        let data_dir = root.path().join("data");
        fs::create_dir(&data_dir).expect("create data dir");
        let config = toml.map(|text| {
            let path = root.path().join("config.toml");
            fs::write(&path, text).expect("write config");
            path
        });
        let log_path = root.path().join("server.log");
        let log = Arc::new(Mutex::new(
            fs::File::create(&log_path).expect("create server log"),
        ));
        let mut server = TestServer {
            root,
            data_dir,
            config,
            log_path,
            log,
            child: None,
            url: String::new(),
            scaleout,
            env,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        self.spawn_on("127.0.0.1:0");
    }

    fn spawn_on(&mut self, listen: &str) {
        let mut cmd = Command::new(stowix_bin());
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(&self.data_dir);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        if let Some(backends) = &self.scaleout {
            backends.apply(&mut cmd);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn `stowix serve`");
        let stdout = child.stdout.take().expect("child stdout");
        let stderr = child.stderr.take().expect("child stderr");

        let (tx, rx) = mpsc::channel::<String>();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            let mut first = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(tx) = first.take() {
                    let _ = tx.send(line.clone());
                }
                let _ = writeln!(log.lock().unwrap(), "[stdout] {line}");
            }
        });
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log.lock().unwrap(), "{line}");
            }
        });

        self.child = Some(child);
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!(
                    "`stowix serve` printed no first line within {START_TIMEOUT:?} ({e}); \
                     exit status {status:?}\n--- server log ---\n{}",
                    self.log_text()
                );
            }
        };
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "first stdout line of `stowix serve` is {line:?}, expected \
                     `listening on http://127.0.0.1:PORT`"
                )
            })
            .trim()
            .trim_end_matches('/')
            .to_string();
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "unexpected listen URL {url:?}"
        );
        self.url = url;
    }

    /// The `--config` file the server was started with, if any (`stowix admin` runs are not
    /// given it: pass it when the command reads settings, e.g. `admin gc`'s grace periods).
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// `http://127.0.0.1:PORT/<name>`: the substituter URL and push target of a repository.
    pub fn repo_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    /// The embedded backend's data dir, for tests that inspect it. On the scale-out backend
    /// the server keeps nothing there that such a test could check, so this panics: run the
    /// test on the embedded backend only (scripts/test.sh lists what runs on scale-out).
    pub fn data_dir(&self) -> &Path {
        self.embedded_dir()
    }

    /// The temporary directory holding the data dir, the log and the config (embedded backend
    /// only, like [`TestServer::data_dir`]).
    pub fn root(&self) -> &Path {
        self.embedded_dir();
        self.root.path()
    }

    fn embedded_dir(&self) -> &Path {
        assert!(
            self.scaleout.is_none(),
            "this test inspects the embedded data dir, which the scale-out backend does not \
             use: leave it out of the STOWIX_TEST_BACKEND=scaleout run in scripts/test.sh"
        );
        &self.data_dir
    }

    /// Everything the server wrote to stdout and stderr so far.
    pub fn log_text(&self) -> String {
        let _guard = self.log.lock().unwrap();
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Runs `stowix admin --data-dir DIR [backend flags] ARGS...` and returns its raw output.
    pub fn admin_output(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(stowix_bin());
        cmd.arg("admin").arg("--data-dir").arg(&self.data_dir);
        if let Some(backends) = &self.scaleout {
            backends.apply(&mut cmd);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.args(args).output().expect("run `stowix admin`")
    }

    /// [`TestServer::admin`] with `--config` of the file the server was started with, so the
    /// command sees the server's settings (graces, storage) too.
    pub fn admin_with_config(&self, args: &[&str]) -> String {
        let config = self
            .config_path()
            .expect("the server was started with a config file")
            .display()
            .to_string();
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        self.admin(&all)
    }

    /// Runs `stowix admin --data-dir DIR ARGS...`, panics unless it succeeds, returns stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = self.admin_output(args);
        assert!(
            out.status.success(),
            "`stowix admin {}` failed with {}\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("admin stdout is UTF-8")
    }

    /// Creates a repository and returns its public key `NAME:BASE64`.
    pub fn create_repo(&self, name: &str, private: bool) -> String {
        let mut args = vec!["repo", "create", name];
        if private {
            args.push("--private");
        }
        let key = self.admin(&args).trim().to_string();
        let (key_name, b64) = key
            .split_once(':')
            .unwrap_or_else(|| panic!("`repo create` printed {key:?}, expected NAME:BASE64"));
        assert!(!key_name.is_empty(), "public key {key:?} has no name");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_else(|e| panic!("public key {key:?} is not base64: {e}"));
        assert_eq!(raw.len(), 32, "public key {key:?} is not 32 bytes");
        key
    }

    /// Creates a token with `scope` (`push` or `read`) for `repo` and returns it.
    pub fn create_token(&self, repo: &str, scope: &str) -> String {
        let token = self
            .admin(&["token", "create", "--repo", repo, "--scope", scope])
            .trim()
            .to_string();
        assert!(
            token_id(&token).is_some(),
            "`token create` printed {token:?}, expected stx_live_<26>_<24>"
        );
        token
    }

    /// Kills the server with SIGKILL (a crash) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the server to exit; returns its status.
    /// Panics (after a SIGKILL) when it does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("server is not running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait for server") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not exit within {timeout:?} of SIGTERM\n--- server log ---\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server if it runs (SIGKILL) and starts it again on the same data dir and
    /// config. The port may change: use [`TestServer::url`] afterwards.
    pub fn restart(&mut self) {
        self.kill();
        let _ = writeln!(self.log.lock().unwrap(), "=== restart ===");
        self.spawn();
    }

    /// Like [`TestServer::restart`], on the same port: a client that was talking to the old
    /// process can reach the new one (a server restart as an operator would do it).
    pub fn restart_same_port(&mut self) {
        let addr = self.addr();
        self.kill();
        let _ = writeln!(self.log.lock().unwrap(), "=== restart on {addr} ===");
        self.spawn_on(&addr);
    }

    /// Current value of a metric from `/metrics`. `query` is a name (the sum over all its
    /// label sets is returned) or `name{label="value",...}` (the sum over the label sets that
    /// contain all the given labels). Absent metrics count as 0.
    pub async fn metric(&self, query: &str) -> f64 {
        let text = self.metrics_text().await;
        sum_metric(&text, query)
    }

    /// The raw `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        let resp = http()
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(resp.status(), 200, "GET /metrics");
        resp.text().await.expect("read /metrics")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- stowix serve log ({}) ---\n{}--- end of server log ---",
                self.url,
                self.log_text()
            );
        }
    }
}

/// The 26-character id part of a well-formed token `stx_live_<26 [a-z0-9]>_<24 [A-Za-z0-9]>`.
pub fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("stx_live_")?;
    let (id, secret) = rest.split_once('_')?;
    let ok = id.len() == 26
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && secret.len() == 24
        && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    ok.then_some(id)
}

/// Sums the samples of a Prometheus text exposition that match `query` (see
/// [`TestServer::metric`]).
pub fn sum_metric(text: &str, query: &str) -> f64 {
    let (want_name, want_labels) = split_sample(query);
    let mut sum = 0.0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = split_sample(series.trim());
        if name == want_name && want_labels.is_subset(&labels) {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

fn split_sample(series: &str) -> (&str, BTreeSet<(String, String)>) {
    let Some((name, rest)) = series.split_once('{') else {
        return (series, BTreeSet::new());
    };
    let body = rest.trim_end_matches('}');
    let mut labels = BTreeSet::new();
    // Label values in our metrics never contain `,` or `"` escapes.
    for pair in body.split(',') {
        if let Some((k, v)) = pair.split_once('=') {
            labels.insert((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
        }
    }
    (name, labels)
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// An async HTTP client with a generous timeout and no proxy.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .no_proxy()
        .build()
        .expect("build reqwest client")
}

/// `Authorization: Bearer <token>` header value.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `Authorization: Basic base64(login:token)` header value, as curl sends it from a netrc.
pub fn basic(token: &str) -> String {
    let raw = format!("nix:{token}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Parses an error answer, panicking with the body when it is not an [`api::ApiError`].
pub async fn api_error(resp: reqwest::Response) -> (u16, api::ApiError) {
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("read error body");
    let err = serde_json::from_str::<api::ApiError>(&body).unwrap_or_else(|e| {
        panic!("status {status} body is not an ApiError {{code, message}} ({e}): {body:?}")
    });
    (status, err)
}

/// Asserts that an oversized request is refused: a `413 payload_too_large` answer, or the
/// server closing the connection while the body is still being sent (an HTTP server may stop
/// reading a body it will not accept). Any other answer fails.
pub async fn assert_too_large(resp: reqwest::Result<reqwest::Response>, what: &str) {
    match resp {
        Ok(resp) => {
            let (status, err) = api_error(resp).await;
            assert_eq!(
                (status, err.code.as_str()),
                (413, api::codes::PAYLOAD_TOO_LARGE),
                "{what}: {err:?}"
            );
        }
        Err(e) => {
            assert!(
                !e.is_timeout() && (e.is_request() || e.is_body() || e.is_connect()),
                "{what}: unexpected transport error {e}"
            );
        }
    }
}

/// A raw HTTP/1.1 exchange on a fresh TCP connection, for request targets that an HTTP
/// client would normalise (`..`, `%2e%2e`). Returns (status, body).
pub async fn raw_request(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to server");
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .expect("write request");
    stream.write_all(body).await.expect("write body");
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut resp))
        .await
        .expect("server answered within 30 s")
        .expect("read response");
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no HTTP status in answer to {method} {target}: {text:?}"));
    let body_start = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(resp.len());
    (status, resp[body_start..].to_vec())
}

// ---------------------------------------------------------------------------------------------
// Hashes and compression (independent of the crate's own implementations, as an oracle)
// ---------------------------------------------------------------------------------------------

const NIX32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// nixbase32 of `bytes`.
pub fn nix32(bytes: &[u8]) -> String {
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let lo = bytes[i] as u16;
        let hi = bytes.get(i + 1).copied().unwrap_or(0) as u16;
        let v = ((lo | (hi << 8)) >> j) & 0x1f;
        out.push(NIX32_ALPHABET[v as usize] as char);
    }
    out
}

/// `sha256:<nix32>` of `bytes`, as narinfo and the push API write hashes.
pub fn sha256_nix32(bytes: &[u8]) -> String {
    format!("sha256:{}", nix32(&Sha256::digest(bytes)))
}

/// xz (level 6) as Nix writes `.nar.xz`.
pub fn xz(bytes: &[u8]) -> Vec<u8> {
    let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 6);
    enc.write_all(bytes).expect("xz encode");
    enc.finish().expect("xz finish")
}

pub fn unxz(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    liblzma::read::XzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("xz decode");
    out
}

// ---------------------------------------------------------------------------------------------
// Nix fixtures
// ---------------------------------------------------------------------------------------------

/// One derivation for [`build_derivations`]: `script` runs under `/bin/sh -c` with an empty
/// PATH (use `/usr/bin/head`, `/usr/bin/mkdir`, ...), `$out` is the output, and `$dep0`,
/// `$dep1`, ... are the outputs of the earlier derivations listed in `deps` (by index).
/// Writing a `$depN` path into `$out` makes a runtime reference; `$out` a self-reference.
#[derive(Clone, Debug)]
pub struct Drv {
    pub name: String,
    pub script: String,
    pub deps: Vec<usize>,
}

impl Drv {
    pub fn new(name: &str, script: &str) -> Self {
        Drv {
            name: name.to_string(),
            script: script.to_string(),
            deps: Vec::new(),
        }
    }
    pub fn deps(mut self, deps: &[usize]) -> Self {
        self.deps = deps.to_vec();
        self
    }
}

/// Escapes `s` for a double-quoted Nix string (so `$out` stays a shell variable).
fn nix_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Nix expression whose attributes `d0`, `d1`, ... are `drvs` (builder /bin/sh, input
/// addressed, with a fresh nonce so nothing is built before) and whose `all` lists them in
/// order.
pub fn derivations_expr(drvs: &[Drv]) -> String {
    let nonce = nonce();
    let mut expr = String::from("rec {\n");
    for (i, d) in drvs.iter().enumerate() {
        let mut deps = String::new();
        for (k, dep) in d.deps.iter().enumerate() {
            assert!(*dep < i, "Drv {i} depends on {dep}, which is not earlier");
            deps.push_str(&format!(" dep{k} = d{dep};"));
        }
        expr.push_str(&format!(
            "  d{i} = derivation {{ name = {}; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [ \"-c\" {} ]; nonce = \"{nonce}\";{deps} }};\n",
            nix_string(&d.name),
            nix_string(&d.script)
        ));
    }
    expr.push_str("  all = [");
    for i in 0..drvs.len() {
        expr.push_str(&format!(" d{i}"));
    }
    expr.push_str(" ];\n}\n");
    expr
}

/// Builds `drvs` with `nix-build` (input-addressed outputs, fresh for every call thanks to a
/// random nonce) and returns their output paths in the same order.
pub fn build_derivations(drvs: &[Drv]) -> Vec<String> {
    require_nix();
    let expr = derivations_expr(drvs);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("fixture.nix");
    fs::write(&file, &expr).expect("write fixture.nix");
    let out = Command::new("nix-build")
        .arg(&file)
        .args(["-A", "all"])
        .arg("--no-out-link")
        .args(["--option", "substituters", ""])
        .output()
        .expect("run nix-build");
    assert!(
        out.status.success(),
        "nix-build failed ({}):\n{}\nexpression:\n{expr}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let paths: Vec<String> = String::from_utf8(out.stdout)
        .expect("nix-build output")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(paths.len(), drvs.len(), "nix-build printed {paths:?}");
    paths
}

/// One input-addressed store path holding a file with `text` (a line of printable ASCII).
pub fn build_text(name: &str, text: &str) -> String {
    let script = format!("echo '{}' > $out", text.replace('\'', ""));
    build_derivations(&[Drv::new(name, &script)]).remove(0)
}

/// One input-addressed store path holding `size` random (incompressible) bytes.
pub fn build_random(name: &str, size: u64) -> String {
    let script = format!("/usr/bin/head -c {size} /dev/urandom > $out");
    build_derivations(&[Drv::new(name, &script)]).remove(0)
}

/// Two input-addressed paths `[dependency, dependent]`, the second referring to the first.
pub fn build_pair() -> (String, String) {
    let paths = build_derivations(&[
        Drv::new("dep", "echo dependency > $out"),
        Drv::new("top", "echo $dep0 > $out").deps(&[0]),
    ]);
    (paths[0].clone(), paths[1].clone())
}

/// A small realistic closure of input-addressed paths, dependencies first, the root last:
/// directories with nested files, an empty file and directory, an executable, relative,
/// absolute and dangling symlinks, a self-reference, a root that is a symlink, names with
/// `+`, `=` and `?`, an incompressible 300 KiB file, and references across the DAG.
pub fn realistic_closure() -> Vec<String> {
    let lib = "/usr/bin/mkdir -p $out/lib $out/share/doc/empty-dir $out/include && \
               /usr/bin/head -c 4000 /dev/urandom > $out/lib/libfoo.so.1 && \
               /usr/bin/ln -s libfoo.so.1 $out/lib/libfoo.so && \
               echo 'Hello, README' > $out/share/doc/README && \
               : > $out/include/empty.h && \
               echo $out > $out/share/self-reference";
    let data = "/usr/bin/head -c 307200 /dev/urandom > $out";
    let tool = "/usr/bin/mkdir -p $out/bin $out/etc && \
                echo '#!/bin/sh' > $out/bin/hello && \
                echo \"LD_LIBRARY_PATH=$dep0/lib exec /bin/cat $dep1\" >> $out/bin/hello && \
                /usr/bin/chmod 0755 $out/bin/hello && \
                /usr/bin/ln -s hello $out/bin/hi && \
                /usr/bin/ln -s $dep0/lib/libfoo.so.1 $out/etc/abs-link && \
                /usr/bin/ln -s /nonexistent/target $out/etc/dangling && \
                echo 'mode 0655' > $out/etc/not-exec && /usr/bin/chmod 0655 $out/etc/not-exec && \
                echo $out/bin/hello > $out/etc/self";
    let link = "/usr/bin/ln -s $dep0/bin/hello $out";
    let env = "/usr/bin/mkdir -p $out/nix-support && \
               echo $dep0 $dep1 $dep2 > $out/nix-support/propagated && \
               /usr/bin/ln -s $dep1 $out/tool";
    build_derivations(&[
        Drv::new("libfoo+extra-1.0", lib),
        Drv::new("data=blob?v1", data),
        Drv::new("tool++", tool).deps(&[0, 1]),
        Drv::new("hello-link", link).deps(&[2]),
        Drv::new("env+profile", env).deps(&[0, 2, 3]),
    ])
}

/// Adds files to the store with `nix-store --add` (content-addressed paths: Nix accepts them
/// without a signature, so never use them to test signatures). Returns their store paths.
pub fn add_to_store(files: &[(&str, &[u8])]) -> Vec<String> {
    require_nix();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut args = Vec::new();
    for (name, content) in files {
        let p = dir.path().join(name);
        fs::write(&p, content).expect("write file to add");
        args.push(p);
    }
    let out = Command::new("nix-store")
        .arg("--add")
        .args(&args)
        .output()
        .expect("run nix-store --add");
    assert!(
        out.status.success(),
        "nix-store --add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The runtime closure of `paths` in the local store (`nix-store -qR`).
pub fn closure_of(paths: &[String]) -> Vec<String> {
    let out = Command::new("nix-store")
        .arg("-qR")
        .args(paths)
        .output()
        .expect("run nix-store -qR");
    assert!(
        out.status.success(),
        "nix-store -qR failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `nix-store --dump` of any path on disk (a store path, or one inside a chroot store).
pub fn nix_store_dump(path: &Path) -> Vec<u8> {
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("run nix-store --dump");
    assert!(
        out.status.success(),
        "nix-store --dump {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Metadata of a local store path and its NAR, enough to push it by hand.
#[derive(Clone, Debug)]
pub struct LocalPath {
    /// Absolute store path.
    pub path: String,
    /// The 32-character hash part.
    pub hash: String,
    pub nar: Vec<u8>,
    /// `sha256:<nix32>`.
    pub nar_hash: String,
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
}

impl LocalPath {
    /// Reads `path` from the local store (`nix path-info --json`, `nix-store --dump`) and
    /// checks that the dump hashes to the narHash Nix registered.
    pub fn load(path: &str) -> Self {
        let out = Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
            ])
            .arg(path)
            .output()
            .expect("run nix path-info");
        assert!(
            out.status.success(),
            "nix path-info {path} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("path-info json");
        // Nix <= 2.18: an array; 2.19+: an object keyed by path.
        let info = match &json {
            serde_json::Value::Array(a) => a[0].clone(),
            serde_json::Value::Object(o) => o.values().next().cloned().expect("one entry"),
            other => panic!("unexpected path-info output {other}"),
        };
        let sri = info["narHash"].as_str().expect("narHash").to_string();
        let nar = nix_store_dump(Path::new(path));
        let nar_hash = sha256_nix32(&nar);
        let expected = sri_to_nix32(&sri);
        assert_eq!(
            nar_hash, expected,
            "dump of {path} does not match its narHash"
        );
        assert_eq!(info["narSize"].as_u64(), Some(nar.len() as u64));
        let references = info["references"]
            .as_array()
            .expect("references")
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        LocalPath {
            path: path.to_string(),
            hash: hash_part(path).to_string(),
            nar,
            nar_hash,
            references,
            deriver: info["deriver"].as_str().map(str::to_string),
            ca: info["ca"].as_str().map(str::to_string),
        }
    }

    pub fn nar_size(&self) -> u64 {
        self.nar.len() as u64
    }

    /// The publication entry of this path as a client sends it.
    pub fn publish_entry(&self) -> api::PublishEntry {
        api::PublishEntry {
            store_path: self.path.clone(),
            nar_hash: self.nar_hash.clone(),
            nar_size: self.nar_size(),
            references: self.references.clone(),
            deriver: self.deriver.clone(),
            ca: self.ca.clone(),
            signatures: Vec::new(),
        }
    }

    pub fn presence_query(&self) -> api::PresenceQuery {
        api::PresenceQuery {
            hash: self.hash.clone(),
            nar_hash: self.nar_hash.clone(),
        }
    }

    /// The NAR compressed with xz, and the upload parameters describing it.
    pub fn xz_upload(&self) -> (Vec<u8>, api::NarUploadParams) {
        let file = xz(&self.nar);
        let params = api::NarUploadParams {
            nar_hash: self.nar_hash.clone(),
            nar_size: self.nar_size(),
            compression: "xz".to_string(),
            file_hash: sha256_nix32(&file),
            file_size: file.len() as u64,
        };
        (file, params)
    }
}

/// `sha256-<base64>` (SRI) -> `sha256:<nix32>`.
pub fn sri_to_nix32(sri: &str) -> String {
    let b64 = sri
        .strip_prefix("sha256-")
        .unwrap_or_else(|| panic!("{sri:?} is not a sha256 SRI hash"));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("SRI base64");
    format!("sha256:{}", nix32(&raw))
}

/// The 32-character hash part of an absolute store path.
pub fn hash_part(path: &str) -> &str {
    let base = path.strip_prefix("/nix/store/").expect("a /nix/store path");
    &base[..32]
}

// ---------------------------------------------------------------------------------------------
// Push API by hand
// ---------------------------------------------------------------------------------------------

/// `http://…/<repo>/api/v1/<route>`.
pub fn api_url(repo_url: &str, route: &str) -> String {
    format!("{repo_url}/{}/{route}", api::API_PREFIX)
}

/// `POST api/v1/nars` of one whole compressed NAR; returns the raw answer.
pub async fn post_nar(
    repo_url: &str,
    token: &str,
    params: &api::NarUploadParams,
    file: Vec<u8>,
) -> reqwest::Response {
    http()
        .post(api_url(repo_url, "nars"))
        .query(params)
        .header("Authorization", bearer(token))
        .header("Content-Type", "application/octet-stream")
        .body(file)
        .send()
        .await
        .expect("POST api/v1/nars")
}

/// Uploads the xz NAR of `path` in one request; panics unless it is stored.
pub async fn upload_single(repo_url: &str, token: &str, path: &LocalPath) -> api::NarStored {
    let (file, params) = path.xz_upload();
    let resp = post_nar(repo_url, token, &params, file).await;
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert!(
        status.is_success(),
        "upload of {} answered {status}: {body}",
        path.path
    );
    let stored: api::NarStored = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("upload answer is not NarStored ({e}): {body}"));
    assert_eq!(stored.nar_hash, params.nar_hash);
    assert_eq!(stored.file_hash, params.file_hash);
    assert_eq!(stored.file_size, params.file_size);
    stored
}

/// `POST api/v1/narinfos`; returns the raw answer.
pub async fn post_publish(
    repo_url: &str,
    token: &str,
    entries: Vec<api::PublishEntry>,
) -> reqwest::Response {
    http()
        .post(api_url(repo_url, "narinfos"))
        .header("Authorization", bearer(token))
        .json(&api::PublishRequest {
            narinfos: entries,
            upstream: vec![],
        })
        .send()
        .await
        .expect("POST api/v1/narinfos")
}

/// Publishes `paths` and returns the parsed answer (whatever its status).
pub async fn publish(repo_url: &str, token: &str, paths: &[&LocalPath]) -> api::PublishResponse {
    let entries = paths.iter().map(|p| p.publish_entry()).collect();
    let resp = post_publish(repo_url, token, entries).await;
    let status = resp.status();
    let body = resp.text().await.unwrap();
    serde_json::from_str(&body).unwrap_or_else(|e| {
        panic!("publish answered {status} with a non-PublishResponse ({e}): {body}")
    })
}

/// Uploads and publishes `paths` (dependencies first or not: one publication request),
/// panicking unless every one is published.
pub async fn push_paths(repo_url: &str, token: &str, paths: &[&LocalPath]) {
    for p in paths {
        upload_single(repo_url, token, p).await;
    }
    let resp = publish(repo_url, token, paths).await;
    assert!(resp.rejected.is_empty(), "publication rejected: {resp:?}");
    let mut done: Vec<String> = resp.published.clone();
    done.extend(resp.already_published.clone());
    for p in paths {
        assert!(done.contains(&p.hash), "{} not published: {resp:?}", p.path);
    }
}

/// `POST api/v1/presence` for `paths`; panics unless it succeeds.
pub async fn presence(repo_url: &str, token: &str, paths: &[&LocalPath]) -> api::PresenceResponse {
    let req = api::PresenceRequest {
        paths: paths.iter().map(|p| p.presence_query()).collect(),
    };
    let resp = http()
        .post(api_url(repo_url, "presence"))
        .header("Authorization", bearer(token))
        .json(&req)
        .send()
        .await
        .expect("POST api/v1/presence");
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert!(status.is_success(), "presence answered {status}: {body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("presence answer is not a PresenceResponse ({e}): {body}"))
}

/// `POST api/v1/uploads`; returns the raw answer.
pub async fn post_create_upload(
    repo_url: &str,
    token: &str,
    create: &api::CreateUpload,
) -> reqwest::Response {
    http()
        .post(api_url(repo_url, "uploads"))
        .header("Authorization", bearer(token))
        .json(create)
        .send()
        .await
        .expect("POST api/v1/uploads")
}

/// `POST api/v1/uploads`, panicking unless it succeeds.
pub async fn create_upload(
    repo_url: &str,
    token: &str,
    create: &api::CreateUpload,
) -> api::UploadState {
    let resp = post_create_upload(repo_url, token, create).await;
    parse_ok(resp, "POST api/v1/uploads").await
}

/// A resumable-upload request for the NAR of `path` with xz compression.
pub fn xz_create_upload(path: &LocalPath) -> api::CreateUpload {
    api::CreateUpload {
        nar_hash: path.nar_hash.clone(),
        nar_size: path.nar_size(),
        compression: "xz".to_string(),
        encoder: "stowix-tests-xz-6".to_string(),
    }
}

/// `GET api/v1/uploads/<id>`; returns the raw answer.
pub async fn get_upload_raw(repo_url: &str, token: &str, id: &str) -> reqwest::Response {
    http()
        .get(api_url(repo_url, &format!("uploads/{id}")))
        .header("Authorization", bearer(token))
        .send()
        .await
        .expect("GET api/v1/uploads/<id>")
}

/// `GET api/v1/uploads/<id>`, panicking unless it succeeds.
pub async fn get_upload(repo_url: &str, token: &str, id: &str) -> api::UploadState {
    let resp = get_upload_raw(repo_url, token, id).await;
    parse_ok(resp, "GET api/v1/uploads/<id>").await
}

/// `PATCH api/v1/uploads/<id>` with `Upload-Offset: offset`; returns the raw answer.
pub async fn patch_chunk(
    repo_url: &str,
    token: &str,
    id: &str,
    offset: u64,
    chunk: Vec<u8>,
) -> reqwest::Response {
    http()
        .patch(api_url(repo_url, &format!("uploads/{id}")))
        .header("Authorization", bearer(token))
        .header(api::UPLOAD_OFFSET_HEADER, offset.to_string())
        .header("Content-Type", "application/octet-stream")
        .body(chunk)
        .send()
        .await
        .expect("PATCH api/v1/uploads/<id>")
}

/// Sends `file[from..]` in chunks of at most `chunk_size` bytes, checking the offset the
/// server answers after each one.
pub async fn patch_rest(
    repo_url: &str,
    token: &str,
    id: &str,
    file: &[u8],
    from: u64,
    chunk_size: usize,
) {
    let mut offset = from as usize;
    while offset < file.len() {
        let end = (offset + chunk_size).min(file.len());
        let resp = patch_chunk(
            repo_url,
            token,
            id,
            offset as u64,
            file[offset..end].to_vec(),
        )
        .await;
        let state: api::UploadState = parse_ok(resp, "PATCH api/v1/uploads/<id>").await;
        assert_eq!(
            state.offset, end as u64,
            "offset after a chunk {offset}..{end}"
        );
        offset = end;
    }
}

/// Starts a `PATCH api/v1/uploads/<id>` announcing `Content-Length: announced` but sends
/// only `partial`, and returns the open connection: a stalled client. Drop the stream to
/// lose the connection.
pub async fn start_partial_patch(
    repo_url: &str,
    token: &str,
    id: &str,
    offset: u64,
    announced: usize,
    partial: &[u8],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let parsed = url::Url::parse(repo_url).expect("repo url");
    let addr = format!(
        "{}:{}",
        parsed.host_str().unwrap(),
        parsed.port_or_known_default().unwrap()
    );
    let target = format!("{}/{}/uploads/{id}", parsed.path(), api::API_PREFIX);
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "PATCH {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         {}: {offset}\r\nContent-Type: application/octet-stream\r\nContent-Length: {announced}\r\n\r\n",
        api::UPLOAD_OFFSET_HEADER
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(partial).await.expect("write partial body");
    stream.flush().await.expect("flush");
    stream
}

/// Like [`start_partial_patch`], then drops the connection after a moment: a client losing
/// its network mid-chunk.
pub async fn patch_then_drop_connection(
    repo_url: &str,
    token: &str,
    id: &str,
    offset: u64,
    announced: usize,
    partial: &[u8],
) {
    let stream = start_partial_patch(repo_url, token, id, offset, announced, partial).await;
    // Let the server read what was sent before the connection goes away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stream);
}

/// Polls `GET api/v1/uploads/<id>` until the offset stops changing (the server may still be
/// settling an aborted chunk) and returns the settled state.
pub async fn settled_upload_state(repo_url: &str, token: &str, id: &str) -> api::UploadState {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last: Option<api::UploadState> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let resp = get_upload_raw(repo_url, token, id).await;
        if resp.status().is_success() {
            let state: api::UploadState = resp.json().await.expect("UploadState");
            if last.as_ref() == Some(&state) {
                return state;
            }
            last = Some(state);
        }
        assert!(
            Instant::now() < deadline,
            "upload {id} state did not settle: last {last:?}"
        );
    }
}

/// `POST api/v1/uploads/<id>/complete`; returns the raw answer.
pub async fn complete_upload(
    repo_url: &str,
    token: &str,
    id: &str,
    complete: &api::CompleteUpload,
) -> reqwest::Response {
    http()
        .post(api_url(repo_url, &format!("uploads/{id}/complete")))
        .header("Authorization", bearer(token))
        .json(complete)
        .send()
        .await
        .expect("POST api/v1/uploads/<id>/complete")
}

/// Parses a 2xx JSON answer, panicking with the status and body otherwise.
pub async fn parse_ok<T: serde::de::DeserializeOwned>(resp: reqwest::Response, what: &str) -> T {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "{what} answered {status}: {body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{what}: unexpected answer ({e}): {body}"))
}

/// `GET api/v1/info` with `token`.
pub async fn repo_info(repo_url: &str, token: &str) -> api::RepoInfo {
    let resp = http()
        .get(api_url(repo_url, "info"))
        .header("Authorization", bearer(token))
        .send()
        .await
        .expect("GET api/v1/info");
    parse_ok(resp, "GET api/v1/info").await
}

/// True when some file under `dir` holds exactly `bytes` (to prove a rejected NAR was not
/// stored under any name).
pub fn dir_contains_file_with(dir: &Path, bytes: &[u8]) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if dir_contains_file_with(&path, bytes) {
                return true;
            }
        } else if meta.is_file()
            && meta.len() == bytes.len() as u64
            && fs::read(&path).map(|b| b == bytes).unwrap_or(false)
        {
            return true;
        }
    }
    false
}

/// Every file and directory below `dir`, relative to it.
pub fn list_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

/// GET of `<repo>/<hash>.narinfo` without credentials: (status, body).
pub async fn get_narinfo(repo_url: &str, hash: &str) -> (u16, String) {
    let resp = http()
        .get(format!("{repo_url}/{hash}.narinfo"))
        .send()
        .await
        .expect("GET narinfo");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Value of the first `key: value` line of a narinfo.
pub fn narinfo_field<'a>(narinfo: &'a str, key: &str) -> Option<&'a str> {
    narinfo.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(": "))
            .or_else(|| (l == format!("{key}:")).then_some(""))
    })
}

// ---------------------------------------------------------------------------------------------
// Real Nix against the server
// ---------------------------------------------------------------------------------------------

/// A netrc file in `dir` giving `token` as the password for `repo_url`'s host.
pub fn netrc_file(dir: &Path, repo_url: &str, token: &str) -> PathBuf {
    let host = url::Url::parse(repo_url)
        .expect("repo url")
        .host_str()
        .expect("host")
        .to_string();
    let path = dir.join("netrc");
    fs::write(
        &path,
        format!("machine {host}\nlogin nix\npassword {token}\n"),
    )
    .expect("write netrc");
    path
}

/// `nix ARGS` (new CLI, no narinfo negative cache, a fresh cache dir, the netrc file when
/// given): its stdout, or why it failed.
pub fn nix(args: &[&str], netrc: Option<&Path>) -> Result<String, String> {
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("nix");
    cmd.env("XDG_CACHE_HOME", cache.path())
        .args(["--extra-experimental-features", "nix-command"])
        .args(args)
        .args(["--option", "narinfo-cache-negative-ttl", "0"]);
    if let Some(netrc) = netrc {
        cmd.arg("--option").arg("netrc-file").arg(netrc);
    }
    let out = cmd.output().map_err(|e| format!("cannot run nix: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "nix {args:?} failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The derivation that built `out` (which must have one: built here, not substituted).
pub fn deriver(out: &str) -> String {
    let drv = Command::new("nix-store")
        .args(["--query", "--deriver", out])
        .output()
        .expect("nix-store --query --deriver");
    let drv = String::from_utf8(drv.stdout).unwrap().trim().to_string();
    assert!(drv.ends_with(".drv"), "no deriver for {out}: {drv:?}");
    drv
}

fn run_nix(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("cannot run nix: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed with {}:\n{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `nix copy --from repo_url --to <fresh chroot store>` of `paths` with `require-sigs = true`
/// and only `public_key` trusted (and `token` through a netrc file when given). On success,
/// checks that every path of the local closure of `paths` arrived and that its NAR (dumped
/// from the chroot store) hashes to the same value as in the local store.
pub fn nix_copy_from(
    repo_url: &str,
    public_key: &str,
    paths: &[String],
    token: Option<&str>,
) -> Result<(), String> {
    require_nix();
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = tmp.path().join("store");
    let cache = tmp.path().join("xdg-cache");
    fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("nix");
    cmd.env("XDG_CACHE_HOME", &cache)
        .args(["--extra-experimental-features", "nix-command", "copy"])
        .arg("--from")
        .arg(repo_url)
        .arg("--to")
        .arg(&store)
        .args(["--option", "trusted-public-keys", public_key])
        .args(["--option", "require-sigs", "true"])
        .args(["--option", "substituters", ""])
        .args(["--option", "narinfo-cache-negative-ttl", "0"])
        .args(["--option", "narinfo-cache-positive-ttl", "0"]);
    if let Some(token) = token {
        let netrc = netrc_file(tmp.path(), repo_url, token);
        cmd.arg("--option").arg("netrc-file").arg(netrc);
    }
    cmd.args(paths);
    run_nix(&mut cmd)?;

    for path in closure_of(paths) {
        let copied = store.join(path.trim_start_matches('/'));
        if fs::symlink_metadata(&copied).is_err() {
            return Err(format!("{path} is missing from the substituted store"));
        }
        let local = sha256_nix32(&nix_store_dump(Path::new(&path)));
        let remote = sha256_nix32(&nix_store_dump(&copied));
        if local != remote {
            return Err(format!(
                "{path}: substituted NAR hash {remote} differs from the local {local}"
            ));
        }
    }
    Ok(())
}

/// `nix copy --to repo_url` of `paths` (and their closures) with `token` in a netrc file.
pub fn nix_copy_to(repo_url: &str, token: &str, paths: &[String]) -> Result<(), String> {
    require_nix();
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cache = tmp.path().join("xdg-cache");
    fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
    let netrc = netrc_file(tmp.path(), repo_url, token);
    let mut cmd = Command::new("nix");
    cmd.env("XDG_CACHE_HOME", &cache)
        .args(["--extra-experimental-features", "nix-command", "copy"])
        .arg("--to")
        .arg(repo_url)
        .args(["--option", "substituters", ""])
        .args(["--option", "narinfo-cache-negative-ttl", "0"])
        .args(["--option", "narinfo-cache-positive-ttl", "0"])
        .arg("--option")
        .arg("netrc-file")
        .arg(netrc)
        .args(paths);
    run_nix(&mut cmd)
}

// ---------------------------------------------------------------------------------------------
// Waiting on events (never sleep-then-assert: a busy 2-core machine makes any fixed pause
// too short sometimes)
// ---------------------------------------------------------------------------------------------

/// How long [`TestServer::wait_for_metric`] waits before failing: generous, since it only
/// bounds how long a broken server takes to fail the test.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

impl TestServer {
    /// Polls metric `query` (see [`TestServer::metric`]) until `holds(value)`, and returns the
    /// value; panics naming `what` after [`EVENT_TIMEOUT`].
    pub async fn wait_for_metric(
        &self,
        query: &str,
        what: &str,
        holds: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let value = self.metric(query).await;
            if holds(value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "waited {EVENT_TIMEOUT:?} for {what}: {query} is still {value}\n--- server log ---\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the server has received at least `bytes` upload bytes in all.
    pub async fn wait_for_received_bytes(&self, bytes: u64) -> f64 {
        self.wait_for_metric(
            "stowix_server_upload_received_bytes_total",
            &format!("{bytes} upload bytes to arrive"),
            |v| v >= bytes as f64,
        )
        .await
    }
}

/// Deletes store paths (dependents first) when a test ends, whatever happened: for tests that
/// corrupt a store path on purpose, so the damage never outlives them.
pub struct DeleteOnDrop(pub Vec<String>);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        for path in &self.0 {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o444));
        }
        let _ = Command::new("nix-store")
            .arg("--delete")
            .args(&self.0)
            .output();
    }
}
