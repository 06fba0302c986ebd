//! kv: a Redis-protocol (RESP2) key-value server, for `redis-cli`,
//! `redis-benchmark` and Redis client libraries.
//!
//! - strings with optional expiry: GET, SET [EX|PX|NX|XX|GET|KEEPTTL], MGET,
//!   MSET, INCR/DECR[BY], APPEND, STRLEN, GETSET, GETDEL, SETNX, SETEX, ...
//! - keys: DEL, EXISTS, KEYS pattern, TYPE, EXPIRE/PEXPIRE, TTL/PTTL,
//!   PERSIST, DBSIZE, FLUSHALL/FLUSHDB
//! - connection and server: PING, ECHO, SELECT 0, QUIT, CLIENT, HELLO 2,
//!   INFO, COMMAND, CONFIG GET
//!
//! Listens on port 6379 (or `PORT`), up to 128 clients at once. `MAXMEMORY`
//! (bytes, or with a `kb`/`mb`/`gb` suffix) refuses writes with `-OOM` once
//! the heap holds that much; writes are also refused when the heap runs low.
//! Data lives in memory; its checkpoints (libcloud::state: every live key,
//! value and remaining TTL) are taken when the host asks, and restored at
//! start when the host hands one over (exit status 3 if it cannot be).
//! Periodic and ack-after-checkpoint checkpoints are incremental: deltas of
//! the keys changed since the last one, compacted into a full checkpoint
//! when they outgrow it.
//!
//! The protocol, the keyspace, the commands and the checkpoint format are
//! the `kv-core` library (tested on the host): its `resp` parses requests
//! and encodes replies, its `commands` runs them against the shared
//! [`Server`], whose keyspace is a `store::Store`. This file moves bytes
//! between sockets and those, and checkpoints through libcloud.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::rc::Rc;
use core::cell::{Cell, RefCell};
use core::future::Future;
use core::task::{Poll, Waker};
use kv_core::checkpoint::{self, Checkpoints, KvDelta, KvState};
use kv_core::resp::{Parser, ProtocolError};
use kv_core::{commands, Flow, Platform, Server};
use libcloud::net::{TcpSocket, Write};
use libcloud::prelude::*;
use libcloud::serde::{Deserialize, Serialize};

/// The guest's clock, heap and host, for the server.
struct Guest;

impl Platform for Guest {
    fn now(&self) -> kv_core::Instant {
        // kvmclock's nanoseconds since boot, as libcloud's `Instant` counts.
        let nanos = libcloud::time::uptime().as_nanos();
        kv_core::Instant::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn heap_usage(&self) -> (usize, usize) {
        libcloud::heap_usage()
    }

    fn location(&self) -> (String, String) {
        let host = libcloud::host();
        (host.name, host.region)
    }
}

/// A full checkpoint as libcloud's container holds it.
#[derive(Serialize, Deserialize)]
#[serde(transparent, crate = "libcloud::serde")]
struct Full(KvState);

impl libcloud::state::State for Full {
    const APP: &'static str = checkpoint::APP;
    const VERSION: u32 = checkpoint::VERSION;
}

/// kv's incremental checkpoints: the store tracks the keys it changes, and
/// a delta holds their current entries (or their deletion).
#[derive(Clone)]
struct KvCheckpoints {
    server: Rc<RefCell<Server>>,
    tracker: Rc<Cell<Checkpoints>>,
}

impl KvCheckpoints {
    /// Starts tracking the changes of `server`'s store.
    fn new(server: Rc<RefCell<Server>>) -> Self {
        let tracker = {
            let mut srv = server.borrow_mut();
            let now = srv.now();
            Checkpoints::new(&mut srv.store, now)
        };
        Self {
            server,
            tracker: Rc::new(Cell::new(tracker)),
        }
    }
}

impl libcloud::state::Incremental for KvCheckpoints {
    type Full = Full;
    type Delta = KvDelta;

