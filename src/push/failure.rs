//! The failure policy of a push: what went wrong for one path ([`PathFailure`]), what ends the
//! whole run ([`RunFailure`]), and the one function that tells them apart ([`judge`]).
//!
//! ```text
//!   ClientError ──► judge ──┬─ Fatal(RunFailure) ──► Health::fatal: stop every stage, exit code
//!                           ├─ Outage ─────────────► Health::suspect: close the gate, one prober
//!                           │                          probes GET info with backoff until the
//!                           │                          server answers (gate opens, work resumes)
//!                           │                          or --retry-timeout passes (RunFailure)
//!                           └─ Path ───────────────► PathFailure for this path; the run goes on
//! ```
//!
//! Stages wait on the gate before they start work that needs the server (an upload, a chunk,
//! a query) or that only feeds it (a dump, a compression), so an outage pauses the pipeline
//! through backpressure instead of piling up work nobody can receive.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::api::{codes, ApiError, RepoInfo};
use crate::client::{ClientError, PushClient};

/// Default of `--retry-timeout`: rides out a server restart or a short network outage (a
/// restart with a database check takes tens of seconds), and still ends a CI job whose server
/// is gone for good within a couple of minutes.
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(120);
/// First pause between probes of a silent server, doubled up to [`PROBE_MAX_DELAY`]: a quick
/// restart is noticed within a second.
const PROBE_FIRST_DELAY: Duration = Duration::from_millis(250);
/// Longest pause between probes: a server that comes back is used again within this.
const PROBE_MAX_DELAY: Duration = Duration::from_secs(5);
/// Outages one request may wait out before its path fails anyway: a server that keeps going
/// away just as this request is sent (a crash it triggers, say) must not loop forever.
const MAX_OUTAGE_ROUNDS: u32 = 5;
/// Longest wait for one probe's answer: a server that accepts connections but does not
/// answer within this is as good as silent.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a blocked thread looks at the gate; short against any dump or compression.
const GATE_POLL: Duration = Duration::from_millis(50);

/// Why one path was not published. The run goes on without it.
#[derive(Debug, Clone)]
pub enum PathFailure {
    /// The store path's contents do not match the Nix database.
    Corrupt {
        path: String,
        nar_hash: String,
        nar_size: u64,
        expected_hash: String,
        expected_size: u64,
    },
    /// Reading the store path failed.
    Unreadable { path: String, detail: String },
    /// The encoder failed.
    Compression(String),
    /// The dump of the NAR ended without a verdict (its thread stopped).
    DumpStopped,
    /// A request about this path failed without the server refusing it (connection, 5xx).
    Transfer {
        step: &'static str,
        error: Arc<ClientError>,
    },
    /// The server answered this path's request with a refusal.
    Refused {
        step: &'static str,
        status: Option<u16>,
        code: String,
        message: String,
    },
    /// A path it refers to failed, so its narinfo may not be published.
    ReferenceFailed { reference: String },
    /// Another client ended the shared upload without storing the NAR.
    UploadVanished,
    /// The encoder's output did not match what the server holds of a resumed upload.
    EncoderChanged { held: u64, produced: u64 },
    /// A `--stdin` line that is not a store path.
    BadLine { line: String, detail: String },
    /// A `--stdin` line whose `nix path-info` failed.
    PathInfo { line: String, detail: String },
    /// A bug: the path's references never arrived.
    Stranded,
}

impl PathFailure {
    pub fn from_client(step: &'static str, error: ClientError) -> Self {
        match error {
            ClientError::Api {
                status, ref api, ..
            } if status.is_client_error() => Self::Refused {
                step,
                status: Some(status.as_u16()),
                code: api.code.clone(),
                message: api.message.clone(),
            },
            error => Self::Transfer {
                step,
                error: Arc::new(error),
            },
        }
    }

