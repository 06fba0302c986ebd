//! `cargo xtask bench net`: the request path of unikernel apps behind our shim's user-mode
//! network, side by side with a native server in the same run.
//!
//! - `redis-benchmark -t set,get --csv` at `-c 1`, `-c 20`, `-c 50` and `-c 50 -P 16` against
//!   the `kv` image (an instance of a `host-shim serve` daemon, through a published port), the
//!   same image on a TAP device (one TCP stack fewer: the host kernel talks to the guest;
//!   root only, in a network namespace of its own) and a native `redis-server` on loopback;
//!   rounds alternate which server goes first so load drift hits all alike. Medians of
//!   requests/s and p50 latency, ratios, and per request: the guest's VM exits, idle-wait
//!   wake-ups, frames each way and vCPU-thread CPU (the daemon's `GET /v1/stats`, typed), and
//!   host CPU (utime + stime of the daemon process, or of redis-server, from `/proc`), and how
//!   busy the busiest and the least busy host CPU were (`/proc/stat`: whether the client and
//!   the server shared one CPU). With the client's own CPU per request (getrusage of the
//!   finished redis-benchmark) it gives each side's ceiling: the host's CPUs divided by
//!   client + server CPU per request, what no placement of threads can beat.
//! - `wrk` against the `http` image (published port) and a native HTTP/1.1 keep-alive server
//!   of the same shape (this process, a thread per connection) at 1, 20 and 32 connections
//!   (the app's worker count).
//! - Bulk TCP host -> guest: bytes pushed through a published port into `netcheck sink`.
//! - The host's load average before and after, since the host may be shared.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::{self, Profile};
use crate::workspace::Workspace;

use api::stats::{InstanceStats, ShimStats};
use api::Client;

use super::migrate::{Daemon, TempDir};
use super::{free_port, median, require, Guard};

/// Options of `bench net`.
#[derive(Debug)]
pub struct NetOptions {
    /// Requests per redis-benchmark run at `-c 20` and `-c 50` (a quarter at `-c 1`, eight
    /// times as many pipelined), so every run lasts about as long.
    pub requests: u64,
    pub rounds: usize,
    pub bulk_mib: u64,
}

/// A client load: redis-benchmark's `-c` and `-P`.
#[derive(Clone, Copy, Debug)]
struct Load {
    clients: u32,
    pipeline: u32,
}

const LOADS: [Load; 4] = [
    Load {
        clients: 1,
        pipeline: 1,
    },
    Load {
        clients: 20,
        pipeline: 1,
    },
    Load {
        clients: 50,
        pipeline: 1,
    },
    Load {
        clients: 50,
        pipeline: 16,
    },
];

impl Load {
    fn label(self) -> String {
        match self.pipeline {
            1 => format!("`-c {}`", self.clients),
            p => format!("`-c {} -P {p}`", self.clients),
        }
    }

    fn requests(self, base: u64) -> u64 {
        match (self.clients, self.pipeline) {
            (1, _) => (base / 4).max(1),
            (_, 1) => base,
            _ => base * 8,
        }
    }
}

/// Where clients reach a server: an address, and the network namespace to run them in.
#[derive(Clone, Debug)]
struct Target {
    host: String,
    port: u16,
    netns: Option<String>,
}

impl Target {
    fn loopback(port: u16) -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port,
            netns: None,
        }
    }

    /// `program`, run in the target's network namespace.
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }
}

/// Waits until `redis-cli PING` answers PONG (`alive` says whether the server process is
/// still there).
fn wait_for_redis(
    target: &Target,
    what: &str,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        alive()?;
        let out = target
            .command("redis-cli")
            .args(["-h", &target.host, "-p", &target.port.to_string(), "PING"])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{what} did not answer PING on {}:{} within 30 s",
        target.host,
        target.port
    )
}

/// One redis-benchmark test's figures.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Figures {
    rps: f64,
    p50_ms: f64,
}

