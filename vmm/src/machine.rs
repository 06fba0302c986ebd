//! A guest VM as one movable thing ([`Machine`]: VM and memory, vCPU 0,
//! devices, console, what it was booted from) and the thread that runs it
//! ([`MachineHandle`]).
//!
//! A machine is made by booting an image ([`Machine::boot`]) or from saved
//! state ([`Machine::restore`]). [`spawn`] runs it on its own vCPU thread;
//! the handle can **pause** it (the vCPU thread quiesces the vCPU and hands
//! the whole `Machine` over, so the controller may read its state and
//! memory while nothing runs), **resume** it (hand it back), or **stop** it.
//! While it runs, [`MachineHandle::vm`] still gives the VM (memory, dirty
//! log) to a migration's pre-copy rounds.
//!
//! Pausing and stopping use the same mechanism as `--timeout`: a flag and
//! the vCPU kick signal, repeated until the thread answers (a kick landing
//! just before `KVM_RUN` would be lost).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use abi::boot::{encode_location, BootInfo};
use abi::layout::BOOT_INFO_ADDR;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use sha2::Digest;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::Killable;
use zerocopy::{FromBytes, IntoBytes};

use crate::boot::layout::{self, BootSetup};
use crate::boot::{cpu, loader};
use crate::devices::doorbell::Doorbell;
use crate::devices::exits::{ExitCounters, ExitStats};
use crate::devices::io_wait::IoWait;
use crate::devices::persist::DeviceStates;
use crate::devices::virtio::net::{poll::RingServer, Net};
use crate::devices::virtio::{self, lock_devices, MmioTransport};
use crate::error::{Error, VmError};
use crate::outcome::GuestExit;
use crate::snapshot::state::{GuestSpec, ImageId, MachineState};
use crate::vstate::vcpu::{install_kick_handler, kick_signal, msrs_to_save, RunContext, Vcpu};
use crate::vstate::vm::{open_kvm, Vm};
use hostnet::port::GuestPort;
use hostnet::Nic;

/// How often a vCPU thread is kicked until it answers.
pub const KICK_INTERVAL: Duration = Duration::from_millis(5);
/// How long to wait for a kicked vCPU thread before giving up on it.
pub const KICK_PATIENCE: Duration = Duration::from_secs(2);

/// A guest's console.
pub type Console = Box<dyn Write + Send>;

/// KVM and what every VM of this process shares: the CPUID template (what
/// KVM supports here) and whether kvmclock is offered.
pub struct Hypervisor {
    pub kvm: Kvm,
    pub cpuid: CpuId,
    pub kvmclock: bool,
    /// The MSRs snapshots save (probed lazily, once).
    msrs: std::sync::OnceLock<Vec<u32>>,
    /// The images booted lately.
    images: crate::boot::image_cache::ImageCache,
}

impl Hypervisor {
    pub fn open(device: &Path) -> Result<Self, VmError> {
        let kvm = open_kvm(device)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let kvmclock = cpu::kvmclock_supported(&cpuid);
        if !kvmclock {
            tracing::warn!("KVM offers no kvmclock: guests get no pvclock page");
        }
        Ok(Self {
            kvm,
            cpuid,
            kvmclock,
            msrs: std::sync::OnceLock::new(),
            images: Default::default(),
        })
    }

    /// The MSRs a snapshot saves on this host (see [`msrs_to_save`]).
    pub fn msrs(&self) -> Result<&[u32], VmError> {
        if let Some(m) = self.msrs.get() {
            return Ok(m);
        }
        let list = msrs_to_save(&self.kvm, &self.cpuid)?;
        Ok(self.msrs.get_or_init(|| list))
    }

