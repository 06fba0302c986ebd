//! `cargo xtask bench checkpoint`: app checkpoints of the kv unikernel.
//!
//! For 10k and 100k keys: the checkpoint's size (vs the raw key + value
//! bytes) and how long the app takes to hand it over (`host-shim checkpoint`
//! against a daemon); then the restore time, from process start to the
//! first PING reply and to the store fully loaded (`INFO persistence` says
//! `loading:0`; kv serves the checkpoint in place, so that is at once),
//! under our shim and under QEMU (TCG), each against a plain boot of the
//! same image under the same monitor. Then the cost of
//! `ACK_AFTER_CHECKPOINT=1` (every write acknowledged only once a
//! checkpoint holding it is on disk; incremental: deltas of the changed
//! keys, appended and fsynced): `redis-benchmark -t set -c 50` with a tiny
//! keyspace and with 10k random keys, against the same kv without it.
//! Last, crash recovery on another daemon: the same load against ack-mode
//! kv whose checkpoints go to a standby daemon, and the time from `kill -9`
//! of the origin daemon to the first PONG of kv restarted by the standby.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use api::{CheckpointRequest, Client};

use crate::image::{self, Profile};
use crate::workspace::Workspace;

use super::{free_port, median, require, Guard};
use crate::resp::ping;

/// Options of `bench checkpoint`.
#[derive(Debug)]
pub struct CheckpointOptions {
    /// Runs per restore/boot measurement.
    pub runs: usize,
}

/// Guest memory for every run (100k keys need room; the same for all).
const MEM: &str = "256M";

/// Waits for the first PING reply of `child`; returns the time since `start`.
fn until_pong(port: u16, child: &mut Guard, start: Instant, what: &str) -> Result<Duration> {
    while start.elapsed() < Duration::from_secs(60) {
        if let Some(status) = child.0.try_wait()? {
            bail!("{what} exited with {status} before answering");
        }
        if ping(port) {
            return Ok(start.elapsed());
        }
        thread::sleep(Duration::from_millis(2));
    }
    bail!("{what} did not answer PING on port {port} within 60 s")
}

fn value(i: usize) -> String {
    format!("value-{i}-{}", "x".repeat(i % 17))
}

/// SETs `n` keys with `redis-cli --pipe`; returns the raw key + value bytes.
fn load(port: u16, n: usize) -> Result<u64> {
    let mut batch = String::new();
    let mut raw = 0u64;
    for i in 0..n {
        let (k, v) = (format!("key:{i}"), value(i));
        raw += (k.len() + v.len()) as u64;
        batch.push_str(&format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
            k.len(),
            v.len()
        ));
    }
    let mut pipe = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("redis-cli --pipe")?;
    pipe.stdin.take().unwrap().write_all(batch.as_bytes())?;
    let out = pipe.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains(&format!("replies: {n}")) || !text.contains("errors: 0") {
        bail!("loading {n} keys failed: {text}");
    }
    Ok(raw)
}

/// Waits until kv says it has loaded its checkpoint (`INFO persistence`:
/// `loading:0`); returns the time since `start`.
fn until_loaded(port: u16, start: Instant) -> Result<Duration> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting to kv")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(60) {
        s.write_all(b"INFO persistence\r\n")?;
        let mut reply = Vec::new();
        // A bulk string: `$len\r\n`, then `len` bytes and `\r\n`.
        let complete = |r: &[u8]| {
            let Some(eol) = r.windows(2).position(|w| w == b"\r\n") else {
                return false;
            };
            let len: usize = std::str::from_utf8(&r[1..eol])
                .ok()
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            r.len() >= eol + 2 + len + 2
        };
        while !complete(&reply) {
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("kv closed the connection");
            }
            reply.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&reply);
        if text.contains("loading:0") {
            return Ok(start.elapsed());
        }
        if !text.contains("loading:1") {
            bail!("unexpected INFO persistence reply: {text}");
        }
        thread::sleep(Duration::from_millis(1));
    }
    bail!("kv did not finish loading its checkpoint within 60 s")
}

fn dbsize(port: u16) -> Result<usize> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "DBSIZE"])
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("DBSIZE")
}

