//! A migration commits exactly once: for a failure injected at each step
//! (`serve --test-fault STEP:FAULT` on the source or the destination: the
//! daemon dies, cuts the connection or corrupts a byte), afterwards exactly
//! one copy of kv runs (both daemons' instance lists), it holds every write
//! a client had acknowledged, and the other daemon holds no reservation.
//! Also: a destination that accepts and then says nothing, and an incoming
//! migration that stalls after its Hello, are given up within deadlines.
//!
//! Needs /dev/kvm and the kv image (`cargo xtask build-image kv`).

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use api::{Client, InstanceInfo, InstanceState};
use common::daemon::{run_kv, Daemon, Load, Redis, TempDir, BIN};
use common::free_port;

/// Keys written before the migration.
const KEYS: usize = 1_000;
/// Writes the client gets acknowledged before the migration starts, and
/// after it ends.
const WRITES: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Source,
    Dest,
}

/// Where kv must run afterwards.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Runs {
    AtSource,
    AtDest,
    /// The source died before the destination had the whole state: the
    /// guest died with it.
    Nowhere,
    /// The source sent Commit and cut the connection: the destination
    /// starts the guest if it reads the Commit before the source's Query
    /// (on a fresh connection) reaches it, and settles the migration as
    /// aborted otherwise, so the source resumes. Which comes first is the
    /// scheduler's business on a loaded host; either way exactly one copy
    /// runs, with every acknowledged write.
    OneOfThem,
}

fn alive(d: &mut Daemon) -> bool {
    d.child.try_wait().unwrap().is_none()
}

/// kv's state on the daemon at `addr` (`None`: no such instance).
fn kv_state(addr: &str) -> Option<InstanceState> {
    try_kv_state(addr).unwrap_or_else(|e| panic!("{e}"))
}

/// [`kv_state`], or why the daemon did not say.
fn try_kv_state(addr: &str) -> Result<Option<InstanceState>, String> {
    let list: Vec<InstanceInfo> = Client::new(addr)
        .list()
        .map_err(|e| format!("GET /v1/instances of {addr}: {e}"))?;
    Ok(list.into_iter().find(|i| i.name == "kv").map(|i| i.state))
}

/// `migrate kv --to TO` of the daemon at `from`, run in a thread: its
/// output once it ends.
fn migrate_in_background(from: &str, to: &str) -> std::thread::JoinHandle<std::process::Output> {
    let (shim, to) = (from.to_owned(), to.to_owned());
    std::thread::spawn(move || {
        Command::new(BIN)
            .args(["--shim", &shim, "migrate", "kv", "--to", &to])
            .output()
            .unwrap()
    })
}

