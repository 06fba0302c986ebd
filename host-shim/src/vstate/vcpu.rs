//! vCPU 0: its KVM setup (CPUID, registers, MSRs) and its run loop, which
//! dispatches VM exits to the devices until the guest is done.
//!
//! The loop runs on its own thread so that `--timeout` can stop a guest
//! that never exits: the controlling thread sets the shared stop flag and
//! kicks this thread with [`kick_signal()`], which makes a blocked `KVM_RUN`
//! (or an idle wait) return `EINTR`; the loop then sees the flag. A kick
//! that lands just before `KVM_RUN` starts is lost, so the kicker repeats
//! it until the thread answers (see `backend::kvm`).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, Msrs, KVM_EXIT_INTERNAL_ERROR};
use kvm_ioctls::{VcpuExit, VcpuFd};
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::boot::cpu;
use crate::devices::doorbell::{Action, Doorbell};
use crate::devices::io_wait::IoWait;
use crate::devices::virtio::MmioTransport;
use crate::error::VmError;
use crate::outcome::{GuestExit, RegisterDump};
use crate::vstate::vm::{GuestMemoryMmap, Vm};

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
    pub doorbell: Doorbell<W>,
    /// The virtio-mmio devices; their backends' descriptors are in `io_wait`.
    pub devices: Vec<MmioTransport>,
    pub io_wait: IoWait,
    /// Set by the controlling thread to stop the guest.
    pub stop: &'a AtomicBool,
    /// When `--timeout` expires: idle waits never last beyond it.
    pub deadline: Option<Instant>,
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
            .set_sregs(&cpu::ring3_sregs(sregs))
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

    /// Runs the guest until it is done or `ctx.stop` is set (then returns
    /// `None`).
    pub fn run<W: Write>(&mut self, ctx: &mut RunContext<W>) -> Option<GuestExit> {
        loop {
            if ctx.stop.load(Ordering::Acquire) {
                return None;
            }
            let action = match self.fd.run() {
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if Doorbell::<W>::contains(addr) {
                        ctx.doorbell.write(ctx.mem, addr, data)
                    } else if let Some(dev) = ctx.devices.iter_mut().find(|d| d.contains(addr)) {
                        match dev.write(ctx.mem, addr, data) {
                            Ok(()) => Action::Continue,
                            Err(why) => Action::Stop(GuestExit::Died(why)),
                        }
                    } else {
                        tracing::warn!("unhandled MMIO write at {addr:#x} (len {})", data.len());
                        Action::Continue
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if let Some(dev) = ctx.devices.iter_mut().find(|d| d.contains(addr)) {
                        dev.read(addr, data);
                    } else {
                        tracing::warn!("unhandled MMIO read at {addr:#x} (len {})", data.len());
                        data.fill(0xff);
                    }
                    Action::Continue
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    tracing::warn!("unhandled port I/O: in from {port:#x} (len {})", data.len());
                    data.fill(0xff);
                    Action::Continue
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    tracing::warn!("unhandled port I/O: out to {port:#x} (len {})", data.len());
                    Action::Continue
                }
                Ok(VcpuExit::Intr) => Action::Continue,
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
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Action::Continue,
                Err(e) => Action::Stop(GuestExit::Died(format!("KVM_RUN failed: {e}"))),
            };
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

/// Serves `HC_YIELD`: moves the devices' data (frames the guest queued go
/// out, frames waiting for it come in); if that gave the guest something
/// to do, or it asked not to sleep (timeout 0), returns at once; otherwise
/// waits for I/O or `timeout`, never past the deadline, and moves the data
/// that woke it. `Some` if the guest must be stopped (it kept breaking a
/// device).
fn idle<W: Write>(ctx: &mut RunContext<W>, timeout: Option<Duration>) -> Option<GuestExit> {
    if timeout == Some(Duration::ZERO) {
        return process_devices(ctx).err();
    }
    // Consume the backends' wake-ups first, then look: a frame arriving in
    // between signals again, so the wait below cannot miss it.
    for dev in &mut ctx.devices {
        dev.prepare_wait();
    }
    match process_devices(ctx) {
        Err(exit) => return Some(exit),
        Ok(true) => return None,
        Ok(false) => {}
    }
    let left = ctx
        .deadline
        .map(|d| d.saturating_duration_since(Instant::now()));
    let timeout = match (timeout, left) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    };
    if let Err(e) = ctx.io_wait.wait(timeout) {
        tracing::warn!("idle wait failed: {e}");
    }
    process_devices(ctx).err()
}

/// Runs every device once; `Ok(true)` if the guest has something new to
/// look at.
fn process_devices<W: Write>(ctx: &mut RunContext<W>) -> Result<bool, GuestExit> {
    let mut should_run = false;
    for dev in &mut ctx.devices {
        match dev.process(ctx.mem) {
            Ok(progress) => should_run |= progress.guest_should_run,
            Err(why) => return Err(GuestExit::Died(why)),
        }
    }
    Ok(should_run)
}