/// What one key count measured.
struct Row {
    keys: usize,
    raw: u64,
    bytes: u64,
    checkpoint_ms: f64,
    /// (backend, plain boot ms, restore ms: first reply, fully loaded)
    restore: Vec<(&'static str, f64, Times)>,
}

/// Runs `image` as kv on `daemon` with `extra` flags, published on a free
/// port; returns the port once kv answers PING.
fn run_kv_on(daemon: &super::migrate::Daemon, image: &Path, extra: &[&str]) -> Result<u16> {
    let port = free_port()?;
    let image = image.to_str().context("image path")?;
    let publish = format!("127.0.0.1:{port}:6379");
    let args = [
        "run",
        image,
        "--name",
        "kv",
        "--mem",
        MEM,
        "--publish",
        &publish,
    ];
    daemon.cli(&[&args[..], extra].concat())?;
    let up = Instant::now();
    while !ping(port) {
        if up.elapsed() > Duration::from_secs(60) {
            bail!(
                "kv on daemon {} did not answer within 60 s:\n{}",
                daemon.name,
                daemon.output()
            );
        }
        thread::sleep(Duration::from_millis(2));
    }
    Ok(port)
}

/// Takes a checkpoint of kv with `n` keys through a daemon; writes it to `out`.
fn checkpoint(shim: &Path, image: &Path, n: usize, out: &Path) -> Result<(u64, u64, f64)> {
    // Up once its ready file says where it listens (port 0: no race for a port).
    let dir = out.parent().context("the checkpoint's directory")?;
    let daemon = super::migrate::Daemon::start_with(shim, "bench-ckpt", 1, dir, &["--no-overlay"])?;
    let api = daemon.addr.clone();
    let port = run_kv_on(&daemon, image, &[])?;
    let raw = load(port, n)?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let out = std::path::absolute(out)?;
        let info = Client::new(&api)
            .checkpoint(
                "kv",
                &CheckpointRequest {
                    out: out.display().to_string(),
                    timeout_ms: Some(60_000),
                },
            )
            .context("checkpoint of kv")?;
        let ms = info.ms;
        times.push(ms);
    }
    let bytes = std::fs::metadata(out)?.len();
    Ok((raw, bytes, median(times)))
}

/// Medians of a start: to the first reply, to the checkpoint fully loaded.
#[derive(Debug, Clone, Copy)]
struct Times {
    first: f64,
    loaded: f64,
}

