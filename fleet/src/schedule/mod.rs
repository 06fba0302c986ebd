//! `host-shim schedule APP`: the placement controller. It watches a fleet
//! of shim daemons and moves one app between them with the [`scheduler`]
//! crate's decisions.
//!
//! Every `--interval`:
//!
//! 1. read `GET /v1/stats` of every shim ([`observe`]): where the app runs,
//!    the requests and bytes each shim's published ports for the app
//!    received since the last round (a shim's region is its clients'
//!    region), and the round trips each shim measures to the others (the
//!    RTT matrix); re-read the price feed (`--prices`) and the termination
//!    notices (`--notices`);
//! 2. ask the scheduler; print every decision (move or stay) with its
//!    reason and the scores before and after, and append it as a JSON line
//!    to `--events`;
//!    With fewer than `--min-requests` requests in the round, follow the
//!    sun keeps the app where it is (a few requests at night are no
//!    evidence); evacuations are never held back.
//! 3. carry out a move through the source daemon's API (`migrate`), one at
//!    a time: a move never starts while another runs, nor while the app is
//!    busy on its shim (someone else's snapshot or migration). A failed
//!    migration leaves the app where it was (the daemons see to that); the
//!    controller notes it and goes on.
//!
//! A shim that does not answer is left out of that round (its region gets
//! no traffic and no RTTs, so the app is not moved there) with a warning; a
//! bounded run (`--rounds N`) in which that happened ends with an error
//! ([`ScheduleError::HostsLeftOut`]), so scripts can tell a clean run.

pub mod observe;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use scheduler::{
    AppSpec, Cost, Decision, FollowTheSun, Policy, PriceTable, RegionId, Scheduler,
    SchedulerConfig, TerminationNotice,
};
use serde::Serialize;

use api::{Client, MigrateRequest, MigrationEvent};
use observe::{Fleet, Round};

/// The policies the CLI offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// Request-weighted client latency (ms).
    FollowTheSun,
    /// Price per hour from `--prices`.
    Cost,
}

/// What `host-shim schedule` was asked to do.
#[derive(Clone, Debug)]
pub struct ScheduleConfig {
    pub app: String,
    /// Clients of the daemons (one per region at least).
    pub shims: Vec<Client>,
    pub policy: PolicyKind,
    /// In the policy's unit (ms, or price per hour).
    pub threshold: f64,
    pub interval: Duration,
    /// No non-forced move for this long after a migration.
    pub cooldown: Duration,
    /// `region,price` CSV, re-read every round.
    pub prices: Option<PathBuf>,
    /// `region,DEADLINE` lines (DEADLINE: Unix time, seconds), re-read
    /// every round.
    pub notices: Option<PathBuf>,
    /// JSON lines: every decision and migration.
    pub events: Option<PathBuf>,
    /// Stop after this many rounds (`None`: run until killed).
    pub rounds: Option<u64>,
    /// Client networks and their regions (else a request's region is its
    /// shim's).
    pub client_regions: Vec<observe::ClientNet>,
    /// Fewer requests than this in a round are too little evidence for a
    /// move on latency grounds (evacuations still happen).
    pub min_requests: u64,
    /// Where each decision, move and warning goes, one line at a time, as
    /// it happens (the CLI prints them; the events file has them typed).
    pub report: fn(&str),
    /// One of several replicas: decide and move only while this one
    /// leads ([`crate::leader`]); the others watch and stand by.
    pub leader: Option<Arc<crate::leader::Elector>>,
    /// The fleet state: a move is recorded there (the app's host, by
    /// compare-and-swap) and in its event stream.
    pub state: Option<Arc<crate::Fleet>>,
}

/// A setup error of the controller.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Shim(#[from] api::ClientError),
    #[error("cannot write the events file {path}: {err}")]
    Events { path: PathBuf, err: std::io::Error },
    /// A bounded run (`--rounds`) in which some shims did not answer: its decisions were
    /// made without them, so it does not count as a clean run.
    #[error("{incomplete} of {rounds} rounds went without every shim's stats: {last}")]
    HostsLeftOut {
        incomplete: u64,
        rounds: u64,
        last: String,
    },
}

