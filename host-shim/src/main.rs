//! `host-shim`: the command line. Parses flags, sets up logging to stderr
//! and turns how the guest ended into the process exit status.
//!
//! `run` and `restore` run a guest in this process; with `--shim ADDR` they
//! (and `list`, `stop`, `logs`, `snapshot`, `migrate`) talk to a daemon
//! started with `serve` (see `host_shim::daemon`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use host_shim::boot::cmdline::{self, GuestArgs};
use host_shim::config::{self, Backend, GuestSpec, NetOptions, QemuAccel, RunConfig};
use host_shim::daemon::api::{
    CheckpointInfo, CheckpointRequest, Client, InstanceInfo, MigrateRequest, RestoreRequest,
    RunRequest, SnapshotInfo, SnapshotRequest,
};
use host_shim::daemon::persist::{publish_arg, Restart};
use host_shim::daemon::{limits, DaemonConfig};
use host_shim::devices::virtio;
use host_shim::fleet::commands::{self, DeployOptions};
use host_shim::fleet::store;
use host_shim::fleet::{registry, Capacity, Fleet, FleetError, Host};
use host_shim::net::{NetMode, Nic, PublishSpec};
use host_shim::outcome::STATUS_SHIM_ERROR;
use host_shim::security::identity::{self, Identity};
use tracing_subscriber::EnvFilter;

const ABOUT: &str = "\
A small KVM monitor that boots libcloud unikernel images, and a daemon that
hosts several of them, snapshots them and moves them between hosts.

In this process:
    host-shim run IMAGE [--publish 8080:80] [-- ARGS]     boot an image
    host-shim restore FILE [--publish 8080:80]            run a snapshot

A daemon (one per host), TLS with authenticated callers:
    host-shim init --name us-east --region us-east [--listen 0.0.0.0:7443]   once
    host-shim serve                    prints its address and fingerprint
    host-shim peer add eu-west SHA256:... --addr https://203.0.113.7:7443
    host-shim list                     the local daemon (address, pin, token from --dir)
    host-shim --shim https://127.0.0.1:7443 run IMAGE --name kv   (pin, token from --dir)
    host-shim --shim https://HOST:7443 --fingerprint SHA256:... --token-file T list

A plain-HTTP daemon without identity or authentication (trusted networks):
    host-shim serve --listen 127.0.0.1:7000 --name us-east [--shim-id 1]
    host-shim --shim 127.0.0.1:7000 run IMAGE --name kv --publish 6379:6379
    host-shim --shim 127.0.0.1:7000 list
    host-shim --shim 127.0.0.1:7000 logs kv
    host-shim --shim 127.0.0.1:7000 snapshot kv --out /tmp/kv.snap
    host-shim --shim 127.0.0.1:7000 checkpoint kv --out /tmp/kv.ckpt
    host-shim --shim 127.0.0.1:7000 restore /tmp/kv.snap --name kv2
    host-shim --shim 127.0.0.1:7000 migrate kv --to 127.0.0.1:7100
    host-shim --shim 127.0.0.1:7000 stop kv
    host-shim --shim 127.0.0.1:7000 run IMAGE --name kv --checkpoint-every 1s --standby 127.0.0.1:7100
    host-shim --shim 127.0.0.1:7100 standbys         (restarts kv if 7000 dies)

Placement over a fleet of daemons:
    host-shim schedule kv --policy follow-the-sun --threshold 5ms --interval 10s \\
        --shim 127.0.0.1:7001 --shim 127.0.0.1:7002 --shim 127.0.0.1:7003
(--shim defaults to $HOST_SHIM, else the daemon of the identity in --dir (default
/var/lib/host-shim for root, else ~/.local/share/host-shim), else 127.0.0.1:7000;
logs/stop/migrate without --shim act on the fleet, below.)

A fleet (the hosts you own, each running `host-shim init` once, `peer add` for
the others, then `host-shim serve`), from your machine; the state is in
--fleet FILE ($HOST_SHIM_FLEET, default ~/.config/host-shim/fleet.json):
    host-shim fleet add us-east https://203.0.113.5:7443 --fingerprint SHA256:... --token TOKEN
                                       check it answers (TLS, pinned), note its region
    host-shim fleet add lab http://127.0.0.1:7000      a plain daemon (trusted networks)
    host-shim fleet ls | host-shim fleet rm us-east
    host-shim deploy target/images/kv.img --on us-east --name kv --publish 6379:6379
    host-shim ps                       every instance on every host (name, host, region,
                                       state, uptime, memory, address, ports)
    host-shim logs kv [--follow]       the console, wherever kv runs; --follow keeps
                                       streaming it and follows kv when it moves
    host-shim migrate kv --to eu-west  live, with a progress bar
    host-shim stop kv
(fleet ls, deploy, ps, migrate, stop take --json for scripts.)

Exit status of the fleet commands (fleet, deploy, ps, and logs/migrate/stop
without --shim):
    0  done
    1  failed: the shim refused (also a wrong token, or a certificate that is not
       the pinned one), bad flags, unreadable image or state file
    3  not found: no such host or app in the fleet, or not on its host
    4  unreachable: a host did not answer (ps lists the others first)
    5  conflict: the fleet state changed meanwhile (another CLI); run it again";

