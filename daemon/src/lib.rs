//! `host-shim serve`: a long-running shim that hosts several named
//! instances (each guest on its own vCPU thread, all on the shim's switch)
//! and is driven from other processes over an HTTP/1.1 JSON API, over TLS
//! with authenticated callers when the host has an identity ([`http`],
//! the `security` crate). It is the migration crate's `Host`
//! ([`migration_host`]).
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
//! [`mac_for`] it). A shim of a fleet on a store has a block of the
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

pub mod api;
pub mod fence;
pub mod http;
pub mod images;
pub mod instance;
pub mod limits;
pub mod logs;
pub mod migration_host;
pub mod openapi;
pub mod restart_records;
pub mod standby;
pub mod stats;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use http::Method;
pub use limits::check_name;
use limits::Quotas;

use api::{
    CheckpointInfo, CheckpointRequest, InstanceInfo, RestoreRequest, RunRequest, ShimInfo,
    SnapshotInfo, SnapshotRequest,
};
use hostnet::pool::GuestNet;
use hostnet::{mac_for, Network, Nic, PublishSpec, SharedNetConfig};
use instance::{Instance, InstanceConsole, LogRing, State};
use vmm::boot::cmdline::{self, GuestArgs};
use vmm::devices::virtio;
use vmm::error::Error;
use vmm::machine::{self, BootRequest, Ended, Hypervisor, Machine, MachineHandle};

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

/// A name reserved for an incoming instance, with the tombstone it
/// replaced (if any).
#[derive(Clone)]
pub struct Incoming(Arc<Mutex<Option<Instance>>>);

/// What an API handler answers.
pub enum Reply {
    Json(u16, String),
    Text(u16, String),
    /// Lines produced by a worker as it goes.
    Stream(Receiver<String>),
}

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
    instances: Mutex<BTreeMap<String, Instance>>,
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
    /// Addresses of this shim's pool that guests on other hosts hold (they
    /// moved away before this daemon restarted): never handed out here.
    held_elsewhere: Mutex<BTreeSet<Ipv4Addr>>,
    /// Restart records incoming migrations carry, until their guest runs
    /// here (one per incoming reservation at most).
    carried: Mutex<BTreeMap<String, RunRequest>>,
    /// The source daemon of each instance migrating in.
    incoming_from: Mutex<BTreeMap<String, String>>,
    /// When its open files are counted next.
    fds: limits::FdGauge,
}

/// Hands the heap that stopped instances freed back to the kernel, once
/// stops pause for [`TRIM_DEBOUNCE`] (a trim walks the whole heap: after
/// each of a thousand stops it would cost more than the stop).
fn trim_after_stops(wanted: Receiver<()>) {
    while wanted.recv().is_ok() {
        thread::sleep(TRIM_DEBOUNCE);
        while wanted.try_recv().is_ok() {}
        shim_util::sys::release_free_heap();
    }
}

/// How long stops must pause before the heap is trimmed.
const TRIM_DEBOUNCE: Duration = Duration::from_millis(200);

