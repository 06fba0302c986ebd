//! A delay line: items pushed now come out `delay` later, in order, with
//! a bound on the bytes in flight.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct Queue<T> {
    items: VecDeque<(Instant, usize, T)>,
    /// Bytes of the queued items.
    bytes: usize,
    /// No more input (`close`): `pop` returns `None` once drained.
    closed: bool,
    /// The consumer is gone (`abandon`): pushes are refused.
    abandoned: bool,
}

/// A FIFO whose items become available `delay` after they were pushed.
/// With one fixed delay, due times are non-decreasing, so a FIFO suffices.
/// At most `capacity` bytes are in flight: [`DelayLine::push`] waits for
/// room (a TCP sender's window), [`DelayLine::try_push`] drops (a router's
/// full queue).
pub struct DelayLine<T> {
    delay: Duration,
    capacity: usize,
    queue: Mutex<Queue<T>>,
    ready: Condvar,
    room: Condvar,
}

impl<T> DelayLine<T> {
    pub fn new(delay: Duration, capacity: usize) -> Self {
        Self {
            delay,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                closed: false,
                abandoned: false,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enqueue(&self, q: &mut Queue<T>, item: T, size: usize) {
        q.items.push_back((Instant::now() + self.delay, size, item));
        q.bytes += size;
        self.ready.notify_one();
    }

    /// Queues `item` (`size` bytes) for release after the delay, first
    /// waiting until the line has room for it; `false` if the consumer
    /// abandoned the line (the item is dropped).
    pub fn push(&self, item: T, size: usize) -> bool {
        let mut q = self.lock();
        while !q.abandoned && q.bytes > 0 && q.bytes + size > self.capacity {
            q = self.room.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if q.abandoned {
            return false;
        }
        self.enqueue(&mut q, item, size);
        true
    }

    /// Queues `item` unless that would exceed the capacity; `false`: dropped.
    pub fn try_push(&self, item: T, size: usize) -> bool {
        let mut q = self.lock();
        if q.abandoned || (q.bytes > 0 && q.bytes + size > self.capacity) {
            return false;
        }
        self.enqueue(&mut q, item, size);
        true
    }

    /// Marks the end of input: `pop` returns `None` once the queue drains.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// The consumer gives up: queued items are dropped and pushes refused.
    pub fn abandon(&self) {
        let mut q = self.lock();
        q.abandoned = true;
        q.items.clear();
        q.bytes = 0;
        self.room.notify_all();
    }

    /// Waits for the next item to fall due; `None` after `close` and drain.
    pub fn pop(&self) -> Option<T> {
        let mut q = self.lock();
        loop {
            let now = Instant::now();
            match q.items.front() {
                Some((due, _, _)) if *due <= now => {
                    let (_, size, item) = q.items.pop_front()?;
                    q.bytes -= size;
                    self.room.notify_all();
                    return Some(item);
                }
                Some((due, _, _)) => {
                    let wait = *due - now;
                    q = self
                        .ready
                        .wait_timeout(q, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                None if q.closed || q.abandoned => return None,
                None => q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner()),
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
        let line = Arc::new(DelayLine::new(Duration::from_millis(30), 1 << 20));
        let start = Instant::now();
        for i in 0..5 {
            assert!(line.push(i, 1));
        }
        line.close();
        let out: Vec<i32> = std::iter::from_fn(|| line.pop()).collect();
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(30), "{took:?}");
        assert!(took < Duration::from_millis(500), "{took:?}");
    }

    #[test]
    fn a_full_line_drops_or_waits_and_an_abandoned_one_refuses() {
        let line = Arc::new(DelayLine::new(Duration::from_millis(50), 10));
        assert!(line.try_push(1, 6));
        assert!(!line.try_push(2, 6), "over capacity: dropped");
        // A blocking push waits until the first item left the line.
        let start = Instant::now();
        let pusher = {
            let line = Arc::clone(&line);
            std::thread::spawn(move || line.push(3, 6))
        };
        assert_eq!(line.pop(), Some(1));
        assert!(pusher.join().unwrap());
        assert!(start.elapsed() >= Duration::from_millis(50));
        line.abandon();
        assert!(!line.push(4, 1));
        assert!(!line.try_push(5, 1));
    }
}
