//! App checkpoints on the host side (see `abi::checkpoint`): validating a
//! checkpoint file before it is handed to a guest, storing the checkpoints
//! a guest hands over durably (temp file + fsync + rename), and finding
//! the latest complete checkpoint in a stream of them (QEMU's COM2 file).

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
/// other schema versions are left to the guest, which knows its own. A
/// file of several checkpoints one after another (QEMU's COM2 stream)
/// gives its latest complete one.
pub fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read checkpoint {}: {e}", path.display())))?;
    if bytes.len() as u64 > abi::checkpoint::MAX_CHECKPOINT {
        return Err(Error::Config(format!(
            "checkpoint {} is {} bytes, more than the limit of {}",
            path.display(),
            bytes.len(),
            abi::checkpoint::MAX_CHECKPOINT
        )));
    }
    abi::checkpoint::decode(&bytes)
        .map_err(|e| Error::Config(format!("cannot restore from {}: {e}", path.display())))?;
    // A stream of checkpoints (QEMU's COM2 file): its latest complete one.
    let latest = latest_in_stream(&bytes).expect("the first one decodes");
    if let Ok((ckpt, _)) = abi::checkpoint::decode(latest) {
        tracing::info!(
            "restoring from {}: {}",
            path.display(),
            abi::checkpoint::describe(&ckpt)
        );
    }
    Ok(latest.to_vec())
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

/// The latest checkpoint a running guest handed over, for whoever waits
/// for the next one (the daemon's `checkpoint NAME`).
#[derive(Default)]
pub struct Latest {
    slot: Mutex<(u64, Option<Arc<Vec<u8>>>)>,
    changed: Condvar,
}

impl Latest {
    /// Records a new checkpoint and wakes the waiters.
    pub fn put(&self, blob: Vec<u8>) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.0 += 1;
        slot.1 = Some(Arc::new(blob));
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

/// Writes `blob` to `path` atomically and durably (temp file in the same
/// directory, fsync, rename).
pub fn write_atomic(path: &Path, blob: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(blob)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(&dir)?.sync_all()
}

/// The last complete checkpoint in `stream` (checkpoints written one after
/// another; a torn or damaged tail is ignored).
pub fn latest_in_stream(stream: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    let mut latest = None;
    while at < stream.len() {
        match abi::checkpoint::decode(&stream[at..]) {
            Ok((_, len)) => {
                latest = Some(&stream[at..at + len]);
                at += len;
            }
            Err(_) => break,
        }
    }
    latest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_complete_blob_of_a_stream() {
        let a = abi::checkpoint::encode("kv", 1, b"one");
        let b = abi::checkpoint::encode("kv", 1, b"two two");
        let mut s = a.clone();
        s.extend_from_slice(&b);
        assert_eq!(latest_in_stream(&s), Some(&b[..]));
        s.extend_from_slice(&a[..a.len() - 3]); // torn
        assert_eq!(latest_in_stream(&s), Some(&b[..]));
        assert_eq!(latest_in_stream(&a[..5]), None);
        assert_eq!(latest_in_stream(&[]), None);
    }

    #[test]
    fn waiting_for_the_next_checkpoint() {
        let latest = Arc::new(Latest::default());
        assert!(latest.wait_after(0, Duration::from_millis(10)).is_none());
        latest.put(vec![1]);
        let seen = latest.count();
        let l = Arc::clone(&latest);
        let t = std::thread::spawn(move || l.wait_after(seen, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        latest.put(vec![2]);
        assert_eq!(t.join().unwrap().as_deref(), Some(&vec![2]));
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
