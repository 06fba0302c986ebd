//! The demo's live dashboard: one static page (plain HTML, JS and SVG,
//! no build step: `dashboard.html`) and the JSON it polls, served over
//! HTTP while the demo runs.
//!
//! | path | answer |
//! |---|---|
//! | `/` | the page: a world map with the regions, where the app runs, the moves, per-region latency over time |
//! | `/api/state` | [`State`] as JSON |

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tiny_http::{Header, Response, Server};

use super::fleet::RegionSpec;
use super::load::Sample;
use super::BOUND_MS;

/// The page.
const PAGE: &str = include_str!("dashboard.html");
/// Points of latency history kept per run.
const HISTORY: usize = 2000;

#[derive(Clone, Serialize)]
struct RegionView {
    name: String,
    lon: f64,
    lat: f64,
}

/// A move of the app, as the dashboard saw it.
#[derive(Clone, Serialize)]
struct Move {
    t_s: f64,
    run: String,
    from: String,
    to: String,
}

/// Per-region latency over one second of the day.
#[derive(Clone, Serialize)]
struct Point {
    /// Seconds since the run started.
    t_s: f64,
    utc_hour: f64,
    /// Per region: median latency (ms) of the requests due in the last
    /// second (`None`: no request), and how many there were.
    median_ms: Vec<Option<f64>>,
    requests: Vec<usize>,
}

/// What `/api/state` answers.
#[derive(Clone, Serialize)]
pub struct State {
    regions: Vec<RegionView>,
    bound_ms: f64,
    /// The current run's label.
    run: String,
    /// Seconds since the dashboard started.
    t_s: f64,
    /// Where the app runs (a region name).
    app: Option<String>,
    moves: Vec<Move>,
    /// The current run's latency history.
    points: Vec<Point>,
}

/// The dashboard: its server thread and its state.
#[derive(Clone)]
pub struct Dashboard {
    state: Arc<Mutex<State>>,
    started: Instant,
    addr: SocketAddr,
}

impl Dashboard {
    /// Serves the dashboard on `addr` (default: a free port on 127.0.0.1).
    pub fn start(addr: Option<SocketAddr>, regions: &[RegionSpec]) -> Result<Self> {
        let addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("address"));
        let server = Server::http(addr)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot serve the dashboard on {addr}"))?;
        let addr = server
            .server_addr()
            .to_ip()
            .context("the dashboard's address")?;
        let dash = Self {
            state: Arc::new(Mutex::new(State {
                regions: regions
                    .iter()
                    .map(|r| RegionView {
                        name: r.name.into(),
                        lon: r.lon,
                        lat: r.lat,
                    })
                    .collect(),
                bound_ms: BOUND_MS,
                run: String::new(),
                t_s: 0.0,
                app: None,
                moves: Vec::new(),
                points: Vec::new(),
            })),
            started: Instant::now(),
            addr,
        };
        let d = dash.clone();
        thread::Builder::new()
            .name("dashboard".into())
            .spawn(move || {
                for request in server.incoming_requests() {
                    let path = request.url().split('?').next().unwrap_or("").to_owned();
                    let (body, kind, status) = match path.as_str() {
                        "/" | "/index.html" => (PAGE.to_owned(), "text/html; charset=utf-8", 200),
                        "/api/state" => (d.json(), "application/json", 200),
                        _ => ("not found".to_owned(), "text/plain", 404),
                    };
                    let header = Header::from_bytes("Content-Type", kind).expect("static header");
                    let no_cache =
                        Header::from_bytes("Cache-Control", "no-store").expect("static header");
                    let _ = request.respond(
                        Response::from_string(body)
                            .with_status_code(status)
                            .with_header(header)
                            .with_header(no_cache),
                    );
                }
            })?;
        Ok(dash)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn json(&self) -> String {
        let mut s = self.lock().clone();
        s.t_s = self.started.elapsed().as_secs_f64();
        serde_json::to_string(&s).unwrap_or_default()
    }

    /// A new run starts: its label, and an empty latency history.
    pub fn start_run(&self, label: &str) {
        let mut s = self.lock();
        s.run = label.to_owned();
        s.points.clear();
    }

    /// The app runs in region `at` (a change is a move).
    pub fn set_app(&self, at: Option<usize>) {
        let t_s = self.started.elapsed().as_secs_f64();
        let mut s = self.lock();
        let name = at.and_then(|i| s.regions.get(i)).map(|r| r.name.clone());
        if name == s.app {
            return;
        }
        if let (Some(from), Some(to)) = (s.app.clone(), name.clone()) {
            let run = s.run.clone();
            s.moves.push(Move { t_s, run, from, to });
        }
        s.app = name;
    }

    /// The moves the dashboard saw during run `label`.
    pub fn moves_in(&self, label: &str) -> usize {
        self.lock().moves.iter().filter(|m| m.run == label).count()
    }

    /// Where the app runs.
    pub fn app_name(&self) -> Option<String> {
        self.lock().app.clone()
    }

    /// Adds a latency point from the `fresh` samples at `t` into the run.
    pub fn record(&self, t: Duration, utc_hour: f64, fresh: &[Sample]) {
        let mut s = self.lock();
        let n = s.regions.len();
        let mut per: Vec<Vec<f64>> = vec![Vec::new(); n];
        for x in fresh {
            if let Some(v) = per.get_mut(x.region) {
                v.push(x.latency_ms);
            }
        }
        let median_ms = per
            .iter_mut()
            .map(|v| {
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied()
            })
            .collect();
        if s.points.len() >= HISTORY {
            s.points.remove(0);
        }
        s.points.push(Point {
            t_s: t.as_secs_f64(),
            utc_hour,
            median_ms,
            requests: per.iter().map(Vec::len).collect(),
        });
    }
}
