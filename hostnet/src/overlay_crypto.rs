//! Encrypts and authenticates overlay datagrams (ChaCha20-Poly1305) with
//! keys derived from the fleet's key, and refuses replays: a stranger who can
//! reach or watch a shim's UDP port can neither read guest frames, nor inject
//! them, nor replay captured ones. This module owns the wire format of a
//! secure overlay datagram, the per-sender keys and the replay windows.
//!
//! ```text
//!  0..3    magic "LCO"
//!  3       version (2)
//!  4..12   sender: its HostId (the first 8 bytes of its certificate fingerprint)
//!  12..20  session: random, drawn when the sender's overlay starts
//!  20..28  receiver: its HostId, once the sender heard from it (zeros before)
//!  28..36  counter: u64 BE, the sender's clock in µs, strictly increasing
//!  36..    ciphertext of the VXLAN datagram or probe
//!  last 16 Poly1305 tag
//!
//!  key   = HKDF-SHA256(salt "host-shim overlay v2", fleet key)
//!            .expand(info = sender | session)       (one key per sender and boot)
//!  nonce = 0u32 | counter                           (never repeats under one key)
//!  AAD   = bytes 0..36
//! ```
//!
//! A fresh random session per start means a restarted shim never reuses a
//! (key, nonce) pair, whatever its clock does. The receiver drops a datagram
//! ([`OpenError`]) unless it has this format and version, was not sent by
//! this host itself (a reflection), names this host or nobody as its
//! receiver (so what a peer sent to one host cannot be replayed into
//! another once they have talked), carries a counter within [`MAX_SKEW`] of
//! the receiver's clock, decrypts under the sender's key, and is new: per
//! sender identity (not per address, and across its sessions, since the
//! counters are its clock) the highest counter and a bitmap of the
//! [`WINDOW`] counters below it are kept. (So a sender whose clock stepped
//! back across a restart is refused as replayed until its clock passes the
//! last counter it sent before.)
//!
//! A sender identity speaks from one address: a datagram from another
//! address in the same session is refused ([`OpenError::Moved`]) until the
//! identity has been silent for [`FORGET_AFTER`]. A peer whose address
//! legitimately changes restarts (a new session), and a new session may
//! come from any address the overlay accepts (see [`crate::overlay`]:
//! only the configured and pinned peers' addresses). At most
//! [`MAX_SENDERS`] identities are tracked; one silent for [`FORGET_AFTER`]
//! (longer than a replay of its datagrams stays fresh) makes room.
//!
//! Every host of a fleet holds the fleet key, so it could speak under
//! another member's identity: the identity keeps strangers and replays out,
//! it does not separate the members of a fleet from each other.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;

/// The first bytes of every secure overlay datagram.
pub const MAGIC: &[u8; 3] = b"LCO";
/// The format's version (1 was the HMAC-only trailer format).
pub const VERSION: u8 = 2;
/// Bytes of the clear header (the AAD).
pub const HEADER_LEN: usize = 36;
/// Bytes of the Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes each datagram grows by.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Counters (µs of the sender's clock) remembered below the highest seen.
pub const WINDOW: u64 = 4096;
/// How far a counter may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(60);
/// A sender silent this long is forgotten (its address may change, its
/// slot may go to another): every datagram it sent is stale by then.
pub const FORGET_AFTER: Duration = Duration::from_secs(3 * MAX_SKEW.as_secs());
/// Sender identities tracked at once.
pub const MAX_SENDERS: usize = 256;
const SALT: &[u8] = b"host-shim overlay v2";

/// A host's identity on the overlay: the first 8 bytes of its certificate
/// fingerprint. All zeros means "nobody" (an unknown receiver).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostId(pub [u8; 8]);

impl HostId {
    pub const NONE: Self = Self([0; 8]);

    /// The id of the host whose certificate fingerprint (SHA-256 of its
    /// DER) is `fingerprint`.
    pub fn of(fingerprint: &[u8; 32]) -> Self {
        Self(fingerprint[..8].try_into().expect("8 bytes"))
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a shim needs to join a secure overlay.
#[derive(Clone)]
pub struct OverlayKey {
    /// The fleet's key (`DIR/fleet.key`).
    pub fleet: [u8; 32],
    /// This host.
    pub host: HostId,
}

impl OverlayKey {
    /// `host` is this host's certificate fingerprint.
    pub fn new(fleet: [u8; 32], host: &[u8; 32]) -> Self {
        Self {
            fleet,
            host: HostId::of(host),
        }
    }
}

impl fmt::Debug for OverlayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OverlayKey(host {}, fleet key redacted)", self.host)
    }
}

