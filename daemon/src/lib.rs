//! `host-shim serve`: a long-running shim that hosts several named
//! instances (each guest on its own vCPU thread, all on the shim's switch)
//! and is driven from other processes over an HTTP/1.1 JSON API, over TLS
//! with authenticated callers when the host has an identity ([`http`],
//! the `security` crate). It is the migration crate's `Host`
//! ([`migration_host`]).
//!
//! # Where things are
//!
//! - [`instances`]: the [`instances::InstanceTable`], names and addresses
//!   reserved, committed and released under one lock; [`instance`]: one
//!   instance and its console ring;
//! - `run`: run, restore, launch, stop, guests that end on their own;
//!   `snapshots`: snapshots, app checkpoints, where their files go;
//! - [`migration_host`]: the migration crate's `Host` (reservations of
//!   guests moving in, guests that moved away); [`standby`]; [`fence`];
//! - [`http`]: who may call what (TLS, tokens, pinned peers), served by
//!   `api::server`; `dispatch`: typed requests to the calls above; `peers`:
//!   clients of other daemons and the overlay to pinned peers;
//! - [`images`], [`logs`], [`limits`], [`stats`], [`restart_records`],
//!   [`openapi`].
//!
//! # Endpoints (all under the `--listen` address)
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /v1/info` | | [`api::ShimInfo`] |
//! | `GET /v1/instances` | | `[`[`api::InstanceInfo`]`]` |
//! | `GET /v1/stats` | | [`stats::ShimStats`]: CPU, memory, traffic, peer RTTs |
//! | `POST /v1/instances` | [`api::RunRequest`] | [`api::InstanceInfo`] (201) |
//! | `GET /v1/instances/NAME/logs` | | the console ring buffer, text |
//! | `POST /v1/instances/NAME/stop` | | [`api::InstanceInfo`] (the instance is removed) |
//! | `POST /v1/instances/NAME/snapshot` | [`api::SnapshotRequest`] | [`api::SnapshotInfo`] |
//! | `POST /v1/instances/NAME/checkpoint` | [`api::CheckpointRequest`] | [`api::CheckpointInfo`] (504: no checkpoint in time) |
//! | `POST /v1/restore` | [`api::RestoreRequest`] | [`api::InstanceInfo`] (201) |
//! | `POST /v1/instances/NAME/migrate` | [`api::MigrateRequest`], upgrade to `host-shim-progress` | [`api::MigrationEvent`] JSON lines, streamed |
//! | `POST /v1/migration` | upgrade to `host-shim-migration` | the incoming migration stream (the `migration` crate) |
//! | `POST /v1/standby` | [`standby::StandbyRequest`] | [`standby::StandbyInfo`] (201) |
//! | `GET /v1/standby` | | `[`[`standby::StandbyInfo`]`]` |
//! | `POST /v1/standby/NAME/checkpoint` | a checkpoint blob (bytes) | [`standby::StandbyInfo`], once stored |
//! | `POST /v1/instances/NAME/logs/follow` | upgrade to `host-shim-progress` | console lines as JSON, streamed ([`logs`]) |
//! | `PUT /v1/instances/NAME/restart` | [`api::RestartRequest`] | [`api::InstanceInfo`] (recorded in `--state-dir`) |
//! | `GET`/`HEAD /v1/images/SHA256` | | [`images::ImageInfo`] (404: not here) |
//! | `PUT /v1/images/SHA256` | the image bytes | [`images::ImageInfo`] (201 stored, 200 already here; 413 too large, 422 hash mismatch) |
//! | `POST /v1/images/SHA256/push` | [`api::PushRequest`] | [`images::ImageInfo`] of the copy on the other shim |
//! | `GET /v1/openapi.yaml` | | this API as OpenAPI 3 (`api/openapi.yaml`) |
//!
//! `POST /v1/instances` takes `"image": "sha256:HEX"` for an uploaded image.
//!
//! Errors answer `{"error": "..."}` with 400 (bad request, bad name), 401
//! (no or wrong token), 403 (a migration stream from a host that is not a
//! pinned peer, a peer calling a user route, an output path outside the
//! state directory, a privileged port), 404 (no such instance), 409
//! (conflict: name taken, instance busy, a limit reached), 503 (busy: try
//! again) or 500. Limits: [`limits`].
//!
//! # Addresses
//!
//! Guests and gateways share one subnet (`--guest-net`, default
//! 10.0.0.0/16; see [`hostnet::pool`]). Each shim has an id N
//! (`--shim-id`, 1..=14): its gateway is the subnet's address N + 1 (MAC
//! [`hostnet::mac_for`] it). A shim of a fleet on a store has a block of the
//! fleet's network instead ([`DaemonConfig::block`]): its gateway is the
//! block's first address, its pool the rest of the block. A run takes the
//! lowest address of this shim's pool that no live instance holds (unless
//! `run --ip` names one): the whole subnet past the gateways' block, or,
//! on an overlay, block N of 1,024 addresses (or the store's block), so
//! shims sharing one L2 overlay never hand out one address twice. A stopped or exited instance's address is free again, and so is
//! one that moved away, unless an overlay still carries it there. A guest
//! that moves keeps its address, and keeps reaching the gateway of the
//! shim it came from (whose proxied connections it serves) over the
//! overlay, while a guest booted here talks to this shim's gateway.

mod dispatch;
pub mod fence;
pub mod http;
pub mod images;
pub mod instance;
pub mod instances;
pub mod limits;
pub mod logs;
pub mod migration_host;
pub mod openapi;
mod peers;
pub mod restart_records;
mod run;
mod snapshots;
pub mod standby;
pub mod stats;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

pub use http::Method;
pub use limits::check_name;

use hostnet::pool::GuestNet;
use hostnet::{Network, PublishSpec, SharedNetConfig};
use instances::{AddressPool, InstanceTable};
use vmm::error::Error;
use vmm::machine::{Ended, Hypervisor};

/// The protocol name of a streamed answer (JSON lines).
pub use api::PROGRESS_PROTOCOL;
/// The protocol name of the migration stream's HTTP upgrade.
pub use migration::protocol::MIGRATION_PROTOCOL;
/// Highest `--shim-id`.
pub use security::identity::MAX_SHIM_ID;

/// How a daemon is set up.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The API address (TCP).
    pub listen: SocketAddr,
    /// This shim's name: guests are told it as their host.
    pub name: String,
    pub region: String,
    /// 1..=[`MAX_SHIM_ID`]: picks the gateway and the guests' addresses
    /// (unless `block` does).
    pub shim_id: u8,
    /// The block of `guest_net` the fleet store allocated to this shim:
    /// its gateway and guests' addresses, whatever `shim_id` says.
    pub block: Option<u32>,
    /// The subnet of the gateway and guests (`--guest-net`).
    pub guest_net: GuestNet,
    /// Shim-level published ports (to a guest address; default: the first
    /// address of this shim's range).
    pub publish: Vec<PublishSpec>,
    pub kvm_device: PathBuf,
    /// The overlay's UDP address (default: the listen address) and peers.
    pub overlay: Option<hostnet::overlay::OverlayConfig>,
    /// Where uploaded images and instance records live (`--state-dir`);
    /// none: no image uploads, nothing survives a restart.
    pub state_dir: Option<PathBuf>,
    /// The largest image upload accepted.
    pub max_image_bytes: u64,
    /// TLS, tokens and pinned peers (`host-shim init`); `None`: plain HTTP,
    /// nobody checked.
    pub security: Option<Arc<security::HostSecurity>>,
    /// What callers may take (connections, deadlines, instances, memory, ports).
    pub limits: limits::Limits,
    /// Free-page hints and injected test faults of migrations.
    pub migration: migration::MigrationConfig,
    /// The fleet store this daemon registered in (`--store etcd://`): apps
    /// are taken over and fenced by their owner there ([`fence`]).
    pub fleet: Option<fence::FleetLink>,
}

