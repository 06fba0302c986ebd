//! Shared helpers of the integration tests: where the images are, a check
//! that `/dev/kvm` exists (tests fail loudly without it, never pass), and a
//! runner for the real `host-shim` binary.
#![allow(dead_code)]

pub mod daemon;

use std::io::Read;
use std::net::TcpListener;
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

/// Fails the test unless `/dev/kvm` can be opened.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test boots a real guest and needs /dev/kvm, which cannot be opened: {e}");
    }
}

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

/// Boots `app` under KVM with a safety timeout, passing `app_args` after `--`.
pub fn boot(app: &str, shim_args: &[&str], app_args: &[&str]) -> Run {
    require_kvm();
    let img = image(app);
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "run".as_ref(),
        img.as_os_str(),
        "--timeout".as_ref(),
        "30".as_ref(),
    ];
    args.extend(shim_args.iter().map(|a| -> &std::ffi::OsStr { a.as_ref() }));
    args.push("--".as_ref());
    args.extend(app_args.iter().map(|a| -> &std::ffi::OsStr { a.as_ref() }));
    shim(args)
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
