//! The images a monitor booted lately, kept in memory: a thousand launches
//! of one image open and `fstat` its file a thousand times, but read,
//! validate and hash it once.
//!
//! An entry is found by the file's path and must match the open file's
//! device, inode, size, and modification and change times: a file
//! rewritten or replaced is read again (its change time moves, and no
//! caller can set that back; to the file system's clock granularity, a
//! few ms). A file that changes while it is read is used
//! for that boot only. At most [`MAX_ENTRIES`] images of at most
//! [`MAX_BYTES`] in all are kept; the least recently used goes first.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::Digest;

use super::loader::{self, ImageInfo};
use crate::error::{Error, ImageError, ImageFileError};
use crate::snapshot::state::ImageId;

/// Images kept at most...
pub const MAX_ENTRIES: usize = 16;
/// ... and their bytes in all.
pub const MAX_BYTES: usize = 64 << 20;

/// A validated image: its identity, what boot needs to know of it, its bytes.
#[derive(Debug)]
pub struct CachedImage {
    pub id: ImageId,
    pub info: ImageInfo,
    pub bytes: Vec<u8>,
}

/// What identifies one version of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Key {
    fn of(path: &Path, meta: &std::fs::Metadata) -> Self {
        Self {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The cache (one per monitor process).
#[derive(Debug, Default)]
pub struct ImageCache {
    /// Least recently used first.
    entries: Mutex<Vec<(Key, Arc<CachedImage>)>>,
}

impl ImageCache {
    /// The image at `path`, validated (not against a memory size: see
    /// [`ImageInfo::check_fits`]), from the cache if the file did not
    /// change since it was read.
    pub fn get(&self, path: &Path) -> Result<Arc<CachedImage>, Error> {
        let wrap = |kind| {
            Error::Image(ImageFileError {
                path: path.to_owned(),
                kind,
            })
        };
        let io = |e: io::Error| wrap(ImageError::Io(e));
        let mut file = loader::open_nonblocking(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let key = Key::of(path, &meta);
        {
            let mut entries = self.lock();
            if let Some(at) = entries.iter().position(|(k, _)| *k == key) {
                let entry = entries.remove(at);
                let image = Arc::clone(&entry.1);
                entries.push(entry);
                return Ok(image);
            }
        }
        let bytes = read_all(&mut file, meta.len()).map_err(io)?;
        let info = loader::validate(&bytes[..]).map_err(wrap)?;
        let digest = sha2::Sha256::digest(&bytes);
        let image = Arc::new(CachedImage {
            id: ImageId {
                path: path.display().to_string(),
                size: bytes.len() as u64,
                sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
            },
            info,
            bytes,
        });
        // Kept only if the file did not change while it was read.
        let unchanged = file.metadata().is_ok_and(|m| Key::of(path, &m) == key);
        if unchanged && image.bytes.len() <= MAX_BYTES {
            let mut entries = self.lock();
            entries.retain(|(k, _)| k.path != key.path);
            entries.push((key, Arc::clone(&image)));
            let mut total: usize = entries.iter().map(|(_, i)| i.bytes.len()).sum();
            while entries.len() > MAX_ENTRIES || total > MAX_BYTES {
                let (_, gone) = entries.remove(0);
                total -= gone.bytes.len();
            }
        }
        Ok(image)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(Key, Arc<CachedImage>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads `file` (of `size` bytes when opened) whole, refusing more than
/// [`crate::machine::MAX_IMAGE_FILE`] bytes.
fn read_all(file: &mut File, size: u64) -> io::Result<Vec<u8>> {
    let max = crate::machine::MAX_IMAGE_FILE;
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("larger than {max} bytes"),
        )
    };
    if size > max {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_file(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("image-cache-{}-{name}.img", std::process::id()));
        std::fs::write(&path, crate::testutil::TestImage::exit(7).build()).unwrap();
        path
    }

    #[test]
    fn one_image_is_read_once_and_again_when_it_changes() {
        let cache = ImageCache::default();
        let path = image_file("once");
        let a = cache.get(&path).unwrap();
        let b = cache.get(&path).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the second boot reads nothing");
        assert_eq!(a.id.size, a.bytes.len() as u64);
        assert_eq!(a.id.sha256.len(), 64);
        // Rewritten in place with other bytes of the same size: read again
        // (once the file system's clock, coarse, has moved on).
        let mut other = a.bytes.clone();
        *other.last_mut().unwrap() ^= 0xff;
        let before = Key::of(&path, &std::fs::metadata(&path).unwrap());
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            std::fs::write(&path, &other).unwrap();
            if Key::of(&path, &std::fs::metadata(&path).unwrap()) != before {
                break;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "the file's modification time did not change within 10 s of rewrites"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let c = cache.get(&path).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.bytes, other);
        assert_ne!(c.id.sha256, a.id.sha256);
        assert_eq!(cache.lock().len(), 1, "the old version is gone");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn bad_files_are_refused_and_the_cache_is_bounded() {
        let cache = ImageCache::default();
        let dir = std::env::temp_dir();
        let err = cache.get(&dir).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let junk = dir.join(format!("image-cache-{}-junk.img", std::process::id()));
        std::fs::write(&junk, b"not an image").unwrap();
        assert!(cache.get(&junk).is_err());
        assert!(cache.lock().is_empty(), "nothing kept of a bad image");
        let _ = std::fs::remove_file(&junk);
        let paths: Vec<PathBuf> = (0..MAX_ENTRIES + 3)
            .map(|i| image_file(&format!("many{i}")))
            .collect();
        for p in &paths {
            cache.get(p).unwrap();
        }
        let entries = cache.lock();
        assert_eq!(entries.len(), MAX_ENTRIES);
        assert_eq!(entries[0].0.path, paths[3], "the oldest went first");
        drop(entries);
        for p in &paths {
            let _ = std::fs::remove_file(p);
        }
    }
}
