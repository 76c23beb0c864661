//! Retry timing and request pacing, pure: fed with the current time and a random
//! number, they say how long to wait. The driver owns the sleeping.

use std::time::{Duration, Instant};

/// Longest `Retry-After` honoured: a destination asking for more (or a broken date)
/// is asked again after this long instead of stalling the destination for days.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Delay after the `failures`-th failure in a row (1 = the first). The ceiling
    /// doubles from `initial` up to `max`; the delay is spread uniformly between
    /// `initial` and the ceiling by `unit` (in `[0, 1)`), so many batches failing
    /// together do not retry together, yet never faster than `initial`. A
    /// destination's own `Retry-After` replaces all of it (capped at
    /// [`RETRY_AFTER_CAP`]).
    pub fn delay(&self, failures: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(RETRY_AFTER_CAP);
        }
        let doublings = failures.saturating_sub(1).min(31);
        let ceiling = self
            .initial
            .saturating_mul(1u32 << doublings)
            .min(self.max)
            .max(self.initial);
        let spread = ceiling.saturating_sub(self.initial);
        self.initial + spread.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// A number in `[0, 1)` for jitter. Seeded per process by the std hasher's random
/// keys; jitter needs spread, not cryptographic quality.
pub fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    // 53 random bits: exactly representable in an f64.
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Token bucket limiting requests per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `per_second` requests a second on average, bursts of a tenth of a second's
    /// worth (at least one request).
    pub fn new(per_second: u32, now: Instant) -> Self {
        let per_second = f64::from(per_second.max(1));
        let burst = (per_second / 10.0).max(1.0);
        Self {
            per_second,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token if there is one (`None`: go now); else how long until there is.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn backoff() -> Backoff {
        Backoff {
            initial: 10 * MS,
            max: 200 * MS,
        }
    }

    #[test]
    fn the_ceiling_doubles_up_to_the_maximum() {
        let b = backoff();
        assert_eq!(b.delay(1, 0.99, None), 10 * MS);
        assert_eq!(b.delay(2, 1.0, None), 20 * MS);
        assert_eq!(b.delay(3, 1.0, None), 40 * MS);
        assert_eq!(b.delay(6, 1.0, None), 200 * MS);
        assert_eq!(b.delay(u32::MAX, 1.0, None), 200 * MS);
    }

    #[test]
    fn jitter_spreads_between_initial_and_the_ceiling() {
        let b = backoff();
        assert_eq!(b.delay(5, 0.0, None), 10 * MS);
        assert_eq!(b.delay(5, 0.5, None), 85 * MS);
        for _ in 0..1000 {
            let d = b.delay(10, random_unit(), None);
            assert!(d >= 10 * MS && d <= 200 * MS, "{d:?}");
        }
    }

    #[test]
    fn retry_after_wins_over_the_backoff_even_above_the_maximum() {
        let b = backoff();
        assert_eq!(
            b.delay(1, 0.0, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(
            b.delay(1, 0.0, Some(Duration::from_secs(86_400))),
            RETRY_AFTER_CAP
        );
    }

    #[test]
    fn random_units_are_in_range_and_vary() {
        let v: Vec<f64> = (0..100).map(|_| random_unit()).collect();
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(v.iter().any(|x| *x != v[0]));
    }

    #[test]
    fn the_bucket_allows_its_rate_and_makes_the_rest_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(20, t0);
        // Burst of 2 (a tenth of a second's worth), then one every 50 ms.
        assert_eq!(b.take(t0), None);
        assert_eq!(b.take(t0), None);
        let wait = b.take(t0).unwrap();
        assert_eq!(wait.as_millis(), 50);
        assert_eq!(b.take(t0 + 50 * MS), None);
        assert!(b.take(t0 + 60 * MS).is_some());
        // An idle bucket refills only up to its burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.take(later), None);
        assert_eq!(b.take(later), None);
        assert!(b.take(later).is_some());
    }
}
