//! The user's CLI on "another machine" against a fleet store
//! (`host-shim --store URL ...`): a fresh process with no fleet file or
//! daemon address of its own.

use super::daemon::{TempDir, BIN};
use super::text;
use std::process::{Child, Command, Output, Stdio};

/// `host-shim --store URL ARGS`.
pub fn cli(store: &str, args: &[&str]) -> Output {
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

/// [`cli`], which must succeed; its stdout.
pub fn ok(store: &str, args: &[&str]) -> String {
    let out = cli(store, args);
    assert!(out.status.success(), "host-shim {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `host-shim --store URL schedule APP --policy cost ...` as replica
/// `name` (leader TTL 2 s), its output in `dir/NAME.out`.
pub fn scheduler(
    url: &str,
    app: &str,
    name: &str,
    prices: &std::path::Path,
    dir: &TempDir,
) -> Child {
    let out = std::fs::File::create(dir.path(&format!("{name}.out"))).unwrap();
    Command::new(BIN)
        .args(["--store", url, "schedule", app, "--policy", "cost"])
        .args(["--threshold", "0.01", "--interval", "300ms"])
        .args(["--prices", prices.to_str().unwrap()])
        .args(["--replica", name, "--leader-ttl", "2s"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn host-shim schedule")
}
