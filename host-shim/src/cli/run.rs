//! `host-shim run` and `restore`: a guest in this process, or (`--shim`)
//! on a daemon.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use api::Restart;
use api::{Client, InstanceInfo, RestoreRequest, RunRequest};
use clap::Args;
use hostnet::{NetMode, Nic, PublishSpec};
use vmm::boot::cmdline::{self, GuestArgs};
use vmm::config::{self, Backend, GuestSpec, NetOptions, QemuAccel, RunConfig};
use vmm::devices::virtio;

use super::parse_duration;
use crate::{absolute, output_arg, stem};

/// Run a guest from a snapshot file (in this process, or with --shim in a
/// daemon, which reads the file).
#[derive(Args)]
pub(crate) struct RestoreArgs {
    /// The snapshot file (`host-shim snapshot NAME --out FILE`).
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,

    /// With --shim: the instance name [default: the saved one].
    #[arg(long)]
    pub(crate) name: Option<String>,

    /// Forward a host port to the guest:
    /// [HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT[/tcp|/udp]; may be repeated.
    #[arg(long, value_name = "MAPPING", value_parser = config::parse_publish)]
    pub(crate) publish: Vec<PublishSpec>,

    /// The host name the guest is told it now runs on [default: this machine's].
    #[arg(long, value_name = "NAME")]
    pub(crate) host_name: Option<String>,

    /// The region the guest is told it now runs in.
    #[arg(long, value_name = "REGION", default_value = "local")]
    pub(crate) region: String,

    /// Stop the guest after this long (`5s`, `250ms`; a bare number is
    /// seconds) with exit status 124.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,

    /// The KVM device to open.
    #[arg(long, value_name = "PATH", default_value = vmm::vstate::vm::KVM_DEVICE)]
    pub(crate) kvm_device: PathBuf,
}

pub(crate) const RUN_ABOUT: &str = "\
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
pub(crate) struct RunArgs {
    /// The image to boot: an ELF built by `cargo xtask build-image`.
    #[arg(value_name = "IMAGE")]
    pub(crate) image: PathBuf,

    /// Guest memory: bytes, or with a K/M/G suffix (64M, 1G, 33554432).
    /// A multiple of 2 MiB, from 4 MiB up to 3 GiB.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = config::parse_mem_size)]
    pub(crate) mem: u64,

    /// The monitor: `kvm` (our own, the guest starts directly in ring 3),
    /// `qemu` (qemu-system-x86_64 -M microvm, booting the PVH entry) or
    /// `firecracker` (booting the PVH entry).
    #[arg(long, value_enum, default_value_t = Backend::Kvm)]
    pub(crate) backend: Backend,

    /// The Firecracker binary for --backend firecracker [default: $FIRECRACKER].
    #[arg(long, value_name = "PATH")]
    pub(crate) firecracker: Option<PathBuf>,

    /// Stop the guest after this long (`5s`, `250ms`; a bare number is
    /// seconds) and exit with status 124.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,

    /// Pass KEY=VALUE to the guest's environment; may be repeated.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = config::parse_env)]
    pub(crate) env: Vec<(String, String)>,

    /// The host name the guest is told (lc.host) [default: this machine's host name].
    #[arg(long, value_name = "NAME")]
    pub(crate) host_name: Option<String>,

    /// The region the guest is told (lc.region).
    #[arg(long, value_name = "REGION", default_value = "local")]
    pub(crate) region: String,

    /// QEMU's accelerator with --backend qemu: `tcg` (emulation, -cpu max)
    /// or `kvm` (-cpu host). On nested-KVM hosts, ring-0 guest code is very
    /// slow under kvm: prefer tcg there.
    #[arg(long, value_enum, value_name = "ACCEL", default_value_t = QemuAccel::Tcg)]
    pub(crate) qemu_accel: QemuAccel,

    /// The KVM device to open.
    #[arg(long, value_name = "PATH", default_value = vmm::vstate::vm::KVM_DEVICE)]
    pub(crate) kvm_device: PathBuf,

    /// Forward a host port to a guest port over the user-mode network:
    /// [HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT[/tcp|/udp] (host address
    /// 127.0.0.1 by default, the main guest by default); may be repeated.
    #[arg(long, value_name = "MAPPING", value_parser = config::parse_publish)]
    pub(crate) publish: Vec<PublishSpec>,

    /// The guests' network: `user` (user-mode, implied by --publish),
    /// `tap=NAME` (a host TAP device) or `none` [default: none, or user with
    /// --publish].
    #[arg(long, value_name = "MODE", value_parser = config::parse_net_mode)]
    pub(crate) net: Option<NetMode>,

    /// The main guest's IPv4 address and prefix length [default: 10.0.2.15/24].
    #[arg(long, value_name = "ADDR[/PREFIX]", value_parser = config::parse_ip_prefix)]
    pub(crate) ip: Option<(std::net::Ipv4Addr, u8)>,

