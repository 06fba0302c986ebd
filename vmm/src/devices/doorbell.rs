//! The hypercall doorbell: the MMIO page at `abi::layout::DOORBELL_ADDR`.
//!
//! An 8-byte write to `DOORBELL_ADDR + nr * 8` is hypercall `nr` with the
//! written value as its argument (see `abi::hypercall`). This module decodes
//! and serves them; guest memory is read only through bounds-checked
//! accessors, so a malformed request is logged (rate-limited: see
//! [`shim_util::limit::Warnings`]) and ignored (or ends the guest, for the calls
//! that never return), never a panic of the shim. The guest's checkpoints
//! are bounded per instance ([`crate::checkpoint::limit_for`]: by its memory, or `--max-checkpoint`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use abi::hypercall::{
    CheckpointWrite, ConsoleWrite, FaultReport, PanicReport, CHECKPOINT_REFUSED, CHECKPOINT_STORED,
    CONSOLE_WRITE_MAX, HC_CHECKPOINT, HC_CONSOLE_WRITE, HC_EXIT, HC_FAULT, HC_PANIC, HC_YIELD,
    PANIC_STR_MAX,
};
use abi::layout::{DOORBELL_ADDR, PAGE_SIZE};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use zerocopy::{FromBytes, IntoBytes};

use crate::outcome::GuestExit;
use crate::vstate::vm::GuestMemoryMmap;
use shim_util::guest_warn;
use shim_util::limit::Warnings;

/// What the run loop should do after a doorbell write.
#[derive(Debug)]
pub enum Action {
    /// Resume the guest.
    Continue,
    /// Wait for I/O or this long (`None`: until I/O), then resume.
    Yield(Option<Duration>),
    /// The guest is done.
    Stop(GuestExit),
}

/// The doorbell device, writing guest console output to `console`.
pub struct Doorbell<W: Write> {
    console: W,
    console_broken: bool,
    /// The chain of app checkpoints the guest hands over.
    chain: crate::checkpoint::Chain,
    /// Where they go: a `--checkpoint-to` directory (`DIR/latest.ckpt`),
    /// a daemon's `checkpoint NAME`, a standby peer.
    checkpoint_dir: Option<crate::checkpoint::DirSink>,
    checkpoint_latest: Option<Arc<crate::checkpoint::Latest>>,
    checkpoint_sinks: Vec<Box<dyn crate::checkpoint::Sink>>,
    /// The operator's bound on the chain (`--max-checkpoint`); `None`: by
    /// the guest's memory ([`crate::checkpoint::limit_for`]).
    checkpoint_max: Option<u64>,
    /// The rate limit of the warnings this guest triggers.
    warnings: Warnings,
}

impl<W: Write> Doorbell<W> {
    pub fn new(console: W) -> Self {
        Self {
            console,
            console_broken: false,
            chain: Default::default(),
            checkpoint_dir: None,
            checkpoint_latest: None,
            checkpoint_sinks: Vec::new(),
            checkpoint_max: None,
            warnings: Warnings::default(),
        }
    }

    /// Stores the guest's checkpoints as `dir/latest.ckpt` (durably, before
    /// the hypercall returns).
    pub fn set_checkpoint_dir(&mut self, dir: Option<PathBuf>) {
        self.checkpoint_dir = dir.map(crate::checkpoint::DirSink::new);
    }

    /// Also hands each checkpoint to `sink` (before the hypercall returns).
    pub fn add_checkpoint_sink(&mut self, sink: Box<dyn crate::checkpoint::Sink>) {
        self.checkpoint_sinks.push(sink);
    }

    /// Bounds the guest's checkpoint chain to `max` bytes (at most what a
    /// restore accepts) instead of by its memory.
    pub fn set_checkpoint_max(&mut self, max: Option<u64>) {
        self.checkpoint_max = max;
    }

    /// Also records each valid checkpoint in `latest`.
    pub fn set_checkpoint_latest(&mut self, latest: Option<Arc<crate::checkpoint::Latest>>) {
        self.checkpoint_latest = latest;
    }

    /// Whether `addr` lies in the doorbell page.
    pub fn contains(addr: u64) -> bool {
        (DOORBELL_ADDR..DOORBELL_ADDR + PAGE_SIZE).contains(&addr)
    }

