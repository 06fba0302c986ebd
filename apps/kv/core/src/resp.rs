//! RESP2, the Redis wire protocol: an incremental request parser and the
//! reply encoders the server uses, and the request encoder and reply
//! parser its clients use ([`command`], [`parse_reply`]).
//!
//! Requests come in two forms, as in Redis:
//!
//! - multibulk: `*<n>\r\n` then `n` bulk strings `$<len>\r\n<bytes>\r\n`
//!   (what every client library and `redis-benchmark` sends);
//! - inline: one line of space-separated words, `"double"` or `'single'`
//!   quoted as `redis-cli`/`sdssplitargs` does (what `telnet` users type).
//!
//! [`Parser`] keeps its place between reads, so a large command that trickles
//! in over many reads is scanned once, not once per read. Everything here is
//! pure (no I/O, no clock), so the logic is the same in tests and on the guest.

use alloc::vec::Vec;

/// Most arguments one multibulk command may declare (Redis: 1024 * 1024 for
/// unauthenticated clients).
pub const MAX_ARGS: usize = 1024 * 1024;
/// Largest bulk string (one argument, and so one stored value) accepted.
/// Redis allows 512 MiB; a small unikernel caps it at 1 MiB.
pub const MAX_BULK: usize = 1024 * 1024;
/// Longest inline command or `*`/`$` header line (Redis: 64 KiB).
pub const MAX_INLINE: usize = 64 * 1024;
/// Most bytes one command may take in memory, arguments plus
/// [`ARG_OVERHEAD`] each: bounds what one client can make the server hold.
pub const MAX_COMMAND: usize = 16 * 1024 * 1024;
/// What one argument costs besides its bytes (its `Vec` and allocator slack).
const ARG_OVERHEAD: usize = 32;

/// One command: its name followed by its arguments, binary-safe.
pub type Command = Vec<Vec<u8>>;

/// Bytes that break the protocol: a request the server cannot make sense of
/// (replied to with `-ERR Protocol error: ...`, after which the connection
/// is closed), or a reply a client cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// `*` header that is not a number, or more than [`MAX_ARGS`].
    #[error("invalid multibulk length")]
    InvalidMultibulkLength,
    /// `$` header that is not a number, negative, or more than [`MAX_BULK`].
    #[error("invalid bulk length")]
    InvalidBulkLength,
    /// Something other than `$` where a bulk string must start.
    #[error("expected '$', got '{}'", char::from(*.0).escape_default())]
    ExpectedDollar(u8),
    /// A `*` header line longer than [`MAX_INLINE`].
    #[error("too big mbulk count string")]
    TooBigMbulkCount,
    /// A `$` header line longer than [`MAX_INLINE`].
    #[error("too big bulk count string")]
    TooBigBulkCount,
    /// A bulk string not followed by `\r\n`.
    #[error("expected '\\r\\n' after bulk string")]
    ExpectedCrlf,
    /// An inline command with an unterminated quote.
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
    /// An inline command (or a reply's line) longer than [`MAX_INLINE`].
    #[error("too big inline request")]
    TooBigInline,
    /// A command larger than [`MAX_COMMAND`].
    #[error("command too large")]
    TooBigCommand,
    /// The server has no memory left to hold the command.
    #[error("out of memory for request")]
    OutOfMemory,
    /// A reply that starts with none of `+ - : $ *`.
    #[error("unknown reply type '{}'", char::from(*.0).escape_default())]
    UnknownReply(u8),
    /// An integer reply that is not a number.
    #[error("invalid integer reply")]
    InvalidInteger,
    /// Arrays nested deeper than [`MAX_DEPTH`].
    #[error("reply nested too deep")]
    TooDeep,
}

