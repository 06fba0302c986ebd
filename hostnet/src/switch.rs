//! The virtual switch: forwards Ethernet frames between any number of ports
//! (the user-mode gateway, each guest, a TAP device) by MAC learning, as a
//! hardware switch does: the source address of every frame teaches the
//! switch where that station lives; frames to a known unicast address go to
//! its port, broadcast, multicast and unknown destinations flood to every
//! other port.

use std::collections::HashMap;

/// A port's number on the switch.
pub type PortId = usize;

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To one port.
    Port(PortId),
    /// To every port but the one it came from.
    Flood,
    /// Nowhere (malformed, or its destination is on the port it came from).
    Drop,
}

/// The MAC table.
#[derive(Debug, Default)]
pub struct Switch {
    table: HashMap<[u8; 6], PortId>,
}

impl Switch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Learns from `frame`, which came in on `from`, and says where it goes.
    pub fn route(&mut self, from: PortId, frame: &[u8]) -> Route {
        self.route_with(from, frame, |_| true)
    }

    /// Like [`Self::route`], but the source address is learnt only if
    /// `may_move(port it is known on now)` allows it (the overlay uses
    /// this so a frame relayed from another shim cannot move a station
    /// that is here).
    pub fn route_with(
        &mut self,
        from: PortId,
        frame: &[u8],
        may_move: impl Fn(PortId) -> bool,
    ) -> Route {
        let (Some(dst), Some(src)) = (mac_at(frame, 0), mac_at(frame, 6)) else {
            return Route::Drop;
        };
        if frame.len() < 14 || is_multicast(&src) {
            return Route::Drop;
        }
        if src != [0; 6] {
            match self.table.get(&src) {
                Some(&now) if now != from && !may_move(now) => {}
                _ => {
                    self.table.insert(src, from);
                }
            }
        }
        if is_multicast(&dst) {
            return Route::Flood;
        }
        match self.table.get(&dst) {
            Some(&port) if port == from => Route::Drop,
            Some(&port) => Route::Port(port),
            None => Route::Flood,
        }
    }

    /// Records that `mac` is behind `port` (a guest attached or moved).
    pub fn learn(&mut self, mac: [u8; 6], port: PortId) {
        self.table.insert(mac, port);
    }

    /// Forgets where `mac` is.
    pub fn forget_mac(&mut self, mac: [u8; 6]) {
        self.table.remove(&mac);
    }

    /// Forgets the stations learnt on `port` (it went away).
    pub fn forget_port(&mut self, port: PortId) {
        self.table.retain(|_, p| *p != port);
    }
}

fn mac_at(frame: &[u8], at: usize) -> Option<[u8; 6]> {
    frame.get(at..at + 6)?.try_into().ok()
}

/// Group (multicast or broadcast) address: the I/G bit.
pub fn is_multicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const C: [u8; 6] = [2, 0, 0, 0, 0, 0xc];
    const BCAST: [u8; 6] = [0xff; 6];

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f
    }

    #[test]
    fn learns_and_forwards() {
        let mut s = Switch::new();
        // B is unknown: flood, and A is learnt on port 0.
        assert_eq!(s.route(0, &frame(B, A)), Route::Flood);
        assert_eq!(s.route(1, &frame(A, B)), Route::Port(0));
        assert_eq!(s.route(0, &frame(B, A)), Route::Port(1));
        // Broadcast and multicast flood.
        assert_eq!(s.route(2, &frame(BCAST, C)), Route::Flood);
        assert_eq!(s.route(2, &frame([1, 0, 0x5e, 0, 0, 1], C)), Route::Flood);
        assert_eq!(s.route(0, &frame(C, A)), Route::Port(2));
        // A station that moves is learnt again.
        assert_eq!(s.route(3, &frame(BCAST, A)), Route::Flood);
        assert_eq!(s.route(1, &frame(A, B)), Route::Port(3));
    }

    #[test]
    fn pinned_stations_are_not_moved() {
        let mut s = Switch::new();
        s.route(0, &frame(BCAST, A));
        // Port 5 may not take stations from port 0.
        assert_eq!(s.route_with(5, &frame(B, A), |p| p != 0), Route::Flood);
        assert_eq!(s.route(1, &frame(A, B)), Route::Port(0));
    }

    #[test]
    fn malformed_and_hairpin_frames_are_dropped() {
        let mut s = Switch::new();
        assert_eq!(s.route(0, &[0u8; 10]), Route::Drop);
        assert_eq!(s.route(0, &frame(A, BCAST)), Route::Drop, "group source");
        s.route(0, &frame(BCAST, A));
        s.route(0, &frame(BCAST, B));
        assert_eq!(s.route(0, &frame(A, B)), Route::Drop, "same port");
        s.forget_port(0);
        assert_eq!(s.route(1, &frame(A, C)), Route::Flood);
    }
}
