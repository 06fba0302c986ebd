//! `host-shim schedule` end to end: two shim daemons in two regions, the
//! kv app, and the controller with the cost policy, a price feed and a
//! termination notice. The app stays in the cheap region until the notice,
//! then leaves it before the deadline, keeping its data and its published
//! port.
//!
//! Needs /dev/kvm, redis-cli and the kv image.

mod common;

use common::{free_port, image, require_kvm, Shim};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

const BIN: &str = env!("CARGO_BIN_EXE_host-shim");

fn serve(name: &str, region: &str, id: &str, api: &str, extra: &[&str]) -> Shim {
    let mut args = vec![
        "serve",
        "--listen",
        api,
        "--name",
        name,
        "--region",
        region,
        "--shim-id",
        id,
    ];
    args.extend_from_slice(extra);
    let mut shim = Shim::start(&args);
    let give_up = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(api).is_err() {
        shim.assert_running("the daemon to listen");
        assert!(Instant::now() < give_up, "{name} never listened on {api}");
        std::thread::sleep(Duration::from_millis(20));
    }
    shim
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run host-shim");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn redis(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is needed: apt-get install redis-tools");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn cost_policy_stays_in_the_cheap_region_and_evacuates_it_before_a_notice_deadline() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("host-shim-schedule-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let _spot = serve("spot", "spot-east", "1", &a, &[]);
    let _steady = serve("steady", "steady-west", "2", &b, &["--peer", &a]);
    let port = free_port();
    let (ok, out) = cli(&[
        "--shim",
        &a,
        "run",
        image("kv").to_str().unwrap(),
        "--name",
        "kv",
        "--publish",
        &format!("127.0.0.1:{port}:6379"),
    ]);
    assert!(ok, "{out}");
    let give_up = Instant::now() + Duration::from_secs(30);
    while redis(port, &["PING"]) != "PONG" {
        assert!(Instant::now() < give_up, "kv never answered PING");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(redis(port, &["SET", "spot:key", "kept"]), "OK");

    let prices = dir.join("prices.csv");
    std::fs::write(&prices, "region,price\nspot-east,0.03\nsteady-west,0.10\n").unwrap();
    let notices = dir.join("notices.csv");
    let events = dir.join("events.jsonl");
    let shims = format!("{a},{b}");
    let schedule = |rounds: &str| {
        cli(&[
            "schedule",
            "kv",
            "--policy",
            "cost",
            "--threshold",
            "0.01",
            "--interval",
            "300ms",
            "--prices",
            prices.to_str().unwrap(),
            "--notices",
            notices.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
            "--rounds",
            rounds,
            "--shim",
            &shims,
        ])
    };

    // The app already runs in the cheapest region: it stays.
    let (ok, out) = schedule("3");
    assert!(ok, "{out}");
    assert!(
        out.contains("kv: stay in spot-east (already best)"),
        "{out}"
    );
    assert!(!out.contains("move"), "{out}");

    // spot-east is reclaimed in 20 s: the app leaves now, price or not.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let deadline = now + 20.0;
    std::fs::write(&notices, format!("# spot reclaim\nspot-east,{deadline}\n")).unwrap();
    let (ok, out) = schedule("3");
    assert!(ok, "{out}");
    assert!(
        out.contains("kv: move spot-east -> steady-west (evacuation"),
        "{out}"
    );
    assert!(
        out.contains("migration of kv spot-east -> steady-west: ok"),
        "{out}"
    );
    let moved_at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(moved_at < deadline, "evacuated after the deadline");
    let (ok, list) = cli(&["--shim", &b, "list"]);
    assert!(
        ok && list
            .lines()
            .any(|l| l.starts_with("kv ") && l.contains("running")),
        "{list}"
    );

    // The events file has the decision (with its reason) and the migration.
    let text = std::fs::read_to_string(&events).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines
        .iter()
        .any(|e| e["event"] == "decision" && e["decision"]["reason"]["kind"] == "evacuation"));
    assert!(lines
        .iter()
        .any(|e| e["event"] == "migration" && e["ok"] == true && e["to"] == "steady-west"));

    // Data and the published port survived the evacuation.
    assert_eq!(redis(port, &["GET", "spot:key"]), "kept");

    // With the notice still there, the app does not go back to the cheap region.
    let (ok, out) = schedule("2");
    assert!(ok, "{out}");
    assert!(!out.contains("move"), "{out}");

    // A shim that stops answering during a bounded run: its rounds are reported and the
    // run does not end with success.
    let mut run = Command::new(BIN)
        .args(["schedule", "kv", "--policy", "cost", "--threshold", "0.01"])
        .args(["--interval", "300ms", "--rounds", "6", "--shim", &shims])
        .args(["--prices", prices.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run host-shim schedule");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(run.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.starts_with("scheduling kv"), "{first}");
    drop(_spot);
    let out = run.wait_with_output().unwrap();
    let text = format!(
        "{first}{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("spot left out"), "{text}");
    assert!(
        text.contains("rounds went without every shim's stats"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn schedule_refuses_bad_arguments_clearly() {
    let (ok, out) = cli(&["schedule", "kv", "--shim", "127.0.0.1:1"]);
    assert!(!ok);
    assert!(out.contains("at least two shims"), "{out}");
    let (ok, out) = cli(&[
        "schedule",
        "kv",
        "--policy",
        "cost",
        "--shim",
        "127.0.0.1:1,127.0.0.1:2",
    ]);
    assert!(!ok);
    assert!(out.contains("--prices"), "{out}");
    let (ok, out) = cli(&["schedule", "kv", "--threshold=-3", "--shim", "a:1,b:2"]);
    assert!(!ok);
    assert!(out.contains("threshold"), "{out}");
    let (ok, out) = cli(&["schedule", "kv", "--shim", "127.0.0.1:1,127.0.0.1:2"]);
    assert!(!ok);
    assert!(out.contains("cannot reach the shim"), "{out}");
}