/// One line of the `--events` file.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event<'a> {
    /// The fleet as the controller found it.
    Fleet { regions: Vec<(&'a str, &'a str)> },
    /// One round's decision, with what it was based on.
    Decision {
        decision: &'a Decision,
        /// Requests per client region in the round.
        requests: Vec<(&'a str, u64)>,
    },
    /// A migration the controller carried out.
    Migration {
        at_s: f64,
        app: &'a str,
        from: &'a str,
        to: &'a str,
        ok: bool,
        /// From the source daemon's final line (when it succeeded).
        downtime_ms: Option<f64>,
        total_ms: Option<f64>,
        message: &'a str,
    },
}

/// Runs the controller (until `rounds`, or forever).
pub fn run(config: &ScheduleConfig) -> Result<(), ScheduleError> {
    if config.shims.len() < 2 {
        return Err(ScheduleError::Config(
            "schedule needs at least two shims (--shim ADDR|HOST, repeated, or a fleet file with two hosts)".into(),
        ));
    }
    if !(config.threshold.is_finite() && config.threshold >= 0.0) {
        return Err(ScheduleError::Config(format!(
            "the threshold must be a number >= 0, not {}",
            config.threshold
        )));
    }
    if config.policy == PolicyKind::Cost && config.prices.is_none() {
        return Err(ScheduleError::Config(
            "--policy cost needs --prices FILE (region,price lines)".into(),
        ));
    }
    let mut fleet = Fleet::discover(&config.shims, &config.client_regions)?;
    let policy: Arc<dyn Policy> = match config.policy {
        PolicyKind::FollowTheSun => Arc::new(FollowTheSun::new()),
        PolicyKind::Cost => Arc::new(Cost::new()),
    };
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched
        .add_app(
            config.app.as_str(),
            AppSpec::new(Arc::clone(&policy), config.threshold).with_cooldown(config.cooldown),
        )
        .map_err(|e| ScheduleError::Config(e.to_string()))?;
    let mut events = Events::open(config.events.clone())?;
    (config.report)(&format!(
        "scheduling {} with {} (threshold {} {}, every {:.1} s) over {}",
        config.app,
        policy.name(),
        config.threshold,
        policy.unit(),
        config.interval.as_secs_f64(),
        fleet.describe()
    ));
    events.write(&Event::Fleet {
        regions: fleet.regions_and_shims(),
    })?;
    let start = Instant::now();
    let mut round = 0u64;
    // Rounds in which some shim did not answer, and what the last one said.
    let (mut incomplete, mut last_left_out) = (0u64, String::new());
    let mut next = Instant::now();
    // A shim gets this long to answer each round: a whole interval, and never less than 2 s
    // (a stats call across a WAN link on a busy host).
    let patience = config.interval.max(Duration::from_secs(2));
    // The first reading only sets the counters' baseline.
    fleet.observe(&config.app, patience);
    let mut was_leading = None;
    loop {
        // A round that overran does not make the next ones hurry.
        next = (next + config.interval).max(Instant::now());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        round += 1;
        let now = start.elapsed();
        let mut observed = fleet.observe(&config.app, patience);
        if !observed.warnings.is_empty() {
            incomplete += 1;
            last_left_out = observed.warnings.join("; ");
        }
        for warning in observed.warnings.drain(..) {
            (config.report)(&format!("[{:7.1}s] warning: {warning}", now.as_secs_f64()));
        }
        load_feeds(config, &fleet, &mut observed, now);
        let leading = config.leader.as_ref().is_none_or(|l| l.leading());
        if was_leading != Some(leading) {
            if let Some(l) = &config.leader {
                (config.report)(&match leading {
                    true => format!(
                        "[{:7.1}s] {} leads: deciding",
                        now.as_secs_f64(),
                        l.replica()
                    ),
                    false => format!(
                        "[{:7.1}s] standing by ({} leads)",
                        now.as_secs_f64(),
                        l.leader().as_deref().unwrap_or("no replica yet")
                    ),
                });
            }
            was_leading = Some(leading);
        }
        if leading {
            step(config, &mut fleet, &mut sched, &observed, now, &mut events)?;
        }
        if config.rounds.is_some_and(|n| round >= n) {
            if incomplete > 0 {
                return Err(ScheduleError::HostsLeftOut {
                    incomplete,
                    rounds: round,
                    last: last_left_out,
                });
            }
            return Ok(());
        }
    }
}

