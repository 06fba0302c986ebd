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

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

pub use abi::checkpoint::CheckpointError;
use serde::{de::DeserializeOwned, Serialize};

/// State an app checkpoints.
pub trait State: Serialize + DeserializeOwned {
    /// The app's name: a checkpoint of another app is refused.
    const APP: &'static str;
    /// Schema version: bump it when the type changes incompatibly; a
    /// checkpoint of another version is refused.
    const VERSION: u32;
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
        }
    }
}

/// Decodes a checkpoint blob as `T`, checking app and version.
pub fn decode<T: State>(blob: &[u8]) -> Result<T, Error> {
    let (c, _) = abi::checkpoint::decode(blob).map_err(Error::Format)?;
    if c.app != T::APP {
        return Err(Error::ForeignApp {
            found: c.app.to_string(),
            expected: T::APP,
        });
    }
    if c.schema_version != T::VERSION {
        return Err(Error::IncompatibleVersion {
            found: c.schema_version,
            expected: T::VERSION,
        });
    }
    postcard::from_bytes(c.payload).map_err(Error::Decode)
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

/// Checkpoints `state` now; returns once the host has stored it, with the
/// checkpoint's size in bytes.
pub fn checkpoint<T: State>(state: &T) -> Result<usize, Error> {
    let blob = encode(state)?;
    kernel::checkpoint::save(&blob);
    Ok(blob.len())
}

/// Checkpoints `snapshot()` every time the host asks for a checkpoint
/// (`host-shim checkpoint`) and periodically when the monitor set a period
/// (`--checkpoint-every`). Runs as a background task, so the state is taken
/// between two requests the app serves.
pub fn checkpoint_on_request<T: State + 'static>(snapshot: impl Fn() -> T + 'static) {
    let period = kernel::checkpoint::period_ns();
    kernel::task::spawn(async move {
        loop {
            let deadline = period.map(|p| kernel::time::now_ns() + p);
            kernel::checkpoint::requested_or(deadline).await;
            match checkpoint(&snapshot()) {
                Ok(bytes) => log::info!("checkpoint of {} taken: {bytes} bytes", T::APP),
                Err(e) => log::error!("checkpoint of {} failed: {e}", T::APP),
            }
        }
    });
}
