//! Hostile API callers and peers against real `host-shim serve` processes:
//! idle, half-sent and slow connections, half TLS handshakes, devices and
//! FIFOs named as files, a peer certificate used for user calls, output
//! paths outside the state directory, planted symlinks, quotas and bad
//! names. Each must get a clear refusal while the daemon stays small and
//! keeps serving.
//!
//! Needs /dev/kvm and the images (`cargo xtask build-image --all`), and
//! the `mkfifo` of coreutils.

mod common;

use api::Restart;
use api::{
    Client, ClientError, InstanceInfo, RestoreRequest, RunRequest, ShimInfo, SnapshotInfo,
    SnapshotRequest,
};
use common::cpu_ticks;
use common::daemon::{kv_img, Daemon, FleetCli, TempDir};
use daemon::standby::StandbyRequest;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vmm::snapshot::state::ImageId;

/// A field of /proc/PID/status (the number before any unit).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Runs `f` on its own thread; panics if it takes longer than `limit`
/// (a daemon thread stuck on a caller's file never answers).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what}: no answer within {limit:?}"))
}

/// The status and message of a refused call (panics if it succeeded).
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn call_json<Req: serde::Serialize, Resp: for<'de> serde::Deserialize<'de>>(
    addr: &str,
    method: &str,
    path: &str,
    body: Req,
) -> Result<Resp, ClientError> {
    Client::new(addr).json(method, path, Some(&body))
}

/// A refusal of `method path body` on the plain daemon at `addr`, within 10 s.
fn refused<Req: serde::Serialize + Send + 'static>(
    addr: &str,
    method: &'static str,
    path: &str,
    body: Req,
) -> (u16, String) {
    let (addr, path) = (addr.to_owned(), path.to_owned());
    let what = format!("{method} {path}");
    within(Duration::from_secs(10), &what, move || {
        refusal(call_json::<_, serde_json::Value>(
            &addr, method, &path, body,
        ))
    })
}

/// A run of kv as `name` with `mem` bytes.
fn kv_run(name: &str, mem: u64) -> RunRequest {
    run_request(name, &kv_img(), mem)
}

/// `POST /v1/instances` of `run` on the plain daemon at `addr`, which
/// must succeed.
fn run_ok(addr: &str, run: RunRequest) {
    call_json::<_, InstanceInfo>(addr, "POST", "/v1/instances", run).unwrap();
}

/// A refusal of `POST /v1/instances` of `run` (see [`refused`]).
fn run_refused<Req: serde::Serialize + Send + 'static>(addr: &str, run: Req) -> (u16, String) {
    refused(addr, "POST", "/v1/instances", run)
}

fn run_request(name: &str, image: &str, mem: u64) -> RunRequest {
    RunRequest {
        name: name.into(),
        image: image.into(),
        mem,
        ..RunRequest::default()
    }
}

