//! Image validation and loading.
//!
//! [`inspect`] checks an image before any VM exists: ELF64 for x86_64, a
//! `PT_NOTE` segment with both the PVH note and the LibCloud note
//! ([`ImageNote`]) of our ABI version, `PT_LOAD` segments above the shim's
//! low tables, and a size that fits the guest memory. The reader is
//! our own, bounds-checked on every access, so a malformed file yields an
//! [`ImageError`], never a panic. [`load`] then copies the segments into
//! guest memory with linux-loader.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use abi::layout::{IMAGE_BASE, LARGE_PAGE_SIZE, MAX_MEM_SIZE};
use abi::note::{
    ImageNote, NOTE_NAME, NOTE_TYPE_IMAGE, TRAP_STUB_STRIDE, XEN_ELFNOTE_PHYS32_ENTRY,
    XEN_NOTE_NAME,
};
use linux_loader::loader::{Elf, KernelLoader};
use zerocopy::FromBytes;

use crate::error::{ImageError, ImageFileError, VmError};
use crate::vstate::vm::GuestMemoryMmap;

const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// Largest note segment we read (ours are under 100 bytes).
const MAX_NOTE_SEGMENT: u64 = 64 * 1024;
/// Number of exception stubs an image provides (vectors 0..31).
const TRAP_STUBS: u64 = 32;
const MIB: u64 = 1 << 20;

/// Random access to the bytes of an image.
pub trait ImageSource {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; the caller has checked the range.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl ImageSource for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Opens an image for reading; `O_NONBLOCK` so that a FIFO named as an
/// image does not wait for a writer (and then fails as not a regular file).
pub(crate) fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// An image file and its size at the time it was opened.
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = open_nonblocking(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(Self {
            file,
            size: meta.len(),
        })
    }
}

impl ImageSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// What the shim needs to know about a valid image.
#[derive(Clone, Copy, Debug)]
pub struct ImageInfo {
    /// The LibCloud note: ABI version and ring-3 entry points.
    pub note: ImageNote,
    /// The 32-bit PVH entry (used by QEMU and Firecracker, not by us).
    pub pvh_entry: u32,
    /// Highest `p_paddr + p_memsz` of the `PT_LOAD` segments.
    pub load_end: u64,
}

impl ImageInfo {
    /// Guest memory the image needs, rounded up to the 2 MiB granule.
    pub fn mem_needed(&self) -> u64 {
        self.load_end.div_ceil(LARGE_PAGE_SIZE) * LARGE_PAGE_SIZE
    }

    /// Refuses a guest memory size the image does not fit in.
    pub fn check_fits(&self, mem_size: u64) -> Result<(), ImageError> {
        if self.load_end > mem_size {
            return Err(ImageError::TooBig {
                need_mib: self.mem_needed().div_ceil(MIB),
                mem_mib: mem_size / MIB,
            });
        }
        Ok(())
    }
}

/// Opens and validates the image at `path` for a guest of `mem_size` bytes.
pub fn inspect(path: &Path, mem_size: u64) -> Result<ImageInfo, ImageFileError> {
    let wrap = |kind| ImageFileError {
        path: path.to_owned(),
        kind,
    };
    let source = FileSource::open(path).map_err(|e| wrap(ImageError::Io(e)))?;
    let info = validate(&source).map_err(wrap)?;
    info.check_fits(mem_size).map_err(wrap)?;
    Ok(info)
}

/// Copies the `PT_LOAD` segments of the image `bytes` (validated) into
/// guest memory at their physical addresses.
pub fn load_bytes(mem: &GuestMemoryMmap, bytes: &[u8]) -> Result<(), crate::error::Error> {
    Elf::load(mem, None, &mut io::Cursor::new(bytes), None).map_err(VmError::Load)?;
    Ok(())
}

