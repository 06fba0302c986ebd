//! `cargo xtask bench std`: an ordinary std program (`apps/std-echo`, threads and
//! `std::net::TcpListener`) in our image vs the same source as a native Linux process.
//!
//! - sizes: the std-echo image, the no_std `hello` image, the native binary;
//! - boot (or spawn) to the first echo reply through a published port (medians of `runs`);
//! - echo round trips with `clients` connections at once: requests/s and p99 latency,
//!   image vs native, interleaved over `rounds`;
//! - timeslices: round trips on one connection while another thread spins without one ABI
//!   call (`--spin`; only the monitor's 10 ms timeslice timer takes the vCPU back), vs without
//!   it and vs native; and the host CPU of an idle image (one thread listening);
//! - live migration downtime of std-echo between two shim daemons while a client keeps
//!   echoing on one connection (the client's longest gap between replies too);
//! - the same for `apps/axum-hello` (axum + tokio) with `wrk` as the client: sizes, boot
//!   (or spawn) to the first HTTP reply, `wrk` requests/s and p99 at `clients`
//!   connections, and migration downtime while `wrk` runs.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::migrate::{parse_output, Daemon, TempDir, SETTLE};
use super::net::cpu_seconds;
use super::{free_port, median, Guard};
use crate::image::{self, Profile};
use crate::workspace::{self, Workspace};

const APP: &str = "std-echo";
const AXUM: &str = "axum-hello";
/// The port the servers listen on inside the guest.
const GUEST_PORT: u16 = 7;
/// Length of one `wrk` measurement.
const WRK_SECS: u64 = 5;
/// axum-hello's port when run without arguments (under the daemon).
const AXUM_PORT: u16 = 8080;
/// Round trips timed with and without a spinning thread.
const SPIN_ROUND_TRIPS: usize = 200;
/// How long an idle image's CPU time is measured.
const IDLE: Duration = Duration::from_secs(3);
/// How long a server may take to answer its first request.
const UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `bench std`.
#[derive(Debug)]
pub struct StdOptions {
    pub runs: usize,
    pub clients: usize,
    pub requests: usize,
    pub rounds: usize,
}

/// A line client of std-echo.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    fn ask(&mut self, line: &str) -> Result<String> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            bail!("connection closed");
        }
        Ok(reply)
    }

    /// A connection that got its reply to `ping`, if the server answers on `port` now.
    fn try_ping(port: u16) -> Option<Self> {
        let mut c = Self::connect(port).ok()?;
        c.ask("ping").is_ok().then_some(c)
    }
}