    /// What failures with the same cause share: repeated failures are reported once per key
    /// with a count. Never contains the store path.
    pub fn cause(&self) -> String {
        match self {
            Self::Corrupt { .. } => {
                "store path corrupt (contents differ from the Nix database)".to_owned()
            }
            Self::Unreadable { .. } => "store path unreadable".to_owned(),
            Self::Compression(_) => "compression failed".to_owned(),
            Self::DumpStopped => "the NAR dump stopped".to_owned(),
            Self::Transfer { step, error } => match error.as_ref() {
                ClientError::Api { status, api, .. } => {
                    format!("{step}: HTTP {} ({})", status.as_u16(), api.code)
                }
                ClientError::Transport { timeout: true, .. } => {
                    format!("{step}: connection timed out")
                }
                ClientError::Transport { .. } | ClientError::Unreachable { .. } => {
                    format!("{step}: connection failed")
                }
                ClientError::Decode { .. } => format!("{step}: unreadable answer"),
                ClientError::Protocol(_) => format!("{step}: upload protocol error"),
                ClientError::NotStowix { .. } | ClientError::Auth { .. } => {
                    format!("{step}: {error}")
                }
            },
            Self::Refused {
                step, status, code, ..
            } => match status {
                Some(status) => format!("{step}: refused by the server (HTTP {status}, {code})"),
                None => format!("{step}: refused by the server ({code})"),
            },
            Self::ReferenceFailed { .. } => "a path it refers to failed".to_owned(),
            Self::UploadVanished => "the shared upload was ended by another client".to_owned(),
            Self::EncoderChanged { .. } => "the encoder output changed".to_owned(),
            Self::BadLine { .. } => "input line is not a store path".to_owned(),
            Self::PathInfo { .. } => "`nix path-info` failed for an input line".to_owned(),
            Self::Stranded => "its references were never stored (internal error)".to_owned(),
        }
    }
}

impl fmt::Display for PathFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Corrupt {
                path,
                nar_hash,
                nar_size,
                expected_hash,
                expected_size,
            } => write!(
                f,
                "store path {path} is corrupt: its contents have narHash {nar_hash} and narSize \
                 {nar_size}, but the Nix database records {expected_hash} and {expected_size}\n\
                 hint: run `nix-store --verify --check-contents --repair`"
            ),
            Self::Unreadable { path, detail } => write!(f, "cannot read {path}: {detail}"),
            Self::Compression(detail) => write!(f, "compression failed: {detail}"),
            Self::DumpStopped => f.write_str("the NAR dump stopped unexpectedly"),
            Self::Transfer { step, error } => write!(f, "{step} failed: {error}"),
            Self::Refused {
                step,
                code,
                message,
                ..
            } => write!(f, "the server refused {step} ({code}): {message}"),
            Self::ReferenceFailed { reference } => write!(f, "reference {reference} failed"),
            Self::UploadVanished => f.write_str(
                "the upload was ended by another client without storing the NAR; run the push again",
            ),
            Self::EncoderChanged { held, produced } => write!(
                f,
                "the server holds {held} bytes of a {produced}-byte upload; the encoder output changed"
            ),
            // Reported after the line itself.
            Self::BadLine { detail, .. } => f.write_str(detail),
            Self::PathInfo { detail, .. } => write!(f, "`nix path-info` failed: {detail}"),
            Self::Stranded => f.write_str("its references were never stored (internal error)"),
        }
    }
}

/// Why the whole run stopped: nothing more can succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunFailure {
    /// 401 or 403 on any request: the token was revoked, or lost its scope.
    #[error("{0}")]
    Auth(ClientError),
    /// The repository was deleted (or renamed) while the push ran.
    #[error(
        "the repository is gone: {0}\nhint: check --target; the repository may have been deleted"
    )]
    RepositoryGone(ClientError),
    /// The server answered nothing for longer than `--retry-timeout`.
    #[error("the server did not answer for {} s: {last}\nhint: check that the server runs and is reachable, then run the push again: it resumes; --retry-timeout (now {} s) sets how long to wait", waited.as_secs(), waited.as_secs())]
    Unreachable { waited: Duration, last: String },
    /// Something answered, but not the Stowix push API.
    #[error("{0}")]
    NotStowix(ClientError),
    /// The server has no room left.
    #[error("the server cannot store more: {0}\nhint: the server's storage is full; ask its administrator, then run the push again: it resumes")]
    StorageFull(ClientError),
}

