//! `cargo xtask demo follow-the-sun`: three emulated regions on this
//! machine, the kv app, clients in each region whose request rate follows
//! the sun, and three runs of the same compressed day side by side:
//!
//! 1. **one region**: the app stays in us-east;
//! 2. **static best**: the app stays in the region that serves the most of
//!    the day's requests locally (computed from the day curve);
//! 3. **follow the sun**: `host-shim schedule kv --policy follow-the-sun`
//!    moves it as the day goes.
//!
//! The table gives, per region and overall, the share of requests answered
//! under 15 ms, the migrations and their total downtime. At the end every
//! loaded key and every acknowledged write is read back through each
//! region's shim, on the same connections the clients used all along (a
//! broken connection fails the demo).
//!
//! See [`fleet`] for the topology, [`load`] for the clients and
//! [`dashboard`] for the live view.

pub mod dashboard;
pub mod fleet;
pub mod load;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use scheduler::{ClientRegion, RegionId, SyntheticDay};

use crate::image::{self, Profile};
use crate::workspace::Workspace;
use dashboard::Dashboard;
use fleet::{Fleet, RegionSpec};
use load::{Client, Sample};

/// The latency bound of the headline metric.
pub const BOUND_MS: f64 = 15.0;
/// Share of the peak rate at night.
const NIGHT: f64 = 0.01;
/// How sharp the daily peak is (business hours; see [`SyntheticDay::sun`]).
const SHARPNESS: f64 = 10.0;
/// The follow-the-sun target.
const TARGET: f64 = 0.90;

/// Options of `demo follow-the-sun`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Seconds per emulated day.
    pub day_secs: f64,
    /// Only the follow-the-sun run (for the end-to-end test).
    pub short: bool,
    /// Peak requests per second of us-east's clients (eu-west ×1.25, ap ×0.8).
    pub peak_rps: f64,
    /// The scheduler's interval.
    pub interval: Duration,
    /// Where to serve the dashboard (default: a free port on 127.0.0.1).
    pub dashboard: Option<SocketAddr>,
    /// A host-shim binary and kv image to use instead of building them.
    pub host_shim: Option<PathBuf>,
    pub kv_image: Option<PathBuf>,
}

/// A run of the day.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Run {
    OneRegion,
    StaticBest(usize),
    FollowTheSun,
}

impl Run {
    fn label(&self, regions: &[RegionSpec]) -> String {
        match self {
            Run::OneRegion => format!("all in one region ({})", regions[0].name),
            Run::StaticBest(r) => format!("static best ({})", regions[*r].name),
            Run::FollowTheSun => "follow the sun".into(),
        }
    }
}

/// One run's figures.
struct Outcome {
    label: String,
    /// (answered under the bound, answered) per region.
    per_region: Vec<(usize, usize)>,
    migrations: usize,
    downtime_ms: f64,
}

impl Outcome {
    fn share(&self, r: Option<usize>) -> f64 {
        let (under, all) = match r {
            Some(r) => self.per_region[r],
            None => self
                .per_region
                .iter()
                .fold((0, 0), |(u, a), (x, y)| (u + x, a + y)),
        };
        if all == 0 {
            0.0
        } else {
            under as f64 / all as f64
        }
    }
}

/// A scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The day of the demo.
fn day(regions: &[RegionSpec], period: Duration) -> SyntheticDay {
    let mut day = SyntheticDay::new(period);
    day.sharpness = SHARPNESS;
    for (i, r) in regions.iter().enumerate() {
        day = day.with_client(
            ClientRegion::new(RegionId(i as u32), r.utc_offset_h, r.peak_rps)
                .with_night_rps(r.peak_rps * NIGHT),
        );
    }
    day
}

/// The region whose clients send the most requests over the day: the best
/// static placement for the share of requests served in-region.
fn static_best(day: &SyntheticDay, n: usize) -> usize {
    let w = day.workload(day.period, day.period);
    (0..n)
        .max_by_key(|&r| {
            w.clients()
                .iter()
                .filter(|c| c.region == RegionId(r as u32))
                .map(|c| c.requests)
                .sum::<u64>()
        })
        .unwrap_or(0)
}

