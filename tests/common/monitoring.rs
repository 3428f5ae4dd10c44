//! Real monitoring daemons on free loopback ports for the metrics tests: a Prometheus
//! Pushgateway (what short CI pushes report to) and a Prometheus server (which scrapes the
//! server, live pushers and the gateway, and evaluates the dashboard's queries).
//!
//! ```text
//!   stowix serve ──/metrics──┐
//!   stowix nix push ──PUT──► Pushgateway ──/metrics──┼──► Prometheus ◄── /api/v1/query (tests)
//!   stowix nix watch-store ──/metrics (live)─────────┘
//! ```
//! Each is killed when its handle drops. A missing binary fails the test with the package to
//! install.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub use super::backends::free_port;

/// A GET from synchronous test code: the status and body, or `None` when nothing answered.
pub fn blocking_get(url: &str) -> Option<(u16, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let response = super::http()
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    })
}

fn on_path(binary: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(binary))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{binary} is not installed: this test needs the real one \
                 (`apt-get install -y {package}`, or run scripts/install-prerequisites.sh)"
            )
        })
}

/// A daemon started in its own temporary directory, logging there, killed on drop.
struct Daemon {
    child: Child,
    name: &'static str,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(binary: &'static str, package: &str, args: impl FnOnce(&Path) -> Vec<String>) -> Self {
        let bin = on_path(binary, package);
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new(bin)
            .args(args(dir.path()))
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        Daemon {
            child,
            name: binary,
            dir,
        }
    }

    /// Waits until `url` answers 200, failing with the daemon's log if it exits or takes 60 s.
    fn wait_ready(&mut self, url: &str) {
        let started = Instant::now();
        while blocking_get(url).map(|(status, _)| status) != Some(200) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} did not become ready at {url}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus Pushgateway, without persistence.
pub struct Pushgateway {
    daemon: Daemon,
    pub url: String,
}

impl Pushgateway {
    pub fn start() -> Pushgateway {
        let port = free_port();
        let mut daemon = Daemon::start("prometheus-pushgateway", "prometheus-pushgateway", |_| {
            vec![format!("--web.listen-address=127.0.0.1:{port}")]
        });
        let url = format!("http://127.0.0.1:{port}");
        daemon.wait_ready(&format!("{url}/-/ready"));
        Pushgateway { daemon, url }
    }

    pub fn host_port(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// `query` summed over the samples of the job `stowix_push`.
    pub fn value(&self, query: &str) -> f64 {
        let (status, text) = blocking_get(&format!("{}/metrics", self.url)).expect("scrape");
        assert_eq!(status, 200, "{}", self.daemon.log());
        let query = match query.strip_suffix('}') {
            Some(open) => format!("{open},job=\"stowix_push\"}}"),
            None => format!("{query}{{job=\"stowix_push\"}}"),
        };
        super::sum_metric(&text, &query)
    }

    /// Forgets what the last push sent, so the next check sees only the next push.
    pub fn clear(&self) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let status = runtime.block_on(async {
            super::http()
                .delete(format!("{}/metrics/job/stowix_push", self.url))
                .send()
                .await
                .expect("DELETE the job's metrics")
                .status()
        });
        assert!(status.is_success(), "DELETE: {status}");
        assert_eq!(self.value("stowix_push_paths_total"), 0.0);
    }
}

/// A real Prometheus server scraping every second.
pub struct Prometheus {
    daemon: Daemon,
    pub url: String,
}

impl Prometheus {
    /// Starts Prometheus on `config` (YAML text), with its own empty database.
    pub fn start(config: &str) -> Prometheus {
        let port = free_port();
        let config = config.to_string();
        let mut daemon = Daemon::start("prometheus", "prometheus", move |dir| {
            let file = dir.join("prometheus.yml");
            std::fs::write(&file, config).unwrap();
            vec![
                format!("--config.file={}", file.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ]
        });
        let url = format!("http://127.0.0.1:{port}");
        daemon.wait_ready(&format!("{url}/-/ready"));
        Prometheus { daemon, url }
    }

    /// The result vector of an instant query (panics on a query Prometheus refuses).
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            &[("query", expr)],
        )
        .unwrap();
        let (status, body) = blocking_get(url.as_str()).expect("Prometheus answers");
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("Prometheus answered {status} with non-JSON ({e}): {body}"));
        assert_eq!(
            json["status"],
            "success",
            "query {expr:?} failed: {body}\n{}",
            self.daemon.log()
        );
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `expr` returns data, failing after `timeout` with what Prometheus scraped.
    pub fn wait_for(&self, expr: &str, timeout: Duration) {
        let started = Instant::now();
        while self.query(expr).is_empty() {
            if started.elapsed() > timeout {
                let targets = blocking_get(&format!("{}/api/v1/targets", self.url))
                    .map(|(_, body)| body)
                    .unwrap_or_default();
                panic!("{expr:?} returned no data within {timeout:?}; targets:\n{targets}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
