//! App checkpoints in and out (abi::checkpoint): the blob the monitor gave
//! the guest to restore, handing a new checkpoint to the host, and noticing
//! the host's requests for one.

use abi::boot::BootInfo;
use abi::hypercall::{
    CheckpointWrite, CHECKPOINT_PENDING, CHECKPOINT_REFUSED, CHECKPOINT_SENT, CHECKPOINT_STORED,
    HC_CHECKPOINT,
};
use abi::layout::BOOT_INFO_ADDR;
use core::future::poll_fn;
use core::sync::atomic::{AtomicU64, Ordering};
use core::task::Poll;

use crate::arch::x86_64::mmio;

static RESTORE: spin::Once<Option<&'static [u8]>> = spin::Once::new();
static SEEN_REQUESTS: AtomicU64 = AtomicU64::new(0);

fn boot_info() -> BootInfo {
    mmio::read(BOOT_INFO_ADDR)
}

/// The `[start, end)` of the restore blob, if it lies in RAM after the image.
pub(crate) fn restore_range(info: &BootInfo, image_end: u64) -> Option<(u64, u64)> {
    let end = info.restore_addr.checked_add(info.restore_len)?;
    (info.restore_len > 0 && info.restore_addr >= image_end && end <= info.mem_size)
        .then_some((info.restore_addr, end))
}

pub(crate) fn init(info: &BootInfo, image_end: u64) {
    RESTORE.call_once(|| {
        restore_range(info, image_end)
            .map(|(start, end)| mmio::slice(start, (end - start) as usize))
    });
    SEEN_REQUESTS.store(info.checkpoint_requests, Ordering::Relaxed);
}

/// The checkpoint the monitor handed over to restore, unverified.
pub fn restore_blob() -> Option<&'static [u8]> {
    RESTORE.get().copied().flatten()
}

/// What the host did with a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Stored (durably, where it goes to disk or a peer).
    Stored,
    /// Written to a stream whose storage the guest cannot see (PVH monitors).
    Sent,
    /// Not stored (e.g. a delta the host has no base for): send a full one.
    Refused,
}

/// Hands a checkpoint (or delta) to the host; returns once the host has
/// stored it, with what it did.
pub fn save(blob: &[u8]) -> Saved {
    let req = CheckpointWrite {
        buf: blob.as_ptr() as u64,
        len: blob.len() as u64,
        status: CHECKPOINT_PENDING,
    };
    let addr = &req as *const CheckpointWrite as u64;
    crate::platform::hypercall(HC_CHECKPOINT, addr);
    // The host wrote the status behind the compiler's back: read it back
    // the way the host's writes are read.
    let status: u64 = mmio::read(addr + core::mem::offset_of!(CheckpointWrite, status) as u64);
    match status {
        CHECKPOINT_STORED => Saved::Stored,
        CHECKPOINT_SENT => Saved::Sent,
        CHECKPOINT_REFUSED => Saved::Refused,
        _ => Saved::Refused,
    }
}

/// The period of automatic checkpoints the monitor asked for on the command
/// line (`lc.checkpoint_every=MS`), which works on every monitor.
pub fn period_ns() -> Option<u64> {
    crate::cmdline::get()
        .param(abi::cmdline::CHECKPOINT_EVERY_KEY)
        .and_then(|ms| ms.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(|ms| ms * 1_000_000)
}

/// Waits until the host asks for a checkpoint (it bumps a counter in the
/// boot information; checked after every return from the host: `true`) or
/// until `deadline_ns` on the kernel clock (`false`), whichever comes first.
pub async fn requested_or(deadline_ns: Option<u64>) -> bool {
    poll_fn(|cx| {
        let now = boot_info().checkpoint_requests;
        if SEEN_REQUESTS.swap(now, Ordering::Relaxed) != now {
            return Poll::Ready(true);
        }
        if let Some(deadline) = deadline_ns {
            if crate::time::now_ns() >= deadline {
                return Poll::Ready(false);
            }
            crate::time::wake_at(deadline, cx.waker());
        }
        crate::task::wake_on_io(cx.waker());
        Poll::Pending
    })
    .await
}
