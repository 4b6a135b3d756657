//! Retry policy: capped exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

use super::error::RetryKind;

/// How requests are retried after transient failures and rate limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// Total attempts per request, including the first (default 8). `1` disables retries.
    pub max_attempts: u32,
    /// Backoff ceiling for the first retry (default 500 ms); doubles per attempt.
    pub initial_backoff: Duration,
    /// Maximum wait between attempts (default 5 min). Server-requested
    /// rate-limit delays are also clamped to this.
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl RetryConfig {
    /// The exponential ceiling for retry number `retry` (0-based), capped at `max_backoff`.
    pub(crate) fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX);
        self.initial_backoff.checked_mul(factor).unwrap_or(self.max_backoff).min(self.max_backoff)
    }

    /// A full-jitter backoff for retry number `retry` (0-based): uniform in `[0, ceiling]`.
    pub(crate) fn jittered(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// How long to wait before retry number `retry` for an error of this kind,
    /// or `None` if it must not be retried.
    pub(crate) fn delay_for(&self, kind: RetryKind, retry: u32) -> Option<Duration> {
        match kind {
            RetryKind::Permanent => None,
            RetryKind::RateLimited(d) | RetryKind::Transient(Some(d)) => {
                Some(d.min(self.max_backoff))
            }
            RetryKind::Transient(None) => Some(self.jittered(retry)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_grows_and_caps() {
        let c = RetryConfig {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
        };
        assert_eq!(c.ceiling(0), Duration::from_millis(500));
        assert_eq!(c.ceiling(1), Duration::from_secs(1));
        assert_eq!(c.ceiling(3), Duration::from_secs(4));
        assert_eq!(c.ceiling(4), Duration::from_secs(5));
        assert_eq!(c.ceiling(1000), Duration::from_secs(5));
        for retry in 0..40 {
            assert!(c.jittered(retry) <= c.ceiling(retry));
        }
    }

    #[test]
    fn delays_by_kind() {
        let c = RetryConfig::default();
        assert_eq!(c.delay_for(RetryKind::Permanent, 0), None);
        assert_eq!(
            c.delay_for(RetryKind::RateLimited(Duration::from_millis(50)), 3),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            c.delay_for(RetryKind::RateLimited(Duration::from_secs(100_000)), 0),
            Some(c.max_backoff)
        );
        let d = c.delay_for(RetryKind::Transient(None), 2).expect("retry");
        assert!(d <= Duration::from_secs(2));
    }
}
