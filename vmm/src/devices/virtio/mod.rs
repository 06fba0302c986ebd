//! virtio devices over the virtio-mmio v2 transport.
//!
//! - [`mmio`]: the transport's register file ([`MmioTransport`]), the same
//!   for every device.
//! - [`net`]: the network device, whose frames go to a port of the shim's
//!   virtual switch (`hostnet`).
//!
//! A device implements [`VirtioDevice`]; the transport owns its queues and
//! hands them to the device. No interrupts: the guest polls its used rings,
//! and the device moves data when the guest notifies a queue or idles
//! (`HC_YIELD`, see [`MmioTransport::process`]), or, while the guest spins
//! on its rings, from the network thread ([`net::poll`]): a machine's
//! devices are shared between the two threads under one lock.

pub mod mmio;
pub mod net;

use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

use virtio_queue::Queue;

use crate::vstate::vm::GuestMemoryMmap;

pub use mmio::MmioTransport;

/// Locks a machine's devices, which its vCPU thread and (while the guest
/// polls its rings, see [`net::poll`]) the network thread share. A panic
/// while one was held cannot leave a transport half-written in a way the
/// other thread could not handle: every guest-written value is validated
/// on use.
pub fn lock_devices(devices: &Mutex<Vec<MmioTransport>>) -> MutexGuard<'_, Vec<MmioTransport>> {
    devices.lock().unwrap_or_else(|e| e.into_inner())
}

/// The interrupt number named on the command line. Nothing is ever
/// delivered (the guest polls), but Linux's syntax wants one.
pub const CMDLINE_IRQ: u32 = 5;

/// Guest-physical base of virtio-mmio window `index`.
pub fn window_base(index: u64) -> u64 {
    abi::layout::VIRTIO_MMIO_BASE + index * abi::layout::VIRTIO_MMIO_STRIDE
}

/// The `virtio_mmio.device=` value of window `index`: `0x200@0xc0001000:5`.
pub fn cmdline_entry(index: u64) -> String {
    format!(
        "{:#x}@{:#x}:{CMDLINE_IRQ}",
        abi::layout::VIRTIO_MMIO_SIZE,
        window_base(index)
    )
}

/// Feature bit: the device complies with virtio 1.0+ (not legacy).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// A queue the guest broke: which one and how. The device stops serving
/// that queue until the driver resets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueError {
    pub queue: usize,
    pub reason: String,
}

/// What a device did in one [`VirtioDevice::process`] call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The guest has new used buffers it should look at now (e.g. frames
    /// received): an idling guest must not be put to sleep.
    pub guest_should_run: bool,
    /// Buffers taken from the guest (frames it sent).
    pub sent: usize,
    /// Buffers filled for the guest (frames it received).
    pub delivered: usize,
}

/// The device side of a virtio device; the transport does the rest.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 = network).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Largest size of each queue; the device has this many queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space at `offset` (bytes past the end read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with these features and queues. An error
    /// (with the reason) refuses activation: the device needs a reset.
    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: &mut [Queue],
    ) -> Result<(), String>;
    /// Serves both directions of an active device: takes what the guest
    /// queued, hands it what the backend has. Called when the guest
    /// notifies a queue (`notified`) and on every `HC_YIELD` (`None`).
    fn process(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        notified: Option<u16>,
    ) -> Result<Progress, QueueError>;
    /// [`Self::process`] on the network thread while the guest polls its
    /// rings (see [`net::poll`]); what it moved must still reach a guest
    /// that went to sleep meanwhile.
    fn process_polling(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<Progress, QueueError> {
        self.process(mem, queues, None)
    }
    /// Back to the state before activation.
    fn reset(&mut self);
    /// A descriptor that becomes readable when the backend has something for
    /// the guest: an idle guest waits on it.
    fn wait_fd(&self) -> Option<RawFd>;
    /// Called just before the guest is put to sleep on [`Self::wait_fd`]:
    /// consume the descriptor's readiness so the wait blocks.
    fn prepare_wait(&mut self) {}
    /// A short name for messages ("virtio-net").
    fn name(&self) -> &'static str;
    /// The switch port behind a network device.
    fn port(&self) -> Option<std::sync::Arc<hostnet::port::GuestPort>> {
        None
    }
    /// Called on the vCPU thread each time it serves the device (the network
    /// thread may serve it too, see [`net::poll`]).
    fn on_vcpu_thread(&self, _mem: &GuestMemoryMmap) {}
    /// The concrete device, for saving its state (each device type saves
    /// its own, see [`crate::persist::Persist`]).
    fn as_any(&self) -> &dyn std::any::Any;
}
