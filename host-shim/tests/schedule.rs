//! `host-shim schedule` end to end: two shim daemons in two regions, the
//! kv app, and the controller with the cost policy, a price feed and a
//! termination notice. The app stays in the cheap region until the notice,
//! then leaves it before the deadline, keeping its data and its published
//! port.
//!
//! Needs /dev/kvm, redis-cli and the kv image.

mod common;

use common::daemon::Daemon;
use common::require_kvm;
use std::process::Command;
use std::time::SystemTime;

const BIN: &str = env!("CARGO_BIN_EXE_host-shim");

/// The cost policy's flags of these tests.
const COST: [&str; 6] = [
    "--policy",
    "cost",
    "--threshold",
    "0.01",
    "--interval",
    "300ms",
];

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run host-shim");
    (out.status.success(), common::text(&out))
}

/// `redis-cli -p PORT ARGS...`'s answer, trimmed.
fn redis(port: u16, args: &[&str]) -> String {
    common::redis_cli(port, args).1.trim().to_owned()
}

#[test]
fn cost_policy_stays_in_the_cheap_region_and_evacuates_it_before_a_notice_deadline() {
    require_kvm();
    let tmp = common::daemon::TempDir::new("schedule");
    let dir = tmp.0.clone();
    let spot = Daemon::start_in("spot", "spot-east", 1, &[], &[], &tmp);
    let a = spot.addr.clone();
    let steady = Daemon::start_in("steady", "steady-west", 2, &["--peer", &a], &[], &tmp);
    let b = steady.addr.clone();
    let port = spot.run_published("kv", "kv", 6379, &[]);
    common::wait_for_pong(port, None, "kv on spot");
    assert_eq!(redis(port, &["SET", "spot:key", "kept"]), "OK");

    let prices = dir.join("prices.csv");
    std::fs::write(&prices, "region,price\nspot-east,0.03\nsteady-west,0.10\n").unwrap();
    let notices = dir.join("notices.csv");
    let events = dir.join("events.jsonl");
    let shims = format!("{a},{b}");
    let schedule = |rounds: &str| {
        let mut args = vec!["schedule", "kv"];
        args.extend(COST);
        args.extend(["--prices", prices.to_str().unwrap()]);
        args.extend(["--notices", notices.to_str().unwrap()]);
        args.extend(["--events", events.to_str().unwrap()]);
        args.extend(["--rounds", rounds, "--shim", &shims]);
        cli(&args)
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
    let mut args = COST.to_vec();
    args.extend(["--rounds", "6", "--shim", &shims]);
    args.extend(["--prices", prices.to_str().unwrap()]);
    let mut run = schedule_child(&args);
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(run.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.starts_with("scheduling kv"), "{first}");
    drop(spot);
    let out = run.wait_with_output().unwrap();
    let text = format!("{first}{}", common::text(&out));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("spot left out"), "{text}");
    assert!(
        text.contains("rounds went without every shim's stats"),
        "{text}"
    );
    drop(steady);
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

/// Two plain daemons in regions `east` and `west` (peers), with kv on
/// east behind a published port holding one key: (east, west, port).
fn east_and_west(dir: &common::daemon::TempDir) -> (Daemon, Daemon, u16) {
    let east = Daemon::start_in("east", "east", 1, &[], &[], dir);
    let west = Daemon::start_in("west", "west", 2, &["--peer", &east.addr], &[], dir);
    let port = east.run_published("kv", "kv", 6379, &[]);
    let mut c = common::Redis::when_up(port);
    assert_eq!(c.cmd(&["SET", "placed:key", "kept"]).unwrap(), "OK");
    (east, west, port)
}

/// `schedule kv ARGS` started with its stdout piped.
fn schedule_child(args: &[&str]) -> std::process::Child {
    Command::new(BIN)
        .arg("schedule")
        .arg("kv")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run host-shim schedule")
}

/// The cost policy moves the app on a price change alone (no notice), and
/// one `schedule` run re-reads the prices each round: the app stays while
/// east is cheaper, and the same run moves it once west becomes cheaper.
#[test]
fn the_cost_policy_moves_on_a_price_change_read_within_one_run() {
    require_kvm();
    let dir = common::daemon::TempDir::new("schedule-prices");
    let (east, west, port) = east_and_west(&dir);
    let prices = dir.path("prices.csv");
    let write_prices = |text: &str| {
        // Replaced whole (a rename), never read half written.
        let tmp = dir.path("prices.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &prices).unwrap();
    };
    write_prices("region,price\neast,0.03\nwest,0.10\n");
    let shims = format!("{},{}", east.addr, west.addr);
    let mut args = COST.to_vec();
    args.extend(["--rounds", "15", "--prices", prices.to_str().unwrap()]);
    args.extend(["--shim", &shims]);
    let mut run = schedule_child(&args);
    let mut out = std::io::BufReader::new(run.stdout.take().unwrap());
    let mut seen = String::new();
    // The first decision: stay, east is cheapest.
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "schedule ended before deciding:\n{seen}");
        seen.push_str(&line);
        if line.contains("kv: ") {
            assert!(line.contains("kv: stay in east (already best)"), "{seen}");
            break;
        }
    }
    // The feed changes while the run goes on; nothing else does.
    write_prices("region,price\neast,0.10\nwest,0.03\n");
    std::io::Read::read_to_string(&mut out, &mut seen).unwrap();
    let rest = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&rest.stderr);
    assert!(rest.status.success(), "{seen}{err}");
    assert!(
        seen.contains("kv: move east -> west (improvement"),
        "{seen}{err}"
    );
    assert!(seen.contains("migration of kv east -> west: ok"), "{seen}");
    assert_eq!(seen.matches("migration of kv").count(), 1, "{seen}");
    let list = west.cli(&["list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("kv ") && l.contains("running")),
        "{list}"
    );
    assert_eq!(redis(port, &["GET", "placed:key"]), "kept");
}

