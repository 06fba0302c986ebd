//! vCPU 0: its KVM setup (CPUID, registers, MSRs) and its run loop, which
//! dispatches VM exits to the devices until the guest is done.
//!
//! The loop runs on its own thread so that `--timeout` can stop a guest
//! that never exits: the controlling thread sets the shared stop flag and
//! kicks this thread with [`kick_signal()`], which makes a blocked `KVM_RUN`
//! (or an idle wait) return `EINTR`; the loop then sees the flag. A kick
//! that lands just before `KVM_RUN` starts is lost, so the kicker repeats
//! it until the thread answers (see `machine`).
//!
//! Green threads of std apps are preempted from here too: see
//! [`super::preempt`].
//!
//! Snapshots: a pause request (the same kick, another flag) makes the loop
//! return; [`Vcpu::quiesce`] then completes any half-done MMIO exit
//! (`immediate_exit` + one `KVM_RUN`), after which [`Vcpu::save_state`]
//! reads a consistent state (in the order KVM needs it restored) and
//! [`Vcpu::restore_state`] writes it back into a fresh vCPU.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_EXIT_INTERNAL_ERROR,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use libc::{c_int, c_void, siginfo_t};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::boot::cpu;
use crate::devices::doorbell::{Action, Doorbell};
use crate::devices::exits::{ExitCounters, ExitKind};
use crate::devices::io_wait::IoWait;
use crate::devices::virtio::{lock_devices, MmioTransport};
use crate::error::VmError;
use crate::outcome::{GuestExit, RegisterDump};
use crate::vstate::preempt::Preempt;
use crate::vstate::vm::{GuestMemoryMmap, Vm};

/// vCPU 0's registers and KVM state, as saved in snapshots: captured in
/// the order KVM needs them restored (mp_state, regs, sregs, xsave, xcrs,
/// debug registers, lapic when an irqchip exists, MSRs, vcpu_events last);
/// kvm-bindings' `serde` feature serializes the KVM structs themselves. `None` fields are state KVM would not
/// give on the source (e.g. no lapic without an irqchip); they are not
/// restored either.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Option<Box<kvm_xsave>>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: Option<kvm_debugregs>,
    pub lapic: Option<Box<kvm_lapic_state>>,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: Option<kvm_vcpu_events>,
}

/// The signal that interrupts `KVM_RUN` on the vCPU thread (`SIGRTMIN`).
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Nothing to do: delivery alone makes KVM_RUN and epoll_wait return EINTR.
}

/// Installs the (empty) handler of [`kick_signal()`], once per process.
pub fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| VmError::Setup(format!("cannot install the vCPU kick handler: {e}")));
    });
    result
}

/// What the run loop needs besides the vCPU.
pub struct RunContext<'a, W: Write> {
    pub mem: &'a GuestMemoryMmap,
    pub doorbell: &'a mut Doorbell<W>,
    /// The virtio-mmio devices (shared with the network thread while the
    /// guest polls its rings); their backends' descriptors are in `io_wait`.
    pub devices: &'a Mutex<Vec<MmioTransport>>,
    pub io_wait: &'a IoWait,
    /// Where the exits are counted.
    pub exits: &'a ExitCounters,
    /// Set by the controlling thread to stop the guest.
    pub stop: &'a AtomicBool,
    /// Set by the controlling thread to pause the guest (snapshot, migration).
    pub pause: &'a AtomicBool,
    /// When `--timeout` expires: idle waits never last beyond it.
    pub deadline: Option<Instant>,
}

/// The MSRs a snapshot saves on this host: `KVM_GET_MSR_INDEX_LIST` plus
/// kvmclock's, kept only where KVM lets a vCPU read the MSR *and* write
/// back what it read (probed once per process, one MSR at a time, on a
/// scratch VM of its own so no guest's clock is touched). MSRs KVM lists
/// but refuses to restore (e.g. `MSR_KVM_POLL_CONTROL` with its reset value
/// on some hosts) would otherwise make every restore fail.
pub fn msrs_to_save(kvm: &Kvm, cpuid: &CpuId) -> Result<Vec<u32>, VmError> {
    let mut all = kvm
        .get_msr_index_list()
        .map_err(VmError::kvm("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    if !all.contains(&cpu::MSR_KVM_SYSTEM_TIME_NEW) {
        all.push(cpu::MSR_KVM_SYSTEM_TIME_NEW);
    }
    let vm = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?;
    let vcpu = vm.create_vcpu(0).map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(cpuid)
        .map_err(VmError::kvm("KVM_SET_CPUID2"))?;
    let round_trips = |index: u32| -> bool {
        let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            return false;
        };
        if !matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            return false;
        }
        matches!(vcpu.set_msrs(&one), Ok(1))
    };
    let (keep, skip): (Vec<u32>, Vec<u32>) = all.into_iter().partition(|&i| round_trips(i));
    if !skip.is_empty() {
        tracing::debug!(
            msrs = format_args!("{skip:x?}"),
            "MSRs KVM lists but will not read or restore (not saved)"
        );
    }
    Ok(keep)
}

