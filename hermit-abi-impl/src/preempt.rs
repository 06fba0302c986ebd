//! Host-forced preemption of green threads: a thread that computes in a
//! loop without any ABI call cannot keep the one vCPU.
//!
//! The guest takes no timer interrupts in ring 3, so the monitor does the
//! interrupting. Two words of the `BootInfo` page (in guest memory, so
//! they travel with snapshots and migrations) tell it what it may do:
//!
//! - `preempt_timer` is 1 while more than one thread exists; the monitor
//!   then bounds every `KVM_RUN` by a timeslice timer. A guest blocked in
//!   `HC_YIELD` is not in `KVM_RUN`, and a single-threaded one sets no
//!   timer: neither costs an exit;
//! - `preempt_allowed` is 1 while that thread runs app code. Every entry
//!   into the ABI layer ([`kernel_section`]) clears it until it returns, so
//!   the kernel's state (heap, scheduler, network stack) is never
//!   interrupted half-changed.
//!
//! When the timer fires with `preempt_allowed` = 1 and the vCPU in ring 3,
//! the monitor redirects the vCPU like a signal delivery: the interrupted
//! `rip` goes below the red zone of the interrupted stack, `rip` becomes
//! [`hermit_preempt_entry`], and `preempt_allowed` becomes 0. The
//! trampoline saves the flags, every general-purpose register and the whole
//! FPU/SSE/AVX state (`xsave`, or `fxsave` without OSXSAVE), lets the
//! scheduler switch threads if the timeslice is used up, restores
//! everything and returns to the interrupted instruction with `ret 128`.

use abi::boot::BootInfo;
use abi::layout::BOOT_INFO_ADDR;
use core::sync::atomic::{compiler_fence, AtomicU32, AtomicU64, Ordering};

/// Bytes the trampoline reserves for the extended state (set once at
/// registration: CPUID leaf 0xD's size for XCR0's features, or 512).
#[no_mangle]
static HERMIT_PREEMPT_SAVE_SIZE: AtomicU64 = AtomicU64::new(512);
/// 1: save with `xsave64`, 0: with `fxsave64`.
#[no_mangle]
static HERMIT_PREEMPT_XSAVE: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .section .text, "ax"
    /* Entered by the monitor with [rsp] = the interrupted rip, 128 bytes
       (the red zone) below the interrupted rsp; flags and registers are
       the interrupted code's. */
    .global hermit_preempt_entry
hermit_preempt_entry:
    pushfq
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
    movq %rsp, %rbp
    /* The ABI wants DF clear at calls; the interrupted code may be inside
       a backward copy (std; rep movs; cld). popfq restores it. */
    cld
    subq HERMIT_PREEMPT_SAVE_SIZE(%rip), %rsp
    andq $-64, %rsp
    cmpq $0, HERMIT_PREEMPT_XSAVE(%rip)
    je 1f
    /* XRSTOR wants the header's reserved bytes zero; XSAVE leaves them. */
    xorl %eax, %eax
    movq %rax, 512(%rsp)
    movq %rax, 520(%rsp)
    movq %rax, 528(%rsp)
    movq %rax, 536(%rsp)
    movq %rax, 544(%rsp)
    movq %rax, 552(%rsp)
    movq %rax, 560(%rsp)
    movq %rax, 568(%rsp)
    movl $-1, %eax
    movl $-1, %edx
    xsave64 (%rsp)
    jmp 2f
1:
    fxsave64 (%rsp)
2:
    call {handler}
    cmpq $0, HERMIT_PREEMPT_XSAVE(%rip)
    je 3f
    movl $-1, %eax
    movl $-1, %edx
    xrstor64 (%rsp)
    jmp 4f
3:
    fxrstor64 (%rsp)
4:
    movq %rbp, %rsp
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
    popfq
    ret $128
"#,
    handler = sym preempted,
    options(att_syntax)
);

extern "C" {
    fn hermit_preempt_entry();
}

fn word(offset: usize) -> &'static AtomicU32 {
    // SAFETY: the BootInfo block lies at BOOT_INFO_ADDR (identity-mapped,
    // written by the monitor before boot and never freed); the two words
    // are 4-byte aligned fields of it that only this module writes on the
    // guest's side.
    unsafe { &*((BOOT_INFO_ADDR as usize + offset) as *const AtomicU32) }
}

fn allowed() -> &'static AtomicU32 {
    word(core::mem::offset_of!(BootInfo, preempt_allowed))
}

fn timer() -> &'static AtomicU32 {
    word(core::mem::offset_of!(BootInfo, preempt_timer))
}

/// Publishes the trampoline (and how it saves the extended state).
pub fn register() {
    let osxsave = core::arch::x86_64::__cpuid(1).ecx & (1 << 27) != 0;
    if osxsave {
        let size = core::arch::x86_64::__cpuid_count(0xd, 0).ebx as u64;
        HERMIT_PREEMPT_SAVE_SIZE.store(size.max(576) + 64, Ordering::Relaxed);
        HERMIT_PREEMPT_XSAVE.store(1, Ordering::Relaxed);
    } else {
        HERMIT_PREEMPT_SAVE_SIZE.store(512 + 64, Ordering::Relaxed);
    }
    let entry = hermit_preempt_entry as *const () as u64;
    // SAFETY: as in `word`: a field of the BootInfo block.
    let slot = unsafe {
        &*((BOOT_INFO_ADDR as usize + core::mem::offset_of!(BootInfo, preempt_entry))
            as *const AtomicU64)
    };
    slot.store(entry, Ordering::SeqCst);
}

/// Whether the monitor arms its timeslice timer (more than one thread
/// exists).
pub fn set_timer(on: bool) {
    timer().store(on as u32, Ordering::SeqCst);
}

/// Marks the running thread as being in app code (preemptible).
pub fn enter_app() {
    compiler_fence(Ordering::SeqCst);
    allowed().store(1, Ordering::SeqCst);
}

/// While alive, the running thread is in the ABI layer or the kernel and
/// the monitor leaves it alone; dropping it restores what was before (a
/// thread switched out inside gets its own value back when it resumes).
#[must_use]
pub struct KernelSection(u32);

/// Enters a kernel section (the first line of every `sys_*` function).
pub fn kernel_section() -> KernelSection {
    let before = allowed().swap(0, Ordering::SeqCst);
    compiler_fence(Ordering::SeqCst);
    KernelSection(before)
}

impl Drop for KernelSection {
    fn drop(&mut self) {
        compiler_fence(Ordering::SeqCst);
        allowed().store(self.0, Ordering::SeqCst);
    }
}

/// Called by the trampoline (the monitor already cleared
/// `preempt_allowed`): yields if the timeslice is used up, then returns
/// to the interrupted app code.
extern "C" fn preempted() {
    crate::sched::preempt_point();
    enter_app();
}
