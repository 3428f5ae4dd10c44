//! The repository server: every repository URL `http://ADDR/<repo>` is a complete Nix HTTP
//! binary cache, plus the Stowix push API and `nix copy --to` compatibility.
//!
//! ```text
//!  conn: accept loop (connection cap, head timeout, header bytes) ──► hyper http1 ──► router
//!             ┌── routes_cache: nix-cache-info, <hash>.narinfo, nar/<file>  (GET/HEAD; PUT for nix copy)
//!  request ──►├── routes_api:   api/v1/{info,presence,nars,uploads,narinfos}
//!   (metrics  └── /metrics, /healthz
//!    middleware)      │
//!                     ├─► auth (tokens) ─► metadata (trait; SQLite or PostgreSQL)
//!                     ├─► upload (staging, limits) ─► verify (decompress, NAR check) ─► storage (trait; local files)
//!                     └─► publish (closure check, signing) ─► metadata
//! ```
//! Layers below the routes know nothing of HTTP routing; storage and metadata are traits so
//! S3-compatible storage and PostgreSQL slot in without touching the routes.

pub mod auth;
pub mod backend;
pub mod cache;
pub mod config;
pub mod conn;
pub mod error;
pub mod gc;
pub mod janitor;
pub mod last_use;
pub mod metrics;
pub mod migrate;
pub mod publish;
mod routes_api;
mod routes_cache;
mod routes_files;
pub mod staging;
pub mod upload;
pub mod verify;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;

use crate::api::codes;
pub use backend::{metadata, storage};
use config::ServerConfig;
use error::{ServerError, ServerResult};
use metadata::{Metadata, RepoRecord, Scope};
use storage::Storage;

/// Names that would shadow server-wide routes, or that are too easy to confuse.
const RESERVED_REPO_NAMES: &[&str] = &["metrics", "healthz", "api", "nar", "nix-cache-info"];

/// `[a-z0-9][a-z0-9_-]{0,62}`: safe in a URL, a file name and a Nix key name.
pub fn is_valid_repo_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !RESERVED_REPO_NAMES.contains(&name)
}

pub struct AppState {
    pub config: ServerConfig,
    pub meta: Arc<dyn Metadata>,
    pub storage: Arc<dyn Storage>,
    /// Where chunked uploads wait for completion (the storage backend's choice).
    pub staging: Arc<dyn staging::ChunkStaging>,
    /// Chunked uploads in progress on local storage: `<id>.part`.
    pub uploads_dir: PathBuf,
    /// Single-request uploads while they are received and verified.
    pub tmp_dir: PathBuf,
    pub upload_slots: Arc<Semaphore>,
    /// Uploads in flight per repository (only those with any).
    repo_uploads: Arc<Mutex<HashMap<String, usize>>>,
    /// One lock per upload id: a chunk append and a completion never interleave.
    upload_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Fixed size, constant cost per failure: see [`auth::FailureTable`].
    auth_failures: Mutex<auth::FailureTable>,
    pub metrics: Option<PrometheusHandle>,
    /// Repository records by name, for about a second (absent names are not cached: a
    /// repository created a moment ago is found at once).
    repos: cache::TtlCache<RepoRecord>,
    /// Published narinfo texts by `<repo>/<hash>`.
    pub narinfos: cache::TtlCache<std::sync::Arc<str>>,
    /// Uses waiting to be written (`last_use.rs`).
    pub last_use: last_use::LastUse,
}

/// A repository record is reread at most this often per process: changes by `stowix admin`
/// (visibility, upstream keys) reach every replica within it.
const REPO_CACHE_TTL: Duration = Duration::from_secs(1);
const REPO_CACHE_ENTRIES: usize = 4096;

pub type SharedState = Arc<AppState>;

/// An upload in flight: a server-wide slot and one of its repository's share.
pub struct UploadSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _shares: Vec<RepoShare>,
}

/// One upload counted against a repository's (`repo/NAME`) or a token's (`token/ID`) share of
/// the upload slots; released on drop.
struct RepoShare {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    repo: String,
}

impl Drop for RepoShare {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.repo) {
            *count -= 1;
            // Only repositories with uploads in flight stay in the map.
            if *count == 0 {
                counts.remove(&self.repo);
            }
        }
    }
}

