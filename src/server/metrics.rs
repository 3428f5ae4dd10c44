//! Server metrics: names in one place, the Prometheus recorder, and the per-request middleware
//! that labels by route template (never by store path, so cardinality stays bounded).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS_TOTAL: &str = "stowix_server_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "stowix_server_http_request_duration_seconds";
pub const UPLOAD_RECEIVED_BYTES_TOTAL: &str = "stowix_server_upload_received_bytes_total";
pub const NARS_STORED_TOTAL: &str = "stowix_server_nars_stored_total";
pub const NARINFOS_PUBLISHED_TOTAL: &str = "stowix_server_narinfos_published_total";
pub const UPLOADS_REJECTED_TOTAL: &str = "stowix_server_uploads_rejected_total";
pub const AUTH_FAILURES_TOTAL: &str = "stowix_server_auth_failures_total";
pub const VERIFIED_NAR_BYTES_TOTAL: &str = "stowix_server_verified_nar_bytes_total";
pub const CONNECTIONS_OPEN: &str = "stowix_server_connections_open";
pub const CONNECTIONS_EVICTED_TOTAL: &str = "stowix_server_connections_evicted_total";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "stowix_server_connections_refused_total";
pub const SLOW_BODIES_TOTAL: &str = "stowix_server_slow_bodies_total";
pub const STORAGE_SECONDS: &str = "stowix_server_storage_seconds";
pub const STORAGE_ERRORS_TOTAL: &str = "stowix_server_storage_errors_total";
pub const DATABASE_SECONDS: &str = "stowix_server_database_seconds";
pub const DATABASE_ERRORS_TOTAL: &str = "stowix_server_database_errors_total";
pub const FILES_STORED_TOTAL: &str = "stowix_server_files_stored_total";
pub const LAST_USE_FLUSHES_TOTAL: &str = "stowix_server_last_use_flushes_total";
pub const GC_RUNS_TOTAL: &str = "stowix_server_gc_runs_total";
pub const GC_PATHS_REMOVED_TOTAL: &str = "stowix_server_gc_paths_removed_total";
pub const GC_BYTES_FREED_TOTAL: &str = "stowix_server_gc_bytes_freed_total";
pub const GC_DURATION_SECONDS: &str = "stowix_server_gc_duration_seconds";
pub const REPOSITORY_BYTES: &str = "stowix_server_repository_bytes";
pub const REPOSITORY_PATHS: &str = "stowix_server_repository_paths";

/// From 10 ms (an empty repository) to about 3 hours (a mark over tens of millions of paths).
const GC_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 10800.0,
];

/// From 1 ms (a narinfo lookup) to ~2 min (verifying a multi-GB NAR).
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// From 50 µs (a narinfo read from SQLite's page cache) to 30 s (a PostgreSQL call's timeout,
/// waiting for a connection included).
const DATABASE_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Installs the process-wide recorder. The server is its own process, so a global is right here.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(HTTP_REQUEST_DURATION_SECONDS.into()),
            DURATION_BUCKETS,
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(Matcher::Full(STORAGE_SECONDS.into()), DURATION_BUCKETS)
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(Matcher::Full(GC_DURATION_SECONDS.into()), GC_BUCKETS)
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(Matcher::Full(DATABASE_SECONDS.into()), DATABASE_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    // Registered at zero so dashboards and tests see them before the first upload.
    metrics::counter!(UPLOAD_RECEIVED_BYTES_TOTAL).absolute(0);
    metrics::counter!(NARS_STORED_TOTAL).absolute(0);
    metrics::counter!(NARINFOS_PUBLISHED_TOTAL).absolute(0);
    metrics::counter!(VERIFIED_NAR_BYTES_TOTAL).absolute(0);
    metrics::counter!(GC_RUNS_TOTAL).absolute(0);
    metrics::counter!(LAST_USE_FLUSHES_TOTAL).absolute(0);
    metrics::counter!(GC_PATHS_REMOVED_TOTAL).absolute(0);
    metrics::counter!(GC_BYTES_FREED_TOTAL).absolute(0);
    Ok(handle)
}

