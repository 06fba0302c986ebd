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
