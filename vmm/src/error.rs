//! Error types of the shim, one enum per layer, joined in [`Error`].
//!
//! Every message is written for the person who typed the command: it names
//! the file, device or flag involved and, where there is one, the fix. Each
//! message already includes its cause, so none of these errors exposes a
//! `source()` (which would print the cause twice under `{:#}`).

use std::io;
use std::path::PathBuf;

/// Why an image was refused. The messages read as the predicate of a
/// sentence whose subject is the image path (see [`ImageFileError`]).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot be read: {0}")]
    Io(io::Error),
    #[error("is not an ELF file")]
    NotElf,
    #[error("is not a 64-bit ELF file (ELFCLASS64 expected)")]
    NotElf64,
    #[error("is not a little-endian ELF file")]
    NotLittleEndian,
    #[error("is not an x86_64 ELF file (e_machine {0}, expected 62)")]
    WrongMachine(u16),
    #[error("is malformed: {0}")]
    Malformed(String),
    #[error("has no loadable (PT_LOAD) segment")]
    NoLoadSegment,
    #[error(
        "has a segment at {addr:#x}, below {base:#x}: the shim's tables live there \
         (link images at abi::layout::IMAGE_BASE)"
    )]
    SegmentInLowMemory { addr: u64, base: u64 },
    #[error("has no PVH entry note")]
    NoPvhNote,
    #[error("is not a libcloud image (no LibCloud note)")]
    NoLibCloudNote,
    #[error("was built for ABI v{image}, this shim speaks v{shim}: rebuild the image")]
    AbiMismatch { image: u32, shim: u32 },
    #[error("has its {what} at {addr:#x}, outside its loadable segments")]
    AddressOutsideImage { what: &'static str, addr: u64 },
    #[error("needs {need_mib} MiB of guest memory but --mem is {mem_mib} MiB")]
    TooBig { need_mib: u64, mem_mib: u64 },
}

/// An [`ImageError`] together with the path of the image.
#[derive(Debug, thiserror::Error)]
#[error("{} {kind}", path.display())]
pub struct ImageFileError {
    pub path: PathBuf,
    pub kind: ImageError,
}

/// Errors of the KVM and guest-memory layer.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "{} not found: this host has no KVM (enable virtualization, or load kvm_intel/kvm_amd)",
        .0.display()
    )]
    KvmNotFound(PathBuf),
    #[error(
        "{}: permission denied: add your user to the 'kvm' group or run as root",
        .0.display()
    )]
    KvmPermissionDenied(PathBuf),
    #[error("cannot open {}: {err}", path.display())]
    KvmOpen {
        path: PathBuf,
        err: vmm_sys_util::errno::Error,
    },
    #[error("KVM ioctl {what} failed: {err}")]
    Kvm {
        what: &'static str,
        err: vmm_sys_util::errno::Error,
    },
    #[error("KVM accepted {set} of {wanted} MSRs")]
    MsrsNotSet { set: usize, wanted: usize },
    #[error("cannot allocate {mib} MiB of guest memory: {detail}")]
    Memory { mib: u64, detail: String },
    #[error("cannot write {what} into guest memory at {addr:#x}: {detail}")]
    GuestWrite {
        what: &'static str,
        addr: u64,
        detail: String,
    },
    #[error("cannot load the image into guest memory: {0}")]
    Load(linux_loader::loader::Error),
    #[error("cannot set up the VM: {0}")]
    Setup(String),
}

impl VmError {
    /// Shorthand for a failed KVM ioctl.
    pub fn kvm(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Self {
        move |err| VmError::Kvm { what, err }
    }
}

/// Errors building the guest command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("the guest command line is {len} bytes, longer than the {max} the guest accepts")]
    TooLong { len: usize, max: usize },
    #[error("{what} contains a NUL byte, which the guest command line cannot carry")]
    Nul { what: String },
}

/// Errors of the QEMU backend.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("qemu-system-x86_64 not found: install it (Debian: apt-get install qemu-system-x86)")]
    NotFound,
    #[error("cannot start qemu-system-x86_64: {0}")]
    Spawn(io::Error),
    #[error("cannot wait for qemu-system-x86_64: {0}")]
    Wait(io::Error),
    #[error("qemu-system-x86_64 failed (exit status {status}){}", stderr_hint(.stderr))]
    Failed { status: i32, stderr: String },
}

fn stderr_hint(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// Any error that stops the shim before or while running a guest (exit
/// status 1). Guest failures are not errors: see [`crate::GuestExit`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Image(#[from] ImageFileError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error(transparent)]
    Firecracker(#[from] crate::backend::firecracker::FirecrackerError),
    #[error(transparent)]
    Net(#[from] hostnet::NetError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{0}")]
    Config(String),
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a host-shim snapshot (wrong magic bytes)")]
    NotASnapshot,
    #[error(
        "snapshot format version {found} is not supported (this shim reads version {supported})"
    )]
    FormatVersion { found: u32, supported: u32 },
    #[error(
        "the snapshot was taken with guest ABI v{found}, this shim speaks ABI v{shim}: \
         restore it with a matching shim"
    )]
    AbiVersion { found: u32, shim: u32 },
    #[error("the snapshot is truncated (the file ends early)")]
    Truncated,
    #[error("the snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error("the snapshot is corrupt: checksum {computed:#010x} does not match the stored {stored:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("cannot read the snapshot: {0}")]
    Read(io::Error),
    #[error("cannot write the snapshot: {0}")]
    Write(io::Error),
    #[error("cannot encode the snapshot: {0}")]
    Encode(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{}: {err}", path.display())]
    File {
        path: PathBuf,
        err: Box<SnapshotError>,
    },
}
