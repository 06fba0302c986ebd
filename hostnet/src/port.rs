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
//! network thread there: the hand-offs then stay on one CPU. While a seat
//! is taken the network thread runs under `SCHED_BATCH`, so that the two
//! take turns: a host socket's data waking the network thread does not
//! preempt the guest mid-batch (in a nested VM a preemption costs about
//! what a VM exit does); it runs once the guest waits. With kv at
//! `redis-benchmark -c 50 -P 16` the vCPU thread was preempted about
//! twice per exit without it (4.3-4.8k involuntary switches per 2M
//! requests), 19-545 times with it, for 10-19 % more requests a second
//! (3 A/B rounds). Only
//! [`COLOCATED_VCPUS`] vCPU threads share that CPU at a time; the others
//! stay where the scheduler puts them. A release valve keeps a guest that
//! computes from crowding the network thread out: at most every
//! [`SEAT_CHECK`] the network thread reads how much CPU a seated vCPU thread
//! used, and one past [`SEAT_MAX_BUSY`] that also sleeps less than once
//! per [`SEAT_MAX_RUN_PER_SLEEP`] of CPU (a server busy with requests one
//! at a time sleeps between them) goes back to the CPUs it had (as does
//! the network thread once no seat is taken); that guest never sits down
//! again, a later one may. A guest that spins on its rings when idle
//! ([`RingServer`]) does not sit there: it would hold the very CPU the
//! network thread needs to serve it ([`GuestPort::place`]).
//!
//! Both queues are bounded, as a switch port's buffers are: past
//! [`TX_BACKLOG`] / [`RX_BACKLOG`] frames, more are dropped and counted.
//! (The switch rate-limits what a guest floods: see `net::FLOOD_RATE`.)

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::traffic::{NicStats, NicTraffic};
use crate::sys::CpuSet;

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

/// How often the network thread checks how much CPU a seated vCPU thread
/// uses (at most).
pub const SEAT_CHECK: Duration = Duration::from_secs(1);

/// How busy a seated vCPU thread may be: of the time it did not wait for a
/// CPU (it ran or slept), the share it ran. A guest that computes without
/// yielding is at 1.0 whatever the host's load (a plain share of wall time
/// is not: a spinning guest measured 0.54 at load average 5, and would
/// hide under a higher load); kv answering `redis-benchmark -c 1` as fast
/// as it can measured 0.76-0.79 (0.42 of wall time), so a server keeps its
/// seat.
pub const SEAT_MAX_BUSY: f64 = 0.9;

/// A seated vCPU thread busier than [`SEAT_MAX_BUSY`] still keeps its seat
/// if it went to sleep (its idle wait) at least once per this much CPU
/// time: it serves requests rather than computes, and the network thread
/// waits behind it at most about this long. kv answering `redis-benchmark
/// -c 1` as fast as it can on a loaded host measured busy 0.83-0.98 (it
/// sleeps only while a reply and the next request travel) with ~150 µs of
/// CPU per sleep; a guest that spins never sleeps.
pub const SEAT_MAX_RUN_PER_SLEEP: Duration = Duration::from_micros(500);

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
/// plugged a port in (0 and -1 until then), and the vCPU threads seated on
/// that CPU.
#[derive(Debug)]
struct NetworkThread {
    tid: AtomicI32,
    cpu: AtomicI32,
    seats: Mutex<Seats>,
}

/// The vCPU threads on the network thread's CPU (at most
/// [`COLOCATED_VCPUS`]) and the network thread's own CPUs before it was
/// pinned there (restored when the last seat is freed).
#[derive(Debug, Default)]
struct Seats {
    taken: Vec<Seat>,
    network_cpus: Option<CpuSet>,
    /// The id the next seat gets (0 is never one: "no seat").
    last_id: u64,
}

/// A vCPU thread on the network thread's CPU.
#[derive(Debug)]
struct Seat {
    id: u64,
    /// The guest's MAC (for the log).
    mac: [u8; 6],
    tid: libc::pid_t,
    /// The CPUs it could run on before it sat down.
    cpus: CpuSet,
    /// When its CPU use was last read, and what the scheduler had counted
    /// then.
    checked: Instant,
    sched: crate::sys::ThreadSched,
}