impl ProtocolError {
    /// Appends the error reply for `self` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"-ERR Protocol error: ");
        match self {
            // The byte as it came, as Redis shows it.
            Self::ExpectedDollar(got) => {
                out.extend_from_slice(b"expected '$', got '");
                push_sanitized(out, &[*got]);
                out.push(b'\'');
            }
            other => out.extend_from_slice(alloc::format!("{other}").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// What one [`Parser::parse`] call found.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Bytes of the input used up; the caller drops them before the next call.
    pub consumed: usize,
    /// A complete command, if one ended within those bytes.
    pub command: Option<Command>,
}

impl Parsed {
    /// Nothing parsed: more bytes are needed.
    pub const NEED_MORE: Parsed = Parsed {
        consumed: 0,
        command: None,
    };
}

/// A line not ended within `buf`: more bytes are needed, unless it is
/// longer than [`MAX_INLINE`] already (then `too_long`).
fn unended_line(buf: &[u8], too_long: ProtocolError) -> Result<Parsed, ProtocolError> {
    if buf.len() > MAX_INLINE {
        Err(too_long)
    } else {
        Ok(Parsed::NEED_MORE)
    }
}

/// An incremental RESP2 request parser for one connection.
///
/// Call [`parse`](Self::parse) with the unconsumed input until it returns
/// `consumed == 0` and no command: then it needs more bytes.
#[derive(Debug, Default)]
pub struct Parser {
    /// Arguments of the multibulk command being read.
    args: Vec<Vec<u8>>,
    /// Arguments still to come; 0 between commands.
    remaining: usize,
    /// Length of the bulk string whose `$` header has been read.
    bulk_len: Option<usize>,
    /// Memory the current command takes so far (see [`MAX_COMMAND`]).
    size: usize,
}

impl Parser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many unconsumed bytes the parser needs in one piece to make
    /// progress, when it knows (the bulk string it waits for, plus `\r\n`).
    pub fn wants(&self) -> Option<usize> {
        self.bulk_len.map(|len| len + 2)
    }

    /// Parses the start of `buf`: a whole inline command, or as much of a
    /// multibulk command as is there. See [`Parsed`].
    pub fn parse(&mut self, buf: &[u8]) -> Result<Parsed, ProtocolError> {
        let mut consumed = 0;
        if self.remaining == 0 {
            let Some(&first) = buf.first() else {
                return Ok(Parsed::NEED_MORE);
            };
            if first != b'*' {
                return parse_inline(buf);
            }
            let Some(end) = find_crlf(buf) else {
                return unended_line(buf, ProtocolError::TooBigMbulkCount);
            };
            let count = parse_i64(&buf[1..end]).ok_or(ProtocolError::InvalidMultibulkLength)?;
            if count > MAX_ARGS as i64 {
                return Err(ProtocolError::InvalidMultibulkLength);
            }
            consumed = end + 2;
            if count <= 0 {
                // `*0` and `*-1` are no commands at all (Redis skips them).
                return Ok(Parsed {
                    consumed,
                    command: None,
                });
            }
            self.remaining = count as usize;
            // Trust the declared count only so far: memory follows the data.
            self.args = Vec::with_capacity(self.remaining.min(64));
            self.size = 0;
        }
        while self.remaining > 0 {
            let len = match self.bulk_len {
                Some(len) => len,
                None => {
                    let rest = &buf[consumed..];
                    let Some(&first) = rest.first() else { break };
                    if first != b'$' {
                        return Err(ProtocolError::ExpectedDollar(first));
                    }
                    let Some(end) = find_crlf(rest) else {
                        if rest.len() > MAX_INLINE {
                            return Err(ProtocolError::TooBigBulkCount);
                        }
                        break;
                    };
                    let len = parse_i64(&rest[1..end])
                        .filter(|&n| (0..=MAX_BULK as i64).contains(&n))
                        .ok_or(ProtocolError::InvalidBulkLength)?
                        as usize;
                    self.size += len + ARG_OVERHEAD;
                    if self.size > MAX_COMMAND {
                        return Err(ProtocolError::TooBigCommand);
                    }
                    consumed += end + 2;
                    self.bulk_len = Some(len);
                    len
                }
            };
            let rest = &buf[consumed..];
            if rest.len() < len + 2 {
                break;
            }
            if &rest[len..len + 2] != b"\r\n" {
                return Err(ProtocolError::ExpectedCrlf);
            }
            let mut arg = Vec::new();
            arg.try_reserve_exact(len)
                .map_err(|_| ProtocolError::OutOfMemory)?;
            arg.extend_from_slice(&rest[..len]);
            self.args
                .try_reserve(1)
                .map_err(|_| ProtocolError::OutOfMemory)?;
            self.args.push(arg);
            consumed += len + 2;
            self.bulk_len = None;
            self.remaining -= 1;
        }
        let command = (self.remaining == 0).then(|| core::mem::take(&mut self.args));
        Ok(Parsed { consumed, command })
    }
}

/// Index of the first `\r\n` in `buf`.
fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\r') {
        let at = from + i;
        match buf.get(at + 1) {
            Some(b'\n') => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

/// An inline command: one `\n`-terminated line (`\r\n` also accepted).
fn parse_inline(buf: &[u8]) -> Result<Parsed, ProtocolError> {
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        return unended_line(buf, ProtocolError::TooBigInline);
    };
    if newline > MAX_INLINE {
        return Err(ProtocolError::TooBigInline);
    }
    let line = &buf[..newline];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let args = split_args(line).ok_or(ProtocolError::UnbalancedQuotes)?;
    Ok(Parsed {
        consumed: newline + 1,
        command: (!args.is_empty()).then_some(args),
    })
}

/// Splits an inline command into words like Redis's `sdssplitargs`: blanks
/// separate words; `"..."` understands `\n \r \t \b \a \\ \"` and `\xHH`;
/// `'...'` understands only `\'`. A closing quote must end its word.
/// `None` for unbalanced quotes.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            return Some(args);
        }
        let mut word = Vec::new();
        // The quote the word is inside, if any.
        let mut quote = None;
        loop {
            let Some(q) = quote else {
                match line.get(i) {
                    None => break,
                    Some(c) if c.is_ascii_whitespace() => break,
                    Some(&q @ (b'"' | b'\'')) => quote = Some(q),
                    Some(&c) => word.push(c),
                }
                i += 1;
                continue;
            };
            let c = *line.get(i)?;
            if c == q {
                // The closing quote must be followed by a blank or the end.
                if line.get(i + 1).is_some_and(|b| !b.is_ascii_whitespace()) {
                    return None;
                }
                i += 1;
                break;
            }
            let (byte, len) = match (q, &line[i..]) {
                (b'"', [b'\\', b'x', h, l, ..]) if hex(*h).is_some() && hex(*l).is_some() => {
                    (hex(*h)? << 4 | hex(*l)?, 4)
                }
                (b'"', [b'\\', escaped, ..]) => {
                    let byte = match escaped {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        &other => other,
                    };
                    (byte, 2)
                }
                (b'\'', [b'\\', b'\'', ..]) => (b'\'', 2),
                _ => (c, 1),
            };
            word.push(byte);
            i += len;
        }
        args.push(word);
    }
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Parses a decimal `i64` the way Redis's `string2ll` does: optional `-`,
/// digits, no `+`, no blanks, no leading zeros, no overflow.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    let (negative, digits) = match s.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty()
        || digits.len() > 19
        || (digits[0] == b'0' && (digits.len() > 1 || negative))
    {
        return None;
    }
    // Accumulate negatively so that i64::MIN fits.
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_sub((d - b'0') as i64)?;
    }
    if negative {
        Some(n)
    } else {
        n.checked_neg()
    }
}

