//! Density: an idle app costs the host only the guest pages it has touched.
//! A kv guest that answers and keeps a few keys, idle, must back a small,
//! fixed amount of host memory whatever its guest memory size: guest RAM is
//! mapped lazily and the guest kernel does not write memory it has not used
//! (zeroed allocations of fresh heap, buffers allocated on first use).
//! And it costs no CPU: an idle guest blocks until its next deadline or a
//! frame, so one without deadlines makes no VM exit at all.

mod common;

use common::daemon::{run_kv, Daemon, TempDir};
use common::{cpu_quiet, free_port, image, require_kvm, Redis, Shim};
use std::time::{Duration, Instant};
use vmm::devices::exits::ExitStats;

/// Anonymous memory (`RssAnon`) of process `pid`, in KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("RssAnon in /proc/PID/status")
}

/// Boots kv with `mem`, stores 10 keys, lets it idle and returns the shim
/// process's anonymous memory (guest RAM plus the monitor's own heap and
/// stacks), in KiB.
fn idle_kv_anon_kib(mem: &str) -> u64 {
    let port = free_port();
    let img = image("kv").to_string_lossy().into_owned();
    let publish = format!("127.0.0.1:{port}:6379");
    let mut shim = Shim::start(&["run", &img, "--mem", mem, "--publish", &publish]);
    let mut kv = Redis::when_up(port);
    kv.fill(10);
    assert_eq!(kv.cmd(&["DBSIZE"]).unwrap(), "10");
    drop(kv);
    // The close handled, kv idles: the shim uses no CPU.
    cpu_quiet(shim.pid(), Duration::from_millis(300), "kv's client left");
    shim.assert_running("kv to idle");
    // Idle: a second look after a while finds the same footprint (no
    // timer or buffer slowly touching more of guest memory).
    let first = rss_anon_kib(shim.pid());
    std::thread::sleep(Duration::from_secs(2));
    let second = rss_anon_kib(shim.pid());
    eprintln!("idle kv ({mem}): RssAnon {first} KiB, 2 s later {second} KiB");
    assert!(
        second <= first + 256,
        "an idle kv ({mem}) kept touching memory: {first} KiB, then {second} KiB"
    );
    second
}

/// The bound: the 4 MiB per idle instance a host of 1,000 apps can afford.
/// An idle kv's shim holds about 2.7 MiB (1.1 MiB of it guest RAM); before
/// the guest kernel stopped zeroing fresh heap it held about 7 MiB.
const IDLE_KV_ANON_MAX_KIB: u64 = 4096;

#[test]
fn an_idle_kv_backs_only_the_memory_it_touched_whatever_its_size() {
    let small = idle_kv_anon_kib("16M");
    let large = idle_kv_anon_kib("256M");
    for (mem, kib) in [("16M", small), ("256M", large)] {
        assert!(
            kib <= IDLE_KV_ANON_MAX_KIB,
            "an idle kv with {mem} of guest memory holds {kib} KiB of host memory \
             (at most {IDLE_KV_ANON_MAX_KIB} KiB expected)"
        );
    }
    // 16x the guest memory costs at most the page-use table and page
    // tables of the larger heap, not its size.
    assert!(
        large <= small + 1024,
        "256 MiB of guest memory cost {large} KiB, 16 MiB {small} KiB"
    );
}

/// The kv instance's exit counters in `daemon`'s `GET /v1/stats`.
fn kv_exits(daemon: &Daemon) -> ExitStats {
    let stats = daemon.stats();
    let kv = stats.instances.iter().find(|i| i.name == "kv");
    kv.unwrap_or_else(|| panic!("no kv instance in {stats:?}"))
        .exits
}