    /// Serves a guest write of `data` at `addr` (inside the page).
    pub fn write(&mut self, mem: &GuestMemoryMmap, addr: u64, data: &[u8]) -> Action {
        let offset = addr - DOORBELL_ADDR;
        let Ok(bytes) = <[u8; 8]>::try_from(data) else {
            guest_warn!(
                self.warnings,
                bytes = data.len(),
                addr = format_args!("{addr:#x}"),
                "doorbell write ignored: hypercalls are 8-byte writes"
            );
            return Action::Continue;
        };
        if !offset.is_multiple_of(8) {
            guest_warn!(
                self.warnings,
                addr = format_args!("{addr:#x}"),
                "unaligned doorbell write ignored"
            );
            return Action::Continue;
        }
        let value = u64::from_le_bytes(bytes);
        self.hypercall(mem, offset / 8, value)
    }

    /// Serves hypercall `nr` with argument `value`.
    pub fn hypercall(&mut self, mem: &GuestMemoryMmap, nr: u64, value: u64) -> Action {
        match nr {
            HC_EXIT => Action::Stop(GuestExit::Exited((value & 0xff) as u8)),
            HC_CONSOLE_WRITE => {
                self.console_write(mem, value);
                Action::Continue
            }
            HC_YIELD => Action::Yield(match value {
                u64::MAX => None,
                ns => Some(Duration::from_nanos(ns)),
            }),
            HC_CHECKPOINT => {
                self.checkpoint(mem, value);
                Action::Continue
            }
            HC_PANIC => Action::Stop(panic_report(mem, value)),
            HC_FAULT => Action::Stop(match read_obj::<FaultReport>(mem, value) {
                Some(report) => GuestExit::Faulted(report),
                None => GuestExit::FaultUnreadable(value),
            }),
            _ => {
                guest_warn!(
                    self.warnings,
                    number = nr,
                    value = format_args!("{value:#x}"),
                    "unknown hypercall ignored"
                );
                Action::Continue
            }
        }
    }

    fn console_write(&mut self, mem: &GuestMemoryMmap, value: u64) {
        let Some(req) = read_obj::<ConsoleWrite>(mem, value) else {
            guest_warn!(
                self.warnings,
                request = format_args!("{value:#x}"),
                "console write: request is outside guest memory"
            );
            return;
        };
        if req.len > CONSOLE_WRITE_MAX {
            guest_warn!(
                self.warnings,
                bytes = req.len,
                limit = CONSOLE_WRITE_MAX,
                "console write ignored: over the limit"
            );
            return;
        }
        let Some(bytes) = read_bytes(mem, req.buf, req.len) else {
            guest_warn!(
                self.warnings,
                buf = format_args!("{:#x}", req.buf),
                bytes = req.len,
                "console write: buffer is outside guest memory"
            );
            return;
        };
        if self.console_broken {
            return;
        }
        if let Err(e) = self
            .console
            .write_all(&bytes)
            .and_then(|()| self.console.flush())
        {
            tracing::warn!(error = %e, "guest console output is lost from now on");
            self.console_broken = true;
        }
    }
}

impl<W: Write> Doorbell<W> {
    /// `HC_CHECKPOINT`: reads, validates and stores the guest's checkpoint
    /// or delta, and tells the guest whether it was stored.
    fn checkpoint(&mut self, mem: &GuestMemoryMmap, value: u64) {
        let Some(req) = read_obj::<CheckpointWrite>(mem, value) else {
            guest_warn!(
                self.warnings,
                request = format_args!("{value:#x}"),
                "checkpoint: request is outside guest memory"
            );
            return;
        };
        let status = match self.store_checkpoint(mem, &req) {
            Ok(()) => CHECKPOINT_STORED,
            Err(e) => {
                if let Some(latest) = &self.checkpoint_latest {
                    latest.note_refused();
                }
                guest_warn!(self.warnings, error = %e, "the guest's checkpoint is not stored");
                CHECKPOINT_REFUSED
            }
        };
        let at = value + std::mem::offset_of!(CheckpointWrite, status) as u64;
        if mem.write_obj(status, GuestAddress(at)).is_err() {
            guest_warn!(
                self.warnings,
                addr = format_args!("{at:#x}"),
                "checkpoint: cannot write the status"
            );
        }
    }

