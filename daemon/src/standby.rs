//! Crash recovery on another shim: an instance run with `--standby PEER`
//! ships every app checkpoint it takes (full ones and deltas) to a standby
//! daemon, which watches the origin and, once the origin has been
//! unreachable for a grace period, restarts the app from its latest
//! checkpoint with the same image, arguments, environment, memory and
//! published ports.
//!
//! The origin side ([`register`], [`PeerSink`]): before the guest boots,
//! `POST /v1/standby` registers the instance with the peer (which checks
//! it has the same image: path and SHA-256); then each checkpoint goes to
//! `POST /v1/standby/NAME/checkpoint`, shipped by one thread per instance
//! (handed over only when the thread is idle) while the guest's `HC_CHECKPOINT` waits for the
//! answer, at most [`SHIP_DEADLINE`]: it returns "stored" only once the
//! peer stored the blob durably, so kv's `ACK_AFTER_CHECKPOINT=1`
//! acknowledges a write only when the peer has it. If the peer cannot
//! store a blob, answers too late, or is still busy with the previous one,
//! the guest is told it was not stored (a hung standby delays the guest by
//! the deadline, never more), and sends a full checkpoint next time.
//!
//! The standby side ([`Standbys`]): the blobs are checked as a chain and
//! stored as `DIR/NAME/latest.ckpt` (full checkpoints replace it, deltas
//! are appended and synced), `DIR` being `STATE/standby` under the
//! daemon's `--state-dir`, or else a fresh directory of an unpredictable
//! name in the temporary directory, mode 0700 either way (no other local
//! user can plant files or symlinks there); a watcher thread probes the
//! origin's `GET /v1/instances` every [`probe_interval`], each probe
//! failing after [`probe_timeout`] (a hung origin counts as down). The
//! origin answering
//! without the instance running (stopped, ended, moved away) releases the
//! standby; the origin not answering for the grace period (default
//! [`DEFAULT_GRACE`]) restarts the app here. A crash therefore loses the
//! writes after the last checkpoint that reached the peer: at most the
//! checkpoint interval, none with ack-after-checkpoint.
//!
//! With a fleet store (a daemon registered with `--store etcd://...`, and
//! an app deployed through it on a host that registered too), the standby
//! does not probe: it watches the app's owner record (`apps/NAME`) and the
//! origin's lease. Once that lease lapsed, it takes the app over by
//! compare-and-swap on the owner (`fleet::ops::take_over`: of several
//! candidates, and of the origin coming back, exactly one wins), restarts
//! it here from the latest checkpoint (recorded to survive this daemon's
//! restart) and records a `takeover` event. The record naming another host
//! (the app moved or was taken) or vanishing (stopped) releases it. The
//! origin pauses its guests before its lease can lapse
//! ([`crate::fence`]), so the two never run at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{bad, ApiError, Daemon};
use api::{Client, RunRequest};
use vmm::checkpoint::{Chain, DirSink, Sink};
use vmm::snapshot::state::ImageId;

/// How long the origin may be unreachable before the standby takes over.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(2);
/// A registration whose instance never ran at the origin is dropped after this.
const NEVER_STARTED: Duration = Duration::from_secs(30);
/// Restarting the app is tried this often, this far apart (e.g. while the
/// dead origin's ports are still being released).
const TAKEOVER_ATTEMPTS: u32 = 5;
const TAKEOVER_RETRY: Duration = Duration::from_millis(500);
/// Largest blob shipped (the API's request body limit).
const MAX_BLOB: usize = 16 << 20;
/// The longest a guest's checkpoint waits for its standby.
pub const SHIP_DEADLINE: Duration = Duration::from_secs(5);
/// With a fleet store, the owner record of a watched app is read every
/// this many looks at its origin's lease.
const OWNER_EVERY: u32 = 4;

