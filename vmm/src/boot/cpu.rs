//! The vCPU's first state for a direct 64-bit ring-3 start: segment and
//! control registers (`kvm_sregs`), general registers (`kvm_regs`) and the
//! MSRs the shim programs (kvmclock). No ring-0 instruction runs on boot:
//! everything the PVH entry would do in ring 0 is set here.
//!
//! Pure functions of the `abi` layout; the KVM calls are in `vstate::vcpu`.

use abi::layout::{BOOT_INFO_ADDR, GDT_ADDR, IDT_ADDR, PVCLOCK_ADDR, STACK_TOP, TSS_ADDR};
use abi::x86::{
    cr, seg, GDT_LIMIT, IDT_LIMIT, INITIAL_RFLAGS, TSS_SEL, TSS_SIZE, USER_CS, USER_DS,
};
use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId};

/// kvmclock, new MSR number (`MSR_KVM_SYSTEM_TIME_NEW`).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// CPUID leaf with KVM's paravirtual features.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// `KVM_FEATURE_CLOCKSOURCE2`: the guest may use [`MSR_KVM_SYSTEM_TIME_NEW`].
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// CR4 bits for hard-float std apps (the Hermit ABI): SSE (OSFXSR,
/// OSXMMEXCPT). Soft-float libcloud apps do not use them.
const CR4_SSE: u64 = (1 << 9) | (1 << 10);
/// CR4.FSGSBASE: `wrfsbase` in ring 3, for std apps' thread-local storage;
/// set when the vCPU's CPUID offers it.
const CR4_FSGSBASE: u64 = 1 << 16;

/// A flat ring-3 segment (base 0, 4 GiB limit with 4 KiB granularity).
fn user_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        // A 64-bit code segment has D=0 (L=1); data segments have D/B=1.
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..kvm_segment::default()
    }
}

/// Returns `base` (as read from a fresh vCPU, so KVM's own fields such as
/// `apic_base` are kept) set up for long mode with CPL 3.
pub fn ring3_sregs(base: kvm_sregs, fsgsbase: bool) -> kvm_sregs {
    let code = user_segment(USER_CS, seg::TYPE_CODE, true);
    let data = user_segment(USER_DS, seg::TYPE_DATA, false);
    let mut s = base;
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS_ADDR,
        limit: (TSS_SIZE - 1) as u32,
        selector: TSS_SEL,
        type_: seg::TYPE_TSS_BUSY,
        present: 1,
        ..kvm_segment::default()
    };
    s.ldt = kvm_segment {
        type_: 2, // LDT, for the record: it is unusable
        unusable: 1,
        ..kvm_segment::default()
    };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = GDT_LIMIT;
    s.idt.base = IDT_ADDR;
    s.idt.limit = IDT_LIMIT;
    s.cr0 = cr::CR0;
    s.cr2 = 0;
    s.cr3 = cr::CR3;
    s.cr4 = cr::CR4 | CR4_SSE | if fsgsbase { CR4_FSGSBASE } else { 0 };
    s.efer = cr::EFER;
    s
}

/// General registers of the first instruction: `rip` = the image's ring-3
/// entry, `rsp` = the main stack, `rdi` = the `BootInfo`.
pub fn initial_regs(user_entry: u64) -> kvm_regs {
    kvm_regs {
        rip: user_entry,
        rsp: STACK_TOP,
        rdi: BOOT_INFO_ADDR,
        rflags: INITIAL_RFLAGS,
        ..Default::default()
    }
}

/// Whether KVM offers kvmclock through [`MSR_KVM_SYSTEM_TIME_NEW`].
pub fn kvmclock_supported(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == KVM_CPUID_FEATURES && e.eax & KVM_FEATURE_CLOCKSOURCE2 != 0)
}

/// Whether the vCPU's CPUID offers FSGSBASE (leaf 7, EBX bit 0).
pub fn has_fsgsbase(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 7 && e.index == 0 && e.ebx & 1 != 0)
}

/// MSRs the shim sets on vCPU 0.
pub fn boot_msrs(kvmclock: bool) -> Vec<kvm_msr_entry> {
    let mut msrs = Vec::new();
    if kvmclock {
        msrs.push(kvm_msr_entry {
            index: MSR_KVM_SYSTEM_TIME_NEW,
            data: PVCLOCK_ADDR | 1, // bit 0: enable
            ..Default::default()
        });
    }
    msrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn segments_are_ring3_long_mode() {
        assert_eq!(ring3_sregs(kvm_sregs::default(), false).cr4, 0x620);
        let s = ring3_sregs(kvm_sregs::default(), true);
        assert_eq!(s.cs.selector, 0x23);
        assert_eq!((s.cs.dpl, s.cs.l, s.cs.db, s.cs.type_), (3, 1, 0, 0xb));
        assert_eq!(s.ss.selector, 0x1b);
        assert_eq!((s.ss.dpl, s.ss.db, s.ss.type_, s.ss.present), (3, 1, 3, 1));
        assert_eq!(s.ds, s.ss);
        assert_eq!(
            (s.tr.selector, s.tr.base, s.tr.limit),
            (0x28, TSS_ADDR, 103)
        );
        assert_eq!((s.tr.type_, s.tr.s, s.tr.present), (0xb, 0, 1));
        assert_eq!(s.ldt.unusable, 1);
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!(s.cr4, (1 << 5) | (1 << 9) | (1 << 10) | (1 << 16));
        assert_eq!(s.efer, 0x500);
        assert_eq!((s.gdt.base, s.gdt.limit), (GDT_ADDR, 55));
        assert_eq!((s.idt.base, s.idt.limit), (IDT_ADDR, 4095));
    }

    #[test]
    fn apic_base_and_other_kvm_fields_are_kept() {
        let base = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        assert_eq!(ring3_sregs(base, true).apic_base, 0xfee0_0900);
    }

    #[test]
    fn regs() {
        let r = initial_regs(0x10_1234);
        assert_eq!(
            (r.rip, r.rsp, r.rdi),
            (0x10_1234, STACK_TOP, BOOT_INFO_ADDR)
        );
        assert_eq!(r.rflags, 0x3002);
    }

    #[test]
    fn kvmclock_detection() {
        let entry = |function, eax| kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        };
        let with = CpuId::from_entries(&[entry(0, 0xd), entry(0x4000_0001, 0x1fb)]).unwrap();
        assert!(kvmclock_supported(&with));
        let without = CpuId::from_entries(&[entry(0x4000_0001, 0x1)]).unwrap();
        assert!(!kvmclock_supported(&without));
        assert!(!has_fsgsbase(&without));
        let leaf7 = kvm_cpuid_entry2 {
            function: 7,
            ebx: 0x29c67af,
            ..Default::default()
        };
        assert!(has_fsgsbase(&CpuId::from_entries(&[leaf7]).unwrap()));
        assert_eq!(boot_msrs(true)[0].data, PVCLOCK_ADDR | 1);
        assert!(boot_msrs(false).is_empty());
    }
}
