//! `libcloud`: the one crate a unikernel app depends on.
//!
//! An app is an ordinary `#![no_std]` + `alloc` Rust binary:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use libcloud::prelude::*;
//!
//! #[libcloud::main]
//! fn main() {
//!     println!("hello from {}", libcloud::host().name);
//! }
//! ```
//!
//! `cargo xtask build-image <app>` links it with the kernel into a bootable
//! image. What the app sees: [`args`], [`env`], [`host`], [`time`],
//! [`exit`], the print macros and the `log` facade.
#![no_std]

extern crate alloc;

pub mod net;
pub mod state;
pub mod time;

/// Async tasks: `spawn` runs a future in the background of `main`.
pub mod task {
    pub use kernel::task::{block_on, spawn, yield_now};
}

pub use libcloud_macros::main;
pub use log;
/// serde, for checkpoint state types: `#[derive(Serialize, Deserialize)]` with
/// `#[serde(crate = "libcloud::serde")]`.
pub use serde;

/// What apps usually import: the print macros, `String`, `Vec`, `Box`,
/// `format!`, `vec!`, and `Duration`.
pub mod prelude {
    pub use crate::{eprintln, print, println};
    pub use alloc::borrow::ToOwned;
    pub use alloc::boxed::Box;
    pub use alloc::format;
    pub use alloc::string::{String, ToString};
    pub use alloc::vec;
    pub use alloc::vec::Vec;
    pub use core::time::Duration;
}

/// The app's arguments: the words after `--` on the shim's command line.
pub fn args() -> &'static [alloc::string::String] {
    &kernel::cmdline::get().args
}

/// The value of environment variable `key` (`--env KEY=VALUE` on the shim).
pub fn env(key: &str) -> Option<&'static str> {
    kernel::cmdline::get().env(key)
}

/// All environment variables, in the order given.
pub fn vars() -> impl Iterator<Item = (&'static str, &'static str)> {
    kernel::cmdline::get()
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
}

/// Where the app runs now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The host's name, as its shim was told (`--host-name`).
    pub name: alloc::string::String,
    /// The host's region (`--region`).
    pub region: alloc::string::String,
}

/// The host the app runs on now (it changes when the app is migrated).
pub fn host() -> Host {
    let (name, region) = kernel::migration::location();
    Host { name, region }
}

/// Runs `hook` every time the app has been moved to another host (live
/// migration or restore), before other work resumes. [`host`] already
/// names the new host then.
pub fn on_migrated(hook: fn()) {
    kernel::migration::on_migrated(hook);
}

/// How many times the app has moved since it booted.
pub fn migrations() -> u64 {
    kernel::migration::generation()
}

/// Stops the app with exit status `code` (0..=255; the shim exits with it).
pub fn exit(code: i32) -> ! {
    kernel::exit(code)
}

/// The CPU privilege level the app runs at: 3 on every platform.
pub fn current_ring() -> u8 {
    kernel::current_ring()
}

/// `(used, free)` bytes of the heap.
pub fn heap_usage() -> (usize, usize) {
    kernel::heap::usage()
}

/// What `main` may return: `()`, an `i32` exit status, or a `Result` whose
/// error is printed before exiting with status 1.
pub trait Termination {
    fn report(self) -> i32;
}

impl Termination for () {
    fn report(self) -> i32 {
        0
    }
}

impl Termination for core::convert::Infallible {
    fn report(self) -> i32 {
        match self {}
    }
}

impl Termination for i32 {
    fn report(self) -> i32 {
        self
    }
}

impl<T: Termination, E: core::fmt::Debug> Termination for Result<T, E> {
    fn report(self) -> i32 {
        match self {
            Ok(t) => t.report(),
            Err(e) => {
                eprintln!("Error: {e:?}");
                1
            }
        }
    }
}

#[doc(hidden)]
pub fn _print(args: core::fmt::Arguments) {
    kernel::console::print(args);
}

/// Prints to the console (the shim's stdout).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::_print(format_args!($($arg)*)) };
}

/// Prints a line to the console (the shim's stdout), in one hypercall.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::_print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Prints a line to the console. A unikernel has one console: this is
/// `println!` by another name, kept for code that separates the two.
#[macro_export]
macro_rules! eprintln {
    ($($arg:tt)*) => { $crate::println!($($arg)*) };
}
