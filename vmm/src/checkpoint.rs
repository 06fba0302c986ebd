//! App checkpoints on the host side (see `abi::checkpoint`): validating a
//! checkpoint file before it is handed to a guest, following the chain of
//! full checkpoints and deltas a guest hands over ([`Chain`]) and storing
//! it durably ([`Sink`]s: a directory, where a full checkpoint replaces
//! `latest.ckpt` (temp file + fsync + rename) and a delta is appended to it
//! and synced; the daemon's [`Latest`]; a standby peer), whichever way the
//! blobs come in ([`hand_over`]: our doorbell, QEMU's checkpoint port).
//!
//! A chain is bounded ([`Chain::limit`], at most
//! [`abi::checkpoint::MAX_CHECKPOINT`], what a restore accepts): a blob
//! that would grow it past its limit is refused, so the guest sends a full
//! checkpoint instead, and no sink (the file on disk, [`Latest`] in memory,
//! a standby peer) ever holds more than the limit for one instance.

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
    let bytes = shim_util::files::read_capped(path, abi::checkpoint::MAX_CHECKPOINT)
        .map_err(|e| Error::Config(format!("cannot read checkpoint: {e}")))?;
    let chain = abi::checkpoint::latest_chain(&bytes)
        .map_err(|e| Error::Config(format!("cannot restore from {}: {e}", path.display())))?;
    tracing::info!(
        path = %path.display(),
        checkpoint = %abi::checkpoint::describe_chain(&chain),
        "restoring from a checkpoint"
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
    shim_util::files::private_dir(dir)?;
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

/// The chain of blobs a guest is handing over: which delta may come next,
/// and whether it still fits.
#[derive(Debug)]
pub struct Chain {
    /// Id of the last full checkpoint, and the last delta's number.
    head: Option<(u32, u64)>,
    app: String,
    schema_version: u32,
    /// Bytes of the chain so far (its full checkpoint and deltas).
    bytes: u64,
    /// The most bytes the chain may hold.
    limit: u64,
}

impl Default for Chain {
    fn default() -> Self {
        Self::with_limit(abi::checkpoint::MAX_CHECKPOINT)
    }
}

/// An instance's checkpoints may hold this many times its memory (on disk,
/// and in the daemon's memory), and never more than a restore accepts.
pub const LIMIT_PER_MEM: u64 = 2;

/// The chain limit of a guest with `mem_size` bytes of RAM: `max` when
/// the operator set one (`--max-checkpoint`), else [`LIMIT_PER_MEM`] times
/// its memory; never more than a restore accepts.
pub fn limit_for(mem_size: u64, max: Option<u64>) -> u64 {
    max.unwrap_or_else(|| mem_size.saturating_mul(LIMIT_PER_MEM))
        .min(abi::checkpoint::MAX_CHECKPOINT)
}

/// The smallest `--max-checkpoint`: one page (a kv base of an empty store
/// is a few hundred bytes).
pub const MIN_LIMIT: u64 = PAGE_SIZE;

/// Parses a `--max-checkpoint` value: a size (K/M/G) from [`MIN_LIMIT`] up
/// to [`abi::checkpoint::MAX_CHECKPOINT`], what a restore accepts; a chain
/// larger than that could be stored but never restored.
pub fn parse_limit(s: &str) -> Result<u64, String> {
    let bytes = crate::config::parse_byte_size(s)?;
    let max = abi::checkpoint::MAX_CHECKPOINT;
    if bytes > max {
        return Err(format!(
            "{s} is more than a restore accepts ({} MiB): a chain that large could be \
             stored but never restored",
            max >> 20
        ));
    }
    if bytes < MIN_LIMIT {
        return Err(format!(
            "{s} is less than one page ({MIN_LIMIT} bytes): no checkpoint would fit"
        ));
    }
    Ok(bytes)
}

impl Chain {
    /// A chain that may hold at most `limit` bytes (capped at
    /// [`abi::checkpoint::MAX_CHECKPOINT`]).
    pub fn with_limit(limit: u64) -> Self {
        Self {
            head: None,
            app: String::new(),
            schema_version: 0,
            bytes: 0,
            limit: limit.min(abi::checkpoint::MAX_CHECKPOINT),
        }
    }

    /// The most bytes the chain may hold.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Checks `blob` (a whole, decoded blob) and makes it the chain's head;
    /// `Ok(true)` for a full checkpoint, `Ok(false)` for the next delta.
    /// A blob that would take the chain past its limit is refused (the
    /// chain stays as it was: a full checkpoint restarts it).
    pub fn accept(&mut self, blob: &abi::checkpoint::Blob) -> Result<bool, String> {
        use abi::checkpoint::Blob;
        let len = blob.encoded_len() as u64;
        match blob {
            _ if len > self.limit => Err(format!(
                "a blob of {len} bytes, more than this instance's checkpoint limit of {}",
                self.limit
            )),
            Blob::Full(c) => {
                self.head = Some((c.id, 0));
                self.app = c.app.to_owned();
                self.schema_version = c.schema_version;
                self.bytes = len;
                Ok(true)
            }
            Blob::Delta(_) if self.head.is_some() && self.bytes + len > self.limit => {
                Err(format!(
                    "the chain would grow to {} bytes, more than this instance's checkpoint \
                     limit of {}: send a full checkpoint",
                    self.bytes + len,
                    self.limit
                ))
            }
            Blob::Delta(d) => match self.head {
                Some((base, seq))
                    if d.base == base
                        && d.seq == seq + 1
                        && d.app == self.app
                        && d.schema_version == self.schema_version =>
                {
                    self.head = Some((base, d.seq));
                    self.bytes += len;
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
        tracing::debug!(checkpoint = %abi::checkpoint::describe(c), "checkpoint received");
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
            self.file = Some(shim_util::files::open_append(&path).map_err(what)?);
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
///
/// Bounded like every sink (its blobs come through a [`Chain`]); on its own
/// it also drops a delta that would take it past
/// [`abi::checkpoint::MAX_CHECKPOINT`]. It counts the blobs the guest's
/// chain refused ([`Latest::refused`], `GET /v1/stats`).
#[derive(Default)]
pub struct Latest {
    slot: Mutex<(u64, Option<Arc<Vec<u8>>>)>,
    changed: Condvar,
    refused: std::sync::atomic::AtomicU64,
}

impl Latest {
    /// Records a new blob (a full checkpoint starts a new chain, a delta
    /// extends it) and wakes the waiters. A delta without its base, or
    /// past the limit, is dropped (`false`).
    pub fn put(&self, blob: &[u8], full: bool) -> bool {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match (&mut slot.1, full) {
            (Some(chain), false)
                if (chain.len() + blob.len()) as u64 <= abi::checkpoint::MAX_CHECKPOINT =>
            {
                Arc::make_mut(chain).extend_from_slice(blob)
            }
            (_, true) => slot.1 = Some(Arc::new(blob.to_vec())),
            (_, false) => return false,
        }
        slot.0 += 1;
        self.changed.notify_all();
        true
    }

    /// Counts a blob the guest handed over that was refused.
    pub fn note_refused(&self) {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many blobs were refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
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

pub use shim_util::files::write_atomic;

impl Sink for Arc<Latest> {
    fn store(&mut self, blob: &[u8], full: bool) -> Result<(), String> {
        if self.put(blob, full) {
            Ok(())
        } else {
            Err("a delta without its base, or past the limit".into())
        }
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
        // A damaged delta with sound ones after it: the restore fails,
        // saying how many it would drop.
        let mut damaged = [&file[..], &d3[..]].concat();
        damaged[base.len() + 20] ^= 0xff;
        std::fs::write(&path, &damaged).unwrap();
        let e = read_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("damaged after delta 0") && e.contains("2 sound blobs"),
            "{e}"
        );
        // A new full checkpoint replaces the file.
        let newer = abi::checkpoint::encode("kv", 1, b"newer");
        sink.store(&newer, true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), newer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_chain_past_its_limit_is_refused_until_a_full_checkpoint() {
        let base = abi::checkpoint::encode("kv", 1, &[1; 1000]);
        let id = abi::checkpoint::decode(&base).unwrap().0.id;
        let delta = |seq| abi::checkpoint::encode_delta("kv", 1, id, seq, &[2; 1000]);
        let limit = base.len() as u64 + 2 * delta(1).len() as u64;
        let mut chain = Chain::with_limit(limit);
        let latest = Arc::new(Latest::default());
        let mut sinks = [Arc::clone(&latest)];
        let mut hand = |b: &[u8]| hand_over(&mut chain, b, sinks.iter_mut());
        assert_eq!(hand(&base), Ok((base.len(), true)));
        assert_eq!(hand(&delta(1)), Ok((delta(1).len(), false)));
        assert_eq!(hand(&delta(2)), Ok((delta(2).len(), false)));
        let e = hand(&delta(3)).unwrap_err();
        assert!(e.contains("send a full checkpoint"), "{e}");
        assert!(hand(&delta(3)).is_err(), "still refused");
        // What the sinks hold stayed within the limit.
        let held = latest.wait_after(0, Duration::ZERO).unwrap();
        assert_eq!(held.len() as u64, limit);
        // A full checkpoint restarts the chain.
        assert!(hand(&base).is_ok());
        assert!(hand(&delta(1)).is_ok());
        // A full checkpoint bigger than the limit is refused outright.
        let mut small = Chain::with_limit(100);
        let e = small.accept(&blob(&base)).unwrap_err();
        assert!(e.contains("limit of 100"), "{e}");
        assert_eq!(limit_for(64 << 20, None), 128 << 20);
        assert_eq!(limit_for(1 << 30, None), abi::checkpoint::MAX_CHECKPOINT);
        assert_eq!(limit_for(64 << 20, Some(8 << 20)), 8 << 20);
        assert_eq!(limit_for(4 << 20, Some(200 << 20)), 200 << 20);
    }

    #[test]
    fn the_limit_flag_is_refused_past_what_a_restore_accepts() {
        assert_eq!(parse_limit("8M"), Ok(8 << 20));
        assert_eq!(parse_limit("256M"), Ok(abi::checkpoint::MAX_CHECKPOINT));
        let e = parse_limit("257M").unwrap_err();
        assert!(e.contains("more than a restore accepts (256 MiB)"), "{e}");
        assert!(parse_limit("1K")
            .unwrap_err()
            .contains("less than one page"));
        assert!(parse_limit("lots").is_err());
    }

    #[test]
    fn waiting_for_the_next_checkpoint() {
        let latest = Arc::new(Latest::default());
        assert!(latest.wait_after(0, Duration::from_millis(10)).is_none());
        assert!(
            !latest.put(&[9], false),
            "a delta without its base: dropped"
        );
        assert_eq!(latest.count(), 0);
        latest.put(&[1], true);
        let seen = latest.count();
        let l = Arc::clone(&latest);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // "PID/task/TID": then nothing blocks before the wait.
            let me = std::fs::read_link("/proc/thread-self").unwrap();
            tid_tx.send(me).unwrap();
            l.wait_after(seen, Duration::from_secs(10))
        });
        // The put comes once the waiter sleeps in its wait.
        let me = tid_rx.recv().unwrap();
        let stat = std::path::Path::new("/proc").join(&me).join("stat");
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = std::fs::read_to_string(&stat).unwrap();
            // The state follows the command name, in parentheses.
            if s[s.rfind(')').unwrap() + 2..].starts_with('S') {
                break;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "the waiter did not sleep within 10 s: {s}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let put_at = std::time::Instant::now();
        latest.put(&[2], true);
        assert_eq!(t.join().unwrap().as_deref(), Some(&vec![2]));
        // Woken by the put, not by its 10 s timeout.
        assert!(
            put_at.elapsed() < Duration::from_secs(5),
            "the waiter returned {:?} after the put",
            put_at.elapsed()
        );
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
