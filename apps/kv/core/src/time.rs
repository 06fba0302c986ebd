//! Time and the other facts kv asks of the machine it runs on: the
//! [`Instant`] that expiry deadlines are measured in, and the [`Platform`]
//! that tells the time, the heap's usage and the host's name.

use alloc::string::String;
use core::ops::{Add, Sub};
use core::time::Duration;

/// A point on a monotonic clock, in nanoseconds from the clock's start
/// (the guest's boot; any origin in tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The instant `nanos` ns after the clock's start.
    pub const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// Nanoseconds since the clock's start.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later).
    pub fn duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Sub for Instant {
    type Output = Duration;
    fn sub(self, rhs: Instant) -> Duration {
        self.duration_since(rhs)
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    /// Saturates at the end of time rather than wrapping.
    fn add(self, d: Duration) -> Instant {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(nanos))
    }
}

/// What the server asks of the machine it runs on.
pub trait Platform {
    /// Now, on a monotonic clock.
    fn now(&self) -> Instant;
    /// The heap's bytes in use and bytes free: writes are refused when it
    /// runs low (and past `MAXMEMORY`).
    fn heap_usage(&self) -> (usize, usize);
    /// The host's name and region, for `INFO server`.
    fn location(&self) -> (String, String);
}
