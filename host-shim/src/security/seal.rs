//! Authenticates overlay datagrams with the fleet's key, so a stranger who
//! can reach a shim's UDP port cannot inject frames into its switch nor
//! replay frames it captured.
//!
//! ```text
//! datagram = VXLAN header, inner frame, counter: u64 BE, tag: 16 bytes
//! tag      = HMAC-SHA256(fleet key, "host-shim overlay v1" | header | frame | counter)[..16]
//! ```
//!
//! The counter is the sender's clock in microseconds since the Unix epoch,
//! made strictly increasing (`max(last + 1, now)`), so it survives sender
//! restarts without state. The receiver drops a datagram whose tag does not
//! verify, whose counter is more than [`MAX_SKEW`] away from its own clock
//! (a replay from long ago, or a badly wrong clock), or that it has seen
//! already: per sender address it keeps the highest counter and a bitmap of
//! the [`WINDOW`] counters below it (datagrams reordered by up to about
//! 4 ms of the sender's time are still taken). Drops are counted
//! ([`Sealer::rejected`]) and logged at most once per [`LOG_EVERY`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the truncated tag.
pub const TAG_LEN: usize = 16;
/// Bytes added to each datagram.
pub const TRAILER_LEN: usize = 8 + TAG_LEN;
/// Counters (µs of the sender's clock) remembered below the highest seen.
pub const WINDOW: u64 = 4096;
/// How far a counter may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(60);
/// At most one log line per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
const LABEL: &[u8] = b"host-shim overlay v1";

/// Why a datagram was dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("too short to carry a tag")]
    Short,
    #[error("bad MAC (not sealed with this fleet's key)")]
    BadMac,
    #[error("counter {0} µs away from this host's clock")]
    Stale(i128),
    #[error("replayed (counter already seen or too old)")]
    Replay,
}

/// Seals outgoing and opens incoming datagrams of one shim.
pub struct Sealer {
    key: [u8; 32],
    last: AtomicU64,
    windows: Mutex<HashMap<SocketAddr, Window>>,
    rejected: Arc<AtomicU64>,
    log: Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    last: Option<Instant>,
    since: u64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Sealer {
    pub fn new(key: [u8; 32]) -> Self {
        Self {
            key,
            last: AtomicU64::new(0),
            windows: Mutex::new(HashMap::new()),
            rejected: Arc::new(AtomicU64::new(0)),
            log: Mutex::new(LogState::default()),
        }
    }

    /// Datagrams dropped so far.
    pub fn rejected(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.rejected)
    }

    fn tag(&self, body: &[u8], counter: [u8; 8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(LABEL);
        mac.update(body);
        mac.update(&counter);
        mac
    }

    /// Appends the counter and tag to `datagram`.
    pub fn seal(&self, datagram: &mut Vec<u8>) {
        let now = now_us();
        let prev = self
            .last
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .expect("the closure always returns Some");
        let counter = now.max(prev + 1).to_be_bytes();
        let tag = self.tag(datagram, counter).finalize().into_bytes();
        datagram.extend_from_slice(&counter);
        datagram.extend_from_slice(&tag[..TAG_LEN]);
    }

    /// The datagram without its trailer, if it is authentic, fresh and new.
    pub fn open<'a>(&self, from: SocketAddr, datagram: &'a [u8]) -> Result<&'a [u8], OpenError> {
        let split = datagram
            .len()
            .checked_sub(TRAILER_LEN)
            .ok_or(OpenError::Short)?;
        let (body, trailer) = datagram.split_at(split);
        let counter: [u8; 8] = trailer[..8].try_into().expect("8 bytes");
        self.tag(body, counter)
            .verify_truncated_left(&trailer[8..])
            .map_err(|_| OpenError::BadMac)?;
        let counter = u64::from_be_bytes(counter);
        let skew = i128::from(counter) - i128::from(now_us());
        if skew.unsigned_abs() > MAX_SKEW.as_micros() {
            return Err(OpenError::Stale(skew));
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.entry(from).or_default().accept(counter) {
            Ok(body)
        } else {
            Err(OpenError::Replay)
        }
    }

