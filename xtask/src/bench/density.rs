//! `cargo xtask bench density [--instances N]`: many idle kv instances in
//! one `host-shim serve` daemon, and the same app as QEMU microvm guests.
//!
//! One release daemon (plain HTTP, no overlay). The instances are
//! launched one after another through `POST /v1/instances` (16 MiB each, each published
//! on its own host port), each launch followed by `PING`s on its port
//! until `PONG` (launch latency, launch → first `PONG`) and 10 `SET`s.
//! Then, after a settling pause, 10 s of idle: the daemon's CPU, the
//! whole host's CPU (`/proc/stat`: other users of the host count too) and
//! the guests' VM exits (`GET /v1/stats`); the daemon's `VmRSS` and the
//! host's `MemAvailable` against their values before the first launch;
//! instance 0's `PING` latency among the others, then alone once the
//! others stopped; then it stops too, and the daemon's threads, fds, listening sockets and RSS
//! against their start values. Last, as many kv guests under QEMU microvm
//! (`host-shim run --backend qemu`, TCG, QEMU's own user network with a
//! forwarded port) as asked (at least 20 by default): the memory per
//! instance of the QEMU processes, and launch → first `PONG`.
//!
//! Prints a markdown table for the README.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::{self, Profile};
use crate::resp::Conn as Kv;
use crate::workspace::Workspace;

use api::{Client, InstanceInfo, PublishSpec, RunRequest};

use super::migrate::{Daemon, TempDir};
use super::net::cpu_seconds;
use super::{free_port, median, Guard};

/// Options of `bench density`.
#[derive(Debug)]
pub struct DensityOptions {
    /// kv instances in the daemon.
    pub instances: usize,
    /// kv guests under QEMU microvm (0: none).
    pub qemu: usize,
    /// Guest memory of each, MiB.
    pub mem_mib: u64,
}

/// Keys each instance keeps.
const KEYS: usize = 10;
/// Requests for a latency figure.
const PINGS: usize = 1000;
/// The idle window.
const IDLE: Duration = Duration::from_secs(10);

/// What `/proc` says of a process.
#[derive(Clone, Copy, Debug, Default)]
struct Footprint {
    rss_kib: u64,
    threads: usize,
    fds: usize,
    listening: usize,
}

pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn mem_available_kib() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemAvailable in /proc/meminfo")
}

/// Socket inodes of `pid`'s fds.
fn socket_inodes(pid: u32) -> Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue; // closed meanwhile
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse().ok())
        {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

/// TCP sockets of `pid` in LISTEN state.
fn listening(pid: u32) -> Result<usize> {
    let mine = socket_inodes(pid)?;
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let listen = f.get(3) == Some(&"0A");
            let inode = f.get(9).and_then(|i| i.parse::<u64>().ok());
            if listen && inode.is_some_and(|i| mine.contains(&i)) {
                n += 1;
            }
        }
    }
    Ok(n)
}

fn footprint(pid: u32) -> Result<Footprint> {
    Ok(Footprint {
        rss_kib: proc_status_kib(pid, "VmRSS:")?,
        threads: std::fs::read_dir(format!("/proc/{pid}/task"))?.count(),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
        listening: listening(pid)?,
    })
}

