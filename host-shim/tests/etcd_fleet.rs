//! The fleet state on a real etcd (Debian's `etcd-server`, started by each
//! test on free loopback ports with a scratch data directory): the store's
//! compare-and-swap between two clients, hosts that register themselves
//! with `serve --store etcd://...` under a lease, `fleet ls` from another
//! client seeing them up and then down once a killed daemon's lease
//! lapses, and the file store behind the same `--store` flag.
//!
//! Needs `etcd` (and `etcdctl`) on PATH, /dev/kvm for the daemons, and the
//! kv image for the deploy (`cargo xtask build-image --all`).

mod common;

use common::daemon::{deploy_kv, kv_img, Daemon, TempDir, BIN};
use common::etcd::{Certs, Etcd};
use common::follower::Follower;
use common::store::{cli, ok, scheduler};
use common::{assert_says, free_port, only_one_wins, text, Redis};
use fleet::store::{self, Expect, StoreError};
use serde_json::{json, Value};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `fleet ls --json`'s row of host `name`.
fn host_row(store: &str, name: &str) -> Option<Value> {
    let rows: Value = serde_json::from_str(&ok(store, &["fleet", "ls", "--json"])).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
}

/// Waits up to `within` until `name`'s state is `state`; returns when it was seen.
fn wait_state(store: &str, name: &str, state: &str, within: Duration) -> Instant {
    let give_up = Instant::now() + within;
    loop {
        let row = host_row(store, name);
        if row.as_ref().is_some_and(|r| r["state"] == state) {
            return Instant::now();
        }
        assert!(
            Instant::now() < give_up,
            "host {name} not {state} within {within:?}: {row:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn compare_and_swap_between_two_etcd_clients() {
    let dir = TempDir::new("etcd-cas");
    let etcd = Etcd::start(&dir);
    // Two clients, as two machines would have.
    let a = store::open(&etcd.url()).unwrap();
    let b = store::open(&etcd.url()).unwrap();

    let v1 = a
        .put("apps/kv", json!({"host": "x"}), Expect::Absent)
        .unwrap();
    assert!(matches!(
        b.put("apps/kv", json!({"host": "y"}), Expect::Absent),
        Err(StoreError::Conflict { found: Some(v), .. }) if v == v1
    ));
    // Both read v1; the first move wins, the second is refused and changes nothing.
    let seen = b.get("apps/kv").unwrap().unwrap();
    assert_eq!(seen.version, v1);
    let v2 = a
        .put("apps/kv", json!({"host": "a"}), Expect::Version(v1))
        .unwrap();
    assert!(v2 > v1);
    match b.put(
        "apps/kv",
        json!({"host": "b"}),
        Expect::Version(seen.version),
    ) {
        Err(StoreError::Conflict { found, .. }) => assert_eq!(found, Some(v2)),
        other => panic!("a stale write must conflict: {other:?}"),
    }
    assert_eq!(
        b.get("apps/kv").unwrap().unwrap().value,
        json!({"host": "a"})
    );
    assert!(matches!(
        b.delete("apps/kv", Expect::Version(v1)),
        Err(StoreError::Conflict { .. })
    ));
    b.delete("apps/kv", Expect::Version(v2)).unwrap();
    b.delete("apps/kv", Expect::Any).unwrap();
    assert!(a.get("apps/kv").unwrap().is_none());

    // Four clients each add 25 to a counter by read-modify-CAS: no update is lost.
    a.put("counter", json!(0), Expect::Absent).unwrap();
    let url = etcd.url();
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let s = store::open(&url).unwrap();
                let mut conflicts = 0;
                for _ in 0..25 {
                    loop {
                        let cur = s.get("counter").unwrap().unwrap();
                        let n = cur.value.as_u64().unwrap();
                        match s.put("counter", json!(n + 1), Expect::Version(cur.version)) {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(a.get("counter").unwrap().unwrap().value, json!(100));
    eprintln!("100 increments by 4 clients: {conflicts} conflicts retried");

    // A list longer than a page (1000 keys) comes whole and in key order.
    let t = Instant::now();
    for i in 0..2500 {
        a.put(&format!("many/{i:05}"), json!(i), Expect::Absent)
            .unwrap();
    }
    let wrote = t.elapsed();
    let t = Instant::now();
    let many = b.list("many/").unwrap();
    eprintln!("2500 writes: {wrote:?}; a list of them: {:?}", t.elapsed());
    assert_eq!(many.len(), 2500);
    for (i, (key, v)) in many.iter().enumerate() {
        assert_eq!(
            (key.as_str(), &v.value),
            (format!("many/{i:05}").as_str(), &json!(i))
        );
    }

    // Figures: one compare-and-swap write, etcd and the file store side by side.
    let file = store::open(&format!("file://{}", dir.path("fleet.json").display())).unwrap();
    for (label, s) in [("etcd", &a), ("file", &file)] {
        let mut version = s.put("bench", json!(0), Expect::Any).unwrap();
        let mut took: Vec<Duration> = (1..=50)
            .map(|i| {
                let t = Instant::now();
                version = s.put("bench", json!(i), Expect::Version(version)).unwrap();
                t.elapsed()
            })
            .collect();
        took.sort();
        eprintln!(
            "{label}: CAS write median {:?}, max {:?} (50)",
            took[25], took[49]
        );
    }

    // A record that is not JSON (written by another tool) is skipped by a
    // list, with the others still listed.
    a.put(
        "hosts/good",
        json!({"name": "good", "url": "http://127.0.0.1:1"}),
        Expect::Absent,
    )
    .unwrap();
    let put = etcd.ctl(&["put", "/host-shim/fleet/hosts/junk", "{ not json"]);
    assert!(put.status.success(), "etcdctl put: {}", text(&put));
    let listed = a.list("hosts/").unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].0, "hosts/good");
    // JSON that is no host record: skipped by the fleet commands too.
    a.put("hosts/odd", json!(42), Expect::Absent).unwrap();
    let ls = ok(&etcd.url(), &["fleet", "ls"]);
    assert!(ls.contains("good") && !ls.contains("odd"), "{ls}");
    assert!(matches!(
        a.get("hosts/junk"),
        Err(StoreError::BadRecord { .. })
    ));
}

#[test]
fn registered_hosts_show_up_from_another_client_and_down_after_their_lease() {
    let dir = TempDir::new("etcd-lease");
    let etcd = Etcd::start(&dir);
    let url = etcd.url();
    let state = dir.path("a-state");
    let state = state.to_str().unwrap();
    let mut a = Daemon::start(
        "a",
        1,
        &["--store", &url, "--lease-ttl", "4s", "--state-dir", state],
        &dir,
    );
    let b = Daemon::secure_serving("b", 2, &[], &["--store", &url, "--lease-ttl", "4s"], &dir);

    // Another machine (a fresh CLI with no fleet file) sees both up, with
    // what they registered.
    let row = host_row(&url, "a").expect("a registered");
    assert_eq!(row["state"], "up", "{row}");
    assert_eq!(row["url"], format!("http://{}", a.addr));
    assert_eq!(row["region"], "test");
    assert_eq!(row["overlay"], a.addr.as_str());
    assert!(
        row["capacity"]["max_instances"].as_u64().unwrap() >= 1,
        "{row}"
    );
    let row = host_row(&url, "b").expect("b registered");
    assert_eq!(row["state"], "up", "{row}");
    assert_eq!(row["url"], format!("https://{}", b.addr));
    let (fingerprint, _) = b.pin_and_token();
    assert_eq!(row["fingerprint"], fingerprint.as_str());
    let table = ok(&url, &["fleet", "ls"]);
    assert!(table.contains("STATE"), "{table}");

    // The fleet commands work on the etcd store: deploy to a registered
    // host, see it in ps, stop it.
    let (port, _) = deploy_kv("a", &[], |args| ok(&url, args));
    let img = kv_img();
    let mut kv = Redis::when_up(port);
    assert_eq!(kv.cmd(&["SET", "k", "v"]).unwrap(), "OK");
    assert_eq!(host_row(&url, "a").unwrap()["apps"], 1);
    let again = cli(&url, &["deploy", &img, "--on", "b", "--name", "kv"]);
    assert!(!again.status.success(), "a second kv: {}", text(&again));
    // b registered no token of this user (a secure host needs one): ps
    // lists kv and says b did not answer (status 4).
    let ps = cli(&url, &["ps"]);
    assert_eq!(ps.status.code(), Some(4), "{}", text(&ps));
    let stdout = String::from_utf8_lossy(&ps.stdout);
    assert!(
        stdout.contains("kv") && stdout.contains("running"),
        "{stdout}"
    );
    assert_says(&ps, "host b did not answer");
    // The user adopts b with their token (pinning the fingerprint it
    // registered): ps reaches every host now.
    let (_, token) = b.pin_and_token();
    let b_url = format!("https://{}", b.addr);
    let add_b = |pin: &str| {
        let args = ["fleet", "add", "b", &b_url, "--fingerprint", pin];
        cli(&url, &[&args[..], &["--token", &token]].concat())
    };
    let wrong = add_b(&format!("SHA256:{}", "0".repeat(64)));
    assert!(!wrong.status.success(), "{}", text(&wrong));
    let right = add_b(&fingerprint);
    assert!(right.status.success(), "{}", text(&right));
    let row = host_row(&url, "b").unwrap();
    assert_eq!(
        (row["token"].clone(), row["state"].clone()),
        (json!(true), json!("up")),
        "{row}"
    );
    assert!(
        row["capacity"].is_object(),
        "the registered record is kept: {row}"
    );
    let ps = cli(&url, &["ps"]);
    assert!(ps.status.success(), "{}", text(&ps));
    ok(&url, &["stop", "kv"]);
    assert_eq!(host_row(&url, "a").unwrap()["apps"], 0);

    // A second daemon cannot take a live host's name: it waits for the
    // lease to lapse (up to its TTL), then says why.
    let started = Instant::now();
    let twin = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--name", "a", "--store", &url, "--lease-ttl", "2s"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!twin.status.success());
    assert_says(&twin, "registered and alive already");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(host_row(&url, "a").unwrap()["state"], "up");

    // kill -9 of a: up until its lease lapses, then down (record kept).
    let _ = a.child.kill();
    let killed = Instant::now();
    let _ = a.child.wait();
    let down = wait_state(&url, "a", "down", Duration::from_secs(30));
    let after = down - killed;
    eprintln!("host a down {after:?} after kill -9 (lease TTL 4 s)");
    assert!(
        after >= Duration::from_secs(2),
        "a lease renewed every 4/3 s has at least 2.6 s left at the kill: down after {after:?}"
    );
    assert_eq!(host_row(&url, "b").unwrap()["state"], "up");

    // It comes back under the same name.
    let a2 = Daemon::start("a", 1, &["--store", &url, "--lease-ttl", "4s"], &dir);
    wait_state(&url, "a", "up", Duration::from_secs(10));
    assert_eq!(
        host_row(&url, "a").unwrap()["url"],
        format!("http://{}", a2.addr)
    );

    // A wildcard --listen is no address to record: --advertise says which.
    let wild = format!("0.0.0.0:{}", free_port());
    let out = Command::new(BIN)
        .args(["serve", "--listen", &wild, "--name", "w", "--store", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_says(&out, "--advertise");
    assert!(host_row(&url, "w").is_none());

    // A daemon that fails after registering (it cannot write its ready
    // file) revokes its lease on the way out: down at once, not after its TTL.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--name", "c"])
        .args(["--store", &url, "--lease-ttl", "60s", "--ready-file"])
        .arg(dir.path("no/such/dir/ready"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_says(&out, "cannot write --ready-file");
    let row = host_row(&url, "c").expect("c registered before failing");
    assert_eq!(row["state"], "down", "{row}");
    // It had listened on a port the system chose, and recorded that one.
    let recorded = row["url"].as_str().unwrap();
    assert!(
        recorded.starts_with("http://127.0.0.1:") && !recorded.ends_with(":0"),
        "{row}"
    );
    drop(b);
}

/// A plain daemon's `GET /v1/info` addresses: (gateway, first, last, guest net).
fn addresses(d: &Daemon) -> (String, String, String, String) {
    let info = api::Client::new(&d.addr).info().unwrap();
    let a = info.addresses.expect("addresses in /v1/info");
    (info.gateway, a.first, a.last, a.guest_net)
}

/// The address of instance `name` on daemon `d` (in the fleet's /10).
fn ip_of(d: &Daemon, name: &str) -> String {
    api::Client::new(&d.addr)
        .list()
        .unwrap()
        .into_iter()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("{name} on {}", d.addr))
        .ip
        .expect("an address")
        .ip
        .to_string()
}

#[test]
fn hosts_get_address_blocks_from_the_store_past_14_and_guests_keep_theirs_when_they_move() {
    let dir = TempDir::new("etcd-blocks");
    let etcd = Etcd::start(&dir);
    let url = etcd.url();
    // Twenty hosts hold blocks already (more than the 14 shim ids there are).
    let client = store::open(&url).unwrap();
    for i in 1..=20 {
        client
            .put(
                &format!("blocks/{i:05}"),
                json!({"host": format!("h{i}"), "since": 0}),
                Expect::Absent,
            )
            .unwrap();
    }
    let serve = |name: &str| {
        let state = dir.path(&format!("{name}-state"));
        let state = state.to_str().unwrap();
        let extra = ["--store", &url, "--lease-ttl", "4s", "--state-dir", state];
        Daemon::start(name, 0, &extra, &dir)
    };
    let mut a = serve("a");
    let b = serve("b");
    // The store's network (recorded by a, the first host) and a block
    // each past the others': gateway first, guests the rest.
    assert_eq!(
        client.get("network").unwrap().unwrap().value,
        json!({"cidr": "10.64.0.0/10"})
    );
    assert_eq!(
        addresses(&a),
        (
            "10.64.84.0".into(),
            "10.64.84.1".into(),
            "10.64.87.255".into(),
            "10.64.0.0/10".into()
        )
    );
    let (b_gateway, b_first, ..) = addresses(&b);
    assert_eq!(
        (b_gateway.as_str(), b_first.as_str()),
        ("10.64.88.0", "10.64.88.1")
    );
    assert_eq!(
        client.get("blocks/00021").unwrap().unwrap().value["host"],
        "a"
    );
    assert_eq!(
        client.get("blocks/00022").unwrap().unwrap().value["host"],
        "b"
    );

    // kv on a gets a's first guest address; it moves to b and keeps it
    // (outside b's block), reached through a's port over the overlay.
    let (port, _) = deploy_kv("a", &[], |args| ok(&url, args));
    let img = kv_img();
    assert_eq!(ip_of(&a, "kv"), "10.64.84.1");
    let mut kv = Redis::when_up(port);
    assert_eq!(kv.cmd(&["SET", "k", "before"]).unwrap(), "OK");
    let moved: Value =
        serde_json::from_str(&ok(&url, &["migrate", "kv", "--to", "b", "--json"])).unwrap();
    assert_eq!(moved["to"], "b", "{moved}");
    assert_eq!(ip_of(&b, "kv"), "10.64.84.1", "kept its address on b");
    assert_eq!(kv.cmd(&["GET", "k"]).unwrap(), "before");
    assert_eq!(kv.cmd(&["SET", "k", "after"]).unwrap(), "OK");
    assert_eq!(kv.host(), "b", "the app knows where it runs");
    // New guests: b's from its own block; a does not hand out kv's
    // address again while the overlay carries it to b.
    ok(&url, &["deploy", &img, "--on", "b", "--name", "kv2"]);
    assert_eq!(ip_of(&b, "kv2"), "10.64.88.1");
    ok(&url, &["deploy", &img, "--on", "a", "--name", "kv3"]);
    assert_eq!(ip_of(&a, "kv3"), "10.64.84.2");

    // a comes back after kill -9 with its block.
    let _ = a.child.kill();
    let _ = a.child.wait();
    let a2 = serve("a");
    assert_eq!(addresses(&a2).0, "10.64.84.0");
    assert_eq!(ip_of(&b, "kv"), "10.64.84.1", "kv runs on b still");
    // ... brings kv3 back (deployed apps restart with their host) and does
    // not hand out the address kv (from its block) holds on b: it asked
    // the live hosts when it came back.
    assert_eq!(ip_of(&a2, "kv3"), "10.64.84.2");
    ok(&url, &["deploy", &img, "--on", "a", "--name", "kv4"]);
    assert_eq!(ip_of(&a2, "kv4"), "10.64.84.3", "{}", a2.output());
    // The fleet has one network: another is refused, naming the recorded one.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--name", "n"])
        .args(["--store", &url, "--fleet-net", "10.0.0.0/16"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_says(&out, "10.64.0.0/10 (recorded in the store)");
    drop(b);

    // A small fleet network (a /21: one block besides block 0) fills up,
    // and the next host is told so.
    let dir2 = TempDir::new("etcd-blocks-full");
    let small = Etcd::start(&dir2);
    let small_url = small.url();
    let x = Daemon::start(
        "x",
        0,
        &["--store", &small_url, "--fleet-net", "10.99.0.0/21"],
        &dir2,
    );
    assert_eq!(addresses(&x).0, "10.99.4.0");
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--name", "y"])
        .args(["--store", &small_url])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_says(&out, "the fleet network 10.99.0.0/21 is full");
}

#[test]
fn store_urls_fail_clearly_and_the_file_store_still_works() {
    let dir = TempDir::new("etcd-file");
    // No etcd at this port: a clear error naming it, within the deadline.
    let dead = format!("etcd://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = cli(&dead, &["fleet", "ls"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_says(&out, &dead);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    for bad in [
        "nfs://x",
        "etcd://nohost",
        "etcd://h:0",
        "file://",
        "fleet.json",
    ] {
        let out = cli(bad, &["fleet", "ls"]);
        assert_eq!(out.status.code(), Some(1), "{bad}: {}", text(&out));
        assert!(
            text(&out).contains("is not a fleet store"),
            "{bad}: {}",
            text(&out)
        );
    }

    // file://PATH: today's store behind the flag (and the default).
    let file = dir.path("fleet.json");
    let store = format!("file://{}", file.display());
    let d = Daemon::start("f", 1, &[], &dir);
    ok(&store, &["fleet", "add", "f", &d.addr]);
    let row = host_row(&store, "f").unwrap();
    assert_eq!(
        row["state"], "-",
        "a host added by hand has no lease: {row}"
    );
    assert_eq!(row["url"], format!("http://{}", d.addr));
    let by_default = Command::new(BIN)
        .args(["fleet", "ls"])
        .env("HOST_SHIM_FLEET", &file)
        .env_remove("HOST_SHIM_STORE")
        .output()
        .unwrap();
    assert_says(&by_default, &d.addr);
    // The file store has no leases: serve --store file:// says so.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--name", "g", "--store", &store])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_says(&out, "needs an etcd store");
    let file_store = store::open(&store).unwrap();
    assert!(
        file_store.list("blocks/").unwrap().is_empty()
            && file_store.get("network").unwrap().is_none(),
        "nothing allocated in a store that cannot register the host"
    );
}

#[test]
fn a_three_member_cluster_survives_one_loss_and_refuses_without_quorum() {
    let dir = TempDir::new("etcd-quorum");
    let mut etcd = Etcd::cluster(&dir, 3);
    let url = etcd.url();
    let _a = Daemon::start("a", 1, &["--store", &url, "--lease-ttl", "4s"], &dir);
    let client = store::open(&url).unwrap();
    let v1 = client
        .put("test/x", json!({"host": "a"}), Expect::Absent)
        .unwrap();
    wait_state(&url, "a", "up", Duration::from_secs(10));

    // One member down: reads, CAS writes and the host's lease go on.
    etcd.stop(0);
    let started = Instant::now();
    let v2 = client
        .put("test/x", json!({"host": "b"}), Expect::Version(v1))
        .unwrap_or_else(|e| panic!("a write with 2 of 3 members: {e}"));
    eprintln!("first CAS after losing a member: {:?}", started.elapsed());
    assert!(matches!(
        client.put("test/x", json!({"host": "c"}), Expect::Version(v1)),
        Err(StoreError::Conflict { .. })
    ));
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        host_row(&url, "a").unwrap()["state"],
        "up",
        "lease kept over 2 members"
    );

    // Two down: no quorum. Commands fail clearly, within the deadline.
    etcd.stop(1);
    let started = Instant::now();
    let out = cli(&url, &["fleet", "ls"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let why = text(&out);
    assert!(
        why.contains("no quorum") || why.contains("did not answer"),
        "{why}"
    );
    assert!(why.contains(&url), "{why}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    eprintln!("fleet ls without quorum failed after {took:?}: {why}");
    let refused = client.put("test/x", json!({"host": "d"}), Expect::Version(v2));
    assert!(refused.is_err(), "a write without quorum: {refused:?}");

    // Quorum back: the state is whole, CAS works again, and the host is up
    // (its lease survived or it registered again).
    etcd.restart(1);
    let give_up = Instant::now() + Duration::from_secs(30);
    let now = loop {
        match client.get("test/x") {
            Ok(v) => break v.unwrap(),
            Err(e) => {
                assert!(Instant::now() < give_up, "quorum never came back: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(
        now.value == json!({"host": "b"}) || now.value == json!({"host": "d"}),
        "{now:?}"
    );
    client
        .put("test/x", json!({"host": "e"}), Expect::Version(now.version))
        .unwrap();
    wait_state(&url, "a", "up", Duration::from_secs(20));
}

/// An event's kind and app, for comparing sequences.
fn step(e: &Value) -> (String, String) {
    (
        e["kind"].as_str().unwrap_or("?").to_owned(),
        e["app"].as_str().unwrap_or("-").to_owned(),
    )
}

#[test]
fn one_deploy_wins_a_name_and_events_follow_every_step_across_an_etcd_restart() {
    let dir = TempDir::new("etcd-events");
    let mut etcd = Etcd::start(&dir);
    let url = etcd.url();
    let mut follower = Follower::start(&url);
    let (sa, sb) = (dir.path("a-state"), dir.path("b-state"));
    let serve = |name, id, state: &std::path::Path| {
        Daemon::start(
            name,
            id,
            &[
                "--store",
                &url,
                "--lease-ttl",
                "2s",
                "--state-dir",
                state.to_str().unwrap(),
            ],
            &dir,
        )
    };
    let _a = serve("a", 1, &sa);
    let mut b = serve("b", 2, &sb);
    let img = kv_img();

    // Two deploys of one name at once: one wins, the other gets status 5
    // and runs nothing.
    let hosts = ["a", "b"];
    let racers = hosts.map(|on| {
        let mut c = Command::new(BIN);
        c.args(["--store", &url, "deploy", &img, "--on", on, "--name", "kv"])
            .env("RUST_LOG", "warn");
        c
    });
    let winner = hosts[only_one_wins(racers.into(), "has an app 'kv' already")];
    let ps: Value = serde_json::from_str(&ok(&url, &["ps", "--json"])).unwrap();
    let kvs: Vec<&Value> = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["name"] == "kv")
        .collect();
    assert_eq!(kvs.len(), 1, "one kv runs: {ps}");
    assert_eq!(kvs[0]["host"], winner);

    // Migrate it, stop it.
    let other = if winner == "a" { "b" } else { "a" };
    let moved: Value =
        serde_json::from_str(&ok(&url, &["migrate", "kv", "--to", other, "--json"])).unwrap();
    assert_eq!(moved["to"], other, "{moved}");
    ok(&url, &["stop", "kv"]);

    // etcd goes away and comes back; the follower notices and reconnects.
    let before = follower.until(Duration::from_secs(30), |e| e["kind"] == "stop");
    etcd.stop(0);
    follower.wait_says("reconnecting", Duration::from_secs(20));
    etcd.restart(0);
    etcd.wait_ready();
    ok(&url, &["deploy", &img, "--on", "a", "--name", "kv2"]);
    ok(&url, &["stop", "kv2"]);
    let after = follower.until(Duration::from_secs(30), |e| {
        e["kind"] == "stop" && e["app"] == "kv2"
    });

    // Every step, once, in order, with a growing revision.
    let seen: Vec<Value> = before.into_iter().chain(after).collect();
    let steps: Vec<(String, String)> = seen.iter().map(step).collect();
    let want: Vec<(String, String)> = [
        ("host-up", "-"),
        ("host-up", "-"),
        ("deploy", "kv"),
        ("migration-started", "kv"),
        ("migration-done", "kv"),
        ("stop", "kv"),
        ("deploy", "kv2"),
        ("stop", "kv2"),
    ]
    .iter()
    .map(|(k, a)| ((*k).to_owned(), (*a).to_owned()))
    .collect();
    assert_eq!(steps, want, "{seen:#?}");
    let revs: Vec<u64> = seen.iter().map(|e| e["rev"].as_u64().unwrap()).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    assert_eq!(seen[2]["hosts"], json!([winner]));
    assert_eq!(seen[4]["hosts"], json!([winner, other]));
    assert!(
        seen[4]["details"]["downtime_ms"].as_f64().is_some(),
        "the migration's figures: {}",
        seen[4]
    );

    // The history says the same; --since skips what came before.
    let history: Vec<Value> = ok(&url, &["events", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(history, seen);
    let since = revs[5].to_string();
    let tail = ok(&url, &["events", "--json", "--since", &since]);
    assert_eq!(tail.lines().count(), 2, "{tail}");
    let table = ok(&url, &["events"]);
    assert!(
        table.contains("migration-done") && table.contains("downtime"),
        "{table}"
    );

    // A killed host cannot say it went down: a live one notices its lease
    // lapsed and records it, once.
    b.child.kill().unwrap();
    let _ = b.child.wait();
    let down = follower.until(Duration::from_secs(20), |e| e["kind"] == "host-down");
    let down = down.last().unwrap();
    assert_eq!(down["hosts"], json!(["b"]), "{down}");
    assert_eq!(down["details"]["noticed_by"], "a", "{down}");
    std::thread::sleep(Duration::from_secs(3));
    let downs = ok(&url, &["events", "--json"])
        .lines()
        .filter(|l| l.contains("host-down"))
        .count();
    assert_eq!(downs, 1);
}

#[test]
fn two_scheduler_replicas_elect_a_leader_and_the_other_takes_over_when_it_is_killed() {
    let dir = TempDir::new("etcd-leader");
    let etcd = Etcd::start(&dir);
    let url = etcd.url();
    let mut follower = Follower::start(&url);
    let (sa, sb) = (dir.path("a-state"), dir.path("b-state"));
    let serve = |name, region, id, state: &std::path::Path| {
        let extra = ["--store", &url, "--state-dir", state.to_str().unwrap()];
        Daemon::start_in(name, region, id, &extra, &[], &dir)
    };
    let _a = serve("a", "east", 1, &sa);
    let _b = serve("b", "west", 2, &sb);
    ok(&url, &["deploy", &kv_img(), "--on", "a", "--name", "kv"]);
    let prices = dir.path("prices.csv");
    std::fs::write(&prices, "region,price\neast,0.03\nwest,0.10\n").unwrap();
    let leader_is = |replica: &'static str| {
        move |e: &Value| e["kind"] == "leader-change" && e["details"]["replica"] == replica
    };
    let moved_by = |replica: &'static str| {
        move |e: &Value| e["kind"] == "migration-done" && e["details"]["replica"] == replica
    };

    let mut r1 = scheduler(&url, "kv", "r1", &prices, &dir);
    follower.until(Duration::from_secs(20), leader_is("r1"));
    let mut r2 = scheduler(&url, "kv", "r2", &prices, &dir);
    let r2_out = dir.path("r2.out");
    let give_up = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&r2_out)
        .unwrap_or_default()
        .contains("standing by (r1 leads)")
    {
        assert!(Instant::now() < give_up, "r2 never stood by");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The leader moves kv where it is cheaper; the other replica does not.
    std::fs::write(&prices, "region,price\neast,0.10\nwest,0.03\n").unwrap();
    let seen = follower.until(Duration::from_secs(30), moved_by("r1"));
    assert_eq!(seen.last().unwrap()["hosts"], json!(["a", "b"]));
    let on = |host: &str| {
        let ps: Value = serde_json::from_str(&ok(&url, &["ps", "--json"])).unwrap();
        let rows = ps["instances"].as_array().unwrap().clone();
        rows.iter()
            .any(|r| r["name"] == "kv" && r["host"] == host && r["state"] == "running")
    };
    assert!(on("b"));
    assert_eq!(host_row(&url, "b").unwrap()["apps"], 1, "kv's owner is b");

    // Kill the leader: r2 takes over within the lease's TTL.
    r1.kill().unwrap();
    let killed = Instant::now();
    let _ = r1.wait();
    follower.until(Duration::from_secs(20), leader_is("r2"));
    let takeover = killed.elapsed();
    eprintln!("takeover after the leader was killed: {takeover:?} (lease TTL 2s)");
    assert!(
        takeover < Duration::from_secs(8),
        "takeover took {takeover:?}"
    );

    // The new leader moves kv back when prices turn; one move per decision.
    std::fs::write(&prices, "region,price\neast,0.03\nwest,0.10\n").unwrap();
    follower.until(Duration::from_secs(30), moved_by("r2"));
    assert!(on("a"));
    std::thread::sleep(Duration::from_secs(2));
    let _ = r2.kill();
    let _ = r2.wait();
    let history: Vec<Value> = ok(&url, &["events", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let moves: Vec<(String, String)> = history
        .iter()
        .filter(|e| e["kind"].as_str().unwrap().starts_with("migration"))
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["details"]["replica"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    let pair = |k: &str, r: &str| (k.to_owned(), r.to_owned());
    assert_eq!(
        moves,
        [
            pair("migration-started", "r1"),
            pair("migration-done", "r1"),
            pair("migration-started", "r2"),
            pair("migration-done", "r2"),
        ],
        "{history:#?}"
    );
    assert_eq!(host_row(&url, "a").unwrap()["apps"], 1, "kv's owner is a");
}

#[test]
fn events_follow_starts_over_a_compacted_history_without_repeating() {
    let dir = TempDir::new("etcd-compact");
    let etcd = Etcd::start(&dir);
    let url = etcd.url();
    let put = |key: &str, value: &str| {
        let out = etcd.ctl(&["put", &format!("/host-shim/fleet/{key}"), value]);
        assert!(out.status.success(), "etcdctl put: {}", text(&out));
    };
    for (slot, app) in [("000000", "x0"), ("000001", "x1"), ("000002", "x2")] {
        put(
            &format!("events/{slot}"),
            &json!({ "time": 1.0, "kind": "stop", "app": app }).to_string(),
        );
    }
    // The ring overwrote slot 1; other keys changed; then etcd compacted
    // its history past the last event.
    put(
        "events/000001",
        &json!({ "time": 2.0, "kind": "deploy", "app": "y" }).to_string(),
    );
    for i in 0..10 {
        put(&format!("other/k{i}"), "1");
    }
    let status = etcd.ctl(&["endpoint", "status", "-w", "json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let rev = status[0]["Status"]["header"]["revision"].as_u64().unwrap();
    let out = etcd.ctl(&["compact", &rev.to_string()]);
    assert!(out.status.success(), "etcdctl compact: {}", text(&out));

    let mut follower = Follower::start(&url);
    let history = follower.until(Duration::from_secs(10), |e| e["app"] == "y");
    put(
        "events/000003",
        &json!({ "time": 3.0, "kind": "stop", "app": "z" }).to_string(),
    );
    let new = follower.until(Duration::from_secs(10), |e| e["app"] == "z");
    let apps: Vec<&str> = history
        .iter()
        .chain(&new)
        .map(|e| e["app"].as_str().unwrap())
        .collect();
    assert_eq!(apps, ["x0", "x2", "y", "z"]);
    // Nothing else comes (no event repeated).
    assert!(follower.nothing_more_within(Duration::from_secs(1)));
}

/// `host-shim --store URL FLAGS ARGS` with extra (store access) flags and
/// environment; how long it took.
fn cli_with(
    store: &str,
    flags: &[String],
    env: &[(&str, &str)],
    args: &[&str],
) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(BIN)
        .arg("--store")
        .arg(store)
        .args(flags)
        .args(args)
        .env_remove("HOST_SHIM_FLEET")
        .env_remove("HOST_SHIM_STORE_PASSWORD")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("spawn host-shim");
    (out, started.elapsed())
}

/// Asserts `out` failed within 5 s (plus process start-up on a loaded
/// host) with an error naming `url` and saying `why`.
fn fails_clearly(out: &(Output, Duration), url: &str, why: &str) {
    let (out, took) = out;
    eprintln!("failed in {took:?}: {}", text(out).trim());
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    assert!(text(out).contains(url), "names {url}: {}", text(out));
    assert!(text(out).contains(why), "says {why}: {}", text(out));
    assert!(*took < Duration::from_secs(8), "took {took:?}");
}

#[test]
fn etcd_over_tls_with_client_certificates() {
    let dir = TempDir::new("etcd-tls");
    let certs = Certs::generate(&dir);
    let etcd = Etcd::start_tls(&dir, &certs);
    let url = etcd.url();
    let path = |p: &std::path::Path| p.display().to_string();
    let flags = vec![
        "--store-ca".to_owned(),
        path(&certs.ca),
        "--store-cert".into(),
        path(&certs.client.0),
        "--store-key".into(),
        path(&certs.client.1),
    ];
    let mut extra: Vec<&str> = vec!["--store", &url, "--lease-ttl", "4s"];
    extra.extend(flags.iter().map(String::as_str));
    let _a = Daemon::start("a", 0, &extra, &dir);
    let (out, _) = cli_with(&url, &flags, &[], &["fleet", "ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["name"], "a", "{rows}");
    assert_eq!(rows[0]["state"], "up", "{rows}");
    // The same through the environment.
    let ca = path(&certs.ca);
    let (cert, key) = (path(&certs.client.0), path(&certs.client.1));
    let env = [
        ("HOST_SHIM_STORE_CA", ca.as_str()),
        ("HOST_SHIM_STORE_CERT", cert.as_str()),
        ("HOST_SHIM_STORE_KEY", key.as_str()),
    ];
    let (out, _) = cli_with(&url, &[], &env, &["fleet", "ls"]);
    assert!(out.status.success(), "{}", text(&out));

    // A CA that did not sign the members' certificate: refused, clearly.
    let mut wrong = flags.clone();
    wrong[1] = path(&certs.other_ca);
    fails_clearly(
        &cli_with(&url, &wrong, &[], &["fleet", "ls"]),
        &url,
        "certificate",
    );
    // No client certificate: etcd refuses the handshake.
    fails_clearly(
        &cli_with(&url, &flags[..2], &[], &["fleet", "ls"]),
        &url,
        "etcd at",
    );
    // Plain HTTP to a TLS member.
    fails_clearly(&cli_with(&url, &[], &[], &["fleet", "ls"]), &url, "etcd at");
    // A CA "file" that is a device: refused, not read forever.
    let mut device = flags.clone();
    device[1] = "/dev/zero".into();
    let (out, _) = cli_with(&url, &device, &[], &["fleet", "ls"]);
    assert_says(&out, "--store-ca: /dev/zero is not a regular file");
    // A certificate without its key is a flag error.
    let (out, _) = cli_with(&url, &flags[..4], &[], &["fleet", "ls"]);
    assert_says(&out, "--store-cert and --store-key go together");
}

#[test]
fn etcd_with_users_takes_a_password_from_a_file_or_the_environment() {
    let dir = TempDir::new("etcd-auth");
    let etcd = Etcd::start(&dir);
    let url = etcd.url();
    for args in [
        &["user", "add", "root", "--new-user-password", "s3cret pass"][..],
        &["auth", "enable"][..],
    ] {
        let out = etcd.ctl(args);
        assert!(out.status.success(), "etcdctl {args:?}: {}", text(&out));
    }
    let file = dir.path("password");
    std::fs::write(&file, "s3cret pass\n").unwrap();
    let file = file.display().to_string();
    let _a = Daemon::start(
        "a",
        0,
        &[
            "--store",
            &url,
            "--lease-ttl",
            "4s",
            "--store-user",
            "root",
            "--store-password-file",
            &file,
        ],
        &dir,
    );
    let user = ["--store-user".to_owned(), "root".into()];
    let (out, _) = cli_with(
        &url,
        &user,
        &[("HOST_SHIM_STORE_PASSWORD", "s3cret pass")],
        &["fleet", "ls", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&rows[0]["name"], &rows[0]["state"]),
        (&json!("a"), &json!("up")),
        "{rows}"
    );

    // A wrong password, or none: refused clearly, naming the store.
    fails_clearly(
        &cli_with(
            &url,
            &user,
            &[("HOST_SHIM_STORE_PASSWORD", "wrong")],
            &["fleet", "ls"],
        ),
        &url,
        "authentication failed",
    );
    fails_clearly(&cli_with(&url, &[], &[], &["fleet", "ls"]), &url, "etcd at");
    // A user without a password is a flag error.
    let (out, _) = cli_with(&url, &user, &[], &["fleet", "ls"]);
    assert_says(&out, "needs a password");
}