impl AppState {
    pub fn open(config: ServerConfig, metrics: Option<PrometheusHandle>) -> Result<Self, String> {
        let data_dir = &config.data_dir;
        let uploads_dir = data_dir.join("uploads");
        let tmp_dir = data_dir.join("tmp");
        for dir in [data_dir, &uploads_dir, &tmp_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|err| format!("cannot create data directory {}: {err}", dir.display()))?;
        }
        let backend::Backends { meta, storage } = backend::open(&config)?;
        let staging = storage.chunk_staging();
        let (config_narinfo_entries, config_narinfo_secs) =
            (config.narinfo_cache_entries, config.narinfo_cache_secs);
        Ok(AppState {
            staging,
            upload_slots: Arc::new(Semaphore::new(config.max_concurrent_uploads)),
            repo_uploads: Arc::new(Mutex::new(HashMap::new())),
            config,
            meta,
            storage,
            uploads_dir,
            tmp_dir,
            upload_locks: Mutex::new(HashMap::new()),
            auth_failures: Mutex::new(auth::FailureTable::new(
                auth::FailureTable::DEFAULT_SLOTS,
                Duration::from_secs(60),
            )),
            metrics,
            repos: cache::TtlCache::new(REPO_CACHE_ENTRIES, REPO_CACHE_TTL),
            narinfos: cache::TtlCache::new(
                config_narinfo_entries,
                Duration::from_secs(config_narinfo_secs),
            ),
            last_use: last_use::LastUse::default(),
        })
    }

    /// The repository record, from the cache when it is fresh.
    pub async fn repo_record(&self, name: &str) -> ServerResult<Option<RepoRecord>> {
        if let Some(record) = self.repos.get(name) {
            return Ok(Some(record));
        }
        let lookup = name.to_string();
        let record = self.db(move |meta| meta.repo(&lookup)).await?;
        if let Some(record) = &record {
            self.repos.insert(name.to_string(), record.clone());
        }
        Ok(record)
    }

    /// Runs a metadata call off the async runtime.
    pub async fn db<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Metadata) -> metadata::MetaResult<T> + Send + 'static,
    ) -> ServerResult<T> {
        let meta = Arc::clone(&self.meta);
        Ok(tokio::task::spawn_blocking(move || call(meta.as_ref())).await??)
    }

    pub fn upload_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.upload_locks.lock().unwrap_or_else(|p| p.into_inner());
        // Drop locks nobody holds, so the map does not grow with every upload ever made.
        if locks.len() > 1024 {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        Arc::clone(locks.entry(id.to_string()).or_default())
    }

    /// An upload slot, if the server, the repository and the token each have one free: neither
    /// one repository nor one token (which may cover several repositories) can take them all.
    pub fn upload_slot(&self, repo: &str, token_id: Option<&str>) -> ServerResult<UploadSlot> {
        let mut wanted = vec![(
            format!("repo/{repo}"),
            self.config.max_concurrent_uploads_per_repo.max(1),
            format!("repository '{repo}'"),
        )];
        if let Some(id) = token_id {
            wanted.push((
                format!("token/{id}"),
                self.config.max_concurrent_uploads_per_token.max(1),
                format!("token {id}"),
            ));
        }
        let mut shares = Vec::with_capacity(wanted.len());
        {
            let mut counts = self.repo_uploads.lock().unwrap_or_else(|p| p.into_inner());
            for (key, limit, who) in &wanted {
                if counts.get(key).copied().unwrap_or(0) >= *limit {
                    return Err(ServerError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        codes::TOO_MANY_UPLOADS,
                        format!(
                            "{who} has its maximum of {limit} uploads in flight; retry shortly"
                        ),
                    )
                    .with_retry_after(1));
                }
            }
            for (key, _, _) in wanted {
                *counts.entry(key.clone()).or_insert(0) += 1;
                shares.push(RepoShare {
                    counts: Arc::clone(&self.repo_uploads),
                    repo: key,
                });
            }
        }
        let permit = Arc::clone(&self.upload_slots)
            .try_acquire_owned()
            .map_err(|_| {
                ServerError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::TOO_MANY_UPLOADS,
                    format!(
                        "the server is receiving its maximum of {} uploads; retry shortly",
                        self.config.max_concurrent_uploads
                    ),
                )
                .with_retry_after(1)
            })?;
        Ok(UploadSlot {
            _permit: permit,
            _shares: shares,
        })
    }

    /// Looks up the repository and checks the request's credentials for `needed` access.
    /// `strict` also rejects bad credentials on public reads (the push API wants to know);
    /// the cache read side ignores credentials on public repositories, because Nix sends its
    /// netrc password to every repository on a host.
    pub async fn access(
        &self,
        repo_name: &str,
        headers: &HeaderMap,
        peer: IpAddr,
        needed: auth::Access,
        strict: bool,
    ) -> ServerResult<(RepoRecord, Option<Scope>)> {
        if !is_valid_repo_name(repo_name) {
            return Err(no_such_repository(repo_name));
        }
        let peer = self.client_address(headers, peer);
        let repo = self.repo_record(repo_name).await?;
        let token = auth::presented_token(headers);
        if let Some(repo) = &repo {
            if needed == auth::Access::Read && !repo.private && !strict {
                return Ok((repo.clone(), None));
            }
        }
        let token = match token {
            Ok(token) => token,
            Err(err) => return Err(self.auth_failed(peer, err)),
        };
        if token.is_some() {
            self.check_auth_rate(peer)?;
        }
        let meta = Arc::clone(&self.meta);
        let repo_for_check = repo.clone();
        // A presented token is checked even when the repository does not exist, so a bad token
        // gets the same 401 for absent and private repositories.
        let checked = tokio::task::spawn_blocking(move || match &repo_for_check {
            Some(repo) => auth::authorize(meta.as_ref(), repo, token.as_deref(), needed),
            None => match token {
                Some(token) => auth::authenticate(meta.as_ref(), &token).map(|_| None),
                None => Ok(None),
            },
        })
        .await?;
        let Some(repo) = repo else {
            return match checked {
                Err(err) => Err(self.auth_failed(peer, err)),
                Ok(_) => Err(no_such_repository(repo_name)),
            };
        };
        match checked {
            Ok(scope) => Ok((repo, scope)),
            // Whoever may not use a private repository at all gets the answer of an absent one,
            // so repository names cannot be enumerated. Nix sends netrc credentials with its
            // first request (Basic, no challenge needed), so it never relies on a 401 here.
            Err(err)
                if repo.private
                    && (err.body.code == codes::MISSING_TOKEN
                        || err.body.code == codes::WRONG_REPOSITORY) =>
            {
                Err(no_such_repository(repo_name))
            }
            Err(err) => Err(self.auth_failed(peer, err)),
        }
    }

    /// Behind a reverse proxy every request comes from the proxy's address; when the operator
    /// names the header the proxy sets, the failure budget applies to the real client instead.
    /// The right-most address is the one the (trusted) proxy appended.
    fn client_address(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        let Some(header) = &self.config.client_ip_header else {
            return peer;
        };
        headers
            .get_all(header.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|v| v.trim().parse::<IpAddr>().ok())
            .next_back()
            .unwrap_or(peer)
    }

    fn auth_failed(&self, peer: IpAddr, err: ServerError) -> ServerError {
        ::metrics::counter!(metrics::AUTH_FAILURES_TOTAL, "code" => err.body.code.clone())
            .increment(1);
        if err.status == StatusCode::UNAUTHORIZED && err.body.code != codes::MISSING_TOKEN {
            self.auth_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(peer, Instant::now());
        }
        err
    }

    /// Refuses to even evaluate credentials from an address that failed too often this minute,
    /// so guessing tokens costs a minute per `auth_failures_per_minute` guesses.
    fn check_auth_rate(&self, peer: IpAddr) -> ServerResult<()> {
        let wait = self
            .auth_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .wait(peer, self.config.auth_failures_per_minute, Instant::now());
        if let Some(wait) = wait {
            let wait = wait.as_secs() + 1;
            return Err(ServerError::new(
                StatusCode::TOO_MANY_REQUESTS,
                codes::TOO_MANY_ATTEMPTS,
                format!("too many failed authentications from this address; retry in {wait} s"),
            )
            .with_retry_after(wait));
        }
        Ok(())
    }
}

