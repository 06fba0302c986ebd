//! The guest kernel, linked into every image by `cargo xtask build-image`.
//!
//! It boots (directly in ring 3 on our shim, through the ring-0 PVH entry
//! elsewhere), sets up the heap, clock, console and command line, and calls
//! the app's `#[libcloud::main]`. Apps never use this crate directly: they
//! use `libcloud`, which re-exports what they need.
//!
//! Everything here runs in ring 3 except the trap stubs and the PVH set-up
//! in [`arch`]: under nested KVM without hardware
//! virtualisation, guest ring 0 runs thousands of times slower than ring 3.
#![no_std]

extern crate alloc;

pub mod arch;
pub mod checkpoint;
pub mod cmdline;
pub mod console;
pub mod heap;
pub mod migration;
pub mod netpoll;
/// std brings its own panic handler to Hermit-ABI images (`hermit-abi-impl`).
#[cfg(not(target_os = "hermit"))]
mod panic;
pub mod platform;
mod start;
pub mod task;
pub mod time;
pub mod virtio;

pub use arch::x86_64::cpu::current_ring;
pub use platform::exit;
