//! The virtio-net device (id 1): queue 0 receives, queue 1 transmits, each
//! up to 256 entries, frames go to and come from a [`GuestPort`] of the
//! virtual switch.
//!
//! Offered features: `VERSION_1 | MAC` (no EVENT_IDX, INDIRECT_DESC or
//! MRG_RXBUF), so every frame carries the 12-byte `virtio_net_hdr_v1`
//! (`num_buffers` = 1 at offset 10 on receive) and fits in one chain.
//! Configuration space: `mac[6]`, `status: u16` = LINK_UP.
//!
//! **Batching.** Both used rings carry `VRING_USED_F_NO_NOTIFY`, so the
//! driver never exits to announce a frame; the device drains the transmit
//! queue and fills receive buffers whenever the guest exits anyway — on
//! every `HC_YIELD` (the guest's executor yields once per loop iteration)
//! and on any queue notify. A burst of frames thus costs no exit of its own.
//! While the guest spins on its rings instead of idling in the host, the
//! network thread serves the device itself ([`poll`]): no exit at all.
//!
//! **Validation.** Descriptor chains are walked with `virtio-queue`, which
//! bounds their length by the queue size; a chain must end (no loop, no
//! index out of the table), every buffer must lie in guest RAM, transmit
//! buffers must be device-readable and receive buffers device-writable. A
//! chain that breaks these rules stops its queue with a [`QueueError`]
//! (warning, error counter, DEVICE_NEEDS_RESET, see the transport). A
//! malformed *frame* is only dropped with a warning: too short, or longer
//! than 1514 bytes plus the header.

pub mod persist;
pub mod poll;

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::{Progress, QueueError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::vm::GuestMemoryMmap;
use hostnet::port::{Frame, GuestPort};

/// virtio device id of a network card.
pub const DEVICE_ID: u32 = 1;
/// Feature bit: the device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Config `status` bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Largest queue the device accepts.
pub const QUEUE_MAX: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Bytes of `virtio_net_hdr_v1` in front of every frame.
pub const NET_HDR_LEN: usize = 12;
/// Largest Ethernet frame (no FCS, no VLAN tag).
pub const MAX_FRAME: usize = 1514;
/// Smallest Ethernet header.
pub const ETH_HDR_LEN: usize = 14;

/// Counters of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Frames from the guest dropped (too short or too long).
    pub tx_dropped: u64,
    /// Frames for the guest dropped (no room in its buffer).
    pub rx_dropped: u64,
    /// Queues the guest broke.
    pub errors: u64,
}

/// A virtio-net device attached to a switch port.
pub struct Net {
    mac: [u8; 6],
    port: Arc<GuestPort>,
    halted: [bool; 2],
    stats: NetStats,
    /// Transmitted frames not yet handed to the switch.
    outgoing: Vec<Frame>,
    /// A receive chain's buffers, reused.
    buffers: Vec<(GuestAddress, usize)>,
    /// Header and frame being received or transmitted, reused.
    staging: Vec<u8>,
    /// The rate limit of the warnings the guest triggers.
    warnings: shim_util::limit::Warnings,
    /// The network thread put frames in the receive ring since the vCPU
    /// thread last served the device (see [`poll`]): a guest about to sleep
    /// must look first.
    delivered_by_network: bool,
}

