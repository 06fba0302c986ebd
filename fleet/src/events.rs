//! The fleet's event stream: what happened to its apps and hosts (deploys,
//! stops, migrations, takeovers and fencing, hosts coming up and going
//! down, scheduler leaders),
//! appended to the store under [`PREFIX`] by whoever did it, read back in
//! order by `host-shim events` and followed as it grows ([`follow`]).
//!
//! # Keys and order
//!
//! An event's position is its revision: the store version of its key (in
//! etcd, the cluster's revision of the write), which only grows. The
//! history is bounded: events go into a ring of [`KEEP`] slots
//! (`events/NNNNNN`), slot `seq % KEEP` where `seq` is taken by
//! compare-and-swap on the counter key [`SEQ`]; a new event overwrites the
//! oldest. Readers never look at the slot names, only at revisions.
//!
//! # Following
//!
//! [`follow`] lists the history after a revision, then watches the prefix
//! from the last revision it delivered (etcd: a watch from that revision;
//! the file store: polling). When the store goes away it waits, lists
//! again from the last revision it delivered and watches again: no event
//! is delivered twice, and none is lost unless the ring overwrote it while
//! the follower was away.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{Expect, StoreError, Versioned};
use crate::{Fleet, FleetError};

/// The prefix of the event slots.
pub const PREFIX: &str = "events/";

/// The counter of appended events (outside [`PREFIX`]: not an event).
pub const SEQ: &str = "events-seq";

/// How many events the store keeps.
pub const KEEP: u64 = 1000;

/// Most compare-and-swap attempts on the counter before giving up.
const CAS_ATTEMPTS: usize = 32;

/// How long [`follow`] waits before reconnecting to a store it lost.
const RECONNECT: Duration = Duration::from_millis(500);

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// An app was deployed (`hosts`: where it runs).
    Deploy,
    /// An app was stopped and forgotten.
    Stop,
    /// A migration began (`hosts`: from, to).
    MigrationStarted,
    /// A migration ended (`details`: its figures, `api::MigrationReport`).
    MigrationDone,
    /// A migration failed (`details.error`); the app stays where it was.
    MigrationFailed,
    /// A host registered itself.
    HostUp,
    /// A host's registration ended (it stopped, or its lease lapsed).
    HostDown,
    /// A scheduler replica became the leader (`details.replica`).
    LeaderChange,
    /// A host took an app over from a host whose lease lapsed, and runs it
    /// from its latest checkpoint (`hosts`: from, to; `details`: the
    /// checkpoint and how long it took).
    Takeover,
    /// A host won an app's ownership from a dead host but could not run it
    /// (`details.error`).
    TakeoverFailed,
    /// A host that came back (restarted, or its lease lapsed while it was
    /// cut off) stopped an app it no longer owns instead of resuming it
    /// (`hosts`: the host, the owner now).
    Fenced,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = serde_json::to_value(self).expect("serializable");
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// One event of the stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Its position in the stream (the store's revision of its write); 0
    /// before it is written.
    #[serde(default)]
    pub rev: u64,
    /// When it was recorded (Unix seconds).
    pub time: f64,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The hosts involved (a migration: from, to).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

impl Event {
    /// An event of `kind` now.
    pub fn new(kind: Kind, app: Option<&str>, hosts: &[&str], details: Value) -> Self {
        Self {
            rev: 0,
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            kind,
            app: app.map(str::to_owned),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            details,
        }
    }
}

/// A stored event, with its revision.
fn decode(key: &str, v: Versioned<Value>) -> Option<Event> {
    match serde_json::from_value::<Event>(v.value) {
        Ok(mut e) => {
            e.rev = v.version;
            Some(e)
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "skipping an event that does not decode");
            None
        }
    }
}

impl Fleet {
    /// Appends `event`; returns its revision.
    pub fn record(&self, event: &Event) -> Result<u64, FleetError> {
        self.append(event, KEEP)
    }

