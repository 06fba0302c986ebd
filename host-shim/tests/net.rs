//! Guest networking through the real binary: `curl` through a published
//! port, port-in-use and syntax errors, an idle networked guest's CPU use,
//! the VM exits a request costs (`GET /v1/stats`), a guest that computes
//! next to the network thread losing its seat there, two guests on one
//! switch, and (as root) a TAP device in a network namespace of the test's
//! own.

mod common;

use common::daemon::{run_kv, Daemon, TempDir};
use common::{cpu_ticks, free_port, image, require_kvm, run_image, Shim};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `curl -sS URL` (a real client): `Ok(body)` or `Err(curl's stderr)`.
fn curl(url: &str) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "-m", "5", url])
        .output()
        .expect("curl is installed (apt-get install curl)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Retries `curl URL` until it answers (the guest is booting).
fn curl_when_up(shim: &mut Shim, url: &str) -> String {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        match curl(url) {
            Ok(body) => return body,
            Err(e) => {
                shim.assert_running(url);
                assert!(Instant::now() < give_up, "{url} never answered: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn http_img() -> String {
    image("http").to_string_lossy().into_owned()
}

#[test]
fn curl_gets_pages_through_a_published_port() {
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    let img = http_img();
    let mut shim = Shim::start(&[
        "run",
        &img,
        "--timeout",
        "60",
        "--host-name",
        "net-test",
        "--publish",
        &publish,
    ]);
    let base = format!("http://127.0.0.1:{port}");
    let body = curl_when_up(&mut shim, &format!("{base}/healthz"));
    assert_eq!(body, "ok\n");
    let body = curl(&format!("{base}/")).unwrap();
    assert!(
        body.starts_with("Hello from a libcloud unikernel on net-test"),
        "{body}"
    );
    // Many short connections in a row: each is a new proxied TCP session.
    for i in 0..30 {
        assert_eq!(
            curl(&format!("{base}/healthz")),
            Ok("ok\n".into()),
            "request {i}"
        );
    }
    let body = curl(&format!("{base}/no/such/page")).unwrap();
    assert!(body.starts_with("no route for GET /no/such/page"), "{body}");
    let (out, _) = shim.stop();
    assert!(out.contains("http: listening on port 80"), "{out}");
}

#[test]
fn a_published_port_in_use_is_a_clear_error() {
    require_kvm();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let img = image("http");
    let publish = format!("{port}:80");
    let run = run_image(&img, &["--timeout", "20", "--publish", &publish]);
    assert_eq!(run.status, Some(1), "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "cannot publish 127.0.0.1:{port}/tcp: the address is already in use"
        )),
        "{run:?}"
    );
    assert!(run.stdout.is_empty(), "the guest never booted: {run:?}");
    assert!(run.elapsed < Duration::from_secs(5), "{run:?}");
}

#[test]
fn bad_network_flags_are_refused() {
    let img = image("http");
    for (flags, expected) in [
        (&["--publish", "8080"][..], "is not a port mapping"),
        (
            &["--publish", "8080:80/sctp"][..],
            "unknown protocol 'sctp'",
        ),
        (&["--publish", "x:8080:80"][..], "is not a port mapping"),
        (&["--ip", "10.0.2.20"][..], "--ip needs a network"),
        (
            &["--net", "user", "--ip", "192.168.0.2/24"][..],
            "10.0.2.0/24",
        ),
        (&["--net", "bridge"][..], "unknown network 'bridge'"),
        (
            &["--mac", "01:00:00:00:00:01", "--net", "user"][..],
            "multicast",
        ),
    ] {
        let run = run_image(&img, flags);
        assert_eq!(run.status, Some(1), "{flags:?}: {run:?}");
        assert!(run.stderr.contains(expected), "{flags:?}: {run:?}");
    }
}

fn clock_ticks_per_second() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

#[test]
fn an_idle_networked_guest_uses_almost_no_cpu() {
    let port = free_port();
    let publish = format!("{port}:80");
    let img = http_img();
    let mut shim = Shim::start(&["run", &img, "--timeout", "60", "--publish", &publish]);
    curl_when_up(&mut shim, &format!("http://127.0.0.1:{port}/healthz"));
    // An open, idle keep-alive connection must not cost CPU either: the
    // guest has served a request on it (accepted it, answered, and waits
    // for the next) before the window starts.
    let mut idle_conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    idle_conn
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    idle_conn
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"ok\n") {
        let n = idle_conn
            .read(&mut byte)
            .expect("an answer on the keep-alive connection");
        assert_eq!(n, 1, "the keep-alive connection closed: {answer:?}");
        answer.push(byte[0]);
    }
    assert!(
        String::from_utf8_lossy(&answer).contains("keep-alive"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let window = Duration::from_millis(2500);
    let before = cpu_ticks(shim.pid());
    std::thread::sleep(window);
    let used = cpu_ticks(shim.pid()) - before;
    let hz = clock_ticks_per_second();
    let share = used as f64 / (hz as f64 * window.as_secs_f64());
    eprintln!(
        "idle networked guest: {used} ticks in {window:?} ({:.1}% of a CPU)",
        share * 100.0
    );
    assert!(share < 0.03, "{:.1}% of a CPU while idle", share * 100.0);
    drop(idle_conn);
}

/// `Cpus_allowed_list` of the thread of process `pid` named `name`
/// (`None`: no such thread).
fn thread_cpus(pid: u32, name: &str) -> Option<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let task = tasks.flatten().find(|t| {
        std::fs::read_to_string(t.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
    })?;
    let status = std::fs::read_to_string(task.path().join("status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))?;
    Some(line["Cpus_allowed_list:".len()..].trim().to_owned())
}

#[test]
fn a_guest_that_computes_next_to_the_network_thread_loses_its_seat() {
    require_kvm();
    let img = image("hostile");
    let img = img.to_str().unwrap();
    // It sends a frame (so it sits next to the network thread), then
    // computes and never waits.
    let mut shim = Shim::start(&[
        "run",
        img,
        "--net",
        "user",
        "--timeout",
        "60",
        "--",
        "net-spin",
    ]);
    let me = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let all = me
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/thread-self/status")
        .trim()
        .to_owned();
    let pid = shim.pid();
    let give_up = Instant::now() + Duration::from_secs(30);
    // First both threads on one CPU (the seat), then both on all again.
    let mut seated = false;
    loop {
        shim.assert_running("the hostile guest to lose its seat");
        let (vcpu, net) = (thread_cpus(pid, "vcpu-0"), thread_cpus(pid, "net"));
        let (vcpu, net) = (vcpu.unwrap_or_default(), net.unwrap_or_default());
        let together = !vcpu.is_empty() && vcpu == net;
        if together && vcpu != all && !vcpu.contains([',', '-']) {
            seated = true;
        } else if seated && together && vcpu == all {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "after 30 s (seated: {seated}) the vCPU thread may run on {vcpu:?}, \
             the network thread on {net:?} (all: {all})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // It does not sit down again (the network thread checks every second).
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        shim.assert_running("the hostile guest to stay unseated");
        let vcpu = thread_cpus(pid, "vcpu-0").unwrap_or_default();
        assert_eq!(vcpu, all, "the vCPU thread was pinned again");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (out, err) = shim.stop();
    assert!(
        err.contains("its vCPU thread leaves it"),
        "the valve's warning is missing\n{out}\n{err}"
    );
    let line = err
        .lines()
        .find(|l| l.contains("its vCPU thread leaves it"))
        .unwrap();
    eprintln!("{line}");
    assert!(line.contains("cpu_share"), "{line}");
    assert_eq!(
        err.matches("its vCPU thread leaves it").count(),
        1,
        "logged once: {err}"
    );
}

/// The kv instance's exit counters in `daemon`'s `GET /v1/stats`.
fn kv_exits(daemon: &Daemon) -> vmm::devices::exits::ExitStats {
    let stats = daemon.stats();
    let kv = stats.instances.iter().find(|i| i.name == "kv");
    kv.unwrap_or_else(|| panic!("no kv instance in {stats:?}"))
        .exits
}

#[test]
fn a_request_costs_a_bounded_number_of_exits_and_idle_costs_almost_none() {
    require_kvm();
    let dir = TempDir::new("net-exits");
    let daemon = Daemon::start("exits", 1, &[], &dir);
    let (_port, mut kv) = run_kv(&daemon);
    const REQUESTS: u64 = 300;
    let before = kv_exits(&daemon);
    for i in 0..REQUESTS {
        let key = format!("k{i}");
        assert_eq!(kv.cmd(&["SET", &key, "v"]).unwrap(), "OK");
    }
    let after = kv_exits(&daemon);
    let exits = after.total - before.total;
    let per_request = exits as f64 / REQUESTS as f64;
    eprintln!("{REQUESTS} sequential requests: {exits} exits ({per_request:.2} per request)");
    eprintln!("before {before:?}\nafter  {after:?}");
    assert!(per_request <= 8.0, "{per_request:.2} exits per request");
    assert_eq!(
        exits,
        (after.hypercalls.r#yield - before.hypercalls.r#yield)
            + (after.hypercalls.console - before.hypercalls.console)
            + (after.hypercalls.checkpoint - before.hypercalls.checkpoint)
            + (after.hypercalls.other - before.hypercalls.other)
            + (after.virtio.notify - before.virtio.notify)
            + (after.virtio.other - before.virtio.other)
            + (after.other - before.other),
        "the total is the sum of the reasons"
    );
    // While the guest polls its rings and the network thread serves them,
    // requests sent one at a time cross without exits. The guest stops
    // polling while the host's CPUs are all busy (this host may be running
    // other tests): a calm stretch must come within a minute.
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut batches = Vec::new();
    loop {
        const BATCH: u64 = 200;
        let before = kv_exits(&daemon).total;
        for i in 0..BATCH {
            assert_eq!(kv.cmd(&["GET", &format!("k{i}")]).unwrap(), "v");
        }
        let per_request = (kv_exits(&daemon).total - before) as f64 / BATCH as f64;
        batches.push(format!("{per_request:.2}"));
        if per_request <= 0.5 {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "requests one at a time never crossed without exits: exits per request in \
             each batch of {BATCH}: {batches:?}"
        );
    }
    eprintln!("exits per request in batches of one-at-a-time GETs: {batches:?}");
    // Idle: only the guest's own timers (kv's 100 ms expiry task) exit.
    let window = Duration::from_secs(2);
    let quiet = kv_exits(&daemon);
    std::thread::sleep(window);
    let idle = kv_exits(&daemon).total - quiet.total;
    eprintln!("idle kv: {idle} exits in {window:?}");
    assert!(idle < 100, "{idle} exits in {window:?} while idle");
}

#[test]
fn two_guests_share_the_switch() {
    let (p1, p2) = (free_port(), free_port());
    let img = http_img();
    let also = format!("{img} --");
    let publish1 = format!("{p1}:80");
    let publish2 = format!("{p2}:10.0.2.16:80");
    let mut shim = Shim::start(&[
        "run",
        &img,
        "--timeout",
        "60",
        "--env",
        "PORT=80",
        "--publish",
        &publish1,
        "--publish",
        &publish2,
        "--also",
        &also,
    ]);
    assert_eq!(
        curl_when_up(&mut shim, &format!("http://127.0.0.1:{p1}/healthz")),
        "ok\n"
    );
    assert_eq!(
        curl_when_up(&mut shim, &format!("http://127.0.0.1:{p2}/healthz")),
        "ok\n"
    );
    let (out, err) = shim.stop();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.contains(&"http: listening on port 80"),
        "{out}\n{err}"
    );
    assert!(
        lines.contains(&"[http] http: listening on port 80"),
        "{out}\n{err}"
    );
}

#[test]
fn the_guest_exit_status_is_the_main_guests_and_others_are_stopped() {
    require_kvm();
    let hello = image("hello");
    let http = http_img();
    let also = format!("{http} --");
    let guests = ["--net", "user", "--also", &also, "--", "--name", "main"];
    let run = run_image(&hello, &[&["--timeout", "30"][..], &guests].concat());
    assert_eq!(run.status, Some(0), "{run:?}");
    assert!(run.stdout.contains("Hello, main!"), "{run:?}");
    // The http guest never exits by itself: it was stopped with the main one.
    assert!(run.elapsed < Duration::from_secs(20), "{run:?}");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this test's own, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Set when the TAP test re-runs itself inside a user + network namespace.
const IN_USERNS: &str = "HOST_SHIM_TEST_IN_USERNS";

#[test]
fn a_tap_device_connects_the_guest_to_the_host() {
    assert!(
        Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (TUN/TAP support in the kernel)"
    );
    if std::env::var_os(IN_USERNS).is_some() {
        // Already in a fresh network namespace of our own (see below).
        return tap_connects(None);
    }
    if is_root() {
        let ns = Netns(format!("lc-tap-{}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        return tap_connects(Some(&ns.0));
    }
    // Not root: a new user namespace that maps us to root and owns a new network namespace
    // gives CAP_NET_ADMIN there, enough to create the TAP device. Run this test again inside.
    let test = "a_tap_device_connects_the_guest_to_the_host";
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(IN_USERNS, "1")
        .output()
        .expect("running the test without root needs unshare (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "the TAP test in a user + network namespace (unshare --user --map-root-user --net) \
         failed; if unprivileged user namespaces are disabled on this host, run the tests as \
         root:\n{text}"
    );
}

/// Boots http on a TAP device in network namespace `ns` (or the current one) and fetches
/// /healthz over it with curl.
fn tap_connects(ns: Option<&str>) {
    let in_ns = |program: &str| {
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        c.env("RUST_LOG", "warn");
        c
    };
    let ip_in_ns = |args: &[&str]| {
        let mut all = ns.map_or(vec![], |ns| vec!["-n", ns]);
        all.extend_from_slice(args);
        ip(&all);
    };
    let img = http_img();
    let mut shim = Shim::start_with(
        in_ns(env!("CARGO_BIN_EXE_host-shim")),
        &[
            "run",
            &img,
            "--timeout",
            "60",
            "--net",
            "tap=lctap0",
            "--ip",
            "10.0.2.15/24",
        ],
    );
    // The shim creates the device; give the host side its address.
    let give_up = Instant::now() + Duration::from_secs(10);
    while in_ns("ip")
        .args(["link", "show", "lctap0"])
        .output()
        .is_ok_and(|o| !o.status.success())
    {
        assert!(Instant::now() < give_up, "the shim did not create lctap0");
        shim.assert_running("lctap0 to appear");
        std::thread::sleep(Duration::from_millis(50));
    }
    ip_in_ns(&["addr", "add", "10.0.2.2/24", "dev", "lctap0"]);
    ip_in_ns(&["link", "set", "lctap0", "up"]);
    let give_up = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let out = in_ns("curl")
            .args(["-sS", "-m", "2", "http://10.0.2.15/healthz"])
            .output()
            .expect("curl is needed: apt-get install curl");
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < give_up,
            "no answer over the TAP device: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        shim.assert_running("an answer over lctap0");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(body, "ok\n");
    shim.stop();
}
