//! `host-shim`: the command line. Parses flags, sets up logging to stderr
//! and turns how the guest ended into the process exit status.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use host_shim::boot::cmdline::{self, GuestArgs};
use host_shim::config::{self, Backend, GuestSpec, NetOptions, QemuAccel, RunConfig};
use host_shim::devices::virtio;
use host_shim::net::{NetMode, Nic, PublishSpec};
use host_shim::outcome::STATUS_SHIM_ERROR;
use tracing_subscriber::EnvFilter;

/// A small KVM monitor that boots libcloud unikernel images.
#[derive(Parser)]
#[command(name = "host-shim", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(RunArgs),
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
    match execute(cli.command) {
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

fn execute(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> anyhow::Result<u8> {
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
    let cmdline_for = |nic: Option<&Nic>, app_args: Vec<String>| {
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
            cmdline: cmdline_for(nic(index + 1), app_args)?,
            image,
        });
    }
    let config = RunConfig {
        cmdline: cmdline_for(nic(0), args.args)?,
        image: args.image,
        mem_size: args.mem,
        backend: args.backend,
        timeout: args.timeout,
        qemu_accel: args.qemu_accel,
        kvm_device: args.kvm_device,
        network,
        also: also_specs,
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
