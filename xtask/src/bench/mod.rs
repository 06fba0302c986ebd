//! `cargo xtask bench ...`: benchmarks that print markdown tables for the README.
//!
//! - [`boot`]: boot time and memory, our shim vs QEMU microvm.
//! - [`net`]: redis-benchmark against the kv unikernel vs native redis-server, and bulk TCP.
//! - [`density`]: many idle kv instances in one daemon vs QEMU microvm guests.
//! - [`checkpoint`]: app checkpoints of the kv unikernel: size, time, restore vs plain boot.
//! - [`migrate`]: live migration of the kv app between two shim daemons, under load.
//! - [`fleet`]: the fleet's costs: migration downtime with TLS vs the plain stream, and
//!   deploy-to-first-reply time on a secure and a plain host ([`deploy`]).
//! - [`std_app`] (`std.rs`): an ordinary std app (std-echo) as an image vs as a native process.

pub mod boot;
pub mod checkpoint;
pub mod density;
pub mod deploy;
pub mod fleet;
pub mod migrate;
pub mod net;
#[path = "std.rs"]
pub mod std_app;

use std::net::TcpListener;
use std::process::{Child, Command};

use anyhow::{bail, Result};

/// A child process killed when dropped.
pub(crate) struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on 127.0.0.1 (free when this returns).
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Fails with the install hint unless `tool` runs.
pub(crate) fn require(tool: &str, package: &str) -> Result<()> {
    if Command::new(tool).arg("--version").output().is_err() {
        bail!("{tool} is required: apt-get install {package}");
    }
    Ok(())
}

/// The median of `v` (the mean of the two middle values for an even count); NaN when empty.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn medians_are_true_medians() {
        assert_eq!(super::median(vec![10.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![10.0, 1.0, 4.0, 2.0]), 3.0);
        assert!(super::median(vec![]).is_nan());
    }
}