/// The SET and GET figures of `redis-benchmark --csv` output (header
/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...`).
fn parse_csv(text: &str) -> Result<(Figures, Figures)> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .with_context(|| format!("empty redis-benchmark output:\n{text}"))?
        .split(',')
        .map(|f| f.trim_matches('"').to_owned())
        .collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no {name} column in redis-benchmark output:\n{text}"))
    };
    let (rps, p50) = (column("rps")?, column("p50_latency_ms")?);
    let rows: Vec<Vec<&str>> = lines
        .map(|l| l.split(',').map(|f| f.trim_matches('"')).collect())
        .collect();
    let figures = |test: &str| -> Result<Figures> {
        let row = rows
            .iter()
            .find(|r| r.first() == Some(&test))
            .with_context(|| format!("no {test} row in redis-benchmark output:\n{text}"))?;
        let number = |i: usize, what: &str| -> Result<f64> {
            row.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .with_context(|| format!("bad {test} {what} in redis-benchmark output:\n{text}"))
        };
        Ok(Figures {
            rps: number(rps, "rps")?,
            p50_ms: number(p50, "p50")?,
        })
    };
    Ok((figures("SET")?, figures("GET")?))
}

/// Runs redis-benchmark; the SET and GET figures.
fn redis_benchmark(target: &Target, load: Load, requests: u64) -> Result<(Figures, Figures)> {
    let out = target
        .command("redis-benchmark")
        .args(["-h", &target.host, "-p", &target.port.to_string()])
        .args(["-t", "set,get", "--csv"])
        .args(["-n", &requests.to_string()])
        .args(["-c", &load.clients.to_string()])
        .args(["-P", &load.pipeline.to_string()])
        .output()
        .context("running redis-benchmark")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_csv(&String::from_utf8_lossy(&out.stdout))
}

/// utime + stime of process `pid` (all its threads), seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .and_then(|v| v.parse().ok())
            .context("malformed /proc/PID/stat")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok((ticks(14)? + ticks(15)?) as f64 / hz as f64)
}

/// CPU seconds (user + system) of this process's children that ended and were waited for:
/// the difference across one `redis-benchmark` run is the client's CPU.
fn children_cpu_seconds() -> Result<f64> {
    // SAFETY: an all-zero `rusage` is a valid value; getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage`.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage(RUSAGE_CHILDREN)");
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Ok(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// Busy and total jiffies of each CPU, from `/proc/stat` (busy: all but idle and iowait).
fn cpu_jiffies() -> Result<Vec<(u64, u64)>> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    Ok(parse_cpu_jiffies(&stat))
}

fn parse_cpu_jiffies(stat: &str) -> Vec<(u64, u64)> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            let total: u64 = v.iter().sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// How busy the busiest and the least busy CPU were between two [`cpu_jiffies`] readings.
fn busiest_and_least(before: &[(u64, u64)], after: &[(u64, u64)]) -> (f64, f64) {
    let shares: Vec<f64> = before
        .iter()
        .zip(after)
        .map(|(a, b)| {
            let total = b.1.saturating_sub(a.1);
            if total == 0 {
                0.0
            } else {
                b.0.saturating_sub(a.0) as f64 / total as f64
            }
        })
        .collect();
    let most = shares.iter().copied().fold(f64::NAN, f64::max);
    let least = shares.iter().copied().fold(f64::NAN, f64::min);
    (most, least)
}

/// An instance's counters in its daemon's `GET /v1/stats`.
fn instance_stats(daemon: &Daemon, name: &str) -> Result<InstanceStats> {
    let stats: ShimStats = Client::new(&daemon.addr).stats().context("GET /v1/stats")?;
    stats
        .instances
        .into_iter()
        .find(|i| i.name == name)
        .with_context(|| format!("no {name} instance in GET /v1/stats"))
}

/// What one request cost the guest's side of the shim, from the daemon's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct GuestCosts {
    /// VM exits (each 40-50 µs on this host).
    exits: f64,
    /// `HC_YIELD` waits ended by frames: the network thread woke the sleeping vCPU thread.
    wakes: f64,
    /// Frames into the guest (network thread -> vCPU thread).
    frames_in: f64,
    /// Frames out of the guest (vCPU thread -> network thread).
    frames_out: f64,
    /// Of those, frames the network thread moved itself while the guest
    /// polled its rings (no exit, no vCPU thread).
    polled_in: f64,
    polled_out: f64,
    /// CPU of the guest's vCPU thread (guest code and exits), seconds.
    vcpu_cpu: f64,
}

impl GuestCosts {
    /// Per request between two snapshots.
    fn between(a: &InstanceStats, b: &InstanceStats, requests: f64) -> Self {
        let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / requests;
        Self {
            exits: per(a.exits.total, b.exits.total),
            wakes: per(a.exits.idle.woken_by_io, b.exits.idle.woken_by_io),
            frames_in: per(a.net.rx_packets, b.net.rx_packets),
            frames_out: per(a.net.tx_packets, b.net.tx_packets),
            polled_in: per(a.net.rx_polled, b.net.rx_polled),
            polled_out: per(a.net.tx_polled, b.net.tx_polled),
            vcpu_cpu: (b.cpu_s - a.cpu_s).max(0.0) / requests,
        }
    }
}

