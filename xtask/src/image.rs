//! Builds: guest images (an app's linked ELF, copied to `<target>/images/<app>.img`) and the
//! release host shim that boots them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::workspace::{self, App, Workspace, GUEST_TARGET, SHIM_PACKAGE, STD_TARGET};

/// Cargo profile for guest builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    pub fn from_debug_flag(debug: bool) -> Self {
        if debug {
            Self::Debug
        } else {
            Self::Release
        }
    }

    /// Name of the profile's output directory under `<target>/<triple>/`.
    fn dir(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }
}

/// A built image.
#[derive(Debug)]
pub struct Image {
    pub app: String,
    pub path: PathBuf,
    pub size: u64,
}

/// Builds the given apps (libcloud apps for the guest target, std apps for the Hermit target,
/// one cargo invocation per kind) and copies each linked ELF to its image path.
pub fn build_images(ws: &Workspace, apps: &[&App], profile: Profile) -> Result<Vec<Image>> {
    if apps.is_empty() {
        bail!("no apps to build (no packages under apps/)");
    }
    let (std_apps, guest_apps): (Vec<&App>, Vec<&App>) = apps.iter().partition(|a| a.std);
    if !guest_apps.is_empty() {
        check_guest_target(ws)?;
        let mut cmd = ws.cargo();
        cmd.args(["build", "--target", GUEST_TARGET]);
        cargo_build(cmd, &guest_apps, profile).context("building guest image(s)")?;
    }
    if !std_apps.is_empty() {
        check_rust_src(ws)?;
        cargo_build(std_cargo(ws, "build"), &std_apps, profile)
            .context("building std app image(s)")?;
    }

    let images_dir = ws.images_dir();
    fs::create_dir_all(&images_dir)
        .with_context(|| format!("creating {}", images_dir.display()))?;
    apps.iter()
        .map(|app| {
            let target = if app.std { STD_TARGET } else { GUEST_TARGET };
            let out_dir = ws.target_dir.join(target).join(profile.dir());
            let path = ws.image_path(app);
            let size = install(&out_dir.join(&app.bin), &path)?;
            Ok(Image {
                app: app.package.clone(),
                path,
                size,
            })
        })
        .collect()
}

fn cargo_build(mut cmd: Command, apps: &[&App], profile: Profile) -> Result<()> {
    for app in apps {
        cmd.args(["-p", &app.package]);
    }
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    workspace::run(&mut cmd)
}

/// `cargo SUBCOMMAND` for [`STD_TARGET`]: std and its runtime built from the toolchain's
/// rust-src (`-Zbuild-std`, allowed on stable through `RUSTC_BOOTSTRAP`), with
/// compiler-builtins' `memcpy` family (the Hermit target expects the kernel to provide them).
pub fn std_cargo(ws: &Workspace, subcommand: &str) -> Command {
    let mut cmd = ws.cargo();
    cmd.arg(subcommand).env("RUSTC_BOOTSTRAP", "1").args([
        "-Zbuild-std=std,panic_abort",
        "-Zbuild-std-features=compiler-builtins-mem",
        "--target",
        STD_TARGET,
    ]);
    cmd
}

/// Builds one app's image.
pub fn build_image(ws: &Workspace, app: &App, profile: Profile) -> Result<Image> {
    let mut images = build_images(ws, &[app], profile)?;
    Ok(images.remove(0))
}

/// Prints `<app>: <size>` for each image, then the image paths, one per line, so the last line
/// of output is a path (`$(cargo xtask build-image hello | tail -n1)`).
pub fn print_images(images: &[Image]) {
    for image in images {
        println!("{}: {}", image.app, kib(image.size));
    }
    for image in images {
        println!("{}", image.path.display());
    }
}

/// Builds the release host shim and returns the path of its binary.
pub fn build_shim(ws: &Workspace) -> Result<PathBuf> {
    crate::setup::ensure(crate::setup::BUILD_TOOLS)?;
    workspace::run(ws.cargo().args(["build", "--release", "-p", SHIM_PACKAGE]))
        .context("building the host shim")?;
    Ok(ws.shim_path())
}

/// `1234` bytes -> `"1.2 KiB"`.
pub fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

/// Copies `src` to `dst` through a temporary file and a rename, so that a shim reading `dst`
/// never sees a half-written image. Returns the size in bytes.
fn install(src: &Path, dst: &Path) -> Result<u64> {
    let tmp = dst.with_extension("img.tmp");
    fs::copy(src, &tmp)
        .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    fs::rename(&tmp, dst).with_context(|| format!("renaming to {}", dst.display()))?;
    Ok(fs::metadata(dst)?.len())
}

/// Makes sure the guest target's standard library is installed: adds it with rustup when
/// rustup is there (the first build on a fresh machine), else fails with the fix.
pub fn check_guest_target(ws: &Workspace) -> Result<()> {
    ensure_in_sysroot(
        ws,
        &format!("lib/rustlib/{GUEST_TARGET}"),
        &["target", "add", GUEST_TARGET],
        &format!("the Rust target {GUEST_TARGET}"),
    )
}

/// Makes sure the toolchain's `rust-src` component (std's source, for `-Zbuild-std`) is
/// installed: adds it with rustup when rustup is there, else fails with the fix.
pub fn check_rust_src(ws: &Workspace) -> Result<()> {
    ensure_in_sysroot(
        ws,
        "lib/rustlib/src/rust/library/std",
        &["component", "add", "rust-src"],
        "the rust-src component (std apps are built with -Zbuild-std)",
    )
}

/// Runs `rustup ARGS` unless `path` exists in the toolchain's sysroot; `what` names it in
/// the messages.
fn ensure_in_sysroot(ws: &Workspace, path: &str, rustup: &[&str], what: &str) -> Result<()> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc)
        .args(["--print", "sysroot"])
        .current_dir(&ws.root)
        .output()
    else {
        return Ok(()); // let cargo report whatever is wrong with rustc
    };
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(path);
    if !out.status.success() || dir.is_dir() {
        return Ok(());
    }
    eprintln!(
        "xtask: {what} is missing; adding it with `rustup {}`",
        rustup.join(" ")
    );
    let added = Command::new("rustup")
        .args(rustup)
        .current_dir(&ws.root)
        .status();
    match added {
        Ok(status) if status.success() => Ok(()),
        _ => bail!(
            "{what} is not installed (no {}) and rustup could not add it: run `rustup {}`",
            dir.display(),
            rustup.join(" ")
        ),
    }
}