impl RunFailure {
    /// The exit code (see `cli::exit`).
    pub fn exit_code(&self) -> i32 {
        use crate::cli::exit;
        match self {
            Self::Auth(_) => exit::AUTH,
            Self::RepositoryGone(_) | Self::Unreachable { .. } | Self::NotStowix(_) => {
                exit::UNREACHABLE
            }
            Self::StorageFull(_) => exit::SERVER_FULL,
        }
    }
}

/// What a failed request means for the run.
#[derive(Debug)]
pub enum Verdict {
    /// Nothing more can succeed.
    Fatal(RunFailure),
    /// The server may be gone: pause and probe.
    Outage(ClientError),
    /// Only this request's path fails.
    Path(ClientError),
}

/// The failure policy: the one place that decides what a client error means for the run.
pub fn judge(error: ClientError) -> Verdict {
    match error {
        ClientError::Auth { .. } => Verdict::Fatal(RunFailure::Auth(error)),
        ClientError::NotStowix { .. } => Verdict::Fatal(RunFailure::NotStowix(error)),
        ClientError::Api {
            status, ref api, ..
        } if status == StatusCode::NOT_FOUND && api.code == codes::NO_SUCH_REPOSITORY => {
            Verdict::Fatal(RunFailure::RepositoryGone(error))
        }
        ClientError::Api {
            status, ref api, ..
        } if status == StatusCode::INSUFFICIENT_STORAGE
            || api.code == codes::INSUFFICIENT_STORAGE =>
        {
            Verdict::Fatal(RunFailure::StorageFull(error))
        }
        error if is_outage(&error) => Verdict::Outage(error),
        other => Verdict::Path(other),
    }
}

/// Whether `error` says the server answers nothing: no connection, a broken or stalled one,
/// or a reverse proxy answering for a stopped server (502/503/504). The server's own 503
/// `too_many_uploads` means busy, not gone.
pub fn is_outage(error: &ClientError) -> bool {
    match error {
        ClientError::Unreachable { .. } | ClientError::Transport { tls: false, .. } => true,
        ClientError::Api { status, api, .. } => {
            matches!(
                *status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ) && api.code != codes::TOO_MANY_UPLOADS
        }
        _ => false,
    }
}

/// How a request about one path ended when it did not succeed.
#[derive(Debug)]
pub enum Stop {
    /// The run is over (fatal failure or cancellation): report nothing for the path.
    Run,
    /// This path fails with this error.
    Path(ClientError),
}

/// A failed attempt, with the state of the gate when it began: whether the server went silent
/// since then decides between trying again and failing the path.
#[derive(Debug)]
pub struct Failed {
    pub error: ClientError,
    before: Gate,
}

/// What the prober found out so far.
#[derive(Clone, Copy, Debug)]
struct Gate {
    /// False while the server answers nothing: stages wait.
    online: bool,
    /// Probes the server answered.
    answered: u64,
    /// Pauses begun (probes that got no answer after a working period).
    pauses: u64,
}

/// The run-wide state every stage consults: the stop token, the first fatal failure, and the
/// gate that is closed while the server answers nothing.
pub struct Health {
    stop: CancellationToken,
    fatal: Mutex<Option<RunFailure>>,
    gate: watch::Sender<Gate>,
    outage: Mutex<Option<Outage>>,
    wake_prober: Notify,
    retry_timeout: Duration,
}

/// A suspected outage: since when requests fail as if the server were gone, and the latest
/// such failure (for the final message).
struct Outage {
    since: Instant,
    last: String,
}

