//! selftest: the test suite's probe. Its first argument picks what to do:
//!
//! - `ring`          print the CPU privilege level (`ring=3`)
//! - `args`          print each argument on its own line
//! - `env KEY..`     print `KEY=value` (or `KEY unset`) for each key
//! - `host`          print the host name and region
//! - `sleep MS`      sleep, then print how long the clock says it took
//! - `exit CODE`     exit with that status
//! - `panic`         panic with a known message
//! - `fault`         dereference a null pointer (a page fault)
//! - `spin`          loop forever without exiting (for `--timeout`)
//! - `alloc MIB`     allocate and touch that many MiB of heap
//! - `small`         allocate, fill, free and reallocate small blocks of
//!   every size class in an interleaved order, checking each block's
//!   contents, that zeroed ones come back zeroed, and their alignment;
//!   prints `small ok`
//! - `hints`         free heap pages (migration hints) before, while and
//!   after holding 4 MiB
//! - `churn`         free 8 MiB it wrote, then allocate, check and free
//!   blocks forever, printing `churn ok N on HOST` (a live-migration probe:
//!   freed pages may stay behind, the heap must stay sound)
//!
//! and, to prove the shim survives a misbehaving guest:
//!
//! - `badcall`       console writes pointing outside RAM and an unknown
//!   hypercall number; then prints `survived`
//! - `mmio`          read and write an unclaimed MMIO address; prints the read
//! - `triple`        wipe the IDT, then fault: the CPU triple-faults
#![no_std]
#![no_main]

extern crate alloc;

use core::time::Duration;
use libcloud::prelude::*;
use libcloud::time::Instant;

#[libcloud::main]
fn main() -> Result<(), String> {
    let args = libcloud::args();
    let rest = args.get(1..).unwrap_or(&[]);
    let number = |i: usize| -> Result<u64, String> {
        rest.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("expected a number at position {}", i + 1))
    };
    match args.first().map(String::as_str) {
        Some("ring") => println!("ring={}", libcloud::current_ring()),
        Some("args") => rest.iter().for_each(|a| println!("arg={a}")),
        Some("env") => {
            for key in rest {
                match libcloud::env(key) {
                    Some(v) => println!("{key}={v}"),
                    None => println!("{key} unset"),
                }
            }
        }
        Some("host") => {
            let h = libcloud::host();
            println!("host={} region={}", h.name, h.region);
        }
        Some("sleep") => {
            let ms = number(0)?;
            let start = Instant::now();
            libcloud::time::sleep(Duration::from_millis(ms));
            println!("slept_us={}", start.elapsed().as_micros());
        }
        Some("exit") => libcloud::exit(number(0)? as i32),
        Some("panic") => panic!("selftest panic: {}", 42),
        Some("fault") => {
            let null = core::hint::black_box(0usize) as *const u64;
            // SAFETY: none; this deliberately faults to test exception reporting.
            let v = unsafe { core::ptr::read_volatile(null) };
            println!("read {v} from address 0 without a fault");
        }
        Some("spin") => loop {
            core::hint::spin_loop();
        },
        Some("alloc") => {
            let mib = number(0)? as usize;
            let mut v: Vec<u8> = Vec::with_capacity(mib << 20);
            v.resize(mib << 20, 0xa5);
            println!(
                "allocated {} MiB, sum {}",
                mib,
                v.iter().map(|&b| b as u64).sum::<u64>()
            );
        }
        Some("badcall") => {
            use abi::hypercall::{ConsoleWrite, HC_CONSOLE_WRITE};
            let outside = ConsoleWrite {
                buf: 0xffff_0000_0000,
                len: 64,
            };
            kernel::platform::hypercall(HC_CONSOLE_WRITE, &outside as *const _ as u64);
            kernel::platform::hypercall(HC_CONSOLE_WRITE, 0x7fff_ffff_ffff);
            let huge = ConsoleWrite {
                buf: 0x10_0000,
                len: u64::MAX,
            };
            kernel::platform::hypercall(HC_CONSOLE_WRITE, &huge as *const _ as u64);
            kernel::platform::hypercall(4242, 0);
            println!("survived");
        }
        Some("mmio") => {
            let addr = (abi::layout::DEVICE_WINDOW + 0x10_0000) as *mut u32;
            // SAFETY: the device window is mapped; nothing claims this address.
            let v = unsafe {
                core::ptr::write_volatile(addr, 0x1234_5678);
                core::ptr::read_volatile(addr)
            };
            println!("mmio read {v:#x}");
        }
        Some("triple") => {
            let idt = abi::layout::IDT_ADDR as *mut u8;
            // SAFETY: none; this deliberately destroys the IDT (mapped user-writable).
            unsafe { core::ptr::write_bytes(idt, 0, 4096) };
            let null = core::hint::black_box(0usize) as *const u64;
            // SAFETY: none; this faults with no IDT left: a triple fault.
            let v = unsafe { core::ptr::read_volatile(null) };
            println!("read {v} without a fault");
        }
        Some("churn") => {
            drop(core::hint::black_box(vec![0xabu8; 8 << 20]));
            for i in 0u64.. {
                let blocks: Vec<Vec<u8>> = (0..64)
                    .map(|j| vec![(i + j) as u8; 1 + (j as usize * 4099) % 40_000])
                    .collect();
                for (j, b) in blocks.iter().enumerate() {
                    if b.iter().any(|&x| x != (i + j as u64) as u8) {
                        return Err(format!("heap corrupted at iteration {i}, block {j}"));
                    }
                }
                drop(blocks);
                if i % 10 == 0 {
                    println!("churn ok {i} on {}", libcloud::host().name);
                }
                libcloud::time::sleep(Duration::from_millis(10));
            }
        }
        Some("small") => small_blocks()?,
        Some("hints") => {
            let before = free_heap_pages();
            let held: Vec<u8> = vec![1u8; 4 << 20];
            let during = free_heap_pages();
            drop(core::hint::black_box(held));
            println!(
                "free_pages before={before} during={during} after={}",
                free_heap_pages()
            );
        }
        other => return Err(format!("unknown selftest mode {other:?}")),
    }
    Ok(())
}

