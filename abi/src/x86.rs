//! The x86-64 CPU tables of a guest, as plain values.
//!
//! Our shim writes these into guest memory before the first instruction; the
//! PVH entry writes the same values from ring 0. Each builder hands out
//! `(guest-physical address, u64 value)` pairs so the caller decides how to
//! store them (a `GuestMemory` write on the host, a volatile store in the
//! guest).

use crate::layout::*;
use crate::note::TRAP_STUB_STRIDE;

/// Kernel code segment (ring 0, 64-bit).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data segment (ring 0).
pub const KERNEL_DS: u16 = 0x10;
/// User data/stack segment (ring 3): GDT index 3, RPL 3.
pub const USER_DS: u16 = 0x18 | 3;
/// User code segment (ring 3, 64-bit): GDT index 4, RPL 3.
pub const USER_CS: u16 = 0x20 | 3;
/// Task state segment (16-byte descriptor at GDT index 5).
pub const TSS_SEL: u16 = 0x28;
/// Number of 8-byte GDT slots in use.
pub const GDT_ENTRIES: usize = 7;
/// Size of the TSS in bytes (no I/O permission bitmap).
pub const TSS_SIZE: u64 = 104;

/// Access/flags bytes of the code and data descriptors, for monitors that
/// load segment registers directly (KVM `set_sregs`).
pub mod seg {
    /// Code, execute/read, accessed.
    pub const TYPE_CODE: u8 = 0xb;
    /// Data, read/write, accessed.
    pub const TYPE_DATA: u8 = 0x3;
    /// 64-bit TSS, busy.
    pub const TYPE_TSS_BUSY: u8 = 0xb;
}

/// Flat descriptors: 64-bit code (L=1) or 4 GiB data, given DPL and type.
const fn flat_descriptor(code: bool, dpl: u64) -> u64 {
    let limit = 0xffff | (0xf << 48);
    let access = if code { 0x9a } else { 0x92 } | (dpl << 5);
    let flags = if code { 0xa } else { 0xc }; // code: G|L, data: G|D/B
    limit | (access << 40) | (flags << 52)
}

