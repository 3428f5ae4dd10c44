//! The dashboard in `config/` against the metrics it charts: a real Prometheus (Debian's
//! `prometheus`, on loopback) scrapes a real `stowix serve` and a running `stowix nix
//! watch-store` while paths are built and pushed, then every expression of every panel of
//! `config/grafana-dashboard.json` is evaluated through Prometheus's query API and must return
//! data. A renamed metric or label breaks this test instead of a panel going blank in
//! production.

mod common;
mod push_common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use push_common::{BackgroundPush, Fixture};

/// How long an expression may take to return data: a few scrape intervals, plus the two
/// samples a `rate()` needs.
const DATA_WITHIN: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A Prometheus scraping `targets` every second, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[&str]) -> Self {
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!(
                    "prometheus is not installed: run scripts/install-prerequisites.sh \
                     (apt-get install prometheus)"
                )
            });
        let dir = tempfile::tempdir().unwrap();
        let list = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: stowix\n    static_configs:\n      - targets: [{list}]\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The `result` array of an instant query, or the error text.
    async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let response = common::http()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn every_dashboard_expression_returns_data_from_a_server_and_a_watcher() {
    let fx = Fixture::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(common::stowix_bin());
    cmd.args(["nix", "watch-store", "--metrics-listen", &listen])
        .env("STOWIX_TARGET", &fx.url)
        .env("STOWIX_TOKEN", &fx.token)
        .stdin(Stdio::null());
    let mut watcher = BackgroundPush::spawn(cmd);
    watcher
        .wait_for_line("watching", |l| l.contains("watching the Nix store"))
        .await;
    let prometheus = Prometheus::start(&[&fx.server.addr(), &listen]);

    // Traffic while Prometheus scrapes, so every rate() sees increases.
    let deadline = Instant::now() + DATA_WITHIN;
    let mut built = Vec::new();
    for round in 0..3 {
        let (dep, top) = common::build_pair();
        built.push(top.clone());
        let added = common::add_to_store(&[(
            &format!("dashboard-{round}.txt"),
            common::nonce().as_bytes(),
        )]);
        for path in [dep, top, added[0].clone()] {
            loop {
                let status = common::http()
                    .get(format!("{}/{}.narinfo", fx.url, common::hash_part(&path)))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                if status == 200 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{path} was not published:\n{}",
                    watcher.text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/grafana-dashboard.json"
        ))
        .expect("read config/grafana-dashboard.json"),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push((
                    panel["title"].as_str().unwrap_or("?").to_owned(),
                    expr.to_owned(),
                ));
            }
        }
    }
    assert!(exprs.len() >= 15, "too few expressions found: {exprs:?}");
    let deadline = Instant::now() + DATA_WITHIN;
    for (title, expr) in &exprs {
        loop {
            let result = prometheus.query(expr).await;
            if matches!(&result, Ok(rows) if !rows.is_empty()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "panel {title:?}: {expr} returned no data: {result:?}\n--- prometheus ---\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    drop(watcher);
}
