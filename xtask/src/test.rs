//! `cargo xtask lint` and `cargo xtask test`: the checks CI runs.
//!
//! Host crates (the workspace's default members) build and test natively; guest crates build
//! only for the guest target, so they are linted with `--target` and exercised through the
//! images the host integration tests boot (found via `LIBCLOUD_IMAGES`).

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::ErrorKind;

use anyhow::{Context, Result};

use crate::image::{self, Profile};
use crate::setup;
use crate::workspace::{self, Workspace, GUEST_TARGET};

/// Environment variable telling the integration tests where the images are.
pub const IMAGES_ENV: &str = "LIBCLOUD_IMAGES";

/// rustfmt over everything, clippy over host and guest crates, warnings denied.
pub fn lint(ws: &Workspace) -> Result<()> {
    workspace::run(ws.cargo().args(["fmt", "--all", "--check"]))
        .context("formatting check failed: run `cargo fmt --all`")?;
    // Host crates: no `-p`, so cargo takes the default members.
    workspace::run(
        ws.cargo()
            .args(["clippy", "--all-targets", "--", "-D", "warnings"]),
    )?;
    let mut guest = ws.cargo();
    guest.args(["clippy", "--target", GUEST_TARGET]);
    for pkg in &ws.guest_packages {
        guest.args(["-p", pkg]);
    }
    workspace::run(guest.args(["--", "-D", "warnings"]))?;
    if !ws.std_packages.is_empty() {
        image::check_rust_src(ws)?;
        let mut std = image::std_cargo(ws, "clippy");
        for pkg in &ws.std_packages {
            std.args(["-p", pkg]);
        }
        workspace::run(std.args(["--", "-D", "warnings"]))?;
    }
    // The fuzz package is a workspace of its own.
    workspace::run(&mut crate::fuzz::cargo_in_fuzz(ws, ["fmt", "--check"]))
        .context("formatting check failed: run `cargo fmt` in fuzz/")?;
    workspace::run(&mut crate::fuzz::cargo_in_fuzz(
        ws,
        ["clippy", "--all-targets", "--", "-D", "warnings"],
    ))
}

/// Set up the machine ([`setup::ensure`]), lint (unless `no_lint`), build every image in
/// release, then `cargo test` over the host crates with `LIBCLOUD_IMAGES` set. `cargo_args`
/// go to `cargo test` as they are.
pub fn test(ws: &Workspace, no_lint: bool, cargo_args: &[OsString]) -> Result<()> {
    setup::ensure(setup::TEST_TOOLS)?;
    image::check_guest_target(ws)?;
    if !no_lint {
        lint(ws)?;
    }
    let apps: Vec<_> = ws.apps.iter().collect();
    image::build_images(ws, &apps, Profile::Release)?;

    warn_without_kvm();
    let images = ws.images_dir();
    workspace::run(
        ws.cargo()
            .arg("test")
            .args(cargo_args)
            .env(IMAGES_ENV, &images),
    )?;
    // Every fuzz target, briefly, over its corpus and mutated inputs (no libFuzzer needed).
    workspace::run(&mut crate::fuzz::cargo_in_fuzz(ws, ["test"]))
}

/// The KVM tests fail without a usable /dev/kvm; say so up front rather than leave the reader
/// to infer it from the failures.
fn warn_without_kvm() {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => eprintln!(
            "warning: /dev/kvm is absent, so the tests that boot images under KVM will fail. \
             Run them on a host with KVM (or nested virtualisation) enabled."
        ),
        Err(e) => eprintln!(
            "warning: cannot open /dev/kvm ({e}), so the tests that boot images under KVM \
             will fail. Check its permissions (the kvm group)."
        ),
    }
}
