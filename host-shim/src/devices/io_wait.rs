//! Where an idle guest waits: an epoll set that devices will add their file
//! descriptors to (network sockets, TAP, eventfds), waited on with the
//! guest's deadline. Today the set is empty, so a wait is a sleep that a
//! signal (the `--timeout` kick) can cut short.

use std::io;
use std::time::Duration;

use vmm_sys_util::epoll::{Epoll, EpollEvent};

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

    /// Waits until a registered descriptor is ready, `timeout` passed
    /// (`None` = no timeout), or a signal arrives. Timeouts are rounded up
    /// to whole milliseconds (epoll's granularity), so a short wait never
    /// degenerates into a busy loop.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Wake> {
        let ms = match timeout {
            None => -1,
            Some(t) => i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
        };
        let mut events = [EpollEvent::default(); 8];
        match self.epoll.wait(ms, &mut events) {
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
    use std::time::Instant;

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
    fn short_waits_round_up_to_a_millisecond() {
        let wait = IoWait::new().unwrap();
        let start = Instant::now();
        wait.wait(Some(Duration::from_nanos(1))).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(1));
    }
}