    fn store_checkpoint(
        &mut self,
        mem: &GuestMemoryMmap,
        req: &CheckpointWrite,
    ) -> Result<(), String> {
        let limit = crate::checkpoint::limit_for(
            mem.last_addr().raw_value().saturating_add(1),
            self.checkpoint_max,
        );
        if self.chain.limit() != limit {
            self.chain = crate::checkpoint::Chain::with_limit(limit);
        }
        if req.len > limit {
            return Err(format!(
                "{} bytes, more than this instance's checkpoint limit of {limit}",
                req.len
            ));
        }
        let blob = read_bytes(mem, req.buf, req.len).ok_or_else(|| {
            format!(
                "buffer {:#x}+{:#x} is outside guest memory",
                req.buf, req.len
            )
        })?;
        let sinks = self
            .checkpoint_dir
            .iter_mut()
            .map(|s| s as &mut dyn crate::checkpoint::Sink)
            .chain(self.checkpoint_sinks.iter_mut().map(|s| &mut **s));
        let (len, full) = crate::checkpoint::hand_over(&mut self.chain, &blob, sinks)?;
        if let Some(latest) = &self.checkpoint_latest {
            // Bounded by the chain's limit, like every sink.
            latest.put(&blob[..len], full);
        }
        Ok(())
    }
}

fn panic_report(mem: &GuestMemoryMmap, addr: u64) -> GuestExit {
    let Some(r) = read_obj::<PanicReport>(mem, addr) else {
        return GuestExit::Panicked {
            file: "<unknown>".into(),
            line: 0,
            column: 0,
            message: format!("(the panic report at {addr:#x} is outside guest memory)"),
        };
    };
    GuestExit::Panicked {
        file: read_str(mem, r.file, r.file_len),
        line: r.line,
        column: r.column,
        message: read_str(mem, r.msg, r.msg_len),
    }
}

/// A guest string, capped at `PANIC_STR_MAX` bytes, decoded lossily.
fn read_str(mem: &GuestMemoryMmap, addr: u64, len: u64) -> String {
    let capped = len.min(PANIC_STR_MAX);
    match read_bytes(mem, addr, capped) {
        Some(bytes) => {
            let mut s = String::from_utf8_lossy(&bytes).into_owned();
            if capped < len {
                s.push_str("...");
            }
            s
        }
        None => format!("<unreadable: {addr:#x}+{len:#x}>"),
    }
}

/// `len` bytes of guest RAM at `addr`, or `None` if any lies outside it.
fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Option<Vec<u8>> {
    let len = usize::try_from(len).ok()?;
    addr.checked_add(len as u64)?;
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).ok()?;
    Some(buf)
}