/// Waits until the plain daemon `d` answers API calls (it listens before
/// it has started all its threads).
fn serving(d: &Daemon) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while Client::new(&d.addr).info().is_err() {
        assert!(
            Instant::now() < give_up,
            "the daemon never answered:\n{}",
            d.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("this test needs mkfifo (coreutils)");
    assert!(ok.success());
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn idle_and_half_sent_connections_do_not_take_a_thread_each() {
    let dir = TempDir::new("hostile-conns");
    let d = Daemon::start("conns", 2, &["--max-connections", "16"], &dir);
    let pid = d.child.id();
    serving(&d);
    let base = proc_status(pid, "Threads");
    let mut held = Vec::new();
    for i in 0..300 {
        let mut c = TcpStream::connect(&d.addr).unwrap();
        if i % 2 == 1 {
            // A head announcing a body that never comes.
            c.write_all(b"POST /v1/instances HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
                .unwrap();
        }
        held.push(c);
    }
    let mut most = 0;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        most = most.max(proc_status(pid, "Threads"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        most <= base + 16 + 2,
        "300 idle or half-sent connections took the daemon from {base} to {most} threads \
         (--max-connections 16)"
    );
    // A real request still gets through (idle ones make room for it).
    let addr = d.addr.clone();
    let info: ShimInfo = within(Duration::from_secs(10), "GET /v1/info", move || {
        Client::new(&addr).info()
    })
    .expect("a normal request succeeds among 300 idle connections");
    assert_eq!(info.limits.unwrap().max_connections, 16);
    drop(held);
}

#[test]
fn a_slow_loris_is_cut_at_the_request_deadline() {
    let dir = TempDir::new("hostile-loris");
    let d = Daemon::start("loris", 3, &["--request-timeout", "3s"], &dir);
    let mut c = TcpStream::connect(&d.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let start = Instant::now();
    c.write_all(b"GET /v1/info HTTP/1.1\r\n").unwrap();
    let cut = loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "a client sending a byte every 0.5 s still holds its connection after 20 s \
             (--request-timeout 3s)"
        );
        if c.write_all(b"X").is_err() {
            break start.elapsed();
        }
        let mut buf = [0u8; 512];
        match c.read(&mut buf) {
            Ok(_) => break start.elapsed(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break start.elapsed(),
        }
    };
    assert!(
        cut >= Duration::from_millis(2500),
        "cut after {cut:?}, before the 3 s deadline"
    );
    let info: ShimInfo = Client::new(&d.addr).info().unwrap();
    assert_eq!(info.limits.unwrap().request_timeout_ms, 3000);
}

#[test]
fn half_tls_handshakes_are_cut_at_the_handshake_deadline() {
    let dir = TempDir::new("hostile-tls");
    let d = Daemon::secure_serving(
        "tls",
        4,
        &[],
        &["--handshake-timeout", "2s", "--max-connections", "16"],
        &dir,
    );
    let pid = d.child.id();
    let (fp, token) = d.pin_and_token();
    let user = Client::secure(&d.addr, fp.parse().unwrap(), Some(token), None).unwrap();
    let info: ShimInfo = user.info().unwrap();
    assert_eq!(info.limits.unwrap().handshake_timeout_ms, 2000);
    let base = proc_status(pid, "Threads");
    let start = Instant::now();
    let mut conns: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut c = TcpStream::connect(&d.addr).unwrap();
            // The first bytes of a TLS record holding a ClientHello, and no more.
            c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            c
        })
        .collect();
    let mut most = 0;
    while start.elapsed() < Duration::from_secs(1) {
        most = most.max(proc_status(pid, "Threads"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        most <= base + 16 + 2,
        "100 half TLS handshakes took the daemon from {base} to {most} threads \
         (--max-connections 16)"
    );
    let mut last = Duration::ZERO;
    for c in &mut conns {
        let mut buf = [0u8; 64];
        // EOF or a reset: the daemon closed it.
        let r = c.read(&mut buf);
        assert!(
            !matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
            "a half TLS handshake was still open after {:?}",
            start.elapsed()
        );
        last = start.elapsed();
    }
    assert!(
        last < Duration::from_secs(10),
        "100 half handshakes were cut only after {last:?} (--handshake-timeout 2s)"
    );
    assert!(
        last >= Duration::from_millis(1500),
        "the last half handshakes were cut after {last:?}, before their 2 s"
    );
    // The daemon still serves real clients (once the cut connections' slots are free).
    let give_up = Instant::now() + Duration::from_secs(5);
    while let Err(e) = user.info() {
        assert!(
            Instant::now() < give_up,
            "the daemon did not serve a real client 5 s after the flood: {e}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn devices_and_fifos_named_as_files_are_refused_quickly() {
    let dir = TempDir::new("hostile-files");
    let state = dir.path("state");
    let d = Daemon::start("files", 5, &["--state-dir", state.to_str().unwrap()], &dir);
    let pid = d.child.id();
    serving(&d);
    let rss = proc_status(pid, "VmRSS");
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap().to_owned();
    for bad in ["/dev/zero", fifo.as_str()] {
        let (status, msg) = run_refused(&d.addr, run_request("img", bad, 64 << 20));
        assert_eq!(status, 400, "image {bad}: {msg}");
        assert!(msg.contains("not a regular file"), "image {bad}: {msg}");

        let mut with_ckpt = kv_run("ckpt", 64 << 20);
        with_ckpt.restore = Some(bad.to_owned());
        let (status, msg) = run_refused(&d.addr, with_ckpt);
        assert_eq!(status, 400, "checkpoint {bad}: {msg}");
        assert!(
            msg.contains("not a regular file"),
            "checkpoint {bad}: {msg}"
        );

        let restore = RestoreRequest {
            file: bad.to_owned(),
            ..RestoreRequest::default()
        };
        let (status, msg) = refused(&d.addr, "POST", "/v1/restore", restore);
        assert_eq!(status, 400, "snapshot {bad}: {msg}");
        assert!(msg.contains("not a regular file"), "snapshot {bad}: {msg}");

        let standby = StandbyRequest {
            origin: "127.0.0.1:1".into(),
            run: run_request("sb", bad, 64 << 20),
            image: ImageId {
                path: bad.to_owned(),
                size: 0,
                sha256: "0".repeat(64),
            },
            grace_ms: 2000,
        };
        let (status, msg) = refused(&d.addr, "POST", "/v1/standby", standby);
        assert_eq!(status, 409, "standby image {bad}: {msg}");
    }
    let grown = proc_status(pid, "VmRSS").saturating_sub(rss);
    assert!(
        grown < 64 << 10,
        "the daemon's RSS grew by {grown} KiB reading devices and FIFOs"
    );

    // A standby registration does not tell the hash of a file it names.
    let secret = dir.path("secret");
    std::fs::write(&secret, b"not for the caller").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let hash = daemon::images::sha256_hex(b"not for the caller");
    let standby = StandbyRequest {
        origin: "127.0.0.1:1".into(),
        run: run_request("sb", secret.to_str().unwrap(), 64 << 20),
        image: ImageId {
            path: String::new(),
            size: 0,
            sha256: "0".repeat(64),
        },
        grace_ms: 2000,
    };
    let (status, msg) = refused(&d.addr, "POST", "/v1/standby", standby);
    assert_eq!(status, 409, "{msg}");
    assert!(
        !msg.contains(&hash),
        "the refusal echoes the file's hash: {msg}"
    );
}

#[test]
fn a_peer_certificate_alone_may_not_run_or_snapshot() {
    let dir = TempDir::new("hostile-peer");
    let a = Daemon::secure("peer-a", 6, &[], &dir);
    let b = Daemon::secure("peer-b", 7, &[], &dir);
    let (fpa, _) = a.pin_and_token();
    let (fpb, _) = b.pin_and_token();
    a.cli(&["peer", "add", "peer-b", &fpb]);
    let id_b = security::identity::load(b.state.as_ref().unwrap()).unwrap();
    // b calls a with its certificate only, as a migrating or standby peer does.
    let as_peer = Client::secure(&a.addr, fpa.parse().unwrap(), None, Some(&id_b)).unwrap();
    let run = kv_run("x", 64 << 20);
    let (status, msg) =
        refusal(as_peer.json::<_, InstanceInfo>("POST", "/v1/instances", Some(&run)));
    assert_eq!(status, 403, "{msg}");
    let snap = SnapshotRequest {
        out: "/etc/hostile-peer".into(),
    };
    let (status, msg) =
        refusal(as_peer.json::<_, SnapshotInfo>("POST", "/v1/instances/x/snapshot", Some(&snap)));
    assert_eq!(status, 403, "{msg}");
    assert!(msg.contains("user token"), "{msg}");
    let (status, _) = refusal(as_peer.json::<_, serde_json::Value>(
        "POST",
        "/v1/restore",
        Some(&RestoreRequest::default()),
    ));
    assert_eq!(status, 403);
    // What peers do is still open to them: image pushes and the list a
    // standby watches.
    let (status, msg) = refusal(as_peer.json::<(), serde_json::Value>(
        "GET",
        &format!("/v1/images/{}", "0".repeat(64)),
        None,
    ));
    assert_eq!(status, 404, "{msg}");
    let list: Vec<InstanceInfo> = as_peer.list().unwrap();
    assert!(list.is_empty());
    let log = a.output_once_it_says("peers may only");
    assert!(log.contains("peers may only"), "{log}");
    assert!(!Path::new("/etc/hostile-peer").exists());
}

#[test]
fn outputs_stay_in_the_state_directory_and_state_files_are_private() {
    let dir = TempDir::new("hostile-state");
    let state = dir.path("state");
    let d = Daemon::start("state", 8, &["--state-dir", state.to_str().unwrap()], &dir);
    let mut run = kv_run("kv", 64 << 20);
    run.restart = Restart::Always;
    run_ok(&d.addr, run);

    for out in ["/etc/hostile-snapshot", "../escape.snap", "sub/dir.snap"] {
        let (status, msg) = refused(
            &d.addr,
            "POST",
            "/v1/instances/kv/snapshot",
            SnapshotRequest { out: out.into() },
        );
        assert_eq!(status, 403, "{out}: {msg}");
        assert!(msg.contains("snapshots"), "{msg}");
    }
    assert!(!Path::new("/etc/hostile-snapshot").exists());
    assert!(!state.join("escape.snap").exists());
    let (status, _) = refused(
        &d.addr,
        "POST",
        "/v1/instances/kv/checkpoint",
        serde_json::json!({"out": "/tmp/hostile-checkpoint"}),
    );
    assert_eq!(status, 403);

    // A symlink planted where the snapshot goes is replaced, not followed.
    let snaps = state.join("snapshots");
    std::fs::create_dir_all(&snaps).unwrap();
    let victim = dir.path("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, snaps.join("kv.snap")).unwrap();
    let info: SnapshotInfo = call_json(
        &d.addr,
        "POST",
        "/v1/instances/kv/snapshot",
        SnapshotRequest {
            out: "kv.snap".into(),
        },
    )
    .unwrap();
    let snap = snaps.join("kv.snap");
    assert_eq!(Path::new(&info.file), snap);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&snap).unwrap().is_file());
    // The path the answer gave is accepted again.
    call_json::<_, SnapshotInfo>(
        &d.addr,
        "POST",
        "/v1/instances/kv/snapshot",
        SnapshotRequest { out: info.file },
    )
    .unwrap();

    // An app checkpoint goes to STATE/checkpoints, private too.
    let ckpt: serde_json::Value = call_json(
        &d.addr,
        "POST",
        "/v1/instances/kv/checkpoint",
        serde_json::json!({"out": "kv.ckpt"}),
    )
    .unwrap();
    let ckpt_file = state.join("checkpoints/kv.ckpt");
    assert_eq!(ckpt["file"].as_str(), ckpt_file.to_str());
    assert_eq!(mode(&ckpt_file), 0o600);
    assert_eq!(mode(&state.join("checkpoints")), 0o700);
    // So does a checkpoint directory named by `run`.
    let mut elsewhere = kv_run("kv2", 64 << 20);
    elsewhere.checkpoint_every_ms = Some(1000);
    elsewhere.checkpoint_to = Some("/tmp/hostile-checkpoints".into());
    let (status, msg) = run_refused(&d.addr, elsewhere);
    assert_eq!(status, 403, "{msg}");
    assert!(!Path::new("/tmp/hostile-checkpoints").exists());

    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&snaps), 0o700);
    assert_eq!(mode(&snap), 0o600);
    assert_eq!(mode(&state.join("instances")), 0o700);
    assert_eq!(mode(&state.join("instances/kv.json")), 0o600);
}

#[test]
fn quotas_are_refused_with_the_flag_that_sets_them() {
    let dir = TempDir::new("hostile-quota");
    let d = Daemon::start(
        "quota",
        9,
        &[
            "--max-instances",
            "2",
            "--max-guest-memory",
            "160M",
            "--max-publish",
            "1",
        ],
        &dir,
    );
    let info: ShimInfo = Client::new(&d.addr).info().unwrap();
    let limits = info.limits.unwrap();
    assert_eq!(
        (limits.max_instances, limits.max_guest_memory),
        (2, 160 << 20)
    );
    assert!(!limits.allow_privileged_ports);

    let mut two_ports = kv_run("p", 64 << 20);
    two_ports.publish = vec!["18080:80".parse().unwrap(), "18081:81".parse().unwrap()];
    let (status, msg) = run_refused(&d.addr, two_ports);
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("--max-publish"), "{msg}");
    let mut privileged = kv_run("p", 64 << 20);
    privileged.publish = vec!["80:80".parse().unwrap()];
    let (status, msg) = run_refused(&d.addr, privileged);
    assert_eq!(status, 403, "{msg}");
    assert!(msg.contains("--allow-privileged-ports"), "{msg}");
    // Published ports are values, checked as the command line checks them.
    let mut port_zero = serde_json::to_value(kv_run("p", 64 << 20)).unwrap();
    port_zero["publish"] = serde_json::json!([{"host": "127.0.0.1:18082", "guest_port": 0}]);
    let (status, msg) = run_refused(&d.addr, port_zero);
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("1-65535"), "{msg}");
    let mut as_text = serde_json::to_value(kv_run("p", 64 << 20)).unwrap();
    as_text["publish"] = serde_json::json!(["18082:80"]);
    let (status, msg) = run_refused(&d.addr, as_text);
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("bad run request"), "{msg}");

    run_ok(&d.addr, kv_run("a", 64 << 20));
    let (status, msg) = run_refused(&d.addr, kv_run("big", 128 << 20));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("--max-guest-memory"), "{msg}");
    run_ok(&d.addr, kv_run("b", 64 << 20));
    let (status, msg) = run_refused(&d.addr, kv_run("c", 16 << 20));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("--max-instances"), "{msg}");
    // A stopped instance gives its share back.
    d.cli(&["stop", "a"]);
    run_ok(&d.addr, kv_run("c", 64 << 20));
}

