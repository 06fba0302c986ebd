//! A guest's port on the virtual switch: two frame queues between the
//! guest's vCPU thread (which owns its virtio-net device) and the network
//! thread (which owns the switch), each with an eventfd.
//!
//! Both sides batch: the vCPU thread hands over every frame the guest
//! queued since its last exit under one lock and with one eventfd write, and
//! the network thread does the same with the frames it switched to the
//! guest. The vCPU thread waits on [`GuestPort::wait_fd`] while its guest
//! idles. The port counts the frames and bytes crossing it each way
//! ([`GuestPort::traffic`], for `GET /v1/stats`).
//!
//! The network thread looks only at ports with work: a port that goes from
//! nothing sent to something sent puts its switch port number on the
//! switch's [`ReadyPorts`] list (once per batch, so the list never holds
//! more than about one entry per port), and a round of the switch costs
//! O(ports with work), not O(ports): an idle guest costs the network thread
//! nothing, however many there are.
//!
//! Placement: every frame crosses between the two threads, and on this
//! kind of host a wake-up of a thread on another CPU is an inter-processor
//! interrupt, which in a nested VM is an exit of the host VM itself. So the
//! first guest that uses its port ([`GuestPort::colocate`], on its vCPU
//! thread) runs its vCPU thread on the network thread's CPU and keeps the
//! network thread there: the hand-offs then stay on one CPU. Only
//! [`COLOCATED_VCPUS`] vCPU threads share that CPU at a time, so busy
//! guests cannot crowd the network thread out; the others stay where the
//! scheduler puts them.
//!
//! Both queues are bounded, as a switch port's buffers are: past
//! [`TX_BACKLOG`] / [`RX_BACKLOG`] frames, more are dropped and counted.
//! (The switch rate-limits what a guest floods: see `net::FLOOD_RATE`.)

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::traffic::{NicStats, NicTraffic};

/// Frames kept for a guest that does not take them (more are dropped, as a
/// switch port with a full buffer would).
pub const RX_BACKLOG: usize = 1024;
/// Frames from a guest waiting for the network thread (more are dropped).
pub const TX_BACKLOG: usize = 1024;

/// One Ethernet frame, without FCS.
pub type Frame = Vec<u8>;

/// A port not (or no longer) on a switch.
const NO_SLOT: usize = usize::MAX;

/// How many guests' vCPU threads run on the network thread's CPU at most.
pub const COLOCATED_VCPUS: usize = 1;

/// The switch ports whose guests sent frames the network thread has not
/// taken yet, in the order they became ready. A port is added when its
/// `sent` flag goes from clear to set (and when it is plugged in with the
/// flag set), so the list holds at most about two entries per port, however
/// fast a guest sends; an entry may be stale (its port left), which the
/// network thread ignores.
///
/// It also says where the network thread runs, for [`GuestPort::colocate`].
#[derive(Debug, Default)]
pub struct ReadyPorts {
    ids: Mutex<Vec<usize>>,
    network: NetworkThread,
}

/// The network thread's kernel id and the CPU it was on when it first
/// plugged a port in (0 and -1 until then), and how many vCPU threads were
/// placed on that CPU.
#[derive(Debug)]
struct NetworkThread {
    tid: AtomicI32,
    cpu: AtomicI32,
    colocated: AtomicUsize,
}

impl Default for NetworkThread {
    fn default() -> Self {
        Self {
            tid: AtomicI32::new(0),
            cpu: AtomicI32::new(-1),
            colocated: AtomicUsize::new(0),
        }
    }
}

impl NetworkThread {
    /// Called on the network thread: notes where it runs, once.
    fn record(&self) {
        if self.tid.load(Ordering::Acquire) != 0 {
            return;
        }
        let Some(cpu) = crate::sys::current_cpu().and_then(|c| i32::try_from(c).ok()) else {
            return;
        };
        self.cpu.store(cpu, Ordering::Relaxed);
        self.tid.store(crate::sys::thread_id(), Ordering::Release);
    }

