//! App checkpoints that survive a move to any monitor and the loss of a
//! host: the app declares the state that matters as a serde type, libcloud
//! encodes it with postcard inside a versioned, checksummed container
//! (abi::checkpoint), and a fresh unikernel anywhere restores it.
//!
//! ```ignore
//! #[derive(Serialize, Deserialize, Default)]
//! struct Store { keys: Vec<(String, String)> }
//! impl libcloud::state::State for Store { const APP: &'static str = "kv"; const VERSION: u32 = 1; }
//!
//! let store: Store = libcloud::state::restore()?.unwrap_or_default();
//! libcloud::state::checkpoint(&store)?;            // at a point the app chooses
//! libcloud::state::checkpoint_on_request(move || snapshot_of(&store)); // when the host asks
//! ```
//!
//! **Incremental checkpoints.** An app that knows what changed implements
//! [`Incremental`]: [`checkpoint_incremental`] then hands the host a small
//! delta (tagged with the id of the full checkpoint it continues and a
//! sequence number) instead of the whole state, and a fresh full checkpoint
//! only when there is none yet, the host refused a delta (it has no base
//! for it, e.g. after a restore) or the deltas outgrew the base
//! (compaction). [`restore_chain`] gives the base and the deltas to replay.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub use abi::checkpoint::CheckpointError;
pub use kernel::checkpoint::Saved;
use serde::{de::DeserializeOwned, Serialize};

/// State an app checkpoints.
pub trait State: Serialize + DeserializeOwned {
    /// The app's name: a checkpoint of another app is refused.
    const APP: &'static str;
    /// Schema version: bump it when the type changes incompatibly; a
    /// checkpoint of another version is refused.
    const VERSION: u32;
}

/// An app that tracks its changes, for incremental checkpoints.
pub trait Incremental {
    /// The whole state.
    type Full: State;
    /// What changed between two checkpoints.
    type Delta: Serialize;
    /// The whole state now; the changes tracked so far are covered by it
    /// (forget them).
    fn full(&mut self) -> Self::Full;
    /// What changed since the last [`full`](Self::full) or `delta`, and
    /// forget it; `None` if nothing did.
    fn delta(&mut self) -> Option<Self::Delta>;
}

/// Why a checkpoint could not be restored or made.
#[derive(Debug)]
pub enum Error {
    /// The blob is not a sound checkpoint (damaged, truncated, other format).
    Format(CheckpointError),
    /// The checkpoint belongs to another app.
    ForeignApp {
        found: String,
        expected: &'static str,
    },
    /// The checkpoint has another schema version.
    IncompatibleVersion { found: u32, expected: u32 },
    /// The payload does not decode as the app's state type.
    Decode(postcard::Error),
    /// The state could not be encoded.
    Encode(postcard::Error),
    /// The checkpoint has deltas and was restored with [`restore`], which
    /// reads full checkpoints only (use [`restore_chain`]).
    HasDeltas(usize),
    /// The host did not store the checkpoint.
    NotStored,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Format(e) => write!(f, "{e}"),
            Error::ForeignApp { found, expected } => {
                write!(f, "checkpoint belongs to app {found:?}, not {expected:?}")
            }
            Error::IncompatibleVersion { found, expected } => write!(
                f,
                "checkpoint has schema version {found}, this app reads version {expected}"
            ),
            Error::Decode(e) => write!(f, "checkpoint state does not decode: {e}"),
            Error::Encode(e) => write!(f, "cannot encode state: {e}"),
            Error::HasDeltas(n) => write!(
                f,
                "checkpoint has {n} incremental deltas and this app reads full checkpoints only"
            ),
            Error::NotStored => write!(f, "the host did not store the checkpoint"),
        }
    }
}

fn check<T: State>(app: &str, version: u32) -> Result<(), Error> {
    if app != T::APP {
        return Err(Error::ForeignApp {
            found: app.to_string(),
            expected: T::APP,
        });
    }
    if version != T::VERSION {
        return Err(Error::IncompatibleVersion {
            found: version,
            expected: T::VERSION,
        });
    }
    Ok(())
}

