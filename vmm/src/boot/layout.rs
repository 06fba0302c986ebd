//! Everything the shim writes into guest memory below the image before the
//! first instruction: GDT, TSS, IDT and page tables (from the `abi::x86`
//! builders, so guest and host agree byte for byte), the `BootInfo` block
//! and the command line, at the addresses of `abi::layout`.

use abi::boot::{BootInfo, Platform, BOOT_MAGIC};
use abi::layout::{
    BOOT_INFO_ADDR, CMDLINE_ADDR, CMDLINE_MAX, DOORBELL_ADDR, GDT_ADDR, IDT_ADDR, PAGE_TABLES_END,
    PAGE_TABLES_START, PVCLOCK_ADDR,
};
use abi::note::ImageNote;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use crate::error::VmError;
use crate::vstate::vm::GuestMemoryMmap;

/// What goes into the boot-time memory besides the fixed tables.
#[derive(Clone, Copy, Debug)]
pub struct BootSetup<'a> {
    pub mem_size: u64,
    pub note: &'a ImageNote,
    /// The command line, without its NUL.
    pub cmdline: &'a str,
    /// Whether the shim programs kvmclock (else `pvclock_addr` is 0).
    pub kvmclock: bool,
}

/// Writes the CPU tables, the `BootInfo` and the command line.
pub fn write_boot_memory(mem: &GuestMemoryMmap, setup: &BootSetup) -> Result<(), VmError> {
    write_cpu_tables(mem, setup.mem_size, setup.note)?;
    write_cmdline(mem, setup.cmdline)?;
    let info = boot_info(setup);
    write_bytes(mem, "the BootInfo", BOOT_INFO_ADDR, info.as_bytes())
}

/// The `BootInfo` block for `setup`.
pub fn boot_info(setup: &BootSetup) -> BootInfo {
    BootInfo {
        magic: BOOT_MAGIC,
        abi_version: abi::ABI_VERSION,
        platform: Platform::Shim as u32,
        mem_size: setup.mem_size,
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len: setup.cmdline.len() as u64,
        pvclock_addr: if setup.kvmclock { PVCLOCK_ADDR } else { 0 },
        tsc_khz: 0,
        doorbell_addr: DOORBELL_ADDR,
        ..BootInfo::default()
    }
}

/// GDT, TSS, IDT (handlers from the image note) and identity page tables
/// for `mem_size` bytes of RAM plus the device window.
pub fn write_cpu_tables(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    note: &ImageNote,
) -> Result<(), VmError> {
    // The builders write only non-zero entries: start from zeroed pages.
    let zeros = vec![0u8; (PAGE_TABLES_END - PAGE_TABLES_START) as usize];
    write_bytes(mem, "page tables", PAGE_TABLES_START, &zeros)?;
    write_bytes(mem, "the GDT and TSS", GDT_ADDR, &zeros[..0x1000])?;
    write_bytes(mem, "the IDT", IDT_ADDR, &zeros[..0x1000])?;

    store_words(mem, "the GDT", |w| abi::x86::gdt(w))?;
    store_words(mem, "the TSS", |w| abi::x86::tss(w))?;
    store_words(mem, "the IDT", |w| abi::x86::idt(note.trap_stubs, w))?;
    store_words(mem, "page tables", |w| {
        abi::x86::page_tables(mem_size, abi::x86::SHIM_MMIO, w)
    })
}

/// The command line and its NUL at `CMDLINE_ADDR`.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), VmError> {
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    if bytes.len() as u64 > CMDLINE_MAX {
        return Err(VmError::GuestWrite {
            what: "the command line",
            addr: CMDLINE_ADDR,
            detail: format!("{} bytes is more than {CMDLINE_MAX}", bytes.len()),
        });
    }
    write_bytes(mem, "the command line", CMDLINE_ADDR, &bytes)
}

