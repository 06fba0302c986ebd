//! The snapshot file format: versioned, postcard-framed, checksummed.
//!
//! ```text
//! magic            8 bytes  "LCSNAPSH"
//! format version   u32 LE   FORMAT_VERSION
//! ABI version      u32 LE   abi::ABI_VERSION of the shim that wrote it
//! header           u32 LE length + postcard(Header)
//! state            u32 LE length + postcard(MachineState)
//! memory chunks    u32 LE page count n (0 ends the list),
//!                  n × u32 LE page index, n × 4096 bytes of page data
//! trailer          u32 LE CRC-32 (IEEE) of every byte before it
//! ```
//!
//! Only non-zero pages are stored: guest RAM starts zeroed, so a page that
//! is not in the file is zero. All integers are little-endian. The magic and
//! both versions are checked before anything else is decoded; a file that
//! ends early is "truncated"; a checksum that does not match is "corrupt".
//! Whoever restores must not run the guest before [`SnapshotReader::finish`]
//! has verified the checksum.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::state::MachineState;
use crate::error::SnapshotError;
use crate::vstate::vm::GuestMemoryMmap;

/// The first 8 bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"LCSNAPSH";
/// The version of this layout; bump it when anything here (or in
/// `MachineState`) changes. 2: each device kind saved in its own list,
/// with its transport (was: one list of transports with a device enum).
pub const FORMAT_VERSION: u32 = 2;
/// Bytes of a guest page.
pub const PAGE: usize = abi::layout::PAGE_SIZE as usize;
/// Pages per memory chunk.
const CHUNK_PAGES: usize = 256;
/// Largest header or state accepted (a corrupt length must not make us
/// allocate gigabytes).
const MAX_BLOB: u32 = 64 << 20;

/// What a snapshot says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// When it was taken, in ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// The shim (host name) that took it.
    pub source_host: String,
    pub mem_size: u64,
    /// Pages stored.
    pub pages: u64,
}

/// Counts what was written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub pages: u64,
    pub bytes: u64,
}

/// A writer that keeps the CRC and the byte count of what passes.
struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Whether a page is all zeroes.
pub fn is_zero(page: &[u8]) -> bool {
    let words = page.chunks_exact(8);
    let rest = words.remainder();
    rest.iter().all(|&b| b == 0)
        && words
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
            .fold(0, |acc, w| acc | w)
            == 0
}

/// Writes a whole snapshot of a paused guest: `state`, and every non-zero
/// page of `mem`.
pub fn write_snapshot<W: Write>(
    out: W,
    header_host: &str,
    state: &MachineState,
    mem: &GuestMemoryMmap,
) -> Result<WriteStats, SnapshotError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    write_snapshot_at(out, header_host, now, state, mem)
}

/// [`write_snapshot`], saying it was taken at `created_unix_ms` (the same
/// input, the same bytes: the fuzz seeds).
pub fn write_snapshot_at<W: Write>(
    out: W,
    header_host: &str,
    created_unix_ms: u64,
    state: &MachineState,
    mem: &GuestMemoryMmap,
) -> Result<WriteStats, SnapshotError> {
    let mem_size = state.spec.mem_size;
    let pages: Vec<u32> = nonzero_pages(mem, mem_size)?;
    let header = Header {
        created_unix_ms,
        source_host: header_host.to_owned(),
        mem_size,
        pages: pages.len() as u64,
    };
    let mut w = CrcWriter {
        inner: out,
        crc: crc32fast::Hasher::new(),
        bytes: 0,
    };
    let io = SnapshotError::Write;
    w.write_all(&MAGIC).map_err(io)?;
    w.write_all(&FORMAT_VERSION.to_le_bytes()).map_err(io)?;
    w.write_all(&abi::ABI_VERSION.to_le_bytes()).map_err(io)?;
    write_blob(&mut w, &header)?;
    write_blob(&mut w, state)?;
    let mut buf = vec![0u8; PAGE];
    for chunk in pages.chunks(CHUNK_PAGES) {
        w.write_all(&(chunk.len() as u32).to_le_bytes())
            .map_err(io)?;
        for index in chunk {
            w.write_all(&index.to_le_bytes()).map_err(io)?;
        }
        for &index in chunk {
            mem.read_slice(&mut buf, GuestAddress(u64::from(index) * PAGE as u64))
                .map_err(|e| SnapshotError::Memory(e.to_string()))?;
            w.write_all(&buf).map_err(io)?;
        }
    }
    w.write_all(&0u32.to_le_bytes()).map_err(io)?;
    let crc = w.crc.clone().finalize();
    w.inner.write_all(&crc.to_le_bytes()).map_err(io)?;
    w.inner.flush().map_err(io)?;
    Ok(WriteStats {
        pages: pages.len() as u64,
        bytes: w.bytes + 4,
    })
}

