//! App checkpoints on the host side (see `abi::checkpoint`): validating a
//! checkpoint file before it is handed to a guest, following the chain of
//! full checkpoints and deltas a guest hands over ([`Chain`]) and storing
//! it durably ([`Sink`]s: a directory, where a full checkpoint replaces
//! `latest.ckpt` (temp file + fsync + rename) and a delta is appended to it
//! and synced; the daemon's [`Latest`]; a standby peer), whichever way the
//! blobs come in ([`hand_over`]: our doorbell, QEMU's checkpoint port).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use abi::layout::PAGE_SIZE;

use crate::error::Error;

/// The file a checkpoint directory's latest checkpoint is stored in.
pub const LATEST: &str = "latest.ckpt";

/// Reads and verifies the checkpoint file `path` (a clear error for a
/// missing, truncated, corrupt or non-checkpoint file). Foreign apps and
/// other schema versions are left to the guest, which knows its own. Gives
/// the file's latest chain: its last full checkpoint and the deltas that
/// continue it (a torn last delta is left out), as one blob.
pub fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = crate::files::read_capped(path, abi::checkpoint::MAX_CHECKPOINT)
        .map_err(|e| Error::Config(format!("cannot read checkpoint: {e}")))?;
    if bytes.len() as u64 > abi::checkpoint::MAX_CHECKPOINT {
        return Err(Error::Config(format!(
            "checkpoint {} is {} bytes, more than the limit of {}",
            path.display(),
            bytes.len(),
            abi::checkpoint::MAX_CHECKPOINT
        )));
    }
    let chain = abi::checkpoint::latest_chain(&bytes)
        .map_err(|e| Error::Config(format!("cannot restore from {}: {e}", path.display())))?;
    tracing::info!(
        "restoring from {}: {}",
        path.display(),
        abi::checkpoint::describe_chain(&chain)
    );
    Ok(chain.bytes.to_vec())
}

/// Where a checkpoint of `len` bytes goes in guest RAM of `mem_size` bytes:
/// the top, page-aligned (the guest's heap stops below it). `None` if it
/// would not fit above `image_end`.
pub fn restore_addr(mem_size: u64, image_end: u64, len: u64) -> Option<u64> {
    let addr = mem_size.checked_sub(len)? & !(PAGE_SIZE - 1);
    (addr >= image_end.div_ceil(PAGE_SIZE) * PAGE_SIZE).then_some(addr)
}

/// Stores `blob` as `dir/latest.ckpt`, atomically and durably: written to
/// a temporary file, synced, renamed over the old one, directory synced.
pub fn store(dir: &Path, blob: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(LATEST);
    write_atomic(&path, blob)?;
    Ok(path)
}

/// Where the checkpoints a guest hands over go. `store` returns once the
/// blob is safe there (the guest may acknowledge writes after that).
pub trait Sink: Send {
    /// Stores `blob`: a full checkpoint that starts a new chain (`full`), or
    /// a delta that continues the last blob stored.
    fn store(&mut self, blob: &[u8], full: bool) -> Result<(), String>;
}

/// The chain of blobs a guest is handing over: which delta may come next.
#[derive(Debug, Default)]
pub struct Chain {
    /// Id of the last full checkpoint, and the last delta's number.
    head: Option<(u32, u64)>,
    app: String,
    schema_version: u32,
}

impl Chain {
    /// Checks `blob` (a whole, decoded blob) and makes it the chain's head;
    /// `Ok(true)` for a full checkpoint, `Ok(false)` for the next delta.
    pub fn accept(&mut self, blob: &abi::checkpoint::Blob) -> Result<bool, String> {
        use abi::checkpoint::Blob;
        match blob {
            Blob::Full(c) => {
                self.head = Some((c.id, 0));
                self.app = c.app.to_owned();
                self.schema_version = c.schema_version;
                Ok(true)
            }
            Blob::Delta(d) => match self.head {
                Some((base, seq))
                    if d.base == base
                        && d.seq == seq + 1
                        && d.app == self.app
                        && d.schema_version == self.schema_version =>
                {
                    self.head = Some((base, d.seq));
                    Ok(false)
                }
                Some((base, seq)) => Err(format!(
                    "delta {} of {:#010x} does not continue the chain (at delta {seq} of {base:#010x})",
                    d.seq, d.base
                )),
                None => Err("a delta before any full checkpoint".into()),
            },
        }
    }

