//! `kv`: the kv app's RESP request parser and command execution (`kv-core`).
//!
//! The input is what one client sent on a connection: read in pieces of the size the first
//! input byte picks, parsed as the guest parses it, and every command run against a server
//! whose clock moves 1 ms a command (keys expire on the way). Checks: the pieces parse as the
//! whole does; the server answers each command with exactly one well-formed reply; the
//! keyspace's counts agree with `KEYS *`; and a checkpoint of what is left restores the same
//! keys, values and TTLs (a TTL past the end of kv's clock: the end of the clock).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use kv_core::checkpoint::{self, Checkpoints};
use kv_core::resp;
use kv_core::store::Store;
use kv_core::testing::{contents, parse_reads};
use kv_core::{Flow, Instant, Platform, Server};

use crate::Input;

/// Commands run per input.
const MAX_COMMANDS: usize = 256;

/// A clock the target moves, and a heap with room to spare.
struct Fixed(Rc<Cell<u64>>);

impl Platform for Fixed {
    fn now(&self) -> Instant {
        Instant::from_nanos(self.0.get())
    }

    fn heap_usage(&self) -> (usize, usize) {
        (1 << 20, 64 << 20)
    }

    fn location(&self) -> (String, String) {
        ("fuzz".into(), "fuzz".into())
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let piece = [1, 2, 3, 7, 16, 64, 1500, usize::MAX][usize::from(input.u8() % 8)];
    let stream = input.rest();

    let whole = parse_reads([stream], MAX_COMMANDS);
    let pieces = parse_reads(stream.chunks(piece.min(stream.len().max(1))), MAX_COMMANDS);
    assert_eq!(
        (&whole.commands, whole.error),
        (&pieces.commands, pieces.error),
        "a stream read in {piece}-byte pieces parses as a whole"
    );

    let clock = Rc::new(Cell::new(1_000_000_000));
    let mut server = Server::new(6379, 8, 0, Box::new(Fixed(clock.clone())));
    let client = server.connect("fuzz".into());
    let now = server.now();
    let mut tracker = Checkpoints::new(&mut server.store, now);
    let mut out = Vec::new();
    let mut ran = 0;
    for command in whole.commands {
        clock.set(clock.get() + 1_000_000);
        ran += 1;
        if kv_core::execute(&mut server, client, command, &mut out) == Flow::Close {
            break;
        }
    }
    let mut replies = 0;
    let mut rest = &out[..];
    while !rest.is_empty() {
        let (_, used) = resp::parse_reply(rest)
            .expect("the server writes well-formed replies")
            .expect("the server writes whole replies");
        rest = &rest[used..];
        replies += 1;
    }
    assert_eq!(replies, ran, "one reply per command");

    let now = server.now();
    server.store.expire_due(now, usize::MAX);
    assert_eq!(server.store.keys(b"*").count(), server.store.len());
    assert_eq!(server.store.live_entries(now).count(), server.store.len());
    assert!(server.store.volatile_len() <= server.store.len());

    let full = tracker.full(&mut server.store, now);
    let payload = postcard::to_allocvec(&full).expect("a state encodes");
    let mut restored = Store::new();
    let later = now + Duration::from_secs(3600);
    checkpoint::restore(&mut restored, payload, Vec::new(), later).expect("a checkpoint restores");
    // The restored clock ends too: a TTL reaching past its end (`SET k v PX 9223372036854775806`)
    // comes back as the end of time (kv's `Instant` saturates).
    let end = (Instant::from_nanos(u64::MAX) - later).as_millis();
    let want: BTreeMap<_, _> = contents(&server.store, now)
        .into_iter()
        .map(|(k, (v, ttl))| (k, (v, ttl.map(|t| t.min(end)))))
        .collect();
    assert_eq!(contents(&restored, later), want);
}
