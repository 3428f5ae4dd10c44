//! Errors of the push API client, and their classification for the retry loop.
//!
//! A transport failure is classified by walking its `source()` chain (reqwest wraps hyper wraps
//! io), so a reset connection deep inside a streamed body is recognised as retryable.

use std::error::Error as _;
use std::time::Duration;

use reqwest::StatusCode;

use crate::api::{codes, ApiError};

/// Which push API route a request went to: a low-cardinality label for metrics and messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Info,
    Presence,
    Nars,
    /// `POST api/v1/nar-batch`: many small NARs in one request.
    NarBatch,
    UploadCreate,
    UploadState,
    UploadPatch,
    UploadComplete,
    UploadAbort,
    Narinfos,
    /// `PUT log/<drv>`: a build log.
    Log,
    /// `POST api/v1/pins/<name>`.
    Pins,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Presence => "presence",
            Self::Nars => "nars",
            Self::NarBatch => "nar_batch",
            Self::UploadCreate => "upload_create",
            Self::UploadState => "upload_state",
            Self::UploadPatch => "upload_patch",
            Self::UploadComplete => "upload_complete",
            Self::UploadAbort => "upload_abort",
            Self::Narinfos => "narinfos",
            Self::Log => "log",
            Self::Pins => "pins",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at all: refused, DNS, TLS, or the connection kept failing.
    #[error("cannot reach {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// Something answered, but not the push API of a Stowix repository.
    #[error("{url} is not a Stowix repository: {detail}")]
    NotStowix { url: String, detail: String },
    /// 401 or 403, with the server's code (`invalid_token`, `insufficient_scope`, ...).
    #[error("{}", auth_message(*.status, .api))]
    Auth { status: StatusCode, api: ApiError },
    /// Any other non-success answer.
    #[error("{endpoint} request failed with HTTP {status}: {} ({})", .api.message, .api.code)]
    Api {
        endpoint: &'static str,
        status: StatusCode,
        api: ApiError,
        retry_after: Option<Duration>,
    },
    /// The connection broke or stalled mid-request; usually worth another try.
    #[error("{endpoint} request failed: {detail}")]
    Transport {
        endpoint: &'static str,
        detail: String,
        timeout: bool,
        /// The TLS handshake or record layer failed: retrying cannot help.
        tls: bool,
    },
    #[error("{endpoint} answer could not be read: {detail}")]
    Decode {
        endpoint: &'static str,
        detail: String,
    },
    /// The server's upload state contradicts what this client sent (e.g. it lost bytes).
    #[error("upload protocol error: {0}")]
    Protocol(String),
}

fn auth_message(status: StatusCode, api: &ApiError) -> String {
    let hint = match api.code.as_str() {
        codes::MISSING_TOKEN => "pass --token or set STOWIX_TOKEN",
        codes::MALFORMED_TOKEN => "copy the token again; it was mangled",
        codes::INVALID_TOKEN => {
            "the server does not know this token; check you use the right server"
        }
        codes::REVOKED_TOKEN => "this token was revoked; create a new one",
        codes::INSUFFICIENT_SCOPE => "use a token with push scope",
        codes::WRONG_REPOSITORY => "use a token created for this repository, or fix --target",
        _ => "check the token and --target",
    };
    let kind = if status == StatusCode::UNAUTHORIZED {
        "authentication failed"
    } else {
        "permission denied"
    };
    format!(
        "{kind} (HTTP {}, {}): {}\nhint: {hint}",
        status.as_u16(),
        api.code,
        api.message
    )
}

/// Why a request is retried: the `reason` label of `stowix_push_retries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    Connection,
    Timeout,
    RequestTimeout,
    TooManyRequests,
    ServerError,
}

impl RetryReason {
    /// Every reason, so metrics can show each at 0 before it first happens.
    pub const ALL: [Self; 5] = [
        Self::Connection,
        Self::Timeout,
        Self::RequestTimeout,
        Self::TooManyRequests,
        Self::ServerError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Timeout => "timeout",
            Self::RequestTimeout => "http_408",
            Self::TooManyRequests => "http_429",
            Self::ServerError => "http_5xx",
        }
    }
}

impl ClientError {
    /// `Some(reason)` when trying again may help: transport failures, timeouts, 408, 429, 5xx.
    /// Never 400/401/403/404/409/422: the same request would fail the same way.
    pub fn retry_reason(&self) -> Option<RetryReason> {
        match self {
            Self::Transport { tls: true, .. } => None,
            Self::Transport { timeout: true, .. } => Some(RetryReason::Timeout),
            Self::Transport { .. } | Self::Unreachable { .. } => Some(RetryReason::Connection),
            Self::Api { status, .. } => match *status {
                StatusCode::REQUEST_TIMEOUT => Some(RetryReason::RequestTimeout),
                StatusCode::TOO_MANY_REQUESTS => Some(RetryReason::TooManyRequests),
                // A full disk stays full: retrying only resends the bytes that did not fit.
                StatusCode::INSUFFICIENT_STORAGE => None,
                s if s.is_server_error() => Some(RetryReason::ServerError),
                _ => None,
            },
            Self::NotStowix { .. }
            | Self::Auth { .. }
            | Self::Decode { .. }
            | Self::Protocol(_) => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The API error code, when the server sent one.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            Self::Api { api, .. } | Self::Auth { api, .. } => Some(&api.code),
            _ => None,
        }
    }