/// Appends the decimal form of `n` to `out`.
pub fn push_i64(out: &mut Vec<u8>, n: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `bytes` with `\r` and `\n` turned into spaces, so that it fits on
/// one line of a simple string or error reply.
pub fn push_sanitized(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend(
        bytes
            .iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
}

/// `+s\r\n`. `s` must not contain `\r` or `\n`.
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `+OK\r\n`.
pub fn ok(out: &mut Vec<u8>) {
    out.extend_from_slice(b"+OK\r\n");
}

/// `-msg\r\n`, with line breaks in `msg` made spaces. `msg` starts with the
/// error code (`ERR ...`, `OOM ...`).
pub fn error(out: &mut Vec<u8>, msg: &[u8]) {
    out.push(b'-');
    push_sanitized(out, msg);
    out.extend_from_slice(b"\r\n");
}

/// `:n\r\n`.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    push_i64(out, n);
    out.extend_from_slice(b"\r\n");
}

/// `$len\r\nbytes\r\n`.
pub fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'$');
    push_i64(out, bytes.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// The null bulk string, `$-1\r\n` (a missing value).
pub fn nil(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// A bulk string or the null bulk string.
pub fn bulk_or_nil(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => bulk(out, b),
        None => nil(out),
    }
}

/// `*n\r\n`: an array header, followed by `n` replies.
pub fn array(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    push_i64(out, n as i64);
    out.extend_from_slice(b"\r\n");
}

/// Bytes [`bulk`] appends for a string of `len` bytes.
pub fn bulk_size(len: usize) -> usize {
    len + 25
}

/// Appends the request a client sends for `args` (a command's name and
/// arguments): a multibulk array of bulk strings.
pub fn command<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    array(out, args.len());
    for arg in args {
        bulk(out, arg.as_ref());
    }
}