/// One server's run of one load: figures and what it cost.
#[derive(Clone, Copy, Debug)]
struct Sample {
    set: Figures,
    get: Figures,
    /// Host CPU seconds of the server process per request (SET and GET).
    cpu_per_request: f64,
    /// Host CPU seconds of the client (redis-benchmark) per request.
    client_cpu_per_request: f64,
    /// The guest's costs per request (kv in a daemon only).
    guest: Option<GuestCosts>,
    /// Share of the time the busiest and the least busy host CPU were busy (all processes).
    cpus_busy: (f64, f64),
}

/// A server under test.
struct Server<'a> {
    target: Target,
    pid: u32,
    /// The daemon hosting kv (for its counters).
    daemon: Option<&'a Daemon>,
}

impl Server<'_> {
    fn measure(&self, load: Load, requests: u64) -> Result<Sample> {
        let stats = |d: Option<&Daemon>| d.map(|d| instance_stats(d, "kv")).transpose();
        let (cpu0, stats0) = (cpu_seconds(self.pid)?, stats(self.daemon)?);
        let (jiffies0, client0) = (cpu_jiffies()?, children_cpu_seconds()?);
        let (set, get) = redis_benchmark(&self.target, load, requests)?;
        let (jiffies1, client1) = (cpu_jiffies()?, children_cpu_seconds()?);
        let (cpu1, stats1) = (cpu_seconds(self.pid)?, stats(self.daemon)?);
        let total = (2 * requests) as f64;
        Ok(Sample {
            set,
            get,
            cpu_per_request: (cpu1 - cpu0) / total,
            client_cpu_per_request: (client1 - client0) / total,
            guest: stats0
                .zip(stats1)
                .map(|(a, b)| GuestCosts::between(&a, &b, total)),
            cpus_busy: busiest_and_least(&jiffies0, &jiffies1),
        })
    }
}

/// Medians of one server's samples of one load.
struct Medians {
    set_rps: f64,
    get_rps: f64,
    set_p50: f64,
    get_p50: f64,
    cpu_us: f64,
    client_cpu_us: f64,
    guest: Option<GuestCosts>,
    cpus_busy: (f64, f64),
}

impl Medians {
    /// Requests/s if `cpus` host CPUs did nothing but run this client and this server, all
    /// of them busy all the time: what no placement or scheduling of the threads can beat
    /// at these costs per request.
    fn ceiling(&self, cpus: f64) -> f64 {
        cpus / ((self.cpu_us + self.client_cpu_us) * 1e-6)
    }

    fn of(samples: &[Sample]) -> Self {
        let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let guest = samples
            .iter()
            .map(|s| s.guest)
            .collect::<Option<Vec<GuestCosts>>>()
            .filter(|g| !g.is_empty())
            .map(|g| {
                let m = |f: fn(&GuestCosts) -> f64| median(g.iter().map(f).collect());
                GuestCosts {
                    exits: m(|c| c.exits),
                    wakes: m(|c| c.wakes),
                    frames_in: m(|c| c.frames_in),
                    frames_out: m(|c| c.frames_out),
                    polled_in: m(|c| c.polled_in),
                    polled_out: m(|c| c.polled_out),
                    vcpu_cpu: m(|c| c.vcpu_cpu),
                }
            });
        Self {
            set_rps: m(&|s| s.set.rps),
            get_rps: m(&|s| s.get.rps),
            set_p50: m(&|s| s.set.p50_ms),
            get_p50: m(&|s| s.get.p50_ms),
            cpu_us: m(&|s| s.cpu_per_request * 1e6),
            client_cpu_us: m(&|s| s.client_cpu_per_request * 1e6),
            guest,
            cpus_busy: (m(&|s| s.cpus_busy.0), m(&|s| s.cpus_busy.1)),
        }
    }
}

/// A network namespace of this process, deleted when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The TAP device of the kv guest, in the bench's network namespace.
const TAP: &str = "lcbench0";
/// The guest's address on it.
const TAP_GUEST: &str = "10.0.2.15";