    /// [`Self::open`], counting and (rate-limited) logging what it drops.
    pub fn open_or_count<'a>(&self, from: SocketAddr, datagram: &'a [u8]) -> Option<&'a [u8]> {
        match self.open(from, datagram) {
            Ok(body) => Some(body),
            Err(why) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                log.since += 1;
                if log.last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    tracing::warn!(
                        "overlay: dropped {} unauthenticated or replayed datagram(s) (total {}); \
                         the last from {from}: {why}",
                        log.since,
                        self.rejected.load(Ordering::Relaxed)
                    );
                    *log = LogState {
                        last: Some(Instant::now()),
                        since: 0,
                    };
                }
                None
            }
        }
    }
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

    /// Whether `counter` is new; records it.
    fn accept(&mut self, counter: u64) -> bool {
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
        } else if self.highest - counter >= WINDOW {
            return false;
        } else {
            let (w, b) = Self::bit(counter);
            if self.bits[w] & b != 0 {
                return false;
            }
        }
        let (w, b) = Self::bit(counter);
        self.bits[w] |= b;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from() -> SocketAddr {
        "127.0.0.1:4789".parse().unwrap()
    }

    #[test]
    fn sealed_datagrams_open_once() {
        let s = Sealer::new([7; 32]);
        let mut d = b"vxlan header and frame".to_vec();
        s.seal(&mut d);
        assert_eq!(d.len(), 22 + TRAILER_LEN);
        let r = Sealer::new([7; 32]);
        assert_eq!(r.open(from(), &d).unwrap(), b"vxlan header and frame");
        assert_eq!(r.open(from(), &d), Err(OpenError::Replay));
        // Another sender address has its own window.
        assert!(r.open("127.0.0.1:1".parse().unwrap(), &d).is_ok());
    }

    #[test]
    fn tampered_short_or_foreign_datagrams_are_refused() {
        let s = Sealer::new([1; 32]);
        let mut d = vec![0xaa; 100];
        s.seal(&mut d);
        for i in [0, 50, 100, 110, d.len() - 1] {
            let mut t = d.clone();
            t[i] ^= 1;
            assert_eq!(
                Sealer::new([1; 32]).open(from(), &t),
                Err(OpenError::BadMac)
            );
        }
        assert_eq!(
            Sealer::new([2; 32]).open(from(), &d),
            Err(OpenError::BadMac)
        );
        assert_eq!(
            Sealer::new([1; 32]).open(from(), &d[..TRAILER_LEN - 1]),
            Err(OpenError::Short)
        );
        // An unsealed VXLAN datagram is counted.
        let r = Sealer::new([1; 32]);
        assert!(r
            .open_or_count(from(), &[8, 0, 0, 0, 0, 0x10, 0x92, 0])
            .is_none());
        assert_eq!(r.rejected().load(Ordering::Relaxed), 1);
    }

    #[test]
    fn counters_increase_and_reordering_within_the_window_is_taken() {
        let s = Sealer::new([3; 32]);
        let r = Sealer::new([3; 32]);
        let sealed: Vec<Vec<u8>> = (0..100u8)
            .map(|i| {
                let mut d = vec![i; 20];
                s.seal(&mut d);
                d
            })
            .collect();
        let counters: Vec<u64> = sealed
            .iter()
            .map(|d| u64::from_be_bytes(d[20..28].try_into().unwrap()))
            .collect();
        assert!(counters.windows(2).all(|w| w[1] > w[0]));
        // Delivered in reverse: all within the window, all taken once.
        for d in sealed.iter().rev() {
            assert!(r.open(from(), d).is_ok());
        }
        for d in &sealed {
            assert_eq!(r.open(from(), d), Err(OpenError::Replay));
        }
    }

    #[test]
    fn the_window_and_the_clock_bound_replays() {
        let mut w = Window::default();
        assert!(w.accept(10_000));
        assert!(w.accept(10_000 - WINDOW + 1));
        assert!(!w.accept(10_000 - WINDOW));
        assert!(w.accept(10_000 + 3 * WINDOW));
        assert!(!w.accept(10_000));
        assert!(!w.accept(10_000 + 3 * WINDOW));

        // A datagram sealed with a clock two minutes off is stale.
        let s = Sealer::new([4; 32]);
        let mut d = vec![1u8; 20];
        let old = now_us() - 120_000_000;
        let tag = s.tag(&d, old.to_be_bytes()).finalize().into_bytes();
        d.extend_from_slice(&old.to_be_bytes());
        d.extend_from_slice(&tag[..TAG_LEN]);
        assert!(matches!(s.open(from(), &d), Err(OpenError::Stale(_))));
    }
}