    fn full(&mut self) -> Full {
        let mut srv = self.server.borrow_mut();
        let now = srv.now();
        let mut tracker = self.tracker.get();
        let state = tracker.full(&mut srv.store, now);
        self.tracker.set(tracker);
        Full(state)
    }

    fn delta(&mut self) -> Option<KvDelta> {
        let mut srv = self.server.borrow_mut();
        let now = srv.now();
        let mut tracker = self.tracker.get();
        let delta = tracker.delta(&mut srv.store, now);
        self.tracker.set(tracker);
        delta
    }
}

/// Restores the checkpoint (a full one and its deltas) the host handed
/// over, if any; returns how many deltas were replayed. Exits with
/// [`EXIT_BAD_CHECKPOINT`] if it cannot be restored.
fn restore(server: &mut Server) -> Option<usize> {
    let chain = match libcloud::state::restore_chain_payload::<Full, KvDelta>() {
        Ok(chain) => chain?,
        Err(e) => bad_checkpoint(e),
    };
    let (base, deltas) = chain;
    let n = deltas.len();
    let now = server.now();
    if let Err(e) = checkpoint::restore(&mut server.store, base, deltas, now) {
        bad_checkpoint(e);
    }
    Some(n)
}

fn bad_checkpoint(e: impl core::fmt::Display) -> ! {
    println!("kv: cannot restore the checkpoint: {e}");
    libcloud::exit(EXIT_BAD_CHECKPOINT);
}

/// Exit status when the checkpoint handed over cannot be restored (another
/// app's, another schema version, damaged).
const EXIT_BAD_CHECKPOINT: i32 = 3;
/// With `ACK_AFTER_CHECKPOINT=1` a reply that follows a write leaves only
/// after a checkpoint holding that write is stored by the host (on our shim,
/// HC_CHECKPOINT returns once the checkpoint is on disk, or at the standby
/// peer): a crash loses no acknowledged write. The checkpoints are deltas
/// of the keys changed, and one covers the writes of every connection that
/// has one waiting (group commit): a connection with a write to acknowledge
/// first lets the others run theirs.
struct AckAfterCheckpoint {
    enabled: bool,
    /// `Store::changes` at the last checkpoint.
    checkpointed: Cell<u64>,
    checkpoints: KvCheckpoints,
}

impl AckAfterCheckpoint {
    /// Checkpoints first if the store changed since the last checkpoint;
    /// false if that failed (the reply must not go out).
    async fn before_reply(&self, server: &RefCell<Server>) -> bool {
        if !self.enabled {
            return true;
        }
        let target = server.borrow().store.changes;
        if target <= self.checkpointed.get() {
            return true;
        }
        // Let the other connections' writes join this checkpoint.
        libcloud::task::yield_now().await;
        if target <= self.checkpointed.get() {
            return true; // another connection's checkpoint covered it
        }
        let changes = server.borrow().store.changes;
        match libcloud::state::checkpoint_incremental(&mut self.checkpoints.clone()) {
            Ok(_) => {
                self.checkpointed.set(changes);
                true
            }
            Err(e) => {
                println!("kv: checkpoint failed, not acknowledging: {e}");
                false
            }
        }
    }
}

/// Clients served at once (one worker task each).
const MAX_CLIENTS: usize = 128;
/// A connection's input buffer to start with (it grows for big arguments).
const READ_BUFFER: usize = 16 * 1024;
/// Replies are sent once a read's worth of commands has run, or earlier
/// when this much has piled up (large values, long pipelines).
const FLUSH_AT: usize = 64 * 1024;
/// The expiry task's work per run: it runs again at once (after other
/// tasks had a turn) while batches come back full.
const EXPIRE_BATCH: usize = 1000;

#[libcloud::main]
async fn main() -> Result<(), libcloud::net::Error> {
    let port: u16 = libcloud::env("PORT")
        .and_then(|p| p.parse().ok())
        .unwrap_or(6379);
    let maxmemory = match libcloud::env("MAXMEMORY").map(commands::parse_bytes) {
        Some(Some(n)) => n,
        Some(None) => {
            println!("kv: ignoring MAXMEMORY: not a size (e.g. 64mb)");
            0
        }
        None => 0,
    };
    let stack = libcloud::net::start().await?;
    let server = Server::new(port, MAX_CLIENTS, maxmemory, Box::new(Guest));
    let server = Rc::new(RefCell::new(server));
    let start = libcloud::time::Instant::now();
    let restored = restore(&mut server.borrow_mut());
    if let Some(deltas) = restored {
        let ms = (libcloud::time::Instant::now() - start).as_secs_f64() * 1e3;
        let keys = server.borrow().store.len();
        println!("kv: restored {keys} keys from a checkpoint (+{deltas} deltas) in {ms:.1} ms");
    }
    let enabled = libcloud::env("ACK_AFTER_CHECKPOINT") == Some("1");
    let checkpoints = KvCheckpoints::new(server.clone());
    let changes = server.borrow().store.changes;
    let ack = Rc::new(AckAfterCheckpoint {
        enabled,
        checkpointed: Cell::new(changes),
        checkpoints,
    });
    if enabled {
        println!("kv: writes are acknowledged after their checkpoint is stored");
    }
    // Changes are tracked (for deltas) only when checkpoints come often.
    if !enabled && !libcloud::state::periodic() {
        server.borrow_mut().store.stop_tracking();
    }
    libcloud::state::checkpoint_on_request_incremental(ack.checkpoints.clone());
    let expiry = Rc::new(ExpiryTimer::default());
    libcloud::task::spawn(expire_task(server.clone(), expiry.clone()));
    libcloud::net::serve_tcp(stack, port, MAX_CLIENTS, async move |socket| {
        serve(socket, &server, &ack, &expiry).await;
    });
    println!("kv: listening on port {port}");
    core::future::pending().await
}

/// When the expiry task runs next: it sleeps until the earliest key
/// deadline, or until woken when no key has one, so an idle kv without
/// volatile keys never wakes (and costs the host no VM exit).
#[derive(Default)]
struct ExpiryTimer {
    /// The deadline the task sleeps until; `None` while it runs, or
    /// sleeps with no deadline.
    until: Cell<Option<kv_core::Instant>>,
    /// The sleeping task, woken by [`Self::deadline_changed`].
    waker: RefCell<Option<Waker>>,
}

impl ExpiryTimer {
    /// After commands ran: wakes the task if the store's earliest
    /// deadline (`next`) comes before the one it sleeps until.
    fn deadline_changed(&self, next: Option<kv_core::Instant>) {
        let Some(next) = next else {
            return; // nothing to expire; a stale wake-up is harmless
        };
        if self.until.get().is_some_and(|until| until <= next) {
            return;
        }
        if let Some(waker) = self.waker.borrow_mut().take() {
            self.until.set(None);
            waker.wake();
        }
    }

