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
//!
//! # Address blocks
//!
//! The fleet's guests share one network ([`fleet_network`]: the key
//! `network`, written once by the first host, default
//! [`DEFAULT_FLEET_NET`]), cut into blocks of 1,024 addresses. Each host
//! owns blocks by compare-and-swap on `blocks/NNNNN` (absent → its name;
//! [`claim_block`]): a host that registers again gets its block back, and
//! block 0 (the network's own address) is never handed out. Blocks are
//! not given back when a host goes away: guests that moved elsewhere keep
//! their addresses, and the host finds its block again when it returns.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
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

/// The key of the fleet's guest network.
pub const NETWORK: &str = "network";

/// The prefix of the address blocks' keys.
pub const BLOCKS: &str = "blocks/";

/// The fleet's guest network when the first host does not name one.
pub const DEFAULT_FLEET_NET: &str = "10.64.0.0/10";

/// What the `network` key holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Network {
    /// The network, `A.B.C.D/PREFIX`.
    pub cidr: String,
}

/// What a `blocks/NNNNN` key holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Block {
    /// The host that owns the block.
    pub host: String,
    /// When it claimed it (Unix seconds).
    pub since: u64,
}

/// The fleet's guest network as recorded in `store`; if none is, `wanted`
/// (else [`DEFAULT_FLEET_NET`]) is recorded now, by compare-and-swap (of
/// two first hosts, one records it and both use it). A `wanted` network
/// other than the recorded one is an error: the fleet has one network.
pub fn fleet_network(store: &dyn FleetStore, wanted: Option<&str>) -> Result<String, FleetError> {
    for _ in 0..CAS_ATTEMPTS {
        if let Some(v) = store.get(NETWORK)? {
            let recorded: Network = serde_json::from_value(v.value).map_err(|e| {
                FleetError::Failed(format!(
                    "the fleet store's '{NETWORK}' record is not a network: {e}"
                ))
            })?;
            return match wanted {
                Some(w) if w != recorded.cidr => Err(FleetError::Failed(format!(
                    "the fleet's guest network is {} (recorded in the store): --fleet-net {w} \
                     differs (leave it out, or give {})",
                    recorded.cidr, recorded.cidr
                ))),
                _ => Ok(recorded.cidr),
            };
        }
        let cidr = wanted.unwrap_or(DEFAULT_FLEET_NET).to_owned();
        let value = serde_json::to_value(Network { cidr: cidr.clone() }).expect("serializable");
        match store.put(NETWORK, value, Expect::Absent) {
            Ok(_) => {
                tracing::info!(%cidr, "recorded the fleet's guest network");
                return Ok(cidr);
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(FleetError::Failed(format!(
        "the fleet store's '{NETWORK}' record keeps changing"
    )))
}

/// The key of block `index`.
fn block_key(index: u32) -> String {
    format!("{BLOCKS}{index:05}")
}

/// A host's address block: its index, and whether the host owned it
/// already (it registers again: guests that moved away from it may still
/// hold addresses of it, see [`addresses_held_elsewhere`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub index: u32,
    pub again: bool,
}

/// Host `host`'s address block of the fleet network `net` (which has
/// `blocks` blocks): the lowest-numbered one it owns already, else the
/// lowest free one of `1..blocks`, claimed by compare-and-swap on its
/// absent key. A network whose blocks all belong to hosts is an error
/// saying so.
pub fn claim_block(
    store: &dyn FleetStore,
    host: &str,
    net: &str,
    blocks: u32,
) -> Result<Claimed, FleetError> {
    check_name(host)?;
    let mut taken = BTreeSet::new();
    let mut owners = BTreeSet::new();
    for (key, v) in store.list(BLOCKS)? {
        let Some(index) = key.strip_prefix(BLOCKS).and_then(|i| i.parse::<u32>().ok()) else {
            continue;
        };
        taken.insert(index);
        match serde_json::from_value::<Block>(v.value) {
            Ok(b) if b.host == host => return Ok(Claimed { index, again: true }),
            Ok(b) => {
                owners.insert(b.host);
            }
            Err(e) => tracing::warn!(%key, error = %e, "skipping an address block record"),
        }
    }
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let value = serde_json::to_value(Block {
        host: host.to_owned(),
        since,
    })
    .expect("serializable");
    let mut index = 1;
    while index < blocks {
        if taken.contains(&index) {
            index += 1;
            continue;
        }
        match store.put(&block_key(index), value.clone(), Expect::Absent) {
            Ok(_) => {
                tracing::info!(host, index, %net, "claimed an address block");
                return Ok(Claimed {
                    index,
                    again: false,
                });
            }
            // Another host took it meanwhile (or a record we could not
            // read holds it): the next one.
            Err(StoreError::Conflict { .. }) => {
                taken.insert(index);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(FleetError::Failed(format!(
        "the fleet network {net} is full: its {} blocks of 1,024 guest addresses belong to \
         {} other hosts (blocks are kept for hosts that went away; a new fleet needs a larger \
         --fleet-net)",
        blocks.saturating_sub(1),
        owners.len()
    )))
}

/// How long a host has to list its instances for [`addresses_held_elsewhere`].
const LIST_DEADLINE: Duration = Duration::from_secs(5);

/// Hosts asked at once by [`addresses_held_elsewhere`].
const LIST_PARALLEL: usize = 16;

/// The guest addresses in `first..=last` that instances on the other live
/// hosts of `store` hold, as their daemons list them (`GET
/// /v1/instances`, with the token the store records for the host, if
/// any). A host that does not answer within [`LIST_DEADLINE`] (or refuses)
/// is skipped with a warning.
pub fn addresses_held_elsewhere(
    store: &dyn FleetStore,
    me: &str,
    (first, last): (Ipv4Addr, Ipv4Addr),
) -> Result<BTreeSet<Ipv4Addr>, FleetError> {
    let alive: BTreeSet<String> = store
        .list(ALIVE)?
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix(ALIVE).map(str::to_owned))
        .collect();
    let hosts: Vec<Host> = store
        .list("hosts/")?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_value::<Host>(v.value).ok())
        .filter(|h| h.name != me && alive.contains(&h.name))
        .collect();
    let mut held = BTreeSet::new();
    for batch in hosts.chunks(LIST_PARALLEL) {
        std::thread::scope(|scope| {
            let asked: Vec<_> = batch
                .iter()
                .map(|h| {
                    scope.spawn(move || {
                        let listed = super::client_for(h)
                            .and_then(|c| Ok(c.with_timeout(LIST_DEADLINE).list()?));
                        (h, listed)
                    })
                })
                .collect();
            for a in asked {
                match a.join() {
                    Ok((_, Ok(instances))) => held.extend(
                        instances
                            .iter()
                            .filter_map(|i| i.ip.map(|a| a.ip))
                            .filter(|ip: &Ipv4Addr| (first..=last).contains(ip)),
                    ),
                    Ok((h, Err(e))) => tracing::warn!(
                        host = %h.name, error = %e,
                        "cannot list its instances: addresses of this block its guests hold may be handed out again"
                    ),
                    Err(_) => {}
                }
            }
        });
    }
    Ok(held)
}

/// Checks a host name (non-empty, no '/' or spaces: it is part of keys).
fn check_name(name: &str) -> Result<(), FleetError> {
    if name.is_empty() || name.contains(['/', ' ']) {
        return Err(FleetError::Failed(format!(
            "'{name}' is not a host name (non-empty, no '/' or spaces)"
        )));
    }
    Ok(())
}

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
    check_name(&host.name)?;
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
                // Ours has the same TTL as the one waited for: keep it
                // alive meanwhile, or it lapses just as that one does.
                if let Err(e) = fleet.store.keep_alive(lease) {
                    let _ = fleet.store.revoke_lease(lease);
                    return Err(e.into());
                }
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
    use crate::store::temp_store;

    #[test]
    fn the_network_is_recorded_once_and_a_different_one_is_refused() {
        let (s, dir) = temp_store("net");
        assert_eq!(fleet_network(&s, None).unwrap(), DEFAULT_FLEET_NET);
        assert_eq!(
            fleet_network(&s, Some(DEFAULT_FLEET_NET)).unwrap(),
            DEFAULT_FLEET_NET
        );
        let err = fleet_network(&s, Some("10.0.0.0/16"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("10.64.0.0/10 (recorded in the store)"),
            "{err}"
        );
        let (s2, dir2) = temp_store("net2");
        assert_eq!(
            fleet_network(&s2, Some("192.168.0.0/20")).unwrap(),
            "192.168.0.0/20"
        );
        assert_eq!(fleet_network(&s2, None).unwrap(), "192.168.0.0/20");
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(dir2);
    }

    #[test]
    fn hosts_get_their_own_block_back_and_a_full_network_says_so() {
        let (s, dir) = temp_store("blocks");
        let net = "192.168.0.0/20";
        // 4 blocks: block 0 is never handed out.
        let claim = |host: &str| claim_block(&s, host, net, 4).map(|c| (c.index, c.again));
        assert_eq!(claim("a").unwrap(), (1, false));
        assert_eq!(claim("b").unwrap(), (2, false));
        assert_eq!(claim("a").unwrap(), (1, true), "a's block again");
        // A record that is not a block still holds its key.
        s.put(&block_key(3), serde_json::json!("junk"), Expect::Absent)
            .unwrap();
        let err = claim_block(&s, "c", net, 4).unwrap_err().to_string();
        assert!(
            err.contains("the fleet network 192.168.0.0/20 is full: its 3 blocks"),
            "{err}"
        );
        assert_eq!(claim("b").unwrap(), (2, true));
        assert!(claim("no/name").is_err());
        // Many hosts at once: each gets its own block.
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    claim_block(&s, &format!("h{i}"), "10.64.0.0/10", 4096)
                        .unwrap()
                        .index
                })
            })
            .collect();
        let got: BTreeSet<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            got,
            (4..10).collect(),
            "distinct blocks after a, b and the junk one"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

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