impl Health {
    pub fn new(stop: CancellationToken, retry_timeout: Duration) -> Self {
        Self {
            stop,
            fatal: Mutex::new(None),
            gate: watch::Sender::new(Gate {
                online: true,
                answered: 0,
                pauses: 0,
            }),
            outage: Mutex::new(None),
            wake_prober: Notify::new(),
            retry_timeout,
        }
    }

    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Records the first fatal failure and stops every stage.
    pub fn fatal(&self, failure: RunFailure) {
        let mut fatal = self.fatal.lock().expect("fatal lock");
        if fatal.is_none() {
            *fatal = Some(failure);
        }
        drop(fatal);
        self.stop.cancel();
    }

    pub fn take_fatal(&self) -> Option<RunFailure> {
        self.fatal.lock().expect("fatal lock").take()
    }

    pub fn is_paused(&self) -> bool {
        !self.gate.borrow().online
    }

    /// A request failed as if the server were gone: the prober checks at once. Cheap and
    /// idempotent, so the client's retry loop calls it on every such failure.
    pub fn suspect(&self, error: &ClientError) {
        let mut outage = self.outage.lock().expect("outage lock");
        match outage.as_mut() {
            Some(outage) => outage.last = error.to_string(),
            None => {
                *outage = Some(Outage {
                    since: Instant::now(),
                    last: error.to_string(),
                })
            }
        }
        drop(outage);
        self.wake_prober.notify_one();
    }

    /// Waits until the server answers; `Err(Stop::Run)` when the run ended meanwhile.
    pub async fn online(&self) -> Result<(), Stop> {
        self.wait_for(|gate| gate.online).await.map(|_| ())
    }

    async fn wait_for(&self, ready: impl Fn(&Gate) -> bool) -> Result<Gate, Stop> {
        if self.stop.is_cancelled() {
            return Err(Stop::Run);
        }
        let mut gate = self.gate.subscribe();
        tokio::select! {
            gate = gate.wait_for(|g| ready(g)) => gate.map(|g| *g).map_err(|_| Stop::Run),
            () = self.stop.cancelled() => Err(Stop::Run),
        }
    }

    /// [`Health::online`] for plain threads (dump, compression): false when the run ended.
    pub fn online_blocking(&self) -> bool {
        loop {
            if self.stop.is_cancelled() {
                return false;
            }
            if self.gate.borrow().online {
                return true;
            }
            std::thread::sleep(GATE_POLL);
        }
    }