    /// Called on a vCPU thread: moves it, and the network thread, onto the
    /// network thread's CPU if fewer than [`COLOCATED_VCPUS`] are there;
    /// returns whether it did.
    fn take_a_seat(&self) -> bool {
        let tid = self.tid.load(Ordering::Acquire);
        let Ok(cpu) = usize::try_from(self.cpu.load(Ordering::Relaxed)) else {
            return false;
        };
        if tid == 0 {
            return false;
        }
        let seats = self
            .colocated
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < COLOCATED_VCPUS).then_some(n + 1)
            });
        if seats.is_err() {
            return false;
        }
        let pinned = crate::sys::pin_thread(tid, cpu).and_then(|()| crate::sys::pin_thread(0, cpu));
        match pinned {
            Ok(()) => {
                tracing::debug!(cpu, "a vCPU thread runs on the network thread's CPU");
                true
            }
            Err(e) => {
                // A cpuset that changed under us, say: stay where we are.
                tracing::debug!(cpu, "cannot run next to the network thread: {e}");
                self.colocated.fetch_sub(1, Ordering::AcqRel);
                false
            }
        }
    }

    /// A colocated vCPU thread's port is gone: its seat is free.
    fn leave(&self) {
        self.colocated.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ReadyPorts {
    fn push(&self, id: usize) {
        lock(&self.ids).push(id);
    }

    /// Moves the ready ports into `out` (emptied first, to reuse its buffer).
    pub fn take(&self, out: &mut Vec<usize>) {
        out.clear();
        std::mem::swap(&mut *lock(&self.ids), out);
    }
}

/// A guest's port.
pub struct GuestPort {
    mac: [u8; 6],
    /// Frames from the guest, for the switch (at most [`TX_BACKLOG`]).
    to_switch: Mutex<Vec<Frame>>,
    /// Set when frames were added to `to_switch`, cleared when taken.
    sent: AtomicBool,
    /// Its port number on the switch ([`NO_SLOT`]: not plugged in).
    slot: AtomicUsize,
    /// The switch's list of ports with frames, once plugged in.
    ready: OnceLock<Arc<ReadyPorts>>,
    /// Signals the network thread.
    switch_wake: Arc<EventFd>,
    /// Frames from the switch, for the guest.
    to_guest: Mutex<VecDeque<Frame>>,
    /// Signals the vCPU thread.
    guest_wake: EventFd,
    /// Frames and bytes through this port (`GET /v1/stats`).
    traffic: NicTraffic,
    /// [`Self::colocate`] was answered (whether or not it moved the thread).
    placed: AtomicBool,
    /// The vCPU thread sits on the network thread's CPU.
    colocated: AtomicBool,
}

impl GuestPort {
    /// A port for the guest with `mac`; frames it sends are announced on
    /// `switch_wake`.
    pub fn new(mac: [u8; 6], switch_wake: Arc<EventFd>) -> io::Result<Self> {
        Ok(Self {
            mac,
            to_switch: Mutex::new(Vec::new()),
            sent: AtomicBool::new(false),
            slot: AtomicUsize::new(NO_SLOT),
            ready: OnceLock::new(),
            switch_wake,
            to_guest: Mutex::new(VecDeque::new()),
            guest_wake: EventFd::new(EFD_NONBLOCK)?,
            traffic: NicTraffic::default(),
            placed: AtomicBool::new(false),
            colocated: AtomicBool::new(false),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// What the guest sent and received through this port.
    pub fn traffic(&self) -> NicStats {
        self.traffic.snapshot()
    }

    // --- the vCPU side ---

    /// Hands `frames` (emptied) to the switch, with one wake-up; drops
    /// (and counts) those past the backlog.
    pub fn send(&self, frames: &mut Vec<Frame>) {
        if frames.is_empty() {
            return;
        }
        self.traffic.sent(frames.iter());
        {
            let mut queue = lock(&self.to_switch);
            let room = TX_BACKLOG.saturating_sub(queue.len());
            for _ in room..frames.len() {
                self.traffic.dropped_tx();
            }
            frames.truncate(room);
            queue.append(frames);
            frames.clear();
        }
        // SeqCst with `plug`'s: either this sees the slot or `plug` sees
        // the flag (or both: a duplicate entry is harmless).
        if !self.sent.swap(true, Ordering::SeqCst) {
            let slot = self.slot.load(Ordering::SeqCst);
            if let (Some(ready), true) = (self.ready.get(), slot != NO_SLOT) {
                ready.push(slot);
            }
        }
        if let Err(e) = self.switch_wake.write(1) {
            tracing::warn!("cannot wake the network thread: {e}");
        }
    }

    /// Called on the guest's vCPU thread whenever it moves frames: the first
    /// time the network thread is known, runs this thread on the network
    /// thread's CPU if a seat is free there (see the module's doc). Costs
    /// one atomic load afterwards.
    pub fn colocate(&self) {
        if self.placed.load(Ordering::Relaxed) {
            return;
        }
        let Some(ready) = self.ready.get() else {
            return; // not plugged in yet: next time
        };
        if ready.network.tid.load(Ordering::Acquire) == 0 {
            return;
        }
        self.placed.store(true, Ordering::Relaxed);
        if ready.network.take_a_seat() {
            self.colocated.store(true, Ordering::Relaxed);
        }
    }

    /// Whether [`Self::colocate`] put the vCPU thread on the network
    /// thread's CPU.
    pub fn is_colocated(&self) -> bool {
        self.colocated.load(Ordering::Relaxed)
    }

    /// The frames waiting for the guest (take from the front).
    pub fn received(&self) -> MutexGuard<'_, VecDeque<Frame>> {
        lock(&self.to_guest)
    }

    /// Readable when frames arrived since [`Self::clear_wake`].
    pub fn wait_fd(&self) -> RawFd {
        self.guest_wake.as_raw_fd()
    }

    /// Consumes the wake-up, before checking the queue and going to sleep.
    pub fn clear_wake(&self) {
        // EAGAIN: nothing was signalled.
        let _ = self.guest_wake.read();
    }

    // --- the network thread's side ---

    /// Plugs the port into switch port `id`, whose ready list is `ready`
    /// (a port belongs to one switch: the first list given stays).
    pub fn plug(&self, id: usize, ready: &Arc<ReadyPorts>) {
        ready.network.record();
        let ready = self.ready.get_or_init(|| Arc::clone(ready));
        self.slot.store(id, Ordering::SeqCst);
        // Frames sent before the port had a number.
        if self.sent.load(Ordering::SeqCst) {
            ready.push(id);
        }
    }

    /// Takes the port off its switch port: what it sends is no longer
    /// announced.
    pub fn unplug(&self) {
        self.slot.store(NO_SLOT, Ordering::SeqCst);
    }

    /// A frame the guest flooded (broadcast, multicast, unknown unicast)
    /// was dropped: over its rate.
    pub fn flood_dropped(&self) {
        self.traffic.dropped_flood();
    }

    /// Moves the frames the guest sent into `out`.
    pub fn take_sent(&self, out: &mut Vec<Frame>) {
        // Frames added after the flag is cleared set it again.
        if !self.sent.load(Ordering::Acquire) || !self.sent.swap(false, Ordering::SeqCst) {
            return;
        }
        let mut queue = lock(&self.to_switch);
        if out.is_empty() {
            std::mem::swap(&mut *queue, out);
        } else {
            out.append(&mut queue);
        }
    }

    /// Queues `frames` (emptied) for the guest, with one wake-up; returns
    /// how many were dropped because the guest's backlog is full.
    pub fn deliver(&self, frames: &mut Vec<Frame>) -> usize {
        if frames.is_empty() {
            return 0;
        }
        let mut dropped = 0;
        {
            let mut queue = lock(&self.to_guest);
            for frame in frames.drain(..) {
                if queue.len() >= RX_BACKLOG {
                    dropped += 1;
                    self.traffic.dropped_rx();
                } else {
                    self.traffic.received([&frame]);
                    queue.push_back(frame);
                }
            }
        }
        if let Err(e) = self.guest_wake.write(1) {
            tracing::warn!("cannot wake a vCPU thread: {e}");
        }
        dropped
    }
}

impl Drop for GuestPort {
    fn drop(&mut self) {
        if let (true, Some(ready)) = (*self.colocated.get_mut(), self.ready.get()) {
            ready.network.leave();
        }
    }
}

/// Locks `m`, ignoring poisoning: a queue of frames is valid whatever the
/// thread that panicked was doing.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_in_batches_with_one_wake_up_each() {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let port = GuestPort::new([2, 0, 0, 0, 0, 1], wake.clone()).unwrap();
        port.send(&mut vec![vec![1], vec![2]]);
        port.send(&mut vec![vec![3]]);
        port.send(&mut Vec::new());
        assert_eq!(wake.read().unwrap(), 2, "one write per non-empty batch");
        let mut out = Vec::new();
        port.take_sent(&mut out);
        assert_eq!(out, [vec![1], vec![2], vec![3]]);

        assert_eq!(port.deliver(&mut vec![vec![9]; 3]), 0);
        port.clear_wake();
        port.clear_wake(); // nothing left to consume: no error, no block
        assert_eq!(port.received().len(), 3);
        let mut many = vec![vec![0]; RX_BACKLOG];
        assert_eq!(port.deliver(&mut many), 3);
        assert_eq!(port.received().len(), RX_BACKLOG);
        let t = port.traffic();
        assert_eq!((t.tx_packets, t.tx_bytes), (3, 3));
        assert_eq!(
            t.rx_packets as usize, RX_BACKLOG,
            "dropped frames are not counted as received"
        );
        assert_eq!(t.rx_dropped, 3);
    }

    #[test]
    fn a_port_is_listed_as_ready_once_per_batch_and_only_while_plugged() {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let ready = Arc::new(ReadyPorts::default());
        let port = GuestPort::new([2, 0, 0, 0, 0, 1], wake).unwrap();
        // Sent before it had a switch port: listed when plugged in.
        port.send(&mut vec![vec![1]]);
        let mut ids = Vec::new();
        ready.take(&mut ids);
        assert!(ids.is_empty());
        port.plug(7, &ready);
        port.send(&mut vec![vec![2]]);
        port.send(&mut vec![vec![3]]);
        ready.take(&mut ids);
        assert_eq!(ids, [7], "one entry until the frames are taken");
        let mut out = Vec::new();
        port.take_sent(&mut out);
        assert_eq!(out.len(), 3);
        port.send(&mut vec![vec![4]]);
        ready.take(&mut ids);
        assert_eq!(ids, [7], "listed again after a take");
        port.take_sent(&mut out);
        port.unplug();
        port.send(&mut vec![vec![5]]);
        ready.take(&mut ids);
        assert!(ids.is_empty(), "an unplugged port is not listed");
    }

    #[test]
    fn the_first_guest_runs_next_to_the_network_thread_and_frees_its_seat_when_gone() {
        use crate::sys::{thread_cpus, thread_id};
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let ready = Arc::new(ReadyPorts::default());
        let ports: Vec<Arc<GuestPort>> = (0..3)
            .map(|i| Arc::new(GuestPort::new([2, 0, 0, 0, 0, i], wake.clone()).unwrap()))
            .collect();
        // Not plugged in yet: nothing known about the network thread.
        ports[0].colocate();
        assert!(!ports[0].is_colocated());
        // A stand-in network thread plugs the ports in and stays alive.
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let network = {
            let (ports, ready) = (ports.clone(), Arc::clone(&ready));
            std::thread::spawn(move || {
                for (id, port) in ports.into_iter().enumerate() {
                    port.plug(id, &ready);
                }
                tid_tx.send(thread_id()).unwrap();
                let _ = done_rx.recv();
            })
        };
        let network_tid = tid_rx.recv().unwrap();
        let cpu = usize::try_from(ready.network.cpu.load(Ordering::Relaxed)).unwrap();
        let seat = |port: Arc<GuestPort>| {
            std::thread::spawn(move || {
                port.colocate();
                (port.is_colocated(), thread_cpus(0).unwrap())
            })
            .join()
            .unwrap()
        };
        let (first, first_cpus) = seat(Arc::clone(&ports[0]));
        assert!(first, "the first guest sits next to the network thread");
        assert_eq!(first_cpus, [cpu]);
        assert_eq!(
            thread_cpus(network_tid).unwrap(),
            [cpu],
            "and keeps it there"
        );
        let (second, _) = seat(Arc::clone(&ports[1]));
        assert!(!second, "one seat only");
        let mut ports = ports;
        ports.remove(0); // the first guest is gone (its last handle)
        let (third, third_cpus) = seat(Arc::clone(&ports[1]));
        assert!(third, "its seat went to the next guest that asked");
        assert_eq!(third_cpus, [cpu]);
        done_tx.send(()).unwrap();
        network.join().unwrap();
    }

    #[test]
    fn a_guest_queue_to_the_switch_is_bounded_and_counted() {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let port = GuestPort::new([2, 0, 0, 0, 0, 1], wake).unwrap();
        port.send(&mut vec![vec![1]; TX_BACKLOG + 10]);
        port.send(&mut vec![vec![2]; 5]);
        let t = port.traffic();
        assert_eq!((t.tx_packets, t.tx_dropped), (TX_BACKLOG as u64 + 15, 15));
        let mut out = Vec::new();
        port.take_sent(&mut out);
        assert_eq!(out.len(), TX_BACKLOG);
        port.send(&mut vec![vec![3]; 5]);
        port.take_sent(&mut out);
        assert_eq!(out.len(), TX_BACKLOG + 5, "room again once taken");
    }
}
