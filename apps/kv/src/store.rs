//! The keyspace: binary-safe keys to string values, with optional expiry.
//!
//! Keys live in a `BTreeMap` rather than a hash map:
//!
//! - no hash seed to choose: a fixed-seed hash would let any client pick
//!   keys that all collide (hash flooding) and stall the single vCPU, and a
//!   unikernel has no good entropy source at boot to seed one with;
//! - O(log n) worst case for every operation, no rehash pauses as the map
//!   grows, and no extra dependency;
//! - ordered keys make `KEYS prefix*` a range scan.
//!
//! Expiry is exact and cheap: besides each entry's deadline, the store keeps
//! an index of `(deadline, key)` for the keys that have one. Keys are expired
//! lazily when a command touches them, and actively by
//! [`expire_due`](Store::expire_due), which pops due keys off the front of
//! the index (called a little on every command and from a background task).

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use libcloud::time::Instant;

use crate::glob;

/// A stored value and when it expires.
#[derive(Debug)]
pub struct Entry {
    pub value: Vec<u8>,
    pub expires_at: Option<Instant>,
}

impl Entry {
    fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Keys changed since the last checkpoint (for incremental checkpoints).
#[derive(Debug, Default)]
pub struct Dirty {
    /// Keys set, changed, deleted or expired since.
    pub keys: BTreeSet<Vec<u8>>,
    /// The keyspace was emptied (FLUSHALL) since; `keys` changed after.
    pub cleared: bool,
}

/// The keyspace (one database, `db0`).
#[derive(Debug, Default)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Entry>,
    /// `(deadline, key)` for every key in `map` with a deadline.
    expiries: BTreeSet<(Instant, Vec<u8>)>,
    /// Keys removed because they expired, since start (`INFO stats`).
    pub expired_keys: u64,
    /// Writes by commands since start: a checkpoint taken at `changes == n`
    /// holds every write acknowledged before it.
    pub changes: u64,
    /// Changed keys, when tracked ([`Self::track_changes`]).
    dirty: Option<Dirty>,
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tracks changed keys from now on (incremental checkpoints).
    pub fn track_changes(&mut self) {
        self.dirty.get_or_insert_with(Dirty::default);
    }

    /// Stops tracking changed keys.
    pub fn stop_tracking(&mut self) {
        self.dirty = None;
    }

    /// The changes tracked since the last call (or since tracking started),
    /// which starts afresh; `None` if nothing changed or nothing is tracked.
    pub fn take_dirty(&mut self) -> Option<Dirty> {
        let d = self.dirty.as_mut()?;
        if d.keys.is_empty() && !d.cleared {
            return None;
        }
        Some(core::mem::take(d))
    }

    /// Notes a change of `key`.
    fn touch(&mut self, key: &[u8]) {
        if let Some(d) = &mut self.dirty {
            if !d.keys.contains(key) {
                d.keys.insert(key.to_vec());
            }
        }
    }

    /// The entry of `key`, expired or not (for checkpoints).
    pub fn entry(&self, key: &[u8]) -> Option<&Entry> {
        self.map.get(key)
    }

    /// Every entry that has not expired by `now`, in key order.
    pub fn live_entries(&self, now: Instant) -> impl Iterator<Item = (&Vec<u8>, &Entry)> {
        self.map.iter().filter(move |(_, e)| !e.is_expired(now))
    }

    /// Keys stored, including expired ones not yet removed.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Keys with a deadline, including expired ones not yet removed.
    pub fn volatile_len(&self) -> usize {
        self.expiries.len()
    }

    /// Removes `key` if its deadline has passed.
    fn expire_if_due(&mut self, key: &[u8], now: Instant) {
        if self.expiries.is_empty() {
            return; // the common case, one lookup fewer
        }
        if self.map.get(key).is_some_and(|e| e.is_expired(now)) {
            self.remove_entry(key);
            self.expired_keys += 1;
        }
    }

    /// The live entry for `key`.
    pub fn get(&mut self, key: &[u8], now: Instant) -> Option<&Entry> {
        self.expire_if_due(key, now);
        self.map.get(key)
    }

    /// The live value of `key`, to change in place (its deadline stays).
    pub fn value_mut(&mut self, key: &[u8], now: Instant) -> Option<&mut Vec<u8>> {
        self.expire_if_due(key, now);
        self.changes += 1;
        if self.map.contains_key(key) {
            self.touch(key);
        }
        self.map.get_mut(key).map(|e| &mut e.value)
    }

    /// Whether `key` is there (and not expired).
    pub fn contains(&mut self, key: &[u8], now: Instant) -> bool {
        self.get(key, now).is_some()
    }

