//! The migration stream: typed, length-prefixed, checksummed messages over
//! one TCP connection (an HTTP/1.1 connection upgraded to
//! `host-shim-migration`), every read and write under a deadline
//! ([`Conn`]), and the commit that makes a migration happen exactly once.
//!
//! ```text
//! frame    = kind: u8, length: u32 LE, crc: u32 LE (CRC-32 of kind,
//!            length and payload), payload
//! source -> destination
//!   Hello     postcard(Hello): versions, migration id, memory size, CPUID,
//!             NIC, who is coming and the source daemon's API address
//!   Pages     u32 LE n, n × u32 LE page index, n × 4096 bytes
//!   Zeroes    u32 LE n, n × u32 LE page index (pages that became zero)
//!   Sync      (empty) answer Synced once everything before it is taken in
//!   State     postcard(MachineState): vCPU, clock, devices (guest paused)
//!   Commit    (empty) the source let its copy go: start the guest
//!   Abort     UTF-8 reason
//!   Query     u64 LE migration id: the only message of a fresh connection
//! destination -> source
//!   Accept    postcard(Accept): the destination's name, region, overlay
//!   Refuse    UTF-8 reason (version, CPUID, memory, name or address)
//!   Synced    (empty) everything up to the Sync is written into guest memory
//!   Ready     (empty) the state is checked and restored; the guest is not
//!             started
//!   Committed postcard(Ack): the guest runs here since `resumed_unix_ns`
//!   Failed    UTF-8 reason: the guest is not running here and never will
//!   Outcome   u8: 1 the guest was started here, 0 it was not and never will
//! ```
//!
//! The handshake ([`Hello`]) carries [`PROTOCOL_VERSION`], the snapshot
//! format version, `abi::ABI_VERSION`, the guest's memory size and the
//! CPUID it runs with; the destination refuses what it cannot honour before
//! any memory moves, and checks the final state field by field against it.
//!
//! # Exactly once
//!
//! The destination starts the guest only on `Commit`, and the source sends
//! `Commit` only after `Ready`, never resuming on its own afterwards. Each
//! destination keeps a decision per migration id (pending, started,
//! aborted), changed once under a lock: `Commit` turns pending into started
//! (the guest is launched under that lock), anything else into aborted, and
//! so does a `Query`, so the answer to a `Query` is final.
//!
//! | step | source | destination | a failure here (cut, death, corrupt frame, deadline) |
//! |---|---|---|---|
//! | 1 `Hello`/`Accept` | guest runs | reserves name, address, MAC | source keeps running; destination releases the reservation |
//! | 2 pre-copy (`Pages`, `Sync`) | guest runs | writes pages | same |
//! | 3 paused: last pages, `State` | guest paused | checks `State` against `Hello` and the reservation, restores it (not started), `Ready` | source resumes; destination discards |
//! | 4 `Commit` | on `Ready`: from now on never resumes unless the destination says it will not run the guest; sends `Commit` | waits for `Commit` ([`COMMIT_WAIT`]); on it: decision started, guest launched, `Committed` | destination without `Commit`: if the source daemon refuses connections (it is gone, and its guest with it) it starts the guest, else decision aborted, discards |
//! | 5 `Committed` | drops its copy | guest runs | source without `Committed`: asks with `Query` on fresh connections: started → drops its copy; not started → resumes; destination daemon refusing connections (gone, with anything it ran) → resumes; no answer → keeps the guest paused ("in doubt") and asks again until answered or stopped |
//!
//! A killed source before step 4 takes its guest with it: no copy can run
//! (the destination has no complete state before `Ready`).

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use crate::faults::{Fault, Injected, Step};
use vmm::snapshot::format::PAGE;
use vmm::snapshot::state::{ImageId, NicSpec};

/// The HTTP upgrade (`Upgrade: host-shim-migration`) that turns a
/// `POST /v1/migration` connection into a migration stream.
pub const MIGRATION_PROTOCOL: &str = "host-shim-migration";

