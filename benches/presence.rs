//! Presence queries against a real server (in process, on loopback, embedded SQLite): paths
//! answered per second for a batch the size the push client sends.
//!
//! Half of the queried paths are published, half missing, so both lookups of the query run.

use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stowix::api::{PresenceQuery, PresenceRequest, PresenceResponse};
use stowix::nix::{base32, Sha256Hash};
use stowix::server::config::ServerConfig;
use stowix::server::metadata::{PublishedNarInfo, RepoRecord};
use stowix::server::{router, AppState};

const BATCH: usize = 5_000;

fn hash_part(i: usize) -> String {
    base32::encode(&Sha256Hash::digest(format!("path {i}").as_bytes()).0[..20])
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        ..ServerConfig::default()
    };
    let state = Arc::new(AppState::open(config, None).unwrap());
    let key = stowix::nix::signing::SecretKey::generate("bench");
    state
        .meta
        .create_repo(&RepoRecord {
            name: "bench".into(),
            private: false,
            secret_key: key.to_text(),
            priority: 41,
            upstream_keys: Vec::new(),
        })
        .unwrap();
    let published: Vec<PublishedNarInfo> = (0..BATCH)
        .step_by(2)
        .map(|i| PublishedNarInfo {
            hash: hash_part(i),
            store_path: format!("/nix/store/{}-p", hash_part(i)),
            nar_hash: Sha256Hash::digest(&i.to_le_bytes()).to_typed_nix32(),
            text: String::new(),
        })
        .collect();
    state.meta.publish("bench", &published).unwrap();
    let addr: SocketAddr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(Arc::clone(&state)).into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    });
    let request = PresenceRequest {
        paths: (0..BATCH)
            .map(|i| PresenceQuery {
                hash: hash_part(i),
                nar_hash: Sha256Hash::digest(&i.to_le_bytes()).to_typed_nix32(),
            })
            .collect(),
    };
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/bench/api/v1/presence");
    let mut group = c.benchmark_group("presence");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.bench_function(format!("{BATCH} paths per query"), |b| {
        b.iter(|| {
            runtime.block_on(async {
                let response: PresenceResponse = client
                    .post(&url)
                    .json(&request)
                    .send()
                    .await
                    .unwrap()
                    .error_for_status()
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert_eq!(response.missing.len(), BATCH / 2);
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