    /// Checks that this host can give a guest the CPUID it runs with:
    /// every feature bit it sees must be one KVM supports here. The error
    /// names the first missing bit.
    pub fn check_cpuid(&self, wanted: &[kvm_bindings::kvm_cpuid_entry2]) -> Result<(), String> {
        /// (leaf, register) pairs that are feature bitmaps.
        const FEATURES: &[(u32, u32, &str)] = &[
            (0x1, 2, "ecx"),
            (0x1, 3, "edx"),
            (0x7, 1, "ebx"),
            (0x7, 2, "ecx"),
            (0x7, 3, "edx"),
            (0x8000_0001, 2, "ecx"),
            (0x8000_0001, 3, "edx"),
            (0x4000_0001, 0, "eax"),
        ];
        let here = self.cpuid.as_slice();
        for &(leaf, reg, reg_name) in FEATURES {
            for w in wanted.iter().filter(|e| e.function == leaf) {
                let have = here
                    .iter()
                    .find(|h| h.function == leaf && h.index == w.index)
                    .map_or(0, |h| regs(h)[reg as usize]);
                let missing = regs(w)[reg as usize] & !have;
                if missing != 0 {
                    return Err(format!(
                        "the guest's CPUID has features this host's KVM cannot offer: leaf \
                         {leaf:#x} index {} {reg_name} bits {missing:#x}",
                        w.index
                    ));
                }
            }
        }
        Ok(())
    }
}

fn regs(e: &kvm_bindings::kvm_cpuid_entry2) -> [u32; 4] {
    [e.eax, e.ebx, e.ecx, e.edx]
}

/// What to boot.
pub struct BootRequest<'a> {
    pub name: String,
    pub image: &'a Path,
    pub cmdline: String,
    pub mem_size: u64,
    pub nic: Option<Nic>,
    pub port: Option<Arc<GuestPort>>,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

/// A guest ready to run (or paused).
pub struct Machine {
    pub vm: Arc<Vm>,
    pub vcpu: Vcpu,
    /// Shared with the network thread while the guest polls its rings.
    pub devices: Arc<Mutex<Vec<MmioTransport>>>,
    /// Serves the card from the network thread while the guest polls.
    net_poll: Option<Arc<RingServer>>,
    pub doorbell: Doorbell<Console>,
    pub io_wait: IoWait,
    /// Its VM exits and idle waits on this shim (`GET /v1/stats`).
    pub exits: Arc<ExitCounters>,
    pub spec: GuestSpec,
}

impl Machine {
    /// Boots `req.image`: validates it, creates the VM, loads it, writes the
    /// boot tables and sets vCPU 0 up in 64-bit ring 3.
    pub fn boot(hv: &Hypervisor, req: BootRequest, console: Console) -> Result<Self, Error> {
        let cached = hv.images.get(req.image)?;
        let info = cached.info;
        info.check_fits(req.mem_size)
            .map_err(|kind| crate::error::ImageFileError {
                path: req.image.to_owned(),
                kind,
            })?;
        let image = cached.id.clone();
        let vm = Vm::new(&hv.kvm, req.mem_size)?;
        loader::load_bytes(vm.memory(), &cached.bytes)?;
        layout::write_boot_memory(
            vm.memory(),
            &BootSetup {
                mem_size: req.mem_size,
                note: &info.note,
                cmdline: &req.cmdline,
                kvmclock: hv.kvmclock,
            },
        )?;
        let vcpu = Vcpu::new(&vm, 0)?;
        vcpu.configure(&hv.cpuid, info.note.user_entry, hv.kvmclock)?;
        let devices = net_device(req.port);
        tracing::info!(
            instance = %req.name,
            mem_mib = req.mem_size >> 20,
            entry = format_args!("{:#x}", info.note.user_entry),
            kvmclock = hv.kvmclock,
            virtio_net = !devices.is_empty(),
            "starting vCPU 0 in ring 3"
        );
        let spec = GuestSpec {
            name: req.name,
            image,
            cmdline: req.cmdline,
            mem_size: req.mem_size,
            kvmclock: hv.kvmclock,
            nic: req.nic.map(Into::into),
            cpuid: hv.cpuid.as_slice().to_vec(),
            env: req.env,
            args: req.args,
            generation: 0,
        };
        Self::assemble(vm, vcpu, devices, console, spec)
    }

