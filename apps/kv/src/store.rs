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
//!
//! **Serving while loading.** A restored checkpoint is not copied into the
//! map up front: the store serves as soon as it is handed the checkpoint's
//! entries ([`Store::load_lazily`], any [`Unloaded`] source, sorted by key),
//! and moves them into the map in bounded slices ([`Store::load_some`],
//! from a background task). Every command that touches a key first loads
//! that key ([`Store::load_key`]: a binary search of the entries not moved
//! yet), and remembers it (`shadowed`) so that the background never moves
//! it again: a key deleted or rewritten while loading stays so. Commands
//! on the whole keyspace (DBSIZE, KEYS, INFO keyspace, checkpoints) finish
//! the loading first ([`Store::load_all`]); FLUSHALL drops what is left.
//! Every reply is thus the one a fully loaded store would give.

use alloc::boxed::Box;
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

/// Entries not in the map yet (a checkpoint being restored), in strictly
/// increasing key order.
pub trait Unloaded {
    /// How many entries there are.
    fn len(&self) -> usize;
    /// The key of entry `i`.
    fn key(&self, i: usize) -> &[u8];
    /// Entry `i`, or `None` if it had expired already.
    fn entry(&self, i: usize) -> Option<(Vec<u8>, Entry)>;
}

/// A restore in progress: entries `next..` of `source` are not in the map
/// yet, except those in `shadowed`, which were loaded on demand.
struct Loading {
    source: Box<dyn Unloaded>,
    next: usize,
    shadowed: BTreeSet<Vec<u8>>,
}

impl core::fmt::Debug for Loading {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Loading({}/{})", self.next, self.source.len())
    }
}

impl Loading {
    /// The index of `key` among the entries not moved yet.
    fn find(&self, key: &[u8]) -> Option<usize> {
        let (mut lo, mut hi) = (self.next, self.source.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.source.key(mid).cmp(key) {
                core::cmp::Ordering::Less => lo = mid + 1,
                core::cmp::Ordering::Greater => hi = mid,
                core::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
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
    /// The checkpoint entries still to load, while restoring.
    loading: Option<Loading>,
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
    pub fn entry(&mut self, key: &[u8]) -> Option<&Entry> {
        self.load_key(key);
        self.map.get(key)
    }

    /// Every entry that has not expired by `now`, in key order.
    pub fn live_entries(&mut self, now: Instant) -> impl Iterator<Item = (&Vec<u8>, &Entry)> {
        self.load_all();
        self.map.iter().filter(move |(_, e)| !e.is_expired(now))
    }

    /// Keys stored, including expired ones not yet removed, and not
    /// counting checkpoint entries not loaded yet ([`Self::load_all`]).
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
        self.load_key(key);
        self.expire_if_due(key, now);
        self.map.get(key)
    }

    /// The live value of `key`, to change in place (its deadline stays).
    pub fn value_mut(&mut self, key: &[u8], now: Instant) -> Option<&mut Vec<u8>> {
        self.load_key(key);
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
        self.load_key(&key);
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

    /// Serves the entries of `source` (a checkpoint) from now on, loading
    /// them on demand and with [`load_some`](Self::load_some); into an
    /// empty store.
    pub fn load_lazily(&mut self, source: Box<dyn Unloaded>) {
        debug_assert!(self.map.is_empty() && self.loading.is_none());
        self.changes += source.len() as u64;
        self.loading = Some(Loading {
            source,
            next: 0,
            shadowed: BTreeSet::new(),
        });
    }

    /// Whether checkpoint entries are still being loaded.
    pub fn is_loading(&self) -> bool {
        self.loading.is_some()
    }

    /// Makes the map hold `key`'s entry if the checkpoint being loaded has
    /// it and it was not loaded yet; every command on a key calls this
    /// first.
    fn load_key(&mut self, key: &[u8]) {
        let Some(loading) = &mut self.loading else {
            return;
        };
        if loading.shadowed.contains(key) {
            return;
        }
        if let Some(i) = loading.find(key) {
            loading.shadowed.insert(key.to_vec());
            if let Some((key, entry)) = loading.source.entry(i) {
                self.insert_loaded(key, entry);
            }
        }
    }

    /// Puts a checkpoint entry into the map (not a change).
    fn insert_loaded(&mut self, key: Vec<u8>, entry: Entry) {
        if let Some(at) = entry.expires_at {
            self.expiries.insert((at, key.clone()));
        }
        self.map.insert(key, entry);
    }

    /// Moves up to `limit` more checkpoint entries into the map; returns
    /// whether loading is complete.
    pub fn load_some(&mut self, limit: usize) -> bool {
        let Some(mut loading) = self.loading.take() else {
            return true;
        };
        let end = loading.source.len().min(loading.next.saturating_add(limit));
        for i in loading.next..end {
            if loading.shadowed.remove(loading.source.key(i)) {
                continue; // loaded on demand already
            }
            if let Some((key, entry)) = loading.source.entry(i) {
                self.insert_loaded(key, entry);
            }
        }
        loading.next = end;
        if end < loading.source.len() {
            self.loading = Some(loading);
            return false;
        }
        true
    }

    /// Finishes loading the checkpoint.
    pub fn load_all(&mut self) {
        self.load_some(usize::MAX);
    }

    /// Finishes loading and removes every expired key: before a command on
    /// the whole keyspace.
    pub fn settle(&mut self, now: Instant) {
        self.load_all();
        self.expire_due(now, usize::MAX);
    }

    /// Sets `key` to `value`, keeping the deadline it has (if live).
    pub fn set_keep_ttl(&mut self, key: Vec<u8>, value: Vec<u8>, now: Instant) {
        self.load_key(&key);
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
        self.load_key(key);
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
        self.load_key(key);
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
        self.loading = None;
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
