//! Time for apps: a monotonic [`Instant`], [`sleep`], and [`uptime`].
//! Backed by kvmclock (the kernel's `time` module), so it stays correct on
//! hosts with other TSC frequencies.

use core::ops::{Add, Sub};
use core::time::Duration;

/// A point on the monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    /// Now.
    pub fn now() -> Self {
        Instant(kernel::time::now_ns())
    }

    /// Time passed since `self`.
    pub fn elapsed(&self) -> Duration {
        Self::now() - *self
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later).
    pub fn duration_since(&self, earlier: Instant) -> Duration {
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
    fn add(self, d: Duration) -> Instant {
        Instant(
            self.0
                .saturating_add(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }
}

/// Time since the guest was created (kvmclock starts with the VM).
pub fn uptime() -> Duration {
    Duration::from_nanos(kernel::time::now_ns())
}

/// Sleeps for `d`, giving the CPU back to the host meanwhile. Blocks every
/// task: in `async` code use [`sleep_async`].
pub fn sleep(d: Duration) {
    sleep_until(Instant::now() + d);
}

/// Sleeps until `deadline`.
pub fn sleep_until(deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        kernel::platform::yield_for((deadline - now).as_nanos() as u64);
    }
}

/// Waits for `d` without blocking other tasks (use this in `async` code).
pub async fn sleep_async(d: Duration) {
    sleep_until_async(Instant::now() + d).await
}

/// Waits until `deadline` without blocking other tasks.
pub async fn sleep_until_async(deadline: Instant) {
    core::future::poll_fn(|cx| {
        if Instant::now() >= deadline {
            core::task::Poll::Ready(())
        } else {
            kernel::time::wake_at(deadline.0, cx.waker());
            core::task::Poll::Pending
        }
    })
    .await
}