/// The indices of the pages of `mem` that are not all zero.
pub fn nonzero_pages(mem: &GuestMemoryMmap, mem_size: u64) -> Result<Vec<u32>, SnapshotError> {
    let mut buf = vec![0u8; PAGE];
    let mut out = Vec::new();
    for index in 0..(mem_size / PAGE as u64) {
        mem.read_slice(&mut buf, GuestAddress(index * PAGE as u64))
            .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        if !is_zero(&buf) {
            out.push(index as u32);
        }
    }
    Ok(out)
}

fn write_blob<W: Write, T: Serialize>(w: &mut W, value: &T) -> Result<(), SnapshotError> {
    let bytes = postcard::to_stdvec(value).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    w.write_all(&(bytes.len() as u32).to_le_bytes())
        .map_err(SnapshotError::Write)?;
    w.write_all(&bytes).map_err(SnapshotError::Write)
}

/// Reads a snapshot in three steps: [`Self::open`] (magic, versions,
/// header, state), [`Self::read_memory`] (pages into guest RAM),
/// [`Self::finish`] (checksum).
pub struct SnapshotReader<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
    pub header: Header,
}

impl<R: Read> SnapshotReader<R> {
    /// Checks magic and versions and decodes the header and the state.
    pub fn open(inner: R) -> Result<(Self, MachineState), SnapshotError> {
        let mut r = Self {
            inner,
            crc: crc32fast::Hasher::new(),
            header: Header {
                created_unix_ms: 0,
                source_host: String::new(),
                mem_size: 0,
                pages: 0,
            },
        };
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|e| match e {
            SnapshotError::Truncated => SnapshotError::NotASnapshot,
            e => e,
        })?;
        if magic != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let format = r.read_u32()?;
        if format != FORMAT_VERSION {
            return Err(SnapshotError::FormatVersion {
                found: format,
                supported: FORMAT_VERSION,
            });
        }
        let abi = r.read_u32()?;
        if abi != abi::ABI_VERSION {
            return Err(SnapshotError::AbiVersion {
                found: abi,
                shim: abi::ABI_VERSION,
            });
        }
        r.header = r.read_blob("header")?;
        let state: MachineState = r.read_blob("state")?;
        if state.spec.mem_size != r.header.mem_size {
            return Err(SnapshotError::Corrupt(format!(
                "the header says {} bytes of memory, the state {}",
                r.header.mem_size, state.spec.mem_size
            )));
        }
        Ok((r, state))
    }

    /// Copies the stored pages into `mem` (zeroed, `mem_size` bytes).
    pub fn read_memory(&mut self, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
        let max_page = (self.header.mem_size / PAGE as u64) as u32;
        let mut pages = 0u64;
        let mut page = vec![0u8; PAGE];
        loop {
            let n = self.read_u32()? as usize;
            if n == 0 {
                break;
            }
            if n > CHUNK_PAGES {
                return Err(SnapshotError::Corrupt(format!(
                    "a memory chunk of {n} pages (at most {CHUNK_PAGES})"
                )));
            }
            let mut indices = Vec::with_capacity(n);
            for _ in 0..n {
                let index = self.read_u32()?;
                if index >= max_page {
                    return Err(SnapshotError::Corrupt(format!(
                        "page {index} is beyond the guest's {max_page} pages"
                    )));
                }
                indices.push(index);
            }
            for index in indices {
                self.read_exact(&mut page)?;
                mem.write_slice(&page, GuestAddress(u64::from(index) * PAGE as u64))
                    .map_err(|e| SnapshotError::Memory(e.to_string()))?;
            }
            pages += n as u64;
        }
        if pages != self.header.pages {
            return Err(SnapshotError::Corrupt(format!(
                "{pages} pages stored, the header says {}",
                self.header.pages
            )));
        }
        Ok(pages)
    }

    /// Checks the trailer: the file is whole and unchanged.
    pub fn finish(mut self) -> Result<(), SnapshotError> {
        let computed = self.crc.clone().finalize();
        let mut stored = [0u8; 4];
        read_full(&mut self.inner, &mut stored)?;
        let stored = u32::from_le_bytes(stored);
        if stored != computed {
            return Err(SnapshotError::Checksum { stored, computed });
        }
        let mut extra = [0u8; 1];
        match self.inner.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(SnapshotError::Corrupt(
                "bytes after the checksum trailer".into(),
            )),
            Err(e) => Err(SnapshotError::Read(e)),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        read_full(&mut self.inner, buf)?;
        self.crc.update(buf);
        Ok(())
    }

    fn read_u32(&mut self) -> Result<u32, SnapshotError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_blob<T: for<'de> Deserialize<'de>>(&mut self, what: &str) -> Result<T, SnapshotError> {
        let len = self.read_u32()?;
        if len > MAX_BLOB {
            return Err(SnapshotError::Corrupt(format!(
                "the {what} claims {len} bytes"
            )));
        }
        let mut bytes = vec![0u8; len as usize];
        self.read_exact(&mut bytes)?;
        postcard::from_bytes(&bytes)
            .map_err(|e| SnapshotError::Corrupt(format!("cannot decode the {what}: {e}")))
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), SnapshotError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            SnapshotError::Truncated
        } else {
            SnapshotError::Read(e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vm::allocate;

    use crate::testutil::{sample_machine_state as state, SAMPLE_MEM_SIZE as MEM};

    fn snapshot_bytes() -> Vec<u8> {
        let mem = allocate(MEM).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; PAGE], GuestAddress(0x30_0000))
            .unwrap();
        let mut out = Vec::new();
        let stats = write_snapshot(&mut out, "test", &state(), &mem).unwrap();
        assert_eq!(stats.pages, 2);
        assert_eq!(stats.bytes, out.len() as u64);
        out
    }

    fn read(bytes: &[u8]) -> Result<(MachineState, GuestMemoryMmap), SnapshotError> {
        let (mut r, state) = SnapshotReader::open(bytes)?;
        let mem = allocate(r.header.mem_size).unwrap();
        r.read_memory(&mem)?;
        r.finish()?;
        Ok((state, mem))
    }

    #[test]
    fn round_trip_keeps_state_and_only_nonzero_pages() {
        let bytes = snapshot_bytes();
        // Two pages of data and the 4 KiB xsave area, not 1024 pages.
        assert!(bytes.len() < 5 * PAGE, "{} bytes", bytes.len());
        let (got, mem) = read(&bytes).unwrap();
        let want = state();
        assert_eq!(got.spec, want.spec);
        assert_eq!(got.devices, want.devices);
        assert_eq!(got.vcpu.regs.rip, 0x10_1234);
        assert_eq!(got.vcpu.msrs[0].data, 0x5001);
        assert_eq!(got.clock.clock.clock, 42);
        let mut b = [0u8; 5];
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        let v: u8 = mem.read_obj(GuestAddress(0x30_0fff)).unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let good = snapshot_bytes();
        // In the page data, in the state, and in the trailer itself.
        for at in [good.len() - 100, 60, good.len() - 2] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let err = read(&bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    SnapshotError::Checksum { .. } | SnapshotError::Corrupt(_)
                ),
                "byte {at}: {err}"
            );
            assert!(err.to_string().contains("corrupt"), "{err}");
        }
    }

    #[test]
    fn truncated_files_are_refused() {
        let good = snapshot_bytes();
        for len in [4, 20, 100, good.len() / 2, good.len() - 1] {
            let err = read(&good[..len]).unwrap_err();
            assert!(
                matches!(err, SnapshotError::Truncated | SnapshotError::NotASnapshot),
                "{len}: {err}"
            );
        }
        assert!(read(&good[..good.len() - 1])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }

    #[test]
    fn wrong_magic_and_versions_are_refused() {
        let good = snapshot_bytes();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(read(&bad), Err(SnapshotError::NotASnapshot)));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&99u32.to_le_bytes());
        let err = read(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::FormatVersion {
                    found: 99,
                    supported: FORMAT_VERSION
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("format version 99"), "{err}");
        let mut bad = good;
        bad[12..16].copy_from_slice(&(abi::ABI_VERSION + 1).to_le_bytes());
        let err = read(&bad).unwrap_err();
        assert!(matches!(err, SnapshotError::AbiVersion { .. }), "{err}");
        assert!(err.to_string().contains("ABI"), "{err}");
    }

    #[test]
    fn zero_pages() {
        assert!(is_zero(&[0u8; PAGE]));
        let mut p = [0u8; PAGE];
        p[PAGE - 1] = 1;
        assert!(!is_zero(&p));
    }
}
