//! `host-shim`: the command line. Parses flags, sets up logging to stderr
//! and turns how the guest ended into the process exit status.
//!
//! `run` and `restore` run a guest in this process; with `--shim ADDR` they
//! (and `list`, `stop`, `logs`, `snapshot`, `migrate`) talk to a daemon
//! started with `serve` (see `host_shim::daemon`).

use std::io::IsTerminal;
use std::path::PathBuf;
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
use host_shim::daemon::DaemonConfig;
use host_shim::devices::virtio;
use host_shim::net::{NetMode, Nic, PublishSpec};
use host_shim::outcome::STATUS_SHIM_ERROR;
use tracing_subscriber::EnvFilter;

const ABOUT: &str = "\
A small KVM monitor that boots libcloud unikernel images, and a daemon that
hosts several of them, snapshots them and moves them between hosts.

In this process:
    host-shim run IMAGE [--publish 8080:80] [-- ARGS]     boot an image
    host-shim restore FILE [--publish 8080:80]            run a snapshot

A daemon (one per host), driven from other processes:
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
(--shim defaults to $HOST_SHIM; list/logs/stop/snapshot/checkpoint/migrate default to
127.0.0.1:7000.)";

/// A small KVM monitor that boots libcloud unikernel images.
#[derive(Parser)]
#[command(name = "host-shim", version, propagate_version = true, long_about = ABOUT)]
struct Cli {
    /// The daemon to talk to (`host-shim serve --listen ADDR`): makes `run`
    /// and `restore` run the guest there instead of in this process.
    #[arg(long, global = true, value_name = "ADDR", env = "HOST_SHIM")]
    shim: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(RunArgs),
    Restore(RestoreArgs),
    Serve(ServeArgs),
    /// List a daemon's instances (name, state, address, memory, uptime, moves, image).
    List,
    /// Stop a daemon's instance and remove it (with its published ports).
    Stop(NameArg),
    /// Print a daemon's instance's console (the last 256 KiB).
    Logs(NameArg),
    Snapshot(SnapshotArgs),
    Checkpoint(CheckpointArgs),
    Migrate(MigrateArgs),
    /// List the instances a daemon stands by for (`run --standby`): origin,
    /// state, checkpoint file and size.
    Standbys,
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

Overlay: shims exchange guest frames over UDP with a VXLAN header
(RFC 7348) at the --overlay address (default: the --listen address, UDP).
Peers are learnt from migrations (both sides tell each other their overlay
address) or given with --peer. After a guest moves, its old shim forwards
frames for it (and its published ports keep working) over the overlay.";

/// Run a shim daemon that hosts instances and moves them between shims.
#[derive(Args)]
#[command(long_about = SERVE_ABOUT)]
struct ServeArgs {
    /// The API address (HTTP/1.1 JSON).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7000")]
    listen: std::net::SocketAddr,

    /// This shim's name: guests are told they run on it.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// The region guests are told they run in.
    #[arg(long, value_name = "REGION", default_value = "local")]
    region: String,

    /// This shim's number in its fleet (1..14): picks its gateway and guest addresses.
    #[arg(long, value_name = "N", default_value_t = 1)]
    shim_id: u8,

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

    /// The VXLAN network identifier of the fleet.
    #[arg(long, value_name = "VNI", default_value_t = 4242)]
    vni: u32,

    /// No overlay (guests cannot be reached after they move away).
    #[arg(long)]
    no_overlay: bool,

    /// The KVM device to open.
    #[arg(long, value_name = "PATH", default_value = host_shim::vstate::vm::KVM_DEVICE)]
    kvm_device: PathBuf,
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
    /// The file to write (by the daemon).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Ask a daemon's instance's app for a checkpoint of its state (an app
/// checkpoint: small, restorable by `run --restore FILE` on any monitor).
#[derive(Args)]
struct CheckpointArgs {
    /// The instance's name.
    name: String,
    /// The file to write (by the daemon).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// How long to wait for the app's checkpoint.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = config::parse_duration)]
    wait: Duration,
}

/// Move a running instance to another daemon, live.
#[derive(Args)]
struct MigrateArgs {
    /// The instance's name.
    name: String,
    /// The destination daemon's API address.
    #[arg(long, value_name = "ADDR")]
    to: String,
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

