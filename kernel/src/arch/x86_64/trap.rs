//! Ring-0 trap stubs: the only code of the unikernel that runs in ring 0
//! after boot.
//!
//! `trap_stubs` are 32 exception stubs, `TRAP_STUB_STRIDE` bytes apart,
//! named in the image note so the shim can build the IDT. Each pushes a
//! uniform [`TrapFrame`] and calls [`trap_handler`], which either
//!
//! - serves a PVH hypercall: a #UD raised by the `ud2` at `pvh_hypercall_ud2`
//!   (abi::hypercall explains why), then resumes after it; or
//! - reports the exception to the host, which stops the guest.
//!
//! On PVH monitors the #UD gate is `pvh_ud_entry` instead (see [`idle`]):
//! it serves the idle wait in a handful of ring-0 instructions (ring-0 code
//! is very slow on PVM hosts) and passes every other #UD to the stubs. The
//! interrupt stubs that wake the wait live here too.

use abi::hypercall::{FaultReport, HC_FAULT};

core::arch::global_asm!(
    r#"
    .section .text.trap, "ax"
    .p2align 4
    .global trap_stubs
trap_stubs:
    .set vector, 0
    .rept 32
    .p2align 4
    .if (vector == 8) | ((vector >= 10) & (vector <= 14)) | (vector == 17) | (vector == 21) | (vector == 29) | (vector == 30)
    .else
    pushq $0
    .endif
    pushq $vector
    jmp trap_common
    .set vector, vector + 1
    .endr

trap_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    movq %rsp, %rbx
    andq $-16, %rsp
    call {trap_handler}
    movq %rbx, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

    /* PVH #UD gate: the idle `ud2` arms the LAPIC timer (edi = initial
       count, 0 = none) and waits for an interrupt with `sti; hlt`. */
    .global pvh_ud_entry
pvh_ud_entry:
    pushq %rax
    leaq pvh_idle_ud2(%rip), %rax
    cmpq %rax, 8(%rsp)
    popq %rax
    jne 2f
    addq $2, (%rsp)
    pushq %rax
    pushq %rcx
    pushq %rdx
    movl %edi, %eax
    cmpb $0, {x2apic}(%rip)
    je 1f
    movl $0x838, %ecx
    xorl %edx, %edx
    wrmsr
    jmp 3f
1:
    movl $0xfee00380, %ecx
    movl %eax, (%rcx)
3:
    sti
    hlt
    cli
    popq %rdx
    popq %rcx
    popq %rax
    iretq
2:
    pushq $0
    pushq $6
    jmp trap_common

    /* Interrupts that end the idle wait: acknowledge and return. */
    .global pvh_device_irq_entry
pvh_device_irq_entry:
    movb $1, {device_irq}(%rip)
    .global pvh_irq_entry
pvh_irq_entry:
    pushq %rax
    pushq %rcx
    pushq %rdx
    xorl %eax, %eax
    cmpb $0, {x2apic}(%rip)
    je 1f
    movl $0x80b, %ecx
    xorl %edx, %edx
    wrmsr
    jmp 2f
1:
    movl $0xfee000b0, %ecx
    movl %eax, (%rcx)
2:
    popq %rdx
    popq %rcx
    popq %rax
    iretq

    .global pvh_spurious_entry
pvh_spurious_entry:
    iretq

    /* extern "C" fn pvh_idle(count), called from ring 3. */
    .section .text, "ax"
    .global pvh_idle
pvh_idle:
    .global pvh_idle_ud2
pvh_idle_ud2:
    ud2
    ret

    /* extern "C" fn pvh_hypercall(nr, value), called from ring 3. */
    .section .text, "ax"
    .global pvh_hypercall
pvh_hypercall:
    movq %rdi, %rax
    movq %rsi, %rdi
    .global pvh_hypercall_ud2
pvh_hypercall_ud2:
    ud2
    ret
"#,
    trap_handler = sym trap_handler,
    x2apic = sym super::apic::X2APIC,
    device_irq = sym super::apic::DEVICE_IRQ,
    options(att_syntax)
);

extern "C" {
    fn pvh_hypercall(nr: u64, value: u64);
    fn pvh_hypercall_ud2();
    fn pvh_idle(count: u32);
    fn pvh_ud_entry();
    fn pvh_irq_entry();
    fn pvh_device_irq_entry();
    fn pvh_spurious_entry();
}

/// The handlers of the PVH gates [`super::apic::init`] installs:
/// `(#UD, timer and other interrupts, device interrupts, spurious)`.
pub(crate) fn pvh_gates() -> (u64, u64, u64, u64) {
    (
        pvh_ud_entry as *const () as u64,
        pvh_irq_entry as *const () as u64,
        pvh_device_irq_entry as *const () as u64,
        pvh_spurious_entry as *const () as u64,
    )
}

/// Waits in ring 0 for an interrupt on a PVH platform (from ring 3): the
/// LAPIC timer after `count` ns (0: no timer), or a device's.
pub fn idle(count: u32) {
    // SAFETY: `pvh_idle` is a C-ABI function; its `ud2` traps to
    // `pvh_ud_entry`, which waits and resumes after the `ud2`.
    unsafe { pvh_idle(count) }
}

const INVALID_OPCODE: u64 = 6;
const UD2_LEN: u64 = 2;

/// The stack `trap_common` hands to [`trap_handler`].
#[repr(C)]
struct TrapFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

extern "C" fn trap_handler(frame: &mut TrapFrame) {
    if frame.vector == INVALID_OPCODE && frame.rip == pvh_hypercall_ud2 as *const () as u64 {
        super::pvh::serve(frame.rax, frame.rdi);
        frame.rip += UD2_LEN;
        return;
    }
    let cr2: u64;
    // SAFETY: ring 0; reading CR2 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags))
    };
    let report = FaultReport {
        vector: frame.vector,
        error_code: frame.error_code,
        rip: frame.rip,
        cs: frame.cs,
        rflags: frame.rflags,
        rsp: frame.rsp,
        ss: frame.ss,
        cr2,
    };
    crate::platform::hypercall_ring0(HC_FAULT, &report as *const FaultReport as u64);
    loop {
        core::hint::spin_loop(); // the host stops the guest on HC_FAULT
    }
}

/// Issues a hypercall on a PVH platform (from ring 3).
pub fn hypercall(nr: u64, value: u64) {
    // SAFETY: `pvh_hypercall` is a C-ABI function; its `ud2` traps to
    // `trap_handler`, which serves the call and resumes after the `ud2`.
    unsafe { pvh_hypercall(nr, value) }
}
