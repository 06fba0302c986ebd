//! `cargo xtask bench control-plane`: the fleet's control plane at scale, on a real etcd
//! and on the file store side by side.
//!
//! A single etcd member on loopback (scratch data directory) is filled through its HTTP
//! gateway with what a large fleet keeps there: `--hosts` simulated hosts, each with its
//! own lease, its record (`hosts/NAME`) and its liveness key under the lease
//! (`alive/NAME`), and `--apps` app records (`apps/NAME`, each on one of the hosts, in 50
//! regions). A file store (`fleet.json`) gets the same records. Then, for both stores,
//! the `host-shim` binary (release, `--json`) is timed as a user runs it:
//!
//! - `fleet ls` (every host with its state and app count: reads all records);
//! - `ps` (reads every host and app record and asks each host; the simulated hosts do not
//!   answer, so this is the store's part plus a refused connection per host);
//! - `events` (the history: the ring of 1,000 events, full);
//!
//! one scheduler round (`Scheduler::decide`) over all the apps in 50 regions, and the
//! event stream's lag: events written to the store while `events --follow --json`
//! runs, from the write to the line printed (p50, p99). For etcd also: a compare-and-swap
//! transaction as `deploy` claims a name (create_revision == 0, put) and as a migration
//! changes an app's owner (mod_revision == v, put), through the HTTP gateway, and etcd's
//! database size.
//!
//! xtask does not link host-shim or the fleet crate (they pull TLS and gRPC): it drives
//! the binary and speaks etcd's JSON gateway over plain HTTP/1.0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::migrate::TempDir;
use super::{free_port, median, require, Guard};
use crate::image;
use crate::workspace::Workspace;

/// Where the fleet's keys live in etcd (as the fleet crate puts them).
const PREFIX: &str = "/host-shim/fleet/";

/// Regions the simulated hosts are spread over.
const REGIONS: usize = 50;

/// Operations per etcd transaction (etcd's default `--max-txn-ops`).
const TXN_OPS: usize = 128;

/// The event ring's size (the fleet crate's `events::KEEP`).
const EVENT_RING: usize = 1000;

/// Options of `bench control-plane`.
#[derive(Debug)]
pub struct ControlPlaneOptions {
    pub hosts: usize,
    pub apps: usize,
    /// Runs per timed command.
    pub runs: usize,
    /// Events written for the lag measurement (etcd; a tenth on the file store).
    pub events: usize,
}

