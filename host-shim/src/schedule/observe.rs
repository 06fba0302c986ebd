//! What the controller reads from the fleet each round: `GET /v1/stats` of
//! every shim, turned into the scheduler's [`Inputs`].
//!
//! - **Regions**: each shim's `--region` (from `GET /v1/info` at start);
//!   several shims may share a region, the first one is where apps move to.
//! - **Placement**: the shim that has the app (running or busy).
//! - **Workload**: per shim, the published ports that forward to the app's
//!   address; the difference of their request and byte counters since the
//!   last round is that shim's region's traffic (clients use the shim of
//!   their own region).
//! - **RTTs**: each shim's smoothed round trip to each peer (by the peer's
//!   region), if its last answer is recent.

use std::collections::HashMap;
use std::time::Duration;

use scheduler::{Inputs, RegionId, Regions, Workload};

use crate::daemon::api::{Client, ClientError, ShimInfo};
use crate::daemon::stats::ShimStats;

/// An RTT older than this is not used.
const RTT_MAX_AGE: Duration = Duration::from_secs(10);

struct Shim {
    addr: String,
    name: String,
    region: RegionId,
}

/// The shims the controller watches, and its memory of their counters.
pub struct Fleet {
    shims: Vec<Shim>,
    regions: Regions,
    /// (shim index, published host port) -> (requests, bytes) last seen.
    last: HashMap<(usize, String), (u64, u64)>,
}

/// One round's observations.
pub struct Round {
    pub inputs: Inputs,
    /// The app is busy on its shim (migrating, snapshotting...).
    pub busy: bool,
    /// Shims that did not answer, and the like.
    pub warnings: Vec<String>,
}

impl Fleet {
    /// Asks every shim who it is.
    pub fn discover(addrs: &[String]) -> Result<Self, ClientError> {
        let mut regions = Regions::default();
        let mut shims = Vec::new();
        for addr in addrs {
            let info: ShimInfo = Client::new(addr).json::<(), _>("GET", "/v1/info", None)?;
            let region = regions
                .id(&info.region)
                .unwrap_or_else(|| regions.add(info.region.clone()));
            shims.push(Shim {
                addr: addr.clone(),
                name: info.name,
                region,
            });
        }
        Ok(Self {
            shims,
            regions,
            last: HashMap::new(),
        })
    }

    /// `name (region) at ADDR, ...`.
    pub fn describe(&self) -> String {
        self.shims
            .iter()
            .map(|s| format!("{} ({}) at {}", s.name, self.regions.name(s.region), s.addr))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// (region, shim API address) of every shim.
    pub fn regions_and_shims(&self) -> Vec<(&str, &str)> {
        self.shims
            .iter()
            .map(|s| (self.regions.name(s.region), s.addr.as_str()))
            .collect()
    }

    pub fn region_name(&self, id: RegionId) -> &str {
        self.regions.name(id)
    }

    pub fn region_id(&self, name: &str) -> Option<RegionId> {
        self.regions.id(name)
    }

    /// The API address of the shim apps move to in `region`.
    pub fn shim_of(&self, region: RegionId) -> &str {
        self.shims
            .iter()
            .find(|s| s.region == region)
            .map_or("", |s| s.addr.as_str())
    }

    /// Reads every shim's stats for `app`.
    pub fn observe(&mut self, app: &str) -> Round {
        let mut round = Round {
            inputs: Inputs::new(self.regions.clone()),
            busy: false,
            warnings: Vec::new(),
        };
        let mut all = Vec::new();
        for (i, shim) in self.shims.iter().enumerate() {
            match Client::new(&shim.addr).json::<(), ShimStats>("GET", "/v1/stats", None) {
                Ok(stats) => all.push((i, stats)),
                Err(e) => round.warnings.push(format!("{} left out: {e}", shim.name)),
            }
        }
        let mut app_ip = None;
        for (i, stats) in &all {
            if let Some(inst) = stats.instances.iter().find(|x| x.name == app) {
                round.inputs.placement.set(app, self.shims[*i].region);
                round.busy |= inst.state != "running";
                app_ip = inst.ip.as_deref().and_then(|ip| ip.split('/').next());
            }
        }
        let mut workload = Workload::new();
        for (i, stats) in &all {
            let region = self.shims[*i].region;
            for port in &stats.ports {
                let to_app = app_ip.is_some_and(|ip| port.guest.split(':').next() == Some(ip));
                let now = (port.requests, port.bytes_in + port.bytes_out);
                let before = self.last.insert((*i, port.host.clone()), now);
                if !to_app {
                    continue;
                }
                // A counter that went backwards: the shim restarted.
                let (r0, b0) = before
                    .filter(|b| b.0 <= now.0 && b.1 <= now.1)
                    .unwrap_or(now);
                workload.add(region, now.0 - r0, now.1 - b0);
            }
            for peer in &stats.peers {
                let Some(to) = self.regions.id(&peer.region) else {
                    continue;
                };
                if to != region && peer.age_s <= RTT_MAX_AGE.as_secs_f64() {
                    round.inputs.rtt.set(region, to, peer.srtt_ms);
                }
            }
        }
        round.inputs.workloads.insert(app.into(), workload);
        round
    }
}
