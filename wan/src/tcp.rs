//! A delaying TCP relay: accepts connections on a listen address and
//! forwards each to a target, holding every chunk for the one-way delay in
//! both directions. Half-closes are passed on (after the delay too).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::delay::DelayLine;

/// A running TCP relay (its threads live until the process ends).
pub struct TcpRelay {
    local: SocketAddr,
}

impl TcpRelay {
    /// Listens on `listen` and relays every connection to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr, delay: Duration) -> io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let local = listener.local_addr()?;
        thread::Builder::new()
            .name(format!("tcp-relay {local}"))
            .spawn(move || {
                for client in listener.incoming().flatten() {
                    match TcpStream::connect(target) {
                        Ok(server) => splice(client, server, delay),
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
fn splice(a: TcpStream, b: TcpStream, delay: Duration) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    for (from, to) in [(&a, &b), (&b, &a)] {
        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
            return;
        };
        one_way(from, to, delay);
    }
}

/// Reader thread -> delay line -> writer thread; `None` marks end of stream.
fn one_way(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let line = Arc::new(DelayLine::<Option<Vec<u8>>>::new(delay));
    let reader_line = line.clone();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => reader_line.push(Some(buf[..n].to_vec())),
            }
        }
        reader_line.push(None);
        reader_line.close();
    });
    thread::spawn(move || {
        while let Some(Some(chunk)) = line.pop() {
            if to.write_all(&chunk).is_err() {
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
}