/// One round's decision and, if it says so, the move.
fn step(
    config: &ScheduleConfig,
    fleet: &mut Fleet,
    sched: &mut Scheduler,
    observed: &Round,
    now: Duration,
    events: &mut Events,
) -> Result<(), ScheduleError> {
    let t = now.as_secs_f64();
    let Some(current) = observed.inputs.placement.get(&config.app.as_str().into()) else {
        (config.report)(&format!(
            "[{t:7.1}s] {} runs on no shim of the fleet",
            config.app
        ));
        return Ok(());
    };
    if observed.busy {
        (config.report)(&format!(
            "[{t:7.1}s] {} is busy on its shim (a migration or snapshot): no decision",
            config.app
        ));
        return Ok(());
    }
    let requests: Vec<(&str, u64)> = observed
        .inputs
        .workloads
        .values()
        .flat_map(|w| w.clients())
        .map(|c| (fleet.region_name(c.region), c.requests))
        .collect();
    let total: u64 = requests.iter().map(|r| r.1).sum();
    let forced = observed.inputs.notice(current).is_some();
    if total < config.min_requests && !forced && config.policy == PolicyKind::FollowTheSun {
        (config.report)(&format!(
            "[{t:7.1}s] {}: stay in {} (too little traffic to decide: {total} requests < {})",
            config.app,
            fleet.region_name(current),
            config.min_requests
        ));
        return Ok(());
    }
    let decisions = sched.decide(now, &observed.inputs);
    for d in &decisions {
        (config.report)(&format!("{d}"));
        events.write(&Event::Decision {
            decision: d,
            requests: requests.clone(),
        })?;
    }
    let Some((from, to)) = decisions.iter().find_map(Decision::migration) else {
        return Ok(());
    };
    debug_assert_eq!(from, current);
    let app = config.app.as_str().into();
    if config.leader.as_ref().is_some_and(|l| !l.confirm()) {
        (config.report)(&format!(
            "[{t:7.1}s] no longer the leader: the move is left to the one that leads now"
        ));
        return Ok(());
    }
    if sched.migration_started(&app, now).is_err() {
        return Ok(()); // already in flight: the scheduler said stay
    }
    let record = Record::new(config, fleet, from, to);
    record.event(
        crate::events::Kind::MigrationStarted,
        serde_json::Value::Null,
    );
    let (ok, message, downtime_ms, total_ms, report) = migrate(fleet, &config.app, from, to);
    let _ = sched.migration_finished(&app, now, ok);
    match report {
        Some(report) => record.done(report),
        None => record.event(
            crate::events::Kind::MigrationFailed,
            serde_json::json!({ "error": message }),
        ),
    }
    (config.report)(&format!(
        "[{:7.1}s] migration of {} {} -> {}: {message}",
        now.as_secs_f64(),
        config.app,
        fleet.region_name(from),
        fleet.region_name(to)
    ));
    events.write(&Event::Migration {
        at_s: now.as_secs_f64(),
        app: &config.app,
        from: fleet.region_name(from),
        to: fleet.region_name(to),
        ok,
        downtime_ms,
        total_ms,
        message: &message,
    })
}

/// A move as the fleet state records it: the app's host (by
/// compare-and-swap) and the event stream, when the controller has a store.
struct Record<'a> {
    config: &'a ScheduleConfig,
    /// The fleet hosts (else the shims' addresses) of the move.
    hosts: [String; 2],
    /// The destination's fleet host.
    to: Option<String>,
}

impl<'a> Record<'a> {
    fn new(config: &'a ScheduleConfig, fleet: &Fleet, from: RegionId, to: RegionId) -> Self {
        let host = |r| {
            let addr = fleet.shim_of(r).map_or("?", |(a, _)| a);
            let name = config
                .state
                .as_ref()
                .and_then(|s| s.host_by_addr(addr).ok().flatten())
                .map(|h| h.name);
            (addr.to_owned(), name)
        };
        let (from_addr, from_host) = host(from);
        let (to_addr, to_host) = host(to);
        Self {
            config,
            hosts: [
                from_host.unwrap_or(from_addr),
                to_host.clone().unwrap_or(to_addr),
            ],
            to: to_host,
        }
    }

    fn event(&self, kind: crate::events::Kind, mut details: serde_json::Value) {
        let Some(state) = &self.config.state else {
            return;
        };
        if details.is_null() {
            details = serde_json::json!({});
        }
        if let (Some(l), Some(o)) = (&self.config.leader, details.as_object_mut()) {
            o.insert("replica".into(), l.replica().into());
        }
        let hosts = [self.hosts[0].as_str(), self.hosts[1].as_str()];
        state.note(crate::events::Event::new(
            kind,
            Some(&self.config.app),
            &hosts,
            details,
        ));
    }

