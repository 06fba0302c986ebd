//! App checkpoints: the app's own state, serialised by `libcloud::state`,
//! that a fresh unikernel on any monitor can restore (unlike a VM snapshot,
//! which only our shim on a same-CPU host can resume).
//!
//! A checkpoint is one self-describing, checksummed blob:
//!
//! ```text
//! magic "LCCKPT01" | format u32 | app name (u16 length + UTF-8) | schema version u32
//! | payload length u64 | payload | CRC-32 (IEEE) of everything before it, u32
//! ```
//!
//! (all integers little-endian). The payload is the app's state encoded
//! with postcard. Both sides parse it: the guest before restoring, the host
//! to check and describe a checkpoint file without booting anything.
//!
//! **Incremental checkpoints.** A *delta* carries only what changed since
//! the previous blob of its chain:
//!
//! ```text
//! magic "LCDELT01" | format u32 | app name | schema version u32 | base id u32
//! | sequence u64 | payload length u64 | payload | CRC-32, u32
//! ```
//!
//! The base id is the CRC of the full checkpoint the chain starts from
//! ([`Checkpoint::id`]); sequence numbers count 1, 2, 3... from it. A
//! checkpoint *file* is blobs one after another;
//! what it holds is its last full checkpoint followed by the deltas that
//! continue that chain ([`latest_chain`]). A torn tail (a delta cut short
//! by a crash mid-write) or a blob that does not continue the chain ends
//! it, and is never applied; damage *followed by* sound blobs is an error
//! ([`CheckpointError::DamagedInside`]): restoring would silently drop the
//! state those blobs hold.
//!
//! Delivery on our shim: the guest hands a checkpoint to the host with
//! [`crate::hypercall::HC_CHECKPOINT`]; a checkpoint to restore is placed in
//! guest RAM by the monitor and named by `BootInfo::restore_addr/restore_len`.
//!
//! Delivery on PVH monitors: the *checkpoint port*, a byte stream whose
//! other end the host owns: under QEMU port 0 of a virtio console
//! (`virtio-serial-device` + `virtconsole`), under Firecracker a virtio-vsock
//! connection the guest opens to the host (CID 2) at [`VSOCK_PORT`]. At boot the host writes the chain to restore: its length
//! (u64, 0 for none) and its bytes. Then the guest writes each blob (framed
//! by its own header) and waits for one byte back: [`PORT_STORED`] once
//! the host has stored it durably, else [`PORT_REFUSED`] — the same meaning
//! as the hypercall's `CHECKPOINT_STORED` / `CHECKPOINT_REFUSED`.
//!
//! Under QEMU the guest sends each blob in windows of [`PORT_WINDOW`]
//! bytes and, after every window but the blob's last, waits for
//! [`PORT_CREDIT`]: QEMU's `virtconsole` silently drops whatever its
//! (non-blocking) host socket cannot take at once, so at most one window may
//! be in flight. The vsock port has flow control of its own and no credits.

use alloc::string::String;
use alloc::vec::Vec;

/// The vsock port of the checkpoint port on the host (Firecracker).
pub const VSOCK_PORT: u32 = 5200;

/// Checkpoint port: the host stored the blob (durably, where it goes to disk).
pub const PORT_STORED: u8 = b'+';
/// Checkpoint port: the host did not store the blob (see `CHECKPOINT_REFUSED`).
pub const PORT_REFUSED: u8 = b'-';
/// Checkpoint port (QEMU): the host took the last window of a blob; the
/// guest may send the next one.
pub const PORT_CREDIT: u8 = b'>';
/// Checkpoint port (QEMU): bytes of a blob the guest sends before it waits
/// for [`PORT_CREDIT`] (well under a host socket's default send buffer).
pub const PORT_WINDOW: usize = 64 << 10;

/// Leading bytes of every full checkpoint.
pub const MAGIC: &[u8; 8] = b"LCCKPT01";
/// Leading bytes of every delta.
pub const DELTA_MAGIC: &[u8; 8] = b"LCDELT01";
/// Version of the container format described above.
pub const FORMAT_VERSION: u32 = 1;
/// Largest checkpoint the host accepts and the guest writes.
pub const MAX_CHECKPOINT: u64 = 256 << 20;

