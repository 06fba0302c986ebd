//! The overlay between shims: guest Ethernet frames in UDP datagrams with
//! the VXLAN header (RFC 7348), so guests on different shims share one L2
//! network and a guest keeps its address wherever it runs.
//!
//! ```text
//!  0               1               2               3
//!  flags (0x08: VNI valid) | reserved (24 bits)
//!  VNI (24 bits)                           | reserved (8 bits)
//!  inner Ethernet frame ...
//! ```
//!
//! With a fleet key (daemons with an identity, see [`crate::security`]),
//! every datagram is sealed and opened at the socket by
//! [`crate::security::seal`]: unauthenticated or replayed datagrams are
//! dropped and counted before anything else looks at them.
//!
//! Every other shim is a port of the local switch ([`super::switch`]), so
//! MAC learning tells which shim a guest is behind. Peers come from
//! `--peer`, from migrations (both sides exchange their overlay address in
//! the handshake) and from any (authenticated, with a fleet key) datagram
//! with our VNI (a shim that sends to us is a peer). Frames from one peer are never forwarded to another
//! (split horizon: the overlay is a full mesh, so this cannot lose frames
//! and cannot loop them).
//!
//! Gateways: each shim's gateway has its own address and MAC (see the
//! daemon's `--shim-id`), so several gateways on one overlay never answer
//! for the same address; a guest that moved keeps using the gateway it
//! knew, over the overlay.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::port::Frame;
use crate::security::seal::Sealer;

/// Bytes of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The "VNI valid" flag.
const FLAG_I: u8 = 0x08;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// How a shim joins the overlay.
#[derive(Clone, Debug)]
pub struct OverlayConfig {
    /// The local UDP address.
    pub listen: SocketAddr,
    /// Peers known from the start.
    pub peers: Vec<SocketAddr>,
    /// The VXLAN network identifier of the fleet.
    pub vni: u32,
    /// The fleet's key: seal and authenticate every datagram.
    pub key: Option<[u8; 32]>,
}

/// Prepends the VXLAN header for `vni` to `frame`.
pub fn encapsulate(vni: u32, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + frame.len() + crate::security::seal::TRAILER_LEN);
    out.extend_from_slice(&[FLAG_I, 0, 0, 0]);
    out.extend_from_slice(&((vni & MAX_VNI) << 8).to_be_bytes());
    out.extend_from_slice(frame);
    out
}

/// The inner frame of a datagram for `vni`, or why it is not one.
pub fn decapsulate(vni: u32, datagram: &[u8]) -> Result<&[u8], String> {
    if datagram.len() < HEADER_LEN + 14 {
        return Err(format!("{} bytes is too short", datagram.len()));
    }
    if datagram[0] & FLAG_I == 0 {
        return Err("the VNI flag is not set".into());
    }
    let got = u32::from_be_bytes(datagram[4..8].try_into().expect("4 bytes")) >> 8;
    if got != vni {
        return Err(format!("VNI {got}, not ours ({vni})"));
    }
    Ok(&datagram[HEADER_LEN..])
}

/// The overlay's UDP socket.
pub struct Overlay {
    socket: UdpSocket,
    vni: u32,
    addr: SocketAddr,
    sealer: Option<Sealer>,
}

impl Overlay {
    pub fn bind(config: &OverlayConfig) -> io::Result<Self> {
        let socket = UdpSocket::bind(config.listen)?;
        socket.set_nonblocking(true)?;
        let addr = socket.local_addr()?;
        Ok(Self {
            socket,
            vni: config.vni,
            addr,
            sealer: config.key.map(Sealer::new),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// How many datagrams failed authentication (with a fleet key).
    pub fn rejected(&self) -> Option<Arc<AtomicU64>> {
        self.sealer.as_ref().map(Sealer::rejected)
    }

    /// Reads up to `max` datagrams of our VNI: (sender, inner frame).
    /// Returns whether it stopped because none were left.
    pub fn receive(&self, out: &mut Vec<(SocketAddr, Frame)>, max: usize) -> bool {
        let mut buf = [0u8; 65536];
        for _ in 0..max {
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let datagram = match &self.sealer {
                        Some(sealer) => match sealer.open_or_count(from, &buf[..n]) {
                            Some(d) => d,
                            None => continue,
                        },
                        None => &buf[..n],
                    };
                    match decapsulate(self.vni, datagram) {
                        Ok(frame) => out.push((from, frame.to_vec())),
                        Err(why) => tracing::debug!("overlay datagram from {from} dropped: {why}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP port unreachable from a peer that went away
                    // shows up here (ECONNREFUSED): not fatal.
                    tracing::debug!("overlay: {e}");
                    return true;
                }
            }
        }
        false
    }

    /// Sends `frames` (emptied) to `peer`.
    pub fn send(&self, peer: SocketAddr, frames: &mut Vec<Frame>) {
        for frame in frames.drain(..) {
            let mut datagram = encapsulate(self.vni, &frame);
            if let Some(sealer) = &self.sealer {
                sealer.seal(&mut datagram);
            }
            if let Err(e) = self.socket.send_to(&datagram, peer) {
                tracing::debug!("overlay: frame to {peer} dropped: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_headers() {
        let frame = [0xaau8; 60];
        let d = encapsulate(0x12_3456, &frame);
        assert_eq!(&d[..8], &[0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        assert_eq!(decapsulate(0x12_3456, &d).unwrap(), &frame[..]);
        assert!(decapsulate(7, &d).unwrap_err().contains("VNI"));
        assert!(decapsulate(0x12_3456, &d[..10]).is_err());
        let mut no_flag = d.clone();
        no_flag[0] = 0;
        assert!(decapsulate(0x12_3456, &no_flag).is_err());
    }

    #[test]
    fn frames_cross_between_two_sockets() {
        let cfg = |vni| OverlayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            peers: Vec::new(),
            vni,
            key: None,
        };
        let a = Overlay::bind(&cfg(5)).unwrap();
        let b = Overlay::bind(&cfg(5)).unwrap();
        a.send(b.local_addr(), &mut vec![vec![1u8; 60], vec![2u8; 1514]]);
        let mut got = Vec::new();
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 2 && std::time::Instant::now() < give_up {
            b.receive(&mut got, 16);
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (a.local_addr(), vec![1u8; 60]));
        assert_eq!(got[1].1.len(), 1514);
    }

    #[test]
    fn with_a_fleet_key_only_sealed_datagrams_get_in() {
        let cfg = |key| OverlayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            peers: Vec::new(),
            vni: 5,
            key,
        };
        let a = Overlay::bind(&cfg(Some([9; 32]))).unwrap();
        let b = Overlay::bind(&cfg(Some([9; 32]))).unwrap();
        let stranger = Overlay::bind(&cfg(None)).unwrap();
        let other_fleet = Overlay::bind(&cfg(Some([8; 32]))).unwrap();
        stranger.send(b.local_addr(), &mut vec![vec![3u8; 60]]);
        other_fleet.send(b.local_addr(), &mut vec![vec![4u8; 60]]);
        a.send(b.local_addr(), &mut vec![vec![1u8; 60]]);
        let mut got = Vec::new();
        let rejected = b.rejected().unwrap();
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while (got.is_empty() || rejected.load(std::sync::atomic::Ordering::Relaxed) < 2)
            && std::time::Instant::now() < give_up
        {
            b.receive(&mut got, 16);
        }
        assert_eq!(got, [(a.local_addr(), vec![1u8; 60])]);
        assert_eq!(rejected.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
