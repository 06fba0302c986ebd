//! `cargo xtask fuzz`: builds the fuzz targets of `fuzz/` with coverage instrumentation and
//! AddressSanitizer and runs them under libFuzzer, then reports executions, coverage and
//! crashes per target.
//!
//! No cargo-fuzz and no nightly toolchain: the stable compiler takes the sanitizer flags with
//! `RUSTC_BOOTSTRAP=1`, and `libfuzzer-sys` builds libFuzzer itself (it needs a C++ compiler).
//! Fuzzing reads the committed seeds in `fuzz/corpus/<target>/` and keeps what it finds in
//! `<target dir>/fuzz/corpus/<target>/`; crashes go to `<target dir>/fuzz/artifacts/<target>/`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::workspace::{self, Workspace};

/// The host triple: given explicitly so build scripts and proc macros are not instrumented.
const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// AddressSanitizer's options for fuzzing, unless `ASAN_OPTIONS` is set.
const ASAN_OPTIONS: &str = "detect_stack_use_after_return=0";

/// What to fuzz and how.
pub struct FuzzOptions {
    /// Targets to fuzz (empty with `run`: none).
    pub targets: Vec<String>,
    /// Seconds per target (at most, with `runs`).
    pub time: u64,
    /// Executions after which a target stops (libFuzzer's `-runs`).
    pub runs: Option<u64>,
    /// Parallel libFuzzer jobs per target (`-fork`).
    pub jobs: usize,
    /// Inputs to run once each instead of fuzzing (a crash's reproducer).
    pub run: Vec<PathBuf>,
}

/// The fuzz package's directory.
fn fuzz_dir(ws: &Workspace) -> PathBuf {
    ws.root.join("fuzz")
}

/// `cargo ARGS` on the fuzz package as an ordinary crate (its smoke tests, lints), sharing the
/// workspace's target directory.
pub fn cargo_in_fuzz<const N: usize>(ws: &Workspace, args: [&str; N]) -> Command {
    let mut cmd = ws.cargo();
    cmd.current_dir(fuzz_dir(ws))
        .args(args)
        .env("CARGO_TARGET_DIR", &ws.target_dir);
    cmd
}

/// The targets, from `fuzz/fuzz_targets/*.rs`, sorted.
pub fn targets(ws: &Workspace) -> Result<Vec<String>> {
    let dir = fuzz_dir(ws).join("fuzz_targets");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem() {
                names.push(stem.to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// `--list`: each target with the first line of its module's documentation.
pub fn list(ws: &Workspace) -> Result<()> {
    for name in targets(ws)? {
        let doc = std::fs::read_to_string(fuzz_dir(ws).join("src").join(format!("{name}.rs")))
            .unwrap_or_default();
        let summary = doc
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("//! "))
            .map(|l| l.split_once(": ").map_or(l, |(_, rest)| rest))
            .unwrap_or("");
        println!("{name:<18} {summary}");
    }
    Ok(())
}

/// `--seed`: rewrites the committed seed corpora from the real encoders.
pub fn seed(ws: &Workspace) -> Result<()> {
    workspace::run(
        cargo_in_fuzz(ws, ["run", "--quiet", "--bin", "write-corpus", "--"])
            .arg(fuzz_dir(ws).join("corpus")),
    )
}

/// What one libFuzzer run reported.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub execs: u64,
    /// Coverage: edges (`cov:`) and features (`ft:`).
    pub cov: u64,
    pub ft: u64,
    /// Inputs in the corpus at the end.
    pub corpus: u64,
    /// The reproducer of a crash, if libFuzzer found one.
    pub crash: Option<PathBuf>,
}

impl Stats {
    /// Takes in one line of libFuzzer's output.
    fn update(&mut self, line: &str) {
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units: ") {
            self.execs = v.trim().parse().unwrap_or(self.execs);
        } else if let Some(path) = line
            .split_once("Test unit written to ")
            .map(|(_, path)| path.trim())
        {
            self.crash = Some(PathBuf::from(path));
        } else if line.starts_with('#') && line.contains("cov: ") {
            // `#4096	pulse  cov: 812 ft: 2100 corp: 96/9Kb exec/s: 2048 rss: 60Mb`, or in fork
            // mode `#4096: cov: 812 ft: 2100 corp: 96 exec/s: 2048 ...`.
            let mut words = line.split_whitespace();
            if let Some(n) = words
                .next()
                .map(|w| w.trim_matches(|c| c == '#' || c == ':'))
            {
                self.execs = n.parse().unwrap_or(self.execs);
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            for pair in fields.windows(2) {
                let value = || -> Option<u64> { pair[1].split('/').next()?.parse().ok() };
                match pair[0] {
                    "cov:" => self.cov = value().unwrap_or(self.cov),
                    "ft:" => self.ft = value().unwrap_or(self.ft),
                    "corp:" => self.corpus = value().unwrap_or(self.corpus),
                    _ => {}
                }
            }
        }
    }
}

/// Says what is missing to build the fuzz targets, and how to install it.
fn check_tools() -> Result<()> {
    let cxx = std::env::var_os("CXX").unwrap_or_else(|| "c++".into());
    let found = Command::new(&cxx)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        bail!(
            "no C++ compiler ({}): libfuzzer-sys compiles libFuzzer with it. Install one \
             (`apt-get install g++`) or name it in CXX",
            cxx.to_string_lossy()
        );
    }
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running `rustc --print sysroot`")?;
    let runtime = Path::new(String::from_utf8_lossy(&sysroot.stdout).trim())
        .join("lib/rustlib")
        .join(HOST_TARGET)
        .join("lib");
    let has_asan = std::fs::read_dir(&runtime)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("rt.asan"))
        })
        .unwrap_or(false);
    if !has_asan {
        bail!(
            "the toolchain has no AddressSanitizer runtime in {}: fuzzing needs the \
             {HOST_TARGET} standard library (`rustup target add {HOST_TARGET}`)",
            runtime.display()
        );
    }
    Ok(())
}

