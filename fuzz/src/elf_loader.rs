//! `elf_loader`: the image validator and loader (ELF headers, PVH and LibCloud notes).
//!
//! The image validator (ELF header, program headers, PVH and LibCloud notes)
//! over the input as an image; an image it accepts is then inspected from a file (the same
//! verdict) and loaded into guest memory of the size it asked for, as `run` would.

use std::path::PathBuf;

use vmm::boot::loader::{inspect, load_bytes, validate};
use vmm::vstate::vm::allocate;

/// Largest guest memory an accepted input is loaded into.
const MAX_MEM: u64 = 8 << 20;

pub fn run(data: &[u8]) {
    let Ok(info) = validate(data) else {
        return;
    };
    let mem_size = info.mem_needed();
    if info.check_fits(mem_size).is_err() {
        panic!("an image does not fit the memory it says it needs: {info:?}");
    }
    if mem_size > MAX_MEM {
        return;
    }
    let path = scratch_file();
    std::fs::write(&path, data).expect("write the image to a scratch file");
    let from_file = inspect(&path, mem_size).expect("the file of an accepted image is accepted");
    assert_eq!(from_file.load_end, info.load_end);
    let mem = allocate(mem_size).expect("allocate guest memory");
    let _ = load_bytes(&mem, data);
    let _ = std::fs::remove_file(&path);
}

fn scratch_file() -> PathBuf {
    std::env::temp_dir().join(format!("host-shim-fuzz-elf-{}", std::process::id()))
}