/// Runs an `abi::x86` builder, storing each `(address, u64)` it produces;
/// stops at the first failed write.
fn store_words(
    mem: &GuestMemoryMmap,
    what: &'static str,
    build: impl FnOnce(&mut dyn FnMut(u64, u64)),
) -> Result<(), VmError> {
    let mut result = Ok(());
    build(&mut |addr, value| {
        if result.is_ok() {
            result = write_bytes(mem, what, addr, &value.to_le_bytes());
        }
    });
    result
}

fn write_bytes(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), VmError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| VmError::GuestWrite {
            what,
            addr,
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vm::allocate;
    use abi::layout::{PD_ADDR, PML4_ADDR, PT0_ADDR, TSS_ADDR};
    use abi::x86::pte;
    use zerocopy::FromBytes;

    fn note() -> ImageNote {
        ImageNote {
            abi_version: abi::ABI_VERSION,
            reserved: 0,
            user_entry: 0x10_0000,
            trap_stubs: 0x10_0800,
        }
    }

    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn tables_boot_info_and_cmdline_land_where_the_abi_says() {
        let mem = allocate(8 << 20).unwrap();
        // Junk where the tables go: it must not survive.
        mem.write_slice(&[0xaa; 0x8000], GuestAddress(PML4_ADDR))
            .unwrap();
        let note = note();
        let setup = BootSetup {
            mem_size: 8 << 20,
            note: &note,
            cmdline: "lc.host=h lc.region=local --",
            kvmclock: true,
        };
        write_boot_memory(&mem, &setup).unwrap();

        assert_eq!(read_u64(&mem, GDT_ADDR + 4 * 8), 0x00af_fa00_0000_ffff);
        // TSS.rsp0 at offset 4.
        let mut rsp0 = [0u8; 8];
        mem.read_slice(&mut rsp0, GuestAddress(TSS_ADDR + 4))
            .unwrap();
        assert_eq!(u64::from_le_bytes(rsp0), abi::layout::TRAP_STACK_TOP);
        // #UD gate points at stub 6.
        let low = read_u64(&mem, IDT_ADDR + 6 * 16);
        assert_eq!(low & 0xffff, (0x10_0800 + 6 * 16) & 0xffff);
        // Page tables: the null page is unmapped, the junk is gone.
        assert_eq!(read_u64(&mem, PT0_ADDR), 0);
        assert_ne!(read_u64(&mem, PML4_ADDR) & pte::USER, 0);
        // 8 MiB: large pages 1..=3 mapped (0 is split into 4 KiB pages), 4 not.
        assert_eq!(read_u64(&mem, PD_ADDR + 3 * 8), (3 * 0x20_0000) | 0x87);
        assert_eq!(read_u64(&mem, PD_ADDR + 4 * 8), 0);
        assert_eq!(read_u64(&mem, PD_ADDR + 4 * 0x200 * 8 - 8), 0);

        let mut raw = [0u8; std::mem::size_of::<BootInfo>()];
        mem.read_slice(&mut raw, GuestAddress(BOOT_INFO_ADDR))
            .unwrap();
        let info = BootInfo::read_from_bytes(&raw).unwrap();
        assert_eq!(info.magic, BOOT_MAGIC);
        assert_eq!(info.platform, Platform::Shim as u32);
        assert_eq!(info.mem_size, 8 << 20);
        assert_eq!(info.cmdline_len, 28);
        assert_eq!(info.pvclock_addr, PVCLOCK_ADDR);
        assert_eq!(info.doorbell_addr, DOORBELL_ADDR);

        let mut line = [0u8; 29];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"lc.host=h lc.region=local --\0");
    }

    #[test]
    fn no_kvmclock_means_no_pvclock_page() {
        let note = note();
        let setup = BootSetup {
            mem_size: 4 << 20,
            note: &note,
            cmdline: "",
            kvmclock: false,
        };
        assert_eq!(boot_info(&setup).pvclock_addr, 0);
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = allocate(4 << 20).unwrap();
        let line = "x".repeat(CMDLINE_MAX as usize);
        assert!(write_cmdline(&mem, &line).is_err());
        write_cmdline(&mem, &line[1..]).unwrap();
    }
}