impl Net {
    pub fn new(port: Arc<GuestPort>) -> Self {
        Self {
            mac: port.mac(),
            port,
            halted: [false; 2],
            stats: NetStats::default(),
            outgoing: Vec::new(),
            buffers: Vec::new(),
            staging: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME),
            warnings: Default::default(),
            delivered_by_network: false,
        }
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c
    }

    fn fail(&mut self, queue: usize, reason: String) -> QueueError {
        self.halted[queue] = true;
        self.stats.errors += 1;
        QueueError { queue, reason }
    }

    /// Drains the transmit queue into the switch. Returns whether the ring
    /// was full (the driver may be waiting for free buffers) and how many
    /// frames it held.
    fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<(bool, usize), QueueError> {
        if self.halted[TX_QUEUE] || !queue.ready() {
            return Ok((false, 0));
        }
        let mut done: Vec<u16> = Vec::new();
        let mut error = None;
        match queue.iter(mem) {
            Err(e) => error = Some(format!("transmit avail ring: {e}")),
            Ok(chains) => {
                for chain in chains {
                    let head = chain.head_index();
                    // Read into the reused buffer; only the frame is copied
                    // out, sized to fit.
                    let mut staging = std::mem::take(&mut self.staging);
                    staging.clear();
                    let read = read_chain(mem, chain, &mut staging);
                    if read.is_ok() {
                        done.push(head);
                        self.accept_tx(&staging);
                    }
                    self.staging = staging;
                    if let Err(why) = read {
                        error = Some(format!("transmit chain at head {head}: {why}"));
                        break;
                    }
                }
            }
        }
        let full = done.len() >= usize::from(queue.size());
        let taken = done.len();
        for head in done {
            // Transmit buffers are only read: the used length is 0.
            if let Err(e) = queue.add_used(mem, head, 0) {
                error.get_or_insert(format!("transmit used ring: {e}"));
                break;
            }
        }
        self.port.send(&mut self.outgoing);
        match error {
            Some(why) => Err(self.fail(TX_QUEUE, why)),
            None => Ok((full, taken)),
        }
    }

    /// Checks a transmitted frame (with its header) and queues a copy of
    /// the frame alone, sized to fit.
    fn accept_tx(&mut self, frame: &[u8]) {
        let len = frame.len().saturating_sub(NET_HDR_LEN);
        if !(ETH_HDR_LEN..=MAX_FRAME).contains(&len) {
            self.stats.tx_dropped += 1;
            {
                shim_util::guest_warn!(
                    self.warnings,
                    mac = %fmt_mac(&self.mac),
                    bytes = len,
                    min = ETH_HDR_LEN,
                    max = MAX_FRAME,
                    dropped = self.stats.tx_dropped,
                    "virtio-net: transmitted frame dropped: out of bounds after the header"
                );
            }
            return;
        }
        self.stats.tx_frames += 1;
        self.outgoing.push(frame[NET_HDR_LEN..].to_vec());
    }

    /// Moves waiting frames into the guest's receive buffers. Returns how
    /// many were delivered.
    fn receive(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<usize, QueueError> {
        if self.halted[RX_QUEUE] || !queue.ready() {
            return Ok(0);
        }
        let port = Arc::clone(&self.port);
        let mut pending = port.received();
        if pending.is_empty() {
            poll::set_rx_pending(mem, false);
            return Ok(0);
        }
        let mut done: Vec<(u16, u32)> = Vec::new();
        let mut error = None;
        match queue.iter(mem) {
            Err(e) => error = Some(format!("receive avail ring: {e}")),
            Ok(mut chains) => {
                while let Some(frame) = pending.front() {
                    let Some(chain) = chains.next() else {
                        break; // no buffer: the frames wait
                    };
                    let head = chain.head_index();
                    match self.write_chain(mem, chain, frame) {
                        Ok(Some(len)) => {
                            done.push((head, len));
                            pending.pop_front();
                        }
                        Ok(None) => {
                            self.stats.rx_dropped += 1;
                            {
                                shim_util::guest_warn!(
                                    self.warnings,
                                    mac = %fmt_mac(&self.mac),
                                    bytes = frame.len(),
                                    dropped = self.stats.rx_dropped,
                                    "virtio-net: received frame dropped: the guest's \
                                     buffer is too small"
                                );
                            }
                            pending.pop_front();
                            // The buffer stays for the next frame.
                            chains.go_to_previous_position();
                        }
                        Err(why) => {
                            error = Some(format!("receive chain at head {head}: {why}"));
                            break;
                        }
                    }
                }
            }
        }
        // Under the port's lock, as the network thread's store of it.
        poll::set_rx_pending(mem, !pending.is_empty());
        drop(pending);
        let delivered = done.len();
        for (head, len) in done {
            if let Err(e) = queue.add_used(mem, head, len) {
                error.get_or_insert(format!("receive used ring: {e}"));
                break;
            }
        }
        self.stats.rx_frames += delivered as u64;
        match error {
            Some(why) => Err(self.fail(RX_QUEUE, why)),
            None => Ok(delivered),
        }
    }

    /// Writes the header and `frame` into a receive chain. `Ok(None)`: the
    /// chain is valid but too small.
    fn write_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        frame: &[u8],
    ) -> Result<Option<u32>, String> {
        self.buffers.clear();
        let mut ended = false;
        let mut capacity = 0usize;
        for desc in chain {
            if !desc.is_write_only() {
                return Err("a receive buffer is not device-writable".into());
            }
            let len = desc.len() as usize;
            if !mem.check_range(desc.addr(), len, Permissions::Write) {
                return Err(format!(
                    "buffer {:#x}+{len:#x} is outside guest RAM",
                    desc.addr().0
                ));
            }
            self.buffers.push((desc.addr(), len));
            capacity += len;
            ended = !desc.has_next();
        }
        if !ended {
            return Err(broken_chain());
        }
        let total = NET_HDR_LEN + frame.len();
        if capacity < total {
            return Ok(None);
        }
        let mut header = [0u8; NET_HDR_LEN];
        header[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
        self.staging.clear();
        self.staging.extend_from_slice(&header);
        self.staging.extend_from_slice(frame);
        let mut rest = &self.staging[..];
        for &(addr, len) in &self.buffers {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at(len.min(rest.len()));
            mem.write_slice(now, addr)
                .map_err(|e| format!("writing buffer {:#x}: {e}", addr.0))?;
            rest = later;
        }
        Ok(Some(total as u32))
    }
}