/// vCPU 0 of a VM.
pub struct Vcpu {
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &Vm, id: u64) -> Result<Self, VmError> {
        let fd = vm
            .fd()
            .create_vcpu(id)
            .map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
        Ok(Self { fd })
    }

    /// Sets CPUID, the ring-3 long-mode registers and the boot MSRs.
    pub fn configure(&self, cpuid: &CpuId, user_entry: u64, kvmclock: bool) -> Result<(), VmError> {
        // Without CPUID the vCPU has no long mode (EFER.LME is refused).
        self.fd
            .set_cpuid2(cpuid)
            .map_err(VmError::kvm("KVM_SET_CPUID2"))?;
        let sregs = self.fd.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&cpu::ring3_sregs(sregs, cpu::has_fsgsbase(cpuid)))
            .map_err(VmError::kvm("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&cpu::initial_regs(user_entry))
            .map_err(VmError::kvm("KVM_SET_REGS"))?;
        let entries = cpu::boot_msrs(kvmclock);
        if !entries.is_empty() {
            let msrs = Msrs::from_entries(&entries).map_err(|e| VmError::Setup(e.to_string()))?;
            let set = self
                .fd
                .set_msrs(&msrs)
                .map_err(VmError::kvm("KVM_SET_MSRS"))?;
            if set != entries.len() {
                return Err(VmError::MsrsNotSet {
                    set,
                    wanted: entries.len(),
                });
            }
        }
        Ok(())
    }

    /// The raw vCPU, for tests and later snapshotting.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Completes a pending MMIO or port I/O exit without running guest
    /// code (`immediate_exit` = 1, then one `KVM_RUN`, which returns
    /// `EINTR`): afterwards the registers say exactly where the guest is.
    pub fn quiesce(&mut self) -> Result<(), VmError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(VmError::Kvm {
                what: "KVM_RUN (quiesce)",
                err: e,
            }),
            Ok(exit) => Err(VmError::Setup(format!(
                "the vCPU did not stop for a snapshot: exit {exit:?}"
            ))),
        };
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    /// Reads the vCPU's state, in the order KVM restores it: mp_state, regs,
    /// sregs, xsave, xcrs, debug registers, lapic (only with an irqchip:
    /// KVM refuses it without one, and we have none), `msrs`, vcpu_events
    /// last. The vCPU must be quiesced. Optional state KVM refuses is left
    /// out (and logged).
    pub fn save_state(&self, msrs: &[u32]) -> Result<VcpuState, VmError> {
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(VmError::kvm("KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(VmError::kvm("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
        let xsave = optional("KVM_GET_XSAVE", self.fd.get_xsave()).map(Box::new);
        let xcrs = optional("KVM_GET_XCRS", self.fd.get_xcrs());
        let debugregs = optional("KVM_GET_DEBUGREGS", self.fd.get_debug_regs());
        let lapic = None; // no irqchip: there is no local APIC to save
        let mut entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut read = 0;
        for chunk in entries.chunks_mut(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let mut batch = Msrs::from_entries(chunk).map_err(|e| VmError::Setup(e.to_string()))?;
            let n = self
                .fd
                .get_msrs(&mut batch)
                .map_err(VmError::kvm("KVM_GET_MSRS"))?;
            if n != chunk.len() {
                return Err(VmError::Setup(format!(
                    "KVM read {n} of {} MSRs (stopped at {:#x})",
                    chunk.len(),
                    chunk[n].index
                )));
            }
            chunk.copy_from_slice(batch.as_slice());
            read += n;
        }
        debug_assert_eq!(read, entries.len());
        let vcpu_events = optional("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events());
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs: entries,
            vcpu_events,
        })
    }

    /// Writes `state` into this (fresh) vCPU: CPUID first, then mp_state,
    /// regs, sregs, xsave, xcrs, debug registers, lapic before the MSRs,
    /// the MSRs (every one must be accepted), vcpu_events; finally
    /// `kvmclock_ctrl` (where KVM has it) tells the guest's clock it was
    /// paused. The VM clock is set by the caller afterwards.
    pub fn restore_state(&self, cpuid: &CpuId, state: &VcpuState) -> Result<(), VmError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(VmError::kvm("KVM_SET_CPUID2"))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(VmError::kvm("KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(VmError::kvm("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(VmError::kvm("KVM_SET_SREGS"))?;
        if let Some(xsave) = &state.xsave {
            // SAFETY: KVM_SET_XSAVE reads more than the 4 KiB `kvm_xsave`
            // only for XSTATE features enabled dynamically with
            // arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM), which the shim never
            // does; `xsave` is a whole, live `kvm_xsave`.
            unsafe { self.fd.set_xsave(xsave) }.map_err(VmError::kvm("KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &state.xcrs {
            self.fd
                .set_xcrs(xcrs)
                .map_err(VmError::kvm("KVM_SET_XCRS"))?;
        }
        if let Some(debugregs) = &state.debugregs {
            self.fd
                .set_debug_regs(debugregs)
                .map_err(VmError::kvm("KVM_SET_DEBUGREGS"))?;
        }
        if let Some(lapic) = &state.lapic {
            self.fd
                .set_lapic(lapic)
                .map_err(VmError::kvm("KVM_SET_LAPIC"))?;
        }
        for chunk in state.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|e| VmError::Setup(e.to_string()))?;
            let set = self
                .fd
                .set_msrs(&msrs)
                .map_err(VmError::kvm("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                return Err(VmError::Setup(format!(
                    "KVM accepted {set} of {} saved MSRs: MSR {:#x} (value {:#x}) was refused",
                    chunk.len(),
                    chunk[set].index,
                    chunk[set].data
                )));
            }
        }
        if let Some(events) = &state.vcpu_events {
            self.fd
                .set_vcpu_events(events)
                .map_err(VmError::kvm("KVM_SET_VCPU_EVENTS"))?;
        }
        if let Err(e) = self.fd.kvmclock_ctrl() {
            tracing::debug!(
                error = %e,
                "KVM_KVMCLOCK_CTRL failed: the guest is not told it was paused"
            );
        }
        Ok(())
    }

    /// Runs the guest until it is done or `ctx.stop` or `ctx.pause` is set
    /// (then returns `None`).
    pub fn run<W: Write>(&mut self, ctx: &mut RunContext<W>) -> Option<GuestExit> {
        // What the guest triggers is logged through a rate limit.
        let warnings = shim_util::limit::Warnings::default();
        let mut preempt = Preempt::default();
        loop {
            if ctx.stop.load(Ordering::Acquire) || ctx.pause.load(Ordering::Acquire) {
                return None;
            }
            let mut kind = ExitKind::Other;
            preempt.before_run(ctx.mem);
            let result = self.fd.run();
            let slice_over = preempt.after_run();
            let action = match result {
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if Doorbell::<W>::contains(addr) {
                        kind = ExitKind::Hypercall((addr - abi::layout::DOORBELL_ADDR) / 8);
                        ctx.doorbell.write(ctx.mem, addr, data)
                    } else if let Some(dev) = lock_devices(ctx.devices)
                        .iter_mut()
                        .find(|d| d.contains(addr))
                    {
                        kind = if dev.is_notify(addr) {
                            ExitKind::VirtioNotify
                        } else {
                            ExitKind::VirtioRegister
                        };
                        match dev.write(ctx.mem, addr, data) {
                            Ok(()) => Action::Continue,
                            Err(why) => Action::Stop(GuestExit::Died(why)),
                        }
                    } else {
                        shim_util::guest_warn!(
                            warnings,
                            addr = format_args!("{addr:#x}"),
                            len = data.len(),
                            "unhandled MMIO write"
                        );
                        Action::Continue
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if let Some(dev) = lock_devices(ctx.devices)
                        .iter_mut()
                        .find(|d| d.contains(addr))
                    {
                        kind = ExitKind::VirtioRegister;
                        dev.read(addr, data);
                    } else {
                        shim_util::guest_warn!(
                            warnings,
                            addr = format_args!("{addr:#x}"),
                            len = data.len(),
                            "unhandled MMIO read"
                        );
                        data.fill(0xff);
                    }
                    Action::Continue
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    shim_util::guest_warn!(
                        warnings,
                        port = format_args!("{port:#x}"),
                        len = data.len(),
                        "unhandled port I/O: in"
                    );
                    data.fill(0xff);
                    Action::Continue
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    shim_util::guest_warn!(
                        warnings,
                        port = format_args!("{port:#x}"),
                        len = data.len(),
                        "unhandled port I/O: out"
                    );
                    Action::Continue
                }
                Ok(VcpuExit::Intr) => {
                    kind = ExitKind::Interrupted;
                    Action::Continue
                }
                Ok(VcpuExit::Shutdown) => Action::Stop(GuestExit::TripleFault(self.dump())),
                Ok(VcpuExit::Hlt) => Action::Stop(GuestExit::Halted),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Action::Stop(GuestExit::Died(format!(
                    "KVM could not enter the guest (hardware entry failure reason {reason:#x} \
                     on CPU {cpu})\n  {}",
                    self.dump()
                ))),
                Ok(VcpuExit::InternalError) => Action::Stop(GuestExit::Died(format!(
                    "KVM internal error{}\n  {}",
                    self.internal_error_detail(),
                    self.dump()
                ))),
                Ok(other) => {
                    let what = format!("{other:?}");
                    Action::Stop(GuestExit::Died(format!(
                        "unexpected VM exit {what}\n  {}",
                        self.dump()
                    )))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    kind = ExitKind::Interrupted;
                    if slice_over {
                        Preempt::redirect(&mut self.fd, ctx.mem);
                    }
                    Action::Continue
                }
                Err(e) => Action::Stop(GuestExit::Died(format!("KVM_RUN failed: {e}"))),
            };
            ctx.exits.exit(kind);
            match action {
                Action::Continue => {}
                Action::Yield(timeout) => {
                    if let Some(exit) = idle(ctx, timeout) {
                        return Some(exit);
                    }
                }
                Action::Stop(exit) => return Some(exit),
            }
        }
    }

    /// The registers of a stopped vCPU (zeros where KVM will not say).
    pub fn dump(&self) -> RegisterDump {
        let regs = self.fd.get_regs().unwrap_or_default();
        let sregs = self.fd.get_sregs().unwrap_or_default();
        RegisterDump {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            cs: sregs.cs.selector,
            ss: sregs.ss.selector,
            efer: sregs.efer,
        }
    }

    /// Suberror and data words of a `KVM_EXIT_INTERNAL_ERROR`.
    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
            return String::new();
        }
        // SAFETY: the exit reason says the `internal` member of the union is
        // the one KVM filled in; it is plain data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        format!(
            " (suberror {}, data [{}])",
            internal.suberror,
            data.join(", ")
        )
    }
}