    /// The main guest's gateway [default: 10.0.2.2 when in 10.0.2.0/24].
    #[arg(long, value_name = "ADDR", value_parser = config::parse_ipv4)]
    pub(crate) gateway: Option<std::net::Ipv4Addr>,

    /// The main guest's MAC address [default: 02:4c:<the four bytes of its IP>].
    #[arg(long, value_name = "MAC", value_parser = config::parse_mac)]
    pub(crate) mac: Option<[u8; 6]>,

    /// Boot another guest in this process on the same network: 'IMAGE ARG...'
    /// (one string, split at spaces; double quotes group words); may be repeated.
    #[arg(long, value_name = "'IMAGE ARG...'")]
    pub(crate) also: Vec<String>,

    /// With --shim: the instance's name [default: the image's file stem].
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,

    /// Hand the app this checkpoint (`abi::checkpoint`, e.g. DIR/latest.ckpt
    /// or `checkpoint NAME --out FILE`) to restore its state from before its
    /// main runs. Works with both backends (QEMU: over a virtio console).
    #[arg(long, value_name = "FILE")]
    pub(crate) restore: Option<PathBuf>,

    /// Have the app checkpoint itself this often (e.g. 5s, 500ms); needs
    /// --checkpoint-to.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "checkpoint_dest")]
    pub(crate) checkpoint_every: Option<Duration>,

    /// Store the app's checkpoints as DIR/latest.ckpt (atomically, each one
    /// durable before the app goes on). With --shim, a daemon with a state
    /// directory keeps them only there: give a directory name (it goes to
    /// STATE/checkpoints).
    #[arg(long, value_name = "DIR", group = "checkpoint_dest")]
    pub(crate) checkpoint_to: Option<PathBuf>,

    /// The most bytes the app's checkpoint chain (its full checkpoint and
    /// the deltas after it) may hold, on disk and in memory (K/M/G, at most
    /// 256M, what a restore accepts); a checkpoint that would go past it is
    /// refused and the app sends a full one. With --shim, the daemon's
    /// `serve --max-checkpoint` applies. [default: twice --mem, at most 256M]
    #[arg(long, value_name = "SIZE", value_parser = vmm::checkpoint::parse_limit)]
    pub(crate) max_checkpoint: Option<u64>,

    /// With --shim: ship every checkpoint to the standby daemon at ADDR,
    /// which restarts the app from the latest one (same image, args, env,
    /// memory, published ports) when this daemon has been unreachable for
    /// --standby-grace.
    #[arg(long, value_name = "ADDR", group = "checkpoint_dest")]
    pub(crate) standby: Option<String>,

    /// With --standby: how long the daemon may be unreachable before the
    /// standby takes over (e.g. 2s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub(crate) standby_grace: Duration,
    /// With --shim: whether the instance comes back when its daemon
    /// restarts (`always` needs `serve --state-dir`).
    #[arg(long, value_name = "POLICY", default_value_t = Restart::Never)]
    pub(crate) restart: Restart,

    /// Arguments for the app, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    pub(crate) args: Vec<String>,
}

pub(crate) fn remote_run(client: &Client, args: RunArgs) -> anyhow::Result<u8> {
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
    if args.max_checkpoint.is_some() {
        anyhow::bail!(
            "with --shim, the daemon bounds checkpoints: --max-checkpoint is a flag of \
             `host-shim serve` there"
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
        publish: args.publish.clone(),
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
    let info: InstanceInfo = client.run(&req)?;
    println!(
        "{} running on {addr}: {} ({})",
        info.name,
        info.ip.unwrap_or_default(),
        info.publish.join(", ")
    );
    Ok(0)
}

pub(crate) fn remote_restore(client: &Client, args: RestoreArgs) -> anyhow::Result<u8> {
    let addr = &client.addr;
    let file = absolute(&args.file)?;
    let req = RestoreRequest {
        file: file.display().to_string(),
        name: args.name,
        publish: args.publish.clone(),
    };
    let info: InstanceInfo = client.restore(&req)?;
    println!(
        "{} restored on {addr}: {} (move #{})",
        info.name,
        info.ip.unwrap_or_default(),
        info.generation
    );
    Ok(0)
}

pub(crate) fn restore(args: RestoreArgs) -> anyhow::Result<u8> {
    let network = if args.publish.is_empty() {
        None
    } else {
        Some(hostnet::NetworkConfig {
            mode: NetMode::User,
            publish: args.publish,
            nics: Vec::new(),
        })
    };
    let host_name = args.host_name.unwrap_or_else(config::default_host_name);
    let exit = vmm::backend::kvm::restore(
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

pub(crate) fn run(args: RunArgs) -> anyhow::Result<u8> {
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
        checkpoint_max: args.max_checkpoint,
    };
    let exit = vmm::run(&config)?;
    if let Some(report) = exit.report() {
        eprintln!("{report}");
    }
    Ok(exit.status())
}

/// Splits an `--also` value into the image and its arguments (a leading
/// `--` among them is dropped).
pub(crate) fn parse_also(s: &str) -> anyhow::Result<(PathBuf, Vec<String>)> {
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