impl Daemon {
    /// Opens KVM, starts the network and binds the shim-level ports.
    pub fn new(config: DaemonConfig) -> Result<(Arc<Self>, Receiver<Ended>), Error> {
        if config.block.is_none() && !(1..=MAX_SHIM_ID).contains(&config.shim_id) {
            return Err(Error::Config(format!(
                "--shim-id {} is out of range: 1 to {MAX_SHIM_ID}",
                config.shim_id
            )));
        }
        let (first, _) = config.pool().map_err(|e| Error::Config(e.to_string()))?;
        let max = config.limits.max_instances;
        for why in limits::HostLimits::read(config.limits.max_open_files).check_at_start(max) {
            tracing::warn!(
                max_instances = max,
                "this host cannot hold serve --max-instances {max}: {why}"
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
        let (tx, rx) = mpsc::channel();
        let (trim, wanted) = mpsc::sync_channel(1);
        thread::Builder::new()
            .name("trim".into())
            .spawn(move || trim_after_stops(wanted))
            .map_err(|e| Error::Config(format!("cannot start a thread: {e}")))?;
        let daemon = Arc::new(Self {
            config,
            hv,
            net,
            instances: Mutex::new(BTreeMap::new()),
            next_id: AtomicUsize::new(1),
            ended: Mutex::new(tx),
            images,
            persist,
            standbys: Default::default(),
            started: Instant::now(),
            migrations: Default::default(),
            trim,
            held_elsewhere: Default::default(),
            carried: Default::default(),
            incoming_from: Default::default(),
            fds: Default::default(),
        });
        Ok((daemon, rx))
    }

    pub fn instances(&self) -> MutexGuard<'_, BTreeMap<String, Instance>> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ended_sender(&self) -> Sender<Ended> {
        self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `machine` as instance `name` (already reserved as Busy).
    pub fn start_instance(&self, machine: Machine) -> Result<Arc<MachineHandle>, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(machine::spawn(machine, id, self.ended_sender(), None)?);
        Ok(handle)
    }

    /// Notes guests that ended on their own (runs on its own thread).
    fn watch(self: Arc<Self>, ended: Receiver<Ended>) {
        for (id, exit) in ended {
            let mut instances = self.instances();
            let Some(inst) = instances
                .values_mut()
                .find(|i| i.handle.as_ref().is_some_and(|h| h.id() == id))
            else {
                continue;
            };
            let Some(exit) = exit else { continue };
            let how = match &exit {
                vmm::GuestExit::Exited(code) => format!("status {code}"),
                other => other.to_string(),
            };
            tracing::info!(name = %inst.name, %exit, "guest ended");
            inst.state = State::Exited(how);
            if let Some(h) = inst.handle.take() {
                h.join();
            }
            if let Some(port) = inst.port.take() {
                self.net.detach(&port);
            }
            drop(instances);
            self.trim_heap();
        }
    }

    /// The addresses guests of `instances` hold: live ones', those of
    /// guests that moved away while the overlay carries them there, and
    /// those [`Self::hold_elsewhere`] names.
    fn used_ips(&self, instances: &BTreeMap<String, Instance>) -> BTreeSet<Ipv4Addr> {
        let overlay = self.net.overlay_addr().is_some();
        let mut used: BTreeSet<Ipv4Addr> = instances
            .values()
            .filter(|i| i.is_live() || (overlay && matches!(i.state, State::Moved(_))))
            .filter_map(|i| i.spec.nic.map(|n| n.ip))
            .collect();
        used.extend(
            self.held_elsewhere
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter(),
        );
        used
    }

    /// Notes addresses of this shim's pool that guests on other hosts hold
    /// (found at start, e.g. guests that moved away before a restart): no
    /// new instance here gets them, for the daemon's life (at most the
    /// pool's size); a guest coming back with one is let in.
    pub fn hold_elsewhere(&self, ips: impl IntoIterator<Item = Ipv4Addr>) {
        let Ok((first, last)) = self.config.pool() else {
            return;
        };
        self.held_elsewhere
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ips.into_iter().filter(|ip| (first..=last).contains(ip)));
    }

