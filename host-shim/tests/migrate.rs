//! Snapshots, the daemon and live migration through the real binary: shim
//! daemons as separate processes on loopback, the kv app (Redis protocol)
//! or the http app behind published ports, and a client of our own.
//!
//! Needs /dev/kvm and the images (`cargo xtask build-image --all`).

mod common;

use api::MigrationReport;
use common::daemon::{run_kv, Daemon, Load, Redis, TempDir, BIN};
use common::{free_port, image};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn snapshot_and_restore_in_a_new_process_keep_the_data() {
    let dir = TempDir::new("snap");
    let a = Daemon::start("snap-a", 1, &["--no-overlay"], &dir);
    let (_, mut c) = run_kv(&a);
    c.fill(10_000);
    let snap = dir.path("kv.snap");
    let out = a.cli(&["snapshot", "kv", "--out", snap.to_str().unwrap()]);
    assert!(out.contains("pages"), "{out}");
    // The source keeps serving after the snapshot.
    c.check(100);
    assert_eq!(c.cmd(&["SET", "after", "snapshot"]).unwrap(), "OK");
    let list = a.cli(&["list"]);
    assert!(list.contains("kv") && list.contains("running"), "{list}");
    assert!(a.cli(&["logs", "kv"]).contains("listening on port 6379"));
    a.cli(&["stop", "kv"]);
    drop(c);

    // A new process restores it, on another "host".
    let port2 = free_port();
    let mut restored = Command::new(BIN)
        .args(["restore", snap.to_str().unwrap(), "--host-name", "restored"])
        .args(["--publish", &format!("{port2}:6379"), "--timeout", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut c = Redis::when_up(port2);
    c.check(10_000);
    assert_eq!(c.cmd(&["GET", "after"]).unwrap(), "(nil)", "taken before");
    assert_eq!(c.cmd(&["DBSIZE"]).unwrap(), "10000");
    assert_eq!(c.host(), "restored");
    let _ = restored.kill();
    let _ = restored.wait();

    // And a daemon restores it as a new instance.
    let port3 = free_port();
    a.cli(&[
        "restore",
        snap.to_str().unwrap(),
        "--name",
        "kv2",
        "--publish",
        &format!("{port3}:6379"),
    ]);
    let mut c = Redis::when_up(port3);
    c.check(10_000);
    assert_eq!(c.host(), "snap-a");
}

#[test]
fn corrupt_truncated_and_foreign_snapshots_are_refused() {
    let dir = TempDir::new("corrupt");
    let a = Daemon::start("corrupt-a", 2, &["--no-overlay"], &dir);
    let img = image("http").to_string_lossy().into_owned();
    a.cli(&["run", &img, "--name", "web"]);
    let snap = dir.path("web.snap");
    a.cli(&["snapshot", "web", "--out", snap.to_str().unwrap()]);
    let good = std::fs::read(&snap).unwrap();

    let try_restore = |bytes: &[u8], tag: &str| -> String {
        let path = dir.path(&format!("{tag}.snap"));
        std::fs::write(&path, bytes).unwrap();
        let out = Command::new(BIN)
            .args(["restore", path.to_str().unwrap(), "--timeout", "5"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{tag}: refused with status 1");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let mut corrupt = good.clone();
    let at = corrupt.len() - 1000;
    corrupt[at] ^= 0xff;
    let err = try_restore(&corrupt, "corrupt");
    assert!(err.contains("corrupt"), "{err}");
    let err = try_restore(&good[..good.len() / 2], "truncated");
    assert!(err.contains("truncated"), "{err}");
    let mut version = good.clone();
    version[8..12].copy_from_slice(&7u32.to_le_bytes());
    let err = try_restore(&version, "version");
    assert!(err.contains("format version 7"), "{err}");
    let err = try_restore(b"GIF89a not a snapshot at all", "foreign");
    assert!(err.contains("not a host-shim snapshot"), "{err}");
    // The daemon refuses it too, and says why.
    let bad = dir.path("corrupt.snap");
    let out = a.try_cli(&["restore", bad.to_str().unwrap(), "--name", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));
}

/// Waits (up to 30 s) until the keyspace behind `port` has grown by `n` keys:
/// a load running elsewhere has made progress (`what` says whose).
fn grows_by(port: u16, n: usize, what: &str) {
    let dbsize = || -> usize {
        let mut c = Redis::connect(port).unwrap();
        c.cmd(&["DBSIZE"]).unwrap().parse().unwrap()
    };
    let (start, give_up) = (dbsize(), Instant::now() + Duration::from_secs(30));
    while dbsize() < start + n {
        assert!(
            Instant::now() < give_up,
            "{what} added fewer than {n} keys in 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `migrate NAME --to ADDR` on `from`; returns its report (panics on failure).
fn migrate(from: &Daemon, name: &str, to: &Daemon) -> MigrationReport {
    let report = from.migrate(&["migrate", name, "--to", &to.addr]);
    assert_eq!(
        (report.name.as_str(), report.to.as_str()),
        (name, to.addr.as_str())
    );
    report
}

#[test]
fn migration_there_and_back_keeps_connections_data_and_published_ports() {
    let dir = TempDir::new("mig");
    let a = Daemon::start("mig-a", 3, &[], &dir);
    let b = Daemon::start("mig-b", 4, &[], &dir);
    let (port, mut c) = run_kv(&a);
    c.fill(10_000);
    assert_eq!(c.host(), "mig-a");
    let loader = Load::start(port);
    grows_by(port, 50, "the client under load, on A");

    let out = migrate(&a, "kv", &b);
    assert!(
        out.downtime_ms > 0.0 && out.total_ms >= out.downtime_ms,
        "{out:?}"
    );
    // The same connection, through A's published port, now reaches B.
    assert_eq!(c.cmd(&["GET", "key:42"]).unwrap(), "value-42");
    assert_eq!(c.host(), "mig-b");
    assert!(a.cli(&["list"]).contains("moved to"));
    assert!(b.cli(&["list"]).contains("running"));
    // New connections through A's port too.
    let mut fresh = Redis::connect(port).unwrap();
    assert_eq!(fresh.cmd(&["GET", "key:7"]).unwrap(), "value-7");
    assert_eq!(fresh.cmd(&["SET", "on", "b"]).unwrap(), "OK");
    grows_by(port, 50, "the client under load, on B");

    // And back to A.
    migrate(&b, "kv", &a);
    assert_eq!(c.host(), "mig-a");
    assert_eq!(fresh.cmd(&["GET", "on"]).unwrap(), "b");
    grows_by(port, 50, "the client under load, back on A");
    let (acked, gap, error) = loader.stop();
    assert_eq!(error, None, "the client under load saw an error");
    assert!(acked > 10, "only {acked} requests under load");
    eprintln!("client under load: {acked} requests, longest gap {gap:?}");
    // README (`cargo xtask bench migrate`): the longest client gap is 3.1 ms
    // on a quiet host; 48 ms was seen here with a load average of 14. A
    // frame lost in the move would cost the guest's TCP a retransmission
    // timeout of at least 1 s (smoltcp's minimum RTO): 500 ms is the
    // margin for a loaded host that still catches it.
    assert!(
        gap < Duration::from_millis(500),
        "the client waited {gap:?}"
    );
    // Nothing lost: the preloaded keys and every acknowledged write.
    c.check(10_000);
    for i in (0..acked).step_by(7) {
        assert_eq!(
            c.cmd(&["GET", &format!("load:{i}")]).unwrap(),
            format!("v{i}")
        );
    }
    assert!(a.cli(&["list"]).contains("running"));
}

#[test]
fn a_stream_of_another_version_is_refused() {
    use migration::protocol::{read_msg, write_value, Hello, Kind, PROTOCOL_VERSION};
    let dir = TempDir::new("ver");
    let b = Daemon::start("ver-b", 7, &["--no-overlay"], &dir);
    let hello = |abi_version: u32, protocol_version: u32| Hello {
        protocol_version,
        format_version: vmm::snapshot::format::FORMAT_VERSION,
        abi_version,
        migration_id: 1,
        name: "kv".into(),
        mem_size: 64 << 20,
        cpuid: Vec::new(),
        nic: None,
        image: vmm::snapshot::state::ImageId {
            path: "kv.img".into(),
            size: 1,
            sha256: String::new(),
        },
        source: "test".into(),
        source_overlay: None,
        source_api: None,
        record: None,
    };
    for (h, want) in [
        (hello(abi::ABI_VERSION + 1, PROTOCOL_VERSION), "ABI"),
        (hello(abi::ABI_VERSION, 99), "protocol version 99"),
    ] {
        let client = api::Client::new(&b.addr);
        let mut r = api::tls::Shared::new(
            client
                .upgrade("/v1/migration", "host-shim-migration", b"")
                .unwrap(),
        );
        let mut w = r.clone();
        write_value(&mut w, Kind::Hello, &h).unwrap();
        let m = read_msg(&mut r).unwrap();
        assert_eq!(m.kind, Kind::Refuse);
        assert!(m.text().contains(want), "{}", m.text());
    }
    let log = b.output_once_it_says("refused");
    assert!(log.contains("refused"), "{log}");
}

#[test]
fn free_heap_pages_stay_behind_and_the_heap_stays_sound() {
    let dir = TempDir::new("hints");
    let a = Daemon::start("hints-a", 11, &["--no-overlay"], &dir);
    let b = Daemon::start("hints-b", 12, &["--no-overlay"], &dir);
    let img = image("selftest").to_string_lossy().into_owned();
    a.cli(&["run", &img, "--name", "churn", "--", "churn"]);
    let logs_say = |d: &Daemon, needle: &str| {
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            let logs = d.cli(&["logs", "churn"]);
            if logs.contains(needle) {
                return logs;
            }
            assert!(Instant::now() < give_up, "no {needle:?} in:\n{logs}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    logs_say(&a, "churn ok 10 ");
    let out = migrate(&a, "churn", &b);
    let skipped = out
        .skipped
        .unwrap_or_else(|| panic!("no skipped-page count in {out:?}"));
    eprintln!("freed pages left behind: {skipped} ({out:?})");
    assert!(
        skipped >= 1500,
        "the 8 MiB the guest freed should stay behind: {skipped}\n{out:?}"
    );
    // The guest keeps allocating, checking and freeing on the destination.
    let logs = logs_say(&b, "on hints-b");
    assert!(
        !logs.contains("corrupted") && !logs.contains("panicked"),
        "{logs}"
    );
    let later = logs.lines().filter(|l| l.contains("on hints-b")).count();
    let give_up = Instant::now() + Duration::from_secs(20);
    while b
        .cli(&["logs", "churn"])
        .lines()
        .filter(|l| l.contains("on hints-b"))
        .count()
        <= later
    {
        assert!(
            Instant::now() < give_up,
            "churn logged no round on hints-b after the first {later} within 20 s:\n{}",
            b.cli(&["logs", "churn"])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b.cli(&["list"]).contains("running"), "{}", b.cli(&["list"]));
}

/// A→B→A while `redis-benchmark -c 50` hammers kv through A's published
/// port: every request of the benchmark answered (it exits 0 with no
/// error), and the preloaded keys intact afterwards.
#[test]
fn migration_under_fifty_benchmark_connections_loses_nothing() {
    let dir = TempDir::new("mig-heavy");
    let a = Daemon::start("heavy-a", 3, &[], &dir);
    let b = Daemon::start("heavy-b", 4, &[], &dir);
    let (port, mut c) = run_kv(&a);
    c.fill(10_000);
    let bench = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-c", "50", "-n", "200000"])
        .args(["-t", "set,get", "-r", "100000", "-q"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-benchmark is installed (apt-get install redis-tools)");
    // Under load before, between and after the two moves: each move waits
    // until the benchmark has added keys (its random keys are not ours).
    grows_by(port, 500, "redis-benchmark on A");
    let there = migrate(&a, "kv", &b);
    grows_by(port, 500, "redis-benchmark on B");
    let back = migrate(&b, "kv", &a);
    let out = bench.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "redis-benchmark failed:\n{said}");
    assert!(
        !said.to_lowercase().contains("error") && said.contains("GET:"),
        "redis-benchmark saw errors or did not finish:\n{said}"
    );
    eprintln!(
        "downtime {:.2} ms and {:.2} ms under 50 connections; redis-benchmark: {}",
        there.downtime_ms,
        back.downtime_ms,
        said.split(['\r', '\n'])
            .filter(|l| l.contains("requests per second"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    // A fresh connection: `c` has been idle through the benchmark, and the
    // gateway resets a connection idle for 30 s, migration or not (a known
    // gap, see NOTES-tests.md), which on a loaded host this run can exceed.
    drop(c);
    let mut c = Redis::connect(port).unwrap();
    assert_eq!(c.host(), "heavy-a");
    c.check(10_000);
}