/// Sets a repository's size gauges (after a collection, and at start).
pub fn record_usage(repo: &str, usage: &super::metadata::RepoUsage) {
    metrics::gauge!(REPOSITORY_BYTES, "repository" => repo.to_string()).set(usage.bytes as f64);
    metrics::gauge!(REPOSITORY_PATHS, "repository" => repo.to_string()).set(usage.paths as f64);
}

fn describe() {
    metrics::describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests answered, by route template and status"
    );
    metrics::describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to answer a request (to the end of the handler; streamed bodies continue after)"
    );
    metrics::describe_counter!(
        UPLOAD_RECEIVED_BYTES_TOTAL,
        metrics::Unit::Bytes,
        "Compressed NAR bytes received, including chunks later discarded"
    );
    metrics::describe_counter!(NARS_STORED_TOTAL, "NAR files verified and stored");
    metrics::describe_histogram!(
        STORAGE_SECONDS,
        metrics::Unit::Seconds,
        "Time of one object-store call (S3 storage), by operation"
    );
    metrics::describe_counter!(
        STORAGE_ERRORS_TOTAL,
        "Object-store calls that failed (an absent object is not a failure), by operation"
    );
    metrics::describe_histogram!(
        DATABASE_SECONDS,
        metrics::Unit::Seconds,
        "Time of one metadata database call (SQLite or PostgreSQL), by operation"
    );
    metrics::describe_counter!(
        DATABASE_ERRORS_TOTAL,
        "Metadata database calls that returned an error, by operation"
    );
    metrics::describe_counter!(
        FILES_STORED_TOTAL,
        "build logs and debuginfo links stored, by kind"
    );
    metrics::describe_counter!(NARINFOS_PUBLISHED_TOTAL, "narinfos signed and published");
    metrics::describe_counter!(
        UPLOADS_REJECTED_TOTAL,
        "Uploads refused at verification, by reason"
    );
    metrics::describe_gauge!(
        CONNECTIONS_OPEN,
        "Open client connections (all listeners), against the cap"
    );
    metrics::describe_counter!(
        CONNECTIONS_EVICTED_TOTAL,
        "Idle connections closed to make room at the connection cap"
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Connections closed at once: at the cap with none idle"
    );
    metrics::describe_counter!(
        SLOW_BODIES_TOTAL,
        "Request bodies cut off for arriving below the minimum rate"
    );
    metrics::describe_counter!(
        VERIFIED_NAR_BYTES_TOTAL,
        metrics::Unit::Bytes,
        "NAR bytes decompressed while verifying uploads, whatever the outcome"
    );
    metrics::describe_counter!(GC_RUNS_TOTAL, "Garbage collections completed");
    metrics::describe_counter!(
        LAST_USE_FLUSHES_TOTAL,
        "Writes of the last uses gathered in memory (NAR downloads, presence answers)"
    );
    metrics::describe_counter!(
        GC_PATHS_REMOVED_TOTAL,
        "Published paths removed by garbage collection"
    );
    metrics::describe_counter!(
        GC_BYTES_FREED_TOTAL,
        metrics::Unit::Bytes,
        "Compressed NAR bytes deleted by garbage collection"
    );
    metrics::describe_histogram!(
        GC_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time of one garbage collection (all repositories)"
    );
    metrics::describe_gauge!(
        REPOSITORY_BYTES,
        metrics::Unit::Bytes,
        "Compressed NAR bytes stored per repository (at the last collection or start)"
    );
    metrics::describe_gauge!(
        REPOSITORY_PATHS,
        "Published paths per repository (at the last collection or start)"
    );
    metrics::describe_counter!(
        AUTH_FAILURES_TOTAL,
        "Requests refused for their credentials, by code"
    );
}

pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => route, "status" => status).increment(1);
    response
}

pub fn record_received(bytes: u64) {
    metrics::counter!(UPLOAD_RECEIVED_BYTES_TOTAL).increment(bytes);
}
