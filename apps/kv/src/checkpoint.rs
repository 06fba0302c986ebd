//! kv's checkpoint state (libcloud::state): every live key with its value
//! and remaining time to live, and, between two full checkpoints, deltas
//! of the keys changed since (sets, deletes, expiries, FLUSHALL).
//! Deadlines are stored relative to the moment of the checkpoint, because
//! a restored guest's clock starts afresh; each delta records how long
//! after its base it was taken, so that a restore counts every deadline
//! from the last blob it replays.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::time::Duration;
use libcloud::serde::{Deserialize, Serialize};
use libcloud::time::Instant;

use crate::commands::Server;
use crate::store::{Entry, Store};

/// One key: `(key, value, milliseconds left to live)`.
type Key = (Vec<u8>, Vec<u8>, Option<u64>);

/// What a kv checkpoint holds.
#[derive(Serialize, Deserialize, Default)]
#[serde(crate = "libcloud::serde")]
pub struct KvState {
    pub keys: Vec<Key>,
}

impl libcloud::state::State for KvState {
    const APP: &'static str = "kv";
    const VERSION: u32 = 1;
}

/// The keys changed since the previous blob of the chain.
#[derive(Serialize, Deserialize, Default)]
#[serde(crate = "libcloud::serde")]
pub struct KvDelta {
    /// Milliseconds since the full checkpoint the chain starts from.
    pub at_ms: u64,
    /// FLUSHALL first.
    pub cleared: bool,
    /// Keys set or changed (TTLs as of `at_ms`).
    pub sets: Vec<Key>,
    /// Keys deleted or expired.
    pub dels: Vec<Vec<u8>>,
}

fn key_of(key: &[u8], e: &Entry, now: Instant) -> Key {
    let ttl = e.expires_at.map(|at| (at - now).as_millis().max(1) as u64);
    (key.to_vec(), e.value.clone(), ttl)
}

/// A deadline `ttl` ms after the blob taken `age` ms before `now`; `None`
/// inside when it has passed already.
fn deadline(ttl: Option<u64>, age: u64, now: Instant) -> Option<Option<Instant>> {
    match ttl {
        None => Some(None),
        Some(ms) if ms > age => Some(Some(now + Duration::from_millis(ms - age))),
        Some(_) => None,
    }
}

impl KvState {
    /// The live keys of `store` at `now`.
    pub fn capture(store: &Store, now: Instant) -> Self {
        let keys = store
            .live_entries(now)
            .map(|(k, e)| key_of(k, e, now))
            .collect();
        Self { keys }
    }

    /// Loads the keys into `store`, deadlines counted from `now` less the
    /// checkpoint's `age` in ms.
    pub fn load_into(self, store: &mut Store, now: Instant, age: u64) {
        for (key, value, ttl) in self.keys {
            if let Some(expires_at) = deadline(ttl, age, now) {
                store.set(key, value, expires_at);
            }
        }
    }
}

impl KvDelta {
    /// Replays the delta on `store`; `age`: ms from it to the last blob.
    fn apply(self, store: &mut Store, now: Instant, age: u64) {
        if self.cleared {
            store.clear();
        }
        for key in self.dels {
            store.remove(&key, now);
        }
        for (key, value, ttl) in self.sets {
            match deadline(ttl, age, now) {
                Some(expires_at) => {
                    store.set(key, value, expires_at);
                }
                None => {
                    store.remove(&key, now);
                }
            }
        }
    }
}

/// Restores a checkpoint (a full one and its deltas) into `store`; returns
/// how many deltas were replayed.
pub fn restore(store: &mut Store) -> Result<Option<usize>, libcloud::state::Error> {
    let Some((base, deltas)) = libcloud::state::restore_chain::<KvState, KvDelta>()? else {
        return Ok(None);
    };
    let now = Instant::now();
    let last = deltas.last().map_or(0, |d| d.at_ms);
    let n = deltas.len();
    base.load_into(store, now, last);
    for d in deltas {
        let age = last.saturating_sub(d.at_ms);
        d.apply(store, now, age);
    }
    Ok(Some(n))
}

/// kv's incremental checkpoints: the store tracks the keys it changes, and
/// a delta holds their current entries (or their deletion).
#[derive(Clone)]
pub struct KvCheckpoints {
    server: Rc<RefCell<Server>>,
    /// When the last full checkpoint was taken.
    base_at: Rc<Cell<Instant>>,
}

impl KvCheckpoints {
    /// Starts tracking the changes of `server`'s store.
    pub fn new(server: Rc<RefCell<Server>>) -> Self {
        server.borrow_mut().store.track_changes();
        Self {
            server,
            base_at: Rc::new(Cell::new(Instant::now())),
        }
    }
}

impl libcloud::state::Incremental for KvCheckpoints {
    type Full = KvState;
    type Delta = KvDelta;

    fn full(&mut self) -> KvState {
        let mut server = self.server.borrow_mut();
        let now = Instant::now();
        server.store.take_dirty();
        self.base_at.set(now);
        KvState::capture(&server.store, now)
    }

    fn delta(&mut self) -> Option<KvDelta> {
        let mut server = self.server.borrow_mut();
        let dirty = server.store.take_dirty()?;
        let now = Instant::now();
        let mut delta = KvDelta {
            at_ms: (now - self.base_at.get()).as_millis() as u64,
            cleared: dirty.cleared,
            ..KvDelta::default()
        };
        for key in dirty.keys {
            match server.store.entry(&key) {
                Some(e) if e.expires_at.is_none_or(|at| at > now) => {
                    delta.sets.push(key_of(&key, e, now))
                }
                _ => delta.dels.push(key),
            }
        }
        Some(delta)
    }
}
