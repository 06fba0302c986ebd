//! `cargo xtask`: the project's build, run, test, lint and benchmark commands.
//!
//! Guest apps (`apps/<name>`) build only for `x86_64-unknown-none`; their linked ELF *is* the
//! bootable image, copied to `<target>/images/<app>.img`. The host shim (`host-shim`) boots
//! images under KVM. See `cargo xtask <command> --help`.

mod bench;
mod demo;
mod fuzz;
mod image;
mod resp;
mod setup;
mod soak;
mod test;
mod workspace;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use image::Profile;
use workspace::Workspace;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run, test and benchmark unikernel images"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build an app's bootable image into target/images/<app>.img.
    ///
    /// Prints `<app>: <size>` and then the image path alone on the last line.
    BuildImage(BuildImageArgs),
    /// Build an app's image and the release host shim, then boot the image.
    ///
    /// Runs `target/release/host-shim run target/images/<app>.img -- ARGS` and exits with the
    /// shim's status.
    Run(RunArgs),
    /// Set up, lint, build all images (release) and run the host crates' tests against them.
    ///
    /// First checks for the programs the tests use (QEMU, redis-tools, curl, iproute2, procps,
    /// Chromium) and the clippy/rustfmt components: as root on Debian/Ubuntu it installs what
    /// is missing (one apt-get line), otherwise it stops with the exact command to run.
    /// The tests find the images through LIBCLOUD_IMAGES. Tests that boot images need /dev/kvm.
    Test(TestArgs),
    /// Check formatting and run clippy (warnings denied) on host and guest crates.
    Lint,
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Demos.
    #[command(subcommand)]
    Demo(DemoCmd),
    /// Live-migrate kv between two daemons every second for minutes under redis-benchmark
    /// load; fails on any client error, lost key or write, failed migration, or daemon
    /// memory growth, and prints the daemons' RSS at the start and the end.
    ///
    /// Needs redis-tools and /dev/kvm.
    Soak(SoakArgs),
    /// Coverage-guided fuzzing (libFuzzer) of every decoder of outside bytes (fuzz/).
    ///
    /// Builds the targets with coverage instrumentation and AddressSanitizer (stable
    /// toolchain with RUSTC_BOOTSTRAP=1, no cargo-fuzz; needs a C++ compiler), fuzzes each for
    /// --time seconds from its committed corpus (fuzz/corpus/TARGET) and prints executions,
    /// exec/s, coverage (libFuzzer's cov/ft) and crashes; fails on a crash, naming the
    /// reproducer. The ordinary tests run every target briefly without libFuzzer.
    Fuzz(FuzzArgs),
}

#[derive(Args)]
struct SoakArgs {
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Time between the starts of two migrations, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    interval_ms: u64,
    /// redis-benchmark connections.
    #[arg(long, default_value_t = 20)]
    clients: u32,
}

