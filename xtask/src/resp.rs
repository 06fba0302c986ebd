//! The Redis protocol (RESP2) as the benchmarks' and the demo's clients of
//! the kv app speak it: commands out, replies in.

use std::io::{BufRead, ErrorKind};

use anyhow::{anyhow, bail, Context, Result};

/// The RESP encoding of a command.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut b = format!("*{}\r\n", args.len());
    for a in args {
        b.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    b.into_bytes()
}

/// One reply: simple strings, integers and bulk strings as text, nil as
/// `(nil)`, error replies as errors. A read timeout on the connection
/// reads as "no reply in time".
pub fn reply(r: &mut impl BufRead) -> Result<String> {
    let timed_out = |e: std::io::Error| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            anyhow!("no reply in time (the app or this host stalled)")
        }
        _ => e.into(),
    };
    let mut line = String::new();
    if r.read_line(&mut line).map_err(timed_out)? == 0 {
        bail!("the server closed the connection");
    }
    let line = line.trim_end();
    match line.as_bytes().first() {
        Some(b'+' | b':') => Ok(line[1..].to_owned()),
        Some(b'-') => bail!("error reply: {}", &line[1..]),
        Some(b'$') => {
            let n: i64 = line[1..].parse().context("bad bulk length")?;
            if n < 0 {
                return Ok("(nil)".into());
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf).map_err(timed_out)?;
            Ok(String::from_utf8_lossy(&buf[..n as usize]).into_owned())
        }
        _ => bail!("unexpected reply {line:?}"),
    }
}