    /// Sleeps until `deadline` (measured on `server`'s clock), forever if
    /// `None`, or until [`Self::deadline_changed`] wakes it.
    async fn sleep(&self, server: &RefCell<Server>, deadline: Option<kv_core::Instant>) {
        let wait = deadline.map(|at| at.duration_since(server.borrow().now()));
        let mut timer = core::pin::pin!(async {
            match wait {
                Some(d) => libcloud::time::sleep_async(d).await,
                None => core::future::pending().await,
            }
        });
        self.until.set(deadline);
        let mut registered = false;
        core::future::poll_fn(|cx| {
            if registered && self.waker.borrow().is_none() {
                return Poll::Ready(()); // woken for an earlier deadline
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            registered = true;
            Poll::Pending
        })
        .await;
        self.waker.borrow_mut().take();
        self.until.set(None);
    }
}

/// Removes expired keys a batch at a time, when the earliest deadline
/// passes, and at once again while batches come back full.
async fn expire_task(server: Rc<RefCell<Server>>, timer: Rc<ExpiryTimer>) {
    loop {
        let removed = commands::expire_cycle(&mut server.borrow_mut(), EXPIRE_BATCH);
        if removed == EXPIRE_BATCH {
            libcloud::task::yield_now().await;
            continue;
        }
        let next = server.borrow().store.next_deadline();
        timer.sleep(&server, next).await;
    }
}

/// A client's entry in [`Server::clients`], removed when the connection
/// ends however it ends.
struct Registration<'a> {
    server: &'a RefCell<Server>,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Ok(mut server) = self.server.try_borrow_mut() {
            server.disconnect(self.id);
        }
    }
}

