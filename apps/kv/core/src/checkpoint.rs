//! kv's checkpoint state: every live key with its value and remaining time
//! to live, and, between two full checkpoints, deltas of the keys changed
//! since (sets, deletes, expiries, FLUSHALL), as postcard payloads (the
//! guest wraps them in libcloud's checksummed container).
//! Deadlines are stored relative to the moment of the checkpoint, because
//! a restored guest's clock starts afresh; each delta records how long
//! after its base it was taken, so that a restore counts every deadline
//! from the last blob it replays.
//!
//! A restore does not decode the full checkpoint into the map: it checks it
//! (every entry well formed and in key order) and indexes where each live
//! entry starts ([`Encoded`]); the store serves it from there as its base
//! ([`crate::store::Checkpointed`]).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::time::Duration;
use serde::{Deserialize, Serialize};

use crate::store::{Checkpointed, EntryRef, Store};
use crate::Instant;

/// The app name kv's checkpoints carry: another app's are refused.
pub const APP: &str = "kv";
/// The schema version of [`KvState`] and [`KvDelta`]: bump it when they
/// change incompatibly.
pub const VERSION: u32 = 1;

/// Why a checkpoint payload cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The payload does not decode as a [`KvState`] or [`KvDelta`].
    #[error("checkpoint state does not decode: {0}")]
    Decode(postcard::Error),
    /// Two keys of a full checkpoint are not in strictly increasing order.
    #[error("checkpoint state does not decode: keys out of order")]
    Unordered,
    /// Bytes follow the last entry.
    #[error("checkpoint state does not decode: {0} bytes after the last key")]
    TrailingBytes(usize),
    /// The payload is larger than the index of entry offsets can address.
    #[error("checkpoint state is larger than 4 GiB")]
    TooLarge,
    /// No memory for the index of the checkpoint's entries.
    #[error("out of memory for the checkpoint's index")]
    OutOfMemory,
}

/// One key: `(key, value, milliseconds left to live)`. Keys and values
/// are byte strings to serde (postcard: a length and the bytes, the same
/// encoding as a `Vec<u8>` sequence, decoded in one copy, not byte by byte).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Key(
    #[serde(with = "bytes")] pub Vec<u8>,
    #[serde(with = "bytes")] pub Vec<u8>,
    pub Option<u64>,
);

/// A [`Key`] read in place from the encoded checkpoint.
#[derive(Deserialize)]
struct KeyRef<'a>(&'a [u8], &'a [u8], Option<u64>);

/// `Vec<u8>` as a serde byte string.
mod bytes {
    use alloc::vec::Vec;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

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
#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq, Eq)]
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
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    use serde::de::{SeqAccess, Visitor};
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
                return Err(serde::de::Error::custom("out of memory"));
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

/// The keys changed since the previous blob of the chain.
#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq, Eq)]
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
/// [`KvState`] (borrowed from guest memory, or owned) and where each live
/// [`Key`] starts in it.
pub struct Encoded<B> {
    payload: B,
    starts: Vec<u32>,
    /// Deadlines count from `now` less `age` ms.
    now: Instant,
    age: u64,
}

/// Keys with a deadline, and when (for the store's expiry index).
pub type Volatile = Vec<(Instant, Vec<u8>)>;

impl<B: AsRef<[u8]>> Encoded<B> {
    /// Checks and indexes an encoded [`KvState`] whose deadlines count
    /// from `age` ms before `now`: every entry must decode and the keys must
    /// come in strictly increasing order. Entries expired already are left
    /// out; the others with a deadline are returned too.
    pub fn index(payload: B, now: Instant, age: u64) -> Result<(Self, Volatile), Error> {
        let bytes = payload.as_ref();
        if bytes.len() > u32::MAX as usize {
            return Err(Error::TooLarge);
        }
        let (n, mut rest) = postcard::take_from_bytes::<usize>(bytes).map_err(Error::Decode)?;
        // At least 3 bytes an entry: bounds the reservation.
        let mut starts = Vec::new();
        starts
            .try_reserve_exact(n.min(bytes.len() / 3))
            .map_err(|_| Error::OutOfMemory)?;
        let mut volatile = Vec::new();
        let mut last: Option<&[u8]> = None;
        for _ in 0..n {
            let start = (bytes.len() - rest.len()) as u32;
            let (KeyRef(key, _, ttl), tail) =
                postcard::take_from_bytes::<KeyRef>(rest).map_err(Error::Decode)?;
            if last.is_some_and(|l| l >= key) {
                return Err(Error::Unordered);
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
        if !rest.is_empty() {
            // Not what a capture writes: damaged, or written by other code.
            return Err(Error::TrailingBytes(rest.len()));
        }
        let encoded = Self {
            payload,
            starts,
            now,
            age,
        };
        Ok((encoded, volatile))
    }

    fn entry(&self, i: usize) -> KeyRef<'_> {
        let at = self.starts[i] as usize;
        // Checked by `index`.
        postcard::take_from_bytes::<KeyRef>(&self.payload.as_ref()[at..])
            .map(|(k, _)| k)
            .unwrap_or(KeyRef(&[], &[], Some(0)))
    }
}

impl<B: AsRef<[u8]>> Checkpointed for Encoded<B> {
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

/// Restores a checkpoint into the empty `store` at `now`: `base` is the
/// encoded [`KvState`] of the full checkpoint, `deltas` the deltas that
/// continue it, in order. The full checkpoint's entries are served in
/// place ([`Store::restore`]), the deltas replayed into the map. Nothing is
/// restored if the base does not check out.
pub fn restore<B: AsRef<[u8]> + 'static>(
    store: &mut Store,
    base: B,
    deltas: Vec<KvDelta>,
    now: Instant,
) -> Result<(), Error> {
    let last = deltas.last().map_or(0, |d| d.at_ms);
    let (base, volatile) = Encoded::index(base, now, last)?;
    store.restore(Box::new(base), volatile.into_iter());
    for d in deltas {
        let age = last.saturating_sub(d.at_ms);
        d.apply(store, now, age);
    }
    Ok(())
}

/// Incremental checkpoints of a store: a full [`KvState`] now and then,
/// and in between [`KvDelta`]s of the keys it changed (the store tracks
/// them from [`Checkpoints::new`] on).
#[derive(Debug, Clone, Copy)]
pub struct Checkpoints {
    /// When the last full checkpoint was taken.
    base_at: Instant,
}

impl Checkpoints {
    /// Starts tracking the changes of `store`.
    pub fn new(store: &mut Store, now: Instant) -> Self {
        store.track_changes();
        Self { base_at: now }
    }

    /// The whole keyspace at `now`; the changes tracked so far are covered
    /// by it.
    pub fn full(&mut self, store: &mut Store, now: Instant) -> KvState {
        store.take_dirty();
        self.base_at = now;
        KvState::capture(store, now)
    }

    /// The keys changed since the last [`full`](Self::full) or `delta`, as
    /// they are at `now`; `None` if none did.
    pub fn delta(&mut self, store: &mut Store, now: Instant) -> Option<KvDelta> {
        let dirty = store.take_dirty()?;
        let mut delta = KvDelta {
            at_ms: (now - self.base_at).as_millis() as u64,
            cleared: dirty.cleared,
            ..KvDelta::default()
        };
        for key in dirty.keys {
            match store.entry(&key) {
                Some(e) if e.expires_at.is_none_or(|at| at > now) => {
                    delta.sets.push(key_of(&key, e, now))
                }
                _ => delta.dels.push(key),
            }
        }
        Some(delta)
    }
}