/// A small KVM monitor that boots libcloud unikernel images.
#[derive(Parser)]
#[command(name = "host-shim", version, propagate_version = true, long_about = ABOUT)]
struct Cli {
    /// The daemon to talk to (`host-shim serve --listen ADDR`): makes `run`
    /// and `restore` run the guest there instead of in this process.
    /// `https://HOST:PORT` for a daemon with an identity (needs its
    /// fingerprint and a token), `HOST:PORT` for a plain one.
    /// `schedule` takes several (repeated, or comma-separated).
    #[arg(
        long,
        global = true,
        value_name = "ADDR",
        env = "HOST_SHIM",
        value_delimiter = ','
    )]
    shim: Vec<String>,

    /// The fleet state file [default: ~/.config/host-shim/fleet.json].
    #[arg(long, global = true, value_name = "FILE", env = "HOST_SHIM_FLEET")]
    fleet: Option<PathBuf>,

    /// Where the fleet state lives: file://PATH [default: the --fleet file]
    /// or etcd://HOST:PORT[,HOST:PORT...]. With it, `serve` registers its
    /// host there under a lease (`fleet ls` shows it up, or down once the
    /// lease lapses).
    #[arg(long, global = true, value_name = "URL", env = "HOST_SHIM_STORE")]
    store: Option<String>,

    /// The host's state directory (identity, config, token, peers)
    /// [default: /var/lib/host-shim for root, else ~/.local/share/host-shim].
    #[arg(long, global = true, value_name = "DIR", env = "HOST_SHIM_DIR")]
    dir: Option<PathBuf>,

    /// The certificate fingerprint the --shim daemon must have [default: the
    /// one in --dir].
    #[arg(
        long,
        global = true,
        value_name = "SHA256:HEX",
        env = "HOST_SHIM_FINGERPRINT"
    )]
    fingerprint: Option<String>,

    /// A file holding the user token for the --shim daemon, `-` for
    /// standard input [default: $HOST_SHIM_TOKEN, else DIR/token].
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(RunArgs),
    Restore(RestoreArgs),
    Init(InitArgs),
    Serve(ServeArgs),
    #[command(subcommand)]
    Peer(PeerCmd),
    /// List a daemon's instances (name, state, address, memory, uptime, moves, image).
    List,
    /// Stop an app wherever it runs in the fleet and forget it (with
    /// --shim: a daemon's instance); its published ports go with it.
    Stop(StopArgs),
    /// Print an app's console (the last 256 KiB), wherever it runs in the
    /// fleet (with --shim: on that daemon); --follow streams it.
    Logs(LogsArgs),
    Snapshot(SnapshotArgs),
    Checkpoint(CheckpointArgs),
    Migrate(MigrateArgs),
    /// List the instances a daemon stands by for (`run --standby`): origin,
    /// state, checkpoint file and size.
    Standbys,
    Schedule(ScheduleArgs),
    /// The fleet's hosts: add, list, remove.
    #[command(subcommand)]
    Fleet(FleetCommand),
    Deploy(DeployArgs),
    /// Every instance on every fleet host: name, host, region, state,
    /// uptime, memory, address, ports (exit status 4 if a host did not answer).
    Ps(PsArgs),
}

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
struct ScheduleArgs {
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
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = config::parse_duration)]
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
    #[arg(long, value_name = "CIDR=REGION", value_parser = host_shim::schedule::observe::ClientNet::parse)]
    client_region: Vec<host_shim::schedule::observe::ClientNet>,
    /// follow-the-sun: below this many requests in a round, no move (too
    /// little evidence).
    #[arg(long, value_name = "N", default_value_t = 10)]
    min_requests: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SchedulePolicy {
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
fn parse_cooldown(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches('s').trim() == "0" {
        return Ok(Duration::ZERO);
    }
    config::parse_duration(s)
}

/// `schedule`: the daemons are `--shim` addresses or fleet host names
/// (default: every host of the fleet file); fleet hosts are reached with
/// their pinned fingerprint and token, other addresses over plain HTTP.
fn schedule(args: ScheduleArgs, shims: Vec<String>, fleet: &Fleet) -> anyhow::Result<u8> {
    use host_shim::schedule::{PolicyKind, ScheduleConfig};
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
            .map(host_shim::fleet::client_for)
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
                    Some(h) => host_shim::fleet::client_for(h),
                    None => Ok(Client::new(s)),
                },
            )
            .collect::<Result<Vec<_>, _>>()?
    };
    host_shim::schedule::run(&ScheduleConfig {
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
        client_regions: args.client_region,
    })?;
    Ok(0)
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Add a host (a `host-shim serve`): checks that it answers and notes its region.
    Add(FleetAddArgs),
    /// List the fleet's hosts.
    Ls(JsonArg),
    /// Remove a host from the fleet (its instances keep running).
    Rm(NameArg),
}

#[derive(Args)]
struct FleetAddArgs {
    /// The host's name in the fleet (e.g. us-east).
    name: String,
    /// Its API: https://ADDR:PORT for a host with an identity (then
    /// --fingerprint and --token), http://ADDR:PORT for a plain daemon.
    url: String,
    /// Its certificate fingerprint (SHA256:..., as its `init` and `serve`
    /// printed it): the host must present that certificate.
    #[arg(long, value_name = "SHA256:...")]
    fingerprint: Option<String>,
    /// Your user token on that host (its `init` printed it; in its
    /// DIR/token). Other local users see command lines (`ps`): prefer
    /// --token-file FILE (`-`: standard input).
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    token: Option<String>,
    #[command(flatten)]
    json: JsonArg,
}

#[derive(Args)]
struct JsonArg {
    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PsArgs {
    /// Also show what apps left behind on shims they moved away from.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    json: JsonArg,
}

#[derive(Args)]
struct StopArgs {
    /// The app's (instance's) name.
    name: String,
    #[command(flatten)]
    json: JsonArg,
}

#[derive(Args)]
struct LogsArgs {
    /// The app's (instance's) name.
    name: String,
    /// Keep streaming new output; when the app moves to another shim, go
    /// on from there. Ends when the app ends.
    #[arg(long, short)]
    follow: bool,
}

/// Upload an image to a fleet host (content-addressed: skipped when the
/// host has it) and run it there.
#[derive(Args)]
struct DeployArgs {
    /// The image: an ELF built by `cargo xtask build-image`.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// The fleet host to run it on.
    #[arg(long, value_name = "HOST")]
    on: String,
    /// The app's name [default: the image's file stem].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Forward a port of the host to the app:
    /// [HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT[/tcp|/udp]; may be repeated.
    #[arg(long, value_name = "MAPPING", value_parser = config::parse_publish)]
    publish: Vec<PublishSpec>,
    /// Pass KEY=VALUE to the app's environment; may be repeated.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = config::parse_env)]
    env: Vec<(String, String)>,
    /// Guest memory (K/M/G suffix).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = config::parse_mem_size)]
    mem: u64,
    /// `always`: the app comes back when its shim restarts (booted again,
    /// from its latest checkpoint if it has one); `never`: it does not.
    #[arg(long, value_name = "POLICY", default_value_t = Restart::Always)]
    restart: Restart,
    /// Have the app checkpoint itself this often (kept in the shim's
    /// --state-dir; a restart resumes from the latest).
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    checkpoint_every: Option<Duration>,
    #[command(flatten)]
    json: JsonArg,
    /// Arguments for the app, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

/// Run a guest from a snapshot file (in this process, or with --shim in a
/// daemon, which reads the file).
#[derive(Args)]
struct RestoreArgs {
    /// The snapshot file (`host-shim snapshot NAME --out FILE`).
    #[arg(value_name = "FILE")]
    file: PathBuf,

    /// With --shim: the instance name [default: the saved one].
    #[arg(long)]
    name: Option<String>,

    /// Forward a host port to the guest:
    /// [HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT[/tcp|/udp]; may be repeated.
    #[arg(long, value_name = "MAPPING", value_parser = config::parse_publish)]
    publish: Vec<PublishSpec>,

    /// The host name the guest is told it now runs on [default: this machine's].
    #[arg(long, value_name = "NAME")]
    host_name: Option<String>,

    /// The region the guest is told it now runs in.
    #[arg(long, value_name = "REGION", default_value = "local")]
    region: String,

    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS", value_parser = config::parse_timeout)]
    timeout: Option<Duration>,

