//! A real S3-compatible store for the tests: SeaweedFS (`weed mini`) on loopback, on free ports,
//! with its own data directory and a bucket, stopped by PID on drop. With
//! `STOWIX_TEST_S3_ENDPOINT` set, the tests use that store instead (credentials from
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, bucket from `STOWIX_TEST_S3_BUCKET`, default
//! `stowix-test`), and every test still gets its own key prefix.
//!
//! ```text
//!   S3Server::start ── weed mini -ip 127.0.0.1 -s3.port P ... -bucket B ──► <tmp>/weed.log
//!        │            readiness: a signed LIST of the bucket answers 200
//!        └─ storage_url() = s3://B/<nonce>  endpoint()  env()  client() (object_store, to inspect)
//! ```

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder};

const ACCESS_KEY: &str = "stowix-test-key";
const SECRET_KEY: &str = "stowix-test-secret";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The `weed` binary: `$STOWIX_WEED`, else where the harness finds it
/// ([`super::backends::weed_bin`]: STOWIX_TEST_WEED, the install script's venv, PATH).
fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("STOWIX_WEED") {
        return PathBuf::from(path);
    }
    super::backends::weed_bin()
}

/// A port nothing listens on now. SeaweedFS's admin worker dials the admin port + 10000
/// whatever `-admin.port.grpc` says, so ports stay below 55535.
fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().expect("local addr").port();
        if port < 55_535 {
            return port;
        }
    }
}

pub struct S3Server {
    child: Option<Child>,
    /// Data directory and log; deleted on drop.
    dir: Option<tempfile::TempDir>,
    endpoint: String,
    bucket: String,
    access_key: String,
    secret_key: String,
    /// This test's key prefix inside the bucket.
    prefix: String,
    /// How the harness started it (every port and the data dir fixed), for [`S3Server::restart`].
    command: Option<(PathBuf, Vec<std::ffi::OsString>)>,
}

impl S3Server {
    /// A ready store: SeaweedFS started here, or the one `STOWIX_TEST_S3_ENDPOINT` names.
    pub fn start() -> Self {
        match std::env::var("STOWIX_TEST_S3_ENDPOINT") {
            Ok(endpoint) => Self::external(endpoint),
            Err(_) => Self::start_local(),
        }
    }

