//! The virtio-net device as an `embassy-net-driver`.
//!
//! Driven by polling: RX buffers are posted up front and the used ring is
//! polled whenever the stack asks for a frame; with nothing there the
//! caller's waker is woken after the next return from the host
//! (`kernel::task::wake_on_io`). On PVH monitors the device's interrupt
//! only ends the executor's idle wait (`kernel::arch::x86_64::apic`) and is
//! acknowledged here. TX frames are queued without a per-frame
//! notification when the device suppresses notifications (our shim does
//! and drains the queue on the executor's next `HC_YIELD`), so a burst of
//! frames costs one VM exit.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use core::task::Context;
use embassy_net_driver::{Capabilities, HardwareAddress, LinkState};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::DeviceType;

use crate::Error;
use abi::boot::Platform;
use kernel::virtio::{GuestTransport, UnikernelHal};

/// Descriptors per queue (RX buffers posted, TX frames in flight).
pub const QUEUE_SIZE: usize = 128;
/// Bytes per buffer: a 1514-byte frame plus the 12-byte virtio-net header.
const BUF_LEN: usize = 2048;
/// Largest Ethernet frame (without FCS).
const MTU: usize = 1514;

type Raw = VirtIONetRaw<UnikernelHal, GuestTransport, QUEUE_SIZE>;

/// The interface's IPv4 address (for gratuitous ARP), 0 until configured.
static ADDRESS: AtomicU32 = AtomicU32::new(0);
/// Set after a move to another host: announce `ADDRESS` on the next poll.
static ANNOUNCE: AtomicBool = AtomicBool::new(false);

/// Records the interface's address, announced after every migration.
pub fn set_address(ip: [u8; 4]) {
    ADDRESS.store(u32::from_be_bytes(ip), Ordering::Relaxed);
}

/// Asks the driver to announce the address (gratuitous ARP) on its next poll.
pub fn request_announce() {
    ANNOUNCE.store(true, Ordering::Relaxed);
}

/// A gratuitous ARP request: "who has IP? tell IP", from `mac`, broadcast.
fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip);
    f[38..42].copy_from_slice(&ip);
    f
}

struct Inner {
    raw: Raw,
    /// RX buffers the device owns, by token.
    rx_posted: Vec<Option<Box<[u8]>>>,
    /// TX buffers the device owns, by token, with the length handed over.
    tx_inflight: Vec<Option<(Box<[u8]>, usize)>>,
    /// TX buffers free for the next frame.
    tx_free: Vec<Box<[u8]>>,
    /// TX buffers not allocated yet: the pool grows on demand up to
    /// `QUEUE_SIZE`, so an idle guest holds only the few it has used.
    tx_unallocated: usize,
    mac: [u8; 6],
}

/// A virtio-net device driven by polling.
pub struct VirtioNet {
    /// Leaked: on our shim the executor's idle poll looks at the receive
    /// ring too (`kernel::netpoll`).
    inner: &'static RefCell<Inner>,
    mac: [u8; 6],
}

impl VirtioNet {
    /// Finds the first virtio-mmio network device on the command line.
    pub fn probe() -> Result<Self, Error> {
        let probed = kernel::virtio::probe(DeviceType::Network)
            .map_err(|e| Error::BadDeviceSpec(e.0))?
            .ok_or(Error::NoDevice)?;
        let raw = Raw::new(probed.transport).map_err(Error::Virtio)?;
        probed.check.result().map_err(Error::Features)?;
        if let (Platform::Pvh, Some(irq)) = (kernel::platform::get(), probed.irq) {
            // Its interrupts end the executor's idle wait.
            kernel::arch::x86_64::apic::route_device_irq(irq);
        }
        Self::new(raw)
    }

    fn new(mut raw: Raw) -> Result<Self, Error> {
        let mac = raw.mac_address();
        let mut rx_posted: Vec<Option<Box<[u8]>>> = (0..QUEUE_SIZE).map(|_| None).collect();
        for _ in 0..QUEUE_SIZE {
            let mut buf = vec![0u8; BUF_LEN].into_boxed_slice();
            // SAFETY: the buffer is kept in `rx_posted` untouched until the
            // device returns it (receive_complete).
            let token = unsafe { raw.receive_begin(&mut buf) }.map_err(Error::Virtio)?;
            rx_posted[token as usize] = Some(buf);
        }
        let tx_inflight = (0..QUEUE_SIZE).map(|_| None).collect();
        log::info!("virtio-net {:02x?}: {QUEUE_SIZE} RX buffers posted", mac);
        kernel::migration::on_migrated(request_announce);
        let inner: &'static RefCell<Inner> = Box::leak(Box::new(RefCell::new(Inner {
            raw,
            rx_posted,
            tx_inflight,
            tx_free: Vec::with_capacity(QUEUE_SIZE),
            tx_unallocated: QUEUE_SIZE,
            mac,
        })));
        if kernel::platform::get() == Platform::Shim {
            // Between the executor's rounds nothing else borrows it.
            kernel::netpoll::set_ready_check(move || {
                inner
                    .try_borrow()
                    .map_or(true, |i| i.raw.poll_receive().is_some())
            });
        }
        Ok(Self { inner, mac })
    }
}

impl Inner {
    /// Whether a TX buffer is free or can still be allocated.
    fn can_transmit(&self) -> bool {
        !self.tx_free.is_empty() || self.tx_unallocated > 0
    }

    /// A free TX buffer, allocated if none is free and the pool may grow.
    fn take_tx(&mut self) -> Option<Box<[u8]>> {
        self.tx_free.pop().or_else(|| {
            self.tx_unallocated = self.tx_unallocated.checked_sub(1)?;
            Some(vec![0u8; BUF_LEN].into_boxed_slice())
        })
    }

