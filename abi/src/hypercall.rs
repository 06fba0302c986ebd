//! Hypercalls: guest -> host requests.
//!
//! On our shim a hypercall is one 8-byte MMIO write to the doorbell page at
//! `DOORBELL_ADDR + nr * 8`; the written value is either the argument itself
//! or the guest-physical address of an argument block below. One write = one
//! VM exit (~40-50 µs on PVM hosts), so every call passes a whole buffer.
//!
//! Under PVH monitors the guest issues the same numbers by executing a `ud2`
//! at one known address (`rax` = number, `rdi` = value): its ring-0 #UD
//! handler recognises the address, serves the call with port I/O (16550
//! serial, `isa-debug-exit`) and resumes after the `ud2`. A CPU exception is
//! the one ring 3 -> ring 0 path that works on every host: PVM hosts (nested
//! KVM without VT-x) turn `int n` into #UD and mishandle `syscall`, and they
//! fault on port I/O from ring 3 even with IOPL 3.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `exit(code)`: value = exit status (0..=255). Never returns.
pub const HC_EXIT: u64 = 0;
/// Write to the console: value = address of a [`ConsoleWrite`].
pub const HC_CONSOLE_WRITE: u64 = 1;
/// Block until the given number of nanoseconds passed or I/O is ready:
/// value = timeout in ns (`u64::MAX` = until I/O). May return early.
pub const HC_YIELD: u64 = 2;
/// Report a panic and stop: value = address of a [`PanicReport`]. Never returns.
pub const HC_PANIC: u64 = 3;
/// Report a CPU exception and stop: value = address of a [`FaultReport`].
/// Never returns.
pub const HC_FAULT: u64 = 4;
/// Store an app checkpoint or delta (abi::checkpoint): value = address of a
/// [`CheckpointWrite`] naming the blob. Returns once the host has stored it
/// (so an app may acknowledge writes only after their checkpoint is safe),
/// with the outcome in its `status`.
pub const HC_CHECKPOINT: u64 = 5;
/// Number of defined hypercalls.
pub const HC_COUNT: u64 = 6;

/// Address of hypercall `nr` on a doorbell page at `doorbell`.
pub const fn doorbell_slot(doorbell: u64, nr: u64) -> u64 {
    doorbell + nr * 8
}

/// Argument of [`HC_CONSOLE_WRITE`].
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ConsoleWrite {
    pub buf: u64,
    pub len: u64,
}

/// Argument of [`HC_CHECKPOINT`]; the host writes `status` before it returns.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CheckpointWrite {
    pub buf: u64,
    pub len: u64,
    /// [`CHECKPOINT_PENDING`] from the guest; one of the others from the host.
    pub status: u64,
}

/// [`CheckpointWrite::status`] as the guest sets it.
pub const CHECKPOINT_PENDING: u64 = 0;
/// Stored everywhere it goes (durably, where it goes to disk or a peer).
pub const CHECKPOINT_STORED: u64 = 1;
/// Not stored: invalid, a delta that does not continue the host's chain
/// (e.g. after a restore), or storage failed. Send a full checkpoint.
pub const CHECKPOINT_REFUSED: u64 = 2;

/// Argument of [`HC_PANIC`]. Strings are UTF-8, not NUL-terminated.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PanicReport {
    pub msg: u64,
    pub msg_len: u64,
    pub file: u64,
    pub file_len: u64,
    pub line: u32,
    pub column: u32,
}

/// Argument of [`HC_FAULT`]: the CPU exception and the interrupted context.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FaultReport {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
    /// The faulting address, for page faults.
    pub cr2: u64,
}

/// Longest console write the host accepts in one call; longer writes are
/// split by the guest.
pub const CONSOLE_WRITE_MAX: u64 = 64 * 1024;
/// Longest panic message or file name the host reads.
pub const PANIC_STR_MAX: u64 = 4096;

/// Human name of an x86 exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "non-maskable interrupt",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack-segment fault (#SS)",
        13 => "general protection fault (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating-point exception (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating-point exception (#XM)",
        _ => "CPU exception",
    }
}