impl DaemonConfig {
    /// The gateway's address.
    pub fn gateway(&self) -> Ipv4Addr {
        match self.block.map(|b| self.guest_net.block(b)) {
            Some(Ok((gateway, _))) => gateway,
            // `Daemon::new` refuses a block outside the network.
            _ => self.guest_net.gateway(self.shim_id),
        }
    }

    /// The first and last address this shim hands out.
    pub fn pool(&self) -> Result<(Ipv4Addr, Ipv4Addr), hostnet::pool::GuestNetError> {
        match self.block {
            Some(b) => self.guest_net.block(b).map(|(_, pool)| pool),
            None => self.guest_net.pool(self.shim_id, self.overlay.is_some()),
        }
    }
}

/// What an API handler answers.
pub use api::server::Reply;

/// An API error: status and message.
pub use api::server::ApiError;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(400, msg.into())
}

/// The daemon.
pub struct Daemon {
    pub config: DaemonConfig,
    pub hv: Hypervisor,
    pub net: Network,
    /// The instances, the incoming reservations and the address pool.
    instances: Mutex<InstanceTable>,
    next_id: AtomicUsize,
    ended: Mutex<Sender<Ended>>,
    /// The instances of other daemons this one stands by for.
    standbys: standby::Standbys,
    images: Option<images::ImageStore>,
    persist: Option<restart_records::RestartRecords>,
    started: Instant,
    /// Migrations under way (cancelled by `stop`).
    pub migrations: migration::Migrations,
    /// Asks the `trim` thread to hand freed heap back (after stops).
    trim: mpsc::SyncSender<()>,
    /// When its open files are counted next.
    fds: limits::FdGauge,
}