/// Retries `probe` every few ms until it gives a value, for at most `UP_TIMEOUT`; `probe`
/// fails at once when the server it waits for is gone.
fn until<T>(what: &str, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + UP_TIMEOUT;
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: no reply within {UP_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Fails if a spawned server exited.
fn alive(server: &mut Guard) -> Result<()> {
    match server.0.try_wait()? {
        Some(status) => bail!("the server exited ({status}) before answering"),
        None => Ok(()),
    }
}

/// How to start one server (std-echo or axum-hello, both take `--port`) on a port.
enum Server<'a> {
    Image { shim: &'a Path, image: &'a Path },
    Native { binary: &'a Path },
}

impl Server<'_> {
    /// Starts the server on `port` with `extra` arguments.
    fn spawn(&self, port: u16, extra: &[&str]) -> Result<Guard> {
        let mut cmd = match self {
            Server::Image { shim, image } => {
                let mut c = Command::new(shim);
                c.arg("run")
                    .arg(image)
                    .args(["--publish", &format!("{port}:{GUEST_PORT}")])
                    .args(["--timeout", "600"])
                    .args(["--", "--port", &GUEST_PORT.to_string()])
                    .args(extra);
                c
            }
            Server::Native { binary } => {
                let mut c = Command::new(binary);
                c.args(["--port", &port.to_string()]).args(extra);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the server")?;
        Ok(Guard(child))
    }

    fn name(&self, app: &str) -> String {
        match self {
            Server::Image { .. } => format!("{app} image (host-shim)"),
            Server::Native { .. } => format!("{app} native Linux process"),
        }
    }
}

/// Waits until a freshly spawned server on a port answers.
type Up = fn(u16, &mut Guard) -> Result<()>;

/// Spawn to first reply (as `up` sees it), in ms.
fn first_reply_ms(server: &Server, up: Up) -> Result<f64> {
    let port = free_port()?;
    let start = Instant::now();
    let mut guard = server.spawn(port, &[])?;
    up(port, &mut guard)?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// A connection to a freshly spawned std-echo that got its first reply.
fn echo_client(port: u16, server: &mut Guard) -> Result<Client> {
    until(&format!("{APP} on port {port}"), || {
        alive(server)?;
        Ok(Client::try_ping(port))
    })
}

fn echo_up(port: u16, server: &mut Guard) -> Result<()> {
    echo_client(port, server).map(drop)
}

/// Whether `GET /json` on `port` answers 200.
fn http_ok(port: u16) -> bool {
    let get = || -> Result<bool> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /json HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply)?;
        Ok(reply.starts_with("HTTP/1.1 200"))
    };
    get().unwrap_or(false)
}

/// Waits until axum-hello answers `GET /json` (`UP_TIMEOUT`).
fn http_up(port: u16, server: &mut Guard) -> Result<()> {
    until(&format!("axum-hello on port {port}"), || {
        alive(server)?;
        Ok(http_ok(port).then_some(()))
    })
}

/// What one `wrk` run measured.
struct Wrk {
    rps: f64,
    p99_ms: f64,
    /// Connect, read, write and timeout errors, and non-2xx replies.
    errors: u64,
}

/// `wrk` with `conns` connections for `secs` s on `GET /json`.
fn wrk(port: u16, conns: usize, secs: u64) -> Result<Wrk> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
        ])
        .arg(format!("http://127.0.0.1:{port}/json"))
        .stdin(Stdio::null())
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed ({}): {text}", out.status);
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let rps = field("Requests/sec:")?.parse().ok()?;
    let p99 = field("99%")?;
    // Units per ms.
    let (num, per_ms) = if let Some(v) = p99.strip_suffix("us") {
        (v, 1e3)
    } else if let Some(v) = p99.strip_suffix("ms") {
        (v, 1.0)
    } else {
        (p99.strip_suffix('s')?, 1e-3)
    };
    let p99_ms = num.parse::<f64>().ok()? / per_ms;
    let mut errors = field("Non-2xx or 3xx responses:").map_or(Some(0), |v| v.parse().ok())?;
    if let Some(socket) = field("Socket errors:") {
        // "connect 0, read 0, write 0, timeout 0"
        for part in socket.split(',') {
            errors += part.split_whitespace().nth(1)?.parse::<u64>().ok()?;
        }
    }
    Some(Wrk {
        rps,
        p99_ms,
        errors,
    })
}

