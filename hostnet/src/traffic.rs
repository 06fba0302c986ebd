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
//! Requests and bytes are also counted per client address (the first
//! [`MAX_CLIENTS`] addresses), so that a controller can map client networks
//! to regions (`host-shim schedule --client-region CIDR=REGION`). Counters
//! only grow; the reader takes differences between two readings.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Client addresses counted separately per port; later ones only count
/// in the port's totals.
pub const MAX_CLIENTS: usize = 1024;

/// The counters of one published port, shared by its listener and its
/// proxied connections.
#[derive(Debug, Default)]
pub struct PortTraffic {
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connections: AtomicU64,
    closed: AtomicU64,
    /// (requests, bytes from it) per client address.
    clients: Mutex<BTreeMap<IpAddr, (u64, u64)>>,
}

impl PortTraffic {
    /// A request from `client`: a new burst of bytes.
    pub fn request(&self, client: IpAddr) {
        self.per_client(client, 1, 0);
    }

    /// Bytes from `client` to the app.
    pub fn inbound(&self, client: IpAddr, bytes: usize) {
        self.per_client(client, 0, bytes as u64);
    }

    /// Counts in the port's totals and its client's, under one lock, so a
    /// snapshot never sees a request in the totals that its client's
    /// counters do not have yet (the scheduler would give it to the port's
    /// region instead of the client's).
    fn per_client(&self, client: IpAddr, requests: u64, bytes: u64) {
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        self.requests.fetch_add(requests, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        let full = map.len() >= MAX_CLIENTS;
        match map.get_mut(&client) {
            Some(c) => {
                c.0 += requests;
                c.1 += bytes;
            }
            None if !full => {
                map.insert(client, (requests, bytes));
            }
            None => {}
        }
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
    pub fn snapshot(&self, host: String, guest: std::net::SocketAddrV4) -> PortStats {
        let connections = self.connections.load(Ordering::Relaxed);
        let map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let clients = map
            .iter()
            .map(|(addr, &(requests, bytes_in))| ClientStats {
                addr: addr.to_string(),
                requests,
                bytes_in,
            })
            .collect();
        // Read under the clients' lock: the totals and the clients agree.
        let (requests, bytes_in) = (
            self.requests.load(Ordering::Relaxed),
            self.bytes_in.load(Ordering::Relaxed),
        );
        drop(map);
        PortStats {
            host,
            guest,
            requests,
            bytes_in,
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            connections,
            open_connections: connections.saturating_sub(self.closed.load(Ordering::Relaxed)),
            clients,
        }
    }
}

pub use api::stats::{ClientStats, NicStats, PortStats};

/// Frame counters of a guest's network card, seen from the switch.
#[derive(Debug, Default)]
pub struct NicTraffic {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    rx_dropped: AtomicU64,
    flood_dropped: AtomicU64,
    rx_polled: AtomicU64,
    tx_polled: AtomicU64,
}

impl NicTraffic {
    /// A frame from the guest was dropped: its queue to the switch is full.
    pub fn dropped_tx(&self) {
        self.tx_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A frame for the guest was dropped: its backlog is full.
    pub fn dropped_rx(&self) {
        self.rx_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A frame the guest flooded (broadcast, multicast, unknown unicast)
    /// was dropped: over its rate.
    pub fn dropped_flood(&self) {
        self.flood_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The network thread moved frames itself while the guest polled:
    /// `delivered` into its ring, `sent` out of it.
    pub fn polled(&self, delivered: usize, sent: usize) {
        self.rx_polled
            .fetch_add(delivered as u64, Ordering::Relaxed);
        self.tx_polled.fetch_add(sent as u64, Ordering::Relaxed);
    }

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
            tx_dropped: self.tx_dropped.load(Ordering::Relaxed),
            rx_dropped: self.rx_dropped.load(Ordering::Relaxed),
            flood_dropped: self.flood_dropped.load(Ordering::Relaxed),
            rx_polled: self.rx_polled.load(Ordering::Relaxed),
            tx_polled: self.tx_polled.load(Ordering::Relaxed),
        }
    }
}

fn count<'a>(frames: impl IntoIterator<Item = &'a Vec<u8>>) -> (u64, u64) {
    frames
        .into_iter()
        .fold((0, 0), |(n, b), f| (n + 1, b + f.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up() {
        let t = PortTraffic::default();
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        t.opened();
        t.opened();
        t.closed();
        t.request(client);
        t.inbound(client, 10);
        t.outbound(30);
        let s = t.snapshot("127.0.0.1:1/tcp".into(), "10.0.2.16:6379".parse().unwrap());
        assert_eq!(
            (s.requests, s.bytes_in, s.bytes_out, s.connections),
            (1, 10, 30, 2)
        );
        assert_eq!(s.open_connections, 1);
        assert_eq!(
            s.clients,
            [ClientStats {
                addr: "192.0.2.7".into(),
                requests: 1,
                bytes_in: 10
            }]
        );
        let n = NicTraffic::default();
        n.sent(&[vec![0u8; 60], vec![0u8; 100]]);
        n.received(&[vec![0u8; 42]]);
        assert_eq!(
            n.snapshot(),
            NicStats {
                tx_packets: 2,
                tx_bytes: 160,
                rx_packets: 1,
                rx_bytes: 42,
                ..NicStats::default()
            }
        );
    }

    #[test]
    fn a_snapshot_taken_while_requests_arrive_gives_each_to_its_client() {
        let t = std::sync::Arc::new(PortTraffic::default());
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let counting = {
            let t = std::sync::Arc::clone(&t);
            std::thread::spawn(move || {
                for _ in 0..200_000 {
                    t.request(client);
                    t.inbound(client, 3);
                }
            })
        };
        let guest = "10.0.2.16:6379".parse().unwrap();
        while !counting.is_finished() {
            let s = t.snapshot("127.0.0.1:1/tcp".into(), guest);
            let (requests, bytes) = s
                .clients
                .iter()
                .fold((0, 0), |(r, b), c| (r + c.requests, b + c.bytes_in));
            assert_eq!((s.requests, s.bytes_in), (requests, bytes));
        }
        counting.join().unwrap();
    }
}
