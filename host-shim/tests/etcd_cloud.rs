//! The fleet on etcd end to end, as a cloud: a real etcd, three daemons
//! registered through it, 40 kv apps spread over them (more than 16 on
//! one host), each acknowledging a write only once its checkpoint is
//! stored on its standby host; a migration; two scheduler replicas whose
//! leader is killed; `kill -9` of a host whose apps come back on their
//! standbys from their latest checkpoints (taken over by compare-and-swap
//! on each app's owner once the host's lease lapsed); the killed host
//! restarting without running them again (fenced); and `events --follow`,
//! started first, seeing every step in order. A second test cuts a host
//! off (SIGSTOP past its lease): it pauses its guests before its lease
//! can lapse, and once back, stops what was taken over meanwhile. A third
//! races several takers of one app through etcd: one wins.
//!
//! Needs `etcd` on PATH, /dev/kvm, `redis-cli` and the kv image
//! (`cargo xtask build-image --all`).

mod common;

use common::daemon::{kv_img, Daemon, TempDir};
use common::etcd::Etcd;
use common::follower::Follower;
use common::store::{cli, ok, scheduler};
use common::{redis_pipe_set, Redis};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

/// The hosts' lease TTL: a killed host's apps are taken over this long
/// after its last renewal (a few seconds on a loaded host).
const TTL: &str = "3s";

fn is(kind: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["kind"] == kind
}

/// A daemon registered in the store, with its state directory.
/// A daemon registered in the store at `url` (its guest addresses come
/// from the block the store allocates to it: no `--shim-id`).
fn serve(url: &str, name: &str, region: &str, dir: &TempDir) -> Daemon {
    let state = dir.path(&format!("{name}-state"));
    let extra = [
        "--store",
        url,
        "--lease-ttl",
        TTL,
        "--state-dir",
        state.to_str().unwrap(),
    ];
    Daemon::start_in(name, region, 0, &extra, &[], dir)
}

/// `n` free ports for the apps' published ports, below the ephemeral
/// range (32768 and up), where no outgoing connection of this busy machine
/// takes one between now and the deploy: a random run of free ones in
/// 20000..32000.
fn publish_ports(n: usize) -> Vec<u16> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id();
    let start = 20000 + (seed % 10000) as u16;
    let free: Vec<u16> = (start..32000)
        .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .take(n)
        .collect();
    assert_eq!(free.len(), n, "no {n} free ports from {start} on");
    free
}

/// One kv app of the test: where it was deployed, its standby, its port.
#[derive(Clone, Debug)]
struct App {
    name: String,
    on: &'static str,
    standby: &'static str,
    port: u16,
}

/// Deploys `apps` through the store, one host at a time each (a daemon
/// picks an address and then reserves it: two runs at once on one daemon
/// may pick the same one, and one is refused).
fn deploy_all(url: &str, apps: &[App]) {
    let img = kv_img();
    std::thread::scope(|s| {
        for host in ["a", "b", "c"] {
            let img = &img;
            s.spawn(move || {
                for app in apps.iter().filter(|x| x.on == host) {
                    let publish = format!("127.0.0.1:{}:6379", app.port);
                    ok(
                        url,
                        &[
                            "deploy",
                            img,
                            "--on",
                            app.on,
                            "--name",
                            &app.name,
                            "--publish",
                            &publish,
                            "--checkpoint-every",
                            "1s",
                            "--env",
                            "ACK_AFTER_CHECKPOINT=1",
                            "--standby",
                            app.standby,
                        ],
                    );
                }
            });
        }
    });
}