/// Decodes a checkpoint (a full one and the deltas that continue it) as
/// `T` and the deltas as `D`, checking app and version.
pub fn decode_chain<T: State, D: DeserializeOwned>(blob: &[u8]) -> Result<(T, Vec<D>), Error> {
    let (payload, deltas) = decode_chain_payload::<T, D>(blob)?;
    let base = postcard::from_bytes(payload).map_err(Error::Decode)?;
    Ok((base, deltas))
}

/// A full checkpoint's payload, still encoded, and its deltas, decoded.
pub type EncodedChain<'a, D> = (&'a [u8], Vec<D>);

/// Like [`decode_chain`], but leaves the full state encoded: its postcard
/// payload (container, checksum, app and version checked), for an app that
/// decodes it piece by piece (e.g. to serve while it loads).
pub fn decode_chain_payload<T: State, D: DeserializeOwned>(
    blob: &[u8],
) -> Result<EncodedChain<'_, D>, Error> {
    let chain = abi::checkpoint::latest_chain(blob).map_err(Error::Format)?;
    check::<T>(chain.base.app, chain.base.schema_version)?;
    let deltas = chain
        .deltas
        .iter()
        .map(|d| postcard::from_bytes(d.payload).map_err(Error::Decode))
        .collect::<Result<_, _>>()?;
    Ok((chain.base.payload, deltas))
}

/// Decodes a full checkpoint blob as `T`, checking app and version.
pub fn decode<T: State>(blob: &[u8]) -> Result<T, Error> {
    let chain = abi::checkpoint::latest_chain(blob).map_err(Error::Format)?;
    check::<T>(chain.base.app, chain.base.schema_version)?;
    if !chain.deltas.is_empty() {
        return Err(Error::HasDeltas(chain.deltas.len()));
    }
    postcard::from_bytes(chain.base.payload).map_err(Error::Decode)
}

/// Encodes `state` as a checkpoint blob.
pub fn encode<T: State>(state: &T) -> Result<Vec<u8>, Error> {
    let payload = postcard::to_allocvec(state).map_err(Error::Encode)?;
    Ok(abi::checkpoint::encode(T::APP, T::VERSION, &payload))
}

/// The state the monitor handed over (`host-shim run --restore FILE`, or a
/// boot module under QEMU), or `None` when the app starts fresh.
pub fn restore<T: State>() -> Result<Option<T>, Error> {
    kernel::checkpoint::restore_blob().map(decode).transpose()
}

/// The full state and the deltas to replay on it, in order, that the
/// monitor handed over, or `None` when the app starts fresh.
pub fn restore_chain<T: State, D: DeserializeOwned>() -> Result<Option<(T, Vec<D>)>, Error> {
    kernel::checkpoint::restore_blob()
        .map(decode_chain)
        .transpose()
}

/// Like [`restore_chain`], with the full state left encoded
/// ([`decode_chain_payload`]); the payload stays in guest memory for good.
pub fn restore_chain_payload<T: State, D: DeserializeOwned>(
) -> Result<Option<EncodedChain<'static, D>>, Error> {
    kernel::checkpoint::restore_blob()
        .map(decode_chain_payload::<T, D>)
        .transpose()
}

/// The chain this guest is writing: the id of its last stored full
/// checkpoint (valid while `ACTIVE`), deltas since, and their sizes. The
/// guest has one vCPU; atomics keep this safe Rust.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static BASE_ID: AtomicU64 = AtomicU64::new(0);
static SEQ: AtomicU64 = AtomicU64::new(0);
static BASE_BYTES: AtomicUsize = AtomicUsize::new(0);
static DELTA_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Deltas are compacted into a new full checkpoint once they hold more
/// bytes than the base, or than this, whichever is more.
const MIN_COMPACT_BYTES: usize = 1 << 20;

/// What a checkpoint cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Bytes handed to the host (0: nothing had changed).
    pub bytes: usize,
    /// A full checkpoint (else a delta).
    pub full: bool,
}

fn stored(saved: Saved) -> Result<(), Error> {
    match saved {
        Saved::Stored => Ok(()),
        Saved::Refused => Err(Error::NotStored),
    }
}