/// `POST /v1/standby`: what a standby needs to run the app again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StandbyRequest {
    /// The origin daemon's API address (probed).
    pub origin: String,
    /// The instance as the origin ran it; `restore`/`standby` are ignored.
    pub run: RunRequest,
    /// The image the origin runs; the standby must have the same file.
    pub image: ImageId,
    /// Milliseconds the origin may be unreachable before the takeover.
    pub grace_ms: u64,
}

/// `GET /v1/standby`: one watched instance.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StandbyInfo {
    pub name: String,
    pub origin: String,
    /// `waiting`, `watching`, `took over`, `released: ...`, `failed: ...`.
    pub state: String,
    /// The checkpoint file (full checkpoint + deltas) and its size.
    pub file: String,
    pub bytes: u64,
    /// Blobs received (full checkpoints and deltas).
    pub blobs: u64,
}

/// One instance this daemon stands by for.
struct Entry {
    req: StandbyRequest,
    dir: PathBuf,
    store: Mutex<Store>,
    state: Mutex<String>,
    /// Replaced by a newer registration of the same name.
    superseded: AtomicBool,
    /// Taken over: the checkpoints here are the running app's own now,
    /// and the origin's are refused.
    closed: AtomicBool,
}

struct Store {
    chain: Chain,
    sink: DirSink,
    bytes: u64,
    blobs: u64,
    /// A full checkpoint is stored (a takeover is possible).
    has_full: bool,
}

/// The instances this daemon stands by for.
#[derive(Default)]
pub struct Standbys {
    entries: Mutex<BTreeMap<String, Arc<Entry>>>,
    /// Held while an app is restarted: the daemon picks an address and
    /// then reserves it, so two takeovers at once would pick the same one.
    takeover: Mutex<()>,
    /// Where the checkpoints go (made on first use).
    dir: OnceLock<Result<PathBuf, String>>,
    /// This daemon's instances that ship their checkpoints to a standby
    /// (which may take them over: [`crate::fence`] pauses them when the
    /// lease may lapse).
    shipping: Mutex<std::collections::BTreeSet<String>>,
    /// The last look at each origin's lease (fleet store): when, lapsed.
    lapsed: Mutex<BTreeMap<String, (Instant, bool)>>,
}