/// The repository a request's route names (`{repo}`), with the request's credentials checked
/// by [`AppState::access`] for push (`PUSH`) or read access; `STRICT` also refuses bad
/// credentials on public reads. Handlers take it as an argument, so none can forget the check.
pub struct Authorized<const PUSH: bool, const STRICT: bool> {
    pub repo: RepoRecord,
    /// The token's scope when a valid token was presented.
    pub scope: Option<Scope>,
    /// The id of the token presented, when one was.
    pub token_id: Option<String>,
}

/// Push API writes and `nix copy --to` PUTs.
pub type PushAccess = Authorized<true, true>;
/// Push API reads (`info`, `presence`): a bad token is an error even on a public repository.
pub type ApiReadAccess = Authorized<false, true>;
/// What Nix substituters read: public repositories ignore credentials (netrc sends them to
/// every repository on a host).
pub type CacheReadAccess = Authorized<false, false>;

impl<const PUSH: bool, const STRICT: bool> FromRequestParts<SharedState>
    for Authorized<PUSH, STRICT>
{
    type Rejection = ServerError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, ServerError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ServerError::not_found("this route names no repository"))?;
        let repo_name = params
            .iter()
            .find(|(key, _)| *key == "repo")
            .map(|(_, value)| value.to_string())
            .ok_or_else(|| ServerError::not_found("this route names no repository"))?;
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip())
            .ok_or_else(|| {
                ServerError::internal("the server was started without connection info")
            })?;
        let needed = if PUSH {
            auth::Access::Push
        } else {
            auth::Access::Read
        };
        let (repo, scope) = state
            .access(&repo_name, &parts.headers, peer, needed, STRICT)
            .await?;
        // The extractor already accepted the token, so it parses; its id keys the token's
        // share of the upload slots.
        let token_id = auth::presented_token(&parts.headers)
            .ok()
            .flatten()
            .and_then(|token| auth::parse_token(&token).map(|parsed| parsed.id.to_string()));
        Ok(Authorized {
            repo,
            scope,
            token_id,
        })
    }
}

