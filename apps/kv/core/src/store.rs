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
//! **A restored checkpoint stays where it is.** Its entries are not copied
//! into the map: the checkpoint, already in guest memory for good and
//! sorted by key, is the store's read-only *base* ([`Checkpointed`]: an
//! index of where each entry starts, 4 bytes a key), and the map holds
//! only what changed since. A key is looked up in the map, then in the base
//! (a binary search). Before a command changes a key of the base, the key
//! is copied into the map and *shadowed* in the base, so that the base
//! never answers for it again: a key deleted or rewritten stays so. Whole
//! keyspace commands (DBSIZE, KEYS, checkpoints) merge the two in key
//! order; FLUSHALL drops the base. kv thus serves a restored checkpoint as
//! soon as it has checked and indexed it, at the heap cost of the index.

use crate::Instant;
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::glob;

/// A stored value and when it expires.
#[derive(Debug)]
pub struct Entry {
    pub value: Vec<u8>,
    pub expires_at: Option<Instant>,
}

/// What a command reads of an entry, in the map or in the base.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    pub value: &'a [u8],
    pub expires_at: Option<Instant>,
}

impl EntryRef<'_> {
    fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

impl Entry {
    fn as_ref(&self) -> EntryRef<'_> {
        EntryRef {
            value: &self.value,
            expires_at: self.expires_at,
        }
    }
}

/// The entries of a restored checkpoint, in strictly increasing key order
/// (none expired when it was restored).
pub trait Checkpointed {
    /// How many entries there are.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The key of entry `i`.
    fn key(&self, i: usize) -> &[u8];
    /// Entry `i`.
    fn get(&self, i: usize) -> (&[u8], EntryRef<'_>);
}

/// The base: a restored checkpoint, less its `shadowed` keys (changed
/// since, their entries in the map if they still exist).
struct Base {
    source: Box<dyn Checkpointed>,
    shadowed: BTreeSet<Vec<u8>>,
}

impl core::fmt::Debug for Base {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Base({} keys, {} shadowed)",
            self.source.len(),
            self.shadowed.len()
        )
    }
}

impl Base {
    /// The index of the first entry whose key is not less than `key`, and
    /// whether it is `key`.
    fn seek(&self, key: &[u8]) -> (usize, bool) {
        let (mut lo, mut hi) = (0, self.source.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.source.key(mid).cmp(key) {
                core::cmp::Ordering::Less => lo = mid + 1,
                core::cmp::Ordering::Greater => hi = mid,
                core::cmp::Ordering::Equal => return (mid, true),
            }
        }
        (lo, false)
    }

    /// The entry of `key`, unless shadowed.
    fn get(&self, key: &[u8]) -> Option<EntryRef<'_>> {
        match self.seek(key) {
            (i, true) if !self.shadowed.contains(key) => Some(self.source.get(i).1),
            _ => None,
        }
    }

    /// The entries not shadowed from the first key not less than `from`.
    fn iter_from<'s>(
        &'s self,
        from: &[u8],
    ) -> impl Iterator<Item = (&'s [u8], EntryRef<'s>)> + use<'s> {
        (self.seek(from).0..self.source.len())
            .map(|i| self.source.get(i))
            .filter(|(k, _)| !self.shadowed.contains(*k))
    }
}

