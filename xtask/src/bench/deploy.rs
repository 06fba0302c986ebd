//! Deploy-to-first-reply time of the kv app on a fleet host, for `bench fleet`.
//!
//! Each run times `host-shim deploy kv.img --on HOST --name kv-N --publish PORT:6379` (the
//! user's fleet CLI, with its fleet file) from the spawn of the command until kv answers a
//! Redis `PING` through the published port (PINGs start when the command returns, as a
//! user's would), then stops the app. Two cases: the image is new to the host (deleted from
//! its store first, so the command uploads it) or already there (the command only asks for
//! it by hash).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::migrate::Daemon;
use super::{free_port, median};
use crate::resp::ping;

/// The user's fleet CLI: the shim binary and the fleet file.
pub(crate) struct FleetCli<'a> {
    pub shim: &'a Path,
    pub file: &'a Path,
}

impl FleetCli<'_> {
    /// `host-shim ARGS`, which must succeed; its stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.shim)
            .args(args)
            .env("HOST_SHIM_FLEET", self.file)
            .env_remove("HOST_SHIM")
            .env("RUST_LOG", "warn")
            .output()
            .with_context(|| format!("running host-shim {}", args[0]))?;
        if !out.status.success() {
            bail!(
                "host-shim {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Deploy times on one host, ms: (command returned, first reply) per case.
#[derive(Default)]
pub(crate) struct DeployTimes {
    new: (Vec<f64>, Vec<f64>),
    dedup: (Vec<f64>, Vec<f64>),
}

impl DeployTimes {
    /// One timed deploy of `kv` to fleet host `host` (whose image store is
    /// `images`), as `name`; `upload`: the image is removed from the store first.
    pub(crate) fn measure(
        &mut self,
        fleet: &FleetCli,
        (host, daemon, images): (&str, &Daemon, &Path),
        kv: &str,
        name: &str,
        upload: bool,
    ) -> Result<()> {
        if upload && images.exists() {
            for f in std::fs::read_dir(images)? {
                std::fs::remove_file(f?.path())?;
            }
        }
        let port = free_port()?;
        let publish = format!("127.0.0.1:{port}:6379");
        let start = Instant::now();
        fleet
            .ok(&[
                "deploy",
                kv,
                "--on",
                host,
                "--name",
                name,
                "--publish",
                &publish,
            ])
            .with_context(|| format!("--- {host}'s log:\n{}", daemon.output()))?;
        let done = start.elapsed();
        let deadline = start + Duration::from_secs(20);
        let replied = loop {
            if ping(port) {
                break start.elapsed();
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} never answered PING on port {port}:\n{}",
                    daemon.output()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        fleet.ok(&["stop", name])?;
        let into = if upload {
            &mut self.new
        } else {
            &mut self.dedup
        };
        into.0.push(done.as_secs_f64() * 1e3);
        into.1.push(replied.as_secs_f64() * 1e3);
        Ok(())
    }

    /// Markdown rows (image new, already there) labelled with `host`.
    pub(crate) fn rows(&self, host: &str) -> String {
        format!(
            "| {host} | new (uploaded, SHA-256 checked) | {} | {} |\n\
             | {host} | already there (no upload) | {} | {} |",
            cell(&self.new.0),
            cell(&self.new.1),
            cell(&self.dedup.0),
            cell(&self.dedup.1)
        )
    }

    /// Median first reply with a new image.
    pub(crate) fn first_reply_new(&self) -> f64 {
        median(self.new.1.clone())
    }
}

fn cell(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{:.1} ({min:.1}–{max:.1})", median(v.to_vec()))
}
