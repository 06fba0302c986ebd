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
//! Delivery: the guest hands a checkpoint to the host with
//! [`crate::hypercall::HC_CHECKPOINT`] (on PVH monitors: written to the
//! second 16550 UART, COM2, where QEMU's `-serial file:...` stores it). A
//! checkpoint to restore is placed in guest RAM by the monitor and named by
//! `BootInfo::restore_addr/restore_len` (on PVH: the first boot module, e.g.
//! QEMU's `-initrd`).

use alloc::string::String;
use alloc::vec::Vec;

/// Leading bytes of every checkpoint.
pub const MAGIC: &[u8; 8] = b"LCCKPT01";
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
        }
    }
}

/// Encodes a checkpoint of `app` (schema `schema_version`) around `payload`.
pub fn encode(app: &str, schema_version: u32, payload: &[u8]) -> Vec<u8> {
    let name = &app.as_bytes()[..app.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(payload.len() + name.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&schema_version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parses and verifies a checkpoint; returns it and its total length in
/// `bytes` (trailing bytes are left for the caller, e.g. the next blob).
pub fn decode(bytes: &[u8]) -> Result<(Checkpoint<'_>, usize), CheckpointError> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(8).map_err(|_| CheckpointError::NotACheckpoint)? != MAGIC {
        return Err(CheckpointError::NotACheckpoint);
    }
    let format = r.u32()?;
    if format != FORMAT_VERSION {
        return Err(CheckpointError::UnsupportedFormat(format));
    }
    let name_len = u16::from_le_bytes(r.take(2)?.try_into().unwrap()) as usize;
    let app = r.take(name_len)?;
    let schema_version = r.u32()?;
    let payload_len = u64::from_le_bytes(r.take(8)?.try_into().unwrap());
    let payload = r.take(usize::try_from(payload_len).map_err(|_| CheckpointError::Truncated)?)?;
    let body_end = r.at;
    let found = r.u32()?;
    let expected = crc32fast::hash(&bytes[..body_end]);
    if found != expected {
        return Err(CheckpointError::Corrupt { expected, found });
    }
    let app = core::str::from_utf8(app).map_err(|_| CheckpointError::BadAppName)?;
    Ok((
        Checkpoint {
            app,
            schema_version,
            payload,
        },
        r.at,
    ))
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
                payload: b"state bytes"
            }
        );
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
