//! Per-machine counters of what the vCPU thread does for its guest: every
//! return from `KVM_RUN` by reason (doorbell hypercalls by number,
//! virtio-mmio queue notifies and other register accesses, anything else)
//! and how the `HC_YIELD` idle wait ended. Plain relaxed atomics, bumped by
//! the vCPU thread and read by anyone ([`ExitCounters::snapshot`], for
//! `GET /v1/stats` and the network benchmark): on this host an exit costs
//! 40-50 µs, so exits per request is the figure that explains a request's
//! latency.

use std::sync::atomic::{AtomicU64, Ordering};

use super::io_wait::Wake;

/// The live counters of one machine (since it started on this shim).
#[derive(Debug, Default)]
pub struct ExitCounters {
    hc_yield: AtomicU64,
    hc_console: AtomicU64,
    hc_checkpoint: AtomicU64,
    hc_other: AtomicU64,
    virtio_notify: AtomicU64,
    virtio_other: AtomicU64,
    interrupted: AtomicU64,
    other: AtomicU64,
    idle_sleeps: AtomicU64,
    idle_woken_by_io: AtomicU64,
    idle_timed_out: AtomicU64,
    idle_interrupted: AtomicU64,
    idle_skipped: AtomicU64,
}

/// Why `KVM_RUN` returned, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// A doorbell write: hypercall number `nr`.
    Hypercall(u64),
    /// A virtio-mmio `QueueNotify` write.
    VirtioNotify,
    /// Any other virtio-mmio register or config access.
    VirtioRegister,
    /// A signal (a kick from the controlling thread): no guest work.
    Interrupted,
    /// Anything else (unhandled MMIO, port I/O, halts, failures).
    Other,
}

impl ExitCounters {
    /// Counts one return from `KVM_RUN`.
    pub fn exit(&self, kind: ExitKind) {
        let counter = match kind {
            ExitKind::Hypercall(abi::hypercall::HC_YIELD) => &self.hc_yield,
            ExitKind::Hypercall(abi::hypercall::HC_CONSOLE_WRITE) => &self.hc_console,
            ExitKind::Hypercall(abi::hypercall::HC_CHECKPOINT) => &self.hc_checkpoint,
            ExitKind::Hypercall(_) => &self.hc_other,
            ExitKind::VirtioNotify => &self.virtio_notify,
            ExitKind::VirtioRegister => &self.virtio_other,
            ExitKind::Interrupted => &self.interrupted,
            ExitKind::Other => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an `HC_YIELD` that found work at once and did not sleep.
    pub fn idle_skipped(&self) {
        self.idle_skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one sleep in the idle wait and how it ended (`None`: the
    /// wait failed).
    pub fn idle_slept(&self, wake: Option<Wake>) {
        self.idle_sleeps.fetch_add(1, Ordering::Relaxed);
        let counter = match wake {
            Some(Wake::Ready(_)) => &self.idle_woken_by_io,
            Some(Wake::TimedOut) => &self.idle_timed_out,
            Some(Wake::Interrupted) | None => &self.idle_interrupted,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> ExitStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let hypercalls = HypercallExits {
            r#yield: get(&self.hc_yield),
            console: get(&self.hc_console),
            checkpoint: get(&self.hc_checkpoint),
            other: get(&self.hc_other),
        };
        let virtio = VirtioExits {
            notify: get(&self.virtio_notify),
            other: get(&self.virtio_other),
        };
        let other = get(&self.other);
        ExitStats {
            total: hypercalls.r#yield
                + hypercalls.console
                + hypercalls.checkpoint
                + hypercalls.other
                + virtio.notify
                + virtio.other
                + other,
            hypercalls,
            virtio,
            other,
            interrupted: get(&self.interrupted),
            idle: IdleWaits {
                sleeps: get(&self.idle_sleeps),
                woken_by_io: get(&self.idle_woken_by_io),
                timed_out: get(&self.idle_timed_out),
                interrupted: get(&self.idle_interrupted),
                skipped: get(&self.idle_skipped),
            },
        }
    }
}

pub use api::stats::{ExitStats, HypercallExits, IdleWaits, VirtioExits};

#[cfg(test)]
mod tests {
    use super::*;
    use abi::hypercall::{HC_CHECKPOINT, HC_CONSOLE_WRITE, HC_EXIT, HC_YIELD};

    #[test]
    fn exits_are_counted_by_reason() {
        let c = ExitCounters::default();
        for kind in [
            ExitKind::Hypercall(HC_YIELD),
            ExitKind::Hypercall(HC_YIELD),
            ExitKind::Hypercall(HC_CONSOLE_WRITE),
            ExitKind::Hypercall(HC_CHECKPOINT),
            ExitKind::Hypercall(HC_EXIT),
            ExitKind::Hypercall(999),
            ExitKind::VirtioNotify,
            ExitKind::VirtioRegister,
            ExitKind::VirtioRegister,
            ExitKind::Interrupted,
            ExitKind::Other,
        ] {
            c.exit(kind);
        }
        c.idle_skipped();
        c.idle_slept(Some(Wake::Ready(1)));
        c.idle_slept(Some(Wake::TimedOut));
        c.idle_slept(None);
        let s = c.snapshot();
        assert_eq!(
            s.hypercalls,
            HypercallExits {
                r#yield: 2,
                console: 1,
                checkpoint: 1,
                other: 2
            }
        );
        assert_eq!(
            s.virtio,
            VirtioExits {
                notify: 1,
                other: 2
            }
        );
        assert_eq!((s.other, s.interrupted, s.total), (1, 1, 10));
        assert_eq!(
            s.idle,
            IdleWaits {
                sleeps: 3,
                woken_by_io: 1,
                timed_out: 1,
                interrupted: 1,
                skipped: 1
            }
        );
    }
}
