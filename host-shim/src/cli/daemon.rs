//! `host-shim init`, `peer` and `serve`: a host's identity, its pinned
//! peers, and the daemon.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use daemon::restart_records::BroughtBack;
use daemon::{limits, DaemonConfig};
use hostnet::PublishSpec;
use security::identity::{self};
use vmm::config;

use super::parse_duration;
use crate::Target;

pub(crate) const SERVE_ABOUT: &str = "\
Run a shim daemon until killed: it hosts named instances (each guest on its
own vCPU thread, all on the shim's virtual switch) and is driven over an
HTTP/1.1 JSON API on --listen (endpoints: see the `daemon` crate;
the subcommands list, run, stop, logs, snapshot, restore, migrate use it).

Addresses: gateways and guests share --guest-net (default 10.0.0.0/16).
Shim N (--shim-id N, 1..14) has gateway 10.0.0.(N+1) and gives each new
instance the lowest free address of its pool: the whole subnet past the
first 1,024 addresses, or on an overlay its own block of 1,024 (shim 1:
10.0.4.0-10.0.7.255), so shims with distinct ids can share one overlay and
guests keep their address when they move. Give every shim of a fleet its
own id and the same --guest-net.

With --store (and no --shim-id) the fleet store allocates the addresses:
the fleet's network (--fleet-net, default 10.64.0.0/10, recorded in the
store by the first host) is cut into blocks of 1,024 and each host owns one
(the same again when it comes back): its gateway is the block's first
address, its guests the rest. No limit of 14 shims: a /10 has 4,095 blocks.

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

pub(crate) const INIT_ABOUT: &str = "\
Create this host's identity once, in the state directory (--dir): a key and
a self-signed certificate (its SHA-256 fingerprint identifies the host), the
host's config (name, region, API address, shim id), a user token for the API
(printed once, kept in DIR/token, readable only by you) and the fleet's
overlay key (DIR/fleet.key; give every host of a fleet the same one with
--fleet-key-file). Then `host-shim serve` runs the daemon with TLS.";

/// Create this host's identity (key, certificate, token, fleet key) and config.
#[derive(Args)]
#[command(long_about = INIT_ABOUT)]
pub(crate) struct InitArgs {
    /// This host's name: guests are told they run on it.
    #[arg(long, value_name = "NAME")]
    pub(crate) name: String,

    /// The region guests are told they run in.
    #[arg(long, value_name = "REGION")]
    pub(crate) region: String,

    /// The API address (HTTPS; the overlay uses the same port, UDP).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7443")]
    pub(crate) listen: std::net::SocketAddr,

    /// This shim's number in its fleet (1..14): picks its gateway and guest addresses.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub(crate) shim_id: u8,

    /// The fleet's overlay key, from another host (its DIR/fleet.key)
    /// [default: a new key, for the first host of a fleet].
    #[arg(long, value_name = "FILE")]
    pub(crate) fleet_key_file: Option<PathBuf>,

    /// Use the user token in this file (e.g. another host's DIR/token; `-`
    /// for standard input) instead of a new one.
    #[arg(long = "user-token-file", value_name = "FILE")]
    pub(crate) user_token_file: Option<PathBuf>,
}

/// Pin other hosts of the fleet by certificate fingerprint: only pinned
/// peers may send this host a migration stream.
#[derive(Subcommand)]
pub(crate) enum PeerCmd {
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
    List {
        #[command(flatten)]
        json: crate::JsonArg,
    },
}

/// Run a shim daemon that hosts instances and moves them between shims.
#[derive(Args)]
#[command(long_about = SERVE_ABOUT)]
pub(crate) struct ServeArgs {
    /// The API address [default: the identity's]. Without an identity
    /// (no `init`, no --dir) this starts a plain-HTTP daemon without
    /// authentication, for trusted networks and tests.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<std::net::SocketAddr>,

    /// This shim's name: guests are told they run on it [default: the
    /// identity's, else this machine's host name].
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,