/// The host's (busy, total) clock ticks of all CPUs.
fn host_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// kv, over a RESP connection.
impl Kv {
    /// Connects and `PING`s until `PONG` (the guest may be booting).
    fn when_up(port: u16, within: Duration) -> Result<Self> {
        let give_up = Instant::now() + within;
        loop {
            if let Ok(mut kv) = Self::connect(port) {
                if kv.cmd(&["PING"]).ok().as_deref() == Some("PONG") {
                    return Ok(kv);
                }
            }
            if Instant::now() > give_up {
                bail!("kv on port {port} did not answer PING within {within:?}");
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// The p50 of [`PINGS`] round trips, in µs.
    fn ping_p50_us(&mut self) -> Result<f64> {
        let mut t = Vec::with_capacity(PINGS);
        for _ in 0..PINGS {
            let start = Instant::now();
            let reply = self.cmd(&["PING"])?;
            t.push(start.elapsed().as_secs_f64() * 1e6);
            if reply != "PONG" {
                bail!("PING answered {reply:?}");
            }
        }
        Ok(median(t))
    }
}

/// The `q`-quantile of `v` (nearest rank).
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Our daemon's figures.
struct ShimFigures {
    instances: usize,
    launch_total_s: f64,
    launch_ms: Vec<f64>,
    first_pong_ms: Vec<f64>,
    last_first_pong_ms: f64,
    rss_per_kib: f64,
    avail_per_kib: f64,
    daemon_cpu: f64,
    host_cpu: f64,
    exits: u64,
    ping_alone_us: f64,
    ping_among_us: f64,
    stop_total_s: f64,
    start: Footprint,
    running: Footprint,
    stopped: Footprint,
}

fn run_request(name: &str, image: &Path, mem_mib: u64, port: u16) -> RunRequest {
    RunRequest {
        name: name.to_owned(),
        image: image.to_string_lossy().into_owned(),
        mem: mem_mib << 20,
        publish: vec![PublishSpec {
            host: ([127, 0, 0, 1], port).into(),
            guest_addr: None,
            guest_port: 6379,
            proto: Default::default(),
        }],
        ..Default::default()
    }
}

fn launch(client: &Client, req: &RunRequest) -> Result<InstanceInfo> {
    client
        .run(req)
        .with_context(|| format!("launching {}", req.name))
}

fn total_exits(client: &Client) -> Result<u64> {
    let stats = client.stats()?;
    Ok(stats.instances.iter().map(|i| i.exits.total).sum())
}

/// Waits until the footprint of `pid` is back to `start`'s threads, fds
/// and listening sockets (stops finish asynchronously), up to 30 s.
fn settled_back(pid: u32, start: Footprint) -> Result<Footprint> {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let now = footprint(pid)?;
        let back = now.threads <= start.threads
            && now.fds <= start.fds
            && now.listening <= start.listening;
        if back || Instant::now() > give_up {
            return Ok(now);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn bench_shim(shim: &Path, kv: &Path, opts: &DensityOptions, dir: &Path) -> Result<ShimFigures> {
    let n = opts.instances.max(1);
    let max = n.to_string();
    // Room for exactly the guests asked for, whatever the host's memory
    // (idle, they touch about 1 MiB of their 16).
    let guest_memory = format!("{}M", n as u64 * opts.mem_mib);
    let daemon = Daemon::start_with(
        shim,
        "density",
        1,
        dir,
        &[
            "--no-overlay",
            "--max-instances",
            &max,
            "--max-guest-memory",
            &guest_memory,
        ],
    )?;
    let pid = daemon.pid();
    let client = Client::new(&daemon.addr).with_timeout(Duration::from_secs(60));
    thread::sleep(Duration::from_millis(500));
    let start = footprint(pid)?;
    let avail_start = mem_available_kib()?;

    let mut launch_ms = Vec::with_capacity(n);
    let mut first_pong_ms = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    let began = Instant::now();
    let mut last_first_pong_ms = f64::NAN;
    for i in 0..n {
        let port = free_port()?;
        let req = run_request(&format!("kv{i}"), kv, opts.mem_mib, port);
        let t = Instant::now();
        launch(&client, &req)?;
        launch_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let launched = Instant::now();
        let mut conn = Kv::when_up(port, Duration::from_secs(30))
            .with_context(|| format!("instance kv{i}"))?;
        last_first_pong_ms = launched.elapsed().as_secs_f64() * 1e3;
        first_pong_ms.push(last_first_pong_ms);
        for k in 0..KEYS {
            let reply = conn.cmd(&["SET", &format!("key:{k}"), &format!("value-{i}-{k}")])?;
            if reply != "OK" {
                bail!("kv{i}: SET answered {reply:?}");
            }
        }
        ports.push(port);
        if (i + 1) % 100 == 0 {
            eprintln!(
                "{} instances launched in {:.1} s",
                i + 1,
                began.elapsed().as_secs_f64()
            );
        }
    }
    let launch_total_s = began.elapsed().as_secs_f64();

    // Settle (the last connections close), then 10 s of idle.
    thread::sleep(Duration::from_secs(5));
    let (exits0, daemon0, host0) = (total_exits(&client)?, cpu_seconds(pid)?, host_ticks()?);
    thread::sleep(IDLE);
    let (exits1, daemon1, host1) = (total_exits(&client)?, cpu_seconds(pid)?, host_ticks()?);
    let daemon_cpu = (daemon1 - daemon0) / IDLE.as_secs_f64();
    // The whole host's busy share, in cores.
    let cores = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let host_cpu = (host1.0 - host0.0) as f64 / (host1.1 - host0.1).max(1) as f64 * cores;
    let running = footprint(pid)?;
    let avail_running = mem_available_kib()?;

    // Every instance still answers and keeps its keys; instance 0's
    // latency among the others.
    for (i, &port) in ports.iter().enumerate() {
        let mut conn = Kv::connect(port)?;
        let got = conn.cmd(&["DBSIZE"])?;
        if got != KEYS.to_string() {
            bail!("kv{i} holds {got} keys, not {KEYS}");
        }
    }
    let ping_among_us = Kv::connect(ports[0])?.ping_p50_us()?;

    // The others stop; instance 0, as idle as before, alone.
    let stop = |i: usize| -> Result<()> {
        client
            .stop(&format!("kv{i}"))
            .with_context(|| format!("stopping kv{i}"))?;
        Ok(())
    };
    let stop_began = Instant::now();
    (1..n).try_for_each(stop)?;
    let mut stop_total_s = stop_began.elapsed().as_secs_f64();
    let ping_alone_us = Kv::connect(ports[0])?.ping_p50_us()?;
    let stop_began = Instant::now();
    stop(0)?;
    stop_total_s += stop_began.elapsed().as_secs_f64();
    let stopped = settled_back(pid, start)?;

    Ok(ShimFigures {
        instances: n,
        launch_total_s,
        launch_ms,
        first_pong_ms,
        last_first_pong_ms,
        rss_per_kib: running.rss_kib.saturating_sub(start.rss_kib) as f64 / n as f64,
        avail_per_kib: avail_start as f64 - avail_running as f64,
        daemon_cpu,
        host_cpu,
        exits: exits1 - exits0,
        ping_alone_us,
        ping_among_us,
        stop_total_s,
        start,
        running,
        stopped,
    })
}

/// QEMU's figures.
struct QemuFigures {
    instances: usize,
    rss_per_kib: f64,
    avail_per_kib: f64,
    first_pong_ms: Vec<f64>,
    cpu: f64,
}

/// The QEMU child of `host-shim run` process `pid`, once it exists.
fn qemu_child(pid: u32) -> Result<u32> {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().find_map(|c| c.parse().ok()) {
            return Ok(c);
        }
        if Instant::now() > give_up {
            bail!("host-shim run (pid {pid}) started no QEMU");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn bench_qemu(shim: &Path, kv: &Path, opts: &DensityOptions) -> Result<QemuFigures> {
    super::require("qemu-system-x86_64", "qemu-system-x86")?;
    let avail_start = mem_available_kib()?;
    let mut guests = Vec::new();
    let mut first_pong_ms = Vec::new();
    let mem = format!("{}M", opts.mem_mib);
    for i in 0..opts.qemu {
        let port = free_port()?;
        let publish = format!("127.0.0.1:{port}:6379");
        let img = kv.to_string_lossy();
        let started = Instant::now();
        let child = Command::new(shim)
            .args(["run", &img, "--backend", "qemu", "--mem", &mem])
            .args(["--publish", &publish])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting host-shim run --backend qemu")?;
        let guard = Guard(child);
        let qemu = qemu_child(guard.0.id())?;
        let mut conn = Kv::when_up(port, Duration::from_secs(120))
            .with_context(|| format!("QEMU guest {i}"))?;
        first_pong_ms.push(started.elapsed().as_secs_f64() * 1e3);
        for k in 0..KEYS {
            conn.cmd(&["SET", &format!("key:{k}"), "v"])?;
        }
        guests.push((guard, qemu));
    }
    thread::sleep(Duration::from_secs(5));
    let cpu = |guests: &[(Guard, u32)]| -> f64 {
        guests
            .iter()
            .map(|(_, q)| cpu_seconds(*q).unwrap_or(0.0))
            .sum()
    };
    let cpu0 = cpu(&guests);
    thread::sleep(IDLE);
    let cpu1 = cpu(&guests);
    let rss: u64 = guests
        .iter()
        .map(|(_, q)| proc_status_kib(*q, "VmRSS:").unwrap_or(0))
        .sum();
    let avail = mem_available_kib()?;
    let n = guests.len().max(1) as f64;
    Ok(QemuFigures {
        instances: guests.len(),
        rss_per_kib: rss as f64 / n,
        avail_per_kib: (avail_start as f64 - avail as f64) / n,
        first_pong_ms,
        cpu: (cpu1 - cpu0) / IDLE.as_secs_f64(),
    })
}

fn mib(kib: f64) -> String {
    format!("{:.2} MiB", kib / 1024.0)
}

pub fn run(ws: &Workspace, opts: &DensityOptions) -> Result<()> {
    let images = image::build_images(ws, &[ws.app("kv")?], Profile::Release)?;
    let shim = image::build_shim(ws)?;
    let kv = &images[0].path;
    let dir = TempDir::new("density")?;
    let load0 = std::fs::read_to_string("/proc/loadavg")?;

    let s = bench_shim(&shim, kv, opts, &dir.0)?;
    let q = if opts.qemu > 0 {
        Some(bench_qemu(&shim, kv, opts)?)
    } else {
        None
    };
    let load1 = std::fs::read_to_string("/proc/loadavg")?;

    let n = s.instances as f64;
    println!(
        "\n### Density: {} idle kv instances ({} MiB each) in one daemon\n",
        s.instances, opts.mem_mib
    );
    println!("| | host-shim daemon | QEMU microvm (TCG), one process per guest |");
    println!("|---|---:|---:|");
    let qn = q.as_ref().map_or("–".into(), |q| q.instances.to_string());
    println!("| instances | {} | {qn} |", s.instances);
    println!(
        "| launch, all (one after another through the API) | {:.1} s | – |",
        s.launch_total_s
    );
    println!(
        "| launch call p50 / p99 | {:.1} / {:.1} ms | – |",
        median(s.launch_ms.clone()),
        quantile(s.launch_ms.clone(), 0.99)
    );
    let q_pong = q.as_ref().map_or("–".into(), |q| {
        format!(
            "{:.0} / {:.0} ms (process start → PONG)",
            median(q.first_pong_ms.clone()),
            quantile(q.first_pong_ms.clone(), 0.99)
        )
    });
    println!(
        "| launch → first PONG p50 / p99 | {:.1} / {:.1} ms | {q_pong} |",
        median(s.first_pong_ms.clone()),
        quantile(s.first_pong_ms.clone(), 0.99)
    );
    println!(
        "| launch → first PONG, last instance | {:.1} ms | – |",
        s.last_first_pong_ms
    );
    let q_rss = q.as_ref().map_or("–".into(), |q| mib(q.rss_per_kib));
    println!(
        "| host memory per instance: RSS growth | {} | {q_rss} (QEMU's RSS) |",
        mib(s.rss_per_kib)
    );
    let q_avail = q.as_ref().map_or("–".into(), |q| mib(q.avail_per_kib));
    println!(
        "| host memory per instance: MemAvailable drop | {} | {q_avail} |",
        mib(s.avail_per_kib / n)
    );
    let q_cpu = q.as_ref().map_or("–".into(), |q| {
        format!("{:.1} % of a core (QEMU processes)", q.cpu * 100.0)
    });
    println!(
        "| idle CPU over 10 s | daemon {:.2} % of a core ({} VM exits); whole host {:.0} % of a core | {q_cpu} |",
        s.daemon_cpu * 100.0,
        s.exits,
        s.host_cpu * 100.0
    );
    println!(
        "| PING p50 (1,000 round trips), instance 0 alone / among {} | {:.0} / {:.0} µs ({:.2}×) | – |",
        s.instances,
        s.ping_alone_us,
        s.ping_among_us,
        s.ping_among_us / s.ping_alone_us
    );
    println!(
        "| stop all | {:.1} s ({:.1} ms each) | – |",
        s.stop_total_s,
        s.stop_total_s * 1e3 / n
    );
    println!(
        "| daemon threads / fds / listening sockets: start, running, after stop | {}/{}/{}, {}/{}/{}, {}/{}/{} | – |",
        s.start.threads,
        s.start.fds,
        s.start.listening,
        s.running.threads,
        s.running.fds,
        s.running.listening,
        s.stopped.threads,
        s.stopped.fds,
        s.stopped.listening
    );
    println!(
        "| daemon RSS: start, running, after stop | {}, {}, {} | – |",
        mib(s.start.rss_kib as f64),
        mib(s.running.rss_kib as f64),
        mib(s.stopped.rss_kib as f64)
    );
    println!(
        "\nHost load (/proc/loadavg) before: {}after: {}",
        load0, load1
    );
    let returned = s.stopped.threads <= s.start.threads
        && s.stopped.fds <= s.start.fds
        && s.stopped.listening <= s.start.listening;
    if !returned {
        bail!(
            "not every resource came back after the stops: start {:?}, after {:?}",
            s.start,
            s.stopped
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(super::quantile(v.clone(), 0.99), 99.0);
        assert_eq!(super::quantile(v.clone(), 0.5), 50.0);
        assert_eq!(super::quantile(v, 1.0), 100.0);
        assert!(super::quantile(vec![], 0.5).is_nan());
    }
}