/// Runs the demo.
pub fn follow_the_sun(ws: &Workspace, opts: &DemoOptions) -> Result<()> {
    if opts.day_secs.is_nan() || opts.day_secs < 5.0 {
        bail!("--day-secs must be at least 5");
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        bail!("the demo boots the kv app under KVM and needs /dev/kvm: {e}");
    }
    let kv = match &opts.kv_image {
        Some(p) => p.clone(),
        None => image::build_images(ws, &[ws.app("kv")?], Profile::Release)?[0]
            .path
            .clone(),
    };
    let host_shim = match &opts.host_shim {
        Some(p) => p.clone(),
        None => image::build_shim(ws)?,
    };
    for (what, p) in [("kv image", &kv), ("host-shim", &host_shim)] {
        if !p.is_file() {
            bail!("the {what} {} does not exist", p.display());
        }
    }
    let dir = TempDir(std::env::temp_dir().join(format!("xtask-demo-fts-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;

    let regions = fleet::regions(opts.peak_rps);
    let period = Duration::from_secs_f64(opts.day_secs);
    let day = day(&regions, period);
    let best = static_best(&day, regions.len());
    let runs = if opts.short {
        vec![Run::FollowTheSun]
    } else {
        vec![Run::OneRegion, Run::StaticBest(best), Run::FollowTheSun]
    };

    say("starting three regions (a shim daemon each; overlay links through delaying relays)");
    let fleet = Fleet::start(&host_shim, &regions, &dir.0)?;
    fleet.wait_for_rtts()?;
    print_rtts(&fleet)?;

    let dash = Dashboard::start(opts.dashboard, &regions)?;
    say(&format!("dashboard: http://{}/", dash.addr()));

    say(&format!(
        "booting kv on {} and loading {} keys",
        regions[0].name,
        load::KEYS
    ));
    fleet.boot_app(&kv, 0)?;
    let mut clients = connect_clients(&fleet)?;
    clients[0].load_keys()?;
    dash.set_app(Some(0));

    // Where the app is, for the dashboard, while the demo runs.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (apis, dash, watching) = (fleet.apis(), dash.clone(), Arc::clone(&watching));
        thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                let at = apis.iter().position(|a| fleet::api_has_app(a));
                if at.is_some() {
                    dash.set_app(at);
                }
                thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let mut outcomes = Vec::new();
    for run in &runs {
        let label = run.label(&regions);
        let start_at = match run {
            Run::OneRegion => 0,
            Run::StaticBest(r) => *r,
            // Where the day starts busiest; the scheduler takes it from there.
            Run::FollowTheSun => day.busiest(Duration::ZERO).map_or(0, |r| r.index()),
        };
        fleet.move_app(start_at)?;
        say(&format!(
            "run: {label} — one day in {:.0} s, the app starts in {}",
            opts.day_secs, regions[start_at].name
        ));
        let events = dir.0.join(format!("events-{}.jsonl", outcomes.len()));
        let mut scheduler = match run {
            Run::FollowTheSun => Some(start_scheduler(&host_shim, &fleet, opts.interval, &events)?),
            _ => None,
        };
        dash.start_run(&label);
        let samples = Arc::new(Mutex::new(Vec::new()));
        run_day(&day, &mut clients, &samples, &dash, &regions)?;
        if let Some((child, printer)) = scheduler.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(p) = printer.take() {
                let _ = p.join();
            }
        }
        let (migrations, downtime_ms) = read_events(&events);
        let samples = samples.lock().unwrap();
        let mut per_region = vec![(0, 0); regions.len()];
        for s in samples.iter() {
            per_region[s.region].1 += 1;
            if s.latency_ms <= BOUND_MS {
                per_region[s.region].0 += 1;
            }
        }
        let outcome = Outcome {
            label,
            per_region,
            migrations,
            downtime_ms,
        };
        say(&format!(
            "run done: {:.1}% of {} requests under {BOUND_MS} ms, {} migrations",
            outcome.share(None) * 100.0,
            samples.len(),
            migrations
        ));
        outcomes.push(outcome);
    }
    watching.store(false, Ordering::Relaxed);
    let _ = watcher.join();

    say("checking every key and acknowledged write through each region's shim");
    let mut checked = 0;
    let mut broken = Vec::new();
    for c in &mut clients {
        if let Some(why) = &c.broken {
            broken.push(format!("{}: {why}", regions[c.region].name));
            continue;
        }
        checked += c.check_keys()?;
    }
    print_table(&regions, &outcomes);
    let fts = outcomes.last().expect("at least one run");
    println!(
        "\nkeys and writes read back: {checked}, all intact; client connections kept: {}/{}",
        clients.len() - broken.len(),
        clients.len()
    );
    if !broken.is_empty() {
        bail!("client connections broke: {}", broken.join("; "));
    }
    println!(
        "target: follow the sun >= {:.0}% under {BOUND_MS} ms: {:.1}% ({})",
        TARGET * 100.0,
        fts.share(None) * 100.0,
        if fts.share(None) >= TARGET {
            "met"
        } else {
            "missed"
        }
    );
    if opts.short && fts.migrations < 2 {
        let logs: Vec<String> = fleet
            .shims
            .iter()
            .map(|s| {
                let out = s.output();
                let tail: Vec<&str> = out.lines().rev().take(20).collect();
                format!(
                    "--- {} (last lines):\n{}",
                    s.region,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect();
        bail!(
            "the app moved {} times in the day (at least 2 expected)\n{}",
            fts.migrations,
            logs.join("\n")
        );
    }
    Ok(())
}

fn say(msg: &str) {
    println!("[demo] {msg}");
}

fn connect_clients(fleet: &Fleet) -> Result<Vec<Client>> {
    fleet
        .shims
        .iter()
        .enumerate()
        .map(|(i, s)| Client::connect(i, &s.region, s.port))
        .collect()
}

/// Prints the RTT matrix the shims measured.
fn print_rtts(fleet: &Fleet) -> Result<()> {
    for s in &fleet.shims {
        let stats: host_shim::daemon::stats::ShimStats =
            s.client().json::<(), _>("GET", "/v1/stats", None)?;
        let peers: Vec<String> = stats
            .peers
            .iter()
            .map(|p| format!("{} {:.0} ms", p.region, p.srtt_ms))
            .collect();
        say(&format!("{}: RTT to {}", s.region, peers.join(", ")));
    }
    Ok(())
}

/// Starts `host-shim schedule` and a thread printing its moves.
fn start_scheduler(
    host_shim: &Path,
    fleet: &Fleet,
    interval: Duration,
    events: &Path,
) -> Result<(std::process::Child, Option<thread::JoinHandle<()>>)> {
    let mut child = Command::new(host_shim)
        .args(["schedule", fleet::APP, "--policy", "follow-the-sun"])
        .args(["--threshold", "5ms", "--min-requests", "3"])
        .args(["--interval", &format!("{}ms", interval.as_millis())])
        .arg("--events")
        .arg(events)
        .args(["--shim", &fleet.apis().join(",")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting host-shim schedule")?;
    let out = child.stdout.take().context("the scheduler's stdout")?;
    let printer = thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains(": move ") || line.contains("migration of") || line.contains("warning")
            {
                println!("  [schedule] {line}");
            }
        }
    });
    Ok((child, Some(printer)))
}

/// Successful migrations and their total downtime, from `--events`.
fn read_events(path: &Path) -> (usize, f64) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut n = 0;
    let mut down = 0.0;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["event"] == "migration" && v["ok"] == true {
            n += 1;
            down += v["downtime_ms"].as_f64().unwrap_or(0.0);
        }
    }
    (n, down)
}

/// Runs every region's client for one day, printing progress.
fn run_day(
    day: &SyntheticDay,
    clients: &mut [Client],
    samples: &Arc<Mutex<Vec<Sample>>>,
    dash: &Dashboard,
    regions: &[RegionSpec],
) -> Result<()> {
    let start = Instant::now();
    thread::scope(|s| {
        for c in clients.iter_mut() {
            let client = day.clients[c.region].clone();
            s.spawn(move || c.run(day, &client, start, day.period, samples));
        }
        // Progress: every eighth of the day, and the dashboard's series every second.
        s.spawn(|| {
            let mut next_line = Duration::ZERO;
            let mut seen = 0;
            while start.elapsed() < day.period {
                thread::sleep(Duration::from_millis(250));
                let t = start.elapsed();
                // The clients wait for this lock: copy and let go.
                let (fresh, under, total) = {
                    let all = samples.lock().unwrap();
                    let under = all.iter().filter(|s| s.latency_ms <= BOUND_MS).count();
                    (all[seen..].to_vec(), under, all.len())
                };
                seen = total;
                dash.record(t, day.utc_hour(t), &fresh);
                if t >= next_line {
                    next_line += day.period / 8;
                    let rates: Vec<String> = regions
                        .iter()
                        .enumerate()
                        .map(|(i, r)| format!("{} {:.0}", r.name, day.rate(RegionId(i as u32), t)))
                        .collect();
                    println!(
                        "  {:05.2} UTC  rps: {}  app in {}  under {BOUND_MS} ms so far: {:.1}% of {}",
                        day.utc_hour(t),
                        rates.join(", "),
                        dash.app_name().unwrap_or_else(|| "?".into()),
                        if total == 0 { 0.0 } else { under as f64 * 100.0 / total as f64 },
                        total
                    );
                }
            }
        });
    });
    Ok(())
}

fn print_table(regions: &[RegionSpec], outcomes: &[Outcome]) {
    println!("\nShare of requests answered under {BOUND_MS} ms (one emulated day per run):\n");
    let mut head = "| run |".to_owned();
    for r in regions {
        head.push_str(&format!(" {} |", r.name));
    }
    head.push_str(" overall | requests | migrations | total downtime |");
    println!("{head}");
    println!("|---|{}---:|---:|---:|---:|", "---:|".repeat(regions.len()));
    for o in outcomes {
        let mut line = format!("| {} |", o.label);
        for r in 0..regions.len() {
            line.push_str(&format!(" {:.1}% |", o.share(Some(r)) * 100.0));
        }
        let total: usize = o.per_region.iter().map(|x| x.1).sum();
        line.push_str(&format!(
            " **{:.1}%** | {total} | {} | {:.1} ms |",
            o.share(None) * 100.0,
            o.migrations,
            o.downtime_ms
        ));
        println!("{line}");
    }
}
