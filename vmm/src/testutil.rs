//! Test helpers: a tiny x86-64 assembler and a builder of minimal libcloud
//! images (ELF64 with one `PT_LOAD` and one `PT_NOTE` segment), so the
//! loader, the CPU setup and the run loop can be tested before the real
//! kernel exists.
//!
//! The image at `load_addr` (default `IMAGE_BASE`) is two pages:
//!
//! ```text
//! +0x000  main code (the ring-3 entry)
//! +0x800  32 exception stubs of 16 bytes: push vector; jmp common
//! +0xa00  common trap handler (ring 0): pop rax; HC_EXIT(rax)
//! +0xb00  PVH entry (32-bit): out 0xf4 <- exit code; hlt
//! +0x1000 data page
//! ```

use std::path::PathBuf;

use crate::config::{Backend, QemuAccel, RunConfig};

use crate::devices::persist::{ConnectedNetState, DeviceStates};
use crate::devices::virtio::mmio::persist::{QueueState, TransportState};
use crate::devices::virtio::net::persist::NetState;
use crate::snapshot::state::{GuestSpec, ImageId, MachineState};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::ClockState;

use abi::hypercall::{doorbell_slot, HC_EXIT};
use abi::layout::{DOORBELL_ADDR, IMAGE_BASE};
use abi::note::{ImageNote, NOTE_NAME, NOTE_TYPE_IMAGE, XEN_ELFNOTE_PHYS32_ENTRY, XEN_NOTE_NAME};
use zerocopy::IntoBytes;

/// A run of `image` on `backend` with 64 MiB, no timeout, no network and
/// no checkpoints; a test changes the fields it is about.
pub fn run_config(backend: Backend, image: PathBuf) -> RunConfig {
    RunConfig {
        image,
        mem_size: 64 << 20,
        backend,
        timeout: None,
        cmdline: "lc.host=test lc.region=local --".into(),
        qemu_accel: QemuAccel::Tcg,
        kvm_device: crate::vstate::vm::KVM_DEVICE.into(),
        firecracker: None,
        network: None,
        also: Vec::new(),
        restore: None,
        checkpoint_to: None,
        checkpoint_max: None,
    }
}

/// Machine code, appended instruction by instruction.
#[derive(Clone, Default)]
pub struct Asm(Vec<u8>);

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    /// `mov eax, imm32` (zero-extends into rax).
    pub fn mov_eax(self, imm: u32) -> Self {
        self.raw(&[0xb8]).raw(&imm.to_le_bytes())
    }
    /// `mov rax, imm64`.
    pub fn mov_rax(self, imm: u64) -> Self {
        self.raw(&[0x48, 0xb8]).raw(&imm.to_le_bytes())
    }
    /// `mov ebx, imm32` (zero-extends into rbx).
    pub fn mov_ebx(self, imm: u32) -> Self {
        self.raw(&[0xbb]).raw(&imm.to_le_bytes())
    }
    /// `mov [rbx], rax`.
    pub fn store_rax_at_rbx(self) -> Self {
        self.raw(&[0x48, 0x89, 0x03])
    }
    /// `mov rax, [rbx]`.
    pub fn load_rax_from_rbx(self) -> Self {
        self.raw(&[0x48, 0x8b, 0x03])
    }
    /// Hypercall `nr` with the value in rax (clobbers rbx).
    pub fn hypercall(self, nr: u64) -> Self {
        self.mov_ebx(doorbell_slot(DOORBELL_ADDR, nr) as u32)
            .store_rax_at_rbx()
    }
    /// `exit(code)`.
    pub fn exit(self, code: u32) -> Self {
        self.mov_eax(code).hypercall(HC_EXIT)
    }
    /// `exit(rax)`.
    pub fn exit_rax(self) -> Self {
        self.hypercall(HC_EXIT)
    }
    /// `mov eax, [addr]` for an address below 2 GiB.
    pub fn load_eax_abs(self, addr: u32) -> Self {
        self.raw(&[0x8b, 0x04, 0x25]).raw(&addr.to_le_bytes())
    }
    /// `mov eax, cs; and eax, 3`: the current privilege level.
    pub fn cpl_to_eax(self) -> Self {
        self.raw(&[0x8c, 0xc8, 0x83, 0xe0, 0x03])
    }
    /// `test eax, eax; setne al; movzx eax, al`.
    pub fn eax_nonzero(self) -> Self {
        self.raw(&[0x85, 0xc0, 0x0f, 0x95, 0xc0, 0x0f, 0xb6, 0xc0])
    }
    /// `ud2`.
    pub fn ud2(self) -> Self {
        self.raw(&[0x0f, 0x0b])
    }
    /// `jmp $`.
    pub fn spin(self) -> Self {
        self.raw(&[0xeb, 0xfe])
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn bytes(self) -> Vec<u8> {
        self.0
    }
}

/// A minimal image; see the module documentation for its layout.
#[derive(Clone)]
pub struct TestImage {
    code: Vec<u8>,
    data: Vec<(usize, Vec<u8>)>,
    pvh_code: Vec<u8>,
    pvh_note: bool,
    image_note: bool,
    note_segment: bool,
    abi_version: u32,
    note_align: usize,
    bss: u64,
    load_addr: u64,
    user_entry: Option<u64>,
}

