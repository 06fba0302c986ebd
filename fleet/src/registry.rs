//! Hosts that register themselves in the fleet store: [`register`] (what
//! `host-shim serve --store etcd://...` calls) and the fleet's view of
//! which hosts are alive ([`Fleet::alive`]).
//!
//! A registered host has two keys:
//!
//! - `hosts/NAME`: its [`Host`] record (URL, region, fingerprint, overlay
//!   address, capacity), kept after it goes away so that `fleet ls` can say
//!   it is down; written by compare-and-swap, keeping the token a user
//!   recorded with `fleet add`;
//! - `alive/NAME`: an [`Alive`] record written under a lease that the
//!   [`Registration`]'s thread keeps alive. When the daemon dies (or loses
//!   the store for longer than the lease's TTL) the key vanishes and the
//!   host shows as down. Only one daemon at a time holds a name's key.
//!
//! Every registered daemon also looks, once per TTL, for registered hosts
//! without a live lease, and the first to see one records its
//! [`Kind::HostDown`] event (a killed host cannot say it went down).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::events::{Event, Kind};
use super::store::{Expect, FleetStore, LeaseId, StoreError};
use super::{Fleet, FleetError, Host};

/// The prefix of the liveness keys.
pub const ALIVE: &str = "alive/";

/// The prefix of the markers of hosts noted down (one event per going down).
pub const DOWN: &str = "down/";

/// The default time to live of a host's lease (`serve --lease-ttl`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// The shortest and longest lease TTL accepted.
pub const MIN_TTL: Duration = Duration::from_secs(2);
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// Most compare-and-swap attempts on a host record before giving up.
const CAS_ATTEMPTS: usize = 8;

/// What a live host's `alive/NAME` key holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alive {
    /// The etcd lease the key lives under.
    pub lease: i64,
    /// When this daemon registered (Unix seconds).
    pub since: u64,
    /// The daemon's process ID on its machine.
    pub pid: u32,
}

/// A host's registration, kept alive by a thread until dropped (which
/// revokes the lease: the host shows as down at once).
pub struct Registration {
    name: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Registration {
    /// The registered host's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            // Bounded: the thread's store calls all have deadlines.
            let _ = t.join();
        }
    }
}