/// kv on a TAP device (`host-shim run --net tap=`) in a network namespace of its own, whose
/// host side has 10.0.2.2. `None` (with the reason) when this host cannot: not root, or no
/// `/dev/net/tun`.
fn start_tap_kv(shim: &Path, kv: &Path) -> Result<Result<(Netns, Guard), String>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Err(
            "needs root (a network namespace and a TAP device)".into()
        ));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Ok(Err("needs /dev/net/tun".into()));
    }
    let ns = Netns(format!("lc-bench-net-{}", std::process::id()));
    ip(&["netns", "add", &ns.0])?;
    let target = Target {
        host: TAP_GUEST.to_owned(),
        port: 6379,
        netns: Some(ns.0.clone()),
    };
    // `ip netns exec` execs the shim: the child's pid is the shim's.
    let mut guest = Guard(
        target
            .command(&shim.to_string_lossy())
            .args(["run".as_ref(), kv.as_os_str()])
            .args([
                "--net",
                &format!("tap={TAP}"),
                "--ip",
                &format!("{TAP_GUEST}/24"),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting host-shim run --net tap")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while ip(&["-n", &ns.0, "link", "show", TAP]).is_err() {
        if let Some(status) = guest.0.try_wait()? {
            bail!("host-shim --net tap exited with {status}");
        }
        if Instant::now() > deadline {
            bail!("host-shim did not create {TAP} within 10 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
    ip(&["-n", &ns.0, "addr", "add", "10.0.2.2/24", "dev", TAP])?;
    ip(&["-n", &ns.0, "link", "set", TAP, "up"])?;
    wait_for_redis(&target, "kv on a TAP device", || {
        match guest.0.try_wait()? {
            Some(status) => bail!("host-shim --net tap exited with {status}"),
            None => Ok(()),
        }
    })?;
    Ok(Ok((ns, guest)))
}

/// Seconds per wrk run.
const WRK_SECS: u64 = 5;
/// wrk's connection counts: up to the `http` app's 32 workers (more would wait for one).
const WRK_CONNECTIONS: [u32; 3] = [1, 20, 32];

/// `12.5us`, `1.20ms`, `2.00s` -> milliseconds.
fn wrk_duration_ms(v: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .map(|n| n * scale)
}

/// Requests/s and p50 of `wrk --latency` output.
fn parse_wrk(text: &str) -> Result<Figures> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let p50 = text
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("50%")).then(|| f.next()).flatten()
        })
        .and_then(wrk_duration_ms)
        .with_context(|| format!("no 50% latency in wrk output:\n{text}"))?;
    if text.contains("Non-2xx or 3xx responses") {
        bail!("wrk got error responses:\n{text}");
    }
    Ok(Figures { rps, p50_ms: p50 })
}

