//! Bad input gets a clear error and a non-zero status, and a misbehaving
//! guest never brings the shim down: broken images, memory that is too
//! small, a missing KVM device, unclaimed MMIO, bogus hypercalls, triple
//! faults, guests that never exit.

mod common;

use common::{boot, image, require_kvm};
use std::path::PathBuf;
use std::time::Duration;

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("host-shim-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `host-shim run PATH --timeout 30 EXTRA` to completion.
fn run_image(path: &std::path::Path, extra: &[&str]) -> common::Run {
    common::run_image(path, &[&["--timeout", "30"][..], extra].concat())
}

fn assert_refused(run: &common::Run, needle: &str) {
    assert_eq!(run.status, Some(1), "{run:?}");
    assert!(
        run.stderr.to_lowercase().contains(&needle.to_lowercase()),
        "stderr should mention {needle:?}: {run:?}"
    );
    assert!(run.stdout.is_empty(), "no guest output expected: {run:?}");
}

#[test]
fn a_missing_image_is_refused() {
    let run = run_image(std::path::Path::new("/nonexistent/app.img"), &[]);
    assert_refused(&run, "/nonexistent/app.img");
}

#[test]
fn a_file_that_is_not_an_elf_is_refused() {
    let path = temp_file(
        "garbage.img",
        b"this is not an ELF image at all, just text\n",
    );
    assert_refused(&run_image(&path, &[]), "not an ELF");
}

#[test]
fn an_elf_without_pvh_entry_is_refused() {
    // The shim's own binary: a fine ELF, but no PVH note.
    let path = PathBuf::from(env!("CARGO_BIN_EXE_host-shim"));
    assert_refused(&run_image(&path, &[]), "PVH");
}

#[test]
fn a_truncated_image_is_refused() {
    let bytes = std::fs::read(image("hello")).unwrap();
    let path = temp_file("truncated.img", &bytes[..bytes.len() / 3]);
    let run = run_image(&path, &[]);
    assert_eq!(run.status, Some(1), "{run:?}");
    assert!(run.stderr.contains("Error"), "{run:?}");
}

/// Offset of the `LibCloud` note's descriptor in an image.
fn libcloud_note_desc(bytes: &[u8]) -> usize {
    let name = b"LibCloud\0";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("image has a LibCloud note");
    (at + name.len() + 3) & !3
}

#[test]
fn an_image_for_another_abi_version_is_refused() {
    let mut bytes = std::fs::read(image("hello")).unwrap();
    let desc = libcloud_note_desc(&bytes);
    bytes[desc..desc + 4].copy_from_slice(&999u32.to_le_bytes());
    let path = temp_file("wrong-abi.img", &bytes);
    assert_refused(&run_image(&path, &[]), "ABI");
}

#[test]
fn an_image_larger_than_guest_memory_is_refused() {
    // Grow the writable segment's memory size to 100 MiB.
    let mut bytes = std::fs::read(image("hello")).unwrap();
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(bytes[56..58].try_into().unwrap()) as usize;
    let writable = (0..phnum)
        .map(|i| phoff + i * 56)
        .find(|&ph| {
            u32::from_le_bytes(bytes[ph..ph + 4].try_into().unwrap()) == 1 && bytes[ph + 4] & 2 != 0
        })
        .expect("a writable PT_LOAD");
    bytes[writable + 40..writable + 48].copy_from_slice(&(100u64 << 20).to_le_bytes());
    let path = temp_file("too-big.img", &bytes);
    let run = run_image(&path, &["--mem", "64M"]);
    assert_refused(&run, "--mem");
}

#[test]
fn a_bad_memory_size_is_refused() {
    let img = image("hello");
    for bad in ["3M", "lots", "0", "5000G"] {
        let run = run_image(&img, &["--mem", bad]);
        assert_ne!(run.status, Some(0), "--mem {bad}: {run:?}");
        assert!(run.stderr.contains("mem"), "--mem {bad}: {run:?}");
    }
}

#[test]
fn a_missing_kvm_device_says_how_to_fix_it() {
    let img = image("hello");
    let run = common::run_image(&img, &["--kvm-device", "/nonexistent/kvm"]);
    assert_refused(&run, "/nonexistent/kvm");
}

#[test]
fn bogus_hypercalls_are_refused_and_the_guest_goes_on() {
    let run = boot("selftest", &[], &["badcall"]);
    assert_eq!(run.status, Some(0), "{run:?}");
    assert_eq!(run.stdout, "survived\n", "{run:?}");
    assert!(
        run.stderr.contains("WARN"),
        "the shim should log what it refused: {run:?}"
    );
}

#[test]
fn unclaimed_mmio_is_logged_and_reads_all_ones() {
    let run = boot("selftest", &[], &["mmio"]);
    assert_eq!(run.status, Some(0), "{run:?}");
    assert_eq!(run.stdout, "mmio read 0xffffffff\n", "{run:?}");
    assert!(run.stderr.contains("unhandled MMIO"), "{run:?}");
}

#[test]
fn a_triple_fault_is_reported_with_registers() {
    let run = boot("selftest", &[], &["triple"]);
    assert_eq!(run.status, Some(125), "{run:?}");
    assert!(run.stderr.contains("triple"), "{run:?}");
    assert!(run.stderr.contains("rip"), "{run:?}");
}

#[test]
fn a_guest_that_outlives_its_timeout_is_stopped() {
    require_kvm();
    let img = image("selftest");
    let run = common::run_image(&img, &["--timeout", "1", "--", "spin"]);
    assert_eq!(run.status, Some(124), "{run:?}");
    assert!(run.stderr.contains("timeout"), "{run:?}");
    assert!(run.elapsed < Duration::from_secs(10), "{run:?}");
}
