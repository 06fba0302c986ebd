//! `cargo xtask bench limits`: what hostile API callers can make a real `host-shim serve`
//! hold, and how quickly it refuses them (the figures of the README's "Threat model and
//! limits"), each attack on a fresh daemon with its default limits:
//!
//! - [`CONNECTIONS`] connections, half idle and half with a request head whose body never
//!   comes: the daemon's threads (from `/proc/PID/task`) before and at their peak, and
//!   `GET /v1/info` timed among them;
//! - [`HANDSHAKES`] half TLS handshakes on a daemon with an identity: peak threads, and when
//!   the last one was cut (`--handshake-timeout`, 10 s);
//! - [`BODIES`] request bodies of 16 MiB at once: the daemon's peak RSS (`VmHWM`) and how
//!   many were refused (`--max-request-memory`, 64M);
//! - a slow loris (a byte every 0.5 s) against `--request-timeout 5s`: when it was cut;
//! - `/dev/zero` as an image: the time to the 400;
//! - the daemon out of file descriptors (`prlimit`) with connections waiting: its CPU time
//!   and `accept failed` warnings over [`NO_FDS`].
//! - [`FOLLOWERS`] console followers (`logs --follow`) that never read while the `hostile`
//!   app floods its console: the daemon's RSS growth over [`FOLLOW_WATCH`], and whether they
//!   were cut.
//!
//! Prints a markdown table with each bound; fails if one is exceeded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use api::{Client, ClientError, RunRequest};

use super::migrate::{Daemon, TempDir};
use super::net::cpu_seconds;
use super::{median, require};
use crate::image;
use crate::workspace::Workspace;

/// Idle and half-sent connections held at once.
const CONNECTIONS: usize = 500;
/// Half TLS handshakes held at once.
const HANDSHAKES: usize = 300;
/// Request bodies of [`api::server::MAX_BODY`] sent at once.
const BODIES: usize = 40;
/// `serve`'s defaults these attacks run against.
const MAX_CONNECTIONS: usize = api::limits::DEFAULT_MAX_CONNECTIONS;
const HANDSHAKE_TIMEOUT: Duration = api::limits::DEFAULT_HANDSHAKE_TIMEOUT;
const MAX_REQUEST_MEMORY_MIB: u64 = api::limits::DEFAULT_MAX_REQUEST_MEMORY >> 20;
/// The request deadline the slow loris runs against.
const LORIS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon is kept out of file descriptors.
const NO_FDS: Duration = Duration::from_secs(5);
/// How long thread counts are watched after a flood.
const WATCH: Duration = Duration::from_secs(3);
/// Console followers that never read.
const FOLLOWERS: usize = 4;
/// How long the stalled followers are watched: past the 10 s a follower with a full queue
/// has before it is cut.
const FOLLOW_WATCH: Duration = Duration::from_secs(15);
/// What one stalled follower may hold: its queue of lines (`daemon::logs::QUEUE`, 1,024)
/// of at most `vmm::console::MAX_LINE` (4 KiB) each, with 64 bytes of overhead a line.
const FOLLOWER_BYTES: u64 = 1024 * (4096 + 64);
/// The daemon's RSS growth allowed on top of its followers' queues (as the test's bound).
const FOLLOW_SLACK_MIB: u64 = 48;
/// How quickly a call the daemon should answer at once must come back on a loaded host.
const QUICK: Duration = Duration::from_secs(1);
/// Threads a daemon may start beyond one per connection slot (the accept loop, the reaper).
const SPARE_THREADS: usize = 4;

/// Options of `bench limits`.
#[derive(Debug)]
pub struct LimitsOptions {
    /// Timed `GET /v1/info` calls and `/dev/zero` refusals.
    pub runs: usize,
}

/// One row of the table: what was done, what was measured, the bound, and whether it held.
struct Row {
    attack: String,
    measured: String,
    bound: String,
    held: bool,
}

fn threads(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("reading /proc/{pid}/task"))?
        .count())
}