    /// Sets `key` to `value` with deadline `expires_at`; returns the old
    /// entry, if there was one (expired or not).
    pub fn set(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        expires_at: Option<Instant>,
    ) -> Option<Entry> {
        self.changes += 1;
        self.touch(&key);
        match self.map.get_mut(&key) {
            Some(entry) => {
                let old = core::mem::replace(entry, Entry { value, expires_at });
                if old.expires_at != expires_at {
                    if let Some(at) = old.expires_at {
                        self.expiries.remove(&(at, key.clone()));
                    }
                    if let Some(at) = expires_at {
                        self.expiries.insert((at, key));
                    }
                }
                Some(old)
            }
            None => {
                if let Some(at) = expires_at {
                    self.expiries.insert((at, key.clone()));
                }
                self.map.insert(key, Entry { value, expires_at });
                None
            }
        }
    }

    /// Sets every `(key, value, deadline)` of `entries`, which come in key
    /// order (a checkpoint): into an empty store, the map is built in one
    /// pass (no search per key, full nodes) rather than key by key.
    pub fn extend_sorted(
        &mut self,
        entries: impl Iterator<Item = (Vec<u8>, Vec<u8>, Option<Instant>)>,
    ) {
        if !self.map.is_empty() {
            for (key, value, expires_at) in entries {
                self.set(key, value, expires_at);
            }
            return;
        }
        let mut expiries = Vec::new();
        self.map = entries
            .map(|(key, value, expires_at)| {
                if let Some(at) = expires_at {
                    expiries.push((at, key.clone()));
                }
                (key, Entry { value, expires_at })
            })
            .collect();
        self.expiries = expiries.into_iter().collect();
        self.changes += self.map.len() as u64;
        if let Some(d) = &mut self.dirty {
            d.keys.extend(self.map.keys().cloned());
        }
    }

    /// Sets `key` to `value`, keeping the deadline it has (if live).
    pub fn set_keep_ttl(&mut self, key: Vec<u8>, value: Vec<u8>, now: Instant) {
        self.changes += 1;
        self.expire_if_due(&key, now);
        self.touch(&key);
        match self.map.get_mut(&key) {
            Some(entry) => entry.value = value,
            None => {
                self.map.insert(
                    key,
                    Entry {
                        value,
                        expires_at: None,
                    },
                );
            }
        }
    }

    /// Changes the deadline of live `key`; false if there is no such key.
    pub fn set_expiry(&mut self, key: &[u8], expires_at: Option<Instant>, now: Instant) -> bool {
        self.expire_if_due(key, now);
        if !self.map.contains_key(key) {
            return false;
        }
        self.touch(key);
        let Some(entry) = self.map.get_mut(key) else {
            return false;
        };
        self.changes += 1;
        let old = core::mem::replace(&mut entry.expires_at, expires_at);
        if old != expires_at {
            if let Some(at) = old {
                self.expiries.remove(&(at, key.to_vec()));
            }
            if let Some(at) = expires_at {
                self.expiries.insert((at, key.to_vec()));
            }
        }
        true
    }

    /// Removes live `key`, returning its entry.
    pub fn remove(&mut self, key: &[u8], now: Instant) -> Option<Entry> {
        self.expire_if_due(key, now);
        self.changes += 1;
        self.remove_entry(key)
    }

    fn remove_entry(&mut self, key: &[u8]) -> Option<Entry> {
        let (key, entry) = self.map.remove_entry(key)?;
        self.touch(&key);
        if let Some(at) = entry.expires_at {
            self.expiries.remove(&(at, key));
        }
        Some(entry)
    }

    /// Removes every key.
    pub fn clear(&mut self) {
        self.changes += 1;
        self.map.clear();
        self.expiries.clear();
        if let Some(d) = &mut self.dirty {
            d.keys.clear();
            d.cleared = true;
        }
    }

    /// Removes up to `limit` keys whose deadline has passed (all of them if
    /// `limit` is `usize::MAX`); returns how many it removed.
    pub fn expire_due(&mut self, now: Instant, limit: usize) -> usize {
        let mut removed = 0;
        while removed < limit {
            match self.expiries.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            let Some((_, key)) = self.expiries.pop_first() else {
                break;
            };
            self.map.remove(&key);
            self.touch(&key);
            removed += 1;
        }
        self.expired_keys += removed as u64;
        removed
    }

    /// Live keys matching glob `pattern`, in order. Expired keys must have
    /// been removed first ([`expire_due`](Self::expire_due)) or are listed.
    pub fn keys<'a>(&'a self, pattern: &'a [u8]) -> impl Iterator<Item = &'a Vec<u8>> + 'a {
        let prefix = glob::literal_prefix(pattern);
        let literal = glob::is_literal(pattern);
        let range = self.map.range::<[u8], _>((
            core::ops::Bound::Included(&prefix[..]),
            core::ops::Bound::Unbounded,
        ));
        range
            .map(|(k, _)| k)
            .take_while(move |k| k.starts_with(&prefix) && (!literal || k.len() == prefix.len()))
            .filter(move |k| literal || glob::matches(pattern, k, false))
    }
}