    /// The KVM device to open.
    #[arg(long, value_name = "PATH", default_value = host_shim::vstate::vm::KVM_DEVICE)]
    kvm_device: PathBuf,
}

const SERVE_ABOUT: &str = "\
Run a shim daemon until killed: it hosts named instances (each guest on its
own vCPU thread, all on the shim's virtual switch) and is driven over an
HTTP/1.1 JSON API on --listen (endpoints: see the host_shim::daemon docs;
the subcommands list, run, stop, logs, snapshot, restore, migrate use it).

Addresses: shim N (--shim-id N, 1..14) has gateway 10.0.2.(N+1) and gives
its guests 10.0.2.(16N) to 10.0.2.(16N+15), so shims with distinct ids can
share one overlay and guests keep their address when they move. Give every
shim of a fleet its own id.

Security: with an identity (`host-shim init`; found in --dir, or in the
default directory when --listen is not given) the API and the migration
streams are TLS 1.3; users call with the token (401 otherwise), peer hosts
with their pinned certificates (`host-shim peer add`; a migration stream
from any other host is refused with 403), and overlay datagrams are
encrypted with keys derived from the fleet key and taken only from the
pinned peers' addresses (others are dropped, counted and logged).

Overlay: shims exchange guest frames over UDP with a VXLAN header
(RFC 7348) at the --overlay address (default: the --listen address, UDP).
Peers are learnt from migrations (both sides tell each other their overlay
address) or given with --peer. After a guest moves, its old shim forwards
frames for it (and its published ports keep working) over the overlay.";

const INIT_ABOUT: &str = "\
Create this host's identity once, in the state directory (--dir): a key and
a self-signed certificate (its SHA-256 fingerprint identifies the host), the
host's config (name, region, API address, shim id), a user token for the API
(printed once, kept in DIR/token, readable only by you) and the fleet's
overlay key (DIR/fleet.key; give every host of a fleet the same one with
--fleet-key-file). Then `host-shim serve` runs the daemon with TLS.";

/// Create this host's identity (key, certificate, token, fleet key) and config.
#[derive(Args)]
#[command(long_about = INIT_ABOUT)]
struct InitArgs {
    /// This host's name: guests are told they run on it.
    #[arg(long, value_name = "NAME")]
    name: String,

    /// The region guests are told they run in.
    #[arg(long, value_name = "REGION")]
    region: String,

    /// The API address (HTTPS; the overlay uses the same port, UDP).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7443")]
    listen: std::net::SocketAddr,

    /// This shim's number in its fleet (1..14): picks its gateway and guest addresses.
    #[arg(long, value_name = "N", default_value_t = 1)]
    shim_id: u8,

    /// The fleet's overlay key, from another host (its DIR/fleet.key)
    /// [default: a new key, for the first host of a fleet].
    #[arg(long, value_name = "FILE")]
    fleet_key_file: Option<PathBuf>,

    /// Use the user token in this file (e.g. another host's DIR/token; `-`
    /// for standard input) instead of a new one.
    #[arg(long = "user-token-file", value_name = "FILE")]
    user_token_file: Option<PathBuf>,
}

/// Pin other hosts of the fleet by certificate fingerprint: only pinned
/// peers may send this host a migration stream.
#[derive(Subcommand)]
enum PeerCmd {
    /// Pin a host (or replace the pin of that name).
    Add {
        name: String,
        /// Its fingerprint, as its `init` or `serve` printed it.
        #[arg(value_name = "SHA256:HEX")]
        fingerprint: String,
        /// Its API address: lets `migrate --to NAME` find it.
        #[arg(long, value_name = "https://HOST:PORT")]
        addr: Option<String>,
    },
    /// Unpin a host.
    Remove { name: String },
    /// This host's fingerprint and its pinned peers.
    List,
}

/// Run a shim daemon that hosts instances and moves them between shims.
#[derive(Args)]
#[command(long_about = SERVE_ABOUT)]
struct ServeArgs {
    /// The API address [default: the identity's]. Without an identity
    /// (no `init`, no --dir) this starts a plain-HTTP daemon without
    /// authentication, for trusted networks and tests.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,

    /// This shim's name: guests are told they run on it [default: the
    /// identity's, else this machine's host name].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// The region guests are told they run in [default: the identity's, else local].
    #[arg(long, value_name = "REGION")]
    region: Option<String>,

    /// This shim's number in its fleet (1..14): picks its gateway and guest
    /// addresses [default: the identity's, else 1].
    #[arg(long, value_name = "N")]
    shim_id: Option<u8>,

    /// Shim-level published port, to a guest address:
    /// [HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT (the guest defaults to
    /// the first address of this shim). Usually ports belong to instances:
    /// `run --publish`.
    #[arg(long, value_name = "MAPPING", value_parser = config::parse_publish)]
    publish: Vec<PublishSpec>,

    /// The overlay's UDP address [default: the --listen address].
    #[arg(long, value_name = "ADDR")]
    overlay: Option<std::net::SocketAddr>,

    /// Another shim's overlay address; may be repeated.
    #[arg(long, value_name = "ADDR")]
    peer: Vec<std::net::SocketAddr>,

    /// Reach the peer at overlay address REAL through the relay at VIA
    /// (e.g. a `wan-relay udp` emulating a WAN link), and take datagrams from
    /// VIA as REAL's; this daemon's TCP connections to a peer's API address
    /// REAL (migrations, image pushes, standby checkpoints) go to VIA too (a
    /// `wan-relay tcp`; TLS still pins the peer); may be repeated.
    #[arg(long, value_name = "REAL=VIA", value_parser = parse_peer_via)]
    peer_via: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,

    /// The VXLAN network identifier of the fleet [default: the identity's, else 4242].
    #[arg(long, value_name = "VNI")]
    vni: Option<u32>,

    /// No overlay (guests cannot be reached after they move away).
    #[arg(long)]
    no_overlay: bool,

    /// The KVM device to open.
    #[arg(long, value_name = "PATH", default_value = host_shim::vstate::vm::KVM_DEVICE)]
    kvm_device: PathBuf,

    /// Keep uploaded images (DIR/images, by SHA-256) and the instances run
    /// with `--restart always` (DIR/instances): after a restart of the
    /// daemon they boot again, from their app's latest checkpoint if any.
    /// [default: the identity's directory (--dir), for a host with an
    /// identity]. Without it, images cannot be uploaded and nothing is kept.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// The largest image upload accepted (K/M suffixes; at most 16M).
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = config::parse_byte_size)]
    max_image_size: u64,

    /// API connections served at once; beyond, the oldest one still
    /// sending its request is cut to make room, else the new one gets 503.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,

    /// Request bodies held in memory at once, in bytes (K/M/G); beyond, 503.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = config::parse_byte_size)]
    max_request_memory: u64,

    /// How long a client has for a request's head and body, whole.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = config::parse_duration)]
    request_timeout: Duration,

    /// How long a client has for a TLS handshake, whole.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = config::parse_duration)]
    handshake_timeout: Duration,

    /// Instances at once (running or starting) [default: host memory / 64
    /// MiB, 1 to 256].
    #[arg(long, value_name = "N")]
    max_instances: Option<usize>,

    /// Guest memory of all instances at once (K/M/G) [default: the host's
    /// memory (MemTotal) times --memory-overcommit].
    #[arg(long, value_name = "SIZE", value_parser = config::parse_byte_size)]
    max_guest_memory: Option<u64>,

    /// Guest memory allowed per byte of host memory, when
    /// --max-guest-memory is not given.
    #[arg(long, value_name = "RATIO", default_value_t = limits::DEFAULT_OVERCOMMIT)]
    memory_overcommit: f64,

    /// Published ports per instance.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_MAX_PUBLISH)]
    max_publish: usize,

    /// Let instances publish host ports below 1024 (refused otherwise).
    #[arg(long)]
    allow_privileged_ports: bool,

    /// Send every dirty page of a migrating guest, even heap pages it says
    /// are free.
    #[arg(long)]
    no_free_page_hints: bool,

