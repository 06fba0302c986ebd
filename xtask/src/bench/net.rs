//! `cargo xtask bench net`: network throughput of unikernel apps behind our shim's user-mode
//! network, side by side with a native server in the same run.
//!
//! - `redis-benchmark -t set,get -n N -c C` against the `kv` image through a published port,
//!   and against a native `redis-server` on loopback; rounds alternate between the two so
//!   load drift hits both alike; medians of requests/s and the ratio.
//! - Bulk TCP host -> guest: bytes pushed through a published port into `netcheck sink`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::{self, Profile};
use crate::workspace::Workspace;

use super::{free_port, median, require, Guard};

/// Options of `bench net`.
#[derive(Debug)]
pub struct NetOptions {
    pub requests: u64,
    pub clients: u32,
    pub rounds: usize,
    pub bulk_mib: u64,
}

/// Waits until `redis-cli -p port PING` answers PONG.
fn wait_for_redis(port: u16, what: &str, child: &mut Guard) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = child.0.try_wait()? {
            bail!("{what} exited with {status} before answering");
        }
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "PING"])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not answer PING on port {port} within 30 s")
}

/// Runs redis-benchmark and returns requests/s for SET and GET.
fn redis_benchmark(port: u16, opts: &NetOptions) -> Result<(f64, f64)> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "set,get", "--csv"])
        .args([
            "-n",
            &opts.requests.to_string(),
            "-c",
            &opts.clients.to_string(),
        ])
        .output()
        .context("running redis-benchmark")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = |name: &str| -> Result<f64> {
        text.lines()
            .find(|l| l.starts_with(&format!("\"{name}\"")))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .with_context(|| format!("no {name} figure in redis-benchmark output:\n{text}"))
    };
    Ok((rps("SET")?, rps("GET")?))
}

fn spawn_shim(shim: &Path, image: &Path, publish: &str, args: &[&str]) -> Result<Guard> {
    let child = Command::new(shim)
        .args(["run".as_ref(), image.as_os_str()])
        .args(["--publish", publish, "--"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting host-shim")?;
    Ok(Guard(child))
}

/// Pushes `mib` MiB through a published port into `netcheck sink`; returns MB/s as the
/// guest counted it (bytes it received over its receive time) and as the host saw it.
fn bulk(shim: &Path, image: &Path, mib: u64) -> Result<(f64, f64)> {
    let port = free_port()?;
    let mut guest = spawn_shim(
        shim,
        image,
        &format!("127.0.0.1:{port}:9000"),
        &["sink", "9000"],
    )?;
    let stdout = guest.0.stdout.take().context("shim stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) if line.contains("listening") => {}
        other => bail!("netcheck sink did not start: {other:?}"),
    }
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    let chunk = vec![0x5au8; 256 * 1024];
    let total = mib << 20;
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        stream.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let host_secs = start.elapsed().as_secs_f64();
    if reply.trim().parse::<u64>().ok() != Some(total) {
        bail!(
            "the guest counted {:?} bytes, {total} were sent",
            reply.trim()
        );
    }
    let guest_line = lines.next().transpose()?.unwrap_or_default();
    let guest_mbps = guest_line
        .split('(')
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    Ok((total as f64 / host_secs / 1e6, guest_mbps))
}

/// Runs the benchmark and prints a markdown report.
pub fn run(ws: &Workspace, opts: &NetOptions) -> Result<()> {
    require("redis-benchmark", "redis-tools")?;
    require("redis-server", "redis-server")?;
    let images = image::build_images(ws, &[ws.app("kv")?, ws.app("netcheck")?], Profile::Release)?;
    let shim = image::build_shim(ws)?;
    let (kv, netcheck) = (&images[0], &images[1]);

    let kv_port = free_port()?;
    let mut unikernel = spawn_shim(&shim, &kv.path, &format!("127.0.0.1:{kv_port}:6379"), &[])?;
    wait_for_redis(kv_port, "the kv unikernel", &mut unikernel)?;
    let native_port = free_port()?;
    let mut native = Guard(
        Command::new("redis-server")
            .args([
                "--port",
                &native_port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?,
    );
    wait_for_redis(native_port, "redis-server", &mut native)?;

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 1..=opts.rounds {
        eprintln!("bench net: redis-benchmark round {round}/{}", opts.rounds);
        ours.push(redis_benchmark(kv_port, opts)?);
        theirs.push(redis_benchmark(native_port, opts)?);
    }
    drop(unikernel);
    drop(native);
    eprintln!("bench net: bulk TCP, {} MiB", opts.bulk_mib);
    let (bulk_host, bulk_guest) = bulk(&shim, &netcheck.path, opts.bulk_mib)?;

    let set = |v: &[(f64, f64)]| median(v.iter().map(|r| r.0).collect());
    let get = |v: &[(f64, f64)]| median(v.iter().map(|r| r.1).collect());
    println!(
        "### Network: redis-benchmark -t set,get -n {} -c {}, median of {} rounds\n",
        opts.requests, opts.clients, opts.rounds
    );
    println!("| server | SET req/s | GET req/s |");
    println!("|---|---:|---:|");
    println!(
        "| kv unikernel (host-shim, published port) | {:.0} | {:.0} |",
        set(&ours),
        get(&ours)
    );
    println!(
        "| native redis-server (loopback) | {:.0} | {:.0} |",
        set(&theirs),
        get(&theirs)
    );
    println!(
        "| ratio kv / native | {:.2}× | {:.2}× |\n",
        set(&ours) / set(&theirs),
        get(&ours) / get(&theirs)
    );
    println!(
        "- kv image: {} (target ≤ 1 MiB)\n- bulk TCP host → guest through a published port, \
         {} MiB: {bulk_host:.0} MB/s end to end (the guest counted {bulk_guest:.0} MB/s)",
        image::kib(kv.size),
        opts.bulk_mib
    );
    Ok(())
}
