//! Leader election among replicas of a controller (`host-shim schedule
//! --store etcd://...` run several times): [`Elector`].
//!
//! The leader is whoever holds the key `leaders/ROLE`, written under its
//! lease with compare-and-swap on an absent key, so at most one replica
//! holds it. A thread renews the lease every third of its TTL while
//! leading, and otherwise tries to take the key every [`PROBE`]. When the
//! leader dies, its lease lapses within the TTL, the key vanishes and the
//! next probe of another replica takes it over (a
//! [`crate::events::Kind::LeaderChange`] event).
//!
//! A replica acts as leader only while [`Elector::leading`] says so: its
//! last renewal is younger than the TTL minus a margin, so it stops acting
//! before any other replica can take over. Right before an action it calls
//! [`Elector::confirm`], which renews the lease and checks the key is
//! still its own.

use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::events::{Event, Kind};
use crate::registry::{keep_alive_interval, MAX_TTL, MIN_TTL};
use crate::store::{Expect, FleetStore, LeaseId, StoreError};
use crate::{Fleet, FleetError};

/// The prefix of the leader keys.
pub const LEADERS: &str = "leaders/";

/// How often a replica that is not the leader tries to become it.
pub const PROBE: Duration = Duration::from_millis(250);

/// What a leader key holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Leader {
    /// The replica's name.
    pub replica: String,
    pub pid: u32,
    /// The lease the key lives under.
    pub lease: i64,
    /// When it became the leader (Unix seconds).
    pub since: u64,
}

struct State {
    lease: Option<LeaseId>,
    /// When this replica last renewed its lease as the leader (`None`:
    /// not the leader).
    renewed: Option<Instant>,
    /// Who leads, as last seen.
    leader: Option<String>,
}

struct Inner {
    fleet: Fleet,
    key: String,
    replica: String,
    ttl: Duration,
    state: Mutex<State>,
}

/// This replica's part in an election (see the module docs); the lease is
/// revoked when it is dropped, so another replica takes over at once.
pub struct Elector {
    inner: Arc<Inner>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("key", &self.inner.key)
            .field("replica", &self.inner.replica)
            .finish_non_exhaustive()
    }
}

