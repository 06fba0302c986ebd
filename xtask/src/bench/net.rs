//! `cargo xtask bench net`: the request path of unikernel apps behind our shim's user-mode
//! network, side by side with a native server in the same run.
//!
//! - `redis-benchmark -t set,get --csv` at `-c 1`, `-c 20`, `-c 50` and `-c 50 -P 16` against
//!   the `kv` image (an instance of a `host-shim serve` daemon, through a published port) and
//!   against a native `redis-server` on loopback; rounds alternate which server goes first so
//!   load drift hits both alike. Medians of requests/s and p50 latency, ratios, and per
//!   request: the guest's VM exits (the daemon's `GET /v1/stats`, typed) and host CPU
//!   (utime + stime of the daemon process, or of redis-server, from `/proc`).
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

use api::stats::{ExitStats, ShimStats};
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

/// Waits until `redis-cli -p port PING` answers PONG (`alive` says whether the server
/// process is still there).
fn wait_for_redis(port: u16, what: &str, mut alive: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        alive()?;
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
fn redis_benchmark(port: u16, load: Load, requests: u64) -> Result<(Figures, Figures)> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "set,get", "--csv"])
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

/// The kv instance's exit counters in its daemon's `GET /v1/stats`.
fn kv_exits(daemon: &Daemon) -> Result<ExitStats> {
    let stats: ShimStats = Client::new(&daemon.addr).stats().context("GET /v1/stats")?;
    stats
        .instances
        .into_iter()
        .find(|i| i.name == "kv")
        .map(|i| i.exits)
        .context("no kv instance in GET /v1/stats")
}

/// One server's run of one load: figures and what it cost.
#[derive(Clone, Copy, Debug)]
struct Sample {
    set: Figures,
    get: Figures,
    /// Host CPU seconds of the server process per request (SET and GET).
    cpu_per_request: f64,
    /// Guest VM exits per request (kv only).
    exits_per_request: Option<f64>,
}

/// A server under test.
struct Server<'a> {
    port: u16,
    pid: u32,
    /// The daemon hosting kv (for its exit counters).
    daemon: Option<&'a Daemon>,
}

impl Server<'_> {
    fn measure(&self, load: Load, requests: u64) -> Result<Sample> {
        let exits = |d: Option<&Daemon>| d.map(kv_exits).transpose();
        let (cpu0, exits0) = (cpu_seconds(self.pid)?, exits(self.daemon)?);
        let (set, get) = redis_benchmark(self.port, load, requests)?;
        let (cpu1, exits1) = (cpu_seconds(self.pid)?, exits(self.daemon)?);
        let total = (2 * requests) as f64;
        Ok(Sample {
            set,
            get,
            cpu_per_request: (cpu1 - cpu0) / total,
            exits_per_request: exits0
                .zip(exits1)
                .map(|(a, b)| b.total.saturating_sub(a.total) as f64 / total),
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
    exits: Option<f64>,
}

impl Medians {
    fn of(samples: &[Sample]) -> Self {
        let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        Self {
            set_rps: m(&|s| s.set.rps),
            get_rps: m(&|s| s.get.rps),
            set_p50: m(&|s| s.set.p50_ms),
            get_p50: m(&|s| s.get.p50_ms),
            cpu_us: m(&|s| s.cpu_per_request * 1e6),
            exits: samples
                .iter()
                .map(|s| s.exits_per_request)
                .collect::<Option<Vec<f64>>>()
                .map(median),
        }
    }
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

/// Runs the benchmark and prints a markdown report.
pub fn run(ws: &Workspace, opts: &NetOptions) -> Result<()> {
    require("redis-benchmark", "redis-tools")?;
    require("redis-server", "redis-server")?;
    let images = image::build_images(ws, &[ws.app("kv")?, ws.app("netcheck")?], Profile::Release)?;
    let shim = image::build_shim(ws)?;
    let (kv, netcheck) = (&images[0], &images[1]);

    let dir = TempDir::new("net")?;
    let daemon = Daemon::start(&shim, "bench-net", 1, &dir.0)?;
    let kv_port = free_port()?;
    let publish = format!("127.0.0.1:{kv_port}:6379");
    let kv_path = kv.path.to_string_lossy();
    daemon.cli(&["run", &kv_path, "--name", "kv", "--publish", &publish])?;
    wait_for_redis(kv_port, "the kv unikernel", || Ok(()))?;
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
    wait_for_redis(native_port, "redis-server", || {
        match native.0.try_wait()? {
            Some(status) => bail!("redis-server exited with {status} before answering"),
            None => Ok(()),
        }
    })?;
    let ours = Server {
        port: kv_port,
        pid: daemon.pid(),
        daemon: Some(&daemon),
    };
    let theirs = Server {
        port: native_port,
        pid: native.0.id(),
        daemon: None,
    };

    let mut results = Vec::new();
    for load in LOADS {
        let requests = load.requests(opts.requests);
        let (mut kv_samples, mut native_samples) = (Vec::new(), Vec::new());
        for round in 1..=opts.rounds {
            eprintln!(
                "bench net: {} -n {requests}, round {round}/{}",
                load.label(),
                opts.rounds
            );
            // Alternate which server goes first.
            if round % 2 == 1 {
                kv_samples.push(ours.measure(load, requests)?);
                native_samples.push(theirs.measure(load, requests)?);
            } else {
                native_samples.push(theirs.measure(load, requests)?);
                kv_samples.push(ours.measure(load, requests)?);
            }
        }
        results.push((load, Medians::of(&kv_samples), Medians::of(&native_samples)));
    }
    drop(daemon);
    drop(native);
    eprintln!("bench net: bulk TCP, {} MiB", opts.bulk_mib);
    let (bulk_host, bulk_guest) = bulk(&shim, &netcheck.path, opts.bulk_mib)?;

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
    for (load, k, n) in &results {
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
            k.exits.map_or("-".to_owned(), |e| format!("{e:.3}")),
            k.cpu_us,
            n.cpu_us,
        );
    }
    let p50 = |v: &[(Load, Medians, Medians)]| {
        v.iter()
            .map(|(l, k, n)| format!("{} SET {:.3}/{:.3} ms", l.label(), k.set_p50, n.set_p50))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\n- SET p50 kv/native: {}\n- requests per run: -n {} at `-c 1`, {} at `-c 20`/`-c 50`, \
         {} pipelined; host CPU is the whole shim daemon (network thread, vCPU thread) \
         or redis-server\n- kv image: {} (target ≤ 1 MiB)\n- bulk TCP host → guest through \
         a published port, {} MiB: {bulk_host:.0} MB/s end to end (the guest counted \
         {bulk_guest:.0} MB/s)",
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
