//! The host's one way to wait on an epoll set: with a nanosecond timeout
//! (`epoll_pwait2`), falling back to whole milliseconds, rounded up, on
//! kernels without it (before 5.11). The network thread and an idle
//! guest's vCPU wait through it.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmm_sys_util::epoll::{Epoll, EpollEvent};

/// Set once `epoll_pwait2` turned out to be missing (ENOSYS).
static NO_PWAIT2: AtomicBool = AtomicBool::new(false);

/// `epoll_wait` with a nanosecond timeout (`None`: forever); returns the
/// number of events written to `events`.
pub fn wait_events(
    epoll: &Epoll,
    timeout: Option<Duration>,
    events: &mut [EpollEvent],
) -> io::Result<usize> {
    if !NO_PWAIT2.load(Ordering::Relaxed) {
        let n = crate::sys::epoll_pwait2(epoll.as_raw_fd(), events, timeout);
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOSYS) {
            return Err(err);
        }
        NO_PWAIT2.store(true, Ordering::Relaxed);
        tracing::debug!("epoll_pwait2 is missing: idle waits round up to milliseconds");
    }
    let ms = match timeout {
        None => -1,
        Some(t) => i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
    };
    epoll.wait(ms, events)
}
