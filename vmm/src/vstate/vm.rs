//! The KVM VM and its guest memory: opening `/dev/kvm`, creating the VM,
//! allocating guest RAM at GPA 0 and registering it with KVM.
//!
//! Guest RAM is a `GuestMemoryMmap<AtomicBitmap>`: the bitmap records every
//! write the shim itself makes to guest memory, which KVM's dirty log does
//! not see. The memory slot is registered with `KVM_MEM_LOG_DIRTY_PAGES`
//! from creation, so [`Vm::take_dirty`] (KVM's log OR'ed with that bitmap)
//! can tell live migration which pages changed since the previous call —
//! the first call: since the VM was created.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kvm_bindings::{kvm_clock_data, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::VmError;

/// Guest RAM, with VMM writes tracked.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// The VM's clock (kvmclock's base), as saved in snapshots
/// (`KVM_GET_CLOCK`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ClockState {
    pub clock: kvm_clock_data,
}

/// Address KVM uses for the three pages of the real-mode TSS (needed on
/// Intel hosts; well above any RAM we hand out, below 4 GiB).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The KVM device node.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Opens the KVM device (normally [`KVM_DEVICE`]), with a message that
/// says what to do when it fails.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::KvmOpen {
        path: path.to_owned(),
        err: vmm_sys_util::errno::Error::new(libc::EINVAL),
    })?;
    Kvm::new_with_path(c_path).map_err(|e| match io::Error::from(e).kind() {
        io::ErrorKind::NotFound => VmError::KvmNotFound(path.to_owned()),
        io::ErrorKind::PermissionDenied => VmError::KvmPermissionDenied(path.to_owned()),
        _ => VmError::KvmOpen {
            path: path.to_owned(),
            err: e,
        },
    })
}

/// A VM with its RAM.
pub struct Vm {
    // Field order matters: the VM fd is closed (and KVM lets go of the
    // memory slot) before the mapping behind it is unmapped.
    fd: VmFd,
    memory: GuestMemoryMmap,
    mem_size: u64,
}

impl Vm {
    /// Creates a VM with `mem_size` bytes of RAM at guest-physical 0.
    pub fn new(kvm: &Kvm, mem_size: u64) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmError::kvm("KVM_SET_TSS_ADDR"))?;
        let memory = allocate(mem_size)?;
        let vm = Self {
            fd,
            memory,
            mem_size,
        };
        vm.register_memory()?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let host_addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Memory {
                    mib: self.mem_size >> 20,
                    detail: e.to_string(),
                })?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
            };
            // SAFETY: `host_addr .. host_addr + len` is a live anonymous
            // mapping owned by `self.memory`, which outlives the VM fd
            // (field order of `Vm`), and no other slot overlaps it.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Bytes of guest RAM.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The VM clock (`KVM_GET_CLOCK`).
    pub fn clock(&self) -> Result<ClockState, VmError> {
        let clock = self.fd.get_clock().map_err(VmError::kvm("KVM_GET_CLOCK"))?;
        Ok(ClockState { clock })
    }

    /// Sets the VM clock to `state` with flags 0: the guest's time goes on
    /// from the saved value, so the time the guest was not running (the
    /// gap between pause and resume) does not exist for it. Guest time is
    /// monotonic across hosts whatever their clocks say.
    pub fn set_clock(&self, state: &ClockState) -> Result<(), VmError> {
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            flags: 0,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(VmError::kvm("KVM_SET_CLOCK"))
    }

    /// Pages written since the previous call (the first call: since the VM
    /// was created), by the guest (KVM's dirty log) or by the shim
    /// (vm-memory's bitmap), and clears both. One bit per 4 KiB page, bit
    /// `i % 64` of word `i / 64`.
    pub fn take_dirty(&self) -> Result<Vec<u64>, VmError> {
        let pages = (self.mem_size / abi::layout::PAGE_SIZE) as usize;
        let mut out = vec![0u64; pages.div_ceil(64)];
        for (slot, region) in self.memory.iter().enumerate() {
            let first = (region.start_addr().0 / abi::layout::PAGE_SIZE) as usize;
            let kvm = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(VmError::kvm("KVM_GET_DIRTY_LOG"))?;
            let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
            let vmm = mapping.bitmap().get_and_reset();
            let n = (region.len() / abi::layout::PAGE_SIZE) as usize;
            for page in 0..n {
                let (w, b) = (page / 64, page % 64);
                let set = kvm.get(w).is_some_and(|x| x & (1 << b) != 0)
                    || vmm.get(w).is_some_and(|x| x & (1 << b) != 0);
                if set {
                    let at = first + page;
                    out[at / 64] |= 1 << (at % 64);
                }
            }
        }
        Ok(out)
    }
}

/// The page numbers set in a dirty bitmap (as [`Vm::take_dirty`] returns).
pub fn pages_of(bitmap: &[u64]) -> Vec<u32> {
    let mut out = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros();
            out.push((w * 64) as u32 + b);
            bits &= bits - 1;
        }
    }
    out
}

/// Allocates `mem_size` bytes of anonymous guest RAM at GPA 0.
pub fn allocate(mem_size: u64) -> Result<GuestMemoryMmap, VmError> {
    let err = |detail: String| VmError::Memory {
        mib: mem_size >> 20,
        detail,
    };
    let len = usize::try_from(mem_size).map_err(|e| err(e.to_string()))?;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_bitmaps_to_pages() {
        assert_eq!(pages_of(&[0b1011, 0, 1 << 63]), [0, 1, 3, 191]);
        assert!(pages_of(&[0; 4]).is_empty());
    }
}