/// One program header, the fields we use.
#[derive(Clone, Copy, Debug)]
struct Phdr {
    p_type: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

/// Validates an image held by `src` (memory size not included: see
/// [`ImageInfo::check_fits`]).
pub fn validate<S: ImageSource + ?Sized>(src: &S) -> Result<ImageInfo, ImageError> {
    let magic = read(src, 0, src.size().min(4), "ELF magic")?;
    if magic != b"\x7fELF" {
        return Err(ImageError::NotElf);
    }
    let ehdr = read(src, 0, EHDR_SIZE, "ELF header")?;
    if ehdr[4] != ELFCLASS64 {
        return Err(ImageError::NotElf64);
    }
    if ehdr[5] != ELFDATA2LSB {
        return Err(ImageError::NotLittleEndian);
    }
    let machine = u16_at(&ehdr, 18);
    if machine != EM_X86_64 {
        return Err(ImageError::WrongMachine(machine));
    }
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u64::from(u16_at(&ehdr, 54));
    let phnum = u64::from(u16_at(&ehdr, 56));
    if phentsize != PHDR_SIZE {
        return Err(malformed(format!(
            "program header entries are {phentsize} bytes, expected {PHDR_SIZE}"
        )));
    }
    if phoff < EHDR_SIZE {
        return Err(malformed(format!(
            "program headers at offset {phoff:#x} overlap the ELF header"
        )));
    }
    let table = read(src, phoff, phnum * PHDR_SIZE, "program headers")?;
    let phdrs: Vec<Phdr> = table
        .chunks_exact(PHDR_SIZE as usize)
        .map(parse_phdr)
        .collect();

    let mut pvh_entry = None;
    let mut note = None;
    for ph in phdrs.iter().filter(|ph| ph.p_type == PT_NOTE) {
        let notes = read_notes(src, ph)?;
        pvh_entry = pvh_entry.or(notes.pvh_entry);
        note = note.or(notes.image);
    }
    let pvh_entry = pvh_entry.ok_or(ImageError::NoPvhNote)?;
    let note = note.ok_or(ImageError::NoLibCloudNote)?;
    if note.abi_version != abi::ABI_VERSION {
        return Err(ImageError::AbiMismatch {
            image: note.abi_version,
            shim: abi::ABI_VERSION,
        });
    }

    let mut load_end = 0u64;
    let mut loads = Vec::new();
    for ph in phdrs.iter().filter(|ph| ph.p_type == PT_LOAD) {
        check_load_segment(src, ph)?;
        let end = ph.paddr + ph.memsz; // checked in check_load_segment
        load_end = load_end.max(end);
        loads.push((ph.paddr, end));
    }
    if loads.is_empty() {
        return Err(ImageError::NoLoadSegment);
    }

    let inside = |addr: u64, len: u64| {
        loads
            .iter()
            .any(|&(start, end)| addr >= start && addr.checked_add(len).is_some_and(|e| e <= end))
    };
    let stubs_len = TRAP_STUBS * TRAP_STUB_STRIDE;
    for (what, addr, len) in [
        ("ring-3 entry", note.user_entry, 1),
        ("exception stubs", note.trap_stubs, stubs_len),
    ] {
        if !inside(addr, len) {
            return Err(ImageError::AddressOutsideImage { what, addr });
        }
    }
    Ok(ImageInfo {
        note,
        pvh_entry,
        load_end,
    })
}

fn check_load_segment<S: ImageSource + ?Sized>(src: &S, ph: &Phdr) -> Result<(), ImageError> {
    if ph.filesz > ph.memsz {
        return Err(malformed(format!(
            "segment at {:#x} has more file bytes ({:#x}) than memory bytes ({:#x})",
            ph.paddr, ph.filesz, ph.memsz
        )));
    }
    if ph
        .offset
        .checked_add(ph.filesz)
        .is_none_or(|end| end > src.size())
    {
        return Err(malformed(format!(
            "segment at {:#x} reaches past the end of the file",
            ph.paddr
        )));
    }
    // Past the largest guest RAM it could never be loaded (and sizes derived from its end,
    // like `ImageInfo::mem_needed`, would overflow).
    if ph
        .paddr
        .checked_add(ph.memsz)
        .is_none_or(|end| end > MAX_MEM_SIZE)
    {
        return Err(malformed(format!(
            "segment at {:#x} of {:#x} bytes ends past {MAX_MEM_SIZE:#x}, the end of the \
             largest guest memory",
            ph.paddr, ph.memsz
        )));
    }
    if ph.paddr < IMAGE_BASE && ph.memsz > 0 {
        return Err(ImageError::SegmentInLowMemory {
            addr: ph.paddr,
            base: IMAGE_BASE,
        });
    }
    Ok(())
}

/// The notes we look for in one `PT_NOTE` segment.
#[derive(Default)]
struct Notes {
    pvh_entry: Option<u32>,
    image: Option<ImageNote>,
}

fn read_notes<S: ImageSource + ?Sized>(src: &S, ph: &Phdr) -> Result<Notes, ImageError> {
    if ph.filesz > MAX_NOTE_SEGMENT {
        return Err(malformed(format!(
            "note segment is {} bytes, more than the {MAX_NOTE_SEGMENT} expected",
            ph.filesz
        )));
    }
    let bytes = read(src, ph.offset, ph.filesz, "note segment")?;
    // Notes are padded to 4 bytes (the usual layout, and linux-loader's);
    // some toolchains pad to the segment alignment of 8 instead.
    let notes = parse_notes(&bytes, 4);
    if ph.align == 8 && (notes.pvh_entry.is_none() || notes.image.is_none()) {
        let other = parse_notes(&bytes, 8);
        return Ok(Notes {
            pvh_entry: notes.pvh_entry.or(other.pvh_entry),
            image: notes.image.or(other.image),
        });
    }
    Ok(notes)
}

/// Walks the notes of a segment; stops quietly at the first truncated one.
fn parse_notes(bytes: &[u8], align: usize) -> Notes {
    let mut found = Notes::default();
    let mut pos = 0usize;
    while let Some(header) = bytes.get(pos..pos + 12) {
        let namesz = u32_at(header, 0) as usize;
        let descsz = u32_at(header, 4) as usize;
        let n_type = u32_at(header, 8);
        let name_start = pos + 12;
        let Some(desc_start) = name_start
            .checked_add(namesz)
            .map(|end| end.next_multiple_of(align))
        else {
            break;
        };
        let Some(next) = desc_start
            .checked_add(descsz)
            .map(|end| end.next_multiple_of(align))
        else {
            break;
        };
        let (Some(name), Some(desc)) = (
            bytes.get(name_start..name_start + namesz),
            bytes.get(desc_start..desc_start + descsz),
        ) else {
            break;
        };
        if name == XEN_NOTE_NAME && n_type == XEN_ELFNOTE_PHYS32_ENTRY && desc.len() >= 4 {
            found.pvh_entry.get_or_insert(u32_at(desc, 0));
        }
        if name == NOTE_NAME && n_type == NOTE_TYPE_IMAGE {
            if let Ok((note, _)) = ImageNote::read_from_prefix(desc) {
                found.image.get_or_insert(note);
            }
        }
        pos = next;
    }
    found
}

fn parse_phdr(b: &[u8]) -> Phdr {
    Phdr {
        p_type: u32_at(b, 0),
        offset: u64_at(b, 8),
        paddr: u64_at(b, 24),
        filesz: u64_at(b, 32),
        memsz: u64_at(b, 40),
        align: u64_at(b, 48),
    }
}

/// Reads `len` bytes at `offset`, or explains which part is cut off.
fn read<S: ImageSource + ?Sized>(
    src: &S,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Vec<u8>, ImageError> {
    let end = offset.checked_add(len);
    if end.is_none_or(|end| end > src.size()) {
        return Err(malformed(format!(
            "the file is truncated: its {what} ({len} bytes at offset {offset:#x}) \
             end past its {} bytes",
            src.size()
        )));
    }
    let mut buf = vec![0; len as usize];
    src.read_at(offset, &mut buf).map_err(ImageError::Io)?;
    Ok(buf)
}

fn malformed(detail: String) -> ImageError {
    ImageError::Malformed(detail)
}

// Fixed-offset little-endian fields; callers pass slices of known length.
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestImage;

    fn valid() -> Vec<u8> {
        TestImage::exit(7).build()
    }

    fn err(bytes: &[u8]) -> ImageError {
        validate(bytes).expect_err("image should be refused")
    }

    #[test]
    fn a_valid_image_passes() {
        let info = validate(valid().as_slice()).unwrap();
        assert_eq!(info.note.abi_version, abi::ABI_VERSION);
        assert_eq!(info.note.user_entry, IMAGE_BASE);
        assert_eq!(info.pvh_entry as u64, TestImage::PVH_ENTRY);
        assert!(info.load_end > IMAGE_BASE);
        info.check_fits(4 * MIB).unwrap();
    }

    #[test]
    fn every_truncation_is_refused_without_panicking() {
        let image = valid();
        for len in 0..image.len() {
            // Truncating the code (after the notes) still leaves valid
            // headers, and the segment then reaches past the end.
            assert!(validate(&image[..len]).is_err(), "accepted {len} bytes");
        }
    }

    #[test]
    fn random_corruption_never_panics() {
        let image = valid();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut bytes = image.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state % 400) as usize; // headers and notes
                bytes[at] = (state >> 32) as u8;
            }
            let _ = validate(bytes.as_slice());
        }
    }

    #[test]
    fn not_elf() {
        assert!(matches!(err(b""), ImageError::NotElf));
        assert!(matches!(err(b"#!/bin/sh\necho hi\n"), ImageError::NotElf));
        let mut bytes = valid();
        bytes[0] = b'M';
        assert!(matches!(err(&bytes), ImageError::NotElf));
        assert_eq!(err(&bytes).to_string(), "is not an ELF file");
    }

    #[test]
    fn wrong_class_endianness_and_machine() {
        let mut bytes = valid();
        bytes[4] = 1; // ELFCLASS32
        assert!(matches!(err(&bytes), ImageError::NotElf64));
        let mut bytes = valid();
        bytes[5] = 2; // big endian
        assert!(matches!(err(&bytes), ImageError::NotLittleEndian));
        let mut bytes = valid();
        bytes[18] = 183; // aarch64
        assert!(matches!(err(&bytes), ImageError::WrongMachine(183)));
    }

    #[test]
    fn missing_notes() {
        let bytes = TestImage::exit(0).without_pvh_note().build();
        assert!(matches!(err(&bytes), ImageError::NoPvhNote));
        assert_eq!(err(&bytes).to_string(), "has no PVH entry note");
        let bytes = TestImage::exit(0).without_image_note().build();
        assert!(matches!(err(&bytes), ImageError::NoLibCloudNote));
        assert_eq!(
            err(&bytes).to_string(),
            "is not a libcloud image (no LibCloud note)"
        );
        let bytes = TestImage::exit(0).without_note_segment().build();
        assert!(matches!(err(&bytes), ImageError::NoPvhNote));
    }

    #[test]
    fn wrong_abi_version() {
        let bytes = TestImage::exit(0).abi_version(abi::ABI_VERSION + 1).build();
        let e = err(&bytes);
        assert!(matches!(e, ImageError::AbiMismatch { .. }));
        assert_eq!(
            e.to_string(),
            format!(
                "was built for ABI v{}, this shim speaks v{}: rebuild the image",
                abi::ABI_VERSION + 1,
                abi::ABI_VERSION
            )
        );
    }

    #[test]
    fn notes_padded_to_eight_bytes_are_found() {
        let bytes = TestImage::exit(0).note_align(8).build();
        validate(bytes.as_slice()).unwrap();
    }

    #[test]
    fn oversize_image() {
        let bytes = TestImage::exit(0).bss(5 * MIB).build();
        let info = validate(bytes.as_slice()).unwrap();
        info.check_fits(8 * MIB).unwrap();
        let e = info.check_fits(4 * MIB).unwrap_err();
        assert_eq!(
            e.to_string(),
            "needs 8 MiB of guest memory but --mem is 4 MiB"
        );
    }

    #[test]
    fn segment_in_low_memory() {
        let bytes = TestImage::exit(0).load_addr(0x8000).build();
        assert!(matches!(err(&bytes), ImageError::SegmentInLowMemory { .. }));
    }

    #[test]
    fn entry_outside_image() {
        let bytes = TestImage::exit(0).user_entry(0x4000_0000).build();
        assert!(matches!(
            err(&bytes),
            ImageError::AddressOutsideImage {
                what: "ring-3 entry",
                ..
            }
        ));
    }

    #[test]
    fn segment_past_end_of_file() {
        let mut bytes = valid();
        // p_filesz of the first program header (the PT_LOAD).
        bytes[64 + 32..64 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(err(&bytes), ImageError::Malformed(_)));
    }

    #[test]
    fn segment_ending_past_the_largest_guest_memory() {
        // p_memsz of the PT_LOAD: found by the elf_loader fuzz target, where the memory the
        // image needs (`mem_needed`) overflowed.
        for memsz in [u64::MAX - 2 * MIB, MAX_MEM_SIZE] {
            let mut bytes = valid();
            bytes[64 + 40..64 + 48].copy_from_slice(&memsz.to_le_bytes());
            let e = err(&bytes);
            assert!(e.to_string().contains("largest guest memory"), "{e}");
        }
        let info = validate(
            TestImage::exit(0)
                .bss(MAX_MEM_SIZE - IMAGE_BASE - 0x2000)
                .build()
                .as_slice(),
        )
        .unwrap();
        assert_eq!(info.mem_needed(), MAX_MEM_SIZE);
    }

    #[test]
    fn huge_program_header_count() {
        let mut bytes = valid();
        bytes[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(err(&bytes), ImageError::Malformed(_)));
    }

    #[test]
    fn inspect_names_the_file() {
        let dir = crate::testutil::temp_dir("inspect");
        let path = dir.join("not-elf.img");
        std::fs::write(&path, b"hello").unwrap();
        let e = inspect(&path, 64 * MIB).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} is not an ELF file", path.display())
        );
        let e = inspect(&dir.join("missing.img"), 64 * MIB).unwrap_err();
        assert!(e.to_string().contains("cannot be read"), "{e}");
        let e = inspect(&dir, 64 * MIB).unwrap_err();
        assert!(e.to_string().contains("cannot be read"), "{e}");
    }
}
