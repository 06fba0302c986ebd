//! A delaying TCP relay: accepts connections on a listen address and
//! forwards each to a target, holding every chunk for the one-way delay in
//! both directions. Half-closes are passed on (after the delay too).
//!
//! Bounded: at most [`MAX_CONNECTIONS`] relayed connections at once (more
//! are refused by closing them), and at most [`WINDOW`] bytes in flight per
//! direction (the reader waits for room, as a sender waits for its window).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::delay::DelayLine;

/// Relayed connections at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Bytes in flight per direction of a connection.
pub const WINDOW: usize = 8 << 20;
/// How long the relay waits for the target to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running TCP relay (its threads live until the process ends).
pub struct TcpRelay {
    local: SocketAddr,
}

/// Counts a relayed connection while any of its threads runs.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl TcpRelay {
    /// Listens on `listen` and relays every connection to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr, delay: Duration) -> io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let local = listener.local_addr()?;
        let active = Arc::new(AtomicUsize::new(0));
        thread::Builder::new()
            .name(format!("tcp-relay {local}"))
            .spawn(move || {
                for client in listener.incoming().flatten() {
                    if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                        continue; // refused: dropping the stream closes it
                    }
                    match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
                        Ok(server) => {
                            active.fetch_add(1, Ordering::Relaxed);
                            splice(client, server, delay, Arc::new(Slot(active.clone())));
                        }
                        Err(_) => drop(client), // the target is down: refuse by closing
                    }
                }
            })?;
        Ok(Self { local })
    }

    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Relays `a` <-> `b`, each direction through its own delay line.
fn splice(a: TcpStream, b: TcpStream, delay: Duration, slot: Arc<Slot>) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    for (from, to) in [(&a, &b), (&b, &a)] {
        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
            return;
        };
        one_way(from, to, delay, &slot);
    }
}

/// Reader thread -> delay line -> writer thread; `None` marks end of
/// stream. A write that fails tears the whole connection down.
fn one_way(mut from: TcpStream, mut to: TcpStream, delay: Duration, slot: &Arc<Slot>) {
    let line = Arc::new(DelayLine::<Option<Vec<u8>>>::new(delay, WINDOW));
    let reader_line = line.clone();
    let reader_slot = Arc::clone(slot);
    let writer_slot = Arc::clone(slot);
    let Ok(source) = from.try_clone() else {
        return;
    };
    thread::spawn(move || {
        let _slot = reader_slot;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !reader_line.push(Some(buf[..n].to_vec()), n) {
                        return;
                    }
                }
            }
        }
        reader_line.push(None, 0);
        reader_line.close();
    });
    thread::spawn(move || {
        let _slot = writer_slot;
        while let Some(Some(chunk)) = line.pop() {
            if to.write_all(&chunk).is_err() {
                line.abandon();
                let _ = to.shutdown(Shutdown::Both);
                let _ = source.shutdown(Shutdown::Both);
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn round_trips_take_twice_the_delay_and_bytes_arrive_intact() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        thread::spawn(move || {
            for mut s in echo.incoming().flatten() {
                thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = io::copy(&mut r, &mut s);
                });
            }
        });
        let relay = TcpRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            echo_addr,
            Duration::from_millis(40),
        )
        .unwrap();
        let mut c = TcpStream::connect(relay.local_addr()).unwrap();
        c.set_nodelay(true).unwrap();
        let msg: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let start = Instant::now();
        c.write_all(&msg).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        let rtt = start.elapsed();
        assert_eq!(back, msg);
        assert!(
            rtt >= Duration::from_millis(80),
            "round trip {rtt:?} < 2 x 40 ms"
        );
        assert!(rtt < Duration::from_millis(1000), "round trip {rtt:?}");
    }

    #[test]
    fn connections_over_the_limit_are_refused_and_closed_ones_free_their_slot() {
        let target = TcpListener::bind("127.0.0.1:0").unwrap();
        let target_addr = target.local_addr().unwrap();
        // The target keeps every connection open until told to close them.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        thread::spawn(move || {
            let mut held = Vec::new();
            for s in target.incoming().flatten() {
                held.push(s);
                if held.len() == MAX_CONNECTIONS {
                    let _ = rx.recv();
                    held.clear();
                }
            }
        });
        let relay = TcpRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            target_addr,
            Duration::from_millis(1),
        )
        .unwrap();
        let mut open: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(relay.local_addr()).unwrap())
            .collect();
        // Wait until the relay has taken all of them.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let refused = loop {
            let mut extra = TcpStream::connect(relay.local_addr()).unwrap();
            extra
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut buf = [0u8; 1];
            match extra.read(&mut buf) {
                Ok(0) => break true,
                _ if std::time::Instant::now() > deadline => break false,
                _ => open.push(extra), // taken: the limit was not reached yet
            }
        };
        assert!(
            refused,
            "the relay took more than {MAX_CONNECTIONS} connections"
        );
        assert_eq!(open.len(), MAX_CONNECTIONS);
        // Closing them frees the slots.
        drop(open);
        tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = TcpStream::connect(relay.local_addr()).unwrap();
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 1];
            match c.read(&mut buf) {
                Ok(0) if std::time::Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(50))
                }
                Ok(0) => panic!("the relay still refuses after its connections closed"),
                _ => break, // timed out waiting for data: relayed
            }
        }
    }
}