/// wrk with `connections` against `url` for [`WRK_SECS`].
fn wrk(url: &str, connections: u32) -> Result<Figures> {
    let out = Command::new("wrk")
        .args(["-t", "1", "-c", &connections.to_string()])
        .args(["-d", &format!("{WRK_SECS}s"), "--latency", url])
        .output()
        .context("running wrk")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// Connections the native HTTP server serves at once (more are closed at once): the `http`
/// app's worker count.
const NATIVE_HTTP_MAX: usize = 32;

/// The native counterpart of the `http` app's `GET /healthz`: HTTP/1.1 keep-alive, the same
/// response head and body, a thread per connection (at most [`NATIVE_HTTP_MAX`]). Stops
/// accepting when `stop` is set.
fn native_http(listener: TcpListener, stop: Arc<AtomicBool>) {
    let live = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = stream else { continue };
        if live.fetch_add(1, Ordering::AcqRel) >= NATIVE_HTTP_MAX {
            live.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let live = Arc::clone(&live);
        thread::spawn(move || {
            let _ = serve_http(stream);
            live.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

fn serve_http(mut stream: TcpStream) -> std::io::Result<()> {
    const BODY: &str = "ok\n";
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: keep-alive\r\n\r\n{BODY}",
        BODY.len()
    );
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = vec![0u8; 8192];
    let mut filled = 0;
    loop {
        while let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            stream.write_all(reply.as_bytes())?;
            buf.copy_within(end + 4..filled, 0);
            filled -= end + 4;
        }
        if filled == buf.len() {
            return Ok(());
        }
        match stream.read(&mut buf[filled..])? {
            0 => return Ok(()),
            n => filled += n,
        }
    }
}

/// The load average of the last minute.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
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
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .with_context(|| format!("no MB/s figure in netcheck's line {guest_line:?}"))?;
    Ok((total as f64 / host_secs / 1e6, guest_mbps))
}

/// Waits until `GET /healthz` on 127.0.0.1:`port` answers `ok`.
fn wait_for_http(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let ask = || -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        // Up to the end of the body: a keep-alive server need not close.
        let mut reply = Vec::new();
        let mut buf = [0u8; 1024];
        while !reply.ends_with(b"\r\n\r\nok\n") {
            match s.read(&mut buf)? {
                0 => break,
                n => reply.extend_from_slice(&buf[..n]),
            }
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    };
    while Instant::now() < deadline {
        if ask().is_ok_and(|r| r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n")) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not answer GET /healthz on port {port} within 30 s")
}

/// One wrk run against one server, with the server's CPU per request.
fn wrk_sample(port: u16, pid: u32, connections: u32) -> Result<(Figures, f64)> {
    let cpu0 = cpu_seconds(pid)?;
    let figures = wrk(&format!("http://127.0.0.1:{port}/healthz"), connections)?;
    let cpu = cpu_seconds(pid)? - cpu0;
    let requests = figures.rps * WRK_SECS as f64;
    Ok((
        figures,
        if requests > 0.0 {
            cpu / requests
        } else {
            f64::NAN
        },
    ))
}

/// Medians of wrk samples: requests/s, p50 (ms), CPU per request (µs).
fn wrk_medians(samples: &[(Figures, f64)]) -> (f64, f64, f64) {
    (
        median(samples.iter().map(|s| s.0.rps).collect()),
        median(samples.iter().map(|s| s.0.p50_ms).collect()),
        median(samples.iter().map(|s| s.1 * 1e6).collect()),
    )
}

/// Runs the benchmark and prints a markdown report.
pub fn run(ws: &Workspace, opts: &NetOptions) -> Result<()> {
    require("redis-benchmark", "redis-tools")?;
    require("redis-server", "redis-server")?;
    require("wrk", "wrk")?;
    let images = image::build_images(
        ws,
        &[ws.app("kv")?, ws.app("netcheck")?, ws.app("http")?],
        Profile::Release,
    )?;
    let shim = image::build_shim(ws)?;
    let (kv, netcheck, http) = (&images[0], &images[1], &images[2]);
    let load_before = load_average();

    let dir = TempDir::new("net")?;
    let daemon = Daemon::start(&shim, "bench-net", 1, &dir.0)?;
    let kv_port = free_port()?;
    let publish = format!("127.0.0.1:{kv_port}:6379");
    let kv_path = kv.path.to_string_lossy();
    daemon.cli(&["run", &kv_path, "--name", "kv", "--publish", &publish])?;
    wait_for_redis(&Target::loopback(kv_port), "the kv unikernel", || Ok(()))?;
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
    wait_for_redis(
        &Target::loopback(native_port),
        "redis-server",
        || match native.0.try_wait()? {
            Some(status) => bail!("redis-server exited with {status} before answering"),
            None => Ok(()),
        },
    )?;
    let tap = start_tap_kv(&shim, &kv.path)?;
    let ours = Server {
        target: Target::loopback(kv_port),
        pid: daemon.pid(),
        daemon: Some(&daemon),
    };
    let theirs = Server {
        target: Target::loopback(native_port),
        pid: native.0.id(),
        daemon: None,
    };
    let over_tap = tap.as_ref().ok().map(|(ns, guest)| Server {
        target: Target {
            host: TAP_GUEST.to_owned(),
            port: 6379,
            netns: Some(ns.0.clone()),
        },
        pid: guest.0.id(),
        daemon: None,
    });
    let mut servers = vec![&ours, &theirs];
    servers.extend(over_tap.as_ref());

    let mut results = Vec::new();
    for load in LOADS {
        let requests = load.requests(opts.requests);
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); servers.len()];
        for round in 1..=opts.rounds {
            eprintln!(
                "bench net: {} -n {requests}, round {round}/{}",
                load.label(),
                opts.rounds
            );
            // Rotate which server goes first.
            for i in 0..servers.len() {
                let which = (i + round - 1) % servers.len();
                samples[which].push(servers[which].measure(load, requests)?);
            }
        }
        let medians: Vec<Medians> = samples.iter().map(|s| Medians::of(s)).collect();
        results.push((load, medians));
    }
    drop(over_tap);
    let tap = tap.map(|(ns, guest)| {
        // The shim goes first, then its namespace.
        drop(guest);
        drop(ns);
    });
    drop(native);

    // wrk: the http app vs a native server of the same shape.
    let http_port = free_port()?;
    let http_path = http.path.to_string_lossy();
    let publish = format!("127.0.0.1:{http_port}:80");
    daemon.cli(&["run", &http_path, "--name", "http", "--publish", &publish])?;
    wait_for_http(http_port, "the http unikernel")?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let native_http_port = listener.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || native_http(listener, stop))
    };
    wait_for_http(native_http_port, "the native HTTP server")?;
    let mut web = Vec::new();
    for connections in WRK_CONNECTIONS {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 1..=opts.rounds {
            eprintln!(
                "bench net: wrk -c {connections} -d {WRK_SECS}s, round {round}/{}",
                opts.rounds
            );
            let me = std::process::id();
            if round % 2 == 1 {
                ours.push(wrk_sample(http_port, daemon.pid(), connections)?);
                theirs.push(wrk_sample(native_http_port, me, connections)?);
            } else {
                theirs.push(wrk_sample(native_http_port, me, connections)?);
                ours.push(wrk_sample(http_port, daemon.pid(), connections)?);
            }
        }
        web.push((connections, wrk_medians(&ours), wrk_medians(&theirs)));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(("127.0.0.1", native_http_port));
    let _ = server.join();
    drop(daemon);
    eprintln!("bench net: bulk TCP, {} MiB", opts.bulk_mib);
    let (bulk_host, bulk_guest) = bulk(&shim, &netcheck.path, opts.bulk_mib)?;
    let load_after = load_average();

    println!(
        "### Network: redis-benchmark -t set,get, kv unikernel (daemon instance, published \
         port) vs native redis-server (loopback), median of {} rounds\n",
        opts.rounds
    );
    println!(
        "| clients | kv GET req/s | native GET req/s | GET ratio | kv SET req/s | \
         native SET req/s | SET ratio | kv GET p50 | native GET p50 | kv exits/req | \
         kv host CPU/req | native host CPU/req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (load, m) in &results {
        let (k, n) = (&m[0], &m[1]);
        println!(
            "| {} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} | {:.2}× | {:.3} ms | {:.3} ms | \
             {} | {:.1} µs | {:.1} µs |",
            load.label(),
            k.get_rps,
            n.get_rps,
            k.get_rps / n.get_rps,
            k.set_rps,
            n.set_rps,
            k.set_rps / n.set_rps,
            k.get_p50,
            n.get_p50,
            k.guest
                .map_or("-".to_owned(), |g| format!("{:.3}", g.exits)),
            k.cpu_us,
            n.cpu_us,
        );
    }
    println!(
        "\n**Where a kv request's cost goes** (per request, SET and GET; vCPU wake-ups: \
         `HC_YIELD` waits ended by frames, i.e. the network thread woke the sleeping vCPU \
         thread; frames in/out: into and out of the guest, and in brackets those the \
         network thread moved itself while the guest polled its rings, without an exit; \
         vCPU thread CPU includes the guest's polling; network thread and the rest = \
         daemon CPU - vCPU thread CPU; CPUs busy: the busiest and the least busy host CPU's \
         share of the run, all processes, the client's included)\n"
    );
    println!(
        "| clients | exits | vCPU wake-ups | frames in (polled) | frames out (polled) | \
         vCPU thread CPU | network thread and the rest | native host CPU | CPUs busy, kv | \
         CPUs busy, native |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (load, m) in &results {
        let (k, n) = (&m[0], &m[1]);
        let Some(g) = k.guest else { continue };
        println!(
            "| {} | {:.3} | {:.3} | {:.3} ({:.3}) | {:.3} ({:.3}) | {:.1} µs | {:.1} µs | {:.1} µs \
             | {:.2} / {:.2} | {:.2} / {:.2} |",
            load.label(),
            g.exits,
            g.wakes,
            g.frames_in,
            g.polled_in,
            g.frames_out,
            g.polled_out,
            g.vcpu_cpu * 1e6,
            k.cpu_us - g.vcpu_cpu * 1e6,
            n.cpu_us,
            k.cpus_busy.0,
            k.cpus_busy.1,
            n.cpus_busy.0,
            n.cpus_busy.1,
        );
    }
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "\n**What {cpus} CPUs allow** (client: redis-benchmark's own CPU, from getrusage; \
         server: the kv daemon or redis-server; ceiling: {cpus} / (client + server CPU per \
         request), the requests/s if the CPUs ran nothing else and never idled, which no \
         placement of the threads can beat at these costs; a ratio target above the ceilings' \
         ratio is met only by cheaper requests)\n"
    );
    println!(
        "| clients | client CPU/req, kv / native | server CPU/req, kv / native | kv ceiling | \
         native ceiling | ceilings' ratio | GET ratio measured |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (load, m) in &results {
        let (k, n) = (&m[0], &m[1]);
        println!(
            "| {} | {:.2} / {:.2} µs | {:.2} / {:.2} µs | {:.0} | {:.0} | {:.2}× | {:.2}× |",
            load.label(),
            k.client_cpu_us,
            n.client_cpu_us,
            k.cpu_us,
            n.cpu_us,
            k.ceiling(cpus),
            n.ceiling(cpus),
            k.ceiling(cpus) / n.ceiling(cpus),
            k.get_rps / n.get_rps,
        );
    }
    match &tap {
        Err(why) => println!("\n- kv over a TAP device: not measured ({why})"),
        Ok(_) => {
            println!(
                "\n**kv over a TAP device** (`host-shim run --net tap=`, one TCP stack fewer: \
                 the host kernel talks to the guest directly; clients in the TAP's network \
                 namespace; host CPU is the shim process)\n"
            );
            println!(
                "| clients | kv TAP GET req/s | kv published GET req/s | native GET req/s | \
                 TAP ratio | kv TAP GET p50 | kv TAP SET req/s | kv TAP host CPU/req |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|");
            for (load, m) in &results {
                let (k, n, t) = (&m[0], &m[1], &m[2]);
                println!(
                    "| {} | {:.0} | {:.0} | {:.0} | {:.2}× | {:.3} ms | {:.0} | {:.1} µs |",
                    load.label(),
                    t.get_rps,
                    k.get_rps,
                    n.get_rps,
                    t.get_rps / n.get_rps,
                    t.get_p50,
                    t.set_rps,
                    t.cpu_us,
                );
            }
        }
    }
    println!(
        "\n**wrk** (`wrk -t 1 -d {WRK_SECS}s --latency`, `GET /healthz`): the http unikernel \
         (daemon instance, published port) vs a native HTTP/1.1 keep-alive server of the \
         same shape (same response; a thread per connection), median of {} rounds\n",
        opts.rounds
    );
    println!(
        "| connections | http req/s | native req/s | ratio | http p50 | native p50 | \
         http host CPU/req | native host CPU/req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (connections, (kr, kp, kc), (nr, np, nc)) in &web {
        println!(
            "| `-c {connections}` | {kr:.0} | {nr:.0} | {:.2}× | {kp:.3} ms | {np:.3} ms | \
             {kc:.1} µs | {nc:.1} µs |",
            kr / nr
        );
    }
    let p50 = |v: &[(Load, Vec<Medians>)]| {
        v.iter()
            .map(|(l, m)| {
                format!(
                    "{} SET {:.3}/{:.3} ms",
                    l.label(),
                    m[0].set_p50,
                    m[1].set_p50
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\n- SET p50 kv/native: {}\n- requests per run: -n {} at `-c 1`, {} at `-c 20`/`-c 50`, \
         {} pipelined; host CPU is the whole shim daemon (network thread, vCPU thread) \
         or redis-server\n- kv image: {} (target ≤ 1 MiB)\n- bulk TCP host → guest through \
         a published port, {} MiB: {bulk_host:.0} MB/s end to end (the guest counted \
         {bulk_guest:.0} MB/s)\n- host load average (1 min): {load_before} before, \
         {load_after} after",
        p50(&results),
        LOADS[0].requests(opts.requests),
        LOADS[1].requests(opts.requests),
        LOADS[3].requests(opts.requests),
        image::kib(kv.size),
        opts.bulk_mib
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\
\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"
\"SET\",\"52910.05\",\"0.497\",\"0.168\",\"0.471\",\"0.759\",\"0.967\",\"2.103\"
\"GET\",\"55248.62\",\"0.473\",\"0.160\",\"0.455\",\"0.711\",\"0.887\",\"1.255\"
";

    #[test]
    fn per_cpu_busy_shares_come_from_proc_stat() {
        let before = parse_cpu_jiffies(
            "cpu  300 0 100 1600 0 0 0 0 0 0\ncpu0 200 0 50 750 0 0 0 0 0 0\n\
             cpu1 100 0 50 850 0 0 0 0 0 0\nintr 5\n",
        );
        assert_eq!(
            before,
            [(250, 1000), (150, 1000)],
            "cpu lines only, not the total"
        );
        // cpu0 busy 90 of 100 jiffies, cpu1 20 of 100 (10 of them iowait: not busy).
        let after =
            parse_cpu_jiffies("cpu0 270 0 70 760 0 0 0 0 0 0\ncpu1 110 0 60 920 10 0 0 0 0 0\n");
        let (most, least) = busiest_and_least(&before, &after);
        assert!(
            (most - 0.9).abs() < 1e-9 && (least - 0.2).abs() < 1e-9,
            "{most} {least}"
        );
    }

    #[test]
    fn parses_redis_benchmark_csv() {
        let (set, get) = parse_csv(CSV).unwrap();
        assert_eq!(
            set,
            Figures {
                rps: 52910.05,
                p50_ms: 0.471
            }
        );
        assert_eq!(
            get,
            Figures {
                rps: 55248.62,
                p50_ms: 0.455
            }
        );
    }

    #[test]
    fn a_parse_failure_is_an_error_not_nan() {
        assert!(parse_csv("").is_err());
        assert!(parse_csv(&CSV.replace("\"GET\"", "\"PING\"")).is_err());
        assert!(parse_csv(&CSV.replace("55248.62", "nan")).is_err());
        assert!(parse_csv(&CSV.replace("55248.62", "")).is_err());
        assert!(parse_csv(&CSV.replace("p50_latency_ms", "p51")).is_err());
    }

    const WRK: &str = "Running 5s test @ http://127.0.0.1:8080/healthz
  1 threads and 20 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   412.33us  201.10us   5.20ms   90.12%
    Req/Sec    48.10k     2.01k   51.00k    80.00%
  Latency Distribution
     50%  381.00us
     75%  450.00us
     90%  560.00us
     99%    1.10ms
  239313 requests in 5.00s, 23.05MB read
Requests/sec:  47862.60
Transfer/sec:      4.61MB
";

    #[test]
    fn parses_wrk_output() {
        assert_eq!(
            parse_wrk(WRK).unwrap(),
            Figures {
                rps: 47862.60,
                p50_ms: 0.381
            }
        );
        assert_eq!(wrk_duration_ms("1.10ms"), Some(1.1));
        assert_eq!(wrk_duration_ms("2.00s"), Some(2000.0));
        assert_eq!(wrk_duration_ms("12"), None);
        assert!(parse_wrk("").is_err());
        assert!(parse_wrk(&WRK.replace("50%", "51%")).is_err());
        let errors = WRK.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 5\nRequests/sec",
        );
        assert!(
            parse_wrk(&errors).is_err(),
            "error responses are not a result"
        );
    }

    #[test]
    fn the_native_http_server_answers_keep_alive_requests_like_the_app() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        thread::spawn({
            let stop = Arc::clone(&stop);
            move || native_http(listener, stop)
        });
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Two pipelined requests on one connection, the second split.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\n")
            .unwrap();
        s.write_all(b"Host: a\r\n\r\n").unwrap();
        let one = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\
                   Connection: keep-alive\r\n\r\nok\n";
        let mut got = vec![0u8; 2 * one.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), one.repeat(2));
        stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", port));
    }

    #[test]
    fn a_finished_childs_cpu_counts_as_the_clients() {
        let before = children_cpu_seconds().unwrap();
        // A child that computes for a moment, then is waited for (as redis-benchmark is).
        let status = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(status.success());
        let spent = children_cpu_seconds().unwrap() - before;
        assert!(
            spent > 0.01,
            "the child's CPU time was not counted: {spent} s"
        );
    }

    #[test]
    fn the_ceiling_is_the_cpus_over_client_and_server_cost() {
        let m = Medians {
            set_rps: 0.0,
            get_rps: 0.0,
            set_p50: 0.0,
            get_p50: 0.0,
            cpu_us: 6.0,
            client_cpu_us: 4.0,
            guest: None,
            cpus_busy: (0.0, 0.0),
        };
        // 10 µs of CPU per request on 2 CPUs: 200k requests/s at most.
        assert!((m.ceiling(2.0) - 200_000.0).abs() < 1e-6);
    }

    #[test]
    fn guest_costs_are_per_request_deltas() {
        let mut a = InstanceStats::default();
        a.exits.total = 100;
        a.exits.idle.woken_by_io = 10;
        a.net.rx_packets = 5;
        a.net.tx_packets = 7;
        a.net.rx_polled = 1;
        a.cpu_s = 1.0;
        let mut b = a.clone();
        b.exits.total = 300;
        b.exits.idle.woken_by_io = 110;
        b.net.rx_packets = 205;
        b.net.tx_packets = 407;
        b.net.rx_polled = 151;
        b.net.tx_polled = 300;
        b.cpu_s = 1.02;
        let c = GuestCosts::between(&a, &b, 100.0);
        assert_eq!(
            (c.exits, c.wakes, c.frames_in, c.frames_out),
            (2.0, 1.0, 2.0, 4.0)
        );
        assert_eq!((c.polled_in, c.polled_out), (1.5, 3.0));
        assert!((c.vcpu_cpu - 200e-6).abs() < 1e-9);
    }

    #[test]
    fn this_process_has_cpu_time() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(std::process::id()).unwrap() > 0.0);
    }
}