fn no_such_repository(name: &str) -> ServerError {
    ServerError::new(
        StatusCode::NOT_FOUND,
        codes::NO_SUCH_REPOSITORY,
        format!(
            "no repository named {:?} on this server",
            name.chars().take(80).collect::<String>()
        ),
    )
}

/// JSON bodies (presence, publication) are far smaller than this even at the batch limits.
pub(crate) const JSON_BODY_LIMIT: usize = 64 << 20;

/// The routes of the separate metrics address (`metrics_listen`).
pub fn metrics_router(state: SharedState) -> Router {
    Router::new()
        .route("/metrics", get(routes_cache::metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

pub fn router(state: SharedState) -> Router {
    let api = format!("/{{repo}}/{}", crate::api::API_PREFIX);
    let base = Router::new().route("/healthz", get(healthz));
    // With its own address, /metrics is not on the public one: a route that is absent
    // answers like any unknown path.
    let base = if state.config.metrics_listen.is_none() {
        base.route("/metrics", get(routes_cache::metrics))
    } else {
        base
    };
    base.route(&format!("{api}/info"), get(routes_api::info))
        .route(&format!("{api}/presence"), post(routes_api::presence))
        .route(
            &format!("{api}/nars"),
            post(routes_api::upload_whole).layer(DefaultBodyLimit::disable()),
        )
        .route(
            &format!("{api}/nar-batch"),
            post(routes_api::upload_batch).layer(DefaultBodyLimit::disable()),
        )
        .route(&format!("{api}/uploads"), post(routes_api::create_upload))
        .route(
            &format!("{api}/uploads/{{id}}"),
            get(routes_api::upload_state)
                .patch(routes_api::upload_chunk)
                .delete(routes_api::abort_upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            &format!("{api}/uploads/{{id}}/complete"),
            post(routes_api::complete_upload),
        )
        .route(&format!("{api}/narinfos"), post(routes_api::publish))
        .route(&format!("{api}/pins"), get(routes_api::list_pins))
        .route(&format!("{api}/pins/{{name}}"), post(routes_api::create_pin))
        .route(
            "/{repo}/log/{file}",
            get(routes_files::get_log)
                .put(routes_files::put_log)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/{repo}/debuginfo/{file}",
            get(routes_files::get_debuginfo).put(routes_files::put_debuginfo),
        )
        .route(
            "/{repo}/nar/{file}",
            get(routes_cache::get_nar)
                .put(routes_cache::put_nar)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/{repo}/{file}",
            get(routes_cache::get_file).put(routes_cache::put_file),
        )
        .fallback(|| async { ServerError::not_found("no such route: repositories live at /<name>/ (nix-cache-info, <hash>.narinfo, nar/<file>, api/v1/...)") })
        .method_not_allowed_fallback(|| async {
            ServerError::new(StatusCode::METHOD_NOT_ALLOWED, codes::BAD_REQUEST, "method not allowed on this route")
        })
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(axum::middleware::from_fn(metrics::track))
        .with_state(state)
}

/// Deletes temporary files a crash left behind, then runs the janitor once.
pub async fn clean_up(state: &AppState) -> ServerResult<()> {
    if let Ok(mut entries) = tokio::fs::read_dir(&state.tmp_dir).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
    janitor::run(state).await.map(|_| ())
}

/// `/healthz`: ready when the database and the storage both answer; otherwise 503 with one
/// line naming what failed, so a load balancer takes this replica out.
async fn healthz(
    axum::extract::State(state): axum::extract::State<SharedState>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match unready(&state).await {
        None => "ok\n".into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", reason.replace('\n', " ")),
        )
            .into_response(),
    }
}

/// Why this replica cannot serve now (the database or the storage does not answer), or
/// `None` when both do: `/healthz`, and `GET api/v1/info`, which a pushing client probes
/// during an outage, so that it waits for the backends and not only for the process.
pub(crate) async fn unready(state: &AppState) -> Option<String> {
    let meta = Arc::clone(&state.meta);
    let database = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || meta.ping()),
    )
    .await;
    match database {
        Err(_) => Some("database: no answer within 5 s".to_string()),
        Ok(Err(err)) => Some(format!("database: {err}")),
        Ok(Ok(Err(err))) => Some(format!("database: {err}")),
        Ok(Ok(Ok(()))) => match state.storage.health().await {
            Ok(()) => None,
            Err(err) => Some(format!("storage: {err}")),
        },
    }
}

/// Serves until SIGINT/SIGTERM, then lets requests in flight finish for the grace period.
/// Prints `listening on http://ADDR` on stdout once it accepts connections.
pub async fn serve(config: ServerConfig) -> Result<(), String> {
    let handle = metrics::install_recorder()?;
    let listen = config.listen;
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let state: SharedState = Arc::new(AppState::open(config, Some(handle))?);
    // A bucket that is briefly unreachable must not keep a replica from starting: the next
    // janitor pass catches up.
    if let Err(err) = clean_up(&state).await {
        tracing::warn!("cleanup at start failed: {}", err.body.message);
    }
    let limits = connection_limits(&state.config)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|err| format!("cannot listen on {listen}: {err}"))?;
    let local = listener.local_addr().map_err(|err| err.to_string())?;
    let metrics_listener = match state.config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|err| format!("cannot listen for metrics on {addr}: {err}"))?,
        ),
        None => None,
    };
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening on http://{local}");
        if let Some(metrics) = &metrics_listener {
            if let Ok(addr) = metrics.local_addr() {
                let _ = writeln!(stdout, "metrics on http://{addr}/metrics");
            }
        }
        let _ = stdout.flush();
    }
    tracing::info!(
        %local,
        max_connections = limits.max_connections,
        data_dir = %state.config.data_dir.display(),
        "stowix serve started"
    );

    let janitor_state = Arc::clone(&state);
    tokio::spawn(async move {
        let every = Duration::from_secs(janitor_state.config.janitor_interval_secs.max(1));
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            match janitor::run(&janitor_state).await {
                Ok(Some(swept)) => tracing::info!(
                    uploads_expired = swept.uploads_expired,
                    orphans_deleted = swept.orphans_deleted,
                    "janitor pass done"
                ),
                Ok(None) => tracing::debug!("janitor: another replica holds the lock"),
                Err(err) => tracing::warn!("janitor failed: {}", err.body.message),
            }
        }
    });

    spawn_retention(&state);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    if let Some(metrics_listener) = metrics_listener {
        let app = metrics_router(Arc::clone(&state));
        let limits = conn::ConnLimits {
            max_connections: 64,
            ..limits.clone()
        };
        servers.spawn(conn::serve(metrics_listener, app, limits, stop_rx.clone()));
    }
    let flush_state = Arc::clone(&state);
    servers.spawn(conn::serve(listener, router(state), limits, stop_rx));
    shutdown_signal().await;
    tracing::info!("shutting down: waiting up to {grace:?} for requests in flight");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(grace, async {
        while let Some(joined) = servers.join_next().await {
            joined.map_err(|err| format!("server task failed: {err}"))?;
        }
        Ok::<_, String>(())
    })
    .await;
    // Uses recorded since the last flush; a replica killed outright loses them (the grace
    // period covers it).
    flush_state.last_use.flush(&flush_state).await;
    match drained {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                "grace period over: abandoning requests in flight (chunked uploads stay resumable)"
            );
            Ok(())
        }
    }
}

