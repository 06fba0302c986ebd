//! App checkpoints in and out (abi::checkpoint): the blob the monitor gave
//! the guest to restore, handing a new checkpoint to the host, and noticing
//! the host's requests for one.
//!
//! On our shim both go through guest RAM and `HC_CHECKPOINT`. On PVH
//! monitors (QEMU) they go through the *checkpoint port*, a virtio console
//! (virtio-drivers, found by `crate::virtio`): the chain to restore is read
//! from it into the heap before the app's main runs, and every checkpoint
//! is written to it and acknowledged by the host once stored.

use abi::boot::{BootInfo, Platform};
use abi::hypercall::{
    CheckpointWrite, CHECKPOINT_PENDING, CHECKPOINT_REFUSED, CHECKPOINT_STORED, HC_CHECKPOINT,
};
use abi::layout::BOOT_INFO_ADDR;
use alloc::vec::Vec;
use core::future::poll_fn;
use core::sync::atomic::{AtomicU64, Ordering};
use core::task::Poll;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::DeviceType;

use crate::arch::x86_64::mmio;
use crate::virtio::{GuestTransport, UnikernelHal};

static RESTORE: spin::Once<Option<&'static [u8]>> = spin::Once::new();
static SEEN_REQUESTS: AtomicU64 = AtomicU64::new(0);
/// The checkpoint port, on PVH monitors that have one.
static PORT: spin::Mutex<Option<Port>> = spin::Mutex::new(None);
/// Bytes per write to the checkpoint port.
const PORT_CHUNK: usize = 64 << 10;

type Port = VirtIOConsole<UnikernelHal, GuestTransport>;

fn boot_info() -> BootInfo {
    mmio::read(BOOT_INFO_ADDR)
}

/// The `[start, end)` of the restore blob, if it lies in RAM after the image.
pub(crate) fn restore_range(info: &BootInfo, image_end: u64) -> Option<(u64, u64)> {
    let end = info.restore_addr.checked_add(info.restore_len)?;
    (info.restore_len > 0 && info.restore_addr >= image_end && end <= info.mem_size)
        .then_some((info.restore_addr, end))
}

/// Finds the checkpoint to restore: in RAM on our shim, read from the
/// checkpoint port on PVH monitors (needs the heap and the command line).
pub(crate) fn init(info: &BootInfo, image_end: u64) {
    RESTORE.call_once(|| match crate::platform::get() {
        Platform::Shim => restore_range(info, image_end)
            .map(|(start, end)| mmio::slice(start, (end - start) as usize)),
        Platform::Pvh => open_port(),
    });
    SEEN_REQUESTS.store(info.checkpoint_requests, Ordering::Relaxed);
}

/// Opens the checkpoint port, if the monitor gave one, and reads the chain
/// to restore from it.
fn open_port() -> Option<&'static [u8]> {
    let crate::virtio::Probed {
        transport, check, ..
    } = match crate::virtio::probe(DeviceType::Console) {
        Ok(Some(t)) => t,
        Ok(None) => return None,
        Err(e) => {
            log::warn!("checkpoint port: bad virtio_mmio.device entry {:?}", e.0);
            return None;
        }
    };
    let port = Port::new(transport).map_err(|e| alloc::format!("{e}"));
    let mut port = match port.and_then(|p| {
        check
            .result()
            .map(|()| p)
            .map_err(|e| alloc::format!("{e}"))
    }) {
        Ok(p) => p,
        Err(e) => {
            // The host may be waiting to hand over a checkpoint to restore.
            log::error!("checkpoint port: {e}");
            crate::exit(abi::exit::EXIT_FAILURE.into())
        }
    };
    let start = crate::time::now_ns();
    let restore = read_restore(&mut port);
    if let Ok(Some(blob)) = &restore {
        let us = (crate::time::now_ns() - start) / 1000;
        log::debug!(
            "checkpoint port: read {} bytes to restore in {us} µs",
            blob.len()
        );
    }
    *PORT.lock() = Some(port);
    match restore {
        Ok(None) => None,
        Ok(Some(blob)) => Some(blob.leak()),
        Err(e) => {
            // Going on without it would start the app empty: stop instead.
            log::error!("checkpoint port: cannot read the checkpoint to restore: {e}");
            crate::exit(abi::exit::EXIT_FAILURE.into())
        }
    }
}

/// The host's first message: the length of the chain to restore (0: none)
/// and its bytes.
fn read_restore(port: &mut Port) -> Result<Option<Vec<u8>>, virtio_drivers::Error> {
    let mut len = [0u8; 8];
    read_exact(port, &mut len)?;
    let len = u64::from_le_bytes(len);
    if len == 0 {
        return Ok(None);
    }
    if len > abi::checkpoint::MAX_CHECKPOINT {
        log::error!("checkpoint port: a {len}-byte checkpoint is over the limit");
        return Err(virtio_drivers::Error::InvalidParam);
    }
    let mut blob = Vec::new();
    if blob.try_reserve_exact(len as usize).is_err() {
        log::error!("checkpoint port: a {len}-byte checkpoint does not fit in guest memory");
        return Err(virtio_drivers::Error::InvalidParam);
    }
    blob.resize(len as usize, 0);
    read_exact(port, &mut blob)?;
    Ok(Some(blob))
}

/// Fills `buf` from the port, polling (no interrupts here).
fn read_exact(port: &mut Port, buf: &mut [u8]) -> Result<(), virtio_drivers::Error> {
    for b in buf {
        *b = loop {
            match port.recv(true)? {
                Some(byte) => break byte,
                None => core::hint::spin_loop(),
            }
        };
    }
    Ok(())
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
    /// Not stored (e.g. a delta the host has no base for): send a full one.
    Refused,
}

/// Hands a checkpoint (or delta) to the host; returns once the host has
/// stored it, with what it did.
pub fn save(blob: &[u8]) -> Saved {
    match crate::platform::get() {
        Platform::Shim => save_by_hypercall(blob),
        Platform::Pvh => save_to_port(blob),
    }
}

fn save_by_hypercall(blob: &[u8]) -> Saved {
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
        CHECKPOINT_REFUSED => Saved::Refused,
        _ => Saved::Refused,
    }
}

/// Writes `blob` to the checkpoint port and waits for the host's answer.
fn save_to_port(blob: &[u8]) -> Saved {
    let mut port = PORT.lock();
    let Some(port) = port.as_mut() else {
        log::warn!("no checkpoint port: this monitor stores no checkpoints");
        return Saved::Refused;
    };
    let mut answer = [0u8];
    let sent = blob
        .chunks(PORT_CHUNK)
        .try_for_each(|chunk| port.send_bytes(chunk))
        .and_then(|()| read_exact(port, &mut answer));
    match (sent, answer[0]) {
        (Ok(()), abi::checkpoint::PORT_STORED) => Saved::Stored,
        (Ok(()), _) => Saved::Refused,
        (Err(e), _) => {
            log::warn!("checkpoint port: {e}");
            Saved::Refused
        }
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