    fn assemble(
        vm: Vm,
        vcpu: Vcpu,
        devices: Vec<MmioTransport>,
        console: Console,
        spec: GuestSpec,
    ) -> Result<Self, Error> {
        let io_wait = IoWait::new().map_err(|e| VmError::Setup(format!("epoll: {e}")))?;
        for fd in devices.iter().filter_map(MmioTransport::wait_fd) {
            io_wait
                .add(fd)
                .map_err(|e| VmError::Setup(format!("epoll: {e}")))?;
        }
        let port = devices.first().and_then(MmioTransport::port);
        let devices = Arc::new(Mutex::new(devices));
        let net_poll = port.map(|port| RingServer::install(&devices, vm.memory(), &port));
        Ok(Self {
            vm: Arc::new(vm),
            vcpu,
            devices,
            net_poll,
            doorbell: Doorbell::new(console),
            io_wait,
            exits: Arc::default(),
            spec,
        })
    }

    /// A fresh VM for `spec` whose memory the caller fills (from a snapshot
    /// file or a migration stream) before [`Self::restore`] sets the rest.
    pub fn create_vm(hv: &Hypervisor, spec: &GuestSpec) -> Result<Vm, Error> {
        crate::config::check_mem_size(spec.mem_size).map_err(Error::Config)?;
        hv.check_cpuid(&spec.cpuid).map_err(Error::Config)?;
        Ok(Vm::new(&hv.kvm, spec.mem_size)?)
    }

    /// Builds the machine of `state` in `vm` (made by [`Self::create_vm`],
    /// memory already restored): vCPU (with the guest's own CPUID), devices
    /// (the card on `port`, which must have the guest's MAC), then the VM
    /// clock.
    pub fn restore(
        vm: Vm,
        state: MachineState,
        port: Option<Arc<GuestPort>>,
        console: Console,
    ) -> Result<Self, Error> {
        let spec = state.spec;
        let vcpu = Vcpu::new(&vm, 0)?;
        let cpuid = CpuId::from_entries(&spec.cpuid)
            .map_err(|e| Error::Config(format!("the saved CPUID: {e:?}")))?;
        vcpu.restore_state(&cpuid, &state.vcpu)?;
        let devices = state
            .devices
            .restore(port)
            .map_err(|e| Error::Config(format!("cannot restore the devices: {e}")))?;
        vm.set_clock(&state.clock)?;
        Self::assemble(vm, vcpu, devices, console, spec)
    }

    /// The paused machine's state (all but memory). The vCPU must be
    /// quiesced (as a paused machine is).
    pub fn capture(&self, hv: &Hypervisor) -> Result<MachineState, VmError> {
        let vcpu = self.vcpu.save_state(hv.msrs()?)?;
        let clock = self.vm.clock()?;
        Ok(MachineState {
            spec: self.spec.clone(),
            vcpu,
            clock,
            devices: DeviceStates::save(&lock_devices(&self.devices)),
        })
    }

    /// Tells the guest it now runs on `host` in `region`: writes both into
    /// its `BootInfo` and bumps the generation, which the guest checks
    /// after its next `HC_YIELD`.
    pub fn set_location(&mut self, host: &str, region: &str) -> Result<(), VmError> {
        let mut generation = 0;
        update_boot_info(self.vm.memory(), |info| {
            info.host = encode_location(host);
            info.region = encode_location(region);
            info.generation = info.generation.wrapping_add(1);
            generation = info.generation;
        })?;
        self.spec.generation = generation;
        Ok(())
    }

    /// Hands the app checkpoint `blob` to a guest that has not started yet:
    /// copies it to the top of RAM (page-aligned, above the image that
    /// ends at `image_end`) and names it in `BootInfo::restore_addr/len`.
    pub fn place_checkpoint(&mut self, blob: &[u8], image_end: u64) -> Result<(), Error> {
        let len = blob.len() as u64;
        let addr = crate::checkpoint::restore_addr(self.spec.mem_size, image_end, len).ok_or_else(
            || {
                Error::Config(format!(
                    "the checkpoint ({len} bytes) does not fit in the guest's {} MiB of RAM \
                     above its image: give it more --mem",
                    self.spec.mem_size >> 20
                ))
            },
        )?;
        let mem = self.vm.memory();
        mem.write_slice(blob, GuestAddress(addr))
            .map_err(|e| VmError::GuestWrite {
                what: "the checkpoint",
                addr,
                detail: e.to_string(),
            })?;
        update_boot_info(mem, |info| {
            info.restore_addr = addr;
            info.restore_len = len;
        })?;
        Ok(())
    }