/// The retention tasks of `serve`: the last-use flush, the size gauges at start, and the
/// scheduled collection (one replica at a time: the others find the lock held and skip).
fn spawn_retention(state: &SharedState) {
    let flusher = Arc::clone(state);
    tokio::spawn(async move {
        let every = Duration::from_secs(flusher.config.last_use_flush_secs.max(1));
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = flusher.last_use.overflowing() => {}
            }
            flusher.last_use.flush(&flusher).await;
        }
    });
    let collector = Arc::clone(state);
    tokio::spawn(async move {
        if let Ok(repos) = collector.db(|meta| meta.repos()).await {
            for repo in repos {
                let name = repo.name.clone();
                if let Ok(usage) = collector.db(move |meta| meta.usage(&name)).await {
                    metrics::record_usage(&repo.name, &usage);
                }
            }
        }
        let every = Duration::from_secs(collector.config.gc_interval_secs.max(1));
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let options = gc::GcOptions {
                repo: None,
                dry_run: false,
                now: gc::now(),
                grace_secs: collector.config.gc_grace_secs,
                orphan_grace_secs: collector.config.orphan_grace_secs,
            };
            match gc::run(&collector, &options).await {
                Ok(Some(done)) => tracing::info!(
                    paths_removed = done.iter().map(|r| r.paths_removed).sum::<u64>(),
                    nars_deleted = done.iter().map(|r| r.nars_deleted).sum::<u64>(),
                    bytes_freed = done.iter().map(|r| r.bytes_freed).sum::<u64>(),
                    "garbage collection done"
                ),
                Ok(None) => tracing::debug!("gc: another replica holds the lock"),
                Err(err) => tracing::warn!("garbage collection failed: {}", err.body.message),
            }
        }
    });
}