/// `clients` connections, `requests` round trips each: (requests/s, p99 in ms).
fn echo_load(port: u16, clients: usize, requests: usize) -> Result<(f64, f64)> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Client::connect(port)?);
    }
    let start = Instant::now();
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            thread::spawn(move || -> Result<Vec<f64>> {
                let mut lat = Vec::with_capacity(requests);
                for i in 0..requests {
                    let t = Instant::now();
                    let reply = c.ask(&format!("request {i:08}"))?;
                    if !reply.ends_with(&format!(": request {i:08}\n")) {
                        bail!("wrong reply {reply:?}");
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let p99 = all[(all.len() * 99 / 100).min(all.len() - 1)];
    Ok((all.len() as f64 / secs, p99))
}

/// Two daemons on loopback, an app running on the first, published on `port`.
struct Pair {
    _dir: TempDir,
    a: Daemon,
    b: Daemon,
    port: u16,
}

impl Pair {
    /// Runs `image` on the first daemon as `name`, published on a port of ours to
    /// `guest_port`; returns `probe`'s first answer through it too (`probe` gets the port).
    fn start<T>(
        shim: &Path,
        image: &Path,
        (name, guest_port): (&str, u16),
        shim_ids: (u8, u8),
        mut probe: impl FnMut(u16) -> Option<T>,
    ) -> Result<(Self, T)> {
        let dir = TempDir::new(&format!("{name}-migrate"))?;
        let a = Daemon::start(shim, &format!("{name}-a"), shim_ids.0, &dir.0)?;
        let b = Daemon::start(shim, &format!("{name}-b"), shim_ids.1, &dir.0)?;
        let port = free_port()?;
        let img = image.to_string_lossy().into_owned();
        let publish = format!("{port}:{guest_port}");
        a.cli(&["run", &img, "--name", name, "--publish", &publish])?;
        let first = until(&format!("{name} under the daemon"), || Ok(probe(port)))?;
        let pair = Self {
            _dir: dir,
            a,
            b,
            port,
        };
        Ok((pair, first))
    }

    /// Migrates `name` A -> B -> A ... `runs` times, `settle` before each and after the
    /// last: downtimes in ms.
    fn migrate(&self, name: &str, runs: usize, settle: Duration) -> Result<Vec<f64>> {
        let mut downtimes = Vec::with_capacity(runs);
        for i in 0..runs {
            let (from, to) = if i % 2 == 0 {
                (&self.a, &self.b)
            } else {
                (&self.b, &self.a)
            };
            thread::sleep(settle);
            let out = from.cli(&["migrate", name, "--to", &to.addr, "--json"])?;
            downtimes.push(parse_output(&out)?.downtime_ms);
        }
        thread::sleep(settle);
        Ok(downtimes)
    }
}

/// Migrates std-echo A -> B -> A ... under a one-connection echo load: (downtimes, the
/// client's longest gap between replies) in ms.
fn migrations(shim: &Path, image: &Path, runs: usize) -> Result<(Vec<f64>, f64)> {
    let (pair, mut client) =
        Pair::start(shim, image, ("echo", GUEST_PORT), (1, 2), Client::try_ping)?;
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let stop = stop.clone();
        thread::spawn(move || -> Result<f64> {
            let mut gap = Duration::ZERO;
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                client.ask("load")?;
                gap = gap.max(last.elapsed());
                last = Instant::now();
            }
            Ok(gap.as_secs_f64() * 1e3)
        })
    };
    // Migrate even when the client fails meanwhile, so that its error is the one reported.
    let downtimes = pair.migrate("echo", runs, SETTLE);
    stop.store(true, Ordering::Relaxed);
    let gap = loader
        .join()
        .map_err(|_| anyhow::anyhow!("load client panicked"))?
        .context("the client under load failed")?;
    Ok((downtimes?, gap))
}

/// The image and the native binary of one app.
struct Built {
    image: PathBuf,
    native: PathBuf,
}

impl Built {
    fn servers<'a>(&'a self, shim: &'a Path) -> [Server<'a>; 2] {
        [
            Server::Image {
                shim,
                image: &self.image,
            },
            Server::Native {
                binary: &self.native,
            },
        ]
    }
}

/// What [`image_vs_native`] measures of one app.
struct Comparison<'a, L> {
    app: &'static str,
    /// Said of the app in the table's title.
    what: &'static str,
    /// More images whose sizes are shown (for scale).
    also: &'a [&'static str],
    up: (Up, &'static str),
    load_label: String,
    load: L,
    /// Printed after the throughput ratio.
    note: &'static str,
}

/// Builds `c.app` as an image and natively, prints their sizes and [`compare`]'s table and
/// the image/native throughput.
fn image_vs_native<L: Fn(u16) -> Result<(f64, f64)>>(
    ws: &Workspace,
    shim: &Path,
    opts: &StdOptions,
    c: Comparison<L>,
) -> Result<Built> {
    let apps = std::iter::once(c.app)
        .chain(c.also.iter().copied())
        .map(|a| ws.app(a))
        .collect::<Result<Vec<_>>>()?;
    let images = image::build_images(ws, &apps, Profile::Release)?;
    workspace::run(ws.cargo().args(["build", "--release", "-p", c.app]))
        .with_context(|| format!("building {} natively", c.app))?;
    let built = Built {
        image: images[0].path.clone(),
        native: ws.target_dir.join("release").join(c.app),
    };
    println!(
        "\n### std apps: {} ({}) as an image vs as a native process\n",
        c.app, c.what
    );
    println!("| binary | size |\n|---|---:|");
    for image in &images {
        println!("| {}.img | {} |", image.app, image::kib(image.size));
    }
    println!(
        "| native {} (Linux, release) | {} |",
        c.app,
        image::kib(std::fs::metadata(&built.native)?.len())
    );
    let ratio = compare(
        c.app,
        &built.servers(shim),
        opts,
        c.up,
        &c.load_label,
        c.load,
    )?;
    println!(
        "\nimage/native throughput: {ratio:.2}x (target >= 0.5x){}",
        c.note
    );
    Ok(built)
}

