//! `cargo xtask bench deploy`: deploy-to-first-reply time of the kv app on a remote shim.
//!
//! One `host-shim serve --state-dir` (the "remote" host, reached over its HTTP API on
//! loopback) in a fleet file of its own. Each run times `host-shim deploy kv.img --on
//! remote --name kv-N --publish PORT:6379` from the spawn of the command until kv answers
//! a Redis `PING` through the published port (PINGs start when the command returns, as a
//! user's would), then stops the app. Two cases alternate: the image is new to the shim
//! (deleted from its store first, so the command uploads it) or already there (the
//! command only asks for it by hash). Prints a markdown table of medians with min–max.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::{self, Profile};
use crate::workspace::Workspace;

use super::migrate::{Daemon, TempDir};
use super::{free_port, median};

/// Options of `bench deploy`.
#[derive(Debug)]
pub struct DeployOptions {
    pub runs: usize,
}

/// One timed deploy: (command done, first reply), in ms from the spawn.
fn deploy_once(
    shim: &Path,
    fleet: &Path,
    kv: &str,
    name: &str,
    daemon: &Daemon,
) -> Result<(f64, f64)> {
    let port = free_port()?;
    let start = Instant::now();
    let out = Command::new(shim)
        .args(["deploy", kv, "--on", "remote", "--name", name])
        .args(["--publish", &format!("127.0.0.1:{port}:6379")])
        .env("HOST_SHIM_FLEET", fleet)
        .env("RUST_LOG", "warn")
        .output()
        .context("running host-shim deploy")?;
    let done = start.elapsed();
    if !out.status.success() {
        bail!(
            "host-shim deploy failed ({}): {}\n--- shim log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            daemon.output()
        );
    }
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
    let stop = Command::new(shim)
        .args(["stop", name])
        .env("HOST_SHIM_FLEET", fleet)
        .output()?;
    if !stop.status.success() {
        bail!(
            "host-shim stop {name}: {}",
            String::from_utf8_lossy(&stop.stderr)
        );
    }
    Ok((done.as_secs_f64() * 1e3, replied.as_secs_f64() * 1e3))
}

/// Whether kv on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    s.write_all(b"*1\r\n$4\r\nPING\r\n").is_ok()
        && s.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

fn cell(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{:.1} ms ({min:.1}–{max:.1})", median(v.to_vec()))
}

pub fn run(ws: &Workspace, opts: &DeployOptions) -> Result<()> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let images = image::build_images(ws, &[ws.app("kv")?], Profile::Release)?;
    let shim = image::build_shim(ws)?;
    let kv = images[0].path.to_string_lossy().into_owned();
    let size = std::fs::metadata(&images[0].path)?.len();

    let dir =
        TempDir(std::env::temp_dir().join(format!("xtask-bench-deploy-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    let state = dir.0.join("state");
    let state_arg = state.display().to_string();
    let daemon = Daemon::start_with(&shim, "remote", 1, &dir.0, &["--state-dir", &state_arg])?;
    let fleet = dir.0.join("fleet.json");
    let added = Command::new(&shim)
        .args([
            "fleet",
            "add",
            "remote",
            &format!("http://{}", daemon.addr()),
        ])
        .env("HOST_SHIM_FLEET", &fleet)
        .output()?;
    if !added.status.success() {
        bail!("fleet add: {}", String::from_utf8_lossy(&added.stderr));
    }

    let (mut cold, mut warm) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for i in 0..opts.runs {
        for upload in [true, false] {
            if upload {
                for f in std::fs::read_dir(state.join("images"))? {
                    std::fs::remove_file(f?.path())?;
                }
            }
            let name = format!("kv-{i}-{}", if upload { "new" } else { "dedup" });
            let (done, reply) = deploy_once(&shim, &fleet, &kv, &name, &daemon)?;
            let into = if upload { &mut cold } else { &mut warm };
            into.0.push(done);
            into.1.push(reply);
        }
        eprintln!("bench deploy: run {}/{}", i + 1, opts.runs);
    }

    println!(
        "\n**Deploy** (`cargo xtask bench deploy --runs {}`: `host-shim deploy kv.img` to a shim \
         over its API on loopback, {} KiB image, medians with min–max)\n",
        opts.runs,
        size / 1024
    );
    println!("| image on the shim | deploy command returns | first PING reply |");
    println!("|---|---:|---:|");
    println!(
        "| new (uploaded, SHA-256 checked) | {} | {} |",
        cell(&cold.0),
        cell(&cold.1)
    );
    println!(
        "| already there (no upload) | {} | {} |",
        cell(&warm.0),
        cell(&warm.1)
    );
    Ok(())
}