/// Waits (up to `within`) until `daemon`'s kv has made no exit for `quiet`;
/// returns its counters then.
fn kv_settled(daemon: &Daemon, quiet: Duration, within: Duration) -> ExitStats {
    let give_up = Instant::now() + within;
    let mut last = kv_exits(daemon);
    loop {
        std::thread::sleep(quiet);
        let now = kv_exits(daemon);
        if now.total == last.total {
            return now;
        }
        assert!(
            Instant::now() < give_up,
            "kv kept exiting for {within:?} after its clients left: {last:?} -> {now:?}"
        );
        last = now;
    }
}

#[test]
fn an_idle_kv_makes_no_vm_exits_until_its_next_key_deadline() {
    require_kvm();
    let dir = TempDir::new("density-idle");
    let daemon = Daemon::start("idle", 1, &[], &dir);
    let (port, mut kv) = run_kv(&daemon);
    kv.fill(10);
    drop(kv);
    // The closed connection's last segments, then nothing: no key has a
    // deadline, so the expiry task sleeps until a command gives one.
    let quiet = kv_settled(&daemon, Duration::from_secs(1), Duration::from_secs(30));
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let idle = kv_exits(&daemon);
    assert_eq!(
        idle.total - quiet.total,
        0,
        "an idle kv without volatile keys exited in {window:?}: {quiet:?} -> {idle:?}"
    );

    // A key with a deadline wakes kv once, at the deadline, with no
    // command to trigger it (the timer ends an idle wait), then kv sleeps
    // for good again. The deadline is far enough out for the connection's
    // close (and a retransmission of it on a loaded host) to settle first.
    let mut kv = Redis::connect(port).unwrap();
    let set_at = Instant::now();
    assert_eq!(kv.cmd(&["SET", "soon", "v", "PX", "6000"]).unwrap(), "OK");
    drop(kv);
    let before = kv_settled(&daemon, Duration::from_secs(1), Duration::from_secs(4));
    assert!(
        set_at.elapsed() < Duration::from_millis(5000),
        "the host is too loaded to tell the deadline from the close: {:?}",
        set_at.elapsed()
    );
    std::thread::sleep(Duration::from_millis(5500).saturating_sub(set_at.elapsed()));
    let early = kv_exits(&daemon);
    assert_eq!(
        early.idle.timed_out, before.idle.timed_out,
        "kv woke on a timer before its only key's deadline: {before:?} -> {early:?}"
    );
    let give_up = Instant::now() + Duration::from_secs(20);
    while kv_exits(&daemon).idle.timed_out == before.idle.timed_out {
        assert!(Instant::now() < give_up, "kv never woke for the deadline");
        std::thread::sleep(Duration::from_millis(100));
    }
    let woke = set_at.elapsed();
    assert!(woke >= Duration::from_secs(6), "woke after {woke:?}");
    let after = kv_settled(&daemon, Duration::from_secs(1), Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    let end = kv_exits(&daemon);
    assert_eq!(
        end.total, after.total,
        "kv kept waking after its last deadline: {after:?} -> {end:?}"
    );
    let mut kv = Redis::connect(port).unwrap();
    let info = kv.cmd(&["INFO", "stats"]).unwrap();
    assert!(info.contains("expired_keys:1"), "the key expired: {info}");
    assert_eq!(kv.cmd(&["DBSIZE"]).unwrap(), "10");
}

/// Time from `host-shim run` returning to the first `PONG` through the
/// published port (retrying at once while the guest boots).
fn launch_to_first_pong(daemon: &Daemon, name: &str) -> Duration {
    let port = free_port();
    let img = common::daemon::kv_img();
    let publish = format!("{port}:6379");
    daemon.cli(&["run", &img, "--name", name, "--publish", &publish]);
    let launched = Instant::now();
    loop {
        if let Ok(mut c) = Redis::connect(port) {
            if c.cmd(&["PING"]).ok().as_deref() == Some("PONG") {
                return launched.elapsed();
            }
        }
        assert!(
            launched.elapsed() < Duration::from_secs(20),
            "{name} never answered"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_fresh_instance_answers_its_first_ping_at_once() {
    require_kvm();
    let dir = TempDir::new("density-first-ping");
    let daemon = Daemon::start("first", 1, &[], &dir);
    // Each on an address no guest had before: the gateway sends the first
    // SYN without resolving it (it was 1 s: a missed ARP, then smoltcp's
    // retransmission timeout).
    let mut times: Vec<Duration> = (0..3)
        .map(|i| launch_to_first_pong(&daemon, &format!("kv{i}")))
        .collect();
    eprintln!("launch returned -> first PONG: {times:?}");
    times.sort();
    assert!(
        times[1] < Duration::from_millis(300),
        "a fresh instance's first PING took {:?} (median of {times:?})",
        times[1]
    );
}

/// What a daemon process holds: threads, fds, listening TCP sockets, RSS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    threads: usize,
    fds: usize,
    listening: usize,
}

fn held(pid: u32) -> Held {
    let count = |dir: String| std::fs::read_dir(&dir).expect(&dir).count();
    // The daemon's sockets, then those of them that listen.
    let mut sockets = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let target = target.to_string_lossy().into_owned();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            {
                sockets.insert(inode.to_owned());
            }
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap()
        + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    let listening = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.get(3) == Some(&"0A") && f.get(9).is_some_and(|i| sockets.contains(*i)))
        .count();
    // Not the threads serving API connections (named `api`): a bounded
    // pool that grows with connections and shrinks after 3 s idle.
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).map_or(true, |c| c.trim() != "api")
        })
        .count();
    Held {
        threads,
        fds: count(format!("/proc/{pid}/fd")),
        listening,
    }
}