    fn external(endpoint: String) -> Self {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("STOWIX_TEST_S3_ENDPOINT is set, so {name} must be set too")
            })
        };
        let mut server = S3Server {
            child: None,
            dir: None,
            endpoint,
            bucket: std::env::var("STOWIX_TEST_S3_BUCKET").unwrap_or_else(|_| "stowix-test".into()),
            access_key: var("AWS_ACCESS_KEY_ID"),
            secret_key: var("AWS_SECRET_ACCESS_KEY"),
            prefix: format!("t-{}", super::nonce()),
            command: None,
        };
        server.wait_ready();
        server
    }

    /// A SeaweedFS of this test's own, whatever `STOWIX_TEST_S3_ENDPOINT` says: for tests
    /// that stop the store.
    pub fn start_local() -> Self {
        let prefix = format!("t-{}", super::nonce());
        let weed = weed_binary();
        let dir = tempfile::Builder::new()
            .prefix("stowix-s3-")
            .tempdir()
            .expect("create SeaweedFS temp dir");
        let identities = dir.path().join("identities.json");
        std::fs::write(
            &identities,
            format!(
                r#"{{"identities":[{{"name":"stowix","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .expect("write SeaweedFS identities");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("create SeaweedFS data dir");
        let bucket = "stowix".to_string();
        let s3_port = free_port();
        let mut cmd = Command::new(&weed);
        cmd.arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.config={}", identities.display()))
            .args([
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .arg(format!("-bucket={bucket}"))
            .arg(format!("-s3.port={s3_port}"))
            .arg(format!(
                "-filer.localSocket={}",
                dir.path().join("filer.sock").display()
            ))
            .arg(format!(
                "-s3.localSocket={}",
                dir.path().join("s3.sock").display()
            ));
        // Every listener on a port of its own, so parallel tests (and other SeaweedFS
        // instances on the machine) never collide on the defaults.
        for flag in [
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "metricsPort",
            "s3.metricsPort",
            "debug.port",
            "admin.port",
            "admin.port.grpc",
        ] {
            cmd.arg(format!("-{flag}={}", free_port()));
        }
        let args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
        let child = spawn_weed(&weed, &args, dir.path());
        let mut server = S3Server {
            child: Some(child),
            dir: Some(dir),
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            bucket,
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            prefix,
            command: Some((weed, args)),
        };
        server.wait_ready();
        server
    }

    /// Polls until a signed LIST of the bucket succeeds (SeaweedFS answers before its bucket
    /// exists), failing with the log when the process exits or time runs out.
    fn wait_ready(&mut self) {
        let client = self.client();
        let deadline = Instant::now() + READY_TIMEOUT;
        let child = &mut self.child;
        // On a thread of its own: the caller may be inside a tokio runtime already.
        let failure = std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    let mut last = String::new();
                    while Instant::now() < deadline {
                        if let Some(child) = child.as_mut() {
                            if let Ok(Some(status)) = child.try_wait() {
                                return Some(format!("weed exited with {status}"));
                            }
                        }
                        let attempt = runtime.block_on(async {
                            use futures_util::TryStreamExt as _;
                            use object_store::ObjectStore as _;
                            client.list(None).try_next().await
                        });
                        match attempt {
                            Ok(_) => return None,
                            Err(err) => last = err.to_string(),
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Some(format!("not ready within {READY_TIMEOUT:?}: {last}"))
                })
                .join()
                .expect("readiness thread")
        });
        if let Some(error) = failure {
            panic!(
                "S3 store at {} is not usable: {error}\n--- weed log ---\n{}",
                self.endpoint,
                self.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|dir| std::fs::read_to_string(dir.path().join("weed.log")).ok())
            .unwrap_or_default()
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// This test's prefix inside the bucket (no slashes).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `s3://BUCKET/PREFIX`: the server's `storage` setting.
    pub fn storage_url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// The `config.toml` lines that put a server's NARs here.
    pub fn config_toml(&self) -> String {
        format!(
            "storage = \"{}\"\ns3_endpoint = \"{}\"\ns3_region = \"us-east-1\"\n",
            self.storage_url(),
            self.endpoint
        )
    }

    /// The environment a `stowix serve` or `stowix admin` needs for this store's credentials.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
        ]
    }

    /// A client of the bucket itself, to look at what the server left there.
    pub fn client(&self) -> Arc<AmazonS3> {
        // object_store's HTTP client has no TLS provider of its own (see src/server/s3.rs).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_bucket_name(&self.bucket)
                .with_region("us-east-1")
                .with_access_key_id(&self.access_key)
                .with_secret_access_key(&self.secret_key)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(self.endpoint.starts_with("http://"))
                // Readiness polls itself; a test's look at the bucket should fail fast.
                .with_retry(object_store::RetryConfig {
                    max_retries: 1,
                    retry_timeout: Duration::from_secs(5),
                    ..Default::default()
                })
                .build()
                .expect("S3 client"),
        )
    }

    /// Every key under this test's prefix (without the prefix), sorted.
    pub async fn keys(&self) -> Vec<String> {
        use futures_util::TryStreamExt as _;
        use object_store::ObjectStore as _;
        let prefix = object_store::path::Path::from(self.prefix.as_str());
        let mut keys: Vec<String> = self
            .client()
            .list(Some(&prefix))
            .map_ok(|meta| {
                meta.location
                    .as_ref()
                    .strip_prefix(&format!("{}/", self.prefix))
                    .unwrap_or(meta.location.as_ref())
                    .to_string()
            })
            .try_collect()
            .await
            .expect("list the test's prefix");
        keys.sort();
        keys
    }
}

impl S3Server {
    /// Stops the SeaweedFS this harness started (SIGKILL by PID): the bucket becomes
    /// unreachable. Panics for an external store (`STOWIX_TEST_S3_ENDPOINT`), which a test
    /// cannot stop.
    pub fn stop(&mut self) {
        let mut child = self
            .child
            .take()
            .expect("only a SeaweedFS started by the harness can be stopped");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl S3Server {
    /// Starts the stopped SeaweedFS again, with the same ports and data directory, and waits
    /// until it serves the bucket: the same store back after an outage.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the store before restarting it");
        let (weed, args) = self
            .command
            .clone()
            .expect("only a SeaweedFS started by the harness can be restarted");
        let dir = self.dir.as_ref().expect("the store's directory").path();
        self.child = Some(spawn_weed(&weed, &args, dir));
        self.wait_ready();
    }
}

/// `weed ARGS`, its output appended to `dir/weed.log`.
fn spawn_weed(weed: &std::path::Path, args: &[std::ffi::OsString], dir: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("weed.log"))
        .expect("open weed.log");
    Command::new(weed)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot start {} ({err}): run scripts/install-prerequisites.sh",
                weed.display()
            )
        })
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