/// The connection limits of `config`, with the cap checked against the descriptor limit.
fn connection_limits(config: &ServerConfig) -> Result<conn::ConnLimits, String> {
    let nofile = conn::descriptor_limit()
        .map_err(|err| format!("cannot read the descriptor limit: {err}"))?;
    let db_connections = config.metadata_readers + 2;
    let derived = conn::connection_cap(nofile, config.max_concurrent_uploads, db_connections)
        .ok_or_else(|| {
            format!(
                "the descriptor limit of {nofile} leaves too few for connections with {} upload \
                 slots: raise it (`ulimit -n 4096`) or lower max_concurrent_uploads",
                config.max_concurrent_uploads
            )
        })?;
    let max_connections = config
        .max_connections
        .map_or(derived, |c| c.clamp(1, derived));
    Ok(conn::ConnLimits {
        head_timeout: Duration::from_secs(config.request_head_timeout_secs.max(1)),
        max_header_bytes: config.max_header_bytes,
        max_connections,
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        for good in ["my-cache", "a", "0x", "team_1"] {
            assert!(is_valid_repo_name(good), "{good}");
        }
        for bad in [
            "",
            "..",
            ".",
            "My",
            "-a",
            "a/b",
            "a.b",
            "metrics",
            "healthz",
            &"a".repeat(64),
            "%2e%2e",
        ] {
            assert!(!is_valid_repo_name(bad), "{bad}");
        }
    }
}