    /// The address of a new instance among `instances`: `asked` if free
    /// and in the guest subnet, else the lowest free one of this shim's
    /// pool.
    fn pick_ip(
        &self,
        instances: &BTreeMap<String, Instance>,
        asked: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, ApiError> {
        let used = self.used_ips(instances);
        let net = self.config.guest_net;
        if let Some(ip) = asked {
            if !hostnet::in_subnet(ip, self.config.gateway(), net.prefix()) {
                return Err(bad(format!(
                    "{ip} is outside this shim's guest network {net} (serve --guest-net)"
                )));
            }
            if used.contains(&ip) {
                return Err(ApiError(409, format!("{ip} is in use by another instance")));
            }
            return Ok(ip);
        }
        let pool = self.config.pool()?;
        GuestNet::lowest_free(pool, &used).ok_or_else(|| {
            ApiError(
                409,
                format!(
                    "all {} guest addresses of this shim ({}..{}) are in use (serve --guest-net)",
                    GuestNet::capacity(pool),
                    pool.0,
                    pool.1
                ),
            )
        })
    }

    /// Refuses an instance of `mem` bytes beyond the instance and memory
    /// limits, counting the live (running and starting) `instances`.
    fn admit(&self, instances: &BTreeMap<String, Instance>, mem: u64) -> Result<(), ApiError> {
        let live = instances.values().filter(|i| i.is_live());
        let (count, used) = live.fold((0, 0u64), |(n, m), i| {
            (n + 1, m.saturating_add(i.spec.mem_size))
        });
        self.config.limits.admit(count, used, mem)?;
        self.fds
            .admit_one(count as u64, self.config.limits.max_open_files)?;
        limits::HostLimits::read(self.config.limits.max_open_files).admit_one(count as u64)
    }

    /// Reserves `name` with a placeholder; fails if it is taken or the
    /// limits have no room for it.
    fn reserve(&self, name: &str, spec: vmm::snapshot::state::GuestSpec) -> Result<(), ApiError> {
        let mut instances = self.instances();
        self.check_reservable(&instances, name, &spec)?;
        instances.insert(
            name.to_owned(),
            Instance::new(name, spec, State::Busy("starting")),
        );
        Ok(())
    }

    /// Reserves `name` as [`Self::reserve`] does, with a card whose address
    /// is picked under the same lock (`asked`, else the lowest free one):
    /// concurrent runs never pick one address twice.
    fn reserve_with_address(
        &self,
        name: &str,
        mut spec: vmm::snapshot::state::GuestSpec,
        asked: Option<Ipv4Addr>,
    ) -> Result<Nic, ApiError> {
        let mut instances = self.instances();
        self.check_reservable(&instances, name, &spec)?;
        let ip = self.pick_ip(&instances, asked)?;
        let nic = Nic {
            mac: mac_for(ip),
            ip,
            prefix: self.config.guest_net.prefix(),
            gateway: Some(self.config.gateway()),
        };
        spec.nic = Some(nic.into());
        instances.insert(
            name.to_owned(),
            Instance::new(name, spec, State::Busy("starting")),
        );
        Ok(nic)
    }

    /// Why `name` with `spec` cannot be reserved among `instances`, if it
    /// cannot: a bad or taken name, no room in the limits, its address
    /// held by another instance.
    fn check_reservable(
        &self,
        instances: &BTreeMap<String, Instance>,
        name: &str,
        spec: &vmm::snapshot::state::GuestSpec,
    ) -> Result<(), ApiError> {
        check_name(name)?;
        self.admit(instances, spec.mem_size)?;
        if let Some(old) = instances.get(name) {
            return Err(ApiError(
                409,
                format!(
                    "an instance named '{name}' exists ({}): stop it first",
                    old.info().state
                ),
            ));
        }
        if let Some(nic) = spec.nic {
            if let Some(other) = instances
                .values()
                .find(|i| i.spec.nic.is_some_and(|n| n.ip == nic.ip) && i.is_live())
            {
                return Err(ApiError(
                    409,
                    format!("instance '{}' already has address {}", other.name, nic.ip),
                ));
            }
        }
        Ok(())
    }

    fn unreserve(&self, name: &str) {
        self.instances().remove(name);
    }

    fn run(&self, req: RunRequest) -> Result<InstanceInfo, ApiError> {
        check_name(&req.name)?;
        vmm::config::check_mem_size(req.mem).map_err(bad)?;
        let publish = self.publishes(&req.publish)?;
        let ip = match &req.ip {
            Some(ip) => Some(vmm::config::parse_ipv4(ip).map_err(bad)?),
            None => None,
        };
        let image = PathBuf::from(&req.image);
        // Placeholder spec for the reservation; the real one comes from boot.
        let mut placeholder = placeholder_spec(&req.name, req.mem);
        placeholder.image.path = req.image.clone();
        let nic = self.reserve_with_address(&req.name, placeholder, ip)?;
        match self.boot(&req, &image, nic, publish) {
            Ok(info) => Ok(info),
            Err(e) => {
                self.unreserve(&req.name);
                Err(e)
            }
        }
    }

    fn boot(
        &self,
        req: &RunRequest,
        image: &Path,
        nic: Nic,
        publish: Vec<PublishSpec>,
    ) -> Result<InstanceInfo, ApiError> {
        let mut params = nic.cmdline_params();
        if let Some(ms) = req.checkpoint_every_ms {
            if req.checkpoint_to.is_none() && req.standby.is_none() {
                return Err(bad("--checkpoint-every needs --checkpoint-to or --standby"));
            }
            params.push((
                abi::cmdline::CHECKPOINT_EVERY_KEY.to_owned(),
                ms.max(1).to_string(),
            ));
        }
        let checkpoint = match &req.restore {
            Some(file) => Some((
                vmm::checkpoint::read_file(Path::new(file)).map_err(|e| bad(e.to_string()))?,
                vmm::boot::loader::inspect(image, req.mem)
                    .map_err(|e| bad(e.to_string()))?
                    .load_end,
            )),
            None => None,
        };
        let guest = GuestArgs {
            host_name: self.config.name.clone(),
            region: self.config.region.clone(),
            params,
            env: req.env.clone(),
            devices: vec![virtio::cmdline_entry(0)],
            args: req.args.clone(),
        };
        let cmdline = cmdline::build(&guest).map_err(|e| bad(e.to_string()))?;
        let standby = standby::register(self, req)?;
        let log = Arc::new(Mutex::new(LogRing::default()));
        let port = self.net.attach(nic.mac)?;
        let machine = Machine::boot(
            &self.hv,
            BootRequest {
                name: req.name.clone(),
                image,
                cmdline,
                mem_size: req.mem,
                nic: Some(nic),
                port: Some(Arc::clone(&port)),
                env: req.env.clone(),
                args: req.args.clone(),
            },
            Box::new(InstanceConsole::new(&req.name, Arc::clone(&log))),
        );
        let machine = machine.and_then(|mut m| {
            if let Some((blob, image_end)) = &checkpoint {
                m.place_checkpoint(blob, *image_end)?;
            }
            m.doorbell
                .set_checkpoint_dir(req.checkpoint_to.as_ref().map(PathBuf::from));
            if let Some(sink) = standby {
                m.doorbell.add_checkpoint_sink(Box::new(sink));
            }
            Ok(m)
        });
        let machine = match machine {
            Ok(m) => m,
            Err(e) => {
                self.net.detach(&port);
                return Err(bad(e.to_string()));
            }
        };
        self.launch(&req.name, machine, port, log, publish)
    }

    /// Publishes, spawns and records a machine under the reserved `name`.
    pub fn launch(
        &self,
        name: &str,
        mut machine: Machine,
        port: Arc<hostnet::port::GuestPort>,
        log: Arc<Mutex<LogRing>>,
        publish: Vec<PublishSpec>,
    ) -> Result<InstanceInfo, ApiError> {
        let ip = machine.spec.nic.map(|n| n.ip);
        let mut done = Vec::new();
        for spec in &publish {
            let target = spec
                .guest_addr
                .or(ip)
                .ok_or_else(|| bad("--publish needs a guest with a network card"));
            let result = target.and_then(|t| {
                self.net
                    .publish(spec, t)
                    .map_err(|e| ApiError(409, e.to_string()))
            });
            if let Err(e) = result {
                for s in &done {
                    self.net.unpublish(s);
                }
                self.net.detach(&port);
                return Err(e);
            }
            done.push(spec.clone());
        }
        let spec = machine.spec.clone();
        let checkpoints = Arc::new(vmm::checkpoint::Latest::default());
        machine
            .doorbell
            .set_checkpoint_latest(Some(Arc::clone(&checkpoints)));
        machine
            .doorbell
            .set_checkpoint_max(self.config.limits.max_checkpoint);
        let handle = match self.start_instance(machine) {
            Ok(h) => h,
            Err(e) => {
                for s in &done {
                    self.net.unpublish(s);
                }
                self.net.detach(&port);
                return Err(e.into());
            }
        };
        let mut instances = self.instances();
        let inst = instances
            .entry(name.to_owned())
            .or_insert_with(|| Instance::new(name, spec.clone(), State::Running));
        inst.spec = spec;
        inst.state = State::Running;
        inst.handle = Some(handle);
        inst.port = Some(port);
        inst.publish.extend(done);
        inst.log = log;
        inst.started = Instant::now();
        inst.checkpoints = checkpoints;
        Ok(inst.info())
    }

    /// Asks the `trim` thread to give the heap the allocator holds free back
    /// to the operating system (after an instance stops or moves away: glibc
    /// keeps freed memory mapped, so an idle daemon's RSS would otherwise keep
    /// what its busiest moment needed). A trim already pending covers it.
    pub fn trim_heap(&self) {
        let _ = self.trim.try_send(());
    }

    fn stop(&self, name: &str) -> Result<InstanceInfo, ApiError> {
        // A migration of it ends first (cancelled before its commit).
        self.migrations.cancel(name, Duration::from_secs(30));
        let inst = {
            let mut instances = self.instances();
            match instances.get(name) {
                None => return Err(not_found(name)),
                Some(i) if matches!(i.state, State::Busy(_)) => {
                    return Err(ApiError(
                        409,
                        format!("instance '{name}' is busy ({}): try again", i.info().state),
                    ))
                }
                Some(_) => {}
            }
            instances.remove(name).expect("present")
        };
        if let Some(h) = &inst.handle {
            if !h.stop() {
                tracing::warn!("the vCPU thread of {name} did not stop; leaving it behind");
            }
        }
        if let Some(port) = &inst.port {
            self.net.detach(port);
        }
        for spec in &inst.publish {
            self.net.unpublish(spec);
        }
        let mut info = inst.info();
        drop(inst);
        // What the instance's threads allocated stays in the allocator's
        // arenas otherwise (tens of MiB after a thousand instances).
        self.trim_heap();
        info.state = api::InstanceState::Stopped;
        Ok(info)
    }

    /// Marks a live instance busy and returns its handle; `release` undoes it.
    pub fn acquire(&self, name: &str, what: &'static str) -> Result<Arc<MachineHandle>, ApiError> {
        let mut instances = self.instances();
        let inst = instances.get_mut(name).ok_or_else(|| not_found(name))?;
        match (&inst.state, &inst.handle) {
            (State::Running, Some(h)) => {
                let h = Arc::clone(h);
                inst.state = State::Busy(what);
                Ok(h)
            }
            (State::Busy(other), _) => Err(ApiError(
                409,
                format!("instance '{name}' is busy ({other})"),
            )),
            _ => Err(ApiError(
                409,
                format!("instance '{name}' is not running ({})", inst.info().state),
            )),
        }
    }

    /// Back to running after [`Self::acquire`].
    pub fn release(&self, name: &str) {
        if let Some(inst) = self.instances().get_mut(name) {
            if matches!(inst.state, State::Busy(_)) {
                inst.state = State::Running;
            }
        }
    }

    /// Where a file the API asked for (`--out` of a snapshot or
    /// checkpoint, `--checkpoint-to`) goes. A daemon with a state directory
    /// writes only in its `STATE/KIND` directory (0700): `out` is a file
    /// name there, or a path of one (as an earlier answer gave it);
    /// anything else, `/etc/x` or `../x`, gets 403. A daemon without one
    /// (a plain daemon for tests and trusted networks) writes where told.
    fn output_path(&self, kind: &str, out: &str) -> Result<PathBuf, ApiError> {
        if out.is_empty() {
            return Err(bad(format!("{kind}: no output file given")));
        }
        let Some(state) = &self.config.state_dir else {
            return Ok(PathBuf::from(out));
        };
        let dir = state.join(kind);
        let path = Path::new(out);
        let file = match path.parent() {
            Some(p) if p.as_os_str().is_empty() || p == dir => path.file_name(),
            _ => None,
        };
        let file = file
            .and_then(|f| f.to_str())
            .filter(|f| check_name(f).is_ok())
            .ok_or_else(|| {
                ApiError(
                    403,
                    format!(
                        "this shim writes {kind} only to {}: give a file name (letters, digits, \
                         '-', '_', '.'), not {out:?}",
                        dir.display()
                    ),
                )
            })?;
        shim_util::files::private_dir(&dir)
            .map_err(|e| ApiError(500, format!("{}: {e}", dir.display())))?;
        Ok(dir.join(file))
    }

    fn snapshot(&self, name: &str, req: SnapshotRequest) -> Result<SnapshotInfo, ApiError> {
        let out = self.output_path("snapshots", &req.out)?;
        let handle = self.acquire(name, "snapshotting")?;
        let result = (|| {
            let start = Instant::now();
            let machine = handle
                .pause()
                .map_err(|e| ApiError(409, format!("cannot pause '{name}': {e}")))?;
            let saved = vmm::snapshot::save(&self.hv, &machine, &self.config.name, &out);
            handle.resume(machine);
            let paused_ms = start.elapsed().as_secs_f64() * 1e3;
            let stats = saved?;
            Ok(SnapshotInfo {
                file: out.display().to_string(),
                pages: stats.pages,
                bytes: stats.bytes,
                paused_ms,
            })
        })();
        self.release(name);
        result
    }

    /// Asks `name`'s app for a checkpoint and writes it to `req.out` when
    /// it arrives (the guest keeps running).
    fn checkpoint(&self, name: &str, req: CheckpointRequest) -> Result<CheckpointInfo, ApiError> {
        let out = self.output_path("checkpoints", &req.out)?;
        let (handle, latest) = {
            let instances = self.instances();
            let inst = instances.get(name).ok_or_else(|| not_found(name))?;
            match (&inst.state, &inst.handle) {
                (State::Running, Some(h)) => (Arc::clone(h), Arc::clone(&inst.checkpoints)),
                _ => {
                    return Err(ApiError(
                        409,
                        format!("instance '{name}' is not running ({})", inst.info().state),
                    ))
                }
            }
        };
        let start = Instant::now();
        let seen = latest.count();
        handle
            .request_checkpoint()
            .map_err(|e| ApiError(500, e.to_string()))?;
        let timeout = std::time::Duration::from_millis(req.timeout_ms.unwrap_or(10_000));
        let blob = loop {
            if let Some(blob) = latest.wait_after(seen, machine::KICK_INTERVAL * 4) {
                break Some(blob);
            }
            if start.elapsed() >= timeout {
                break None;
            }
            handle.wake();
        };
        let blob = blob.ok_or_else(|| {
            ApiError(
                504,
                format!(
                    "instance '{name}' handed over no checkpoint within {:.1} s: its app may \
                     not support checkpoints (libcloud::state) or be busy",
                    timeout.as_secs_f64()
                ),
            )
        })?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let describe = abi::checkpoint::decode(&blob)
            .map(|(c, _)| abi::checkpoint::describe(&c))
            .unwrap_or_default();
        shim_util::files::write_atomic(&out, &blob)
            .map_err(|e| ApiError(500, format!("cannot write {}: {e}", out.display())))?;
        Ok(CheckpointInfo {
            file: out.display().to_string(),
            bytes: blob.len() as u64,
            describe,
            ms,
        })
    }

    /// Checks a caller's published ports and the limits.
    fn publishes(&self, publish: &[PublishSpec]) -> Result<Vec<PublishSpec>, ApiError> {
        for p in publish {
            p.check().map_err(bad)?;
        }
        self.config.limits.check_publish(publish)?;
        Ok(publish.to_vec())
    }

    fn restore(&self, req: RestoreRequest) -> Result<InstanceInfo, ApiError> {
        let publish = self.publishes(&req.publish)?;
        if let Some(name) = &req.name {
            check_name(name)?;
        }
        let opened = vmm::snapshot::open(Path::new(&req.file)).map_err(|e| bad(e.to_string()))?;
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| opened.state.spec.name.clone());
        // The name and the limits are checked before the snapshot's memory
        // is allocated, and again (atomically) when the name is reserved.
        check_name(&name)?;
        self.admit(&self.instances(), opened.state.spec.mem_size)?;
        let (state, vm) = opened.into_vm(&self.hv).map_err(|e| bad(e.to_string()))?;
        self.reserve(&name, state.spec.clone())?;
        let result = (|| {
            let log = Arc::new(Mutex::new(LogRing::default()));
            let port = match state.spec.nic {
                Some(nic) => Some(self.net.attach(nic.mac)?),
                None => None,
            };
            let mut state = state;
            state.spec.name = name.clone();
            let console = Box::new(InstanceConsole::new(&name, Arc::clone(&log)));
            let mut machine = Machine::restore(vm, state, port.clone(), console).map_err(|e| {
                if let Some(p) = &port {
                    self.net.detach(p);
                }
                bad(e.to_string())
            })?;
            machine.set_location(&self.config.name, &self.config.region)?;
            let port = port.ok_or_else(|| {
                bad("snapshots of guests without a network card cannot run in the daemon")
            })?;
            self.launch(&name, machine, port, log, publish)
        })();
        if result.is_err() {
            self.unreserve(&name);
        }
        result
    }