/// A plain-data struct from guest RAM at `addr`.
fn read_obj<T: FromBytes + IntoBytes>(mem: &GuestMemoryMmap, addr: u64) -> Option<T> {
    let mut value = T::new_zeroed();
    addr.checked_add(std::mem::size_of::<T>() as u64)?;
    mem.read_slice(value.as_mut_bytes(), GuestAddress(addr))
        .ok()?;
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vm::allocate;

    const RAM: u64 = 4 << 20;

    fn setup() -> (GuestMemoryMmap, Doorbell<Vec<u8>>) {
        (allocate(RAM).unwrap(), Doorbell::new(Vec::new()))
    }

    fn put<T: IntoBytes + zerocopy::Immutable>(mem: &GuestMemoryMmap, addr: u64, v: &T) {
        mem.write_slice(v.as_bytes(), GuestAddress(addr)).unwrap();
    }

    fn ring(d: &mut Doorbell<Vec<u8>>, mem: &GuestMemoryMmap, nr: u64, value: u64) -> Action {
        d.write(mem, DOORBELL_ADDR + nr * 8, &value.to_le_bytes())
    }

    #[test]
    fn exit_keeps_the_low_byte() {
        let (mem, mut d) = setup();
        assert!(matches!(
            ring(&mut d, &mem, HC_EXIT, 0x1_07),
            Action::Stop(GuestExit::Exited(7))
        ));
    }

    #[test]
    fn console_write_copies_the_buffer() {
        let (mem, mut d) = setup();
        mem.write_slice(b"hello\n", GuestAddress(0x20_0000))
            .unwrap();
        put(
            &mem,
            0x10_0000,
            &ConsoleWrite {
                buf: 0x20_0000,
                len: 6,
            },
        );
        assert!(matches!(
            ring(&mut d, &mem, HC_CONSOLE_WRITE, 0x10_0000),
            Action::Continue
        ));
        assert_eq!(d.console, b"hello\n");
    }

    #[test]
    fn malformed_console_writes_are_ignored() {
        let (mem, mut d) = setup();
        for req in [
            ConsoleWrite {
                buf: RAM - 2,
                len: 6,
            }, // runs off the end of RAM
            ConsoleWrite {
                buf: u64::MAX - 1,
                len: 6,
            }, // wraps
            ConsoleWrite {
                buf: 0x1000,
                len: CONSOLE_WRITE_MAX + 1,
            },
            ConsoleWrite {
                buf: 0,
                len: u64::MAX,
            },
        ] {
            put(&mem, 0x10_0000, &req);
            assert!(matches!(
                ring(&mut d, &mem, HC_CONSOLE_WRITE, 0x10_0000),
                Action::Continue
            ));
        }
        // The request block itself outside RAM.
        for addr in [RAM - 8, RAM, u64::MAX - 4] {
            assert!(matches!(
                ring(&mut d, &mem, HC_CONSOLE_WRITE, addr),
                Action::Continue
            ));
        }
        assert!(d.console.is_empty());
    }

    #[test]
    fn wrong_sizes_unaligned_and_unknown_calls_are_ignored() {
        let (mem, mut d) = setup();
        assert!(matches!(
            d.write(&mem, DOORBELL_ADDR, &[0u8; 4]),
            Action::Continue
        ));
        assert!(matches!(
            d.write(&mem, DOORBELL_ADDR + 4, &[0u8; 8]),
            Action::Continue
        ));
        assert!(matches!(ring(&mut d, &mem, 99, 0), Action::Continue));
        assert!(matches!(ring(&mut d, &mem, 511, 0), Action::Continue));
    }

    fn status(mem: &GuestMemoryMmap) -> u64 {
        mem.read_obj(GuestAddress(0x10_0000 + 16)).unwrap()
    }

    #[test]
    fn checkpoints_are_validated_and_stored() {
        let (mem, mut d) = setup();
        let dir = std::env::temp_dir().join(format!("doorbell-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        d.set_checkpoint_dir(Some(dir.clone()));
        let latest = Arc::new(crate::checkpoint::Latest::default());
        d.set_checkpoint_latest(Some(Arc::clone(&latest)));
        let blob = abi::checkpoint::encode("kv", 1, b"some state");
        mem.write_slice(&blob, GuestAddress(0x20_0000)).unwrap();
        // Garbage first: ignored.
        put(
            &mem,
            0x10_0000,
            &CheckpointWrite {
                buf: 0x20_0001,
                len: blob.len() as u64,
                status: 0,
            },
        );
        assert!(matches!(
            ring(&mut d, &mem, HC_CHECKPOINT, 0x10_0000),
            Action::Continue
        ));
        put(
            &mem,
            0x10_0000,
            &CheckpointWrite {
                buf: RAM - 4,
                len: 64,
                status: 0,
            },
        );
        assert!(matches!(
            ring(&mut d, &mem, HC_CHECKPOINT, 0x10_0000),
            Action::Continue
        ));
        assert!(!dir.join(crate::checkpoint::LATEST).exists());
        assert_eq!(latest.count(), 0);
        put(
            &mem,
            0x10_0000,
            &CheckpointWrite {
                buf: 0x20_0000,
                len: blob.len() as u64,
                status: 0,
            },
        );
        assert!(matches!(
            ring(&mut d, &mem, HC_CHECKPOINT, 0x10_0000),
            Action::Continue
        ));
        assert_eq!(status(&mem), CHECKPOINT_STORED);
        assert_eq!(
            std::fs::read(dir.join(crate::checkpoint::LATEST)).unwrap(),
            blob
        );
        assert_eq!(latest.count(), 1);
        assert_eq!(latest.wait_after(0, Duration::ZERO).as_deref(), Some(&blob));
        // A delta that continues it is appended; one that does not is refused.
        let id = abi::checkpoint::decode(&blob).unwrap().0.id;
        for (seq, want) in [(1, CHECKPOINT_STORED), (3, CHECKPOINT_REFUSED)] {
            let delta = abi::checkpoint::encode_delta("kv", 1, id, seq, b"changes");
            mem.write_slice(&delta, GuestAddress(0x30_0000)).unwrap();
            put(
                &mem,
                0x10_0000,
                &CheckpointWrite {
                    buf: 0x30_0000,
                    len: delta.len() as u64,
                    status: 0,
                },
            );
            ring(&mut d, &mem, HC_CHECKPOINT, 0x10_0000);
            assert_eq!(status(&mem), want, "delta {seq}");
        }
        let file = std::fs::read(dir.join(crate::checkpoint::LATEST)).unwrap();
        assert_eq!(
            abi::checkpoint::latest_chain(&file).unwrap().deltas.len(),
            1
        );
        assert_eq!(latest.count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn yield_durations() {
        let (mem, mut d) = setup();
        assert!(matches!(
            ring(&mut d, &mem, HC_YIELD, 1_500_000),
            Action::Yield(Some(t)) if t == Duration::from_micros(1500)
        ));
        assert!(matches!(
            ring(&mut d, &mem, HC_YIELD, u64::MAX),
            Action::Yield(None)
        ));
    }

    #[test]
    fn panic_reports() {
        let (mem, mut d) = setup();
        mem.write_slice(b"src/main.rs", GuestAddress(0x20_0000))
            .unwrap();
        mem.write_slice(b"bad \xff input", GuestAddress(0x20_1000))
            .unwrap();
        put(
            &mem,
            0x10_0000,
            &PanicReport {
                msg: 0x20_1000,
                msg_len: 11,
                file: 0x20_0000,
                file_len: 11,
                line: 12,
                column: 5,
            },
        );
        let Action::Stop(exit) = ring(&mut d, &mem, HC_PANIC, 0x10_0000) else {
            panic!("a panic stops the guest");
        };
        assert_eq!(exit.status(), abi::exit::EXIT_PANIC);
        assert_eq!(
            exit.to_string(),
            "guest panicked at src/main.rs:12:5: bad \u{fffd} input"
        );
    }

    #[test]
    fn panic_strings_are_capped_and_bad_ones_survive() {
        let (mem, mut d) = setup();
        put(
            &mem,
            0x10_0000,
            &PanicReport {
                msg: 0x20_0000,
                msg_len: u64::MAX,
                file: RAM - 1,
                file_len: 2,
                line: 1,
                column: 1,
            },
        );
        let Action::Stop(exit) = ring(&mut d, &mem, HC_PANIC, 0x10_0000) else {
            panic!("a panic stops the guest");
        };
        let GuestExit::Panicked { file, message, .. } = &exit else {
            panic!("{exit:?}");
        };
        assert!(file.starts_with("<unreadable"), "{file}");
        assert_eq!(message.len(), PANIC_STR_MAX as usize + 3);
        // A report outside RAM still stops the guest as a panic.
        let Action::Stop(exit) = ring(&mut d, &mem, HC_PANIC, RAM) else {
            panic!("a panic stops the guest");
        };
        assert_eq!(exit.status(), abi::exit::EXIT_PANIC);
    }

    #[test]
    fn fault_reports() {
        let (mem, mut d) = setup();
        put(
            &mem,
            0x10_0000,
            &FaultReport {
                vector: 13,
                error_code: 0,
                rip: 0x10_1234,
                cs: 0x23,
                rflags: 0x3002,
                rsp: 0x7_ff00,
                ss: 0x1b,
                cr2: 0,
            },
        );
        let Action::Stop(exit) = ring(&mut d, &mem, HC_FAULT, 0x10_0000) else {
            panic!("a fault stops the guest");
        };
        assert_eq!(exit.status(), abi::exit::EXIT_FAULT);
        assert_eq!(
            exit.to_string(),
            "guest fault: general protection fault (#GP) (vector 13, error code 0x0) \
             at rip 0x101234 (cs 0x23, rsp 0x7ff00)"
        );
        let Action::Stop(exit) = ring(&mut d, &mem, HC_FAULT, u64::MAX) else {
            panic!("a fault stops the guest");
        };
        assert_eq!(exit.status(), abi::exit::EXIT_FAULT);
    }
}