/// A parsed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint<'a> {
    pub app: &'a str,
    pub schema_version: u32,
    pub payload: &'a [u8],
    /// The blob's CRC: the id its deltas name as their base.
    pub id: u32,
}

/// A parsed delta: the changes since blob `seq - 1` of the chain that
/// starts at the full checkpoint `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta<'a> {
    pub app: &'a str,
    pub schema_version: u32,
    pub base: u32,
    pub seq: u64,
    pub payload: &'a [u8],
}

/// One blob of a checkpoint stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blob<'a> {
    Full(Checkpoint<'a>),
    Delta(Delta<'a>),
}

/// A full checkpoint and the deltas that continue it, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain<'a> {
    pub base: Checkpoint<'a>,
    pub deltas: alloc::vec::Vec<Delta<'a>>,
    /// The bytes of the base and its deltas, one after another (a
    /// checkpoint file that holds exactly this chain).
    pub bytes: &'a [u8],
}

/// Why bytes are not a usable checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointError {
    /// Not a checkpoint at all (wrong magic).
    NotACheckpoint,
    /// Shorter than its header says.
    Truncated,
    /// The checksum does not match: damaged in storage or transit.
    Corrupt { expected: u32, found: u32 },
    /// Written by a newer or older container format.
    UnsupportedFormat(u32),
    /// The app name is not UTF-8.
    BadAppName,
    /// A delta without the full checkpoint it continues.
    OnlyADelta,
    /// The blob after delta `after` of the chain is damaged, and `dropped`
    /// sound blobs follow it: restoring would lose their state.
    DamagedInside { after: usize, dropped: usize },
}

impl core::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotACheckpoint => write!(f, "not a libcloud checkpoint (bad magic)"),
            Self::Truncated => write!(f, "checkpoint is truncated"),
            Self::Corrupt { expected, found } => write!(
                f,
                "checkpoint is corrupt (checksum {found:#010x}, expected {expected:#010x})"
            ),
            Self::UnsupportedFormat(v) => write!(
                f,
                "checkpoint format v{v} is not supported (this build reads v{FORMAT_VERSION})"
            ),
            Self::BadAppName => write!(f, "checkpoint app name is not UTF-8"),
            Self::OnlyADelta => write!(
                f,
                "this is an incremental checkpoint (a delta) without the full checkpoint it continues"
            ),
            Self::DamagedInside { after, dropped } => write!(
                f,
                "checkpoint is damaged after delta {after} of its chain, and {dropped} sound \
                 blob{} follow{} the damage: restoring would drop their state (cut the file \
                 at the damage to restore without them)",
                if *dropped == 1 { "" } else { "s" },
                if *dropped == 1 { "s" } else { "" }
            ),
        }
    }
}

/// Encodes a checkpoint of `app` (schema `schema_version`) around `payload`.
pub fn encode(app: &str, schema_version: u32, payload: &[u8]) -> Vec<u8> {
    encode_blob(MAGIC, app, schema_version, None, payload)
}

/// Encodes delta `seq` (1, 2, ...) of the chain from full checkpoint `base`
/// ([`Checkpoint::id`]) around `payload`.
pub fn encode_delta(
    app: &str,
    schema_version: u32,
    base: u32,
    seq: u64,
    payload: &[u8],
) -> Vec<u8> {
    encode_blob(DELTA_MAGIC, app, schema_version, Some((base, seq)), payload)
}

