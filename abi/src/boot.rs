//! The boot information block at [`crate::layout::BOOT_INFO_ADDR`].
//!
//! Our shim writes it before the first instruction runs; under PVH (QEMU,
//! Firecracker) the kernel's ring-0 entry fills it from `hvm_start_info`.
//! The shim may rewrite it while the guest is paused (e.g. after a migration).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `"LIBCLOUD"` in little-endian byte order.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"LIBCLOUD");

/// Which monitor started the guest, and so how it talks to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Platform {
    /// Our host shim: hypercalls through the MMIO doorbell page.
    Shim = 1,
    /// Any PVH monitor (QEMU microvm, Firecracker): 16550 serial and
    /// `isa-debug-exit`, served by the ring-0 trap handler (abi::hypercall).
    Pvh = 2,
}

impl Platform {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Shim),
            2 => Some(Self::Pvh),
            _ => None,
        }
    }
}

/// The boot information block. All addresses are guest-physical.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`crate::ABI_VERSION`] of the writer.
    pub abi_version: u32,
    /// A [`Platform`] value.
    pub platform: u32,
    /// Bytes of guest RAM, starting at address 0.
    pub mem_size: u64,
    /// The command line (not including its NUL).
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
    /// kvmclock page of vCPU 0, or 0 when there is no kvmclock.
    pub pvclock_addr: u64,
    /// TSC frequency in kHz, for a clock without kvmclock (0 = unknown).
    pub tsc_khz: u64,
    /// The hypercall doorbell page, or 0 when there is none.
    pub doorbell_addr: u64,
    /// Bumped by the shim each time the guest resumes on another host (live
    /// migration, restore). The guest compares it after every hypercall that
    /// returns and then runs its `on_migrated` hooks.
    pub generation: u64,
    /// Where the guest runs now, NUL-padded UTF-8; empty until the guest first
    /// moves (the command line's `lc.host`/`lc.region` hold the boot-time values).
    pub host: [u8; LOCATION_LEN],
    pub region: [u8; LOCATION_LEN],
    /// An app checkpoint to restore (abi::checkpoint), placed in guest RAM
    /// by the monitor; 0/0 when there is none. The heap leaves it alone.
    pub restore_addr: u64,
    pub restore_len: u64,
    /// Bumped by the host to ask the app for a checkpoint now (the guest
    /// compares it after each return from the host, like `generation`).
    pub checkpoint_requests: u64,
    /// Free-page hints, written by the guest once its heap is up (0 when it
    /// publishes none): the heap covers `heap_pages` 4 KiB pages from
    /// `heap_start`, and `page_use_addr` is a `[u16; heap_pages]` of live
    /// bytes per page. A migration may skip heap page `i` when `i >= 1` and
    /// pages `i` and `i - 1` both hold 0 live bytes (the allocator keeps its
    /// free-list headers right after live blocks, so those pages must go).
    pub heap_start: u64,
    pub heap_pages: u64,
    pub page_use_addr: u64,
    /// Odd while the allocator changes the heap (its free list and the usage
    /// array are updated at different instants). A reader takes it before
    /// and after reading the array and trusts the array only when both reads
    /// are equal and even (a seqlock).
    pub page_use_seq: u64,
    /// Host-forced preemption of green threads (std apps; 0 = the guest
    /// wants none): the guest's preemption trampoline. When the host stops
    /// the vCPU after a timeslice while [`Self::preempt_allowed`] is 1 and
    /// the vCPU is in ring 3, it pushes the interrupted `rip` at
    /// `rsp - 128 - 8` (below the red zone), sets `rsp` there and `rip` to
    /// this address, and stores 0 in `preempt_allowed`. The trampoline
    /// returns with `ret 128`.
    pub preempt_entry: u64,
    /// 1 while the guest has more than one green thread: the host then
    /// bounds each `KVM_RUN` by a timeslice timer (none while the guest
    /// waits in `HC_YIELD`, so an idle guest costs no exits).
    pub preempt_timer: u32,
    /// 1 while the running thread is in app code and may be redirected to
    /// [`Self::preempt_entry`]; 0 inside the kernel and the ABI layer.
    pub preempt_allowed: u32,
    /// Network polling, our shim only (see [`NetPoll`]).
    pub net_poll: NetPoll,
}

