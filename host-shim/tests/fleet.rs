//! The fleet commands through the real binary: three `host-shim serve`
//! processes on loopback (distinct --shim-id, one overlay), a fleet file,
//! real guests under KVM and real clients (redis-cli, curl).
//!
//! Needs /dev/kvm, redis-tools, curl and the images (`cargo xtask build-image --all`).

mod common;

use common::daemon::{deploy_kv, kv_img, Daemon, FleetCli, TempDir, BIN};
use common::{
    ended, free_port, image, only_one_wins, redis_pipe_set, require_kvm, wait_kv_checkpoint, Redis,
};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `host-shim serve` with a state directory, killed when dropped.
struct Shim {
    child: Child,
    name: String,
    addr: String,
    args: Vec<String>,
    log: PathBuf,
    /// Where it says it is ready (`--ready-file`).
    ready: PathBuf,
}

impl Shim {
    fn start(dir: &Path, name: &str, addr: &str, shim_id: u8, extra: &[&str]) -> Self {
        require_kvm();
        let mut args: Vec<String> = ["serve", "--listen", addr, "--name", name]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--region".into(), format!("region-{name}")]);
        args.extend(["--shim-id".into(), shim_id.to_string()]);
        args.extend(["--state-dir".into(), dir.join(name).display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let ready = dir.join(format!("{name}.ready"));
        args.extend(["--ready-file".into(), ready.display().to_string()]);
        let log = dir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&ready);
        let child = Self::spawn(&args, &log);
        let mut shim = Self {
            child,
            name: name.into(),
            addr: addr.into(),
            args,
            log,
            ready,
        };
        shim.wait_ready();
        shim
    }

    fn spawn(args: &[String], log: &Path) -> Child {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn host-shim serve")
    }

    /// Waits (up to 10 s) until the daemon has written its ready file,
    /// saying it listens on its address.
    fn wait_ready(&mut self) {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            self.assert_running();
            let doc = std::fs::read(&self.ready)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            if let Some(doc) = doc {
                assert_eq!(doc["listen"], self.addr.as_str(), "{doc}");
                return;
            }
            assert!(
                Instant::now() < give_up,
                "{} was not ready within 10 s:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon (SIGKILL: its guests die with it) and starts it
    /// again on the same state directory.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ready);
        self.child = Self::spawn(&self.args, &self.log);
        self.wait_ready();
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the daemon's log if it has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.output());
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_app_deployed_to_a_fleet_moves_around_three_shims_with_its_client_and_logs() {
    let dir = TempDir::new("fleet-tour");
    let fleet = FleetCli::new(&dir);
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let shims: Vec<Shim> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut extra = Vec::new();
            for (j, peer) in addrs.iter().enumerate() {
                if j != i {
                    extra.extend(["--peer", peer.as_str()]);
                }
            }
            Shim::start(&dir.0, name, &addrs[i], i as u8 + 1, &extra)
        })
        .collect();
    for s in &shims {
        let added = fleet.json(&["fleet", "add", &s.name, &s.url(), "--json"]);
        assert_eq!(added["region"], format!("region-{}", s.name), "{added}");
    }
    assert_eq!(
        fleet
            .json(&["fleet", "ls", "--json"])
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Deploy: the image is uploaded once; a second app of it is not.
    let (port, deployed) = deploy_kv("a", &["--json"], |args| fleet.json(args));
    let kv = kv_img();
    assert_eq!(deployed["uploaded"], true, "{deployed}");
    assert_eq!(deployed["host"], "a");
    let again = fleet.json(&["deploy", &kv, "--on", "a", "--name", "kv2", "--json"]);
    assert_eq!(again["uploaded"], false, "deduplicated: {again}");
    fleet.ok(&["stop", "kv2"]);
    let churn = image("selftest").display().to_string();
    fleet.ok(&[
        "deploy", &churn, "--on", "a", "--name", "churn", "--", "churn",
    ]);

    // Keys, and a client that stays connected through every move.
    let mut client = Redis::when_up(port);
    redis_pipe_set(
        port,
        (0..2000).map(|i| (format!("key:{i}"), format!("value-{i}"))),
    );
    let follow = fleet.follow_logs("churn");

    for (round, to) in ["b", "c", "a", "c"].iter().enumerate() {
        let key = format!("moving:{round}");
        assert_eq!(client.cmd(&["SET", &key, to]).unwrap(), "OK");
        let moved = fleet.json(&["migrate", "kv", "--to", to, "--json"]);
        assert_eq!(moved["to"], *to, "{moved}");
        assert!(moved["downtime_ms"].as_f64().is_some(), "{moved}");
        fleet.ok(&["migrate", "churn", "--to", to]);
        wait_for_log(&fleet, "churn", &format!(" on {to}\n"));
        assert_eq!(client.cmd(&["GET", &key]).unwrap(), *to, "round {round}");
        let row = fleet.ps_row("kv").expect("kv in ps");
        assert_eq!(
            (row["host"].as_str(), row["state"].as_str()),
            (Some(*to), Some("running"))
        );
        assert_eq!(row["region"], format!("region-{to}"));
        assert_eq!(client.host(), *to, "the app knows where it runs");
    }
    client.check(2000);
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "DBSIZE"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2004");

    // The logs followed churn everywhere, and end when it is stopped.
    fleet.ok(&["stop", "churn"]);
    let (logs, notes) = ended(follow, "logs --follow with the app");
    for host in ["a", "b", "c"] {
        assert!(
            logs.contains(&format!(" on {host}\n")),
            "no line from {host}:\n{logs}\n{notes}"
        );
    }
    for hop in ["from a to b", "from b to c", "from c to a", "from a to c"] {
        assert!(notes.contains(hop), "no '{hop}' note:\n{notes}");
    }
    assert!(notes.contains("churn on c: stopped"), "{notes}");

    // Stop: gone everywhere, its published port with it.
    fleet.ok(&["stop", "kv"]);
    let ps = fleet.json(&["ps", "--all", "--json"]);
    assert!(ps["instances"].as_array().unwrap().is_empty(), "{ps}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still open"
    );
    let missing = fleet.run(&["logs", "kv"]);
    assert_eq!(missing.status.code(), Some(3), "not found: {missing:?}");
    drop(shims);
}

#[test]
fn tampered_and_oversize_images_are_refused_and_unreachable_hosts_reported() {
    let dir = TempDir::new("fleet-refuse");
    let fleet = FleetCli::new(&dir);
    let addr = format!("127.0.0.1:{}", free_port());
    let shim = Shim::start(&dir.0, "small", &addr, 1, &["--max-image-size", "300K"]);
    fleet.ok(&["fleet", "add", "small", &shim.url()]);

    // kv (~450 KiB) is over the limit: refused by the CLI up front...
    let kv = image("kv");
    let out = fleet.run(&["deploy", kv.to_str().unwrap(), "--on", "small"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("over host small's limit"),
        "{out:?}"
    );
    // ... and by the shim itself (curl, bypassing the CLI).
    let bytes = std::fs::read(&kv).unwrap();
    let put = |body: &[u8], hash: &str| -> (String, String) {
        let file = dir.0.join("body");
        std::fs::write(&file, body).unwrap();
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "-X",
                "PUT",
                "--data-binary",
            ])
            .arg(format!("@{}", file.display()))
            .arg(format!("http://{addr}/v1/images/{hash}"))
            .output()
            .expect("curl is installed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.to_owned(), body.to_owned())
    };
    let (code, body) = put(&bytes, &sha256(&bytes));
    assert_eq!(code, "413", "{body}");

    // A tampered image: the hash of the real one, one byte changed.
    let small = std::fs::read(image("selftest")).unwrap();
    let hash = sha256(&small);
    let mut tampered = small.clone();
    tampered[4000] ^= 1;
    let (code, body) = put(&tampered, &hash);
    assert_eq!(code, "422", "{body}");
    assert!(body.contains("not") && body.contains(&hash), "{body}");
    let listed = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{addr}/v1/images/{hash}"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "404",
        "nothing kept"
    );
    // The real one is accepted.
    let (code, body) = put(&small, &hash);
    assert_eq!(code, "201", "{body}");

    // A host that does not answer: ps reports it with status 4.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let refused = fleet.run(&["fleet", "add", "dead", &dead]);
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    let text = std::fs::read_to_string(&fleet.file).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&text).unwrap();
    state["entries"]["hosts/dead"] = serde_json::json!({
        "version": 99, "value": {"name": "dead", "url": dead}
    });
    std::fs::write(&fleet.file, state.to_string()).unwrap();
    let ps = fleet.run(&["ps", "--json"]);
    assert_eq!(ps.status.code(), Some(4));
    let ps: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(ps["unreachable"][0]["host"], "dead", "{ps}");
    drop(shim);
}

#[test]
fn instances_come_back_after_their_daemon_restarts() {
    let dir = TempDir::new("fleet-restart");
    let fleet = FleetCli::new(&dir);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut shim = Shim::start(&dir.0, "r", &addr, 1, &[]);
    fleet.ok(&["fleet", "add", "r", &shim.url()]);
    let checkpoints = ["--checkpoint-every", "100ms"];
    let (port, _) = deploy_kv("r", &checkpoints, |args| fleet.ok(args));
    let http_port = free_port();
    let http_publish = format!("127.0.0.1:{http_port}:80");
    let http = image("http").display().to_string();
    fleet.ok(&[
        "deploy",
        &http,
        "--on",
        "r",
        "--name",
        "web",
        "--publish",
        &http_publish,
        "--restart",
        "never",
    ]);
    let mut client = Redis::when_up(port);
    client.fill(500);
    // Wait for a checkpoint holding the last key on the disk (a checkpoint
    // is a consistent snapshot: it holds every key acknowledged before).
    let latest = dir.0.join("r/instances/kv.checkpoints/latest.ckpt");
    wait_kv_checkpoint(&latest, &[("key:499", Some("value-499"))], || {
        shim.assert_running()
    });

    shim.restart();
    let row = fleet
        .ps_row("kv")
        .unwrap_or_else(|| panic!("kv did not come back:\n{}", shim.output()));
    assert_eq!(row["state"], "running");
    assert_eq!(row["restart"], "always");
    assert!(fleet.ps_row("web").is_none(), "--restart never stays down");
    let mut client = Redis::when_up(port);
    client.check(500);
    assert!(
        shim.output().contains("brought back kv"),
        "{}",
        shim.output()
    );
    fleet.ok(&["stop", "kv"]);
    shim.restart();
    assert!(fleet.ps_row("kv").is_none(), "a stopped app stays stopped");
}

/// Waits (up to 10 s) until `logs NAME` shows `needle`.
fn wait_for_log(fleet: &FleetCli, name: &str, needle: &str) {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = fleet.ok(&["logs", name]);
        if logs.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "{name} never logged {needle:?}:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sha256(bytes: &[u8]) -> String {
    daemon::images::sha256_hex(bytes)
}

/// Runs kv on `d` with `--restart always` and checkpoints every 100 ms
/// (to `kv.checkpoints` in its state directory), on a fresh published
/// port, which it returns.
fn run_kept_kv(d: &Daemon) -> u16 {
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    d.cli(&[
        "run",
        &kv_img(),
        "--name",
        "kv",
        "--publish",
        &publish,
        "--restart",
        "always",
        "--checkpoint-every",
        "100ms",
        "--checkpoint-to",
        "kv.checkpoints",
    ]);
    port
}

/// A daemon with an identity (`init` + `serve --dir`: its state directory
/// is the identity's) keeps its identity and brings its `--restart always`
/// instance back, with every checkpointed key, after `kill -9`.
#[test]
fn a_daemon_with_an_identity_brings_its_instance_back_after_kill_9() {
    let dir = TempDir::new("fleet-restart-identity");
    let mut d = Daemon::secure("ident", 1, &[], &dir);
    let (pin, _) = d.pin_and_token();
    let port = run_kept_kv(&d);
    Redis::when_up(port).fill(300);
    // A name: the daemon keeps it in its state directory.
    let state = d.state.clone().unwrap();
    let latest = state.join("checkpoints/kv.checkpoints/latest.ckpt");
    wait_kv_checkpoint(&latest, &[("key:299", Some("value-299"))], || {
        if let Ok(Some(status)) = d.child.try_wait() {
            panic!("the daemon exited ({status}):\n{}", d.output());
        }
    });

    d.restart();
    assert_eq!(
        d.pin_and_token().0,
        pin,
        "the same identity after a restart"
    );
    let list = d.cli(&["list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("kv ") && l.contains("running")),
        "{list}\n{}",
        d.output()
    );
    Redis::when_up(port).check(300);
    assert!(d.output().contains("brought back kv"), "{}", d.output());
}

/// An app that migrated comes back after its new daemon restarts, there
/// (with what it wrote there), and not on the daemon it left.
#[test]
fn an_app_comes_back_on_the_daemon_it_migrated_to() {
    let dir = TempDir::new("fleet-restart-moved");
    let (sa, sb) = (dir.path("a.state"), dir.path("b.state"));
    let mut a = Daemon::start("moved-a", 1, &["--state-dir", sa.to_str().unwrap()], &dir);
    let mut b = Daemon::start("moved-b", 2, &["--state-dir", sb.to_str().unwrap()], &dir);
    let port = run_kept_kv(&a);
    let mut c = Redis::when_up(port);
    c.fill(300);
    a.migrate(&["migrate", "kv", "--to", &b.addr]);
    assert_eq!(c.host(), "moved-b");
    assert_eq!(c.cmd(&["SET", "written", "on-b"]).unwrap(), "OK");
    let latest = sb.join("instances/kv.checkpoints/latest.ckpt");
    wait_kv_checkpoint(&latest, &[("written", Some("on-b"))], || {
        if let Ok(Some(status)) = b.child.try_wait() {
            panic!("B exited ({status}):\n{}", b.output());
        }
    });
    drop(c);

    b.restart();
    assert!(b.output().contains("brought back kv"), "{}", b.output());
    let running = |d: &Daemon| {
        d.cli(&["list"])
            .lines()
            .any(|l| l.starts_with("kv ") && l.contains("running"))
    };
    assert!(running(&b), "{}\n{}", b.cli(&["list"]), b.output());
    // Still reached through a's published port (a forwards it over the
    // overlay to kv's address, which kv kept on b).
    let mut c = Redis::when_up(port);
    assert_eq!(c.host(), "moved-b");
    assert_eq!(c.cmd(&["GET", "written"]).unwrap(), "on-b");
    c.check(300);
    drop(c);
    // The daemon it left does not bring it back (a restart of a forgets
    // the forwarding of ports whose instance moved away).
    a.restart();
    assert!(!running(&a), "kv came back on the daemon it left too");
    assert!(!a.output().contains("brought back kv"), "{}", a.output());
}

/// Two users' CLIs racing to deploy the same app name on two hosts with
/// one fleet file: one wins (status 0), the other gets status 5 (conflict)
/// and a message saying why, and exactly one instance runs.
#[test]
fn two_clis_racing_for_one_name_one_wins_and_the_other_exits_5() {
    let dir = TempDir::new("fleet-race");
    let fleet = FleetCli::new(&dir);
    let hosts: Vec<Shim> = ["ra", "rb"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let addr = format!("127.0.0.1:{}", free_port());
            Shim::start(&dir.0, name, &addr, i as u8 + 1, &[])
        })
        .collect();
    for h in &hosts {
        fleet.ok(&["fleet", "add", &h.name, &h.url()]);
    }
    let img = image("http").display().to_string();
    let racers = hosts
        .iter()
        .map(|h| fleet.command(&["deploy", &img, "--on", &h.name, "--name", "app"]))
        .collect();
    only_one_wins(racers, "has an app 'app' already");
    let ps = fleet.json(&["ps", "--all", "--json"]);
    let apps: Vec<&serde_json::Value> = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"] == "app")
        .collect();
    assert_eq!(apps.len(), 1, "{ps}");
}
