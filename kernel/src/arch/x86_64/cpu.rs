//! CPU instructions usable from ring 3.

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` has no side effects; CR4.TSD is clear, so ring 3 may use it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The privilege level the caller runs at (the RPL of CS).
pub fn current_ring() -> u8 {
    let cs: u16;
    // SAFETY: reading a segment register has no side effects.
    unsafe {
        core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags))
    };
    (cs & 3) as u8
}

/// `cpuid` with the given leaf (sub-leaf 0).
pub fn cpuid(leaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid(leaf)
}

/// Whether the hypervisor offers kvmclock (`MSR_KVM_SYSTEM_TIME_NEW`).
pub fn has_kvmclock() -> bool {
    let sig = cpuid(0x4000_0000);
    let kvm = sig.ebx == u32::from_le_bytes(*b"KVMK")
        && sig.ecx == u32::from_le_bytes(*b"VMKV")
        && sig.edx == u32::from_le_bytes(*b"M\0\0\0");
    kvm && sig.eax >= 0x4000_0001 && cpuid(0x4000_0001).eax & (1 << 3) != 0
}
