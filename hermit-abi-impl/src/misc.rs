//! Threads, futexes, process exit, entropy and the small queries std makes.

use hermit_abi::{errno, timespec, Tid, FUTEX_RELATIVE_TIMEOUT};

use crate::sched;

#[no_mangle]
pub extern "C" fn sys_spawn2(
    func: extern "C" fn(usize),
    arg: usize,
    _prio: u8,
    stack_size: usize,
    _core_id: isize,
) -> Tid {
    let _kernel = crate::preempt::kernel_section();
    sched::spawn(func, arg, stack_size).unwrap_or(0)
}

/// # Safety
/// `id` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn sys_spawn(
    id: *mut Tid,
    func: extern "C" fn(usize),
    arg: usize,
    prio: u8,
    core_id: isize,
) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    match sys_spawn2(func, arg, prio, 0, core_id) {
        0 => -errno::EAGAIN,
        tid => {
            if !id.is_null() {
                // SAFETY: checked non-null; the caller's guarantee.
                unsafe { id.write(tid) };
            }
            0
        }
    }
}

#[no_mangle]
pub extern "C" fn sys_join(id: Tid) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    sched::join(id)
}

#[no_mangle]
pub extern "C" fn sys_yield() {
    let _kernel = crate::preempt::kernel_section();
    sched::yield_now();
}

/// # Safety
/// `address` points to a live `u32`; `timeout` is null or a `timespec`.
#[no_mangle]
pub unsafe extern "C" fn sys_futex_wait(
    address: *mut u32,
    expected: u32,
    timeout: *const timespec,
    flags: u32,
) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    if address.is_null() {
        return -errno::EINVAL;
    }
    // SAFETY: the caller's guarantee.
    let timeout = unsafe { timeout.as_ref() }.map(sched::timespec_ns);
    if timeout.is_some() && flags & FUTEX_RELATIVE_TIMEOUT == 0 {
        return -errno::EINVAL; // absolute timeouts: std never asks for them
    }
    // SAFETY: the caller passes the address of a live, aligned `u32`
    // (std: an `AtomicU32`).
    let atomic = unsafe { core::sync::atomic::AtomicU32::from_ptr(address) };
    sched::futex_wait(atomic, expected, timeout)
}

#[no_mangle]
pub extern "C" fn sys_futex_wake(address: *mut u32, count: i32) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    if address.is_null() {
        return -errno::EINVAL;
    }
    let woken = sched::futex_wake(address as usize, count);
    sched::preempt_point();
    woken
}

#[no_mangle]
pub extern "C" fn sys_exit(status: i32) -> ! {
    let _kernel = crate::preempt::kernel_section();
    kernel::exit(status)
}

/// std calls this after its panic hook printed the message and location.
#[no_mangle]
pub extern "C" fn sys_abort() -> ! {
    let _kernel = crate::preempt::kernel_section();
    kernel::console::write(b"app aborted (std panic or abort); stopping with the panic status\n");
    kernel::exit(abi::exit::EXIT_PANIC as i32)
}

#[no_mangle]
pub extern "C" fn sys_getpid() -> i32 {
    let _kernel = crate::preempt::kernel_section();
    1
}

#[no_mangle]
pub extern "C" fn sys_available_parallelism() -> usize {
    let _kernel = crate::preempt::kernel_section();
    1
}

#[no_mangle]
pub extern "C" fn sys_getpagesize() -> i32 {
    let _kernel = crate::preempt::kernel_section();
    4096
}

#[no_mangle]
pub extern "C" fn sys_get_priority() -> u8 {
    let _kernel = crate::preempt::kernel_section();
    hermit_abi::NORMAL_PRIO.into()
}

#[no_mangle]
pub extern "C" fn sys_set_priority(_tid: Tid, _prio: u8) {}

/// The errno of the last failed call (std reads it after `poll` fails).
#[no_mangle]
pub extern "C" fn sys_get_errno() -> i32 {
    let _kernel = crate::preempt::kernel_section();
    crate::fd::last_errno()
}

#[no_mangle]
pub extern "C" fn sys_errno() -> i32 {
    let _kernel = crate::preempt::kernel_section();
    crate::fd::last_errno()
}

/// Random bytes from RDRAND (`flags` are ignored: it never blocks).
///
/// # Safety
/// `buf` is writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sys_read_entropy(buf: *mut u8, len: usize, _flags: u32) -> isize {
    let _kernel = crate::preempt::kernel_section();
    if buf.is_null() {
        return -errno::EINVAL as isize;
    }
    // SAFETY: the caller's guarantee.
    let out = unsafe { core::slice::from_raw_parts_mut(buf, len) };
    for chunk in out.chunks_mut(8) {
        let mut word = 0u64;
        // SAFETY: RDRAND is part of the hermit target's baseline features.
        let ok = (0..10).any(|_| unsafe { core::arch::x86_64::_rdrand64_step(&mut word) } == 1);
        if !ok {
            return -errno::EIO as isize;
        }
        chunk.copy_from_slice(&word.to_ne_bytes()[..chunk.len()]);
    }
    len.min(isize::MAX as usize) as isize
}

/// Stops the app: it called an ABI function this kernel does not provide.
fn unprovided(name: &str) -> ! {
    log::error!("{name}: not provided by this kernel");
    kernel::console::write(
        alloc::format!(
            "app called {name}, a Hermit ABI function this kernel does not provide; stopping\n"
        )
        .as_bytes(),
    );
    kernel::exit(abi::exit::EXIT_FAULT as i32)
}

/// The rest of the `hermit-abi` 0.5.2 surface (the toolchain's std does
/// not call these; other crates might): each stops the app with a message
/// naming it and the fault status, instead of running on with a made-up
/// result. Their arguments are ignored, so one signature serves all.
macro_rules! unprovided {
    ($($name:ident)*) => {$(
        #[no_mangle]
        pub extern "C" fn $name() -> ! {
            unprovided(stringify!($name))
        }
    )*};
}

unprovided!(
    sys_add_queue sys_block_current_task sys_block_current_task_with_timeout
    sys_destroy_queue sys_get_processor_count sys_getaddrbyname sys_init_queue
    sys_mmap sys_mprotect sys_munmap sys_network_init sys_notify sys_opendir
    sys_sem_destroy sys_sem_init sys_sem_post sys_sem_timedwait sys_sem_trywait
    sys_shutdown_socket sys_wait sys_wakeup_taskt
);