    /// For tests only: die, cut the connection or corrupt a byte at a step
    /// of every migration this daemon takes part in (STEP: precopy, paused,
    /// ready, commit, committed; FAULT: die, cut, corrupt, hang).
    #[arg(long, value_name = "STEP:FAULT", hide = true)]
    test_fault: Option<host_shim::migration::faults::Injected>,

    /// With --store: how long this host stays registered as up after its
    /// daemon stops renewing its lease (it renews it every third of that).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = config::parse_duration)]
    lease_ttl: Duration,

    /// With --store: the API address other machines reach this host at,
    /// as recorded in the store [default: the --listen address, which must
    /// then be a specific one, not 0.0.0.0].
    #[arg(long, value_name = "ADDR")]
    advertise: Option<std::net::SocketAddr>,
}

impl ServeArgs {
    /// The daemon's limits from these flags and the host's memory.
    fn limits(&self) -> anyhow::Result<limits::Limits> {
        if !(self.memory_overcommit > 0.0 && self.memory_overcommit.is_finite()) {
            anyhow::bail!(
                "--memory-overcommit {} must be a positive number",
                self.memory_overcommit
            );
        }
        if self.max_connections == 0 {
            anyhow::bail!("--max-connections must be at least 1");
        }
        let defaults = limits::Limits::default();
        let host = limits::host_memory();
        Ok(limits::Limits {
            max_connections: self.max_connections,
            max_request_memory: self.max_request_memory,
            request_timeout_ms: self.request_timeout.as_millis() as u64,
            handshake_timeout_ms: self.handshake_timeout.as_millis() as u64,
            max_instances: self.max_instances.unwrap_or(defaults.max_instances),
            max_guest_memory: self.max_guest_memory.unwrap_or_else(|| {
                host.map_or(defaults.max_guest_memory, |h| {
                    limits::guest_memory_for(h, self.memory_overcommit)
                })
            }),
            max_publish: self.max_publish,
            allow_privileged_ports: self.allow_privileged_ports,
        })
    }
}

#[derive(Args)]
struct NameArg {
    /// The instance's name.
    name: String,
}

/// Write a snapshot of a daemon's instance (it is paused meanwhile).
#[derive(Args)]
struct SnapshotArgs {
    /// The instance's name.
    name: String,
    /// The file to write (by the daemon). A daemon with a state directory
    /// writes only there (STATE/snapshots or STATE/checkpoints): give a
    /// file name; other paths are refused (403).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Ask a daemon's instance's app for a checkpoint of its state (an app
/// checkpoint: small, restorable by `run --restore FILE` on any monitor).
#[derive(Args)]
struct CheckpointArgs {
    /// The instance's name.
    name: String,
    /// The file to write (by the daemon). A daemon with a state directory
    /// writes only there (STATE/snapshots or STATE/checkpoints): give a
    /// file name; other paths are refused (403).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// How long to wait for the app's checkpoint.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = config::parse_duration)]
    wait: Duration,
}

/// Move a running app to another fleet host (with --shim: an instance to
/// another daemon), live: memory, CPU, devices and open connections.
#[derive(Args)]
struct MigrateArgs {
    /// The app's (instance's) name.
    name: String,
    /// The destination: a fleet host (with --shim: a daemon's API address).
    #[arg(long, value_name = "HOST")]
    to: String,
    #[command(flatten)]
    json: JsonArg,
    /// The destination's certificate fingerprint, if it is not a pinned
    /// peer of the source (with --shim).
    #[arg(long, value_name = "SHA256:HEX")]
    to_fingerprint: Option<String>,
}

const RUN_ABOUT: &str = "\
Boot a libcloud image and run it until it exits.

The guest's console goes to stdout; the shim's own messages go to stderr
(set RUST_LOG=info or debug for more of them; the default is warn).

The guest receives the command line
    lc.host=NAME lc.region=REGION [lc.ip=ADDR/PREFIX lc.gw=ADDR] KEY=VALUE ...
    [virtio_mmio.device=0x200@0xc0001000:5] -- ARGS...
(tokens with spaces, quotes or backslashes are double-quoted).

Network (off unless a network flag is given):
    --publish [HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT[/tcp|/udp]
           user-mode network (no root needed), like QEMU's -nic user,hostfwd=:
           subnet 10.0.2.0/24, gateway 10.0.2.2 (answers ARP and ping), guests
           10.0.2.15, .16, ... Each connection to HOST_ADDR:HOST_PORT (default
           address 127.0.0.1) is forwarded to GUEST_PORT of the main guest (or
           of GUEST_ADDR). Repeatable. Example: --publish 8080:80
    --net user         the user-mode network without published ports
    --net tap=NAME     attach the guests to the host's TAP device NAME (created
           if missing; needs CAP_NET_ADMIN unless made for your user with
           `ip tuntap add dev NAME mode tap user $USER`); give the host side an
           address in the guests' subnet and set it up (ip link set NAME up)
    --net none         no network device (the default)
    --ip ADDR[/PREFIX] --gateway ADDR --mac MAC
           the main guest's address (default 10.0.2.15/24), gateway (default
           10.0.2.2 in that subnet) and MAC (default 02:4c + the address bytes)

Several guests:
    --also 'IMAGE ARG...'  boots IMAGE in the same process, on its own vCPU
           thread and on the same switch, with the next address (10.0.2.16,
           ...), the same --mem, --env, --host-name and --region, and ARGs as
           its arguments. Its console lines are prefixed with [IMAGE-STEM].
           Repeatable. The shim exits with the main guest's status and stops
           the others then.

App checkpoints (apps using libcloud::state, e.g. kv):
    --restore FILE     hand the app a checkpoint to restore before its main
           runs (under QEMU: over a virtio console, the checkpoint port). A
           corrupt, truncated or non-checkpoint file is refused here; the
           app refuses (exit 3) one of another app or schema version. A file
           of several checkpoints restores its latest complete chain.
    --checkpoint-every DURATION --checkpoint-to DIR
           the app checkpoints itself every DURATION; each checkpoint is
           stored durably as DIR/latest.ckpt (temp file, fsync, rename)
           before the app goes on (under QEMU too: they come over the
           checkpoint port and are answered once stored). A crash loses at
           most DURATION of writes.
           Checkpoints are incremental where the app supports it (kv
           does): a delta of what changed is appended to DIR/latest.ckpt
           and synced; a full one replaces the file when the deltas
           outgrow it. A torn last delta (a crash mid-write) is ignored.
    --standby ADDR [--standby-grace DURATION]   (with --shim)
           crash recovery on another shim: the daemon at ADDR (host-shim
           serve) receives every checkpoint, durably, before the app goes
           on, and probes this daemon; when it has been unreachable for
           DURATION (default 2s) it restarts the app from the latest
           checkpoint with the same image (same path and SHA-256 there),
           args, env, memory and published ports. kv with
           --env ACK_AFTER_CHECKPOINT=1 acknowledges a write only once the
           standby has it: a crash loses no acknowledged write.
    host-shim --shim ADDR checkpoint NAME --out FILE   one checkpoint now

Exit status:
    0-255  the guest's own exit code (101: the guest panicked,
           102: the guest took a CPU exception)
    1      also: the shim could not run the guest (bad image, no KVM,
           bad flags, QEMU missing)
    124    --timeout expired and the guest was stopped
    125    the guest died without an exit code (triple fault, hlt,
           KVM internal error, QEMU power-off)";