impl Standbys {
    /// Whether this daemon's instance `name` ships its checkpoints to a
    /// standby (and so may be taken over).
    pub fn ships(&self, name: &str) -> bool {
        self.shipping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    fn get(&self, name: &str) -> Option<Arc<Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

/// Where a standby daemon keeps its checkpoints: `STATE/standby`, or a new
/// private directory of an unpredictable name in the temporary directory
/// (created here, so nobody else's), mode 0700.
fn standby_dir(daemon: &Daemon) -> Result<PathBuf, String> {
    daemon
        .standbys
        .dir
        .get_or_init(|| {
            let dir = match &daemon.config.state_dir {
                Some(state) => {
                    let dir = state.join("standby");
                    shim_util::files::private_dir(&dir).map(|()| dir)
                }
                None => fresh_private_dir(&daemon.config.name),
            };
            dir.map_err(|e| format!("no directory for standby checkpoints: {e}"))
        })
        .clone()
}

/// A new directory `TMP/host-shim-standby-NAME-RANDOM` (0700), failing
/// rather than using anything that already stands there.
fn fresh_private_dir(name: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut r = [0u8; 8];
    getrandom::getrandom(&mut r).map_err(|e| std::io::Error::other(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!(
        "host-shim-standby-{name}-{:016x}",
        u64::from_le_bytes(r)
    ));
    std::fs::DirBuilder::new()
        .mode(shim_util::files::DIR_MODE)
        .create(&dir)?;
    shim_util::files::private_dir(&dir)?;
    Ok(dir)
}

/// How long one probe of the origin may take for a grace period of
/// `grace` (an origin that accepts and does not answer is down).
pub fn probe_timeout(grace: Duration) -> Duration {
    (grace / 2).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

/// How often the origin is probed for a grace period of `grace`.
pub fn probe_interval(grace: Duration) -> Duration {
    (grace / 8).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Registers a standby for an instance (replacing an older one of the
/// same name) and starts watching its origin.
pub(super) fn accept(daemon: &Arc<Daemon>, req: StandbyRequest) -> Result<StandbyInfo, ApiError> {
    let mut req = req;
    let name = req.run.name.clone();
    super::check_name(&name)?;
    // The origin names its own file; this daemon may keep the image by
    // hash (uploaded by `deploy --standby`).
    if let Ok(file) = daemon.image_file(&format!(
        "{}{}",
        super::images::HASH_PREFIX,
        req.image.sha256
    )) {
        req.run.image = file;
    }
    let here = vmm::machine::image_id(std::path::Path::new(&req.run.image)).map_err(|e| {
        ApiError(
            409,
            format!(
                "standby '{}' cannot read the image: {e}",
                daemon.config.name
            ),
        )
    })?;
    if here.sha256 != req.image.sha256 {
        return Err(ApiError(
            409,
            format!(
                "standby '{}' has another image at {} (the origin runs sha256 {})",
                daemon.config.name, req.run.image, req.image.sha256
            ),
        ));
    }
    let dir = standby_dir(daemon)
        .map(|d| d.join(&name))
        .and_then(|dir| {
            shim_util::files::private_dir(&dir)
                .map(|()| dir.clone())
                .map_err(|e| format!("{}: {e}", dir.display()))
        })
        .map_err(|e| ApiError(500, e))?;
    let entry = Arc::new(Entry {
        store: Mutex::new(Store {
            chain: Chain::default(),
            sink: DirSink::new(dir.clone()),
            bytes: 0,
            blobs: 0,
            has_full: false,
        }),
        dir,
        req,
        state: Mutex::new("waiting".into()),
        superseded: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    if let Some(old) = daemon
        .standbys
        .entries
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.clone(), Arc::clone(&entry))
    {
        old.superseded.store(true, Ordering::Relaxed);
    }
    tracing::info!(
        instance = %name,
        origin = %entry.req.origin,
        grace_ms = entry.req.grace_ms,
        "standing by"
    );
    let (d, e) = (Arc::clone(daemon), Arc::clone(&entry));
    thread::Builder::new()
        .name(format!("standby-{name}"))
        .spawn(move || watch(&d, &e))
        .map_err(|e| ApiError(500, e.to_string()))?;
    Ok(entry.info())
}

pub(super) fn list(daemon: &Daemon) -> Vec<StandbyInfo> {
    let entries = daemon
        .standbys
        .entries
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    entries.values().map(|e| e.info()).collect()
}

/// Stores one blob the origin shipped; answers once it is durable.
pub(super) fn receive(daemon: &Daemon, name: &str, body: &[u8]) -> Result<StandbyInfo, ApiError> {
    let entry = daemon.standbys.get(name).ok_or_else(|| {
        ApiError(
            404,
            format!("no standby for '{name}' here: register it first"),
        )
    })?;
    let (blob, len) = abi::checkpoint::decode_blob(body).map_err(|e| bad(e.to_string()))?;
    let mut store = entry.store.lock().unwrap_or_else(|e| e.into_inner());
    if entry.closed.load(Ordering::Acquire) {
        return Err(ApiError(
            409,
            format!(
                "'{name}' was taken over by {}: its checkpoints are no longer the origin's",
                daemon.config.name
            ),
        ));
    }
    let full = store.chain.accept(&blob).map_err(|e| ApiError(409, e))?;
    if let Err(e) = store.sink.store(&body[..len], full) {
        store.chain.reset();
        return Err(ApiError(500, e));
    }
    store.bytes = if full { 0 } else { store.bytes } + len as u64;
    store.blobs += 1;
    store.has_full = true;
    drop(store);
    Ok(entry.info())
}

impl Entry {
    fn set_state(&self, s: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s.into();
    }

    fn info(&self) -> StandbyInfo {
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        StandbyInfo {
            name: self.req.run.name.clone(),
            origin: self.req.origin.clone(),
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            file: self.dir.join(vmm::checkpoint::LATEST).display().to_string(),
            bytes: store.bytes,
            blobs: store.blobs,
        }
    }
}

/// What a probe of the origin found.
enum Probe {
    /// The instance runs there.
    Running,
    /// The origin answers, and the instance is not running (`state`).
    Gone(String),
    Unreachable,
}

fn probe(origin: &Client, name: &str) -> Probe {
    match origin.list() {
        Ok(list) => match list.into_iter().find(|i| i.name == name) {
            Some(i) if !i.state.is_live() => Probe::Gone(i.state.to_string()),
            Some(_) => Probe::Running,
            None => Probe::Gone("no longer there".into()),
        },
        Err(_) => Probe::Unreachable,
    }
}

/// Watches the origin until the instance ends there, or the origin dies
/// and the app is restarted here.
fn watch(daemon: &Arc<Daemon>, entry: &Arc<Entry>) {
    if let Some(link) = &daemon.config.fleet {
        if let Some(origin) = owner_in_store(link, &entry.req.run.name) {
            return watch_store(daemon, entry, link, &origin);
        }
    }
    let name = entry.req.run.name.clone();
    let grace = Duration::from_millis(entry.req.grace_ms);
    let origin = match daemon.peer_client(&entry.req.origin, None) {
        Ok(c) => c.with_timeout(probe_timeout(grace)),
        Err(why) => {
            tracing::warn!(instance = %name, error = %why, "standby cannot reach its origin");
            entry.set_state(format!("failed: {why}"));
            return;
        }
    };
    let started = Instant::now();
    let mut last_ok = started;
    let mut seen = false;
    loop {
        thread::sleep(probe_interval(grace));
        if entry.superseded.load(Ordering::Relaxed) {
            return;
        }
        match probe(&origin, &name) {
            Probe::Running => {
                if !seen {
                    entry.set_state("watching");
                }
                seen = true;
                last_ok = Instant::now();
            }
            Probe::Gone(state) if seen => {
                tracing::warn!(
                    instance = %name,
                    origin = %entry.req.origin,
                    state = %state,
                    "standby released: the origin no longer runs it"
                );
                entry.set_state(format!("released: {state} on the origin"));
                return;
            }
            // Never booted there (its boot failed after registering).
            Probe::Gone(state) if started.elapsed() > NEVER_STARTED => {
                entry.set_state(format!("released: {state} on the origin"));
                return;
            }
            // Not booted there yet.
            Probe::Gone(_) => last_ok = Instant::now(),
            Probe::Unreachable if last_ok.elapsed() < grace => {}
            Probe::Unreachable => break,
        }
    }
    let down = last_ok.elapsed();
    if !entry
        .store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .has_full
    {
        tracing::warn!(
            instance = %name,
            origin = %entry.req.origin,
            down_ms = down.as_millis() as u64,
            "origin unreachable, and no checkpoint arrived: cannot take over"
        );
        entry.set_state("failed: no checkpoint to restore from");
        return;
    }
    let file = entry.dir.join(vmm::checkpoint::LATEST);
    let start = Instant::now();
    let result = restart_here(daemon, entry, false);
    match result {
        Ok(info) => {
            tracing::warn!(
                instance = %name,
                origin = %entry.req.origin,
                down_ms = down.as_millis() as u64,
                path = %file.display(),
                restart_ms = start.elapsed().as_millis() as u64,
                publish = ?info.publish,
                "origin unreachable: restarted here from its checkpoint"
            );
            entry.set_state("took over");
        }
        Err(ApiError(_, e)) => entry.set_state(format!("failed: {e}")),
    }
}

/// The registered host that owns app `name` in the fleet store (the
/// origin: `deploy` records the owner before it runs the app), if there is
/// one: then the store decides the takeover. An app the store does not
/// know (run with `--shim`), or whose host does not register itself, is
/// watched by probing. Asked a few times if the store does not answer.
fn owner_in_store(link: &crate::fence::FleetLink, name: &str) -> Option<String> {
    for attempt in 0..3 {
        if attempt > 0 {
            thread::sleep(TAKEOVER_RETRY);
        }
        let owner = link.fleet.app(name).and_then(|app| match app {
            Some(app) => Ok(link
                .fleet
                .host(&app.value.host)?
                .filter(|h| h.value.registered)
                .map(|h| h.value.name)),
            None => Ok(None),
        });
        match owner {
            Ok(owner) => return owner,
            Err(e) => tracing::warn!(instance = %name, error = %e, "cannot read the app's owner"),
        }
    }
    None
}

/// Watches app `entry` of host `origin` through the fleet store: its owner
/// record and `origin`'s lease; takes it over once that lease lapsed.
fn watch_store(
    daemon: &Arc<Daemon>,
    entry: &Arc<Entry>,
    link: &crate::fence::FleetLink,
    origin: &str,
) {
    use fleet::events::{Event, Kind};
    let name = entry.req.run.name.clone();
    let me = daemon.config.name.clone();
    let fleet = &link.fleet;
    let interval = probe_interval(link.lease.ttl());
    let started = Instant::now();
    let mut seen = false;
    let mut round = 0u32;
    let taken = loop {
        thread::sleep(interval);
        if entry.superseded.load(Ordering::Relaxed) {
            return;
        }
        round = round.wrapping_add(1);
        let lapsed = match origin_lapsed(daemon, origin, interval / 2) {
            Ok(lapsed) => lapsed,
            // The store cannot say: no decision.
            Err(e) => {
                tracing::debug!(instance = %name, error = %e, "cannot read the origin's lease");
                continue;
            }
        };
        // The owner record matters at once only for a takeover; that it
        // moved (releasing this standby) can wait a few rounds.
        if seen && !lapsed && !round.is_multiple_of(OWNER_EVERY) {
            continue;
        }
        let app = match fleet.app(&name) {
            Ok(app) => app,
            // The store cannot say: no decision.
            Err(e) => {
                tracing::debug!(instance = %name, error = %e, "cannot read the app's owner");
                continue;
            }
        };
        match app {
            Some(a) if a.value.host == origin => {}
            Some(a) => {
                entry.set_state(format!("released: owned by {} now", a.value.host));
                return;
            }
            None if seen || started.elapsed() > NEVER_STARTED => {
                entry.set_state("released: no longer in the fleet");
                return;
            }
            None => continue,
        }
        if !seen {
            entry.set_state("watching");
            seen = true;
        }
        if !lapsed {
            continue;
        }
        let has_full = entry
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .has_full;
        if !has_full {
            tracing::warn!(
                instance = %name,
                origin = %origin,
                "the origin's lease lapsed, and no checkpoint arrived: cannot take over"
            );
            entry.set_state("failed: no checkpoint to restore from");
            return;
        }
        // Hold the checkpoints still while the ownership changes: nothing
        // the origin ships from now on is taken.
        let store = entry.store.lock().unwrap_or_else(|e| e.into_inner());
        match fleet::ops::take_over(fleet, &name, origin, &me) {
            Ok(app) => {
                entry.closed.store(true, Ordering::Release);
                drop(store);
                break app;
            }
            Err(fleet::FleetError::Conflict(why) | fleet::FleetError::NotFound(why)) => {
                tracing::info!(instance = %name, reason = %why, "not taking over");
                entry.set_state(format!("released: {why}"));
                return;
            }
            // The store failed: try again next time.
            Err(e) => tracing::warn!(instance = %name, error = %e, "cannot take the app over"),
        }
    };
    let file = entry.dir.join(vmm::checkpoint::LATEST);
    let bytes = std::fs::metadata(&file).map_or(0, |m| m.len());
    let start = Instant::now();
    match restart_here(daemon, entry, true) {
        Ok(info) => {
            let ms = start.elapsed().as_secs_f64() * 1e3;
            tracing::warn!(
                instance = %name,
                origin = %origin,
                path = %file.display(),
                restart_ms = ms as u64,
                "took over (the origin's lease lapsed): restarted here from its checkpoint"
            );
            entry.set_state("took over");
            fleet.note(Event::new(
                Kind::Takeover,
                Some(&name),
                &[origin, &me],
                serde_json::json!({
                    "reason": format!("{origin}'s lease lapsed"),
                    "image": taken.image,
                    "checkpoint_bytes": bytes,
                    "ip": info.ip,
                    "ms": ms,
                }),
            ));
        }
        Err(ApiError(_, e)) => {
            entry.set_state(format!("failed: {e}"));
            fleet.note(Event::new(
                Kind::TakeoverFailed,
                Some(&name),
                &[origin, &me],
                serde_json::json!({ "error": e }),
            ));
        }
    }
}

/// Whether host `origin`'s lease lapsed, as the store said at most
/// `fresh` ago: the standbys of one origin's apps share one look (a host
/// standing by for a thousand apps does not read its lease a thousand
/// times a round). The takeover itself looks again.
fn origin_lapsed(
    daemon: &Daemon,
    origin: &str,
    fresh: Duration,
) -> Result<bool, fleet::FleetError> {
    let Some(link) = &daemon.config.fleet else {
        return Ok(false);
    };
    let cache = || {
        daemon
            .standbys
            .lapsed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    };
    if let Some((at, lapsed)) = cache().get(origin) {
        if at.elapsed() < fresh {
            return Ok(*lapsed);
        }
    }
    let lapsed = link.fleet.lapsed(origin)?;
    // One entry per origin host of a watched app.
    cache().insert(origin.to_owned(), (Instant::now(), lapsed));
    Ok(lapsed)
}

/// Runs the app of `entry` here from its latest checkpoint, retrying a
/// few times (e.g. while the dead origin's ports are being released).
/// `recorded`: as a deployed app of this daemon (it comes back with its
/// restart, and checkpoints into its own directory).
fn restart_here(
    daemon: &Daemon,
    entry: &Entry,
    recorded: bool,
) -> Result<api::InstanceInfo, ApiError> {
    let name = &entry.req.run.name;
    let file = entry.dir.join(vmm::checkpoint::LATEST);
    let run = RunRequest {
        restore: Some(file.display().to_string()),
        checkpoint_to: (!recorded).then(|| entry.dir.display().to_string()),
        standby: None,
        standby_grace_ms: None,
        ip: None,
        restart: match (recorded, &daemon.persist) {
            (true, Some(_)) => entry.req.run.restart,
            _ => api::Restart::Never,
        },
        ..entry.req.run.clone()
    };
    let mut result = Err(ApiError(500, "not tried".into()));
    for attempt in 0..TAKEOVER_ATTEMPTS {
        if attempt > 0 {
            thread::sleep(TAKEOVER_RETRY);
        }
        let _one_at_a_time = daemon
            .standbys
            .takeover
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        result = if recorded {
            daemon.run_recorded(run.clone())
        } else {
            daemon.run(run.clone())
        };
        match &result {
            Ok(_) => break,
            Err(ApiError(_, e)) => {
                tracing::warn!(
                    instance = %name,
                    origin = %entry.req.origin,
                    attempt = attempt + 1,
                    attempts = TAKEOVER_ATTEMPTS,
                    error = %e,
                    "taking over failed"
                )
            }
        }
    }
    result
}

/// Ships a running instance's checkpoints to its standby: hands each blob
/// to a shipper thread (only when it is idle: none waits) and waits for the standby's
/// answer at most [`SHIP_DEADLINE`].
pub struct PeerSink {
    addr: String,
    /// Room for one blob: the shipper takes it out before it ships it.
    jobs: SyncSender<Shipment>,
    /// A blob is being shipped: set when one is handed over, cleared by the
    /// shipper *before* it answers, so the next checkpoint (taken once the
    /// answer arrives) never finds it busy; still set after an answer that
    /// came too late (the shipper is stuck with it).
    in_flight: Arc<AtomicBool>,
}

/// A blob for the shipper, and where its outcome goes.
struct Shipment {
    blob: Vec<u8>,
    done: SyncSender<Result<(), String>>,
}

impl PeerSink {
    /// Starts the shipper thread of instance `name`, posting its blobs to
    /// `peer` (whose calls time out).
    fn start(name: &str, peer: Client) -> Result<Self, String> {
        let (jobs, queue) = mpsc::sync_channel::<Shipment>(1);
        let in_flight = Arc::new(AtomicBool::new(false));
        let shipping = Arc::clone(&in_flight);
        let addr = peer.addr.clone();
        let name = name.to_owned();
        thread::Builder::new()
            .name(format!("ship-{name}"))
            .spawn(move || {
                // Ends when the instance's sink is dropped.
                for job in queue {
                    let r = peer
                        .standby_checkpoint(&name, &job.blob)
                        .map_err(|e| format!("standby {}: {e}", peer.addr));
                    shipping.store(false, Ordering::Release);
                    let _ = job.done.try_send(r);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            addr,
            jobs,
            in_flight,
        })
    }
}

impl Sink for PeerSink {
    fn store(&mut self, blob: &[u8], _full: bool) -> Result<(), String> {
        if blob.len() > MAX_BLOB {
            return Err(format!(
                "a checkpoint of {} bytes is more than the standby takes ({MAX_BLOB})",
                blob.len()
            ));
        }
        let (done, outcome) = mpsc::sync_channel(1);
        if self.in_flight.swap(true, Ordering::AcqRel) {
            return Err(format!(
                "standby {} is still busy with an earlier checkpoint: not stored there",
                self.addr
            ));
        }
        let job = Shipment {
            blob: blob.to_vec(),
            done,
        };
        // Not in flight, so the shipper took the last blob out: room.
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.in_flight.store(false, Ordering::Release);
                return Err(format!(
                    "standby {} is still busy with an earlier checkpoint: not stored there",
                    self.addr
                ));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(format!("the shipper to standby {} is gone", self.addr))
            }
        }
        match outcome.recv_timeout(SHIP_DEADLINE) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "standby {} did not store the checkpoint within {:.0} s",
                self.addr,
                SHIP_DEADLINE.as_secs_f64()
            )),
            Err(RecvTimeoutError::Disconnected) => {
                Err(format!("the shipper to standby {} is gone", self.addr))
            }
        }
    }
}

/// Registers the instance `req` is about to boot with its standby
/// `req.standby`; returns the sink its checkpoints go to.
pub fn register(daemon: &Daemon, req: &RunRequest) -> Result<Option<PeerSink>, ApiError> {
    let mut shipping = daemon
        .standbys
        .shipping
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    shipping.remove(&req.name);
    let Some(peer) = &req.standby else {
        return Ok(None);
    };
    // Bounded by the daemon's instances: one name each.
    shipping.insert(req.name.clone());
    drop(shipping);
    let image =
        vmm::machine::image_id(std::path::Path::new(&req.image)).map_err(|e| bad(e.to_string()))?;
    let body = StandbyRequest {
        origin: daemon.config.listen.to_string(),
        run: RunRequest {
            restore: None,
            standby: None,
            ..req.clone()
        },
        image,
        grace_ms: req
            .standby_grace_ms
            .unwrap_or(DEFAULT_GRACE.as_millis() as u64),
    };
    let peer = daemon
        .peer_client(peer, None)
        .map_err(|why| ApiError(409, format!("standby {peer}: {why}")))?
        .with_timeout(SHIP_DEADLINE);
    peer.standby::<_, StandbyInfo>(&body)
        .map_err(|e| ApiError(409, format!("standby {}: {e}", peer.addr)))?;
    PeerSink::start(&req.name, peer)
        .map(Some)
        .map_err(|e| ApiError(500, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_a_fraction_of_the_grace_period() {
        assert_eq!(
            probe_interval(Duration::from_secs(2)),
            Duration::from_millis(250)
        );
        assert_eq!(
            probe_interval(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
        assert_eq!(
            probe_interval(Duration::from_secs(60)),
            Duration::from_secs(1)
        );
    }
}
