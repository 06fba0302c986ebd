//! A delay line: items pushed now come out `delay` later, in order.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A FIFO whose items become available `delay` after they were pushed.
/// With one fixed delay, due times are non-decreasing, so a FIFO suffices.
pub struct DelayLine<T> {
    delay: Duration,
    queue: Mutex<(VecDeque<(Instant, T)>, bool)>,
    ready: Condvar,
}

impl<T> DelayLine<T> {
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            queue: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
        }
    }

    /// Queues `item` for release after the delay.
    pub fn push(&self, item: T) {
        let mut q = self.queue.lock().unwrap();
        q.0.push_back((Instant::now() + self.delay, item));
        self.ready.notify_one();
    }

    /// Marks the end of input: `pop` returns `None` once the queue drains.
    pub fn close(&self) {
        self.queue.lock().unwrap().1 = true;
        self.ready.notify_all();
    }

    /// Waits for the next item to fall due; `None` after `close` and drain.
    pub fn pop(&self) -> Option<T> {
        let mut q = self.queue.lock().unwrap();
        loop {
            let now = Instant::now();
            match q.0.front() {
                Some((due, _)) if *due <= now => return q.0.pop_front().map(|(_, item)| item),
                Some((due, _)) => {
                    let wait = *due - now;
                    q = self.ready.wait_timeout(q, wait).unwrap().0;
                }
                None if q.1 => return None,
                None => q = self.ready.wait(q).unwrap(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn items_come_out_in_order_after_the_delay() {
        let line = Arc::new(DelayLine::new(Duration::from_millis(30)));
        let start = Instant::now();
        for i in 0..5 {
            line.push(i);
        }
        line.close();
        let out: Vec<i32> = std::iter::from_fn(|| line.pop()).collect();
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(30), "{took:?}");
        assert!(took < Duration::from_millis(500), "{took:?}");
    }
}
