//! The migration stream: typed, length-prefixed messages over one TCP
//! connection (an HTTP/1.1 connection upgraded to `host-shim-migration`).
//!
//! ```text
//! frame    = kind: u8, length: u32 LE, payload
//! source -> destination
//!   Hello     postcard(Hello): versions, memory size, CPUID, who is coming
//!   Pages     u32 LE n, n × u32 LE page index, n × 4096 bytes
//!   Zeroes    u32 LE n, n × u32 LE page index (pages that became zero)
//!   Sync      (empty) answer Synced once everything before it is taken in
//!   State     postcard(MachineState): vCPU, clock, devices (guest paused)
//!   Abort     UTF-8 reason
//! destination -> source
//!   Accept    postcard(Accept): the destination's name, region, overlay
//!   Refuse    UTF-8 reason (version, CPUID, memory, name or address)
//!   Synced    (empty) everything up to the Sync is written into guest memory
//!   Ack       postcard(Ack): the guest runs here since `resumed_unix_ns`
//!   Failed    UTF-8 reason (the destination could not restore)
//! ```
//!
//! The handshake ([`Hello`]) carries [`PROTOCOL_VERSION`], the snapshot
//! format version, `abi::ABI_VERSION`, the guest's memory size and the
//! CPUID it runs with; the destination refuses what it cannot honour before
//! any memory moves.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use crate::snapshot::format::PAGE;
use crate::snapshot::state::{ImageId, NicSpec};

/// Version of this message layout (2: `Sync`/`Synced` before the pause).
pub const PROTOCOL_VERSION: u32 = 2;
/// Pages per `Pages` message.
pub const PAGES_PER_MESSAGE: usize = 256;
/// Largest payload accepted (a corrupt length must not allocate gigabytes).
const MAX_PAYLOAD: u32 = 64 << 20;

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
    Accept = 16,
    Refuse = 17,
    Ack = 18,
    Failed = 19,
    Synced = 20,
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
            16 => Kind::Accept,
            17 => Kind::Refuse,
            18 => Kind::Ack,
            19 => Kind::Failed,
            20 => Kind::Synced,
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
}

/// The destination takes the guest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Accept {
    pub name: String,
    pub region: String,
    pub overlay: Option<SocketAddr>,
}

/// The guest runs at the destination.
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
}

/// Writes one message.
pub fn write_msg<W: Write>(w: &mut W, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

/// Writes a postcard-encoded message.
pub fn write_value<W: Write, T: Serialize>(w: &mut W, kind: Kind, value: &T) -> io::Result<()> {
    let bytes = postcard::to_stdvec(value).map_err(|e| io::Error::other(e.to_string()))?;
    write_msg(w, kind, &bytes)
}

/// Reads one message.
pub fn read_msg<R: Read>(r: &mut R) -> Result<Message, ProtocolError> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        Err(e) => return Err(e.into()),
    }
    let kind = Kind::from_u8(head[0]).ok_or(ProtocolError::UnknownKind(head[0]))?;
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::Malformed(format!("{kind:?} of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            e.into()
        }
    })?;
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
        let idx_end = 4 + n * 4;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let mut buf = Vec::new();
        let ack = Ack {
            resumed_unix_ns: 5,
            restore_us: 7,
        };
        write_value(&mut buf, Kind::Ack, &ack).unwrap();
        let page = vec![9u8; PAGE];
        write_msg(&mut buf, Kind::Pages, &encode_pages(&[3], &page)).unwrap();
        write_msg(&mut buf, Kind::Zeroes, &encode_pages(&[1, 2], &[])).unwrap();
        let mut r = &buf[..];
        let m = read_msg(&mut r).unwrap();
        assert_eq!(m.kind, Kind::Ack);
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
    }
}
