//! The Hermit ABI on our kernel: ordinary Rust `std` programs, built for the
//! `x86_64-unknown-hermit` target, run unmodified in our images.
//!
//! Rust's std for that target calls a small C ABI (the `sys_*` functions
//! that the `hermit-abi` crate declares; the toolchain's std pins 0.5.2).
//! This crate defines them on top of the kernel (memory, time, console,
//! exit), a ring-3 thread scheduler ([`sched`], preempted by the monitor
//! through `preempt`) and the kernel's embassy-net/smoltcp stack
//! ([`net`]: TCP and UDP).
//!
//! # Link strategy
//!
//! Everything in the image is compiled for `x86_64-unknown-hermit`: std
//! with `-Zbuild-std`, and the kernel, `net` and this crate as ordinary
//! `no_std` dependencies of the app (they compile for any x86-64 target).
//! So the whole image is hard-float (SSE) with one calling convention; the
//! shim enables SSE (CR4.OSFXSR/OSXMMEXCPT) and `wrfsbase` (CR4.FSGSBASE)
//! for every guest. The image is linked with the kernel's linker script
//! (static, non-PIE, `.tdata`/`.tbss` in a `PT_TLS` segment), exactly like
//! a libcloud app, so the shim, migration, snapshots and QEMU see the same
//! kind of image. An app opts in with
//! `[target.'cfg(target_os = "hermit")'.dependencies] hermit-abi-impl`
//! and one `use hermit_abi_impl as _;`; the same source builds natively.
//!
//! Boot: the kernel calls `__libcloud_main` (defined here instead of by
//! `#[libcloud::main]`), which starts std's `runtime_entry(argc, argv,
//! env)` on a green thread and runs the scheduler; std ends in `sys_exit`.
//! std's own panic handler prints `file:line` to stderr and calls
//! `sys_abort`, which stops the guest with the libcloud panic status (101).
//!
//! Every function of the `hermit-abi` 0.5.2 surface has a definition: the
//! few this kernel does not provide (semaphores, task queues, `mmap`, ...;
//! std does not call them) stop the app with a message naming the function
//! and the fault status (102). A symbol outside that surface is undefined at
//! link time, named by the linker. Calls that exist but
//! are not supported (files) return a clear errno and log it.
#![no_std]

extern crate alloc;

mod event;
mod fd;
mod mem;
mod misc;
mod net;
mod preempt;
pub mod sched;
mod time;

use alloc::ffi::CString;
use alloc::vec::Vec;
use core::ffi::c_char;

extern "C" {
    /// std's entry for the Hermit target (`library/std/src/sys/pal/hermit`):
    /// initialises args and env, runs `main`, ends in `sys_exit`.
    fn runtime_entry(argc: i32, argv: *const *const c_char, env: *const *const c_char) -> !;
}

/// Stack of std's main thread.
const MAIN_STACK_SIZE: usize = 2 << 20;

/// The kernel's entry into the app (the symbol `#[libcloud::main]` defines
/// for libcloud apps): runs std's main thread under the scheduler.
#[no_mangle]
pub fn __libcloud_main() -> i32 {
    sched::run(main_thread, MAIN_STACK_SIZE)
}

/// NUL-terminated copies, leaked: std keeps `argv` and `env` for the whole run.
fn c_strings(strings: impl Iterator<Item = alloc::string::String>) -> *const *const c_char {
    let mut ptrs: Vec<*const c_char> = strings
        .map(|s| {
            CString::new(s.replace('\0', ""))
                .unwrap_or_default()
                .into_raw()
                .cast_const()
        })
        .collect();
    ptrs.push(core::ptr::null());
    ptrs.leak().as_ptr()
}

extern "C" fn main_thread(_: usize) {
    let (argc, argv, env) = {
        let _kernel = preempt::kernel_section();
        let cmdline = kernel::cmdline::get();
        let args = core::iter::once("app".into()).chain(cmdline.args.iter().cloned());
        let argc = 1 + cmdline.args.len() as i32;
        let env = cmdline.env.iter().map(|(k, v)| alloc::format!("{k}={v}"));
        (argc, c_strings(args), c_strings(env))
    };
    // SAFETY: `argv` has `argc` valid C strings and a NULL, `env` is a
    // NULL-terminated array of `KEY=VALUE` strings, both live forever.
    unsafe { runtime_entry(argc, argv, env) }
}

/// Data that is not `Send` (sockets hold the stack's `RefCell`) in a
/// static: the guest has one vCPU, no interrupts and cooperative threads,
/// so it is only ever touched from one flow of execution at a time.
struct VcpuLocal<T>(T);

// SAFETY: see the type's comment: there is no concurrent access.
unsafe impl<T> Sync for VcpuLocal<T> {}
// SAFETY: as above.
unsafe impl<T> Send for VcpuLocal<T> {}

impl<T> core::ops::Deref for VcpuLocal<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
