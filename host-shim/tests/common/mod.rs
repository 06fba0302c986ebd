//! Shared helpers of the integration tests: where the images are, a check
//! that `/dev/kvm` exists (tests fail loudly without it, never pass), and a
//! runner for the real `host-shim` binary.
#![allow(dead_code)]

pub mod daemon;
pub mod etcd;
pub mod follower;
pub mod store;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory `cargo xtask build-image` writes images to.
pub fn images_dir() -> PathBuf {
    match std::env::var_os("LIBCLOUD_IMAGES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images"),
    }
}

/// Path of a built image; panics with the command that builds it.
pub fn image(app: &str) -> PathBuf {
    let path = images_dir().join(format!("{app}.img"));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo xtask test` (it builds the images), \
         or build it with `cargo xtask build-image {app}`",
        path.display()
    );
    path
}

pub use vmm::testutil::require_kvm;

/// Result of one shim run.
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {:?} after {:?}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `host-shim ARGS` to completion.
pub fn shim<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let start = Instant::now();
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_host-shim"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("spawn host-shim");
    Run {
        status: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// Runs `host-shim run PATH ARGS` to completion.
pub fn run_image(path: &Path, args: &[&str]) -> Run {
    let mut all: Vec<&std::ffi::OsStr> = vec!["run".as_ref(), path.as_os_str()];
    all.extend(args.iter().map(|a| -> &std::ffi::OsStr { a.as_ref() }));
    shim(all)
}

/// Boots `app` with `--timeout TIMEOUT SHIM_ARGS -- APP_ARGS`.
fn boot_for(timeout: &str, app: &str, shim_args: &[&str], app_args: &[&str]) -> Run {
    require_kvm();
    let mut args = vec!["--timeout", timeout];
    args.extend_from_slice(shim_args);
    args.push("--");
    args.extend_from_slice(app_args);
    run_image(&image(app), &args)
}

/// Boots `app` under KVM with a safety timeout, passing `app_args` after `--`.
pub fn boot(app: &str, shim_args: &[&str], app_args: &[&str]) -> Run {
    boot_for("30", app, shim_args, app_args)
}

/// [`boot`] under another monitor (`qemu`, `firecracker`), with a longer
/// safety timeout.
pub fn boot_under(backend: &str, app: &str, shim_args: &[&str], app_args: &[&str]) -> Run {
    let mut args = vec!["--backend", backend];
    args.extend_from_slice(shim_args);
    boot_for("60", app, &args, app_args)
}

/// Asserts that `a` and `b` printed the same lines but for the uptime.
pub fn assert_same_output_but_uptime(a: &Run, b: &Run) {
    let without_uptime = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with("uptime:"))
            .map(String::from)
            .collect()
    };
    assert_eq!(
        without_uptime(&a.stdout),
        without_uptime(&b.stdout),
        "{a:?}\n{b:?}"
    );
}

/// What a finished command printed: stdout, then stderr.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that what the finished command printed says `needle`.
pub fn assert_says(out: &Output, needle: &str) {
    let said = text(out);
    assert!(said.contains(needle), "no {needle:?} in:\n{said}");
}

/// Runs `racers` at once to their end: exactly one succeeds, each other
/// fails with status 5 saying `refusal`. Returns the winner's index.
pub fn only_one_wins(racers: Vec<Command>, refusal: &str) -> usize {
    let children: Vec<Child> = racers
        .into_iter()
        .map(|mut c| {
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a racer")
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let all = || outs.iter().map(text).collect::<Vec<_>>().join("\n");
    let mut codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
    codes.sort();
    let mut expected = vec![Some(5); outs.len()];
    expected[0] = Some(0);
    assert_eq!(codes, expected, "{}", all());
    for loser in outs.iter().filter(|o| !o.status.success()) {
        assert_says(loser, refusal);
    }
    outs.iter().position(|o| o.status.success()).unwrap()
}

/// Waits (up to 10 s) until `child` (stdout and stderr piped) ends, which
/// must be a success; its stdout and stderr.
pub fn ended(mut child: Child, what: &str) -> (String, String) {
    let give_up = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < give_up, "{what} did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut out, mut err) = (String::new(), String::new());
    let mut stdout = child.stdout.take().expect("a piped stdout");
    stdout.read_to_string(&mut out).unwrap();
    let mut stderr = child.stderr.take().expect("a piped stderr");
    stderr.read_to_string(&mut err).unwrap();
    assert!(child.wait().unwrap().success(), "{what}: {err}");
    (out, err)
}

/// A free port on 127.0.0.1 (free when this returns; the shim binds it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `host-shim run`, killed when dropped.
pub struct Shim {
    pub child: Child,
}

impl Shim {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(Command::new(env!("CARGO_BIN_EXE_host-shim")), args)
    }

    pub fn start_with(mut command: Command, args: &[&str]) -> Self {
        require_kvm();
        let child = command
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn host-shim");
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the shim and returns its stdout and stderr.
    pub fn stop(mut self) -> (String, String) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = self.child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        (out, err)
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Shim {
    /// Panics with the shim's output if it has exited (`waiting_for` says what for).
    pub fn assert_running(&mut self, waiting_for: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let (mut out, mut err) = (String::new(), String::new());
            if let Some(mut s) = self.child.stdout.take() {
                let _ = s.read_to_string(&mut out);
            }
            if let Some(mut s) = self.child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            panic!("the shim exited ({status}) while waiting for {waiting_for}\n{out}\n{err}");
        }
    }
}

/// Starts `host-shim serve --listen 127.0.0.1:0 ARGS` and waits (up to
/// 10 s) until its ready file says where it listens: the daemon and that
/// address (no port picked here that another process could take first).
pub fn serve(args: &[&str]) -> (Shim, String) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    let ready = std::env::temp_dir().join(format!(
        "host-shim-ready-{}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&ready);
    let mut all = vec!["serve", "--listen", "127.0.0.1:0", "--ready-file"];
    all.push(ready.to_str().unwrap());
    all.extend_from_slice(args);
    let mut shim = Shim::start(&all);
    let give_up = Instant::now() + Duration::from_secs(10);
    let listen = loop {
        shim.assert_running("the daemon's ready file");
        let doc = std::fs::read(&ready)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        if let Some(doc) = doc {
            break doc["listen"]
                .as_str()
                .unwrap_or_else(|| panic!("no listen address in the ready file: {doc}"))
                .to_owned();
        }
        assert!(Instant::now() < give_up, "the daemon was not ready in 10 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = std::fs::remove_file(&ready);
    (shim, listen)
}

/// `redis-cli -p PORT ARGS...`, killed after 30 s: whether it succeeded
/// (and connected), and what it printed.
pub fn redis_cli(port: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .args(["30", "redis-cli", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("spawn timeout redis-cli");
    // `timeout` says 127 when it cannot find the command.
    assert_ne!(
        out.status.code(),
        Some(127),
        "this test needs redis-cli (apt-get install redis-tools)"
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = out.status.success() && !text.starts_with("Could not connect");
    (ok, text)
}

/// Waits (up to 30 s) until `redis-cli PING` on `port` answers PONG, while
/// `shim` (what serves it, when given) keeps running; how long it took.
/// `what` names what answers, for the failure.
pub fn wait_for_pong(port: u16, mut shim: Option<&mut Shim>, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        if let Some(s) = shim.as_deref_mut() {
            s.assert_running(what);
        }
        let (ok, out) = redis_cli(port, &["PING"]);
        if ok && out.trim() == "PONG" {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: no PONG on port {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SETs every `(key, value)` with `redis-cli --pipe` (the whole batch is sent
/// before any reply is read) and returns redis-cli's report after checking
/// it saw one reply per key and no error.
pub fn redis_pipe_set(port: u16, pairs: impl IntoIterator<Item = (String, String)>) -> String {
    use std::io::Write;
    let mut batch = String::new();
    let mut count = 0;
    for (k, v) in pairs {
        batch.push_str(&format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
            k.len(),
            v.len()
        ));
        count += 1;
    }
    let mut pipe = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli is installed (apt-get install redis-tools)");
    pipe.stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    let out = pipe.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && report.contains(&format!("errors: 0, replies: {count}")),
        "redis-cli --pipe: {report}"
    );
    report
}

/// A minimal Redis-protocol client.
pub struct Redis {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Redis {
    pub fn connect(port: u16) -> std::io::Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(Self {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    /// How long a reply may take before [`Self::reply`] fails.
    pub fn set_read_timeout(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.w.set_read_timeout(Some(timeout))
    }

    /// Connects once the app answers PING (it may be booting).
    pub fn when_up(port: u16) -> Self {
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = Redis::connect(port) {
                if c.cmd(&["PING"]).ok().as_deref() == Some("PONG") {
                    return c;
                }
            }
            assert!(Instant::now() < give_up, "kv on port {port} never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn send(&mut self, args: &[&str]) -> std::io::Result<()> {
        let mut b = format!("*{}\r\n", args.len());
        for a in args {
            b.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.w.write_all(b.as_bytes())
    }

    /// One reply: simple strings, integers and bulk strings as text; nil as "(nil)".
    pub fn reply(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end().to_owned();
        match line.as_bytes().first() {
            Some(b'+') | Some(b':') => Ok(line[1..].to_owned()),
            Some(b'-') => Ok(format!("ERR {}", &line[1..])),
            Some(b'$') => {
                let n: i64 = line[1..].parse().unwrap();
                if n < 0 {
                    return Ok("(nil)".into());
                }
                let mut buf = vec![0u8; n as usize + 2];
                self.r.read_exact(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n as usize]).into_owned())
            }
            _ => Ok(line),
        }
    }

    pub fn cmd(&mut self, args: &[&str]) -> std::io::Result<String> {
        self.send(args)?;
        self.reply()
    }

    /// SETs `n` keys in pipelined batches.
    pub fn fill(&mut self, n: usize) {
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            for i in chunk {
                self.send(&["SET", &format!("key:{i}"), &format!("value-{i}")])
                    .unwrap();
            }
            for _ in chunk {
                assert_eq!(self.reply().unwrap(), "OK");
            }
        }
    }

    /// Checks that all `n` keys hold their values (pipelined).
    pub fn check(&mut self, n: usize) {
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            for i in chunk {
                self.send(&["GET", &format!("key:{i}")]).unwrap();
            }
            for i in chunk {
                assert_eq!(self.reply().unwrap(), format!("value-{i}"), "key:{i}");
            }
        }
    }

    /// The `host` field of INFO.
    pub fn host(&mut self) -> String {
        let info = self.cmd(&["INFO", "server"]).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("host:"))
            .unwrap_or("?")
            .trim()
            .to_owned()
    }
}

/// CPU time (user + system) of process `pid` so far, in clock ticks
/// (`getconf CLK_TCK`: 100 on Linux), from `/proc/PID/stat`.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The fields after the command name (which may hold spaces) in
    // parentheses: utime and stime are fields 14 and 15 of stat, 12 and 13
    // after ")".
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The share of one core that the monitor process `host-shim run` started
/// (its child: QEMU, Firecracker) used over `period`.
pub fn monitor_cpu_share(shim_pid: u32, period: Duration) -> f64 {
    let children = std::fs::read_to_string(format!("/proc/{shim_pid}/task/{shim_pid}/children"))
        .expect("the shim's children");
    let monitor: u32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the shim {shim_pid} started no monitor process"));
    let before = cpu_ticks(monitor);
    let start = Instant::now();
    std::thread::sleep(period);
    let used = cpu_ticks(monitor) - before;
    used as f64 / 100.0 / start.elapsed().as_secs_f64()
}

/// Waits (up to 30 s) until process `pid` uses no CPU for `quiet` (what
/// it was doing, e.g. a guest handling a closed connection, is done);
/// `what` names what it was doing, for the failure.
pub fn cpu_quiet(pid: u32, quiet: Duration, what: &str) {
    until_steady(
        quiet,
        &format!("process {pid}'s CPU ticks after {what}"),
        || (cpu_ticks(pid), true),
    );
}

/// Waits (up to 30 s) until `count` reads the same twice, `every` apart,
/// while also saying it may stop (its second value): a counter that
/// stopped moving. `what` names the counter, for the failure.
pub fn until_steady(every: Duration, what: &str, mut count: impl FnMut() -> (u64, bool)) {
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut last = count().0;
    loop {
        std::thread::sleep(every);
        let (now, may_stop) = count();
        if now == last && may_stop {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "{what} still moving after 30 s ({last} -> {now} in the last {every:?})"
        );
        last = now;
    }
}

/// What the bytes of a kv checkpoint file hold: the store their latest
/// chain (the last full checkpoint and the deltas after it) restores to,
/// restored by kv's own code, and the sequence number of the chain's last
/// blob (0: the full checkpoint alone). An error when there is no sound
/// full checkpoint (a torn last delta is ignored, as a restore ignores it).
pub fn kv_checkpoint(bytes: &[u8]) -> Result<(u64, kv_core::store::Store), String> {
    let chain = abi::checkpoint::latest_chain(bytes).map_err(|e| e.to_string())?;
    let deltas = chain
        .deltas
        .iter()
        .map(|d| postcard::from_bytes::<kv_core::checkpoint::KvDelta>(d.payload))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("a delta of kv does not decode: {e}"))?;
    let mut store = kv_core::store::Store::new();
    kv_core::checkpoint::restore(
        &mut store,
        Vec::from(chain.base.payload),
        deltas,
        kv_core::Instant::from_nanos(0),
    )
    .map_err(|e| e.to_string())?;
    Ok((chain.deltas.last().map_or(0, |d| d.seq), store))
}

/// Waits (up to 60 s) until the kv checkpoint file at `path` holds a
/// checkpoint in which every `(key, value)` of `want` holds (`None`: the
/// key is absent): the writes that made it so, and every write kv
/// acknowledged before them, are stored. A checkpoint taken before the
/// call counts (kv takes none while nothing changes). `alive` runs each
/// round, to fail at once when the writer died. Returns the bytes that
/// held it and the sequence number of their chain's last blob.
pub fn wait_kv_checkpoint(
    path: &Path,
    want: &[(&str, Option<&str>)],
    mut alive: impl FnMut(),
) -> (Vec<u8>, u64) {
    let give_up = Instant::now() + Duration::from_secs(60);
    let now = kv_core::Instant::from_nanos(0);
    loop {
        alive();
        let bytes = std::fs::read(path).map_err(|e| e.to_string());
        let seen = bytes.as_deref().map_err(Clone::clone).and_then(|b| {
            let (seq, mut store) = kv_checkpoint(b)?;
            let holds = want.iter().all(|(key, value)| {
                let found = store.get(key.as_bytes(), now).map(|e| e.value.to_vec());
                found.as_deref() == value.map(str::as_bytes)
            });
            Ok((seq, holds))
        });
        if let (Ok(bytes), Ok((seq, true))) = (&bytes, &seen) {
            return (bytes.clone(), *seq);
        }
        assert!(
            Instant::now() < give_up,
            "no checkpoint holding {want:?} in {} within 60 s (last seen: {seen:?}: \
             (sequence number, holds))",
            path.display(),
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Firecracker binary named by `$FIRECRACKER`, or `None` (after saying
/// the test was skipped and why) when the variable is unset. A set variable
/// that names no file fails the test.
pub fn firecracker() -> Option<PathBuf> {
    let Some(path) = std::env::var_os("FIRECRACKER") else {
        eprintln!(
            "skipped: FIRECRACKER is not set (point it to a Firecracker binary, \
             e.g. ../shared/bin/firecracker, to run this test)"
        );
        return None;
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "FIRECRACKER={} does not name a file",
        path.display()
    );
    require_kvm();
    Some(path)
}
