//! The overlay between two secure daemons as a hostile network sees it:
//! the frames of a kv instance that moved from one to the other cross a UDP
//! relay the test controls, which keeps every datagram. The client's data is
//! not readable in them, and a captured datagram resent (from a stranger's
//! address, or again from the relay) gets nowhere and is counted, as does an
//! old-format datagram, while the client's connection carries on.
//!
//! Needs /dev/kvm and the images (`cargo xtask build-image --all`).

mod common;

use common::daemon::{run_kv, Daemon, TempDir};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// At most this many datagrams are kept.
const KEEP: usize = 100_000;

/// A UDP relay: datagrams sent to `front` go to `target` from `back` (and
/// are kept); datagrams sent to `back` go to whoever last sent to `front`.
struct Relay {
    front: SocketAddr,
    back: UdpSocket,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(target: SocketAddr) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        let relay = Self {
            front: front.local_addr().unwrap(),
            back: back.try_clone().unwrap(),
            captured: Arc::default(),
            stop: Arc::default(),
        };
        let sender: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        for (from, to, forward) in [
            (front.try_clone().unwrap(), back, true),
            (relay.back.try_clone().unwrap(), front, false),
        ] {
            from.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let (captured, stop, sender) = (
                Arc::clone(&relay.captured),
                Arc::clone(&relay.stop),
                Arc::clone(&sender),
            );
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, src)) = from.recv_from(&mut buf) else {
                        continue;
                    };
                    if forward {
                        *sender.lock().unwrap() = Some(src);
                        let mut kept = captured.lock().unwrap();
                        if kept.len() < KEEP {
                            kept.push(buf[..n].to_vec());
                        }
                        let _ = to.send_to(&buf[..n], target);
                    } else if let Some(s) = *sender.lock().unwrap() {
                        let _ = to.send_to(&buf[..n], s);
                    }
                }
            });
        }
        relay
    }

    fn captured(&self) -> Vec<Vec<u8>> {
        self.captured.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Waits (up to 10 s) until `d` has dropped at least `n` overlay datagrams.
fn rejected_reaches(d: &Daemon, n: u64) -> u64 {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let got = d.info().overlay_rejected;
        if got >= n || Instant::now() > give_up {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn overlay_frames_are_unreadable_and_captured_datagrams_cannot_be_replayed() {
    let dir = TempDir::new("overlay-crypto");
    let b = Daemon::secure("ov-b", 2, &[], &dir);
    let key = b.state.as_ref().unwrap().join("fleet.key");
    let b_overlay: SocketAddr = b.addr.parse().unwrap();
    // a reaches b's overlay through the relay; b takes what comes from the
    // relay as a's (b pins a at the relay's address).
    let relay = Relay::start(b_overlay);
    let via = format!("{b_overlay}={}", relay.front);
    // `--peer-via` routes a's TCP connections to b's API (the migration stream) to the same
    // address: a plain TCP relay there.
    let _tcp = wan::tcp::TcpRelay::start(relay.front, b_overlay, Duration::ZERO)
        .expect("a TCP relay on the UDP relay's port");
    let a = Daemon::secure_serving(
        "ov-a",
        1,
        &["--fleet-key-file", key.to_str().unwrap()],
        &["--peer-via", &via],
        &dir,
    );
    let (fpa, _) = a.pin_and_token();
    let (fpb, _) = b.pin_and_token();
    a.cli(&[
        "peer",
        "add",
        "ov-b",
        &fpb,
        "--addr",
        &format!("https://{}", b.addr),
    ]);
    // b pins a at the relay's far side.
    let a_through_relay = format!("https://{}", relay.back.local_addr().unwrap());
    let b_pins_a = || b.cli(&["peer", "add", "ov-a", &fpa, "--addr", &a_through_relay]);
    b_pins_a();

    let (port, mut c) = run_kv(&a);
    c.fill(500);
    let out = a.migrate(&["migrate", "kv", "--to", "ov-b"]);
    assert_eq!(out.name, "kv", "{out:?}");
    c.check(500);
    assert_eq!(c.host(), "ov-b");

    // The client's connection goes through a's published port, then over
    // the overlay (and the relay) to kv on b.
    let mark = relay.captured().len();
    let secret = "the-plaintext-that-must-not-cross-the-overlay";
    assert_eq!(c.cmd(&["SET", "overlay-key", secret]).unwrap(), "OK");
    assert_eq!(c.cmd(&["GET", "overlay-key"]).unwrap(), secret);
    let captured = relay.captured();
    let during = captured[mark..].to_vec();
    assert!(!during.is_empty(), "the client's frames crossed the relay");
    let leaks = captured
        .iter()
        .filter(|d| contains(d, secret.as_bytes()) || contains(d, b"overlay-key"))
        .count();
    assert_eq!(
        leaks,
        0,
        "of {} datagrams on the wire, {leaks} show the client's data",
        captured.len()
    );
    for d in &captured {
        assert!(d.starts_with(b"LCO\x02"), "not overlay format 2: {d:02x?}");
    }

    // Every datagram of the SET and GET resent: from a stranger's address
    // (not a peer's: dropped, and the stranger never becomes a peer) and
    // again through the relay (a's address to b: replays).
    let before = b.info().overlay_rejected;
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    for d in &during {
        stranger.send_to(d, b_overlay).unwrap();
        relay.back.send_to(d, b_overlay).unwrap();
    }
    // And a datagram in the old format (plain VXLAN, an HMAC trailer) from
    // a's address: refused too.
    let mut old = vec![0x08, 0, 0, 0, 0x00, 0x10, 0x92, 0x00];
    old.extend_from_slice(&[0xff; 6]);
    old.extend_from_slice(&[0x02, 0x66, 0, 0, 0, 1, 0x08, 0x06]);
    old.extend_from_slice(&[0u8; 46 + 24]);
    relay.back.send_to(&old, b_overlay).unwrap();
    let want = before + 2 * during.len() as u64 + 1;
    assert_eq!(rejected_reaches(&b, want), want);
    // b probes its peers every second; a stranger would be probed too.
    stranger
        .set_read_timeout(Some(Duration::from_millis(2500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        stranger.recv_from(&mut buf).is_err(),
        "b sent to the stranger's address"
    );
    assert_eq!(b.info().overlay_rejected, want, "nothing else was dropped");

    // kv and its client are unaffected.
    c.check(500);
    assert_eq!(c.cmd(&["GET", "overlay-key"]).unwrap(), secret);

    // b unpins a: from then on b drops a's datagrams, so a client of a's
    // published port gets no answer from kv (on b). Pinned again, the first
    // client's connection carries on where it was.
    let before = b.info().overlay_rejected;
    b.cli(&["peer", "remove", "ov-a"]);
    let give_up = Instant::now() + Duration::from_secs(10);
    let cut = loop {
        let answered = common::Redis::connect(port).and_then(|mut p| {
            p.set_read_timeout(Duration::from_millis(500))?;
            p.cmd(&["PING"])
        });
        if answered.is_err() {
            break true;
        }
        if Instant::now() > give_up {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(cut, "kv still answered through a 10 s after b unpinned a");
    assert!(
        rejected_reaches(&b, before + 1) > before,
        "b did not count a's datagrams as rejected after unpinning it"
    );
    b_pins_a();
    c.check(500);
    assert_eq!(c.cmd(&["GET", "overlay-key"]).unwrap(), secret);
}