/// Boot a libcloud image and run it until it exits.
#[derive(Args)]
#[command(long_about = RUN_ABOUT)]
#[command(group(clap::ArgGroup::new("checkpoint_dest").multiple(true)))]
struct RunArgs {
    /// The image to boot: an ELF built by `cargo xtask build-image`.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,

    /// Guest memory: bytes, or with a K/M/G suffix (64M, 1G, 33554432).
    /// A multiple of 2 MiB, from 4 MiB up to 3 GiB.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = config::parse_mem_size)]
    mem: u64,

    /// The monitor: `kvm` (our own, the guest starts directly in ring 3),
    /// `qemu` (qemu-system-x86_64 -M microvm, booting the PVH entry) or
    /// `firecracker` (booting the PVH entry).
    #[arg(long, value_enum, default_value_t = Backend::Kvm)]
    backend: Backend,

    /// The Firecracker binary for --backend firecracker [default: $FIRECRACKER].
    #[arg(long, value_name = "PATH")]
    firecracker: Option<PathBuf>,

    /// Stop the guest after this many seconds (fractions allowed) and exit
    /// with status 124.
    #[arg(long, value_name = "SECS", value_parser = config::parse_timeout)]
    timeout: Option<Duration>,

    /// Pass KEY=VALUE to the guest's environment; may be repeated.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = config::parse_env)]
    env: Vec<(String, String)>,

    /// The host name the guest is told (lc.host) [default: this machine's host name].
    #[arg(long, value_name = "NAME")]
    host_name: Option<String>,

    /// The region the guest is told (lc.region).
    #[arg(long, value_name = "REGION", default_value = "local")]
    region: String,

    /// QEMU's accelerator with --backend qemu: `tcg` (emulation, -cpu max)
    /// or `kvm` (-cpu host). On nested-KVM hosts, ring-0 guest code is very
    /// slow under kvm: prefer tcg there.
    #[arg(long, value_enum, value_name = "ACCEL", default_value_t = QemuAccel::Tcg)]
    qemu_accel: QemuAccel,

    /// The KVM device to open.
    #[arg(long, value_name = "PATH", default_value = host_shim::vstate::vm::KVM_DEVICE)]
    kvm_device: PathBuf,

    /// Forward a host port to a guest port over the user-mode network:
    /// [HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT[/tcp|/udp] (host address
    /// 127.0.0.1 by default, the main guest by default); may be repeated.
    #[arg(long, value_name = "MAPPING", value_parser = config::parse_publish)]
    publish: Vec<PublishSpec>,

    /// The guests' network: `user` (user-mode, implied by --publish),
    /// `tap=NAME` (a host TAP device) or `none` [default: none, or user with
    /// --publish].
    #[arg(long, value_name = "MODE", value_parser = config::parse_net_mode)]
    net: Option<NetMode>,

    /// The main guest's IPv4 address and prefix length [default: 10.0.2.15/24].
    #[arg(long, value_name = "ADDR[/PREFIX]", value_parser = config::parse_ip_prefix)]
    ip: Option<(std::net::Ipv4Addr, u8)>,

    /// The main guest's gateway [default: 10.0.2.2 when in 10.0.2.0/24].
    #[arg(long, value_name = "ADDR", value_parser = config::parse_ipv4)]
    gateway: Option<std::net::Ipv4Addr>,

    /// The main guest's MAC address [default: 02:4c:<the four bytes of its IP>].
    #[arg(long, value_name = "MAC", value_parser = config::parse_mac)]
    mac: Option<[u8; 6]>,

    /// Boot another guest in this process on the same network: 'IMAGE ARG...'
    /// (one string, split at spaces; double quotes group words); may be repeated.
    #[arg(long, value_name = "'IMAGE ARG...'")]
    also: Vec<String>,

    /// With --shim: the instance's name [default: the image's file stem].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Hand the app this checkpoint (`abi::checkpoint`, e.g. DIR/latest.ckpt
    /// or `checkpoint NAME --out FILE`) to restore its state from before its
    /// main runs. Works with both backends (QEMU: over a virtio console).
    #[arg(long, value_name = "FILE")]
    restore: Option<PathBuf>,

    /// Have the app checkpoint itself this often (e.g. 5s, 500ms); needs
    /// --checkpoint-to.
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration, requires = "checkpoint_dest")]
    checkpoint_every: Option<Duration>,

    /// Store the app's checkpoints as DIR/latest.ckpt (atomically, each one
    /// durable before the app goes on). With --shim, a daemon with a state
    /// directory keeps them only there: give a directory name (it goes to
    /// STATE/checkpoints).
    #[arg(long, value_name = "DIR", group = "checkpoint_dest")]
    checkpoint_to: Option<PathBuf>,

    /// With --shim: ship every checkpoint to the standby daemon at ADDR,
    /// which restarts the app from the latest one (same image, args, env,
    /// memory, published ports) when this daemon has been unreachable for
    /// --standby-grace.
    #[arg(long, value_name = "ADDR", group = "checkpoint_dest")]
    standby: Option<String>,

    /// With --standby: how long the daemon may be unreachable before the
    /// standby takes over (e.g. 2s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = config::parse_duration)]
    standby_grace: Duration,
    /// With --shim: whether the instance comes back when its daemon
    /// restarts (`always` needs `serve --state-dir`).
    #[arg(long, value_name = "POLICY", default_value_t = Restart::Never)]
    restart: Restart,

    /// Arguments for the app, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

fn main() -> ExitCode {
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version go to stdout with status 0; usage errors
            // are shim errors (status 1, not clap's 2).
            return if e.use_stderr() {
                ExitCode::from(STATUS_SHIM_ERROR)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let fleet = cli
        .fleet
        .clone()
        .unwrap_or_else(host_shim::fleet::default_path);
    let target = Target {
        shim: cli.shim.first().cloned(),
        shims: cli.shim,
        fleet,
        store: cli.store,
        dir: cli.dir,
        fingerprint: cli.fingerprint,
        token_file: cli.token_file,
    };
    match execute(cli.command, &target) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(STATUS_SHIM_ERROR)
        }
    }
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// Which daemon the client subcommands talk to, and how.
struct Target {
    /// `--shim` (the first).
    shim: Option<String>,
    /// Every `--shim` (`schedule` takes several).
    shims: Vec<String>,
    /// The fleet state file.
    fleet: PathBuf,
    /// `--store URL`, if given.
    store: Option<String>,
    dir: Option<PathBuf>,
    fingerprint: Option<String>,
    token_file: Option<PathBuf>,
}

impl Target {
    fn dir(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(identity::default_dir)
    }

    /// The local identity, if there is one.
    fn local(&self) -> anyhow::Result<Option<Identity>> {
        let dir = self.dir();
        if !identity::exists(&dir) {
            return Ok(None);
        }
        Ok(Some(identity::load(&dir)?))
    }