/// Most levels of arrays within arrays a reply may have.
pub const MAX_DEPTH: usize = 8;

/// A reply, as a client reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+text`
    Simple(Vec<u8>),
    /// `-CODE message`
    Error(Vec<u8>),
    /// `:n`
    Integer(i64),
    /// `$len` and the bytes.
    Bulk(Vec<u8>),
    /// `$-1`, the null bulk string.
    Nil,
    /// `*n` and `n` replies.
    Array(Vec<Reply>),
    /// `*-1`, the null array.
    NilArray,
}

/// Parses the reply at the start of `buf`: the reply and the bytes it
/// takes, or `None` if `buf` ends before it does (read more and call again
/// with everything unconsumed). Lengths are bounded as in requests
/// ([`MAX_BULK`], [`MAX_ARGS`], [`MAX_INLINE`]) and nesting by
/// [`MAX_DEPTH`].
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    reply_at(buf, 0)
}

fn reply_at(buf: &[u8], depth: usize) -> Result<Option<(Reply, usize)>, ProtocolError> {
    let Some(end) = find_crlf(buf) else {
        return if buf.len() > MAX_INLINE {
            Err(ProtocolError::TooBigInline)
        } else {
            Ok(None)
        };
    };
    if end > MAX_INLINE {
        return Err(ProtocolError::TooBigInline);
    }
    let Some((&kind, line)) = buf[..end].split_first() else {
        return Err(ProtocolError::UnknownReply(b'\r'));
    };
    let mut at = end + 2;
    let reply = match kind {
        b'+' => Reply::Simple(line.to_vec()),
        b'-' => Reply::Error(line.to_vec()),
        b':' => Reply::Integer(parse_i64(line).ok_or(ProtocolError::InvalidInteger)?),
        b'$' => match parse_i64(line) {
            Some(-1) => Reply::Nil,
            Some(n) if (0..=MAX_BULK as i64).contains(&n) => {
                let n = n as usize;
                let Some(rest) = buf.get(at..at + n + 2) else {
                    return Ok(None);
                };
                if &rest[n..] != b"\r\n" {
                    return Err(ProtocolError::ExpectedCrlf);
                }
                at += n + 2;
                Reply::Bulk(rest[..n].to_vec())
            }
            _ => return Err(ProtocolError::InvalidBulkLength),
        },
        b'*' => match parse_i64(line) {
            Some(-1) => Reply::NilArray,
            Some(n) if (0..=MAX_ARGS as i64).contains(&n) => {
                if depth >= MAX_DEPTH {
                    return Err(ProtocolError::TooDeep);
                }
                // Memory follows the data, not the declared count.
                let mut items = Vec::with_capacity((n as usize).min(64));
                for _ in 0..n {
                    let Some((item, used)) = reply_at(&buf[at..], depth + 1)? else {
                        return Ok(None);
                    };
                    items.push(item);
                    at += used;
                }
                Reply::Array(items)
            }
            _ => return Err(ProtocolError::InvalidMultibulkLength),
        },
        other => return Err(ProtocolError::UnknownReply(other)),
    };
    Ok(Some((reply, at)))
}
