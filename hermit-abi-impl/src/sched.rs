//! Threads on the one vCPU: green threads with their own stacks and TLS
//! blocks, switched cooperatively in ring 3 at the ABI's blocking points
//! (futex waits, sleeps, joins, yields, socket waits).
//!
//! The scheduler is the main future of the kernel's executor
//! (`kernel::task::block_on`): each poll runs every runnable thread once,
//! then returns so the executor can run the network stack and, when no
//! thread can run, sleep in the host until the next deadline or I/O.
//! Threads that wait for I/O block on a future ([`block_on`]) whose waker
//! makes them runnable again.
//!
//! Thread-local storage follows the x86-64 ELF "variant II" layout of the
//! `PT_TLS` segment: the block sits below the thread pointer, whose first
//! word points to itself; the pointer is loaded with `wrfsbase` on every
//! switch (the shim sets CR4.FSGSBASE).
//!
//! Timeslices: a thread that has run for [`TIMESLICE_NS`] without blocking
//! yields at its next preemption point ([`preempt_point`]: reading the
//! clock, waking a futex, writing to the console), or, if it makes no ABI
//! call at all, when the monitor interrupts it ([`crate::preempt`]), so a
//! thread that computes cannot starve the others or the network.

use alloc::alloc::{alloc, dealloc, Layout};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::task::Wake;
use alloc::vec::Vec;
use core::future::Future;
use core::pin::{pin, Pin};
use core::sync::atomic::{AtomicU64, Ordering};
use core::task::{Context, Poll, Waker};
use hermit_abi::{errno, timespec, Tid};
use spin::Mutex;

use crate::preempt;

/// Threads that may exist at once (the main thread included).
pub const MAX_THREADS: usize = 64;
/// How long a thread runs before its next preemption point yields.
pub const TIMESLICE_NS: u64 = 10_000_000;
/// Smallest and largest stack a thread gets.
const MIN_STACK: usize = 64 << 10;
const MAX_STACK: usize = 16 << 20;

core::arch::global_asm!(
    r#"
    .section .text, "ax"
    /* hermit_switch(save: *mut u64, next_rsp: u64): saves the callee-saved
       registers on the current stack and its rsp to *save, then resumes
       the context saved at next_rsp. */
    .global hermit_switch
hermit_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret

    /* First code of a new thread: r12 = entry, r13 = argument. */
hermit_thread_start:
    movq %r12, %rdi
    movq %r13, %rsi
    call {thread_main}
    ud2
"#,
    thread_main = sym thread_main,
    options(att_syntax)
);

extern "C" {
    fn hermit_switch(save: *mut u64, next_rsp: u64);
    fn hermit_thread_start();
    static __tdata_start: u8;
    static __tdata_end: u8;
    static __tbss_end: u8;
    static __tls_align: u8;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Runnable,
    Running,
    Blocked,
    Exited,
}

/// Memory from the heap that is freed on drop.
struct Block {
    ptr: *mut u8,
    layout: Layout,
}

