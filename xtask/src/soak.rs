//! `cargo xtask soak`: live-migrate the kv app back and forth between two daemons for minutes
//! under load, and check that nothing is lost and nothing grows.
//!
//! Two `host-shim serve` daemons on loopback; kv (10,000 keys) on the first, published on a
//! loopback port. Load: `redis-benchmark` (SET/GET, many connections, looping) plus one
//! keep-alive client whose every acknowledged write is checked at the end. The app moves
//! A→B→A... once per `--interval` until `--minutes` have passed. The run fails on any failed
//! migration, any client or redis-benchmark error, any lost key or write, or if the two
//! daemons' own resident memory together (guest RAM left out: it grows with the data)
//! grew by more than [`RSS_GROWTH_LIMIT_MIB`] after a warm-up; it prints start and end RSS.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::migrate::{migrate_once, Daemon, Loaded, Sample, TempDir};
use crate::bench::{median, require, Guard};
use crate::image::{self, Profile};
use crate::workspace::Workspace;

/// How much the two daemons' own RSS (guest RAM left out) together may grow over the soak
/// before it counts as a leak.
pub const RSS_GROWTH_LIMIT_MIB: f64 = 16.0;
/// kv's guest memory (the shim's default), to tell guest RAM from the daemon's own.
const GUEST_MIB: f64 = 64.0;
/// Load before the first RSS reading.
const WARM_UP: Duration = Duration::from_secs(10);

/// Options of `cargo xtask soak`.
#[derive(Debug)]
pub struct SoakOptions {
    pub minutes: f64,
    pub interval: Duration,
    pub clients: u32,
}

/// A daemon's resident set size in MiB, from /proc: everything (`.0`) and everything but
/// guest RAM (`.1`: mappings of the guest's size, give or take 2 MiB, are taken to be guest
/// memory).
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let field = |l: &str, name: &str| -> Option<f64> {
        l.strip_prefix(name)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (mut all, mut guest, mut size) = (0.0, 0.0, 0.0);
    for l in smaps.lines() {
        if let Some(kib) = field(l, "Size:") {
            size = kib;
        } else if let Some(kib) = field(l, "Rss:") {
            all += kib;
            // The guest's mapping may be merged with a small neighbouring one.
            if (GUEST_MIB * 1024.0..=(GUEST_MIB + 2.0) * 1024.0).contains(&size) {
                guest += kib;
            }
        }
    }
    Ok((all / 1024.0, (all - guest) / 1024.0))
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
    // Let the guest reach its working set (redis-benchmark's 100,000 keys) before the
    // first reading: the daemons' RSS includes the guest's touched memory.
    std::thread::sleep(WARM_UP);
    let rss_start = [rss_mib(a.pid())?, rss_mib(b.pid())?];

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
                "soak: {i} migrations, {:.0} s left, RSS without guest RAM: A {:.1} MiB, B {:.1} MiB",
                deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64(),
                rss_mib(a.pid())?.1,
                rss_mib(b.pid())?.1
            );
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let rss_end = [rss_mib(a.pid())?, rss_mib(b.pid())?];
    let mut benchmark = benchmark;
    let bench_alive = benchmark.0.try_wait()?.is_none();
    let acked = loaded.finish(&mut samples, failure)?;
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
            "| daemon {name} RSS start → end, MiB (without guest RAM) | {:.1} → {:.1} ({:.1} → {:.1}) |",
            s.0, e.0, s.1, e.1
        );
    }
    let own = |r: &[(f64, f64); 2]| r[0].1 + r[1].1;
    let (start, end) = (own(&rss_start), own(&rss_end));
    println!("| both daemons without guest RAM, start → end, MiB | {start:.1} → {end:.1} |");
    if end - start > RSS_GROWTH_LIMIT_MIB {
        bail!(
            "the daemons' own memory grew by {:.1} MiB (more than {RSS_GROWTH_LIMIT_MIB} MiB): \
             {start:.1} → {end:.1} MiB",
            end - start
        );
    }
    println!("\n- 0 client errors, all 10,000 keys and the checked writes intact");
    Ok(())
}
