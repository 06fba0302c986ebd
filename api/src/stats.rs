//! `GET /v1/stats`: what the placement scheduler (`host-shim schedule`)
//! and dashboards read from a shim.
//!
//! - per instance: its vCPU thread's CPU time, its memory, its network
//!   card's frame and byte counters (since it arrived on this shim), what
//!   the shim's bounds refused it (frames dropped, console lines dropped or
//!   split, checkpoints refused), and its VM exits by reason and idle waits;
//! - per published port: requests, bytes and connections of the clients
//!   that came through this shim (a request is a burst of client bytes);
//! - per overlay peer: the smoothed round trip this shim measures to it.
//!
//! Counters only grow while the process lives; readers take differences.

use serde::{Deserialize, Serialize};

/// One instance's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceStats {
    pub name: String,
    /// As in `list`.
    #[serde(flatten)]
    pub state: crate::InstanceState,
    pub ip: Option<crate::GuestAddr>,
    /// CPU time of its vCPU thread on this shim, seconds.
    pub cpu_s: f64,
    /// Guest memory, bytes.
    pub mem: u64,
    /// Its network card, since it arrived on this shim.
    pub net: NicStats,
    /// Moves so far.
    pub generation: u64,
    /// Console lines left out of the daemon's log (over the rate limit).
    #[serde(default)]
    pub console_lines_dropped: u64,
    /// Console lines longer than the limit, written in pieces.
    #[serde(default)]
    pub console_lines_split: u64,
    /// Checkpoints and deltas refused (over the instance's limit, or
    /// malformed): the guest sends a full checkpoint instead.
    #[serde(default)]
    pub checkpoints_refused: u64,
    /// Its VM exits by reason and its idle waits, since it arrived on
    /// this shim .
    #[serde(default)]
    pub exits: ExitStats,
}

/// The answer of `GET /v1/stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShimStats {
    pub name: String,
    pub region: String,
    /// The overlay address (how peers know this shim).
    pub overlay: Option<String>,
    /// Instances running (or busy) here; moved-away tombstones are left out.
    pub instances: Vec<InstanceStats>,
    pub ports: Vec<PortStats>,
    pub peers: Vec<PeerRtt>,
    /// Frames the switch dropped because a port's queue was full.
    #[serde(default)]
    pub switch_dropped: u64,
}

/// One client address's share of a port's traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientStats {
    pub addr: String,
    pub requests: u64,
    /// Bytes from it to the app.
    pub bytes_in: u64,
}

/// One published port's counters, as `GET /v1/stats` reports them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStats {
    /// `ADDR:PORT/PROTO` on the host.
    pub host: String,
    /// The guest's address and port it forwards to (`ADDR:PORT`).
    pub guest: std::net::SocketAddrV4,
    /// Requests (bursts of client bytes; see the module docs).
    pub requests: u64,
    /// Bytes from clients to the app.
    pub bytes_in: u64,
    /// Bytes from the app to clients.
    pub bytes_out: u64,
    /// Client connections accepted (UDP: flows).
    pub connections: u64,
    /// Client connections open now.
    pub open_connections: u64,
    /// Per client address (the first few dozen).
    #[serde(default)]
    pub clients: Vec<ClientStats>,
}

impl Default for PortStats {
    fn default() -> Self {
        Self {
            host: String::new(),
            guest: std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
            requests: 0,
            bytes_in: 0,
            bytes_out: 0,
            connections: 0,
            open_connections: 0,
            clients: Vec::new(),
        }
    }
}

/// A guest card's counters (since it attached to this shim).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames from the guest dropped: its queue to the switch was full.
    #[serde(default)]
    pub tx_dropped: u64,
    /// Frames for the guest dropped: its backlog was full.
    #[serde(default)]
    pub rx_dropped: u64,
    /// Frames the guest flooded (broadcast, multicast, unknown unicast)
    /// dropped: over its rate.
    #[serde(default)]
    pub flood_dropped: u64,
    /// Of `rx_packets`, those the network thread put in the guest's ring
    /// itself while the guest polled it (no VM exit).
    #[serde(default)]
    pub rx_polled: u64,
    /// Of `tx_packets`, those the network thread took from the guest's
    /// ring while it watched it (no VM exit).
    #[serde(default)]
    pub tx_polled: u64,
}

/// One peer's round trip, as `GET /v1/stats` reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerRtt {
    /// Its overlay address.
    pub addr: String,
    pub name: String,
    pub region: String,
    /// Smoothed round trip, ms.
    pub srtt_ms: f64,
    /// The last sample, ms.
    pub last_ms: f64,
    pub samples: u64,
    /// Seconds since its last answer.
    pub age_s: f64,
}

/// A machine's exits, as `GET /v1/stats` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStats {
    /// VM exits the guest caused (hypercalls + virtio + other; kicks not
    /// included).
    pub total: u64,
    pub hypercalls: HypercallExits,
    pub virtio: VirtioExits,
    /// Exits of any other kind (unhandled MMIO, port I/O, ...).
    pub other: u64,
    /// `KVM_RUN` returns caused by a signal from the shim (not the guest).
    pub interrupted: u64,
    /// The `HC_YIELD` idle wait.
    pub idle: IdleWaits,
}

/// Doorbell hypercalls by number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HypercallExits {
    /// `HC_YIELD`: the executor's once-per-loop exit.
    pub r#yield: u64,
    /// `HC_CONSOLE_WRITE`.
    pub console: u64,
    /// `HC_CHECKPOINT`.
    pub checkpoint: u64,
    /// Any other number (exit, panic, fault, unknown).
    pub other: u64,
}

/// virtio-mmio register accesses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioExits {
    /// `QueueNotify` writes.
    pub notify: u64,
    /// Every other register or configuration access.
    pub other: u64,
}

/// How the vCPU's `HC_YIELD` waits went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleWaits {
    /// Times the vCPU thread blocked in the wait.
    pub sleeps: u64,
    /// ... and was woken by I/O (frames for the guest),
    pub woken_by_io: u64,
    /// ... by its timeout (the guest's next timer),
    pub timed_out: u64,
    /// ... by a signal or a failed wait.
    pub interrupted: u64,
    /// Yields that did not sleep: timeout 0, or work was already there.
    pub skipped: u64,
}
