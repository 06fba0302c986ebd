//! `host-shim serve` daemons as child processes, their scratch directories,
//! and a minimal Redis-protocol client for the kv app.

use super::{free_port, image, require_kvm};
use api::{MigrationEvent, MigrationReport};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_host-shim");

/// A scratch directory of this test, removed at the end.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("host-shim-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `host-shim serve` process, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
    /// The state directory of a daemon with an identity (then `cli` talks
    /// TLS to it with the identity's pin and token).
    pub state: Option<PathBuf>,
}

impl Daemon {
    pub fn start(name: &str, shim_id: u8, extra: &[&str], dir: &TempDir) -> Self {
        Self::start_env(name, shim_id, extra, &[], dir)
    }

    pub fn start_env(
        name: &str,
        shim_id: u8,
        extra: &[&str],
        env: &[(&str, &str)],
        dir: &TempDir,
    ) -> Self {
        Self::start_in(name, "test", shim_id, extra, env, dir)
    }

    /// A plain daemon in `region` (`shim_id` is left out with `--store`
    /// in `extra`: the store allocates its addresses).
    pub fn start_in(
        name: &str,
        region: &str,
        shim_id: u8,
        extra: &[&str],
        env: &[(&str, &str)],
        dir: &TempDir,
    ) -> Self {
        // Port 0: the daemon takes a free port and says which in its ready
        // file (a daemon registering in a store records that bound port).
        let addr = "127.0.0.1:0".to_owned();
        let mut args = vec![
            "serve", "--listen", &addr, "--name", name, "--region", region,
        ];
        // With a store, the store allocates its addresses: no --shim-id.
        let id = shim_id.to_string();
        if !extra.contains(&"--store") {
            args.extend(["--shim-id", &id]);
        }
        args.extend(extra);
        Self::spawn(name, addr.clone(), &args, env, dir, None)
    }

    /// `host-shim init` (with `init_extra`) in `dir/NAME.state`, then
    /// `host-shim --dir STATE serve`: a daemon with TLS, a token and a
    /// fleet key.
    pub fn secure(name: &str, shim_id: u8, init_extra: &[&str], dir: &TempDir) -> Self {
        Self::secure_serving(name, shim_id, init_extra, &[], dir)
    }

    /// [`Self::secure`] with `serve_extra` flags for `serve`.
    pub fn secure_serving(
        name: &str,
        shim_id: u8,
        init_extra: &[&str],
        serve_extra: &[&str],
        dir: &TempDir,
    ) -> Self {
        let state = dir.path(&format!("{name}.state"));
        let addr = "127.0.0.1:0".to_owned();
        let out = Command::new(BIN)
            .args(["--dir", state.to_str().unwrap(), "init", "--name", name])
            .args(["--region", "test", "--listen", &addr])
            .args(["--shim-id", &shim_id.to_string()])
            .args(init_extra)
            .output()
            .expect("spawn host-shim init");
        assert!(out.status.success(), "init: {out:?}");
        let state_arg = state.to_str().unwrap().to_owned();
        let mut args = vec!["--dir", &state_arg, "serve"];
        args.extend(serve_extra);
        Self::spawn(name, addr, &args, &[], dir, Some(state))
    }

    fn spawn(
        name: &str,
        addr: String,
        args: &[&str],
        env: &[(&str, &str)],
        dir: &TempDir,
        state: Option<PathBuf>,
    ) -> Self {
        require_kvm();
        let log = dir.path(&format!("{name}.log"));
        std::fs::File::create(&log).unwrap();
        let ready = dir.path(&format!("{name}.ready"));
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--ready-file".into(), ready.display().to_string()]);
        // The test's environment, RUST_LOG=warn, then `env` (later wins).
        let mut all_env: Vec<(String, String)> = std::env::vars().collect();
        all_env.push(("RUST_LOG".into(), "warn".into()));
        all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let env = all_env;
        let mut d = Self {
            child: launch(&all, &env, &ready, &log),
            addr,
            log,
            state,
        };
        d.wait_ready(&ready);
        d
    }

