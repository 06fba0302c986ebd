//! kv's logic, independent of where it runs: the RESP2 protocol ([`resp`]:
//! request framing, reply encoding and decoding), the keyspace
//! ([`store`], with [`glob`] patterns for `KEYS`), command execution against
//! it ([`commands`]) and the checkpoint format ([`checkpoint`]).
//!
//! `no_std` + `alloc` and free of I/O: the kv guest app (`apps/kv`) moves
//! bytes between sockets and these, and supplies the clock and memory
//! figures through [`Platform`]; `cargo test` runs the same code on the host
//! with a clock the tests move, and the fuzz targets drive it with
//! arbitrary bytes. Everything here handles untrusted input: sizes are
//! bounded and bad input is an error, never a panic.
#![no_std]

extern crate alloc;

pub mod checkpoint;
pub mod commands;
pub mod glob;
pub mod resp;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod time;

pub use commands::{execute, Flow, Server};
pub use time::{Instant, Platform};
