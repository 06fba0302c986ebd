//! `cargo xtask demo follow-the-sun`: three emulated regions on this
//! machine, the kv app, clients in each region whose request rate follows
//! the sun, and three runs of the same compressed day side by side:
//!
//! 1. **one region**: the app stays in us-east;
//! 2. **static best**: the app stays in the region that serves the most of
//!    the day's requests locally (computed from the day curve);
//! 3. **follow the sun**: `host-shim schedule kv --policy follow-the-sun`,
//!    run from us-east, moves it as the day goes.
//!
//! Every byte between regions (overlay, migration streams, API calls)
//! crosses a relay with that pair's delay ([`fleet`]), so a move cannot be
//! faster than the one-way delay between its regions.
//!
//! The table gives, per region and overall, the share of requests answered
//! under 15 ms, the migrations and their median downtime (the shim's pause
//! to resume, and the longest wait a client saw around the move), and two
//! rows computed from the follow-the-sun run's traffic ([`figures`]): the
//! best static region, and the ideal placement (instant, free moves every
//! scheduler interval). Below it, every move with its figures and the
//! clients' longest wait in windows without a move (the baseline). At the
//! end every loaded key and every acknowledged write is read back through
//! each region's shim, on the same connections the clients used all along.
//!
//! The demo fails (non-zero exit) on a broken client connection or lost
//! key, if the scheduler exits non-zero or prints a warning or an error, if
//! its `--events` file is missing, unparsable or holds fewer moves than the
//! dashboard saw, or if a move's downtime is shorter than the one-way delay
//! between its regions; with `--short`, also if the app moved fewer than
//! twice.
//!
//! See [`fleet`] for the topology, [`load`] for the clients and
//! [`dashboard`] for the live view.

pub mod dashboard;
pub mod figures;
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

/// A move of the follow-the-sun run, from the scheduler's events and the
/// clients' replies.
struct MoveFigures {
    from: usize,
    to: usize,
    /// When the scheduler decided it, seconds from the start of the run.
    at_s: f64,
    /// The shim's figure: pause to resume.
    downtime_ms: f64,
    total_ms: f64,
    /// The longest wait for a reply any client saw around it, and in
    /// which region.
    gap_ms: f64,
    gap_region: usize,
}

impl MoveFigures {
    /// The time window in which clients could notice the move: from the
    /// decision (the controller then reads the stats) to its end plus
    /// [`SWITCH_MARGIN_S`] for the switch-over of forwarding.
    fn window(&self) -> (f64, f64) {
        (self.at_s, self.at_s + self.total_ms / 1e3 + SWITCH_MARGIN_S)
    }
}

/// Seconds after a migration's end that still count as its window.
const SWITCH_MARGIN_S: f64 = 1.5;

/// One row of the table: a measured run (`moves` set) or a placement
/// computed from the follow-the-sun run's traffic.
struct Outcome {
    label: String,
    /// (answered under the bound, answered) per region.
    per_region: figures::Shares,
    moves: Option<Vec<MoveFigures>>,
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

    say("starting three regions (a shim daemon each; every link between them through delaying relays)");
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
    let mut failures = Vec::new();
    let mut fts_samples = Vec::new();
    for run in &runs {
        let label = run.label(&regions);
        let start_at = match run {
            Run::OneRegion => 0,
            Run::StaticBest(r) => *r,
            // Where the day starts busiest; the scheduler takes it from there.
            Run::FollowTheSun => day.busiest(Duration::ZERO).map_or(0, |r| r.index()),
        };
        fleet.move_app(start_at)?;
        // Before the run starts, so that this move is not counted in it.
        dash.set_app(Some(start_at));
        say(&format!(
            "run: {label} — one day in {:.0} s, the app starts in {}",
            opts.day_secs, regions[start_at].name
        ));
        let events = dir.0.join(format!("events-{}.jsonl", outcomes.len()));
        let controller = match run {
            Run::FollowTheSun => Some(Controller::start(
                &host_shim,
                &fleet,
                opts.interval,
                period,
                &events,
            )?),
            _ => None,
        };
        dash.start_run(&label);
        let samples = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        run_day(&day, start, &mut clients, &samples, &dash, &regions)?;
        let samples = std::mem::take(&mut *samples.lock().unwrap());
        let mut moves = Vec::new();
        if let Some(controller) = controller {
            let (finished, origin) = controller.finish(CONTROLLER_PATIENCE);
            let status = match finished {
                Ok(()) => "exited 0".to_owned(),
                Err(e) => {
                    failures.push(format!("{e:#}"));
                    "FAILED".to_owned()
                }
            };
            match origin
                .context("the scheduler never printed its 'scheduling ...' line")
                .and_then(|origin| moves_of(&events, &regions, origin, start, &samples))
            {
                Ok(m) => moves = m,
                Err(e) => failures.push(format!("{e:#}")),
            }
            let seen = dash.moves_in(&label);
            if moves.len() < seen {
                failures.push(format!(
                    "the scheduler's events hold {} moves, the dashboard saw {seen}",
                    moves.len()
                ));
            }
            println!(
                "  [schedule] {status}; its events hold {} moves, the dashboard saw {seen}",
                moves.len()
            );
        }
        let mut per_region = vec![(0, 0); regions.len()];
        for s in &samples {
            per_region[s.region].1 += 1;
            if s.latency_ms <= BOUND_MS {
                per_region[s.region].0 += 1;
            }
        }
        let outcome = Outcome {
            label,
            per_region,
            moves: Some(moves),
        };
        say(&format!(
            "run done: {:.1}% of {} requests under {BOUND_MS} ms, {} migrations",
            outcome.share(None) * 100.0,
            samples.len(),
            outcome.moves.as_ref().map_or(0, Vec::len)
        ));
        outcomes.push(outcome);
        if *run == Run::FollowTheSun {
            fts_samples = samples;
        }
    }
    watching.store(false, Ordering::Relaxed);
    let _ = watcher.join();

