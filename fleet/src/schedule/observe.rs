//! What the controller reads from the fleet each round: `GET /v1/stats` of
//! every shim, turned into the scheduler's [`Inputs`].
//!
//! - **Regions**: each shim's `--region` (from `GET /v1/info` at start);
//!   several shims may share a region, the first one is where apps move to.
//! - **Placement**: the shim that has the app (running or busy).
//! - **Workload**: per shim, the published ports that forward to the app's
//!   address; the difference of their request and byte counters since the
//!   last round is that shim's region's traffic (clients use the shim of
//!   their own region). With `--client-region CIDR=REGION`, the per-client
//!   counters of those ports are attributed by client address instead
//!   (requests and the clients' bytes to the app); addresses in no listed
//!   network stay with the shim's region.
//! - **RTTs**: each shim's smoothed round trip to each peer (by the peer's
//!   region), if its last answer is recent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use scheduler::{Inputs, RegionId, Regions, Workload};

use api::stats::ShimStats;
use api::{Client, ClientError, InstanceState, ShimInfo};

/// An RTT older than this is not used.
const RTT_MAX_AGE: Duration = Duration::from_secs(10);

struct Shim {
    addr: String,
    /// Its API client (plain, or TLS with the pin and token of the user's
    /// fleet file).
    client: Client,
    name: String,
    region: RegionId,
}

/// `--client-region CIDR=REGION`: clients in a network belong to a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientNet {
    pub net: IpAddr,
    pub prefix: u8,
    pub region: String,
}

