//! Which monitor runs the guest, and the hypercall path to it: an MMIO
//! doorbell write on our shim, a trap into the ring-0 PVH handler
//! elsewhere (abi::hypercall).

use abi::boot::Platform;
use abi::hypercall::{doorbell_slot, HC_EXIT, HC_YIELD};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::arch::x86_64::{apic, mmio, pvh, trap};

static PLATFORM: AtomicU32 = AtomicU32::new(Platform::Shim as u32);
static DOORBELL: AtomicU64 = AtomicU64::new(abi::layout::DOORBELL_ADDR);

/// Records the platform (and, on our shim, its doorbell page).
pub fn set(platform: Platform) {
    PLATFORM.store(platform as u32, Ordering::Relaxed);
}

pub(crate) fn set_doorbell(addr: u64) {
    DOORBELL.store(addr, Ordering::Relaxed);
}

/// The platform the guest runs on.
pub fn get() -> Platform {
    Platform::from_u32(PLATFORM.load(Ordering::Relaxed)).unwrap_or(Platform::Shim)
}

/// Issues hypercall `nr` from ring 3.
pub fn hypercall(nr: u64, value: u64) {
    match get() {
        Platform::Shim => {
            mmio::write_u64(doorbell_slot(DOORBELL.load(Ordering::Relaxed), nr), value)
        }
        Platform::Pvh => trap::hypercall(nr, value),
    }
}

/// Issues hypercall `nr` from ring 0 (the trap handlers).
pub(crate) fn hypercall_ring0(nr: u64, value: u64) {
    match get() {
        Platform::Shim => {
            mmio::write_u64(doorbell_slot(DOORBELL.load(Ordering::Relaxed), nr), value)
        }
        Platform::Pvh => pvh::serve(nr, value),
    }
}

/// Stops the guest with exit status `code` (0..=255).
pub fn exit(code: i32) -> ! {
    hypercall(HC_EXIT, (code & 0xff) as u64);
    loop {
        core::hint::spin_loop();
    }
}

/// Longest single idle wait on PVH monitors (a device interrupt that never
/// came costs at most this much); fits the LAPIC's 32-bit count of ns.
const PVH_IDLE_MAX_NS: u64 = 4_000_000_000;

/// Gives the host the CPU for at most `timeout_ns`, or until I/O is ready.
/// On our shim that is `HC_YIELD`; on PVH monitors a ring-0 wait for an
/// interrupt (the LAPIC timer or a device's), or nothing when `timeout_ns`
/// is 0. The guest may come back on another host: this is where it notices.
pub fn yield_for(timeout_ns: u64) {
    match get() {
        Platform::Shim => hypercall(HC_YIELD, timeout_ns),
        Platform::Pvh if timeout_ns == 0 || !apic::ready() => {}
        Platform::Pvh => trap::idle(timeout_ns.min(PVH_IDLE_MAX_NS) as u32),
    }
    crate::migration::check();
}