const IMAGE_SIZE: usize = 0x2000;
const CODE_FILE_OFFSET: usize = 0x1000;
const STUBS: usize = 0x800;
const COMMON_TRAP: usize = 0xa00;
const PVH: usize = 0xb00;
const DATA: usize = 0x1000;

impl TestImage {
    /// Guest-physical address of the PVH entry.
    pub const PVH_ENTRY: u64 = IMAGE_BASE + PVH as u64;
    /// Guest-physical address of the data page.
    pub const DATA: u64 = IMAGE_BASE + DATA as u64;

    /// An image whose ring-3 entry runs `code`.
    pub fn new(code: Asm) -> Self {
        assert!(code.len() <= STUBS, "test code too long");
        Self {
            code: code.bytes(),
            data: Vec::new(),
            pvh_code: Self::pvh_exit(0),
            pvh_note: true,
            image_note: true,
            note_segment: true,
            abi_version: abi::ABI_VERSION,
            note_align: 4,
            bss: 0,
            load_addr: IMAGE_BASE,
            user_entry: None,
        }
    }

    /// An image that exits with `code` on both platforms.
    pub fn exit(code: u8) -> Self {
        let mut image = Self::new(Asm::new().exit(code.into()).spin());
        image.pvh_code = Self::pvh_exit(code);
        image
    }

    /// 32-bit code: `out 0xf4, eax` with `code`, then `hlt` forever.
    fn pvh_exit(code: u8) -> Vec<u8> {
        let mut c = vec![0xb8];
        c.extend_from_slice(&u32::from(code).to_le_bytes());
        c.extend_from_slice(&[0xe7, 0xf4, 0xf4, 0xeb, 0xfd]);
        c
    }

    /// 32-bit code run from the PVH entry (QEMU).
    pub fn pvh_code(mut self, code: Asm) -> Self {
        self.pvh_code = code.bytes();
        self
    }

    /// Bytes placed at `offset` within the data page.
    pub fn data(mut self, offset: usize, bytes: &[u8]) -> Self {
        assert!(offset + bytes.len() <= IMAGE_SIZE - DATA);
        self.data.push((DATA + offset, bytes.to_vec()));
        self
    }
    pub fn without_pvh_note(mut self) -> Self {
        self.pvh_note = false;
        self
    }
    pub fn without_image_note(mut self) -> Self {
        self.image_note = false;
        self
    }
    pub fn without_note_segment(mut self) -> Self {
        self.note_segment = false;
        self
    }
    pub fn abi_version(mut self, v: u32) -> Self {
        self.abi_version = v;
        self
    }
    pub fn note_align(mut self, align: usize) -> Self {
        self.note_align = align;
        self
    }
    /// Zero-initialized memory after the two pages.
    pub fn bss(mut self, bytes: u64) -> Self {
        self.bss = bytes;
        self
    }
    pub fn load_addr(mut self, addr: u64) -> Self {
        self.load_addr = addr;
        self
    }
    pub fn user_entry(mut self, addr: u64) -> Self {
        self.user_entry = Some(addr);
        self
    }

    fn contents(&self) -> Vec<u8> {
        let mut image = vec![0xcc; IMAGE_SIZE];
        image[..self.code.len()].copy_from_slice(&self.code);
        let common = self.load_addr + COMMON_TRAP as u64;
        for vector in 0..32usize {
            let at = STUBS + vector * 16;
            let stub_addr = self.load_addr + at as u64;
            let rel = (common as i64 - (stub_addr as i64 + 7)) as i32;
            image[at..at + 2].copy_from_slice(&[0x6a, vector as u8]);
            image[at + 2] = 0xe9;
            image[at + 3..at + 7].copy_from_slice(&rel.to_le_bytes());
        }
        let handler = Asm::new().raw(&[0x58]).exit_rax().spin().bytes(); // pop rax
        image[COMMON_TRAP..COMMON_TRAP + handler.len()].copy_from_slice(&handler);
        image[PVH..PVH + self.pvh_code.len()].copy_from_slice(&self.pvh_code);
        image[DATA..].fill(0);
        for (at, bytes) in &self.data {
            image[*at..at + bytes.len()].copy_from_slice(bytes);
        }
        image
    }