impl ClientNet {
    /// `10.1.0.0/16=eu-west`, `2001:db8::/32=us-east`, `192.0.2.7=ap` (a host).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not CIDR=REGION (e.g. 10.1.0.0/16=eu-west)");
        let (cidr, region) = s.split_once('=').ok_or_else(bad)?;
        let (addr, prefix) = match cidr.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (cidr, None),
        };
        let net: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        if region.trim().is_empty() {
            return Err(bad());
        }
        Ok(Self {
            net,
            prefix,
            region: region.trim().to_owned(),
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| match ip {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let ((net, width), (ip, w2)) = (bits(self.net), bits(ip));
        if width != w2 {
            return false;
        }
        let shift = width - u32::from(self.prefix);
        shift >= width || (net >> shift) == (ip >> shift)
    }
}

/// The shims the controller watches, and its memory of their counters.
pub struct Fleet {
    shims: Vec<Shim>,
    regions: Regions,
    /// Client networks and their regions (`--client-region`).
    nets: Vec<(ClientNet, RegionId)>,
    /// (shim index, published host port, client or "") -> (requests, bytes) last seen.
    last: HashMap<(usize, String, String), (u64, u64)>,
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
    /// Asks every shim who it is; clients in `nets` belong to the given
    /// regions (each must have a shim).
    pub fn discover(clients: &[Client], nets: &[ClientNet]) -> Result<Self, ClientError> {
        let mut regions = Regions::default();
        let mut shims = Vec::new();
        for client in clients {
            let info: ShimInfo = client.info()?;
            let region = regions
                .id(&info.region)
                .unwrap_or_else(|| regions.add(info.region.clone()));
            shims.push(Shim {
                addr: client.addr.clone(),
                client: client.clone(),
                name: info.name,
                region,
            });
        }
        let nets = nets
            .iter()
            .map(|n| {
                regions
                    .id(&n.region)
                    .map(|id| (n.clone(), id))
                    .ok_or_else(|| ClientError::Api {
                        status: 400,
                        message: format!(
                            "--client-region {}/{}={}: no shim is in region '{}'",
                            n.net, n.prefix, n.region, n.region
                        ),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            shims,
            regions,
            nets,
            last: HashMap::new(),
        })
    }

    /// The difference of `now` and what `key` was last, and remembers it
    /// (0 at first sight and after a counter went backwards: a restarted
    /// shim).
    fn delta(&mut self, key: (usize, String, String), now: (u64, u64)) -> (u64, u64) {
        let before = self.last.insert(key, now);
        let (r0, b0) = before
            .filter(|b| b.0 <= now.0 && b.1 <= now.1)
            .unwrap_or(now);
        (now.0 - r0, now.1 - b0)
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

    /// The shim apps move to in `region`: its API address and client.
    pub fn shim_of(&self, region: RegionId) -> Option<(&str, &Client)> {
        self.shims
            .iter()
            .find(|s| s.region == region)
            .map(|s| (s.addr.as_str(), &s.client))
    }

    /// Reads every shim's stats for `app`, all at once; a shim that has
    /// not answered within `timeout` is left out of the round.
    pub fn observe(&mut self, app: &str, timeout: Duration) -> Round {
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, shim) in self.shims.iter().enumerate() {
            let (tx, client) = (tx.clone(), shim.client.clone());
            // A hung shim keeps its thread, not the controller.
            std::thread::spawn(move || {
                let _ = tx.send((i, client.stats()));
            });
        }
        drop(tx);
        let deadline = std::time::Instant::now() + timeout;
        let mut answers: Vec<Option<Result<ShimStats, ClientError>>> =
            self.shims.iter().map(|_| None).collect();
        while let Ok((i, answer)) =
            rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            answers[i] = Some(answer);
        }
        let mut all = Vec::new();
        let mut warnings = Vec::new();
        for (i, answer) in answers.into_iter().enumerate() {
            let name = &self.shims[i].name;
            match answer {
                Some(Ok(stats)) => all.push((i, stats)),
                Some(Err(e)) => warnings.push(format!("{name} left out: {e}")),
                None => warnings.push(format!(
                    "{name} left out: no stats within {:.1} s",
                    timeout.as_secs_f64()
                )),
            }
        }
        let mut round = self.absorb(app, &all);
        round.warnings = warnings;
        round
    }

    /// Turns the stats of the shims that answered (by index) into a round.
    fn absorb(&mut self, app: &str, all: &[(usize, ShimStats)]) -> Round {
        let mut round = Round {
            inputs: Inputs::new(self.regions.clone()),
            busy: false,
            warnings: Vec::new(),
        };
        let mut app_ip = None;
        for (i, stats) in all {
            if let Some(inst) = stats.instances.iter().find(|x| x.name == app) {
                round.inputs.placement.set(app, self.shims[*i].region);
                round.busy |= inst.state != InstanceState::Running;
                app_ip = inst.ip.map(|a| a.ip);
            }
        }
        let mut workload = Workload::new();
        for (i, stats) in all {
            let region = self.shims[*i].region;
            for port in &stats.ports {
                let to_app = app_ip == Some(*port.guest.ip());
                // Mapped by client: the clients' bytes to the app only (all
                // the per-client counters have).
                let total = if self.nets.is_empty() {
                    (port.requests, port.bytes_in + port.bytes_out)
                } else {
                    (port.requests, port.bytes_in)
                };
                let (requests, bytes) = self.delta((*i, port.host.clone(), String::new()), total);
                if !to_app {
                    continue;
                }
                // By client address; what no listed network claims stays here.
                let (mut rest_r, mut rest_b) = (requests, bytes);
                let mapped = !self.nets.is_empty();
                for c in port.clients.iter().filter(|_| mapped) {
                    let key = (*i, port.host.clone(), c.addr.clone());
                    let (r, b) = self.delta(key, (c.requests, c.bytes_in));
                    let ip = c.addr.parse().ok();
                    let net = self
                        .nets
                        .iter()
                        .find(|(n, _)| ip.is_some_and(|ip| n.contains(ip)));
                    if let Some(&(_, to)) = net {
                        workload.add(to, r, b);
                        rest_r = rest_r.saturating_sub(r);
                        rest_b = rest_b.saturating_sub(b);
                    }
                }
                workload.add(region, rest_r, rest_b);
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

#[cfg(test)]
mod tests {
    use super::*;
    use api::stats::InstanceStats;
    use api::stats::PeerRtt;
    use api::stats::PortStats;

    /// The requests and bytes `w` counted from region `id`.
    fn from_region(w: &Workload, id: u32) -> Option<(u64, u64)> {
        w.clients()
            .iter()
            .find(|c| c.region == RegionId(id))
            .map(|c| (c.requests, c.bytes))
    }

    fn fleet() -> Fleet {
        let regions = Regions::new(["us", "eu"]);
        Fleet {
            shims: vec![
                Shim {
                    addr: "a:1".into(),
                    client: Client::new("a:1"),
                    name: "a".into(),
                    region: RegionId(0),
                },
                Shim {
                    addr: "b:1".into(),
                    client: Client::new("b:1"),
                    name: "b".into(),
                    region: RegionId(1),
                },
            ],
            regions,
            nets: Vec::new(),
            last: HashMap::new(),
        }
    }

    fn port(host: &str, guest: &str, requests: u64) -> PortStats {
        PortStats {
            host: host.into(),
            guest: guest.parse().unwrap(),
            requests,
            bytes_in: requests * 10,
            bytes_out: requests * 20,
            ..PortStats::default()
        }
    }

    fn stats(
        app_state: Option<&str>,
        ports: Vec<PortStats>,
        peer: Option<(&str, f64, f64)>,
    ) -> ShimStats {
        ShimStats {
            instances: app_state
                .map(|state| InstanceStats {
                    name: "kv".into(),
                    state: match state {
                        "running" => InstanceState::Running,
                        what => InstanceState::Busy { what: what.into() },
                    },
                    ip: Some("10.0.2.16/24".parse().unwrap()),
                    ..InstanceStats::default()
                })
                .into_iter()
                .collect(),
            ports,
            peers: peer
                .map(|(region, srtt_ms, age_s)| PeerRtt {
                    region: region.into(),
                    srtt_ms,
                    age_s,
                    samples: 3,
                    ..PeerRtt::default()
                })
                .into_iter()
                .collect(),
            ..ShimStats::default()
        }
    }

    #[test]
    fn counters_become_per_round_traffic_by_the_shims_region() {
        let mut f = fleet();
        let round = |f: &mut Fleet, a: u64, b: u64, other: u64| {
            f.absorb(
                "kv",
                &[
                    (
                        0,
                        stats(
                            Some("running"),
                            vec![port("127.0.0.1:1/tcp", "10.0.2.16:6379", a)],
                            Some(("eu", 80.0, 0.5)),
                        ),
                    ),
                    (
                        1,
                        stats(
                            None,
                            vec![
                                port("127.0.0.1:2/tcp", "10.0.2.16:6379", b),
                                // Another app's port: not kv's traffic.
                                port("127.0.0.1:3/tcp", "10.0.2.17:80", other),
                            ],
                            Some(("us", 82.0, 60.0)),
                        ),
                    ),
                ],
            )
        };
        // The first reading is the baseline.
        let r = round(&mut f, 100, 50, 7);
        assert_eq!(r.inputs.workloads[&"kv".into()].total_requests(), 0);
        assert_eq!(r.inputs.placement.get(&"kv".into()), Some(RegionId(0)));
        assert!(!r.busy);
        let r = round(&mut f, 130, 60, 1000);
        let w = &r.inputs.workloads[&"kv".into()];
        assert_eq!(from_region(w, 0), Some((30, 900)));
        assert_eq!(from_region(w, 1), Some((10, 300)));
        // a's fresh RTT to eu is used; b's stale one is not (the reverse falls back to it).
        assert_eq!(r.inputs.rtt.measured(RegionId(0), RegionId(1)), Some(80.0));
        assert_eq!(r.inputs.rtt.measured(RegionId(1), RegionId(0)), None);
        // A counter that went backwards (a restarted shim) counts as a new baseline.
        let r = round(&mut f, 5, 70, 1000);
        let w = &r.inputs.workloads[&"kv".into()];
        assert_eq!(w.total_requests(), 10);
    }

    #[test]
    fn an_app_in_migration_is_busy() {
        let mut f = fleet();
        let r = f.absorb(
            "kv",
            &[
                (0, stats(Some("migrating"), Vec::new(), None)),
                (1, stats(Some("incoming"), Vec::new(), None)),
            ],
        );
        assert!(r.busy);
        let r = f.absorb("kv", &[(1, stats(None, Vec::new(), None))]);
        assert_eq!(r.inputs.placement.get(&"kv".into()), None);
    }

    #[test]
    fn client_networks_map_requests_to_regions() {
        let n = ClientNet::parse("10.1.0.0/16=eu").unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        assert!(ClientNet::parse("0.0.0.0/0=x")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(ClientNet::parse("192.0.2.7=x")
            .unwrap()
            .contains("192.0.2.7".parse().unwrap()));
        for bad in ["10.0.0.0/33=x", "10.0.0.0/8", "nonsense=x", "10.0.0.0/8="] {
            assert!(ClientNet::parse(bad).is_err(), "{bad}");
        }

        let mut f = fleet();
        f.nets = vec![(n, RegionId(1))];
        let with_clients = |eu: u64, local: u64| {
            let mut p = port("127.0.0.1:1/tcp", "10.0.2.16:6379", eu + local);
            p.bytes_in = (eu + local) * 10;
            p.clients = vec![
                api::stats::ClientStats {
                    addr: "10.1.0.9".into(),
                    requests: eu,
                    bytes_in: eu * 10,
                },
                api::stats::ClientStats {
                    addr: "127.0.0.1".into(),
                    requests: local,
                    bytes_in: local * 10,
                },
            ];
            vec![(0, stats(Some("running"), vec![p], None))]
        };
        f.absorb("kv", &with_clients(5, 5));
        let r = f.absorb("kv", &with_clients(25, 8));
        let w = &r.inputs.workloads[&"kv".into()];
        assert_eq!(from_region(w, 1), Some((20, 200)), "10.1.0.9 is in eu");
        assert_eq!(
            from_region(w, 0),
            Some((3, 30)),
            "the rest stays with the shim's region"
        );
    }
}
