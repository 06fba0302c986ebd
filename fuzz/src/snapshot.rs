//! `snapshot`: the snapshot reader and the device state it restores.
//!
//! The snapshot reader over the input as a file (magic, versions, header, machine
//! state, memory chunks, checksum), then the device state it holds restored into fresh
//! virtio-net transports and run once, as a restore would.

use std::sync::Arc;

use hostnet::port::GuestPort;
use vmm::devices::persist::DeviceStates;
use vmm::snapshot::format::SnapshotReader;
use vmm::vstate::vm::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Largest guest memory the pages are read into (pages beyond it are an error).
const MAX_MEM: u64 = 1 << 20;

pub fn run(data: &[u8]) {
    let Ok((mut reader, state)) = SnapshotReader::open(data) else {
        return;
    };
    let mem_size = reader.header.mem_size.min(MAX_MEM) & !(abi::layout::PAGE_SIZE - 1);
    let mem = crate::guest_memory(mem_size.max(abi::layout::PAGE_SIZE));
    if reader.read_memory(&mem).is_err() {
        return;
    }
    let _ = reader.finish();
    restore_devices(&mem, &state.devices);
}

/// Restores `devices` as the restore path does (the network card on a fresh port with the
/// saved MAC) and lets them serve their queues once.
pub fn restore_devices(mem: &GuestMemoryMmap, devices: &DeviceStates) {
    let Some(first) = devices.net.first() else {
        return;
    };
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let port = Arc::new(GuestPort::new(first.device.mac, wake).expect("guest port"));
    if let Ok(mut transports) = devices.restore(Some(port)) {
        for t in &mut transports {
            let _ = t.process(mem);
        }
        let _ = DeviceStates::save(&transports);
    }
}