fn encode_blob(
    magic: &[u8; 8],
    app: &str,
    schema_version: u32,
    chain: Option<(u32, u64)>,
    payload: &[u8],
) -> Vec<u8> {
    let name = &app.as_bytes()[..app.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(payload.len() + name.len() + 44);
    out.extend_from_slice(magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&schema_version.to_le_bytes());
    if let Some((base, seq)) = chain {
        out.extend_from_slice(&base.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
    }
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parses and verifies a full checkpoint; returns it and its total length
/// in `bytes` (trailing bytes are left for the caller, e.g. the next blob).
pub fn decode(bytes: &[u8]) -> Result<(Checkpoint<'_>, usize), CheckpointError> {
    match decode_blob(bytes)? {
        (Blob::Full(c), len) => Ok((c, len)),
        (Blob::Delta(_), _) => Err(CheckpointError::OnlyADelta),
    }
}

impl Blob<'_> {
    /// Its length encoded (what [`decode_blob`] returns with it).
    pub fn encoded_len(&self) -> usize {
        let (app, payload, chain) = match self {
            Blob::Full(c) => (c.app, c.payload, 0),
            Blob::Delta(d) => (d.app, d.payload, 12),
        };
        8 + 4 + 2 + app.len() + 4 + chain + 8 + payload.len() + 4
    }
}

/// Parses and verifies one blob (a full checkpoint or a delta); returns it
/// and its total length in `bytes`.
pub fn decode_blob(bytes: &[u8]) -> Result<(Blob<'_>, usize), CheckpointError> {
    let mut r = Reader { bytes, at: 0 };
    let magic = r.take(8).map_err(|_| CheckpointError::NotACheckpoint)?;
    let delta = match magic {
        m if m == MAGIC => false,
        m if m == DELTA_MAGIC => true,
        _ => return Err(CheckpointError::NotACheckpoint),
    };
    let format = r.u32()?;
    if format != FORMAT_VERSION {
        return Err(CheckpointError::UnsupportedFormat(format));
    }
    let name_len = u16::from_le_bytes(r.take(2)?.try_into().unwrap()) as usize;
    let app = r.take(name_len)?;
    let schema_version = r.u32()?;
    let chain = if delta {
        Some((r.u32()?, u64::from_le_bytes(r.take(8)?.try_into().unwrap())))
    } else {
        None
    };
    let payload_len = u64::from_le_bytes(r.take(8)?.try_into().unwrap());
    let payload = r.take(usize::try_from(payload_len).map_err(|_| CheckpointError::Truncated)?)?;
    let body_end = r.at;
    let found = r.u32()?;
    let expected = crc32fast::hash(&bytes[..body_end]);
    if found != expected {
        return Err(CheckpointError::Corrupt { expected, found });
    }
    let app = core::str::from_utf8(app).map_err(|_| CheckpointError::BadAppName)?;
    let blob = match chain {
        None => Blob::Full(Checkpoint {
            app,
            schema_version,
            payload,
            id: found,
        }),
        Some((base, seq)) => Blob::Delta(Delta {
            app,
            schema_version,
            base,
            seq,
            payload,
        }),
    };
    Ok((blob, r.at))
}

/// The chain a checkpoint file or stream holds: its last full checkpoint
/// and the deltas after it that continue it (same app and schema, the
/// base's id, sequence numbers 1, 2, ...). Stops at the first blob that
/// does not decode or does not continue: a torn tail is ignored. The error
/// is the first blob's, when not even that decodes, and
/// [`CheckpointError::DamagedInside`] when sound blobs follow a damaged one.
pub fn latest_chain(stream: &[u8]) -> Result<Chain<'_>, CheckpointError> {
    let mut at = 0;
    let mut chain: Option<(Chain, usize)> = None;
    while at < stream.len() {
        let (blob, len) = match decode_blob(&stream[at..]) {
            Ok(b) => b,
            Err(e) if chain.is_none() => return Err(e),
            Err(_) => {
                let dropped = sound_blobs_after(&stream[at + 1..]);
                if dropped > 0 {
                    let after = chain.as_ref().map_or(0, |(c, _)| c.deltas.len());
                    return Err(CheckpointError::DamagedInside { after, dropped });
                }
                break;
            }
        };
        match (blob, chain.as_mut()) {
            (Blob::Full(base), _) => {
                chain = Some((
                    Chain {
                        base,
                        deltas: Vec::new(),
                        bytes: &stream[at..at + len],
                    },
                    at,
                ))
            }
            (Blob::Delta(d), Some((c, start))) if c.continued_by(&d) => {
                c.deltas.push(d);
                c.bytes = &stream[*start..at + len];
            }
            (Blob::Delta(_), None) => return Err(CheckpointError::OnlyADelta),
            (Blob::Delta(_), Some(_)) => break,
        }
        at += len;
    }
    chain.map(|(c, _)| c).ok_or(CheckpointError::NotACheckpoint)
}

/// How many sound blobs (of any chain) `bytes` holds, looking for their
/// magic at every offset (damage before them hides where they start).
fn sound_blobs_after(bytes: &[u8]) -> usize {
    let mut count = 0;
    let mut at = 0;
    while at + MAGIC.len() <= bytes.len() {
        let here = &bytes[at..];
        if here.starts_with(MAGIC) || here.starts_with(DELTA_MAGIC) {
            if let Ok((_, len)) = decode_blob(here) {
                count += 1;
                at += len;
                continue;
            }
        }
        at += 1;
    }
    count
}

impl Chain<'_> {
    /// Whether `d` is the next delta of this chain.
    pub fn continued_by(&self, d: &Delta) -> bool {
        d.base == self.base.id
            && d.seq == self.deltas.len() as u64 + 1
            && d.app == self.base.app
            && d.schema_version == self.base.schema_version
    }

    /// Bytes of state in the deltas.
    pub fn delta_bytes(&self) -> usize {
        self.deltas.iter().map(|d| d.payload.len()).sum()
    }
}