/// The most threads `pid` had, sampled every 20 ms over `period`.
fn peak_threads(pid: u32, period: Duration) -> Result<usize> {
    let start = Instant::now();
    let mut most = 0;
    while start.elapsed() < period {
        most = most.max(threads(pid)?);
        thread::sleep(Duration::from_millis(20));
    }
    Ok(most)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Waits until the plain daemon answers `GET /v1/info` (it listens before all its threads run).
fn serving(d: &Daemon) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Client::new(&d.addr).info().is_err() {
        if Instant::now() > deadline {
            bail!("{} never answered GET /v1/info:\n{}", d.name, d.output());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn connect(addr: &str) -> Result<TcpStream> {
    let c = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(c)
}

/// Whether the daemon closed `c` (EOF or a reset) within its read timeout.
fn closed(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

fn idle_connections(shim: &Path, dir: &TempDir, runs: usize) -> Result<Vec<Row>> {
    let d = Daemon::start(shim, "conns", 1, &dir.0)?;
    serving(&d)?;
    let pid = d.pid();
    let base = threads(pid)?;
    let mut held = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut c = connect(&d.addr)?;
        if i % 2 == 1 {
            // A head announcing a body that never comes.
            c.write_all(b"POST /v1/instances HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")?;
        }
        held.push(c);
    }
    let most = peak_threads(pid, WATCH)?;
    let mut took = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        Client::new(&d.addr)
            .info()
            .context("GET /v1/info among the idle connections")?;
        took.push(ms(t.elapsed()));
    }
    drop(held);
    let bound = base + MAX_CONNECTIONS + SPARE_THREADS;
    Ok(vec![
        Row {
            attack: format!(
                "{CONNECTIONS} connections held open, half idle, half with a body that never \
                 comes (`--max-connections {MAX_CONNECTIONS}`)"
            ),
            measured: format!("daemon threads {base} before, {most} at the peak"),
            bound: format!("≤ {bound} (before + {MAX_CONNECTIONS} + {SPARE_THREADS})"),
            held: most <= bound,
        },
        quick_row(
            format!("`GET /v1/info` among them ({runs} calls)"),
            "",
            &took,
            "idle connections make room",
        ),
    ])
}

fn half_handshakes(shim: &Path, dir: &TempDir) -> Result<Row> {
    let d = Daemon::secure(shim, "tls", 2, &dir.0, &[])?;
    // The identity's own CLI call is the readiness check (TLS, pin and token from its dir).
    d.cli(&["list"]).context("the secure daemon's first call")?;
    let pid = d.pid();
    let base = threads(pid)?;
    let start = Instant::now();
    let mut conns = Vec::with_capacity(HANDSHAKES);
    for _ in 0..HANDSHAKES {
        let mut c = connect(&d.addr)?;
        // The first bytes of a TLS record holding a ClientHello, and no more.
        c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])?;
        conns.push(c);
    }
    let opened = start.elapsed();
    let most = peak_threads(pid, WATCH)?;
    let mut open = 0;
    for c in &mut conns {
        if !closed(c) {
            open += 1;
        }
    }
    // Each connection's deadline counts from its accept: the last one's from about `opened`.
    let last = start.elapsed().saturating_sub(opened);
    d.cli(&["list"])
        .context("the secure daemon after the half handshakes")?;
    let bound = base + MAX_CONNECTIONS + SPARE_THREADS;
    let deadline = HANDSHAKE_TIMEOUT + Duration::from_secs(5);
    Ok(Row {
        attack: format!(
            "{HANDSHAKES} half TLS handshakes (`--handshake-timeout {}s`)",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        measured: format!(
            "daemon threads {base} before, {most} at the peak; {} of {HANDSHAKES} cut (opened \
             in {:.2} s), the last {:.2} s after the last was opened",
            HANDSHAKES - open,
            opened.as_secs_f64(),
            last.as_secs_f64()
        ),
        bound: format!("≤ {bound} threads; all cut by the deadline"),
        held: most <= bound && open == 0 && last < deadline,
    })
}

/// Sends one request of `MAX_BODY` bytes: the daemon's status (0: it closed without one).
fn big_body(addr: &str) -> Result<u16> {
    let n = api::server::MAX_BODY;
    let mut c = connect(addr)?;
    c.write_all(
        format!("POST /v1/instances HTTP/1.1\r\nHost: bench\r\nContent-Length: {n}\r\n\r\n")
            .as_bytes(),
    )?;
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..n / chunk.len() {
        // A refused request's connection may close before the body is in.
        if c.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut reply = Vec::new();
    let _ = c.read_to_end(&mut reply);
    let status = String::from_utf8_lossy(&reply)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(status)
}

fn bodies(shim: &Path, dir: &TempDir) -> Result<Row> {
    let d = Daemon::start(shim, "bodies", 3, &dir.0)?;
    serving(&d)?;
    let pid = d.pid();
    let before = super::density::proc_status_kib(pid, "VmRSS:")?;
    let senders: Vec<_> = (0..BODIES)
        .map(|_| {
            let addr = d.addr.clone();
            thread::spawn(move || big_body(&addr))
        })
        .collect();
    let mut statuses = Vec::new();
    for s in senders {
        statuses.push(
            s.join()
                .map_err(|_| anyhow::anyhow!("a sender panicked"))??,
        );
    }
    let peak = super::density::proc_status_kib(pid, "VmHWM:")?;
    Client::new(&d.addr)
        .info()
        .context("GET /v1/info after the bodies")?;
    let busy = statuses.iter().filter(|&&s| s == 503).count();
    let read = statuses.iter().filter(|&&s| s == 400).count();
    let cut = statuses.iter().filter(|&&s| s == 0).count();
    let growth_mib = peak.saturating_sub(before) as f64 / 1024.0;
    let bound = MAX_REQUEST_MEMORY_MIB as f64 + 32.0;
    Ok(Row {
        attack: format!(
            "{BODIES} × 16 MiB request bodies at once (`--max-request-memory \
             {MAX_REQUEST_MEMORY_MIB}M`)"
        ),
        measured: format!(
            "daemon RSS {:.1} MiB before, peak {:.1} MiB (+{growth_mib:.1}); {read} read and \
             refused (400: not a request), {busy} refused at once (503), {cut} closed without \
             a status",
            before as f64 / 1024.0,
            peak as f64 / 1024.0,
        ),
        bound: format!("growth ≤ {bound:.0} MiB (the budget + 32 MiB)"),
        held: growth_mib <= bound && busy + read + cut == BODIES,
    })
}

fn slow_loris(shim: &Path, dir: &TempDir) -> Result<Row> {
    let secs = LORIS_TIMEOUT.as_secs();
    let d = Daemon::start_with(
        shim,
        "loris",
        4,
        &dir.0,
        &["--request-timeout", &format!("{secs}s")],
    )?;
    serving(&d)?;
    let mut c = connect(&d.addr)?;
    c.set_read_timeout(Some(Duration::from_millis(500)))?;
    let start = Instant::now();
    c.write_all(b"GET /v1/info HTTP/1.1\r\n")?;
    let cut = loop {
        if start.elapsed() > LORIS_TIMEOUT * 4 {
            bail!(
                "a client sending a byte every 0.5 s was not cut within {:?}",
                LORIS_TIMEOUT * 4
            );
        }
        if c.write_all(b"X").is_err() {
            break start.elapsed();
        }
        let mut buf = [0u8; 512];
        match c.read(&mut buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            _ => break start.elapsed(),
        }
    };
    Ok(Row {
        attack: format!("slow loris, a byte every 0.5 s (`--request-timeout {secs}s`)"),
        measured: format!("cut after {:.2} s", cut.as_secs_f64()),
        bound: format!("at the deadline ({secs} s), not before, and within 2 s of it"),
        // The deadline counts from the daemon's accept, a moment before `start`.
        held: cut + Duration::from_millis(50) >= LORIS_TIMEOUT
            && cut < LORIS_TIMEOUT + Duration::from_secs(2),
    })
}

fn dev_zero(shim: &Path, dir: &TempDir, runs: usize) -> Result<Row> {
    let d = Daemon::start(shim, "zero", 5, &dir.0)?;
    serving(&d)?;
    let client = Client::new(&d.addr);
    let req = RunRequest {
        name: "zero".into(),
        image: "/dev/zero".into(),
        mem: 64 << 20,
        ..RunRequest::default()
    };
    let mut took = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        match client.run(&req) {
            Err(ClientError::Api {
                status: 400,
                message,
            }) if message.contains("regular file") => took.push(ms(t.elapsed())),
            other => bail!("/dev/zero as an image: expected a 400, got {other:?}"),
        }
    }
    Ok(quick_row(
        format!("`/dev/zero` as an image ({runs} runs)"),
        "400 \"not a regular file\" in ",
        &took,
        "refused before any read",
    ))
}

/// A row of answers that must each come within [`QUICK`]: `took` in ms.
fn quick_row(attack: String, what: &str, took: &[f64], why: &str) -> Row {
    let slowest = took.iter().copied().fold(0.0, f64::max);
    Row {
        attack,
        measured: format!(
            "{what}{:.2} ms median, {slowest:.2} ms slowest",
            median(took.to_vec())
        ),
        bound: format!("each within {} ms ({why})", QUICK.as_millis()),
        held: slowest < ms(QUICK),
    }
}

/// `prlimit --pid PID --nofile=LIMIT:` (the soft limit; the hard one stays).
fn set_nofile(pid: u32, limit: &str) -> Result<()> {
    let ok = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")])
        .status()
        .context("running prlimit (apt-get install util-linux)")?;
    if !ok.success() {
        bail!("prlimit --pid {pid} --nofile={limit}: failed ({ok})");
    }
    Ok(())
}

fn soft_nofile(pid: u32) -> Result<String> {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile", "--output", "SOFT"])
        .args(["--noheadings", "--raw"])
        .output()
        .context("running prlimit (apt-get install util-linux)")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn out_of_fds(shim: &Path, dir: &TempDir) -> Result<Row> {
    let d = Daemon::start(shim, "fds", 6, &dir.0)?;
    serving(&d)?;
    let pid = d.pid();
    let soft = soft_nofile(pid)?;
    // No new descriptor: 0, 1 and 2 are taken, new ones must be below 3.
    set_nofile(pid, "3")?;
    let held: Vec<TcpStream> = (0..40).map(|_| connect(&d.addr)).collect::<Result<_>>()?;
    let before = cpu_seconds(pid)?;
    thread::sleep(NO_FDS);
    let used = cpu_seconds(pid)? - before;
    let warnings = d.output().matches("accept failed").count();
    set_nofile(pid, &soft)?;
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Client::new(&d.addr).info().is_err() {
        if Instant::now() > deadline {
            bail!("the daemon did not serve again once it had descriptors");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let share = used / NO_FDS.as_secs_f64() * 100.0;
    Ok(Row {
        attack: format!(
            "{} s out of file descriptors, 40 connections waiting (`prlimit --nofile=3`)",
            NO_FDS.as_secs()
        ),
        measured: format!(
            "daemon CPU {:.0} ms ({share:.1} % of a core), {warnings} `accept failed` warning(s); \
             serves again once descriptors are back",
            used * 1e3
        ),
        bound: "≤ 5 % of a core; ≤ 1 warning per 10 s".into(),
        held: share <= 5.0 && (1..=1 + NO_FDS.as_secs() as usize / 10).contains(&warnings),
    })
}

fn stalled_followers(shim: &Path, dir: &TempDir, hostile: &Path) -> Result<Row> {
    let d = Daemon::start(shim, "follow", 7, &dir.0)?;
    serving(&d)?;
    let pid = d.pid();
    Client::new(&d.addr)
        .run(&RunRequest {
            name: "hostile".into(),
            image: hostile.to_string_lossy().into_owned(),
            mem: 64 << 20,
            args: vec!["console-flood".into()],
            ..RunRequest::default()
        })
        .context("running the hostile app")?;
    let rss = || super::density::proc_status_kib(pid, "VmRSS:");
    let before = rss()?;
    let mut followers = (0..FOLLOWERS)
        .map(|_| -> Result<TcpStream> {
            let mut c = connect(&d.addr)?;
            c.write_all(
                b"POST /v1/instances/hostile/logs/follow HTTP/1.1\r\nHost: bench\r\n\
                  Connection: Upgrade\r\nUpgrade: host-shim-progress\r\nContent-Length: 0\r\n\r\n",
            )?;
            Ok(c) // never read until the end
        })
        .collect::<Result<Vec<_>>>()?;
    let start = Instant::now();
    let mut peak = before;
    while start.elapsed() < FOLLOW_WATCH {
        peak = peak.max(rss()?);
        thread::sleep(Duration::from_millis(100));
    }
    Client::new(&d.addr)
        .info()
        .context("GET /v1/info with stalled followers")?;
    let mut cut = 0;
    for c in &mut followers {
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        if closed(c) {
            cut += 1;
        }
    }
    let growth_mib = peak.saturating_sub(before) as f64 / 1024.0;
    let bound =
        (FOLLOWERS as u64 * FOLLOWER_BYTES) as f64 / f64::from(1 << 20) + FOLLOW_SLACK_MIB as f64;
    Ok(Row {
        attack: format!(
            "{FOLLOWERS} `logs --follow` clients that never read while the guest floods its \
             console"
        ),
        measured: format!(
            "daemon RSS {:.1} MiB before, peak {:.1} MiB (+{growth_mib:.1}) over {} s; {cut} of \
             {FOLLOWERS} cut",
            before as f64 / 1024.0,
            peak as f64 / 1024.0,
            FOLLOW_WATCH.as_secs()
        ),
        bound: format!(
            "growth ≤ {bound:.0} MiB ({FOLLOWERS} × the queue + {FOLLOW_SLACK_MIB} MiB); all cut"
        ),
        held: growth_mib <= bound && cut == FOLLOWERS,
    })
}

pub fn run(ws: &Workspace, opts: &LimitsOptions) -> Result<()> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    require("prlimit", "util-linux")?;
    let hostile = image::build_images(ws, &[ws.app("hostile")?], image::Profile::Release)?;
    let shim = image::build_shim(ws)?;
    let dir = TempDir::new("limits")?;
    let mut rows = Vec::new();
    eprintln!("bench limits: {CONNECTIONS} idle and half-sent connections");
    rows.extend(idle_connections(&shim, &dir, opts.runs)?);
    eprintln!("bench limits: {HANDSHAKES} half TLS handshakes");
    rows.push(half_handshakes(&shim, &dir)?);
    eprintln!("bench limits: {BODIES} big request bodies");
    rows.push(bodies(&shim, &dir)?);
    eprintln!("bench limits: slow loris");
    rows.push(slow_loris(&shim, &dir)?);
    eprintln!("bench limits: /dev/zero as an image");
    rows.push(dev_zero(&shim, &dir, opts.runs)?);
    eprintln!("bench limits: out of file descriptors");
    rows.push(out_of_fds(&shim, &dir)?);
    eprintln!("bench limits: {FOLLOWERS} stalled console followers");
    rows.push(stalled_followers(&shim, &dir, &hostile[0].path)?);

    println!(
        "### What hostile callers can make a daemon hold (release host-shim serve, default limits)\n"
    );
    println!("| attack | measured | bound | held |\n|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} |",
            r.attack,
            r.measured,
            r.bound,
            if r.held { "yes" } else { "**no**" }
        );
    }
    println!("\nload average: {}", super::net::load_average());
    let broken: Vec<&str> = rows
        .iter()
        .filter(|r| !r.held)
        .map(|r| r.attack.as_str())
        .collect();
    if !broken.is_empty() {
        bail!("bounds exceeded: {}", broken.join("; "));
    }
    Ok(())
}