    /// Reserves the name of an incoming instance. A tombstone of the same
    /// name (it lived here before and moved away) is set aside: its
    /// published ports are still bound here and go back to it.
    pub fn reserve_incoming(&self, hello: &migration::protocol::Hello) -> Result<Incoming, String> {
        check_name(&hello.name).map_err(|ApiError(_, why)| why)?;
        let mut instances = self.instances();
        self.admit(&instances, hello.mem_size)
            .map_err(|ApiError(_, why)| why)?;
        let mut tombstone = None;
        if let Some(old) = instances.get(&hello.name) {
            if !matches!(old.state, State::Moved(_)) {
                return Err(format!(
                    "an instance named '{}' already exists here ({})",
                    hello.name,
                    old.info().state
                ));
            }
            tombstone = instances.remove(&hello.name);
        }
        if let Some(nic) = hello.nic {
            if let Some(other) = instances.values().find(|i| {
                i.is_live()
                    && i.spec
                        .nic
                        .is_some_and(|n| n.ip == nic.ip || n.mac == nic.mac)
            }) {
                let other = other.name.clone();
                if let Some(t) = tombstone {
                    instances.insert(hello.name.clone(), t);
                }
                return Err(format!(
                    "instance '{other}' here already has address {} or its MAC",
                    nic.ip
                ));
            }
        }
        let mut spec = placeholder_spec(&hello.name, hello.mem_size);
        spec.nic = hello.nic;
        spec.image = hello.image.clone();
        instances.insert(
            hello.name.clone(),
            Instance::new(&hello.name, spec, State::Busy("incoming")),
        );
        drop(instances);
        self.carry_in(hello);
        self.incoming_from()
            .insert(hello.name.clone(), hello.source.clone());
        Ok(Incoming(Arc::new(Mutex::new(tombstone))))
    }

