//! `cargo xtask bench ...`: benchmarks that print markdown tables for the README.
//!
//! - [`boot`]: boot time and memory, our shim vs QEMU microvm.
//! - [`net`]: redis-benchmark against the kv unikernel vs native redis-server, and bulk TCP.
//! - [`density`]: many idle kv instances in one daemon vs QEMU microvm guests.
//! - [`checkpoint`]: app checkpoints of the kv unikernel: size, time, restore vs plain boot.
//! - [`control_plane`]: the fleet's control plane at scale on etcd and on the file store.
//! - [`migrate`]: live migration of the kv app between two shim daemons, under load.
//! - [`fleet`]: the fleet's costs: migration downtime with TLS vs the plain stream, and
//!   deploy-to-first-reply time on a secure and a plain host ([`deploy`]).
//! - [`std_app`] (`std.rs`): an ordinary std app (std-echo) as an image vs as a native process.
//! - [`limits`]: what hostile API callers can make a daemon hold, and how fast it refuses them.

pub mod boot;
pub mod checkpoint;
pub mod control_plane;
pub mod density;
pub mod deploy;
pub mod fleet;
pub mod limits;
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

/// A 95 % bootstrap confidence interval for the ratio of the medians of `num` and `den`
/// (independent samples): both are resampled with replacement `rounds` times with a fixed
/// seed, so the same samples give the same interval.
pub(crate) fn ratio_ci(num: &[f64], den: &[f64], rounds: usize) -> (f64, f64) {
    // xorshift64*: plenty for resampling indices, and reproducible.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |n: usize| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    };
    let mut resample = |v: &[f64]| median((0..v.len()).map(|_| v[next(v.len())]).collect());
    let mut ratios: Vec<f64> = (0..rounds).map(|_| resample(num) / resample(den)).collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| ratios[((rounds - 1) as f64 * q).round() as usize];
    (at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bootstrap_intervals_bracket_the_ratio_and_narrow_with_samples() {
        let den: Vec<f64> = (0..10).map(|i| 1.0 + (i % 5) as f64 * 0.1).collect();
        let num: Vec<f64> = den.iter().map(|d| d * 1.5).collect();
        let (lo, hi) = super::ratio_ci(&num, &den, 2000);
        assert!(lo <= 1.5 && 1.5 <= hi, "{lo}..{hi}");
        let den100: Vec<f64> = (0..100).map(|i| 1.0 + (i % 5) as f64 * 0.1).collect();
        let num100: Vec<f64> = den100.iter().map(|d| d * 1.5).collect();
        let (lo100, hi100) = super::ratio_ci(&num100, &den100, 2000);
        assert!(hi100 - lo100 < hi - lo, "{lo100}..{hi100} vs {lo}..{hi}");
    }

    #[test]
    fn medians_are_true_medians() {
        assert_eq!(super::median(vec![10.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![10.0, 1.0, 4.0, 2.0]), 3.0);
        assert!(super::median(vec![]).is_nan());
    }
}
