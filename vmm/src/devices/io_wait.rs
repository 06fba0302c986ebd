//! Where an idle guest waits: an epoll set holding the descriptors of its
//! devices' backends (the eventfd its network port signals when frames
//! arrive), waited on with the guest's deadline.
//!
//! Waits have nanosecond precision (`epoll_pwait2`): the guest's timers are
//! in ns, and rounding a 200 µs timer up to epoll_wait's 1 ms would slow
//! every guest that sleeps briefly. On kernels without `epoll_pwait2`
//! (before 5.11) waits fall back to whole milliseconds, rounded up so a
//! short wait never degenerates into a busy loop. A signal (the vCPU kick)
//! cuts a wait short.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use hostnet::wait::wait_events;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// The epoll set behind `HC_YIELD`.
pub struct IoWait {
    epoll: Epoll,
}

/// Why [`IoWait::wait`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// This many registered descriptors are ready.
    Ready(usize),
    /// The timeout passed.
    TimedOut,
    /// A signal interrupted the wait.
    Interrupted,
}

impl IoWait {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
        })
    }

    /// The epoll set, for devices to register their descriptors.
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Adds `fd` (level-triggered, readable) to the set.
    pub fn add(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        )
    }

    /// Waits until a registered descriptor is ready, `timeout` passed
    /// (`None` = no timeout), or a signal arrives.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Wake> {
        let mut events = [EpollEvent::default(); 8];
        match wait_events(&self.epoll, timeout, &mut events) {
            Ok(0) => Ok(Wake::TimedOut),
            Ok(n) => Ok(Wake::Ready(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Wake::Interrupted),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Instant;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn an_empty_set_sleeps_for_the_timeout() {
        let wait = IoWait::new().unwrap();
        let start = Instant::now();
        assert_eq!(
            wait.wait(Some(Duration::from_millis(20))).unwrap(),
            Wake::TimedOut
        );
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(20), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn short_waits_are_not_rounded_up_to_a_millisecond() {
        let wait = IoWait::new().unwrap();
        // The best of several tries (stopping at the first good one): a
        // loaded machine may delay any one of them.
        let mut took = Duration::MAX;
        for _ in 0..50 {
            let start = Instant::now();
            assert_eq!(
                wait.wait(Some(Duration::from_micros(200))).unwrap(),
                Wake::TimedOut
            );
            took = took.min(start.elapsed());
            if took < Duration::from_micros(900) {
                break;
            }
        }
        assert!(took >= Duration::from_micros(200), "{took:?}");
        // Timer slack is 50 µs by default.
        assert!(took < Duration::from_micros(900), "{took:?}");
    }

    #[test]
    fn a_signalled_eventfd_ends_the_wait() {
        let wait = IoWait::new().unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        wait.add(fd.as_raw_fd()).unwrap();
        fd.write(1).unwrap();
        let start = Instant::now();
        assert_eq!(wait.wait(None).unwrap(), Wake::Ready(1));
        assert!(start.elapsed() < Duration::from_secs(1));
        fd.read().unwrap();
        assert_eq!(
            wait.wait(Some(Duration::from_millis(1))).unwrap(),
            Wake::TimedOut
        );
    }
}
