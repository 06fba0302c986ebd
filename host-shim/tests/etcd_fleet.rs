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

use common::daemon::{kv_img, Daemon, TempDir, BIN};
use common::{free_port, Redis};
use fleet::store::{self, Expect, StoreError};
use serde_json::{json, Value};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// An etcd cluster on loopback (one member for most tests), each member
/// with its own ports and data directory; killed when dropped.
struct Etcd {
    members: Vec<Member>,
}

struct Member {
    name: String,
    endpoint: String,
    args: Vec<String>,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl Member {
    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Etcd {
    fn start(dir: &TempDir) -> Self {
        Self::cluster(dir, 1)
    }

    /// `n` members forming one cluster, ready when a client's round trip
    /// through all of them succeeds.
    fn cluster(dir: &TempDir, n: usize) -> Self {
        if Command::new("etcd").arg("--version").output().is_err() {
            panic!(
                "this test needs a real etcd on PATH: apt-get install etcd-server etcd-client \
                 (`cargo xtask test` installs it)"
            );
        }
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let name = format!("m{i}");
                let endpoint = format!("127.0.0.1:{client}");
                let data = dir.path(&format!("{name}.etcd"));
                let args = [
                    "--name",
                    &name,
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--listen-client-urls",
                    &format!("http://{endpoint}"),
                    "--advertise-client-urls",
                    &format!("http://{endpoint}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-state",
                    "new",
                ]
                .map(str::to_owned)
                .to_vec();
                Member {
                    log: dir.path(&format!("{name}.log")),
                    name,
                    endpoint,
                    args,
                    child: None,
                }
            })
            .collect();
        for m in &mut members {
            m.spawn();
        }
        let mut etcd = Self { members };
        etcd.wait_ready();
        etcd
    }

    fn wait_ready(&mut self) {
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            let all_answer = self.members.iter().filter(|m| m.child.is_some()).all(|m| {
                store::open(&format!("etcd://{}", m.endpoint))
                    .and_then(|s| s.list("none/"))
                    .is_ok()
            });
            if all_answer {
                return;
            }
            for m in &mut self.members {
                if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                    panic!("etcd {} exited ({status}):\n{}", m.name, m.output());
                }
            }
            assert!(
                Instant::now() < give_up,
                "etcd never answered:\n{}",
                self.members.iter().map(Member::output).collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The store URL naming every member.
    fn url(&self) -> String {
        let endpoints: Vec<&str> = self.members.iter().map(|m| m.endpoint.as_str()).collect();
        format!("etcd://{}", endpoints.join(","))
    }

    /// Stops member `i` (kill -9).
    fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data.
    fn restart(&mut self, i: usize) {
        self.members[i].spawn();
    }

    /// `etcdctl ARGS` against the first member (a real client besides ours).
    fn ctl(&self, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.members[0].endpoint])
            .args(args)
            .output()
            .expect("etcdctl (apt-get install etcd-client)")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}

/// `host-shim --store URL ARGS` on "another machine": a fresh process with
/// no fleet file of its own.
fn cli(store: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("HOST_SHIM")
        .env_remove("HOST_SHIM_FLEET")
        .env("RUST_LOG", "warn")
        .output()
        .expect("spawn host-shim")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(store: &str, args: &[&str]) -> String {
    let out = cli(store, args);
    assert!(out.status.success(), "host-shim {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
    let port = free_port();
    let publish = format!("{port}:6379");
    let img = kv_img();
    ok(
        &url,
        &[
            "deploy",
            &img,
            "--on",
            "a",
            "--name",
            "kv",
            "--publish",
            &publish,
        ],
    );
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
    assert!(text(&ps).contains("host b did not answer"), "{}", text(&ps));
    // The user adopts b with their token (pinning the fingerprint it
    // registered): ps reaches every host now.
    let (_, token) = b.pin_and_token();
    let b_url = format!("https://{}", b.addr);
    let wrong = cli(
        &url,
        &[
            "fleet",
            "add",
            "b",
            &b_url,
            "--fingerprint",
            &format!("SHA256:{}", "0".repeat(64)),
            "--token",
            &token,
        ],
    );
    assert!(!wrong.status.success(), "{}", text(&wrong));
    ok(
        &url,
        &[
            "fleet",
            "add",
            "b",
            &b_url,
            "--fingerprint",
            &fingerprint,
            "--token",
            &token,
        ],
    );
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
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--name", "a", "--store", &url, "--lease-ttl", "2s"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!twin.status.success());
    assert!(
        text(&twin).contains("registered and alive already"),
        "{}",
        text(&twin)
    );
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
    assert!(text(&out).contains("--advertise"), "{}", text(&out));
    assert!(host_row(&url, "w").is_none());

    // A daemon that fails after registering (its API address is taken)
    // revokes its lease on the way out: down at once, not after its TTL.
    let out = Command::new(BIN)
        .args(["serve", "--listen", &a2.addr, "--name", "c"])
        .args(["--store", &url, "--lease-ttl", "60s"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let row = host_row(&url, "c").expect("c registered before failing");
    assert_eq!(row["state"], "down", "{row}");
    drop(b);
}

#[test]
fn store_urls_fail_clearly_and_the_file_store_still_works() {
    let dir = TempDir::new("etcd-file");
    // No etcd at this port: a clear error naming it, within the deadline.
    let dead = format!("etcd://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = cli(&dead, &["fleet", "ls"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(&dead), "{}", text(&out));
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
    assert!(text(&by_default).contains(&d.addr), "{}", text(&by_default));
    // The file store has no leases: serve --store file:// says so.
    let out = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--name", "g", "--store", &store])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("needs an etcd store"), "{}", text(&out));
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