    /// Asks the guest's app for a checkpoint now: bumps
    /// `BootInfo::checkpoint_requests` (the guest notices after its next
    /// `HC_YIELD`).
    pub fn request_checkpoint(vm: &Vm) -> Result<(), VmError> {
        // Only this field: the guest runs meanwhile.
        let addr = BOOT_INFO_ADDR + std::mem::offset_of!(BootInfo, checkpoint_requests) as u64;
        let err = |e: vm_memory::GuestMemoryError| VmError::GuestWrite {
            what: "BootInfo::checkpoint_requests",
            addr,
            detail: e.to_string(),
        };
        let n: u64 = vm.memory().read_obj(GuestAddress(addr)).map_err(err)?;
        vm.memory()
            .write_obj(n.wrapping_add(1), GuestAddress(addr))
            .map_err(err)
    }

    /// Lets the network thread serve the card while the guest polls its
    /// rings, or stops it (a paused machine).
    fn serve_from_network(&self, on: bool) {
        if let Some(server) = &self.net_poll {
            server.set_enabled(on);
        }
    }

    /// The guest's network port, if it has a card.
    pub fn port(&self) -> Option<Arc<GuestPort>> {
        lock_devices(&self.devices).first().and_then(|d| d.port())
    }
}

/// Reads the guest's `BootInfo`, lets `change` edit it and writes it back.
fn update_boot_info(
    mem: &crate::vstate::vm::GuestMemoryMmap,
    change: impl FnOnce(&mut BootInfo),
) -> Result<(), VmError> {
    let addr = GuestAddress(BOOT_INFO_ADDR);
    let mut raw = [0u8; std::mem::size_of::<BootInfo>()];
    let err = |e: vm_memory::GuestMemoryError| VmError::GuestWrite {
        what: "the BootInfo",
        addr: BOOT_INFO_ADDR,
        detail: e.to_string(),
    };
    mem.read_slice(&mut raw, addr).map_err(err)?;
    let mut info = BootInfo::read_from_bytes(&raw).map_err(|_| VmError::GuestWrite {
        what: "the BootInfo",
        addr: BOOT_INFO_ADDR,
        detail: "size".into(),
    })?;
    change(&mut info);
    mem.write_slice(info.as_bytes(), addr).map_err(err)
}

fn net_device(port: Option<Arc<GuestPort>>) -> Vec<MmioTransport> {
    port.into_iter()
        .map(|port| {
            MmioTransport::new(
                virtio::window_base(0),
                abi::layout::VIRTIO_MMIO_SIZE,
                Box::new(Net::new(port)),
            )
        })
        .collect()
}

/// Largest image file read (unikernel images are hundreds of KiB).
pub const MAX_IMAGE_FILE: u64 = 64 << 20;

/// The identity of an image file: its path, size and SHA-256 (a regular
/// file of at most [`MAX_IMAGE_FILE`] bytes: a device or FIFO is refused).
pub fn image_id(path: &Path) -> Result<ImageId, Error> {
    let bytes = shim_util::files::read_capped(path, MAX_IMAGE_FILE).map_err(|e| {
        let e = match e {
            shim_util::files::ReadError::Io { source, .. } => source,
            other => std::io::Error::new(std::io::ErrorKind::InvalidInput, other.to_string()),
        };
        Error::Image(crate::error::ImageFileError {
            path: path.to_owned(),
            kind: crate::error::ImageError::Io(e),
        })
    })?;
    let digest = sha2::Sha256::digest(&bytes);
    Ok(ImageId {
        path: path.display().to_string(),
        size: bytes.len() as u64,
        sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// The flags a controller sets for its vCPU thread.
#[derive(Default)]
struct Control {
    stop: AtomicBool,
    pause: AtomicBool,
}

/// How a vCPU thread ended: its id and the guest's ending (`None`: it was
/// stopped).
pub type Ended = (usize, Option<GuestExit>);

/// Why a pause did not work.
#[derive(Debug)]
pub enum PauseError {
    /// The guest ended (its ending went to the `ended` channel).
    Ended,
    /// The vCPU thread did not answer the kicks.
    NoAnswer,
}

impl std::fmt::Display for PauseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PauseError::Ended => f.write_str("the guest is not running any more"),
            PauseError::NoAnswer => f.write_str("the vCPU thread does not answer"),
        }
    }
}

