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
//! every datagram (frames and probes) is encrypted and authenticated at the
//! socket by [`crate::overlay_crypto`]: datagrams that do not
//! decrypt, are replayed, or are in the plain (or an older) format are
//! dropped and counted before anything else looks at them.
//!
//! Every other shim is a port of the local switch ([`super::switch`]), so
//! MAC learning tells which shim a guest is behind. Peers come from
//! `--peer`, from the pinned peers of a host with an identity (at their API
//! address) and from migrations (both sides exchange their overlay address
//! in the handshake, over the authenticated API). With a fleet key only
//! those addresses are peers: a datagram from any other address is dropped
//! and counted, however well sealed (a captured datagram resent from
//! elsewhere gets nowhere, and its sender learns nothing). Without one
//! (plain daemons on a trusted network) a shim that sends to us becomes a
//! peer, as before. Either way there are at most [`MAX_PEERS`] peers;
//! beyond that a new one is refused and logged. A peer whose address
//! changes is re-pinned at its new address (`host-shim peer add`), which
//! makes that address a peer within 100 ms. Frames from one peer are
//! never forwarded to another (split horizon: the overlay is a full mesh,
//! so this cannot lose frames and cannot loop them).
//!
//! # Probes
//!
//! Besides frames, shims exchange probes on the same socket, told apart by
//! their first bytes (a VXLAN header starts with its flags byte, 0x08; a
//! probe with `LCRP`):
//!
//! ```text
//!  "LCRP" | kind: b'Q' (probe) or b'A' (answer) | sent: u64 BE (the prober's clock, ns)
//!  | name length u8 | name | region length u8 | region
//! ```
//!
//! Every [`PROBE_INTERVAL`] each shim probes its peers; a peer answers with
//! the prober's timestamp and its own name and region. The round trip is
//! smoothed like TCP's SRTT (`srtt += (sample − srtt) / 8`) per peer
//! ([`Rtts`], `GET /v1/stats`). Through emulated WAN links the RTT is the
//! emulated one.
//!
//! # Relayed peers
//!
//! `--peer-via REAL=VIA` makes the shim reach the peer whose overlay
//! address is REAL at VIA (a relay, e.g. `wan-relay udp`), and treat
//! datagrams from VIA as from REAL. Peers are known by their real
//! addresses everywhere else (migrations, the switch), so traffic to them
//! always takes the relay. The daemon applies the same mapping to its TCP
//! connections to other daemons (`Daemon::peer_client`): a REAL that is a
//! peer's API address is reached at its VIA, a TCP relay.
//!
//! Gateways: each shim's gateway has its own address and MAC (see the
//! daemon's `--shim-id`), so several gateways on one overlay never answer
//! for the same address; a guest that moved keeps using the gateway it
//! knew, over the overlay.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::port::Frame;
use crate::overlay_crypto::{OverlayCrypto, OverlayKey, MAX_SENDERS};
use shim_util::limit::RateLimited;

/// Bytes of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The "VNI valid" flag (the first byte of a VXLAN datagram).
pub const FLAG_I: u8 = 0x08;
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
    /// Peers reached through a relay: (real address, relay address).
    pub via: Vec<(SocketAddr, SocketAddr)>,
    /// This shim's name and region, in probe answers.
    pub name: String,
    pub region: String,
    /// The fleet's key and this host's identity: encrypt and authenticate
    /// every datagram, take them only from the peers' addresses.
    pub key: Option<OverlayKey>,
}

/// Most peers a shim has (as many as sender identities it tracks).
pub const MAX_PEERS: usize = MAX_SENDERS;
/// At most one log line of each kind per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// How often a shim probes its peers.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The first bytes of a probe datagram.
pub const PROBE_MAGIC: &[u8; 4] = b"LCRP";

pub use api::stats::PeerRtt;

/// The round trips to each peer, shared with the daemon.
#[derive(Clone, Default)]
pub struct Rtts(Arc<Mutex<BTreeMap<SocketAddr, (PeerRtt, Instant)>>>);

impl Rtts {
    fn sample(&self, addr: SocketAddr, name: &str, region: &str, rtt: Duration) {
        let ms = rtt.as_secs_f64() * 1e3;
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (entry, at) = map.entry(addr).or_insert_with(|| {
            (
                PeerRtt {
                    addr: addr.to_string(),
                    srtt_ms: ms,
                    ..PeerRtt::default()
                },
                Instant::now(),
            )
        });
        entry.name = name.to_owned();
        entry.region = region.to_owned();
        entry.srtt_ms += (ms - entry.srtt_ms) / 8.0;
        entry.last_ms = ms;
        entry.samples += 1;
        *at = Instant::now();
    }