/// How often a lease of `ttl` is renewed: three times per TTL, at most
/// every 5 s (so a renewal that fails can be retried before it lapses).
pub fn keep_alive_interval(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// What a registered daemon knows of its own lease, for fencing: a host
/// may act as the owner of its apps only while its lease surely holds.
/// The lease's TTL runs from when etcd renewed it, which is after the
/// renewal was sent: counting from the sending errs on the safe side.
#[derive(Debug)]
pub struct LeaseWatch {
    ttl: Duration,
    /// When the last successful grant or renewal was sent; `None`: no
    /// lease held (not registered yet, or deregistered).
    renewed: Mutex<Option<Instant>>,
    /// How many times the host (re)registered.
    registrations: AtomicU64,
}

impl LeaseWatch {
    /// A watch for leases of `ttl`, none held yet.
    pub fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            ttl,
            renewed: Mutex::new(None),
            registrations: AtomicU64::new(0),
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long this host may still act as an owner: the lease lapses at
    /// the earliest a TTL after the last renewal was sent, and the host
    /// stops a quarter TTL before that (`None`: it must stop now, or holds
    /// no lease).
    pub fn valid_for(&self) -> Option<Duration> {
        let renewed = (*self.renewed.lock().unwrap_or_else(|e| e.into_inner()))?;
        (self.ttl * 3 / 4).checked_sub(renewed.elapsed())
    }

    /// Whether the host ever held a lease (registered at least once).
    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Acquire)
    }

    fn renewed(&self, sent: Instant) {
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = Some(sent);
    }

    fn registered(&self, sent: Instant) {
        self.renewed(sent);
        self.registrations.fetch_add(1, Ordering::AcqRel);
    }

    fn lost(&self) {
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Registers `host` in `store` under a lease of `ttl` and keeps it alive
/// until the returned guard is dropped. The `host.registered` flag is set.
/// If another daemon holds the name, waits up to `ttl` for its lease to
/// lapse (a killed daemon restarting), then fails.
pub fn register(
    store: Box<dyn FleetStore>,
    host: Host,
    ttl: Duration,
) -> Result<Registration, FleetError> {
    register_watched(store, host, ttl, LeaseWatch::new(ttl))
}

/// [`register`], telling `watch` whenever the lease is granted, renewed
/// or lost (the daemon fences its guests by it).
pub fn register_watched(
    store: Box<dyn FleetStore>,
    mut host: Host,
    ttl: Duration,
    watch: Arc<LeaseWatch>,
) -> Result<Registration, FleetError> {
    if host.name.is_empty() || host.name.contains(['/', ' ']) {
        return Err(FleetError::Failed(format!(
            "'{}' is not a host name (non-empty, no '/' or spaces)",
            host.name
        )));
    }
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(FleetError::Failed(format!(
            "a lease TTL of {ttl:?} is out of range ({MIN_TTL:?} to {MAX_TTL:?})"
        )));
    }
    host.registered = true;
    let fleet = Fleet::new(store);
    let sent = Instant::now();
    let lease = fleet.store.grant_lease(ttl)?;
    let deadline = Instant::now() + ttl + Duration::from_secs(1);
    loop {
        match claim(&fleet, &host, lease) {
            Ok(()) => break,
            Err(Claim::Taken) if Instant::now() < deadline => {
                tracing::info!(host = %host.name, "the name is held by another lease; waiting for it to lapse");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                let _ = fleet.store.revoke_lease(lease);
                return Err(e.into_error(&host.name));
            }
        }
    }
    tracing::info!(host = %host.name, lease = lease.0, ?ttl, "registered in the fleet store");
    watch.registered(sent);
    fleet.note(up(&host));
    let (stop, stopped) = mpsc::channel();
    let name = host.name.clone();
    let thread = std::thread::Builder::new()
        .name(format!("lease-{name}"))
        .spawn(move || keep(&fleet, &host, lease, &watch, stopped))
        .map_err(|e| FleetError::Failed(format!("cannot start the lease thread: {e}")))?;
    Ok(Registration {
        name,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Why a claim of a host's keys failed.
enum Claim {
    /// Another live daemon holds the name.
    Taken,
    Store(FleetError),
}

impl From<StoreError> for Claim {
    fn from(e: StoreError) -> Self {
        Claim::Store(e.into())
    }
}

impl From<FleetError> for Claim {
    fn from(e: FleetError) -> Self {
        Claim::Store(e)
    }
}

impl Claim {
    fn into_error(self, name: &str) -> FleetError {
        match self {
            Claim::Taken => FleetError::Failed(format!(
                "host {name} is registered and alive already (another daemon with this \
                 name?): pick another --name or stop that daemon"
            )),
            Claim::Store(e) => e,
        }
    }
}

/// Writes the liveness key under `lease` (if no other lease holds it),
/// then the host record by compare-and-swap, keeping its token.
fn claim(fleet: &Fleet, host: &Host, lease: LeaseId) -> Result<(), Claim> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let alive = Alive {
        lease: lease.0,
        since,
        pid: std::process::id(),
    };
    let value = serde_json::to_value(&alive).expect("serializable");
    let key = format!("{ALIVE}{}", host.name);
    match fleet.store.put_leased(&key, value, Expect::Absent, lease) {
        Err(StoreError::Conflict { .. }) => return Err(Claim::Taken),
        other => other?,
    };
    for _ in 0..CAS_ATTEMPTS {
        let old = fleet.host(&host.name)?;
        let mut record = host.clone();
        let expect = match &old {
            Some(v) => {
                record.token = v.value.token.clone();
                if v.value == record {
                    fleet
                        .store
                        .delete(&format!("{DOWN}{}", host.name), Expect::Any)?;
                    return Ok(());
                }
                Expect::Version(v.version)
            }
            None => Expect::Absent,
        };
        match fleet.put_host(&record, expect) {
            Err(FleetError::Store(StoreError::Conflict { .. })) => continue,
            Err(e) => return Err(Claim::Store(e)),
            Ok(_) => {
                // Up again: its next going down is news.
                fleet
                    .store
                    .delete(&format!("{DOWN}{}", host.name), Expect::Any)?;
                return Ok(());
            }
        }
    }
    Err(Claim::Store(FleetError::Failed(format!(
        "the fleet record of host {} keeps changing: cannot register it",
        host.name
    ))))
}

/// The lease thread: renews the lease every [`keep_alive_interval`]; if
/// the lease lapsed anyway (the store was out of reach for longer than its
/// TTL), takes a new one and claims the host's keys again. Revokes the
/// lease when told to stop.
fn keep(
    fleet: &Fleet,
    host: &Host,
    mut lease: LeaseId,
    watch: &LeaseWatch,
    stop: mpsc::Receiver<()>,
) {
    let ttl = watch.ttl();
    let interval = keep_alive_interval(ttl);
    let mut lapsed = false;
    let mut swept = Instant::now();
    // Until told to stop (a message, or the guard gone).
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
        if !lapsed && swept.elapsed() >= ttl {
            swept = Instant::now();
            if let Err(e) = sweep(fleet, &host.name) {
                tracing::warn!(host = %host.name, error = %e, "cannot look for hosts that went down");
            }
        }
        if lapsed {
            let sent = Instant::now();
            match fleet.store.grant_lease(ttl) {
                Ok(new) => match claim(fleet, host, new) {
                    Ok(()) => {
                        tracing::info!(host = %host.name, lease = new.0, "registered again");
                        watch.registered(sent);
                        fleet.note(up(host));
                        lease = new;
                        lapsed = false;
                    }
                    Err(e) => {
                        let _ = fleet.store.revoke_lease(new);
                        let e = e.into_error(&host.name);
                        tracing::warn!(host = %host.name, error = %e, "cannot register again");
                    }
                },
                Err(e) => tracing::warn!(host = %host.name, error = %e, "cannot take a new lease"),
            }
            continue;
        }
        let sent = Instant::now();
        match fleet.store.keep_alive(lease) {
            Ok(()) => watch.renewed(sent),
            Err(StoreError::LeaseExpired(_)) => {
                tracing::warn!(host = %host.name, lease = lease.0, "the host's lease lapsed; registering again");
                watch.lost();
                lapsed = true;
            }
            Err(e) => {
                tracing::warn!(host = %host.name, error = %e, "cannot renew the host's lease")
            }
        }
    }
    watch.lost();
    if !lapsed {
        match fleet.store.revoke_lease(lease) {
            Ok(()) => {
                if let Err(e) = went_down(fleet, &host.name, "deregistered", &host.name) {
                    tracing::warn!(host = %host.name, error = %e, "cannot record going down");
                }
            }
            Err(e) => {
                tracing::warn!(host = %host.name, error = %e, "cannot revoke the host's lease")
            }
        }
    }
}

/// Notes every registered host whose lease lapsed as down, once: the
/// first live host to see it writes `down/NAME` (compare-and-swap on an
/// absent key, removed when the host registers again) and records the
/// [`Kind::HostDown`] event; the others find the key and stay quiet.
fn sweep(fleet: &Fleet, me: &str) -> Result<(), FleetError> {
    let alive = fleet.alive()?;
    for h in fleet.hosts()? {
        if h.registered && !alive.contains(&h.name) {
            went_down(fleet, &h.name, "its lease lapsed", me)?;
        }
    }
    Ok(())
}

/// Records that `name` went down (`reason`, seen by host `by`) unless
/// someone did since it last registered.
fn went_down(fleet: &Fleet, name: &str, reason: &str, by: &str) -> Result<(), FleetError> {
    let marker = serde_json::json!({ "by": by });
    match fleet
        .store
        .put(&format!("{DOWN}{name}"), marker, Expect::Absent)
    {
        Ok(_) => {
            fleet.note(Event::new(
                Kind::HostDown,
                None,
                &[name],
                serde_json::json!({ "reason": reason, "noticed_by": by }),
            ));
            Ok(())
        }
        Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The event of `host` registering.
fn up(host: &Host) -> Event {
    Event::new(
        Kind::HostUp,
        None,
        &[&host.name],
        serde_json::json!({ "url": host.url, "region": host.region }),
    )
}

impl Fleet {
    /// Whether host `name` registered itself and its lease lapsed (it is
    /// down: its apps may be taken over).
    pub fn lapsed(&self, name: &str) -> Result<bool, FleetError> {
        let registered = self.host(name)?.is_some_and(|h| h.value.registered);
        Ok(registered && self.store.get(&format!("{ALIVE}{name}"))?.is_none())
    }

    /// The names of the hosts whose lease is alive.
    pub fn alive(&self) -> Result<BTreeSet<String>, FleetError> {
        Ok(self
            .store
            .list(ALIVE)?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(ALIVE).map(str::to_owned))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_trusted_for_three_quarters_of_its_ttl_from_the_renewal_sent() {
        let ttl = Duration::from_secs(4);
        let w = LeaseWatch::new(ttl);
        assert_eq!(w.valid_for(), None, "no lease yet");
        assert_eq!(w.registrations(), 0);
        w.registered(Instant::now());
        let left = w.valid_for().unwrap();
        assert!(left <= Duration::from_secs(3) && left > Duration::from_millis(2900));
        assert_eq!(w.registrations(), 1);
        // A renewal sent 3.5 s ago leaves nothing: stop now.
        w.renewed(Instant::now() - Duration::from_millis(3500));
        assert_eq!(w.valid_for(), None);
        w.renewed(Instant::now() - Duration::from_secs(1));
        assert!(w.valid_for().unwrap() <= Duration::from_secs(2));
        w.lost();
        assert_eq!(w.valid_for(), None);
        assert_eq!(w.registrations(), 1);
    }
}