/// Version of this message layout (3: checksummed frames, `Ready`,
/// `Commit`, `Committed`, `Query`, `Outcome`; 4: `Hello::record`).
pub const PROTOCOL_VERSION: u32 = 4;
/// Pages per `Pages` message.
pub const PAGES_PER_MESSAGE: usize = 256;
/// Largest payload accepted (a corrupt length must not allocate gigabytes).
const MAX_PAYLOAD: u32 = 64 << 20;
/// The longest a single read or write on a migration stream may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination waits for `Commit` after `Ready`.
pub const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Pages = 2,
    Zeroes = 3,
    State = 4,
    Abort = 5,
    Sync = 6,
    Commit = 7,
    Query = 8,
    Accept = 16,
    Refuse = 17,
    Committed = 18,
    Failed = 19,
    Synced = 20,
    Ready = 21,
    Outcome = 22,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Pages,
            3 => Kind::Zeroes,
            4 => Kind::State,
            5 => Kind::Abort,
            6 => Kind::Sync,
            7 => Kind::Commit,
            8 => Kind::Query,
            16 => Kind::Accept,
            17 => Kind::Refuse,
            18 => Kind::Committed,
            19 => Kind::Failed,
            20 => Kind::Synced,
            21 => Kind::Ready,
            22 => Kind::Outcome,
            _ => return None,
        })
    }
}

/// The source introduces the guest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub format_version: u32,
    pub abi_version: u32,
    /// Names this migration in a later `Query`.
    pub migration_id: u64,
    /// The instance name.
    pub name: String,
    pub mem_size: u64,
    /// The CPUID the guest runs with: the destination must offer it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub nic: Option<NicSpec>,
    pub image: ImageId,
    /// The source shim's name and overlay address.
    pub source: String,
    pub source_overlay: Option<SocketAddr>,
    /// The source daemon's API address (whether it is still there).
    pub source_api: Option<SocketAddr>,
    /// What brings the app back after its daemon restarts (`--restart
    /// always`, checkpoint settings), when the source recorded that; its
    /// image is in the destination's image store by then. The destination
    /// keeps only what a run may ask for itself (its own paths, this image).
    #[serde(default)]
    pub record: Option<api::RunRequest>,
}

/// The destination takes the guest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Accept {
    pub name: String,
    pub region: String,
    pub overlay: Option<SocketAddr>,
    /// Microseconds the destination spent on its checks and reservation,
    /// and creating the VM, between `Hello` and `Accept`.
    pub checks_us: u64,
    pub vm_us: u64,
}

/// The guest runs at the destination (`Committed`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Ack {
    /// When its vCPU thread started, on the destination's clock (ns since
    /// the Unix epoch).
    pub resumed_unix_ns: u64,
    /// How long the destination took from the final state to running.
    pub restore_us: u64,
}

/// One received message.
#[derive(Debug)]
pub struct Message {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// Errors of the stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the connection closed")]
    Closed,
    #[error("unexpected message {0:?}")]
    Unexpected(Kind),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("a corrupt {0:?} frame (checksum mismatch)")]
    Corrupt(Kind),
}

fn crc(head: &[u8; 5], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(payload);
    h.finalize()
}

/// Writes one message.
pub fn write_msg<W: Write>(w: &mut W, kind: Kind, payload: &[u8]) -> io::Result<()> {
    write_frame(w, kind, payload, false)
}

/// Writes one message, with one byte flipped if `corrupt`.
fn write_frame<W: Write>(w: &mut W, kind: Kind, payload: &[u8], corrupt: bool) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut sum = crc(&head, payload).to_le_bytes();
    w.write_all(&head)?;
    if corrupt && payload.is_empty() {
        sum[0] ^= 0x40;
    }
    w.write_all(&sum)?;
    if corrupt && !payload.is_empty() {
        let mut bad = payload.to_vec();
        bad[payload.len() / 2] ^= 0x40;
        return w.write_all(&bad);
    }
    w.write_all(payload)
}

