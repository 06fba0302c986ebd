//! `host-shim`: the command line. Parses flags, sets up logging to stderr
//! and turns how the guest ended into the process exit status.
//!
//! `run` and `restore` run a guest in this process; with `--shim ADDR` they
//! (and `list`, `stop`, `logs`, `snapshot`, `migrate`) talk to a daemon
//! started with `serve` (the `daemon` crate).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

mod cli;

use api::Restart;
use api::{
    CheckpointInfo, CheckpointRequest, Client, ClientError, InstanceInfo, MigrateRequest,
    SnapshotInfo, SnapshotRequest,
};
use clap::{Args, Parser, Subcommand};
use cli::daemon::{init, peer, serve, InitArgs, PeerCmd, ServeArgs};
use cli::fleet as commands;
use cli::parse_duration;
use cli::run::{remote_restore, remote_run, restore, run, RestoreArgs, RunArgs};
use fleet::ops::DeployRequest;
use fleet::store;
use fleet::{Fleet, FleetError, Host};
use hostnet::PublishSpec;
use security::identity::{self, Identity};
use tracing_subscriber::EnvFilter;
use vmm::config::{self};
use vmm::outcome::STATUS_SHIM_ERROR;

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
    5  conflict: the fleet state changed meanwhile (another CLI); run it again;
       deploy: the fleet has an app of that name (another deploy won it)";

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

    #[command(flatten)]
    store_access: cli::fleet::StoreAccessArgs,

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
    Schedule(cli::schedule::ScheduleArgs),
    /// The fleet's hosts: add, list, remove.
    #[command(subcommand)]
    Fleet(FleetCommand),
    Deploy(DeployArgs),
    /// Every instance on every fleet host: name, host, region, state,
    /// uptime, memory, address, ports (exit status 4 if a host did not answer).
    Ps(PsArgs),
    Events(cli::fleet::EventsArgs),
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
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    checkpoint_every: Option<Duration>,
    /// A fleet host that keeps the app's checkpoints (each one, also with
    /// --checkpoint-every) and runs it from the latest if its host dies
    /// (with --store etcd://: once the host's lease lapses).
    #[arg(long, value_name = "HOST", requires = "checkpoint_every")]
    standby: Option<String>,
    #[command(flatten)]
    json: JsonArg,
    /// Arguments for the app, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
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
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
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

fn main() -> ExitCode {
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
    // A daemon's events (a guest ended, an instance brought back, one that
    // arrived) are its log; everything else logs warnings only.
    init_logging(match cli.command {
        Command::Serve(_) => "warn,daemon=info,migration=info",
        _ => "warn",
    });
    let fleet = cli.fleet.clone().unwrap_or_else(fleet::default_path);
    let store_access = match cli.store_access.access() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("Error: {e:#}");
            return ExitCode::from(STATUS_SHIM_ERROR);
        }
    };
    let target = Target {
        shim: cli.shim.first().cloned(),
        shims: cli.shim,
        fleet,
        store: cli.store,
        store_access,
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

/// Logs to stderr, filtered by `RUST_LOG` (default: `default`).
fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
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
    /// How to reach it (`--store-ca`, `--store-user`, ...).
    store_access: store::Access,
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
    let fleet = || store::open_with(&store, &target.store_access).map(Fleet::new);
    match command {
        Command::Schedule(args) => {
            cli::schedule::schedule(args, target.shims.clone(), &store, &target.store_access)
        }
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
                &a.image,
                DeployRequest {
                    on: a.on,
                    name,
                    mem: a.mem,
                    env: a.env,
                    args: a.args,
                    publish: a.publish.clone(),
                    restart: a.restart,
                    checkpoint_every_ms: a.checkpoint_every.map(|d| d.as_millis() as u64),
                    standby: a.standby,
                    ..DeployRequest::default()
                },
                a.json.json,
            ))
        }
        Command::Ps(a) => fleet_status(commands::ps(&fleet()?, a.all, a.json.json)),
        Command::Events(a) => fleet_status(commands::events(&fleet()?, &a)),
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
            let info: InstanceInfo = client.stop(&n.name)?;
            println!("stopped {}", info.name);
            Ok(0)
        }
        Command::Logs(n) => {
            let client = target.client()?;
            let text = client.logs(&n.name)?;
            use std::io::Write;
            std::io::stdout().write_all(text.as_bytes())?;
            Ok(0)
        }
        Command::Snapshot(a) => {
            let client = target.client()?;
            let out = output_arg(&a.out)?;
            let info: SnapshotInfo = client.snapshot(
                &a.name,
                &SnapshotRequest {
                    out: out.display().to_string(),
                },
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
            let info: CheckpointInfo = client.checkpoint(
                &a.name,
                &CheckpointRequest {
                    out: out.display().to_string(),
                    timeout_ms: Some(a.wait.as_millis() as u64),
                },
            )?;
            println!(
                "checkpoint of {} written to {}: {} bytes ({}), {:.1} ms",
                a.name, info.file, info.bytes, info.describe, info.ms
            );
            Ok(0)
        }
        Command::Migrate(a) => {
            let client = target.client()?;
            let json = a.json.json;
            let result = client.migrate(
                &a.name,
                &MigrateRequest {
                    to: a.to.clone(),
                    fingerprint: a.to_fingerprint.clone(),
                },
                // One JSON event a line, or the line each renders as.
                |event| match json {
                    true => println!("{}", serde_json::to_string(event).expect("serializable")),
                    false => println!("{event}"),
                },
            );
            match result {
                Ok(_) => Ok(0),
                Err(ClientError::Migration { .. }) => {
                    anyhow::bail!("migration of {} to {} did not complete", a.name, a.to)
                }
                Err(ClientError::Protocol { detail, .. }) => anyhow::bail!(
                    "migration of {} to {} did not complete ({detail})",
                    a.name,
                    a.to
                ),
                Err(e) => Err(e.into()),
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
    let list: Vec<InstanceInfo> = client.list()?;
    println!(
        "{:<16} {:<24} {:<18} {:>8} {:>10} {:>4}  IMAGE",
        "NAME", "STATE", "IP", "MEM", "UPTIME", "GEN"
    );
    for i in list {
        println!(
            "{:<16} {:<24} {:<18} {:>7}M {:>9.1}s {:>4}  {}",
            i.name,
            i.state,
            i.ip.map_or_else(|| "-".into(), |a| a.to_string()),
            i.mem >> 20,
            i.uptime_s,
            i.generation,
            i.image
        );
    }
    Ok(0)
}

fn standbys(client: &Client) -> anyhow::Result<u8> {
    let list: Vec<daemon::standby::StandbyInfo> = client.standbys()?;
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