    /// Takes back TX buffers the device is done with.
    fn reclaim_tx(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some((buf, len)) = self
                .tx_inflight
                .get_mut(token as usize)
                .and_then(Option::take)
            else {
                log::error!("virtio-net: device completed unknown TX token {token}");
                return;
            };
            // SAFETY: `buf[..len]` is exactly what transmit_begin got for this token.
            if let Err(e) = unsafe { self.raw.transmit_complete(token, &buf[..len]) } {
                log::warn!("virtio-net: TX completion: {e}");
            }
            self.tx_free.push(buf);
        }
    }

    /// Sends a gratuitous ARP if a move asked for one, so switches and peers
    /// learn where the address lives now.
    fn announce_if_moved(&mut self) {
        let ip = ADDRESS.load(Ordering::Relaxed);
        if ip == 0 || !self.can_transmit() || !ANNOUNCE.swap(false, Ordering::Relaxed) {
            return;
        }
        let frame = gratuitous_arp(self.mac, ip.to_be_bytes());
        let mut buf = self.take_tx().expect("checked above");
        let Ok(hdr) = self.raw.fill_buffer_header(&mut buf) else {
            self.tx_free.push(buf);
            return;
        };
        buf[hdr..hdr + frame.len()].copy_from_slice(&frame);
        let total = hdr + frame.len();
        // SAFETY: as in `TxToken::consume`.
        match unsafe { self.raw.transmit_begin(&buf[..total]) } {
            Ok(token) => {
                self.tx_inflight[token as usize] = Some((buf, total));
                kernel::netpoll::tx_queued();
            }
            Err(_) => self.tx_free.push(buf),
        }
        log::info!("announced {:?} after a move", ip.to_be_bytes());
    }

    /// Hands an RX buffer back to the device.
    fn repost(&mut self, mut buf: Box<[u8]>) {
        // SAFETY: as in `VirtioNet::new`.
        match unsafe { self.raw.receive_begin(&mut buf) } {
            Ok(token) => self.rx_posted[token as usize] = Some(buf),
            Err(e) => log::error!("virtio-net: cannot repost RX buffer: {e}"),
        }
    }

    /// The next received frame: `(buffer, offset, length)`.
    fn next_rx(&mut self) -> Option<(Box<[u8]>, usize, usize)> {
        loop {
            let token = self.raw.poll_receive()?;
            let mut buf = self
                .rx_posted
                .get_mut(token as usize)
                .and_then(Option::take)?;
            // SAFETY: `buf` is the buffer posted with this token.
            match unsafe { self.raw.receive_complete(token, &mut buf) } {
                Ok((hdr, len)) if hdr + len <= buf.len() => return Some((buf, hdr, len)),
                other => {
                    log::warn!("virtio-net: dropping bad RX completion {other:?}");
                    self.repost(buf);
                }
            }
        }
    }
}

/// A received frame, lent to the stack.
pub struct RxToken<'a> {
    buf: Box<[u8]>,
    offset: usize,
    len: usize,
    inner: &'a RefCell<Inner>,
}

/// Room for one frame to send.
pub struct TxToken<'a> {
    inner: &'a RefCell<Inner>,
}

impl embassy_net_driver::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, f: F) -> R {
        let r = f(&mut self.buf[self.offset..self.offset + self.len]);
        self.inner.borrow_mut().repost(self.buf);
        r
    }
}

impl embassy_net_driver::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut inner = self.inner.borrow_mut();
        let mut buf = inner
            .take_tx()
            .expect("TxToken is only made with a free buffer");
        let hdr = inner
            .raw
            .fill_buffer_header(&mut buf)
            .expect("TX buffer holds a header");
        let total = (hdr + len).min(buf.len());
        let r = f(&mut buf[hdr..total]);
        // SAFETY: the buffer stays in `tx_inflight` untouched until the
        // device completes it (reclaim_tx).
        match unsafe { inner.raw.transmit_begin(&buf[..total]) } {
            Ok(token) => {
                inner.tx_inflight[token as usize] = Some((buf, total));
                kernel::netpoll::tx_queued();
            }
            Err(e) => {
                log::warn!("virtio-net: TX dropped: {e}");
                inner.tx_free.push(buf);
            }
        }
        r
    }
}

impl embassy_net_driver::Driver for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, cx: &mut Context) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let mut inner = self.inner.borrow_mut();
        if kernel::arch::x86_64::apic::take_device_irq() {
            // Before looking at the queues, so a later completion raises
            // the line again (QEMU's is level-triggered).
            inner.raw.ack_interrupt();
        }
        inner.reclaim_tx();
        inner.announce_if_moved();
        if !inner.can_transmit() {
            kernel::task::wake_on_io(cx.waker());
            return None;
        }
        let Some((buf, offset, len)) = inner.next_rx() else {
            kernel::task::wake_on_io(cx.waker());
            return None;
        };
        drop(inner);
        Some((
            RxToken {
                buf,
                offset,
                len,
                inner: self.inner,
            },
            TxToken { inner: self.inner },
        ))
    }

    fn transmit(&mut self, cx: &mut Context) -> Option<TxToken<'_>> {
        let mut inner = self.inner.borrow_mut();
        inner.reclaim_tx();
        if !inner.can_transmit() {
            kernel::task::wake_on_io(cx.waker());
            return None;
        }
        Some(TxToken { inner: self.inner })
    }

    fn link_state(&mut self, _cx: &mut Context) -> LinkState {
        LinkState::Up
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(QUEUE_SIZE);
        caps
    }

    fn hardware_address(&self) -> HardwareAddress {
        HardwareAddress::Ethernet(self.mac)
    }
}