/// Writes a postcard-encoded message.
pub fn write_value<W: Write, T: Serialize>(w: &mut W, kind: Kind, value: &T) -> io::Result<()> {
    let bytes = postcard::to_stdvec(value).map_err(|e| io::Error::other(e.to_string()))?;
    write_msg(w, kind, &bytes)
}

/// How much of a declared payload is allocated ahead of its bytes.
const READ_PIECE: usize = 64 << 10;

/// Reads one message.
pub fn read_msg<R: Read>(r: &mut R) -> Result<Message, ProtocolError> {
    let eof = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            e.into()
        }
    };
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(eof)?;
    let kind = Kind::from_u8(head[0]).ok_or(ProtocolError::UnknownKind(head[0]))?;
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::Malformed(format!("{kind:?} of {len} bytes")));
    }
    let mut sum = [0u8; 4];
    r.read_exact(&mut sum).map_err(eof)?;
    // Allocated as the bytes arrive, a piece at a time: a peer that
    // declares 64 MiB and sends nothing costs a piece, not 64 MiB.
    let mut payload = Vec::new();
    let mut left = len as usize;
    while left > 0 {
        let start = payload.len();
        let piece = left.min(READ_PIECE);
        payload.resize(start + piece, 0);
        r.read_exact(&mut payload[start..]).map_err(eof)?;
        left -= piece;
    }
    if crc(&head, &payload) != u32::from_le_bytes(sum) {
        return Err(ProtocolError::Corrupt(kind));
    }
    Ok(Message { kind, payload })
}

impl Message {
    /// Decodes a postcard payload.
    pub fn value<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtocolError> {
        postcard::from_bytes(&self.payload)
            .map_err(|e| ProtocolError::Malformed(format!("{:?}: {e}", self.kind)))
    }

    /// A text payload.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// Splits a `Pages` payload into (index, page data) pairs, or a
    /// `Zeroes` payload into indices (data empty).
    pub fn pages(&self) -> Result<(Vec<u32>, &[u8]), ProtocolError> {
        let p = &self.payload;
        let bad = |why: &str| ProtocolError::Malformed(format!("{:?}: {why}", self.kind));
        let n = u32::from_le_bytes(
            p.get(..4)
                .ok_or_else(|| bad("short"))?
                .try_into()
                .expect("4"),
        ) as usize;
        let idx_end = n
            .checked_mul(4)
            .and_then(|b| b.checked_add(4))
            .ok_or_else(|| bad("too many pages"))?;
        let indices: Vec<u32> = p
            .get(4..idx_end)
            .ok_or_else(|| bad("short index list"))?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        let data = &p[idx_end..];
        let want = if self.kind == Kind::Pages {
            n * PAGE
        } else {
            0
        };
        if data.len() != want {
            return Err(bad(&format!("{} bytes of data for {n} pages", data.len())));
        }
        Ok((indices, data))
    }
}

/// Encodes a `Pages` message from `(index, data)`.
pub fn encode_pages(indices: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + indices.len() * 4 + data.len());
    out.extend_from_slice(&(indices.len() as u32).to_le_bytes());
    for i in indices {
        out.extend_from_slice(&i.to_le_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// A byte stream both ways (object safe: [`Conn`] holds one boxed).
trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

/// An upgraded connection: reads go through the buffer that may already
/// hold the first bytes after the HTTP head, writes straight to the stream.
struct Upgraded<S>(BufReader<S>);

impl<S: Read> Read for Upgraded<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<S: Write> Write for Upgraded<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}

/// One stream used by a reader and a writer: each half locks it for one
/// call.
#[derive(Clone)]
struct Shared(Arc<Mutex<Box<dyn Duplex>>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Box<dyn Duplex>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One half of a connection that fails once a deadline has passed (each
/// call also blocks at most [`IO_TIMEOUT`], the socket's timeouts).
struct Timed {
    inner: Shared,
    deadline: Option<Instant>,
}

impl Timed {
    fn check(&self) -> io::Result<()> {
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the deadline of this migration step passed",
            )),
            _ => Ok(()),
        }
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.check()?;
        self.inner.lock().read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        self.inner.lock().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.lock().flush()
    }
}