/// The heap's small-block lists (kernel::heap) under churn: blocks of
/// 1..=600 bytes (past the largest class), aligned 1..=64 (past the
/// classes' 16), freed in an interleaved order and allocated again.
fn small_blocks() -> Result<(), String> {
    use core::alloc::Layout;
    let mut held: Vec<(*mut u8, Layout, u8)> = Vec::new();
    for round in 0..200u32 {
        for i in 0..64u32 {
            let size = 1 + ((round * 64 + i) as usize * 37) % 600;
            let align = 1usize << (i % 7);
            let layout = Layout::from_size_align(size, align).map_err(|e| format!("{e}"))?;
            let zeroed = i % 3 == 0;
            // SAFETY: `layout` has a non-zero size.
            let ptr = unsafe {
                if zeroed {
                    alloc::alloc::alloc_zeroed(layout)
                } else {
                    alloc::alloc::alloc(layout)
                }
            };
            if ptr.is_null() || !(ptr as usize).is_multiple_of(align) {
                return Err(format!("bad block {ptr:?} for {layout:?}"));
            }
            // SAFETY: `ptr` is a live block of `size` bytes.
            let block = unsafe { core::slice::from_raw_parts_mut(ptr, size) };
            if zeroed && block.iter().any(|&b| b != 0) {
                return Err(format!("a zeroed block of {size} bytes is not zero"));
            }
            let fill = (round as u8).wrapping_mul(31).wrapping_add(i as u8);
            block.fill(fill);
            held.push((ptr, layout, fill));
        }
        // Free every other block (of this round and older ones).
        let (mut k, mut overwritten) = (0, false);
        held.retain(|&(ptr, layout, fill)| {
            k += 1;
            if k % 2 == 0 {
                return true;
            }
            // SAFETY: `ptr` is a live block of `layout`.
            let block = unsafe { core::slice::from_raw_parts(ptr, layout.size()) };
            overwritten |= block.iter().any(|&b| b != fill);
            // SAFETY: allocated above with `layout`, freed once.
            unsafe { alloc::alloc::dealloc(ptr, layout) };
            false
        });
        if overwritten {
            return Err(format!("a block was overwritten in round {round}"));
        }
    }
    for (ptr, layout, fill) in held {
        // SAFETY: a live block of `layout`.
        let block = unsafe { core::slice::from_raw_parts(ptr, layout.size()) };
        if block.iter().any(|&b| b != fill) {
            return Err(format!("a block of {layout:?} was overwritten"));
        }
        // SAFETY: allocated with `layout`, freed once.
        unsafe { alloc::alloc::dealloc(ptr, layout) };
    }
    println!("small ok");
    Ok(())
}

/// Heap pages a migration could leave behind, per the published hints.
fn free_heap_pages() -> usize {
    use kernel::arch::x86_64::mmio;
    let info: abi::boot::BootInfo = mmio::read(abi::layout::BOOT_INFO_ADDR);
    let usage: Vec<u16> = (0..info.heap_pages)
        .map(|i| mmio::read(info.page_use_addr + i * 2))
        .collect();
    (0..usage.len())
        .filter(|&i| abi::boot::heap_page_is_free(&usage, i))
        .count()
}
