//! `cargo xtask bench ...`: benchmarks that print markdown tables for the README.
//!
//! - [`boot`]: boot time and memory, our shim vs QEMU microvm.
//! - [`net`]: redis-benchmark against the kv unikernel vs native redis-server, and bulk TCP.
//! - [`checkpoint`]: app checkpoints of the kv unikernel: size, time, restore vs plain boot.
//! - [`migrate`]: live migration of the kv app between two shim daemons, under load.

pub mod boot;
pub mod checkpoint;
pub mod migrate;
pub mod net;