#[derive(Args)]
struct FuzzArgs {
    /// Target to fuzz (see --list).
    #[arg(required_unless_present_any = ["list", "all", "seed"], conflicts_with_all = ["list", "all", "seed"])]
    target: Option<String>,
    /// List the targets.
    #[arg(long)]
    list: bool,
    /// Fuzz every target, one after another (the benchmark run).
    #[arg(long, conflicts_with_all = ["list", "seed", "run"])]
    all: bool,
    /// Rewrite the seed corpora (fuzz/corpus/TARGET/seed-*) from the real encoders.
    #[arg(long, conflicts_with = "list")]
    seed: bool,
    /// Seconds per target (at most, with --runs).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    time: u64,
    /// Stop a target after this many executions (libFuzzer's -runs), e.g.
    /// 10000000 with a --time long enough for it.
    #[arg(long, value_name = "N")]
    runs: Option<u64>,
    /// Parallel libFuzzer jobs per target (libFuzzer's -fork).
    #[arg(long, value_name = "N", default_value_t = 1)]
    jobs: usize,
    /// Run TARGET once on these inputs (e.g. a crash's reproducer) instead of fuzzing.
    #[arg(long, value_name = "FILE", requires = "target")]
    run: Vec<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum DemoCmd {
    /// Three emulated regions, the kv app and clients whose load follows the sun; the app
    /// runs all in one region, at the best static placement, then under
    /// `host-shim schedule --policy follow-the-sun`, one compressed day each.
    ///
    /// Needs /dev/kvm. Every byte between regions (overlay, migrations, API calls) crosses a
    /// relay with the pair's one-way delay. Prints progress, then the share of requests
    /// answered under 15 ms per region and overall for the three runs, the best static and
    /// the ideal placement computed for the same traffic, every move's downtime (the shim's
    /// and the clients' longest wait, with a no-migration baseline), and checks that every
    /// key and write survived on the clients' original connections. Fails if the scheduler
    /// fails or its event file misses a move. A live dashboard is served while it runs.
    FollowTheSun(DemoArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Seconds per emulated day [default: 60, or 20 with --short].
    #[arg(long, value_name = "SECS")]
    day_secs: Option<f64>,
    /// Only the follow-the-sun run, on a 20 s day unless --day-secs says otherwise
    /// (the end-to-end test), compared with the best static placement computed for its
    /// traffic; fails unless the app moved at least twice.
    #[arg(long)]
    short: bool,
    /// Peak requests per second of us-east's clients (eu-west x1.25, ap-southeast x0.8).
    #[arg(long, value_name = "RPS", default_value_t = 100.0)]
    peak_rps: f64,
    /// The scheduler's interval, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    interval_ms: u64,
    /// Serve the dashboard on this address [default: a free port on 127.0.0.1].
    #[arg(long, value_name = "ADDR")]
    dashboard: Option<std::net::SocketAddr>,
    /// Use this host-shim binary instead of building the release one.
    #[arg(long, value_name = "PATH")]
    host_shim: Option<std::path::PathBuf>,
    /// Use this kv image instead of building it.
    #[arg(long, value_name = "PATH")]
    kv_image: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct BuildImageArgs {
    /// App to build (a package under apps/).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    app: Option<String>,
    /// Build every app.
    #[arg(long)]
    all: bool,
    /// Use the debug profile instead of release.
    #[arg(long)]
    debug: bool,
}

#[derive(Args)]
struct RunArgs {
    /// App to run (a package under apps/).
    app: String,
    /// Build the image with the debug profile instead of release.
    #[arg(long)]
    debug: bool,
    /// Guest memory size, passed to the shim as `--mem` (e.g. 64M).
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// Monitor, passed to the shim as `--backend` (`kvm`: our own; `qemu`: QEMU microvm).
    #[arg(long, value_name = "BACKEND")]
    backend: Option<String>,
    /// Stop the guest after SECS seconds, passed to the shim as `--timeout`.
    #[arg(long, value_name = "SECS")]
    timeout: Option<String>,
    /// Arguments for the app (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<OsString>,
}

#[derive(Args)]
struct TestArgs {
    /// Skip `cargo xtask lint`.
    #[arg(long)]
    no_lint: bool,
    /// Extra arguments for `cargo test` (after `--`), e.g. `-- -p host-shim boot`.
    #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
    cargo_args: Vec<OsString>,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Boot time and peak RSS of the hello image: host-shim vs QEMU microvm (KVM and TCG).
    ///
    /// Prints a markdown table (medians with min–max), the ratio of our first-console-line
    /// time to the fastest QEMU configuration's, the image size and the guest's own `bench:`
    /// lines from `host-shim run hello.img -- --bench`.
    Boot {
        /// Runs per configuration.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Time limit per run, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// Network: redis-benchmark against the kv unikernel vs native redis-server, wrk against
    /// the http unikernel vs a native server, bulk TCP.
    ///
    /// Needs redis-tools, redis-server and wrk (the TAP row needs root). Prints markdown
    /// tables per client load (-c 1, -c 20, -c 50, -c 50 -P 16): requests/s and p50 for SET
    /// and GET (medians over rounds that rotate which server goes first), their ratios, per
    /// request the guest's VM exits, vCPU wake-ups, frames each way (and how many of them the
    /// network thread moved itself while the guest polled its rings) and host CPU (vCPU
    /// thread and the rest) of each server; kv over a TAP device; wrk at 1, 20 and 32
    /// connections; the kv image size, host -> guest bulk TCP throughput through a
    /// published port, and the host's load average.
    Net {
        /// Requests per redis-benchmark run (-n) at -c 20 and -c 50 (a quarter at -c 1,
        /// eight times as many at -c 50 -P 16).
        #[arg(long, default_value_t = 100_000)]
        requests: u64,
        /// Rounds per server and client load.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// MiB to push in the bulk TCP test.
        #[arg(long, default_value_t = 256)]
        bulk_mib: u64,
    },
    /// Live migration of the kv app (64 MiB, 10,000 keys) between two shim daemons on
    /// loopback, under a steady SET/GET load through a published port.
    ///
    /// Needs redis-tools and /dev/kvm. Migrates A -> B -> A ... and prints a markdown table:
    /// downtime, total time, bytes sent (vs configured and non-zero memory), rounds and the
    /// longest gap between two client replies (medians with min–max), against the targets.
    Migrate {
        /// Migrations (alternating between the two daemons).
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// The fleet: live migration downtime of the kv app with TLS (mutual authentication,
    /// sealed overlay, `host-shim init` identities) vs the plain stream, side by side; and
    /// deploy-to-first-reply time (`host-shim deploy`, image uploaded or deduplicated)
    /// to a secure and a plain host.
    ///
    /// Needs redis-tools and /dev/kvm. Two daemon pairs, one plain and one secure, each
    /// with kv under load; migrations and deploys alternate between them. Prints markdown
    /// tables of medians and the TLS/plain ratios (downtime target <= 1.10).
    Fleet {
        /// Migrations per pair (alternating directions).
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// An ordinary std app (apps/std-echo: threads, std::net) as an image vs the same
    /// source as a native Linux process: sizes, spawn to first reply, echo requests/s and
    /// p99 with many connections, and live migration downtime under load. Needs /dev/kvm.
    Std {
        /// Boots per server, and migrations.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Connections at once in the echo load.
        #[arg(long, default_value_t = 50)]
        clients: usize,
        /// Round trips per connection.
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Load rounds per server (interleaved).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// What hostile API callers can make a `host-shim serve` daemon hold (threads, RSS, CPU)
    /// and how fast it refuses them: idle and half-sent connections, half TLS handshakes,
    /// big bodies, a slow loris, /dev/zero as an image, no file descriptors. Prints a
    /// markdown table with each bound; fails if one is exceeded.
    Limits {
        /// Timed GET /v1/info calls and /dev/zero refusals.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// App checkpoints of the kv unikernel (10k and 100k keys): size vs raw key+value
    /// bytes, checkpoint time, and restore time (process start to first PING reply) under
    /// our shim and QEMU (TCG) vs a plain boot. Needs redis-tools, QEMU and /dev/kvm.
    Checkpoint {
        /// Runs per boot/restore measurement.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The control plane at scale: a real etcd (needs etcd-server) with simulated hosts
    /// (a lease and a record each) and app records, and the file store with the same
    /// records: `fleet ls`, `ps`, `events` times, compare-and-swap transactions, the event
    /// stream's lag to `events --follow` (p50/p99) and the stores' sizes, side by side.
    ControlPlane {
        /// Simulated hosts.
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        /// App records.
        #[arg(long, default_value_t = 100_000)]
        apps: usize,
        /// Runs per timed command.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Events written for the lag measurement (a tenth on the file store).
        #[arg(long, default_value_t = 200)]
        events: usize,
    },
    /// Density: many idle kv instances (16 MiB each, each on its own published port) in one
    /// daemon, and kv guests under QEMU microvm side by side.
    ///
    /// Prints a markdown table: launch time (total, p50/p99), launch to first PONG, host
    /// memory per instance (daemon RSS growth and MemAvailable drop), idle CPU over 10 s
    /// (daemon, whole host, VM exits), one instance's PING p50 alone vs among the others,
    /// stop time, and the daemon's threads, fds, listening sockets and RSS before, while
    /// running and after every instance stopped. Fails unless they came back.
    Density {
        /// kv instances in the daemon.
        #[arg(long, default_value_t = 1000)]
        instances: usize,
        /// kv guests under QEMU microvm (TCG), one process each; 0: none.
        #[arg(long, default_value_t = 20)]
        qemu: usize,
        /// Guest memory of each instance, MiB.
        #[arg(long, default_value_t = 16)]
        mem_mib: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match Workspace::load().and_then(|ws| dispatch(&ws, cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The cause chain, without the backtrace anyhow adds when RUST_BACKTRACE is set.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(ws: &Workspace, command: Cmd) -> Result<()> {
    match command {
        Cmd::BuildImage(args) => {
            let apps = match &args.app {
                Some(name) => vec![ws.app(name)?],
                None => ws.apps.iter().collect(),
            };
            let images = image::build_images(ws, &apps, Profile::from_debug_flag(args.debug))?;
            image::print_images(&images);
            Ok(())
        }
        Cmd::Run(args) => run(ws, args),
        Cmd::Test(args) => test::test(ws, args.no_lint, &args.cargo_args),
        Cmd::Lint => image::check_guest_target(ws).and_then(|()| test::lint(ws)),
        Cmd::Bench(BenchCmd::Boot { runs, timeout }) => bench::boot::boot(
            ws,
            &bench::boot::BootOptions {
                runs,
                timeout: Duration::from_secs(timeout),
            },
        ),
        Cmd::Bench(BenchCmd::Net {
            requests,
            rounds,
            bulk_mib,
        }) => bench::net::run(
            ws,
            &bench::net::NetOptions {
                requests,
                rounds,
                bulk_mib,
            },
        ),
        Cmd::Bench(BenchCmd::Migrate { runs }) => {
            bench::migrate::run(ws, &bench::migrate::MigrateOptions { runs })
        }
        Cmd::Bench(BenchCmd::Fleet { runs }) => {
            bench::fleet::run(ws, &bench::fleet::FleetOptions { runs })
        }
        Cmd::Bench(BenchCmd::Std {
            runs,
            clients,
            requests,
            rounds,
        }) => bench::std_app::run(
            ws,
            &bench::std_app::StdOptions {
                runs,
                clients,
                requests,
                rounds,
            },
        ),
        Cmd::Bench(BenchCmd::Limits { runs }) => {
            bench::limits::run(ws, &bench::limits::LimitsOptions { runs })
        }
        Cmd::Bench(BenchCmd::Checkpoint { runs }) => {
            bench::checkpoint::run(ws, &bench::checkpoint::CheckpointOptions { runs })
        }
        Cmd::Bench(BenchCmd::ControlPlane {
            hosts,
            apps,
            runs,
            events,
        }) => bench::control_plane::run(
            ws,
            &bench::control_plane::ControlPlaneOptions {
                hosts,
                apps,
                runs,
                events,
            },
        ),
        Cmd::Bench(BenchCmd::Density {
            instances,
            qemu,
            mem_mib,
        }) => bench::density::run(
            ws,
            &bench::density::DensityOptions {
                instances,
                qemu,
                mem_mib,
            },
        ),
        Cmd::Soak(a) => soak::run(
            ws,
            &soak::SoakOptions {
                minutes: a.minutes,
                interval: Duration::from_millis(a.interval_ms),
                clients: a.clients,
            },
        ),
        Cmd::Fuzz(a) => {
            if a.list {
                return fuzz::list(ws);
            }
            if a.seed {
                return fuzz::seed(ws);
            }
            let targets = match a.target {
                Some(t) => vec![t],
                None => fuzz::targets(ws)?,
            };
            fuzz::fuzz(
                ws,
                &fuzz::FuzzOptions {
                    targets,
                    time: a.time,
                    runs: a.runs,
                    jobs: a.jobs.max(1),
                    run: a.run,
                },
            )
        }
        Cmd::Demo(DemoCmd::FollowTheSun(a)) => demo::follow_the_sun(
            ws,
            &demo::DemoOptions {
                day_secs: a.day_secs.unwrap_or(if a.short { 20.0 } else { 60.0 }),
                short: a.short,
                peak_rps: a.peak_rps,
                interval: Duration::from_millis(a.interval_ms.max(50)),
                dashboard: a.dashboard,
                host_shim: a.host_shim,
                kv_image: a.kv_image,
            },
        ),
    }
}

/// `cargo xtask run`: replaces this process with the shim, so its exit status is ours.
fn run(ws: &Workspace, args: RunArgs) -> Result<()> {
    let app = ws.app(&args.app)?;
    let image = image::build_image(ws, app, Profile::from_debug_flag(args.debug))?;
    let shim = image::build_shim(ws)?;

    let mut cmd = std::process::Command::new(&shim);
    cmd.arg("run");
    for (flag, value) in [
        ("--mem", &args.mem),
        ("--backend", &args.backend),
        ("--timeout", &args.timeout),
    ] {
        if let Some(value) = value {
            cmd.args([flag, value]);
        }
    }
    cmd.arg(&image.path);
    if !args.args.is_empty() {
        cmd.arg("--").args(&args.args);
    }
    eprintln!("$ {}", workspace::display(&cmd));
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not start {}", shim.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_passes_args_after_double_dash() {
        let cli = Cli::try_parse_from(["xtask", "run", "hello", "--mem", "64M", "--", "-x", "y"])
            .unwrap();
        let Cmd::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.mem.as_deref(), Some("64M"));
        assert_eq!(args.args, ["-x", "y"]);
    }

    #[test]
    fn fuzz_needs_a_target_or_a_mode() {
        assert!(Cli::try_parse_from(["xtask", "fuzz"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "fuzz", "overlay", "--all"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "fuzz", "--run", "x"]).is_err());
        for ok in [
            &["xtask", "fuzz", "--list"][..],
            &["xtask", "fuzz", "--all", "--time", "600"],
            &["xtask", "fuzz", "overlay", "--time", "5", "--jobs", "2"],
            &["xtask", "fuzz", "overlay", "--run", "crash-1"],
        ] {
            assert!(Cli::try_parse_from(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn build_image_needs_app_or_all() {
        assert!(Cli::try_parse_from(["xtask", "build-image"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "build-image", "hello", "--all"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "build-image", "--all"]).is_ok());
    }
}
