//! kv's checkpoint state (libcloud::state): every live key with its value
//! and remaining time to live. Deadlines are stored relative to the moment
//! of the checkpoint, because a restored guest's clock starts afresh.

use alloc::vec::Vec;
use core::time::Duration;
use libcloud::serde::{Deserialize, Serialize};
use libcloud::time::Instant;

use crate::store::Store;

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

impl KvState {
    /// The live keys of `store` at `now`.
    pub fn capture(store: &Store, now: Instant) -> Self {
        let keys = store
            .live_entries(now)
            .map(|(k, e)| {
                let ttl = e.expires_at.map(|at| (at - now).as_millis().max(1) as u64);
                (k.clone(), e.value.clone(), ttl)
            })
            .collect();
        Self { keys }
    }

    /// Loads the keys into `store`, deadlines counted from `now`.
    pub fn load_into(self, store: &mut Store, now: Instant) {
        for (key, value, ttl) in self.keys {
            let expires_at = ttl.map(|ms| now + Duration::from_millis(ms));
            store.set(key, value, expires_at);
        }
    }
}
