//! `host-shim`: the command line. Parses flags, sets up logging to stderr
//! and turns how the guest ended into the process exit status.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use host_shim::boot::cmdline::{self, GuestArgs};
use host_shim::config::{self, Backend, QemuAccel, RunConfig};
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
    lc.host=NAME lc.region=REGION KEY=VALUE ... -- ARGS...
(tokens with spaces, quotes or backslashes are double-quoted).

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
    let guest = GuestArgs {
        host_name: args.host_name.unwrap_or_else(config::default_host_name),
        region: args.region,
        env: args.env,
        args: args.args,
    };
    let config = RunConfig {
        cmdline: cmdline::build(&guest).context("cannot build the guest command line")?,
        image: args.image,
        mem_size: args.mem,
        backend: args.backend,
        timeout: args.timeout,
        qemu_accel: args.qemu_accel,
        kvm_device: args.kvm_device,
    };
    let exit = host_shim::run(&config)?;
    if let Some(report) = exit.report() {
        eprintln!("{report}");
    }
    Ok(exit.status())
}