pub fn run(ws: &Workspace, opts: &StdOptions) -> Result<()> {
    if opts.runs == 0 || opts.rounds == 0 || opts.clients == 0 || opts.requests == 0 {
        bail!("--runs, --rounds, --clients and --requests must be at least 1");
    }
    let shim = image::build_shim(ws)?;
    let echo = image_vs_native(
        ws,
        &shim,
        opts,
        Comparison {
            app: APP,
            what: "threads, std::net",
            also: &["hello"],
            up: (echo_up, "spawn to first reply"),
            load_label: format!("echo req/s, {} connections", opts.clients),
            load: |port| echo_load(port, opts.clients, opts.requests),
            note: "; for scale, not measured here: Hermit publishes 60 ms from uhyve's start \
                   to its hello's first output",
        },
    )?;

    eprintln!("bench std: timeslices");
    timeslices(&echo.servers(&shim))?;

    eprintln!("bench std: migrations");
    let (downtimes, gap) = migrations(&shim, &echo.image, opts.runs)?;
    downtime_rows(&format!("{APP} under echo load"), &downtimes);
    println!("| client's longest gap between replies, ms | {gap:.1} | |");
    axum(ws, &shim, opts)
}

/// Echo round trips on one connection to std-echo, with and without a thread that spins
/// without one ABI call (`--spin`: only the monitor's timeslice timer takes the vCPU back
/// from it), image and native; and the image's idle CPU with one thread listening.
fn timeslices(servers: &[Server; 2]) -> Result<()> {
    println!(
        "\n| {APP}: {SPIN_ROUND_TRIPS} echo round trips on one connection | median, ms | p99, ms | slowest, ms |\n|---|---:|---:|---:|"
    );
    for (server, spin) in [
        (&servers[0], true),
        (&servers[0], false),
        (&servers[1], true),
    ] {
        let port = free_port()?;
        let mut guard = server.spawn(port, if spin { &["--spin"] } else { &[] })?;
        let mut c = echo_client(port, &mut guard)?;
        let mut took = Vec::with_capacity(SPIN_ROUND_TRIPS);
        for i in 0..SPIN_ROUND_TRIPS {
            let t = Instant::now();
            c.ask(&format!("line {i}"))?;
            took.push(t.elapsed().as_secs_f64() * 1e3);
        }
        took.sort_by(f64::total_cmp);
        let p99 = took[(took.len() * 99 / 100).min(took.len() - 1)];
        let slowest = took[took.len() - 1];
        let what = if spin {
            "while another thread spins without ABI calls"
        } else {
            "no other thread"
        };
        println!(
            "| {}, {what} | {:.2} | {p99:.2} | {slowest:.2} |",
            server.name(APP),
            median(took)
        );
    }
    // Idle: one thread waiting in accept, no timer armed.
    let port = free_port()?;
    let mut guard = servers[0].spawn(port, &[])?;
    echo_up(port, &mut guard)?;
    let pid = guard.0.id();
    let before = cpu_seconds(pid)?;
    thread::sleep(IDLE);
    let used = cpu_seconds(pid)? - before;
    println!(
        "\nidle: {}, one thread listening: {:.0} ms of host CPU in {} s",
        servers[0].name(APP),
        used * 1e3,
        IDLE.as_secs()
    );
    Ok(())
}

/// `app` as an image and as a native process, side by side: `opts.runs`
/// boots (spawn to first reply, as `up.0` sees it; `up.1` names it) and
/// `opts.rounds` rounds of `load` (req/s and p99 ms, on a fresh server
/// each, labelled `load_label`), printed as a table; returns image/native
/// throughput.
fn compare(
    app: &str,
    servers: &[Server; 2],
    opts: &StdOptions,
    up: (Up, &str),
    load_label: &str,
    load: impl Fn(u16) -> Result<(f64, f64)>,
) -> Result<f64> {
    let mut boot: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for run in 0..opts.runs {
        eprintln!("bench std: {app} boot run {}/{}", run + 1, opts.runs);
        for (i, s) in servers.iter().enumerate() {
            boot[i].push(first_reply_ms(s, up.0)?);
        }
    }
    let mut loads: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..opts.rounds {
        eprintln!("bench std: {app} load round {}/{}", round + 1, opts.rounds);
        for (i, s) in servers.iter().enumerate() {
            let port = free_port()?;
            let mut guard = s.spawn(port, &[])?;
            (up.0)(port, &mut guard)?;
            loads[i].push(load(port).with_context(|| format!("load on the {}", s.name(app)))?);
        }
    }
    println!(
        "\n| server | {}, ms (median of {}) | {load_label} (median of {}) | p99 latency, ms |",
        up.1, opts.runs, opts.rounds
    );
    println!("|---|---:|---:|---:|");
    let mut rps = [0.0; 2];
    for (i, s) in servers.iter().enumerate() {
        rps[i] = median(loads[i].iter().map(|l| l.0).collect());
        println!(
            "| {} | {:.1} | {:.0} | {:.2} |",
            s.name(app),
            median(boot[i].clone()),
            rps[i],
            median(loads[i].iter().map(|l| l.1).collect())
        );
    }
    Ok(rps[0] / rps[1])
}

