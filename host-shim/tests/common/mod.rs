//! Shared helpers of the integration tests: where the images are, a check
//! that `/dev/kvm` exists (tests fail loudly without it, never pass), and a
//! runner for the real `host-shim` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
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