/// A running (or paused) machine's thread. All methods take `&self`, so
/// a handle can be shared (e.g. by a daemon's request threads).
pub struct MachineHandle {
    id: usize,
    control: Arc<Control>,
    vm: Arc<Vm>,
    exits: Arc<ExitCounters>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
    paused: Mutex<Receiver<Box<Machine>>>,
    resume: Mutex<Option<Sender<Box<Machine>>>>,
}

/// Runs `machine` on a new vCPU thread named `vcpu-ID`. When the guest
/// ends (or is stopped) the thread sends `(id, exit)` on `ended`.
/// `deadline`: the guest is stopped then (`--timeout`).
pub fn spawn(
    machine: Machine,
    id: usize,
    ended: Sender<Ended>,
    deadline: Option<Instant>,
) -> Result<MachineHandle, VmError> {
    install_kick_handler()?;
    let control = Arc::new(Control::default());
    let (paused_tx, paused) = mpsc::channel::<Box<Machine>>();
    let (resume, resume_rx) = mpsc::channel::<Box<Machine>>();
    let vm = Arc::clone(&machine.vm);
    let exits = Arc::clone(&machine.exits);
    let ctl = Arc::clone(&control);
    let thread = thread::Builder::new()
        .name(format!("vcpu-{id}"))
        .spawn(move || {
            let exit = vcpu_thread(Box::new(machine), &ctl, deadline, &paused_tx, &resume_rx);
            // The receiver may be gone if the controller gave up on us.
            let _ = ended.send((id, exit));
        })
        .map_err(|e| VmError::Setup(e.to_string()))?;
    Ok(MachineHandle {
        id,
        control,
        vm,
        exits,
        thread: Mutex::new(Some(thread)),
        paused: Mutex::new(paused),
        resume: Mutex::new(Some(resume)),
    })
}

fn vcpu_thread(
    mut machine: Box<Machine>,
    control: &Control,
    deadline: Option<Instant>,
    paused: &Sender<Box<Machine>>,
    resume: &Receiver<Box<Machine>>,
) -> Option<GuestExit> {
    loop {
        let exit = {
            let m = &mut *machine;
            let vm = Arc::clone(&m.vm);
            let mut ctx = RunContext {
                mem: vm.memory(),
                doorbell: &mut m.doorbell,
                devices: &m.devices,
                io_wait: &m.io_wait,
                exits: &m.exits,
                stop: &control.stop,
                pause: &control.pause,
                deadline,
            };
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.vcpu.run(&mut ctx)))
                .unwrap_or_else(|_| Some(GuestExit::Died("the vCPU thread panicked".into())))
        };
        if exit.is_some() || control.stop.load(Ordering::Acquire) {
            return exit;
        }
        if !control.pause.load(Ordering::Acquire) {
            continue;
        }
        // Nothing may touch the paused guest's memory or rings.
        machine.serve_from_network(false);
        if let Err(e) = machine.vcpu.quiesce() {
            return Some(GuestExit::Died(format!("cannot pause the guest: {e}")));
        }
        control.pause.store(false, Ordering::Release);
        if paused.send(machine).is_err() {
            return None;
        }
        match resume.recv() {
            Ok(m) => machine = m,
            Err(_) => return None, // the controller kept (or dropped) it
        }
        machine.serve_from_network(true);
    }
}

impl MachineHandle {
    pub fn id(&self) -> usize {
        self.id
    }

