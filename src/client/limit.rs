//! Client-side rate limits (governor): requests per second across all requests, and upload
//! bytes per second across all uploads. Both are shared by every upload job, so `--jobs` changes
//! how the budget is split, never its total.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Bytes are metered in cells of this size so that any rate up to 4 TiB/s fits governor's u32
/// cell counts; the granularity (4 KiB) is far below the pieces we send (64 KiB and up).
const BYTES_PER_CELL: u64 = 4096;

#[derive(Clone, Default)]
pub struct RateLimits {
    requests: Option<Arc<DefaultDirectRateLimiter>>,
    bytes: Option<Arc<ByteLimiter>>,
}

struct ByteLimiter {
    limiter: DefaultDirectRateLimiter,
    /// Most cells one `until_n_ready` may ask for: governor refuses more than the burst.
    burst_cells: u32,
}

impl RateLimits {
    pub fn new(
        max_requests_per_second: Option<NonZeroU32>,
        max_bytes_per_second: Option<u64>,
    ) -> Self {
        let requests = max_requests_per_second
            .map(|rps| Arc::new(RateLimiter::direct(Quota::per_second(rps))));
        let bytes = max_bytes_per_second.map(|rate| {
            let cells_per_second = (rate / BYTES_PER_CELL).clamp(1, u64::from(u32::MAX)) as u32;
            // A burst of one second's budget: smooth enough for a link, large enough that one
            // 256 KiB piece never waits on more than one refill.
            let burst = NonZeroU32::new(cells_per_second).expect("clamped to at least 1");
            Arc::new(ByteLimiter {
                limiter: RateLimiter::direct(Quota::per_second(burst)),
                burst_cells: burst.get(),
            })
        });
        Self { requests, bytes }
    }

    /// Waits for one request's turn; returns how long it waited.
    pub async fn request(&self) -> Duration {
        let Some(limiter) = &self.requests else {
            return Duration::ZERO;
        };
        let start = Instant::now();
        limiter.until_ready().await;
        start.elapsed()
    }

    /// Waits until `len` more bytes may be sent; returns how long it waited.
    pub async fn bytes(&self, len: usize) -> Duration {
        let Some(bytes) = &self.bytes else {
            return Duration::ZERO;
        };
        let start = Instant::now();
        let mut cells = (len as u64).div_ceil(BYTES_PER_CELL);
        while cells > 0 {
            let step = cells.min(u64::from(bytes.burst_cells)) as u32;
            let n = NonZeroU32::new(step).expect("step > 0");
            bytes
                .limiter
                .until_n_ready(n)
                .await
                .expect("never more than the burst");
            cells -= u64::from(step);
        }
        start.elapsed()
    }

    pub fn limits_bytes(&self) -> bool {
        self.bytes.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn byte_limiter_paces_beyond_the_burst() {
        // 400 KiB/s: the first second's budget goes at once, the next 200 KiB take ~0.5 s.
        let limits = RateLimits::new(None, Some(400 * 1024));
        assert!(limits.bytes(400 * 1024).await < Duration::from_millis(50));
        let waited = limits.bytes(200 * 1024).await;
        assert!(waited >= Duration::from_millis(400), "{waited:?}");
        assert!(waited < Duration::from_millis(900), "{waited:?}");
    }

    #[tokio::test]
    async fn a_piece_larger_than_the_burst_is_split_not_refused() {
        let limits = RateLimits::new(None, Some(64 * 1024));
        let start = Instant::now();
        limits.bytes(64 * 1024).await;
        limits.bytes(96 * 1024).await;
        assert!(
            start.elapsed() >= Duration::from_millis(1300),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn request_limiter_paces_requests() {
        let limits = RateLimits::new(NonZeroU32::new(20), None);
        let start = Instant::now();
        for _ in 0..25 {
            limits.request().await;
        }
        // 20 at once (the burst), then 5 more at 50 ms each.
        assert!(
            start.elapsed() >= Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
    }
}