/// Why a datagram was dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("{0} bytes is too short for an overlay datagram")]
    Short(usize),
    #[error(
        "a plain VXLAN or probe datagram (a sender without the fleet key, \
         or older than overlay format {VERSION})"
    )]
    Plain,
    #[error("not an overlay datagram")]
    NotOverlay,
    #[error("overlay format version {0}, this host speaks {VERSION}")]
    Version(u8),
    #[error("counter {0} µs away from this host's clock")]
    Stale(i128),
    #[error("sent by this host (reflected)")]
    Reflected,
    #[error("meant for host {0}")]
    NotForUs(HostId),
    #[error("host {host} speaks from {bound}")]
    Moved { host: HostId, bound: SocketAddr },
    #[error("does not decrypt (not sealed with this fleet's key, or tampered)")]
    BadTag,
    #[error("replayed (counter already seen or too old)")]
    Replay,
    #[error("{MAX_SENDERS} sender identities are active already")]
    TooManySenders,
}

/// The clear header of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub sender: HostId,
    pub session: [u8; 8],
    pub receiver: HostId,
    pub counter: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..3].copy_from_slice(MAGIC);
        out[3] = VERSION;
        out[4..12].copy_from_slice(&self.sender.0);
        out[12..20].copy_from_slice(&self.session);
        out[20..28].copy_from_slice(&self.receiver.0);
        out[28..36].copy_from_slice(&self.counter.to_be_bytes());
        out
    }

    /// The header of `datagram`, checking its format and version only.
    pub fn parse(datagram: &[u8]) -> Result<Self, OpenError> {
        if datagram.first() == Some(&crate::overlay::FLAG_I)
            || datagram.starts_with(crate::overlay::PROBE_MAGIC)
        {
            return Err(OpenError::Plain);
        }
        if datagram.len() < 4 || !datagram.starts_with(MAGIC) {
            return Err(OpenError::NotOverlay);
        }
        if datagram[3] != VERSION {
            return Err(OpenError::Version(datagram[3]));
        }
        if datagram.len() < OVERHEAD {
            return Err(OpenError::Short(datagram.len()));
        }
        let field = |at: usize| -> [u8; 8] { datagram[at..at + 8].try_into().expect("8 bytes") };
        Ok(Self {
            sender: HostId(field(4)),
            session: field(12),
            receiver: HostId(field(20)),
            counter: u64::from_be_bytes(field(28)),
        })
    }
}

/// A sender heard from.
struct Sender {
    addr: SocketAddr,
    session: [u8; 8],
    key: LessSafeKey,
    window: Window,
    last: Instant,
}