impl Elector {
    /// Joins the election for `role` as `replica`, with a lease of `ttl`
    /// (the longest a dead leader holds the role). Needs a store with
    /// leases (etcd).
    pub fn start(
        store: Box<dyn FleetStore>,
        role: &str,
        replica: &str,
        ttl: Duration,
    ) -> Result<Self, FleetError> {
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(FleetError::Failed(format!(
                "a leader lease TTL of {ttl:?} is out of range ({MIN_TTL:?} to {MAX_TTL:?})"
            )));
        }
        if role.is_empty() || replica.is_empty() {
            return Err(FleetError::Failed(
                "an election needs a role and a replica name".into(),
            ));
        }
        let inner = Arc::new(Inner {
            fleet: Fleet::new(store),
            key: format!("{LEADERS}{role}"),
            replica: replica.to_owned(),
            ttl,
            state: Mutex::new(State {
                lease: None,
                renewed: None,
                leader: None,
            }),
        });
        // The first try now: a store without leases fails here.
        inner.tick()?;
        let (stop, stopped) = mpsc::channel();
        let worker = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("elector".into())
            .spawn(move || worker.run(&stopped))
            .map_err(|e| FleetError::Failed(format!("cannot start the election thread: {e}")))?;
        Ok(Self {
            inner,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Whether this replica leads (and will for longer than any other
    /// replica could take over: its last renewal is recent enough).
    pub fn leading(&self) -> bool {
        self.inner
            .leading(&self.inner.state.lock().expect("elector state"))
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Who leads, as last seen.
    pub fn leader(&self) -> Option<String> {
        self.inner
            .state
            .lock()
            .expect("elector state")
            .leader
            .clone()
    }

    /// Renews the lease and checks that the key is still this replica's:
    /// call right before acting as the leader.
    pub fn confirm(&self) -> bool {
        self.inner.confirm()
    }
}

impl Drop for Elector {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let lease = self.inner.state.lock().expect("elector state").lease.take();
        if let Some(lease) = lease {
            if let Err(e) = self.inner.fleet.store.revoke_lease(lease) {
                tracing::warn!(error = %e, "cannot revoke the leader lease");
            }
        }
    }
}

impl Inner {
    fn leading(&self, s: &State) -> bool {
        // Stop acting a margin before the lease could lapse.
        let margin = self.ttl / 4;
        s.renewed.is_some_and(|t| t.elapsed() + margin < self.ttl)
    }

    fn run(&self, stop: &mpsc::Receiver<()>) {
        loop {
            let wait = if self.leading(&self.state.lock().expect("elector state")) {
                keep_alive_interval(self.ttl)
            } else {
                PROBE
            };
            if !matches!(
                stop.recv_timeout(wait),
                Err(mpsc::RecvTimeoutError::Timeout)
            ) {
                return;
            }
            if let Err(e) = self.tick() {
                tracing::warn!(key = %self.key, error = %e, "election");
            }
        }
    }

    /// One step: renew while leading, else try to take the key.
    fn tick(&self) -> Result<(), FleetError> {
        let mut s = self.state.lock().expect("elector state");
        let started = Instant::now();
        if s.renewed.is_some() {
            let lease = s.lease.expect("a leader has a lease");
            match self.fleet.store.keep_alive(lease) {
                Ok(()) => {
                    s.renewed = Some(started);
                    return Ok(());
                }
                Err(StoreError::LeaseExpired(_)) => {
                    tracing::warn!(replica = %self.replica, "lost the leader lease");
                    s.renewed = None;
                    s.lease = None;
                }
                Err(e) => {
                    if !self.leading(&s) {
                        tracing::warn!(replica = %self.replica, "cannot renew the leader lease in time: standing by");
                        s.renewed = None;
                    }
                    return Err(e.into());
                }
            }
        }
        let lease = match s.lease {
            Some(l) => match self.fleet.store.keep_alive(l) {
                Ok(()) => l,
                Err(StoreError::LeaseExpired(_)) => self.fleet.store.grant_lease(self.ttl)?,
                Err(e) => return Err(e.into()),
            },
            None => self.fleet.store.grant_lease(self.ttl)?,
        };
        s.lease = Some(lease);
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let me = Leader {
            replica: self.replica.clone(),
            pid: std::process::id(),
            lease: lease.0,
            since,
        };
        let value = serde_json::to_value(&me).expect("serializable");
        match self
            .fleet
            .store
            .put_leased(&self.key, value, Expect::Absent, lease)
        {
            Ok(_) => {
                s.renewed = Some(started);
                let before = s.leader.replace(self.replica.clone());
                tracing::info!(replica = %self.replica, key = %self.key, "leading");
                self.fleet.note(Event::new(
                    Kind::LeaderChange,
                    None,
                    &[],
                    serde_json::json!({
                        "role": self.key.trim_start_matches(LEADERS),
                        "replica": self.replica,
                        "previous": before,
                    }),
                ));
                Ok(())
            }
            Err(StoreError::Conflict { .. }) => {
                let holder = self
                    .fleet
                    .store
                    .get(&self.key)?
                    .and_then(|v| serde_json::from_value::<Leader>(v.value).ok());
                if holder.as_ref().is_some_and(|l| l.lease == lease.0) {
                    // Still ours (renewals had failed for a while): leading again.
                    s.renewed = Some(started);
                }
                s.leader = holder.map(|l| l.replica);
                Ok(())
            }
            Err(StoreError::LeaseExpired(_)) => {
                s.lease = None;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn confirm(&self) -> bool {
        let mut s = self.state.lock().expect("elector state");
        let Some(lease) = s.lease.filter(|_| self.leading(&s)) else {
            return false;
        };
        let renewed = Instant::now();
        if self.fleet.store.keep_alive(lease).is_err() {
            return false;
        }
        let mine = self
            .fleet
            .store
            .get(&self.key)
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_value::<Leader>(v.value).ok())
            .is_some_and(|l| l.lease == lease.0 && l.replica == self.replica);
        if mine {
            s.renewed = Some(renewed);
        }
        mine
    }
}
