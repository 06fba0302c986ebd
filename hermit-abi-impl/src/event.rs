//! `eventfd`: a 64-bit counter behind a descriptor, as on Linux. A write
//! adds to it, a read takes it (or one, with `EFD_SEMAPHORE`) and resets
//! it; `poll` sees it readable while non-zero. mio's waker for the `poll`
//! selector is one: another thread (or a task) writes it to wake the
//! thread that sleeps in `poll`.

use alloc::vec::Vec;
use core::task::{Context, Waker};
use hermit_abi::errno;

/// Threads waiting for one eventfd at once; more are woken at once (a
/// spurious wake-up, which `poll` and `read` tolerate).
const MAX_WAITERS: usize = 8;
/// The counter's largest value (as on Linux).
const MAX_COUNT: u64 = u64::MAX - 1;

pub struct EventFd {
    count: u64,
    semaphore: bool,
    pub nonblocking: bool,
    waiters: Vec<Waker>,
}

impl EventFd {
    pub fn new(initval: u64, flags: i16) -> Self {
        Self {
            count: initval.min(MAX_COUNT),
            semaphore: flags & hermit_abi::EFD_SEMAPHORE != 0,
            nonblocking: flags & hermit_abi::EFD_NONBLOCK != 0,
            waiters: Vec::new(),
        }
    }

    pub fn readable(&self) -> bool {
        self.count > 0
    }

    pub fn writable(&self) -> bool {
        self.count < MAX_COUNT
    }

    /// Remembers `cx`'s waker until the counter changes.
    pub fn register(&mut self, cx: &Context<'_>) {
        if self.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            return;
        }
        if self.waiters.len() >= MAX_WAITERS {
            self.wake_all();
        }
        self.waiters.push(cx.waker().clone());
    }

    fn wake_all(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }

    /// Takes the counter into `buf` (8 bytes at least); `EAGAIN` while it
    /// is zero.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<isize, i32> {
        if buf.len() < 8 {
            return Err(errno::EINVAL);
        }
        if self.count == 0 {
            return Err(errno::EAGAIN);
        }
        let value = if self.semaphore { 1 } else { self.count };
        self.count -= value;
        buf[..8].copy_from_slice(&value.to_ne_bytes());
        self.wake_all();
        Ok(8)
    }

    /// Adds the 8-byte value in `buf`; `EAGAIN` if the counter would pass
    /// its maximum.
    pub fn write(&mut self, buf: &[u8]) -> Result<isize, i32> {
        let Some(bytes) = buf.get(..8) else {
            return Err(errno::EINVAL);
        };
        let value = u64::from_ne_bytes(bytes.try_into().map_err(|_| errno::EINVAL)?);
        if value == u64::MAX {
            return Err(errno::EINVAL);
        }
        if self.count.checked_add(value).is_none_or(|c| c > MAX_COUNT) {
            return Err(errno::EAGAIN);
        }
        self.count += value;
        if value > 0 {
            self.wake_all();
        }
        Ok(8)
    }
}

#[no_mangle]
pub extern "C" fn sys_eventfd(initval: u64, flags: i16) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    crate::fd::insert_event(EventFd::new(initval, flags)).unwrap_or_else(crate::fd::fail)
}
