//! Port I/O for PVH platforms, used from ring 0 only (port I/O from ring 3
//! faults on PVM hosts): the 16550 UART at 0x3f8, `isa-debug-exit` at 0xf4,
//! the i8042's reset line, and the PIT for calibrating the TSC when there
//! is no kvmclock.

use core::arch::asm;

/// The console UART.
pub const COM1: u16 = 0x3f8;
const LSR_THR_EMPTY: u8 = 0x20;
/// `isa-debug-exit,iobase=0xf4`: QEMU exits with status `(value << 1) | 1`.
const DEBUG_EXIT: u16 = 0xf4;
/// The i8042 command port; [`I8042_RESET`] pulses the CPU reset line
/// (Firecracker exits on it).
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

fn outb(port: u16, value: u8) {
    // SAFETY: ring 0 on a PVH platform; the ports are the legacy devices named above.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

fn outl(port: u16, value: u32) {
    // SAFETY: as `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as `outb`.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes bytes to the serial console.
pub fn serial_write(bytes: &[u8]) {
    for &b in bytes {
        let mut spins = 0u32;
        while inb(COM1 + 5) & LSR_THR_EMPTY == 0 && spins < 100_000 {
            spins += 1;
        }
        outb(COM1, b);
    }
}

/// Asks the monitor to exit with `code`: through `isa-debug-exit` (QEMU);
/// where there is none (Firecracker), the last serial line carries the
/// status (abi::exit::SERIAL_EXIT_PREFIX) and the i8042 resets the machine.
pub fn debug_exit(code: u8) -> ! {
    outl(DEBUG_EXIT, code as u32);
    let mut line = [0u8; abi::exit::SERIAL_EXIT_PREFIX.len() + 4];
    line[..abi::exit::SERIAL_EXIT_PREFIX.len()]
        .copy_from_slice(abi::exit::SERIAL_EXIT_PREFIX.as_bytes());
    let mut len = abi::exit::SERIAL_EXIT_PREFIX.len();
    for digit in [code / 100, code / 10 % 10, code % 10]
        .into_iter()
        .skip_while(|&d| d == 0)
    {
        line[len] = b'0' + digit;
        len += 1;
    }
    if code == 0 {
        line[len] = b'0';
        len += 1;
    }
    line[len] = b'\n';
    serial_write(&line[..len + 1]);
    outb(I8042_COMMAND, I8042_RESET);
    loop {
        // SAFETY: ring 0; with interrupts off this stops the vCPU for good.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Measures the TSC frequency in kHz over 10 ms of PIT channel 2.
/// Returns `None` if there is no PIT.
pub fn calibrate_tsc_khz() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = 10;
    let ticks = (PIT_HZ * MS / 1000) as u16;
    // Gate channel 2 on, speaker off; mode 0, lobyte/hibyte, binary.
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, ticks as u8);
    outb(0x42, (ticks >> 8) as u8);
    if inb(0x61) & 0x20 != 0 {
        return None; // output already high: no PIT behind the port
    }
    let start = super::cpu::rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 {
        spins += 1;
        if spins > 100_000_000 {
            return None;
        }
    }
    Some((super::cpu::rdtsc() - start) / MS)
}
