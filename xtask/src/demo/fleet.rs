//! The demo's three regions on this machine: one `host-shim serve` daemon
//! per region (distinct `--shim-id`s), joined by delaying relays ([`wan`])
//! so that every byte between two regions takes that pair's one-way delay
//! ([`one_way_ms`]), and on every shim a published port to the kv app's
//! address, for that region's clients.
//!
//! ```text
//!  clients us-east --> shim us-east :P1 --+-- relays 40 ms --- shim eu-west :P2 <-- clients eu-west
//!  controller (us-east) ------------------+-- relays 90 ms --- shim ap-southeast :P3 <-- clients ap
//!                     shim eu-west ----------- relays 110 ms -- shim ap-southeast
//! ```
//!
//! - Overlay (UDP): one relay per pair of shims (a < b): shim a reaches b
//!   at the relay's listen address, shim b reaches a at the relay's fixed
//!   back address (`--peer-via`), so every datagram, probes included, takes
//!   the delayed path in both directions.
//! - TCP between daemons (migration streams, image pushes, standby
//!   checkpoints, API calls): one relay per ordered pair, a -> b's API;
//!   shim a maps b's API address to it (`--peer-via API_b=RELAY_ab`).
//! - The controller (`host-shim schedule`) runs in the first region: it
//!   reaches that region's shim directly and the others through the first
//!   region's relays ([`Fleet::controller_apis`]). It names the
//!   destination of a move by its own address for it, so every other shim
//!   maps that address to its own relay to the destination too (as a DNS
//!   name resolves to the nearest path).
//!
//! A client's request therefore sees its own region's shim (loopback)
//! plus, if the app runs elsewhere, the round trip between the two regions;
//! a migration's stream crosses the relay between source and destination.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use api::{Client, InstanceState, MigrateRequest, MigrationReport, RunRequest};

/// The kv app's address: one of shim 1's block of the default guest network.
pub const APP_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 4, 16);
/// The instance name.
pub const APP: &str = "kv";

/// A region of the demo.
#[derive(Clone, Debug)]
pub struct RegionSpec {
    pub name: &'static str,
    /// Hours from UTC of its clients' day.
    pub utc_offset_h: f64,
    /// Where the dashboard draws it.
    pub lon: f64,
    pub lat: f64,
    /// Peak requests per second of its clients.
    pub peak_rps: f64,
}

/// The demo's regions.
pub fn regions(peak_rps: f64) -> Vec<RegionSpec> {
    vec![
        RegionSpec {
            name: "us-east",
            utc_offset_h: -5.0,
            lon: -77.5,
            lat: 39.0,
            peak_rps,
        },
        RegionSpec {
            name: "eu-west",
            utc_offset_h: 1.0,
            lon: -6.3,
            lat: 53.3,
            peak_rps: peak_rps * 1.25,
        },
        RegionSpec {
            name: "ap-southeast",
            utc_offset_h: 8.0,
            lon: 103.8,
            lat: 1.35,
            peak_rps: peak_rps * 0.8,
        },
    ]
}

/// One-way delay between regions `a` and `b` (indices into [`regions`]).
pub fn one_way_ms(a: usize, b: usize) -> f64 {
    match (a.min(b), a.max(b)) {
        (x, y) if x == y => 0.0,
        (0, 1) => 40.0,
        (0, 2) => 90.0,
        _ => 110.0,
    }
}

/// A `host-shim serve` process, killed when dropped.
pub struct Shim {
    child: Child,
    pub region: String,
    /// The API address.
    pub api: String,
    /// The published kv port for this region's clients.
    pub port: u16,
    log: PathBuf,
}

impl Shim {
    /// The daemon's output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::new(&self.api)
    }

    /// Whether the app runs here.
    pub fn has_app(&self) -> bool {
        api_has_app(&self.api)
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the app runs on the shim at API address `api`.
pub fn api_has_app(api: &str) -> bool {
    Client::new(api)
        .list()
        .map(|l| {
            l.iter()
                .any(|i| i.name == APP && i.state == InstanceState::Running)
        })
        .unwrap_or(false)
}

/// Loopback addresses whose port numbers are distinct across TCP and UDP:
/// one `--peer-via` list maps both, so a number must mean one thing.
#[derive(Default)]
struct Ports(std::collections::HashSet<u16>);

impl Ports {
    fn tcp(&mut self) -> Result<SocketAddr> {
        self.fresh(|| Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?))
    }

    fn udp(&mut self) -> Result<SocketAddr> {
        self.fresh(|| Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?))
    }

    fn fresh(&mut self, pick: impl Fn() -> Result<SocketAddr>) -> Result<SocketAddr> {
        for _ in 0..100 {
            let a = pick()?;
            if self.0.insert(a.port()) {
                return Ok(a);
            }
        }
        bail!("no free port number unused by the demo in 100 tries")
    }
}

/// The three shims and the relays between them (the relays' threads live
/// as long as the process).
pub struct Fleet {
    pub shims: Vec<Shim>,
    /// How the controller (in the first region) reaches each shim.
    controller: Vec<String>,
}