/// Seals outgoing and opens incoming datagrams of one shim.
pub struct OverlayCrypto {
    me: HostId,
    session: [u8; 8],
    prk: hkdf::Prk,
    key: LessSafeKey,
    last: AtomicU64,
    senders: Mutex<HashMap<HostId, Sender>>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A random session id from the operating system.
fn random() -> [u8; 8] {
    let mut out = [0u8; 8];
    getrandom::getrandom(&mut out).expect("the operating system's random source works");
    out
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[NONCE_LEN - 8..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl OverlayCrypto {
    /// A new session of `key.host` (a random session id).
    pub fn new(key: &OverlayKey) -> Self {
        Self::with_session(key, random())
    }

    fn with_session(key: &OverlayKey, session: [u8; 8]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(&key.fleet);
        Self {
            me: key.host,
            session,
            key: derive(&prk, key.host, session),
            prk,
            last: AtomicU64::new(0),
            senders: Mutex::new(HashMap::new()),
        }
    }

    /// This host's identity.
    pub fn host(&self) -> HostId {
        self.me
    }

    fn senders(&self) -> std::sync::MutexGuard<'_, HashMap<HostId, Sender>> {
        self.senders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `plain` encrypted for the peer at `to` (its identity goes in the
    /// header once it has spoken to us from that address).
    pub fn seal(&self, to: SocketAddr, plain: &[u8]) -> Vec<u8> {
        let now = now_us();
        let prev = self
            .last
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .expect("the closure always returns Some");
        self.seal_at(to, now.max(prev + 1), plain)
    }

    /// [`Self::seal`] with this counter.
    fn seal_at(&self, to: SocketAddr, counter: u64, plain: &[u8]) -> Vec<u8> {
        let receiver = self
            .senders()
            .iter()
            .find(|(_, s)| s.addr == to)
            .map_or(HostId::NONE, |(id, _)| *id);
        let header = Header {
            sender: self.me,
            session: self.session,
            receiver,
            counter,
        };
        let aad = header.encode();
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.extend_from_slice(&aad);
        out.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), &mut out[HEADER_LEN..])
            .expect("a datagram is far below ChaCha20-Poly1305's limit");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// The plaintext of `datagram` (decrypted in place) received from
    /// `from`, if it is authentic, fresh, new and for us.
    pub fn open<'a>(
        &self,
        from: SocketAddr,
        datagram: &'a mut [u8],
    ) -> Result<&'a [u8], OpenError> {
        let h = Header::parse(datagram)?;
        if h.sender == self.me {
            return Err(OpenError::Reflected);
        }
        if h.receiver != HostId::NONE && h.receiver != self.me {
            return Err(OpenError::NotForUs(h.receiver));
        }
        let skew = i128::from(h.counter) - i128::from(now_us());
        if skew.unsigned_abs() > MAX_SKEW.as_micros() {
            return Err(OpenError::Stale(skew));
        }
        let mut senders = self.senders();
        let known = senders.get(&h.sender);
        if let Some(s) = known {
            if s.addr != from && s.session == h.session && s.last.elapsed() < FORGET_AFTER {
                return Err(OpenError::Moved {
                    host: h.sender,
                    bound: s.addr,
                });
            }
            if !s.window.is_new(h.counter) {
                return Err(OpenError::Replay);
            }
        }
        let mut derived = None;
        let key = match known {
            Some(s) if s.session == h.session => &s.key,
            _ => derived.insert(derive(&self.prk, h.sender, h.session)),
        };
        let (aad, sealed) = datagram.split_at_mut(HEADER_LEN);
        let plain = key
            .open_in_place(nonce(h.counter), Aad::from(&aad[..]), sealed)
            .map_err(|_| OpenError::BadTag)?;
        if !senders.contains_key(&h.sender) && senders.len() >= MAX_SENDERS {
            senders.retain(|_, s| s.last.elapsed() < FORGET_AFTER);
            if senders.len() >= MAX_SENDERS {
                return Err(OpenError::TooManySenders);
            }
        }
        let now = Instant::now();
        if let Some(key) = derived {
            // A new sender, or a new session of one (its window stays:
            // its counters are its clock, across sessions).
            let window = senders
                .remove(&h.sender)
                .map(|s| s.window)
                .unwrap_or_default();
            senders.insert(
                h.sender,
                Sender {
                    addr: from,
                    session: h.session,
                    key,
                    window,
                    last: now,
                },
            );
        }
        let s = senders
            .get_mut(&h.sender)
            .expect("a sender without a new key is known");
        s.addr = from;
        s.last = now;
        s.window.record(h.counter);
        Ok(plain)
    }
}

/// The key `sender` seals with in `session`.
fn derive(prk: &hkdf::Prk, sender: HostId, session: [u8; 8]) -> LessSafeKey {
    let info = [&sender.0[..], &session[..]];
    let okm = prk
        .expand(&info, &CHACHA20_POLY1305)
        .expect("a 32-byte key is within HKDF's limit");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// A sender's replay window.
#[derive(Default)]
struct Window {
    highest: u64,
    bits: Vec<u64>,
}

impl Window {
    fn bit(counter: u64) -> (usize, u64) {
        let i = counter % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// Whether `counter` was not seen and is not too old.
    fn is_new(&self, counter: u64) -> bool {
        if counter > self.highest || self.bits.is_empty() {
            return true;
        }
        if self.highest - counter >= WINDOW {
            return false;
        }
        let (w, b) = Self::bit(counter);
        self.bits[w] & b == 0
    }

    /// Remembers `counter` (which [`Self::is_new`] took).
    fn record(&mut self, counter: u64) {
        if self.bits.is_empty() {
            self.bits = vec![0; (WINDOW / 64) as usize];
        }
        if counter > self.highest {
            if counter - self.highest >= WINDOW {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for c in self.highest + 1..counter {
                    let (w, b) = Self::bit(c);
                    self.bits[w] &= !b;
                }
            }
            self.highest = counter;
        }
        let (w, b) = Self::bit(counter);
        self.bits[w] |= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn host(n: u8, fleet: u8) -> OverlayCrypto {
        OverlayCrypto::new(&OverlayKey {
            fleet: [fleet; 32],
            host: HostId([n; 8]),
        })
    }

    const FRAME: &[u8] = b"\x08\0\0\0\0\x10\x92\0an inner frame: GET secret-key";

    #[test]
    fn round_trip_and_the_plaintext_is_not_on_the_wire() {
        let (a, b) = (host(1, 7), host(2, 7));
        let mut d = a.seal(addr(2), FRAME);
        assert_eq!(d.len(), FRAME.len() + OVERHEAD);
        assert!(!d.windows(10).any(|w| FRAME.windows(10).any(|f| f == w)));
        assert_eq!(b.open(addr(1), &mut d).unwrap(), FRAME);
    }

    #[test]
    fn any_tampered_byte_a_wrong_key_or_a_short_datagram_is_refused() {
        let a = host(1, 7);
        let d = a.seal(addr(2), FRAME);
        for i in 0..d.len() {
            let mut t = d.clone();
            t[i] ^= 0x40;
            let err = host(2, 7).open(addr(1), &mut t).unwrap_err();
            assert!(
                matches!(
                    err,
                    OpenError::BadTag
                        | OpenError::NotOverlay
                        | OpenError::Version(_)
                        | OpenError::Reflected
                        | OpenError::NotForUs(_)
                        | OpenError::Stale(_)
                ),
                "byte {i}: {err}"
            );
        }
        assert_eq!(
            host(2, 8).open(addr(1), &mut d.clone()),
            Err(OpenError::BadTag)
        );
        assert_eq!(
            host(2, 7).open(addr(1), &mut d[..OVERHEAD - 1].to_vec()),
            Err(OpenError::Short(OVERHEAD - 1))
        );
    }

    #[test]
    fn replays_from_the_same_or_another_address_are_refused() {
        let (a, b) = (host(1, 7), host(2, 7));
        let d = a.seal(addr(2), FRAME);
        assert!(b.open(addr(1), &mut d.clone()).is_ok());
        assert_eq!(b.open(addr(1), &mut d.clone()), Err(OpenError::Replay));
        assert!(matches!(
            b.open(addr(9), &mut d.clone()),
            Err(OpenError::Moved { bound, .. }) if bound == addr(1)
        ));
        // A fresh datagram of a's session from another address: a's
        // identity stays bound to where it speaks from.
        assert!(matches!(
            b.open(addr(9), &mut a.seal(addr(2), FRAME)),
            Err(OpenError::Moved { .. })
        ));
        // After a restart (a new session) it may speak from a new address,
        // and its old session's datagrams stay refused.
        let a2 = OverlayCrypto::with_session(
            &OverlayKey {
                fleet: [7; 32],
                host: HostId([1; 8]),
            },
            [0xee; 8],
        );
        assert!(b.open(addr(9), &mut a2.seal(addr(2), FRAME)).is_ok());
        assert!(b.open(addr(1), &mut d.clone()).is_err());
    }

    #[test]
    fn reflections_and_datagrams_meant_for_another_host_are_refused() {
        let (a, b, c) = (host(1, 7), host(2, 7), host(3, 7));
        assert_eq!(
            a.open(addr(2), &mut a.seal(addr(2), FRAME)),
            Err(OpenError::Reflected)
        );
        // Once a heard from b, what a sends b names b; c refuses it.
        assert!(a.open(addr(2), &mut b.seal(addr(1), FRAME)).is_ok());
        let for_b = a.seal(addr(2), FRAME);
        assert_eq!(
            c.open(addr(1), &mut for_b.clone()),
            Err(OpenError::NotForUs(HostId([2; 8])))
        );
        assert!(b.open(addr(1), &mut for_b.clone()).is_ok());
    }

    #[test]
    fn nonces_never_repeat_within_or_across_sessions() {
        let key = OverlayKey {
            fleet: [5; 32],
            host: HostId([1; 8]),
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            // A restart: a new session; the clock may even be the same.
            let a = OverlayCrypto::new(&key);
            for _ in 0..1000 {
                let h = Header::parse(&a.seal(addr(2), FRAME)).unwrap();
                assert!(seen.insert((h.session, h.counter)), "{h:?}");
            }
        }
        assert_eq!(seen.len(), 3000);
        // Different sessions (hence keys) seal the same frame differently.
        let (x, y) = (OverlayCrypto::new(&key), OverlayCrypto::new(&key));
        assert_ne!(
            x.seal(addr(2), FRAME)[HEADER_LEN..],
            y.seal(addr(2), FRAME)[HEADER_LEN..]
        );
    }

    #[test]
    fn old_and_foreign_formats_are_named() {
        let b = host(2, 7);
        let mut vxlan = FRAME.to_vec();
        assert_eq!(b.open(addr(1), &mut vxlan), Err(OpenError::Plain));
        assert_eq!(
            b.open(addr(1), &mut b"LCRPQ...".to_vec()),
            Err(OpenError::Plain)
        );
        assert_eq!(
            b.open(addr(1), &mut b"garbage".to_vec()),
            Err(OpenError::NotOverlay)
        );
        let mut v3 = host(1, 7).seal(addr(2), FRAME);
        v3[3] = 3;
        assert_eq!(b.open(addr(1), &mut v3), Err(OpenError::Version(3)));
    }

    #[test]
    fn reordering_within_the_window_is_taken_and_the_clock_bounds_replays() {
        let (a, b) = (host(1, 3), host(2, 3));
        let sealed: Vec<Vec<u8>> = (0..100).map(|_| a.seal(addr(2), FRAME)).collect();
        for d in sealed.iter().rev() {
            assert!(b.open(addr(1), &mut d.clone()).is_ok());
        }
        for d in &sealed {
            assert_eq!(b.open(addr(1), &mut d.clone()), Err(OpenError::Replay));
        }
        let mut w = Window::default();
        for (c, new) in [
            (10_000, true),
            (10_000 - WINDOW + 1, true),
            (10_000 - WINDOW, false),
            (10_000 + 3 * WINDOW, true),
            (10_000, false),
            (10_000 + 3 * WINDOW, false),
        ] {
            assert_eq!(w.is_new(c), new, "{c}");
            if new {
                w.record(c);
            }
        }
        // Sealed with a clock two minutes behind: stale.
        let mut d = a.seal_at(addr(2), now_us() - 120_000_000, FRAME);
        assert!(matches!(b.open(addr(1), &mut d), Err(OpenError::Stale(_))));
    }

    #[test]
    fn sender_identities_are_bounded() {
        let b = host(2, 7);
        for n in 0..MAX_SENDERS {
            let id = HostId((n as u64 + 1000).to_be_bytes());
            let s = OverlayCrypto::new(&OverlayKey {
                fleet: [7; 32],
                host: id,
            });
            assert!(b.open(addr(1), &mut s.seal(addr(2), FRAME)).is_ok());
        }
        let one_more = host(9, 7);
        assert_eq!(
            b.open(addr(1), &mut one_more.seal(addr(2), FRAME)),
            Err(OpenError::TooManySenders)
        );
        assert_eq!(b.senders().len(), MAX_SENDERS);
    }

    /// Per-datagram cost of seal + open (a full frame, a small one), printed.
    #[test]
    fn seal_and_open_cost() {
        let (a, b) = (host(1, 7), host(2, 7));
        for len in [1514, 90] {
            let frame = vec![0x5a; len];
            let n = 20_000;
            let start = Instant::now();
            for _ in 0..n {
                let mut d = a.seal(addr(2), &frame);
                assert_eq!(b.open(addr(1), &mut d).map(<[u8]>::len), Ok(len));
            }
            let per = start.elapsed() / n;
            println!("overlay seal+open of a {len}-byte frame: {per:?} per datagram");
            assert!(per < Duration::from_millis(1), "{per:?}");
        }
    }
}
