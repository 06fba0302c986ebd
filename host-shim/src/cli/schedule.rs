//! `host-shim schedule APP`: the placement controller's command line; the
//! controller itself is `fleet::schedule`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use api::Client;
use clap::Args;
use fleet::leader::Elector;
use fleet::Fleet;

use super::parse_duration;

const SCHEDULE_ABOUT: &str = "\
Move an app between the shims of a fleet (one or more per region) as a
placement policy decides, until killed (or --rounds).

Every --interval it reads each shim's GET /v1/stats: the requests and bytes
the shim's published ports for the app received (clients connect to the
shim of their region) and the round trips the shims measure between each
other over the overlay. It moves the app to the best region only when that
beats the current one by more than --threshold, one migration at a time,
and prints every decision with its reason and scores.

Policies:
    follow-the-sun   score = request-weighted mean RTT from the clients'
                     regions (ms); --threshold in ms (e.g. 5ms)
    cost             score = the region's price per hour from --prices
                     (`region,price` CSV, re-read every round); --threshold
                     in price per hour

Termination notices (--notices FILE, re-read every round): lines
`region,DEADLINE` (Unix time, seconds); the app leaves a noticed region
before its deadline, whatever the threshold and cooldown.

Example:
    host-shim schedule kv --policy follow-the-sun --threshold 5ms \\
        --interval 10s --shim 127.0.0.1:7001 --shim 127.0.0.1:7002 --shim 127.0.0.1:7003
    host-shim schedule kv --policy follow-the-sun     every host of the fleet file

The shims are --shim ADDR or fleet host names, repeated (default: every host
of the fleet file); fleet hosts are reached as `fleet add` recorded them
(https with their pinned fingerprint and token), other addresses over plain
HTTP.";

/// Move an app between shims to follow its users (or the cheapest price).
#[derive(Args)]
#[command(long_about = SCHEDULE_ABOUT)]
pub struct ScheduleArgs {
    /// The instance to place (its name on the shims).
    app: String,
    /// The placement policy.
    #[arg(long, value_enum, default_value_t = SchedulePolicy::FollowTheSun)]
    policy: SchedulePolicy,
    /// The gain a move must exceed, in the policy's unit: ms (`5ms` or `5`)
    /// for follow-the-sun, price per hour for cost.
    #[arg(long, value_name = "GAIN", default_value = "5ms", value_parser = parse_threshold)]
    threshold: f64,
    /// How often to read the shims and decide.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    interval: Duration,
    /// After a migration, no other (non-forced) move for this long.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_cooldown)]
    cooldown: Duration,
    /// The price feed: `region,price` lines (re-read every round).
    #[arg(long, value_name = "FILE")]
    prices: Option<PathBuf>,
    /// Termination notices: `region,DEADLINE` lines, Unix seconds (re-read every round).
    #[arg(long, value_name = "FILE")]
    notices: Option<PathBuf>,
    /// Append every decision and migration to FILE as JSON lines.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Stop after this many rounds [default: run until killed]. A bounded run exits with
    /// status 1 if any round went without some shim's stats.
    #[arg(long, value_name = "N")]
    rounds: Option<u64>,
    /// Clients in network CIDR are in REGION (e.g. 10.1.0.0/16=eu-west);
    /// may be repeated [default: a request's region is its shim's].
    #[arg(long, value_name = "CIDR=REGION", value_parser = fleet::schedule::observe::ClientNet::parse)]
    client_region: Vec<fleet::schedule::observe::ClientNet>,
    /// follow-the-sun: below this many requests in a round, no move (too
    /// little evidence).
    #[arg(long, value_name = "N", default_value_t = 10)]
    min_requests: u64,
    /// This replica's name in the leader election (with --store etcd://...)
    /// [default: schedule-PID].
    #[arg(long, value_name = "NAME")]
    replica: Option<String>,
    /// With --store etcd://...: how long a dead leader keeps the role
    /// before another replica takes over (2s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    leader_ttl: Duration,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SchedulePolicy {
    FollowTheSun,
    Cost,
}

/// `5ms`, `5` or `0.01`: a non-negative number (an optional `ms` suffix).
fn parse_threshold(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches("ms")
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a threshold (e.g. 5ms, 0.01)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("the threshold must be >= 0, not {s}"));
    }
    Ok(v)
}

/// A duration that may be zero.
pub(super) fn parse_cooldown(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches('s').trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// `schedule`: the daemons are `--shim` addresses or fleet host names
/// (default: every host of the fleet file); fleet hosts are reached with
/// their pinned fingerprint and token, other addresses over plain HTTP.
///
/// With an etcd store (`store`), several replicas may run: they elect a
/// leader there, and only the leader decides and moves the app; every
/// move is recorded in the store (the app's host, the event stream).
pub fn schedule(
    args: ScheduleArgs,
    shims: Vec<String>,
    store: &str,
    access: &fleet::store::Access,
) -> anyhow::Result<u8> {
    use fleet::schedule::{PolicyKind, ScheduleConfig};
    let fleet = Arc::new(Fleet::new(fleet::store::open_with(store, access)?));
    let leader = if store.starts_with("etcd://") {
        let replica = args
            .replica
            .clone()
            .unwrap_or_else(|| format!("schedule-{}", std::process::id()));
        let role = format!("schedule/{}", args.app);
        let elector = Elector::start(
            fleet::store::open_with(store, access)?,
            &role,
            &replica,
            args.leader_ttl,
        )?;
        Some(Arc::new(elector))
    } else {
        None
    };
    // Moves are recorded where the app is (an app only given by --shim
    // addresses leaves the fleet file alone).
    let state = (leader.is_some() || fleet.app(&args.app)?.is_some()).then(|| Arc::clone(&fleet));
    let hosts = fleet.hosts()?;
    let clients = if shims.is_empty() {
        if hosts.is_empty() {
            anyhow::bail!(
                "no shims to schedule over: give --shim ADDR|HOST (several), or add hosts to \
                 the fleet (host-shim fleet add)"
            );
        }
        hosts
            .iter()
            .map(fleet::client_for)
            .collect::<Result<Vec<_>, _>>()?
    } else {
        let bare = |a: &str| {
            a.trim_start_matches("https://")
                .trim_start_matches("http://")
                .to_owned()
        };
        shims
            .iter()
            .map(
                |s| match hosts.iter().find(|h| h.name == *s || h.addr() == bare(s)) {
                    Some(h) => fleet::client_for(h),
                    None => Ok(Client::new(s)),
                },
            )
            .collect::<Result<Vec<_>, _>>()?
    };
    fleet::schedule::run(&ScheduleConfig {
        app: args.app,
        shims: clients,
        policy: match args.policy {
            SchedulePolicy::FollowTheSun => PolicyKind::FollowTheSun,
            SchedulePolicy::Cost => PolicyKind::Cost,
        },
        threshold: args.threshold,
        interval: args.interval,
        cooldown: args.cooldown,
        prices: args.prices,
        notices: args.notices,
        events: args.events,
        rounds: args.rounds,
        min_requests: args.min_requests,
        report: |line| println!("{line}"),
        client_regions: args.client_region,
        leader,
        state,
    })?;
    Ok(0)
}
