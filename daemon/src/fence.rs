//! Fencing: a daemon registered in an etcd fleet store runs an app only
//! while it owns it (the app's record `apps/NAME` names this host) and
//! holds its lease.
//!
//! - Coming back after a restart, it checks each recorded instance's
//!   owner before booting it again ([`FleetLink::may_resume`], a
//!   compare-and-swap through `fleet::ops::reclaim`): an app another host
//!   took over meanwhile is not booted, its record is forgotten and a
//!   `fenced` event recorded.
//! - Running, it pauses every guest that ships its checkpoints to a
//!   standby a quarter TTL before its lease could lapse when the lease was
//!   not renewed (`watch`): a standby takes an app over only once the
//!   lease lapsed, so the paused copy never runs beside the new one. (A
//!   guest without a standby cannot be taken over: it runs on. An outage
//!   of the whole store pauses the guests with standbys until it is back.) Once the lease holds again, each paused guest is
//!   resumed if this host still owns it, else stopped (a `fenced` event).
//!
//! The store being unreachable never resumes anything: a paused guest
//! stays paused until the store says it is ours.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use fleet::events::{Event, Kind};
use fleet::ops::{reclaim, Ownership};
use fleet::registry::LeaseWatch;
use fleet::Fleet;
use vmm::machine::Machine;

use crate::instance::State;
use crate::Daemon;

/// The daemon's view of the fleet store it registered in.
#[derive(Clone, Debug)]
pub struct FleetLink {
    pub fleet: Arc<Fleet>,
    /// The daemon's lease, kept by its registration.
    pub lease: Arc<LeaseWatch>,
}

/// Whether a recorded instance may run again here, as the store says.
#[derive(Debug)]
pub enum Verdict {
    /// This host owns it (or the store does not know it: not a fleet app).
    Run,
    /// Another host owns it now.
    Fenced(String),
}

impl FleetLink {
    /// Whether this host (`me`) may run `name` again, checked by
    /// compare-and-swap on its owner record; a store that cannot say is
    /// an error (nothing is run on a guess).
    pub fn may_resume(&self, name: &str, me: &str) -> Result<Verdict, fleet::FleetError> {
        match reclaim(&self.fleet, name, me)? {
            Ownership::Ours | Ownership::Unrecorded => Ok(Verdict::Run),
            Ownership::Theirs(owner) => {
                self.fleet.note(Event::new(
                    Kind::Fenced,
                    Some(name),
                    &[me, &owner],
                    serde_json::json!({ "reason": format!("{owner} owns it now") }),
                ));
                Ok(Verdict::Fenced(owner))
            }
        }
    }
}

/// Guests paused because the lease may lapse, each with its machine.
type Paused = BTreeMap<String, Box<Machine>>;

/// How often the lease is looked at for a TTL of `ttl`.
fn interval(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Starts the fencing thread of a daemon with a fleet link.
pub(crate) fn start(daemon: &Arc<Daemon>) -> std::io::Result<()> {
    if daemon.config.fleet.is_none() {
        return Ok(());
    }
    let d = Arc::clone(daemon);
    thread::Builder::new()
        .name("fence".into())
        .spawn(move || watch(&d))
        .map(drop)
}

/// Pauses the guests while the lease may lapse; afterwards resumes those
/// this host still owns and stops the others. A lease that was lost and
/// taken again between two looks (the whole process was stopped, say)
/// counts as lost: the registration count tells.
fn watch(daemon: &Daemon) {
    let Some(link) = daemon.config.fleet.clone() else {
        return;
    };
    let paused: Mutex<Paused> = Mutex::default();
    let me = daemon.config.name.clone();
    // The registration the guests run under (0: none yet).
    let mut generation = link.lease.registrations();
    loop {
        thread::sleep(interval(link.lease.ttl()));
        let held = link.lease.valid_for().is_some();
        let now = link.lease.registrations();
        let mut paused = paused.lock().unwrap_or_else(|e| e.into_inner());
        if now > 0 && (!held || (generation != 0 && now != generation)) {
            pause_all(daemon, &mut paused);
        }
        if held && !paused.is_empty() {
            settle(daemon, &link, &me, &mut paused);
        }
        if held && paused.is_empty() {
            generation = now;
        }
    }
}

/// Pauses every running guest that a standby may take over (kept in
/// `paused`); the others cannot run twice.
fn pause_all(daemon: &Daemon, paused: &mut Paused) {
    let names: Vec<String> = daemon
        .instances()
        .iter()
        .filter(|(_, i)| matches!(i.state, State::Running))
        .map(|(n, _)| n.clone())
        .filter(|n| daemon.standbys.ships(n))
        .collect();
    for name in names {
        let Ok(handle) = daemon.acquire(&name, "fenced: the host's lease may lapse") else {
            continue;
        };
        match handle.pause() {
            Ok(machine) => {
                tracing::warn!(
                    instance = %name,
                    "paused: this host's lease was not renewed in time",
                );
                paused.insert(name, machine);
            }
            Err(e) => {
                tracing::warn!(
                    instance = %name,
                    error = %e,
                    "cannot pause a guest while the lease may lapse",
                );
                daemon.release(&name);
            }
        }
    }
}

/// Resumes the paused guests this host still owns; stops the others.
fn settle(daemon: &Daemon, link: &FleetLink, me: &str, paused: &mut Paused) {
    let names: Vec<String> = paused.keys().cloned().collect();
    for name in names {
        match link.may_resume(&name, me) {
            Ok(Verdict::Run) => {
                let machine = paused.remove(&name).expect("listed");
                if let Some(h) = daemon.instances().get(&name).and_then(|i| i.handle.clone()) {
                    h.resume(machine);
                }
                daemon.release(&name);
                tracing::info!(instance = %name, "resumed: the lease holds and this host owns it");
            }
            Ok(Verdict::Fenced(owner)) => {
                drop(paused.remove(&name));
                daemon.release(&name);
                daemon.forget(&name);
                if let Err(crate::ApiError(_, e)) = daemon.stop(&name) {
                    tracing::warn!(instance = %name, error = %e, "cannot stop a fenced guest");
                }
                tracing::warn!(
                    instance = %name,
                    %owner,
                    "stopped: another host took it over while this one's lease lapsed",
                );
            }
            // The store cannot say: stays paused, asked again next time.
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "cannot check who owns a paused guest")
            }
        }
    }
}
