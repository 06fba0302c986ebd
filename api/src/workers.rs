//! The threads that serve API connections: at most `max` of them, started
//! when every one is busy and ended after [`IDLE_EXIT`] without work. A
//! thread serves one connection at a time and is reused, so the count of
//! threads is that bound whatever callers do (a thread per connection that
//! ends when its connection does would linger past the slot it freed, and
//! a stream of evicted connections could pile such threads up).

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

/// A thread with no connection to serve for this long ends (a burst of
/// connections reuses threads; a quiet daemon keeps none).
pub const IDLE_EXIT: Duration = Duration::from_secs(3);

type Job = Box<dyn FnOnce() + Send>;

/// A bounded, growing set of threads running jobs in order of arrival.
pub struct Workers {
    max: usize,
    name: String,
    state: Mutex<State>,
    work: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    live: usize,
    idle: usize,
}

impl Workers {
    pub fn new(name: &str, max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            name: name.to_owned(),
            state: Mutex::new(State::default()),
            work: Condvar::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `job` on an idle thread, on a new one while there are fewer
    /// than `max`, else on the first to finish its job. The caller bounds
    /// the jobs outstanding (one per connection slot), so the queue holds
    /// at most `max` of them. When a thread cannot be started the job
    /// waits for a running one; fails (dropping the queued jobs) only when
    /// none runs.
    pub fn run(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let mut s = self.state();
        s.queue.push_back(Box::new(job));
        // An idle thread for every queued job (this one included): one
        // more of them wakes. (Woken threads stay counted as idle until
        // they run.)
        if s.idle >= s.queue.len() {
            self.work.notify_one();
            return Ok(());
        }
        if s.live >= self.max {
            return Ok(());
        }
        s.live += 1;
        drop(s);
        let me = Arc::clone(self);
        let started = thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || me.work());
        if let Err(e) = started {
            let mut s = self.state();
            s.live -= 1;
            if s.live > 0 {
                tracing::warn!(thread = %self.name, error = %e, "cannot start a thread: the job waits for a busy one");
                return Ok(());
            }
            s.queue.clear();
            return Err(e);
        }
        Ok(())
    }

    fn work(&self) {
        let mut s = self.state();
        loop {
            let Some(job) = s.queue.pop_front() else {
                s.idle += 1;
                let (next, waited) = self
                    .work
                    .wait_timeout_while(s, IDLE_EXIT, |s| s.queue.is_empty())
                    .unwrap_or_else(|e| e.into_inner());
                s = next;
                s.idle -= 1;
                if waited.timed_out() && s.queue.is_empty() {
                    s.live -= 1;
                    return;
                }
                continue;
            };
            drop(s);
            if panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
                tracing::error!(thread = %self.name, "a connection's handler panicked");
            }
            s = self.state();
        }
    }

    /// Threads running now, busy or idle.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.state().live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    #[test]
    fn never_more_threads_than_the_bound_and_every_job_runs() {
        let w = Workers::new("test", 3);
        let (done, finished) = mpsc::channel();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        for i in 0..20 {
            let done = done.clone();
            let gate = Arc::clone(&gate);
            w.run(move || {
                let (open, cv) = &*gate;
                let _g = cv.wait_while(open.lock().unwrap(), |o| !*o).unwrap();
                done.send(i).unwrap();
            })
            .unwrap();
            assert!(w.live() <= 3, "{} threads for a bound of 3", w.live());
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let mut got: Vec<i32> = (0..20)
            .map(|_| finished.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        assert_eq!(w.live(), 3);
    }

    #[test]
    fn an_idle_thread_is_reused_and_a_panic_does_not_lose_it() {
        let w = Workers::new("test", 4);
        let (done, finished) = mpsc::channel();
        let wait_idle = |w: &Workers| {
            let t = Instant::now();
            while w.state().idle == 0 && t.elapsed() < Duration::from_secs(5) {
                thread::yield_now();
            }
        };
        w.run(|| panic!("a handler bug")).unwrap();
        for i in 0..10 {
            wait_idle(&w);
            let done = done.clone();
            w.run(move || done.send(i).unwrap()).unwrap();
            finished.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        assert_eq!(w.live(), 1, "one-at-a-time jobs should share one thread");
    }

    #[test]
    fn a_quiet_pool_keeps_no_thread() {
        let w = Workers::new("test", 4);
        let (done, finished) = mpsc::channel();
        w.run(move || done.send(()).unwrap()).unwrap();
        finished.recv_timeout(Duration::from_secs(10)).unwrap();
        let t = Instant::now();
        while w.live() > 0 && t.elapsed() < IDLE_EXIT * 3 {
            thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            w.live(),
            0,
            "an idle thread still there after {:?}",
            t.elapsed()
        );
    }
}