    /// Appends `event` to a ring of `keep` slots.
    fn append(&self, event: &Event, keep: u64) -> Result<u64, FleetError> {
        let mut seq = None;
        for _ in 0..CAS_ATTEMPTS {
            let (n, expect) = match self.store.get(SEQ)? {
                Some(v) => (v.value.as_u64().unwrap_or(0), Expect::Version(v.version)),
                None => (0, Expect::Absent),
            };
            match self.store.put(SEQ, Value::from(n + 1), expect) {
                Ok(_) => {
                    seq = Some(n);
                    break;
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let seq = seq.ok_or_else(|| {
            FleetError::Failed("the event counter keeps changing: event not recorded".into())
        })?;
        let mut value = serde_json::to_value(event).expect("serializable");
        if let Some(o) = value.as_object_mut() {
            o.remove("rev");
        }
        let key = format!("{PREFIX}{:06}", seq % keep);
        Ok(self.store.put(&key, value, Expect::Any)?)
    }

    /// [`Fleet::record`], where an event that cannot be recorded must not
    /// fail what it reports (done already): a warning.
    pub fn note(&self, event: Event) {
        if let Err(e) = self.record(&event) {
            tracing::warn!(kind = %event.kind, app = ?event.app, error = %e, "cannot record an event");
        }
    }

    /// The kept events after revision `since`, in order.
    pub fn events(&self, since: u64) -> Result<Vec<Event>, FleetError> {
        let mut out: Vec<Event> = self
            .store
            .list(PREFIX)?
            .into_iter()
            .filter(|(_, v)| v.version > since)
            .filter_map(|(k, v)| decode(&k, v))
            .collect();
        out.sort_by_key(|e| e.rev);
        Ok(out)
    }
}

/// Delivers every event after revision `since` to `on`, in order, then
/// each new one as it is recorded, until `on` returns `false`. A lost
/// store is waited for (a warning, then a retry every half second) and
/// the stream resumes after the last event delivered. `on` must not use
/// `fleet`'s store (it runs inside its watch).
pub fn follow(
    fleet: &Fleet,
    since: u64,
    on: &mut dyn FnMut(Event) -> bool,
) -> Result<(), FleetError> {
    let mut last = since;
    let mut lost = false;
    // Below this revision etcd keeps no history to watch from (compacted):
    // what is left of it is in the listed ring.
    let mut floor = 0;
    loop {
        // The history (again, after a reconnect: a compacted revision
        // cannot be watched from, but the ring still has the events).
        match fleet.events(last) {
            Ok(history) => {
                if lost {
                    tracing::info!(after = last, "the store is back; resuming the events");
                    lost = false;
                }
                for e in history {
                    last = e.rev;
                    if !on(e) {
                        return Ok(());
                    }
                }
            }
            Err(e) => {
                if !lost {
                    tracing::warn!(error = %e, after = last, "lost the store; reconnecting");
                    lost = true;
                }
                std::thread::sleep(RECONNECT);
                continue;
            }
        }
        let mut stopped = false;
        let watched = fleet.store.watch(PREFIX, last.max(floor), &mut |key, v| {
            if v.version <= last {
                return true;
            }
            let version = v.version;
            match decode(&key, v) {
                Some(e) => {
                    last = version;
                    stopped = !on(e);
                    !stopped
                }
                None => {
                    last = version;
                    true
                }
            }
        });
        match watched {
            Ok(()) if stopped => return Ok(()),
            Ok(()) => {}
            Err(StoreError::Compacted(revision)) => {
                // List again (the ring has every event still kept), then
                // watch from the compaction on.
                floor = revision.saturating_sub(1);
            }
            Err(e) => {
                tracing::warn!(error = %e, after = last, "the event watch ended; reconnecting");
                lost = true;
                std::thread::sleep(RECONNECT);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    #[test]
    fn events_are_kept_in_a_bounded_ring_in_revision_order() {
        let dir = std::env::temp_dir().join(format!("fleet-events-{}", std::process::id()));
        let fleet = Fleet::new(Box::new(FileStore::new(&dir.join("fleet.json"))));
        let keep = 10;
        let first = fleet
            .append(
                &Event::new(Kind::Deploy, Some("kv"), &["a"], Value::Null),
                keep,
            )
            .unwrap();
        for i in 0..keep + 5 {
            let e = Event::new(Kind::Stop, Some(&format!("app{i}")), &[], Value::Null);
            fleet.append(&e, keep).unwrap();
        }
        let all = fleet.events(0).unwrap();
        assert_eq!(all.len() as u64, keep);
        assert!(all.windows(2).all(|w| w[0].rev < w[1].rev));
        assert!(
            all.iter().all(|e| e.rev > first),
            "the oldest were overwritten"
        );
        assert_eq!(all.last().unwrap().app.as_deref(), Some("app14"));
        assert_eq!(all.last().unwrap().kind, Kind::Stop);
        let since = all[keep as usize - 3].rev;
        let tail = fleet.events(since).unwrap();
        assert_eq!(tail.len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }
}
