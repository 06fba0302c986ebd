//! RESP framing: requests as they arrive over TCP (any split, pipelined,
//! inline or multibulk), lengths at and past the limits, and the reply
//! encoders and parser.

use kv_core::resp::{
    self, parse_i64, parse_reply, push_i64, split_args, Command, Parser, ProtocolError, Reply,
    MAX_BULK, MAX_COMMAND, MAX_DEPTH, MAX_INLINE,
};
use kv_core::testing::parse_reads;

/// Feeds `chunks` to one parser as successive reads, the way the guest's
/// connection loop does (unconsumed bytes stay in the buffer), and returns
/// the commands, or the first error.
fn feed(chunks: &[&[u8]]) -> Result<Vec<Command>, ProtocolError> {
    let parsed = parse_reads(chunks.iter().copied(), usize::MAX);
    if let Some(e) = parsed.error {
        return Err(e);
    }
    assert_eq!(parsed.left, 0, "bytes left unparsed");
    Ok(parsed.commands)
}

fn words(c: &[&[u8]]) -> Command {
    c.iter().map(|w| w.to_vec()).collect()
}

/// A pipeline mixing every request form, binary data and skipped frames.
fn pipeline() -> (Vec<u8>, Vec<Command>) {
    let mut buf = Vec::new();
    resp::command(&mut buf, &[&b"SET"[..], b"k\r\n1", b"v\x00\xff\r\n"]);
    buf.extend_from_slice(b"*0\r\n*-1\r\n"); // no commands at all
    buf.extend_from_slice(b"GET \"k\\r\\n1\"  'x y'\r\n");
    buf.extend_from_slice(b"\r\n\n"); // empty inline lines
    resp::command(&mut buf, &[&b"MSET"[..], b"", b"", b"a", b"b"]);
    buf.extend_from_slice(b"PING\n");
    resp::command(&mut buf, &[&[b'x'; 300][..]]);
    let expected = vec![
        words(&[b"SET", b"k\r\n1", b"v\x00\xff\r\n"]),
        words(&[b"GET", b"k\r\n1", b"x y"]),
        words(&[b"MSET", b"", b"", b"a", b"b"]),
        words(&[b"PING"]),
        vec![vec![b'x'; 300]],
    ];
    (buf, expected)
}

#[test]
fn a_pipeline_parses_the_same_at_every_split_point() {
    let (buf, expected) = pipeline();
    assert_eq!(feed(&[&buf]).unwrap(), expected);
    for i in 0..=buf.len() {
        let (a, b) = buf.split_at(i);
        assert_eq!(feed(&[a, b]).unwrap(), expected, "split at {i}");
    }
}

#[test]
fn a_pipeline_parses_the_same_at_every_pair_of_split_points() {
    let (buf, expected) = pipeline();
    for i in 0..=buf.len() {
        for j in i..=buf.len() {
            let chunks = [&buf[..i], &buf[i..j], &buf[j..]];
            assert_eq!(feed(&chunks).unwrap(), expected, "splits at {i} and {j}");
        }
    }
}

#[test]
fn a_pipeline_parses_the_same_a_byte_at_a_time() {
    let (buf, expected) = pipeline();
    let bytes: Vec<&[u8]> = buf.chunks(1).collect();
    assert_eq!(feed(&bytes).unwrap(), expected);
}

#[test]
fn an_incomplete_command_consumes_nothing_until_its_header_is_whole() {
    let mut p = Parser::new();
    for partial in [&b"*"[..], b"*2", b"*2\r"] {
        let parsed = p.parse(partial).unwrap();
        assert_eq!((parsed.consumed, parsed.command), (0, None), "{partial:?}");
    }
    // The header is taken, then each whole argument; the parser keeps its place.
    let parsed = p.parse(b"*2\r\n$3\r\nGET\r\n$5\r\nab").unwrap();
    assert_eq!((parsed.consumed, parsed.command), (17, None));
    assert_eq!(p.wants(), Some(7), "the 5-byte bulk string and its CRLF");
    assert_eq!(p.parse(b"ab").unwrap().consumed, 0);
    let parsed = p.parse(b"ababc\r\n").unwrap();
    assert_eq!(parsed.consumed, 7);
    assert_eq!(parsed.command, Some(words(&[b"GET", b"ababc"])));
}