    /// A client: `--shim https://...` with a pinned fingerprint and a
    /// token, `--shim HOST:PORT` plain, or the local daemon of --dir.
    fn client(&self) -> anyhow::Result<Client> {
        let addr = match &self.shim {
            Some(addr) if !addr.starts_with("https://") => return Ok(Client::new(addr)),
            Some(addr) => addr.clone(),
            None => match self.local()? {
                Some(id) => {
                    let mut listen = id.config.listen;
                    if listen.ip().is_unspecified() {
                        listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                    }
                    format!("https://{listen}")
                }
                None => return Ok(Client::new("127.0.0.1:7000")),
            },
        };
        let local = self.local()?;
        let pin = match (&self.fingerprint, &local) {
            (Some(fp), _) => fp.parse().map_err(anyhow::Error::msg)?,
            (None, Some(id)) => id.fingerprint,
            (None, None) => anyhow::bail!(
                "{addr} needs the daemon's certificate fingerprint: --fingerprint SHA256:... \
                 (as its `init` or `serve` printed it)"
            ),
        };
        let token = match (&self.token_file, std::env::var("HOST_SHIM_TOKEN"), &local) {
            (Some(file), _, _) => identity::read_token(file)?,
            (None, Ok(t), _) if !t.is_empty() => t,
            (None, _, Some(id)) => id.token.clone(),
            (None, _, None) => anyhow::bail!(
                "{addr} needs a user token: --token-file FILE or HOST_SHIM_TOKEN \
                 (the token the daemon's `init` printed)"
            ),
        };
        Ok(Client::secure(&addr, pin, Some(token), None)?)
    }
}

/// The fleet commands' outcome: their status, after printing why they failed.
fn fleet_status(result: Result<u8, FleetError>) -> anyhow::Result<u8> {
    Ok(result.unwrap_or_else(|e| {
        eprintln!("Error: {e}");
        e.exit_code()
    }))
}

fn execute(command: Command, target: &Target) -> anyhow::Result<u8> {
    if target.shims.len() > 1 && !matches!(command, Command::Schedule(_)) {
        anyhow::bail!("several --shim addresses: only `schedule` takes more than one");
    }
    let shim = target.shim.clone();
    // logs/stop/migrate act on one daemon when one is named (--shim, or
    // --dir: the local secure daemon), else on the fleet.
    let on_daemon = shim.is_some() || target.dir.is_some();
    let store = target
        .store
        .clone()
        .unwrap_or_else(|| format!("file://{}", target.fleet.display()));
    let fleet = || store::open(&store).map(Fleet::new);
    match command {
        Command::Schedule(args) => schedule(args, target.shims.clone(), &fleet()?),
        Command::Fleet(FleetCommand::Add(a)) => fleet_status(commands::fleet_add(
            &fleet()?,
            Host {
                name: a.name,
                url: a.url,
                region: String::new(),
                fingerprint: a.fingerprint,
                token: match (a.token, &target.token_file) {
                    (Some(t), _) => Some(t),
                    (None, Some(file)) => Some(identity::read_token(file)?),
                    (None, None) => None,
                },
                ..Host::default()
            },
            a.json.json,
        )),
        Command::Fleet(FleetCommand::Ls(a)) => fleet_status(commands::fleet_ls(&fleet()?, a.json)),
        Command::Fleet(FleetCommand::Rm(a)) => fleet_status(commands::fleet_rm(&fleet()?, &a.name)),
        Command::Deploy(a) => {
            let name = a.name.clone().unwrap_or_else(|| stem(&a.image));
            fleet_status(commands::deploy(
                &fleet()?,
                DeployOptions {
                    image: &a.image,
                    on: &a.on,
                    name: &name,
                    mem: a.mem,
                    env: a.env,
                    args: a.args,
                    publish: a.publish.iter().map(publish_arg).collect(),
                    restart: a.restart,
                    checkpoint_every_ms: a.checkpoint_every.map(|d| d.as_millis() as u64),
                },
                a.json.json,
            ))
        }
        Command::Ps(a) => fleet_status(commands::ps(&fleet()?, a.all, a.json.json)),
        Command::Stop(a) if !on_daemon => {
            fleet_status(commands::stop(&fleet()?, &a.name, a.json.json))
        }
        Command::Logs(a) if !on_daemon => {
            fleet_status(commands::logs(&fleet()?, &a.name, a.follow))
        }
        Command::Migrate(a) if !on_daemon => {
            fleet_status(commands::migrate(&fleet()?, &a.name, &a.to, a.json.json))
        }
        Command::Logs(a) if a.follow => {
            let client = target.client()?;
            let addr = client.addr.clone();
            fleet_status(commands::follow_logs(client, &addr, &a.name, None))
        }
        Command::Run(args) => match shim {
            Some(_) => remote_run(&target.client()?, args),
            None => run(args),
        },
        Command::Restore(args) => match shim {
            Some(_) => remote_restore(&target.client()?, args),
            None => restore(args),
        },
        Command::Init(args) => init(&target.dir(), args),
        Command::Serve(args) => serve(args, target),
        Command::Peer(cmd) => peer(&target.dir(), cmd),
        Command::List => list(&target.client()?),
        Command::Standbys => standbys(&target.client()?),
        Command::Stop(n) => {
            let client = target.client()?;
            let info: InstanceInfo =
                client.json::<(), _>("POST", &format!("/v1/instances/{}/stop", n.name), None)?;
            println!("stopped {}", info.name);
            Ok(0)
        }
        Command::Logs(n) => {
            let client = target.client()?;
            let answer = client.call("GET", &format!("/v1/instances/{}/logs", n.name), None)?;
            use std::io::Write;
            std::io::stdout().write_all(&answer.body)?;
            Ok(0)
        }
        Command::Snapshot(a) => {
            let client = target.client()?;
            let out = output_arg(&a.out)?;
            let info: SnapshotInfo = client.json(
                "POST",
                &format!("/v1/instances/{}/snapshot", a.name),
                Some(&SnapshotRequest {
                    out: out.display().to_string(),
                }),
            )?;
            println!(
                "snapshot of {} written to {}: {} pages, {} bytes, guest paused {:.1} ms",
                a.name, info.file, info.pages, info.bytes, info.paused_ms
            );
            Ok(0)
        }
        Command::Checkpoint(a) => {
            let client = target.client()?;
            let out = output_arg(&a.out)?;
            let info: CheckpointInfo = client.json(
                "POST",
                &format!("/v1/instances/{}/checkpoint", a.name),
                Some(&CheckpointRequest {
                    out: out.display().to_string(),
                    timeout_ms: Some(a.wait.as_millis() as u64),
                }),
            )?;
            println!(
                "checkpoint of {} written to {}: {} bytes ({}), {:.1} ms",
                a.name, info.file, info.bytes, info.describe, info.ms
            );
            Ok(0)
        }
        Command::Migrate(a) => {
            let client = target.client()?;
            let last = client.stream_lines(
                &format!("/v1/instances/{}/migrate", a.name),
                &MigrateRequest {
                    to: a.to.clone(),
                    fingerprint: a.to_fingerprint.clone(),
                },
                |line| println!("{line}"),
            )?;
            if last.starts_with("ok") {
                Ok(0)
            } else {
                anyhow::bail!(
                    "migration of {} to {} did not complete{}",
                    a.name,
                    a.to,
                    if last.is_empty() {
                        " (the shim closed the connection)".to_owned()
                    } else {
                        String::new()
                    }
                )
            }
        }
    }
}

/// An image's file stem (the default instance name).
fn stem(image: &Path) -> String {
    image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "guest".into())
}