/// `--client-region CIDR=REGION` end to end: the same client traffic (from
/// 127.0.0.1, through east's published port) counts as east's without the
/// flag and as west's with `127.0.0.1/32=west`, in the decisions' request
/// counts of the events file.
#[test]
fn client_region_assigns_the_clients_requests_to_their_region() {
    require_kvm();
    let dir = common::daemon::TempDir::new("schedule-client-region");
    let (east, west, port) = east_and_west(&dir);
    let loader = common::daemon::Load::start(port);
    let shims = format!("{},{}", east.addr, west.addr);
    let requests_by_region = |extra: &[&str], tag: &str| {
        let events = dir.path(&format!("events-{tag}.jsonl"));
        let mut args = vec!["--policy", "follow-the-sun", "--interval", "300ms"];
        args.extend(["--rounds", "4", "--shim", &shims]);
        args.extend(["--events", events.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let out = schedule_child(&args).wait_with_output().unwrap();
        let said = common::text(&out);
        assert!(out.status.success(), "{said}");
        let mut totals = std::collections::BTreeMap::<String, u64>::new();
        for line in std::fs::read_to_string(&events).unwrap().lines() {
            let e: serde_json::Value = serde_json::from_str(line).unwrap();
            if e["event"] != "decision" {
                continue;
            }
            for pair in e["requests"].as_array().expect("requests in a decision") {
                let region = pair[0].as_str().unwrap().to_owned();
                *totals.entry(region).or_default() += pair[1].as_u64().unwrap();
            }
        }
        totals.retain(|_, n| *n > 0);
        (totals, said)
    };
    let (plain, said) = requests_by_region(&[], "plain");
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        ["east"],
        "without --client-region the requests are east's: {plain:?}\n{said}"
    );
    let (mapped, said) = requests_by_region(&["--client-region", "127.0.0.1/32=west"], "mapped");
    assert_eq!(
        mapped.keys().collect::<Vec<_>>(),
        ["west"],
        "with 127.0.0.1/32=west the requests are west's: {mapped:?}\n{said}"
    );
    let (acked, _, error) = loader.stop();
    assert_eq!(
        error, None,
        "the client saw an error after {acked} requests"
    );
}
