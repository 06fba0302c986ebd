//! Host-forced preemption of a guest's green threads (std apps): the
//! guest takes no timer interrupts in ring 3, so a thread that computes
//! without any ABI call would keep the vCPU. The run loop owns one
//! [`Preempt`]: while the guest says it has more than one green thread
//! (`BootInfo::preempt_timer`), each `KVM_RUN` is bounded by a timeslice
//! timer that interrupts it; when it fires with the guest in ring 3 and in
//! app code (`BootInfo::preempt_allowed`), [`Preempt::redirect`] makes the
//! vCPU enter the guest's trampoline (`BootInfo::preempt_entry`) like a
//! signal delivery. Both words live in guest memory, so snapshots and
//! migrations carry them; the redirect is finished before the run loop
//! looks at a pause request, so a saved vCPU is never half-redirected.
//! Guests that never set the words (libcloud apps, idle or single-threaded
//! std apps) get no timer and no extra exits.

use std::mem::offset_of;
use std::time::{Duration, Instant};

use abi::boot::BootInfo;
use abi::layout::BOOT_INFO_ADDR;
use kvm_bindings::KVM_EXIT_INTR;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::sys::ThreadTimer;
use crate::vstate::vcpu::kick_signal;
use crate::vstate::vm::GuestMemoryMmap;

/// How long a green thread runs before the monitor interrupts it.
pub const TIMESLICE: Duration = Duration::from_millis(10);
/// Bytes below the interrupted `rsp` the guest's code may use without
/// moving it (the System V red zone).
const RED_ZONE: u64 = 128;

/// The run loop's timeslice timer (created the first time a guest asks).
#[derive(Default)]
pub struct Preempt {
    timer: Option<ThreadTimer>,
    /// When the timer was armed for the `KVM_RUN` in progress.
    armed: Option<Instant>,
    /// The timer could not be created or set: preemption stays off.
    broken: bool,
}

fn word<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, offset: usize) -> Option<T> {
    mem.read_obj(GuestAddress(BOOT_INFO_ADDR + offset as u64))
        .ok()
}

impl Preempt {
    /// Before `KVM_RUN`: arms the timer if the guest has several green
    /// threads.
    pub fn before_run(&mut self, mem: &GuestMemoryMmap) {
        let wanted = word::<u32>(mem, offset_of!(BootInfo, preempt_timer)) == Some(1);
        if !wanted || self.broken {
            return;
        }
        if self.timer.is_none() {
            match ThreadTimer::new(kick_signal()) {
                Ok(timer) => self.timer = Some(timer),
                Err(e) => {
                    tracing::warn!(error = %e, "no timeslice timer: green threads are not preempted");
                    self.broken = true;
                    return;
                }
            }
        }
        if let Some(timer) = &self.timer {
            match timer.set(TIMESLICE) {
                Ok(()) => self.armed = Some(Instant::now()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot arm the timeslice timer");
                    self.broken = true;
                }
            }
        }
    }

    /// After `KVM_RUN`: disarms the timer (so it never interrupts device
    /// work or an idle wait); whether the timeslice ran out during the run.
    pub fn after_run(&mut self) -> bool {
        let Some(since) = self.armed.take() else {
            return false;
        };
        if let Some(timer) = &self.timer {
            if let Err(e) = timer.set(Duration::ZERO) {
                tracing::warn!(error = %e, "cannot disarm the timeslice timer");
                self.broken = true;
            }
        }
        since.elapsed() >= TIMESLICE
    }

    /// After a `KVM_RUN` the timer interrupted: if the guest allows it and
    /// is in ring 3, pushes the interrupted `rip` below the red zone of its
    /// stack and makes it continue at its trampoline. Returns whether it
    /// did. The guest's words are only trusted to redirect the guest
    /// itself: every address is bounds-checked guest memory.
    pub fn redirect(vcpu: &mut VcpuFd, mem: &GuestMemoryMmap) -> bool {
        // Only a run the signal ended (no MMIO or port I/O half done).
        if vcpu.get_kvm_run().exit_reason != KVM_EXIT_INTR {
            return false;
        }
        let entry = word::<u64>(mem, offset_of!(BootInfo, preempt_entry)).unwrap_or(0);
        let allowed_at = offset_of!(BootInfo, preempt_allowed);
        if entry == 0 || word::<u32>(mem, allowed_at) != Some(1) {
            return false;
        }
        let Ok(sregs) = vcpu.get_sregs() else {
            return false;
        };
        if sregs.cs.selector & 3 != 3 {
            return false;
        }
        let Ok(mut regs) = vcpu.get_regs() else {
            return false;
        };
        let Some(frame) = regs.rsp.checked_sub(RED_ZONE + 8) else {
            return false;
        };
        if mem.write_obj(regs.rip, GuestAddress(frame)).is_err()
            || mem
                .write_obj(0u32, GuestAddress(BOOT_INFO_ADDR + allowed_at as u64))
                .is_err()
        {
            return false;
        }
        regs.rsp = frame;
        regs.rip = entry;
        if let Err(e) = vcpu.set_regs(&regs) {
            tracing::warn!(error = %e, "cannot redirect the vCPU to its preemption entry");
            return false;
        }
        true
    }
}