/// `Some(value)`, or `None` with a debug message when KVM refused.
fn optional<T>(what: &str, r: Result<T, vmm_sys_util::errno::Error>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::debug!(state = what, error = %e, "snapshot: KVM refuses a state: not saved");
            None
        }
    }
}

/// Serves `HC_YIELD`: moves the devices' data (frames the guest queued go
/// out, frames waiting for it come in); if that gave the guest something
/// to do, or it asked not to sleep (timeout 0), returns at once; otherwise
/// waits for I/O or `timeout`, never past the deadline, and moves the data
/// that woke it. `Some` if the guest must be stopped (it kept breaking a
/// device).
fn idle<W: Write>(ctx: &mut RunContext<W>, timeout: Option<Duration>) -> Option<GuestExit> {
    if timeout == Some(Duration::ZERO) {
        ctx.exits.idle_skipped();
        return process_devices(ctx).err();
    }
    // Consume the backends' wake-ups first, then look: a frame arriving in
    // between signals again, so the wait below cannot miss it.
    for dev in lock_devices(ctx.devices).iter_mut() {
        dev.prepare_wait();
    }
    match process_devices(ctx) {
        Err(exit) => return Some(exit),
        Ok(true) => {
            ctx.exits.idle_skipped();
            return None;
        }
        Ok(false) => {}
    }
    let left = ctx
        .deadline
        .map(|d| d.saturating_duration_since(Instant::now()));
    let timeout = match (timeout, left) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    };
    let wake = ctx
        .io_wait
        .wait(timeout)
        .inspect_err(|e| tracing::warn!(error = %e, "idle wait failed"))
        .ok();
    ctx.exits.idle_slept(wake);
    process_devices(ctx).err()
}

/// Runs every device once; `Ok(true)` if the guest has something new to
/// look at.
fn process_devices<W: Write>(ctx: &mut RunContext<W>) -> Result<bool, GuestExit> {
    let mut should_run = false;
    for dev in lock_devices(ctx.devices).iter_mut() {
        match dev.process(ctx.mem) {
            Ok(progress) => should_run |= progress.guest_should_run,
            Err(why) => return Err(GuestExit::Died(why)),
        }
    }
    Ok(should_run)
}
