//! The panic handler: message and location go to the host in one
//! `HC_PANIC` hypercall, which stops the guest with `EXIT_PANIC`.

use abi::hypercall::{PanicReport, HC_PANIC};
use core::fmt::Write;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

static PANICKING: AtomicBool = AtomicBool::new(false);

/// Formats into a fixed buffer (the heap may be what failed), truncating.
struct Truncating {
    buf: [u8; 1024],
    len: usize,
}

impl Write for Truncating {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        crate::exit(abi::exit::EXIT_PANIC as i32); // panicked while panicking
    }
    let mut msg = Truncating {
        buf: [0; 1024],
        len: 0,
    };
    let _ = write!(msg, "{}", info.message());
    let (file, line, column) = info
        .location()
        .map(|l| (l.file(), l.line(), l.column()))
        .unwrap_or(("<unknown>", 0, 0));
    let report = PanicReport {
        msg: msg.buf.as_ptr() as u64,
        msg_len: msg.len as u64,
        file: file.as_ptr() as u64,
        file_len: file.len() as u64,
        line,
        column,
    };
    crate::platform::hypercall(HC_PANIC, &report as *const PanicReport as u64);
    crate::exit(abi::exit::EXIT_PANIC as i32)
}
