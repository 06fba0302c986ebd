//! The command line the monitor passed (abi::cmdline): the app's args and
//! environment, the host's name and region, the virtio-mmio devices.

use abi::boot::BootInfo;
use abi::cmdline::Cmdline;

use crate::arch::x86_64::mmio;

static CMDLINE: spin::Once<Cmdline> = spin::Once::new();

pub(crate) fn init(info: &BootInfo) {
    let len = info.cmdline_len.min(abi::layout::CMDLINE_MAX - 1) as usize;
    let raw = mmio::slice(info.cmdline_addr, len);
    let text = core::str::from_utf8(raw).unwrap_or("");
    CMDLINE.call_once(|| Cmdline::parse(text));
}

/// The parsed command line.
pub fn get() -> &'static Cmdline {
    CMDLINE.call_once(Cmdline::default)
}
