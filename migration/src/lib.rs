//! Live migration shim→shim over TCP (or TLS): [`protocol`] (the versioned,
//! checksummed message stream with deadlines, and the commit step table),
//! [`source`] (pre-copy rounds with KVM's dirty log OR'ed with the shim's
//! own writes, stop-and-copy, then `Commit`; resumes the guest on any
//! failure before it may have been taken over) and [`dest`] (checks the
//! handshake and the final state, restores, starts the guest only on
//! `Commit`). [`Migrations`] owns what is under way on a daemon: the
//! outgoing ones `stop` can cancel, the incoming reservations, and the
//! decisions a source may ask about. [`faults`] injects failures for tests.
//!
//! The daemon hands each migration a [`MigrationContext`] (plain data) and
//! implements one narrow trait per side: [`Source`] (acquire, release, in
//! doubt, moved away) and [`Destination`] (reserve, prepare, launch, adopt,
//! cancel). This crate does not depend on the daemon; failures are
//! [`MigrationError`]s naming their phase, progress goes to the caller as
//! the `api` crate's `MigrationEvent`s.

pub mod dest;
mod error;
pub mod faults;
mod host;
pub mod protocol;
pub mod source;

pub use error::MigrationError;
pub use host::{Destination, Local, MigrationContext, Overlay, Source};

use std::collections::{BTreeMap, VecDeque};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How a daemon migrates (`serve` flags).
#[derive(Clone, Copy, Debug)]
pub struct MigrationConfig {
    /// Leave behind heap pages the guest says are free
    /// ([`source::HeapHints`]); `--no-free-page-hints` turns it off.
    pub free_page_hints: bool,
    /// A failure to inject, for tests (`--test-fault STEP:FAULT`).
    pub fault: Option<faults::Injected>,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            free_page_hints: true,
            fault: None,
        }
    }
}

/// Decisions kept for `Query` (the oldest go first).
const DECISIONS_KEPT: usize = 256;

/// What became of an incoming migration; changes once from `Pending`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Started,
    Aborted,
}

/// The decision of one incoming migration, shared by its receiver and the
/// `Query` handler.
#[derive(Debug)]
pub struct Decision(Mutex<Outcome>);

impl Decision {
    pub fn lock(&self) -> MutexGuard<'_, Outcome> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Aborts it unless already decided; gives the final outcome.
    pub fn abort(&self) -> Outcome {
        let mut o = self.lock();
        if *o == Outcome::Pending {
            *o = Outcome::Aborted;
        }
        *o
    }
}

/// An outgoing migration `stop` can cancel.
struct Outgoing {
    sock: Option<TcpStream>,
    cancelled: bool,
    /// `Commit` may have been sent: cutting the connection no longer
    /// cancels anything (the source waits for the outcome).
    committing: bool,
}

/// An incoming migration holding a reservation.
struct Incoming {
    sock: Option<TcpStream>,
    decision: Arc<Decision>,
}

#[derive(Default)]
struct Table {
    outgoing: BTreeMap<String, Outgoing>,
    incoming: BTreeMap<String, Incoming>,
    decisions: VecDeque<(u64, Arc<Decision>)>,
}

/// The migrations under way on one daemon.
#[derive(Default)]
pub struct Migrations {
    table: Mutex<Table>,
    ended: Condvar,
    /// A VM made ahead of time for the next incoming migration
    /// ([`dest`] takes it and has another made in the background):
    /// `KVM_CREATE_VM` alone took up to 5 s on a loaded nested host.
    pub(crate) spare: Mutex<Option<vmm::vstate::vm::Vm>>,
}