    pub(crate) fn from_reqwest(endpoint: Endpoint, err: &reqwest::Error) -> Self {
        let tls = is_tls(err);
        // A redirect's Location or a proxy's wording can end up in the chain.
        let mut detail = escape_server_text(&describe_chain(err));
        if tls {
            detail = format!(
                "TLS failed ({detail}); if the server speaks plain HTTP on this port, use an http:// URL, otherwise check its certificate"
            );
        }
        Self::Transport {
            endpoint: endpoint.label(),
            detail,
            timeout: is_timeout(err),
            tls,
        }
    }
}

/// reqwest's own Display hides the interesting part ("error sending request"); the causes say
/// what happened ("Connection refused", "invalid peer certificate").
pub fn describe_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// rustls reports handshake and record errors as `io::ErrorKind::InvalidData`; hyper boxes
/// errors on the way, which hides that level from `downcast_ref` (a `Box<dyn Error>` forwards
/// `source()` past its content), so rustls' own wording is the fallback.
fn is_tls(err: &reqwest::Error) -> bool {
    const RUSTLS_WORDING: &[&str] = &[
        "corrupt message",
        "peer certificate",
        "certificate",
        "fatal alert",
        "handshake",
        "peer is incompatible",
        "peer misbehaved",
    ];
    let mut level: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = level {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                return true;
            }
        }
        let text = cause.to_string();
        if RUSTLS_WORDING.iter().any(|w| text.contains(w)) {
            return true;
        }
        level = cause.source();
    }
    false
}

fn is_timeout(err: &reqwest::Error) -> bool {
    if err.is_timeout() {
        return true;
    }
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

/// Server-sent text made safe to print: control characters (C0 including newline and tab, DEL,
/// C1 in Unicode) and bidirectional overrides become visible `\u{..}` escapes, so a hostile or
/// broken server can neither drive the terminal (`ESC]0;`, `ESC[2J`) nor forge extra lines such as
/// a fake `hint:`. Every text a server sends passes through here once, where the client decodes
/// it; nothing downstream escapes again.
pub fn escape_server_text(text: &str) -> String {
    let needs_escape = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(needs_escape) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// `Retry-After` in seconds; HTTP dates are rare from API servers and treated as absent.
pub(crate) fn parse_retry_after(value: Option<&reqwest::header::HeaderValue>) -> Option<Duration> {
    let seconds: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16) -> ClientError {
        ClientError::Api {
            endpoint: "presence",
            status: StatusCode::from_u16(status).unwrap(),
            api: ApiError {
                code: "x".into(),
                message: "m".into(),
                offset: None,
            },
            retry_after: None,
        }
    }

    #[test]
    fn retry_classification_follows_the_protocol() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(api(status).retry_reason().is_some(), "{status}");
        }
        for status in [400, 404, 409, 413, 422] {
            assert_eq!(api(status).retry_reason(), None, "{status}");
        }
        let auth = ClientError::Auth {
            status: StatusCode::FORBIDDEN,
            api: ApiError {
                code: codes::INSUFFICIENT_SCOPE.into(),
                message: "read".into(),
                offset: None,
            },
        };
        assert_eq!(auth.retry_reason(), None);
        assert!(auth.to_string().contains("use a token with push scope"));
        let stalled = ClientError::Transport {
            endpoint: "upload_patch",
            detail: "stalled".into(),
            timeout: true,
            tls: false,
        };
        assert_eq!(stalled.retry_reason(), Some(RetryReason::Timeout));
        let tls = ClientError::Transport {
            endpoint: "info",
            detail: "TLS failed".into(),
            timeout: false,
            tls: true,
        };
        assert_eq!(tls.retry_reason(), None);
    }

    #[test]
    fn server_text_is_escaped_for_the_terminal() {
        let hostile = "a\u{1b}]0;owned\u{7}b\u{1b}[2J\nhint: fake\u{7f}\u{9b}31m\u{202e}c\td";
        let escaped = escape_server_text(hostile);
        assert_eq!(
            escaped,
            "a\\u{1b}]0;owned\\u{7}b\\u{1b}[2J\\u{a}hint: fake\\u{7f}\\u{9b}31m\\u{202e}c\\u{9}d"
        );
        assert!(!escaped.chars().any(char::is_control), "{escaped:?}");
        let plain = "no such upload; create a new one (é, ü, 日本)";
        assert_eq!(escape_server_text(plain), plain);
    }

    #[test]
    fn retry_after_reads_seconds() {
        let value = reqwest::header::HeaderValue::from_static("7");
        assert_eq!(
            parse_retry_after(Some(&value)),
            Some(Duration::from_secs(7))
        );
        let date = reqwest::header::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(parse_retry_after(Some(&date)), None);
    }
}