/// The table of migration downtimes (`what` says of which app, under what).
fn downtime_rows(what: &str, downtimes: &[f64]) {
    println!("\n| live migration of {what} | median | min–max |\n|---|---:|---:|");
    let (min, max) = downtimes
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), &d| (lo.min(d), hi.max(d)));
    println!(
        "| downtime, ms ({} migrations A↔B) | {:.2} | {min:.2}–{max:.2} |",
        downtimes.len(),
        median(downtimes.to_vec())
    );
}

/// The axum rows: axum-hello as an image vs as a native process, with `wrk`.
fn axum(ws: &Workspace, shim: &Path, opts: &StdOptions) -> Result<()> {
    crate::setup::ensure(&[crate::setup::Tool {
        need: crate::setup::Need::Program("wrk"),
        package: "wrk",
        why: "HTTP load on axum-hello (bench std)",
    }])?;
    let built = image_vs_native(
        ws,
        shim,
        opts,
        Comparison {
            app: AXUM,
            what: "axum + tokio",
            also: &[],
            up: (http_up, "spawn to first HTTP reply"),
            load_label: format!("wrk req/s, {} connections, {WRK_SECS} s", opts.clients),
            load: |port| {
                let w = wrk(port, opts.clients, WRK_SECS)?;
                if w.errors > 0 {
                    bail!("wrk saw {} errors", w.errors);
                }
                Ok((w.rps, w.p99_ms))
            },
            note: "",
        },
    )?;

    eprintln!("bench std: {AXUM} migrations under wrk");
    let (downtimes, during) = axum_migrations(shim, &built.image, opts)?;
    downtime_rows(
        &format!("{AXUM} under wrk ({} connections)", opts.clients),
        &downtimes,
    );
    println!(
        "| wrk during the migrations: req/s, p99 ms, errors | {:.0} | {:.2} ms, {} errors |",
        during.rps, during.p99_ms, during.errors
    );
    Ok(())
}

/// Migrates axum-hello A -> B -> A ... while `wrk` loads it: (downtimes in ms, wrk's run).
fn axum_migrations(shim: &Path, image: &Path, opts: &StdOptions) -> Result<(Vec<f64>, Wrk)> {
    let (pair, ()) = Pair::start(shim, image, ("web", AXUM_PORT), (3, 4), |port| {
        http_ok(port).then_some(())
    })?;
    // wrk runs through all migrations: 1 s before each, 1 s after the last (and 1 s spare).
    let secs = opts.runs as u64 + 2;
    let (port, clients) = (pair.port, opts.clients);
    let load = thread::spawn(move || wrk(port, clients, secs));
    let downtimes = pair.migrate("web", opts.runs, Duration::from_secs(1));
    let during = load
        .join()
        .map_err(|_| anyhow::anyhow!("wrk thread panicked"))??;
    Ok((downtimes?, during))
}

#[cfg(test)]
mod tests {
    use super::parse_wrk;

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 5s test @ http://127.0.0.1:1/json
  2 threads and 50 connections
  Latency Distribution
     50%  475.00us
     99%    4.80ms
  241350 requests in 5.00s, 40.51MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  48270.05
";
        let w = parse_wrk(out).unwrap();
        assert_eq!(w.rps, 48270.05);
        assert_eq!(w.p99_ms, 4.8);
        assert_eq!(w.errors, 7);
        let w = parse_wrk("     99%  950.00us\nRequests/sec: 10\n").unwrap();
        assert_eq!((w.p99_ms, w.errors), (0.95, 0));
        assert!(parse_wrk("no numbers").is_none());
    }
}
