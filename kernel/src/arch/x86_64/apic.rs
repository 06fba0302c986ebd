//! Interrupts for the idle wait on PVH monitors (QEMU microvm, Firecracker),
//! which have no yield hypercall: the local APIC's one-shot timer for the
//! next deadline and the IO-APIC pins of virtio-mmio devices, both ending a
//! ring-0 `sti; hlt` (`trap::idle`). Ring 3 otherwise runs with interrupts
//! off, so an interrupt that arrives while the guest works stays pending and
//! ends the next wait at once: no wake-up is lost.
//!
//! [`init`] runs once in ring 0 at the PVH entry (still on the boot page
//! tables, which map no device memory: it only writes MSRs); [`init_user`]
//! finishes in ring 3, where an xAPIC's registers are MMIO in the mapped
//! device range, as are the IO-APIC's ([`route_device_irq`]).

use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use abi::layout::IDT_ADDR;

use super::{cpu, mmio};

/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u64 = 0x20;
/// Vector of virtio-mmio device interrupts.
pub const DEVICE_VECTOR: u64 = 0x21;
const SPURIOUS_VECTOR: u64 = 0xff;
const INVALID_OPCODE: u64 = 6;

/// 1 if the LAPIC is in x2APIC mode (MSRs), 0 for xAPIC (MMIO). Read by
/// the ring-0 stubs.
pub(crate) static X2APIC: AtomicU8 = AtomicU8::new(0);
/// Set by the device interrupt stub; taken by [`take_device_irq`].
pub(crate) static DEVICE_IRQ: AtomicU8 = AtomicU8::new(0);
/// Whether [`init`] set the LAPIC up (else the idle wait is not used).
static READY: AtomicBool = AtomicBool::new(false);

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const XAPIC_BASE: u64 = 0xfee0_0000;
/// Register offsets of the xAPIC page; the x2APIC MSR is `0x800 + offset / 16`.
const REG_SVR: u64 = 0xf0;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_LINT0: u64 = 0x350;
const REG_TIMER_DIVIDE: u64 = 0x3e0;
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
/// Divide the timer's clock by 1: KVM's and QEMU's LAPIC timers then count
/// nanoseconds.
const DIVIDE_BY_1: u32 = 0b1011;

/// The IO-APICs: pins 0..23 on the first, 24.. on the second (QEMU's ioapic2).
const IOAPIC_BASES: [u64; 2] = [0xfec0_0000, 0xfec1_0000];
const IOAPIC_PINS: u32 = 24;

fn write_reg(offset: u64, value: u32) {
    if X2APIC.load(Ordering::Relaxed) != 0 {
        // SAFETY: ring 0 (x2APIC mode is set up by `init` only); the mode
        // is on, so the MSR exists.
        unsafe { wrmsr(0x800 + (offset >> 4) as u32, value as u64) };
    } else {
        mmio::write_u32(XAPIC_BASE + offset, value);
    }
}

/// Writes MSR `msr` (ring 0 only).
pub(super) unsafe fn wrmsr(msr: u32, value: u64) {
    core::arch::asm!(
        "wrmsr",
        in("ecx") msr,
        in("eax") value as u32,
        in("edx") (value >> 32) as u32,
        options(nomem, nostack, preserves_flags)
    );
}

unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    core::arch::asm!(
        "rdmsr",
        in("ecx") msr,
        out("eax") lo,
        out("edx") hi,
        options(nomem, nostack, preserves_flags)
    );
    ((hi as u64) << 32) | lo as u64
}

fn gate(vector: u64, handler: u64) {
    let (low, high) = abi::x86::idt_gate(handler, 0, 0);
    mmio::write_u64(IDT_ADDR + vector * 16, low);
    mmio::write_u64(IDT_ADDR + vector * 16 + 8, high);
}

/// Ring 0, once, after the IDT was written: the PVH gates and, with an
/// x2APIC, the LAPIC (see [`setup`]). Without a LAPIC the idle wait stays off.
pub(crate) fn init() {
    let features = cpu::cpuid(1);
    if features.edx & (1 << 9) == 0 {
        return; // no LAPIC
    }
    let (ud, irq, device_irq, spurious) = super::trap::pvh_gates();
    gate(INVALID_OPCODE, ud);
    gate(TIMER_VECTOR, irq);
    gate(DEVICE_VECTOR, device_irq);
    gate(SPURIOUS_VECTOR, spurious);
    if features.ecx & (1 << 21) != 0 {
        // SAFETY: ring 0; CPUID reports the x2APIC, so the base MSR takes the mode bit.
        unsafe {
            let base = rdmsr(MSR_APIC_BASE);
            wrmsr(MSR_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        }
        X2APIC.store(1, Ordering::Relaxed);
        setup();
    }
}

/// Ring 3, once, on PVH monitors: sets an xAPIC up (see [`setup`]).
pub(crate) fn init_user() {
    let has_apic = cpu::cpuid(1).edx & (1 << 9) != 0;
    if has_apic && X2APIC.load(Ordering::Relaxed) == 0 {
        setup();
    }
}

/// The LAPIC enabled, its timer one-shot at [`TIMER_VECTOR`], the legacy
/// PIC's line masked.
fn setup() {
    write_reg(REG_SVR, SVR_ENABLE | SPURIOUS_VECTOR as u32);
    write_reg(REG_LVT_LINT0, LVT_MASKED);
    write_reg(REG_TIMER_DIVIDE, DIVIDE_BY_1);
    write_reg(REG_LVT_TIMER, TIMER_VECTOR as u32);
    READY.store(true, Ordering::Relaxed);
}

/// Whether the idle wait can be used.
pub fn ready() -> bool {
    READY.load(Ordering::Relaxed)
}

/// Ring 3: delivers interrupt line `irq` (a virtio-mmio device's) to
/// [`DEVICE_VECTOR`] on the boot CPU, edge-triggered.
pub fn route_device_irq(irq: u32) {
    let Some(&base) = IOAPIC_BASES.get((irq / IOAPIC_PINS) as usize) else {
        return;
    };
    let pin = irq % IOAPIC_PINS;
    // Redirection entry: fixed delivery, physical destination APIC 0,
    // active high, edge, unmasked.
    for (reg, value) in [(0x11 + 2 * pin, 0), (0x10 + 2 * pin, DEVICE_VECTOR as u32)] {
        mmio::write_u32(base, reg);
        mmio::write_u32(base + 0x10, value);
    }
}

/// Whether a device interrupt arrived since the last call (its device then
/// needs its interrupt acknowledged before it can raise another).
pub fn take_device_irq() -> bool {
    DEVICE_IRQ.swap(0, Ordering::Relaxed) != 0
}