#[test]
fn bad_names_are_refused_on_every_path() {
    let dir = TempDir::new("hostile-names");
    let d = Daemon::start("names", 10, &[], &dir);
    for bad in ["a/b", "a\0b", "..", ".hidden", "x y"] {
        let (status, msg) = run_refused(&d.addr, kv_run(bad, 64 << 20));
        assert_eq!(
            (status, msg.contains("not an instance name")),
            (400, true),
            "run {bad:?}: {msg}"
        );

        let restore = RestoreRequest {
            file: "/nonexistent.snap".into(),
            name: Some(bad.into()),
            ..RestoreRequest::default()
        };
        let (status, msg) = refused(&d.addr, "POST", "/v1/restore", restore);
        assert_eq!(
            (status, msg.contains("not an instance name")),
            (400, true),
            "restore {bad:?}: {msg}"
        );

        let standby = StandbyRequest {
            origin: "127.0.0.1:1".into(),
            run: kv_run(bad, 64 << 20),
            image: ImageId {
                path: kv_img(),
                size: 0,
                sha256: "0".repeat(64),
            },
            grace_ms: 2000,
        };
        let (status, msg) = refused(&d.addr, "POST", "/v1/standby", standby);
        assert_eq!(
            (status, msg.contains("not an instance name")),
            (400, true),
            "standby {bad:?}: {msg}"
        );
    }
    // The daemon is still whole.
    Client::new(&d.addr).info().unwrap();
}