/// Checkpoints `state` now (a full checkpoint, which later deltas
/// continue); returns once the host has stored it, with its size in bytes.
pub fn checkpoint<T: State>(state: &T) -> Result<usize, Error> {
    let blob = encode(state)?;
    ACTIVE.store(false, Ordering::Relaxed);
    stored(kernel::checkpoint::save(&blob))?;
    let (c, _) = abi::checkpoint::decode(&blob).map_err(Error::Format)?;
    BASE_ID.store(u64::from(c.id), Ordering::Relaxed);
    SEQ.store(0, Ordering::Relaxed);
    BASE_BYTES.store(blob.len(), Ordering::Relaxed);
    DELTA_BYTES.store(0, Ordering::Relaxed);
    ACTIVE.store(true, Ordering::Relaxed);
    Ok(blob.len())
}

/// Checkpoints `app` now, as a delta when there is a chain to continue and
/// it is still small next to its base, else in full. Returns once the host
/// has stored it.
pub fn checkpoint_incremental<I: Incremental>(app: &mut I) -> Result<Taken, Error> {
    type App<I> = <I as Incremental>::Full;
    let compact_at = BASE_BYTES.load(Ordering::Relaxed).max(MIN_COMPACT_BYTES);
    if ACTIVE.load(Ordering::Relaxed) && DELTA_BYTES.load(Ordering::Relaxed) <= compact_at {
        let Some(delta) = app.delta() else {
            return Ok(Taken {
                bytes: 0,
                full: false,
            });
        };
        let payload = postcard::to_allocvec(&delta).map_err(Error::Encode)?;
        let seq = SEQ.load(Ordering::Relaxed) + 1;
        let base = BASE_ID.load(Ordering::Relaxed) as u32;
        let blob =
            abi::checkpoint::encode_delta(App::<I>::APP, App::<I>::VERSION, base, seq, &payload);
        if stored(kernel::checkpoint::save(&blob)).is_ok() {
            SEQ.store(seq, Ordering::Relaxed);
            DELTA_BYTES.fetch_add(blob.len(), Ordering::Relaxed);
            return Ok(Taken {
                bytes: blob.len(),
                full: false,
            });
        }
        // The host has no base for it: the full checkpoint below covers it.
        log::info!(
            "the host refused a delta of {}: sending a full checkpoint",
            App::<I>::APP
        );
    }
    let bytes = checkpoint(&app.full())?;
    Ok(Taken { bytes, full: true })
}

/// Checkpoints `snapshot()` every time the host asks for a checkpoint
/// (`host-shim checkpoint`) and periodically when the monitor set a period
/// (`--checkpoint-every`). Runs as a background task, so the state is taken
/// between two requests the app serves.
pub fn checkpoint_on_request<T: State + 'static>(snapshot: impl Fn() -> T + 'static) {
    on_request_or_period(move |_| checkpoint(&snapshot()).map(|bytes| Taken { bytes, full: true }));
}

/// Like [`checkpoint_on_request`], incrementally: periodic checkpoints are
/// deltas where cheap ([`checkpoint_incremental`]); a checkpoint the host
/// asks for is always full (it is meant to stand alone).
pub fn checkpoint_on_request_incremental<I: Incremental + 'static>(mut app: I) {
    on_request_or_period(move |requested| {
        if requested {
            checkpoint(&app.full()).map(|bytes| Taken { bytes, full: true })
        } else {
            checkpoint_incremental(&mut app)
        }
    });
}

/// Whether the monitor asked for periodic checkpoints (`--checkpoint-every`).
pub fn periodic() -> bool {
    kernel::checkpoint::period_ns().is_some()
}

/// Runs `take(requested)` when the host asks (true) or the period passes.
fn on_request_or_period(mut take: impl FnMut(bool) -> Result<Taken, Error> + 'static) {
    let period = kernel::checkpoint::period_ns();
    kernel::task::spawn(async move {
        loop {
            let deadline = period.map(|p| kernel::time::now_ns() + p);
            let requested = kernel::checkpoint::requested_or(deadline).await;
            match take(requested) {
                Ok(Taken { bytes: 0, .. }) => {}
                Ok(Taken { bytes, full }) => log::info!(
                    "checkpoint taken: {bytes} bytes{}",
                    if full { "" } else { " (delta)" }
                ),
                Err(e) => log::error!("checkpoint failed: {e}"),
            }
        }
    });
}
