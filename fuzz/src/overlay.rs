//! `overlay`: overlay datagrams: opening (tag, skew, replay), probes, decapsulation, and the
//! flow the switch counts of a frame it hands to a guest.
//!
//! What the overlay does with a UDP datagram from a peer's address: open it
//! (header, AEAD tag, clock skew, per-sender replay window), then decode it as a probe or
//! decapsulate the inner frame, whose flow (source address and port) the switch then counts
//! to decide whether guests may poll. The input is the datagram (after a VNI: u32 and a byte to
//! flip: u16): opened as it came, and sealed by another host first, which must open once,
//! then count as a replay, and fail once tampered with.

use std::net::SocketAddr;
use std::sync::OnceLock;

use hostnet::overlay::{decapsulate, decode_probe, encapsulate, encode_probe, MAX_VNI};
use hostnet::overlay_crypto::{HostId, OverlayCrypto, OverlayKey};

use crate::Input;

const KEY: [u8; 32] = [7; 32];

fn endpoint(id: u8) -> OverlayCrypto {
    OverlayCrypto::new(&OverlayKey {
        fleet: KEY,
        host: HostId([id; 8]),
    })
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let vni = input.u32() & MAX_VNI;
    let tamper = usize::from(input.u16());
    let datagram = input.rest();
    // The sender only seals (it keeps no state about peers that matters here), so one serves
    // every input; the receiver, whose replay windows and senders are under test, is new each time.
    static SENDER: OnceLock<OverlayCrypto> = OnceLock::new();
    let a = SENDER.get_or_init(|| endpoint(1));
    let b = endpoint(2);
    let from_a = SocketAddr::from(([127, 0, 0, 1], 4789));
    let from_b = SocketAddr::from(([127, 0, 0, 2], 4789));

    // Whatever arrives from a peer's address: opened (almost always refused).
    let mut raw = datagram.to_vec();
    if let Ok(body) = b.open(from_a, &mut raw) {
        receive(vni, body);
    }

    // The same bytes sealed by a peer open once, then count as a replay, and a changed
    // byte never opens.
    let sealed = a.seal(from_b, datagram);
    let mut once = sealed.clone();
    let body = b
        .open(from_a, &mut once)
        .expect("a datagram sealed with the fleet key opens")
        .to_vec();
    assert_eq!(body, datagram);
    let mut again = sealed.clone();
    assert!(b.open(from_a, &mut again).is_err(), "a replay opened");
    let mut tampered = sealed;
    let at = tamper % tampered.len();
    tampered[at] ^= 0x01;
    assert!(
        b.open(from_a, &mut tampered).is_err(),
        "a datagram with byte {at} changed still opens"
    );
    receive(vni, &body);
}

/// The overlay's dispatch of an opened datagram: a probe, or a frame of our VNI.
fn receive(vni: u32, body: &[u8]) {
    if let Some((answer, sent, name, region)) = decode_probe(body) {
        if name.len() <= 255 && region.len() <= 255 {
            let again = decode_probe(&encode_probe(answer, sent, &name, &region));
            assert_eq!(again, Some((answer, sent, name, region)));
        }
    } else if let Ok(frame) = decapsulate(vni, body) {
        assert_eq!(decapsulate(vni, &encapsulate(vni, frame)), Ok(frame));
        flow(frame);
    }
}

/// The flow of an IPv4 TCP or UDP frame is its source address (where IPv4 keeps it) and
/// port (where the header its IHL gives ends); every other frame has none.
fn flow(frame: &[u8]) {
    let Some(flow) = hostnet::clients::flow_of(frame) else {
        return;
    };
    assert_eq!(frame[12..14], [0x08, 0x00], "only IPv4 has a flow");
    assert!(matches!(frame[23], 6 | 17), "only TCP and UDP have a flow");
    let header = 14 + usize::from(frame[14] & 0x0f) * 4;
    assert!(header >= 34 && frame.len() >= header + 2);
    assert_eq!(
        (flow >> 16) as u32,
        u32::from_be_bytes(frame[26..30].try_into().unwrap())
    );
    assert_eq!(
        flow as u16,
        u16::from_be_bytes([frame[header], frame[header + 1]])
    );
}
