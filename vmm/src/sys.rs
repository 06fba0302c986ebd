//! Thin wrappers over the Linux calls no crate offers us: a thread's CPU
//! clock and a child's death with its parent. With `vstate`, the only
//! `unsafe` code of the VMM; each block has its `SAFETY:` argument.

use std::io;
use std::time::Duration;

/// The CPU time the thread `thread` of this process has used so far.
pub fn thread_cpu_time(thread: libc::pthread_t) -> io::Result<Duration> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` is a thread of this process that has not been
    // joined (the caller holds its JoinHandle), and `clock` is a valid
    // place for the answer.
    let r = unsafe { libc::pthread_getcpuclockid(thread, &mut clock) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock` is the clock id just obtained and `ts` is writable.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Has the kernel SIGKILL `command`'s process when this one dies (also on
/// `kill -9`).
pub fn kill_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec; prctl is
    // async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A one-shot timer (`CLOCK_MONOTONIC`) that sends a signal to the thread
/// that created it, and only to that thread (`SIGEV_THREAD_ID`): the vCPU
/// thread's timeslice timer, which interrupts its `KVM_RUN`.
pub struct ThreadTimer(libc::timer_t);

impl ThreadTimer {
    /// A disarmed timer that will send `signal` to the calling thread.
    pub fn new(signal: libc::c_int) -> io::Result<Self> {
        // SAFETY: an all-zero sigevent is a valid value of the plain C struct.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = signal;
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` is initialised and `timer` is a valid place for
        // the new timer's id.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(timer))
    }

    /// Fires once after `after` (`Duration::ZERO` disarms it).
    pub fn set(&self, after: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `self.0` is a live timer of this process; `spec` is
        // initialised and the old value is not asked for.
        if unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a live timer, deleted once.
        unsafe { libc::timer_delete(self.0) };
    }
}
