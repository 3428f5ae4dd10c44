//! The dashboard and the metrics cannot drift apart: a real Prometheus, configured from
//! `config/prometheus.yml` (targets pointed at this test's processes), scrapes a real server, a
//! live push (`--metrics-listen`), a Pushgateway the push reports to and a running
//! `watch-store`; then every query of `config/grafana-dashboard.json` is evaluated through
//! Prometheus's API and must return data.

mod common;
mod fault_proxy;
mod push_common;

use std::time::Duration;

use common::monitoring::{self, free_port, Prometheus, Pushgateway};
use common::*;
use fault_proxy::{Fault, FaultProxy, Rule};

/// Every `expr` of the dashboard, with the title of its panel.
fn dashboard_queries() -> Vec<(String, String)> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    fn walk(panel: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for child in panel["panels"].as_array().into_iter().flatten() {
            let title = child["title"].as_str().unwrap_or_default().to_string();
            for target in child["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_string()));
                }
            }
            walk(child, out);
        }
    }
    let mut queries = Vec::new();
    walk(&dashboard, &mut queries);
    assert!(queries.len() >= 10, "the dashboard has only {queries:?}");
    queries
}

/// `config/prometheus.yml` with its example targets replaced by this test's, and scrapes every
/// second. Each replacement must apply: a changed config file fails here, not silently.
fn prometheus_config(server: &str, live_push: &str, gateway: &str, watcher: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus.yml");
    let mut config = std::fs::read_to_string(path).unwrap();
    for (from, to) in [
        ("\"127.0.0.1:8380\"", format!("\"{server}\"")),
        ("\"127.0.0.1:9464\"", format!("\"{live_push}\"")),
        ("\"127.0.0.1:9091\"", format!("\"{gateway}\"")),
        ("\"127.0.0.1:9465\"", format!("\"{watcher}\"")),
        ("scrape_interval: 15s", "scrape_interval: 1s".to_string()),
        ("scrape_interval: 5s", "scrape_interval: 1s".to_string()),
    ] {
        assert!(
            config.contains(from),
            "config/prometheus.yml no longer has {from}"
        );
        config = config.replace(from, &to);
    }
    config
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    require_nix();
    let server = TestServer::start();
    let repo = unique_name("dash");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let gateway = Pushgateway::start();
    let live_port = free_port();
    let watcher_listen = format!("127.0.0.1:{}", free_port());
    let prometheus = Prometheus::start(&prometheus_config(
        &server.addr(),
        &format!("127.0.0.1:{live_port}"),
        gateway.host_port(),
        &watcher_listen,
    ));

    let paths = build_derivations(
        &(0..6)
            .map(|i| {
                Drv::new(
                    &format!("dash-{i}"),
                    "/usr/bin/head -c 300000 /dev/urandom > $out",
                )
            })
            .collect::<Vec<_>>(),
    );
    let mut args = vec![
        "--jobs",
        "4",
        "--max-requests-per-second",
        "20",
        "--metrics-push-gateway",
        gateway.url.as_str(),
    ];
    let listen = format!("127.0.0.1:{live_port}");
    args.extend(["--metrics-listen", listen.as_str()]);
    args.extend(paths.iter().map(String::as_str));
    // Two answers of 503 (as from a busy server), so the retry panels have retries to show.
    let proxy = FaultProxy::start(
        server.url(),
        vec![Rule::new(Fault::Status {
            status: 503,
            retry_after: None,
        })
        .on_path("/presence")
        .times(2)],
    );
    let target = format!("{}/{repo}", proxy.url);
    let pushed = push_common::push_with(&target, Some(&token), &args, &[]);
    pushed.assert_code(0);
    assert!(
        gateway.value("stowix_push_retries_total") > 0.0,
        "no retries:\n{}",
        pushed.stderr
    );

    // A watch-store, for the "Watch" panels: it publishes paths built after it started.
    let mut watch = std::process::Command::new(stowix_bin());
    watch
        .args(["nix", "watch-store", "--metrics-listen", &watcher_listen])
        .env("STOWIX_TARGET", server.repo_url(&repo))
        .env("STOWIX_TOKEN", &token)
        .stdin(std::process::Stdio::null());
    let watcher = push_common::BackgroundPush::spawn(watch);
    let started = std::time::Instant::now();
    while !watcher.text().contains("watching the Nix store") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "watch-store did not start:\n{}",
            watcher.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (dep, top) = build_pair();
    for path in [dep, top] {
        let url = format!("{}/{}.narinfo", server.repo_url(&repo), hash_part(&path));
        while monitoring::blocking_get(&url).map(|(status, _)| status) != Some(200) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "watch-store did not publish {path}:\n{}",
                watcher.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // Rates need two samples in their window: wait for them, from the gateway and the server.
    prometheus.wait_for(
        "count_over_time(stowix_push_nar_bytes_total[1m]) >= 2",
        Duration::from_secs(60),
    );
    prometheus.wait_for(
        "count_over_time(stowix_server_nars_stored_total[1m]) >= 2",
        Duration::from_secs(60),
    );
    prometheus.wait_for(
        "count_over_time(stowix_watch_publication_lag_seconds_count[1m]) >= 2",
        Duration::from_secs(60),
    );
    let empty: Vec<String> = dashboard_queries()
        .into_iter()
        .filter(|(_, expr)| prometheus.query(expr).is_empty())
        .map(|(title, expr)| format!("{title}: {expr}"))
        .collect();
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
    drop(watcher);
}