/// `--out` of snapshot and checkpoint (and `--checkpoint-to`) as sent to
/// the daemon: a bare name as is (a daemon with a state directory writes
/// it there), any other path made absolute.
fn output_arg(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    if path.components().count() == 1 && path.file_name().is_some() {
        return Ok(path.to_owned());
    }
    absolute(path)
}

fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_owned())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}

fn list(client: &Client) -> anyhow::Result<u8> {
    let list: Vec<InstanceInfo> = client.json::<(), _>("GET", "/v1/instances", None)?;
    println!(
        "{:<16} {:<24} {:<18} {:>8} {:>10} {:>4}  IMAGE",
        "NAME", "STATE", "IP", "MEM", "UPTIME", "GEN"
    );
    for i in list {
        println!(
            "{:<16} {:<24} {:<18} {:>7}M {:>9.1}s {:>4}  {}",
            i.name,
            i.state,
            i.ip.unwrap_or_else(|| "-".into()),
            i.mem >> 20,
            i.uptime_s,
            i.generation,
            i.image
        );
    }
    Ok(0)
}

fn standbys(client: &Client) -> anyhow::Result<u8> {
    let list: Vec<host_shim::daemon::standby::StandbyInfo> =
        client.json::<(), _>("GET", "/v1/standby", None)?;
    println!(
        "{:<16} {:<22} {:<24} {:>10} {:>6}  FILE",
        "NAME", "ORIGIN", "STATE", "BYTES", "BLOBS"
    );
    for s in list {
        println!(
            "{:<16} {:<22} {:<24} {:>10} {:>6}  {}",
            s.name, s.origin, s.state, s.bytes, s.blobs, s.file
        );
    }
    Ok(0)
}

fn remote_run(client: &Client, args: RunArgs) -> anyhow::Result<u8> {
    let addr = &client.addr;
    if args.backend != Backend::Kvm || !args.also.is_empty() || args.timeout.is_some() {
        anyhow::bail!(
            "with --shim, run takes IMAGE, --name, --mem, --env, --publish, --ip, --restore, \
             --checkpoint-every, --checkpoint-to, --standby and ARGS only"
        );
    }
    if args.net.is_some() || args.mac.is_some() || args.gateway.is_some() {
        anyhow::bail!(
            "with --shim, the daemon picks the network: --net, --mac and --gateway do not apply"
        );
    }
    let image = absolute(&args.image)?;
    let name = args.name.clone().unwrap_or_else(|| stem(&args.image));
    let req = RunRequest {
        name,
        image: image.display().to_string(),
        mem: args.mem,
        env: args.env,
        args: args.args,
        publish: args.publish.iter().map(publish_arg).collect(),
        ip: args.ip.map(|(ip, _)| ip.to_string()),
        restore: args
            .restore
            .as_deref()
            .map(absolute)
            .transpose()?
            .map(|p| p.display().to_string()),
        checkpoint_every_ms: args.checkpoint_every.map(|d| d.as_millis() as u64),
        checkpoint_to: args
            .checkpoint_to
            .as_deref()
            .map(output_arg)
            .transpose()?
            .map(|p| p.display().to_string()),
        standby: args.standby,
        standby_grace_ms: Some(args.standby_grace.as_millis() as u64),
        restart: args.restart,
    };
    let info: InstanceInfo = client.json("POST", "/v1/instances", Some(&req))?;
    println!(
        "{} running on {addr}: {} ({})",
        info.name,
        info.ip.unwrap_or_default(),
        info.publish.join(", ")
    );
    Ok(0)
}

fn remote_restore(client: &Client, args: RestoreArgs) -> anyhow::Result<u8> {
    let addr = &client.addr;
    let file = absolute(&args.file)?;
    let req = RestoreRequest {
        file: file.display().to_string(),
        name: args.name,
        publish: args.publish.iter().map(publish_arg).collect(),
    };
    let info: InstanceInfo = client.json("POST", "/v1/restore", Some(&req))?;
    println!(
        "{} restored on {addr}: {} (move #{})",
        info.name,
        info.ip.unwrap_or_default(),
        info.generation
    );
    Ok(0)
}

fn restore(args: RestoreArgs) -> anyhow::Result<u8> {
    let network = if args.publish.is_empty() {
        None
    } else {
        Some(host_shim::net::NetworkConfig {
            mode: NetMode::User,
            publish: args.publish,
            nics: Vec::new(),
        })
    };
    let host_name = args.host_name.unwrap_or_else(config::default_host_name);
    let exit = host_shim::backend::kvm::restore(
        &args.file,
        &args.kvm_device,
        network,
        &host_name,
        &args.region,
        args.timeout,
        std::io::stdout(),
    )?;
    if let Some(report) = exit.report() {
        eprintln!("{report}");
    }
    Ok(exit.status())
}

fn init(dir: &std::path::Path, args: InitArgs) -> anyhow::Result<u8> {
    let fleet_key = args
        .fleet_key_file
        .as_deref()
        .map(identity::read_fleet_key)
        .transpose()?;
    let token = args
        .user_token_file
        .as_deref()
        .map(identity::read_token)
        .transpose()?;
    let id = identity::init(
        dir,
        &identity::InitRequest {
            name: args.name,
            region: args.region,
            listen: args.listen,
            shim_id: args.shim_id,
            fleet_key,
            token: token.clone(),
        },
    )?;
    let d = dir.display();
    println!(
        "host '{}' (region {}, shim id {}) initialised in {d}",
        id.config.name, id.config.region, id.config.shim_id
    );
    println!(
        "  API:         https://{} (overlay: the same port, UDP)",
        id.config.listen
    );
    println!("  fingerprint: {}", id.fingerprint);
    match token {
        Some(_) => println!("  user token:  the one from --user-token-file (in {d}/token)"),
        None => println!(
            "  user token:  {}\n               (shown once; kept in {d}/token, readable only by you)",
            id.token
        ),
    }
    println!(
        "  fleet key:   {d}/fleet.key{}",
        if args.fleet_key_file.is_some() {
            " (from --fleet-key-file)"
        } else {
            " (new: give it to the fleet's other hosts, `init --fleet-key-file`)"
        }
    );
    println!(
        "next: host-shim serve; on the other hosts: host-shim peer add {} {} --addr https://HOST:{}",
        id.config.name,
        id.fingerprint,
        id.config.listen.port()
    );
    Ok(0)
}