#[test]
fn a_token_can_come_from_standard_input_instead_of_the_command_line() {
    let dir = TempDir::new("hostile-token");
    let d = Daemon::secure("token", 11, &[], &dir);
    let (fp, token) = d.pin_and_token();
    let fleet = FleetCli::new(&dir);
    let url = format!("https://{}", d.addr);
    let add = |name: &str, token: &str| {
        let mut child = fleet
            .command(&[
                "fleet",
                "add",
                name,
                &url,
                "--fingerprint",
                &fp,
                "--token-file",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{token}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let wrong = add("bad", "not-the-token");
    assert!(!wrong.status.success(), "{wrong:?}");
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("token"),
        "{wrong:?}"
    );
    let ok = add("good", &token);
    assert!(ok.status.success(), "{ok:?}");
    let hosts = fleet.json(&["fleet", "ls", "--json"]);
    let text = hosts.to_string();
    assert!(text.contains("\"token\":true"), "{text}");
    assert!(!text.contains(&token), "fleet ls shows the token: {text}");
}

#[test]
fn out_of_file_descriptors_the_accept_loop_backs_off() {
    let dir = TempDir::new("hostile-fds");
    let d = Daemon::start("fds", 12, &[], &dir);
    let pid = d.child.id();
    serving(&d);
    let set_limit = |n: usize| {
        let ok = Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={n}:")])
            .status()
            .expect("this test needs prlimit (util-linux)");
        assert!(ok.success());
    };
    // No new descriptor (0, 1 and 2 are taken; new ones must be below 3).
    set_limit(3);
    let held: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&d.addr).unwrap())
        .collect();
    // Connections wait in the backlog while `accept` fails for lack of
    // descriptors: the daemon must not spin or flood its log meanwhile
    // (from its first failure on).
    let log = d.output_once_it_says("accept failed");
    assert!(
        log.contains("accept failed"),
        "no accept failure logged within 5 s of running out of descriptors:\n{}",
        &log[..log.len().min(2000)]
    );
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 60,
        "the daemon used {used} ticks of CPU in 3 s while out of file descriptors"
    );
    let log = d.output();
    let warnings = log.matches("accept failed").count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} accept warnings in about 3 s (rate-limited: at most one per 10 s):\n{}",
        &log[..log.len().min(2000)]
    );
    // Once there are descriptors again, it serves again.
    set_limit(1024);
    drop(held);
    let addr = d.addr.clone();
    within(Duration::from_secs(20), "GET /v1/info", move || {
        Client::new(&addr).info()
    })
    .expect("the daemon serves again once descriptors are free");
}

