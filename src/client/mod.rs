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
//!
//! The server is not trusted to be well-behaved: every answer is read up to a limit sized to
//! the largest legal answer (an endless body is "not a Stowix server", not an out-of-memory
//! kill), every text it sends is escaped for the terminal where it is decoded
//! ([`error::escape_server_text`]), and every id it sends is checked before it goes into a URL
//! ([`session`]).

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
use crate::nix::StorePath;
pub use error::{ClientError, Endpoint, RetryReason};
pub use limit::RateLimits;
pub use retry::RetryPolicy;
pub use session::{OpenedUpload, UploadSession};
pub use target::{RepoUrl, Token};

/// Establishing a TCP+TLS connection takes well under a second on any working network; ten
/// seconds tells a black-holed address from a slow one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for an answer once the request is sent (for an upload: once its body is
/// sent, however long that took), and longest silence within an answer. Completing a
/// multi-GiB upload makes the server verify the NAR before it answers, so this is generous; a
/// dead connection still ends. Not reqwest's `read_timeout`: that one runs from the start of
/// the request, so it would end a slow upload that is still moving.
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
/// Largest answer of a route whose answer does not grow with the request (info, upload state,
/// stored NAR) and of any error answer: the largest legal one is a few hundred bytes (an error
/// message naming a store path, or a repository's limits); 64 KiB also fits a proxy's HTML
/// error page.
const SMALL_ANSWER_LIMIT: usize = 64 * 1024;

