//! The retry policy: exponential backoff with jitter (backon), honouring `Retry-After` up to a
//! cap. One policy for every request; streamed uploads use the same delays in their own loop
//! (see [`super::session`]) because a failed chunk needs a state query, not a blind resend.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use super::error::{ClientError, RetryReason};

/// Shrinks every delay in tests (`STOWIX_RETRY_BASE_DELAY_MS=1`): retries keep their shape but
/// a test of them takes milliseconds.
pub const BASE_DELAY_ENV: &str = "STOWIX_RETRY_BASE_DELAY_MS";

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Retries after the first attempt. Eight doublings of 500 ms reach the 30 s cap and sum to
    /// about two minutes: enough to ride out a server restart or a short network outage.
    pub max_retries: usize,
    /// A server asking for more than this is treated as asking for this.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_retries: 8,
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The default, with the base delay taken from [`BASE_DELAY_ENV`] when set.
    pub fn from_env() -> Self {
        let mut policy = Self::default();
        if let Some(ms) = std::env::var(BASE_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            policy.base_delay = Duration::from_millis(ms);
            policy.max_delay = policy
                .max_delay
                .min(Duration::from_millis(ms.saturating_mul(64)));
            policy.max_retry_after = policy.max_retry_after.min(policy.max_delay);
        }
        policy
    }

    pub fn start(&self) -> RetryState {
        RetryState {
            backoff: Box::new(
                ExponentialBuilder::default()
                    .with_min_delay(self.base_delay)
                    .with_max_delay(self.max_delay)
                    .with_max_times(self.max_retries)
                    .with_jitter()
                    .build(),
            ),
            max_retry_after: self.max_retry_after,
            retries: 0,
        }
    }
}

/// The per-request state machine: each failure either yields a delay to wait before the next
/// attempt or ends the request.
pub struct RetryState {
    backoff: Box<dyn Iterator<Item = Duration> + Send>,
    max_retry_after: Duration,
    pub retries: u32,
}

impl RetryState {
    /// `Some((reason, delay))` if `err` is worth another attempt and attempts remain.
    pub fn next_delay(&mut self, err: &ClientError) -> Option<(RetryReason, Duration)> {
        let reason = err.retry_reason()?;
        let backoff = self.backoff.next()?;
        let delay = match err.retry_after() {
            Some(asked) => asked.min(self.max_retry_after).max(backoff),
            None => backoff,
        };
        self.retries += 1;
        Some((reason, delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiError;
    use reqwest::StatusCode;

    fn status(code: u16, retry_after: Option<u64>) -> ClientError {
        ClientError::Api {
            endpoint: "nars",
            status: StatusCode::from_u16(code).unwrap(),
            api: ApiError {
                code: "c".into(),
                message: "m".into(),
                offset: None,
            },
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn retries_stop_after_the_budget_and_never_on_client_errors() {
        let policy = RetryPolicy {
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            max_retries: 3,
            max_retry_after: Duration::from_secs(2),
        };
        let mut state = policy.start();
        assert!(state.next_delay(&status(400, None)).is_none());
        for _ in 0..3 {
            let (reason, delay) = state.next_delay(&status(503, None)).unwrap();
            assert_eq!(reason, RetryReason::ServerError);
            assert!(delay <= Duration::from_millis(8), "{delay:?}");
        }
        assert!(state.next_delay(&status(503, None)).is_none());
        assert_eq!(state.retries, 3);
    }

    #[test]
    fn retry_after_is_honoured_but_capped() {
        let policy = RetryPolicy {
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            max_retries: 3,
            max_retry_after: Duration::from_secs(2),
        };
        let mut state = policy.start();
        let (_, delay) = state.next_delay(&status(429, Some(1))).unwrap();
        assert_eq!(delay, Duration::from_secs(1));
        let (_, delay) = state.next_delay(&status(429, Some(3600))).unwrap();
        assert_eq!(delay, Duration::from_secs(2));
    }
}
