//! The ELF note every image carries, next to the PVH note, in its single
//! `PT_NOTE` segment. It names the ABI version and the code addresses the
//! shim needs to start the guest directly in 64-bit ring 3.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Note name (with its NUL, as in the ELF note header's `namesz`).
pub const NOTE_NAME: &[u8; 9] = b"LibCloud\0";
/// Note type of [`ImageNote`].
pub const NOTE_TYPE_IMAGE: u32 = 0x4c43_0001;

/// Xen's PVH entry note: name `"Xen\0"`, type 18, desc = 32-bit entry.
pub const XEN_NOTE_NAME: &[u8; 4] = b"Xen\0";
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Descriptor of the `LibCloud` note.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ImageNote {
    /// [`crate::ABI_VERSION`] the image was built against.
    pub abi_version: u32,
    pub reserved: u32,
    /// 64-bit ring-3 entry: `rdi` = address of the `BootInfo`, `rsp` = stack top.
    pub user_entry: u64,
    /// First of 32 exception stubs, `TRAP_STUB_STRIDE` bytes apart (vectors 0..31).
    pub trap_stubs: u64,
}

/// Distance between two exception stubs.
pub const TRAP_STUB_STRIDE: u64 = 16;