impl Block {
    fn new(size: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(size.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        (!ptr.is_null()).then_some(Self { ptr, layout })
    }

    fn end(&self) -> u64 {
        self.ptr as u64 + self.layout.size() as u64
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

struct Thread {
    tid: Tid,
    /// Saved stack pointer while switched out.
    rsp: AtomicU64,
    /// Thread pointer (FS base).
    fs: u64,
    state: State,
    /// Woken while running: the next `block` returns at once.
    notified: bool,
    /// When a timed block ends, in kernel ns.
    deadline: Option<u64>,
    timed_out: bool,
    joiner: Option<Tid>,
    /// The thread's stack and TLS block, freed with it.
    _stack: Block,
    _tls: Block,
}

struct Sched {
    /// Boxed so that a thread's `rsp` stays put while the vector grows.
    #[allow(clippy::vec_box)]
    threads: Vec<Box<Thread>>,
    runq: VecDeque<Tid>,
    /// The running thread; 0 while the scheduler itself runs.
    current: Tid,
    next_tid: Tid,
    /// Futex waiters: `(address, thread)`, in arrival order.
    futex: Vec<(usize, Tid)>,
    /// The executor's waker for the scheduler future.
    waker: Option<Waker>,
    /// When the running thread was switched in (kernel ns).
    slice_start: u64,
    /// A thread used up its timeslice in this round.
    preempted: bool,
}

impl Sched {
    fn get(&mut self, tid: Tid) -> Option<&mut Thread> {
        self.threads
            .iter_mut()
            .find(|t| t.tid == tid)
            .map(|t| &mut **t)
    }

    /// Makes `tid` runnable (or remembers the wake-up if it is running).
    fn wake(&mut self, tid: Tid) {
        let Some(t) = self.get(tid) else { return };
        match t.state {
            State::Blocked => {
                t.state = State::Runnable;
                t.deadline = None;
                self.runq.push_back(tid);
                if let Some(w) = &self.waker {
                    w.wake_by_ref();
                }
            }
            State::Running => t.notified = true,
            State::Runnable | State::Exited => {}
        }
    }
}

// SAFETY: one vCPU and no interrupts: the raw pointers inside are only used
// from the one thread of execution, under the lock or between switches.
unsafe impl Send for Sched {}

static SCHED: Mutex<Sched> = Mutex::new(Sched {
    threads: Vec::new(),
    runq: VecDeque::new(),
    current: 0,
    next_tid: 1,
    futex: Vec::new(),
    waker: None,
    slice_start: 0,
    preempted: false,
});
/// The scheduler's own saved stack pointer (the boot stack).
static SCHED_RSP: AtomicU64 = AtomicU64::new(0);

/// The `PT_TLS` segment: `(initial data, total size, alignment)`.
fn tls_image() -> (&'static [u8], usize, usize) {
    let start = core::ptr::addr_of!(__tdata_start) as usize;
    let data_end = core::ptr::addr_of!(__tdata_end) as usize;
    let end = core::ptr::addr_of!(__tbss_end) as usize;
    let align = (core::ptr::addr_of!(__tls_align) as usize).max(1);
    // SAFETY: `[start, data_end)` is the loaded `.tdata` section (link.ld).
    let data = unsafe { core::slice::from_raw_parts(start as *const u8, data_end - start) };
    (data, end.saturating_sub(start), align)
}

/// A TLS block for a new thread and its thread pointer.
fn new_tls() -> Option<(Block, u64)> {
    let (data, size, align) = tls_image();
    // The linker placed variables at `tp - align_up(size, p_align)`.
    let offset = size.next_multiple_of(align);
    let block = Block::new(offset + 16, align.max(16))?;
    let tp = block.ptr as u64 + offset as u64;
    // SAFETY: the block has `offset` bytes below `tp` and 16 above; the TLS
    // image goes at `tp - offset` (variant II), the rest is zeroed, and the
    // first word at `tp` points to itself.
    unsafe {
        let base = block.ptr;
        core::ptr::write_bytes(base, 0, offset);
        core::ptr::copy_nonoverlapping(data.as_ptr(), base, data.len());
        (tp as *mut u64).write(tp);
        (tp as *mut u64).add(1).write(0);
    }
    Some((block, tp))
}

/// Creates a thread that runs `entry(arg)`; `None` at the thread limit or
/// without memory.
pub fn spawn(entry: extern "C" fn(usize), arg: usize, stack_size: usize) -> Option<Tid> {
    let mut s = SCHED.lock();
    if s.threads.len() >= MAX_THREADS {
        log::error!("thread limit reached: {MAX_THREADS} threads exist, spawn refused");
        return None;
    }
    let stack = Block::new(stack_size.clamp(MIN_STACK, MAX_STACK), 16)?;
    let (tls, fs) = new_tls()?;
    let top = stack.end() & !15;
    let rsp = top - 72;
    // The frame `hermit_switch` pops: r15, r14, r13, r12, rbx, rbp, return
    // address; after the `ret` the stack is 16-byte aligned.
    let frame = [
        0,
        0,
        arg as u64,
        entry as usize as u64,
        0,
        0,
        hermit_thread_start as *const () as u64,
    ];
    // SAFETY: `[rsp, top)` lies inside the fresh stack block.
    unsafe { core::ptr::copy_nonoverlapping(frame.as_ptr(), rsp as *mut u64, frame.len()) };
    let tid = s.next_tid;
    s.next_tid += 1;
    s.threads.push(Box::new(Thread {
        tid,
        rsp: AtomicU64::new(rsp),
        fs,
        state: State::Runnable,
        notified: false,
        deadline: None,
        timed_out: false,
        joiner: None,
        _stack: stack,
        _tls: tls,
    }));
    s.runq.push_back(tid);
    if let Some(w) = &s.waker {
        w.wake_by_ref();
    }
    preempt::set_timer(s.threads.len() > 1);
    Some(tid)
}

extern "C" fn thread_main(entry: extern "C" fn(usize), arg: usize) -> ! {
    preempt::enter_app();
    entry(arg);
    let _kernel = preempt::kernel_section();
    exit_current()
}

/// Ends the running thread (its stack is freed by the scheduler).
fn exit_current() -> ! {
    let save = {
        let mut s = SCHED.lock();
        let tid = s.current;
        let joiner = s.get(tid).and_then(|t| {
            t.state = State::Exited;
            t.joiner.take()
        });
        if let Some(j) = joiner {
            s.wake(j);
        }
        s.futex.retain(|&(_, t)| t != tid);
        s.get(tid).map(|t| t.rsp.as_ptr())
    };
    if let Some(save) = save {
        // SAFETY: switches back to the scheduler, which frees this stack
        // and never resumes this context.
        unsafe { hermit_switch(save, SCHED_RSP.load(Ordering::Relaxed)) };
    }
    unreachable!("an exited thread was resumed")
}

/// The running thread's id (0 outside threads).
pub fn current() -> Tid {
    SCHED.lock().current
}

/// Blocks the running thread until it is woken or `deadline` (kernel ns)
/// passes. Returns whether the deadline passed.
pub fn block(deadline: Option<u64>) -> bool {
    let save = {
        let mut s = SCHED.lock();
        let tid = s.current;
        let Some(t) = s.get(tid) else { return false };
        if t.notified {
            t.notified = false;
            return false;
        }
        t.state = State::Blocked;
        t.deadline = deadline;
        t.timed_out = false;
        t.rsp.as_ptr()
    };
    // SAFETY: the scheduler resumes this context when the thread is woken.
    unsafe { hermit_switch(save, SCHED_RSP.load(Ordering::Relaxed)) };
    let mut s = SCHED.lock();
    let tid = s.current;
    s.get(tid).is_some_and(|t| {
        t.notified = false;
        core::mem::take(&mut t.timed_out)
    })
}

/// Lets every other runnable thread (and the network stack) run first.
pub fn yield_now() {
    let save = {
        let mut s = SCHED.lock();
        let tid = s.current;
        let Some(t) = s.get(tid) else { return };
        t.state = State::Runnable;
        let save = t.rsp.as_ptr();
        s.runq.push_back(tid);
        save
    };
    // SAFETY: the thread is queued; the scheduler resumes it.
    unsafe { hermit_switch(save, SCHED_RSP.load(Ordering::Relaxed)) };
}

/// Yields if the running thread has used up its timeslice.
pub fn preempt_point() {
    let expired = {
        let mut s = SCHED.lock();
        let expired =
            s.current != 0 && kernel::time::now_ns().saturating_sub(s.slice_start) >= TIMESLICE_NS;
        s.preempted |= expired;
        expired
    };
    if expired {
        yield_now();
    }
}

/// Sleeps until `deadline` (kernel ns).
pub fn sleep_until(deadline: u64) {
    while kernel::time::now_ns() < deadline {
        block(Some(deadline));
    }
}

/// Waits for thread `tid` to end.
pub fn join(tid: Tid) -> i32 {
    loop {
        {
            let mut s = SCHED.lock();
            let me = s.current;
            if tid == me {
                return -errno::EDEADLK;
            }
            match s.get(tid) {
                None => return 0, // ended (and reaped) already
                Some(t) if t.state == State::Exited => return 0,
                Some(t) => t.joiner = Some(me),
            }
        }
        block(None);
    }
}

/// `futex_wait`: blocks while `*addr == expected`, at most `timeout`.
pub fn futex_wait(
    addr: &core::sync::atomic::AtomicU32,
    expected: u32,
    timeout: Option<u64>,
) -> i32 {
    let key = addr.as_ptr() as usize;
    let deadline = timeout.map(|ns| kernel::time::now_ns().saturating_add(ns));
    {
        let mut s = SCHED.lock();
        if addr.load(Ordering::Acquire) != expected {
            return -errno::EAGAIN;
        }
        let me = s.current;
        s.futex.push((key, me));
    }
    let timed_out = block(deadline);
    let mut s = SCHED.lock();
    let me = s.current;
    let before = s.futex.len();
    s.futex.retain(|&(a, t)| !(a == key && t == me));
    if timed_out && s.futex.len() != before {
        -errno::ETIMEDOUT
    } else {
        0
    }
}

/// `futex_wake`: wakes up to `count` waiters on `addr`; returns how many.
pub fn futex_wake(addr: usize, count: i32) -> i32 {
    let mut s = SCHED.lock();
    let mut woken = 0;
    while woken < count.max(0) {
        let Some(i) = s.futex.iter().position(|&(a, _)| a == addr) else {
            break;
        };
        let (_, tid) = s.futex.remove(i);
        s.wake(tid);
        woken += 1;
    }
    woken
}

/// Wakes a thread blocked on a future.
struct ThreadWaker(Tid);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        SCHED.lock().wake(self.0);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        SCHED.lock().wake(self.0);
    }
}

/// A waker that makes the running thread runnable again.
pub fn thread_waker() -> Waker {
    Waker::from(Arc::new(ThreadWaker(current())))
}

/// How [`block_on`] waits.
#[derive(Clone, Copy, Debug)]
pub enum Wait {
    /// Poll once (non-blocking sockets).
    Once,
    /// Until the future is ready or the deadline (kernel ns) passes.
    Until(Option<u64>),
}

/// Runs `future` on the running thread, blocking it (and running others)
/// while the future is pending. `None` if it did not finish in time.
pub fn block_on<F: Future>(future: F, wait: Wait) -> Option<F::Output> {
    let waker = thread_waker();
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut Context::from_waker(&waker)) {
            return Some(v);
        }
        match wait {
            Wait::Once => return None,
            Wait::Until(deadline) => {
                if block(deadline) && deadline.is_some_and(|d| kernel::time::now_ns() >= d) {
                    return None;
                }
            }
        }
    }
}

