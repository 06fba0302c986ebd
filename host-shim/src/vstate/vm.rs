//! The KVM VM and its guest memory: opening `/dev/kvm`, creating the VM,
//! allocating guest RAM at GPA 0 and registering it with KVM.
//!
//! Guest RAM is a `GuestMemoryMmap<AtomicBitmap>`: the bitmap records every
//! write the shim itself makes to guest memory, which KVM's dirty log does
//! not see and live migration will need.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::VmError;

/// Guest RAM, with VMM writes tracked.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

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
                flags: 0,
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
