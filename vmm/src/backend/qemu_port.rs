//! The host end of the checkpoint port under QEMU and Firecracker
//! (abi::checkpoint): a unix socket this shim listens on, which QEMU's
//! `virtconsole` (port 0 of a `virtio-serial-device` on the microvm's
//! virtio-mmio bus) connects to, or Firecracker's vsock device when the
//! guest connects to host port `abi::checkpoint::VSOCK_PORT`.
//!
//! At boot the shim writes the chain to restore (its length, then its
//! bytes); the guest reads it before its main runs. Then it reads every
//! blob the guest writes (framed by the blob's own header), checks and
//! stores it like our doorbell does (`checkpoint::hand_over`: a full
//! checkpoint replaces `DIR/latest.ckpt`, a delta is appended and
//! `fdatasync`ed) and only then answers `PORT_STORED`, so a guest's
//! "stored" means the same under QEMU as under our shim.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use abi::checkpoint::{CheckpointError, PORT_CREDIT, PORT_REFUSED, PORT_STORED, PORT_WINDOW};

use crate::checkpoint::{Chain, DirSink};
use crate::config::RunConfig;
use crate::error::Error;

/// How often a port nobody connected to yet looks again.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// A listening checkpoint port and the thread serving it.
pub struct CheckpointPort {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Set once the monitor connected (the socket file is gone then).
    connected: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CheckpointPort {
    /// Listens on a fresh socket for the guest of `config`: the first
    /// connection gets the chain `config.restore` names (none: an empty
    /// one) and hands its checkpoints to `config.checkpoint_to` (`None`:
    /// they are acknowledged and dropped, as by our shim without
    /// `--checkpoint-to`), refusing any that would take the chain past the
    /// guest's bound.
    pub fn listen(config: &RunConfig) -> Result<Self, Error> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "host-shim-{}-{}.ckpt.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        Self::bind(path, config, Window::Credits)
    }

    /// As [`Self::listen`], on the socket `path` (Firecracker connects to
    /// `UDS_PATH_PORT` when the guest connects to vsock port `PORT`; vsock
    /// has flow control of its own: no credits).
    pub fn listen_at(path: PathBuf, config: &RunConfig) -> Result<Self, Error> {
        Self::bind(path, config, Window::None)
    }

    fn bind(path: PathBuf, config: &RunConfig, window: Window) -> Result<Self, Error> {
        let restore = match &config.restore {
            Some(file) => crate::checkpoint::read_file(file)?,
            None => Vec::new(),
        };
        let dir = config.checkpoint_to.clone();
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
        }
        let limit = crate::checkpoint::limit_for(config.mem_size, config.checkpoint_max);
        let listener = UnixListener::bind(&path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| {
                Error::Config(format!(
                    "cannot listen on the checkpoint port {}: {e}",
                    path.display()
                ))
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let connected = Arc::new(AtomicBool::new(false));
        let (now_connected, socket) = (Arc::clone(&connected), path.clone());
        let thread = thread::Builder::new()
            .name("checkpoint-port".into())
            .spawn(move || {
                let Some(stream) = accept(&listener, &flag) else {
                    return;
                };
                // One connection only: nothing more to find at the path.
                let _ = std::fs::remove_file(&socket);
                now_connected.store(true, Ordering::Release);
                let sinks = dir.map(DirSink::new).into_iter().collect();
                if let Err(e) = serve(stream, &restore, sinks, Chain::with_limit(limit), window) {
                    tracing::warn!(error = %e, "checkpoint port failed");
                }
            })
            .map_err(|e| Error::Config(format!("cannot start the checkpoint port: {e}")))?;
        Ok(Self {
            path,
            stop,
            connected,
            thread: Some(thread),
        })
    }

    /// Whether the monitor has connected.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The socket QEMU connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CheckpointPort {
    /// Waits for the port's thread (QEMU is gone: its end is closed).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept(listener: &UnixListener, stop: &AtomicBool) -> Option<UnixStream> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => return stream.set_nonblocking(false).ok().map(|()| stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                thread::sleep(ACCEPT_POLL);
            }
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint port failed");
                return None;
            }
        }
    }
}

/// Whether the guest waits for a [`PORT_CREDIT`] after each
/// [`PORT_WINDOW`] of a blob (QEMU's virtconsole, which drops what its
/// socket cannot take at once) or not (vsock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    Credits,
    None,
}

/// Sends `restore`, then stores and acknowledges blobs (and, with
/// [`Window::Credits`], grants a credit for every whole window of the blob
/// under way) until the monitor closes its end.
fn serve(
    mut stream: impl Read + Write,
    restore: &[u8],
    mut sinks: Vec<DirSink>,
    mut chain: Chain,
    window: Window,
) -> io::Result<()> {
    stream.write_all(&(restore.len() as u64).to_le_bytes())?;
    stream.write_all(restore)?;
    stream.flush()?;
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    // Windows of the blob in `pending` the guest has a credit for.
    let mut credited = 0;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(answer) = next_blob(&mut pending, &mut chain, &mut sinks) {
            stream.write_all(&[answer])?;
            credited = 0;
        }
        if window == Window::Credits {
            // `pending` holds only the start of a blob now.
            let whole = pending.len() / PORT_WINDOW;
            if whole > credited {
                stream.write_all(&vec![PORT_CREDIT; whole - credited])?;
                credited = whole;
            }
        }
    }
}