/// The GDT: null, kernel code, kernel data, user data, user code, TSS (2 slots).
pub fn gdt(mut write: impl FnMut(u64, u64)) {
    let tss_limit = TSS_SIZE - 1;
    let base = TSS_ADDR;
    // Available 64-bit TSS (type 9); `ltr` (or KVM's TR cache) marks it busy.
    let tss_low = (tss_limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((tss_limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let tss_high = base >> 32;
    let entries: [u64; GDT_ENTRIES] = [
        0,
        flat_descriptor(true, 0),
        flat_descriptor(false, 0),
        flat_descriptor(false, 3),
        flat_descriptor(true, 3),
        tss_low,
        tss_high,
    ];
    for (i, e) in entries.iter().enumerate() {
        write(GDT_ADDR + i as u64 * 8, *e);
    }
}

/// The 104-byte TSS: `rsp0` = trap stack, IST1 = fault stack, no I/O bitmap.
pub fn tss(mut write: impl FnMut(u64, u64)) {
    // The TSS is packed (rsp0 at offset 4): write it as 13 aligned u64 words.
    let mut bytes = [0u8; TSS_SIZE as usize];
    bytes[4..12].copy_from_slice(&TRAP_STACK_TOP.to_le_bytes());
    bytes[36..44].copy_from_slice(&FAULT_STACK_TOP.to_le_bytes());
    bytes[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        write(TSS_ADDR + i as u64 * 8, u64::from_le_bytes(word));
    }
}

/// Exception vectors that run on the IST1 fault stack.
const fn uses_fault_stack(vector: u64) -> bool {
    matches!(vector, 2 | 8 | 18)
}

/// One 16-byte interrupt gate: `(low, high)` words.
pub const fn idt_gate(handler: u64, dpl: u64, ist: u64) -> (u64, u64) {
    let low = (handler & 0xffff)
        | ((KERNEL_CS as u64) << 16)
        | (ist << 32)
        | ((0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    (low, handler >> 32)
}

/// The IDT: vectors 0..31 go to the image's exception stubs; all other
/// gates are not present (the guest takes no interrupts).
pub fn idt(trap_stubs: u64, mut write: impl FnMut(u64, u64)) {
    for vector in 0..256u64 {
        let (low, high) = if vector < 32 {
            let ist = if uses_fault_stack(vector) { 1 } else { 0 };
            idt_gate(trap_stubs + vector * TRAP_STUB_STRIDE, 0, ist)
        } else {
            (0, 0)
        };
        write(IDT_ADDR + vector * 16, low);
        write(IDT_ADDR + vector * 16 + 8, high);
    }
}

/// Limit (size - 1) of the IDT, for IDTR.
pub const IDT_LIMIT: u16 = 256 * 16 - 1;
/// Limit (size - 1) of the GDT, for GDTR.
pub const GDT_LIMIT: u16 = (GDT_ENTRIES * 8 - 1) as u16;

/// Page-table entry bits.
pub mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const WRITE_THROUGH: u64 = 1 << 3;
    pub const NO_CACHE: u64 = 1 << 4;
    pub const HUGE: u64 = 1 << 7;
}

/// Identity page tables for RAM `[0, mem_size)` and the MMIO range `mmio`
/// (uncached; 2 MiB-aligned, below 4 GiB), every page user-accessible. The
/// null page and the stack guard stay unmapped. `mem_size` must be a
/// multiple of 2 MiB and at most [`MAX_MEM_SIZE`].
///
/// Our shim maps its device window; PVH monitors place devices anywhere in
/// the last GiB below 4 GiB, so the PVH entry maps [`PVH_MMIO`].
///
/// Only non-zero entries are written: the caller zeroes
/// `[PAGE_TABLES_START, PAGE_TABLES_END)` first if the memory may hold junk.
pub fn page_tables(mem_size: u64, mmio: core::ops::Range<u64>, mut write: impl FnMut(u64, u64)) {
    use pte::*;
    let table = PRESENT | WRITABLE | USER;
    write(PML4_ADDR, PDPT_ADDR | table);
    for gib in 0..4 {
        write(PDPT_ADDR + gib * 8, (PD_ADDR + gib * PAGE_SIZE) | table);
    }
    // PD entry i maps [i * 2 MiB, (i + 1) * 2 MiB); the PDs are contiguous.
    write(PD_ADDR, PT0_ADDR | table);
    let large_pages = mem_size.min(MAX_MEM_SIZE) / LARGE_PAGE_SIZE;
    for i in 1..large_pages {
        write(PD_ADDR + i * 8, (i * LARGE_PAGE_SIZE) | table | HUGE);
    }
    for i in 1..512 {
        let addr = i * PAGE_SIZE;
        if addr != STACK_GUARD_ADDR {
            write(PT0_ADDR + i * 8, addr | table);
        }
    }
    let mut addr = mmio.start & !(LARGE_PAGE_SIZE - 1);
    while addr < mmio.end.min(1 << 32) {
        let i = addr / LARGE_PAGE_SIZE;
        write(
            PD_ADDR + i * 8,
            addr | table | HUGE | NO_CACHE | WRITE_THROUGH,
        );
        addr += LARGE_PAGE_SIZE;
    }
}

/// The MMIO range the PVH entry maps: everything from the end of the
/// largest possible RAM up to 4 GiB.
pub const PVH_MMIO: core::ops::Range<u64> = MAX_MEM_SIZE..(1 << 32);

/// The MMIO range our shim maps: its device window.
pub const SHIM_MMIO: core::ops::Range<u64> = DEVICE_WINDOW..DEVICE_WINDOW + DEVICE_WINDOW_SIZE;

/// Control register values of a running guest (long mode, paging, ring 3).
pub mod cr {
    /// CR0: PG | ET | PE (no WP, no caches disabled, no FPU bits: soft-float).
    pub const CR0: u64 = (1 << 31) | (1 << 4) | 1;
    /// CR4: PAE.
    pub const CR4: u64 = 1 << 5;
    /// EFER: LME | LMA.
    pub const EFER: u64 = (1 << 8) | (1 << 10);
    /// CR3: the PML4.
    pub const CR3: u64 = crate::layout::PML4_ADDR;
}

/// RFLAGS of the first ring-3 instruction: reserved bit 1, IOPL 3 (so PVH
/// platforms with real VT-x or TCG can still use port I/O), interrupts off.
pub const INITIAL_RFLAGS: u64 = 0x2 | (3 << 12);

#[cfg(test)]
mod tests {
    use super::*;

    use alloc::vec::Vec;

    fn page_table_writes(mem: u64, mmio: core::ops::Range<u64>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        page_tables(mem, mmio, |a, v| out.push((a, v)));
        out
    }

    #[test]
    fn descriptors_match_the_well_known_values() {
        let mut entries = [0u64; GDT_ENTRIES];
        gdt(|a, v| entries[((a - GDT_ADDR) / 8) as usize] = v);
        assert_eq!(entries[1], 0x00af_9a00_0000_ffff);
        assert_eq!(entries[2], 0x00cf_9200_0000_ffff);
        assert_eq!(entries[3], 0x00cf_f200_0000_ffff);
        assert_eq!(entries[4], 0x00af_fa00_0000_ffff);
        assert_eq!(entries[5] >> 40 & 0xff, 0x89);
    }

    #[test]
    fn null_page_and_stack_guard_are_unmapped() {
        let writes = page_table_writes(64 << 20, SHIM_MMIO);
        let mapped = |addr: u64| {
            writes
                .iter()
                .any(|&(a, v)| a >= PT0_ADDR && v & !0xfff == addr && v != 0)
        };
        assert!(!mapped(0));
        assert!(!mapped(STACK_GUARD_ADDR));
        assert!(mapped(PAGE_SIZE));
        assert!(mapped(STACK_GUARD_ADDR + PAGE_SIZE));
    }

    #[test]
    fn ram_is_mapped_exactly() {
        let writes = page_table_writes(64 << 20, 0..0);
        let huge: usize = writes
            .iter()
            .filter(|&&(a, v)| (PD_ADDR..PT0_ADDR).contains(&a) && v & pte::HUGE != 0)
            .count();
        assert_eq!(
            huge, 31,
            "64 MiB = 32 large pages, the first one split into 4 KiB pages"
        );
    }

    #[test]
    fn idt_gate_encodes_handler_and_privilege() {
        let (low, high) = idt_gate(0x1234_5678_9abc_def0, 3, 1);
        assert_eq!(low & 0xffff, 0xdef0);
        assert_eq!(low >> 48, 0x9abc);
        assert_eq!(high, 0x1234_5678);
        assert_eq!((low >> 40) & 0xff, 0xee);
        assert_eq!((low >> 32) & 0x7, 1);
        assert_eq!((low >> 16) & 0xffff, KERNEL_CS as u64);
    }
}
