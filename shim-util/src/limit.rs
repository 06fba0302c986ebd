//! Rate limits on what a guest can make the host do: a [`TokenBucket`]
//! (broadcast frames per port, console bytes per instance) and, built on
//! it, [`Warnings`], the one way a log line a guest can trigger is written
//! ([`guest_warn!`]): a burst, then a steady trickle, each line saying how
//! many were suppressed since the last one. [`RateLimited`] is the host's
//! own kind: at most one line per interval (refused API connections,
//! accept errors), with the count held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket: holds up to `burst` tokens, refilled at `rate` per
/// second; an action that finds too few tokens is refused.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    /// Up to when tokens were credited.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `rate` per second.
    pub fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens if there are that many now.
    pub fn take(&mut self, n: u64) -> bool {
        self.take_at(n, Instant::now())
    }

    /// Takes `n` tokens if there are that many at `now`.
    pub fn take_at(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        if self.rate == 0 {
            self.last = now;
            return;
        }
        // Whole tokens earned; the remainder of time stays to be earned.
        let earned = (elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64;
        if earned == 0 {
            return;
        }
        self.tokens = self.tokens.saturating_add(earned).min(self.burst);
        if self.tokens == self.burst {
            self.last = now;
        } else {
            let spent = Duration::from_nanos(
                (u128::from(earned) * 1_000_000_000 / u128::from(self.rate)) as u64,
            );
            self.last += spent;
        }
    }
}

/// Warnings a guest can trigger, each source (device, port) with its own.
pub const WARN_BURST: u64 = 10;
/// Warnings per second after the burst.
pub const WARN_RATE: u64 = 1;

/// The rate limit of one source of guest-triggered warnings: the first
/// [`WARN_BURST`], then [`WARN_RATE`] a second; the rest are counted.
/// Usable from `&self` (the limit is behind a lock of its own).
#[derive(Debug)]
pub struct Warnings(Mutex<(TokenBucket, u64)>);

impl Default for Warnings {
    fn default() -> Self {
        Self(Mutex::new((TokenBucket::new(WARN_RATE, WARN_BURST), 0)))
    }
}

impl Warnings {
    /// Whether to log a warning now: `Some(warnings suppressed since the
    /// last one logged)`, or `None` (this one is counted as suppressed).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (bucket, suppressed) = &mut *state;
        if bucket.take_at(1, now) {
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }
}

/// `tracing::warn!` through a [`Warnings`] limit: `guest_warn!(self.warnings,
/// addr = format_args!("{addr:#x}"), "unhandled MMIO write")`, the values as
/// fields after the limit and the message constant. A logged line carries
/// the field `suppressed` first, the number of warnings of that source left
/// out since the previous one.
#[macro_export]
macro_rules! guest_warn {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.allow() {
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}

/// A warning that is logged at most once per interval, with the count of
/// those it held back.
pub struct RateLimited {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last one)` if this one may be logged.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.every => {
                s.1 += 1;
                None
            }
            _ => {
                let held = s.1;
                *s = (Some(now), 0);
                Some(held)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(100, 10);
        b.last = start;
        for _ in 0..10 {
            assert!(b.take_at(1, start));
        }
        assert!(!b.take_at(1, start), "the burst is spent");
        assert!(!b.take_at(1, start + Duration::from_millis(5)));
        assert!(
            b.take_at(1, start + Duration::from_millis(10)),
            "1 per 10 ms"
        );
        assert!(!b.take_at(1, start + Duration::from_millis(15)));
        // 100 tokens per second, over a long idle: capped at the burst.
        let later = start + Duration::from_secs(60);
        assert!(b.take_at(10, later));
        assert!(!b.take_at(1, later));
        assert!(
            !b.take_at(11, later + Duration::from_secs(60)),
            "more than the burst"
        );
        // Sub-token slices of time add up (no credit is lost to rounding).
        let mut b = TokenBucket::new(3, 10);
        b.last = start;
        assert!(b.take_at(10, start));
        let mut granted = 0;
        for ms in 1..=1000 {
            granted += u32::from(b.take_at(1, start + Duration::from_millis(ms)));
        }
        assert_eq!(granted, 3);
    }

    #[test]
    fn warnings_are_a_burst_then_a_trickle_with_the_count_left_out() {
        let start = Instant::now();
        let w = Warnings::default();
        w.0.lock().unwrap().0.last = start;
        let logged = (0..1000).filter(|_| w.allow_at(start).is_some()).count();
        assert_eq!(logged, WARN_BURST as usize);
        assert_eq!(w.allow_at(start + Duration::from_secs(1)), Some(990));
        assert_eq!(w.allow_at(start + Duration::from_secs(1)), None);
        assert_eq!(w.allow_at(start + Duration::from_secs(2)), Some(1));
    }

    #[test]
    fn rate_limited_logs_once_per_interval() {
        let r = RateLimited::new(Duration::from_secs(60));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
    }
}
