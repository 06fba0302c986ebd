//! Noticing a move: the shim bumps `BootInfo::generation` (and writes the new
//! host and region) when the guest resumes on another host. The kernel
//! compares the counter after each return from the host and runs the
//! registered hooks (the network stack re-announces its address; libcloud
//! runs the app's `on_migrated` callbacks).

use abi::boot::{decode_location, BootInfo};
use abi::layout::BOOT_INFO_ADDR;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

use crate::arch::x86_64::mmio;

static SEEN_GENERATION: AtomicU64 = AtomicU64::new(0);
static HOOKS: Mutex<Vec<fn()>> = Mutex::new(Vec::new());

fn boot_info() -> BootInfo {
    mmio::read(BOOT_INFO_ADDR)
}

/// Runs `hook` (from the executor's loop) after every move to another host.
pub fn on_migrated(hook: fn()) {
    HOOKS.lock().push(hook);
}

/// How many times the guest has moved since it booted.
pub fn generation() -> u64 {
    boot_info().generation
}

/// Where the guest runs now: `(host, region)`, from the shim's last update
/// or else the command line.
pub fn location() -> (String, String) {
    let info = boot_info();
    let cmdline = crate::cmdline::get();
    let pick = |field, boot: &Option<String>| {
        decode_location(field)
            .map(str::to_string)
            .or_else(|| boot.clone())
            .unwrap_or_else(|| "unknown".into())
    };
    (
        pick(&info.host, &cmdline.host),
        pick(&info.region, &cmdline.region),
    )
}

pub(crate) fn init() {
    SEEN_GENERATION.store(boot_info().generation, Ordering::Relaxed);
}

/// Runs the hooks if the guest moved since the last check.
pub(crate) fn check() {
    let now = boot_info().generation;
    if SEEN_GENERATION.swap(now, Ordering::Relaxed) != now {
        let (host, region) = location();
        log::info!("resumed on host {host} (region {region}), move #{now}");
        let hooks: Vec<fn()> = HOOKS.lock().clone();
        hooks.into_iter().for_each(|hook| hook());
    }
}