fn broken_chain() -> String {
    "the chain does not end: it loops, is longer than the queue, or names a \
     descriptor outside the table"
        .into()
}

/// Reads a transmit chain (header + frame) into `out`.
fn read_chain(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    /// More than any frame: a longer chain is read no further (the frame is
    /// dropped as too long), though its buffers are still checked.
    const LIMIT: usize = NET_HDR_LEN + MAX_FRAME + 1;
    let mut ended = false;
    for desc in chain {
        if desc.is_write_only() {
            return Err("a transmit buffer is device-writable".into());
        }
        let len = desc.len() as usize;
        if !mem.check_range(desc.addr(), len, Permissions::Read) {
            return Err(format!(
                "buffer {:#x}+{len:#x} is outside guest RAM",
                desc.addr().0
            ));
        }
        let take = len.min(LIMIT.saturating_sub(out.len()));
        if take > 0 {
            let start = out.len();
            out.resize(start + take, 0);
            mem.read_slice(&mut out[start..], desc.addr())
                .map_err(|e| format!("reading buffer {:#x}: {e}", desc.addr().0))?;
        }
        ended = !desc.has_next();
    }
    if ended {
        Ok(())
    } else {
        Err(broken_chain())
    }
}

pub use hostnet::fmt_mac;

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX, QUEUE_MAX]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        shim_util::guest_warn!(
            self.warnings,
            mac = %fmt_mac(&self.mac),
            bytes = data.len(),
            offset = format_args!("{offset:#x}"),
            "virtio-net: config write ignored"
        );
    }

    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        _features: u64,
        queues: &mut [Queue],
    ) -> Result<(), String> {
        for (index, queue) in queues.iter_mut().enumerate() {
            if !queue.ready() {
                return Err(format!("queue {index} is not ready"));
            }
            // The driver never notifies: we look at the rings on each exit.
            queue
                .disable_notification(mem)
                .map_err(|e| format!("queue {index}: cannot write its used ring: {e}"))?;
        }
        self.halted = [false; 2];
        // A guest may reset and activate its card in a loop: rate-limited.
        if self.warnings.allow().is_some() {
            tracing::info!(mac = %fmt_mac(&self.mac), "virtio-net up");
        }
        Ok(())
    }

    fn process(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        _notified: Option<u16>,
    ) -> Result<Progress, QueueError> {
        let [rx, tx] = queues else {
            return Ok(Progress::default());
        };
        // Both directions on every call, whatever was notified: a transmit
        // error must not keep frames from being received, and vice versa.
        let sent = self.transmit(mem, tx);
        let received = self.receive(mem, rx);
        let (ring_was_full, sent) = sent?;
        let delivered = received?;
        let meanwhile = std::mem::take(&mut self.delivered_by_network);
        Ok(Progress {
            guest_should_run: delivered > 0 || ring_was_full || meanwhile,
            sent,
            delivered,
        })
    }

    fn process_polling(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
    ) -> Result<Progress, QueueError> {
        let progress = self.process(mem, queues, None);
        // Not taken by the vCPU thread: it must still hear of it.
        self.delivered_by_network |= progress
            .as_ref()
            .map_or(true, |p| p.guest_should_run || p.delivered > 0);
        progress
    }

    fn on_vcpu_thread(&self, mem: &GuestMemoryMmap) {
        self.port.place(poll::guest_spins(mem));
    }

    fn reset(&mut self) {
        self.halted = [false; 2];
        self.outgoing.clear();
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.port.wait_fd())
    }

    fn prepare_wait(&mut self) {
        self.port.clear_wake();
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn port(&self) -> Option<Arc<GuestPort>> {
        Some(Arc::clone(&self.port))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::persist::NetPersistError;
    use super::*;
    use crate::devices::persist::{DevicePersistError, DeviceStates};
    use crate::devices::virtio::mmio::persist::TransportPersistError;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::status;
    use crate::vstate::vm::allocate;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
    };
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const RAM: u64 = 4 << 20;
    const BASE: u64 = 0xc000_1000;
    const SIZE: u16 = 16;
    /// Rings of queue q at RINGS + q * 0x1_0000: desc, avail +0x1000, used +0x2000.
    const RINGS: u64 = 0x10_0000;
    /// Buffers from here.
    const BUFS: u64 = 0x20_0000;

    /// A driver, by hand: writes descriptors and rings into guest memory.
    struct Driver {
        mem: GuestMemoryMmap,
        t: MmioTransport,
        port: Arc<GuestPort>,
        switch_wake: Arc<EventFd>,
        avail_idx: [u16; 2],
        used_seen: [u16; 2],
    }

    fn ring(q: usize) -> u64 {
        RINGS + q as u64 * 0x1_0000
    }

    impl Driver {
        fn new() -> Self {
            let mem = allocate(RAM).unwrap();
            let switch_wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let port =
                Arc::new(GuestPort::new([0x02, 0, 0, 0, 0, 0x0f], switch_wake.clone()).unwrap());
            let t = MmioTransport::new(BASE, 0x200, Box::new(Net::new(port.clone())));
            let mut d = Self {
                mem,
                t,
                port,
                switch_wake,
                avail_idx: [0; 2],
                used_seen: [0; 2],
            };
            d.bring_up();
            d
        }

        fn wr(&mut self, offset: u64, value: u32) {
            self.t
                .write(&self.mem, BASE + offset, &value.to_le_bytes())
                .unwrap();
        }

        fn rd(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(BASE + offset, &mut b);
            u32::from_le_bytes(b)
        }

        fn bring_up(&mut self) {
            self.wr(0x70, 0);
            self.wr(0x70, status::ACKNOWLEDGE | status::DRIVER);
            self.wr(0x14, 0);
            let lo = self.rd(0x10);
            self.wr(0x14, 1);
            let hi = self.rd(0x10);
            assert_eq!(
                (u64::from(hi) << 32) | u64::from(lo),
                VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
            );
            self.wr(0x24, 0);
            self.wr(0x20, lo);
            self.wr(0x24, 1);
            self.wr(0x20, hi);
            let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
            self.wr(0x70, s);
            for q in 0..2 {
                // Fresh, zeroed rings.
                self.mem
                    .write_slice(&[0u8; 0x3000], GuestAddress(ring(q)))
                    .unwrap();
                self.wr(0x30, q as u32);
                assert_eq!(self.rd(0x34), u32::from(QUEUE_MAX));
                self.wr(0x38, u32::from(SIZE));
                self.wr(0x80, ring(q) as u32);
                self.wr(0x84, 0);
                self.wr(0x90, (ring(q) + 0x1000) as u32);
                self.wr(0x94, 0);
                self.wr(0xa0, (ring(q) + 0x2000) as u32);
                self.wr(0xa4, 0);
                self.wr(0x44, 1);
            }
            self.wr(0x70, s | status::DRIVER_OK);
            assert!(self.t.is_active());
            self.avail_idx = [0; 2];
            self.used_seen = [0; 2];
        }

        fn desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = ring(q) + u64::from(index) * 16;
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
        }

        /// Makes chain `head` available on queue `q`.
        fn offer(&mut self, q: usize, head: u16) {
            let avail = ring(q) + 0x1000;
            let slot = avail + 4 + u64::from(self.avail_idx[q] % SIZE) * 2;
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
                .unwrap();
        }

        fn used_flags(&self, q: usize) -> u16 {
            self.mem.read_obj(GuestAddress(ring(q) + 0x2000)).unwrap()
        }

        /// New used entries of queue `q`: (id, len).
        fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
            let used = ring(q) + 0x2000;
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            let mut out = Vec::new();
            while self.used_seen[q] != idx {
                let at = used + 4 + u64::from(self.used_seen[q] % SIZE) * 8;
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                out.push((id, len));
                self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            }
            out
        }

        /// Queues `frame` for transmission in one descriptor `index`.
        fn send(&mut self, index: u16, frame: &[u8]) {
            let addr = BUFS + u64::from(index) * 0x1000;
            let mut bytes = vec![0u8; NET_HDR_LEN];
            bytes.extend_from_slice(frame);
            self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            self.desc(TX_QUEUE, index, addr, bytes.len() as u32, 0, 0);
            self.offer(TX_QUEUE, index);
        }

        /// Posts a receive buffer of `len` bytes in descriptor `index`.
        fn post(&mut self, index: u16, len: u32) {
            let addr = BUFS + 0x10_0000 + u64::from(index) * 0x1000;
            self.desc(RX_QUEUE, index, addr, len, VRING_DESC_F_WRITE as u16, 0);
            self.offer(RX_QUEUE, index);
        }

        fn rx_buffer(&self, index: u16, len: usize) -> Vec<u8> {
            let mut b = vec![0u8; len];
            let addr = BUFS + 0x10_0000 + u64::from(index) * 0x1000;
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        }

        fn sent(&self) -> Vec<Frame> {
            let mut out = Vec::new();
            self.port.take_sent(&mut out);
            out
        }

        fn needs_reset(&self) -> bool {
            self.t.status() & status::DEVICE_NEEDS_RESET != 0
        }
    }

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; n];
        f[..6].copy_from_slice(&[0xff; 6]);
        f
    }

    #[test]
    fn config_space_holds_the_mac_and_link_up() {
        let mut d = Driver::new();
        let mut cfg = [0u8; 8];
        d.t.read(BASE + 0x100, &mut cfg);
        assert_eq!(cfg, [0x02, 0, 0, 0, 0, 0x0f, 1, 0]);
        assert_eq!(d.rd(0x08), DEVICE_ID);
    }

    #[test]
    fn both_used_rings_suppress_notifications() {
        let d = Driver::new();
        assert_eq!(d.used_flags(RX_QUEUE), VRING_USED_F_NO_NOTIFY as u16);
        assert_eq!(d.used_flags(TX_QUEUE), VRING_USED_F_NO_NOTIFY as u16);
    }

    #[test]
    fn transmitted_frames_reach_the_port_in_one_batch() {
        let mut d = Driver::new();
        d.send(0, &frame(60, 1));
        d.send(1, &frame(1514, 2));
        d.send(2, &frame(100, 3));
        let progress = d.t.process(&d.mem).unwrap();
        assert!(!progress.guest_should_run);
        assert_eq!(
            d.switch_wake.read().unwrap(),
            1,
            "one wake-up for the batch"
        );
        assert_eq!(d.sent(), [frame(60, 1), frame(1514, 2), frame(100, 3)]);
        assert_eq!(d.used(TX_QUEUE), [(0, 0), (1, 0), (2, 0)]);
        // A notify works too.
        d.send(3, &frame(64, 4));
        d.wr(0x50, TX_QUEUE as u32);
        assert_eq!(d.sent(), [frame(64, 4)]);
    }

    #[test]
    fn a_frame_split_over_a_chain_is_reassembled() {
        let mut d = Driver::new();
        let f = frame(200, 7);
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(&f);
        d.mem.write_slice(&bytes[..12], GuestAddress(BUFS)).unwrap();
        d.mem
            .write_slice(&bytes[12..50], GuestAddress(BUFS + 0x1000))
            .unwrap();
        d.mem
            .write_slice(&bytes[50..], GuestAddress(BUFS + 0x2000))
            .unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        d.desc(TX_QUEUE, 5, BUFS, 12, next, 9);
        d.desc(TX_QUEUE, 9, BUFS + 0x1000, 38, next, 2);
        d.desc(TX_QUEUE, 2, BUFS + 0x2000, (bytes.len() - 50) as u32, 0, 0);
        d.offer(TX_QUEUE, 5);
        d.t.process(&d.mem).unwrap();
        assert_eq!(d.sent(), [f]);
        assert_eq!(d.used(TX_QUEUE), [(5, 0)]);
    }

    #[test]
    fn bad_frames_are_dropped_but_completed() {
        let mut d = Driver::new();
        d.send(0, &frame(1515, 1)); // too long
        d.send(1, &[0xff; 10]); // shorter than an Ethernet header
        d.send(2, &frame(60, 2));
        d.t.process(&d.mem).unwrap();
        assert_eq!(d.sent(), [frame(60, 2)]);
        assert_eq!(d.used(TX_QUEUE).len(), 3);
        assert!(!d.needs_reset());
    }

    #[test]
    fn a_restored_card_goes_on_where_the_saved_one_stopped() {
        let mut d = Driver::new();
        // When the guest is paused: a frame sent, one waiting for a buffer.
        d.send(0, &frame(60, 1));
        d.t.process(&d.mem).unwrap();
        assert_eq!(d.used(TX_QUEUE).len(), 1);
        d.port.deliver(&mut vec![frame(70, 2)]);
        let saved = DeviceStates::save(std::slice::from_ref(&d.t));
        // Through bytes, as in a snapshot file or a migration stream.
        let saved: DeviceStates =
            postcard::from_bytes(&postcard::to_stdvec(&saved).unwrap()).unwrap();
        assert_eq!(saved.net[0].device.pending_rx, [frame(70, 2)]);
        // Onto a fresh port with the guest's MAC (another switch).
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let port = Arc::new(GuestPort::new(d.port.mac(), wake.clone()).unwrap());
        let mut restored = saved.restore(Some(port.clone())).unwrap();
        assert_eq!(restored.len(), 1);
        d.t = restored.pop().unwrap();
        (d.port, d.switch_wake) = (port, wake);
        assert!(d.t.is_active());
        assert_eq!(DeviceStates::save(std::slice::from_ref(&d.t)), saved);
        // The carried frame fills the next buffer; sending goes on.
        d.post(0, 2048);
        assert!(d.t.process(&d.mem).unwrap().guest_should_run);
        assert_eq!(d.used(RX_QUEUE), [(0, 82)]);
        assert_eq!(&d.rx_buffer(0, 82)[12..], &frame(70, 2)[..]);
        d.send(1, &frame(60, 3));
        d.t.process(&d.mem).unwrap();
        assert_eq!(d.sent(), [frame(60, 3)]);
        assert_eq!(
            d.used(TX_QUEUE),
            [(1, 0)],
            "transmit buffers are read, not written"
        );
    }

    #[test]
    fn a_saved_card_that_does_not_fit_is_refused() {
        let d = Driver::new();
        let saved = DeviceStates::save(std::slice::from_ref(&d.t));
        let port = |mac| {
            let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            Some(Arc::new(GuestPort::new(mac, wake).unwrap()))
        };
        let mac = d.port.mac();
        let other = [0x02, 0, 0, 0, 0, 0x10];
        assert_eq!(
            saved.restore(port(other)).err(),
            Some(DevicePersistError::Net(NetPersistError::Mac {
                saved: mac,
                here: other
            }))
        );
        assert_eq!(
            saved.restore(None).err(),
            Some(DevicePersistError::NetCount { saved: 1, given: 0 })
        );
        let mut bad = saved.clone();
        bad.net[0].transport.queues[1].max_size = 1024;
        assert_eq!(
            bad.restore(port(mac)).err(),
            Some(DevicePersistError::Transport(
                TransportPersistError::QueueMaxSize {
                    name: "virtio-net",
                    index: 1,
                    saved: 1024,
                    here: QUEUE_MAX
                }
            ))
        );
        let mut bad = saved.clone();
        bad.net[0].transport.base += 0x200;
        assert!(matches!(
            bad.restore(port(mac)).err(),
            Some(DevicePersistError::Transport(
                TransportPersistError::Mismatch { .. }
            ))
        ));
        let mut bad = saved.clone();
        bad.net[0].transport.queues[0].size = 3;
        assert!(matches!(
            bad.restore(port(mac)).err(),
            Some(DevicePersistError::Transport(
                TransportPersistError::Queue { index: 0, .. }
            ))
        ));
        let mut bad = saved;
        bad.net[0].transport.addrs.pop();
        assert!(matches!(
            bad.restore(port(mac)).err(),
            Some(DevicePersistError::Transport(
                TransportPersistError::QueueCount { .. }
            ))
        ));
    }

    #[test]
    fn received_frames_fill_posted_buffers() {
        let mut d = Driver::new();
        d.port
            .deliver(&mut vec![frame(60, 1), frame(1514, 2), frame(80, 3)]);
        // Nothing posted yet: the frames wait.
        assert!(!d.t.process(&d.mem).unwrap().guest_should_run);
        d.post(0, 2048);
        d.post(1, 2048);
        let progress = d.t.process(&d.mem).unwrap();
        assert!(progress.guest_should_run);
        assert_eq!(d.used(RX_QUEUE), [(0, 72), (1, 1526)]);
        let got = d.rx_buffer(0, 72);
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
        assert_eq!(&got[12..], &frame(60, 1)[..]);
        assert_eq!(&d.rx_buffer(1, 1526)[12..], &frame(1514, 2)[..]);
        // The third waits for a buffer.
        assert_eq!(d.port.received().len(), 1);
        d.post(2, 2048);
        d.t.process(&d.mem).unwrap();
        assert_eq!(d.used(RX_QUEUE), [(2, 92)]);
        assert!(d.port.received().is_empty());
    }

    /// A `NetPoll` word of the guest's boot information.
    fn net_poll(d: &Driver, offset: usize) -> u32 {
        let at = abi::boot::NetPoll::addr(offset);
        d.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// The guest spins on its rings when idle, and is spinning now (`on`).
    fn set_polling(d: &Driver, on: bool) {
        for offset in [
            std::mem::offset_of!(abi::boot::NetPoll, spins),
            std::mem::offset_of!(abi::boot::NetPoll, polling),
        ] {
            let at = abi::boot::NetPoll::addr(offset);
            d.mem.write_obj(u32::from(on), GuestAddress(at)).unwrap();
        }
    }

    #[test]
    fn while_the_guest_polls_the_network_thread_moves_its_frames() {
        use abi::boot::NetPoll;
        use std::mem::offset_of;
        use std::sync::Mutex;
        let mut d = Driver::new();
        d.post(0, 2048);
        d.post(1, 2048);
        let port = Arc::clone(&d.port);
        let spare = MmioTransport::new(BASE, 0x200, Box::new(Net::new(Arc::clone(&port))));
        let devices = Arc::new(Mutex::new(vec![std::mem::replace(&mut d.t, spare)]));
        let server = poll::RingServer::install(&devices, &d.mem, &port);

        // The guest does not poll: a frame waits in the port for its vCPU
        // thread, and the guest is told that frames wait.
        port.deliver(&mut vec![frame(60, 1)]);
        assert!(!port.spins());
        assert!(!port.serve(false, false).served);
        assert_eq!(net_poll(&d, offset_of!(NetPoll, rx_pending)), 1);
        assert!(d.used(RX_QUEUE).is_empty());

        // It polls: the network thread puts the frame in its ring itself.
        set_polling(&d, true);
        assert!(port.spins());
        port.watch(true);
        assert_eq!(net_poll(&d, offset_of!(NetPoll, watching)), 1);
        let served = port.serve(false, false);
        assert_eq!((served.served, served.delivered), (true, 1));
        assert_eq!(d.used(RX_QUEUE), [(0, 72)]);
        assert_eq!(net_poll(&d, offset_of!(NetPoll, rx_pending)), 0);

        // Its reply leaves without an exit while the ring is watched.
        d.send(0, &frame(64, 2));
        assert_eq!(port.serve(true, false).sent, 1);
        assert_eq!(d.sent(), [frame(64, 2)]);
        assert_eq!(d.used(TX_QUEUE), [(0, 0)]);

        // A guest that went to sleep meanwhile is woken by its vCPU thread:
        // the network thread filled its ring behind its back.
        set_polling(&d, false);
        port.deliver(&mut vec![frame(70, 3)]);
        assert_eq!(
            port.serve(true, false).delivered,
            1,
            "a watched ring is served"
        );
        let progress = devices.lock().unwrap()[0].process(&d.mem).unwrap();
        assert!(progress.guest_should_run);
        assert_eq!(d.used(RX_QUEUE), [(1, 82)]);

        // Paused: the network thread writes nothing at all.
        set_polling(&d, true);
        server.set_enabled(false);
        assert_eq!(net_poll(&d, offset_of!(NetPoll, watching)), 0);
        port.watch(true);
        d.post(2, 2048);
        port.deliver(&mut vec![frame(80, 4)]);
        assert!(!port.spins());
        assert_eq!(port.serve(true, false), Default::default());
        assert_eq!(net_poll(&d, offset_of!(NetPoll, watching)), 0);
        assert_eq!(net_poll(&d, offset_of!(NetPoll, rx_pending)), 0);
        assert!(d.used(RX_QUEUE).is_empty());
        server.set_enabled(true);
        assert_eq!(port.serve(false, false).delivered, 1);

        // Many clients at once: the guest is told to wait in the host, and
        // is no longer one that spins (its vCPU thread may sit next to the
        // network thread again).
        port.serve(false, true);
        assert_eq!(net_poll(&d, offset_of!(NetPoll, hold_off)), 1);
        assert!(!port.spins());
        port.serve(false, false);
        assert_eq!(net_poll(&d, offset_of!(NetPoll, hold_off)), 0);
        assert!(port.spins());

        // Once the machine is gone, its port serves nothing.
        drop(server);
        port.deliver(&mut vec![frame(90, 5)]);
        assert!(!port.serve(true, false).served);
    }

    #[test]
    fn a_frame_too_big_for_its_buffer_is_dropped_and_the_buffer_kept() {
        let mut d = Driver::new();
        d.port.deliver(&mut vec![frame(1514, 1), frame(60, 2)]);
        d.post(0, 1000);
        d.t.process(&d.mem).unwrap();
        assert_eq!(d.used(RX_QUEUE), [(0, 72)]);
        assert_eq!(&d.rx_buffer(0, 72)[12..], &frame(60, 2)[..]);
        assert!(!d.needs_reset());
    }

    #[test]
    fn a_full_transmit_ring_wakes_the_guest() {
        let mut d = Driver::new();
        for i in 0..SIZE {
            d.send(i, &frame(60, i as u8));
        }
        assert!(d.t.process(&d.mem).unwrap().guest_should_run);
        assert_eq!(d.sent().len(), usize::from(SIZE));
    }

    /// Runs `corrupt` on a fresh device, then checks that the device
    /// reports it, stops the queue, survives, and comes back after a reset.
    fn check_bad_descriptor(what: &str, q: usize, corrupt: impl Fn(&mut Driver)) {
        let mut d = Driver::new();
        corrupt(&mut d);
        // A broken queue is not fatal for the shim.
        let progress = d.t.process(&d.mem).unwrap();
        assert!(progress.guest_should_run, "{what}");
        assert!(d.needs_reset(), "{what}: DEVICE_NEEDS_RESET");
        let net_used_before = d.used(q);
        // The queue stays stopped: new work is not touched.
        if q == TX_QUEUE {
            d.send(15, &frame(60, 9));
        } else {
            d.port.deliver(&mut vec![frame(60, 9)]);
            d.post(15, 2048);
        }
        d.t.process(&d.mem).unwrap();
        assert!(
            d.used(q).is_empty(),
            "{what}: queue {q} stopped ({net_used_before:?})"
        );
        // After a reset, the device works again.
        d.port.received().clear();
        d.sent();
        d.bring_up();
        assert!(!d.needs_reset(), "{what}");
        d.send(0, &frame(60, 5));
        d.port.deliver(&mut vec![frame(60, 6)]);
        d.post(0, 2048);
        d.t.process(&d.mem).unwrap();
        assert_eq!(d.sent(), [frame(60, 5)], "{what}");
        assert_eq!(d.used(RX_QUEUE), [(0, 72)], "{what}");
    }

    #[test]
    fn bad_descriptors_stop_the_queue_not_the_shim() {
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        check_bad_descriptor("tx buffer outside RAM", TX_QUEUE, |d| {
            d.desc(TX_QUEUE, 0, RAM - 8, 64, 0, 0);
            d.offer(TX_QUEUE, 0);
        });
        check_bad_descriptor("tx buffer address wraps", TX_QUEUE, |d| {
            d.desc(TX_QUEUE, 0, u64::MAX - 4, 64, 0, 0);
            d.offer(TX_QUEUE, 0);
        });
        check_bad_descriptor("tx chain loops", TX_QUEUE, |d| {
            d.desc(TX_QUEUE, 0, BUFS, 64, next, 1);
            d.desc(TX_QUEUE, 1, BUFS, 64, next, 0);
            d.offer(TX_QUEUE, 0);
        });
        check_bad_descriptor("tx next outside the table", TX_QUEUE, |d| {
            d.desc(TX_QUEUE, 0, BUFS, 64, next, SIZE + 3);
            d.offer(TX_QUEUE, 0);
        });
        check_bad_descriptor("tx head outside the table", TX_QUEUE, |d| {
            d.offer(TX_QUEUE, 999);
        });
        check_bad_descriptor("tx buffer device-writable", TX_QUEUE, |d| {
            d.desc(TX_QUEUE, 0, BUFS, 64, write, 0);
            d.offer(TX_QUEUE, 0);
        });
        check_bad_descriptor("tx avail index far ahead", TX_QUEUE, |d| {
            d.mem
                .write_obj(1000u16, GuestAddress(ring(TX_QUEUE) + 0x1002))
                .unwrap();
        });
        check_bad_descriptor("rx buffer outside RAM", RX_QUEUE, |d| {
            d.desc(RX_QUEUE, 0, RAM - 100, 2048, write, 0);
            d.offer(RX_QUEUE, 0);
            d.port.deliver(&mut vec![frame(60, 1)]);
        });
        check_bad_descriptor("rx buffer read-only", RX_QUEUE, |d| {
            d.desc(RX_QUEUE, 0, BUFS, 2048, 0, 0);
            d.offer(RX_QUEUE, 0);
            d.port.deliver(&mut vec![frame(60, 1)]);
        });
        check_bad_descriptor("rx chain loops", RX_QUEUE, |d| {
            d.desc(RX_QUEUE, 3, BUFS, 8, write | next, 3);
            d.offer(RX_QUEUE, 3);
            d.port.deliver(&mut vec![frame(60, 1)]);
        });
    }

    #[test]
    fn a_guest_that_keeps_breaking_queues_is_stopped() {
        let mut d = Driver::new();
        let mut stopped = None;
        for _ in 0..crate::devices::virtio::mmio::MAX_ERRORS {
            d.offer(TX_QUEUE, 999);
            if let Err(e) = d.t.process(&d.mem) {
                stopped = Some(e);
                break;
            }
            d.bring_up();
        }
        let e = stopped.expect("the guest is stopped");
        assert!(e.contains("virtio-net"), "{e}");
        assert!(e.contains("transmit chain"), "{e}");
    }
}