    /// Undoes [`Self::reserve_incoming`] after a failed migration.
    pub fn cancel_incoming(&self, name: &str, incoming: Incoming) {
        self.carried_record(name);
        self.incoming_from().remove(name);
        let mut instances = self.instances();
        instances.remove(name);
        if let Some(t) = incoming.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            instances.insert(name.to_owned(), t);
        }
    }

    /// Gives an instance that came back the published ports it left here.
    pub fn adopt_publishes(&self, name: &str, incoming: &Incoming) {
        let tombstone = incoming.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some(t), Some(inst)) = (tombstone, self.instances().get_mut(name)) {
            inst.publish.extend(t.publish);
        }
    }

    /// Whether `name` is a running instance here.
    pub fn is_running(&self, name: &str) -> bool {
        self.instances()
            .get(name)
            .is_some_and(|i| i.state == State::Running)
    }

    /// After a successful migration: stops the (paused, released) vCPU
    /// thread, takes the guest's port off the switch (frames for it now go
    /// over the overlay to `peer`) and leaves a tombstone that keeps the
    /// published ports.
    pub fn moved_away(&self, name: &str, to: &str, peer: Option<SocketAddr>, skip_frames: usize) {
        let (handle, port) = {
            let mut instances = self.instances();
            let Some(inst) = instances.get_mut(name) else {
                return;
            };
            inst.state = State::Moved(to.to_owned());
            (inst.handle.take(), inst.port.take())
        };
        self.forget(name);
        if let Some(h) = handle {
            h.stop();
        }
        if let Some(port) = port {
            self.net.moved(&port, peer, skip_frames);
        }
    }

    fn info(&self) -> ShimInfo {
        let (instances, used) = {
            let instances = self.instances();
            (instances.len(), self.used_ips(&instances))
        };
        ShimInfo {
            name: self.config.name.clone(),
            region: self.config.region.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            gateway: self.config.gateway().to_string(),
            overlay: self.net.overlay_addr().map(|a| a.to_string()),
            instances,
            max_image_bytes: self.images.as_ref().map(|i| i.max_bytes()),
            fingerprint: self
                .config
                .security
                .as_ref()
                .map(|s| s.identity.fingerprint.to_string()),
            overlay_rejected: self.net.overlay_rejected(),
            limits: Some(self.config.limits.clone()),
            open_files: shim_util::sys::open_fds().unwrap_or(0) as u64,
            addresses: self.config.pool().ok().map(|pool| {
                let taken = used.range(pool.0..=pool.1).count();
                api::AddressUse {
                    guest_net: self.config.guest_net.to_string(),
                    first: pool.0.to_string(),
                    last: pool.1.to_string(),
                    free: GuestNet::capacity(pool) - taken,
                }
            }),
        }
    }

    /// Puts every pinned peer with an address on the overlay (at that
    /// address, UDP: a shim's overlay listens on its API address unless
    /// told otherwise), so a fleet of secure hosts is a full mesh without
    /// `--peer`: a guest that moved twice still reaches the gateway it
    /// knew, and its clients reach it. Also done when a guest arrives, so
    /// that its first frames reach every host.
    pub fn join_pinned_peers(&self) {
        if let Some(sec) = &self.config.security {
            for addr in sec.peers().iter().filter_map(|p| p.overlay_addr()) {
                self.net.add_peer(addr);
            }
        }
    }

    /// A client of another daemon, `to` (an address or a pinned peer's
    /// name): plain HTTP when this daemon has no identity, else TLS only,
    /// to a pinned certificate (`fingerprint`, or that of the peer named,
    /// or at the address, `to`), presenting this host's own.
    pub fn peer_client(&self, to: &str, fingerprint: Option<&str>) -> Result<api::Client, String> {
        let Some(sec) = &self.config.security else {
            if to.starts_with("https://") {
                return Err(format!(
                    "this shim has no identity and cannot speak TLS to {to}: \
                     start it with `host-shim init` and `host-shim serve`"
                ));
            }
            return Ok(self.routed(api::Client::new(to)));
        };
        let (addr, pin) = match fingerprint {
            Some(fp) => (to.to_owned(), fp.parse::<security::Fingerprint>()?),
            None => {
                let peer = sec.peer_by_name_or_addr(to).ok_or_else(|| {
                    format!(
                        "'{}' is not a pinned peer of this shim: give its fingerprint, or pin it \
                     here with `host-shim peer add NAME SHA256:... --addr https://HOST:PORT`",
                        to
                    )
                })?;
                let fp = peer.fingerprint.parse::<security::Fingerprint>()?;
                let addr = match peer.addr {
                    Some(a) if peer.name == to => a,
                    None if peer.name == to => {
                        return Err(format!(
                            "peer '{}' has no address here: migrate --to https://HOST:PORT, or \
                         pin it with one (host-shim peer add {} {} --addr https://HOST:PORT)",
                            peer.name, peer.name, peer.fingerprint
                        ))
                    }
                    _ => to.to_owned(),
                };
                (addr, fp)
            }
        };
        api::Client::secure(&addr, pin, None, Some(&sec.identity))
            .map(|c| self.routed(c))
            .map_err(|e| e.to_string())
    }

    /// `client`, connecting through the `--peer-via` relay of its address
    /// if it has one: TCP to peers takes the same paths as the overlay.
    fn routed(&self, client: api::Client) -> api::Client {
        let via = self.config.overlay.as_ref().and_then(|o| {
            let real = client.addr.parse::<std::net::SocketAddr>().ok()?;
            o.via.iter().find(|(r, _)| *r == real).map(|(_, via)| *via)
        });
        match via {
            Some(via) => client.via(via),
            None => client,
        }
    }

    /// Answers one API request: routed and typed by [`api::routes`], then
    /// one arm per endpoint.
    fn handle(
        self: &Arc<Self>,
        method: &Method,
        path: &str,
        body: &[u8],
    ) -> Result<Reply, ApiError> {
        use api::routes::Request;
        let json = |status: u16, v: &dyn erased::Json| Ok(Reply::Json(status, v.to_json()));
        let req =
            Request::parse(method, path, body).map_err(|e| ApiError(e.status(), e.to_string()))?;
        match req {
            Request::Health => json(
                200,
                &api::Health {
                    ok: true,
                    version: env!("CARGO_PKG_VERSION").into(),
                    uptime_s: self.started.elapsed().as_secs_f64(),
                },
            ),
            Request::Info => json(200, &self.info()),
            Request::Stats => json(200, &self.stats()),
            Request::List => {
                let list: Vec<InstanceInfo> = self
                    .instances()
                    .values()
                    .map(|i| self.with_restart(i.info()))
                    .collect();
                json(200, &list)
            }
            Request::Run(req) => json(201, &self.run_recorded(req)?),
            Request::SetRestart(name, req) => json(200, &self.set_restart(name, req.restart)?),
            Request::FollowLogs(name) => Ok(Reply::Stream(logs::follow(self, name)?)),
            Request::Image(hash) => json(200, &self.image_info(hash)?),
            Request::PutImage(hash, bytes) => {
                let info = self.store_image(hash, bytes)?;
                json(if info.stored { 201 } else { 200 }, &info)
            }
            Request::PushImage(hash, req) => json(200, &self.push_image(hash, &req.to)?),
            Request::OpenApi => Ok(Reply::Text(200, openapi::OPENAPI.to_owned())),
            Request::Logs(name) => {
                let instances = self.instances();
                let inst = instances.get(name).ok_or_else(|| not_found(name))?;
                let text = String::from_utf8_lossy(
                    &inst
                        .log
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contents(),
                )
                .into_owned();
                Ok(Reply::Text(200, text))
            }
            Request::Stop(name) => {
                let info = self.stop(name)?;
                self.forget(name);
                json(200, &info)
            }
            Request::Snapshot(name, req) => json(200, &self.snapshot(name, req)?),
            Request::Checkpoint(name, req) => json(200, &self.checkpoint(name, req)?),
            Request::Restore(req) => json(201, &self.restore(req)?),
            Request::Migrate(name, req) => {
                let (tx, rx) = mpsc::channel();
                let daemon = Arc::clone(self);
                let name = name.to_owned();
                thread::Builder::new()
                    .name(format!("migrate-{name}"))
                    .spawn(move || migration::source::migrate(&daemon, &name, &req, &tx))
                    .map_err(|e| ApiError(500, e.to_string()))?;
                Ok(Reply::Stream(rx))
            }
            // The HTTP server upgrades the migration stream before this.
            Request::Migration => Err(ApiError(404, format!("no such endpoint: {method} {path}"))),
            Request::Standbys => json(200, &standby::list(self)),
            Request::Standby(body) => {
                let req = request(body, "standby")?;
                json(201, &standby::accept(self, req)?)
            }
            Request::StandbyCheckpoint(name, blob) => {
                json(200, &standby::receive(self, name, blob)?)
            }
        }
    }
}