/// How a guest and the shim's network thread move frames without VM exits.
///
/// A guest that would wait in the host for its next frame may instead spin
/// on its receive ring for a bounded time. While [`Self::polling`] is 1 the
/// shim's network thread puts frames into the receive ring itself as they
/// arrive, and (while it sets [`Self::watching`]) takes what the guest
/// queues on its transmit ring: a request and its reply then cost no exit.
/// Each side writes only its own fields; every value the guest writes is
/// only ever read as "zero or not".
///
/// The two races are closed the same way (a store, a full fence, then a
/// load, on both sides):
/// - The guest stores `polling = 1`, then loads `rx_pending`: 1 means frames
///   arrived before the host could see it polling; it exits to take them.
///   The host stores `rx_pending = 1` when frames wait for the guest, then
///   loads `polling` and serves the rings if it is set.
/// - After queueing a frame the guest loads `watching`: 0 means nobody is
///   looking, and it exits (`HC_YIELD`) before it idles. The host stores
///   `watching = 0`, then looks at the transmit ring once more.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct NetPoll {
    /// Guest: 1 while it spins on its rings when idle (its driver can, and
    /// it is not pausing): the host does not seat its vCPU thread next to
    /// the network thread, which must run beside it, not under it.
    pub spins: u32,
    /// Guest: 1 from when it starts to spin on its rings until it next
    /// waits in `HC_YIELD` (it stores 0 first).
    pub polling: u32,
    /// Host: 1 while the network thread looks at the transmit ring.
    pub watching: u32,
    /// Host: 1 while frames for the guest wait in the host (not yet in its
    /// receive ring).
    pub rx_pending: u32,
    /// Host: 1 while the network thread carries many clients' traffic at
    /// once. Then requests come in batches anyway (one exit serves many),
    /// and the CPU a spinning guest holds is what the network thread and
    /// the clients need: the guest waits in `HC_YIELD` instead of polling.
    pub hold_off: u32,
    pub reserved: u32,
}

impl NetPoll {
    /// Guest-physical address of the field at `offset` (`offset_of!(NetPoll,
    /// ..)`) in the block of the `BootInfo` at `layout::BOOT_INFO_ADDR`.
    pub const fn addr(offset: usize) -> u64 {
        crate::layout::BOOT_INFO_ADDR + (core::mem::offset_of!(BootInfo, net_poll) + offset) as u64
    }
}

/// Whether heap page `i` may be left behind by a migration, given the
/// guest's per-page live bytes (see [`BootInfo::page_use_addr`]).
pub fn heap_page_is_free(page_use: &[u16], i: usize) -> bool {
    i >= 1 && i < page_use.len() && page_use[i] == 0 && page_use[i - 1] == 0
}

/// Bytes of [`BootInfo::host`] and [`BootInfo::region`].
pub const LOCATION_LEN: usize = 64;

/// Encodes a host or region name for [`BootInfo`] (truncated at a char boundary).
pub fn encode_location(name: &str) -> [u8; LOCATION_LEN] {
    let mut out = [0u8; LOCATION_LEN];
    let mut n = name.len().min(LOCATION_LEN);
    while !name.is_char_boundary(n) {
        n -= 1;
    }
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// Decodes a [`BootInfo`] location field; `None` when it is empty.
pub fn decode_location(field: &[u8; LOCATION_LEN]) -> Option<&str> {
    let len = field.iter().position(|&b| b == 0).unwrap_or(LOCATION_LEN);
    core::str::from_utf8(&field[..len])
        .ok()
        .filter(|s| !s.is_empty())
}

impl Default for BootInfo {
    fn default() -> Self {
        zerocopy::FromZeros::new_zeroed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_pages_need_a_free_neighbour_before_them() {
        let usage = [0u16, 0, 0, 12, 0, 0, 4096, 0];
        let free: alloc::vec::Vec<usize> = (0..usage.len())
            .filter(|&i| heap_page_is_free(&usage, i))
            .collect();
        assert_eq!(free, [1, 2, 5]);
    }

    #[test]
    fn locations_round_trip_and_truncate_on_char_boundaries() {
        assert_eq!(
            decode_location(&encode_location("eu-west")),
            Some("eu-west")
        );
        assert_eq!(decode_location(&encode_location("")), None);
        let long = "é".repeat(40); // 80 bytes
        let encoded = encode_location(&long);
        assert_eq!(decode_location(&encoded), Some("é".repeat(32).as_str()));
    }
}