    /// The region guests are told they run in [default: the identity's, else local].
    #[arg(long, value_name = "REGION")]
    pub(crate) region: Option<String>,

    /// This shim's number in its fleet (1..14): picks its gateway and guest
    /// addresses [default: the identity's, else 1; with --store, a block
    /// allocated by the store instead].
    #[arg(long, value_name = "N")]
    pub(crate) shim_id: Option<u8>,

    /// With --store: the fleet's guest network, cut into blocks of 1,024
    /// addresses, one per host; recorded in the store by the first host
    /// (a host naming another one is refused) [default: the recorded one,
    /// else 10.64.0.0/10].
    #[arg(long, value_name = "CIDR", conflicts_with = "shim_id")]
    pub(crate) fleet_net: Option<hostnet::pool::GuestNet>,

    /// The subnet of this shim's gateway and guests, shared by every shim
    /// of an overlay. Without an overlay a shim hands out all of it past
    /// the gateways' first 1,024 addresses; on an overlay, shim N its Nth
    /// block of 1,024. Not used with --store (unless --shim-id is given):
    /// the store's fleet network is (--fleet-net).
    #[arg(long, value_name = "CIDR", default_value_t = hostnet::pool::DEFAULT_GUEST_NET)]
    pub(crate) guest_net: hostnet::pool::GuestNet,

    /// Shim-level published port, to a guest address:
    /// [HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT (the guest defaults to
    /// the first address of this shim). Usually ports belong to instances:
    /// `run --publish`.
    #[arg(long, value_name = "MAPPING", value_parser = config::parse_publish)]
    pub(crate) publish: Vec<PublishSpec>,

    /// The overlay's UDP address [default: the --listen address].
    #[arg(long, value_name = "ADDR")]
    pub(crate) overlay: Option<std::net::SocketAddr>,

    /// Another shim's overlay address; may be repeated.
    #[arg(long, value_name = "ADDR")]
    pub(crate) peer: Vec<std::net::SocketAddr>,

    /// Reach the peer at overlay address REAL through the relay at VIA
    /// (e.g. a `wan-relay udp` emulating a WAN link), and take datagrams from
    /// VIA as REAL's; this daemon's TCP connections to a peer's API address
    /// REAL (migrations, image pushes, standby checkpoints) go to VIA too (a
    /// `wan-relay tcp`; TLS still pins the peer); may be repeated.
    #[arg(long, value_name = "REAL=VIA", value_parser = parse_peer_via)]
    pub(crate) peer_via: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,

    /// The VXLAN network identifier of the fleet [default: the identity's, else 4242].
    #[arg(long, value_name = "VNI")]
    pub(crate) vni: Option<u32>,

    /// No overlay (guests cannot be reached after they move away).
    #[arg(long)]
    pub(crate) no_overlay: bool,

    /// The KVM device to open.
    #[arg(long, value_name = "PATH", default_value = vmm::vstate::vm::KVM_DEVICE)]
    pub(crate) kvm_device: PathBuf,

    /// Keep uploaded images (DIR/images, by SHA-256) and the instances run
    /// with `--restart always` (DIR/instances): after a restart of the
    /// daemon they boot again, from their app's latest checkpoint if any.
    /// [default: the identity's directory (--dir), for a host with an
    /// identity]. Without it, images cannot be uploaded and nothing is kept.
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,

