//! Console output of secondary guests (`--also`): whole lines, each with
//! the guest's prefix, so that several guests can share one stdout.

use std::io::{self, Write};

/// Prefixes every line written through it; a partial line waits for its
/// end (or for the console to be dropped).
pub struct PrefixedConsole<W: Write> {
    prefix: Vec<u8>,
    partial: Vec<u8>,
    out: W,
}

impl<W: Write> PrefixedConsole<W> {
    pub fn new(prefix: String, out: W) -> Self {
        Self {
            prefix: prefix.into_bytes(),
            partial: Vec::new(),
            out,
        }
    }

    fn emit(&mut self, line: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(self.prefix.len() + self.partial.len() + line.len());
        buf.extend_from_slice(&self.prefix);
        buf.append(&mut self.partial);
        buf.extend_from_slice(line);
        // One write per line: lines of different guests do not interleave.
        self.out.write_all(&buf)
    }
}

impl<W: Write> Write for PrefixedConsole<W> {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let len = buf.len();
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let (line, rest) = buf.split_at(end + 1);
            self.emit(line)?;
            buf = rest;
        }
        self.partial.extend_from_slice(buf);
        Ok(len)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl<W: Write> Drop for PrefixedConsole<W> {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let _ = self.emit(b"\n");
            let _ = self.out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_get_the_prefix_partial_lines_wait() {
        let mut out = Vec::new();
        {
            let mut c = PrefixedConsole::new("[b] ".into(), &mut out);
            c.write_all(b"one\ntw").unwrap();
            c.write_all(b"o\n\nthree").unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[b] one\n[b] two\n[b] \n[b] three\n"
        );
    }
}
