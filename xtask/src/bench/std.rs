//! `cargo xtask bench std`: an ordinary std program (`apps/std-echo`, threads and
//! `std::net::TcpListener`) in our image vs the same source as a native Linux process.
//!
//! - sizes: the std-echo image, the no_std `hello` image, the native binary;
//! - boot (or spawn) to the first echo reply through a published port (medians of `runs`);
//! - echo round trips with `clients` connections at once: requests/s and p99 latency,
//!   image vs native, interleaved over `rounds`;
//! - live migration downtime of std-echo between two shim daemons while a client keeps
//!   echoing on one connection (the client's longest gap between replies too).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::migrate::{parse_output, Daemon, TempDir};
use super::{free_port, median, Guard};
use crate::image::{self, Profile};
use crate::workspace::{self, Workspace};

const APP: &str = "std-echo";
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

    /// Connects and gets one reply, retrying until `UP_TIMEOUT`.
    fn when_up(port: u16, server: &mut Guard) -> Result<Self> {
        let deadline = Instant::now() + UP_TIMEOUT;
        loop {
            if let Some(status) = server.0.try_wait()? {
                bail!("the server exited ({status}) before answering");
            }
            if let Ok(mut c) = Self::connect(port) {
                if c.ask("ping").is_ok() {
                    return Ok(c);
                }
            }
            if Instant::now() > deadline {
                bail!("no reply on port {port} within {UP_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// How to start one server on a port.
enum Server<'a> {
    Image { shim: &'a Path, image: &'a Path },
    Native { binary: &'a Path },
}

impl Server<'_> {
    fn spawn(&self, port: u16) -> Result<Guard> {
        let mut cmd = match self {
            Server::Image { shim, image } => {
                let mut c = Command::new(shim);
                c.arg("run")
                    .arg(image)
                    .args(["--publish", &format!("{port}:7"), "--timeout", "600"])
                    .args(["--", "--port", "7"]);
                c
            }
            Server::Native { binary } => {
                let mut c = Command::new(binary);
                c.args(["--port", &port.to_string()]);
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

    fn name(&self) -> &'static str {
        match self {
            Server::Image { .. } => "std-echo image (host-shim)",
            Server::Native { .. } => "std-echo native Linux process",
        }
    }
}

/// Spawn to first reply, in ms.
fn first_reply_ms(server: &Server) -> Result<f64> {
    let port = free_port()?;
    let start = Instant::now();
    let mut guard = server.spawn(port)?;
    Client::when_up(port, &mut guard)?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
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

/// Migrates std-echo A -> B -> A ... under a one-connection echo load: (downtimes, gaps) in ms.
fn migrations(shim: &Path, image: &Path, runs: usize) -> Result<(Vec<f64>, f64)> {
    let dir = TempDir::new("std-migrate")?;
    let a = Daemon::start(shim, "std-a", 1, &dir.0)?;
    let b = Daemon::start(shim, "std-b", 2, &dir.0)?;
    let port = free_port()?;
    let img = image.to_string_lossy().into_owned();
    a.cli(&[
        "run",
        &img,
        "--name",
        "echo",
        "--publish",
        &format!("{port}:7"),
    ])?;
    let deadline = Instant::now() + UP_TIMEOUT;
    let mut client = loop {
        if let Ok(mut c) = Client::connect(port) {
            if c.ask("ping").is_ok() {
                break c;
            }
        }
        if Instant::now() > deadline {
            bail!("std-echo did not answer under the daemon");
        }
        thread::sleep(Duration::from_millis(20));
    };
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
    let mut downtimes = Vec::new();
    for i in 0..runs {
        let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        thread::sleep(Duration::from_millis(300));
        let out = from.cli(&["migrate", "echo", "--to", &to.addr, "--json"])?;
        downtimes.push(parse_output(&out)?.downtime_ms);
    }
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let gap = loader
        .join()
        .map_err(|_| anyhow::anyhow!("load client panicked"))?
        .context("the client under load failed")?;
    Ok((downtimes, gap))
}

pub fn run(ws: &Workspace, opts: &StdOptions) -> Result<()> {
    if opts.runs == 0 || opts.rounds == 0 || opts.clients == 0 || opts.requests == 0 {
        bail!("--runs, --rounds, --clients and --requests must be at least 1");
    }
    let images = image::build_images(ws, &[ws.app(APP)?, ws.app("hello")?], Profile::Release)?;
    let shim = image::build_shim(ws)?;
    workspace::run(ws.cargo().args(["build", "--release", "-p", APP]))
        .context("building std-echo natively")?;
    let native = ws.target_dir.join("release").join(APP);
    let img = &images[0].path;
    let servers = [
        Server::Image {
            shim: &shim,
            image: img,
        },
        Server::Native { binary: &native },
    ];

    println!("### std apps: {APP} as an image vs as a native process\n");
    println!("| binary | size |\n|---|---:|");
    for image in &images {
        println!("| {}.img | {} |", image.app, image::kib(image.size));
    }
    println!(
        "| native {APP} (Linux, release) | {} |",
        image::kib(std::fs::metadata(&native)?.len())
    );

    let mut boot: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for run in 0..opts.runs {
        eprintln!("bench std: boot run {}/{}", run + 1, opts.runs);
        for (i, s) in servers.iter().enumerate() {
            boot[i].push(first_reply_ms(s)?);
        }
    }
    let mut load: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..opts.rounds {
        eprintln!("bench std: load round {}/{}", round + 1, opts.rounds);
        for (i, s) in servers.iter().enumerate() {
            let port = free_port()?;
            let mut guard = s.spawn(port)?;
            Client::when_up(port, &mut guard)?;
            load[i].push(
                echo_load(port, opts.clients, opts.requests)
                    .with_context(|| format!("echo load on the {}", s.name()))?,
            );
        }
    }
    println!(
        "\n| server | spawn to first reply, ms (median of {}) | echo req/s, {} connections (median of {}) | p99 latency, ms |",
        opts.runs, opts.clients, opts.rounds
    );
    println!("|---|---:|---:|---:|");
    let mut rps = [0.0; 2];
    for (i, s) in servers.iter().enumerate() {
        rps[i] = median(load[i].iter().map(|l| l.0).collect());
        println!(
            "| {} | {:.1} | {:.0} | {:.2} |",
            s.name(),
            median(boot[i].clone()),
            rps[i],
            median(load[i].iter().map(|l| l.1).collect())
        );
    }
    println!(
        "\nimage/native throughput: {:.2}x (target >= 0.5x); Hermit's published uhyve hello: 60 ms to first output",
        rps[0] / rps[1]
    );

    eprintln!("bench std: migrations");
    let (downtimes, gap) = migrations(&shim, img, opts.runs)?;
    println!("\n| live migration of {APP} under echo load | median | min–max |\n|---|---:|---:|");
    let (min, max) = downtimes
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), &d| (lo.min(d), hi.max(d)));
    println!(
        "| downtime, ms ({} migrations A↔B) | {:.2} | {min:.2}–{max:.2} |",
        downtimes.len(),
        median(downtimes.clone())
    );
    println!("| client's longest gap between replies, ms | {gap:.1} | |");
    Ok(())
}