#[test]
fn inline_commands_split_and_unquote_like_redis() {
    let cases: &[(&[u8], &[&[u8]])] = &[
        (b"set  k\tv", &[b"set", b"k", b"v"]),
        (b"  ", &[]),
        (b"set \"a b\" c", &[b"set", b"a b", b"c"]),
        // Not hex digits: `\x` is an `x`, as in Redis.
        (b"\"\\x41\\x7a\\xZZ\"", &[b"AzxZZ"]),
        (b"\"\\n\\r\\t\\b\\a\\\\\\\"\\q\"", &[b"\n\r\t\x08\x07\\\"q"]),
        (b"'it\\'s' '\\n'", &[b"it's", b"\\n"]),
        (b"\"\" ''", &[b"", b""]),
        (b"a\"b c\"", &[b"ab c"]), // a quote opens mid-word too, as in Redis
    ];
    for (line, want) in cases {
        assert_eq!(split_args(line), Some(words(want)), "{line:?}");
    }
    for bad in [
        &b"\"unterminated"[..],
        b"'unterminated",
        b"\"closed\"x",
        b"'closed'x",
        b"\"ends with a backslash\\",
    ] {
        assert_eq!(split_args(bad), None, "{bad:?}");
    }
    assert_eq!(
        feed(&[b"GET \"k\r\n"]).unwrap_err(),
        ProtocolError::UnbalancedQuotes
    );
    // `\n` alone ends a line too, and a `\r` within one is a blank.
    assert_eq!(
        feed(&[b"ECHO a\rb\nPING\r\n"]).unwrap(),
        vec![words(&[b"ECHO", b"a", b"b"]), words(&[b"PING"])]
    );
}

#[test]
fn inline_lines_are_bounded() {
    let mut line = vec![b'a'; MAX_INLINE];
    line.push(b'\n');
    assert_eq!(feed(&[&line]).unwrap(), vec![vec![vec![b'a'; MAX_INLINE]]]);
    let mut long = vec![b'a'; MAX_INLINE + 1];
    long.push(b'\n');
    assert_eq!(feed(&[&long]).unwrap_err(), ProtocolError::TooBigInline);
    // Without a newline: waits up to the limit, refuses past it.
    let mut p = Parser::new();
    assert_eq!(p.parse(&vec![b'a'; MAX_INLINE]).unwrap().consumed, 0);
    assert_eq!(
        p.parse(&vec![b'a'; MAX_INLINE + 1]).unwrap_err(),
        ProtocolError::TooBigInline
    );
}

#[test]
fn bulk_lengths_at_the_limit_are_accepted() {
    let arg = vec![7u8; MAX_BULK];
    let mut buf = Vec::new();
    resp::command(&mut buf, &[&b"SET"[..], b"k", &arg]);
    let commands = feed(&[&buf]).unwrap();
    assert_eq!(commands, vec![words(&[b"SET", b"k", &arg])]);
    assert_eq!(feed(&[b"*1\r\n$0\r\n\r\n"]).unwrap(), vec![vec![vec![]]]);
}

#[test]
fn bulk_lengths_past_the_limits_or_malformed_are_refused() {
    let over = format!("*1\r\n${}\r\n", MAX_BULK + 1);
    for bad in [
        over.as_str(),
        "*1\r\n$-1\r\n",
        "*1\r\n$-0\r\n",
        "*1\r\n$01\r\n",
        "*1\r\n$+1\r\n",
        "*1\r\n$ 1\r\n",
        "*1\r\n$\r\n",
        "*1\r\n$1x\r\n",
        "*1\r\n$9223372036854775807\r\n",
        "*1\r\n$9223372036854775808\r\n",
        "*1\r\n$-9223372036854775809\r\n",
        "*1\r\n$18446744073709551617\r\n",
    ] {
        assert_eq!(
            feed(&[bad.as_bytes()]).unwrap_err(),
            ProtocolError::InvalidBulkLength,
            "{bad:?}"
        );
    }
}

