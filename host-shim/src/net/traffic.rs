//! What the shim measures of the traffic it carries, for the placement
//! scheduler (`GET /v1/stats`): per published port, the requests, bytes and
//! connections its clients made; per guest port, the frames and bytes its
//! virtio-net device sent and received.
//!
//! # What counts as a request
//!
//! The proxy does not parse application protocols. A **request** is a burst
//! of client bytes: data from the client that arrives after the proxy had
//! drained the client's socket, or after the app answered. With a
//! request/response protocol (RESP, HTTP/1.1 keep-alive) where the client
//! writes each request in one go, that is one request per request; requests
//! pipelined back to back in one write count as one. Each datagram to a
//! published UDP port is a request.
//!
//! The shim that received a request tells where its client is: in a fleet,
//! clients connect to the published port of the shim of their own region.
//! Counters only grow; the reader takes differences between two readings.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The counters of one published port, shared by its listener and its
/// proxied connections.
#[derive(Debug, Default)]
pub struct PortTraffic {
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connections: AtomicU64,
    closed: AtomicU64,
}

impl PortTraffic {
    /// A request: a new burst of bytes from a client.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes from clients to the app.
    pub fn inbound(&self, bytes: usize) {
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Bytes from the app to clients.
    pub fn outbound(&self, bytes: usize) {
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A client connection was accepted.
    pub fn opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection ended.
    pub fn closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now, for `host`/`proto` forwarding to `guest`.
    pub fn snapshot(&self, host: String, guest: String) -> PortStats {
        let connections = self.connections.load(Ordering::Relaxed);
        PortStats {
            host,
            guest,
            requests: self.requests.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            connections,
            open_connections: connections.saturating_sub(self.closed.load(Ordering::Relaxed)),
        }
    }
}

/// One published port's counters, as `GET /v1/stats` reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStats {
    /// `ADDR:PORT/PROTO` on the host.
    pub host: String,
    /// `ADDR:PORT` of the guest it forwards to.
    pub guest: String,
    /// Requests (bursts of client bytes; see the module docs).
    pub requests: u64,
    /// Bytes from clients to the app.
    pub bytes_in: u64,
    /// Bytes from the app to clients.
    pub bytes_out: u64,
    /// Client connections accepted (UDP: flows).
    pub connections: u64,
    /// Client connections open now.
    pub open_connections: u64,
}

/// Frame counters of a guest's network card, seen from the switch.
#[derive(Debug, Default)]
pub struct NicTraffic {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
}

impl NicTraffic {
    /// The guest sent `frames`.
    pub fn sent<'a>(&self, frames: impl IntoIterator<Item = &'a Vec<u8>>) {
        let (n, bytes) = count(frames);
        self.tx_packets.fetch_add(n, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The guest was handed `frames`.
    pub fn received<'a>(&self, frames: impl IntoIterator<Item = &'a Vec<u8>>) {
        let (n, bytes) = count(frames);
        self.rx_packets.fetch_add(n, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> NicStats {
        NicStats {
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
        }
    }
}

fn count<'a>(frames: impl IntoIterator<Item = &'a Vec<u8>>) -> (u64, u64) {
    frames
        .into_iter()
        .fold((0, 0), |(n, b), f| (n + 1, b + f.len() as u64))
}

/// A guest card's counters (since it attached to this shim).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up() {
        let t = PortTraffic::default();
        t.opened();
        t.opened();
        t.closed();
        t.request();
        t.inbound(10);
        t.outbound(30);
        let s = t.snapshot("127.0.0.1:1/tcp".into(), "10.0.2.16:6379".into());
        assert_eq!(
            (s.requests, s.bytes_in, s.bytes_out, s.connections),
            (1, 10, 30, 2)
        );
        assert_eq!(s.open_connections, 1);
        let n = NicTraffic::default();
        n.sent(&[vec![0u8; 60], vec![0u8; 100]]);
        n.received(&[vec![0u8; 42]]);
        assert_eq!(
            n.snapshot(),
            NicStats {
                tx_packets: 2,
                tx_bytes: 160,
                rx_packets: 1,
                rx_bytes: 42
            }
        );
    }
}