/// A migration connection (plain or TLS): buffered halves with deadlines,
/// a handle to cut it from another thread, and the injected fault.
pub struct Conn {
    sock: TcpStream,
    r: BufReader<Timed>,
    w: BufWriter<Timed>,
    fault: Option<Injected>,
    corrupt_next: bool,
    /// Cut here: nothing more goes or comes, even bytes already buffered.
    cut: bool,
}

impl Conn {
    /// Wraps an upgraded connection, `stream` (plain or TLS) running over
    /// the TCP socket `sock`; every read and write on it blocks at most
    /// [`IO_TIMEOUT`].
    pub fn new<S: Read + Write + Send + 'static>(
        stream: BufReader<S>,
        sock: TcpStream,
        fault: Option<Injected>,
    ) -> io::Result<Self> {
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.set_write_timeout(Some(IO_TIMEOUT))?;
        sock.set_nodelay(true)?;
        let shared = Shared(Arc::new(Mutex::new(Box::new(Upgraded(stream)))));
        let half = |s: Shared| Timed {
            inner: s,
            deadline: None,
        };
        Ok(Self {
            r: BufReader::with_capacity(1 << 20, half(shared.clone())),
            w: BufWriter::with_capacity(1 << 20, half(shared)),
            sock,
            fault,
            corrupt_next: false,
            cut: false,
        })
    }

    /// Every read and write fails once `within` has passed from now.
    pub fn deadline(&mut self, within: Duration) {
        let at = Instant::now() + within;
        self.r.get_mut().deadline = Some(at);
        self.w.get_mut().deadline = Some(at);
    }

    /// Reads block at most `t` (not [`IO_TIMEOUT`]) until the next call.
    pub fn read_timeout(&self, t: Duration) -> io::Result<()> {
        self.sock.set_read_timeout(Some(t))
    }

    /// A handle on the socket, to cut it from another thread.
    pub fn handle(&self) -> io::Result<TcpStream> {
        self.sock.try_clone()
    }

    /// Sends one message (buffered: [`Self::flush`] sends it now).
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        if self.cut {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let corrupt = std::mem::take(&mut self.corrupt_next);
        write_frame(&mut self.w, kind, payload, corrupt)
    }

    /// Sends a postcard-encoded message.
    pub fn send_value<T: Serialize>(&mut self, kind: Kind, value: &T) -> io::Result<()> {
        let bytes = postcard::to_stdvec(value).map_err(|e| io::Error::other(e.to_string()))?;
        self.send(kind, &bytes)
    }

    /// Sends one message now.
    pub fn send_now(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        self.send(kind, payload)?;
        self.flush()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }

    /// Receives one message.
    pub fn recv(&mut self) -> Result<Message, ProtocolError> {
        if self.cut {
            return Err(ProtocolError::Closed);
        }
        read_msg(&mut self.r)
    }

    /// The other side's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.sock.peer_addr().ok()
    }

    /// Shuts the connection down both ways; what was received and not
    /// yet read is dropped.
    pub fn cut(&mut self) {
        self.cut = true;
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    /// Applies the injected fault if it strikes at `step`.
    pub fn at(&mut self, step: Step, side: &str) {
        let Some(f) = self.fault.filter(|f| f.step == step) else {
            return;
        };
        tracing::warn!(%side, fault = %f, "test fault injected");
        match f.fault {
            Fault::Die => std::process::exit(137),
            Fault::Cut => self.cut(),
            Fault::Corrupt => self.corrupt_next = true,
            // Until the connection is cut (by a Query or a stop).
            Fault::Hang => loop {
                match self.sock.peek(&mut [0u8; 1]) {
                    Ok(0) => break,
                    Ok(_) => std::thread::sleep(Duration::from_millis(50)),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => break,
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes, and the largest buffer a read was asked to fill.
    struct Watched<'a> {
        bytes: &'a [u8],
        widest: usize,
    }

    impl Read for Watched<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.widest = self.widest.max(buf.len());
            self.bytes.read(buf)
        }
    }

    #[test]
    fn a_declared_payload_is_allocated_as_it_arrives() {
        // 64 MiB declared, 10 bytes sent: the reader is never handed more
        // than a piece to fill, and the message is cut short.
        let mut head = vec![Kind::Pages as u8];
        head.extend_from_slice(&MAX_PAYLOAD.to_le_bytes());
        head.extend_from_slice(&[0; 4 + 10]);
        let mut r = Watched {
            bytes: &head,
            widest: 0,
        };
        assert!(matches!(read_msg(&mut r), Err(ProtocolError::Closed)));
        assert!(r.widest <= READ_PIECE, "a {} byte buffer", r.widest);
        // A payload of several pieces still arrives whole.
        let big: Vec<u8> = (0..5 * READ_PIECE + 7).map(|i| i as u8).collect();
        let mut buf = Vec::new();
        write_msg(&mut buf, Kind::Pages, &big).unwrap();
        let m = read_msg(&mut &buf[..]).unwrap();
        assert_eq!(m.payload, big);
    }

    #[test]
    fn messages_round_trip() {
        let mut buf = Vec::new();
        let ack = Ack {
            resumed_unix_ns: 5,
            restore_us: 7,
        };
        write_value(&mut buf, Kind::Committed, &ack).unwrap();
        let page = vec![9u8; PAGE];
        write_msg(&mut buf, Kind::Pages, &encode_pages(&[3], &page)).unwrap();
        write_msg(&mut buf, Kind::Zeroes, &encode_pages(&[1, 2], &[])).unwrap();
        let mut r = &buf[..];
        let m = read_msg(&mut r).unwrap();
        assert_eq!(m.kind, Kind::Committed);
        assert_eq!(m.value::<Ack>().unwrap().restore_us, 7);
        let m = read_msg(&mut r).unwrap();
        let (idx, data) = m.pages().unwrap();
        assert_eq!(idx, [3]);
        assert_eq!(data, &page[..]);
        let m = read_msg(&mut r).unwrap();
        assert_eq!(m.pages().unwrap().0, [1, 2]);
        assert!(matches!(read_msg(&mut r), Err(ProtocolError::Closed)));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(
            read_msg(&mut &[99u8, 0, 0, 0, 0][..]),
            Err(ProtocolError::UnknownKind(99))
        ));
        assert!(matches!(
            read_msg(&mut &[2u8, 0xff, 0xff, 0xff, 0xff][..]),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            read_msg(&mut &[2u8, 10, 0, 0, 0, 1][..]),
            Err(ProtocolError::Closed)
        ));
        let m = Message {
            kind: Kind::Pages,
            payload: encode_pages(&[1], &[0; 10]),
        };
        assert!(m.pages().is_err());
        let m = Message {
            kind: Kind::Zeroes,
            payload: u32::MAX.to_le_bytes().to_vec(),
        };
        assert!(m.pages().is_err());
    }

    #[test]
    fn a_flipped_byte_is_caught() {
        for payload in [&b""[..], &b"state"[..]] {
            let mut buf = Vec::new();
            write_frame(&mut buf, Kind::Commit, payload, true).unwrap();
            assert!(matches!(
                read_msg(&mut &buf[..]),
                Err(ProtocolError::Corrupt(Kind::Commit))
            ));
            let mut buf = Vec::new();
            write_frame(&mut buf, Kind::Commit, payload, false).unwrap();
            for at in 0..buf.len() {
                let mut bad = buf.clone();
                bad[at] ^= 0x01;
                assert!(read_msg(&mut &bad[..]).is_err(), "byte {at}");
            }
        }
    }
}
