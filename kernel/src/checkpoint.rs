//! App checkpoints in and out (abi::checkpoint): the blob the monitor gave
//! the guest to restore, handing a new checkpoint to the host, and noticing
//! the host's requests for one.
//!
//! On our shim both go through guest RAM and `HC_CHECKPOINT`. On PVH
//! monitors they go through the *checkpoint port*: a virtio console under
//! QEMU, a virtio-vsock connection to the host under Firecracker (both
//! virtio-drivers, found by `crate::virtio`). The chain to restore is read
//! from it into the heap before the app's main runs, and every checkpoint
//! is written to it and acknowledged by the host once stored.

use abi::boot::{BootInfo, Platform};
use abi::checkpoint::{PORT_CREDIT, PORT_WINDOW};
use abi::hypercall::{
    CheckpointWrite, CHECKPOINT_PENDING, CHECKPOINT_REFUSED, CHECKPOINT_STORED, HC_CHECKPOINT,
};
use abi::layout::BOOT_INFO_ADDR;
use alloc::vec::Vec;
use core::future::poll_fn;
use core::sync::atomic::{AtomicU64, Ordering};
use core::task::Poll;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::socket::{
    SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType, VMADDR_CID_HOST,
};
use virtio_drivers::transport::DeviceType;

use crate::arch::x86_64::mmio;
use crate::virtio::{GuestTransport, UnikernelHal};

static RESTORE: spin::Once<Option<&'static [u8]>> = spin::Once::new();
static SEEN_REQUESTS: AtomicU64 = AtomicU64::new(0);
/// The checkpoint port, on PVH monitors that have one.
static PORT: spin::Mutex<Option<Port>> = spin::Mutex::new(None);
/// Bytes per vsock packet (Firecracker takes up to 64 KiB).
const VSOCK_CHUNK: usize = 32 << 10;
/// Receive buffer of the vsock connection (the host's credit).
const VSOCK_BUFFER: u32 = 256 << 10;
/// The guest's end of the vsock connection.
const VSOCK_LOCAL_PORT: u32 = 1024;
/// How long the host may take to accept the vsock connection.
const VSOCK_CONNECT_NS: u64 = 10_000_000_000;

type Vsock = VsockConnectionManager<UnikernelHal, GuestTransport>;

/// The checkpoint port: a byte stream to the host.
enum Port {
    Console(alloc::boxed::Box<VirtIOConsole<UnikernelHal, GuestTransport>>),
    Vsock(alloc::boxed::Box<Vsock>),
}

const HOST: VsockAddr = VsockAddr {
    cid: VMADDR_CID_HOST,
    port: abi::checkpoint::VSOCK_PORT,
};

