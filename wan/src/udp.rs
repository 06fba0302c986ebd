//! A delaying UDP relay: datagrams sent to the listen address go to the
//! target, and the target's replies go back to the last sender, each
//! direction held for the one-way delay. At most [`QUEUE`] bytes wait in
//! each direction; more are dropped, as a router's full queue would.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::delay::DelayLine;

/// Bytes of datagrams held per direction.
pub const QUEUE: usize = 4 << 20;

/// A running UDP relay (its threads live until the process ends).
pub struct UdpRelay {
    local: SocketAddr,
}

impl UdpRelay {
    /// Relays datagrams between senders to `listen` and `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr, delay: Duration) -> io::Result<Self> {
        Self::start_from(listen, SocketAddr::new(listen.ip(), 0), target, delay)
    }

    /// Like [`Self::start`], talking to `target` from the address `from`
    /// (port 0: any), so that the target knows in advance where the relayed
    /// datagrams come from (an overlay peer configured with
    /// `--peer-via`, for instance).
    pub fn start_from(
        listen: SocketAddr,
        from: SocketAddr,
        target: SocketAddr,
        delay: Duration,
    ) -> io::Result<Self> {
        let front = UdpSocket::bind(listen)?;
        let local = front.local_addr()?;
        // The back socket talks to the target from an address of its own.
        let back = UdpSocket::bind(from)?;
        back.connect(target)?;
        let peer: Arc<Mutex<Option<SocketAddr>>> = Arc::default();

        let to_target = Arc::new(DelayLine::<Vec<u8>>::new(delay, QUEUE));
        let to_peer = Arc::new(DelayLine::<Vec<u8>>::new(delay, QUEUE));
        {
            let (front, line, peer) = (front.try_clone()?, to_target.clone(), peer.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf) {
                    *peer.lock().unwrap() = Some(from);
                    line.try_push(buf[..n].to_vec(), n);
                }
            });
        }
        {
            let (back, line) = (back.try_clone()?, to_peer.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf) {
                    line.try_push(buf[..n].to_vec(), n);
                }
            });
        }
        thread::spawn(move || {
            while let Some(d) = to_target.pop() {
                let _ = back.send(&d);
            }
        });
        thread::spawn(move || {
            while let Some(d) = to_peer.pop() {
                if let Some(p) = *peer.lock().unwrap() {
                    let _ = front.send_to(&d, p);
                }
            }
        });
        Ok(Self { local })
    }

    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn datagrams_go_both_ways_delayed_and_in_order() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let relay = UdpRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            echo_addr,
            Duration::from_millis(25),
        )
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let start = Instant::now();
        for i in 0..10u8 {
            client.send_to(&[i; 100], relay.local_addr()).unwrap();
        }
        let mut buf = [0u8; 2048];
        for i in 0..10u8 {
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 100]);
        }
        let rtt = start.elapsed();
        assert!(rtt >= Duration::from_millis(50), "{rtt:?}");
    }
}
