//! Outbound rate limiting: a token bucket for the whole gateway and one per destination number.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// A token bucket: `capacity` tokens, refilled at `per_second`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, per_second: f64, now: Instant) -> Self {
        let capacity = f64::from(capacity.max(1));
        Self { capacity, per_second: per_second.max(1e-9), tokens: capacity, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.last = now;
    }

    /// How long until `n` tokens are available (zero if they are now).
    pub fn wait_time(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= n {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((n - self.tokens) / self.per_second)
        }
    }

    /// Takes `n` tokens if available; else says how long to wait.
    pub fn try_take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        match self.wait_time(n, now) {
            d if d.is_zero() => {
                self.tokens -= n;
                Ok(())
            }
            d => Err(d),
        }
    }
}

/// Limits for [`RateLimiter`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Gateway burst (segments).
    pub gateway_burst: u32,
    /// Gateway sustained rate (segments per second).
    pub gateway_per_second: f64,
    /// Per-number burst (segments).
    pub number_burst: u32,
    /// Per-number sustained rate (segments per second).
    pub number_per_second: f64,
}

/// A gateway-wide bucket and one bucket per destination; a send takes from both at once.
#[derive(Debug)]
pub struct RateLimiter {
    limits: Limits,
    state: Mutex<(TokenBucket, HashMap<String, TokenBucket>)>,
}

impl RateLimiter {
    /// A limiter with full buckets.
    pub fn new(limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            limits,
            state: Mutex::new((
                TokenBucket::new(limits.gateway_burst, limits.gateway_per_second, now),
                HashMap::new(),
            )),
        }
    }

    /// Takes `segments` tokens for `number` from both buckets if both have them; else returns
    /// how long to wait (nothing is taken).
    pub fn try_acquire(&self, number: &str, segments: u32, now: Instant) -> Result<(), Duration> {
        let mut guard = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (gateway, numbers) = &mut *guard;
        if numbers.len() > 100_000 {
            // Full buckets are indistinguishable from fresh ones: drop them.
            numbers.retain(|_, b| b.wait_time(b.capacity, now) > Duration::ZERO);
        }
        let per = numbers.entry(number.to_owned()).or_insert_with(|| {
            TokenBucket::new(self.limits.number_burst, self.limits.number_per_second, now)
        });
        // A message larger than a bucket would never pass: cap the cost at the capacity.
        let n = f64::from(segments.max(1));
        let (ng, np) = (n.min(gateway.capacity), n.min(per.capacity));
        let wait = gateway.wait_time(ng, now).max(per.wait_time(np, now));
        if !wait.is_zero() {
            return Err(wait);
        }
        gateway.tokens -= ng;
        per.tokens -= np;
        Ok(())
    }

    /// Waits until `segments` may be sent to `number`, then takes them.
    pub async fn acquire(&self, number: &str, segments: u32) {
        loop {
            match self.try_acquire(number, segments, Instant::now()) {
                Ok(()) => return,
                Err(d) => tokio::time::sleep(d.max(Duration::from_millis(5))).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2, 1.0, t0);
        assert!(b.try_take(1.0, t0).is_ok());
        assert!(b.try_take(1.0, t0).is_ok());
        let wait = b.try_take(1.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6);
        assert!(b.try_take(1.0, t0 + Duration::from_millis(500)).is_err());
        assert!(b.try_take(1.0, t0 + Duration::from_millis(1000)).is_ok());
        // Never more than capacity.
        let later = t0 + Duration::from_secs(100);
        assert!(b.try_take(2.0, later).is_ok());
        assert!(b.try_take(1.0, later).is_err());
    }

    fn limits() -> Limits {
        Limits {
            gateway_burst: 3,
            gateway_per_second: 1.0,
            number_burst: 2,
            number_per_second: 0.5,
        }
    }

    #[test]
    fn per_number_and_gateway() {
        let r = RateLimiter::new(limits());
        let t0 = Instant::now();
        assert!(r.try_acquire("+1", 1, t0).is_ok());
        assert!(r.try_acquire("+1", 1, t0).is_ok());
        // +1 is out (2 per number), the gateway still has one.
        let w = r.try_acquire("+1", 1, t0).unwrap_err();
        assert!((w.as_secs_f64() - 2.0).abs() < 1e-6, "{w:?}");
        assert!(r.try_acquire("+2", 1, t0).is_ok());
        // The gateway is out now, for every number.
        assert!(r.try_acquire("+3", 1, t0).is_err());
        assert!(r.try_acquire("+3", 1, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn failed_acquire_takes_nothing() {
        let r = RateLimiter::new(limits());
        let t0 = Instant::now();
        assert!(r.try_acquire("+1", 2, t0).is_ok());
        assert!(r.try_acquire("+1", 1, t0).is_err());
        // The gateway bucket was not charged by the refusal: one token is left for another.
        assert!(r.try_acquire("+2", 1, t0).is_ok());
        assert!(r.try_acquire("+3", 1, t0).is_err());
    }

    #[test]
    fn oversized_message_passes_when_bucket_full() {
        let r = RateLimiter::new(limits());
        assert!(r.try_acquire("+1", 10, Instant::now()).is_ok());
    }

    #[tokio::test]
    async fn acquire_waits() {
        let r = RateLimiter::new(Limits {
            gateway_burst: 1,
            gateway_per_second: 20.0,
            number_burst: 1,
            number_per_second: 20.0,
        });
        let t = Instant::now();
        r.acquire("+1", 1).await;
        r.acquire("+1", 1).await;
        assert!(t.elapsed() >= Duration::from_millis(40), "{:?}", t.elapsed());
    }
}
