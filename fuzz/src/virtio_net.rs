//! `virtio_net`: the virtio-mmio transport and net device driven by a hostile guest.
//!
//! The virtio-mmio transport and the network device driven like a hostile guest
//! would, by register accesses, descriptor tables and rings in a small guest memory, and
//! frames arriving from the switch.
//!
//! The input is a list of operations (one opcode byte, then its fields); see [`Op`]. `BringUp`
//! runs a correct driver initialisation with both queues' rings at [`ring`], so the fuzzer
//! reaches the device's descriptor handling without rediscovering the handshake.

use std::sync::Arc;

use hostnet::port::GuestPort;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::net::{Net, QUEUE_MAX};
use vmm::devices::virtio::{status, window_base, MmioTransport};
use vmm::vstate::vm::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Input;

/// Guest RAM: small, so random addresses often land inside it.
pub const RAM: u64 = 64 << 10;
/// Queue size the canned bring-up sets.
pub const SIZE: u16 = 16;
/// Operations per input (each may move up to a queue's worth of frames).
const MAX_OPS: usize = 512;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0f];

/// Rings of queue `q`: descriptor table, avail ring at +0x400, used ring at +0x800.
pub fn ring(q: usize) -> u64 {
    0x1000 + q as u64 * 0x1000
}

/// The operations, by opcode (modulo their number).
#[derive(Clone, Copy)]
#[repr(u8)]
pub enum Op {
    /// offset: u16, width selector: u8, value: u64 — a register or config write.
    Write = 0,
    /// offset: u16, width selector: u8 — a register or config read.
    Read,
    /// addr: u16, len: u8, bytes — raw guest memory.
    Poke,
    /// queue: u8, index: u8, addr: u16, len: u16, flags: u8, next: u8 — one descriptor.
    Desc,
    /// queue: u8, head: u16 — makes a chain available and bumps avail.idx.
    Offer,
    /// The guest idles (`HC_YIELD`).
    Process,
    /// len: u16, bytes — a frame from the switch for the guest.
    Deliver,
    /// The network thread serves the rings of a guest that polls them.
    Polled,
    /// A correct driver bring-up (both queues, [`SIZE`] entries, at [`ring`]).
    BringUp,
}

const OPS: u8 = 9;

struct Guest {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    port: Arc<GuestPort>,
    base: u64,
    avail_idx: [u16; 2],
}

impl Guest {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.t.write(&self.mem, self.base + offset, data)
    }

    fn read(&mut self, offset: u64, len: usize) {
        let mut buf = [0u8; 8];
        self.t.read(self.base + offset, &mut buf[..len]);
    }

    fn reg(&mut self, offset: u64, value: u32) -> Result<(), String> {
        self.write(offset, &value.to_le_bytes())
    }

    fn bring_up(&mut self) -> Result<(), String> {
        let features = (1u64 << 32) | (1 << 5); // VERSION_1 | MAC
        let s = status::ACKNOWLEDGE | status::DRIVER;
        self.reg(0x70, 0)?;
        self.reg(0x70, s)?;
        self.reg(0x24, 0)?;
        self.reg(0x20, features as u32)?;
        self.reg(0x24, 1)?;
        self.reg(0x20, (features >> 32) as u32)?;
        self.reg(0x70, s | status::FEATURES_OK)?;
        for q in 0..2 {
            let at = ring(q);
            self.reg(0x30, q as u32)?;
            self.reg(0x38, u32::from(SIZE))?;
            for (reg, addr) in [(0x80, at), (0x90, at + 0x400), (0xa0, at + 0x800)] {
                self.reg(reg, addr as u32)?;
                self.reg(reg + 4, (addr >> 32) as u32)?;
            }
            self.reg(0x44, 1)?;
        }
        self.avail_idx = [0; 2];
        self.reg(0x70, s | status::FEATURES_OK | status::DRIVER_OK)
    }

    fn offer(&mut self, q: usize, head: u16) {
        let avail = ring(q) + 0x400;
        let slot = avail + 4 + u64::from(self.avail_idx[q] % SIZE) * 2;
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        let _ = self
            .mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2));
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = crate::guest_memory(RAM);
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let port = Arc::new(GuestPort::new(MAC, wake).expect("guest port"));
    let base = window_base(0);
    let t = MmioTransport::new(
        base,
        abi::layout::VIRTIO_MMIO_SIZE,
        Box::new(Net::new(port.clone())),
    );
    let mut g = Guest {
        mem,
        t,
        port,
        base,
        avail_idx: [0; 2],
    };
    let mut sent = Vec::new();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let width = |sel: u8| [1usize, 2, 4, 8][usize::from(sel & 3)];
        // An error means the guest broke its queues too often and would be stopped.
        let stopped = match input.u8() % OPS {
            0 => {
                let offset = u64::from(input.u16()) % abi::layout::VIRTIO_MMIO_SIZE;
                let len = width(input.u8());
                let value = input.u64().to_le_bytes();
                g.write(offset, &value[..len]).is_err()
            }
            1 => {
                let offset = u64::from(input.u16()) % abi::layout::VIRTIO_MMIO_SIZE;
                let len = width(input.u8());
                g.read(offset, len);
                false
            }
            2 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                let _ = g.mem.write_slice(bytes, GuestAddress(addr));
                false
            }
            3 => {
                let q = usize::from(input.u8() & 1);
                let index = u64::from(input.u8() % SIZE as u8);
                let mut raw = [0u8; 16];
                raw[..8].copy_from_slice(&u64::from(input.u16()).to_le_bytes());
                raw[8..12].copy_from_slice(&u32::from(input.u16()).to_le_bytes());
                raw[12..14].copy_from_slice(&u16::from(input.u8() & 7).to_le_bytes());
                raw[14..].copy_from_slice(&u16::from(input.u8() % SIZE as u8).to_le_bytes());
                let _ = g.mem.write_slice(&raw, GuestAddress(ring(q) + index * 16));
                false
            }
            4 => {
                let q = usize::from(input.u8() & 1);
                let head = input.u16() % QUEUE_MAX;
                g.offer(q, head);
                g.reg(0x50, q as u32).is_err()
            }
            5 => g.t.process(&g.mem).is_err(),
            6 => {
                let len = usize::from(input.u16()) % 2048;
                let mut frames = vec![input.bytes(len).to_vec()];
                g.port.deliver(&mut frames);
                false
            }
            7 => {
                // A queue broken here stops the guest at its next process.
                g.t.process_polling(&g.mem);
                false
            }
            _ => g.bring_up().is_err(),
        };
        g.port.take_sent(&mut sent);
        sent.clear();
        if stopped {
            break;
        }
    }
}