/// The answer of a daemon to a migration stream introducing `hello`:
/// whether it accepted, and its refusal's reason.
fn offer_migration(addr: &str, hello: &migration::protocol::Hello) -> (bool, String) {
    use migration::protocol::{read_msg, write_value, Kind};
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(
        b"POST /v1/migration HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: host-shim-migration\r\n\
          Content-Length: 0\r\n\r\n",
    )
    .unwrap();
    // The 101 head, byte by byte up to its blank line.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    write_value(&mut c, Kind::Hello, hello).unwrap();
    let answer = read_msg(&mut c).unwrap();
    (answer.kind == Kind::Accept, answer.text())
}

#[test]
fn incoming_migrations_get_the_name_and_memory_checks() {
    use migration::protocol::{Hello, PROTOCOL_VERSION};
    let dir = TempDir::new("hostile-incoming");
    let d = Daemon::start("incoming", 13, &["--max-guest-memory", "1G"], &dir);
    let hello = |name: &str, mem: u64| Hello {
        protocol_version: PROTOCOL_VERSION,
        format_version: vmm::snapshot::format::FORMAT_VERSION,
        abi_version: abi::ABI_VERSION,
        name: name.into(),
        mem_size: mem,
        cpuid: Vec::new(),
        nic: Some(vmm::snapshot::state::NicSpec {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            ip: std::net::Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            gateway: None,
        }),
        image: ImageId {
            path: String::new(),
            size: 0,
            sha256: String::new(),
        },
        source: "hostile".into(),
        source_overlay: None,
        migration_id: 1,
        source_api: None,
        record: None,
    };
    for bad in ["a/b", "../x", "a\0b"] {
        let (accepted, why) = offer_migration(&d.addr, &hello(bad, 64 << 20));
        assert!(!accepted, "a migration named {bad:?} was accepted");
        assert!(why.contains("not an instance name"), "{bad:?}: {why}");
    }
    let (accepted, why) = offer_migration(&d.addr, &hello("huge", 2 << 30));
    assert!(!accepted, "2 GiB accepted under --max-guest-memory 1G");
    assert!(why.contains("--max-guest-memory"), "{why}");
    // Nothing was reserved by the refusals.
    let list: Vec<InstanceInfo> = Client::new(&d.addr).list().unwrap();
    assert!(list.is_empty(), "{list:?}");
}

#[test]
fn with_every_connection_in_use_a_new_one_gets_a_clear_503() {
    let dir = TempDir::new("hostile-busy");
    let d = Daemon::start("busy", 14, &["--max-connections", "2"], &dir);
    serving(&d);
    run_ok(&d.addr, kv_run("kv", 64 << 20));
    // Two console followers hold both connections past their requests.
    let client = Client::new(&d.addr);
    let follow = || {
        client
            .upgrade("/v1/instances/kv/logs/follow", "host-shim-progress", b"")
            .unwrap()
    };
    let first = follow();
    let _second = follow();
    let (status, msg) = refusal(client.info());
    assert_eq!(status, 503, "{msg}");
    assert!(msg.contains("--max-connections"), "{msg}");
    let log = d.output_once_it_says("all API connections are busy");
    assert!(log.contains("all API connections are busy"), "{log}");
    // A connection given back is a connection for the next caller.
    drop(first);
    let give_up = Instant::now() + Duration::from_secs(10);
    while client.info().is_err() {
        assert!(Instant::now() < give_up, "no connection came free");
        std::thread::sleep(Duration::from_millis(50));
    }
}