#[test]
fn multibulk_counts_past_the_limits_or_malformed_are_refused() {
    for bad in [
        "*1048577\r\n",
        "*9223372036854775807\r\n",
        "*9223372036854775808\r\n",
        "*99999999999999999999\r\n",
        "*x\r\n",
        "*\r\n",
        "*+1\r\n",
        "*01\r\n",
    ] {
        assert_eq!(
            feed(&[bad.as_bytes()]).unwrap_err(),
            ProtocolError::InvalidMultibulkLength,
            "{bad:?}"
        );
    }
    // Negative counts and zero are skipped, as Redis does.
    assert_eq!(
        feed(&[b"*-5\r\n*0\r\nPING\r\n"]).unwrap(),
        vec![words(&[b"PING"])]
    );
    // The largest count is accepted; memory follows the arguments that come.
    let mut p = Parser::new();
    let parsed = p.parse(b"*1048576\r\n$1\r\na\r\n").unwrap();
    assert_eq!((parsed.consumed, parsed.command), (17, None));
}

#[test]
fn header_lines_without_an_end_are_bounded() {
    let mut star = b"*".to_vec();
    star.extend(std::iter::repeat_n(b'1', MAX_INLINE + 1));
    assert_eq!(feed(&[&star]).unwrap_err(), ProtocolError::TooBigMbulkCount);
    let mut dollar = b"*1\r\n$".to_vec();
    dollar.extend(std::iter::repeat_n(b'1', MAX_INLINE + 1));
    assert_eq!(
        feed(&[&dollar]).unwrap_err(),
        ProtocolError::TooBigBulkCount
    );
}

#[test]
fn framing_errors_are_reported() {
    assert_eq!(
        feed(&[b"*1\r\n$3\r\nfooXX"]).unwrap_err(),
        ProtocolError::ExpectedCrlf
    );
    assert_eq!(
        feed(&[b"*2\r\n$1\r\na\r\n:1\r\n"]).unwrap_err(),
        ProtocolError::ExpectedDollar(b':')
    );
    let mut out = Vec::new();
    ProtocolError::ExpectedDollar(b'\n').encode(&mut out);
    assert_eq!(out, b"-ERR Protocol error: expected '$', got ' '\r\n");
    out.clear();
    ProtocolError::ExpectedCrlf.encode(&mut out);
    assert_eq!(
        out,
        b"-ERR Protocol error: expected '\\r\\n' after bulk string\r\n"
    );
}