    /// Forgets the chain: the next blob must be a full checkpoint.
    pub fn reset(&mut self) {
        self.head = None;
    }
}

/// Takes the blob at the start of `bytes` (one a guest handed over): checks
/// it and that it continues `chain`, and stores it in every sink. Gives its
/// length and whether it is a full checkpoint once every sink has it. When a
/// sink misses it, the chain restarts: only a full checkpoint mends that.
pub fn hand_over<'a, S: Sink + ?Sized + 'a>(
    chain: &mut Chain,
    bytes: &[u8],
    sinks: impl IntoIterator<Item = &'a mut S>,
) -> Result<(usize, bool), String> {
    let (parsed, len) = abi::checkpoint::decode_blob(bytes).map_err(|e| e.to_string())?;
    let full = chain.accept(&parsed)?;
    if let abi::checkpoint::Blob::Full(c) = &parsed {
        tracing::debug!("checkpoint: {}", abi::checkpoint::describe(c));
    }
    let mut result = Ok((len, full));
    for sink in sinks {
        if let Err(e) = sink.store(&bytes[..len], full) {
            result = Err(e);
        }
    }
    if result.is_err() {
        chain.reset();
    }
    result
}

/// A `--checkpoint-to` directory: a full checkpoint replaces `latest.ckpt`
/// atomically; a delta is appended to it and synced (`fdatasync`).
pub struct DirSink {
    dir: PathBuf,
    /// `latest.ckpt`, open for appending, once a full checkpoint is in.
    file: Option<File>,
}

impl DirSink {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, file: None }
    }
}

impl Sink for DirSink {
    fn store(&mut self, blob: &[u8], full: bool) -> Result<(), String> {
        let what = |e: std::io::Error| {
            format!("cannot store the checkpoint in {}: {e}", self.dir.display())
        };
        if full {
            self.file = None;
            let path = store(&self.dir, blob).map_err(what)?;
            self.file = Some(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(path)
                    .map_err(what)?,
            );
            return Ok(());
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| "no full checkpoint stored yet for this delta".to_string())?;
        let result = file.write_all(blob).and_then(|()| file.sync_data());
        if let Err(e) = result {
            // A partial append is a torn tail readers ignore; start afresh.
            self.file = None;
            return Err(what(e));
        }
        Ok(())
    }
}

/// The latest chain (full checkpoint and deltas, as one file's bytes) a
/// running guest handed over, for whoever waits for the next one (the
/// daemon's `checkpoint NAME`).
#[derive(Default)]
pub struct Latest {
    slot: Mutex<(u64, Option<Arc<Vec<u8>>>)>,
    changed: Condvar,
}

