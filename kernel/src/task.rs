//! The executor: runs the app's `async` tasks on the one vCPU and idles in
//! the host when nothing can run.
//!
//! One loop iteration polls every woken task; while tasks stay runnable it
//! polls them again, up to [`ROUNDS_PER_EXIT`] rounds, then makes exactly
//! one `HC_YIELD` hypercall: with timeout 0 if tasks are still runnable (the
//! exit also lets the shim flush queued TX frames and fill RX buffers), else
//! until the next timer deadline or I/O. A VM exit costs tens of µs on
//! nested hosts: a request whose reply takes a few task hand-offs (socket
//! -> app task -> stack runner) thus leaves with the exit that also waits
//! for the next one, instead of one exit per hand-off. [`yield_now`] still
//! gets its exit before the caller continues. On our shim a guest with a
//! network card first spins on its receive ring while the host serves it
//! ([`crate::netpoll`], bounded by `POLL_NS` of idleness): requests one at
//! a time then cost no exit at all. After the host returns, tasks
//! that wait for I/O ([`wake_on_io`]) are woken to look at their devices. On PVH
//! monitors the wait is a ring-0 `hlt` woken by the LAPIC timer or a device
//! interrupt (`kernel::platform::yield_for`); ring 3 never takes interrupts,
//! so nothing here needs interrupt masking.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::task::Wake;
use alloc::vec::Vec;
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicBool, Ordering};
use core::task::{Context, Poll, Waker};
use spin::Mutex;

use crate::netpoll;

type Task = Pin<Box<dyn Future<Output = ()>>>;
/// A task slot: `None` while its task is being polled or after it finished.
type Slot = Option<(Task, Arc<TaskWaker>)>;

struct TaskWaker {
    id: usize,
    queued: AtomicBool,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            READY.lock().push_back(self.id);
        }
    }
}

/// A lock for data that is not `Send` (tasks hold sockets and `Rc`s).
pub(crate) struct VcpuLocal<T>(pub(crate) Mutex<T>);

// SAFETY: the guest has exactly one vCPU and takes no interrupts, so the
// data is only ever touched from one thread of execution.
unsafe impl<T> Sync for VcpuLocal<T> {}

impl<T> core::ops::Deref for VcpuLocal<T> {
    type Target = Mutex<T>;
    fn deref(&self) -> &Mutex<T> {
        &self.0
    }
}

/// Tasks by id.
static TASKS: VcpuLocal<Vec<Slot>> = VcpuLocal(Mutex::new(Vec::new()));
/// Spawned tasks not yet in `TASKS` (spawning while `TASKS` is locked).
static SPAWNED: VcpuLocal<Vec<Task>> = VcpuLocal(Mutex::new(Vec::new()));
static READY: Mutex<VecDeque<usize>> = Mutex::new(VecDeque::new());
static IO_WAITERS: Mutex<Vec<Waker>> = Mutex::new(Vec::new());
/// Set by [`yield_now`]: the next round ends with an exit.
static EXIT_WANTED: AtomicBool = AtomicBool::new(false);

/// Executor rounds run back to back, without a VM exit, while tasks stay
/// runnable (bounded: a task that polls in a loop still lets the host move
/// I/O every this many rounds).
pub const ROUNDS_PER_EXIT: u32 = 8;

/// Runs `future` as a background task of the executor.
pub fn spawn(future: impl Future<Output = ()> + 'static) {
    SPAWNED.lock().push(Box::pin(future));
}

/// Wakes `waker` after the next return from the host (new I/O may be there).
pub fn wake_on_io(waker: &Waker) {
    let mut waiters = IO_WAITERS.lock();
    if !waiters.iter().any(|w| w.will_wake(waker)) {
        waiters.push(waker.clone());
    }
}

