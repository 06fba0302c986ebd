//! The Redis protocol (RESP2) as the benchmarks' and the demo's clients of
//! the kv app speak it: commands out, replies in, framed by kv's own
//! encoder and reply parser (`kv_core::resp`).

use std::io::{BufRead, ErrorKind};

use anyhow::{anyhow, bail, Result};
use kv_core::resp::{self, Reply};

/// A RESP client on one keep-alive connection to `127.0.0.1:PORT` (replies
/// within 10 s, no Nagle delay).
pub struct Conn {
    r: std::io::BufReader<std::net::TcpStream>,
    w: std::net::TcpStream,
}

impl Conn {
    pub fn connect(port: u16) -> Result<Self> {
        let s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(Self {
            r: std::io::BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    /// Sends one command without waiting for its reply (pipelining).
    pub fn send(&mut self, args: &[&str]) -> Result<()> {
        use std::io::Write;
        Ok(self.w.write_all(&encode(args))?)
    }

    /// The next reply.
    pub fn reply(&mut self) -> Result<String> {
        reply(&mut self.r)
    }

    /// One command and its reply.
    pub fn cmd(&mut self, args: &[&str]) -> Result<String> {
        self.send(args)?;
        self.reply()
    }
}

/// One PING to the kv on `127.0.0.1:PORT` over a fresh connection, its
/// reply awaited for 500 ms: whether PONG came back.
pub fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    s.write_all(&encode(&["PING"])).is_ok()
        && s.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// The RESP encoding of a command.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    resp::command(&mut b, args);
    b
}

/// One reply: simple strings, integers and bulk strings as text, nil as
/// `(nil)`, error replies as errors. A read timeout on the connection
/// reads as "no reply in time". Bytes after the reply stay in `r`.
pub fn reply(r: &mut impl BufRead) -> Result<String> {
    let timed_out = |e: std::io::Error| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            anyhow!("no reply in time (the app or this host stalled)")
        }
        _ => e.into(),
    };
    // The reply's bytes taken from `r` so far, when it spans reads.
    let mut taken = Vec::new();
    let reply = loop {
        let buf = r.fill_buf().map_err(timed_out)?;
        if buf.is_empty() {
            bail!("the server closed the connection");
        }
        let read = buf.len();
        taken.extend_from_slice(buf);
        match resp::parse_reply(&taken) {
            Ok(Some((reply, used))) => {
                // Only this reply's bytes: the next ones are the next reply's.
                r.consume(read - (taken.len() - used));
                break reply;
            }
            Ok(None) => r.consume(read),
            Err(e) => bail!("malformed reply: {e}"),
        }
    };
    match reply {
        Reply::Simple(s) | Reply::Bulk(s) => Ok(String::from_utf8_lossy(&s).into_owned()),
        Reply::Integer(n) => Ok(n.to_string()),
        Reply::Nil | Reply::NilArray => Ok("(nil)".into()),
        Reply::Error(e) => bail!("error reply: {}", String::from_utf8_lossy(&e)),
        Reply::Array(items) => bail!("unexpected array reply of {} items", items.len()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;

    use super::*;

    #[test]
    fn pipelined_replies_are_read_one_at_a_time_across_reads() {
        let bytes: &[u8] = b"+OK\r\n:42\r\n$5\r\nhello\r\n$-1\r\n-ERR no\r\n";
        // A 3-byte buffer: replies span reads and reads span replies.
        let mut r = BufReader::with_capacity(3, bytes);
        assert_eq!(reply(&mut r).unwrap(), "OK");
        assert_eq!(reply(&mut r).unwrap(), "42");
        assert_eq!(reply(&mut r).unwrap(), "hello");
        assert_eq!(reply(&mut r).unwrap(), "(nil)");
        let e = reply(&mut r).unwrap_err().to_string();
        assert_eq!(e, "error reply: ERR no");
        let e = reply(&mut r).unwrap_err().to_string();
        assert_eq!(e, "the server closed the connection");
    }

    #[test]
    fn a_command_encodes_as_multibulk() {
        assert_eq!(
            encode(&["SET", "k", "v 1"]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv 1\r\n"
        );
    }
}