/// Switches to thread `tid` and back; frees it if it ended.
fn run_thread(tid: Tid) {
    let next = {
        let mut s = SCHED.lock();
        s.current = tid;
        s.slice_start = kernel::time::now_ns();
        match s.get(tid) {
            Some(t) if t.state == State::Runnable => {
                t.state = State::Running;
                Some((t.rsp.load(Ordering::Relaxed), t.fs))
            }
            _ => None,
        }
    };
    if let Some((rsp, fs)) = next {
        // SAFETY: `fs` is the thread's TLS pointer (CR4.FSGSBASE is set by
        // the monitor); `rsp` is the thread's saved context, and the thread
        // switches back here whenever it blocks, yields or ends.
        unsafe {
            core::arch::asm!("wrfsbase {}", in(reg) fs, options(nostack, preserves_flags));
            hermit_switch(SCHED_RSP.as_ptr(), rsp);
        }
    }
    let mut s = SCHED.lock();
    s.current = 0;
    s.threads.retain(|t| t.state != State::Exited);
    preempt::set_timer(s.threads.len() > 1);
}

/// The executor's main future: runs threads, never finishes (std ends the
/// guest through `sys_exit`).
struct Scheduler;

impl Future for Scheduler {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        {
            let now = kernel::time::now_ns();
            let mut s = SCHED.lock();
            s.waker = Some(cx.waker().clone());
            let expired: Vec<Tid> = s
                .threads
                .iter()
                .filter(|t| t.state == State::Blocked && t.deadline.is_some_and(|d| d <= now))
                .map(|t| t.tid)
                .collect();
            for tid in expired {
                if let Some(t) = s.get(tid) {
                    t.timed_out = true;
                }
                s.wake(tid);
            }
        }
        let round = SCHED.lock().runq.len();
        for _ in 0..round {
            let Some(tid) = SCHED.lock().runq.pop_front() else {
                break;
            };
            run_thread(tid);
        }
        let mut s = SCHED.lock();
        if core::mem::take(&mut s.preempted) {
            // A thread computes: let the host move I/O now rather than
            // after the executor's usual number of rounds, so the others
            // see their packets within a timeslice or two.
            let _ = pin!(kernel::task::yield_now()).poll(cx);
        }
        if !s.runq.is_empty() {
            cx.waker().wake_by_ref();
        } else if let Some(deadline) = s
            .threads
            .iter()
            .filter(|t| t.state == State::Blocked)
            .filter_map(|t| t.deadline)
            .min()
        {
            kernel::time::wake_at(deadline, cx.waker());
        }
        Poll::Pending
    }
}

/// Starts `entry` as the first thread and runs the scheduler for good.
pub fn run(entry: extern "C" fn(usize), stack_size: usize) -> ! {
    // Thread-local storage needs `wrfsbase` (CPUID leaf 7, EBX bit 0).
    let max_leaf = kernel::arch::x86_64::cpu::cpuid(0).eax;
    if max_leaf < 7 || core::arch::x86_64::__cpuid_count(7, 0).ebx & 1 == 0 {
        kernel::console::write(
            b"std apps need a CPU with FSGSBASE (wrfsbase), which this one lacks\n",
        );
        kernel::exit(abi::exit::EXIT_FAULT as i32);
    }
    preempt::register();
    if spawn(entry, 0, stack_size).is_none() {
        log::error!("no memory for the main thread");
        kernel::exit(abi::exit::EXIT_FAILURE as i32);
    }
    kernel::task::block_on(Scheduler);
    unreachable!("the scheduler never finishes")
}

/// `timespec` -> ns (negative parts count as 0).
pub fn timespec_ns(t: &timespec) -> u64 {
    (t.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec.max(0) as u64)
}
