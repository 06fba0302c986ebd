//! What the tests share: a platform whose clock and heap the test sets, and
//! a client that talks RESP to a [`Server`] through the real parser.
#![allow(dead_code)] // each test file uses its own part

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use kv_core::resp::{self, Parser, Reply};
use kv_core::{Flow, Instant, Platform, Server};

/// The clock, heap figures and host name the server sees.
#[derive(Clone)]
pub struct TestPlatform {
    pub nanos: Rc<Cell<u64>>,
    /// (used, free) bytes.
    pub heap: Rc<Cell<(usize, usize)>>,
}

impl Default for TestPlatform {
    fn default() -> Self {
        Self {
            // Not zero: deadlines are compared with other instants.
            nanos: Rc::new(Cell::new(1_000_000_000)),
            heap: Rc::new(Cell::new((1 << 20, 64 << 20))),
        }
    }
}

impl TestPlatform {
    pub fn now(&self) -> Instant {
        Instant::from_nanos(self.nanos.get())
    }

    pub fn advance(&self, d: Duration) {
        self.nanos.set(self.nanos.get() + d.as_nanos() as u64);
    }
}

impl Platform for TestPlatform {
    fn now(&self) -> Instant {
        TestPlatform::now(self)
    }

    fn heap_usage(&self) -> (usize, usize) {
        self.heap.get()
    }

    fn location(&self) -> (String, String) {
        ("test-host".into(), "test-region".into())
    }
}

/// A server and one connected client.
pub struct Kv {
    pub server: Server,
    pub platform: TestPlatform,
    pub client: u64,
    parser: Parser,
}

impl Kv {
    pub fn new() -> Self {
        Self::with_maxmemory(0)
    }

    pub fn with_maxmemory(maxmemory: usize) -> Self {
        let platform = TestPlatform::default();
        let mut server = Server::new(6379, 128, maxmemory, Box::new(platform.clone()));
        let client = server.connect("10.0.0.9:40000".into());
        Self {
            server,
            platform,
            client,
            parser: Parser::new(),
        }
    }

    pub fn advance(&self, d: Duration) {
        self.platform.advance(d);
    }

    /// Sends raw request bytes; returns every reply and whether the server
    /// asked to close. Panics if the input is not whole commands.
    pub fn send(&mut self, bytes: &[u8]) -> (Vec<Reply>, Flow) {
        let mut out = Vec::new();
        let mut at = 0;
        let mut flow = Flow::Continue;
        while at < bytes.len() && flow == Flow::Continue {
            let parsed = self.parser.parse(&bytes[at..]).expect("a valid request");
            at += parsed.consumed;
            match parsed.command {
                Some(cmd) => flow = kv_core::execute(&mut self.server, self.client, cmd, &mut out),
                None if parsed.consumed == 0 => panic!("incomplete request {:?}", &bytes[at..]),
                None => {}
            }
        }
        (replies(&out), flow)
    }

    /// Runs one command (binary-safe arguments) and returns its reply.
    pub fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Reply {
        let mut req = Vec::new();
        resp::command(&mut req, args);
        let (mut replies, _) = self.send(&req);
        assert_eq!(replies.len(), 1, "one reply per command: {replies:?}");
        replies.remove(0)
    }

    /// Runs a command given as words separated by spaces.
    pub fn run(&mut self, line: &str) -> Reply {
        let words: Vec<&str> = line.split(' ').collect();
        self.cmd(&words)
    }
}

/// Every reply in `out`, which must hold whole, well-formed replies only.
pub fn replies(mut out: &[u8]) -> Vec<Reply> {
    let mut all = Vec::new();
    while !out.is_empty() {
        let (reply, used) = resp::parse_reply(out)
            .expect("the server writes well-formed replies")
            .expect("the server writes whole replies");
        all.push(reply);
        out = &out[used..];
    }
    all
}

pub fn ok() -> Reply {
    Reply::Simple(b"OK".to_vec())
}

pub fn int(n: i64) -> Reply {
    Reply::Integer(n)
}

pub fn bulk(s: impl AsRef<[u8]>) -> Reply {
    Reply::Bulk(s.as_ref().to_vec())
}

pub fn err(s: &str) -> Reply {
    Reply::Error(s.as_bytes().to_vec())
}

/// The error text of `r`, or a panic.
pub fn error_text(r: &Reply) -> String {
    match r {
        Reply::Error(e) => String::from_utf8_lossy(e).into_owned(),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// The keys of an array reply, sorted.
pub fn sorted(r: Reply) -> Vec<Vec<u8>> {
    let Reply::Array(items) = r else {
        panic!("expected an array, got {r:?}");
    };
    let mut keys: Vec<Vec<u8>> = items
        .into_iter()
        .map(|i| match i {
            Reply::Bulk(b) => b,
            other => panic!("expected bulk strings, got {other:?}"),
        })
        .collect();
    keys.sort();
    keys
}