/// `host-shim run kv.img EXTRA...` with its port 6379 published on `port`.
fn run_kv(shim: &Path, image: &Path, extra: &[&str], port: u16) -> Result<Guard> {
    Ok(Guard(
        Command::new(shim)
            .arg("run")
            .arg(image)
            .args(["--mem", MEM, "--publish"])
            .arg(format!("127.0.0.1:{port}:6379"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting host-shim")?,
    ))
}

/// Median times from process start to the first PING reply of `host-shim
/// run kv.img EXTRA...`, and to its checkpoint fully loaded, checking
/// DBSIZE is `keys` afterwards.
fn boot_time(shim: &Path, image: &Path, extra: &[&str], keys: usize, runs: usize) -> Result<Times> {
    let (mut times, mut loaded) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let port = free_port()?;
        let start = Instant::now();
        let mut child = run_kv(shim, image, extra, port)?;
        let t = until_pong(port, &mut child, start, "kv")?;
        let l = until_loaded(port, start)?;
        let n = dbsize(port)?;
        if n != keys {
            bail!("kv {extra:?} came up with {n} keys, not {keys}");
        }
        times.push(t.as_secs_f64() * 1e3);
        loaded.push(l.as_secs_f64() * 1e3);
    }
    Ok(Times {
        first: median(times),
        loaded: median(loaded),
    })
}

/// SET requests/s of `redis-benchmark -c 50` (keyspace `keys`, 0: one key)
/// against kv started with `extra`.
fn set_rps(shim: &Path, image: &Path, extra: &[&str], keys: usize) -> Result<f64> {
    let port = free_port()?;
    let mut child = run_kv(shim, image, extra, port)?;
    until_pong(port, &mut child, Instant::now(), "kv")?;
    bench_set(port, keys)
}

/// SET requests/s of `redis-benchmark -c 50` (keyspace `keys`, 0: one key)
/// against the kv on `port`.
fn bench_set(port: u16, keys: usize) -> Result<f64> {
    let mut cmd = Command::new("redis-benchmark");
    cmd.args([
        "-p",
        &port.to_string(),
        "-t",
        "set",
        "-n",
        "20000",
        "-c",
        "50",
        "--csv",
    ]);
    if keys > 0 {
        cmd.args(["-r", &keys.to_string()]);
    }
    let out = cmd.output().context("running redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("\"SET"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .with_context(|| {
            format!(
                "no SET figure in redis-benchmark's output ({}): {}{text}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// What one standby run measured.
struct StandbyRun {
    /// `kill -9` of the origin daemon → the first PONG on the published
    /// port, served by the standby.
    takeover_ms: f64,
    /// SET requests/s of ack-mode kv shipping to the standby: one key, 10k
    /// random keys; or why the benchmark failed.
    rps: Result<(f64, f64), String>,
}

/// Crash recovery on another daemon: a standby daemon B and an origin A
/// on loopback (default 2 s grace), kv on A with `--standby B` and
/// `ACK_AFTER_CHECKPOINT=1` (every write acknowledged once its checkpoint
/// is on B's disk). Measures ack-mode SET throughput, writes a marker,
/// kills A with SIGKILL and times the first PONG of kv restarted by B; the
/// marker must have survived.
fn standby_run(shim: &Path, image: &Path, dir: &Path, run: usize) -> Result<StandbyRun> {
    use super::migrate::Daemon;
    let b = Daemon::start(shim, &format!("standby-b{run}"), 2, dir)?;
    let a = Daemon::start(shim, &format!("origin-a{run}"), 1, dir)?;
    let port = run_kv_on(
        &a,
        image,
        &["--standby", &b.addr, "--env", "ACK_AFTER_CHECKPOINT=1"],
    )?;
    let rps = bench_set(port, 0)
        .and_then(|one| Ok((one, bench_set(port, 10_000)?)))
        .map_err(|e| {
            let said = a.cli(&["logs", "kv"]).unwrap_or_default();
            let why = said.lines().rfind(|l| l.contains("not acknowledging"));
            format!(
                "{e:#}{}",
                why.map(|l| format!(" [{l}]")).unwrap_or_default()
            )
        });
    let marker = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "SET", "marker", "acknowledged"])
        .output()
        .context("running redis-cli")?;
    if String::from_utf8_lossy(&marker.stdout).trim() != "OK" {
        bail!("SET marker was not acknowledged: {marker:?}");
    }
    // The origin dies (SIGKILL: its guest with it).
    let status = Command::new("kill")
        .args(["-9", &a.pid().to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -9 of the origin daemon failed: {status}");
    }
    let killed = Instant::now();
    let takeover = loop {
        if ping(port) {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("the standby did not take over within 60 s:\n{}", b.output());
        }
        thread::sleep(Duration::from_millis(2));
    };
    let got = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "GET", "marker"])
        .output()
        .context("running redis-cli")?;
    if String::from_utf8_lossy(&got.stdout).trim() != "acknowledged" {
        bail!("the standby lost an acknowledged write: GET marker gave {got:?}");
    }
    Ok(StandbyRun {
        takeover_ms: takeover.as_secs_f64() * 1e3,
        rps,
    })
}

pub fn run(ws: &Workspace, opts: &CheckpointOptions) -> Result<()> {
    require("redis-cli", "redis-tools")?;
    require("redis-benchmark", "redis-tools")?;
    require("qemu-system-x86_64", "qemu-system-x86")?;
    let images = image::build_images(ws, &[ws.app("kv")?], Profile::Release)?;
    let shim = image::build_shim(ws)?;
    let kv = &images[0].path;
    let dir: PathBuf = std::env::temp_dir().join(format!("bench-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let runs = opts.runs.max(1);

    let mut rows = Vec::new();
    for n in [10_000usize, 100_000] {
        eprintln!("bench checkpoint: kv with {n} keys");
        let file = dir.join(format!("kv-{n}.ckpt"));
        let (raw, bytes, checkpoint_ms) = checkpoint(&shim, kv, n, &file)?;
        let f = file.to_str().context("temp path")?;
        let mut restore = Vec::new();
        for backend in ["kvm", "qemu"] {
            let plain = boot_time(&shim, kv, &["--backend", backend], 0, runs)?.first;
            let restored = boot_time(&shim, kv, &["--backend", backend, "--restore", f], n, runs)?;
            restore.push((backend, plain, restored));
        }
        rows.push(Row {
            keys: n,
            raw,
            bytes,
            checkpoint_ms,
            restore,
        });
    }
    eprintln!("bench checkpoint: ACK_AFTER_CHECKPOINT=1 write throughput");
    let ack_dir = dir.join("ack");
    let ack_dir = ack_dir.to_str().context("temp path")?;
    let ack_args = [
        "--env",
        "ACK_AFTER_CHECKPOINT=1",
        "--checkpoint-to",
        ack_dir,
    ];
    let mut ack_rows = Vec::new();
    for keys in [0usize, 10_000] {
        let (mut plain, mut acked) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            plain.push(set_rps(&shim, kv, &[], keys)?);
            acked.push(set_rps(&shim, kv, &ack_args, keys)?);
        }
        ack_rows.push((keys, median(plain), median(acked)));
    }
    eprintln!("bench checkpoint: a standby daemon takes over after kill -9 of the origin");
    let mut standby = Vec::new();
    for run in 0..runs {
        standby.push(standby_run(&shim, kv, &dir, run)?);
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!("### App checkpoints (kv, {MEM} guest, medians of {runs} runs)\n");
    println!("| keys | raw key+value bytes | checkpoint bytes | ratio (target ≤ 1.2×) | checkpoint time |");
    println!("|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2}× {} | {:.1} ms |",
            r.keys,
            r.raw,
            r.bytes,
            r.bytes as f64 / r.raw as f64,
            if r.bytes as f64 <= 1.2 * r.raw as f64 {
                "✅"
            } else {
                "❌"
            },
            r.checkpoint_ms
        );
    }
    println!();
    println!(
        "| keys | monitor | plain boot → first PING | restore → first PING | ratio (target ≤ 2×) | restore → fully loaded | ratio |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        for (backend, plain, restored) in &r.restore {
            let name = if *backend == "kvm" {
                "host-shim (KVM)"
            } else {
                "QEMU microvm (TCG)"
            };
            let Times { first, loaded } = *restored;
            println!(
                "| {} | {name} | {plain:.1} ms | {first:.1} ms | {:.2}× {} | {loaded:.1} ms | {:.2}× |",
                r.keys,
                first / plain,
                if first <= 2.0 * plain { "✅" } else { "❌" },
                loaded / plain,
            );
        }
    }
    println!();
    println!("| redis-benchmark SET -c 50 | kv | kv, ACK_AFTER_CHECKPOINT=1 | ratio |");
    println!("|---|---:|---:|---:|");
    for (keys, plain, acked) in &ack_rows {
        let keyspace = if *keys == 0 {
            "one key".to_string()
        } else {
            format!("{keys} random keys")
        };
        println!(
            "| {keyspace} | {plain:.0} req/s | {acked:.0} req/s | {:.2}× |",
            acked / plain
        );
    }
    let takeover: Vec<f64> = standby.iter().map(|r| r.takeover_ms).collect();
    let rps: Vec<(f64, f64)> = standby.iter().filter_map(|r| r.rps.clone().ok()).collect();
    let failed: Vec<&String> = standby
        .iter()
        .filter_map(|r| r.rps.as_ref().err())
        .collect();
    let one: Vec<f64> = rps.iter().map(|r| r.0).collect();
    let many: Vec<f64> = rps.iter().map(|r| r.1).collect();
    let spread = |v: &[f64], unit: &str| {
        if v.is_empty() {
            return "failed in every run".to_owned();
        }
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let m = median(v.to_vec());
        format!("{m:.0} {unit} ({lo:.0}–{hi:.0}), {} runs", v.len())
    };
    println!();
    println!("| standby on loopback (default 2 s grace), kv with ACK_AFTER_CHECKPOINT=1 | median (min–max) |");
    println!("|---|---:|");
    println!(
        "| `kill -9` of the origin daemon → first PONG, served by the standby | {} |",
        spread(&takeover, "ms")
    );
    println!(
        "| redis-benchmark SET -c 50, one key, every write shipped to the standby | {} |",
        spread(&one, "req/s")
    );
    println!(
        "| redis-benchmark SET -c 50, 10000 random keys, every write shipped to the standby | {} |",
        spread(&many, "req/s")
    );
    for why in &failed {
        println!("\nredis-benchmark against ack-mode kv with a standby failed: {why}");
    }
    println!("\nRestore: kv checks the checkpoint (container, checksum, app, version, every entry in key order), indexes its entries (4 bytes each) and serves them where they lie in guest memory; a key moves into the heap only when a command changes it. Fully loaded: until `INFO persistence` says `loading:0` (a first reply after which every key is there).");
    println!("\nCheckpoint time: from `host-shim checkpoint` asking the app (BootInfo::checkpoint_requests) to the blob arriving at the shim (HC_CHECKPOINT), serialisation included.");
    if !failed.is_empty() {
        bail!(
            "{} of {runs} standby runs could not measure ack-mode throughput (printed above)",
            failed.len()
        );
    }
    Ok(())
}