/// Waits (up to `within`) until kv on the daemon at `addr` is busy with
/// `what` (e.g. "migrating").
fn wait_busy(addr: &str, what: &str, within: Duration) {
    let give_up = Instant::now() + within;
    let want = Some(InstanceState::Busy { what: what.into() });
    while kv_state(addr) != want {
        assert!(
            Instant::now() < give_up,
            "kv not {what} within {within:?}: {:?}",
            kv_state(addr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// kv on one daemon: `None` if the daemon is dead, `Some(None)` if kv is
/// absent there.
type Seen<'a> = Option<&'a Option<InstanceState>>;

fn running(s: Seen) -> bool {
    s == Some(&Some(InstanceState::Running))
}

fn absent(s: Seen) -> bool {
    s == Some(&None)
}

/// Waits (up to 30 s) until `ok` holds of kv's states on the daemons. A
/// daemon that does not answer while its process is still there (a fault
/// made it exit, and it is going) is asked again.
fn settle(a: &mut Daemon, b: &mut Daemon, ok: impl Fn(Seen, Seen) -> bool) {
    let give_up = Instant::now() + Duration::from_secs(30);
    let look = |d: &mut Daemon| alive(d).then(|| try_kv_state(&d.addr)).transpose();
    loop {
        let (sa, sb) = (look(a), look(b));
        if let (Ok(sa), Ok(sb)) = (&sa, &sb) {
            if ok(sa.as_ref(), sb.as_ref()) {
                return;
            }
        }
        assert!(
            Instant::now() < give_up,
            "kv: {sa:?} at the source, {sb:?} at the destination\n--- source:\n{}\n--- destination:\n{}",
            a.output(),
            b.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks every preloaded key and every acknowledged `load:` write.
fn holds_everything(c: &mut Redis, acked: usize) {
    c.check(KEYS);
    for i in 0..acked {
        assert_eq!(
            c.cmd(&["GET", &format!("load:{i}")]).unwrap(),
            format!("v{i}"),
            "acknowledged write load:{i} of {acked} lost"
        );
    }
}

/// Migrates kv from a fresh source to a fresh destination, `side` with
/// `fault`, under a writing client; then checks who runs it and its data.
fn case(tag: &str, side: Side, fault: &str, want: Runs) {
    let dir = TempDir::new(tag);
    let flag = ["--test-fault", fault];
    let (fa, fb): (&[&str], &[&str]) = match side {
        Side::Source => (&flag, &[]),
        Side::Dest => (&[], &flag),
    };
    let mut a = Daemon::start(&format!("{tag}-a"), 1, fa, &dir);
    let mut b = Daemon::start(&format!("{tag}-b"), 2, fb, &dir);
    let (port, mut c) = run_kv(&a);
    c.fill(KEYS);
    let loader = Load::start(port);
    loader
        .wait_for_more(WRITES, "before the migration")
        .unwrap_or_else(|e| panic!("{e}"));
    let out = a.try_cli(&["migrate", "kv", "--to", &b.addr]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{tag}: {text}");
    // Unless the fault kills the source (and the writer's connection with
    // it), its published port keeps serving the writer, wherever kv runs.
    let after = loader.wait_for_more(WRITES, "after the migration");
    if !(side == Side::Source && fault.ends_with(":die")) {
        after.unwrap_or_else(|e| panic!("{e}\n--- source:\n{}", a.output()));
    }
    let (acked, _, error) = loader.stop();
    eprintln!("{tag}: {acked} writes acknowledged, then {error:?}");
    assert!(acked > 0, "no write was acknowledged");
    let dest_name = format!("{tag}-b");
    let want = match want {
        Runs::OneOfThem if text.contains("resumed on") => {
            assert!(
                b.output()
                    .contains("the migration was settled as aborted before its Commit arrived"),
                "the source resumed, but the destination did not refuse the Commit it got \
                 after the Query:\n{}",
                b.output()
            );
            Runs::AtSource
        }
        Runs::OneOfThem => Runs::AtDest,
        w => w,
    };
    match want {
        Runs::OneOfThem => unreachable!("decided above"),
        Runs::AtSource => {
            assert!(!out.status.success(), "{text}");
            assert!(
                text.contains("resumed on") || text.contains("keeps running"),
                "{text}"
            );
            settle(&mut a, &mut b, |sa, sb| {
                running(sa) && (sb.is_none() || absent(sb))
            });
            holds_everything(&mut Redis::connect(port).unwrap(), acked);
        }
        Runs::AtDest => {
            settle(&mut a, &mut b, |sa, sb| {
                running(sb) && sa.is_none_or(|s| matches!(s, Some(InstanceState::Moved { .. })))
            });
            if alive(&mut a) {
                // Through the source's published port, over the overlay.
                let mut c = Redis::connect(port).unwrap();
                assert_eq!(c.host(), dest_name);
                holds_everything(&mut c, acked);
            } else {
                // The source's port died with it: the copy's data, through
                // a snapshot restored in a new process.
                let snap = dir.path("kv.snap");
                b.cli(&["snapshot", "kv", "--out", snap.to_str().unwrap()]);
                let check = free_port();
                let mut restored = Command::new(BIN)
                    .args(["restore", snap.to_str().unwrap(), "--host-name", "check"])
                    .args(["--publish", &format!("{check}:6379"), "--timeout", "60"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                holds_everything(&mut Redis::when_up(check), acked);
                let _ = restored.kill();
                let _ = restored.wait();
            }
        }
        Runs::Nowhere => settle(&mut a, &mut b, |sa, sb| sa.is_none() && absent(sb)),
    }
}

macro_rules! cases {
    ($($name:ident: $side:ident $fault:literal => $runs:ident,)*) => {$(
        #[test]
        fn $name() {
            case(stringify!($name), Side::$side, $fault, Runs::$runs);
        }
    )*};
}

cases! {
    source_dies_in_precopy: Source "precopy:die" => Nowhere,
    source_corrupts_the_state: Source "paused:corrupt" => AtSource,
    source_dies_after_ready: Source "ready:die" => AtDest,
    source_cuts_after_ready: Source "ready:cut" => AtSource,
    source_corrupts_the_commit: Source "ready:corrupt" => AtSource,
    source_dies_after_commit: Source "commit:die" => AtDest,
    source_cuts_after_commit: Source "commit:cut" => OneOfThem,
    dest_dies_in_precopy: Dest "precopy:die" => AtSource,
    dest_corrupts_in_precopy: Dest "precopy:corrupt" => AtSource,
    dest_dies_after_the_pause: Dest "paused:die" => AtSource,
    dest_corrupts_ready: Dest "paused:corrupt" => AtSource,
    dest_dies_after_ready: Dest "ready:die" => AtSource,
    dest_cuts_after_ready: Dest "ready:cut" => AtSource,
    dest_dies_on_commit: Dest "commit:die" => AtSource,
    dest_dies_before_the_ack: Dest "committed:die" => AtSource,
    dest_cuts_before_the_ack: Dest "committed:cut" => AtDest,
    dest_corrupts_the_ack: Dest "committed:corrupt" => AtDest,
}

/// A "destination" that accepts the upgrade and then says nothing: the
/// migration fails within the stream's deadlines and kv goes on at the
/// source (as it does when no destination is there at all); `stop` during
/// such a migration cancels it at once.
#[test]
fn a_silent_destination_fails_the_migration_and_stop_cancels_one() {
    let dir = TempDir::new("silent");
    let a = Daemon::start("silent-a", 1, &["--no-overlay"], &dir);
    let (port, mut c) = run_kv(&a);
    c.fill(100);
    drop(c);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for conn in silent.incoming().take(2) {
            let mut conn = conn.unwrap();
            use std::io::{Read, Write};
            let mut head = [0u8; 1024];
            let _ = conn.read(&mut head);
            conn.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                  Upgrade: host-shim-migration\r\n\r\n",
            )
            .unwrap();
            conns.push(conn);
        }
        conns
    });
    let start = Instant::now();
    let out = a.try_cli(&["migrate", "kv", "--to", &addr]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("keeps running here"), "{text}");
    let bound = migration::source::ACCEPT_WAIT + Duration::from_secs(15);
    assert!(start.elapsed() < bound, "{:?}", start.elapsed());
    Redis::connect(port).unwrap().check(100);
    assert_eq!(kv_state(&a.addr), Some(InstanceState::Running));
    // And a destination that is not there at all.
    let out = a.try_cli(&["migrate", "kv", "--to", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("keeps running here"));

    // Again, and stop it meanwhile: the migration ends, kv is stopped.
    let migrating = migrate_in_background(&a.addr, &addr);
    wait_busy(&a.addr, "migrating", Duration::from_secs(10));
    let stopped = Instant::now();
    let out = a.cli(&["stop", "kv"]);
    assert!(out.contains("stopped"), "{out}");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "stop waited {:?}",
        stopped.elapsed()
    );
    let out = migrating.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cancelled by stop"), "{text}");
    assert_eq!(kv_state(&a.addr), None);
    drop(held.join().unwrap());
}

/// A source that sends its Hello and then nothing (a relay that stops
/// passing its bytes on): the destination releases the reservation (name
/// and address) after its read deadline, and the source, whose writes no
/// longer go anywhere, gives up and keeps kv running.
#[test]
fn a_stalled_incoming_migration_releases_its_reservation() {
    use std::io::{Read, Write};
    let dir = TempDir::new("stall");
    let a = Daemon::start("stall-a", 1, &["--no-overlay"], &dir);
    let b = Daemon::start("stall-b", 2, &["--no-overlay"], &dir);
    let (_, mut c) = run_kv(&a);
    c.fill(100);
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    let b_addr = b.addr.clone();
    let stalled = std::thread::spawn(move || {
        let (mut from_a, _) = relay.accept().unwrap();
        let mut to_b = std::net::TcpStream::connect(&b_addr).unwrap();
        let mut back = to_b.try_clone().unwrap();
        let mut to_a = from_a.try_clone().unwrap();
        std::thread::spawn(move || std::io::copy(&mut back, &mut to_a));
        // The upgrade request, then the Hello frame (kind, length, CRC,
        // payload), passed on; then nothing more.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            from_a.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        to_b.write_all(&head).unwrap();
        let mut frame = [0u8; 9];
        from_a.read_exact(&mut frame).unwrap();
        let len = u32::from_le_bytes(frame[1..5].try_into().unwrap()) as usize;
        let mut hello = vec![0u8; len];
        from_a.read_exact(&mut hello).unwrap();
        to_b.write_all(&frame).unwrap();
        to_b.write_all(&hello).unwrap();
        (from_a, to_b)
    });
    let migrating = migrate_in_background(&a.addr, &relay_addr);
    // The reservation at the destination.
    wait_busy(&b.addr, "incoming", Duration::from_secs(10));
    let start = Instant::now();
    while kv_state(&b.addr).is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still reserved after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("reservation released after {:?}", start.elapsed());
    let out = migrating.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("keeps running here"), "{text}");
    c.check(100);
    assert_eq!(kv_state(&a.addr), Some(InstanceState::Running));
    drop(stalled.join().unwrap());
    // The name and address are free again at the destination.
    let (_, mut c) = run_kv(&b);
    assert_eq!(c.cmd(&["PING"]).unwrap(), "PONG");
}

/// A peer that reads each request head (and a body, if `answer` says so)
/// and answers it with `answer(head)`, or holds the connection open
/// without a word when that is `None`. Runs until the test ends.
fn fake_peer(answer: fn(&str) -> Option<String>) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            while !head.ends_with("\r\n\r\n") {
                if r.read_line(&mut head).unwrap_or(0) == 0 {
                    break;
                }
            }
            match answer(&head) {
                Some(body) => {
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                    let _ = std::io::copy(&mut r.by_ref().take(len), &mut std::io::sink());
                    let _ = (&conn).write_all(
                        format!(
                            "HTTP/1.0 201 Created\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                }
                None => held.push(conn),
            }
        }
    });
    addr
}

/// A standby that takes the registration and then never answers a
/// checkpoint: kv's acknowledged write is refused (the connection closes
/// without OK) after the shipping deadline instead of waiting forever, and
/// the instance stops at once. (Until the standby answers again, every
/// reply kv owes after that write costs it the deadline: it acknowledges
/// nothing that is not stored.)
#[test]
fn a_hung_standby_costs_a_write_the_deadline_not_the_guest() {
    let dir = TempDir::new("hung-standby");
    let a = Daemon::start("hung-a", 1, &["--no-overlay"], &dir);
    let standby = fake_peer(|head| {
        head.starts_with("POST /v1/standby ").then(|| {
            r#"{"name":"kv","origin":"a","state":"waiting","file":"","bytes":0,"blobs":0}"#
                .to_owned()
        })
    });
    let port = free_port();
    let img = common::daemon::kv_img();
    let publish = format!("{port}:6379");
    a.cli(&[
        "run",
        &img,
        "--name",
        "kv",
        "--publish",
        &publish,
        "--standby",
        &standby,
        "--env",
        "ACK_AFTER_CHECKPOINT=1",
    ]);
    let mut c = Redis::when_up(port);
    let start = Instant::now();
    let set = c.cmd(&["SET", "k", "v"]);
    let waited = start.elapsed();
    assert!(set.is_err(), "acknowledged without the standby: {set:?}");
    let deadline = daemon::standby::SHIP_DEADLINE;
    assert!(
        waited >= deadline.mul_f64(0.9) && waited < deadline + Duration::from_secs(4),
        "the write waited {waited:?} (deadline {deadline:?})"
    );
    let logs = a.cli(&["logs", "kv"]);
    assert!(
        logs.contains("checkpoint failed, not acknowledging"),
        "{logs}"
    );
    // The guest is not stuck in its checkpoint: it stops at once.
    let stopping = Instant::now();
    a.cli(&["stop", "kv"]);
    assert!(stopping.elapsed() < Duration::from_secs(3));
    assert!(!a.output().contains("did not stop"), "{}", a.output());
}

/// An origin that accepts connections and never answers is down: its
/// standby gives up waiting for it after the grace period (here with no
/// checkpoint to restart from, so it says so) instead of probing forever.
#[test]
fn a_hung_origin_is_declared_down_by_its_standby() {
    let dir = TempDir::new("hung-origin");
    let b = Daemon::start("hung-b", 2, &["--no-overlay"], &dir);
    let origin = fake_peer(|_| None);
    let img = common::daemon::kv_img();
    let req = daemon::standby::StandbyRequest {
        origin,
        run: api::RunRequest {
            name: "kv".into(),
            image: img.clone(),
            mem: 64 << 20,
            ..Default::default()
        },
        image: vmm::machine::image_id(std::path::Path::new(&img)).unwrap(),
        grace_ms: 500,
    };
    let client = Client::new(&b.addr);
    let _: daemon::standby::StandbyInfo = client.json("POST", "/v1/standby", Some(&req)).unwrap();
    let start = Instant::now();
    loop {
        let list: Vec<daemon::standby::StandbyInfo> = client.standbys().unwrap();
        let state = list[0].state.clone();
        if state.contains("no checkpoint") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still {state:?} after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("hung origin declared down after {:?}", start.elapsed());
}

/// A destination whose migration thread hangs once `Commit` arrived: the
/// source, without `Committed`, asks; while the whole destination daemon
/// is frozen (SIGSTOP) nobody answers, so kv stays paused at the source,
/// "in doubt", neither resumed nor dropped; once the destination answers
/// again, asking settles the migration as not started there (and cuts the
/// hung receiver loose: it discards its copy), and kv resumes at the
/// source with every acknowledged write.
#[test]
fn a_frozen_destination_leaves_the_migration_in_doubt_until_it_answers() {
    let dir = TempDir::new("doubt");
    let mut a = Daemon::start("doubt-a", 1, &[], &dir);
    let mut b = Daemon::start("doubt-b", 2, &["--test-fault", "commit:hang"], &dir);
    let (port, mut c) = run_kv(&a);
    c.fill(KEYS);
    let loader = Load::start(port);
    loader
        .wait_for_more(WRITES, "before the migration")
        .unwrap_or_else(|e| panic!("{e}"));
    let migrating = migrate_in_background(&a.addr, &b.addr);
    let give_up = Instant::now() + Duration::from_secs(30);
    while !b.output().contains("Commit:Hang") {
        assert!(
            Instant::now() < give_up,
            "no Commit reached the destination"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let signal = |sig: &str| {
        let pid = b.child.id().to_string();
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    wait_busy(&a.addr, "migration in doubt", Duration::from_secs(60));
    signal("-CONT");
    let out = migrating.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("says it did not start kv"), "{text}");
    assert!(text.contains("resumed on doubt-a"), "{text}");
    let (acked, _, _) = loader.stop();
    // Asking cut the hung destination loose: it discarded kv.
    settle(&mut a, &mut b, |sa, sb| running(sa) && absent(sb));
    holds_everything(&mut Redis::connect(port).unwrap(), acked);
}
