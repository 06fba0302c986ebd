//! Clocks and sleeping. Both clocks count from the kernel clock's epoch:
//! the guest has no wall clock, so `SystemTime` is time since boot.

use hermit_abi::{errno, timespec, CLOCK_MONOTONIC, CLOCK_REALTIME};

use crate::sched;

/// # Safety
/// `tp` is null or points to a writable `timespec`.
#[no_mangle]
pub unsafe extern "C" fn sys_clock_gettime(clock: i32, tp: *mut timespec) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    if tp.is_null() || (clock != CLOCK_MONOTONIC && clock != CLOCK_REALTIME) {
        return -errno::EINVAL;
    }
    sched::preempt_point();
    let ns = kernel::time::now_ns();
    // SAFETY: checked non-null; the caller's guarantee for the rest.
    unsafe {
        tp.write(timespec {
            tv_sec: (ns / 1_000_000_000) as i64,
            tv_nsec: (ns % 1_000_000_000) as i32,
        })
    };
    0
}

#[no_mangle]
pub extern "C" fn sys_usleep(usecs: u64) {
    let _kernel = crate::preempt::kernel_section();
    sched::sleep_until(kernel::time::now_ns().saturating_add(usecs.saturating_mul(1000)));
}

/// # Safety
/// `req` is null or points to a `timespec`.
#[no_mangle]
pub unsafe extern "C" fn sys_nanosleep(req: *const timespec) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    // SAFETY: the caller's guarantee.
    let Some(req) = (unsafe { req.as_ref() }) else {
        return -errno::EINVAL;
    };
    sched::sleep_until(kernel::time::now_ns().saturating_add(sched::timespec_ns(req)));
    0
}