    fn notes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut note = |name: &[u8], n_type: u32, desc: &[u8]| {
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            out.extend_from_slice(&n_type.to_le_bytes());
            out.extend_from_slice(name);
            out.resize(out.len().next_multiple_of(self.note_align), 0);
            out.extend_from_slice(desc);
            out.resize(out.len().next_multiple_of(self.note_align), 0);
        };
        if self.pvh_note {
            let entry = (self.load_addr + PVH as u64) as u32;
            note(
                XEN_NOTE_NAME,
                XEN_ELFNOTE_PHYS32_ENTRY,
                &entry.to_le_bytes(),
            );
        }
        if self.image_note {
            let desc = ImageNote {
                abi_version: self.abi_version,
                reserved: 0,
                user_entry: self.user_entry.unwrap_or(self.load_addr),
                trap_stubs: self.load_addr + STUBS as u64,
            };
            note(NOTE_NAME, NOTE_TYPE_IMAGE, desc.as_bytes());
        }
        out
    }

    /// The ELF file.
    pub fn build(&self) -> Vec<u8> {
        let notes = self.notes();
        let phnum: u16 = if self.note_segment { 2 } else { 1 };
        let notes_off = 64 + 56 * phnum as usize;
        assert!(notes_off + notes.len() <= CODE_FILE_OFFSET);

        let mut elf = vec![0u8; CODE_FILE_OFFSET];
        elf[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        let mut put = |at: usize, bytes: &[u8]| elf[at..at + bytes.len()].copy_from_slice(bytes);
        put(16, &2u16.to_le_bytes()); // ET_EXEC
        put(18, &62u16.to_le_bytes()); // EM_X86_64
        put(20, &1u32.to_le_bytes());
        put(24, &self.user_entry.unwrap_or(self.load_addr).to_le_bytes());
        put(32, &64u64.to_le_bytes()); // e_phoff
        put(52, &64u16.to_le_bytes()); // e_ehsize
        put(54, &56u16.to_le_bytes()); // e_phentsize
        put(56, &phnum.to_le_bytes());
        put(58, &64u16.to_le_bytes()); // e_shentsize

        let phdr = |p_type: u32,
                    flags: u32,
                    offset: u64,
                    addr: u64,
                    filesz: u64,
                    memsz: u64,
                    align: u64| {
            let mut p = Vec::with_capacity(56);
            for v in [p_type, flags] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            for v in [offset, addr, addr, filesz, memsz, align] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            p
        };
        let size = IMAGE_SIZE as u64;
        let load = phdr(
            1,
            7,
            CODE_FILE_OFFSET as u64,
            self.load_addr,
            size,
            size + self.bss,
            0x1000,
        );
        put(64, &load);
        if self.note_segment {
            let len = notes.len() as u64;
            let note = phdr(4, 4, notes_off as u64, 0, len, len, self.note_align as u64);
            put(64 + 56, &note);
            put(notes_off, &notes);
        }
        elf.extend_from_slice(&self.contents());
        elf
    }

    /// Writes the image to a fresh file and returns its path.
    pub fn write(&self, name: &str) -> PathBuf {
        let path = temp_dir("images").join(format!("{name}.elf"));
        std::fs::write(&path, self.build()).expect("write test image");
        path
    }
}

/// A per-process scratch directory for test files.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("host-shim-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// A file `name` that is not an ELF image, in a fresh test directory.
pub fn junk_image(name: &str) -> PathBuf {
    let path = temp_dir(name).join("junk.img");
    std::fs::write(&path, b"junk").expect("write the junk image");
    path
}

/// Panics with a clear message unless this machine has KVM.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test boots a real guest and needs /dev/kvm, which cannot be opened here: {e}");
    }
}

/// The guest memory size of [`sample_machine_state`].
pub const SAMPLE_MEM_SIZE: u64 = 4 << 20;

/// A machine state with every part set (a NIC with a pending frame, an
/// xsave area, MSRs), for round-trip tests of the snapshot and migration
/// formats.
pub fn sample_machine_state() -> MachineState {
    MachineState {
        spec: GuestSpec {
            name: "kv".into(),
            image: ImageId {
                path: "/tmp/kv.img".into(),
                size: 123,
                sha256: "ab".repeat(32),
            },
            cmdline: "lc.host=a --".into(),
            mem_size: SAMPLE_MEM_SIZE,
            kvmclock: true,
            nic: None,
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x8000_0000,
                ..Default::default()
            }],
            env: vec![("K".into(), "V".into())],
            args: vec!["a".into()],
            generation: 2,
        },
        vcpu: VcpuState {
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs {
                rip: 0x10_1234,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Some(Box::default()),
            xcrs: None,
            debugregs: Some(Default::default()),
            lapic: None,
            msrs: vec![kvm_bindings::kvm_msr_entry {
                index: 0x4b56_4d01,
                data: 0x5001,
                ..Default::default()
            }],
            vcpu_events: None,
        },
        clock: ClockState {
            clock: kvm_bindings::kvm_clock_data {
                clock: 42,
                ..Default::default()
            },
        },
        devices: DeviceStates {
            net: vec![ConnectedNetState {
                transport: TransportState {
                    base: 0xc000_1000,
                    device_type: 1,
                    queue_sel: 1,
                    device_features_sel: 0,
                    driver_features_sel: 1,
                    driver_features: 1 << 32,
                    status: 15,
                    interrupt_status: 0,
                    config_generation: 0,
                    active: true,
                    errors: 0,
                    addrs: vec![[1, 2, 3], [4, 5, 6]],
                    queues: vec![QueueState::default(); 2],
                },
                device: NetState {
                    mac: [2, 0, 0, 0, 0, 1],
                    halted: [false, false],
                    pending_rx: vec![vec![1, 2, 3]],
                },
            }],
        },
    }
}
