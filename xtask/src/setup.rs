//! What `cargo xtask test` needs from the machine, and getting it there.
//!
//! The tests drive real clients and reference monitors (QEMU, redis-cli, curl, Chromium, ...).
//! Before building anything, [`ensure`] looks each one up on `PATH`; whatever is missing is
//! installed with one `apt-get` line when we run as root on Debian or Ubuntu (saying what and
//! why), and otherwise the run stops with the exact command to type. The Rust side (clippy,
//! rustfmt) is added with rustup the same way.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::workspace;

/// What the machine must have: a program the tests run, or a file the build reads; the
/// Debian package that ships it, and what it is for.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub need: Need,
    pub package: &'static str,
    pub why: &'static str,
}

/// A program (looked up on `PATH`) or a file (by its absolute path).
#[derive(Debug, Clone, Copy)]
pub enum Need {
    Program(&'static str),
    File(&'static str),
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Need::Program(name) | Need::File(name) => f.write_str(name),
        }
    }
}

/// What building the host shim needs besides cargo: the etcd client crate compiles etcd's
/// gRPC protocol with protoc in its build script.
pub const BUILD_TOOLS: &[Tool] = &[PROTOC, PROTOBUF_TYPES];

const PROTOC: Tool = Tool {
    need: Need::Program("protoc"),
    package: "protobuf-compiler",
    why: "building the host shim (the etcd client crate compiles etcd's protocol with it)",
};

/// protoc's well-known types, which etcd's protocol imports (only a
/// recommendation of `protobuf-compiler`, so not there on a bare machine).
const PROTOBUF_TYPES: Tool = Tool {
    need: Need::File("/usr/include/google/protobuf/descriptor.proto"),
    package: "libprotobuf-dev",
    why: "building the host shim (etcd's protocol imports protobuf's well-known types)",
};

/// Everything `cargo xtask test` runs besides cargo.
pub const TEST_TOOLS: &[Tool] = &[
    PROTOC,
    PROTOBUF_TYPES,
    Tool {
        need: Need::Program("qemu-system-x86_64"),
        package: "qemu-system-x86",
        why: "the same images under QEMU microvm (boot, checkpoints)",
    },
    Tool {
        need: Need::Program("redis-cli"),
        package: "redis-tools",
        why: "a real Redis client for the kv app",
    },
    Tool {
        need: Need::Program("redis-benchmark"),
        package: "redis-tools",
        why: "load on kv during migrations",
    },
    Tool {
        need: Need::Program("curl"),
        package: "curl",
        why: "a real HTTP client for the http app",
    },
    Tool {
        need: Need::Program("ip"),
        package: "iproute2",
        why: "TAP devices in network namespaces",
    },
    Tool {
        need: Need::Program("kill"),
        package: "procps",
        why: "crash-recovery tests (kill -9 of a daemon)",
    },
    Tool {
        need: Need::Program("etcd"),
        package: "etcd-server",
        why: "a real etcd for the fleet store (tests/etcd_fleet.rs)",
    },
    Tool {
        need: Need::Program("etcdctl"),
        package: "etcd-client",
        why: "a second, real etcd client in the fleet store tests",
    },
    Tool {
        need: Need::Program("chromium"),
        package: "chromium",
        why: "the demo dashboard in a headless browser",
    },
];

impl Tool {
    fn present(&self) -> bool {
        match self.need {
            Need::Program(name) => find_on_path(name).is_some(),
            Need::File(path) => Path::new(path).is_file(),
        }
    }
}

/// Makes sure every tool in `tools` and the Rust components the lint needs are present,
/// installing what is missing when that is possible here, else failing with the command.
pub fn ensure(tools: &[Tool]) -> Result<()> {
    ensure_rust_components()?;
    let missing: Vec<Tool> = tools.iter().copied().filter(|t| !t.present()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    packages.sort_unstable();
    packages.dedup();
    let apt = format!(
        "apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    );
    for t in &missing {
        eprintln!("xtask: {} is missing ({}: {})", t.need, t.package, t.why);
    }
    if !is_debian() {
        bail!(
            "install {} with your package manager (on Debian or Ubuntu: `{apt}`), then run again",
            packages.join(", ")
        );
    }
    if !is_root() {
        bail!(
            "run `sudo apt-get update && sudo {apt}` (or run this command as root), then run again"
        );
    }
    eprintln!("xtask: installing {} with apt-get", packages.join(" "));
    workspace::run(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    workspace::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still: Vec<String> = missing
        .iter()
        .filter(|t| !t.present())
        .map(|t| t.need.to_string())
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get installed {} but {} is still missing",
            packages.join(" "),
            still.join(", ")
        );
    }
    Ok(())
}

/// clippy and rustfmt, which `cargo xtask lint` runs.
fn ensure_rust_components() -> Result<()> {
    let works = |sub: &str| {
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([sub, "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = [("clippy", "clippy"), ("fmt", "rustfmt")]
        .into_iter()
        .filter(|(sub, _)| !works(sub))
        .map(|(_, component)| component)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if find_on_path("rustup").is_none() {
        bail!(
            "the Rust components {} are missing and rustup is not installed to add them",
            missing.join(", ")
        );
    }
    eprintln!(
        "xtask: adding the Rust components {} with rustup",
        missing.join(" ")
    );
    workspace::run(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )
    .context("rustup could not add the components")
}

/// The first executable file named `bin` on `PATH`.
pub fn find_on_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists() && find_on_path("apt-get").is_some()
}

/// Effective uid 0, read from /proc (no unsafe needed).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_on_path_and_not_others() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("no-such-program-xtask").is_none());
    }

    #[test]
    fn a_program_is_looked_up_on_path_and_a_file_by_its_path() {
        let tool = |need| Tool {
            need,
            package: "p",
            why: "w",
        };
        assert!(tool(Need::Program("sh")).present());
        assert!(!tool(Need::Program("no-such-program-xtask")).present());
        assert!(tool(Need::File("/proc/self/status")).present());
        assert!(!tool(Need::File("/no/such/file.proto")).present());
        assert_eq!(Need::File("/a/b.proto").to_string(), "/a/b.proto");
    }

    #[test]
    fn every_tool_names_a_package_and_a_reason() {
        for t in TEST_TOOLS {
            assert!(!t.package.is_empty() && !t.why.is_empty(), "{t:?}");
        }
    }
}
