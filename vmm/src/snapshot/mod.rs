//! Snapshots: a paused guest's whole state in one file, and a fresh VM
//! made from it (in this process or another one, on this host or another).
//!
//! - [`state`]: what is saved (vCPU, VM clock, devices, what the guest is).
//! - [`format`]: how it is laid out on disk (versioned, checksummed).
//!
//! Taking one: pause the guest ([`crate::machine::MachineHandle::pause`]
//! quiesces vCPU 0 so no MMIO access is half done), [`save`], resume.
//! Restoring: [`load`] checks the file and fills the memory of a fresh VM;
//! [`crate::machine::Machine::restore`] restores vCPU (CPUID first), devices
//! and the VM clock. Guest time freezes over the gap (`KVM_SET_CLOCK` with
//! flags 0): the guest's clock goes on from where it stopped, so it stays
//! monotonic whatever the hosts' clocks say; TCP peers see a pause.

pub mod format;
pub mod state;

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, SnapshotError};
use crate::machine::{Hypervisor, Machine};
use crate::vstate::vm::Vm;
pub use format::WriteStats;
use state::MachineState;

/// Writes a snapshot of the paused `machine` to `path` (through a new
/// temporary file next to it, mode 0600, `O_EXCL|O_NOFOLLOW` with an
/// unpredictable name, renamed when complete).
pub fn save(
    hv: &Hypervisor,
    machine: &Machine,
    host: &str,
    path: &Path,
) -> Result<WriteStats, Error> {
    let state = machine.capture(hv)?;
    let file_err = |err: SnapshotError| SnapshotError::File {
        path: path.to_owned(),
        err: Box::new(err),
    };
    let mut suffix = [0u8; 8];
    getrandom::getrandom(&mut suffix)
        .map_err(|e| file_err(SnapshotError::Write(std::io::Error::other(e.to_string()))))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{:016x}.partial",
        u64::from_le_bytes(suffix)
    ));
    let file = shim_util::files::create_new(&tmp).map_err(|e| file_err(SnapshotError::Write(e)))?;
    let result = format::write_snapshot(
        BufWriter::with_capacity(1 << 20, file),
        host,
        &state,
        machine.vm.memory(),
    );
    match result {
        Ok(stats) => {
            std::fs::rename(&tmp, path).map_err(|e| file_err(SnapshotError::Write(e)))?;
            Ok(stats)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(file_err(e).into())
        }
    }
}

/// A snapshot file opened and its state decoded, its memory not read yet
/// (so a caller can check the state, e.g. its memory size, first).
pub struct Opened {
    path: PathBuf,
    reader: format::SnapshotReader<BufReader<File>>,
    pub state: MachineState,
}

/// Opens the snapshot at `path`: a regular file only (a FIFO or a device
/// is refused at once, without waiting or reading it), its header and
/// state decoded.
pub fn open(path: &Path) -> Result<Opened, Error> {
    let file_err = |err: SnapshotError| SnapshotError::File {
        path: path.to_owned(),
        err: Box::new(err),
    };
    let file = open_regular(path).map_err(|e| file_err(SnapshotError::Read(e)))?;
    let (reader, state) =
        format::SnapshotReader::open(BufReader::with_capacity(1 << 20, file)).map_err(file_err)?;
    Ok(Opened {
        path: path.to_owned(),
        reader,
        state,
    })
}

impl Opened {
    /// A fresh VM with the snapshot's memory, the checksum verified.
    pub fn into_vm(mut self, hv: &Hypervisor) -> Result<(MachineState, Vm), Error> {
        let path = self.path;
        let file_err = |err: SnapshotError| SnapshotError::File {
            path: path.clone(),
            err: Box::new(err),
        };
        let vm = Machine::create_vm(hv, &self.state.spec)?;
        self.reader.read_memory(vm.memory()).map_err(file_err)?;
        self.reader.finish().map_err(file_err)?;
        Ok((self.state, vm))
    }
}

/// Reads the snapshot at `path` into a fresh VM: returns the saved state
/// and the VM with its memory filled and the checksum verified.
pub fn load(hv: &Hypervisor, path: &Path) -> Result<(MachineState, Vm), Error> {
    open(path)?.into_vm(hv)
}

/// Opens `path` for reading if it is a regular file (checked on the
/// opened file; `O_NONBLOCK` so that opening a FIFO does not wait).
fn open_regular(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Checks a snapshot file without KVM: versions, decoding and checksum.
/// Returns its header and state.
pub fn verify(path: &Path) -> Result<(format::Header, MachineState), Error> {
    let file_err = |err: SnapshotError| SnapshotError::File {
        path: path.to_owned(),
        err: Box::new(err),
    };
    let file = open_regular(path).map_err(|e| file_err(SnapshotError::Read(e)))?;
    let (mut reader, state) =
        format::SnapshotReader::open(BufReader::new(file)).map_err(file_err)?;
    let mem = crate::vstate::vm::allocate(reader.header.mem_size)?;
    reader.read_memory(&mem).map_err(file_err)?;
    let header = reader.header.clone();
    reader.finish().map_err(file_err)?;
    Ok((header, state))
}
