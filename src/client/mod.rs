//! HTTP client for the Stowix push API (`crate::api`): auth header, error classification,
//! retries, rate limits and resumable upload sessions. It knows nothing of store paths or of
//! the pipeline; `push` drives it.
//!
//! ```text
//!   caller ──► call(endpoint) ──► request limiter ──► Bearer token ──► reqwest ──► server
//!                  ▲                                                    │
//!                  └── RetryState: backoff + jitter, Retry-After ◄──────┘ failure
//!   upload bodies ──► 64 KiB pieces ──► byte limiter ──► stall watchdog ──► reqwest body
//! ```
//!
//! Everything observable (request durations, retries, wire bytes, limiter waits) is reported
//! through [`ClientObserver`], so metric names stay in `push::metrics`.

pub mod error;
pub mod limit;
pub mod retry;
pub mod session;
pub mod target;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::{RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

use crate::api::{self, ApiError, RepoInfo};
pub use error::{ClientError, Endpoint, RetryReason};
pub use limit::RateLimits;
pub use retry::RetryPolicy;
pub use session::{OpenedUpload, UploadSession};
pub use target::{RepoUrl, Token};

/// Establishing a TCP+TLS connection takes well under a second on any working network; ten
/// seconds tells a black-holed address from a slow one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence while waiting for an answer. Completing a multi-GiB upload makes the server
/// verify the NAR before it answers, so this is generous; a dead connection still ends.
const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// An upload body that makes no progress for this long is a stalled connection (the server or
/// a proxy stopped reading): abort it and resume from the server's offset.
const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Overrides [`DEFAULT_STALL_TIMEOUT`] in seconds (tests).
pub const STALL_TIMEOUT_ENV: &str = "STOWIX_STALL_TIMEOUT_SECS";
/// Upload bodies are fed to the connection in pieces of this size, each metered by the byte
/// limiter and counted as sent: small enough for a smooth rate, large enough to be cheap.
const SEND_PIECE: usize = 64 * 1024;
/// The info request decides within seconds whether the target is reachable at all, so it
/// retries less than the pipeline's requests.
const INFO_MAX_RETRIES: usize = 3;

/// Hooks for metrics and logs; the client calls them, `push` implements them.
pub trait ClientObserver: Send + Sync {
    fn request_finished(&self, _endpoint: Endpoint, _elapsed: Duration) {}
    fn retrying(
        &self,
        _endpoint: Endpoint,
        _reason: RetryReason,
        _delay: Duration,
        _err: &ClientError,
    ) {
    }
    /// Body bytes handed to the connection, retries included.
    fn bytes_sent(&self, _bytes: u64) {}
    fn rate_limited(&self, _waited: Duration) {}
}

/// Observes nothing.
pub struct NoObserver;
impl ClientObserver for NoObserver {}

pub struct ClientConfig {
    pub repo: RepoUrl,
    pub token: Token,
    pub limits: RateLimits,
    pub retry: RetryPolicy,
    pub observer: Arc<dyn ClientObserver>,
}

pub struct PushClient {
    http: reqwest::Client,
    repo: RepoUrl,
    token: Token,
    limits: RateLimits,
    retry: RetryPolicy,
    observer: Arc<dyn ClientObserver>,
    stall_timeout: Duration,
}

impl PushClient {
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        let stall_override = std::env::var(STALL_TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        let http = reqwest::Client::builder()
            .user_agent(concat!("stowix/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            // The override shortens the wait for an answer as well as for body progress, so a
            // stalled answer is detected as quickly as a stalled upload.
            .read_timeout(stall_override.unwrap_or(READ_TIMEOUT))
            .build()
            .map_err(|err| ClientError::Unreachable {
                url: config.repo.to_string(),
                detail: error::describe_chain(&err),
            })?;
        let stall_timeout = stall_override.unwrap_or(DEFAULT_STALL_TIMEOUT);
        Ok(Self {
            http,
            repo: config.repo,
            token: config.token,
            limits: config.limits,
            retry: config.retry,
            observer: config.observer,
            stall_timeout,
        })
    }

    pub fn repo(&self) -> &RepoUrl {
        &self.repo
    }

    fn url(&self, route: &str) -> url::Url {
        self.repo.join(&format!("{}/{route}", api::API_PREFIX))
    }

    /// `GET api/v1/info`, with the answers that mean "not a Stowix repository" and "cannot
    /// reach" told apart from API errors.
    pub async fn info(&self) -> Result<RepoInfo, ClientError> {
        let policy = RetryPolicy {
            max_retries: INFO_MAX_RETRIES,
            ..self.retry.clone()
        };
        let url = self.url("info");
        let result: Result<RepoInfo, ClientError> = self
            .call_with(&policy, Endpoint::Info, &mut 0, || {
                self.http.get(url.clone())
            })
            .await;
        result.map_err(|err| match err {
            ClientError::Transport { detail, .. } => ClientError::Unreachable {
                url: self.repo.to_string(),
                detail,
            },
            ClientError::Api { status, api, .. } if status == StatusCode::NOT_FOUND => {
                ClientError::NotStowix {
                    url: self.repo.to_string(),
                    detail: format!(
                        "{} answered 404 ({}: {}); check the repository name in --target",
                        url, api.code, api.message
                    ),
                }
            }
            ClientError::Api { status, api, .. } if status.is_server_error() => {
                ClientError::Unreachable {
                    url: self.repo.to_string(),
                    detail: format!(
                        "the server kept answering {status} ({}: {}); it may be down or overloaded",
                        api.code, api.message
                    ),
                }
            }
            ClientError::Decode { detail, .. } => ClientError::NotStowix {
                url: self.repo.to_string(),
                detail: format!("{url} did not answer with repository information ({detail})"),
            },
            other => other,
        })
    }

    /// One `GET api/v1/info` without retries or error mapping: the push's prober asks again
    /// on its own schedule while the server is silent.
    pub async fn probe(&self) -> Result<RepoInfo, ClientError> {
        let policy = RetryPolicy {
            max_retries: 0,
            ..self.retry.clone()
        };
        let url = self.url("info");
        self.call_with(&policy, Endpoint::Info, &mut 0, || {
            self.http.get(url.clone())
        })
        .await
    }

    pub async fn presence(
        &self,
        request: &api::PresenceRequest,
    ) -> Result<api::PresenceResponse, ClientError> {
        let url = self.url("presence");
        self.call(Endpoint::Presence, &mut 0, || {
            self.http.post(url.clone()).json(request)
        })
        .await
    }

    /// Single-request upload of a whole compressed NAR. Returns the answer and the retries.
    pub async fn upload_nar(
        &self,
        params: &api::NarUploadParams,
        body: Bytes,
    ) -> Result<(api::NarStored, u32), ClientError> {
        let url = self.url("nars");
        let mut retries = 0;
        let mut state = self.retry.start();
        loop {
            let request = self.http.post(url.clone()).query(params);
            let result = self.send_body(Endpoint::Nars, request, body.clone()).await;
            let result = match result {
                Ok(response) => read_json(Endpoint::Nars, response).await,
                Err(err) => Err(err),
            };
            match result {
                Ok(stored) => return Ok((stored, retries)),
                Err(err) => match state.next_delay(&err) {
                    Some((reason, delay)) => {
                        retries += 1;
                        self.observer.retrying(Endpoint::Nars, reason, delay, &err);
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(err),
                },
            }
        }
    }

    pub async fn create_upload(
        &self,
        request: &api::CreateUpload,
    ) -> Result<api::UploadState, ClientError> {
        let url = self.url("uploads");
        self.call(Endpoint::UploadCreate, &mut 0, || {
            self.http.post(url.clone()).json(request)
        })
        .await
    }

    pub async fn upload_state(&self, id: &str) -> Result<api::UploadState, ClientError> {
        let url = self.url(&format!("uploads/{id}"));
        self.call(Endpoint::UploadState, &mut 0, || self.http.get(url.clone()))
            .await
    }

    /// One PATCH attempt; the session's loop decides about retries and resynchronisation.
    async fn patch_upload(
        &self,
        id: &str,
        offset: u64,
        body: Bytes,
    ) -> Result<api::UploadState, ClientError> {
        let url = self.url(&format!("uploads/{id}"));
        let request = self
            .http
            .patch(url)
            .header(api::UPLOAD_OFFSET_HEADER, offset.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream");
        let response = self.send_body(Endpoint::UploadPatch, request, body).await?;
        read_json(Endpoint::UploadPatch, response).await
    }

    async fn complete_upload(
        &self,
        id: &str,
        request: &api::CompleteUpload,
        retries: &mut u32,
    ) -> Result<api::NarStored, ClientError> {
        let url = self.url(&format!("uploads/{id}/complete"));
        self.call(Endpoint::UploadComplete, retries, || {
            self.http.post(url.clone()).json(request)
        })
        .await
    }

    async fn abort_upload(&self, id: &str) -> Result<(), ClientError> {
        let url = self.url(&format!("uploads/{id}"));
        let response = self
            .attempt(Endpoint::UploadAbort, self.http.delete(url))
            .await?;
        drop(response);
        Ok(())
    }

    pub async fn publish(
        &self,
        request: &api::PublishRequest,
    ) -> Result<api::PublishResponse, ClientError> {
        let url = self.url("narinfos");
        self.call(Endpoint::Narinfos, &mut 0, || {
            self.http.post(url.clone()).json(request)
        })
        .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        retries: &mut u32,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<T, ClientError> {
        self.call_with(&self.retry, endpoint, retries, build).await
    }

    /// A JSON request with retries; `build` makes a fresh request per attempt.
    async fn call_with<T: DeserializeOwned>(
        &self,
        policy: &RetryPolicy,
        endpoint: Endpoint,
        retries: &mut u32,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<T, ClientError> {
        let mut state = policy.start();
        loop {
            let result = match self.attempt(endpoint, build()).await {
                Ok(response) => read_json(endpoint, response).await,
                Err(err) => Err(err),
            };
            match result {
                Ok(value) => {
                    *retries += state.retries;
                    return Ok(value);
                }
                Err(err) => match state.next_delay(&err) {
                    Some((reason, delay)) => {
                        self.observer.retrying(endpoint, reason, delay, &err);
                        tokio::time::sleep(delay).await;
                    }
                    None => {
                        *retries += state.retries;
                        return Err(err);
                    }
                },
            }
        }
    }

    /// One attempt: request limiter, auth, send; a non-success status becomes an error.
    async fn attempt(
        &self,
        endpoint: Endpoint,
        request: RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let waited = self.limits.request().await;
        if !waited.is_zero() {
            self.observer.rate_limited(waited);
        }
        let start = Instant::now();
        let result = request.bearer_auth(self.token.expose()).send().await;
        self.observer.request_finished(endpoint, start.elapsed());
        let response = result.map_err(|err| ClientError::from_reqwest(endpoint, &err))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(error_from_response(endpoint, response).await)
        }
    }

    /// Sends `body` in metered pieces, aborting when the body stops moving for the stall
    /// timeout (a server or proxy that stopped reading would otherwise hang us forever).
    async fn send_body(
        &self,
        endpoint: Endpoint,
        request: RequestBuilder,
        body: Bytes,
    ) -> Result<reqwest::Response, ClientError> {
        let epoch = Instant::now();
        let last_progress_ms = Arc::new(AtomicU64::new(0));
        let stream = metered_body(
            body,
            self.limits.clone(),
            Arc::clone(&self.observer),
            epoch,
            Arc::clone(&last_progress_ms),
        );
        let request = request.body(reqwest::Body::wrap_stream(stream));
        let stall_timeout = self.stall_timeout;
        let watchdog = async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let last = last_progress_ms.load(Ordering::Relaxed);
                if last == BODY_DONE {
                    // Waiting for the answer is covered by the client's read timeout.
                    std::future::pending::<()>().await;
                }
                let idle = epoch.elapsed().saturating_sub(Duration::from_millis(last));
                if idle > stall_timeout {
                    return;
                }
            }
        };
        tokio::select! {
            result = self.attempt(endpoint, request) => result,
            () = watchdog => Err(ClientError::Transport {
                endpoint: endpoint.label(),
                detail: format!("upload stalled: no progress for {} s", stall_timeout.as_secs()),
                timeout: true,
                tls: false,
            }),
        }
    }
}

/// Marks a finished body for the stall watchdog.
const BODY_DONE: u64 = u64::MAX;

fn metered_body(
    body: Bytes,
    limits: RateLimits,
    observer: Arc<dyn ClientObserver>,
    epoch: Instant,
    last_progress_ms: Arc<AtomicU64>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let touch = move |progress: &AtomicU64| {
        progress.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    };
    futures_util::stream::unfold(body, move |mut rest| {
        let limits = limits.clone();
        let observer = Arc::clone(&observer);
        let progress = Arc::clone(&last_progress_ms);
        async move {
            if rest.is_empty() {
                progress.store(BODY_DONE, Ordering::Relaxed);
                return None;
            }
            let piece = rest.split_to(rest.len().min(SEND_PIECE));
            touch(&progress);
            let waited = limits.bytes(piece.len()).await;
            if !waited.is_zero() {
                observer.rate_limited(waited);
            }
            touch(&progress);
            observer.bytes_sent(piece.len() as u64);
            Some((Ok(piece), rest))
        }
    })
}

async fn read_json<T: DeserializeOwned>(
    endpoint: Endpoint,
    response: reqwest::Response,
) -> Result<T, ClientError> {
    let body = response
        .bytes()
        .await
        .map_err(|err| ClientError::from_reqwest(endpoint, &err))?;
    serde_json::from_slice(&body).map_err(|err| ClientError::Decode {
        endpoint: endpoint.label(),
        detail: format!("{err}; the answer began with {:?}", preview(&body)),
    })
}

async fn error_from_response(endpoint: Endpoint, response: reqwest::Response) -> ClientError {
    let status = response.status();
    let retry_after =
        error::parse_retry_after(response.headers().get(reqwest::header::RETRY_AFTER));
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(err) => return ClientError::from_reqwest(endpoint, &err),
    };
    let api = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
        code: format!("http_{}", status.as_u16()),
        message: if body.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("no reason given")
                .to_owned()
        } else {
            preview(&body)
        },
        offset: None,
    });
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return ClientError::Auth { status, api };
    }
    ClientError::Api {
        endpoint: endpoint.label(),
        status,
        api,
        retry_after,
    }
}

/// The start of a body that was not what we expected, for an error message.
fn preview(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
