//! kv's checkpoint state (libcloud::state): every live key with its value
//! and remaining time to live, and, between two full checkpoints, deltas
//! of the keys changed since (sets, deletes, expiries, FLUSHALL).
//! Deadlines are stored relative to the moment of the checkpoint, because
//! a restored guest's clock starts afresh; each delta records how long
//! after its base it was taken, so that a restore counts every deadline
//! from the last blob it replays.
//!
//! A restore does not decode the full checkpoint into the map: it checks it
//! (container, checksum, app, version, every entry well formed and in key
//! order) and indexes where each live entry starts ([`Encoded`]); the store
//! serves it from there as its base ([`crate::store::Checkpointed`]).

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::time::Duration;
use libcloud::serde::{Deserialize, Serialize};
use libcloud::state::Error;
use libcloud::time::Instant;

use crate::commands::Server;
use crate::store::{Checkpointed, EntryRef, Store};

/// One key: `(key, value, milliseconds left to live)`. Keys and values
/// are byte strings to serde (postcard: a length and the bytes, the same
/// encoding as a `Vec<u8>` sequence, decoded in one copy, not byte by byte).
#[derive(Serialize, Deserialize)]
#[serde(crate = "libcloud::serde")]
pub struct Key(
    #[serde(with = "bytes")] Vec<u8>,
    #[serde(with = "bytes")] Vec<u8>,
    Option<u64>,
);

/// A [`Key`] read in place from the encoded checkpoint.
#[derive(Deserialize)]
#[serde(crate = "libcloud::serde")]
struct KeyRef<'a>(&'a [u8], &'a [u8], Option<u64>);

/// `Vec<u8>` as a serde byte string.
mod bytes {
    use alloc::vec::Vec;
    use libcloud::serde::de::{Error, SeqAccess, Visitor};
    use libcloud::serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut v = Vec::new();
                while let Some(b) = seq.next_element()? {
                    v.push(b);
                }
                Ok(v)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// What a kv checkpoint holds.
#[derive(Serialize, Deserialize, Default)]
#[serde(crate = "libcloud::serde")]
pub struct KvState {
    #[serde(deserialize_with = "presized")]
    pub keys: Vec<Key>,
}

/// Decodes a sequence into a vector allocated once at its final size
/// (postcard gives the length up front; serde's own `Vec` caps its first
/// allocation at 1 MiB and then doubles, copying and touching twice the
/// memory for 100k keys).
fn presized<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: libcloud::serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    use libcloud::serde::de::{SeqAccess, Visitor};
    struct Presized<T>(core::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Presized<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            // Bounded by what the payload can hold (at least a byte each).
            let len = seq.size_hint().unwrap_or(0).min(MAX_PRESIZE);
            let mut v = Vec::new();
            if v.try_reserve_exact(len).is_err() {
                return Err(libcloud::serde::de::Error::custom("out of memory"));
            }
            while let Some(x) = seq.next_element()? {
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(Presized(core::marker::PhantomData))
}

/// The most elements [`presized`] reserves room for up front.
const MAX_PRESIZE: usize = 1 << 20;

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

fn key_of(key: &[u8], e: EntryRef, now: Instant) -> Key {
    let ttl = e.expires_at.map(|at| (at - now).as_millis().max(1) as u64);
    Key(key.to_vec(), e.value.to_vec(), ttl)
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
        // Sized once (not doubled as it fills): best effort, it only saves
        // copies.
        let mut keys = Vec::new();
        let _ = keys.try_reserve_exact(store.len());
        keys.extend(store.live_entries(now).map(|(k, e)| key_of(k, e, now)));
        Self { keys }
    }
}

/// The entries of a full checkpoint, still encoded: the payload of a
/// [`KvState`] in guest memory and where each live [`Key`] starts in it.
pub struct Encoded {
    payload: &'static [u8],
    starts: Vec<u32>,
    /// Deadlines count from `now` less `age` ms.
    now: Instant,
    age: u64,
}

/// Keys with a deadline, and when (for the store's expiry index).
pub type Volatile = Vec<(Instant, Vec<u8>)>;

impl Encoded {
    /// Checks and indexes an encoded [`KvState`] whose deadlines count
    /// from `age` ms before `now`: every entry must decode and the keys must
    /// come in strictly increasing order. Entries expired already are left
    /// out; the others with a deadline are returned too.
    pub fn index(
        payload: &'static [u8],
        now: Instant,
        age: u64,
    ) -> Result<(Self, Volatile), Error> {
        let (n, mut rest) = postcard::take_from_bytes::<usize>(payload).map_err(Error::Decode)?;
        if payload.len() > u32::MAX as usize {
            return Err(Error::Decode(postcard::Error::DeserializeBadEncoding));
        }
        // At least 3 bytes an entry: bounds the reservation.
        let mut starts = Vec::new();
        starts
            .try_reserve_exact(n.min(payload.len() / 3))
            .map_err(|_| Error::Decode(postcard::Error::SerdeDeCustom))?;
        let mut volatile = Vec::new();
        let mut last: Option<&[u8]> = None;
        for _ in 0..n {
            let start = (payload.len() - rest.len()) as u32;
            let (KeyRef(key, _, ttl), tail) =
                postcard::take_from_bytes::<KeyRef>(rest).map_err(Error::Decode)?;
            if last.is_some_and(|l| l >= key) {
                return Err(Error::Decode(postcard::Error::DeserializeBadEncoding));
            }
            last = Some(key);
            rest = tail;
            match deadline(ttl, age, now) {
                None => {} // expired
                Some(at) => {
                    starts.push(start);
                    if let Some(at) = at {
                        volatile.push((at, key.to_vec()));
                    }
                }
            }
        }
        let encoded = Self {
            payload,
            starts,
            now,
            age,
        };
        Ok((encoded, volatile))
    }

    fn entry(&self, i: usize) -> KeyRef<'static> {
        let at = self.starts[i] as usize;
        // Checked by `index`.
        postcard::take_from_bytes::<KeyRef>(&self.payload[at..])
            .map(|(k, _)| k)
            .unwrap_or(KeyRef(&[], &[], Some(0)))
    }
}

impl Checkpointed for Encoded {
    fn len(&self) -> usize {
        self.starts.len()
    }

    fn key(&self, i: usize) -> &[u8] {
        self.entry(i).0
    }

    fn get(&self, i: usize) -> (&[u8], EntryRef<'_>) {
        let KeyRef(key, value, ttl) = self.entry(i);
        // Live when indexed.
        let expires_at = deadline(ttl, self.age, self.now).flatten();
        (key, EntryRef { value, expires_at })
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
        for Key(key, value, ttl) in self.sets {
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
/// how many deltas were replayed. The full checkpoint's entries are loaded
/// in place ([`Store::restore`]), the deltas into the map.
pub fn restore(store: &mut Store) -> Result<Option<usize>, Error> {
    let Some((base, deltas)) = libcloud::state::restore_chain_payload::<KvState, KvDelta>()? else {
        return Ok(None);
    };
    let now = Instant::now();
    let last = deltas.last().map_or(0, |d| d.at_ms);
    let n = deltas.len();
    let (base, volatile) = Encoded::index(base, now, last)?;
    store.restore(Box::new(base), volatile.into_iter());
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
