//! `snapshot`: the snapshot reader and the device state it restores.
//!
//! The snapshot reader over the input as a file (magic, versions, header, machine
//! state, memory chunks, checksum), then the device state it holds restored into fresh
//! virtio-net transports and run once, as a restore would.

use std::sync::Arc;

use hostnet::port::GuestPort;
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::MmioTransport;
use vmm::snapshot::format::SnapshotReader;
use vmm::snapshot::state::{DeviceState, TransportState};
use vmm::vstate::vm::{allocate, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Largest guest memory the pages are read into (pages beyond it are an error).
const MAX_MEM: u64 = 1 << 20;

pub fn run(data: &[u8]) {
    let Ok((mut reader, state)) = SnapshotReader::open(data) else {
        return;
    };
    let mem_size = reader.header.mem_size.min(MAX_MEM) & !(abi::layout::PAGE_SIZE - 1);
    let mem = allocate(mem_size.max(abi::layout::PAGE_SIZE)).expect("allocate guest memory");
    if reader.read_memory(&mem).is_err() {
        return;
    }
    let _ = reader.finish();
    for device in &state.devices {
        restore_device(&mem, device);
    }
}

/// Restores `state` into a fresh network device at its address, as the restore path does,
/// and lets it serve its queues once.
pub fn restore_device(mem: &GuestMemoryMmap, state: &TransportState) {
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let DeviceState::Net(net) = &state.device;
    let port = Arc::new(GuestPort::new(net.mac, wake).expect("guest port"));
    let mut t = MmioTransport::new(
        state.base,
        abi::layout::VIRTIO_MMIO_SIZE,
        Box::new(Net::new(port)),
    );
    if t.restore_state(state).is_ok() {
        let _ = t.process(mem);
        let _ = t.save_state();
    }
}