/// Lets every other runnable task run (and the host serve one `HC_YIELD`,
/// which delivers new I/O) before the caller continues.
pub async fn yield_now() {
    let mut yielded = false;
    core::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        EXIT_WANTED.store(true, Ordering::Relaxed);
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

fn admit_spawned() {
    let new: Vec<Task> = core::mem::take(&mut *SPAWNED.lock());
    if new.is_empty() {
        return;
    }
    let mut tasks = TASKS.lock();
    for task in new {
        let id = tasks.len();
        let waker = Arc::new(TaskWaker {
            id,
            queued: AtomicBool::new(false),
        });
        waker.wake_by_ref();
        tasks.push(Some((task, waker)));
    }
}

fn poll_task(id: usize) {
    let Some((mut task, waker)) = TASKS.lock().get_mut(id).and_then(Option::take) else {
        return;
    };
    // Clear the queued flag first: a wake during the poll queues it again.
    waker.queued.store(false, Ordering::Release);
    let cx_waker = Waker::from(waker.clone());
    if task
        .as_mut()
        .poll(&mut Context::from_waker(&cx_waker))
        .is_pending()
    {
        TASKS.lock()[id] = Some((task, waker));
    }
}

/// Runs `main` to completion, together with every spawned task.
pub fn block_on<T>(main: impl Future<Output = T>) -> T {
    let main_woken = Arc::new(MainWaker(AtomicBool::new(true)));
    let main_waker = Waker::from(main_woken.clone());
    let mut main = core::pin::pin!(main);
    let mut rounds = 0;
    // When the executor last found nothing to run (`None`: it is busy).
    let mut idle_since: Option<u64> = None;
    loop {
        crate::time::wake_expired_timers();
        if main_woken.0.swap(false, Ordering::AcqRel) {
            if let Poll::Ready(v) = main.as_mut().poll(&mut Context::from_waker(&main_waker)) {
                return v;
            }
        }
        admit_spawned();
        let ready: Vec<usize> = READY.lock().drain(..).collect();
        for id in ready {
            poll_task(id);
        }
        admit_spawned();
        let runnable = main_woken.0.load(Ordering::Acquire) || !READY.lock().is_empty();
        rounds += 1;
        if runnable && rounds < ROUNDS_PER_EXIT && !EXIT_WANTED.load(Ordering::Relaxed) {
            continue;
        }
        rounds = 0;
        EXIT_WANTED.store(false, Ordering::Relaxed);
        let timer = crate::time::next_timer_deadline();
        if runnable {
            idle_since = None;
        } else if netpoll::available(crate::time::now_ns()) {
            if netpoll::must_flush() {
                // Frames the host did not see leave first (without
                // sleeping in the host), then the guest polls.
                crate::platform::yield_for(0);
                netpoll::flushed();
                after_io();
                continue;
            }
            // Spin on the rings while the host serves them (bounded by
            // POLL_NS of idleness in a row; timers still fire).
            let since = *idle_since.get_or_insert_with(crate::time::now_ns);
            let poll_end = since.saturating_add(netpoll::POLL_NS);
            match netpoll::poll(timer.map_or(poll_end, |t| t.min(poll_end))) {
                netpoll::Polled::Frame => {
                    idle_since = None;
                    crate::migration::check();
                    after_io();
                    continue;
                }
                // A timer is due: run it, then poll on.
                netpoll::Polled::Expired if crate::time::now_ns() < poll_end => continue,
                netpoll::Polled::Expired | netpoll::Polled::InHost => {}
            }
        }
        let timeout = if runnable {
            0
        } else {
            idle_since = None;
            netpoll::stop();
            timer
                .map(|at| at.saturating_sub(crate::time::now_ns()))
                .unwrap_or(u64::MAX)
        };
        crate::platform::yield_for(timeout);
        netpoll::flushed();
        after_io();
    }
}

/// New I/O may be there: wakes the tasks that wait for it.
fn after_io() {
    for waker in core::mem::take(&mut *IO_WAITERS.lock()) {
        waker.wake();
    }
}

struct MainWaker(AtomicBool);

impl Wake for MainWaker {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}