/// [`held`] once two looks 200 ms apart agree (API connections that just
/// ended, a stop finishing), up to 10 s.
fn held_settled(pid: u32) -> Held {
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut last = held(pid);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = held(pid);
        if now == last || Instant::now() > give_up {
            return now;
        }
        last = now;
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS")
}

/// Instances of the many-instances test.
const MANY: usize = 100;
/// How much of the RSS the instances took the daemon may keep after they
/// all stopped (the allocator's arenas, smoltcp's socket slots), KiB: an
/// eighth of what a hundred idle instances hold. Measured: 4.9–8.9 MiB
/// (11.3–12.0 MiB without `malloc_trim` after the stops).
const RSS_KEPT_MAX_KIB: u64 = 16 * 1024;

/// A run of kv as `name` in 16 MiB, published on 127.0.0.1:`port`.
fn small_kv(name: &str, img: &str, port: u16) -> api::RunRequest {
    api::RunRequest {
        name: name.to_owned(),
        image: img.to_owned(),
        mem: 16 << 20,
        publish: vec![api::PublishSpec {
            host: ([127, 0, 0, 1], port).into(),
            guest_addr: None,
            guest_port: 6379,
            proto: api::Proto::Tcp,
        }],
        ..Default::default()
    }
}

#[test]
fn a_hundred_instances_answer_and_stopping_them_returns_every_resource() {
    require_kvm();
    let dir = TempDir::new("density-many");
    let daemon = Daemon::start("many", 1, &["--no-overlay"], &dir);
    let pid = daemon.child.id();
    let client = api::Client::new(&daemon.addr).with_timeout(Duration::from_secs(60));
    let img = common::daemon::kv_img();
    let run = |name: &str, port: u16| {
        let req = small_kv(name, &img, port);
        client
            .run(&req)
            .unwrap_or_else(|e| panic!("run {name}: {e}\n{}", daemon.output()))
    };
    // One instance first, so that what the daemon sets up once (its
    // network thread's tables, the image's first read) is in the baseline.
    let port = free_port();
    run("warm-up", port);
    Redis::when_up(port);
    client.stop("warm-up").unwrap();
    let start = held_settled(pid);
    let rss_start = rss_kib(pid);

    let mut ports = Vec::new();
    let began = Instant::now();
    for i in 0..MANY {
        let port = free_port();
        let info = run(&format!("kv{i}"), port);
        let mut kv = Redis::when_up(port);
        assert_eq!(kv.cmd(&["SET", "me", &info.name]).unwrap(), "OK");
        ports.push(port);
    }
    eprintln!("{MANY} instances launched in {:?}", began.elapsed());
    let info = client.info().unwrap();
    let addresses = info.addresses.expect("the address pool in /v1/info");
    assert_eq!(info.instances, MANY);
    assert_eq!(addresses.guest_net, "10.0.0.0/16");
    assert_eq!(addresses.free, 65_536 - 1024 - 1 - MANY);
    assert!(info.open_files > start.fds as u64);
    // Every one answers, each with its own keys.
    for (i, &port) in ports.iter().enumerate() {
        let mut kv = Redis::connect(port).unwrap();
        assert_eq!(kv.cmd(&["PING"]).unwrap(), "PONG", "kv{i}");
        assert_eq!(kv.cmd(&["GET", "me"]).unwrap(), format!("kv{i}"));
    }
    let running = held(pid);
    let rss_running = rss_kib(pid);

    for i in 0..MANY {
        client.stop(&format!("kv{i}")).unwrap();
    }
    // Back to the start values (fds: at most, as an API connection of the
    // start may have been closing).
    let back = |h: &Held| {
        h.threads == start.threads && h.listening == start.listening && h.fds <= start.fds
    };
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut after = held_settled(pid);
    while !back(&after) && Instant::now() < give_up {
        after = held_settled(pid);
    }
    // The daemon trims its heap once stops pause (200 ms).
    let give_up = Instant::now() + Duration::from_secs(5);
    let mut rss_after = rss_kib(pid);
    while rss_after > rss_start + RSS_KEPT_MAX_KIB && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(100));
        rss_after = rss_kib(pid);
    }
    eprintln!(
        "start {start:?} {rss_start} KiB; {MANY} running {running:?} {rss_running} KiB; \
         stopped {after:?} {rss_after} KiB"
    );
    assert!(
        back(&after),
        "threads, fds and listening sockets after every instance stopped: {after:?}, \
         at start {start:?}"
    );
    for port in &ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *port)).is_err(),
            "port {port} still published"
        );
    }
    assert!(
        rss_after <= rss_start + RSS_KEPT_MAX_KIB,
        "the daemon kept {} KiB of the {} KiB its instances took",
        rss_after.saturating_sub(rss_start),
        rss_running.saturating_sub(rss_start)
    );
    // The addresses came back: the next instance gets the first one.
    let port = free_port();
    let again = run("again", port);
    assert_eq!(
        again.ip.map(|a| a.to_string()).as_deref(),
        Some("10.0.4.0/16")
    );
}