impl Seat {
    /// Lets the vCPU thread run on the CPUs it had before it sat down.
    fn give_back(&self) {
        if let Err(e) = crate::sys::set_thread_affinity(self.tid, &self.cpus) {
            tracing::warn!(
                tid = self.tid,
                error = %e,
                "cannot give a vCPU thread its CPUs back"
            );
        }
    }
}

impl Default for NetworkThread {
    fn default() -> Self {
        Self {
            tid: AtomicI32::new(0),
            cpu: AtomicI32::new(-1),
            seats: Mutex::default(),
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

    /// Called on the vCPU thread of the guest with `mac`: moves it, and
    /// the network thread, onto the network thread's CPU if fewer than
    /// [`COLOCATED_VCPUS`] are there; returns its seat's id if it did.
    fn take_a_seat(&self, mac: [u8; 6]) -> Option<u64> {
        let network = self.tid.load(Ordering::Acquire);
        let cpu = usize::try_from(self.cpu.load(Ordering::Relaxed)).ok()?;
        if network == 0 {
            return None;
        }
        let mut seats = lock(&self.seats);
        if seats.taken.len() >= COLOCATED_VCPUS {
            return None;
        }
        let tid = crate::sys::thread_id();
        let seated = (|| {
            let cpus = crate::sys::thread_affinity(0)?;
            let sched = crate::sys::thread_sched(tid)?;
            if seats.network_cpus.is_none() {
                seats.network_cpus = Some(crate::sys::thread_affinity(network)?);
                crate::sys::pin_thread(network, cpu)?;
                crate::sys::set_thread_batch(network, true)?;
            }
            crate::sys::pin_thread(0, cpu)?;
            Ok::<_, io::Error>((cpus, sched))
        })();
        match seated {
            Ok((cpus, sched)) => {
                seats.last_id += 1;
                let id = seats.last_id;
                seats.taken.push(Seat {
                    id,
                    mac,
                    tid,
                    cpus,
                    checked: Instant::now(),
                    sched,
                });
                tracing::debug!(cpu, tid, "a vCPU thread runs on the network thread's CPU");
                Some(id)
            }
            Err(e) => {
                // A cpuset that changed under us, say: stay where we are.
                tracing::debug!(cpu, error = %e, "cannot run next to the network thread");
                self.free_network_thread(&mut seats);
                None
            }
        }
    }

    /// Whether seat `id` is still taken.
    fn is_seated(&self, id: u64) -> bool {
        lock(&self.seats).taken.iter().any(|s| s.id == id)
    }

    /// Seat `id`'s vCPU thread goes back to the CPUs it had, for `why`.
    fn unseat(&self, id: u64, why: &str) {
        let mut seats = lock(&self.seats);
        if let Some(i) = seats.taken.iter().position(|s| s.id == id) {
            let seat = seats.taken.swap_remove(i);
            seat.give_back();
            tracing::debug!(mac = %crate::fmt_mac(&seat.mac), tid = seat.tid, why, "a vCPU thread leaves the network thread's CPU");
        }
        self.free_network_thread(&mut seats);
    }

    /// Seat `id`'s port is gone: the seat is free (if it still was taken).
    fn leave(&self, id: u64) {
        let mut seats = lock(&self.seats);
        seats.taken.retain(|s| s.id != id);
        self.free_network_thread(&mut seats);
    }

    /// Gives the network thread its CPUs back once no seat is taken.
    fn free_network_thread(&self, seats: &mut Seats) {
        if !seats.taken.is_empty() {
            return;
        }
        if let Some(cpus) = seats.network_cpus.take() {
            let tid = self.tid.load(Ordering::Acquire);
            if let Err(e) = crate::sys::set_thread_affinity(tid, &cpus) {
                tracing::warn!(tid, error = %e, "cannot give the network thread its CPUs back");
            }
            if let Err(e) = crate::sys::set_thread_batch(tid, false) {
                tracing::warn!(tid, error = %e, "cannot give the network thread its scheduling policy back");
            }
        }
    }

    /// How long until a seated vCPU thread's CPU use is due to be checked
    /// (`None`: no seat is taken).
    fn check_due(&self) -> Option<Duration> {
        let seats = lock(&self.seats);
        let next = seats.taken.iter().map(|s| s.checked + SEAT_CHECK).min()?;
        Some(next.saturating_duration_since(Instant::now()))
    }

    /// The release valve, on the network thread: a seated vCPU thread
    /// that ran more than [`SEAT_MAX_BUSY`] of the time it was not waiting
    /// for a CPU, over at least [`SEAT_CHECK`], and slept less than once
    /// per [`SEAT_MAX_RUN_PER_SLEEP`] of it, computes rather than moves
    /// frames; it goes back to the CPUs it had (its guest never
    /// sits down again), and so does the network thread when no seat is
    /// left.
    fn check_seats(&self) {
        let now = Instant::now();
        let mut seats = lock(&self.seats);
        seats.taken.retain_mut(|seat| {
            let elapsed = now.saturating_duration_since(seat.checked);
            if elapsed < SEAT_CHECK {
                return true;
            }
            let Ok(sched) = crate::sys::thread_sched(seat.tid) else {
                // The thread is gone; its port goes soon.
                return false;
            };
            let ran = sched.run.saturating_sub(seat.sched.run);
            // Of the time it did not wait for a CPU (it ran or slept), how
            // much it ran: what it would use of a CPU of its own.
            let waited = sched.waited.saturating_sub(seat.sched.waited);
            let could = elapsed.saturating_sub(waited);
            let share = ran.as_secs_f64() / could.max(ran).as_secs_f64().max(1e-9);
            let sleeps = sched.sleeps.saturating_sub(seat.sched.sleeps);
            (seat.checked, seat.sched) = (now, sched);
            if share <= SEAT_MAX_BUSY {
                return true;
            }
            // A server busy with requests one at a time sleeps between them.
            let per_sleep = u32::try_from(sleeps)
                .ok()
                .filter(|&n| n > 0)
                .map(|n| ran / n);
            if per_sleep.is_some_and(|run| run <= SEAT_MAX_RUN_PER_SLEEP) {
                return true;
            }
            seat.give_back();
            tracing::warn!(
                mac = %crate::fmt_mac(&seat.mac),
                tid = seat.tid,
                busy = %format_args!("{share:.2}"),
                cpu_share = %format_args!("{:.2}", ran.as_secs_f64() / elapsed.as_secs_f64()),
                "a guest computes on the network thread's CPU: its vCPU thread leaves it"
            );
            false
        });
        self.free_network_thread(&mut seats);
    }
}

impl ReadyPorts {
    fn push(&self, id: usize) {
        lock(&self.ids).push(id);
    }

    /// How long until the network thread is due to call
    /// [`Self::check_seats`] (`None`: no vCPU thread is seated).
    pub fn seat_check_due(&self) -> Option<Duration> {
        self.network.check_due()
    }

    /// On the network thread: unseats the vCPU threads that compute on its
    /// CPU (see [`SEAT_MAX_BUSY`]).
    pub fn check_seats(&self) {
        self.network.check_seats();
    }

    /// Moves the ready ports into `out` (emptied first, to reuse its buffer).
    pub fn take(&self, out: &mut Vec<usize>) {
        out.clear();
        std::mem::swap(&mut *lock(&self.ids), out);
    }
}

/// Serves a guest's virtio rings from the network thread while the guest
/// spins on them instead of waiting in the host (implemented by the VMM's
/// network device): a frame then reaches the guest, and its reply leaves,
/// without a VM exit. See `abi::boot::NetPoll` for the protocol.
pub trait RingServer: Send + Sync {
    /// Tells the guest whether frames wait for it in the port and whether
    /// to `hold_off` polling, and if it polls (or `watched`: the network
    /// thread watches its transmit ring) moves frames both ways now.
    fn serve(&self, watched: bool, hold_off: bool) -> Served;
    /// Whether the guest spins on its rings when idle, these days.
    fn spins(&self) -> bool;
    /// Tells the guest whether the network thread watches its transmit
    /// ring (frames it queues then leave without an exit).
    fn watch(&self, on: bool);
}

/// What one [`RingServer::serve`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// The guest polls (or was watched): its rings were served.
    pub served: bool,
    /// Frames taken from its transmit ring.
    pub sent: usize,
    /// Frames put in its receive ring.
    pub delivered: usize,
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
    /// The seat of the vCPU thread on the network thread's CPU (0: none).
    seat: AtomicU64,
    /// Serves the guest's rings while it polls them (weak: the machine
    /// owns it and goes first).
    server: Mutex<Option<Weak<dyn RingServer>>>,
    /// While the guest spins: the CPUs its vCPU thread had before it was
    /// kept off the network thread's CPU ([`Self::place`]).
    kept_off: Mutex<Option<CpuSet>>,
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
            seat: AtomicU64::new(0),
            server: Mutex::new(None),
            kept_off: Mutex::new(None),
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
            tracing::warn!(error = %e, "cannot wake the network thread");
        }
    }

    /// Called on the guest's vCPU thread whenever it moves frames. A guest
    /// that waits in the host when idle sits next to the network thread if
    /// a seat is free ([`Self::colocate`]); one that spins on its rings
    /// (`spins`, see [`RingServer`]) must not: it would hold the very CPU
    /// the network thread needs to serve it. It gives its seat back and may
    /// sit down again once it stops spinning. Costs an atomic load or two
    /// while nothing changes.
    pub fn place(&self, spins: bool) {
        if spins {
            self.leave_seat();
            self.keep_off_network_cpu();
        } else {
            self.back_on_its_cpus();
            self.colocate();
        }
    }

    /// A spinning guest's vCPU thread leaves the network thread's CPU to
    /// it (where that thread is pinned while another guest sits next to
    /// it): sharing that CPU, the network thread would wait behind the very
    /// guest it serves. Once per spinning stretch; nothing if that CPU is
    /// the only one the thread may use.
    fn keep_off_network_cpu(&self) {
        let mut kept_off = lock(&self.kept_off);
        if kept_off.is_some() {
            return;
        }
        let Some(cpu) = self
            .ready
            .get()
            .and_then(|r| usize::try_from(r.network.cpu.load(Ordering::Relaxed)).ok())
        else {
            return;
        };
        let Ok(had) = crate::sys::thread_affinity(0) else {
            return;
        };
        // Remembered even when nothing changes: the next exits then cost
        // no system call.
        *kept_off = Some(had);
        let elsewhere = had.without(cpu);
        if elsewhere.cpus().is_empty() || elsewhere.cpus() == had.cpus() {
            return;
        }
        if let Err(e) = crate::sys::set_thread_affinity(0, &elsewhere) {
            tracing::debug!(cpu, error = %e, "cannot keep a spinning vCPU thread off the network thread's CPU");
        }
    }

    /// Undoes [`Self::keep_off_network_cpu`].
    fn back_on_its_cpus(&self) {
        if let Some(had) = lock(&self.kept_off).take() {
            if let Err(e) = crate::sys::set_thread_affinity(0, &had) {
                tracing::debug!(error = %e, "cannot give a vCPU thread its CPUs back");
            }
        }
    }

    /// Gives the vCPU thread's seat on the network thread's CPU back (the
    /// thread gets its CPUs back) unless it has none, or lost it to the
    /// release valve (then it never sits down again).
    fn leave_seat(&self) {
        let seat = self.seat.load(Ordering::Relaxed);
        if seat == 0 || !self.is_colocated() {
            return;
        }
        if let Some(ready) = self.ready.get() {
            ready.network.unseat(seat, "the guest spins on its rings");
        }
        self.seat.store(0, Ordering::Relaxed);
        self.placed.store(false, Ordering::Relaxed);
    }

    /// The first time the network thread is known, runs this thread on the
    /// network thread's CPU if a seat is free there (see the module's doc).
    /// Costs one atomic load afterwards.
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
        if let Some(seat) = ready.network.take_a_seat(self.mac) {
            self.seat.store(seat, Ordering::Relaxed);
        }
    }

    /// Whether [`Self::colocate`] put the vCPU thread on the network
    /// thread's CPU and it still sits there.
    pub fn is_colocated(&self) -> bool {
        let seat = self.seat.load(Ordering::Relaxed);
        seat != 0 && self.ready.get().is_some_and(|r| r.network.is_seated(seat))
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

    /// Installs the machine's [`RingServer`] (replacing an earlier one).
    pub fn set_server(&self, server: Weak<dyn RingServer>) {
        *lock(&self.server) = Some(server);
    }

    fn server(&self) -> Option<Arc<dyn RingServer>> {
        lock(&self.server).as_ref().and_then(Weak::upgrade)
    }

    // --- the network thread's side ---

    /// See [`RingServer::spins`] (`false` without a server).
    pub fn spins(&self) -> bool {
        self.server().is_some_and(|s| s.spins())
    }

    /// See [`RingServer::serve`].
    pub fn serve(&self, watched: bool, hold_off: bool) -> Served {
        let Some(server) = self.server() else {
            return Served::default();
        };
        let served = server.serve(watched, hold_off);
        if served.sent + served.delivered > 0 {
            self.traffic.polled(served.delivered, served.sent);
        }
        served
    }

    /// See [`RingServer::watch`].
    pub fn watch(&self, on: bool) {
        if let Some(server) = self.server() {
            server.watch(on);
        }
    }

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
            tracing::warn!(error = %e, "cannot wake a vCPU thread");
        }
        dropped
    }
}