/// Builds the instrumented binaries of `targets` and returns the directory holding them.
fn build(ws: &Workspace, targets: &[String]) -> Result<PathBuf> {
    check_tools()?;
    let target_dir = ws.target_dir.join("fuzz");
    let rustflags = [
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        "-Zsanitizer=address",
        "-Cdebug-assertions",
        "-Coverflow-checks",
        "-Cforce-frame-pointers",
        "--cfg=fuzzing",
    ]
    .join(" ");
    let mut cmd = ws.cargo();
    cmd.args([
        "build",
        "--release",
        "--features",
        "libfuzzer",
        "--manifest-path",
    ])
    .arg(fuzz_dir(ws).join("Cargo.toml"))
    .args(["--target", HOST_TARGET, "--target-dir"])
    .arg(&target_dir)
    .env("RUSTC_BOOTSTRAP", "1")
    .env("RUSTFLAGS", rustflags);
    for t in targets {
        cmd.args(["--bin", t]);
    }
    workspace::run(&mut cmd).context("building the fuzz targets")?;
    Ok(target_dir.join(HOST_TARGET).join("release"))
}

/// `cargo xtask fuzz`: fuzzes each target in turn (or runs the given inputs once), prints a
/// table, fails if anything crashed.
pub fn fuzz(ws: &Workspace, opts: &FuzzOptions) -> Result<()> {
    let known = targets(ws)?;
    for t in &opts.targets {
        if !known.contains(t) {
            bail!("unknown fuzz target `{t}`; known: {}", known.join(", "));
        }
    }
    let bin_dir = build(ws, &opts.targets)?;
    if !opts.run.is_empty() {
        let target = &opts.targets[0];
        return workspace::run(
            Command::new(bin_dir.join(target))
                .arg("-runs=1")
                .args(&opts.run),
        );
    }
    let mut results = Vec::new();
    for t in &opts.targets {
        let started = std::time::Instant::now();
        let stats = run_target(ws, &bin_dir.join(t), t, opts)?;
        results.push((t.clone(), started.elapsed().as_secs(), stats));
    }
    println!();
    println!("| target | time (s) | executions | exec/s | cov | ft | corpus | crash |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for (t, secs, s) in &results {
        // libFuzzer names the input after what happened: crash-, timeout-, oom-, leak-...
        let crash = s.crash.as_deref().map_or("none".to_owned(), |p| {
            let kind = p
                .file_name()
                .and_then(|n| n.to_str()?.split_once('-'))
                .map_or("crash", |(kind, _)| kind);
            format!("{kind}: {}", workspace::pretty(p).display())
        });
        // Executions over the whole run's time: in fork mode libFuzzer's
        // own `exec/s` is one job's rate, not the run's.
        println!(
            "| {t} | {} | {} | {} | {} | {} | {} | {crash} |",
            secs,
            s.execs,
            s.execs / secs.max(&1),
            s.cov,
            s.ft,
            s.corpus
        );
    }
    let crashed: Vec<&str> = results
        .iter()
        .filter(|(_, _, s)| s.crash.is_some())
        .map(|(t, _, _)| t.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "crashes in {}: reproduce with `cargo xtask fuzz TARGET --run FILE`",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// Runs libFuzzer on one target for `opts.time` seconds; its output goes to a log file, the
/// periodic status lines also to stderr.
fn run_target(ws: &Workspace, bin: &Path, target: &str, opts: &FuzzOptions) -> Result<Stats> {
    let out = ws.target_dir.join("fuzz");
    let corpus = out.join("corpus").join(target);
    let artifacts = out.join("artifacts").join(target);
    let logs = out.join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let mut log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut prefix = OsString::from("-artifact_prefix=");
    prefix.push(&artifacts);
    prefix.push("/");
    let mut cmd = Command::new(bin);
    if std::env::var_os("ASAN_OPTIONS").is_none() {
        // ASan's fake stacks for use-after-return (on by default) cost up to half of every
        // execution; safe Rust cannot return a dangling stack reference.
        cmd.env("ASAN_OPTIONS", ASAN_OPTIONS);
    }
    cmd.arg(format!("-max_total_time={}", opts.time))
        .arg("-print_final_stats=1")
        // Generous: the host is shared, and a stalled process is not a hang of the target.
        .args(["-timeout=60", "-rss_limit_mb=2048"])
        .arg(prefix);
    if opts.jobs > 1 {
        cmd.arg(format!("-fork={}", opts.jobs));
    }
    if let Some(runs) = opts.runs {
        cmd.arg(format!("-runs={runs}"));
    }
    cmd.arg(&corpus)
        .arg(fuzz_dir(ws).join("corpus").join(target))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    eprintln!("$ {}", workspace::display(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {}", bin.display()))?;
    let mut stats = Stats::default();
    let stderr = child.stderr.take().context("libFuzzer's stderr")?;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading libFuzzer's output")?;
        writeln!(log, "{line}").context("writing the fuzz log")?;
        stats.update(&line);
        let status = line.contains("pulse") || line.contains("DONE") || line.contains("INITED");
        if status || line.contains("ERROR") || line.contains("Test unit written") {
            eprintln!("{target}: {line}");
        }
    }
    let status = child.wait().context("waiting for libFuzzer")?;
    if !status.success() && stats.crash.is_none() {
        bail!(
            "{target}: libFuzzer failed ({status}) without a crash input; see {}",
            log_path.display()
        );
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_from_libfuzzer_output() {
        let mut s = Stats::default();
        for line in [
            "#2\tINITED cov: 100 ft: 120 corp: 3/9Kb exec/s: 0 rss: 40Mb",
            "#65536\tpulse  cov: 812 ft: 2100 corp: 96/9Kb lim: 4096 exec/s: 21845 rss: 60Mb",
            "#70000\tDONE   cov: 813 ft: 2105 corp: 97/9Kb lim: 4096 exec/s: 23333 rss: 61Mb",
            "stat::number_of_executed_units: 70001",
            "stat::average_exec_per_sec:     23333",
        ] {
            s.update(line);
        }
        assert_eq!(
            s,
            Stats {
                execs: 70001,
                cov: 813,
                ft: 2105,
                corpus: 97,
                crash: None,
            }
        );
        s.update("artifact_prefix='a/'; Test unit written to a/crash-0123");
        assert_eq!(s.crash.as_deref(), Some(Path::new("a/crash-0123")));
    }

    #[test]
    fn every_target_is_found() {
        let ws = Workspace::load().unwrap();
        let names = targets(&ws).unwrap();
        for t in [
            "virtio_net",
            "doorbell",
            "elf_loader",
            "snapshot",
            "overlay",
            "migration_events",
            "fleet_store",
        ] {
            assert!(names.iter().any(|n| n == t), "{names:?}");
        }
    }
}