    /// The monitor: `kvm` (our own, the guest starts directly in ring 3) or
    /// `qemu` (qemu-system-x86_64 -M microvm, booting the PVH entry).
    #[arg(long, value_enum, default_value_t = Backend::Kvm)]
    backend: Backend,

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
    /// durable before the app goes on).
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
    match execute(cli.command, cli.shim) {
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

/// The daemon address for subcommands that need one.
fn shim_addr(shim: Option<String>) -> String {
    shim.unwrap_or_else(|| "127.0.0.1:7000".to_owned())
}

fn execute(command: Command, shim: Option<String>) -> anyhow::Result<u8> {
    match command {
        Command::Run(args) => match shim {
            Some(addr) => remote_run(&addr, args),
            None => run(args),
        },
        Command::Restore(args) => match shim {
            Some(addr) => remote_restore(&addr, args),
            None => restore(args),
        },
        Command::Serve(args) => serve(args),
        Command::List => list(&shim_addr(shim)),
        Command::Standbys => standbys(&shim_addr(shim)),
        Command::Stop(n) => {
            let client = Client::new(&shim_addr(shim));
            let info: InstanceInfo =
                client.json::<(), _>("POST", &format!("/v1/instances/{}/stop", n.name), None)?;
            println!("stopped {}", info.name);
            Ok(0)
        }
        Command::Logs(n) => {
            let client = Client::new(&shim_addr(shim));
            let answer = client.call("GET", &format!("/v1/instances/{}/logs", n.name), None)?;
            use std::io::Write;
            std::io::stdout().write_all(&answer.body)?;
            Ok(0)
        }
        Command::Snapshot(a) => {
            let client = Client::new(&shim_addr(shim));
            let out = absolute(&a.out)?;
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
            let client = Client::new(&shim_addr(shim));
            let out = absolute(&a.out)?;
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
            let client = Client::new(&shim_addr(shim));
            let last = client.stream_lines(
                &format!("/v1/instances/{}/migrate", a.name),
                &MigrateRequest { to: a.to.clone() },
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

fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_owned())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}

fn list(addr: &str) -> anyhow::Result<u8> {
    let client = Client::new(addr);
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

fn standbys(addr: &str) -> anyhow::Result<u8> {
    let list: Vec<host_shim::daemon::standby::StandbyInfo> =
        Client::new(addr).json::<(), _>("GET", "/v1/standby", None)?;
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

fn remote_run(addr: &str, args: RunArgs) -> anyhow::Result<u8> {
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
    let name = args.name.clone().unwrap_or_else(|| {
        args.image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "guest".into())
    });
    let req = RunRequest {
        name,
        image: image.display().to_string(),
        mem: args.mem,
        env: args.env,
        args: args.args,
        publish: args.publish.iter().map(publish_syntax).collect(),
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
            .map(absolute)
            .transpose()?
            .map(|p| p.display().to_string()),
        standby: args.standby,
        standby_grace_ms: Some(args.standby_grace.as_millis() as u64),
    };
    let info: InstanceInfo = Client::new(addr).json("POST", "/v1/instances", Some(&req))?;
    println!(
        "{} running on {addr}: {} ({})",
        info.name,
        info.ip.unwrap_or_default(),
        info.publish.join(", ")
    );
    Ok(0)
}

/// A publish mapping back in `--publish` syntax.
fn publish_syntax(p: &PublishSpec) -> String {
    let host = match p.host {
        std::net::SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        std::net::SocketAddr::V4(a) => a.to_string(),
    };
    let guest = match p.guest_addr {
        Some(a) => format!("{a}:{}", p.guest_port),
        None => p.guest_port.to_string(),
    };
    format!("{host}:{guest}/{}", p.proto)
}

fn remote_restore(addr: &str, args: RestoreArgs) -> anyhow::Result<u8> {
    let file = absolute(&args.file)?;
    let req = RestoreRequest {
        file: file.display().to_string(),
        name: args.name,
        publish: args.publish.iter().map(publish_syntax).collect(),
    };
    let info: InstanceInfo = Client::new(addr).json("POST", "/v1/restore", Some(&req))?;
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

fn serve(args: ServeArgs) -> anyhow::Result<u8> {
    let overlay = (!args.no_overlay).then(|| host_shim::net::overlay::OverlayConfig {
        listen: args.overlay.unwrap_or(args.listen),
        peers: args.peer.clone(),
        vni: args.vni,
    });
    host_shim::daemon::serve(DaemonConfig {
        listen: args.listen,
        name: args.name.unwrap_or_else(config::default_host_name),
        region: args.region,
        shim_id: args.shim_id,
        publish: args.publish,
        kvm_device: args.kvm_device,
        overlay,
    })?;
    Ok(0)
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
    if !also.is_empty() && args.backend == Backend::Qemu {
        anyhow::bail!("--also needs --backend kvm: QEMU runs one guest per process");
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
