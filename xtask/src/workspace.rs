//! The workspace as xtask sees it: where it lives, where cargo puts its output, which packages are
//! apps and which are guest crates, and a helper to run child commands with clear errors.
//!
//! Everything comes from `cargo metadata --no-deps`, so the target directory honours
//! `CARGO_TARGET_DIR` and `build.target-dir`, and the package lists follow the workspace's
//! `members` / `default-members` instead of being written down twice.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The target triple every guest crate is built for.
pub const GUEST_TARGET: &str = "x86_64-unknown-none";

/// The target of std apps (`[package.metadata.libcloud] std = true`): Rust's std for the
/// Hermit ABI, which `hermit-abi-impl` provides on our kernel.
pub const STD_TARGET: &str = "x86_64-unknown-hermit";

/// The host-side package that boots images.
pub const SHIM_PACKAGE: &str = "host-shim";

/// A guest application: a workspace package under `apps/`.
#[derive(Debug, Clone)]
pub struct App {
    /// Cargo package name (what `-p` takes).
    pub package: String,
    /// Name of its binary target, i.e. of the linked ELF in the target directory.
    pub bin: String,
    /// An ordinary std program, built for [`STD_TARGET`] with build-std.
    pub std: bool,
}

#[derive(Debug)]
pub struct Workspace {
    /// Workspace root (directory of the top-level `Cargo.toml`).
    pub root: PathBuf,
    /// Cargo's target directory (absolute).
    pub target_dir: PathBuf,
    /// Apps, sorted by package name.
    pub apps: Vec<App>,
    /// Packages that build only for [`GUEST_TARGET`]: workspace members that are not
    /// default members (kernel, libcloud, net, the apps, ...), sorted.
    pub guest_packages: Vec<String>,
    /// Guest packages built for [`STD_TARGET`] instead (std apps and the Hermit ABI layer:
    /// `[package.metadata.libcloud] std = true`), sorted.
    pub std_packages: Vec<String>,
}

impl Workspace {
    /// Loads the workspace xtask belongs to.
    pub fn load() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let out = Command::new(cargo_bin())
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(&root)
            .output()
            .context("running `cargo metadata`")?;
        if !out.status.success() {
            bail!(
                "`cargo metadata` failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let meta: Value =
            serde_json::from_slice(&out.stdout).context("parsing `cargo metadata` output")?;
        Self::from_metadata(root, &meta)
    }

    fn from_metadata(root: PathBuf, meta: &Value) -> Result<Self> {
        let str_of = |v: &Value, what: &str| -> Result<String> {
            v.as_str()
                .map(str::to_owned)
                .with_context(|| format!("`cargo metadata`: missing {what}"))
        };
        let ids = |key: &str| -> Result<Vec<String>> {
            meta[key]
                .as_array()
                .with_context(|| format!("`cargo metadata`: missing {key}"))?
                .iter()
                .map(|v| str_of(v, key))
                .collect()
        };
        let target_dir = PathBuf::from(str_of(&meta["target_directory"], "target_directory")?);
        let default_members = ids("workspace_default_members")?;
        let apps_dir = root.join("apps");

        let mut apps = Vec::new();
        let mut guest_packages = Vec::new();
        let mut std_packages = Vec::new();
        for pkg in meta["packages"].as_array().into_iter().flatten() {
            let id = str_of(&pkg["id"], "package id")?;
            let name = str_of(&pkg["name"], "package name")?;
            let std = pkg["metadata"]["libcloud"]["std"].as_bool() == Some(true);
            if std {
                std_packages.push(name.clone());
            } else if !default_members.contains(&id) {
                guest_packages.push(name.clone());
            }
            let manifest = PathBuf::from(str_of(&pkg["manifest_path"], "manifest_path")?);
            let in_apps = manifest
                .parent()
                .and_then(Path::parent)
                .is_some_and(|dir| dir == apps_dir);
            if !in_apps {
                continue;
            }
            let bin = pkg["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| {
                    t["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "bin"))
                })
                .map(|t| str_of(&t["name"], "target name"))
                .transpose()?
                .with_context(|| format!("app `{name}` has no binary target"))?;
            apps.push(App {
                package: name,
                bin,
                std,
            });
        }
        apps.sort_by(|a, b| a.package.cmp(&b.package));
        guest_packages.sort();
        std_packages.sort();
        Ok(Self {
            root,
            target_dir,
            apps,
            guest_packages,
            std_packages,
        })
    }

    /// Looks an app up by package name; the error lists the known apps.
    pub fn app(&self, name: &str) -> Result<&App> {
        self.apps
            .iter()
            .find(|a| a.package == name)
            .with_context(|| {
                format!(
                    "unknown app `{name}`; known apps (packages under apps/): {}",
                    self.app_names().join(", ")
                )
            })
    }

    pub fn app_names(&self) -> Vec<&str> {
        self.apps.iter().map(|a| a.package.as_str()).collect()
    }

    /// Directory holding the built images (`<target>/images`).
    pub fn images_dir(&self) -> PathBuf {
        self.target_dir.join("images")
    }

    /// Path of an app's image.
    pub fn image_path(&self, app: &App) -> PathBuf {
        self.images_dir().join(format!("{}.img", app.package))
    }

    /// Path of the release host-shim binary.
    pub fn shim_path(&self) -> PathBuf {
        self.target_dir.join("release").join(SHIM_PACKAGE)
    }

    /// A `cargo` command running in the workspace root.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new(cargo_bin());
        cmd.current_dir(&self.root);
        cmd
    }
}

/// The cargo that runs xtask (`$CARGO`), so nested builds use the same toolchain.
fn cargo_bin() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Runs a command to completion, echoing it to stderr first; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// A command line as a shell-like string, for messages.
pub fn display(cmd: &Command) -> String {
    // Programs in the workspace relative to it; others (like `$CARGO`) by name only.
    let path = Path::new(cmd.get_program());
    let shown = pretty(path);
    let program = if shown != path {
        shown.as_os_str()
    } else {
        path.file_name().unwrap_or(path.as_os_str())
    };
    let program = program.to_string_lossy().into_owned();
    std::iter::once(program)
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A path relative to the current directory when it lies below it, else unchanged.
pub fn pretty(path: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_this_workspace() {
        let ws = Workspace::load().unwrap();
        assert!(ws.root.join("Cargo.toml").is_file());
        assert!(ws.target_dir.is_absolute());
        assert!(ws.app_names().contains(&"hello"), "{:?}", ws.apps);
        assert!(ws.guest_packages.iter().any(|p| p == "kernel"));
        assert!(!ws
            .guest_packages
            .iter()
            .any(|p| p == SHIM_PACKAGE || p == "xtask"));
        assert!(ws.app("std-echo").unwrap().std);
        assert!(!ws.app("hello").unwrap().std);
        assert!(ws.std_packages.iter().any(|p| p == "hermit-abi-impl"));
        assert!(!ws.guest_packages.iter().any(|p| p == "std-echo"));
        let err = ws.app("no-such-app").unwrap_err().to_string();
        assert!(err.contains("hello"), "{err}");
    }
}