#[test]
fn a_daemon_short_of_file_descriptors_refuses_runs_clearly_and_keeps_its_instances() {
    require_kvm();
    let dir = TempDir::new("density-fds");
    let addr = format!("127.0.0.1:{}", free_port());
    let log = dir.path("fds.log");
    let out = std::fs::File::create(&log).unwrap();
    // A hard limit of 300: the API and migrations keep 256, an instance
    // needs up to 8, the daemon holds about 10 at start and 5 an instance.
    let child = std::process::Command::new("prlimit")
        .args([
            "--nofile=300:300",
            common::daemon::BIN,
            "serve",
            "--listen",
            &addr,
        ])
        .args(["--no-overlay", "--name", "fds"])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("prlimit (util-linux) is needed for this test");
    let daemon = Daemon {
        child,
        addr,
        log,
        state: None,
    };
    let client = api::Client::new(&daemon.addr);
    let give_up = Instant::now() + Duration::from_secs(10);
    let info = loop {
        match client.info() {
            Ok(info) => break info,
            Err(e) => assert!(
                Instant::now() < give_up,
                "no daemon: {e}\n{}",
                daemon.output()
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info.limits.expect("limits").max_open_files, 300);
    let img = common::daemon::kv_img();
    let mut ports = Vec::new();
    let refusal = loop {
        let port = free_port();
        let req = small_kv(&format!("kv{}", ports.len()), &img, port);
        match client.run(&req) {
            Ok(_) => {
                Redis::when_up(port);
                ports.push(port);
            }
            Err(e) => break e,
        }
        assert!(ports.len() < 20, "never refused:\n{}", daemon.output());
    };
    match &refusal {
        api::ClientError::Api { status, message } => {
            assert_eq!(*status, 503, "{message}");
            assert!(message.contains("file descriptors"), "{message}");
        }
        other => panic!("not a clear refusal: {other}"),
    }
    assert!(ports.len() >= 3, "refused after {} instances", ports.len());
    for port in ports {
        assert_eq!(
            Redis::connect(port).unwrap().cmd(&["PING"]).unwrap(),
            "PONG"
        );
    }
}

/// Runs at once through the API in the concurrency test.
const CONCURRENT: usize = 50;

#[test]
fn fifty_runs_at_once_through_the_api_all_get_their_own_address() {
    require_kvm();
    let dir = TempDir::new("density-concurrent");
    let daemon = Daemon::start("concurrent", 1, &["--no-overlay"], &dir);
    let img = common::daemon::kv_img();
    // Every client waits at the barrier, then asks at once: the daemon
    // picks and reserves each address in one step, so none gets a 409.
    let barrier = std::sync::Barrier::new(CONCURRENT);
    // Fifty distinct free ports: each held until all are picked.
    let held: Vec<std::net::TcpListener> = (0..CONCURRENT)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    drop(held);
    let launched: Vec<(u16, api::InstanceInfo)> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let (img, barrier, addr, port) = (&img, &barrier, &daemon.addr, ports[i]);
                s.spawn(move || {
                    let client = api::Client::new(addr).with_timeout(Duration::from_secs(120));
                    let req = small_kv(&format!("kv{i}"), img, port);
                    barrier.wait();
                    (port, client.run(&req))
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| {
                let (port, info) = r.join().expect("a client thread panicked");
                let info = info.unwrap_or_else(|e| panic!("a concurrent run failed: {e}"));
                (port, info)
            })
            .collect()
    });
    let mut ips: Vec<String> = launched
        .iter()
        .map(|(_, i)| i.ip.expect("an address").to_string())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), CONCURRENT, "two instances share an address");
    // Each answers on its own port, as itself.
    for (port, info) in &launched {
        let mut kv = Redis::when_up(*port);
        assert_eq!(kv.cmd(&["SET", "me", &info.name]).unwrap(), "OK");
    }
    for (port, info) in &launched {
        let mut kv = Redis::connect(*port).unwrap();
        assert_eq!(kv.cmd(&["GET", "me"]).unwrap(), info.name);
    }
}

#[test]
fn serve_warns_at_start_of_host_limits_too_small_for_its_max_instances() {
    require_kvm();
    let dir = TempDir::new("density-host-limits");
    // A million instances: past any host's memory mappings per process
    // (8 each) and open files (8 each).
    let daemon = Daemon::start(
        "limits",
        1,
        &["--no-overlay", "--max-instances", "1000000"],
        &dir,
    );
    let out = daemon.output_once_it_says("RLIMIT_NOFILE");
    for needle in [
        "cannot hold serve --max-instances max_instances=1000000",
        "vm.max_map_count",
        "sysctl -w vm.max_map_count=8001",
        "RLIMIT_NOFILE",
    ] {
        assert!(out.contains(needle), "no {needle:?} in the log:\n{out}");
    }
    // It serves all the same.
    let (port, mut kv) = run_kv(&daemon);
    assert_eq!(kv.cmd(&["PING"]).unwrap(), "PONG", "kv on {port}");
}