#[test]
fn a_command_larger_than_the_limit_is_refused_before_it_is_read() {
    // 16 arguments of MAX_BULK bytes fit; the header of a 17th would not.
    let n = MAX_COMMAND / MAX_BULK + 1;
    let mut buf = format!("*{n}\r\n").into_bytes();
    let arg = vec![b'v'; MAX_BULK];
    let mut p = Parser::new();
    let mut error = None;
    let mut start = 0;
    for _ in 0..n {
        buf.extend_from_slice(format!("${MAX_BULK}\r\n").as_bytes());
        buf.extend_from_slice(&arg);
        buf.extend_from_slice(b"\r\n");
        match p.parse(&buf[start..]) {
            Ok(parsed) => start += parsed.consumed,
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    assert_eq!(error, Some(ProtocolError::TooBigCommand));
}

#[test]
fn integers_parse_like_redis_string2ll() {
    for (s, n) in [
        ("0", 0),
        ("-1", -1),
        ("9223372036854775807", i64::MAX),
        ("-9223372036854775808", i64::MIN),
    ] {
        assert_eq!(parse_i64(s.as_bytes()), Some(n), "{s}");
        let mut out = Vec::new();
        push_i64(&mut out, n);
        assert_eq!(out, s.as_bytes());
    }
    for s in [
        "",
        "-",
        "+1",
        " 1",
        "1 ",
        "-0",
        "00",
        "01",
        "1.5",
        "9223372036854775808",
        "-9223372036854775809",
        "10000000000000000000",
        "99999999999999999999",
    ] {
        assert_eq!(parse_i64(s.as_bytes()), None, "{s:?}");
    }
}

/// Every reply encoder's output, and what a client reads of it.
fn encoded_replies() -> (Vec<u8>, Vec<Reply>) {
    let mut out = Vec::new();
    resp::ok(&mut out);
    resp::simple(&mut out, "PONG");
    resp::error(&mut out, b"ERR two\r\nlines");
    resp::integer(&mut out, i64::MIN);
    resp::bulk(&mut out, b"a\r\nb");
    resp::bulk_or_nil(&mut out, None);
    resp::array(&mut out, 2);
    resp::bulk(&mut out, b"");
    resp::array(&mut out, 0);
    out.extend_from_slice(b"*-1\r\n");
    let want = vec![
        Reply::Simple(b"OK".to_vec()),
        Reply::Simple(b"PONG".to_vec()),
        Reply::Error(b"ERR two  lines".to_vec()),
        Reply::Integer(i64::MIN),
        Reply::Bulk(b"a\r\nb".to_vec()),
        Reply::Nil,
        Reply::Array(vec![Reply::Bulk(vec![]), Reply::Array(vec![])]),
        Reply::NilArray,
    ];
    (out, want)
}

fn read_all(mut buf: &[u8]) -> Result<Vec<Reply>, ProtocolError> {
    let mut all = Vec::new();
    while let Some((r, used)) = parse_reply(buf)? {
        all.push(r);
        buf = &buf[used..];
    }
    assert!(buf.is_empty(), "left over: {buf:?}");
    Ok(all)
}

#[test]
fn replies_read_back_as_encoded() {
    let (out, want) = encoded_replies();
    assert_eq!(read_all(&out).unwrap(), want);
    // What mget and keys reserve for a reply is enough.
    for len in [0, 9, 10, MAX_BULK] {
        let mut b = Vec::new();
        resp::bulk(&mut b, &vec![0; len]);
        assert!(b.len() <= resp::bulk_size(len), "{len}");
    }
}

#[test]
fn an_incomplete_reply_is_none_at_every_split_point() {
    let (out, want) = encoded_replies();
    let mut at = 0;
    for reply in want {
        let (got, used) = parse_reply(&out[at..]).unwrap().unwrap();
        assert_eq!(got, reply);
        for cut in 0..used {
            assert_eq!(
                parse_reply(&out[at..at + cut]).unwrap(),
                None,
                "{reply:?} cut at {cut}"
            );
        }
        at += used;
    }
}

#[test]
fn malformed_replies_are_refused() {
    let deep = "*1\r\n".repeat(MAX_DEPTH + 1);
    let cases: &[(&[u8], ProtocolError)] = &[
        (b"?x\r\n", ProtocolError::UnknownReply(b'?')),
        (b"\r\n", ProtocolError::UnknownReply(b'\r')),
        (b":1x\r\n", ProtocolError::InvalidInteger),
        (b"$-2\r\n", ProtocolError::InvalidBulkLength),
        (b"$2\r\nabc\r\n", ProtocolError::ExpectedCrlf),
        (b"*-2\r\n", ProtocolError::InvalidMultibulkLength),
        (b"*1\r\n!\r\n", ProtocolError::UnknownReply(b'!')),
        (deep.as_bytes(), ProtocolError::TooDeep),
    ];
    for (bytes, e) in cases {
        assert_eq!(parse_reply(bytes).unwrap_err(), *e, "{bytes:?}");
    }
    let over = format!("${}\r\n", MAX_BULK + 1);
    assert_eq!(
        parse_reply(over.as_bytes()).unwrap_err(),
        ProtocolError::InvalidBulkLength
    );
    assert_eq!(
        parse_reply(&vec![b'+'; MAX_INLINE + 2]).unwrap_err(),
        ProtocolError::TooBigInline
    );
    // Nesting up to the limit is fine.
    let mut ok = "*1\r\n".repeat(MAX_DEPTH);
    ok.push_str(":1\r\n");
    assert!(parse_reply(ok.as_bytes()).unwrap().is_some());
}

#[test]
fn a_request_encodes_as_the_parser_reads_it() {
    let args: [&[u8]; 3] = [b"SET", b"\r\n*1\r\n", b"$-1"];
    let mut buf = Vec::new();
    resp::command(&mut buf, &args);
    assert_eq!(feed(&[&buf]).unwrap(), vec![words(&args)]);
}
