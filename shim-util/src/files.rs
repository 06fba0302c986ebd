//! Files the daemon keeps and files callers name, handled as if every other
//! local user were hostile.
//!
//! State the shim writes (snapshots, checkpoints, instance records, standby
//! copies) lives in directories only its owner can enter ([`private_dir`],
//! mode 0700) in files only its owner can read (mode 0600), created with
//! `O_EXCL | O_NOFOLLOW` so a symlink or file planted in advance is refused
//! rather than followed or overwritten ([`create_new`], [`write_atomic`],
//! [`open_append`]). Files a caller names are read only if they are regular
//! files, and never past a size cap ([`read_capped`]): `/dev/zero`, a FIFO
//! or a 40 GiB file gets a clear error, not the daemon's memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of directories the shim keeps state in.
pub const DIR_MODE: u32 = 0o700;
/// Mode of files the shim writes.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and its parents) if missing and makes sure it is a real
/// directory (not a symlink) owned by us with mode 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory (a symlink or a file stands there)",
            dir.display()
        )));
    }
    // The daemon must own the directories it trusts.
    let uid = std::os::unix::fs::MetadataExt::uid(&meta);
    if uid != current_uid() {
        return Err(io::Error::other(format!(
            "{} belongs to uid {uid}, not to this process's user: refusing to keep state there",
            dir.display()
        )));
    }
    if meta.permissions().mode() & 0o777 != DIR_MODE {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

fn current_uid() -> u32 {
    crate::sys::uid()
}

/// Creates `path` as a new file, mode 0600; fails if anything (a file, a
/// symlink, a FIFO) already stands there.
pub fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens `path` for appending, creating it (0600) if missing; refuses a
/// symlink.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Writes `bytes` to `path` atomically and durably: a new temporary file
/// with an unpredictable name beside it (0600, `O_EXCL|O_NOFOLLOW`), fsync,
/// rename over `path`, fsync of the directory. A reader sees the old file
/// or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let mut suffix = [0u8; 8];
    getrandom::getrandom(&mut suffix).map_err(|e| io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", u64::from_le_bytes(suffix)));
    let written = (|| {
        let mut f = create_new(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(&dir)?.sync_all()
}

/// Why a caller-named file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path} is larger than the limit of {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
}

/// Reads the regular file `path` whole, refusing anything else (devices,
/// FIFOs, directories: checked on the opened file, so no swap in between)
/// and anything over `limit` bytes, however the file grows while read.
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.to_owned(),
        source,
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular {
            path: path.to_owned(),
        });
    }
    let too_large = || ReadError::TooLarge {
        path: path.to_owned(),
        limit,
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        private_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn a_planted_symlink_is_refused_not_followed() {
        let dir = tmpdir("symlink");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let trap = dir.join("state");
        std::os::unix::fs::symlink(&victim, &trap).unwrap();
        assert!(create_new(&trap).is_err());
        assert!(open_append(&trap).is_err());
        // write_atomic replaces the link itself, never the file it points to.
        write_atomic(&trap, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&trap).unwrap(), b"new");
        let mode = std::fs::metadata(&trap).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, FILE_MODE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn private_dirs_are_0700_and_not_symlinks() {
        let dir = tmpdir("dir");
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, DIR_MODE);
        let link = dir.join("link");
        std::os::unix::fs::symlink("/tmp", &link).unwrap();
        assert!(private_dir(&link).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_regular_files_under_the_cap_are_read() {
        let dir = tmpdir("read");
        let f = dir.join("f");
        std::fs::write(&f, vec![7u8; 100]).unwrap();
        assert_eq!(read_capped(&f, 100).unwrap().len(), 100);
        assert!(matches!(
            read_capped(&f, 99),
            Err(ReadError::TooLarge { .. })
        ));
        assert!(matches!(
            read_capped(Path::new("/dev/zero"), 1 << 20),
            Err(ReadError::NotRegular { .. })
        ));
        assert!(matches!(
            read_capped(&dir, 1 << 20),
            Err(ReadError::NotRegular { .. })
        ));
        assert!(matches!(
            read_capped(&dir.join("missing"), 1),
            Err(ReadError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
