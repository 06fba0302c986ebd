//! The guest's side of network polling on our shim (`abi::boot::NetPoll`):
//! instead of waiting in the host for its next frame, an idle guest spins
//! on its receive ring for at most [`POLL_NS`] while the shim's network
//! thread fills that ring and takes what it transmits, so a request and
//! its reply cross without a VM exit.
//!
//! The network driver registers how to look at its receive ring
//! ([`set_ready_check`]) and reports every frame it queues
//! ([`tx_queued`]); the executor (`crate::task`) decides when to poll
//! ([`poll`]) and when it must exit after all ([`must_flush`]).

use alloc::boxed::Box;
use core::sync::atomic::{fence, AtomicBool, Ordering};

use abi::boot::NetPoll;
use spin::Mutex;

use crate::arch::x86_64::mmio;
use crate::task::VcpuLocal;

/// Longest spin of an idle guest before it waits in the host. Bounded so an
/// idle guest still costs no CPU: after this long without a frame or a
/// timer it exits and sleeps. A request/reply round trip through a client
/// on this host takes 20-100 µs, so one poll covers the gap to the next
/// request of a client that sends them one at a time.
pub const POLL_NS: u64 = 200_000;

/// Whether the receive ring holds a frame the driver has not taken.
type ReadyCheck = Box<dyn Fn() -> bool>;

/// The driver's check (not `Send`: it looks at the driver's state).
static CHECK: VcpuLocal<Option<ReadyCheck>> = VcpuLocal(Mutex::new(None));
/// A frame was queued while the host did not watch the transmit ring: the
/// next idle must exit so the host takes it.
static UNFLUSHED: AtomicBool = AtomicBool::new(false);

fn load(offset: usize) -> u32 {
    mmio::read::<u32>(NetPoll::addr(offset))
}

fn store(offset: usize, value: u32) {
    mmio::write_u32(NetPoll::addr(offset), value);
}

/// Called by the network driver once, on our shim only: `ready` says
/// whether the receive ring holds a frame the driver has not taken.
pub fn set_ready_check(ready: impl Fn() -> bool + 'static) {
    *CHECK.lock() = Some(Box::new(ready));
}

/// Called by the network driver after it queued a frame for the host.
pub fn tx_queued() {
    // The frame's ring index was stored before; the host stores `watching
    // = 0` before it looks at the ring a last time (abi::boot::NetPoll).
    fence(Ordering::SeqCst);
    if load(core::mem::offset_of!(NetPoll, watching)) == 0 {
        UNFLUSHED.store(true, Ordering::Relaxed);
    }
}

/// Whether the guest queued frames the host has not seen: it must exit
/// (`HC_YIELD`) before it idles.
pub fn must_flush() -> bool {
    UNFLUSHED.load(Ordering::Relaxed)
}

/// The host just served an `HC_YIELD`: it took every queued frame.
pub(crate) fn flushed() {
    UNFLUSHED.store(false, Ordering::Relaxed);
}

/// Whether polling is possible now: on our shim, with a driver that
/// registered, not pausing (see [`Backoff`]) and not held off by the host.
pub fn available(now_ns: u64) -> bool {
    if CHECK.lock().is_none() {
        return false;
    }
    if now_ns < BACKOFF.lock().until || load(core::mem::offset_of!(NetPoll, hold_off)) != 0 {
        return false;
    }
    if !SPINS.swap(true, Ordering::Relaxed) {
        store(core::mem::offset_of!(NetPoll, spins), 1);
        // Exit once before spinning: the host then moves the vCPU thread
        // off the network thread's CPU, where it may sit until now.
        UNFLUSHED.store(true, Ordering::Relaxed);
    }
    true
}

/// A gap this long between two looks at the ring means the vCPU did not
/// run in between: the host gave its CPU to another thread. (One look
/// takes well under a µs; the host's own interrupts take a few µs.)
pub const PREEMPTED_NS: u64 = 50_000;
/// Polling is judged over this much spinning...
pub const JUDGE_NS: u64 = 10_000_000;
/// ... and pauses if more than this share of it the vCPU did not run.
pub const MAX_STOLEN_SHARE: u64 = 4; // 1/4
/// Shortest and longest pause of polling.
pub const PAUSE_MIN_NS: u64 = 1_000_000;
pub const PAUSE_MAX_NS: u64 = 128_000_000;

/// Polling pauses when the host keeps taking the CPU away from the
/// spinning guest: its CPUs are all busy, and spinning takes time from
/// others (the client it serves, say) while a guest that waits in the host
/// is woken with priority. Pauses double while that lasts.
struct Backoff {
    /// No polling before this (kernel clock, ns).
    until: u64,
    /// The next pause.
    next: u64,
    /// Spun, and of that not run, since the last judgement.
    spun: u64,
    stolen: u64,
}

/// What the host was last told in `NetPoll::spins`.
static SPINS: AtomicBool = AtomicBool::new(false);

static BACKOFF: Mutex<Backoff> = Mutex::new(Backoff {
    until: 0,
    next: PAUSE_MIN_NS,
    spun: 0,
    stolen: 0,
});

impl Backoff {
    fn account(&mut self, spun: u64, stolen: u64, now: u64) {
        self.spun += spun;
        self.stolen += stolen;
        if self.spun < JUDGE_NS {
            return;
        }
        if self.stolen * MAX_STOLEN_SHARE > self.spun {
            self.until = now.saturating_add(self.next);
            self.next = (self.next * 2).min(PAUSE_MAX_NS);
            SPINS.store(false, Ordering::Relaxed);
            store(core::mem::offset_of!(NetPoll, spins), 0);
        } else {
            self.next = PAUSE_MIN_NS;
        }
        (self.spun, self.stolen) = (0, 0);
    }
}

/// How a [`poll`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polled {
    /// The receive ring has a frame.
    Frame,
    /// The time given passed.
    Expired,
    /// Frames wait in the host that it did not put in the ring (they came
    /// before it saw the guest poll, or the ring was full): exit to get them.
    InHost,
}

/// Spins until the receive ring has a frame or `until_ns` on the kernel
/// clock passes. The host serves the rings meanwhile.
pub fn poll(until_ns: u64) -> Polled {
    let guard = CHECK.lock();
    let Some(ready) = guard.as_ref() else {
        return Polled::InHost;
    };
    store(core::mem::offset_of!(NetPoll, polling), 1);
    fence(Ordering::SeqCst);
    if ready() {
        return Polled::Frame;
    }
    if load(core::mem::offset_of!(NetPoll, rx_pending)) != 0 {
        return Polled::InHost;
    }
    let start = crate::time::now_ns();
    let (mut last, mut stolen) = (start, 0);
    let polled = loop {
        if ready() {
            break Polled::Frame;
        }
        let now = crate::time::now_ns();
        if now - last > PREEMPTED_NS {
            stolen += now - last;
        }
        last = now;
        if now >= until_ns || load(core::mem::offset_of!(NetPoll, hold_off)) != 0 {
            break Polled::Expired;
        }
        for _ in 0..8 {
            core::hint::spin_loop();
        }
    };
    BACKOFF.lock().account(last - start, stolen, last);
    polled
}

/// The guest is about to wait in the host: frames go through the vCPU
/// thread again.
pub fn stop() {
    if CHECK.lock().is_none() {
        return;
    }
    store(core::mem::offset_of!(NetPoll, polling), 0);
    fence(Ordering::SeqCst);
}
