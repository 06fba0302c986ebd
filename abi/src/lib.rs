//! The contract between the guest kernel and the host shim.
//!
//! Both sides compile this crate (`no_std`), so the memory layout, the boot
//! information block, the hypercall numbers and argument blocks, and the exact
//! bytes of the CPU tables (GDT, TSS, IDT, page tables) cannot drift apart.
//!
//! Bump [`ABI_VERSION`] whenever anything here changes meaning: the shim
//! refuses an image whose note carries another version, and snapshots and
//! migration streams carry it too.
#![no_std]

extern crate alloc;

pub mod boot;
pub mod checkpoint;
pub mod cmdline;
pub mod exit;
pub mod hypercall;
pub mod layout;
pub mod note;
#[cfg(any(test, feature = "virtio"))]
pub mod virtio;
pub mod x86;

/// Version of this contract. Carried by every image (see [`note`]).
pub const ABI_VERSION: u32 = 7;
