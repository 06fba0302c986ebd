//! `cargo xtask bench migrate`: live migration of the kv app between two shim daemons on
//! loopback, under a steady request load.
//!
//! Two `host-shim serve` processes (distinct `--shim-id`s, overlay on their API addresses)
//! host the kv app (64 MiB, the default), started on A with a published port and loaded with
//! [`KEYS`] keys by `redis-cli --pipe`. A client thread speaks RESP on one keep-alive
//! connection through A's published port, SET then GET in a loop, and records when each
//! reply arrived. The app then moves A→B, B→A, ... `--runs` times; each migration's downtime,
//! total time, bytes sent, pages and rounds are parsed from `host-shim migrate`'s output, and
//! the longest gap between two replies the client saw around it is computed from the reply
//! timestamps. At the end the keys must be intact and the client must have seen no error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use api::MigrationEvent;

use crate::image::{self, Profile};
use crate::workspace::Workspace;

use super::{free_port, require};
use crate::resp::Conn as Redis;

/// Keys loaded before the migrations.
pub(crate) const KEYS: usize = 10_000;
/// Keys the load client cycles through (`load:0` ...): a long run must not fill the
/// guest's memory (kv answers OOM past its maxmemory).
const LOAD_KEYS: usize = 50_000;
/// Guest page size, for the page counts in the shim's output.
const PAGE: f64 = 4096.0;
/// Load time before the first migration and between two migrations.
pub(crate) const SETTLE: Duration = Duration::from_millis(300);
/// A migration this slow in total has its whole output printed.
const SLOW_TOTAL_MS: f64 = 250.0;
/// The targets a migration of kv under load must meet: downtime, whole
/// migration, and bytes sent as a multiple of the live memory.
const TARGET_DOWNTIME_MS: f64 = 5.0;
const TARGET_TOTAL_MS: f64 = 100.0;
const TARGET_LIVE_RATIO: f64 = 1.5;

/// Options of `bench migrate`.
#[derive(Debug)]
pub struct MigrateOptions {
    pub runs: usize,
}

/// A `host-shim serve` process, killed when dropped.
pub(crate) struct Daemon {
    child: Child,
    shim: PathBuf,
    pub(crate) name: String,
    pub(crate) addr: String,
    log: PathBuf,
    /// The state directory of a daemon with an identity (TLS).
    state: Option<PathBuf>,
}

impl Daemon {
    /// A plain-HTTP daemon (no identity).
    pub(crate) fn start(shim: &Path, name: &str, shim_id: u8, dir: &Path) -> Result<Self> {
        Self::start_with(shim, name, shim_id, dir, &[])
    }

    /// [`Self::start`] with more `serve` flags.
    pub(crate) fn start_with(
        shim: &Path,
        name: &str,
        shim_id: u8,
        dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let addr = "127.0.0.1:0".to_owned();
        let id = shim_id.to_string();
        let args = ["serve", "--listen", &addr, "--name", name];
        let args = [&args[..], &["--region", "bench", "--shim-id", &id], extra].concat();
        Self::spawn(shim, name, addr.clone(), &args, dir, None)
    }