    /// Runs `request` once the gate is open, raced against the stop token so that a fatal
    /// failure elsewhere drops it (and its connection) at once.
    pub async fn guarded<T>(
        &self,
        request: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<Result<T, Failed>, Stop> {
        let before = self.wait_for(|gate| gate.online).await?;
        tokio::select! {
            result = request => Ok(result.map_err(|error| Failed { error, before })),
            () = self.stop.cancelled() => Err(Stop::Run),
        }
    }

    /// Applies the policy to a failed request: `Ok(())` means the server was silent and answers
    /// again, so the request should be tried again. A request that failed as if the server were
    /// gone while the server kept answering probes fails its path: its trouble is its own.
    pub async fn after_failure(&self, failed: Failed, rounds: &mut u32) -> Result<(), Stop> {
        let Failed { error, before } = failed;
        match judge(error) {
            Verdict::Fatal(failure) => {
                self.fatal(failure);
                Err(Stop::Run)
            }
            Verdict::Path(error) => Err(Stop::Path(error)),
            Verdict::Outage(error) => {
                if *rounds >= MAX_OUTAGE_ROUNDS {
                    return Err(Stop::Path(error));
                }
                *rounds += 1;
                let now = *self.gate.borrow();
                self.suspect(&error);
                let after = self
                    .wait_for(|gate| gate.online && gate.answered > now.answered)
                    .await?;
                if after.pauses > before.pauses {
                    Ok(())
                } else {
                    Err(Stop::Path(error))
                }
            }
        }
    }

    /// The prober: sleeps until an outage is suspected, then probes `GET api/v1/info` at once.
    /// An answer clears the suspicion. No answer closes the gate (the pipeline pauses) and
    /// probing goes on with backoff until the server answers (the gate opens) or
    /// `retry_timeout` has passed since the first failure (a fatal failure). Ends with the run.
    pub async fn run_prober(
        self: Arc<Self>,
        client: Arc<PushClient>,
        on_change: impl Fn(ProbeEvent<'_>) + Send,
    ) {
        loop {
            tokio::select! {
                () = self.wake_prober.notified() => {}
                () = self.stop.cancelled() => return,
            }
            let since = self
                .outage
                .lock()
                .expect("outage lock")
                .as_ref()
                .map_or_else(Instant::now, |o| o.since);
            if !self.probe_until_answered(&client, since, &on_change).await {
                return;
            }
        }
    }

    /// One round of probing; false when the run is over.
    async fn probe_until_answered(
        &self,
        client: &PushClient,
        since: Instant,
        on_change: &impl Fn(ProbeEvent<'_>),
    ) -> bool {
        let deadline = since + self.retry_timeout;
        let mut delay = PROBE_FIRST_DELAY;
        let mut paused = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let last = self.last_error();
                self.fatal(RunFailure::Unreachable {
                    waited: self.retry_timeout,
                    last,
                });
                return false;
            }
            let probe = tokio::select! {
                probe = tokio::time::timeout(left.min(PROBE_TIMEOUT), client.probe()) => probe,
                () = self.stop.cancelled() => return false,
            };
            match probe {
                Ok(Ok(info)) if info.token_scope.as_deref() == Some("push") => {
                    *self.outage.lock().expect("outage lock") = None;
                    self.gate.send_modify(|gate| {
                        gate.online = true;
                        gate.answered += 1;
                    });
                    if paused {
                        on_change(ProbeEvent::Resumed {
                            after: since.elapsed(),
                        });
                    }
                    return true;
                }
                Ok(Ok(info)) => {
                    self.fatal(RunFailure::Auth(scope_lost(&info)));
                    return false;
                }
                Ok(Err(error)) => match judge(error) {
                    Verdict::Fatal(failure) => {
                        self.fatal(failure);
                        return false;
                    }
                    Verdict::Outage(error) | Verdict::Path(error) => self.note(&error.to_string()),
                },
                Err(_) => self.note(&format!(
                    "GET api/v1/info got no answer within {} s",
                    left.min(PROBE_TIMEOUT).as_secs()
                )),
            }
            if !paused {
                paused = true;
                self.gate.send_modify(|gate| {
                    gate.online = false;
                    gate.pauses += 1;
                });
                on_change(ProbeEvent::Paused {
                    reason: &self.last_error(),
                    timeout: self.retry_timeout,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                () = tokio::time::sleep(delay.min(left)) => {}
                () = self.stop.cancelled() => return false,
            }
            delay = (delay * 2).min(PROBE_MAX_DELAY);
        }
    }

    fn note(&self, last: &str) {
        if let Some(outage) = self.outage.lock().expect("outage lock").as_mut() {
            outage.last = last.to_owned();
        }
    }

    fn last_error(&self) -> String {
        self.outage
            .lock()
            .expect("outage lock")
            .as_ref()
            .map(|o| o.last.clone())
            .unwrap_or_default()
    }
}

/// The token answers, but without push scope any more.
fn scope_lost(info: &RepoInfo) -> ClientError {
    ClientError::Auth {
        status: StatusCode::FORBIDDEN,
        api: ApiError {
            code: codes::INSUFFICIENT_SCOPE.to_owned(),
            message: format!(
                "the token has {} scope for repository {} now",
                info.token_scope.as_deref().unwrap_or("no"),
                info.repository
            ),
            offset: None,
        },
    }
}

/// What the prober tells the reporter.
pub enum ProbeEvent<'a> {
    Paused { reason: &'a str, timeout: Duration },
    Resumed { after: Duration },
}

/// `--retry-timeout`: whole seconds (`90`) or a duration with a unit (`500ms`, `90s`, `2m`,
/// `1h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write e.g. 120, 90s or 2m"))?;
    let duration = match unit.trim() {
        "" | "s" => Duration::from_secs(number),
        "ms" => Duration::from_millis(number),
        "m" | "min" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ms, s, m or h"
            ))
        }
    };
    if duration.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: &str) -> ClientError {
        ClientError::Api {
            endpoint: "upload_patch",
            status: StatusCode::from_u16(status).unwrap(),
            api: ApiError {
                code: code.into(),
                message: "m".into(),
                offset: None,
            },
            retry_after: None,
        }
    }

    fn name(verdict: &Verdict) -> &'static str {
        match verdict {
            Verdict::Fatal(RunFailure::Auth(_)) => "auth",
            Verdict::Fatal(RunFailure::RepositoryGone(_)) => "gone",
            Verdict::Fatal(RunFailure::StorageFull(_)) => "full",
            Verdict::Fatal(_) => "fatal",
            Verdict::Outage(_) => "outage",
            Verdict::Path(_) => "path",
        }
    }

    #[test]
    fn the_policy_tells_a_dead_run_from_a_bad_path() {
        let auth = ClientError::Auth {
            status: StatusCode::UNAUTHORIZED,
            api: ApiError {
                code: codes::REVOKED_TOKEN.into(),
                message: "revoked".into(),
                offset: None,
            },
        };
        assert_eq!(name(&judge(auth)), "auth");
        assert_eq!(name(&judge(api(404, codes::NO_SUCH_REPOSITORY))), "gone");
        assert_eq!(name(&judge(api(404, codes::NOT_FOUND))), "path");
        assert_eq!(name(&judge(api(507, "internal"))), "full");
        assert_eq!(name(&judge(api(503, "x"))), "outage");
        assert_eq!(name(&judge(api(500, codes::INTERNAL))), "path");
        assert_eq!(name(&judge(api(422, codes::INVALID_NAR))), "path");
        let reset = ClientError::Transport {
            endpoint: "upload_patch",
            detail: "connection reset".into(),
            timeout: false,
            tls: false,
        };
        assert!(is_outage(&reset));
        assert_eq!(name(&judge(reset)), "outage");
        let tls = ClientError::Transport {
            endpoint: "info",
            detail: "TLS".into(),
            timeout: false,
            tls: true,
        };
        assert_eq!(name(&judge(tls)), "path");
    }

    #[test]
    fn same_causes_share_a_key_without_the_path() {
        let one = PathFailure::from_client("upload", api(422, codes::INVALID_NAR));
        let two = PathFailure::from_client("upload", api(422, codes::INVALID_NAR));
        assert_eq!(one.cause(), two.cause());
        assert!(matches!(one, PathFailure::Refused { .. }));
        let a = PathFailure::ReferenceFailed {
            reference: "/nix/store/a".into(),
        };
        let b = PathFailure::ReferenceFailed {
            reference: "/nix/store/b".into(),
        };
        assert_eq!(a.cause(), b.cause());
        assert!(!a.cause().contains("/nix/store"));
    }

    #[test]
    fn retry_timeouts_parse_seconds_and_units() {
        assert_eq!(parse_duration("120"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[tokio::test]
    async fn a_fatal_failure_releases_every_waiter() {
        let health = Arc::new(Health::new(CancellationToken::new(), DEFAULT_RETRY_TIMEOUT));
        health.gate.send_modify(|gate| gate.online = false);
        let waiter = {
            let health = Arc::clone(&health);
            tokio::spawn(async move { health.online().await.is_err() })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a closed gate holds waiters");
        health.fatal(RunFailure::Unreachable {
            waited: Duration::from_secs(1),
            last: "x".into(),
        });
        assert!(
            waiter.await.unwrap(),
            "a stopped run releases waiters with Stop::Run"
        );
        assert!(health.take_fatal().is_some());
        assert!(!health.online_blocking());
    }
}