/// A JSON request body of type `T` (`what` names it in the error).
fn request<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("bad {what} request: {e}")))
}

fn not_found(name: &str) -> ApiError {
    ApiError(404, format!("no instance named '{name}'"))
}

/// A spec for a reservation, before the guest exists.
fn placeholder_spec(name: &str, mem: u64) -> vmm::snapshot::state::GuestSpec {
    vmm::snapshot::state::GuestSpec {
        name: name.to_owned(),
        image: vmm::snapshot::state::ImageId {
            path: String::new(),
            size: 0,
            sha256: String::new(),
        },
        cmdline: String::new(),
        mem_size: mem,
        kvmclock: false,
        nic: None,
        cpuid: Vec::new(),
        env: Vec::new(),
        args: Vec::new(),
        generation: 0,
    }
}

/// Serializing answers of different types through one closure.
mod erased {
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        }
    }
}

/// Keeps the pinned peers on the overlay ([`Daemon::join_pinned_peers`]):
/// pins added later join within 100 ms (the overlay takes datagrams only
/// from its peers' addresses), and every second anyway (names re-resolved);
/// a host unpinned leaves it within 100 ms.
fn overlay_to_pinned_peers(daemon: &Daemon) {
    let Some(security) = &daemon.config.security else {
        return;
    };
    let mut joined: Option<(Vec<security::identity::Peer>, Instant)> = None;
    loop {
        let pins = security.peers();
        if joined
            .as_ref()
            .is_none_or(|(p, at)| *p != pins || at.elapsed() >= Duration::from_secs(1))
        {
            // A host unpinned since: its overlay datagrams are dropped from now on.
            for gone in joined.iter().flat_map(|(p, _)| p.iter()) {
                if let Some(addr) = gone.overlay_addr() {
                    if !pins.iter().any(|p| p.overlay_addr() == Some(addr)) {
                        daemon.net.remove_peer(addr);
                    }
                }
            }
            daemon.join_pinned_peers();
            joined = Some((pins, Instant::now()));
        }
        thread::sleep(Duration::from_millis(100));
    }
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
            .spawn(move || overlay_to_pinned_peers(&d))
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