/// Two iterators of distinct keys, each in key order, merged in key order.
fn merge<'a, T>(
    a: impl Iterator<Item = (&'a [u8], T)>,
    b: impl Iterator<Item = (&'a [u8], T)>,
) -> impl Iterator<Item = (&'a [u8], T)> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    core::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.0 < x.0 => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
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
    /// The restored checkpoint, less what changed since.
    base: Option<Base>,
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
    pub fn entry(&self, key: &[u8]) -> Option<EntryRef<'_>> {
        match self.map.get(key) {
            Some(e) => Some(e.as_ref()),
            None => self.base.as_ref()?.get(key),
        }
    }

    /// Every entry that has not expired by `now`, in key order.
    pub fn live_entries(&self, now: Instant) -> impl Iterator<Item = (&[u8], EntryRef<'_>)> {
        let map = self.map.iter().map(|(k, e)| (&k[..], e.as_ref()));
        let base = self.base.iter().flat_map(|b| b.iter_from(&[]));
        merge(map, base).filter(move |(_, e)| !e.is_expired(now))
    }

    /// Keys stored, including expired ones not yet removed.
    pub fn len(&self) -> usize {
        self.map.len()
            + self
                .base
                .as_ref()
                .map_or(0, |b| b.source.len() - b.shadowed.len())
    }

    /// Whether no keys are stored, expired ones included.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys with a deadline, including expired ones not yet removed.
    pub fn volatile_len(&self) -> usize {
        self.expiries.len()
    }

    /// The earliest deadline of any key (passed or not), if any key has
    /// one: when [`expire_due`](Self::expire_due) next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// Removes `key` if its deadline has passed.
    fn expire_if_due(&mut self, key: &[u8], now: Instant) {
        if self.expiries.is_empty() {
            return; // the common case, one lookup fewer
        }
        if self.entry(key).is_some_and(|e| e.is_expired(now)) {
            self.own(key);
            self.remove_entry(key);
            self.expired_keys += 1;
        }
    }

    /// The live entry for `key`.
    pub fn get(&mut self, key: &[u8], now: Instant) -> Option<EntryRef<'_>> {
        self.expire_if_due(key, now);
        self.entry(key)
    }

    /// The live value of `key`, to change in place (its deadline stays).
    pub fn value_mut(&mut self, key: &[u8], now: Instant) -> Option<&mut Vec<u8>> {
        self.own(key);
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
        self.own(&key);
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

    /// Serves the entries of `source` (a restored checkpoint) from now
    /// on, as the base of an empty store; `volatile` are its keys with a
    /// deadline.
    pub fn restore(
        &mut self,
        source: Box<dyn Checkpointed>,
        volatile: impl Iterator<Item = (Instant, Vec<u8>)>,
    ) {
        debug_assert!(self.map.is_empty() && self.base.is_none());
        self.changes += source.len() as u64;
        self.expiries.extend(volatile);
        self.base = Some(Base {
            source,
            shadowed: BTreeSet::new(),
        });
    }

    /// Makes the map hold `key`'s entry if the base has it (and shadows it
    /// there): every command that changes a key calls this first.
    fn own(&mut self, key: &[u8]) {
        let Some(base) = &mut self.base else {
            return;
        };
        if self.map.contains_key(key) || base.shadowed.contains(key) {
            return;
        }
        if let (i, true) = base.seek(key) {
            let (_, e) = base.source.get(i);
            let entry = Entry {
                value: e.value.to_vec(),
                expires_at: e.expires_at,
            };
            base.shadowed.insert(key.to_vec());
            self.map.insert(key.to_vec(), entry);
            if base.shadowed.len() == base.source.len() {
                self.base = None; // every key changed since: nothing left
            }
        }
    }

    /// Sets `key` to `value`, keeping the deadline it has (if live).
    pub fn set_keep_ttl(&mut self, key: Vec<u8>, value: Vec<u8>, now: Instant) {
        self.own(&key);
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
        self.own(key);
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
        self.own(key);
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
        self.base = None;
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
            self.own(&key);
            self.map.remove(&key);
            self.touch(&key);
            removed += 1;
        }
        self.expired_keys += removed as u64;
        removed
    }

    /// Live keys matching glob `pattern`, in order. Expired keys must have
    /// been removed first ([`expire_due`](Self::expire_due)) or are listed.
    pub fn keys<'a>(&'a self, pattern: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let prefix = glob::literal_prefix(pattern);
        let literal = glob::is_literal(pattern);
        let map = self
            .map
            .range::<[u8], _>((
                core::ops::Bound::Included(&prefix[..]),
                core::ops::Bound::Unbounded,
            ))
            .map(|(k, _)| (&k[..], ()));
        let base = self
            .base
            .iter()
            .flat_map(move |b| b.iter_from(&prefix).map(|(k, _)| (k, ())));
        let prefix = glob::literal_prefix(pattern);
        merge(map, base)
            .map(|(k, ())| k)
            .take_while(move |k| k.starts_with(&prefix) && (!literal || k.len() == prefix.len()))
            .filter(move |k| literal || glob::matches(pattern, k, false))
    }
}