impl Port {
    /// Sends one blob and returns the host's answer to it (under QEMU one
    /// window at a time, waiting for the host's credit after each but the
    /// last: see `abi::checkpoint`).
    fn send_blob(&mut self, blob: &[u8]) -> Result<u8, virtio_drivers::Error> {
        match self {
            Port::Console(_) => {
                let windows = blob.len().div_ceil(PORT_WINDOW);
                for (i, window) in blob.chunks(PORT_WINDOW).enumerate() {
                    if let Port::Console(c) = self {
                        c.send_bytes(window)?;
                    }
                    if i + 1 < windows {
                        let credit = self.read_byte()?;
                        if credit != PORT_CREDIT {
                            return Ok(credit); // refused before the end
                        }
                    }
                }
            }
            Port::Vsock(v) => {
                for chunk in blob.chunks(VSOCK_CHUNK) {
                    loop {
                        match v.send(HOST, VSOCK_LOCAL_PORT, chunk) {
                            Ok(()) => break,
                            // Wait for the host's credit update.
                            Err(virtio_drivers::Error::SocketDeviceError(
                                SocketError::InsufficientBufferSpaceInPeer,
                            )) => vsock_event(v)?,
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
        self.read_byte()
    }

    fn read_byte(&mut self) -> Result<u8, virtio_drivers::Error> {
        let mut byte = [0u8];
        self.read_exact(&mut byte)?;
        Ok(byte[0])
    }

    /// Fills `buf`, polling.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), virtio_drivers::Error> {
        match self {
            Port::Console(c) => {
                for b in buf {
                    *b = loop {
                        match c.recv(true)? {
                            Some(byte) => break byte,
                            None => core::hint::spin_loop(),
                        }
                    };
                }
            }
            Port::Vsock(v) => {
                let mut filled = 0;
                while filled < buf.len() {
                    let n = v.recv(HOST, VSOCK_LOCAL_PORT, &mut buf[filled..])?;
                    if n > 0 {
                        filled += n;
                        v.update_credit(HOST, VSOCK_LOCAL_PORT)?;
                    } else {
                        vsock_event(v)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Handles the next vsock event (spinning until there is one); a closed
/// connection is an error.
fn vsock_event(v: &mut Vsock) -> Result<(), virtio_drivers::Error> {
    loop {
        match v.poll()? {
            Some(e) if matches!(e.event_type, VsockEventType::Disconnected { .. }) => {
                return Err(SocketError::NotConnected.into())
            }
            Some(_) => return Ok(()),
            None => core::hint::spin_loop(),
        }
    }
}

/// Opens the vsock connection to the host's checkpoint port.
fn connect_vsock(mut v: Vsock) -> Result<Vsock, virtio_drivers::Error> {
    v.connect(HOST, VSOCK_LOCAL_PORT)?;
    let give_up = crate::time::now_ns().saturating_add(VSOCK_CONNECT_NS);
    loop {
        match v.poll()?.map(|e| e.event_type) {
            Some(VsockEventType::Connected) => return Ok(v),
            Some(VsockEventType::Disconnected { .. }) => {
                return Err(SocketError::NotConnected.into())
            }
            _ if crate::time::now_ns() > give_up => return Err(SocketError::NotConnected.into()),
            _ => core::hint::spin_loop(),
        }
    }
}

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
    let port = match open_device() {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            // The host may be waiting to hand over a checkpoint to restore.
            log::error!("checkpoint port: {e}");
            crate::exit(abi::exit::EXIT_FAILURE.into())
        }
    };
    let mut port = port;
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

/// The checkpoint port's device: a virtio console (QEMU), else a vsock
/// device connected to the host (Firecracker), else none.
fn open_device() -> Result<Option<Port>, alloc::string::String> {
    let text = |e: virtio_drivers::Error| alloc::format!("{e}");
    let bad = |e: crate::virtio::BadDeviceSpec| alloc::format!("bad virtio_mmio.device {:?}", e.0);
    if let Some(p) = crate::virtio::probe(DeviceType::Console).map_err(bad)? {
        let console = VirtIOConsole::new(p.transport).map_err(text)?;
        p.check.result().map_err(|e| alloc::format!("{e}"))?;
        return Ok(Some(Port::Console(alloc::boxed::Box::new(console))));
    }
    if let Some(p) = crate::virtio::probe(DeviceType::Socket).map_err(bad)? {
        let socket = VirtIOSocket::new(p.transport).map_err(text)?;
        p.check.result().map_err(|e| alloc::format!("{e}"))?;
        let v = connect_vsock(Vsock::new_with_capacity(socket, VSOCK_BUFFER)).map_err(text)?;
        return Ok(Some(Port::Vsock(alloc::boxed::Box::new(v))));
    }
    Ok(None)
}

/// The host's first message: the length of the chain to restore (0: none)
/// and its bytes.
fn read_restore(port: &mut Port) -> Result<Option<Vec<u8>>, virtio_drivers::Error> {
    let mut len = [0u8; 8];
    port.read_exact(&mut len)?;
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
    port.read_exact(&mut blob)?;
    Ok(Some(blob))
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
    match port.send_blob(blob) {
        Ok(abi::checkpoint::PORT_STORED) => Saved::Stored,
        Ok(_) => Saved::Refused,
        Err(e) => {
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
