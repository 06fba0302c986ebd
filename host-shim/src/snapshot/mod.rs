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
use std::path::Path;

use crate::error::{Error, SnapshotError};
use crate::machine::{Hypervisor, Machine};
use crate::vstate::vm::Vm;
pub use format::WriteStats;
use state::MachineState;

/// Writes a snapshot of the paused `machine` to `path` (through a
/// temporary file next to it, renamed when complete).
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
    let tmp = path.with_extension("partial");
    let file = File::create(&tmp).map_err(|e| file_err(SnapshotError::Write(e)))?;
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

/// Reads the snapshot at `path` into a fresh VM: returns the saved state
/// and the VM with its memory filled and the checksum verified.
pub fn load(hv: &Hypervisor, path: &Path) -> Result<(MachineState, Vm), Error> {
    let file_err = |err: SnapshotError| SnapshotError::File {
        path: path.to_owned(),
        err: Box::new(err),
    };
    let file = File::open(path).map_err(|e| file_err(SnapshotError::Read(e)))?;
    let (mut reader, state) =
        format::SnapshotReader::open(BufReader::with_capacity(1 << 20, file)).map_err(file_err)?;
    let vm = Machine::create_vm(hv, &state.spec)?;
    reader.read_memory(vm.memory()).map_err(file_err)?;
    reader.finish().map_err(file_err)?;
    Ok((state, vm))
}

/// Checks a snapshot file without KVM: versions, decoding and checksum.
/// Returns its header and state.
pub fn verify(path: &Path) -> Result<(format::Header, MachineState), Error> {
    let file_err = |err: SnapshotError| SnapshotError::File {
        path: path.to_owned(),
        err: Box::new(err),
    };
    let file = File::open(path).map_err(|e| file_err(SnapshotError::Read(e)))?;
    let (mut reader, state) =
        format::SnapshotReader::open(BufReader::new(file)).map_err(file_err)?;
    let mem = crate::vstate::vm::allocate(reader.header.mem_size)?;
    reader.read_memory(&mem).map_err(file_err)?;
    let header = reader.header.clone();
    reader.finish().map_err(file_err)?;
    Ok((header, state))
}
