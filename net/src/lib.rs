//! The guest network stack: the first virtio-net device named on the
//! command line (`virtio_mmio.device=`), driven by `virtio-drivers` without
//! interrupts, under `embassy-net` (async sockets over smoltcp).
//!
//! - [`device`]: the virtio-net device (found and DMA-mapped by `kernel::virtio`) as an `embassy-net-driver`, with
//!   batched TX and pre-posted RX buffers (one VM exit per batch, not per frame).
//! - [`config`]: addresses from the shim (`lc.ip`, `lc.gw`), else DHCP.
//!
//! [`start`] brings the interface up and runs it as a task of the kernel's
//! executor (`kernel::task`).
#![no_std]

extern crate alloc;

pub mod config;
pub mod device;

use alloc::boxed::Box;
use embassy_net::{Stack, StackResources};

pub use embassy_net;

/// Sockets the stack can hold at once.
pub const MAX_SOCKETS: usize = 160;

/// Why the network could not start.
#[derive(Debug)]
pub enum Error {
    /// The command line names no virtio-mmio network device.
    NoDevice,
    /// A `virtio_mmio.device=` entry could not be parsed.
    BadDeviceSpec(alloc::string::String),
    /// The device failed to initialise.
    Virtio(virtio_drivers::Error),
    /// The device refused the features the driver negotiated.
    Features(abi::virtio::FeaturesRejected),
    /// `lc.ip` / `lc.gw` could not be parsed.
    BadConfig(&'static str),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::NoDevice => write!(
                f,
                "no virtio-net device: give the shim a network (--net user, --publish or --net tap=NAME)"
            ),
            Error::BadDeviceSpec(s) => write!(f, "bad virtio_mmio.device entry {s:?}"),
            Error::Virtio(e) => write!(f, "virtio-net: {e}"),
            Error::Features(e) => write!(f, "virtio-net: {e}"),
            Error::BadConfig(what) => write!(f, "bad network configuration: {what}"),
        }
    }
}

/// Finds the network device, starts the interface and its runner task, and
/// returns the stack that sockets are made on.
pub fn start() -> Result<Stack<'static>, Error> {
    let device = device::VirtioNet::probe()?;
    let config = config::from_cmdline()?;
    let seed = kernel::arch::x86_64::cpu::rdtsc() ^ (kernel::time::now_ns() << 17);
    let resources = Box::leak(Box::new(StackResources::<MAX_SOCKETS>::new()));
    let (stack, mut runner) = embassy_net::new(device, config, resources, seed);
    kernel::task::spawn(async move { runner.run().await });
    Ok(stack)
}