    fn done(&self, report: api::MigrationReport) {
        if let (Some(state), Some(to)) = (&self.config.state, &self.to) {
            if let Err(e) = crate::locate::record_move(state, &self.config.app, to) {
                tracing::warn!(
                    instance = %self.config.app,
                    error = %e,
                    "cannot record the app's new host",
                );
            }
        }
        let details = serde_json::to_value(&report).expect("serializable");
        self.event(crate::events::Kind::MigrationDone, details);
    }
}

/// Moves `app` from region `from`'s shim to `to`'s: (ok, last line,
/// downtime ms, total ms, the report).
fn migrate(
    fleet: &Fleet,
    app: &str,
    from: RegionId,
    to: RegionId,
) -> (
    bool,
    String,
    Option<f64>,
    Option<f64>,
    Option<api::MigrationReport>,
) {
    let (Some((_, src)), Some((dst, _))) = (fleet.shim_of(from), fleet.shim_of(to)) else {
        return (
            false,
            "no shim in one of the regions".into(),
            None,
            None,
            None,
        );
    };
    let result = src.migrate(
        app,
        &MigrateRequest {
            to: dst.to_owned(),
            fingerprint: None,
        },
        |event| tracing::debug!(%event, "migrate"),
    );
    match result {
        Ok(report) => {
            let (down, total) = (report.downtime_ms, report.total_ms);
            (
                true,
                MigrationEvent::Done(report.clone()).to_string(),
                Some(down),
                Some(total),
                Some(report),
            )
        }
        Err(e) => (false, format!("failed: {e}"), None, None, None),
    }
}

/// Reads the price feed and the notices into this round's inputs; a bad
/// file is reported and left out (the round goes on without it).
fn load_feeds(config: &ScheduleConfig, fleet: &Fleet, observed: &mut Round, now: Duration) {
    let t = now.as_secs_f64();
    if let Some(path) = &config.prices {
        let table = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                PriceTable::from_csv(&text, &observed.inputs.regions).map_err(|e| e.to_string())
            });
        match table {
            Ok(table) => observed.inputs.prices = table,
            Err(e) => (config.report)(&format!(
                "[{t:7.1}s] warning: prices {}: {e}",
                path.display()
            )),
        }
    }
    if let Some(path) = &config.notices {
        match std::fs::read_to_string(path) {
            Ok(text) => match parse_notices(&text, fleet, SystemTime::now(), now) {
                Ok(n) => observed.inputs.notices = n,
                Err(e) => (config.report)(&format!(
                    "[{t:7.1}s] warning: notices {}: {e}",
                    path.display()
                )),
            },
            // No file: no notices.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => (config.report)(&format!(
                "[{t:7.1}s] warning: notices {}: {e}",
                path.display()
            )),
        }
    }
}

/// `region,DEADLINE` lines (Unix seconds; `#` comments) as notices on the
/// controller's clock (`now` is the controller's time at wall time `wall`).
pub fn parse_notices(
    text: &str,
    fleet: &Fleet,
    wall: SystemTime,
    now: Duration,
) -> Result<Vec<TerminationNotice>, String> {
    let wall = wall
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs_f64();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (region, deadline) = line
            .split_once(',')
            .ok_or_else(|| format!("line {}: not region,DEADLINE", i + 1))?;
        let region = fleet
            .region_id(region.trim())
            .ok_or_else(|| format!("line {}: no shim in region '{}'", i + 1, region.trim()))?;
        let deadline: f64 = deadline
            .trim()
            .parse()
            .map_err(|_| format!("line {}: '{}' is not a Unix time", i + 1, deadline.trim()))?;
        let in_s = (deadline - wall).max(-now.as_secs_f64());
        out.push(TerminationNotice {
            region,
            deadline: Duration::from_secs_f64((now.as_secs_f64() + in_s).max(0.0)),
        });
    }
    Ok(out)
}

/// The `--events` file (JSON lines, appended and flushed per event).
struct Events(Option<(PathBuf, std::fs::File)>);

impl Events {
    fn open(path: Option<PathBuf>) -> Result<Self, ScheduleError> {
        let Some(path) = path else {
            return Ok(Self(None));
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|err| ScheduleError::Events {
                path: path.clone(),
                err,
            })?;
        Ok(Self(Some((path, file))))
    }

    fn write(&mut self, event: &Event) -> Result<(), ScheduleError> {
        let Some((path, file)) = self.0.as_mut() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        file.write_all(&line).map_err(|err| ScheduleError::Events {
            path: path.clone(),
            err,
        })
    }
}