fn peer(dir: &std::path::Path, cmd: PeerCmd) -> anyhow::Result<u8> {
    match cmd {
        PeerCmd::Add {
            name,
            fingerprint,
            addr,
        } => {
            identity::add_peer(
                dir,
                identity::Peer {
                    name: name.clone(),
                    fingerprint: fingerprint.clone(),
                    addr,
                },
            )?;
            println!("pinned {name} as {fingerprint}");
        }
        PeerCmd::Remove { name } => {
            if !identity::remove_peer(dir, &name)? {
                anyhow::bail!("no peer named '{name}' in {}", dir.display());
            }
            println!("unpinned {name}");
        }
        PeerCmd::List => {
            let id = identity::load(dir)?;
            println!(
                "this host: {} {} https://{}",
                id.config.name, id.fingerprint, id.config.listen
            );
            for p in id.config.peers {
                println!(
                    "peer:      {} {} {}",
                    p.name,
                    p.fingerprint,
                    p.addr.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(0)
}

fn serve(args: ServeArgs, target: &Target) -> anyhow::Result<u8> {
    let limits = args.limits()?;
    // Secure with an identity: the one in --dir, or in the default
    // directory unless a plain daemon was asked for with --listen.
    let identity = match (&target.dir, args.listen) {
        (Some(dir), _) => Some(identity::load(dir)?),
        (None, None) => Some(identity::load(&identity::default_dir()).map_err(|e| {
            anyhow::anyhow!(
                "{e}\n(or start a plain-HTTP daemon without authentication: serve --listen ADDR)"
            )
        })?),
        (None, Some(_)) => None,
    };
    let host = identity.as_ref().map(|i| i.config.clone());
    // A host with an identity keeps its images and instances next to it:
    // `init` + `serve` is all a fleet host needs for `deploy`.
    let state_dir = args
        .state_dir
        .or_else(|| identity.as_ref().map(|i| i.dir.clone()));
    let listen = args
        .listen
        .or(host.as_ref().map(|h| h.listen))
        .expect("a plain daemon has --listen");
    let name = args
        .name
        .or(host.as_ref().map(|h| h.name.clone()))
        .unwrap_or_else(config::default_host_name);
    let region = args
        .region
        .or(host.as_ref().map(|h| h.region.clone()))
        .unwrap_or_else(|| "local".into());
    let overlay = (!args.no_overlay).then(|| host_shim::net::overlay::OverlayConfig {
        listen: args
            .overlay
            .or(host.as_ref().and_then(|h| h.overlay))
            .unwrap_or(listen),
        peers: args.peer.clone(),
        vni: args.vni.or(host.as_ref().map(|h| h.vni)).unwrap_or(4242),
        key: identity.as_ref().map(|i| {
            host_shim::security::overlay_crypto::OverlayKey::new(i.fleet_key, &i.fingerprint)
        }),
        via: args.peer_via.clone(),
        name: name.clone(),
        region: region.clone(),
    });
    let api = args.advertise.unwrap_or(listen);
    if target.store.is_some() && api.ip().is_unspecified() {
        anyhow::bail!("--listen {listen} is no address other machines can reach: --advertise ADDR");
    }
    let record = Host {
        name: name.clone(),
        url: format!(
            "{}://{api}",
            if identity.is_some() { "https" } else { "http" }
        ),
        region: region.clone(),
        fingerprint: identity.as_ref().map(|i| i.fingerprint.to_string()),
        overlay: overlay.as_ref().map(|o| o.listen.to_string()),
        capacity: Some(Capacity {
            max_instances: limits.max_instances,
            max_guest_memory: limits.max_guest_memory,
        }),
        ..Host::default()
    };
    let _registration = match &target.store {
        Some(url) => Some(registry::register(
            store::open(url)?,
            record,
            args.lease_ttl,
        )?),
        None => None,
    };
    let security = identity
        .map(|i| host_shim::security::HostSecurity::new(i).map(std::sync::Arc::new))
        .transpose()?;
    host_shim::daemon::serve(DaemonConfig {
        listen,
        name,
        region,
        shim_id: args
            .shim_id
            .or(host.as_ref().map(|h| h.shim_id))
            .unwrap_or(1),
        publish: args.publish,
        kvm_device: args.kvm_device,
        overlay,
        security,
        state_dir,
        max_image_bytes: args.max_image_size,
        limits,
        migration: host_shim::migration::MigrationConfig {
            free_page_hints: !args.no_free_page_hints,
            fault: args.test_fault,
        },
    })?;
    Ok(0)
}

/// `REAL=VIA`: two socket addresses.
fn parse_peer_via(s: &str) -> Result<(std::net::SocketAddr, std::net::SocketAddr), String> {
    let (real, via) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not REAL=VIA (two ADDR:PORT)"))?;
    let addr = |a: &str| {
        a.trim()
            .parse()
            .map_err(|e| format!("'{a}' in '{s}' is not an ADDR:PORT: {e}"))
    };
    Ok((addr(real)?, addr(via)?))
}

fn run(args: RunArgs) -> anyhow::Result<u8> {
    if args.standby.is_some() {
        anyhow::bail!("--standby needs --shim: a daemon ships the checkpoints to its standby");
    }
    let also = args
        .also
        .iter()
        .map(|s| parse_also(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !also.is_empty() && args.backend != Backend::Kvm {
        anyhow::bail!("--also needs --backend kvm: QEMU and Firecracker run one guest per process");
    }
    let net_options = NetOptions {
        net: args.net,
        publish: args.publish,
        mac: args.mac,
        ip: args.ip,
        gateway: args.gateway,
    };
    let network = config::plan_network(&net_options, 1 + also.len()).map_err(anyhow::Error::msg)?;
    let host_name = args.host_name.unwrap_or_else(config::default_host_name);
    let checkpoint_every = args.checkpoint_every;
    // Only the main guest checkpoints.
    let cmdline_for = |nic: Option<&Nic>, app_args: Vec<String>, main: bool| {
        let mut guest = GuestArgs {
            host_name: host_name.clone(),
            region: args.region.clone(),
            env: args.env.clone(),
            args: app_args,
            ..GuestArgs::default()
        };
        if let Some(nic) = nic {
            guest.params = nic.cmdline_params();
            // QEMU adds its own virtio_mmio.device entries.
            if args.backend == Backend::Kvm {
                guest.devices.push(virtio::cmdline_entry(0));
            }
        }
        if let Some(every) = checkpoint_every.filter(|_| main) {
            guest.params.push((
                abi::cmdline::CHECKPOINT_EVERY_KEY.to_owned(),
                every.as_millis().max(1).to_string(),
            ));
        }
        cmdline::build(&guest).context("cannot build the guest command line")
    };
    let nic = |index: usize| network.as_ref().and_then(|n| n.nics.get(index));
    let mut also_specs = Vec::new();
    for (index, (image, app_args)) in also.into_iter().enumerate() {
        also_specs.push(GuestSpec {
            name: image
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("guest{}", index + 1)),
            cmdline: cmdline_for(nic(index + 1), app_args, false)?,
            image,
        });
    }
    let config = RunConfig {
        cmdline: cmdline_for(nic(0), args.args, true)?,
        image: args.image,
        mem_size: args.mem,
        backend: args.backend,
        timeout: args.timeout,
        qemu_accel: args.qemu_accel,
        kvm_device: args.kvm_device,
        firecracker: args.firecracker,
        network,
        also: also_specs,
        restore: args.restore,
        checkpoint_to: args.checkpoint_to,
    };
    let exit = host_shim::run(&config)?;
    if let Some(report) = exit.report() {
        eprintln!("{report}");
    }
    Ok(exit.status())
}

/// Splits an `--also` value into the image and its arguments (a leading
/// `--` among them is dropped).
fn parse_also(s: &str) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let mut words = abi::cmdline::split(s);
    if words.is_empty() {
        anyhow::bail!("--also needs an image: --also 'IMAGE ARG...'");
    }
    let image = PathBuf::from(words.remove(0));
    if words.first().is_some_and(|w| w == "--") {
        words.remove(0);
    }
    Ok((image, words))
}