/// `ps --json`: each running app's host.
fn running(url: &str) -> BTreeMap<String, Vec<String>> {
    let ps: Value = serde_json::from_str(&ok(url, &["ps", "--json"])).unwrap();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in ps["instances"].as_array().unwrap() {
        if r["state"] == "running" {
            out.entry(r["name"].as_str().unwrap().to_owned())
                .or_default()
                .push(r["host"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// The keys each app was given (acknowledged, hence on its standby).
const KEYS: usize = 50;

fn fill(app: &App) {
    let pairs = (0..KEYS).map(|i| (format!("key:{i}"), format!("value-{i}")));
    redis_pipe_set(app.port, pairs);
    // One write acknowledged alone, last.
    let mut c = Redis::when_up(app.port);
    assert_eq!(c.cmd(&["SET", "last", &app.name]).unwrap(), "OK");
}

/// Checks `app` answers with every acknowledged key, served by one of `hosts`.
fn check(app: &App, hosts: &[&str]) {
    let mut c = Redis::when_up(app.port);
    let host = c.host();
    assert!(
        hosts.contains(&host.as_str()),
        "{} is served by {host}, not one of {hosts:?}",
        app.name
    );
    c.check(KEYS);
    assert_eq!(c.cmd(&["GET", "last"]).unwrap(), app.name);
    assert_eq!(c.cmd(&["DBSIZE"]).unwrap(), (KEYS + 1).to_string());
}

/// The "Done means" of the fleet on etcd, in one run.
#[test]
fn forty_apps_survive_a_killed_host_and_the_host_coming_back_runs_none_of_them() {
    let started = Instant::now();
    let dir = TempDir::new("etcd-cloud");
    let etcd = Etcd::start(&dir);
    let url = etcd.url();
    let mut events = Follower::start(&url);
    let mut a = serve(&url, "a", "east", &dir);
    let b = serve(&url, "b", "west", &dir);
    let c = serve(&url, "c", "north", &dir);
    events.wait_for("host-up", 3, Duration::from_secs(20), is("host-up"));

    // 40 apps: 18 on a (standbys b and c), 11 on b (standby c), 11 on c
    // (standby b).
    let ports = publish_ports(40);
    let apps: Vec<App> = (0..40)
        .map(|i| {
            let (on, standby) = match i {
                0..18 if i % 2 == 0 => ("a", "b"),
                0..18 => ("a", "c"),
                18..29 => ("b", "c"),
                _ => ("c", "b"),
            };
            App {
                name: format!("kv{i:02}"),
                on,
                standby,
                port: ports[i],
            }
        })
        .collect();
    deploy_all(&url, &apps);
    events.wait_for("deploy", 40, Duration::from_secs(30), is("deploy"));
    std::thread::scope(|s| {
        for chunk in apps.chunks(10) {
            s.spawn(move || chunk.iter().for_each(fill));
        }
    });
    let placed = running(&url);
    assert_eq!(
        placed.values().filter(|h| h.as_slice() == ["a"]).count(),
        18,
        "{placed:?}"
    );
    eprintln!("[{:?}] 40 apps deployed and filled", started.elapsed());

    // A migration off a (its standby is released: the owner is b now).
    let moved: Value =
        serde_json::from_str(&ok(&url, &["migrate", "kv17", "--to", "b", "--json"])).unwrap();
    assert_eq!(moved["to"], "b", "{moved}");
    events.wait_for(
        "migration-done",
        1,
        Duration::from_secs(20),
        is("migration-done"),
    );

    // Two scheduler replicas for kv39 (on c, north, the cheapest): r1
    // leads, is killed, r2 takes over and moves kv39 when west gets cheaper.
    let prices = dir.path("prices.csv");
    std::fs::write(&prices, "region,price\neast,0.10\nwest,0.10\nnorth,0.03\n").unwrap();
    let leader = |r: &'static str| {
        move |e: &Value| e["kind"] == "leader-change" && e["details"]["replica"] == r
    };
    let mut r1 = scheduler(&url, "kv39", "r1", &prices, &dir);
    events.wait_for("leader r1", 1, Duration::from_secs(20), leader("r1"));
    let mut r2 = scheduler(&url, "kv39", "r2", &prices, &dir);
    let give_up = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(dir.path("r2.out"))
        .unwrap_or_default()
        .contains("standing by (r1 leads)")
    {
        assert!(Instant::now() < give_up, "r2 never stood by");
        std::thread::sleep(Duration::from_millis(100));
    }
    r1.kill().unwrap();
    let _ = r1.wait();
    events.wait_for("leader r2", 1, Duration::from_secs(20), leader("r2"));
    std::fs::write(&prices, "region,price\neast,0.10\nwest,0.03\nnorth,0.10\n").unwrap();
    events.wait_for("a move by r2", 1, Duration::from_secs(30), |e| {
        e["kind"] == "migration-done" && e["details"]["replica"] == "r2"
    });
    let _ = r2.kill();
    let _ = r2.wait();
    eprintln!("[{:?}] migrated; scheduler failed over", started.elapsed());

    // kill -9 of a: its 17 apps come back on their standbys from their
    // checkpoints once its lease lapsed, each taken over exactly once.
    let on_a: Vec<&App> = apps
        .iter()
        .filter(|x| x.on == "a" && x.name != "kv17")
        .collect();
    a.child.kill().unwrap();
    let killed = Instant::now();
    let _ = a.child.wait();
    events.wait_for("takeover", 17, Duration::from_secs(40), is("takeover"));
    let took = killed.elapsed();
    eprintln!(
        "[{:?}] 17 apps taken over {took:?} after kill -9",
        started.elapsed()
    );
    for app in &on_a {
        check(app, &[app.standby]);
    }
    let takeovers: Vec<&Value> = events.seen.iter().filter(|e| is("takeover")(e)).collect();
    let taken: BTreeSet<&str> = takeovers
        .iter()
        .map(|e| e["app"].as_str().unwrap())
        .collect();
    assert_eq!(taken.len(), 17, "one takeover per app: {}", events.table());
    for e in &takeovers {
        let app = on_a.iter().find(|x| x.name == e["app"]).unwrap();
        assert_eq!(e["hosts"], serde_json::json!(["a", app.standby]), "{e}");
    }
    let mut ms: Vec<f64> = takeovers
        .iter()
        .map(|e| e["details"]["ms"].as_f64().unwrap())
        .collect();
    ms.sort_by(f64::total_cmp);
    eprintln!(
        "restarting a taken app from its checkpoint: median {:.1} ms (min {:.1}, max {:.1})",
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1]
    );

    // The live hosts notice a's lease lapsed (once per TTL each).
    events.wait_for("host-down of a", 1, Duration::from_secs(20), |e| {
        e["kind"] == "host-down" && e["hosts"][0] == "a"
    });

    // a restarts with its restart records: it runs none of them again (it
    // fences them before it registers, so before its host-up).
    let a = serve(&url, "a", "east", &dir);
    events.wait_for("fenced", 17, Duration::from_secs(30), is("fenced"));
    events.wait_for("host-up of a again", 2, Duration::from_secs(30), |e| {
        e["kind"] == "host-up" && e["hosts"][0] == "a"
    });
    let out = a.output_once_it_says("fenced");
    assert!(out.contains("fenced: "), "{out}");
    let on_a_now = a.cli(&["list"]);
    for app in &on_a {
        assert!(
            !on_a_now.contains(&app.name),
            "a runs {} again:\n{on_a_now}",
            app.name
        );
    }
    // Every app runs exactly once, the taken ones where they were taken.
    let now = running(&url);
    assert_eq!(now.len(), 40, "{now:?}");
    for app in &apps {
        let hosts = &now[&app.name];
        assert_eq!(hosts.len(), 1, "{} runs on {hosts:?}", app.name);
        let want = match app.name.as_str() {
            "kv17" | "kv39" => "b",
            _ if app.on == "a" => app.standby,
            _ => app.on,
        };
        assert_eq!(hosts[0], want, "{}", app.name);
    }
    for app in apps.iter().filter(|x| x.on != "a").take(3) {
        check(app, &[app.on, "b"]);
    }

    // The stream saw every step once, in order.
    let revs: Vec<u64> = events
        .seen
        .iter()
        .map(|e| e["rev"].as_u64().unwrap())
        .collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{}", events.table());
    let first = |f: &dyn Fn(&Value) -> bool| events.seen.iter().position(f).unwrap();
    let last = |f: &dyn Fn(&Value) -> bool| events.seen.iter().rposition(f).unwrap();
    let kv17_done = first(&|e| e["kind"] == "migration-done" && e["app"] == "kv17");
    let r1_leads = first(&leader("r1"));
    let r2_leads = first(&leader("r2"));
    let r2_moved = first(&|e| e["kind"] == "migration-done" && e["details"]["replica"] == "r2");
    let a_down = first(&|e| e["kind"] == "host-down" && e["hosts"][0] == "a");
    let a_up_again = last(&|e| e["kind"] == "host-up" && e["hosts"][0] == "a");
    let order = [
        ("last deploy", last(&is("deploy"))),
        ("kv17 migrated", kv17_done),
        ("r1 leads", r1_leads),
        ("r2 leads", r2_leads),
        ("r2 moved kv39", r2_moved),
        ("first takeover", first(&is("takeover"))),
        ("last takeover", last(&is("takeover"))),
        ("first fenced", first(&is("fenced"))),
        ("last fenced", last(&is("fenced"))),
        ("a up again", a_up_again),
    ];
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "{order:?}\n{}",
        events.table()
    );
    assert!(
        r2_moved < a_down && a_down < a_up_again,
        "{}",
        events.table()
    );
    assert_eq!(
        events
            .seen
            .iter()
            .filter(|e| is("takeover-failed")(e))
            .count(),
        0
    );
    drop(c);
    drop(b);
    let total = started.elapsed();
    eprintln!("the whole run took {total:?}");
}

/// Instance `name`'s state on the daemon at `addr` (`None`: not there).
fn state_on(addr: &str, name: &str) -> Option<String> {
    let list = api::Client::new(addr)
        .with_timeout(Duration::from_secs(5))
        .list()
        .unwrap_or_else(|e| panic!("GET /v1/instances on {addr}: {e}"));
    list.into_iter()
        .find(|i| i.name == name)
        .map(|i| i.state.to_string())
}

/// Sends `signal` (`-STOP`, `-CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let st = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success(), "kill {signal} {pid}");
}

/// A host cut off past its lease (its whole process stopped): its apps are
/// taken over by their standby; when it runs again it pauses them at once
/// (its lease is gone) and, finding them owned by the standby, stops them:
/// one copy of each runs, on the standby.
#[test]
fn a_host_stopped_past_its_lease_stops_the_apps_taken_over_meanwhile() {
    let dir = TempDir::new("etcd-fence");
    let etcd = Etcd::start(&dir);
    let url = etcd.url();
    let mut events = Follower::start(&url);
    let b = serve(&url, "b", "west", &dir);
    let c = serve(&url, "c", "north", &dir);
    let names = ["p0", "p1", "p2"];
    for name in names {
        ok(
            &url,
            &[
                "deploy",
                &kv_img(),
                "--on",
                "c",
                "--name",
                name,
                "--checkpoint-every",
                "300ms",
                "--standby",
                "b",
            ],
        );
    }
    // Each has a checkpoint on b.
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let standbys: Vec<daemon::standby::StandbyInfo> =
            api::Client::new(&b.addr).standbys().unwrap();
        let ready = names
            .iter()
            .all(|n| standbys.iter().any(|s| s.name == *n && s.blobs > 0));
        if ready {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "no checkpoint of every app on b: {standbys:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    signal(c.child.id(), "-STOP");
    events.wait_for("takeover", 3, Duration::from_secs(30), is("takeover"));
    for name in names {
        assert_eq!(
            state_on(&b.addr, name).as_deref(),
            Some("running"),
            "{name} on b"
        );
    }
    signal(c.child.id(), "-CONT");
    events.wait_for("fenced", 3, Duration::from_secs(30), is("fenced"));
    let give_up = Instant::now() + Duration::from_secs(10);
    while names.iter().any(|n| state_on(&c.addr, n).is_some()) {
        assert!(
            Instant::now() < give_up,
            "c still has its taken apps:\n{}",
            c.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for name in names {
        assert_eq!(
            state_on(&b.addr, name).as_deref(),
            Some("running"),
            "{name} on b"
        );
    }
    let out = c.output();
    assert!(out.contains("paused: this host's lease"), "{out}");
    assert!(out.contains("stopped: another host took it over"), "{out}");
    let fenced: Vec<&Value> = events.seen.iter().filter(|e| is("fenced")(e)).collect();
    for e in &fenced {
        assert_eq!(e["hosts"], serde_json::json!(["c", "b"]), "{e}");
    }
    let last_takeover = events.seen.iter().rposition(is("takeover")).unwrap();
    let first_fenced = events.seen.iter().position(is("fenced")).unwrap();
    assert!(last_takeover < first_fenced, "{}", events.table());
    // Once settled, c keeps its lease and runs on.
    let rows: Value = serde_json::from_str(&ok(&url, &["fleet", "ls", "--json"])).unwrap();
    let c_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "c")
        .unwrap();
    assert_eq!(c_row["state"], "up", "{rows}");
}

/// Candidates racing to take one app of a dead host over through a real
/// etcd, each with its own client: exactly one compare-and-swap wins, and
/// the dead host coming back finds the app owned by the winner.
#[test]
fn of_several_hosts_taking_one_app_over_through_etcd_exactly_one_wins() {
    use fleet::ops::{reclaim, take_over, Ownership};
    use fleet::store::Expect;
    use fleet::{App, Fleet, FleetError, Host};
    let dir = TempDir::new("etcd-race");
    let etcd = Etcd::start(&dir);
    let url = etcd.url();
    let fleet = Fleet::new(fleet::store::open(&url).unwrap());
    // Host a registered once; its lease is gone (no alive/a key).
    let a = Host {
        name: "a".into(),
        url: "http://127.0.0.1:1".into(),
        registered: true,
        ..Host::default()
    };
    fleet.put_host(&a, Expect::Absent).unwrap();
    for round in 0..5 {
        let name = format!("kv{round}");
        let app = App {
            name: name.clone(),
            host: "a".into(),
            image: "sha256:00".into(),
        };
        fleet.put_app(&app, Expect::Absent).unwrap();
        let takers = ["b", "c", "d", "e"];
        let barrier = std::sync::Barrier::new(takers.len());
        let won: Vec<&str> = std::thread::scope(|s| {
            let threads: Vec<_> = takers
                .iter()
                .map(|to| {
                    let (url, name, barrier) = (&url, &name, &barrier);
                    s.spawn(move || {
                        let mine = Fleet::new(fleet::store::open(url).unwrap());
                        barrier.wait();
                        match take_over(&mine, name, "a", to) {
                            Ok(app) => {
                                assert_eq!(app.host, *to);
                                Some(*to)
                            }
                            Err(FleetError::Conflict(_)) => None,
                            Err(e) => panic!("{to}: {e}"),
                        }
                    })
                })
                .collect();
            threads
                .into_iter()
                .filter_map(|t| t.join().unwrap())
                .collect()
        });
        assert_eq!(won.len(), 1, "round {round}: winners {won:?}");
        let owner = fleet.app(&name).unwrap().unwrap().value.host;
        assert_eq!(owner, won[0]);
        assert_eq!(
            reclaim(&fleet, &name, "a").unwrap(),
            Ownership::Theirs(owner)
        );
    }
}

/// The source of a migration dies right after the destination took the
/// guest (`committed:die`), before any CLI could record the move: the
/// destination made itself the owner before the guest started, so the
/// source's lease lapsing does not make the app's standby take it over
/// too. One copy runs, on the destination, and the store says so.
#[test]
fn a_source_dying_after_the_commit_leaves_one_copy_owned_by_the_destination() {
    let dir = TempDir::new("etcd-move-in");
    let etcd = Etcd::start(&dir);
    let url = etcd.url();
    let mut events = Follower::start(&url);
    let state = dir.path("a-state");
    let a = Daemon::start_in(
        "a",
        "east",
        0,
        &[
            "--store",
            &url,
            "--lease-ttl",
            TTL,
            "--state-dir",
            state.to_str().unwrap(),
            "--test-fault",
            "committed:die",
        ],
        &[],
        &dir,
    );
    let b = serve(&url, "b", "west", &dir);
    let c = serve(&url, "c", "north", &dir);
    ok(
        &url,
        &[
            "deploy",
            &kv_img(),
            "--on",
            "a",
            "--name",
            "kv",
            "--checkpoint-every",
            "300ms",
            "--standby",
            "c",
        ],
    );
    // c holds a checkpoint of kv: it could take kv over.
    let give_up = Instant::now() + Duration::from_secs(20);
    while !api::Client::new(&c.addr)
        .standbys::<daemon::standby::StandbyInfo>()
        .unwrap()
        .iter()
        .any(|s| s.name == "kv" && s.blobs > 0)
    {
        assert!(Instant::now() < give_up, "no checkpoint of kv on c");
        std::thread::sleep(Duration::from_millis(100));
    }

    // a dies once b has taken the guest: the CLI learns nothing more.
    let out = cli(&url, &["migrate", "kv", "--to", "b"]);
    assert!(
        !out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    events.wait_for("host-down of a", 1, Duration::from_secs(30), |e| {
        e["kind"] == "host-down" && e["hosts"][0] == "a"
    });
    // c's standby of kv decides: released (the owner is b now), never
    // to take kv over.
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let standbys: Vec<daemon::standby::StandbyInfo> =
            api::Client::new(&c.addr).standbys().unwrap();
        let kv = standbys.iter().find(|s| s.name == "kv");
        let state = kv.map(|s| s.state.as_str()).unwrap_or("gone");
        if state.starts_with("released") {
            break;
        }
        assert!(
            !state.starts_with("took over") && !state.starts_with("failed"),
            "c's standby of kv: {state}\n{}",
            events.table()
        );
        assert!(
            Instant::now() < give_up,
            "c's standby of kv not released within 30 s: {state}\n{}",
            events.table()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(state_on(&b.addr, "kv").as_deref(), Some("running"));
    assert_eq!(state_on(&c.addr, "kv"), None, "{}", events.table());
    assert!(
        !events.seen.iter().any(is("takeover")),
        "{}",
        events.table()
    );
    // (`ps` exits non-zero: a does not answer; its JSON says so.)
    let ps = cli(&url, &["ps", "--json"]);
    let record: Value = serde_json::from_slice(&ps.stdout).unwrap();
    let on: Vec<&Value> = record["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"] == "kv" && r["state"] == "running")
        .collect();
    assert_eq!(on.len(), 1, "{record}");
    assert_eq!(on[0]["host"], "b", "{record}");
    drop(a);
}