/// Takes the first whole blob out of `pending`, stores it and gives the
/// answer for the guest; `None` while the blob is still incomplete.
fn next_blob(pending: &mut Vec<u8>, chain: &mut Chain, sinks: &mut [DirSink]) -> Option<u8> {
    let magic = abi::checkpoint::MAGIC.len();
    let framed = match abi::checkpoint::decode_blob(pending) {
        Err(CheckpointError::Truncated) => None,
        Err(CheckpointError::NotACheckpoint) if pending.len() < magic => None,
        Ok((_, len)) => Some(Ok(len)),
        Err(e) => Some(Err(e.to_string())),
    };
    let stored = match framed {
        None if pending.len() as u64 <= abi::checkpoint::MAX_CHECKPOINT => return None,
        Some(Ok(len)) => {
            let r = crate::checkpoint::hand_over(chain, &pending[..len], sinks.iter_mut());
            pending.drain(..len);
            r.map(|_| ())
        }
        // A blob that cannot be framed takes what is buffered with it: the
        // guest writes its next one only after this answer.
        None => {
            pending.clear();
            Err(format!(
                "more than the limit of {} bytes",
                abi::checkpoint::MAX_CHECKPOINT
            ))
        }
        Some(Err(e)) => {
            pending.clear();
            Err(e)
        }
    };
    Some(match stored {
        Ok(()) => PORT_STORED,
        Err(e) => {
            tracing::warn!(error = %e, "the guest's checkpoint is not stored");
            PORT_REFUSED
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest's end of the port: what it writes, then what it got back.
    struct Guest {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Guest {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // A few bytes at a time, as a socket may deliver them.
            let n = buf.len().min(7);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Guest {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn restore_first_then_every_blob_is_stored_before_its_answer() {
        let dir = std::env::temp_dir().join(format!("ckpt-port-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let base = abi::checkpoint::encode("kv", 1, b"base");
        let id = abi::checkpoint::decode(&base).unwrap().0.id;
        let d1 = abi::checkpoint::encode_delta("kv", 1, id, 1, b"one");
        let d3 = abi::checkpoint::encode_delta("kv", 1, id, 3, b"three");
        let mut guest = Guest {
            input: io::Cursor::new([&base[..], &d1, &d3].concat()),
            output: Vec::new(),
        };
        serve(
            &mut guest,
            b"RESTORE",
            vec![DirSink::new(dir.clone())],
            Chain::default(),
            Window::None,
        )
        .unwrap();
        let out = guest.output;
        assert_eq!(out[..8], 7u64.to_le_bytes());
        assert_eq!(&out[8..15], b"RESTORE");
        // Stored, stored, refused (a gap in the chain).
        assert_eq!(&out[15..], [PORT_STORED, PORT_STORED, PORT_REFUSED]);
        let file = std::fs::read(dir.join(crate::checkpoint::LATEST)).unwrap();
        assert_eq!(file, [&base[..], &d1].concat());

        // Garbage is refused and dropped; the next blob is taken again.
        let mut chain = Chain::default();
        let mut sinks = vec![DirSink::new(dir.clone())];
        let mut pending = b"not a checkpoint".to_vec();
        assert_eq!(
            next_blob(&mut pending, &mut chain, &mut sinks),
            Some(PORT_REFUSED)
        );
        assert!(pending.is_empty());
        pending.extend_from_slice(&base[..5]);
        assert_eq!(next_blob(&mut pending, &mut chain, &mut sinks), None);
        pending.extend_from_slice(&base[5..]);
        assert_eq!(
            next_blob(&mut pending, &mut chain, &mut sinks),
            Some(PORT_STORED)
        );
        assert!(pending.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn under_qemu_each_window_of_a_blob_but_the_last_gets_a_credit() {
        let dir = std::env::temp_dir().join(format!("ckpt-window-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Three windows and a bit: three credits, then the answer.
        let body = vec![7u8; 3 * PORT_WINDOW];
        let big = abi::checkpoint::encode("kv", 1, &body);
        assert!(big.len() > 3 * PORT_WINDOW && big.len() < 4 * PORT_WINDOW);
        // Exactly two windows: one credit, then the answer.
        let header = abi::checkpoint::encode("kv", 1, b"").len();
        let exact = abi::checkpoint::encode("kv", 1, &vec![1u8; 2 * PORT_WINDOW - header]);
        assert_eq!(exact.len(), 2 * PORT_WINDOW);
        let mut guest = Guest {
            input: io::Cursor::new([&big[..], &exact].concat()),
            output: Vec::new(),
        };
        serve(
            &mut guest,
            b"",
            vec![DirSink::new(dir.clone())],
            Chain::default(),
            Window::Credits,
        )
        .unwrap();
        assert_eq!(
            &guest.output[8..],
            [
                PORT_CREDIT,
                PORT_CREDIT,
                PORT_CREDIT,
                PORT_STORED,
                PORT_CREDIT,
                PORT_STORED
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