impl Daemon {
    /// Opens KVM, starts the network and binds the shim-level ports.
    pub fn new(config: DaemonConfig) -> Result<(Arc<Self>, Receiver<Ended>), Error> {
        if config.block.is_none() && !(1..=MAX_SHIM_ID).contains(&config.shim_id) {
            return Err(Error::Config(format!(
                "--shim-id {} is out of range: 1 to {MAX_SHIM_ID}",
                config.shim_id
            )));
        }
        let range = config.pool().map_err(|e| Error::Config(e.to_string()))?;
        let first = range.0;
        let max = config.limits.max_instances;
        for why in limits::HostLimits::read(config.limits.max_open_files).check_at_start(max) {
            tracing::warn!(
                max_instances = max,
                reason = %why,
                "this host cannot hold serve --max-instances"
            );
        }
        let hv = Hypervisor::open(&config.kvm_device)?;
        // Probed now, so that no snapshot or migration pays for it.
        hv.msrs()?;
        let net = Network::start_shared(&SharedNetConfig {
            gateway: config.gateway(),
            prefix: config.guest_net.prefix(),
            overlay: config.overlay.clone(),
            shim_name: config.name.clone(),
        })?;
        for spec in &config.publish {
            net.publish(spec, first)?;
        }
        let (images, persist) = match &config.state_dir {
            Some(dir) => {
                let state = |e: std::io::Error| {
                    Error::Config(format!("state directory {}: {e}", dir.display()))
                };
                (
                    Some(
                        images::ImageStore::open(&dir.join("images"), config.max_image_bytes)
                            .map_err(state)?,
                    ),
                    Some(restart_records::RestartRecords::open(dir).map_err(state)?),
                )
            }
            None => (None, None),
        };
        let pool = AddressPool {
            net: config.guest_net,
            gateway: config.gateway(),
            range,
            overlay: net.overlay_addr().is_some(),
        };
        let (tx, rx) = mpsc::channel();
        let (trim, wanted) = mpsc::sync_channel(1);
        thread::Builder::new()
            .name("trim".into())
            .spawn(move || run::trim_after_stops(wanted))
            .map_err(|e| Error::Config(format!("cannot start a thread: {e}")))?;
        let daemon = Arc::new(Self {
            config,
            hv,
            net,
            instances: Mutex::new(InstanceTable::new(pool)),
            next_id: AtomicUsize::new(1),
            ended: Mutex::new(tx),
            images,
            persist,
            standbys: Default::default(),
            started: Instant::now(),
            migrations: Default::default(),
            trim,
            fds: Default::default(),
        });
        Ok((daemon, rx))
    }

    pub(crate) fn instances(&self) -> MutexGuard<'_, InstanceTable> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ended_sender(&self) -> Sender<Ended> {
        self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Notes addresses of this shim's pool that guests on other hosts hold
    /// ([`InstanceTable::hold_elsewhere`]).
    pub fn hold_elsewhere(&self, ips: impl IntoIterator<Item = Ipv4Addr>) {
        self.instances().hold_elsewhere(ips);
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError(404, format!("no instance named '{name}'"))
}

/// Runs a daemon until the process ends: brings back the instances
/// recorded in its state directory, then calls `ready` with how that went,
/// once it is set up, bound to its address (`daemon.config.listen` is the
/// bound one) and about to answer on it. If `ready` fails (e.g. the host
/// cannot register in its fleet store), the daemon does not serve and
/// `serve` returns that error.
pub fn serve(
    config: DaemonConfig,
    ready: impl FnOnce(&Daemon, &[restart_records::BroughtBack]) -> Result<(), String>,
) -> Result<(), Error> {
    let mut config = config;
    let listener = TcpListener::bind(config.listen)
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.listen)))?;
    if config.listen.port() == 0 {
        // `--listen HOST:0`: the port the system chose, for the API and (when it
        // follows the API's address) the overlay alike.
        let bound = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("cannot read the bound address: {e}")))?;
        if let Some(o) = config
            .overlay
            .as_mut()
            .filter(|o| o.listen == config.listen)
        {
            o.listen = bound;
        }
        config.listen = bound;
    }
    let (daemon, ended) = Daemon::new(config)?;
    let brought_back = daemon.bring_back();
    fence::start(&daemon).map_err(|e| Error::Config(format!("cannot start a thread: {e}")))?;
    {
        let d = Arc::clone(&daemon);
        thread::Builder::new()
            .name("watch".into())
            .spawn(move || d.watch(ended))
            .map_err(|e| Error::Config(e.to_string()))?;
    }
    let security = daemon.config.security.clone();
    if security.is_some() && daemon.net.overlay_addr().is_some() {
        let d = Arc::clone(&daemon);
        thread::Builder::new()
            .name("pinned-peers".into())
            .spawn(move || peers::overlay_to_pinned_peers(&d))
            .map_err(|e| Error::Config(e.to_string()))?;
    }
    daemon
        .config
        .pool()
        .map_err(|e| Error::Config(e.to_string()))?;
    ready(&daemon, &brought_back).map_err(Error::Config)?;
    http::serve(&daemon, listener, security);
    Ok(())
}
