//! Every metric the push client exports, in one place (`docs/metrics.md` explains each).
//! Names follow `stowix_<thing>_<unit>[_total]` with base units and low-cardinality labels;
//! never a store path as a label.

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

pub const PATHS_TOTAL: &str = "stowix_push_paths_total";
pub const NAR_BYTES_TOTAL: &str = "stowix_push_nar_bytes_total";
pub const COMPRESSED_BYTES_TOTAL: &str = "stowix_push_compressed_bytes_total";
pub const UPLOADED_BYTES_TOTAL: &str = "stowix_push_uploaded_bytes_total";
pub const RETRIES_TOTAL: &str = "stowix_push_retries_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "stowix_push_http_request_duration_seconds";
pub const STAGE_QUEUE_DEPTH: &str = "stowix_push_stage_queue_depth";
pub const STAGE_BUSY_SECONDS_TOTAL: &str = "stowix_push_stage_busy_seconds_total";
pub const RATE_LIMIT_WAIT_SECONDS_TOTAL: &str = "stowix_push_rate_limit_wait_seconds_total";
/// `watch-store` / `watch-exec`: store paths seen becoming valid.
pub const WATCH_PATHS_SEEN_TOTAL: &str = "stowix_watch_paths_seen_total";
/// Paths seen becoming valid and not yet published (nor given up).
pub const WATCH_PATHS_WAITING: &str = "stowix_watch_paths_waiting";
/// From a path being seen valid to its publication.
pub const WATCH_PUBLICATION_LAG_SECONDS: &str = "stowix_watch_publication_lag_seconds";
/// Pipeline runs (batches of new roots) started.
pub const WATCH_BATCHES_TOTAL: &str = "stowix_watch_batches_total";
/// Paths that failed every attempt and were given up.
pub const WATCH_PATHS_GIVEN_UP_TOTAL: &str = "stowix_watch_paths_given_up_total";

/// `outcome` label values of [`PATHS_TOTAL`].
pub mod outcome {
    /// Already published in the repository before this run.
    pub const PRESENT: &str = "present";
    /// Not pushed: an upstream cache the repository trusts signed it.
    pub const UPSTREAM: &str = "upstream";
    /// NAR uploaded and narinfo published by this run.
    pub const UPLOADED: &str = "uploaded";
    /// NAR was already stored (e.g. an interrupted earlier run); only the narinfo was published.
    pub const NAR_STORED: &str = "nar_stored";
    pub const FAILED: &str = "failed";
}

/// `stage` label values.
pub mod stage {
    pub const PRESENCE: &str = "presence";
    pub const DUMP: &str = "dump";
    pub const COMPRESS: &str = "compress";
    pub const UPLOAD: &str = "upload";
    pub const PUBLISH: &str = "publish";
}

/// Request latencies from a 2 ms presence answer on a LAN to a multi-minute completion of a
/// huge NAR.
const HTTP_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Publication lag: the goal is under 2 s when the server keeps up; the long tail shows an
/// outage or a backlog.
const LAG_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The exporter configured with our histogram buckets (without them it would emit summaries).
pub fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(HTTP_REQUEST_DURATION_SECONDS.to_owned()),
            HTTP_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(WATCH_PUBLICATION_LAG_SECONDS.to_owned()),
            LAG_BUCKETS,
        )
}

/// Creates every counter a dashboard queries at 0, so a panel shows 0 (not "no data") for a
/// pusher that has not retried, been rate-limited or given anything up yet.
pub fn register_zeros() {
    use metrics::{counter, gauge};
    for outcome in [
        outcome::PRESENT,
        outcome::UPLOADED,
        outcome::NAR_STORED,
        outcome::UPSTREAM,
        outcome::FAILED,
    ] {
        counter!(PATHS_TOTAL, "outcome" => outcome).increment(0);
    }
    for reason in crate::client::RetryReason::ALL {
        counter!(RETRIES_TOTAL, "reason" => reason.label()).increment(0);
    }
    counter!(NAR_BYTES_TOTAL).increment(0);
    counter!(COMPRESSED_BYTES_TOTAL).increment(0);
    counter!(UPLOADED_BYTES_TOTAL).increment(0);
    gauge!(RATE_LIMIT_WAIT_SECONDS_TOTAL).increment(0.0);
}

/// The watchers' metrics at 0 (see [`register_zeros`]).
pub fn register_watch_zeros() {
    use metrics::{counter, gauge};
    counter!(WATCH_PATHS_SEEN_TOTAL).increment(0);
    counter!(WATCH_BATCHES_TOTAL).increment(0);
    counter!(WATCH_PATHS_GIVEN_UP_TOTAL).increment(0);
    gauge!(WATCH_PATHS_WAITING).set(0.0);
}

/// Registers help texts so scrapes show what each metric means.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(PATHS_TOTAL, "Store paths of the closure by final outcome");
    describe_counter!(
        NAR_BYTES_TOTAL,
        Unit::Bytes,
        "Uncompressed NAR bytes read from the store"
    );
    describe_counter!(
        COMPRESSED_BYTES_TOTAL,
        Unit::Bytes,
        "Compressed bytes produced"
    );
    describe_counter!(
        UPLOADED_BYTES_TOTAL,
        Unit::Bytes,
        "Body bytes sent to the server, retries included"
    );
    describe_counter!(RETRIES_TOTAL, "Requests tried again, by reason");
    describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Push API request duration by endpoint"
    );
    describe_gauge!(
        STAGE_QUEUE_DEPTH,
        "Items waiting in front of a pipeline stage"
    );
    describe_gauge!(
        STAGE_BUSY_SECONDS_TOTAL,
        Unit::Seconds,
        "Time a stage spent working, not waiting"
    );
    describe_counter!(
        WATCH_PATHS_SEEN_TOTAL,
        "Store paths the watcher saw becoming valid"
    );
    describe_gauge!(
        WATCH_PATHS_WAITING,
        "Store paths seen becoming valid and not yet published"
    );
    describe_histogram!(
        WATCH_PUBLICATION_LAG_SECONDS,
        Unit::Seconds,
        "Time from a store path being seen valid to its publication"
    );
    describe_counter!(WATCH_BATCHES_TOTAL, "Batches of new paths pushed");
    describe_counter!(
        WATCH_PATHS_GIVEN_UP_TOTAL,
        "Store paths that failed every attempt and were given up"
    );
    describe_gauge!(
        RATE_LIMIT_WAIT_SECONDS_TOTAL,
        Unit::Seconds,
        "Time spent waiting on client-side rate limits"
    );
}