/// Largest legal answer to a request of `request_bytes`. Presence answers list a subset of the
/// queried hash parts; publication answers list each entry once, a rejection's message naming
/// at most the entry's store path and references: both stay below the request's size, so twice
/// that plus [`SMALL_ANSWER_LIMIT`] is generous and still bounded.
fn answer_limit_for(request_bytes: usize) -> usize {
    SMALL_ANSWER_LIMIT.saturating_add(request_bytes.saturating_mul(2))
}

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
    /// [`READ_TIMEOUT`], or the stall override.
    answer_timeout: Duration,
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
            .build()
            .map_err(|err| ClientError::Unreachable {
                url: config.repo.to_string(),
                detail: error::describe_chain(&err),
            })?;
        let stall_timeout = stall_override.unwrap_or(DEFAULT_STALL_TIMEOUT);
        // The override shortens the wait for an answer as well as for body progress, so a
        // stalled answer is detected as quickly as a stalled upload.
        let answer_timeout = stall_override.unwrap_or(READ_TIMEOUT);
        Ok(Self {
            http,
            repo: config.repo,
            token: config.token,
            limits: config.limits,
            retry: config.retry,
            observer: config.observer,
            stall_timeout,
            answer_timeout,
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
        let mut info = result.map_err(|err| match err {
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
        })?;
        // Both are printed when the token's scope is wrong.
        info.repository = error::escape_server_text(&info.repository);
        info.token_scope = info.token_scope.as_deref().map(error::escape_server_text);
        Ok(info)
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
        let body = json_body(request)?;
        let limit = answer_limit_for(body.len());
        self.call_limited(&self.retry, Endpoint::Presence, limit, &mut 0, || {
            json_request(self.http.post(url.clone()), body.clone())
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
        self.post_bytes(
            Endpoint::Nars,
            || self.http.post(url.clone()).query(params),
            body,
            SMALL_ANSWER_LIMIT,
        )
        .await
    }

    /// Sends small NARs in one request (`POST api/v1/nar-batch`): the manifest line, then the
    /// files in its order. Entries are answered one by one, in order.
    pub async fn upload_batch(
        &self,
        nars: &[(api::NarUploadParams, Bytes)],
    ) -> Result<(api::NarBatchResponse, u32), ClientError> {
        let count = nars.len();
        let manifest = api::NarBatchManifest {
            nars: nars.iter().map(|(params, _)| params.clone()).collect(),
        };
        let manifest = serde_json::to_vec(&manifest).expect("a manifest serialises");
        let files_len: usize = nars.iter().map(|(_, file)| file.len()).sum();
        let mut body = Vec::with_capacity(manifest.len() + 1 + files_len);
        body.extend_from_slice(&manifest);
        body.push(b'\n');
        for (_, file) in nars {
            body.extend_from_slice(file);
        }
        let url = self.url("nar-batch");
        let (answer, retries): (api::NarBatchResponse, u32) = self
            .post_bytes(
                Endpoint::NarBatch,
                || self.http.post(url.clone()),
                Bytes::from(body),
                SMALL_ANSWER_LIMIT.saturating_add(count.saturating_mul(1024)),
            )
            .await?;
        if answer.results.len() != count {
            return Err(ClientError::Protocol(format!(
                "the server answered {} results to a batch of {count} NARs",
                answer.results.len()
            )));
        }
        Ok((answer, retries))
    }

    /// POSTs `body` (built afresh by `request` per attempt) and reads a JSON answer of at most
    /// `answer_limit` bytes, retrying what the retry policy allows; returns the retries made.
    async fn post_bytes<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        request: impl Fn() -> RequestBuilder,
        body: Bytes,
        answer_limit: usize,
    ) -> Result<(T, u32), ClientError> {
        let mut retries = 0;
        let mut state = self.retry.start();
        loop {
            let result = match self.send_body(endpoint, request(), body.clone()).await {
                Ok(response) => self.read_json(endpoint, response, answer_limit).await,
                Err(err) => Err(err),
            };
            match result {
                Ok(answer) => return Ok((answer, retries)),
                Err(err) => match state.next_delay(&err) {
                    Some((reason, delay)) => {
                        retries += 1;
                        self.observer.retrying(endpoint, reason, delay, &err);
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
        self.read_json(Endpoint::UploadPatch, response, SMALL_ANSWER_LIMIT)
            .await
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
            .attempt(Endpoint::UploadAbort, self.http.delete(url), true)
            .await?;
        drop(response);
        Ok(())
    }

    pub async fn publish(
        &self,
        request: &api::PublishRequest,
    ) -> Result<api::PublishResponse, ClientError> {
        let url = self.url("narinfos");
        let body = json_body(request)?;
        let limit = answer_limit_for(body.len());
        let mut answer: api::PublishResponse = self
            .call_limited(&self.retry, Endpoint::Narinfos, limit, &mut 0, || {
                json_request(self.http.post(url.clone()), body.clone())
            })
            .await?;
        // Rejections are printed per path.
        for rejection in &mut answer.rejected {
            rejection.hash = error::escape_server_text(&rejection.hash);
            rejection.code = error::escape_server_text(&rejection.code);
            rejection.message = error::escape_server_text(&rejection.message);
        }
        Ok(answer)
    }

    /// `POST api/v1/pins/<name>`: pins published paths under `name` as its next revision.
    pub async fn pin(
        &self,
        name: &str,
        request: &api::PinRequest,
    ) -> Result<api::PinResponse, ClientError> {
        let url = self.url(&format!("pins/{name}"));
        let body = json_body(request)?;
        let limit = answer_limit_for(body.len());
        let mut answer: api::PinResponse = self
            .call_limited(&self.retry, Endpoint::Pins, limit, &mut 0, || {
                json_request(self.http.post(url.clone()), body.clone())
            })
            .await?;
        // Printed in the summary.
        answer.created.name = error::escape_server_text(&answer.created.name);
        Ok(answer)
    }

    /// `PUT <repo>/log/<drv>` (a cache route, not the push API): the build log of `drv`, as
    /// `nix store copy-log --to` stores it.
    pub async fn put_log(&self, drv: &StorePath, log: Bytes) -> Result<(), ClientError> {
        let url = self.repo.join(&format!("log/{}", drv.basename()));
        let mut state = self.retry.start();
        loop {
            let request = self
                .http
                .put(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(log.clone());
            match self.attempt(Endpoint::Log, request, true).await {
                Ok(_) => return Ok(()),
                Err(err) => match state.next_delay(&err) {
                    Some((reason, delay)) => {
                        self.observer.retrying(Endpoint::Log, reason, delay, &err);
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(err),
                },
            }
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        retries: &mut u32,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<T, ClientError> {
        self.call_with(&self.retry, endpoint, retries, build).await
    }

    /// A JSON request with retries whose answer is small; `build` makes a fresh request per
    /// attempt.
    async fn call_with<T: DeserializeOwned>(
        &self,
        policy: &RetryPolicy,
        endpoint: Endpoint,
        retries: &mut u32,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<T, ClientError> {
        self.call_limited(policy, endpoint, SMALL_ANSWER_LIMIT, retries, build)
            .await
    }

    /// A JSON request with retries whose answer may be up to `limit` bytes.
    async fn call_limited<T: DeserializeOwned>(
        &self,
        policy: &RetryPolicy,
        endpoint: Endpoint,
        limit: usize,
        retries: &mut u32,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<T, ClientError> {
        let mut state = policy.start();
        loop {
            let result = match self.attempt(endpoint, build(), true).await {
                Ok(response) => self.read_json(endpoint, response, limit).await,
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
    /// `timed` bounds the wait for the answer head by the answer timeout, counted from the
    /// send; streamed uploads pass `false` and time the answer from the body's end themselves.
    async fn attempt(
        &self,
        endpoint: Endpoint,
        request: RequestBuilder,
        timed: bool,
    ) -> Result<reqwest::Response, ClientError> {
        let waited = self.limits.request().await;
        if !waited.is_zero() {
            self.observer.rate_limited(waited);
        }
        let start = Instant::now();
        let send = request.bearer_auth(self.token.expose()).send();
        let result = if timed {
            match tokio::time::timeout(self.answer_timeout, send).await {
                Ok(result) => result.map_err(SendFailure::Reqwest),
                Err(_) => Err(SendFailure::NoAnswer),
            }
        } else {
            send.await.map_err(SendFailure::Reqwest)
        };
        self.observer.request_finished(endpoint, start.elapsed());
        let response = result.map_err(|err| match err {
            SendFailure::Reqwest(err) => ClientError::from_reqwest(endpoint, &err),
            SendFailure::NoAnswer => self.timed_out(endpoint, "no answer"),
        })?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(self.error_from_response(endpoint, response).await)
        }
    }

    /// A retryable timeout of `endpoint`: `what` did not arrive within the answer timeout.
    fn timed_out(&self, endpoint: Endpoint, what: &str) -> ClientError {
        ClientError::Transport {
            endpoint: endpoint.label(),
            detail: format!("{what} within {} s", self.answer_timeout.as_secs()),
            timeout: true,
            tls: false,
        }
    }

    /// The whole body, refused as soon as it is longer than `limit`: a hostile server's endless
    /// or huge answer costs at most `limit` bytes of memory.
    async fn read_limited(
        &self,
        endpoint: Endpoint,
        mut response: reqwest::Response,
        limit: usize,
    ) -> Result<Bytes, ClientError> {
        let too_large = || {
            ClientError::NotStowix {
            url: self.repo.to_string(),
            detail: format!(
                "the server's answer to {} exceeded {limit} bytes, more than any Stowix server sends",
                endpoint.label()
            ),
        }
        };
        if response
            .content_length()
            .is_some_and(|declared| declared > limit as u64)
        {
            return Err(too_large());
        }
        let mut body = bytes::BytesMut::new();
        loop {
            let piece = tokio::time::timeout(self.answer_timeout, response.chunk())
                .await
                .map_err(|_| self.timed_out(endpoint, "the rest of the answer did not arrive"))?
                .map_err(|err| ClientError::from_reqwest(endpoint, &err))?;
            let Some(piece) = piece else {
                break;
            };
            if body.len() + piece.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&piece);
        }
        Ok(body.freeze())
    }

    async fn read_json<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        response: reqwest::Response,
        limit: usize,
    ) -> Result<T, ClientError> {
        let body = self.read_limited(endpoint, response, limit).await?;
        serde_json::from_slice(&body).map_err(|err| ClientError::Decode {
            endpoint: endpoint.label(),
            // serde quotes unexpected values from the body.
            detail: format!(
                "{}; the answer began with {:?}",
                error::escape_server_text(&err.to_string()),
                preview(&body)
            ),
        })
    }

    /// The error an unsuccessful answer stands for. This is where server-sent text enters the
    /// client: code and message are escaped here, once.
    async fn error_from_response(
        &self,
        endpoint: Endpoint,
        response: reqwest::Response,
    ) -> ClientError {
        let status = response.status();
        let retry_after =
            error::parse_retry_after(response.headers().get(reqwest::header::RETRY_AFTER));
        let body = match self
            .read_limited(endpoint, response, SMALL_ANSWER_LIMIT)
            .await
        {
            Ok(body) => body,
            Err(err) => return err,
        };
        let api = match serde_json::from_slice::<ApiError>(&body) {
            Ok(api) => ApiError {
                code: error::escape_server_text(&api.code),
                message: error::escape_server_text(&api.message),
                offset: api.offset,
            },
            Err(_) => ApiError {
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
            },
        };
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
                    // The body is out: from here on the server has the answer timeout.
                    tokio::time::sleep(self.answer_timeout).await;
                    return self.timed_out(endpoint, "no answer after the upload");
                }
                let idle = epoch.elapsed().saturating_sub(Duration::from_millis(last));
                if idle > stall_timeout {
                    return ClientError::Transport {
                        endpoint: endpoint.label(),
                        detail: format!(
                            "upload stalled: no progress for {} s",
                            stall_timeout.as_secs()
                        ),
                        timeout: true,
                        tls: false,
                    };
                }
            }
        };
        tokio::select! {
            result = self.attempt(endpoint, request, false) => result,
            err = watchdog => Err(err),
        }
    }
}

/// Marks a finished body for the stall watchdog.
const BODY_DONE: u64 = u64::MAX;

/// Why an attempt got no answer head.
enum SendFailure {
    Reqwest(reqwest::Error),
    /// Nothing within the answer timeout.
    NoAnswer,
}

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

/// A request body serialised once, so every retry resends the same bytes and its size bounds
/// the answer.
fn json_body<T: serde::Serialize>(value: &T) -> Result<Bytes, ClientError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|err| ClientError::Protocol(format!("cannot encode a request: {err}")))
}

fn json_request(request: RequestBuilder, body: Bytes) -> RequestBuilder {
    request
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
}

/// The start of a body that was not what we expected, for an error message, escaped.
fn preview(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    error::escape_server_text(&text.split_whitespace().collect::<Vec<_>>().join(" "))
}
