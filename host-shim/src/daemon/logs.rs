//! `POST /v1/instances/NAME/logs/follow`: an instance's console, streamed.
//!
//! The answer is an upgraded connection (protocol `host-shim-progress`)
//! carrying one JSON [`LogEvent`] per line: first the console lines still
//! in the instance's ring buffer, then each new line as the guest writes
//! it. The stream ends with `{"moved_to": ADDR}` when the instance migrates
//! away (its console now is on the daemon at ADDR: follow it there), or
//! `{"end": WHY}` when it exits or is stopped. An empty `{}` is sent when
//! nothing else was for [`HEARTBEAT`], so a client can tell a quiet app
//! from a dead link, and the daemon notices clients that left.
//!
//! Bounded whatever the guest writes or the client reads: a line without
//! its end is sent in pieces of at most [`vmm::console::MAX_LINE`] bytes,
//! and at most [`QUEUE`] lines wait for a client; one that leaves them
//! unread for [`SLOW_CLIENT`] is disconnected rather than buffered for.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::instance::{LogRing, State};
use super::{not_found, ApiError, Daemon};

/// How often the follower looks for new output.
const POLL: Duration = Duration::from_millis(25);
/// The longest silence on a followed stream.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Lines waiting for a follower at most.
pub const QUEUE: usize = 1024;
/// How long a follower's queue may stay full before it is dropped.
pub const SLOW_CLIENT: Duration = Duration::from_secs(10);

pub use ::api::LogEvent;

/// Queues the event, waiting at most [`SLOW_CLIENT`] for room; false
/// if the client is gone or does not keep up (then the stream ends).
fn send(event: &LogEvent, tx: &SyncSender<String>) -> bool {
    let mut line = serde_json::to_string(event).expect("serializable");
    let give_up = Instant::now() + SLOW_CLIENT;
    loop {
        match tx.try_send(line) {
            Ok(()) => return true,
            Err(TrySendError::Full(l)) if Instant::now() < give_up => {
                line = l;
                thread::sleep(POLL);
            }
            Err(_) => return false,
        }
    }
}

/// Starts following `name`'s console; the lines come out of the receiver.
pub fn follow(daemon: &Arc<Daemon>, name: &str) -> Result<Receiver<String>, ApiError> {
    if !daemon.instances().contains_key(name) {
        return Err(not_found(name));
    }
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let daemon = Arc::clone(daemon);
    let name = name.to_owned();
    thread::Builder::new()
        .name(format!("logs-{name}"))
        .spawn(move || run(&daemon, &name, &tx))
        .map_err(|e| ApiError(500, e.to_string()))?;
    Ok(rx)
}

fn run(daemon: &Daemon, name: &str, tx: &SyncSender<String>) {
    let mut ring: Option<Arc<Mutex<LogRing>>> = None;
    let mut offset = 0;
    let mut partial = Vec::new();
    let mut last_sent = Instant::now();
    loop {
        let Some((log, state)) = daemon
            .instances()
            .get(name)
            .map(|i| (Arc::clone(&i.log), i.state.clone()))
        else {
            flush(&mut partial, tx);
            end(tx, "stopped");
            return;
        };
        // A new console (the instance was replaced): read it from its start.
        if !ring.as_ref().is_some_and(|r| Arc::ptr_eq(r, &log)) {
            offset = 0;
            ring = Some(Arc::clone(&log));
        }
        let (bytes, end_offset) = log.lock().unwrap_or_else(|e| e.into_inner()).since(offset);
        offset = end_offset;
        partial.extend_from_slice(&bytes);
        for text in take_lines(&mut partial) {
            let event = LogEvent {
                line: Some(text),
                ..LogEvent::default()
            };
            if !send(&event, tx) {
                return;
            }
            last_sent = Instant::now();
        }
        match state {
            State::Moved(to) => {
                flush(&mut partial, tx);
                send(
                    &LogEvent {
                        moved_to: Some(to),
                        ..LogEvent::default()
                    },
                    tx,
                );
                return;
            }
            State::Exited(how) => {
                flush(&mut partial, tx);
                end(tx, &format!("exited: {how}"));
                return;
            }
            State::Running | State::Busy(_) => {}
        }
        if last_sent.elapsed() >= HEARTBEAT {
            if !send(&LogEvent::default(), tx) {
                return;
            }
            last_sent = Instant::now();
        }
        thread::sleep(POLL);
    }
}

/// Takes the whole lines out of `partial` (without their ends), and pieces
/// of [`vmm::console::MAX_LINE`] bytes of a longer line; what is left is
/// shorter than that.
fn take_lines(partial: &mut Vec<u8>) -> Vec<String> {
    let max = vmm::console::MAX_LINE;
    let mut lines = Vec::new();
    let mut at = 0;
    while at < partial.len() {
        let rest = &partial[at..];
        let (line, next) = match rest.iter().take(max).position(|&b| b == b'\n') {
            Some(nl) => (&rest[..nl], at + nl + 1),
            None if rest.len() >= max => (&rest[..max], at + max),
            None => break,
        };
        lines.push(
            String::from_utf8_lossy(line)
                .trim_end_matches('\r')
                .to_owned(),
        );
        at = next;
    }
    partial.drain(..at);
    lines
}

fn flush(partial: &mut Vec<u8>, tx: &SyncSender<String>) {
    if !partial.is_empty() {
        let text = String::from_utf8_lossy(partial).into_owned();
        partial.clear();
        send(
            &LogEvent {
                line: Some(text),
                ..LogEvent::default()
            },
            tx,
        );
    }
}

fn end(tx: &SyncSender<String>, why: &str) {
    send(
        &LogEvent {
            end: Some(why.to_owned()),
            ..LogEvent::default()
        },
        tx,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::console::MAX_LINE;

    #[test]
    fn lines_and_bounded_pieces_of_an_endless_one() {
        let mut partial = b"one\r\ntwo\nthr".to_vec();
        assert_eq!(take_lines(&mut partial), ["one", "two"]);
        assert_eq!(partial, b"thr");
        partial.extend_from_slice(&vec![b'x'; 3 * MAX_LINE]);
        let lines = take_lines(&mut partial);
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
        assert_eq!(partial.len(), 3, "the rest waits for more");
        partial.extend_from_slice(b"\n");
        assert_eq!(take_lines(&mut partial), ["xxx"]);
        assert!(partial.is_empty());
    }
}
