//! How many clients the network thread serves at once: the flows (IPv4
//! TCP or UDP source address and port) of the frames it hands to guests,
//! counted per window. With [`CLIENTS_HOLD_OFF`] of them it holds polling
//! guests off (`abi::boot::NetPoll::hold_off`): requests then come in
//! batches, and the CPU a spinning guest would hold is what the clients and
//! the network thread need.

/// The network thread counts the flows (TCP or UDP source address and
/// port) of the frames it hands to guests over windows this long...
pub const CLIENTS_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);
/// ... and holds guests off polling after a window with this many: their
/// requests then come in batches (one exit serves many), and the network
/// thread and the clients need the CPU a spinning guest would hold. Fewer
/// clients are served by a polling guest. Measured with kv and
/// `redis-benchmark -t get` (A/B, 2 rounds each): 20 clients 106k req/s
/// polling against 64k held off (each exit served ~10 requests); 50
/// clients and 50 × 16 pipelined the same either way here, and 50 clients
/// polling at 0.5-0.9× of held off on another host (hence a bound at all).
pub const CLIENTS_HOLD_OFF: usize = 32;

/// The flows of the frames handed to guests in the current
/// [`CLIENTS_WINDOW`], up to [`CLIENTS_HOLD_OFF`] of them: clients through
/// the gateway, the TAP device or the overlay alike.
#[derive(Default)]
pub struct Clients {
    since: Option<std::time::Instant>,
    seen: Vec<u64>,
    /// The last window saw [`CLIENTS_HOLD_OFF`] of them.
    pub hold_off: bool,
}

impl Clients {
    /// Counts the flows of frames handed to a guest; parses none once the
    /// window has seen [`CLIENTS_HOLD_OFF`] (all it needs to know).
    pub fn saw_frames<'a>(&mut self, frames: impl IntoIterator<Item = &'a Vec<u8>>) {
        for frame in frames {
            if self.seen.len() >= CLIENTS_HOLD_OFF {
                return;
            }
            if let Some(flow) = flow_of(frame) {
                self.saw(flow);
            }
        }
    }

    /// Counts one flow (at most [`CLIENTS_HOLD_OFF`] distinct ones are
    /// kept).
    fn saw(&mut self, flow: u64) {
        if self.seen.len() < CLIENTS_HOLD_OFF && !self.seen.contains(&flow) {
            self.seen.push(flow);
        }
    }

    /// Ends the window once it is over: from then on `hold_off` says
    /// whether it saw [`CLIENTS_HOLD_OFF`] flows.
    pub fn tick(&mut self) {
        let now = std::time::Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.saturating_duration_since(since) < CLIENTS_WINDOW {
            return;
        }
        let hold_off = self.seen.len() >= CLIENTS_HOLD_OFF;
        if hold_off != self.hold_off {
            tracing::debug!(hold_off, "guests polling their rings: many clients at once");
        }
        self.hold_off = hold_off;
        self.seen.clear();
        self.since = Some(now);
    }
}

/// The flow of an IPv4 TCP or UDP frame: its source address and port
/// (`None` for anything else, or a frame too short to say). Frames come
/// from guests, peers and the TAP device: only bounds-checked reads.
pub fn flow_of(frame: &[u8]) -> Option<u64> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    let header = usize::from(ip.first()? & 0x0f) * 4;
    if !matches!(ip.get(9)?, 6 | 17) || header < 20 {
        return None;
    }
    let addr = u32::from_be_bytes(ip.get(12..16)?.try_into().ok()?);
    let port = u16::from_be_bytes(ip.get(header..header + 2)?.try_into().ok()?);
    Some(u64::from(addr) << 16 | u64::from(port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_clients_at_once_hold_polling_guests_off_and_one_does_not() {
        let ended = |c: &mut Clients| {
            c.since = Some(std::time::Instant::now() - CLIENTS_WINDOW);
            c.tick();
            c.hold_off
        };
        // A TCP segment from 10.0.2.2:port to a guest.
        let segment = |port: u16| {
            let mut f = vec![0u8; 54];
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            f[14] = 0x45;
            f[23] = 6;
            f[26..30].copy_from_slice(&[10, 0, 2, 2]);
            f[34..36].copy_from_slice(&port.to_be_bytes());
            f
        };
        assert_eq!(flow_of(&segment(5000)), flow_of(&segment(5000)));
        assert_ne!(flow_of(&segment(5000)), flow_of(&segment(5001)));
        assert_eq!(flow_of(&segment(1)[..30]), None, "truncated");
        let mut arp = segment(1);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(flow_of(&arp), None);
        let mut c = Clients::default();
        for _ in 0..1000 {
            c.saw(flow_of(&segment(40000)).unwrap());
        }
        assert!(!ended(&mut c), "one client sending one request at a time");
        for port in 40000..40020 {
            c.saw(flow_of(&segment(port)).unwrap());
        }
        assert!(
            !ended(&mut c),
            "twenty clients are served by a polling guest"
        );
        for port in 40000..40050 {
            c.saw(flow_of(&segment(port)).unwrap());
        }
        assert!(ended(&mut c), "fifty clients");
        assert!(
            c.seen.len() <= CLIENTS_HOLD_OFF,
            "bounded: {}",
            c.seen.len()
        );
        c.saw(flow_of(&segment(40000)).unwrap());
        assert!(!ended(&mut c), "back to one");
    }
}
