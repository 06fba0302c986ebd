//! Guest-physical memory layout. Guest virtual addresses equal physical ones
//! (identity map), and every mapped page is user-accessible: the whole
//! unikernel runs in ring 3 (ring 0 is thousands of times slower under
//! nested KVM without hardware virtualisation).
//!
//! ```text
//! 0x0000_0000  null page            not mapped: a null dereference faults
//! 0x0000_1000  GDT (+ TSS at 0x1800)
//! 0x0000_2000  IDT                  256 gates
//! 0x0000_3000  BootInfo             see `boot`
//! 0x0000_4000  command line         NUL-terminated, at most 4 KiB
//! 0x0000_5000  kvmclock page        pvclock_vcpu_time_info of vCPU 0
//! 0x0000_6000  fault stack          IST1: #DF, NMI, #MC (top 0x8000)
//! 0x0000_8000  trap stack           ring-0 stack (TSS.rsp0, top 0x1_0000)
//! 0x0001_0000  page tables          PML4, PDPT, 4 PDs, one PT for the first 2 MiB
//! 0x0001_f000  stack guard          not mapped
//! 0x0002_0000  main stack           grows down from 0x8_0000
//! 0x0010_0000  image                the kernel+app ELF; heap follows its end
//! ...          heap                 up to the end of RAM
//! 0xc000_0000  device window        hypercall doorbell page, then virtio-mmio windows
//! ```

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Size of a large page (the granule of guest RAM).
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;

pub const GDT_ADDR: u64 = 0x1000;
pub const TSS_ADDR: u64 = 0x1800;
pub const IDT_ADDR: u64 = 0x2000;
pub const BOOT_INFO_ADDR: u64 = 0x3000;
pub const CMDLINE_ADDR: u64 = 0x4000;
/// Longest command line, including its terminating NUL.
pub const CMDLINE_MAX: u64 = 0x1000;
pub const PVCLOCK_ADDR: u64 = 0x5000;
/// Top of the stack used for double faults, NMIs and machine checks (IST1).
pub const FAULT_STACK_TOP: u64 = 0x8000;
/// Top of the ring-0 stack used on any trap from ring 3 (TSS.rsp0).
pub const TRAP_STACK_TOP: u64 = 0x1_0000;

pub const PML4_ADDR: u64 = 0x1_0000;
pub const PDPT_ADDR: u64 = 0x1_1000;
/// Four page directories, one per GiB of the low 4 GiB.
pub const PD_ADDR: u64 = 0x1_2000;
/// The page table of the first 2 MiB (4 KiB pages, so the null page and the
/// stack guard can stay unmapped).
pub const PT0_ADDR: u64 = 0x1_6000;
/// Every page-table page lives in `[PAGE_TABLES_START, PAGE_TABLES_END)`.
pub const PAGE_TABLES_START: u64 = PML4_ADDR;
pub const PAGE_TABLES_END: u64 = PT0_ADDR + PAGE_SIZE;

pub const STACK_GUARD_ADDR: u64 = 0x1_f000;
pub const STACK_BOTTOM: u64 = 0x2_0000;
pub const STACK_TOP: u64 = 0x8_0000;

/// Where images are linked. The kernel's linker script uses the same value.
pub const IMAGE_BASE: u64 = 0x10_0000;

/// Guest RAM is `[0, mem_size)`, a multiple of [`LARGE_PAGE_SIZE`], at most this.
pub const MAX_MEM_SIZE: u64 = DEVICE_WINDOW;
/// Smallest guest RAM the layout allows (low tables + a 2 MiB image area).
pub const MIN_MEM_SIZE: u64 = 2 * LARGE_PAGE_SIZE;

/// Start of the device window (one large page, mapped uncached, not RAM).
pub const DEVICE_WINDOW: u64 = 0xc000_0000;
pub const DEVICE_WINDOW_SIZE: u64 = LARGE_PAGE_SIZE;
/// The hypercall doorbell page (see `hypercall`).
pub const DOORBELL_ADDR: u64 = DEVICE_WINDOW;
/// First virtio-mmio window; window `i` is at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE`.
pub const VIRTIO_MMIO_BASE: u64 = DEVICE_WINDOW + PAGE_SIZE;
pub const VIRTIO_MMIO_STRIDE: u64 = PAGE_SIZE;
/// Bytes of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
