//! Server settings: defaults, the TOML file (`config/server.toml` is the commented template),
//! and command-line overrides, in that order of precedence (last wins).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The commented template, embedded so `stowix serve --print-config` can show it.
pub const CONFIG_TEMPLATE: &str = include_str!("../../config/server.toml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Largest PATCH chunk. 64 MiB keeps a resent chunk cheap while amortising request overhead.
    pub max_chunk_bytes: u64,
    /// Largest single-request upload (push API `POST nars` and `nix copy` PUT).
    pub max_single_upload_bytes: u64,
    /// Uploads received at once; more get 503 with Retry-After, so a burst cannot exhaust
    /// file descriptors or disk bandwidth.
    pub max_concurrent_uploads: usize,
    /// A body that sends nothing for this long is abandoned (its bytes so far are kept).
    pub upload_idle_timeout_secs: u64,
    pub max_presence_batch: usize,
    pub max_publish_batch: usize,
    /// Most NARs, and bytes of NAR files, in one `POST api/v1/nar-batch`: the batch is held in
    /// memory while it is verified.
    pub max_batch_nars: usize,
    pub max_batch_bytes: u64,
    /// Unfinished uploads older than this are deleted.
    pub upload_expiry_hours: u64,
    /// How long a shutdown waits for requests in flight before abandoning them.
    pub shutdown_grace_secs: u64,
    /// Failed authentications allowed per client address per minute before 429.
    pub auth_failures_per_minute: u32,
    /// Header a trusted reverse proxy puts the client's address in (e.g. `X-Forwarded-For`);
    /// unset, the TCP peer address is the client.
    pub client_ip_header: Option<String>,
    /// Largest NAR accepted, uncompressed, on every upload route. It is also where
    /// decompression stops when nothing declares the NAR's size yet: `nix copy` PUTs the NAR
    /// before the narinfo carrying its NarSize, and a few hundred KB of xz can expand without
    /// end. 32 GiB is sixteen times Hydra's default output limit (2 GiB) and twice the
    /// single-upload limit. Decoding and hashing that much costs about a minute and a half of
    /// one core (xz decodes zeros at ~0.45 GB/s on a 2-core CI machine), but no memory or
    /// disk; a server that never sees NARs that large should lower it.
    pub max_nar_bytes: u64,
    /// Unfinished chunked uploads one token may hold open. A push holds at most `--jobs`
    /// (at most 1024) at once, and a re-run resumes the same ones rather than opening more.
    pub max_upload_sessions_per_token: u64,
    /// Unfinished chunked uploads one repository may hold open, whichever tokens opened them:
    /// room for several full-width pushes at once, yet a bound on the rows and `.part` files
    /// hostile or broken clients can leave behind before expiry.
    pub max_upload_sessions_per_repo: u64,
    /// Time to send a complete request head, from connecting or from the previous response:
    /// also how long an idle keep-alive connection stays open.
    pub request_head_timeout_secs: u64,
    /// Bytes of request head (request line and headers) held per connection.
    pub max_header_bytes: usize,
    /// Open connections; unset, derived from the descriptor limit minus a reserve. A value
    /// above what the limit allows is lowered to it.
    pub max_connections: Option<usize>,
    /// Request bodies must average at least this rate once `body_rate_grace_secs` have passed,
    /// so a trickle cannot hold an upload slot or a buffer.
    pub min_body_bytes_per_sec: u64,
    pub body_rate_grace_secs: u64,
    /// Uploads one repository may have in flight: the rest of `max_concurrent_uploads` stays
    /// free for the others.
    pub max_concurrent_uploads_per_repo: usize,
    /// Uploads one token may have in flight, whichever repositories it covers: a token for
    /// several repositories cannot take every slot either.
    pub max_concurrent_uploads_per_token: usize,
    /// Most hash parts in a presence query without a token.
    pub anonymous_presence_batch: usize,
    /// Serve `/metrics` here instead of on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Database connections for reads, besides the one that writes (SQLite), or the size of
    /// the connection pool minus one (PostgreSQL).
    pub metadata_readers: usize,
    /// Metadata database URL: `sqlite:///abs/path.db` or `postgres://user@host:5432/db`;
    /// unset, `<data_dir>/stowix.db`.
    pub database: Option<String>,
    /// NAR storage URL: `file:///abs/dir` or `s3://bucket[/prefix]`; unset, `<data_dir>/store`.
    pub storage: Option<String>,
    /// S3 endpoint for self-hosted stores (path-style addressing); unset, AWS.
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    /// 0: NAR downloads stream through the server. N: they redirect to a presigned URL of the
    /// bucket valid N seconds, so the bucket (or its CDN) carries the bytes.
    pub s3_presign_secs: u64,
    /// How often `serve` runs the janitor (one replica at a time does the work).
    pub janitor_interval_secs: u64,
    /// How old an object the database does not know must be before the janitor deletes it:
    /// longer than the slowest completion (an object exists before its `nars` row).
    pub orphan_grace_secs: u64,
    /// How often `serve` collects garbage (one replica at a time does the work).
    pub gc_interval_secs: u64,
    /// Paths published or last used within this many seconds are never collected, whatever
    /// the policy: it covers a push told "present" that publishes after its uploads, and must
    /// stay well above `last_use_flush_secs`.
    pub gc_grace_secs: u64,
    /// Uses (NAR downloads, presence answers) are gathered in memory and written this often:
    /// a hot read path does not become a write per request.
    pub last_use_flush_secs: u64,
    /// Largest build log accepted (`nix store copy-log --to`), as sent (compressed or not).
    pub max_log_bytes: u64,
    /// Published narinfos kept in memory for the read side (0: none), and for how long. A
    /// narinfo never changes once published; a deleted one is served at most this long.
    pub narinfo_cache_entries: usize,
    pub narinfo_cache_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8380)),
            data_dir: default_data_dir(),
            max_chunk_bytes: 64 << 20,
            max_single_upload_bytes: 16 << 30,
            max_concurrent_uploads: 64,
            upload_idle_timeout_secs: 60,
            max_presence_batch: 20_000,
            max_publish_batch: 5_000,
            max_batch_nars: 1024,
            max_batch_bytes: 4 << 20,
            upload_expiry_hours: 24,
            shutdown_grace_secs: 30,
            auth_failures_per_minute: 60,
            client_ip_header: None,
            max_nar_bytes: 32 << 30,
            max_upload_sessions_per_token: 1024,
            max_upload_sessions_per_repo: 4096,
            request_head_timeout_secs: 10,
            max_header_bytes: 32 << 10,
            max_connections: None,
            min_body_bytes_per_sec: 4096,
            body_rate_grace_secs: 10,
            max_concurrent_uploads_per_repo: 32,
            max_concurrent_uploads_per_token: 32,
            anonymous_presence_batch: 1000,
            metrics_listen: None,
            metadata_readers: 4,
            database: None,
            storage: None,
            s3_endpoint: None,
            s3_region: "us-east-1".to_string(),
            s3_presign_secs: 0,
            janitor_interval_secs: 3600,
            orphan_grace_secs: 86_400,
            gc_interval_secs: 3600,
            gc_grace_secs: 3600,
            last_use_flush_secs: 30,
            max_log_bytes: 64 << 20,
            narinfo_cache_entries: 16384,
            narinfo_cache_secs: 10,
        }
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("stowix");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/stowix"),
        None => PathBuf::from("stowix-data"),
    }
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read config file {}: {err}", path.display()))?;
        toml::from_str(&text)
            .map_err(|err| format!("config file {} is invalid: {err}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_parses_and_matches_the_defaults() {
        let parsed: ServerConfig = toml::from_str(CONFIG_TEMPLATE).unwrap();
        let defaults = ServerConfig::default();
        assert_eq!(parsed.listen, defaults.listen);
        assert_eq!(parsed.max_chunk_bytes, defaults.max_chunk_bytes);
        assert_eq!(
            parsed.max_concurrent_uploads,
            defaults.max_concurrent_uploads
        );
        assert_eq!(
            parsed.upload_idle_timeout_secs,
            defaults.upload_idle_timeout_secs
        );
        assert_eq!(parsed.max_nar_bytes, defaults.max_nar_bytes);
        assert_eq!(
            parsed.max_upload_sessions_per_token,
            defaults.max_upload_sessions_per_token
        );
        assert_eq!(
            parsed.max_upload_sessions_per_repo,
            defaults.max_upload_sessions_per_repo
        );
        assert_eq!(
            parsed.request_head_timeout_secs,
            defaults.request_head_timeout_secs
        );
        assert_eq!(parsed.max_header_bytes, defaults.max_header_bytes);
        assert_eq!(parsed.max_connections, defaults.max_connections);
        assert_eq!(
            parsed.min_body_bytes_per_sec,
            defaults.min_body_bytes_per_sec
        );
        assert_eq!(parsed.body_rate_grace_secs, defaults.body_rate_grace_secs);
        assert_eq!(
            parsed.max_concurrent_uploads_per_repo,
            defaults.max_concurrent_uploads_per_repo
        );
        assert_eq!(
            parsed.max_concurrent_uploads_per_token,
            defaults.max_concurrent_uploads_per_token
        );
        assert_eq!(
            parsed.anonymous_presence_batch,
            defaults.anonymous_presence_batch
        );
        assert_eq!(parsed.metrics_listen, defaults.metrics_listen);
        assert_eq!(parsed.metadata_readers, defaults.metadata_readers);
        assert_eq!(parsed.database, defaults.database);
        assert_eq!(parsed.storage, defaults.storage);
        assert_eq!(parsed.s3_endpoint, defaults.s3_endpoint);
        assert_eq!(parsed.s3_region, defaults.s3_region);
        assert_eq!(parsed.s3_presign_secs, defaults.s3_presign_secs);
        assert_eq!(parsed.janitor_interval_secs, defaults.janitor_interval_secs);
        assert_eq!(parsed.orphan_grace_secs, defaults.orphan_grace_secs);
        assert_eq!(parsed.max_log_bytes, defaults.max_log_bytes);
        assert_eq!(parsed.gc_interval_secs, defaults.gc_interval_secs);
        assert_eq!(parsed.gc_grace_secs, defaults.gc_grace_secs);
        assert_eq!(parsed.last_use_flush_secs, defaults.last_use_flush_secs);
        assert_eq!(parsed.narinfo_cache_entries, defaults.narinfo_cache_entries);
        assert_eq!(parsed.narinfo_cache_secs, defaults.narinfo_cache_secs);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<ServerConfig>("lisen = \"127.0.0.1:1\"").is_err());
    }
}