impl Latest {
    /// Records a new blob (a full checkpoint starts a new chain, a delta
    /// extends it) and wakes the waiters.
    pub fn put(&self, blob: &[u8], full: bool) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match (&mut slot.1, full) {
            (Some(chain), false) => Arc::make_mut(chain).extend_from_slice(blob),
            (_, true) => slot.1 = Some(Arc::new(blob.to_vec())),
            (None, false) => return,
        }
        slot.0 += 1;
        self.changed.notify_all();
    }

    /// How many checkpoints were recorded so far.
    pub fn count(&self) -> u64 {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Waits until more than `seen` checkpoints were recorded (or `timeout`
    /// passes) and returns the newest.
    pub fn wait_after(&self, seen: u64, timeout: Duration) -> Option<Arc<Vec<u8>>> {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        let (slot, _) = self
            .changed
            .wait_timeout_while(slot, timeout, |s| s.0 <= seen)
            .unwrap_or_else(|e| e.into_inner());
        (slot.0 > seen).then(|| slot.1.clone()).flatten()
    }
}

pub use crate::files::write_atomic;

impl Sink for Arc<Latest> {
    fn store(&mut self, blob: &[u8], full: bool) -> Result<(), String> {
        self.put(blob, full);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(b: &[u8]) -> abi::checkpoint::Blob<'_> {
        abi::checkpoint::decode_blob(b).unwrap().0
    }

    #[test]
    fn a_directory_gets_full_checkpoints_and_appended_deltas() {
        let dir = std::env::temp_dir().join(format!("ckpt-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut sink = DirSink::new(dir.clone());
        let mut chain = Chain::default();
        let base = abi::checkpoint::encode("kv", 1, b"base");
        let id = abi::checkpoint::decode(&base).unwrap().0.id;
        let d1 = abi::checkpoint::encode_delta("kv", 1, id, 1, b"one");
        let d2 = abi::checkpoint::encode_delta("kv", 1, id, 2, b"two");
        // A delta first: refused by the chain, and by the sink.
        assert!(chain.accept(&blob(&d1)).is_err());
        assert!(sink.store(&d1, false).is_err());
        assert_eq!(chain.accept(&blob(&base)), Ok(true));
        sink.store(&base, true).unwrap();
        assert_eq!(chain.accept(&blob(&d1)), Ok(false));
        sink.store(&d1, false).unwrap();
        // Out of order: refused.
        assert!(chain.accept(&blob(&d1)).is_err());
        assert_eq!(chain.accept(&blob(&d2)), Ok(false));
        sink.store(&d2, false).unwrap();
        let path = dir.join(LATEST);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file, [&base[..], &d1, &d2].concat());
        assert_eq!(read_file(&path).unwrap(), file);
        // A torn last delta (a crash mid-append) is left out.
        let d3 = abi::checkpoint::encode_delta("kv", 1, id, 3, b"three");
        std::fs::write(&path, [&file[..], &d3[..d3.len() - 1]].concat()).unwrap();
        assert_eq!(read_file(&path).unwrap(), file);
        // A new full checkpoint replaces the file.
        let newer = abi::checkpoint::encode("kv", 1, b"newer");
        sink.store(&newer, true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), newer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn waiting_for_the_next_checkpoint() {
        let latest = Arc::new(Latest::default());
        assert!(latest.wait_after(0, Duration::from_millis(10)).is_none());
        latest.put(&[9], false); // a delta without its base: dropped
        assert_eq!(latest.count(), 0);
        latest.put(&[1], true);
        let seen = latest.count();
        let l = Arc::clone(&latest);
        let t = std::thread::spawn(move || l.wait_after(seen, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        latest.put(&[2], true);
        assert_eq!(t.join().unwrap().as_deref(), Some(&vec![2]));
        latest.put(&[3], false);
        assert_eq!(
            latest.wait_after(2, Duration::ZERO).as_deref(),
            Some(&vec![2, 3])
        );
    }

    #[test]
    fn placement_at_the_top_of_ram() {
        assert_eq!(
            restore_addr(64 << 20, 0x40_0000, 100),
            Some((64 << 20) - 4096)
        );
        assert_eq!(
            restore_addr(64 << 20, 0x40_0000, 4097),
            Some((64 << 20) - 8192)
        );
        assert_eq!(restore_addr(8 << 20, 0x40_0000, 5 << 20), None);
        assert_eq!(restore_addr(8 << 20, 0, 9 << 20), None);
    }

    #[test]
    fn stores_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("ckpt-test-{}", std::process::id()));
        let blob = abi::checkpoint::encode("kv", 1, b"state");
        let path = store(&dir, &blob).unwrap();
        assert_eq!(read_file(&path).unwrap(), blob);
        let mut bad = blob.clone();
        bad[20] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = read_file(&path).unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        let newer = abi::checkpoint::encode("kv", 1, b"newer state");
        let mut stream = blob.clone();
        stream.extend_from_slice(&newer);
        stream.extend_from_slice(&blob[..9]);
        std::fs::write(&path, &stream).unwrap();
        assert_eq!(read_file(&path).unwrap(), newer);
        std::fs::write(&path, &blob[..10]).unwrap();
        let e = read_file(&path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