impl Migrations {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an outgoing migration of `name` (the caller holds the
    /// instance busy, so there is one at a time).
    pub(crate) fn start_outgoing(&self, name: &str) {
        self.table().outgoing.insert(
            name.to_owned(),
            Outgoing {
                sock: None,
                cancelled: false,
                committing: false,
            },
        );
    }

    /// Gives the outgoing migration its connection; false if it was
    /// cancelled already.
    pub(crate) fn outgoing_conn(&self, name: &str, sock: TcpStream) -> bool {
        let mut t = self.table();
        match t.outgoing.get_mut(name) {
            Some(o) if !o.cancelled => {
                o.sock = Some(sock);
                true
            }
            _ => false,
        }
    }

    /// Whether the outgoing migration of `name` was cancelled.
    pub(crate) fn cancelled(&self, name: &str) -> bool {
        self.table().outgoing.get(name).is_some_and(|o| o.cancelled)
    }

    /// Marks the point after which a cancel no longer cuts the connection;
    /// false if it was cancelled before (then `Commit` must not go).
    pub(crate) fn commit_point(&self, name: &str) -> bool {
        let mut t = self.table();
        match t.outgoing.get_mut(name) {
            Some(o) if !o.cancelled => {
                o.committing = true;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn end_outgoing(&self, name: &str) {
        self.table().outgoing.remove(name);
        self.ended.notify_all();
    }

    /// Records an incoming migration of `name` with id `id`.
    pub(crate) fn start_incoming(
        &self,
        name: &str,
        id: u64,
        sock: Option<TcpStream>,
    ) -> Arc<Decision> {
        let decision = Arc::new(Decision(Mutex::new(Outcome::Pending)));
        let mut t = self.table();
        t.incoming.insert(
            name.to_owned(),
            Incoming {
                sock,
                decision: Arc::clone(&decision),
            },
        );
        t.decisions.retain(|(i, _)| *i != id);
        t.decisions.push_back((id, Arc::clone(&decision)));
        while t.decisions.len() > DECISIONS_KEPT {
            t.decisions.pop_front();
        }
        decision
    }

    pub(crate) fn end_incoming(&self, name: &str) {
        self.table().incoming.remove(name);
        self.ended.notify_all();
    }

    /// The final outcome of migration `id` here: a pending one is aborted
    /// (and its connection cut), so the answer holds; an unknown one was
    /// never started here.
    pub(crate) fn query(&self, id: u64) -> Outcome {
        let t = self.table();
        let Some((_, d)) = t.decisions.iter().find(|(i, _)| *i == id) else {
            return Outcome::Aborted;
        };
        let outcome = d.abort();
        if let Some(inc) = t.incoming.values().find(|i| Arc::ptr_eq(&i.decision, d)) {
            if let Some(s) = &inc.sock {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        outcome
    }

    /// Cancels a migration of `name` in either direction and waits (up to
    /// `wait`) until it has ended: an outgoing one before its `Commit`
    /// resumes the guest here (the destination discards); after it, this
    /// waits for the outcome. An incoming one not yet started is aborted.
    /// Returns whether none is under way any more.
    pub fn cancel(&self, name: &str, wait: Duration) -> bool {
        let mut t = self.table();
        if let Some(o) = t.outgoing.get_mut(name) {
            o.cancelled = true;
            if let (false, Some(s)) = (o.committing, &o.sock) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        if let Some(i) = t.incoming.get(name) {
            if i.decision.abort() == Outcome::Aborted {
                if let Some(s) = &i.sock {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
        let give_up = Instant::now() + wait;
        loop {
            if !t.outgoing.contains_key(name) && !t.incoming.contains_key(name) {
                return true;
            }
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            t = self
                .ended
                .wait_timeout(t, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_decides_a_pending_migration_for_good() {
        let m = Migrations::default();
        let d = m.start_incoming("kv", 7, None);
        assert_eq!(m.query(7), Outcome::Aborted);
        // A Commit arriving after the query cannot start it.
        assert_eq!(*d.lock(), Outcome::Aborted);
        let d = m.start_incoming("kv", 8, None);
        *d.lock() = Outcome::Started;
        assert_eq!(m.query(8), Outcome::Started);
        assert_eq!(m.query(9), Outcome::Aborted, "unknown: never started here");
        m.end_incoming("kv");
        assert!(m.cancel("kv", Duration::ZERO));
    }

    #[test]
    fn cancel_stops_an_outgoing_migration_before_commit_only() {
        let m = Migrations::default();
        m.start_outgoing("a");
        assert!(!m.cancel("a", Duration::from_millis(10)), "still running");
        assert!(m.cancelled("a"));
        assert!(!m.commit_point("a"), "no Commit after a cancel");
        m.end_outgoing("a");
        assert!(m.cancel("a", Duration::ZERO));
        for i in 0..DECISIONS_KEPT as u64 + 10 {
            m.start_incoming("b", i, None);
        }
        assert_eq!(m.table().decisions.len(), DECISIONS_KEPT);
    }
}
