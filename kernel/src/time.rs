//! Monotonic time: kvmclock where the monitor offers it (our shim always
//! does), else the TSC at the frequency the PVH entry calibrated.
//!
//! Never raw TSC ticks across hosts: the frequency differs between hosts
//! and kvmclock hides that (it scales to nanoseconds per host).

use abi::boot::BootInfo;
use core::sync::atomic::{compiler_fence, Ordering};

use crate::arch::x86_64::{cpu::rdtsc, mmio};

/// `struct pvclock_vcpu_time_info` (Linux's asm/pvclock-abi.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct PvclockTimeInfo {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

enum Source {
    Kvmclock { page: u64 },
    Tsc { khz: u64, start: u64 },
}

static SOURCE: spin::Once<Source> = spin::Once::new();

pub(crate) fn init(info: &BootInfo) {
    SOURCE.call_once(|| {
        if info.pvclock_addr != 0 {
            Source::Kvmclock {
                page: info.pvclock_addr,
            }
        } else {
            Source::Tsc {
                khz: info.tsc_khz.max(1),
                start: rdtsc(),
            }
        }
    });
}

fn kvmclock_ns(page: u64) -> u64 {
    loop {
        let version: u32 = mmio::read(page);
        compiler_fence(Ordering::Acquire);
        let t: PvclockTimeInfo = mmio::read(page);
        let tsc = rdtsc();
        compiler_fence(Ordering::Acquire);
        if version & 1 != 0 || version != mmio::read::<u32>(page) {
            continue; // the host is updating the page
        }
        let mut delta = tsc.wrapping_sub(t.tsc_timestamp);
        if t.tsc_shift >= 0 {
            delta <<= t.tsc_shift;
        } else {
            delta >>= -t.tsc_shift;
        }
        return t.system_time + ((delta as u128 * t.tsc_to_system_mul as u128) >> 32) as u64;
    }
}

/// Nanoseconds since the clock's epoch: VM creation with kvmclock, kernel
/// start otherwise. Monotonic.
pub fn now_ns() -> u64 {
    match SOURCE.get() {
        Some(Source::Kvmclock { page }) => kvmclock_ns(*page),
        Some(Source::Tsc { khz, start }) => {
            ((rdtsc().wrapping_sub(*start)) as u128 * 1_000_000 / *khz as u128) as u64
        }
        None => 0,
    }
}

/// Timers: `(deadline in ns, waker)`, for embassy-time and the executor.
static TIMERS: spin::Mutex<alloc::vec::Vec<(u64, core::task::Waker)>> =
    spin::Mutex::new(alloc::vec::Vec::new());

/// Wakes `waker` at `deadline_ns` (or at once if that has passed).
pub fn wake_at(deadline_ns: u64, waker: &core::task::Waker) {
    let mut timers = TIMERS.lock();
    match timers.iter_mut().find(|(_, w)| w.will_wake(waker)) {
        Some(entry) => entry.0 = entry.0.min(deadline_ns),
        None => timers.push((deadline_ns, waker.clone())),
    }
}

/// The earliest timer deadline, in ns.
pub(crate) fn next_timer_deadline() -> Option<u64> {
    TIMERS.lock().iter().map(|(at, _)| *at).min()
}

/// Wakes every timer whose deadline has passed.
pub(crate) fn wake_expired_timers() {
    let now = now_ns();
    let mut expired = alloc::vec::Vec::new();
    TIMERS.lock().retain(|(at, w)| {
        if *at <= now {
            expired.push(w.clone());
        }
        *at > now
    });
    expired.into_iter().for_each(core::task::Waker::wake);
}

/// embassy-time's clock (1 MHz ticks) on top of ours.
struct EmbassyDriver;

impl embassy_time_driver::Driver for EmbassyDriver {
    fn now(&self) -> u64 {
        now_ns() / 1000
    }

    fn schedule_wake(&self, at: u64, waker: &core::task::Waker) {
        wake_at(at.saturating_mul(1000), waker);
    }
}

embassy_time_driver::time_driver_impl!(static EMBASSY_DRIVER: EmbassyDriver = EmbassyDriver);

/// Critical sections (used by embassy's primitives) need no masking: one
/// vCPU and no interrupts, so nothing can preempt the running code.
struct SingleVcpu;

critical_section::set_impl!(SingleVcpu);

// SAFETY: with one vCPU and interrupts enabled only inside the ring-0 idle
// wait (whose handlers touch nothing but two flags), code between acquire
// and release cannot be interrupted or run concurrently.
unsafe impl critical_section::Impl for SingleVcpu {
    unsafe fn acquire() -> critical_section::RawRestoreState {}
    unsafe fn release(_: critical_section::RawRestoreState) {}
}