    /// Kills the daemon (SIGKILL: its guests die with it) and starts it
    /// again with the command line and environment it ran with; waits until
    /// it is ready (a daemon on port 0 may get another port).
    pub fn restart(&mut self) {
        let pid = self.child.id();
        let read = |what: &str| -> Vec<String> {
            let bytes = std::fs::read(format!("/proc/{pid}/{what}")).expect("/proc of the daemon");
            bytes
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        };
        let mut args: Vec<String> = read("cmdline").into_iter().skip(1).collect();
        // Back at the address it had, as a host restarting is (the system
        // picked its port the first time).
        if let Some(at) = args.iter().position(|a| a == "--listen") {
            args[at + 1] = self.addr.clone();
        }
        let env: Vec<(String, String)> = read("environ")
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let at = args.iter().position(|a| a == "--ready-file").unwrap();
        let ready = PathBuf::from(&args[at + 1]);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&ready);
        self.child = launch(&args, &env, &ready, &self.log);
        self.wait_ready(&ready);
    }

    /// Waits (up to 10 s) until the ready file says where the daemon
    /// listens, and takes that address.
    fn wait_ready(&mut self, ready: &std::path::Path) {
        let d = self;
        let give_up = Instant::now() + Duration::from_secs(10);
        let listen = loop {
            if let Some(v) = std::fs::read(ready)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            {
                break v["listen"]
                    .as_str()
                    .expect("listen in the ready file")
                    .to_owned();
            }
            assert!(
                Instant::now() < give_up,
                "the daemon never became ready:\n{}",
                d.output()
            );
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("the daemon exited ({status}):\n{}", d.output());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            TcpStream::connect(&listen).is_ok(),
            "ready but not listening on {listen}"
        );
        d.addr = listen;
    }

    /// A secure daemon's fingerprint (from `peer list --json`) and user
    /// token (from its state directory).
    pub fn pin_and_token(&self) -> (String, String) {
        let list = self.cli(&["peer", "list", "--json"]);
        let view: serde_json::Value =
            serde_json::from_str(&list).unwrap_or_else(|e| panic!("peer list --json: {e}: {list}"));
        let fp = view["fingerprint"]
            .as_str()
            .unwrap_or_else(|| panic!("no fingerprint in {list}"))
            .to_owned();
        let state = self.state.as_ref().expect("a secure daemon");
        let token = std::fs::read_to_string(state.join("token")).unwrap();
        (fp, token.trim().to_owned())
    }

    /// A secure daemon's `GET /v1/info`.
    pub fn info(&self) -> api::ShimInfo {
        let (fp, token) = self.pin_and_token();
        api::Client::secure(&self.addr, fp.parse().unwrap(), Some(token), None)
            .unwrap()
            .info()
            .unwrap()
    }

    /// A plain-HTTP daemon's `GET /v1/stats`.
    pub fn stats(&self) -> daemon::stats::ShimStats {
        api::Client::new(&self.addr)
            .stats()
            .unwrap_or_else(|e| panic!("GET /v1/stats: {e}\n--- daemon:\n{}", self.output()))
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 5 s) until the daemon's log mentions `needle`; returns the log.
    pub fn output_once_it_says(&self, needle: &str) -> String {
        let give_up = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let out = self.output();
            if out.contains(needle) || std::time::Instant::now() > give_up {
                return out;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `host-shim --shim ADDR ARGS` (`--dir STATE --shim https://ADDR ARGS`
    /// for a secure daemon: pin and token from its state); panics unless it
    /// succeeds.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        assert!(
            out.status.success(),
            "host-shim {args:?} failed:\n{}{}\n--- daemon:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.output()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `migrate ARGS --json` (ARGS: `migrate NAME --to TO ...`): the
    /// migration's events, which must end with `done`; returns its report.
    #[allow(dead_code)]
    pub fn migrate(&self, args: &[&str]) -> MigrationReport {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.cli(&args);
        let events: Vec<MigrationEvent> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{out}")))
            .collect();
        match events.last() {
            Some(MigrationEvent::Done(report)) => report.clone(),
            other => panic!("the migration did not end with done: {other:?}\n{out}"),
        }
    }

    /// `run` of the image of `app` as instance `name`, its `guest_port`
    /// published on a free port of the host, with `extra` (app arguments
    /// after `--`); returns that port.
    pub fn run_published(&self, app: &str, name: &str, guest_port: u16, extra: &[&str]) -> u16 {
        let port = free_port();
        let img = image(app).to_string_lossy().into_owned();
        let publish = format!("{port}:{guest_port}");
        let mut args = vec!["run", &img, "--name", name, "--publish", &publish];
        args.extend_from_slice(extra);
        self.cli(&args);
        port
    }

    pub fn try_cli(&self, args: &[&str]) -> Output {
        let mut target = vec![];
        if let Some(state) = &self.state {
            target.extend(["--dir".to_owned(), state.to_str().unwrap().to_owned()]);
        }
        let scheme = if self.state.is_some() { "https://" } else { "" };
        target.extend(["--shim".to_owned(), format!("{scheme}{}", self.addr)]);
        Command::new(BIN)
            .args(target)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("spawn host-shim")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `host-shim ARGS` with `env` (only), its output appended to
/// `log`, after removing its old ready file.
fn launch(
    args: &[String],
    env: &[(String, String)],
    ready: &std::path::Path,
    log: &std::path::Path,
) -> Child {
    let _ = std::fs::remove_file(ready);
    let out = std::fs::OpenOptions::new().append(true).open(log).unwrap();
    Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn host-shim serve")
}

pub use super::Redis;

/// A client that keeps writing and reading keys (`load:N` = `vN`) on its
/// own connection until stopped, counting the writes kv acknowledged.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<(usize, Duration, Option<String>)>,
}

impl Load {
    pub fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let (halt, count) = (Arc::clone(&stop), Arc::clone(&acked));
        let thread = std::thread::spawn(move || {
            let mut c = Redis::connect(port).unwrap();
            let mut gap = Duration::ZERO;
            let mut last = Instant::now();
            while !halt.load(Ordering::Relaxed) {
                let n = count.load(Ordering::Relaxed);
                let (k, v) = (format!("load:{n}"), format!("v{n}"));
                let set = c.cmd(&["SET", &k, &v]);
                let get = c.cmd(&["GET", &k]);
                match (set, get) {
                    (Ok(s), Ok(g)) if s == "OK" && g == v => count.store(n + 1, Ordering::Relaxed),
                    other => return (n, gap, Some(format!("{k}: {other:?}"))),
                }
                gap = gap.max(last.elapsed());
                last = Instant::now();
            }
            (count.load(Ordering::Relaxed), gap, None)
        });
        Self {
            stop,
            acked,
            thread,
        }
    }

    /// Waits (up to 30 s) until kv acknowledged `n` more writes than it had
    /// when called. `Err` with the writer's error if the writer stopped
    /// first (its connection broke); a writer still going but slower fails
    /// the test, naming `what` it waited for.
    pub fn wait_for_more(&self, n: usize, what: &str) -> Result<(), String> {
        let want = self.acked.load(Ordering::Relaxed) + n;
        let give_up = Instant::now() + Duration::from_secs(30);
        while self.acked.load(Ordering::Relaxed) < want {
            if self.thread.is_finished() {
                return Err(format!(
                    "the writer stopped after {} writes, {what}",
                    self.acked.load(Ordering::Relaxed)
                ));
            }
            assert!(
                Instant::now() < give_up,
                "fewer than {n} writes acknowledged within 30 s {what} ({} in all)",
                self.acked.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stops the writer: (writes acknowledged, longest gap between two
    /// replies, first error).
    pub fn stop(self) -> (usize, Duration, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

pub fn kv_img() -> String {
    image("kv").to_string_lossy().into_owned()
}

/// Runs kv as instance `kv` of `daemon` on a fresh published port; returns
/// the port and a client connected once it answers.
pub fn run_kv(daemon: &Daemon) -> (u16, Redis) {
    let port = daemon.run_published("kv", "kv", 6379, &[]);
    (port, Redis::when_up(port))
}

/// `deploy KV-IMAGE --on ON --name kv --publish 127.0.0.1:PORT:6379
/// EXTRA` on a free port, run by `cli` (the fleet file's or a store's
/// CLI): that port and what `cli` returned.
pub fn deploy_kv<R>(on: &str, extra: &[&str], cli: impl FnOnce(&[&str]) -> R) -> (u16, R) {
    let port = free_port();
    let img = kv_img();
    let publish = format!("127.0.0.1:{port}:6379");
    let mut args = vec!["deploy", &img, "--on", on, "--name", "kv"];
    args.extend(["--publish", &publish]);
    args.extend_from_slice(extra);
    (port, cli(&args))
}

/// The user's fleet CLI: `host-shim ARGS` with the fleet file `file`
/// (and no --shim / $HOST_SHIM).
pub struct FleetCli {
    pub file: PathBuf,
}

impl FleetCli {
    pub fn new(dir: &TempDir) -> Self {
        Self {
            file: dir.path("fleet.json"),
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("spawn host-shim")
    }

    /// The command, to spawn it (e.g. `logs --follow`).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("HOST_SHIM_FLEET", &self.file)
            .env_remove("HOST_SHIM")
            .env("RUST_LOG", "warn");
        c
    }

    /// `logs APP --follow`, running, its stdout and stderr piped (see
    /// [`super::ended`]).
    pub fn follow_logs(&self, app: &str) -> Child {
        self.command(&["logs", app, "--follow"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn host-shim logs --follow")
    }

    /// `host-shim ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "host-shim {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `host-shim ARGS --json`'s document.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{text}"))
    }

    /// The `ps --json` row of `name`.
    pub fn ps_row(&self, name: &str) -> Option<serde_json::Value> {
        self.json(&["ps", "--json"])["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
    }
}