/// Serves one connection: reads, runs every complete command read, and
/// sends their replies in one write per read.
async fn serve(
    socket: &mut TcpSocket<'_>,
    server: &RefCell<Server>,
    ack: &AckAfterCheckpoint,
    expiry: &ExpiryTimer,
) {
    // Replies go out as soon as they are written (Redis sets TCP_NODELAY).
    socket.set_nagle_enabled(false);
    let addr = socket
        .remote_endpoint()
        .map(|e| format!("{e}"))
        .unwrap_or_default();
    let id = server.borrow_mut().connect(addr);
    let _registration = Registration { server, id };

    let mut buf = vec![0u8; READ_BUFFER];
    // Unparsed input is `buf[start..end]`.
    let (mut start, mut end) = (0, 0);
    let mut parser = Parser::new();
    let mut out = Vec::with_capacity(READ_BUFFER);
    loop {
        if end == buf.len() && !make_room(&mut buf, &mut start, &mut end, &parser) {
            ProtocolError::OutOfMemory.encode(&mut out);
            let _ = socket.write_all(&out).await;
            return;
        }
        match socket.read(&mut buf[end..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => end += n,
        }
        // The commands of one read run at the time it was read.
        let mut now = server.borrow().now();
        let mut close = false;
        loop {
            let parsed = match parser.parse(&buf[start..end]) {
                Ok(parsed) => parsed,
                Err(e) => {
                    e.encode(&mut out);
                    close = true;
                    break;
                }
            };
            start += parsed.consumed;
            match parsed.command {
                Some(command) => {
                    // The borrow ends with the statement, before any await.
                    let flow =
                        commands::execute_at(&mut server.borrow_mut(), id, command, &mut out, now);
                    expiry.deadline_changed(server.borrow().store.next_deadline());
                    if flow == Flow::Close {
                        close = true;
                        break;
                    }
                    if out.len() >= FLUSH_AT {
                        if !ack.before_reply(server).await {
                            return;
                        }
                        if socket.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                        now = server.borrow().now();
                    }
                }
                None if parsed.consumed == 0 => break, // needs more input
                None => {}
            }
        }
        if !out.is_empty() {
            if !ack.before_reply(server).await {
                return;
            }
            if socket.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            if out.capacity() > 2 * FLUSH_AT {
                out = Vec::with_capacity(READ_BUFFER);
            }
        }
        if close {
            return; // `serve_tcp` closes the socket after the data sent
        }
        if start == end {
            (start, end) = (0, 0);
            if buf.len() > READ_BUFFER {
                buf = vec![0u8; READ_BUFFER]; // after a big argument
            }
        }
    }
}

/// Frees space at the end of a full input buffer: moves the unparsed bytes
/// to the front, or grows the buffer if they fill it (an argument larger
/// than the buffer). The parser bounds what it waits for (`resp::MAX_BULK`,
/// `resp::MAX_INLINE`), so growth is bounded too. False if out of memory.
fn make_room(buf: &mut Vec<u8>, start: &mut usize, end: &mut usize, parser: &Parser) -> bool {
    if *start > 0 {
        buf.copy_within(*start..*end, 0);
        *end -= *start;
        *start = 0;
        return true;
    }
    let len = buf.len();
    let new_len = parser.wants().filter(|&w| w > len).unwrap_or(2 * len);
    if buf.try_reserve_exact(new_len - len).is_err() {
        return false;
    }
    buf.resize(new_len, 0);
    true
}