impl Drop for GuestPort {
    fn drop(&mut self) {
        if let (seat @ 1.., Some(ready)) = (*self.seat.get_mut(), self.ready.get()) {
            ready.network.leave(seat);
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

    /// A stand-in network thread that plugged one port in and stays alive
    /// (its CPU is where guests sit down) until [`Self::stop`].
    struct StandIn {
        tid: libc::pid_t,
        done: std::sync::mpsc::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    }

    impl StandIn {
        fn plug(port: &Arc<GuestPort>, ready: &Arc<ReadyPorts>) -> Self {
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let (done, done_rx) = std::sync::mpsc::channel::<()>();
            let (port, ready) = (Arc::clone(port), Arc::clone(ready));
            let thread = std::thread::spawn(move || {
                port.plug(0, &ready);
                tid_tx.send(crate::sys::thread_id()).unwrap();
                let _ = done_rx.recv();
            });
            let tid = tid_rx.recv().unwrap();
            Self { tid, done, thread }
        }

        fn stop(self) {
            self.done.send(()).unwrap();
            self.thread.join().unwrap();
        }
    }

    #[test]
    fn the_valve_sees_a_thread_that_sleeps_apart_from_one_that_computes() {
        let me = crate::sys::thread_id();
        let start = crate::sys::thread_sched(me).unwrap();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let slept = crate::sys::thread_sched(me).unwrap();
        assert!(
            slept.sleeps >= start.sleeps + 20,
            "20 sleeps counted: {start:?} -> {slept:?}"
        );
        // Compute for 20 ms of CPU time (the host may be loaded: bounded
        // by wall time instead of assumed).
        let give_up = Instant::now() + Duration::from_secs(20);
        let mut now = slept;
        while now.run < slept.run + Duration::from_millis(20) && Instant::now() < give_up {
            std::hint::black_box((0..10_000u64).sum::<u64>());
            now = crate::sys::thread_sched(me).unwrap();
        }
        assert!(now.run >= slept.run + Duration::from_millis(20), "{now:?}");
        let ran = now.run - slept.run;
        let sleeps = (now.sleeps - slept.sleeps).max(1);
        assert!(
            ran / u32::try_from(sleeps).unwrap() > SEAT_MAX_RUN_PER_SLEEP,
            "computing: {ran:?} of CPU with {sleeps} sleeps"
        );
    }

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
        assert!(
            crate::sys::thread_is_batch(network_tid),
            "where it no longer preempts the guest when it wakes"
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
    fn a_spinning_guest_leaves_its_seat_and_the_network_threads_cpu_and_comes_back() {
        use crate::sys::thread_cpus;
        let all = thread_cpus(0).unwrap();
        if all.len() < 2 {
            eprintln!("skipped: this thread may use one CPU only ({all:?})");
            return;
        }
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let ready = Arc::new(ReadyPorts::default());
        let port = Arc::new(GuestPort::new([2, 0, 0, 0, 0, 9], wake).unwrap());
        let network = StandIn::plug(&port, &ready);
        let cpu = usize::try_from(ready.network.cpu.load(Ordering::Relaxed)).unwrap();
        let vcpu = {
            let port = Arc::clone(&port);
            std::thread::spawn(move || {
                port.place(false);
                let seated = (port.is_colocated(), thread_cpus(0).unwrap());
                port.place(true);
                let spinning = (port.is_colocated(), thread_cpus(0).unwrap());
                port.place(true);
                let still = thread_cpus(0).unwrap();
                port.place(false);
                let back = (port.is_colocated(), thread_cpus(0).unwrap());
                (seated, spinning, still, back)
            })
            .join()
            .unwrap()
        };
        let (seated, spinning, still, back) = vcpu;
        assert_eq!(seated, (true, vec![cpu]), "a guest that waits sits down");
        let elsewhere: Vec<usize> = all.iter().copied().filter(|&c| c != cpu).collect();
        assert_eq!(
            spinning,
            (false, elsewhere.clone()),
            "a spinning guest stands up and keeps off the network thread's CPU"
        );
        assert_eq!(still, elsewhere);
        assert_eq!(
            back,
            (true, vec![cpu]),
            "it sits down again when it waits again"
        );
        network.stop();
    }

    #[test]
    fn a_seated_thread_that_computes_gets_its_cpus_back_and_so_does_the_network_thread() {
        use crate::sys::thread_cpus;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let ready = Arc::new(ReadyPorts::default());
        let port = Arc::new(GuestPort::new([2, 0, 0, 0, 0, 1], wake).unwrap());
        let network = StandIn::plug(&port, &ready);
        let network_tid = network.tid;
        let network_cpus = thread_cpus(network_tid).unwrap();
        assert!(ready.seat_check_due().is_none(), "nothing to check yet");
        let stop = Arc::new(AtomicBool::new(false));
        let spinner = {
            let (port, stop) = (Arc::clone(&port), Arc::clone(&stop));
            std::thread::spawn(move || {
                let before = thread_cpus(0).unwrap();
                port.colocate();
                let seated = port.is_colocated();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
                (before, seated, thread_cpus(0).unwrap())
            })
        };
        // The checks, as the network thread makes them (any thread may).
        let give_up = Instant::now() + Duration::from_secs(20);
        while !port.is_colocated() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(5));
        }
        while port.is_colocated() && Instant::now() < give_up {
            std::thread::sleep(ready.seat_check_due().unwrap_or(SEAT_CHECK));
            ready.check_seats();
        }
        stop.store(true, Ordering::Relaxed);
        let (before, seated, after) = spinner.join().unwrap();
        assert!(seated, "the spinning thread sat next to the network thread");
        assert!(
            !crate::sys::thread_is_batch(network_tid),
            "the network thread preempts again with no seat taken"
        );
        assert!(!port.is_colocated(), "it lost its seat within 20 s");
        assert_eq!(after, before, "its CPUs are back");
        assert_eq!(
            thread_cpus(network_tid).unwrap(),
            network_cpus,
            "and the network thread's"
        );
        assert!(ready.seat_check_due().is_none(), "no seat to check");
        network.stop();
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
