//! `GET /v1/stats`: what the placement scheduler (`host-shim schedule`)
//! and dashboards read from a shim.
//!
//! - per instance: its vCPU thread's CPU time, its memory, its network
//!   card's frame and byte counters (since it arrived on this shim), and
//!   what the shim's bounds refused it (frames dropped, console lines
//!   dropped or split, checkpoints refused), and its VM exits by reason
//!   and idle waits (`devices::exits`);
//! - per published port: requests, bytes and connections of the clients
//!   that came through this shim (see [`hostnet::traffic`] for what a
//!   request is);
//! - per overlay peer: the smoothed round trip this shim measures to it
//!   (see [`hostnet::overlay`]).
//!
//! Counters only grow while the process lives; readers take differences.

use super::instance::State;
use super::Daemon;

pub use api::stats::{InstanceStats, ShimStats};

impl Daemon {
    /// The figures of this shim now.
    pub fn stats(&self) -> ShimStats {
        let instances = self
            .instances()
            .values()
            .filter(|i| matches!(i.state, State::Running | State::Busy(_)))
            .map(|i| {
                let info = i.info();
                let console = i.log.lock().unwrap_or_else(|e| e.into_inner()).dropped;
                InstanceStats {
                    name: info.name,
                    state: info.state,
                    ip: info.ip,
                    cpu_s: i
                        .handle
                        .as_ref()
                        .and_then(|h| h.cpu_time())
                        .map_or(0.0, |d| d.as_secs_f64()),
                    mem: info.mem,
                    net: i.port.as_ref().map(|p| p.traffic()).unwrap_or_default(),
                    generation: info.generation,
                    console_lines_dropped: console.lines,
                    console_lines_split: console.split,
                    checkpoints_refused: i.checkpoints.refused(),
                    exits: i.handle.as_ref().map(|h| h.exits()).unwrap_or_default(),
                }
            })
            .collect();
        ShimStats {
            name: self.config.name.clone(),
            region: self.config.region.clone(),
            overlay: self.net.overlay_addr().map(|a| a.to_string()),
            instances,
            ports: self.net.port_stats(),
            peers: self.net.peer_rtts(),
            switch_dropped: self.net.switch_dropped(),
        }
    }
}