    // What placements would have given for the follow-the-sun run's traffic.
    let (best, shares) = figures::best_static(&fts_samples, regions.len());
    outcomes.push(Outcome {
        label: format!("static best, computed ({})", regions[best].name),
        per_region: shares,
        moves: None,
    });
    outcomes.push(Outcome {
        label: "ideal placement (oracle)".into(),
        per_region: figures::oracle(&fts_samples, regions.len(), opts.interval.as_secs_f64()),
        moves: None,
    });

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
    let fts = outcomes
        .iter()
        .find(|o| o.label == Run::FollowTheSun.label(&regions))
        .expect("the follow-the-sun run");
    let computed = &outcomes[outcomes.len() - 2];
    print_moves(&regions, fts, &fts_samples, opts.day_secs);
    for m in fts.moves.iter().flatten() {
        let one_way = fleet::one_way_ms(m.from, m.to);
        if m.downtime_ms < one_way {
            failures.push(format!(
                "the move {} -> {} had {:.1} ms of downtime, less than the {one_way:.0} ms \
                 one-way delay between them: it did not cross the relays",
                regions[m.from].name, regions[m.to].name, m.downtime_ms
            ));
        }
    }
    println!(
        "\nfollow the sun vs the best static placement: {:.1}% vs {:.1}% under {BOUND_MS} ms \
         (margin {:+.3})",
        fts.share(None) * 100.0,
        computed.share(None) * 100.0,
        fts.share(None) - computed.share(None)
    );
    println!(
        "keys and writes read back: {checked}, all intact; client connections kept: {}/{}",
        clients.len() - broken.len(),
        clients.len()
    );
    if !broken.is_empty() {
        failures.push(format!("client connections broke: {}", broken.join("; ")));
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
    let moved = fts.moves.as_ref().map_or(0, Vec::len);
    if opts.short && moved < 2 {
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
        failures.push(format!(
            "the app moved {moved} times in the day (at least 2 expected)\n{}",
            logs.join("\n")
        ));
    }
    if !failures.is_empty() {
        bail!("the demo failed:\n- {}", failures.join("\n- "));
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
        let stats = s.client().stats()?;
        let peers: Vec<String> = stats
            .peers
            .iter()
            .map(|p| format!("{} {:.0} ms", p.region, p.srtt_ms))
            .collect();
        say(&format!("{}: RTT to {}", s.region, peers.join(", ")));
    }
    Ok(())
}

/// The controller's hysteresis: the gain (ms of request-weighted latency)
/// a move must bring.
const THRESHOLD_MS: f64 = 5.0;
/// The requests a round needs for a move (fewer are no evidence).
const MIN_REQUESTS: u64 = 3;
/// How long the controller may take to finish its rounds after the day.
const CONTROLLER_PATIENCE: Duration = Duration::from_secs(60);
/// Problem lines of the controller kept for the report.
const MAX_PROBLEMS: usize = 20;

/// `host-shim schedule` for one day, run from the first region, with
/// threads printing its moves and collecting what it says went wrong.
struct Controller {
    child: std::process::Child,
    /// When it started its clock (its "scheduling ..." line).
    origin: Arc<Mutex<Option<Instant>>>,
    problems: Arc<Mutex<Vec<String>>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Controller {
    /// Starts it for enough rounds of `interval` to cover a day of `period`.
    fn start(
        host_shim: &Path,
        fleet: &Fleet,
        interval: Duration,
        period: Duration,
        events: &Path,
    ) -> Result<Self> {
        let rounds = (period.as_secs_f64() / interval.as_secs_f64()).ceil() as u64 + 4;
        let mut child = Command::new(host_shim)
            .args(["schedule", fleet::APP, "--policy", "follow-the-sun"])
            .args(["--threshold", &format!("{THRESHOLD_MS}ms")])
            .args(["--min-requests", &MIN_REQUESTS.to_string()])
            .args(["--interval", &format!("{}ms", interval.as_millis())])
            .args(["--rounds", &rounds.to_string()])
            .arg("--events")
            .arg(events)
            .args(["--shim", &fleet.controller_apis().join(",")])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting host-shim schedule")?;
        let origin: Arc<Mutex<Option<Instant>>> = Arc::default();
        let problems: Arc<Mutex<Vec<String>>> = Arc::default();
        let note = |problems: &Mutex<Vec<String>>, line: &str| {
            let mut p = problems.lock().unwrap();
            if p.len() < MAX_PROBLEMS {
                p.push(line.to_owned());
            }
        };
        let out = child.stdout.take().context("the scheduler's stdout")?;
        let err = child.stderr.take().context("the scheduler's stderr")?;
        let stdout = {
            let (origin, problems) = (Arc::clone(&origin), Arc::clone(&problems));
            thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if line.starts_with("scheduling ") {
                        origin.lock().unwrap().get_or_insert_with(Instant::now);
                    }
                    let lower = line.to_lowercase();
                    let bad = ["warning", "error", "failed"]
                        .iter()
                        .any(|w| lower.contains(w));
                    if bad {
                        note(&problems, &line);
                    }
                    if bad || line.contains(": move ") || line.contains("migration of") {
                        println!("  [schedule] {line}");
                    }
                }
            })
        };
        let stderr = {
            let problems = Arc::clone(&problems);
            thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    if !line.trim().is_empty() {
                        println!("  [schedule, stderr] {line}");
                        note(&problems, &line);
                    }
                }
            })
        };
        Ok(Self {
            child,
            origin,
            problems,
            readers: vec![stdout, stderr],
        })
    }

    /// Waits up to `patience` for it to end: an error unless it exited 0
    /// without a warning or an error, and when it started its clock.
    fn finish(mut self, patience: Duration) -> (Result<()>, Option<Instant>) {
        let result = self.wait(patience);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let problems = self.problems.lock().unwrap().join(" | ");
        let result = result.and_then(|status| {
            if !status.success() {
                bail!("the scheduler exited with {status}: {problems}");
            }
            if !problems.is_empty() {
                bail!("the scheduler reported: {problems}");
            }
            Ok(())
        });
        let origin = *self.origin.lock().unwrap();
        (result, origin)
    }

    fn wait(&mut self, patience: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "the scheduler had not finished its rounds {} s after the day",
                    patience.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The scheduler's moves from its `--events` file (every line must be a
/// known event; a failed migration is an error), placed on the run's clock
/// (the scheduler's started at `origin`, the run's at `start`), each with
/// the longest wait clients saw around it.
fn moves_of(
    events: &Path,
    regions: &[RegionSpec],
    origin: Instant,
    start: Instant,
    samples: &[Sample],
) -> Result<Vec<MoveFigures>> {
    let text = std::fs::read_to_string(events)
        .with_context(|| format!("the scheduler's events file {}", events.display()))?;
    let offset_s = if origin >= start {
        (origin - start).as_secs_f64()
    } else {
        -(start - origin).as_secs_f64()
    };
    let region = |v: &serde_json::Value| {
        let name = v.as_str().unwrap_or_default();
        regions
            .iter()
            .position(|r| r.name == name)
            .with_context(|| format!("no region '{name}'"))
    };
    let stalls = figures::stalls(samples);
    let mut fleet_seen = false;
    let mut moves = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("{} line {}: {why}: {line}", events.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| bad("not JSON"))?;
        match v["event"].as_str() {
            Some("fleet") => fleet_seen = true,
            Some("decision") => {}
            Some("migration") => {
                if v["ok"] != true {
                    bail!(bad("a failed migration"));
                }
                let num = |k: &str| v[k].as_f64().with_context(|| bad(&format!("no {k}")));
                let mut m = MoveFigures {
                    from: region(&v["from"]).with_context(|| bad("from"))?,
                    to: region(&v["to"]).with_context(|| bad("to"))?,
                    at_s: offset_s + num("at_s")?,
                    downtime_ms: num("downtime_ms")?,
                    total_ms: num("total_ms")?,
                    gap_ms: 0.0,
                    gap_region: 0,
                };
                let (from, to) = m.window();
                (m.gap_ms, m.gap_region) = figures::gap(&stalls, from, to).unwrap_or((0.0, 0));
                moves.push(m);
            }
            _ => bail!(bad("an unknown event")),
        }
    }
    if !fleet_seen {
        bail!(
            "{}: no fleet event (the scheduler wrote nothing)",
            events.display()
        );
    }
    Ok(moves)
}