    /// The guest's VM exits and idle waits so far on this shim.
    pub fn exits(&self) -> ExitStats {
        self.exits.snapshot()
    }

    /// The VM, for reading memory and the dirty log while the guest runs.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    fn kick(&self) {
        if let Some(t) = lock(&self.thread).as_ref() {
            let _ = t.kill(kick_signal());
        }
    }

    /// Asks the guest's app for a checkpoint now (see
    /// [`Machine::request_checkpoint`]) and wakes an idle guest so it
    /// notices. A wake can be lost just before the guest waits: call
    /// [`Self::wake`] again while waiting for the checkpoint.
    pub fn request_checkpoint(&self) -> Result<(), VmError> {
        Machine::request_checkpoint(&self.vm)?;
        self.wake();
        Ok(())
    }

    /// Cuts an idle guest's wait short (a spurious wake is harmless).
    pub fn wake(&self) {
        self.kick();
    }

    /// Pauses the guest and takes its machine (quiesced). Give it back with
    /// [`Self::resume`], or drop it (and then [`Self::stop`] the thread).
    pub fn pause(&self) -> Result<Box<Machine>, PauseError> {
        let paused = lock(&self.paused);
        self.control.pause.store(true, Ordering::Release);
        let give_up = Instant::now() + KICK_PATIENCE;
        loop {
            self.kick();
            match paused.recv_timeout(KICK_INTERVAL) {
                Ok(m) => return Ok(m),
                Err(RecvTimeoutError::Disconnected) => return Err(PauseError::Ended),
                Err(RecvTimeoutError::Timeout) if Instant::now() >= give_up => {
                    self.control.pause.store(false, Ordering::Release);
                    // It may have paused just now.
                    return match paused.try_recv() {
                        Ok(m) => Ok(m),
                        Err(_) => Err(PauseError::NoAnswer),
                    };
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.is_finished() {
                        return Err(PauseError::Ended);
                    }
                }
            }
        }
    }

    /// Resumes a machine taken with [`Self::pause`].
    pub fn resume(&self, machine: Box<Machine>) {
        if let Some(tx) = lock(&self.resume).as_ref() {
            let _ = tx.send(machine);
        }
    }

    /// Asks the thread to stop (without waiting): sets the flag and kicks
    /// once; [`Self::stop`] waits.
    pub fn request_stop(&self) {
        self.control.stop.store(true, Ordering::Release);
        self.kick();
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        lock(&self.thread).as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the guest (if it still runs; a paused one held by the
    /// controller is released) and joins its thread, kicking until it
    /// answers or [`KICK_PATIENCE`] passes. Returns whether it ended.
    pub fn stop(&self) -> bool {
        self.control.stop.store(true, Ordering::Release);
        *lock(&self.resume) = None;
        let give_up = Instant::now() + KICK_PATIENCE;
        while !self.is_finished() {
            if Instant::now() >= give_up {
                return false;
            }
            self.kick();
            thread::sleep(Duration::from_millis(1));
        }
        self.join();
        true
    }

    /// The CPU time the vCPU thread has used (`None` once it ended).
    pub fn cpu_time(&self) -> Option<Duration> {
        use std::os::unix::thread::JoinHandleExt;
        let thread = lock(&self.thread);
        crate::sys::thread_cpu_time(thread.as_ref()?.as_pthread_t()).ok()
    }

    /// Joins a thread that has ended.
    pub fn join(&self) {
        if let Some(t) = lock(&self.thread).take() {
            if t.join().is_err() {
                tracing::error!(vcpu = self.id, "vCPU thread panicked");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for MachineHandle {
    fn drop(&mut self) {
        if lock(&self.thread).is_some() {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{require_kvm, Asm, TestImage};

    /// A guest that stores rax at `addr`, then exits with 0.
    fn writer(addr: u32) -> TestImage {
        TestImage::new(
            Asm::new()
                .mov_rax(0x1234_5678)
                .mov_ebx(addr)
                .store_rax_at_rbx()
                .exit(0)
                .spin(),
        )
    }

    fn boot(hv: &Hypervisor, image: &TestImage, tag: &str) -> Machine {
        let path = image.write(tag);
        Machine::boot(
            hv,
            BootRequest {
                name: tag.into(),
                image: &path,
                cmdline: "lc.host=t lc.region=r --".into(),
                mem_size: 16 << 20,
                nic: None,
                port: None,
                env: Vec::new(),
                args: Vec::new(),
            },
            Box::new(Vec::new()),
        )
        .unwrap()
    }

    #[test]
    fn the_dirty_log_sees_guest_writes_and_shim_writes() {
        require_kvm();
        let hv = Hypervisor::open(Path::new(crate::vstate::vm::KVM_DEVICE)).unwrap();
        let m = boot(&hv, &writer(0x40_0000), "dirty");
        let vm = Arc::clone(&m.vm);
        // Since creation: the shim's boot writes (tables, image).
        let pages = crate::vstate::vm::pages_of(&vm.take_dirty().unwrap());
        assert!(
            pages.contains(&3),
            "BootInfo page written by the shim: {pages:?}"
        );
        assert!(pages.contains(&0x100), "image page: {pages:?}");
        assert!(!pages.contains(&0x400));
        // Now the guest writes page 0x400.
        let (tx, rx) = mpsc::channel();
        let h = spawn(m, 0, tx, None).unwrap();
        let (_, exit) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert!(matches!(exit, Some(GuestExit::Exited(0))), "{exit:?}");
        h.join();
        let pages = crate::vstate::vm::pages_of(&vm.take_dirty().unwrap());
        assert!(pages.contains(&0x400), "the guest's write: {pages:?}");
        // And the log was cleared.
        let pages = crate::vstate::vm::pages_of(&vm.take_dirty().unwrap());
        assert!(!pages.contains(&0x400), "{pages:?}");
    }

    #[test]
    fn pause_capture_and_restore_into_a_fresh_vm() {
        require_kvm();
        let hv = Hypervisor::open(Path::new(crate::vstate::vm::KVM_DEVICE)).unwrap();
        // Spins forever after writing: we pause it mid-spin.
        let image = TestImage::new(
            Asm::new()
                .mov_rax(0xfeed)
                .mov_ebx(0x40_0000)
                .store_rax_at_rbx()
                .spin(),
        );
        let m = boot(&hv, &image, "pause");
        let vm = Arc::clone(&m.vm);
        let (tx, _rx) = mpsc::channel();
        let h = spawn(m, 0, tx, None).unwrap();
        // Paused once it wrote (and spins).
        let give_up = Instant::now() + Duration::from_secs(30);
        while vm
            .memory()
            .read_obj::<u64>(GuestAddress(0x40_0000))
            .unwrap()
            != 0xfeed
        {
            assert!(
                Instant::now() < give_up,
                "the guest did not write 0xfeed within 30 s"
            );
            thread::sleep(Duration::from_millis(1));
        }
        drop(vm);
        let paused = h.pause().unwrap();
        let state = paused.capture(&hv).unwrap();
        assert!(state
            .vcpu
            .msrs
            .iter()
            .any(|e| e.index == cpu::MSR_KVM_SYSTEM_TIME_NEW));
        let rip = state.vcpu.regs.rip;
        let vm = Machine::create_vm(&hv, &state.spec).unwrap();
        let mut page = vec![0u8; 4096];
        paused
            .vm
            .memory()
            .read_slice(&mut page, GuestAddress(0x40_0000))
            .unwrap();
        vm.memory()
            .write_slice(&page, GuestAddress(0x40_0000))
            .unwrap();
        h.resume(paused);
        assert!(h.stop());
        let mut restored = Machine::restore(vm, state, None, Box::new(Vec::new())).unwrap();
        assert_eq!(restored.vcpu.fd().get_regs().unwrap().rip, rip);
        restored.set_location("elsewhere", "r2").unwrap();
        assert_eq!(restored.spec.generation, 1);
        let v: u64 = restored
            .vm
            .memory()
            .read_obj(GuestAddress(0x40_0000))
            .unwrap();
        assert_eq!(v, 0xfeed);
    }
}
