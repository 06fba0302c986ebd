//! The guest network stack: the first virtio-net device named on the
//! command line (`virtio_mmio.device=`), driven by `virtio-drivers` without
//! interrupts, under `embassy-net` (async sockets over smoltcp).
//!
//! - [`device`]: the virtio-net device (found and DMA-mapped by `kernel::virtio`) as an `embassy-net-driver`, with
//!   batched TX and pre-posted RX buffers (one VM exit per batch, not per frame).
//! - [`config`]: addresses from the shim (`lc.ip`, `lc.gw`), else DHCP.
//!
//! [`start`] brings the interface up and runs it as a task of the kernel's
//! executor (`kernel::task`), a few connection requests per stack poll
//! ([`SYNS_PER_POLL`]).
#![no_std]

extern crate alloc;

pub mod config;
pub mod device;

use alloc::boxed::Box;
use core::cell::Cell;
use core::task::Context;
use embassy_net::{Stack, StackResources};
use embassy_net_driver::{Capabilities, Driver, HardwareAddress, LinkState};
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket};

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
    let device = Paced {
        inner: device,
        syns: Cell::new(0),
    };
    let (stack, mut runner) = embassy_net::new(device, config, resources, seed);
    kernel::task::spawn(async move { runner.run().await });
    Ok(stack)
}

/// Connection requests (TCP SYNs) the stack takes per poll, at most.
///
/// smoltcp answers a SYN that finds no socket listening on its port with a
/// reset, and a poll takes every frame the device holds: a burst of SYNs
/// (a client opening 50 connections at once) would need a listening socket
/// per SYN, and each idle listener costs every later poll and segment a
/// walk over it. Ending the poll after this many SYNs lets the tasks their
/// listeners woke run (and arm the next listeners,
/// `libcloud::net::serve_tcp`) before the next frame is taken: the executor
/// polls them before the runner, which wakes itself to come back in the
/// next round. A port that keeps `2 * SYNS_PER_POLL` sockets listening (or
/// more) thus never runs out within a burst of connections.
pub const SYNS_PER_POLL: usize = 7;

/// The device as the stack sees it: received frames up to and including the
/// [`SYNS_PER_POLL`]th connection request per stack poll.
struct Paced<D> {
    inner: D,
    /// SYNs taken in this poll.
    syns: Cell<usize>,
}

/// A received frame that counts itself if it is a SYN.
struct PacedRx<'a, T> {
    inner: T,
    syns: &'a Cell<usize>,
}

/// Whether `frame` is a TCP connection request: an IPv4 datagram (its
/// first fragment) carrying a segment with SYN and without ACK.
fn is_connection_request(frame: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return false;
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return false;
    };
    if ip.next_header() != IpProtocol::Tcp || ip.frag_offset() != 0 {
        return false;
    }
    TcpPacket::new_checked(ip.payload()).is_ok_and(|tcp| tcp.syn() && !tcp.ack())
}

impl<T: embassy_net_driver::RxToken> embassy_net_driver::RxToken for PacedRx<'_, T> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, f: F) -> R {
        self.inner.consume(|frame| {
            if is_connection_request(frame) {
                self.syns.set(self.syns.get() + 1);
            }
            f(frame)
        })
    }
}

impl<D: Driver> Driver for Paced<D> {
    type RxToken<'a>
        = PacedRx<'a, D::RxToken<'a>>
    where
        Self: 'a;
    type TxToken<'a>
        = D::TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, cx: &mut Context) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.syns.get() >= SYNS_PER_POLL {
            self.syns.set(0);
            // Come back in the executor's next round, after the woken tasks.
            cx.waker().wake_by_ref();
            return None;
        }
        let Some((rx, tx)) = self.inner.receive(cx) else {
            self.syns.set(0);
            return None;
        };
        let rx = PacedRx {
            inner: rx,
            syns: &self.syns,
        };
        Some((rx, tx))
    }

    fn transmit(&mut self, cx: &mut Context) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(cx)
    }

    fn link_state(&mut self, cx: &mut Context) -> LinkState {
        self.inner.link_state(cx)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn hardware_address(&self) -> HardwareAddress {
        self.inner.hardware_address()
    }
}
