//! `cargo xtask bench ...`: benchmarks that print markdown tables for the README.
//!
//! - [`boot`]: boot time and memory, our shim vs QEMU microvm.
//! - [`net`]: redis-benchmark against the kv unikernel vs native redis-server, and bulk TCP.
//! - [`migrate`]: live migration of the kv app between two shim daemons, under load.

pub mod boot;
pub mod migrate;
pub mod net;
