//! The follow-the-sun demo end to end, short: three regions (shim daemons
//! joined by delaying relays for every byte between them), the kv app,
//! clients on a 24 s day and `host-shim schedule` in the loop. The app must
//! move at least twice, every move must take at least the one-way delay
//! between its regions, the scheduler must exit 0 with every move in its
//! event file, follow the sun must beat the best static placement for the
//! same traffic by at least [`MARGIN`], and no key or client connection may
//! be lost; the live dashboard, loaded in headless Chromium, must show the
//! app in its region and follow a move.
//!
//! Needs /dev/kvm, chromium, the kv image (`cargo xtask build-image kv`, or
//! LIBCLOUD_IMAGES) and the host-shim binary next to xtask's (`cargo build
//! -p host-shim`; `cargo xtask test` builds both).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
/// How much more of the requests (absolute share) following the sun must
/// answer under 15 ms than the best static placement.
const MARGIN: f64 = 0.15;

/// The table row starting with `| label`: its cells.
fn row<'a>(out: &'a str, label: &str) -> Vec<&'a str> {
    out.lines()
        .find(|l| l.starts_with(&format!("| {label}")))
        .unwrap_or_else(|| panic!("no '{label}' row in:\n{out}"))
        .split('|')
        .map(str::trim)
        .collect()
}

/// `12.5%` or `**12.5%**` as 0.125.
fn share(cell: &str) -> f64 {
    cell.trim_matches('*')
        .trim_end_matches('%')
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("'{cell}' is not a share"))
        / 100.0
}

/// `40 ms` or `41.3 ms` as a number.
fn ms(cell: &str) -> f64 {
    cell.trim_end_matches("ms")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("'{cell}' is not a duration in ms"))
}

fn kv_image() -> PathBuf {
    let dir = std::env::var_os("LIBCLOUD_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images"));
    let kv = dir.join("kv.img");
    assert!(
        kv.is_file(),
        "{} is missing: run `cargo xtask test` or `cargo xtask build-image kv`",
        kv.display()
    );
    kv
}

fn host_shim() -> PathBuf {
    let shim = Path::new(env!("CARGO_BIN_EXE_xtask"))
        .parent()
        .expect("the binaries' directory")
        .join("host-shim");
    assert!(
        shim.is_file(),
        "{} is missing: build it with `cargo build -p host-shim` (cargo xtask test does)",
        shim.display()
    );
    shim
}

/// `GET path` on the dashboard: the body.
fn get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_owned())
}

fn state(addr: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&get(addr, "/api/state")?).ok()
}

/// The page after its scripts ran, as headless Chromium sees it.
fn dump_dom(url: &str) -> String {
    let profile = std::env::temp_dir().join(format!("xtask-chromium-{}", std::process::id()));
    let out = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .stderr(Stdio::null())
        .output()
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The region the page says the app runs in.
fn app_region(dom: &str) -> Option<String> {
    dom.split_once("<b id=\"app-region\">")
        .and_then(|(_, rest)| rest.split_once("</b>"))
        .map(|(region, _)| region.to_owned())
}

/// Waits until the dashboard's state satisfies `want`; returns it.
fn wait_for(
    addr: &str,
    what: &str,
    child: &mut std::process::Child,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(s) = state(addr).filter(&want) {
            return s;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the demo ended ({status}) before {what}");
        }
        assert!(Instant::now() < give_up, "no {what} within 120 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn short_demo_moves_the_app_keeps_keys_and_connections_and_the_dashboard_follows() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test boots the kv app and needs /dev/kvm, which cannot be opened: {e}");
    }
    assert!(
        Path::new(CHROMIUM).is_file(),
        "the dashboard test needs Debian's chromium at {CHROMIUM}: apt-get install chromium"
    );
    let (kv, shim) = (kv_image(), host_shim());
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("xtask-demo-test-{}.log", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["demo", "follow-the-sun", "--short", "--day-secs", "24"])
        .args(["--dashboard", &addr])
        .arg("--host-shim")
        .arg(&shim)
        .arg("--kv-image")
        .arg(&kv)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run xtask demo");

    // The page shows the app where it runs once the run started.
    let s = wait_for(&addr, "the follow-the-sun run", &mut child, |s| {
        s["run"] == "follow the sun" && s["app"].is_string()
    });
    let before = s["app"].as_str().unwrap().to_owned();
    let url = format!("http://{addr}/");
    let dom = dump_dom(&url);
    // Chromium takes a few seconds: the app may have moved meanwhile, and
    // the page must then show where it went.
    let after = state(&addr)
        .and_then(|s| s["app"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let shown = app_region(&dom);
    assert!(
        shown.as_deref() == Some(before.as_str()) || shown.as_deref() == Some(after.as_str()),
        "the page shows the app in {shown:?}, not where it runs ({before}, then {after}):\n{dom}"
    );
    let first = shown.unwrap();
    assert!(
        dom.contains(&format!("id=\"region-{first}\" class=\"region app\"")),
        "the map does not mark {first}:\n{dom}"
    );

    // After a move the page shows the new region and the move.
    let s = wait_for(&addr, "a move", &mut child, |s| {
        s["app"].as_str().is_some_and(|a| a != first)
            && s["moves"].as_array().is_some_and(|m| !m.is_empty())
    });
    let now = s["app"].as_str().unwrap().to_owned();
    let dom = dump_dom(&url);
    let shown = app_region(&dom);
    // The app may have moved on again since: any region but the first one.
    assert!(
        shown
            .as_deref()
            .is_some_and(|r| r != first && r.contains('-')),
        "the page did not follow the move {first} -> {now} (shows {shown:?}):\n{dom}"
    );
    assert!(
        dom.contains(&format!("{first} → ")),
        "the page lists no move from {first}:\n{dom}"
    );

    let status = child.wait().unwrap();
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "the demo failed ({status}):\n{out}");
    assert!(out.contains("all intact"), "{out}");
    assert!(out.contains("client connections kept: 3/3"), "{out}");
    // Cells: "", label, 3 regions, overall, requests, migrations, ...
    let fts = row(&out, "follow the sun |");
    let migrations: usize = fts[7].parse().unwrap();
    assert!(migrations >= 2, "the app moved {migrations} times:\n{out}");
    let (fts_share, static_share) = (share(fts[5]), share(row(&out, "static best, computed")[5]));
    assert!(
        fts_share >= static_share + MARGIN,
        "follow the sun {fts_share:.3} does not beat the best static placement {static_share:.3} \
         by {MARGIN}:\n{out}"
    );
    let oracle = share(row(&out, "ideal placement (oracle)")[5]);
    assert!(oracle >= static_share && oracle > 0.5, "{out}");

    // The scheduler finished cleanly and its events hold every move.
    let line = out
        .lines()
        .find(|l| l.contains("[schedule] exited 0; its events hold "))
        .unwrap_or_else(|| panic!("the scheduler did not exit 0:\n{out}"));
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (in_events, seen) = (numbers[1], numbers[2]);
    assert!(
        in_events == migrations && in_events >= seen,
        "events {in_events}, table {migrations}, dashboard {seen}:\n{out}"
    );

    // Every move crossed the relays: its downtime is at least the one-way delay.
    let moves: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.contains(" -> ") && l.starts_with("| ") && l.contains(" s |"))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(moves.len(), migrations, "{out}");
    for m in &moves {
        let (one_way, downtime) = (ms(m[3]), ms(m[4]));
        assert!(
            one_way >= 40.0 && downtime >= one_way,
            "move {}: downtime {downtime} ms < one-way delay {one_way} ms:\n{out}",
            m[2]
        );
    }
}
