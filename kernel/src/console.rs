//! The console: whole buffers to the host in one hypercall each (one VM
//! exit per write, never per byte), and the `log` facade on top of it.

use abi::hypercall::{ConsoleWrite, CONSOLE_WRITE_MAX, HC_CONSOLE_WRITE};
use core::fmt::{self, Write};

use crate::platform::hypercall;

/// Writes `bytes` to the console.
pub fn write(bytes: &[u8]) {
    for chunk in bytes.chunks(CONSOLE_WRITE_MAX as usize) {
        let req = ConsoleWrite {
            buf: chunk.as_ptr() as u64,
            len: chunk.len() as u64,
        };
        hypercall(HC_CONSOLE_WRITE, &req as *const ConsoleWrite as u64);
    }
}

/// A stack buffer that flushes to the console when full and when dropped,
/// so one `println!` costs one hypercall.
struct BufWriter {
    buf: [u8; 1024],
    len: usize,
}

impl BufWriter {
    const fn new() -> Self {
        Self {
            buf: [0; 1024],
            len: 0,
        }
    }

    fn flush(&mut self) {
        if self.len > 0 {
            write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Write for BufWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.as_bytes().chunks(self.buf.len()) {
            if self.len + chunk.len() > self.buf.len() {
                self.flush();
            }
            self.buf[self.len..self.len + chunk.len()].copy_from_slice(chunk);
            self.len += chunk.len();
        }
        Ok(())
    }
}

impl Drop for BufWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Formats `args` to the console (the engine of libcloud's `print!`).
pub fn print(args: fmt::Arguments) {
    let _ = BufWriter::new().write_fmt(args);
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let t = crate::time::now_ns();
            print(format_args!(
                "[{:>5}.{:06}] {:<5} {}: {}\n",
                t / 1_000_000_000,
                t / 1000 % 1_000_000,
                record.level(),
                record.target(),
                record.args()
            ));
        }
    }

    fn flush(&self) {}
}

/// Installs the console logger at `level` (from the `RUST_LOG` env, default `warn`).
pub(crate) fn init_logger(level: Option<&str>) {
    let filter = level
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Warn);
    let _ = log::set_logger(&Logger);
    log::set_max_level(filter);
}