    /// `host-shim init` in `dir/NAME.state` (`init_extra` added), then a
    /// daemon with that identity: TLS, tokens, a sealed overlay.
    pub(crate) fn secure(
        shim: &Path,
        name: &str,
        shim_id: u8,
        dir: &Path,
        init_extra: &[&str],
    ) -> Result<Self> {
        let addr = "127.0.0.1:0".to_owned();
        let state = dir.join(format!("{name}.state"));
        let state_arg = state.to_string_lossy().into_owned();
        let out = Command::new(shim)
            .args([
                "--dir", &state_arg, "init", "--name", name, "--region", "bench",
            ])
            .args(["--listen", &addr, "--shim-id", &shim_id.to_string()])
            .args(init_extra)
            .output()
            .context("running host-shim init")?;
        if !out.status.success() {
            bail!(
                "host-shim init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let args = ["--dir", &state_arg, "serve"];
        Self::spawn(shim, name, addr, &args, dir, Some(state))
    }

    /// The daemon's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The state directory of a secure daemon.
    pub(crate) fn state(&self) -> Option<&Path> {
        self.state.as_deref()
    }

    fn spawn(
        shim: &Path,
        name: &str,
        addr: String,
        args: &[&str],
        dir: &Path,
        state: Option<PathBuf>,
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let ready = dir.join(format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        let child = spawn_serve(
            Command::new(shim)
                .args(args)
                .arg("--ready-file")
                .arg(&ready),
            &log,
        )?;
        let mut daemon = Self {
            child,
            shim: shim.to_owned(),
            name: name.to_owned(),
            addr,
            log,
            state,
        };
        // Up once it has written where it listens (`--listen 127.0.0.1:0`: a port
        // of the system's choosing, so no race for a "free" one).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listen = std::fs::read(&ready)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["listen"].as_str().map(str::to_owned));
            if let Some(listen) = listen {
                daemon.addr = listen;
                return Ok(daemon);
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!("{name} exited with {status}:\n{}", daemon.output());
            }
            if Instant::now() > deadline {
                bail!("{name} was not ready within 10 s:\n{}", daemon.output());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub(super) fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `host-shim --shim ADDR ARGS` (with `--dir STATE` and `https://` for a secure
    /// daemon): its stdout, or an error with everything it and the daemon said.
    pub(crate) fn cli(&self, args: &[&str]) -> Result<String> {
        let mut target = Vec::new();
        if let Some(state) = &self.state {
            target.extend(["--dir".to_owned(), state.to_string_lossy().into_owned()]);
        }
        let scheme = if self.state.is_some() { "https://" } else { "" };
        target.extend(["--shim".to_owned(), format!("{scheme}{}", self.addr)]);
        let out = Command::new(&self.shim)
            .args(target)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .context("running host-shim")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "host-shim {} failed ({}):\n{stdout}{}\n--- {} log:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.name,
                self.output()
            );
        }
        Ok(stdout)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory for the daemons' logs, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// A fresh `$TMPDIR/xtask-bench-TAG-PID`.
    pub(crate) fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until `redis-cli -p port PING` answers PONG.
fn wait_for_redis(port: u16, daemon: &Daemon) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "PING"])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "kv did not answer PING on port {port} within 30 s\n--- {} log:\n{}",
        daemon.name,
        daemon.output()
    )
}

/// Loads `key:i` = `value-i` for i < [`KEYS`] with `redis-cli --pipe`.
fn load_keys(port: u16) -> Result<()> {
    let input: Vec<u8> = (0..KEYS)
        .flat_map(|i| crate::resp::encode(&["SET", &format!("key:{i}"), &format!("value-{i}")]))
        .collect();
    let mut child = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting redis-cli --pipe")?;
    child
        .stdin
        .take()
        .context("redis-cli stdin")?
        .write_all(&input)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains(&format!("errors: 0, replies: {KEYS}")) {
        bail!(
            "redis-cli --pipe failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// kv's keys, checked over a RESP connection.
impl Redis {
    /// Checks that the [`KEYS`] keys hold their values (pipelined GETs).
    fn check_keys(&mut self) -> Result<()> {
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(500) {
            for i in chunk {
                self.send(&["GET", &format!("key:{i}")])?;
            }
            for i in chunk {
                let got = self.reply()?;
                if got != format!("value-{i}") {
                    bail!("key:{i} holds {got:?} after the migrations");
                }
            }
        }
        Ok(())
    }
}

/// What the load client saw: when each reply arrived, how many SET+GET pairs were
/// acknowledged, and the first error (which ends it).
struct LoadResult {
    replies: Vec<Instant>,
    acked: usize,
    error: Option<String>,
}

/// SET `load:(n mod LOAD_KEYS)` to `vN` then GET it, in a loop on one connection, until `stop`.
fn load(port: u16, stop: Arc<AtomicBool>) -> thread::JoinHandle<LoadResult> {
    thread::spawn(move || {
        let mut result = LoadResult {
            replies: Vec::with_capacity(1 << 20),
            acked: 0,
            error: None,
        };
        let mut c = match Redis::connect(port) {
            Ok(c) => c,
            Err(e) => {
                result.error = Some(format!("connecting: {e:#}"));
                return result;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let n = result.acked;
            let (k, v) = (format!("load:{}", n % LOAD_KEYS), format!("v{n}"));
            let set = c.cmd(&["SET", &k, &v]);
            result.replies.push(Instant::now());
            let get = c.cmd(&["GET", &k]);
            result.replies.push(Instant::now());
            match (set, get) {
                (Ok(s), Ok(g)) if s == "OK" && g == v => result.acked += 1,
                (set, get) => {
                    result.error = Some(format!("{k}: SET -> {set:?}, GET -> {get:?}"));
                    return result;
                }
            }
        }
        result
    })
}

/// One migration's figures, from `host-shim migrate`'s output and the client's replies.
#[derive(Debug, Default, Clone)]
pub(crate) struct Sample {
    pub(crate) downtime_ms: f64,
    pub(crate) total_ms: f64,
    bytes: f64,
    pages: f64,
    mem: f64,
    rounds: f64,
    /// Non-zero pages sent in round 0 (all pages written since boot that are not zero):
    /// the closest figure to the guest's live memory that the output gives.
    round0_pages: f64,
    /// Longest gap between two replies around this migration, in ms.
    pub(crate) gap_ms: f64,
    window: Option<(Instant, Instant)>,
}

/// A migration's figures from `host-shim migrate --json`'s output: one
/// [`MigrationEvent`] a line, the last `done` (or `failed`).
pub(crate) fn parse_output(out: &str) -> Result<Sample> {
    let events = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str::<MigrationEvent>)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("host-shim migrate --json printed something else:\n{out}"))?;
    let round0 = events.iter().find_map(|e| match e {
        MigrationEvent::Round {
            round: 0, pages, ..
        } => Some(*pages),
        _ => None,
    });
    match events.last() {
        Some(MigrationEvent::Done(r)) => Ok(Sample {
            downtime_ms: r.downtime_ms,
            total_ms: r.total_ms,
            bytes: r.bytes as f64,
            pages: r.pages as f64,
            mem: r.mem as f64,
            rounds: r.rounds as f64,
            round0_pages: round0.context("the migration reported no round 0")? as f64,
            ..Sample::default()
        }),
        Some(MigrationEvent::Failed { phase, error }) => {
            bail!("the migration failed ({phase}): {error}")
        }
        _ => bail!("host-shim migrate --json ended without a result:\n{out}"),
    }
}

/// The events of a migration, rendered as the CLI shows them (for logs).
fn render(out: &str) -> String {
    out.lines()
        .map(|l| match serde_json::from_str::<MigrationEvent>(l) {
            Ok(e) => format!("{e}\n"),
            Err(_) => format!("{l}\n"),
        })
        .collect()
}

/// The longest gap between two consecutive replies that overlaps `[from, to]`.
fn longest_gap(replies: &[Instant], from: Instant, to: Instant) -> Option<Duration> {
    replies
        .windows(2)
        .filter(|w| w[1] >= from && w[0] <= to)
        .map(|w| w[1] - w[0])
        .max()
}

/// `median (min–max)` of `f(sample)`, with `digits` decimals.
pub(crate) fn stat(samples: &[Sample], digits: usize, f: impl Fn(&Sample) -> f64) -> (f64, String) {
    let mut v: Vec<f64> = samples.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    let median = super::median(v.clone());
    let (min, max) = (v[0], v[v.len() - 1]);
    (
        median,
        format!("{median:.digits$} | {min:.digits$}–{max:.digits$}"),
    )
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

/// The kv app (with [`KEYS`] keys) running on a daemon behind a fresh published port,
/// with a client under steady load on it.
pub(crate) struct Loaded {
    pub(crate) port: u16,
    stop: Arc<AtomicBool>,
    client: thread::JoinHandle<LoadResult>,
}

impl Loaded {
    /// Runs kv on `daemon`, loads the keys and starts the load client.
    pub(crate) fn start(daemon: &Daemon, kv: &str) -> Result<Self> {
        let port = free_port()?;
        let publish = format!("127.0.0.1:{port}:6379");
        daemon.cli(&["run", kv, "--name", "kv", "--publish", &publish])?;
        wait_for_redis(port, daemon)?;
        eprintln!("bench: loading {KEYS} keys into kv on {}", daemon.name);
        load_keys(port)?;
        let stop = Arc::new(AtomicBool::new(false));
        let client = load(port, Arc::clone(&stop));
        thread::sleep(SETTLE);
        Ok(Self { port, stop, client })
    }

    /// Stops the load (returning `failure` if there was one), fills in each sample's
    /// longest client gap, and checks the keys and (a sample of) the client's
    /// acknowledged writes; returns how many SET+GET pairs were acknowledged.
    pub(crate) fn finish(
        self,
        samples: &mut [Sample],
        failure: Option<anyhow::Error>,
    ) -> Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self
            .client
            .join()
            .map_err(|_| anyhow::anyhow!("the load client panicked"))?;
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(e) = &seen.error {
            bail!("the client under load saw an error: {e}");
        }
        for s in samples.iter_mut() {
            let (from, to) = s.window.expect("set by migrate_once");
            let gap = longest_gap(&seen.replies, from, to)
                .context("the client got no reply around a migration")?;
            s.gap_ms = gap.as_secs_f64() * 1e3;
        }
        let mut c = Redis::connect(self.port)?;
        c.check_keys()?;
        for n in (seen.acked.saturating_sub(LOAD_KEYS)..seen.acked).step_by(97) {
            let k = format!("load:{}", n % LOAD_KEYS);
            let got = c.cmd(&["GET", &k])?;
            if got != format!("v{n}") {
                bail!("{k} holds {got:?} after the migrations, not v{n}");
            }
        }
        Ok(seen.acked)
    }
}

/// `host-shim migrate kv --to TO` on `from`, timed and parsed.
pub(crate) fn migrate_once(from: &Daemon, to: &str) -> Result<Sample> {
    let start = Instant::now();
    let out = from.cli(&["migrate", "kv", "--to", to, "--json"])?;
    let end = Instant::now();
    let mut s = parse_output(&out)?;
    s.window = Some((start, end));
    if s.total_ms >= SLOW_TOTAL_MS {
        // Its timeline says which step took the time.
        eprintln!(
            "a slow migration ({:.0} ms in total):\n{}",
            s.total_ms,
            render(&out)
        );
    }
    Ok(s)
}

/// Starts `serve`, a `host-shim serve` command, with its warnings and
/// errors written to the file `log`.
pub(crate) fn spawn_serve(serve: &mut Command, log: &Path) -> Result<Child> {
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    serve
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting host-shim serve")
}

/// What a benchmark of kv between daemons needs first: `runs` checked,
/// `redis-cli`, the release kv image and the shim. Returns the shim and
/// the image's path.
pub(crate) fn prepare_kv(ws: &Workspace, runs: usize) -> Result<(PathBuf, String)> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    require("redis-cli", "redis-tools")?;
    let images = image::build_images(ws, &[ws.app("kv")?], Profile::Release)?;
    let shim = image::build_shim(ws)?;
    Ok((shim, images[0].path.to_string_lossy().into_owned()))
}

/// Runs the benchmark and prints a markdown report.
pub fn run(ws: &Workspace, opts: &MigrateOptions) -> Result<()> {
    let (shim, kv) = prepare_kv(ws, opts.runs)?;

    let dir = TempDir::new("migrate")?;
    let a = Daemon::start(&shim, "bench-a", 1, &dir.0)?;
    let b = Daemon::start(&shim, "bench-b", 2, &dir.0)?;
    let loaded = Loaded::start(&a, &kv)?;
    let mut samples = Vec::new();
    let mut failure = None;
    for i in 0..opts.runs {
        let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        eprintln!(
            "bench migrate: migration {}/{}, {} -> {}",
            i + 1,
            opts.runs,
            from.name,
            to.name
        );
        match migrate_once(from, &to.addr) {
            Ok(s) => samples.push(s),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        thread::sleep(SETTLE);
    }
    let acked = loaded.finish(&mut samples, failure)?;
    drop(a);
    drop(b);

    let mib = |x: f64| x / (1 << 20) as f64;
    let mem = samples[0].mem;
    let live = |s: &Sample| s.round0_pages * PAGE;
    let (downtime, downtime_row) = stat(&samples, 2, |s| s.downtime_ms);
    let (total, total_row) = stat(&samples, 1, |s| s.total_ms);
    let (_, bytes_row) = stat(&samples, 2, |s| mib(s.bytes));
    let (_, pages_row) = stat(&samples, 0, |s| s.pages);
    let (_, mem_row) = stat(&samples, 1, |s| s.bytes * 100.0 / s.mem);
    let (_, live_mem_row) = stat(&samples, 2, |s| mib(live(s)));
    let (ratio, ratio_row) = stat(&samples, 2, |s| s.bytes / live(s));
    let (_, rounds_row) = stat(&samples, 0, |s| s.rounds);
    let (_, gap_row) = stat(&samples, 1, |s| s.gap_ms);

    println!(
        "### Live migration: kv app ({} MiB guest, {KEYS} keys) under a steady SET/GET load, \
         two shim daemons on loopback, median of {} migrations (A→B, B→A, ...)\n",
        mib(mem),
        samples.len()
    );
    println!("| metric | median | min–max | target |");
    println!("|---|---:|---:|---|");
    println!(
        "| downtime (paused at source → running at destination), ms | {downtime_row} | \
         ≤ {TARGET_DOWNTIME_MS} ms: {} |",
        verdict(downtime <= TARGET_DOWNTIME_MS)
    );
    println!(
        "| total time, ms | {total_row} | ≤ {TARGET_TOTAL_MS} ms: {} |",
        verdict(total <= TARGET_TOTAL_MS)
    );
    println!("| bytes sent, MiB | {bytes_row} | |");
    println!("| pages sent (data or zero marks) | {pages_row} | |");
    println!(
        "| bytes sent vs configured memory ({:.0} MiB), % | {mem_row} | |",
        mib(mem)
    );
    println!("| non-zero memory at round 0 (live memory estimate), MiB | {live_mem_row} | |");
    println!(
        "| bytes sent vs non-zero memory, × | {ratio_row} | ≤ {TARGET_LIVE_RATIO}×: {} |",
        verdict(ratio <= TARGET_LIVE_RATIO)
    );
    println!("| rounds (pre-copy, round 0 included) | {rounds_row} | |");
    println!("| longest gap between two client replies, ms | {gap_row} | |");
    println!(
        "\n- client: one keep-alive RESP connection through A's published port, {} SET+GET \
         pairs acknowledged, no error; all {KEYS} keys intact afterwards\n\
         - live memory is estimated as round 0's non-zero pages (written since the VM was \
         created, not all zero); heap pages the guest reports free are not sent at all",
        acked
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::MigrationReport;

    #[test]
    fn reads_the_shims_migration_events() {
        let events = [
            MigrationEvent::Round {
                round: 0,
                dirty: 812,
                pages: 640,
                bytes: 2 << 20,
                catch_up: false,
                skipped: None,
            },
            MigrationEvent::Round {
                round: 1,
                dirty: 20,
                pages: 20,
                bytes: 80 << 10,
                catch_up: false,
                skipped: None,
            },
            MigrationEvent::Done(MigrationReport {
                name: "kv".into(),
                to: "127.0.0.1:7100".into(),
                downtime_ms: 1.23,
                total_ms: 45.6,
                bytes: 2_726_297,
                pages: 672,
                mem: 64 << 20,
                rounds: 2,
                skipped: None,
            }),
        ];
        let out: String = events
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        let s = parse_output(&out).unwrap();
        assert_eq!(s.downtime_ms, 1.23);
        assert_eq!(s.total_ms, 45.6);
        assert_eq!(s.bytes, 2_726_297.0);
        assert_eq!(s.pages, 672.0);
        assert_eq!(s.mem, 64.0 * 1024.0 * 1024.0);
        assert_eq!(s.rounds, 2.0);
        assert_eq!(s.round0_pages, 640.0);
        assert!(render(&out).contains("ok: kv moved to 127.0.0.1:7100; downtime 1.23 ms"));
        let failed = serde_json::to_string(&MigrationEvent::Failed {
            phase: api::MigrationPhase::Paused,
            error: "the destination died".into(),
        })
        .unwrap();
        let err = parse_output(&failed).unwrap_err().to_string();
        assert!(
            err.contains("the destination died") && err.contains("paused"),
            "{err}"
        );
        assert!(parse_output("ok: kv moved").is_err());
    }

    #[test]
    fn longest_gap_overlaps_the_window() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let replies = [ms(0), ms(1), ms(50), ms(51), ms(200), ms(201)];
        assert_eq!(
            longest_gap(&replies, ms(40), ms(49)),
            Some(Duration::from_millis(49))
        );
        assert_eq!(
            longest_gap(&replies, ms(52), ms(53)),
            Some(Duration::from_millis(149))
        );
    }
}
