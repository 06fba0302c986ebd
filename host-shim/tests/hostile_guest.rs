//! A hostile guest cannot take the daemon down: `apps/hostile` floods its
//! console, its checkpoints, the network and the host's log, beside a kv
//! instance, and each test checks that the daemon's memory (VmRSS), its
//! disk and its log stay bounded, that the drops are counted in
//! `GET /v1/stats`, and that kv still answers `redis-cli PING` in time.

mod common;

use common::daemon::{run_kv, Daemon, TempDir};
use common::image;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long each attack runs.
const ATTACK: Duration = Duration::from_secs(8);
/// How long kv may take to answer a PING during an attack (a loaded host).
const PING_DEADLINE: Duration = Duration::from_secs(5);
/// The hostile guest's memory: its checkpoint chain may hold twice this.
const HOSTILE_MEM_MIB: u64 = 32;

/// The daemon's resident memory, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// `redis-cli -p PORT PING`, killed at the deadline; how long it took.
fn redis_ping(port: u16) -> Result<Duration, String> {
    let start = Instant::now();
    let mut child = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "PING"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli is installed (apt-get install redis-tools)");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            return match (status.success(), out.trim()) {
                (true, "PONG") => Ok(start.elapsed()),
                _ => Err(format!("redis-cli PING: {status}: {out}")),
            };
        }
        if start.elapsed() > PING_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no PONG within {PING_DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /v1/stats` of a plain-HTTP daemon.
fn stats(daemon: &Daemon) -> serde_json::Value {
    let mut s = TcpStream::connect(&daemon.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /v1/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("stats: {e}: {answer}"))
}

/// The hostile instance's figures in `GET /v1/stats`.
fn hostile_stats(daemon: &Daemon) -> serde_json::Value {
    stats(daemon)["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "hostile")
        .cloned()
        .unwrap_or_else(|| panic!("no hostile instance in the stats"))
}

/// Bytes of the files under `dir`.
fn disk_use(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_use(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// What was seen while an attack ran.
struct Seen {
    /// RSS growth of the daemon over its level before the attack, KiB.
    rss_growth_kib: u64,
    /// The slowest PONG.
    slowest_ping: Duration,
    /// Most bytes under the watched directory at any time.
    max_disk: u64,
}

/// Runs kv, then `hostile MODE ARGS` (with `run_extra` flags) on `daemon`;
/// watches the daemon for [`ATTACK`] (pinging kv all along; a missed PONG
/// fails the test).
fn attack(daemon: &Daemon, mode: &[&str], run_extra: &[&str], disk: Option<&Path>) -> Seen {
    attack_with(daemon, mode, run_extra, disk, || ()).0
}

/// [`attack`], with `also` started once the hostile instance runs (what it
/// returns is kept until the attack is over).
fn attack_with<T>(
    daemon: &Daemon,
    mode: &[&str],
    run_extra: &[&str],
    disk: Option<&Path>,
    also: impl FnOnce() -> T,
) -> (Seen, T) {
    let (kv_port, _kv) = run_kv(daemon);
    let pid = daemon.child.id();
    let before = rss_kib(pid);
    let img = image("hostile");
    let mem = format!("{HOSTILE_MEM_MIB}M");
    let mut args = vec!["run", img.to_str().unwrap(), "--name", "hostile"];
    args.extend(["--mem", &mem]);
    args.extend(run_extra);
    args.push("--");
    args.extend(mode);
    daemon.cli(&args);
    let kept = also();
    let mut seen = Seen {
        rss_growth_kib: 0,
        slowest_ping: Duration::ZERO,
        max_disk: 0,
    };
    let start = Instant::now();
    let mut next_ping = start;
    while start.elapsed() < ATTACK {
        seen.rss_growth_kib = seen.rss_growth_kib.max(rss_kib(pid).saturating_sub(before));
        if let Some(dir) = disk {
            seen.max_disk = seen.max_disk.max(disk_use(dir));
        }
        if Instant::now() >= next_ping {
            let took = redis_ping(kv_port).unwrap_or_else(|e| {
                panic!(
                    "kv stopped answering during {mode:?}: {e}\n--- daemon:\n{}",
                    tail(&daemon.output())
                )
            });
            seen.slowest_ping = seen.slowest_ping.max(took);
            next_ping = Instant::now() + Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{mode:?}: daemon RSS +{} MiB, slowest PONG {:?}, disk {} MiB",
        seen.rss_growth_kib >> 10,
        seen.slowest_ping,
        seen.max_disk >> 20
    );
    (seen, kept)
}

/// Stops the hostile instance; the daemon's log once it is stopped.
/// `stop` answers once the vCPU thread has ended (joined: its console
/// written out and dropped, which flushes a partial line), so the log
/// holds all the instance will ever make the daemon write.
fn stop_hostile(daemon: &Daemon) -> String {
    let out = daemon.cli(&["stop", "hostile"]);
    assert!(out.contains("stopped"), "{out}");
    let log = daemon.output();
    assert!(
        !log.contains("the vCPU thread did not stop"),
        "the hostile guest's vCPU thread was left behind:\n{}",
        tail(&log)
    );
    log
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..]
        .iter()
        .map(|l| &l[..l.len().min(300)])
        .collect::<Vec<_>>()
        .join("\n")
}

/// The lines of the daemon's log that `pred` picks, and the longest.
fn log_lines(log: &str, pred: impl Fn(&str) -> bool) -> (usize, usize) {
    log.lines()
        .filter(|l| pred(l))
        .fold((0, 0), |(n, longest), l| (n + 1, longest.max(l.len())))
}

#[test]
fn a_console_flood_without_newlines_stays_bounded() {
    let dir = TempDir::new("hostile-console");
    let daemon = Daemon::start("h", 1, &[], &dir);
    let seen = attack(&daemon, &["console-flood"], &[], None);
    let s = hostile_stats(&daemon);
    let log = stop_hostile(&daemon);
    // Unbounded, the partial line grew by hundreds of MB a second.
    assert!(
        seen.rss_growth_kib < 32 << 10,
        "the daemon grew by {} MiB",
        seen.rss_growth_kib >> 10
    );
    assert!(s["console_lines_split"].as_u64().unwrap() > 0, "{s}");
    assert!(s["console_lines_dropped"].as_u64().unwrap() > 0, "{s}");
    // The log: at most the console rate's worth of lines, none huge.
    let (lines, longest) = log_lines(&log, |l| l.starts_with("[hostile] "));
    let secs = ATTACK.as_secs() + 10; // the boot and the stop, generously
    let bound =
        2 * (vmm::console::BURST + vmm::console::RATE * secs) / vmm::console::MAX_LINE as u64;
    assert!(
        lines > 0 && (lines as u64) < bound,
        "{lines} console lines in the log (bound {bound})"
    );
    assert!(
        longest < vmm::console::MAX_LINE + 100,
        "a line of {longest} bytes"
    );
}

#[test]
fn a_delta_flood_is_refused_past_the_chain_limit() {
    let dir = TempDir::new("hostile-delta");
    let daemon = Daemon::start("h", 1, &[], &dir);
    let seen = attack(&daemon, &["delta-flood", "512"], &[], None);
    let s = hostile_stats(&daemon);
    let log = stop_hostile(&daemon);
    // The chain (at most 2x the guest's memory) is the daemon's only copy
    // (a waiter may hold one more); unbounded, 1 GB in seconds.
    let limit_mib = vmm::checkpoint::limit_for(HOSTILE_MEM_MIB << 20, None) >> 20;
    assert!(
        seen.rss_growth_kib >> 10 < 2 * limit_mib + 64,
        "the daemon grew by {} MiB (chain limit {limit_mib} MiB)",
        seen.rss_growth_kib >> 10
    );
    assert!(s["checkpoints_refused"].as_u64().unwrap() > 0, "{s}");
    // The guest saw refusals and carried on with full checkpoints.
    assert!(
        log.lines()
            .any(|l| l.starts_with("[hostile] checkpoints:") && !l.ends_with(" 0 refused")),
        "{}",
        tail(&log)
    );
    assert_warnings_bounded(&log, "checkpoint is not stored");
}

/// The disk-fill attack with `kib` KiB blobs, checkpointing into
/// `dir/hostile.ckpt/`: what was seen, the guest's stats and the log once
/// it is stopped, and the checkpoint file it left.
fn disk_fill(
    daemon: &Daemon,
    dir: &TempDir,
    kib: &str,
) -> (Seen, serde_json::Value, String, std::path::PathBuf) {
    let ckpt = dir.path("hostile.ckpt");
    let to = ckpt.to_str().unwrap().to_owned();
    let seen = attack(
        daemon,
        &["disk-fill", kib],
        &["--checkpoint-to", &to],
        Some(&ckpt),
    );
    let s = hostile_stats(daemon);
    let log = stop_hostile(daemon);
    (seen, s, log, ckpt.join("latest.ckpt"))
}

#[test]
fn a_disk_fill_stays_under_the_instance_cap() {
    let dir = TempDir::new("hostile-disk");
    let daemon = Daemon::start("h", 1, &[], &dir);
    let (seen, s, log, file) = disk_fill(&daemon, &dir, "4096");
    // The chain on disk plus one full checkpoint being replaced.
    let cap = 2 * vmm::checkpoint::limit_for(HOSTILE_MEM_MIB << 20, None);
    assert!(
        seen.max_disk <= cap,
        "{} MiB of checkpoints on disk (cap {} MiB)",
        seen.max_disk >> 20,
        cap >> 20
    );
    assert!(s["checkpoints_refused"].as_u64().unwrap() > 0, "{s}");
    assert!(
        seen.rss_growth_kib < (4 * cap) >> 10,
        "RSS +{} KiB",
        seen.rss_growth_kib
    );
    // What is on disk restores: no more than the restore limit.
    assert!(vmm::checkpoint::read_file(&file).is_ok());
    assert_warnings_bounded(&log, "checkpoint is not stored");
}

#[test]
fn bogus_hypercalls_do_not_flood_the_log() {
    let dir = TempDir::new("hostile-warn");
    let daemon = Daemon::start("h", 1, &[], &dir);
    let seen = attack(&daemon, &["warn-flood"], &[], None);
    // The guest made tens of thousands of bad calls: it did run. Each costs
    // an exit, so on a loaded host the 10,000th may come after the attack's
    // window: wait for it (a guest stuck in its first round never says so).
    let ran = "[hostile] warn-flood: 10000 rounds";
    let deadline = Instant::now() + Duration::from_secs(90);
    while !daemon.output().contains(ran) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = stop_hostile(&daemon);
    assert!(
        seen.rss_growth_kib < 64 << 10,
        "RSS +{} KiB",
        seen.rss_growth_kib
    );
    assert!(log.contains(ran), "{}", tail(&log));
    assert_warnings_bounded(&log, "unknown hypercall");
    assert_warnings_bounded(&log, "console write: buffer");
    assert_warnings_bounded(&log, "unhandled MMIO write");
    assert!(log.contains("suppressed="), "{}", tail(&log));
}

#[test]
fn a_broadcast_flood_with_an_overlay_peer_stays_bounded() {
    let dir = TempDir::new("hostile-bcast");
    let peer = Daemon::start("p", 2, &[], &dir);
    let daemon = Daemon::start("h", 1, &["--peer", &peer.addr], &dir);
    let peer_before = rss_kib(peer.child.id());
    let seen = attack(&daemon, &["broadcast-flood"], &[], None);
    let peer_growth = rss_kib(peer.child.id()).saturating_sub(peer_before);
    let s = hostile_stats(&daemon);
    let shim = stats(&daemon);
    let log = stop_hostile(&daemon);
    assert!(
        seen.rss_growth_kib < 128 << 10,
        "the daemon grew by {} MiB",
        seen.rss_growth_kib >> 10
    );
    assert!(
        peer_growth < 128 << 10,
        "the peer grew by {} MiB",
        peer_growth >> 10
    );
    let net = &s["net"];
    assert!(net["tx_packets"].as_u64().unwrap() > 10_000, "{s}");
    assert!(net["flood_dropped"].as_u64().unwrap() > 0, "{s}");
    // What the switch flooded: the burst and the rate, no more.
    let forwarded = net["tx_packets"].as_u64().unwrap()
        - net["flood_dropped"].as_u64().unwrap()
        - net["tx_dropped"].as_u64().unwrap();
    let secs = ATTACK.as_secs() + 10;
    let bound = hostnet::FLOOD_BURST + hostnet::FLOOD_RATE * secs + 1000; // DHCP, ARP and a margin
    assert!(
        forwarded < bound,
        "{forwarded} frames switched (bound {bound}): {s}"
    );
    eprintln!(
        "switch dropped {}, flooded {forwarded}, hostile net {net}",
        shim["switch_dropped"]
    );
    assert!(
        log.contains("[hostile] broadcast-flood: 100000 datagrams"),
        "{}",
        tail(&log)
    );
}

/// `--max-checkpoint` bounds every instance's chain instead of twice its
/// memory: a disk fill stops at the flag's size; past what a restore
/// accepts, `serve` and `run` refuse the flag, naming the limit; both
/// `--help`s document it.
#[test]
fn the_checkpoint_limit_is_a_flag_refused_past_what_a_restore_takes() {
    for cmd in ["serve", "run"] {
        let help = common::shim([cmd, "--help"]);
        assert!(help.stdout.contains("--max-checkpoint <SIZE>"), "{help:?}");
        let mut args = vec![cmd, "--max-checkpoint", "300M"];
        if cmd == "run" {
            args.push("/nonexistent.img");
        }
        let refused = common::shim(&args);
        // Bad flags: status 1, before anything starts.
        assert_eq!(refused.status, Some(1), "{refused:?}");
        assert!(
            refused
                .stderr
                .contains("more than a restore accepts (256 MiB)"),
            "{refused:?}"
        );
    }

    let dir = TempDir::new("hostile-max-ckpt");
    let max: u64 = 8 << 20;
    let daemon = Daemon::start("h", 1, &["--max-checkpoint", "8M"], &dir);
    let info = api::Client::new(&daemon.addr).info().expect("GET /v1/info");
    let limits = info.limits.expect("the daemon reports its limits");
    assert_eq!(limits.max_checkpoint, Some(max));
    // 1 MiB blobs: a full checkpoint and deltas, past 8 MiB in a second.
    let (seen, s, log, file) = disk_fill(&daemon, &dir, "1024");
    // The chain plus one full checkpoint being replaced; twice the memory
    // (64 MiB) without the flag.
    assert!(
        seen.max_disk <= 2 * max,
        "{} MiB of checkpoints on disk (--max-checkpoint 8M)",
        seen.max_disk >> 20
    );
    assert!(s["checkpoints_refused"].as_u64().unwrap() > 0, "{s}");
    let chain = vmm::checkpoint::read_file(&file).expect("what is on disk restores");
    assert!(
        chain.len() as u64 <= max,
        "a chain of {} bytes",
        chain.len()
    );
    assert_warnings_bounded(&log, "checkpoint is not stored");
}

/// Followers of a flooding guest's console that never read: each holds at
/// most its queue in the daemon and is cut once its writes stall past the
/// request deadline; meanwhile kv answers and the daemon's memory stays
/// bounded.
#[test]
fn a_follower_that_never_reads_costs_bounded_memory() {
    const FOLLOWERS: usize = 4;
    let dir = TempDir::new("hostile-follow");
    let daemon = Daemon::start("h", 1, &["--request-timeout", "5s"], &dir);
    let pid = daemon.child.id();
    let mut threads_before = 0;
    let mut threads_during = 0;
    let (seen, followers) = attack_with(&daemon, &["console-flood"], &[], None, || {
        threads_before = proc_status(pid, "Threads:");
        let followers = (0..FOLLOWERS)
            .map(|_| {
                let mut s = TcpStream::connect(&daemon.addr).unwrap();
                write!(
                    s,
                    "POST /v1/instances/hostile/logs/follow HTTP/1.1\r\nHost: x\r\n\
                     Connection: Upgrade\r\nUpgrade: host-shim-progress\r\n\
                     Content-Length: 0\r\n\r\n"
                )
                .unwrap();
                s // never read
            })
            .collect::<Vec<_>>();
        // Each is served (a connection thread and a follower thread).
        let give_up = Instant::now() + Duration::from_secs(30);
        while threads_during < threads_before + FOLLOWERS as u64 && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(50));
            threads_during = proc_status(pid, "Threads:");
        }
        followers
    });
    // Unbounded, each follower would hold all the guest wrote (megabytes a
    // second); bounded, its queue of lines (and the kernel's socket buffers,
    // not the daemon's memory).
    let per_follower = (daemon::logs::QUEUE * (vmm::console::MAX_LINE + 64)) as u64;
    let bound = FOLLOWERS as u64 * per_follower + (48 << 20);
    assert!(
        seen.rss_growth_kib << 10 < bound,
        "the daemon grew by {} MiB with {FOLLOWERS} stalled followers (bound {} MiB)",
        seen.rss_growth_kib >> 10,
        bound >> 20
    );
    // The stalled followers are cut (the write deadline, 5 s here): their
    // threads (a connection's and a follower's each) end while the guest
    // still floods; one or two others may come and go meanwhile.
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut threads = proc_status(pid, "Threads:");
    while threads > threads_before + 2 && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(200));
        threads = proc_status(pid, "Threads:");
    }
    assert!(
        threads_during >= threads_before + FOLLOWERS as u64,
        "{threads_during} daemon threads with {FOLLOWERS} followers, {threads_before} before"
    );
    assert!(
        threads <= threads_before + 2,
        "{threads} daemon threads, {threads_before} before the followers came"
    );
    // The daemon still answers its other callers.
    let kv_console = daemon.cli(&["logs", "kv"]);
    assert!(!kv_console.is_empty(), "kv's console");
    drop(followers);
    stop_hostile(&daemon);
}

/// A numeric field of `/proc/PID/status` (e.g. `Threads:`).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The daemon logged at most a burst and a trickle of warnings containing
/// `needle` (one source: the burst, then one a second).
fn assert_warnings_bounded(log: &str, needle: &str) {
    let (n, _) = log_lines(log, |l| l.contains(needle));
    let secs = ATTACK.as_secs() + 10;
    let bound = shim_util::limit::WARN_BURST + shim_util::limit::WARN_RATE * secs;
    eprintln!("{n} warnings about {needle:?} in the log (bound {bound})");
    // Every attack that calls this makes the daemon warn: none at all means
    // the message changed and this check would see nothing.
    assert!(n > 0, "no warning about {needle:?} in the log");
    assert!(
        (n as u64) <= bound,
        "{n} warnings about {needle:?} in the log (bound {bound})"
    );
}
