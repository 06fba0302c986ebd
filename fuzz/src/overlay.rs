//! `overlay`: overlay datagrams: opening (tag, skew, replay), probes, decapsulation.
//!
//! What the overlay does with a UDP datagram from anyone: open it with the fleet
//! key (tag, clock skew, replay window), then decode it as a probe or decapsulate the inner
//! frame. The input is the datagram (after a VNI: u32): opened as it came, and sealed with the
//! key first (as from a peer), which must open once, then count as a replay, and fail once
//! tampered with.

use std::net::SocketAddr;

use host_shim::net::overlay::{decapsulate, decode_probe, encapsulate, encode_probe, MAX_VNI};
use host_shim::security::seal::{OpenError, Sealer};

use crate::Input;

const KEY: [u8; 32] = [7; 32];

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let vni = input.u32() & MAX_VNI;
    let tamper = usize::from(input.u16());
    let datagram = input.rest();
    let sealer = Sealer::new(KEY);
    let from = SocketAddr::from(([127, 0, 0, 1], 4789));

    if let Some(body) = sealer.open_or_count(from, datagram) {
        receive(vni, body);
    }

    let mut sealed = datagram.to_vec();
    sealer.seal(&mut sealed);
    let body = sealer
        .open(from, &sealed)
        .expect("a datagram sealed with the key opens")
        .to_vec();
    assert_eq!(body, datagram);
    assert_eq!(sealer.open(from, &sealed), Err(OpenError::Replay));
    let at = tamper % sealed.len();
    sealed[at] ^= 0x01;
    assert!(
        sealer.open(from, &sealed).is_err(),
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
    }
}
