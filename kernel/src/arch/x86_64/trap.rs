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
    options(att_syntax)
);

extern "C" {
    fn pvh_hypercall(nr: u64, value: u64);
    fn pvh_hypercall_ud2();
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
