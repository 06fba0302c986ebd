//! Serving the card from the network thread while the guest polls its
//! rings (`abi::boot::NetPoll`): the guest spins instead of waiting in
//! `HC_YIELD`, the network thread puts frames in its receive ring as they
//! arrive and takes its replies from the transmit ring, and a request and
//! its reply cross without a VM exit (one exit costs tens of µs on nested
//! hosts, more than native Redis takes to answer).
//!
//! [`RingServer`] is what the machine installs on its switch port. It
//! shares the machine's devices with the vCPU thread (one lock), writes
//! only the host's two words of `NetPoll` and reads the guest's one (only
//! as "zero or not"), and does nothing while the machine is paused
//! ([`RingServer::set_enabled`]): a snapshot or the last pass of a
//! migration sees no write from it.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use abi::boot::NetPoll;
use hostnet::port::{GuestPort, Served};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::{lock_devices, MmioTransport};
use crate::vstate::vm::GuestMemoryMmap;

/// Guest-physical address of a `NetPoll` field.
fn field(offset: usize) -> GuestAddress {
    GuestAddress(NetPoll::addr(offset))
}

fn store(mem: &GuestMemoryMmap, offset: usize, value: u32) {
    // Below the image, always in RAM: a failure would be a layout bug.
    if let Err(e) = mem.write_obj(value, field(offset)) {
        tracing::error!(error = %e, "cannot write the guest's NetPoll block");
    }
}

/// Says whether frames wait for the guest in its switch port. Called with
/// the port's receive queue locked, by whoever looked at it last.
pub fn set_rx_pending(mem: &GuestMemoryMmap, pending: bool) {
    store(
        mem,
        std::mem::offset_of!(NetPoll, rx_pending),
        u32::from(pending),
    );
}

/// Whether the guest spins on its rings when idle, these days (its driver
/// can, it is not pausing, and the host does not hold it off).
pub fn guest_spins(mem: &GuestMemoryMmap) -> bool {
    let word = |offset| mem.read_obj::<u32>(field(offset)).is_ok_and(|v| v != 0);
    word(std::mem::offset_of!(NetPoll, spins)) && !word(std::mem::offset_of!(NetPoll, hold_off))
}

/// Whether the guest says it spins on its rings.
fn guest_polls(mem: &GuestMemoryMmap) -> bool {
    mem.read_obj::<u32>(field(std::mem::offset_of!(NetPoll, polling)))
        .is_ok_and(|v| v != 0)
}

/// Serves one machine's card from the network thread (see the module).
pub struct RingServer {
    devices: Weak<Mutex<Vec<MmioTransport>>>,
    mem: GuestMemoryMmap,
    port: Arc<GuestPort>,
    /// False while the machine is paused. Held while serving, so that once
    /// [`Self::set_enabled`] returns nothing is written any more.
    enabled: Mutex<bool>,
    /// What the guest was last told of `NetPoll::hold_off`.
    hold_off: AtomicBool,
}

impl RingServer {
    /// A server for the card on `port` among `devices`, installed on the
    /// port (which keeps a weak reference: the machine owns the server).
    pub fn install(
        devices: &Arc<Mutex<Vec<MmioTransport>>>,
        mem: &GuestMemoryMmap,
        port: &Arc<GuestPort>,
    ) -> Arc<Self> {
        let server = Arc::new(Self {
            devices: Arc::downgrade(devices),
            mem: mem.clone(),
            port: Arc::clone(port),
            enabled: Mutex::new(true),
            hold_off: AtomicBool::new(false),
        });
        // The guest may come from another host (restore, migration): no
        // network thread watches its transmit ring here yet.
        store(mem, std::mem::offset_of!(NetPoll, watching), 0);
        store(mem, std::mem::offset_of!(NetPoll, hold_off), 0);
        let weak: Weak<dyn hostnet::port::RingServer> = Arc::downgrade(&server) as _;
        port.set_server(weak);
        server
    }

    fn enabled(&self) -> MutexGuard<'_, bool> {
        self.enabled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops (pause) or resumes serving from the network thread. Stopping
    /// also tells the guest nobody watches its transmit ring.
    pub fn set_enabled(&self, on: bool) {
        let mut enabled = self.enabled();
        *enabled = on;
        if !on {
            store(&self.mem, std::mem::offset_of!(NetPoll, watching), 0);
        }
    }
}

impl hostnet::port::RingServer for RingServer {
    fn serve(&self, watched: bool, hold_off: bool) -> Served {
        let enabled = self.enabled();
        if !*enabled {
            return Served::default();
        }
        if self.hold_off.swap(hold_off, Ordering::Relaxed) != hold_off {
            store(
                &self.mem,
                std::mem::offset_of!(NetPoll, hold_off),
                u32::from(hold_off),
            );
        }
        {
            let pending = self.port.received();
            set_rx_pending(&self.mem, !pending.is_empty());
        }
        // The guest stores `polling`, fences, then loads `rx_pending`.
        fence(Ordering::SeqCst);
        if !watched && !guest_polls(&self.mem) {
            return Served::default();
        }
        let Some(devices) = self.devices.upgrade() else {
            return Served::default();
        };
        let mut devices = lock_devices(&devices);
        let (mut sent, mut delivered) = (0, 0);
        for dev in devices.iter_mut() {
            let progress = dev.process_polling(&self.mem);
            sent += progress.sent;
            delivered += progress.delivered;
        }
        Served {
            served: true,
            sent,
            delivered,
        }
    }

    fn spins(&self) -> bool {
        *self.enabled() && guest_spins(&self.mem)
    }

    fn watch(&self, on: bool) {
        let enabled = self.enabled();
        if *enabled {
            store(
                &self.mem,
                std::mem::offset_of!(NetPoll, watching),
                u32::from(on),
            );
            // Then the caller looks at the ring (abi::boot::NetPoll).
            fence(Ordering::SeqCst);
        }
    }
}
