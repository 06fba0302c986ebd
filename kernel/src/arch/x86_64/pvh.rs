//! The PVH platform (QEMU microvm, Firecracker), in ring 0.
//!
//! [`pvh_main`] runs once, right after `_pvh_entry` entered long mode: it
//! copies what it needs out of `hvm_start_info`, writes the CPU tables and
//! the boot information exactly as our shim would (abi::x86), starts
//! kvmclock or calibrates the TSC, and drops to ring 3 at `_user_entry`.
//! [`serve`] then answers the guest's hypercalls (abi::hypercall) with port I/O.
//! App checkpoints do not pass through here: they travel over a virtio
//! console driven from ring 3 (kernel::checkpoint).

use abi::boot::{BootInfo, Platform, BOOT_MAGIC};
use abi::hypercall::*;
use abi::layout::*;
use abi::x86;
use core::fmt::Write;
use zerocopy::IntoBytes;

use super::{apic, cpu, mmio, port};

const HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// `struct hvm_start_info` (Xen's arch-x86/hvm/start_info.h), version 1.
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

extern "C" {
    fn _user_entry() -> !;
}

/// Ring-0 setup on PVH monitors; never returns (drops to ring 3).
pub extern "C" fn pvh_main(start_info: u64) -> ! {
    crate::platform::set(Platform::Pvh);
    let info: HvmStartInfo = mmio::read(start_info);
    if info.magic != HVM_START_MAGIC {
        port::serial_write(b"libcloud: bad hvm_start_info magic\n");
        port::debug_exit(abi::exit::EXIT_FAULT);
    }

    // Copy the command line before the tables below overwrite low memory.
    let mut cmdline = [0u8; CMDLINE_MAX as usize];
    let mut cmdline_len = 0;
    if info.cmdline_paddr != 0 {
        while cmdline_len < cmdline.len() - 1 {
            let b: u8 = mmio::read(info.cmdline_paddr + cmdline_len as u64);
            if b == 0 {
                break;
            }
            cmdline[cmdline_len] = b;
            cmdline_len += 1;
        }
    }

    // Highest RAM below the device window, in whole large pages.
    let mut mem_top = 0;
    if info.version >= 1 {
        for i in 0..info.memmap_entries as u64 {
            let e: HvmMemmapEntry =
                mmio::read(info.memmap_paddr + i * core::mem::size_of::<HvmMemmapEntry>() as u64);
            if e.kind == E820_RAM {
                mem_top = mem_top.max((e.addr + e.size).min(MAX_MEM_SIZE));
            }
        }
    }
    let mem_size = if mem_top >= MIN_MEM_SIZE {
        mem_top & !(LARGE_PAGE_SIZE - 1)
    } else {
        MIN_MEM_SIZE
    };

    let (pvclock_addr, tsc_khz) = if cpu::has_kvmclock() {
        // SAFETY: ring 0, and CPUID said the MSR exists.
        unsafe { apic::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, PVCLOCK_ADDR | 1) };
        (PVCLOCK_ADDR, 0)
    } else {
        (0, port::calibrate_tsc_khz().unwrap_or(1_000_000))
    };

    let mut zero = PAGE_TABLES_START;
    while zero < PAGE_TABLES_END {
        mmio::write_u64(zero, 0);
        zero += 8;
    }
    x86::gdt(mmio::write_u64);
    x86::tss(mmio::write_u64);
    x86::idt(trap_stubs_addr(), mmio::write_u64);
    apic::init();
    x86::page_tables(mem_size, x86::PVH_MMIO, mmio::write_u64);
    mmio::write_bytes(CMDLINE_ADDR, &cmdline[..cmdline_len + 1]);
    let boot = BootInfo {
        magic: BOOT_MAGIC,
        abi_version: abi::ABI_VERSION,
        platform: Platform::Pvh as u32,
        mem_size,
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len: cmdline_len as u64,
        pvclock_addr,
        tsc_khz,
        doorbell_addr: 0,
        ..BootInfo::default()
    };
    mmio::write_bytes(BOOT_INFO_ADDR, boot.as_bytes());

    // SAFETY: the tables written above are complete and consistent (abi::x86);
    // the iretq frame enters `_user_entry` in ring 3 on the main stack.
    unsafe {
        let gdtr = DescriptorPointer {
            limit: x86::GDT_LIMIT,
            base: GDT_ADDR,
        };
        let idtr = DescriptorPointer {
            limit: x86::IDT_LIMIT,
            base: IDT_ADDR,
        };
        core::arch::asm!(
            "lgdt [{gdtr}]",
            "lidt [{idtr}]",
            "mov cr3, {cr3}",
            "ltr {tss:x}",
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            cr3 = in(reg) x86::cr::CR3,
            tss = in(reg) x86::TSS_SEL,
            ss = in(reg) x86::USER_DS as u64,
            rsp = in(reg) STACK_TOP,
            rflags = in(reg) x86::INITIAL_RFLAGS,
            cs = in(reg) x86::USER_CS as u64,
            rip = in(reg) _user_entry as *const () as u64,
            in("rdi") BOOT_INFO_ADDR,
            options(noreturn)
        );
    }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

fn trap_stubs_addr() -> u64 {
    extern "C" {
        fn trap_stubs();
    }
    trap_stubs as *const () as u64
}

/// Serves hypercall `nr` in ring 0 with port I/O.
pub fn serve(nr: u64, value: u64) {
    match nr {
        HC_EXIT => port::debug_exit(value as u8),
        HC_CONSOLE_WRITE => {
            let w: ConsoleWrite = mmio::read(value);
            port::serial_write(mmio::slice(w.buf, w.len.min(CONSOLE_WRITE_MAX) as usize));
        }
        HC_YIELD => {} // the idle wait is `trap::idle`, not a hypercall
        // (checkpoints travel over the virtio checkpoint port instead:
        // kernel::checkpoint)
        HC_PANIC => {
            let p: PanicReport = mmio::read(value);
            let msg = mmio::slice(p.msg, p.msg_len.min(PANIC_STR_MAX) as usize);
            let file = mmio::slice(p.file, p.file_len.min(PANIC_STR_MAX) as usize);
            port::serial_write(b"guest panicked at ");
            port::serial_write(file);
            let _ = write!(SerialWriter, ":{}:{}: ", p.line, p.column);
            port::serial_write(msg);
            port::serial_write(b"\n");
            port::debug_exit(abi::exit::EXIT_PANIC);
        }
        HC_FAULT => {
            let f: FaultReport = mmio::read(value);
            let _ = writeln!(
                SerialWriter,
                "guest fault: {} (vector {}, error code {:#x}) at rip {:#x} (cs {:#x}, rsp {:#x}), address {:#x}",
                exception_name(f.vector),
                f.vector,
                f.error_code,
                f.rip,
                f.cs,
                f.rsp,
                f.cr2
            );
            port::debug_exit(abi::exit::EXIT_FAULT);
        }
        _ => {}
    }
}

struct SerialWriter;

impl Write for SerialWriter {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        port::serial_write(s.as_bytes());
        Ok(())
    }
}