    /// Every peer that answered a probe.
    pub fn list(&self) -> Vec<PeerRtt> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .map(|(p, at)| PeerRtt {
                age_s: at.elapsed().as_secs_f64(),
                ..p.clone()
            })
            .collect()
    }
}

/// A probe or an answer: (is an answer, timestamp, name, region).
#[doc(hidden)]
pub fn encode_probe(answer: bool, sent: u64, name: &str, region: &str) -> Vec<u8> {
    let mut out = PROBE_MAGIC.to_vec();
    out.push(if answer { b'A' } else { b'Q' });
    out.extend_from_slice(&sent.to_be_bytes());
    for field in [name, region] {
        let bytes = &field.as_bytes()[..field.len().min(255)];
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    out
}

#[doc(hidden)]
pub fn decode_probe(d: &[u8]) -> Option<(bool, u64, String, String)> {
    let rest = d.strip_prefix(PROBE_MAGIC)?;
    let (&kind, rest) = rest.split_first()?;
    let sent = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let mut rest = &rest[8..];
    let mut field = || {
        let (&n, tail) = rest.split_first()?;
        let s = String::from_utf8_lossy(tail.get(..n as usize)?).into_owned();
        rest = &tail[n as usize..];
        Some(s)
    };
    let (name, region) = (field()?, field()?);
    match kind {
        b'Q' => Some((false, sent, name, region)),
        b'A' => Some((true, sent, name, region)),
        _ => None,
    }
}

/// Prepends the VXLAN header for `vni` to `frame`.
pub fn encapsulate(vni: u32, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + frame.len());
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
    /// Real peer address -> relay, and back.
    to_via: HashMap<SocketAddr, SocketAddr>,
    from_via: HashMap<SocketAddr, SocketAddr>,
    name: String,
    region: String,
    /// The clock of probe timestamps.
    epoch: Instant,
    rtts: Rtts,
    crypto: Option<OverlayCrypto>,
    /// The addresses datagrams are taken from (real addresses, not relays).
    peers: Mutex<HashSet<SocketAddr>>,
    rejected: Arc<AtomicU64>,
    drops_log: RateLimited,
    full_log: RateLimited,
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
            to_via: config.via.iter().copied().collect(),
            from_via: config.via.iter().map(|&(real, via)| (via, real)).collect(),
            name: config.name.clone(),
            region: config.region.clone(),
            epoch: Instant::now(),
            rtts: Rtts::default(),
            crypto: config.key.as_ref().map(OverlayCrypto::new),
            peers: Mutex::new(config.peers.iter().copied().collect()),
            rejected: Arc::default(),
            drops_log: RateLimited::new(LOG_EVERY),
            full_log: RateLimited::new(LOG_EVERY),
        })
    }

    /// Takes datagrams from `peer` from now on (whether it is a peer; not
    /// when [`MAX_PEERS`] are already, or it is this shim).
    pub fn add_peer(&self, peer: SocketAddr) -> bool {
        if peer == self.addr {
            return false;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.contains(&peer) {
            return true;
        }
        if peers.len() >= MAX_PEERS {
            if let Some(held) = self.full_log.allow() {
                tracing::warn!(
                    %peer,
                    refused = held + 1,
                    max_peers = MAX_PEERS,
                    "overlay: peers full, the peer is not added"
                );
            }
            return false;
        }
        peers.insert(peer);
        true
    }

    /// Takes no more datagrams from `peer` (a host that was unpinned).
    pub fn remove_peer(&self, peer: SocketAddr) -> bool {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.remove(&peer)
    }

    /// Whether a datagram from `from` may be looked at: it is a peer's, or
    /// (plain overlay only) its sender can become one.
    fn accepts(&self, from: SocketAddr) -> bool {
        if self.crypto.is_some() {
            let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            peers.contains(&from)
        } else {
            self.add_peer(from)
        }
    }

    /// Counts (and, rate-limited, logs) a dropped datagram.
    fn reject(&self, from: SocketAddr, why: impl fmt::Display) {
        let total = self.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(held) = self.drops_log.allow() {
            let n = held + 1;
            tracing::warn!(
                dropped = n,
                total,
                peer = %from,
                reason = %why,
                "overlay: dropped unauthenticated or replayed datagrams"
            );
        }
    }

    /// The round trips this overlay measures.
    pub fn rtts(&self) -> Rtts {
        self.rtts.clone()
    }

    /// Sends one datagram to `peer` (through its relay, if any),
    /// encrypted when there is a fleet key.
    fn send_datagram(&self, peer: SocketAddr, datagram: Vec<u8>) -> io::Result<usize> {
        let to = self.to_via.get(&peer).copied().unwrap_or(peer);
        let datagram = match &self.crypto {
            Some(crypto) => crypto.seal(peer, &datagram),
            None => datagram,
        };
        self.socket.send_to(&datagram, to)
    }

    /// Sends a probe to each of `peers`.
    pub fn probe(&self, peers: impl IntoIterator<Item = SocketAddr>) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let probe = encode_probe(false, now, &self.name, &self.region);
        for peer in peers {
            if let Err(e) = self.send_datagram(peer, probe.clone()) {
                tracing::debug!(%peer, error = %e, "overlay: probe not sent");
            }
        }
    }

    /// Answers a probe, or records the round trip of an answer.
    fn on_probe(&self, from: SocketAddr, datagram: &[u8]) {
        match decode_probe(datagram) {
            Some((false, sent, _, _)) => {
                let answer = encode_probe(true, sent, &self.name, &self.region);
                if let Err(e) = self.send_datagram(from, answer) {
                    tracing::debug!(peer = %from, error = %e, "overlay: probe answer not sent");
                }
            }
            Some((true, sent, name, region)) => {
                let now = self.epoch.elapsed().as_nanos() as u64;
                if let Some(rtt) = now.checked_sub(sent) {
                    self.rtts
                        .sample(from, &name, &region, Duration::from_nanos(rtt));
                }
            }
            None => tracing::debug!(peer = %from, "overlay: bad probe"),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// How many datagrams were dropped: from an address that is not a
    /// peer's, or (with a fleet key) that failed to open.
    pub fn rejected(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.rejected)
    }

    /// Reads up to `max` datagrams of our VNI: (sender, inner frame).
    /// Returns whether it stopped because none were left.
    pub fn receive(&self, out: &mut Vec<(SocketAddr, Frame)>, max: usize) -> bool {
        let mut buf = [0u8; 65536];
        for _ in 0..max {
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let from = self.from_via.get(&from).copied().unwrap_or(from);
                    if !self.accepts(from) {
                        self.reject(from, "not a peer's address");
                        continue;
                    }
                    let datagram = match &self.crypto {
                        Some(crypto) => match crypto.open(from, &mut buf[..n]) {
                            Ok(d) => d,
                            Err(why) => {
                                self.reject(from, why);
                                continue;
                            }
                        },
                        None => &buf[..n],
                    };
                    if datagram.starts_with(PROBE_MAGIC) {
                        self.on_probe(from, datagram);
                        continue;
                    }
                    match decapsulate(self.vni, datagram) {
                        Ok(frame) => out.push((from, frame.to_vec())),
                        Err(why) => {
                            tracing::debug!(peer = %from, reason = %why, "overlay: datagram dropped")
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP port unreachable from a peer that went away
                    // shows up here (ECONNREFUSED): not fatal.
                    tracing::debug!(error = %e, "overlay: receive failed");
                    return true;
                }
            }
        }
        false
    }

    /// Sends `frames` (emptied) to `peer`.
    pub fn send(&self, peer: SocketAddr, frames: &mut Vec<Frame>) {
        for frame in frames.drain(..) {
            if let Err(e) = self.send_datagram(peer, encapsulate(self.vni, &frame)) {
                tracing::debug!(%peer, error = %e, "overlay: frame dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay_crypto::HostId;

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
        let cfg = |vni| OverlayConfig { vni, ..cfg_plain() };
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
    fn probes_measure_the_round_trip_through_a_relay() {
        let cfg = |name: &str, via| OverlayConfig {
            via,
            name: name.into(),
            region: format!("{name}-region"),
            ..cfg_plain()
        };
        let b = Overlay::bind(&cfg("b", Vec::new())).unwrap();
        // A delaying relay in front of b: 20 ms each way.
        let relay = wan::udp::UdpRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            b.local_addr(),
            Duration::from_millis(20),
        )
        .unwrap();
        let a = Overlay::bind(&cfg("a", vec![(b.local_addr(), relay.local_addr())])).unwrap();
        let give_up = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while a.rtts().list().first().map_or(0, |p| p.samples) < 2 && Instant::now() < give_up {
            a.probe([b.local_addr()]);
            for _ in 0..50 {
                b.receive(&mut got, 16);
                a.receive(&mut got, 16);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        assert!(got.is_empty(), "probes are not frames");
        let rtts = a.rtts().list();
        assert_eq!(rtts.len(), 1, "{rtts:?}");
        let p = &rtts[0];
        assert_eq!(
            p.addr,
            b.local_addr().to_string(),
            "known by its real address"
        );
        assert_eq!((p.name.as_str(), p.region.as_str()), ("b", "b-region"));
        assert!(p.srtt_ms >= 40.0 && p.srtt_ms < 200.0, "{p:?}");
        assert!(decode_probe(b"LCRPX").is_none());
        assert!(decode_probe(&encode_probe(true, 7, "n", "r")).is_some());
    }

    fn secure(fleet: u8, host: u8) -> Overlay {
        Overlay::bind(&OverlayConfig {
            key: Some(OverlayKey {
                fleet: [fleet; 32],
                host: HostId([host; 8]),
            }),
            ..cfg_plain()
        })
        .unwrap()
    }

    /// Receives on `o` until `done(frames, rejected)` or 5 s.
    fn receive_until(
        o: &Overlay,
        done: impl Fn(&[(SocketAddr, Frame)], u64) -> bool,
    ) -> Vec<(SocketAddr, Frame)> {
        let mut got = Vec::new();
        let give_up = Instant::now() + Duration::from_secs(5);
        while !done(&got, o.rejected().load(Ordering::Relaxed)) && Instant::now() < give_up {
            o.receive(&mut got, 16);
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    #[test]
    fn with_a_fleet_key_only_peers_sealed_datagrams_get_in_and_frames_are_encrypted() {
        let (a, b) = (secure(9, 1), secure(9, 2));
        let other_fleet = secure(8, 3);
        let stranger = Overlay::bind(&cfg_plain()).unwrap();
        for o in [&a, &other_fleet] {
            assert!(b.add_peer(o.local_addr()));
        }
        assert!(b.add_peer(stranger.local_addr()));
        assert!(!b.add_peer(b.local_addr()), "not its own peer");
        stranger.send(b.local_addr(), &mut vec![vec![3u8; 60]]);
        other_fleet.send(b.local_addr(), &mut vec![vec![4u8; 60]]);
        a.send(b.local_addr(), &mut vec![b"a frame with a secret".to_vec()]);
        let got = receive_until(&b, |got, rejected| !got.is_empty() && rejected >= 2);
        assert_eq!(got, [(a.local_addr(), b"a frame with a secret".to_vec())]);
        assert_eq!(b.rejected().load(Ordering::Relaxed), 2);

        // What a sends, captured on the wire: encrypted; resent from an
        // address that is not a peer's, dropped; resent from a's, a replay.
        let spy = UdpSocket::bind("127.0.0.1:0").unwrap();
        spy.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        a.send(
            spy.local_addr().unwrap(),
            &mut vec![b"a frame with a secret".to_vec()],
        );
        let mut buf = [0u8; 2048];
        let (n, _) = spy.recv_from(&mut buf).unwrap();
        let captured = buf[..n].to_vec();
        assert!(!captured.windows(6).any(|w| w == b"secret"));
        spy.send_to(&captured, b.local_addr()).unwrap();
        let got = receive_until(&b, |_, rejected| rejected >= 3);
        assert!(got.is_empty());
        assert_eq!(b.rejected().load(Ordering::Relaxed), 3);
        assert!(!b.peers.lock().unwrap().contains(&spy.local_addr().unwrap()));
    }

    #[test]
    fn the_peer_list_is_bounded() {
        let plain = Overlay::bind(&cfg_plain()).unwrap();
        let secure = secure(1, 1);
        for o in [&plain, &secure] {
            for port in 0..MAX_PEERS as u16 {
                assert!(o.add_peer(SocketAddr::from(([10, 0, 0, 1], 1000 + port))));
            }
            assert!(!o.add_peer("10.0.0.2:1".parse().unwrap()));
            assert!(o.add_peer("10.0.0.1:1000".parse().unwrap()), "known");
            assert_eq!(o.peers.lock().unwrap().len(), MAX_PEERS);
        }
        // A plain overlay learns peers from datagrams, within the bound.
        let sender = Overlay::bind(&cfg_plain()).unwrap();
        sender.send(plain.local_addr(), &mut vec![vec![1u8; 60]]);
        let got = receive_until(&plain, |_, rejected| rejected >= 1);
        assert!(got.is_empty());
        assert_eq!(plain.rejected().load(Ordering::Relaxed), 1);
    }

    fn cfg_plain() -> OverlayConfig {
        OverlayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            peers: Vec::new(),
            vni: 5,
            key: None,
            via: Vec::new(),
            name: "test".into(),
            region: "here".into(),
        }
    }
}