    /// The largest image upload accepted (K/M suffixes; at most 16M).
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = config::parse_byte_size)]
    pub(crate) max_image_size: u64,

    /// API connections served at once; beyond, the oldest one still
    /// sending its request is cut to make room, else the new one gets 503.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_MAX_CONNECTIONS)]
    pub(crate) max_connections: usize,

    /// Request bodies held in memory at once, in bytes (K/M/G); beyond, 503.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = config::parse_byte_size)]
    pub(crate) max_request_memory: u64,

    /// How long a client has for a request's head and body, whole.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub(crate) request_timeout: Duration,

    /// How long a client has for a TLS handshake, whole.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) handshake_timeout: Duration,

    /// Instances at once (running or starting) [default: host memory / 4
    /// MiB, 1 to 4096].
    #[arg(long, value_name = "N")]
    pub(crate) max_instances: Option<usize>,

    /// Guest memory of all instances at once (K/M/G) [default: the host's
    /// memory (MemTotal) times --memory-overcommit].
    #[arg(long, value_name = "SIZE", value_parser = config::parse_byte_size)]
    pub(crate) max_guest_memory: Option<u64>,

    /// Guest memory allowed per byte of host memory, when
    /// --max-guest-memory is not given.
    #[arg(long, value_name = "RATIO", default_value_t = limits::DEFAULT_OVERCOMMIT)]
    pub(crate) memory_overcommit: f64,

    /// Published ports per instance.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_MAX_PUBLISH)]
    pub(crate) max_publish: usize,

    /// The most bytes an instance's checkpoint chain (its app's full
    /// checkpoint and the deltas after it) may hold, on disk and in this
    /// daemon's memory (K/M/G, at most 256M, what a restore accepts); a
    /// checkpoint that would go past it is refused and the app sends a full
    /// one. [default: twice the instance's memory, at most 256M]
    #[arg(long, value_name = "SIZE", value_parser = vmm::checkpoint::parse_limit)]
    pub(crate) max_checkpoint: Option<u64>,

    /// Let instances publish host ports below 1024 (refused otherwise).
    #[arg(long)]
    pub(crate) allow_privileged_ports: bool,

    /// Send every dirty page of a migrating guest, even heap pages it says
    /// are free.
    #[arg(long)]
    pub(crate) no_free_page_hints: bool,

    /// For tests only: die, cut the connection or corrupt a byte at a step
    /// of every migration this daemon takes part in (STEP: precopy, paused,
    /// ready, commit, committed; FAULT: die, cut, corrupt, hang).
    #[arg(long, value_name = "STEP:FAULT", hide = true)]
    pub(crate) test_fault: Option<migration::faults::Injected>,

    /// With --store: how long this host stays registered as up after its
    /// daemon stops renewing its lease (it renews it every third of that).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = super::parse_duration)]
    pub(crate) lease_ttl: std::time::Duration,

    /// With --store: the API address other machines reach this host at,
    /// as recorded in the store [default: the address the daemon listens
    /// on (with --listen HOST:0, the port it got), which must then be a
    /// specific one, not 0.0.0.0].
    #[arg(long, value_name = "ADDR")]
    pub(crate) advertise: Option<std::net::SocketAddr>,

    /// Once the daemon listens, write FILE (atomically, mode 0600) with where it
    /// is, as JSON: {"listen": "HOST:PORT", "overlay": "HOST:PORT" or null,
    /// "fingerprint": "SHA256:..." or null}. With `--listen 127.0.0.1:0` the
    /// system picks a free port and FILE says which: scripts and tests wait
    /// for the file instead of guessing a free port.
    #[arg(long, value_name = "FILE")]
    pub(crate) ready_file: Option<PathBuf>,
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
            max_checkpoint: self.max_checkpoint,
            // The soft limit raised to the hard one: a thousand guests
            // need several thousand.
            max_open_files: shim_util::sys::raise_fd_limit()
                .context("raising the open files limit (RLIMIT_NOFILE)")?,
            allow_privileged_ports: self.allow_privileged_ports,
        })
    }
}