impl Fleet {
    /// Starts the relays and the daemons, and waits until each answers.
    pub fn start(host_shim: &Path, regions: &[RegionSpec], dir: &Path) -> Result<Self> {
        let n = regions.len();
        let mut ports = Ports::default();
        let overlays: Vec<SocketAddr> = (0..n).map(|_| ports.udp()).collect::<Result<_>>()?;
        let apis: Vec<SocketAddr> = (0..n).map(|_| ports.tcp()).collect::<Result<_>>()?;
        let mut peer_args: Vec<Vec<String>> = vec![Vec::new(); n];
        let via = |args: &mut Vec<String>, real: SocketAddr, relay: SocketAddr| {
            args.extend(["--peer-via".into(), format!("{real}={relay}")]);
        };
        for a in 0..n {
            for b in a + 1..n {
                let delay = Duration::from_secs_f64(one_way_ms(a, b) / 1e3);
                let back = ports.udp()?;
                let relay = wan::udp::UdpRelay::start_from(ports.udp()?, back, overlays[b], delay)
                    .with_context(|| format!("relay {} -> {}", regions[a].name, regions[b].name))?;
                peer_args[a].extend(["--peer".into(), overlays[b].to_string()]);
                via(&mut peer_args[a], overlays[b], relay.local_addr());
                peer_args[b].extend(["--peer".into(), overlays[a].to_string()]);
                via(&mut peer_args[b], overlays[a], back);
            }
        }
        // tcp[a][b]: region a's path to b's API.
        let mut tcp = vec![vec![None; n]; n];
        for (a, row) in tcp.iter_mut().enumerate() {
            for (b, path) in row.iter_mut().enumerate().filter(|(b, _)| *b != a) {
                let delay = Duration::from_secs_f64(one_way_ms(a, b) / 1e3);
                let relay =
                    wan::tcp::TcpRelay::start(ports.tcp()?, apis[b], delay).with_context(|| {
                        format!("TCP relay {} -> {}", regions[a].name, regions[b].name)
                    })?;
                *path = Some(relay.local_addr());
            }
        }
        let controller: Vec<SocketAddr> = (0..n).map(|b| tcp[0][b].unwrap_or(apis[b])).collect();
        for a in 0..n {
            for b in (0..n).filter(|&b| b != a) {
                let path = tcp[a][b].expect("a relay for every pair");
                via(&mut peer_args[a], apis[b], path);
                if a != 0 && b != 0 {
                    via(&mut peer_args[a], controller[b], path);
                }
            }
        }
        let mut shims = Vec::new();
        for (i, r) in regions.iter().enumerate() {
            let api = apis[i].to_string();
            let port = ports.tcp()?.port();
            let log = dir.join(format!("{}.log", r.name));
            let mut serve = Command::new(host_shim);
            serve
                .args([
                    "serve", "--listen", &api, "--name", r.name, "--region", r.name,
                ])
                .args(["--shim-id", &(i + 1).to_string()])
                .args(["--overlay", &overlays[i].to_string()])
                .args(&peer_args[i])
                .args(["--publish", &format!("127.0.0.1:{port}:{APP_IP}:6379")]);
            let child = crate::bench::migrate::spawn_serve(&mut serve, &log)?;
            shims.push(Shim {
                child,
                region: r.name.to_owned(),
                api,
                port,
                log,
            });
        }
        let fleet = Self {
            shims,
            controller: controller.iter().map(SocketAddr::to_string).collect(),
        };
        for shim in &fleet.shims {
            wait_listening(shim)?;
        }
        Ok(fleet)
    }

    /// The index of the region the app runs in now.
    pub fn app_region(&self) -> Option<usize> {
        self.shims.iter().position(Shim::has_app)
    }

    /// The shims' API addresses.
    pub fn apis(&self) -> Vec<String> {
        self.shims.iter().map(|s| s.api.clone()).collect()
    }

    /// The shims' addresses for the controller, which runs in the first
    /// region: that shim's API, and the first region's relays to the others.
    pub fn controller_apis(&self) -> &[String] {
        &self.controller
    }

    /// Boots the kv image on region `at`'s shim (address [`APP_IP`]).
    pub fn boot_app(&self, image: &Path, at: usize) -> Result<()> {
        let req = RunRequest {
            name: APP.into(),
            image: image.display().to_string(),
            mem: 64 << 20,
            ip: Some(APP_IP),
            ..Default::default()
        };
        self.shims[at].client().run(&req).with_context(|| {
            format!(
                "booting kv on {}:\n{}",
                self.shims[at].region,
                self.shims[at].output()
            )
        })?;
        Ok(())
    }

    /// Moves the app to region `to` (if it is not there) and returns what
    /// the migration did.
    pub fn move_app(&self, to: usize) -> Result<Option<MigrationReport>> {
        let from = self.app_region().context("the app runs nowhere")?;
        if from == to {
            return Ok(None);
        }
        let report = self.shims[from]
            .client()
            .migrate(
                APP,
                &MigrateRequest {
                    to: self.shims[to].api.clone(),
                    fingerprint: None,
                },
                |_| {},
            )
            .with_context(|| {
                format!(
                    "moving kv {} -> {} failed\n--- {} log:\n{}",
                    self.shims[from].region,
                    self.shims[to].region,
                    self.shims[from].region,
                    self.shims[from].output()
                )
            })?;
        Ok(Some(report))
    }

    /// Waits until every shim measured a round trip to each other one.
    pub fn wait_for_rtts(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let complete = self.shims.iter().all(|s| {
                s.client().stats().is_ok_and(|st| {
                    st.peers.iter().filter(|p| p.samples > 0).count() + 1 >= self.shims.len()
                })
            });
            if complete {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the shims measured no round trips to each other within 20 s");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

fn wait_listening(shim: &Shim) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(&shim.api).is_err() {
        if Instant::now() > deadline {
            bail!(
                "shim {} did not listen on {} within 15 s:\n{}",
                shim.region,
                shim.api,
                shim.output()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
