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

/// `rps` requests per second, the first second's worth at once.
fn request_quota(rps: NonZeroU32) -> Quota {
    Quota::per_second(rps)
}

/// `rate` bytes per second in [`BYTES_PER_CELL`] cells, with a burst of one second's budget:
/// smooth enough for a link, large enough that one 256 KiB piece never waits on more than one
/// refill.
fn byte_quota(rate: u64) -> Quota {
    let cells_per_second = (rate / BYTES_PER_CELL).clamp(1, u64::from(u32::MAX)) as u32;
    Quota::per_second(NonZeroU32::new(cells_per_second).expect("clamped to at least 1"))
}

/// The cells of a `len`-byte piece as requests of at most `burst` cells each: governor refuses
/// a single request larger than its burst.
fn cell_steps(len: usize, burst: u32) -> impl Iterator<Item = NonZeroU32> {
    let mut cells = (len as u64).div_ceil(BYTES_PER_CELL);
    std::iter::from_fn(move || {
        let step = cells.min(u64::from(burst)) as u32;
        cells -= u64::from(step);
        NonZeroU32::new(step)
    })
}

impl RateLimits {
    pub fn new(
        max_requests_per_second: Option<NonZeroU32>,
        max_bytes_per_second: Option<u64>,
    ) -> Self {
        let requests =
            max_requests_per_second.map(|rps| Arc::new(RateLimiter::direct(request_quota(rps))));
        let bytes = max_bytes_per_second.map(|rate| {
            let quota = byte_quota(rate);
            Arc::new(ByteLimiter {
                limiter: RateLimiter::direct(quota),
                burst_cells: quota.burst_size().get(),
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
        for step in cell_steps(len, bytes.burst_cells) {
            bytes
                .limiter
                .until_n_ready(step)
                .await
                .expect("never more than the burst");
        }
        start.elapsed()
    }

    pub fn limits_bytes(&self) -> bool {
        self.bytes.is_some()
    }
}

#[cfg(test)]
mod tests {
    //! The quotas are checked against governor with a fake clock, counting the permits it grants
    //! at chosen instants, so nothing depends on how busy the machine is. The real-time tests
    //! only assert lower bounds (pacing happened), which a slow machine cannot break.

    use super::*;
    use governor::clock::{Clock, FakeRelativeClock};
    use governor::middleware::NoOpMiddleware;
    use governor::state::{InMemoryState, NotKeyed};

    type FakeLimiter = RateLimiter<
        NotKeyed,
        InMemoryState,
        FakeRelativeClock,
        NoOpMiddleware<<FakeRelativeClock as Clock>::Instant>,
    >;

    fn fake(quota: Quota) -> (FakeLimiter, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RateLimiter::direct_with_clock(quota, clock.clone()), clock)
    }

    /// Cells granted one at a time until governor says no, at the fake clock's current time.
    fn grantable(limiter: &FakeLimiter) -> u32 {
        let mut granted = 0;
        while limiter.check().is_ok() {
            granted += 1;
            assert!(granted <= 1_000_000, "the limiter never says no");
        }
        granted
    }

    #[test]
    fn byte_quota_grants_one_second_at_once_then_refills_at_the_rate() {
        // 400 KiB/s: 100 cells of 4 KiB at once, then one cell per 10 ms.
        let (limiter, clock) = fake(byte_quota(400 * 1024));
        assert_eq!(grantable(&limiter), 100);
        clock.advance(Duration::from_millis(500));
        assert_eq!(grantable(&limiter), 50);
        clock.advance(Duration::from_millis(9));
        assert_eq!(grantable(&limiter), 0);
        clock.advance(Duration::from_millis(1));
        assert_eq!(grantable(&limiter), 1);
        // Idle time never banks more than the burst.
        clock.advance(Duration::from_secs(60));
        assert_eq!(grantable(&limiter), 100);
    }

    #[test]
    fn byte_quota_stays_positive_and_fits_large_rates() {
        assert_eq!(byte_quota(1).burst_size().get(), 1);
        assert_eq!(byte_quota(BYTES_PER_CELL * 3 + 5).burst_size().get(), 3);
        assert_eq!(byte_quota(u64::MAX).burst_size().get(), u32::MAX);
    }

    #[test]
    fn a_piece_larger_than_the_burst_is_split_not_refused() {
        // 64 KiB/s: a burst of 16 cells; 96 KiB is 24 cells, asked for as 16 then 8.
        let quota = byte_quota(64 * 1024);
        let burst = quota.burst_size().get();
        let steps: Vec<u32> = cell_steps(96 * 1024, burst).map(NonZeroU32::get).collect();
        assert_eq!(steps, [16, 8]);
        assert_eq!(cell_steps(0, burst).count(), 0);
        assert_eq!(
            cell_steps(1, burst)
                .map(NonZeroU32::get)
                .collect::<Vec<_>>(),
            [1]
        );
        let (limiter, clock) = fake(quota);
        for step in cell_steps(96 * 1024, burst) {
            // Each step fits the burst (governor answers Err(InsufficientCapacity) otherwise)
            // and is granted once a full second has refilled the bucket.
            assert!(limiter.check_n(step).expect("fits the burst").is_ok());
            clock.advance(Duration::from_secs(1));
        }
        assert!(limiter
            .check_n(NonZeroU32::new(burst + 1).unwrap())
            .is_err());
    }

    #[test]
    fn request_quota_grants_the_burst_then_one_per_interval() {
        // 20 per second: 20 at once, then one every 50 ms.
        let (limiter, clock) = fake(request_quota(NonZeroU32::new(20).unwrap()));
        assert_eq!(grantable(&limiter), 20);
        clock.advance(Duration::from_millis(49));
        assert_eq!(grantable(&limiter), 0);
        clock.advance(Duration::from_millis(1));
        assert_eq!(grantable(&limiter), 1);
        clock.advance(Duration::from_millis(250));
        assert_eq!(grantable(&limiter), 5);
    }

    #[tokio::test]
    async fn the_limits_wait_in_real_time() {
        // Lower bounds only: beyond the burst, the real limiters must make us wait.
        let limits = RateLimits::new(NonZeroU32::new(20), Some(64 * 1024));
        let start = Instant::now();
        limits.bytes(64 * 1024).await;
        let waited = limits.bytes(32 * 1024).await;
        assert!(waited >= Duration::from_millis(400), "{waited:?}");
        let start_requests = Instant::now();
        for _ in 0..25 {
            limits.request().await;
        }
        // 20 at once (the burst), then 5 more at 50 ms each.
        assert!(
            start_requests.elapsed() >= Duration::from_millis(200),
            "{:?}",
            start_requests.elapsed()
        );
        assert!(start.elapsed() >= Duration::from_millis(600));
        assert!(RateLimits::default().request().await.is_zero());
        assert!(RateLimits::default().bytes(1 << 30).await.is_zero());
    }
}