pub(crate) fn init(dir: &std::path::Path, args: InitArgs) -> anyhow::Result<u8> {
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

pub(crate) fn peer(dir: &std::path::Path, cmd: PeerCmd) -> anyhow::Result<u8> {
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
        PeerCmd::List { json } if json.json => {
            let id = identity::load(dir)?;
            let view = serde_json::json!({
                "name": id.config.name,
                "fingerprint": id.fingerprint.to_string(),
                "listen": id.config.listen,
                "peers": id.config.peers,
            });
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
        PeerCmd::List { .. } => {
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

pub(crate) fn serve(args: ServeArgs, target: &Target) -> anyhow::Result<u8> {
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
    let overlay = (!args.no_overlay).then(|| hostnet::overlay::OverlayConfig {
        listen: args
            .overlay
            .or(host.as_ref().and_then(|h| h.overlay))
            .unwrap_or(listen),
        peers: args.peer.clone(),
        vni: args.vni.or(host.as_ref().map(|h| h.vni)).unwrap_or(4242),
        key: identity
            .as_ref()
            .map(|i| hostnet::overlay_crypto::OverlayKey::new(i.fleet_key, &i.fingerprint.0)),
        via: args.peer_via.clone(),
        name: name.clone(),
        region: region.clone(),
    });
    let ready_file = args.ready_file.clone();
    if target.store.is_some() && args.advertise.unwrap_or(listen).ip().is_unspecified() {
        anyhow::bail!("--listen {listen} is no address other machines can reach: --advertise ADDR");
    }
    // With a store: its fleet network and this host's block of it (unless
    // --shim-id asks for the fixed layout).
    let store = match &target.store {
        Some(url) => Some(fleet::store::open_with(url, &target.store_access)?),
        None => None,
    };
    if store.as_ref().is_some_and(|s| !s.has_leases()) {
        // Before anything is written there: a host registers under a lease.
        return Err(
            fleet::store::StoreError::NoLeases("serve --store (a host's registration)").into(),
        );
    }
    let (guest_net, block) = match (&store, args.shim_id) {
        (Some(store), None) => {
            let wanted = args.fleet_net.map(|n| n.to_string());
            let cidr = fleet::registry::fleet_network(&**store, wanted.as_deref())?;
            let net: hostnet::pool::GuestNet = cidr
                .parse()
                .with_context(|| format!("the fleet store's network '{cidr}'"))?;
            let claimed = fleet::registry::claim_block(&**store, &name, &cidr, net.blocks())?;
            (net, Some(claimed))
        }
        (None, _) if args.fleet_net.is_some() => {
            anyhow::bail!("--fleet-net needs --store (the store allocates its blocks)")
        }
        _ => (args.guest_net, None),
    };
    // The lease the registration keeps, watched by the fence thread; the
    // fence has its own store connection (the registration's thread keeps
    // the other).
    let lease = fleet::registry::LeaseWatch::new(args.lease_ttl);
    let fleet_link = match &target.store {
        Some(url) => Some(daemon::fence::FleetLink {
            fleet: std::sync::Arc::new(fleet::Fleet::new(fleet::store::open_with(
                url,
                &target.store_access,
            )?)),
            lease: std::sync::Arc::clone(&lease),
        }),
        None => None,
    };
    let security = identity
        .map(|i| security::HostSecurity::new(i).map(std::sync::Arc::new))
        .transpose()?;
    let (lease_ttl, advertise) = (args.lease_ttl, args.advertise);
    let mut registration = None;
    let registered = &mut registration;
    daemon::serve(
        DaemonConfig {
            listen,
            name,
            region,
            shim_id: args
                .shim_id
                .or(host.as_ref().map(|h| h.shim_id))
                .unwrap_or(1),
            block: block.map(|b| b.index),
            guest_net,
            publish: args.publish,
            kvm_device: args.kvm_device,
            overlay,
            security,
            state_dir,
            max_image_bytes: args.max_image_size,
            limits,
            migration: migration::MigrationConfig {
                free_page_hints: !args.no_free_page_hints,
                fault: args.test_fault,
            },
            fleet: fleet_link,
        },
        move |daemon, brought_back| {
            print_banner(daemon, brought_back);
            // Registered once listening: the API URL recorded is the bound address.
            if let Some(store) = store {
                // A host back on its block: guests that moved away from it
                // (before it stopped) keep their addresses elsewhere.
                if block.is_some_and(|b| b.again) {
                    let pool = daemon.config.pool().map_err(|e| e.to_string())?;
                    let held = fleet::registry::addresses_held_elsewhere(
                        &*store,
                        &daemon.config.name,
                        pool,
                    )
                    .map_err(|e| e.to_string())?;
                    if !held.is_empty() {
                        eprintln!(
                            "host-shim serve: {} addresses of this block are held by guests on other hosts: kept for them",
                            held.len()
                        );
                    }
                    daemon.hold_elsewhere(held);
                }
                let record = host_record(daemon, advertise);
                let r = fleet::registry::register_watched(store, record, lease_ttl, lease)
                    .map_err(|e| e.to_string())?;
                *registered = Some(r);
            }
            if let Some(file) = &ready_file {
                let ready = serde_json::json!({
                    "listen": daemon.config.listen.to_string(),
                    "overlay": daemon.net.overlay_addr().map(|a| a.to_string()),
                    "fingerprint": daemon
                        .config
                        .security
                        .as_ref()
                        .map(|s| s.identity.fingerprint.to_string()),
                });
                shim_util::files::write_atomic(file, ready.to_string().as_bytes())
                    .map_err(|e| format!("cannot write --ready-file {}: {e}", file.display()))?;
            }
            Ok(())
        },
    )?;
    Ok(0)
}

/// What a daemon registers in the fleet store about itself, once it
/// listens: its name, region, API URL (`advertise`, else the bound
/// address), fingerprint, overlay address and capacity.
fn host_record(daemon: &daemon::Daemon, advertise: Option<std::net::SocketAddr>) -> fleet::Host {
    let config = &daemon.config;
    fleet::Host {
        name: config.name.clone(),
        url: format!(
            "{}://{}",
            if config.security.is_some() {
                "https"
            } else {
                "http"
            },
            advertise.unwrap_or(config.listen)
        ),
        region: config.region.clone(),
        fingerprint: config
            .security
            .as_ref()
            .map(|s| s.identity.fingerprint.to_string()),
        overlay: daemon.net.overlay_addr().map(|a| a.to_string()),
        capacity: Some(fleet::Capacity {
            max_instances: config.limits.max_instances,
            max_guest_memory: config.limits.max_guest_memory,
        }),
        ..fleet::Host::default()
    }
}

/// What `serve` says once it listens: the instances it brought back, where
/// it listens, its fingerprint, its addresses.
fn print_banner(daemon: &daemon::Daemon, brought_back: &[BroughtBack]) {
    for b in brought_back {
        let from = match &b.checkpoint {
            Some(f) => format!(" from its checkpoint {f}"),
            None => String::new(),
        };
        match &b.result {
            Ok(info) => eprintln!(
                "host-shim serve: brought back {} ({}){from}",
                info.name,
                info.ip.map(|a| a.to_string()).unwrap_or_default()
            ),
            Err(why) => eprintln!("host-shim serve: cannot bring back {}: {why}", b.name),
        }
    }
    // `daemon::serve` checked the pool before it called us.
    let (first, last) = daemon.config.pool().expect("a checked guest pool");
    eprintln!(
        "host-shim serve: shim '{}' (region {}) listening on {}{}; gateway {}, guests {}..{}{}",
        daemon.config.name,
        daemon.config.region,
        match &daemon.config.security {
            Some(_) => format!("https://{}", daemon.config.listen),
            None => format!("{} (plain HTTP, no authentication)", daemon.config.listen),
        },
        daemon
            .config
            .security
            .as_ref()
            .map(|s| format!(", fingerprint {}", s.identity.fingerprint))
            .unwrap_or_default(),
        daemon.config.gateway(),
        first,
        last,
        daemon
            .net
            .overlay_addr()
            .map(|a| format!(
                "; overlay udp {a}{}",
                if daemon.config.security.is_some() {
                    " (encrypted with the fleet key)"
                } else {
                    ""
                }
            ))
            .unwrap_or_default()
    );
}

/// `REAL=VIA`: two socket addresses.
pub(crate) fn parse_peer_via(
    s: &str,
) -> Result<(std::net::SocketAddr, std::net::SocketAddr), String> {
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
