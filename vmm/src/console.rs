//! Console output of guests that share one stdout (`--also` guests, the
//! daemon's instances): whole lines, each with the guest's prefix, so that
//! several guests do not interleave; and bounded, so that no guest can grow
//! the host's memory or its log without limit: a line longer than
//! [`MAX_LINE`] is written in pieces marked [`CONTINUED`], and lines past a
//! byte rate ([`RATE`], after a [`BURST`]) are dropped and counted, the
//! count written once output is allowed again.

use std::io::{self, Write};

use shim_util::limit::TokenBucket;

/// The longest piece of a line held back waiting for its newline.
pub const MAX_LINE: usize = 4096;
/// Ends a piece of a line longer than [`MAX_LINE`] (the line goes on).
pub const CONTINUED: &[u8] = b" [continued]\n";
/// Console bytes per second a guest may write to the shared stdout...
pub const RATE: u64 = 32 * 1024;
/// ... after a burst of this many.
pub const BURST: u64 = 128 * 1024;
/// What each line costs on top of its bytes (so that a flood of short lines
/// is bounded in lines too: at most `RATE / LINE_COST` a second).
pub const LINE_COST: u64 = 128;

/// What a [`PrefixedConsole`] left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Lines over the rate limit, not written.
    pub lines: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Lines longer than [`MAX_LINE`], written in pieces.
    pub split: u64,
}

/// Prefixes every line written through it; a partial line waits for its
/// end (or for the console to be dropped), up to [`MAX_LINE`] bytes.
pub struct PrefixedConsole<W: Write> {
    prefix: Vec<u8>,
    partial: Vec<u8>,
    /// The line being written was split already.
    splitting: bool,
    bucket: TokenBucket,
    dropped: Dropped,
    /// Dropped lines not reported yet.
    unreported: u64,
    out: W,
}

impl<W: Write> PrefixedConsole<W> {
    pub fn new(prefix: String, out: W) -> Self {
        Self {
            prefix: prefix.into_bytes(),
            partial: Vec::new(),
            splitting: false,
            bucket: TokenBucket::new(RATE, BURST),
            dropped: Dropped::default(),
            unreported: 0,
            out,
        }
    }

    /// What was left out so far.
    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    /// Writes `partial + piece` as one prefixed line ending in `end`, if
    /// the rate allows.
    fn emit(&mut self, piece: &[u8], end: &[u8]) -> io::Result<()> {
        let len = self.partial.len() + piece.len();
        if !self.bucket.take(len as u64 + LINE_COST) {
            self.partial.clear();
            self.dropped.lines += 1;
            self.dropped.bytes += len as u64;
            self.unreported += 1;
            return Ok(());
        }
        let mut buf = Vec::with_capacity(2 * self.prefix.len() + len + end.len() + 64);
        if self.unreported > 0 {
            buf.extend_from_slice(&self.prefix);
            buf.extend_from_slice(
                format!(
                    "[{} lines of console output dropped: more than {RATE} bytes/s]\n",
                    std::mem::take(&mut self.unreported)
                )
                .as_bytes(),
            );
        }
        buf.extend_from_slice(&self.prefix);
        buf.append(&mut self.partial);
        buf.extend_from_slice(piece);
        buf.extend_from_slice(end);
        // One write per line: lines of different guests do not interleave.
        self.out.write_all(&buf)
    }
}

impl<W: Write> Write for PrefixedConsole<W> {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let len = buf.len();
        while !buf.is_empty() {
            let room = MAX_LINE - self.partial.len();
            match buf.iter().take(room).position(|&b| b == b'\n') {
                Some(end) => {
                    let (line, rest) = buf.split_at(end + 1);
                    self.emit(line, b"")?;
                    self.splitting = false;
                    buf = rest;
                }
                None if buf.len() < room => {
                    self.partial.extend_from_slice(buf);
                    break;
                }
                None => {
                    let (piece, rest) = buf.split_at(room);
                    if !self.splitting {
                        self.dropped.split += 1;
                        self.splitting = true;
                    }
                    self.emit(piece, CONTINUED)?;
                    buf = rest;
                }
            }
        }
        Ok(len)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl<W: Write> Drop for PrefixedConsole<W> {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let _ = self.emit(b"", b"\n");
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

    #[test]
    fn a_line_without_end_is_written_in_bounded_pieces() {
        let mut out = Vec::new();
        let dropped = {
            let mut c = PrefixedConsole::new("[b] ".into(), &mut out);
            for _ in 0..5 {
                c.write_all(&[b'x'; 1000]).unwrap();
            }
            assert!(c.partial.len() < MAX_LINE, "held back: {}", c.partial.len());
            c.write_all(b"y\nnext\n").unwrap();
            c.dropped()
        };
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(
            lines[0],
            format!("[b] {} [continued]", "x".repeat(MAX_LINE))
        );
        assert_eq!(lines[1], format!("[b] {}y", "x".repeat(5000 - MAX_LINE)));
        assert_eq!(lines[2], "[b] next");
        assert_eq!(dropped.split, 1);
        assert_eq!(dropped.lines, 0);
    }

    #[test]
    fn a_flood_is_cut_to_the_rate_and_the_gap_reported() {
        let mut out = Vec::new();
        let mut c = PrefixedConsole::new("[b] ".into(), &mut out);
        // 10 MB of 4 KiB lines at once: the burst goes through, the rest
        // is counted.
        let line = [&[b'z'; 4095][..], b"\n"].concat();
        for _ in 0..2500 {
            c.write_all(&line).unwrap();
        }
        let d = c.dropped();
        let written = 2500 - d.lines;
        assert!(
            written * (4096 + LINE_COST) <= BURST + RATE,
            "{written} lines through"
        );
        assert!(d.lines > 2000 && d.bytes == d.lines * 4096, "{d:?}");
        // Once the rate allows again, the gap is reported first.
        let gap = c.unreported;
        assert!(gap > 0);
        c.bucket = TokenBucket::new(RATE, BURST);
        c.write_all(b"after\n").unwrap();
        drop(c);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with(&format!(
            "[b] [{gap} lines of console output dropped: more than {RATE} bytes/s]\n[b] after\n"
        )));
    }
}
