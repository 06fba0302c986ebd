//! `cargo xtask soak`: live-migrate the kv app back and forth between two daemons for minutes
//! under load, and check that nothing is lost and nothing grows.
//!
//! Two `host-shim serve` daemons on loopback; kv (10,000 keys) on the first, published on a
//! loopback port. Load: `redis-benchmark` (SET/GET, many connections, looping) plus one
//! keep-alive client whose every acknowledged write is checked at the end. The app moves
//! A→B→A... once per `--interval` until `--minutes` have passed. The run fails on any failed
//! migration, any client or redis-benchmark error, any lost key or write, or if the two
//! daemons' resident memory, idle before kv starts and idle again after it is stopped, grew
//! by more than [`RSS_GROWTH_LIMIT_MIB`]; it prints both.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::migrate::{migrate_once, Daemon, Loaded, Sample, TempDir};
use crate::bench::{median, require, Guard};
use crate::image::{self, Profile};
use crate::workspace::Workspace;

/// How much the two idle daemons' RSS together may grow over the soak (measured before kv
/// starts and after it is stopped, so guest RAM is out) before it counts as a leak.
pub const RSS_GROWTH_LIMIT_MIB: f64 = 16.0;
/// Load before the first migration.
const WARM_UP: Duration = Duration::from_secs(2);

/// Options of `cargo xtask soak`.
#[derive(Debug)]
pub struct SoakOptions {
    pub minutes: f64,
    pub interval: Duration,
    pub clients: u32,
}

/// A daemon's resident set size in MiB, from /proc.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

/// Runs the soak and prints a markdown report; an error if anything was lost or grew.
pub fn run(ws: &Workspace, opts: &SoakOptions) -> Result<()> {
    if opts.minutes <= 0.0 {
        bail!("--minutes must be positive");
    }
    require("redis-cli", "redis-tools")?;
    require("redis-benchmark", "redis-tools")?;
    let images = image::build_images(ws, &[ws.app("kv")?], Profile::Release)?;
    let shim = image::build_shim(ws)?;
    let kv = images[0].path.to_string_lossy().into_owned();

    let dir = TempDir::new("soak")?;
    let a = Daemon::start(&shim, "soak-a", 1, &dir.0)?;
    let b = Daemon::start(&shim, "soak-b", 2, &dir.0)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_start = [rss_mib(a.pid())?, rss_mib(b.pid())?];
    let loaded = Loaded::start(&a, &kv)?;
    let bench_log = dir.0.join("redis-benchmark.log");
    let benchmark = Guard(
        Command::new("redis-benchmark")
            .args(["-p", &loaded.port.to_string(), "-t", "set,get", "-l", "-q"])
            .args(["-c", &opts.clients.to_string(), "-r", "100000"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&bench_log)?)
            .stderr(std::fs::File::options().append(true).open(&bench_log)?)
            .spawn()
            .context("starting redis-benchmark")?,
    );
    std::thread::sleep(WARM_UP);

    let deadline = Instant::now() + Duration::from_secs_f64(opts.minutes * 60.0);
    let mut samples: Vec<Sample> = Vec::new();
    let mut failure = None;
    let mut i = 0usize;
    while Instant::now() < deadline {
        let (from, to) = if i.is_multiple_of(2) {
            (&a, &b)
        } else {
            (&b, &a)
        };
        let next = Instant::now() + opts.interval;
        match migrate_once(from, &to.addr) {
            Ok(s) => samples.push(s),
            Err(e) => {
                failure = Some(e.context(format!("migration {} failed", i + 1)));
                break;
            }
        }
        i += 1;
        if i.is_multiple_of(60) {
            eprintln!(
                "soak: {i} migrations, {:.0} s left, RSS (guest included): A {:.1} MiB, B {:.1} MiB",
                deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64(),
                rss_mib(a.pid())?,
                rss_mib(b.pid())?
            );
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let mut benchmark = benchmark;
    let bench_alive = benchmark.0.try_wait()?.is_none();
    let acked = loaded.finish(&mut samples, failure)?;
    // kv is where the last migration took it: stop it, then read the idle daemons.
    let holder = if i.is_multiple_of(2) { &a } else { &b };
    holder.cli(&["stop", "kv"])?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_end = [rss_mib(a.pid())?, rss_mib(b.pid())?];
    drop(benchmark);
    let bench_out = std::fs::read_to_string(&bench_log).unwrap_or_default();
    if !bench_alive || bench_out.contains("rror") {
        bail!(
            "redis-benchmark {} during the soak:\n{}",
            if bench_alive {
                "reported errors"
            } else {
                "died"
            },
            bench_out
        );
    }
    if samples.is_empty() {
        bail!("no migration finished within the soak");
    }

    let downtimes = samples.iter().map(|s| s.downtime_ms).collect();
    let gaps = samples.iter().map(|s| s.gap_ms).collect();
    println!(
        "### Soak: kv migrated every {:?} between two daemons for {} min under load\n",
        opts.interval, opts.minutes
    );
    println!("| metric | value |");
    println!("|---|---:|");
    println!("| migrations | {} |", samples.len());
    println!("| downtime median, ms | {:.2} |", median(downtimes));
    println!("| longest client gap median, ms | {:.1} |", median(gaps));
    println!("| keep-alive client: SET+GET pairs acknowledged, all checked | {acked} |");
    println!(
        "| redis-benchmark: {} connections, errors | 0 |",
        opts.clients
    );
    for (name, (s, e)) in ["A", "B"].iter().zip(rss_start.iter().zip(&rss_end)) {
        println!(
            "| daemon {name} RSS idle before kv → idle after kv stopped, MiB | {s:.1} → {e:.1} |"
        );
    }
    let (start, end) = (rss_start[0] + rss_start[1], rss_end[0] + rss_end[1]);
    if end - start > RSS_GROWTH_LIMIT_MIB {
        bail!(
            "the idle daemons' memory grew by {:.1} MiB (more than {RSS_GROWTH_LIMIT_MIB} MiB): \
             {start:.1} → {end:.1} MiB",
            end - start
        );
    }
    println!("\n- 0 client errors, all 10,000 keys and the checked writes intact");
    Ok(())
}