/// Bounds-checked little-endian reading.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CheckpointError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(CheckpointError::Truncated)?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
}

/// A human description: `kv schema v1, 1234 bytes of state`.
pub fn describe(c: &Checkpoint) -> String {
    alloc::format!(
        "{} schema v{}, {} bytes of state",
        c.app,
        c.schema_version,
        c.payload.len()
    )
}

/// A human description of a chain: `kv schema v1, 1234 bytes of state
/// + 3 deltas (456 bytes)`.
pub fn describe_chain(c: &Chain) -> String {
    let mut s = describe(&c.base);
    if !c.deltas.is_empty() {
        s.push_str(&alloc::format!(
            " + {} delta{} ({} bytes)",
            c.deltas.len(),
            if c.deltas.len() == 1 { "" } else { "s" },
            c.delta_bytes()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let blob = encode("kv", 3, b"state bytes");
        let (c, len) = decode(&blob).unwrap();
        assert_eq!(len, blob.len());
        assert_eq!(
            c,
            Checkpoint {
                app: "kv",
                schema_version: 3,
                payload: b"state bytes",
                id: u32::from_le_bytes(blob[blob.len() - 4..].try_into().unwrap()),
            }
        );
    }

    #[test]
    fn chains_of_deltas() {
        let base = encode("kv", 1, b"base");
        let id = decode(&base).unwrap().0.id;
        let d1 = encode_delta("kv", 1, id, 1, b"one");
        let d2 = encode_delta("kv", 1, id, 2, b"two");
        let mut s = base.clone();
        s.extend_from_slice(&d1);
        s.extend_from_slice(&d2);
        let c = latest_chain(&s).unwrap();
        assert_eq!(c.base.payload, b"base");
        assert_eq!(c.deltas.len(), 2);
        assert_eq!(c.deltas[1].payload, b"two");
        assert_eq!(c.bytes, &s[..]);
        assert_eq!(
            describe_chain(&c),
            "kv schema v1, 4 bytes of state + 2 deltas (6 bytes)"
        );
        // A torn last delta is ignored.
        let mut torn = s.clone();
        torn.extend_from_slice(&encode_delta("kv", 1, id, 3, b"three")[..10]);
        assert_eq!(latest_chain(&torn).unwrap().deltas.len(), 2);
        // A gap, another base or another app ends the chain.
        for bad in [
            encode_delta("kv", 1, id, 4, b"gap"),
            encode_delta("kv", 1, id ^ 1, 3, b"other base"),
            encode_delta("other", 1, id, 3, b"other app"),
        ] {
            let mut t = s.clone();
            t.extend_from_slice(&bad);
            t.extend_from_slice(&encode_delta("kv", 1, id, 3, b"after"));
            assert_eq!(latest_chain(&t).unwrap().deltas.len(), 2);
        }
        // A new full checkpoint starts a new chain.
        let newer = encode("kv", 1, b"newer");
        let mut t = s.clone();
        t.extend_from_slice(&newer);
        let c = latest_chain(&t).unwrap();
        assert_eq!((c.base.payload, c.deltas.len()), (&b"newer"[..], 0));
        assert_eq!(c.bytes, &newer[..]);
        // Deltas alone are not a checkpoint.
        assert_eq!(latest_chain(&d1), Err(CheckpointError::OnlyADelta));
        assert_eq!(decode(&d1), Err(CheckpointError::OnlyADelta));
        assert_eq!(latest_chain(b"junk"), Err(CheckpointError::NotACheckpoint));
        let mut flipped = d2.clone();
        flipped[30] ^= 1;
        assert!(matches!(
            decode_blob(&flipped),
            Err(CheckpointError::Corrupt { .. })
        ));
        for b in [&base, &d1] {
            assert_eq!(decode_blob(b).unwrap().0.encoded_len(), b.len());
        }
    }

    #[test]
    fn damage_inside_a_chain_is_an_error_naming_what_would_be_lost() {
        let base = encode("kv", 1, b"base");
        let id = decode(&base).unwrap().0.id;
        let deltas: Vec<Vec<u8>> = (1..=5)
            .map(|i| encode_delta("kv", 1, id, i, &[i as u8; 40]))
            .collect();
        let mut s = base.clone();
        deltas.iter().for_each(|d| s.extend_from_slice(d));
        assert_eq!(latest_chain(&s).unwrap().deltas.len(), 5);
        // Delta 2 damaged: deltas 3, 4 and 5 are sound but unreachable.
        let at = base.len() + deltas[0].len() + 30;
        let mut bad = s.clone();
        bad[at] ^= 0xff;
        let e = latest_chain(&bad).unwrap_err();
        assert_eq!(
            e,
            CheckpointError::DamagedInside {
                after: 1,
                dropped: 3
            }
        );
        let text = alloc::string::ToString::to_string(&e);
        assert!(
            text.contains("after delta 1") && text.contains("3 sound blobs"),
            "{text}"
        );
        // Its length field damaged (the next blob's start is lost too).
        let mut bad = s.clone();
        let len_at = base.len() + deltas[0].len() + 8 + 4 + 2 + 2 + 4 + 4 + 8;
        bad[len_at] ^= 0x01;
        assert_eq!(
            latest_chain(&bad),
            Err(CheckpointError::DamagedInside {
                after: 1,
                dropped: 3
            })
        );
        // Damage in the last delta is a torn tail: the chain before it.
        let mut bad = s.clone();
        let last = bad.len() - 10;
        bad[last] ^= 0xff;
        assert_eq!(latest_chain(&bad).unwrap().deltas.len(), 4);
    }

    #[test]
    fn damage_is_detected() {
        let blob = encode("kv", 1, &[7u8; 100]);
        for i in [0, 9, 20, 60, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flipped byte {i}");
        }
        assert_eq!(
            decode(&blob[..blob.len() - 5]),
            Err(CheckpointError::Truncated)
        );
        assert_eq!(
            decode(b"LCSNAP01...."),
            Err(CheckpointError::NotACheckpoint)
        );
        assert_eq!(decode(b""), Err(CheckpointError::NotACheckpoint));
        let mut other_format = blob.clone();
        other_format[8] = 9;
        assert_eq!(
            decode(&other_format),
            Err(CheckpointError::UnsupportedFormat(9))
        );
    }

    #[test]
    fn a_huge_length_is_truncation_not_a_panic() {
        let mut blob = encode("kv", 1, b"x");
        let len_at = 8 + 4 + 2 + 2 + 4;
        blob[len_at..len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode(&blob), Err(CheckpointError::Truncated));
    }
}
