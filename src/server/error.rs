//! Server errors. Internal detail goes to the log; clients get a stable JSON
//! `{code, message}` ([`crate::api::ApiError`]) and never a database or filesystem string.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::api::{codes, ApiError};

#[derive(Debug)]
pub struct ServerError {
    pub status: StatusCode,
    pub body: ApiError,
    /// Seconds for a `Retry-After` header (429/503).
    pub retry_after: Option<u64>,
}

pub type ServerResult<T> = Result<T, ServerError>;

impl ServerError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ServerError {
            status,
            body: ApiError {
                code: code.to_string(),
                message: message.into(),
                offset: None,
            },
            retry_after: None,
        }
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, message)
    }

    pub fn unprocessable(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 503 with Retry-After: a backend restarting or failing over, which a retry in a moment
    /// gets past (clients pause and probe instead of failing paths).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE, message).with_retry_after(2)
    }

    /// Logs `detail` (which may hold paths or SQL errors) and answers a bland 500.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {detail}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            "internal server error; the server log has details",
        )
    }
}

impl ServerError {
    /// The data directory's disk (or quota) is full: a condition of the whole server that no
    /// client retry can fix, so clients must be told apart from a 500 and stop their run
    /// (`stowix nix push` exits 7); a re-run after space is freed resumes.
    pub fn storage_full(detail: impl std::fmt::Display) -> Self {
        tracing::error!("storage full: {detail}");
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            codes::INSUFFICIENT_STORAGE,
            "the server's storage is full; its administrator must free space, then a re-run resumes",
        )
    }
}

/// ENOSPC and EDQUOT: the only I/O errors a client should read as "nothing more fits".
fn is_storage_full(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::StorageFull
        || err.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl From<std::io::Error> for ServerError {
    fn from(err: std::io::Error) -> Self {
        if is_storage_full(&err) {
            return ServerError::storage_full(format!("I/O: {err}"));
        }
        if super::backend::storage::s3::is_unavailable(&err) {
            return storage_unavailable(&err);
        }
        ServerError::internal(format!("I/O: {err}"))
    }
}

/// A bucket restarting or unreachable: worth the client's retry, like a database failover.
pub fn storage_unavailable(err: &dyn std::fmt::Display) -> ServerError {
    tracing::warn!("object storage unavailable: {err}");
    ServerError::unavailable("the server's object storage is unavailable; retry shortly")
}

impl From<super::metadata::MetaError> for ServerError {
    fn from(err: super::metadata::MetaError) -> Self {
        use super::metadata::MetaError;
        match err {
            MetaError::Full(detail) => ServerError::storage_full(format!("metadata: {detail}")),
            // A database restarting or failing over: worth the client's retry, unlike a 500.
            MetaError::Unavailable(detail) => {
                tracing::warn!("metadata database unavailable: {detail}");
                ServerError::unavailable("the server's database is unavailable; retry shortly")
            }
            other => ServerError::internal(other),
        }
    }
}

impl From<tokio::task::JoinError> for ServerError {
    fn from(err: tokio::task::JoinError) -> Self {
        ServerError::internal(format!("task: {err}"))
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let offset = self.body.offset;
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(offset) = offset {
            response
                .headers_mut()
                .insert(crate::api::UPLOAD_OFFSET_HEADER, HeaderValue::from(offset));
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            // Lets curl (and so Nix with a netrc) know Basic credentials are wanted.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"stowix\""),
            );
        }
        response
    }
}