/// Runs the benchmark and prints its markdown table.
pub fn run(ws: &Workspace, o: &ControlPlaneOptions) -> Result<()> {
    require("etcd", "etcd-server")?;
    if o.hosts == 0 || o.apps == 0 || o.runs == 0 {
        bail!("--hosts, --apps and --runs must be at least 1");
    }
    let shim = image::build_shim(ws)?;
    let dir = TempDir::new("control-plane")?;
    let (client, peer) = (free_port()?, free_port()?);
    let addr = format!("127.0.0.1:{client}");
    let log = std::fs::File::create(dir.0.join("etcd.log"))?;
    let _etcd = Guard(
        Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.0.join("etcd"))
            .args(["--listen-client-urls", &format!("http://{addr}")])
            .args(["--advertise-client-urls", &format!("http://{addr}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("bench=http://127.0.0.1:{peer}"),
            ])
            .args(["--quota-backend-bytes", &(4u64 << 30).to_string()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?,
    );
    let gw = Gateway(addr.clone());
    let give_up = Instant::now() + Duration::from_secs(30);
    while gw.post("/v3/maintenance/status", &json!({})).is_err() {
        if Instant::now() > give_up {
            bail!("etcd did not answer on {addr} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The records, as the fleet crate writes them.
    eprintln!(
        "filling etcd with {} hosts and {} apps ...",
        o.hosts, o.apps
    );
    let filled = Instant::now();
    let mut file_entries = serde_json::Map::new();
    let mut revision = 0u64;
    let mut file_put = |key: String, value: Value| {
        revision += 1;
        file_entries.insert(key, json!({ "version": revision, "value": value }));
    };
    let mut puts = Vec::new();
    for i in 0..o.hosts {
        let lease = gw.post("/v3/lease/grant", &json!({ "TTL": 3600 }))?["ID"]
            .as_str()
            .context("a lease without an ID")?
            .to_owned();
        let name = host_name(i);
        let host = json!({
            "name": name, "url": "http://127.0.0.1:9", "region": format!("r{}", i % REGIONS),
            "registered": true,
            "capacity": { "max_instances": 1000, "max_guest_memory": 64u64 << 30 },
        });
        let alive = json!({ "lease": lease.parse::<i64>().unwrap_or(0), "since": 0, "pid": 1 });
        puts.push((format!("hosts/{name}"), host.clone(), None));
        puts.push((format!("alive/{name}"), alive.clone(), Some(lease)));
        file_put(format!("hosts/{name}"), host);
        file_put(format!("alive/{name}"), alive);
    }
    for i in 0..o.apps {
        let app = json!({
            "name": app_name(i), "host": host_name(i % o.hosts),
            "image": format!("sha256:{:064x}", i % 7),
        });
        puts.push((format!("apps/{}", app_name(i)), app.clone(), None));
        file_put(format!("apps/{}", app_name(i)), app);
    }
    for i in 0..EVENT_RING {
        let event = json!({ "time": now(), "kind": "deploy", "app": app_name(i), "hosts": [host_name(i % o.hosts)] });
        puts.push((format!("events/{i:06}"), event.clone(), None));
        file_put(format!("events/{i:06}"), event);
    }
    for batch in puts.chunks(TXN_OPS) {
        let ops: Vec<Value> = batch
            .iter()
            .map(|(k, v, lease)| {
                let mut put =
                    json!({ "key": b64(&format!("{PREFIX}{k}")), "value": b64(&v.to_string()) });
                if let Some(l) = lease {
                    put["lease"] = json!(l);
                }
                json!({ "requestPut": put })
            })
            .collect();
        gw.post("/v3/kv/txn", &json!({ "success": ops }))?;
    }
    let fill_s = filled.elapsed().as_secs_f64();
    let fleet_file = dir.0.join("fleet.json");
    let state = json!({ "revision": revision, "entries": file_entries });
    std::fs::write(&fleet_file, serde_json::to_vec(&state)?)?;
    let file_bytes = std::fs::metadata(&fleet_file)?.len();
    let stores = [
        ("etcd", format!("etcd://{addr}")),
        ("file", format!("file://{}", fleet_file.display())),
    ];

    // The commands.
    let mut rows = Vec::new();
    for (what, args) in [
        ("`fleet ls --json`", &["fleet", "ls", "--json"][..]),
        ("`ps --json` (hosts do not answer)", &["ps", "--json"][..]),
        ("`events --json` (1,000 kept)", &["events", "--json"][..]),
    ] {
        let mut cells = Vec::new();
        for (_, store) in &stores {
            let mut times = Vec::new();
            for _ in 0..o.runs {
                let t = Instant::now();
                let out = Command::new(&shim)
                    .args(["--store", store])
                    .args(args)
                    .env("RUST_LOG", "error")
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                // ps: 4 when hosts did not answer (all of them here).
                if !matches!(out.status.code(), Some(0 | 4)) || out.stdout.is_empty() {
                    bail!("host-shim --store {store} {args:?} failed ({})", out.status);
                }
            }
            cells.push(format!("{:.0} ms", median(times)));
        }
        rows.push((what.to_owned(), cells));
    }

    // Compare-and-swap transactions (etcd).
    let mut claim = Vec::new();
    let mut owner = Vec::new();
    for i in 0..o.runs.max(20) {
        let key = b64(&format!("{PREFIX}apps/cas-{i}"));
        let app = b64(
            &json!({ "name": format!("cas-{i}"), "host": host_name(0), "image": "sha256:0" })
                .to_string(),
        );
        let t = Instant::now();
        let r = gw.post(
            "/v3/kv/txn",
            &json!({
                "compare": [{ "key": key, "target": "CREATE", "create_revision": "0" }],
                "success": [{ "requestPut": { "key": key, "value": app } }],
            }),
        )?;
        claim.push(t.elapsed().as_secs_f64() * 1e3);
        let rev = r["header"]["revision"]
            .as_str()
            .context("no revision")?
            .to_owned();
        let moved = b64(
            &json!({ "name": format!("cas-{i}"), "host": host_name(1), "image": "sha256:0" })
                .to_string(),
        );
        let t = Instant::now();
        let r = gw.post(
            "/v3/kv/txn",
            &json!({
                "compare": [{ "key": key, "target": "MOD", "mod_revision": rev }],
                "success": [{ "requestPut": { "key": key, "value": moved } }],
            }),
        )?;
        owner.push(t.elapsed().as_secs_f64() * 1e3);
        if r["succeeded"] != true {
            bail!("an ownership change at revision {rev} did not succeed: {r}");
        }
    }
    rows.push((
        "deploy's name claim (CAS txn, via the HTTP gateway)".into(),
        vec![format!("{:.2} ms", median(claim)), "-".into()],
    ));
    rows.push((
        "ownership change (CAS txn, via the HTTP gateway)".into(),
        vec![format!("{:.2} ms", median(owner)), "-".into()],
    ));

    // Event-stream lag.
    let etcd_lag = lag(&shim, &stores[0].1, o.events, |i, event| {
        let key = b64(&format!("{PREFIX}events/{:06}", i % EVENT_RING));
        gw.post("/v3/kv/txn", &json!({ "success": [{ "requestPut": { "key": key, "value": b64(&event.to_string()) } }] }))
            .map(drop)
    })?;
    let file_events = (o.events / 10).max(5);
    let file_lag = lag(&shim, &stores[1].1, file_events, |i, event| {
        write_file_event(&fleet_file, i, event)
    })?;
    rows.push((
        "event lag, write to `events --follow` line: p50 / p99".into(),
        vec![
            format!(
                "{:.1} / {:.1} ms ({} events)",
                etcd_lag.0, etcd_lag.1, o.events
            ),
            format!(
                "{:.0} / {:.0} ms ({file_events} events)",
                file_lag.0, file_lag.1
            ),
        ],
    ));
    let (first, best) = scheduler_round(o.apps);
    rows.push((
        format!("one scheduler round, {} apps x {REGIONS} regions (3 client regions each; xtask's {} build)", o.apps, if cfg!(debug_assertions) { "debug" } else { "release" }),
        vec![format!("{first:.0} ms (best of 3: {best:.0} ms)"), "-".into()],
    ));
    let status = gw.post("/v3/maintenance/status", &json!({}))?;
    let db = status["dbSize"]
        .as_str()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(0.0);
    rows.push((
        "size".into(),
        vec![
            format!("{:.1} MiB (etcd db)", db / 1048576.0),
            format!("{:.1} MiB (fleet.json)", file_bytes as f64 / 1048576.0),
        ],
    ));

    println!(
        "\n### Control plane: {} hosts (a lease each), {} apps, {} regions; release host-shim, medians of {} runs\n",
        o.hosts, o.apps, REGIONS, o.runs
    );
    println!(
        "filled etcd in {fill_s:.1} s ({} keys in transactions of {TXN_OPS})\n",
        puts.len()
    );
    println!("| operation | etcd (1 member, loopback) | file store |");
    println!("|---|---|---|");
    for (what, cells) in rows {
        println!("| {what} | {} |", cells.join(" | "));
    }
    Ok(())
}

/// Writes `n` events through `write` (one every 20 ms) while `events --follow --json`
/// runs on `store`; returns the p50 and p99 of write-to-printed, in ms.
fn lag(
    shim: &Path,
    store: &str,
    n: usize,
    mut write: impl FnMut(usize, &Value) -> Result<()>,
) -> Result<(f64, f64)> {
    let mut follower = Guard(
        Command::new(shim)
            .args(["--store", store, "events", "--follow", "--json"])
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let stdout = follower.0.stdout.take().context("the follower's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<(String, f64)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send((line, now())).is_err() {
                return;
            }
        }
    });
    // The history comes first; then the follower watches.
    std::thread::sleep(Duration::from_secs(2));
    while rx.try_recv().is_ok() {}
    let mut lags = Vec::new();
    for i in 0..n {
        let event = json!({ "time": now(), "kind": "stop", "app": format!("lag-{i}") });
        write(i, &event)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let give_up = Instant::now() + Duration::from_secs(60);
    while lags.len() < n {
        let left = give_up.saturating_duration_since(Instant::now());
        let (line, at) = rx
            .recv_timeout(left)
            .map_err(|_| anyhow::anyhow!("events --follow printed {} of {n} events", lags.len()))?;
        let e: Value = serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
        if e["app"].as_str().is_some_and(|a| a.starts_with("lag-")) {
            lags.push((at - e["time"].as_f64().unwrap_or(at)) * 1e3);
        }
    }
    lags.sort_by(f64::total_cmp);
    let p99 = lags[((lags.len() * 99).div_ceil(100)).saturating_sub(1)];
    Ok((median(lags), p99))
}

/// Writes event `i` into the file store as the fleet crate does: under its lock, a new
/// revision, the whole file replaced by a rename.
fn write_file_event(path: &Path, i: usize, event: &Value) -> Result<()> {
    let lock_path = path.with_extension("json.lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)?;
    lock.lock()?;
    let mut state: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let revision = state["revision"].as_u64().unwrap_or(0) + 1;
    state["revision"] = json!(revision);
    state["entries"][format!("events/{:06}", i % EVENT_RING)] =
        json!({ "version": revision, "value": event });
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&state)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// One `Scheduler::decide` over `apps` apps placed in [`REGIONS`] regions, each with
/// clients in three regions, half follow-the-sun and half cost: (first round, best of
/// three), in ms.
fn scheduler_round(apps: usize) -> (f64, f64) {
    use scheduler::{
        AppId, AppSpec, Cost, FollowTheSun, Inputs, Policy, RegionId, Regions, Scheduler,
        SchedulerConfig, Workload,
    };
    use std::sync::Arc;
    let n = REGIONS as u32;
    let mut inputs = Inputs::new(Regions::new((0..n).map(|i| format!("r{i}"))));
    for a in 0..n {
        for b in 0..n {
            let d = a.abs_diff(b).min(n - a.abs_diff(b)) as f64;
            inputs.rtt.set(RegionId(a), RegionId(b), 1.0 + 8.0 * d);
        }
        inputs
            .prices
            .set(RegionId(a), 0.05 + f64::from(a % 7) / 100.0);
    }
    let mut sched = Scheduler::new(SchedulerConfig {
        max_concurrent: 10,
        ..SchedulerConfig::default()
    });
    let sun: Arc<dyn Policy> = Arc::new(FollowTheSun::new());
    let cost: Arc<dyn Policy> = Arc::new(Cost::new());
    for i in 0..apps {
        let name = app_name(i);
        let home = (i % REGIONS) as u32;
        let mut w = Workload::new();
        for k in 0..3u32 {
            w.add(
                RegionId((home + k * 7) % n),
                100 + u64::from(k) * 50,
                1 << 16,
            );
        }
        inputs.workloads.insert(AppId::from(name.as_str()), w);
        inputs.placement.set(name.as_str(), RegionId(home));
        let policy = if i % 2 == 0 {
            sun.clone()
        } else {
            cost.clone()
        };
        let _ = sched.add_app(name.as_str(), AppSpec::new(policy, 5.0));
    }
    let mut times = Vec::new();
    for round in 0..3 {
        let t = Instant::now();
        let decisions = sched.decide(Duration::from_secs(round * 1000), &inputs);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(decisions);
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    (times[0], best)
}

fn host_name(i: usize) -> String {
    format!("h{i:04}")
}

fn app_name(i: usize) -> String {
    format!("app{i:06}")
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// etcd's JSON gateway (`/v3/...`) over plain HTTP/1.0 (one connection per request).
struct Gateway(String);

impl Gateway {
    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let mut s = TcpStream::connect(&self.0)
            .with_context(|| format!("connecting to etcd at {}", self.0))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let body = body.to_string();
        write!(
            s,
            "POST {path} HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.0,
            body.len()
        )?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)?;
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .context("no HTTP answer from etcd")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            bail!("etcd {path}: {head} {body}");
        }
        Ok(serde_json::from_str(body)?)
    }
}

/// Standard base64 (etcd's gateway takes keys and values so).
fn b64(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_is_standard() {
        assert_eq!(super::b64(""), "");
        assert_eq!(super::b64("f"), "Zg==");
        assert_eq!(super::b64("fo"), "Zm8=");
        assert_eq!(super::b64("foo"), "Zm9v");
        assert_eq!(super::b64("/host-shim/fleet/"), "L2hvc3Qtc2hpbS9mbGVldC8=");
    }
}