/// Runs every region's client for one day, printing progress.
fn run_day(
    day: &SyntheticDay,
    start: Instant,
    clients: &mut [Client],
    samples: &Arc<Mutex<Vec<Sample>>>,
    dash: &Dashboard,
    regions: &[RegionSpec],
) -> Result<()> {
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

/// A median of `f` over the moves, as a table cell.
fn median_cell(moves: &[MoveFigures], f: impl Fn(&MoveFigures) -> f64) -> String {
    let mut v: Vec<f64> = moves.iter().map(f).collect();
    figures::median(&mut v).map_or("–".into(), |m| format!("{m:.1} ms"))
}

fn print_table(regions: &[RegionSpec], outcomes: &[Outcome]) {
    println!("\nShare of requests answered under {BOUND_MS} ms (one emulated day per run):\n");
    let mut head = "| run |".to_owned();
    for r in regions {
        head.push_str(&format!(" {} |", r.name));
    }
    head.push_str(
        " overall | requests | migrations | downtime, shim (median) | client-observed gap (median) |",
    );
    println!("{head}");
    println!(
        "|---|{}---:|---:|---:|---:|---:|",
        "---:|".repeat(regions.len())
    );
    for o in outcomes {
        let mut line = format!("| {} |", o.label);
        for r in 0..regions.len() {
            line.push_str(&format!(" {:.1}% |", o.share(Some(r)) * 100.0));
        }
        let total: usize = o.per_region.iter().map(|x| x.1).sum();
        line.push_str(&format!(" **{:.1}%** | {total} |", o.share(None) * 100.0));
        match &o.moves {
            Some(m) => line.push_str(&format!(
                " {} | {} | {} |",
                m.len(),
                median_cell(m, |m| m.downtime_ms),
                median_cell(m, |m| m.gap_ms)
            )),
            None => line.push_str(" – | – | – |"),
        }
        println!("{line}");
    }
    println!(
        "\nThe computed rows take the follow-the-sun run's requests: a request counts as under \
         {BOUND_MS} ms if the round trip between its region and the app's is (in-region service \
         free); the oracle moves the app instantly, for free, every scheduler interval."
    );
}

/// Every move of the follow-the-sun run, and the clients' baseline wait.
fn print_moves(regions: &[RegionSpec], fts: &Outcome, samples: &[Sample], day_s: f64) {
    let stalls = &figures::stalls(samples);
    let moves = fts.moves.as_deref().unwrap_or_default();
    println!(
        "\nMoves of the follow-the-sun run (downtime: the shim's pause to resume; client gap: \
         the longest wait for a reply any client saw from the decision to {SWITCH_MARGIN_S} s \
         after the migration):\n"
    );
    println!(
        "| at | move | one-way delay | downtime, shim | migration total | client-observed gap |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for m in moves {
        println!(
            "| {:.1} s | {} -> {} | {:.0} ms | {:.1} ms | {:.0} ms | {:.0} ms ({}) |",
            m.at_s,
            regions[m.from].name,
            regions[m.to].name,
            fleet::one_way_ms(m.from, m.to),
            m.downtime_ms,
            m.total_ms,
            m.gap_ms,
            regions[m.gap_region].name
        );
    }
    let busy: Vec<(f64, f64)> = moves.iter().map(MoveFigures::window).collect();
    let mut lengths: Vec<f64> = busy.iter().map(|(a, b)| b - a).collect();
    let len = figures::median(&mut lengths).unwrap_or(2.0);
    match figures::baseline_gap_ms(stalls, &busy, len, day_s) {
        Some((gap, n)) => {
            let per_region: Vec<String> = regions
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let mine: Vec<figures::Stall> =
                        stalls.iter().filter(|s| s.region == i).copied().collect();
                    let (g, _) = figures::baseline_gap_ms(&mine, &busy, len, day_s)?;
                    Some(format!("{} {g:.0} ms", r.name))
                })
                .collect();
            println!(
                "\nbaseline client gap without a migration: {gap:.0} ms (median over {n} windows \
                 of {len:.1} s of the longest wait for a reply; per region: {})",
                per_region.join(", ")
            );
        }
        None => println!("\nbaseline client gap without a migration: no window without a move"),
    }
    let late = |inside: bool| {
        samples
            .iter()
            .filter(|s| s.latency_ms > BOUND_MS)
            .filter(|s| busy.iter().any(|&(a, b)| (a..=b).contains(&s.due_s)) == inside)
            .count()
    };
    println!(
        "requests over {BOUND_MS} ms: {} due in the moves' windows, {} elsewhere",
        late(true),
        late(false)
    );
}
