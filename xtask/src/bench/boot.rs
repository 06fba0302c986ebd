//! `cargo xtask bench boot`: boot time and memory of the `hello` image under our shim, under
//! Firecracker (when `$FIRECRACKER` names its binary) and under QEMU microvm (KVM and TCG),
//! measured side by side in one run.
//!
//! Each run spawns the monitor with stdout piped and records the time from spawn to the first
//! complete stdout line that is the guest's (not a monitor's own log line) and to process
//! exit, and the child's
//! peak RSS from `wait4`'s rusage. Runs of the configurations are interleaved so that drift in
//! the machine's load affects them alike. A configuration that fails (QEMU missing, a backend
//! erroring, a guest hanging past the timeout) is reported as failed with the reason and
//! skipped from then on; the others go on.
//!
//! Then the `kv` image with a published port under each monitor: the monitor's idle CPU once
//! kv answers, and the GET latency of `redis-benchmark -c 1`.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::{self, Profile};
use crate::workspace::{self, Workspace};

/// The app whose image is booted.
const BENCH_APP: &str = "hello";
/// QEMU binary, looked up on `PATH`.
const QEMU: &str = "qemu-system-x86_64";
/// The environment variable naming the Firecracker binary.
const FIRECRACKER_ENV: &str = "FIRECRACKER";

/// Options of `bench boot`.
#[derive(Debug)]
pub struct BootOptions {
    pub runs: usize,
    pub timeout: Duration,
}

/// How a monitor's exit status says "the guest exited 0".
#[derive(Debug, Clone, Copy)]
enum ExitConvention {
    /// Status 0 is success.
    Plain,
    /// QEMU `isa-debug-exit`: guest code c becomes status (c << 1) | 1, so 1 means guest exit 0.
    IsaDebugExit,
    /// No exit device (Firecracker): status 0 after the guest's serial exit line
    /// (`abi::exit::SERIAL_EXIT_PREFIX`) with status 0.
    SerialExitLine,
}

impl ExitConvention {
    fn check(self, status: ExitStatus, stdout: &[u8]) -> Result<(), String> {
        let Some(code) = status.code() else {
            return Err(format!("killed by signal {}", status.signal().unwrap_or(0)));
        };
        match self {
            Self::SerialExitLine if code != 0 => Err(format!("exit status {code}")),
            Self::SerialExitLine => {
                let text = String::from_utf8_lossy(stdout);
                match text.lines().rev().find_map(abi::exit::parse_serial_exit) {
                    Some((_, 0)) => Ok(()),
                    Some((_, c)) => Err(format!("guest exit code {c}")),
                    None => Err("exit status 0 without the guest's exit line".into()),
                }
            }
            Self::Plain if code == 0 => Ok(()),
            Self::Plain => Err(format!("exit status {code}")),
            Self::IsaDebugExit if code == 1 => Ok(()),
            Self::IsaDebugExit if code == 0 => Err(
                "exit status 0: the guest did not exit through isa-debug-exit \
                 (shutdown or triple fault?)"
                    .into(),
            ),
            Self::IsaDebugExit if code % 2 == 1 => {
                Err(format!("guest exit code {} (status {code})", code >> 1))
            }
            Self::IsaDebugExit => Err(format!("exit status {code}")),
        }
    }
}

/// One configuration under test.
struct Config {
    name: &'static str,
    program: OsString,
    args: Vec<OsString>,
    exit: ExitConvention,
    samples: Vec<Sample>,
    failure: Option<String>,
}

impl Config {
    fn new(name: &'static str, program: impl Into<OsString>, exit: ExitConvention) -> Self {
        Self {
            name,
            program: program.into(),
            args: Vec::new(),
            exit,
            samples: Vec::new(),
            failure: None,
        }
    }

    fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        cmd
    }

    /// Runs once and records a sample, or marks the configuration failed.
    fn run_once(&mut self, timeout: Duration) {
        let sample = run(self.command(), timeout)
            .map_err(|e| format!("{e:#}"))
            .and_then(|outcome| outcome.sample(self.exit));
        match sample {
            Ok(sample) => self.samples.push(sample),
            Err(reason) => self.failure = Some(reason),
        }
    }
}

/// What one successful run measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    first_line: Duration,
    exit: Duration,
    max_rss_kib: u64,
}

/// What happened in one run.
struct Outcome {
    first_line: Option<Duration>,
    exit: Duration,
    status: ExitStatus,
    max_rss_kib: u64,
    timed_out: Option<Duration>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Outcome {
    /// The sample if the run succeeded, else why not, with the last lines of stdout and stderr.
    fn sample(&self, exit: ExitConvention) -> Result<Sample, String> {
        let verdict = if let Some(limit) = self.timed_out {
            Err(format!("timed out after {limit:?}"))
        } else {
            exit.check(self.status, &self.stdout).and_then(|()| {
                self.first_line
                    .ok_or_else(|| "no complete line on stdout".to_owned())
            })
        };
        verdict
            .map(|first_line| Sample {
                first_line,
                exit: self.exit,
                max_rss_kib: self.max_rss_kib,
            })
            .map_err(|mut reason| {
                for (stream, buf) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
                    if let Some(line) = last_line(buf) {
                        reason += &format!("; {stream}: {line}");
                    }
                }
                reason
            })
    }

    /// Lines of stdout and stderr.
    fn lines(&self) -> impl Iterator<Item = String> + '_ {
        [&self.stdout, &self.stderr].into_iter().flat_map(|buf| {
            String::from_utf8_lossy(buf)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
    }
}

/// Runs `cmd` with stdin closed and stdout/stderr captured, killing it after `timeout`.
fn run(mut cmd: Command, timeout: Duration) -> Result<Outcome> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = workspace::display(&cmd);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;

    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let stdout_reader = thread::spawn(move || {
        let (mut buf, mut chunk, mut first_line) = (Vec::new(), [0u8; 4096], None);
        while let Ok(n @ 1..) = stdout.read(&mut chunk) {
            let seen = buf.len();
            buf.extend_from_slice(&chunk[..n]);
            if first_line.is_none() && has_guest_line(&buf, seen) {
                first_line = Some(start.elapsed());
            }
        }
        (buf, first_line)
    });
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let stderr_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });

    // The watchdog kills the child at the deadline unless told that it has exited. Waiting with
    // WNOWAIT keeps the exited child a zombie until the watchdog is done, so the kill can never
    // hit a recycled pid.
    let (exited_tx, exited_rx) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = exited_rx.recv_timeout(timeout) {
            // SAFETY: plain syscall; `pid` is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    wait_exited(pid)?;
    let exit = start.elapsed();
    let _ = exited_tx.send(());
    let timed_out = watchdog.join().expect("watchdog thread panicked");
    let (status, max_rss_kib) = reap(pid)?;

    let (stdout, first_line) = stdout_reader.join().expect("stdout reader panicked");
    let stderr = stderr_reader.join().expect("stderr reader panicked");
    Ok(Outcome {
        first_line,
        exit,
        status,
        max_rss_kib,
        timed_out: timed_out.then_some(timeout),
        stdout,
        stderr,
    })
}

/// Whether `buf` holds a complete line ending at or after `from` that is not a monitor's own
/// log line (Firecracker prints one, `... [anonymous-instance:main] Running Firecracker ...`,
/// before the guest starts).
fn has_guest_line(buf: &[u8], from: usize) -> bool {
    let mut start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' {
            let line = &buf[start..i];
            let monitor_log = line
                .windows(b" [anonymous-instance:".len())
                .any(|w| w == b" [anonymous-instance:");
            if i >= from && !monitor_log {
                return true;
            }
            start = i + 1;
        }
    }
    false
}

/// Blocks until child `pid` has exited, without reaping it.
fn wait_exited(pid: libc::pid_t) -> Result<()> {
    loop {
        // SAFETY: all-zero bytes are a valid `siginfo_t` (plain integers).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let id = libc::id_t::try_from(pid).context("pid out of range")?;
        // SAFETY: `info` is a valid out-pointer; waitid only writes to it.
        let rc = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("waitid");
        }
    }
}

/// Reaps child `pid`: its exit status and peak RSS in KiB.
fn reap(pid: libc::pid_t) -> Result<(ExitStatus, u64)> {
    let mut status = 0;
    // SAFETY: all-zero bytes are a valid `rusage` (plain integers).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `usage` and `status` are valid out-pointers; wait4 only writes to them.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            let max_rss = u64::try_from(usage.ru_maxrss).unwrap_or(0);
            return Ok((ExitStatus::from_raw(status), max_rss));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4");
        }
    }
}

/// `cargo xtask bench boot`.
pub fn boot(ws: &Workspace, opts: &BootOptions) -> Result<()> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let app = ws.app(BENCH_APP)?;
    let image = image::build_image(ws, app, Profile::Release)?;
    let shim = image::build_shim(ws)?;
    let img = image.path.as_os_str();

    let qemu = |name, machine: &str, accel: &str, cpu: &str| {
        Config::new(name, QEMU, ExitConvention::IsaDebugExit)
            .args(["-M", machine, "-accel", accel, "-cpu", cpu])
            .args([
                "-m",
                "64M",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
            ])
            .args(["-serial", "stdio", "-no-reboot", "-kernel"])
            .args([img])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
    };
    let mut configs = vec![Config::new("host-shim (KVM)", &shim, ExitConvention::Plain)
        .args([OsString::from("run"), img.into()])];
    match std::env::var_os(FIRECRACKER_ENV).filter(|p| !p.is_empty()) {
        Some(firecracker) => {
            let cfg = ws.target_dir.join("bench-boot-firecracker.json");
            let log = ws.target_dir.join("bench-boot-firecracker.log");
            std::fs::write(&log, b"").with_context(|| format!("cannot write {}", log.display()))?;
            let json = serde_json::json!({
                "boot-source": { "kernel_image_path": image.path, "boot_args": "lc.host=bench" },
                "drives": [],
                "machine-config": { "vcpu_count": 1, "mem_size_mib": 64 },
                "logger": { "log_path": log, "level": "Warning" },
            });
            std::fs::write(&cfg, json.to_string())
                .with_context(|| format!("cannot write {}", cfg.display()))?;
            configs.push(
                Config::new("Firecracker", firecracker, ExitConvention::SerialExitLine).args([
                    OsString::from("--no-api"),
                    "--config-file".into(),
                    cfg.into(),
                ]),
            );
        }
        None => eprintln!(
            "bench boot: Firecracker skipped: ${FIRECRACKER_ENV} is not set (point it to a \
             Firecracker binary, e.g. ../shared/bin/firecracker)"
        ),
    }
    configs.push(qemu(
        "QEMU microvm, KVM",
        "microvm,acpi=off",
        "kvm",
        "host,-arch-capabilities",
    ));
    // QEMU's documented fast-boot microvm: no option ROMs, no PIT, PIC or RTC (the guest keeps
    // time with kvmclock and takes interrupts through the IO-APIC). KVM only: under TCG there
    // is no kvmclock and the guest calibrates its TSC against the PIT.
    configs.push(qemu(
        "QEMU microvm fast-boot, KVM",
        "microvm,acpi=off,x-option-roms=off,pit=off,pic=off,rtc=off",
        "kvm",
        "host,-arch-capabilities",
    ));
    configs.push(qemu("QEMU microvm, TCG", "microvm,acpi=off", "tcg", "max"));

    for run in 1..=opts.runs {
        eprintln!("bench boot: run {run}/{}", opts.runs);
        for config in configs.iter_mut().filter(|c| c.failure.is_none()) {
            config.run_once(opts.timeout);
            if let Some(reason) = &config.failure {
                eprintln!("bench boot: {} failed: {reason}", config.name);
            }
        }
    }

    print_report(&configs, &image, opts);

    println!();
    println!("Guest ring-3 integer loop (`host-shim run {BENCH_APP}.img -- --bench`):");
    println!();
    let mut cmd = Command::new(&shim);
    cmd.arg("run").arg(img).args(["--", "--bench"]);
    match run(cmd, opts.timeout) {
        Ok(outcome) => {
            let lines: Vec<_> = outcome
                .lines()
                .filter(|l| l.starts_with("bench:"))
                .collect();
            for line in &lines {
                println!("    {line}");
            }
            if let Err(reason) = outcome.sample(ExitConvention::Plain) {
                println!("    (run failed: {reason})");
            } else if lines.is_empty() {
                println!("    (the guest printed no `bench:` lines)");
            }
        }
        Err(e) => println!("    (could not run: {e:#})"),
    }

    idle_and_latency(ws, &shim, opts)?;

    if let Some(reason) = &configs[0].failure {
        bail!("host-shim failed to boot {BENCH_APP}: {reason}");
    }
    Ok(())
}

/// How long the idle monitor's CPU time is measured.
const IDLE_PERIOD: Duration = Duration::from_secs(3);

/// CPU time (utime + stime) of process `pid` so far, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    // The fields after the command name (in parentheses): utime, stime are the 12th and 13th.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .context("stat format")?;
    let fields: Vec<&str> = after.split(' ').collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("field {i} of /proc/{pid}/stat"))
    };
    Ok(field(11)? + field(12)?)
}

/// Idle CPU and request latency of kv under each monitor: `host-shim run kv.img --backend B
/// --publish`, once kv answers PING the monitor process's CPU ticks over [`IDLE_PERIOD`] (our
/// shim's own process; QEMU's or Firecracker's for those backends), then `redis-benchmark -n
/// 2000 -c 1 -t get` (GET p50 and requests/s); medians of `opts.runs`.
fn idle_and_latency(ws: &Workspace, shim: &Path, opts: &BootOptions) -> Result<()> {
    let kv = image::build_image(ws, ws.app("kv")?, Profile::Release)?;
    let mut monitors: Vec<(&str, Vec<&str>)> = vec![
        ("host-shim (KVM)", vec![]),
        (
            "QEMU microvm, KVM",
            vec!["--backend", "qemu", "--qemu-accel", "kvm"],
        ),
        (
            "QEMU microvm, TCG",
            vec!["--backend", "qemu", "--qemu-accel", "tcg"],
        ),
    ];
    if std::env::var_os(FIRECRACKER_ENV).is_some_and(|p| !p.is_empty()) {
        monitors.insert(1, ("Firecracker", vec!["--backend", "firecracker"]));
    }
    println!();
    println!(
        "### Idle and latency: `kv.img` with a published port, medians of {} runs",
        opts.runs
    );
    println!();
    println!(
        "| monitor | idle CPU over {} s | GET p50 (`-c 1`) | GET req/s |",
        IDLE_PERIOD.as_secs()
    );
    println!("|---|---:|---:|---:|");
    for (name, args) in monitors {
        let (mut ticks, mut p50, mut rps) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..opts.runs {
            let port = super::free_port()?;
            let mut cmd = Command::new(shim);
            cmd.arg("run").arg(&kv.path).args(&args);
            cmd.args(["--timeout", "120", "--publish"]);
            cmd.arg(format!("127.0.0.1:{port}:6379"));
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            let mut child = super::Guard(cmd.spawn().context("starting host-shim run")?);
            let up = Instant::now();
            while !crate::resp::ping(port) {
                if let Some(status) = child.0.try_wait()? {
                    bail!("{name}: kv exited with {status} before answering");
                }
                if up.elapsed() > opts.timeout.max(Duration::from_secs(60)) {
                    bail!("{name}: kv did not answer PING within {:?}", up.elapsed());
                }
                thread::sleep(Duration::from_millis(5));
            }
            // Our shim is the monitor; for the other backends, its one child is.
            let pid = child.0.id();
            let monitor = if args.is_empty() {
                pid
            } else {
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse().ok())
                    .with_context(|| format!("{name}: the shim started no monitor process"))?
            };
            let before = cpu_ticks(monitor)?;
            thread::sleep(IDLE_PERIOD);
            ticks.push((cpu_ticks(monitor)? - before) as f64);
            let out = Command::new("redis-benchmark")
                .args([
                    "-p",
                    &port.to_string(),
                    "-n",
                    "2000",
                    "-c",
                    "1",
                    "-t",
                    "get",
                    "--csv",
                ])
                .output()
                .context("running redis-benchmark (apt-get install redis-tools)")?;
            let text = String::from_utf8_lossy(&out.stdout);
            let (r, p) = get_figures(&text).with_context(|| format!("{name}: {text}"))?;
            rps.push(r);
            p50.push(p);
        }
        let t = super::median(ticks);
        let share = t / 100.0 / IDLE_PERIOD.as_secs_f64() * 100.0;
        println!(
            "| {name} | {t:.0} tick{} ({share:.1} % of a core) | {:.3} ms | {:.0} |",
            if t == 1.0 { "" } else { "s" },
            super::median(p50),
            super::median(rps)
        );
    }
    println!();
    println!(
        "Idle CPU: utime + stime of the monitor process (clock ticks of 10 ms) from /proc once kv \
         answers PING."
    );
    Ok(())
}

/// GET requests/s and p50 ms from `redis-benchmark --csv` output (header
/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...`).
fn get_figures(csv: &str) -> Result<(f64, f64)> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .context("no CSV header")?
        .split(',')
        .map(|f| f.trim_matches('"'))
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (rps, p50) = (
        column("rps").context("no rps column")?,
        column("p50_latency_ms").context("no p50_latency_ms column")?,
    );
    let row: Vec<&str> = lines
        .find(|l| l.starts_with("\"GET"))
        .context("no GET row")?
        .split(',')
        .map(|f| f.trim_matches('"'))
        .collect();
    let number = |i: usize| -> Result<f64> {
        row.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("column {i} of the GET row is not a number"))
    };
    Ok((number(rps)?, number(p50)?))
}

/// Prints the results as markdown: a table, the commands, and our ratio to the fastest QEMU.
fn print_report(configs: &[Config], image: &image::Image, opts: &BootOptions) {
    println!(
        "### Boot: `{BENCH_APP}.img` ({}), {} runs per configuration",
        image::kib(image.size),
        opts.runs
    );
    println!();
    println!("| configuration | first console line, ms | exit, ms | peak RSS, MiB | runs |");
    println!("|---|---:|---:|---:|---:|");
    for config in configs {
        let summary = Summary::of(&config.samples);
        match (&config.failure, summary) {
            (Some(reason), _) => println!(
                "| {} | failed: {} | | | {} ok |",
                config.name,
                reason.replace('|', "\\|"),
                config.samples.len()
            ),
            (None, Some(s)) => println!(
                "| {} | {} | {} | {:.1} | {} |",
                config.name,
                s.first_line,
                s.exit,
                s.max_rss_mib,
                config.samples.len()
            ),
            (None, None) => println!("| {} | no runs | | | 0 |", config.name),
        }
    }
    println!();
    println!(
        "Medians, with min–max in parentheses. Times from spawn to the first complete line on \
         stdout and to process exit; peak RSS from `wait4` (median over runs)."
    );
    println!();
    for config in configs {
        let cmd = workspace::display(&config.command());
        println!("- {}: `{}`", config.name, shorten(&cmd, image));
    }

    let ok = |c: &&Config| c.failure.is_none() && !c.samples.is_empty();
    let Some(ours) = configs.first().filter(ok) else {
        return;
    };
    let fastest_qemu = configs[1..]
        .iter()
        .filter(|c| c.name.starts_with("QEMU"))
        .filter(ok)
        .min_by(|a, b| median_of(a, |s| s.first_line).total_cmp(&median_of(b, |s| s.first_line)));
    println!();
    match fastest_qemu {
        Some(q) => println!(
            "host-shim vs the fastest QEMU ({}): first console line {:.2}× ({:.1} ms vs {:.1} ms), \
             exit {:.2}× ({:.1} ms vs {:.1} ms).",
            q.name,
            median_of(ours, |s| s.first_line) / median_of(q, |s| s.first_line),
            median_of(ours, |s| s.first_line),
            median_of(q, |s| s.first_line),
            median_of(ours, |s| s.exit) / median_of(q, |s| s.exit),
            median_of(ours, |s| s.exit),
            median_of(q, |s| s.exit),
        ),
        None => println!("No QEMU configuration succeeded: no ratio."),
    }
}

/// Replaces the image's absolute path by its file name, to keep printed commands short.
fn shorten(command: &str, image: &image::Image) -> String {
    let name = image.path.file_name().map(Path::new).unwrap_or(&image.path);
    command.replace(&*image.path.to_string_lossy(), &name.to_string_lossy())
}

/// Per-configuration summary, formatted for the table.
struct Summary {
    first_line: String,
    exit: String,
    max_rss_mib: f64,
}

impl Summary {
    fn of(samples: &[Sample]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let ms = |f: fn(&Sample) -> Duration| {
            let v = sorted_ms(samples, f);
            format!(
                "{:.1} ({:.1}–{:.1})",
                super::median(v.clone()),
                v[0],
                v[v.len() - 1]
            )
        };
        let mut rss: Vec<f64> = samples
            .iter()
            .map(|s| s.max_rss_kib as f64 / 1024.0)
            .collect();
        rss.sort_by(f64::total_cmp);
        Some(Self {
            first_line: ms(|s| s.first_line),
            exit: ms(|s| s.exit),
            max_rss_mib: super::median(rss.clone()),
        })
    }
}

/// Median in ms of one timing of a configuration's samples.
fn median_of(config: &Config, f: fn(&Sample) -> Duration) -> f64 {
    super::median(sorted_ms(&config.samples, f))
}

/// One timing of each sample, in ms, sorted.
fn sorted_ms(samples: &[Sample], f: fn(&Sample) -> Duration) -> Vec<f64> {
    let mut v: Vec<f64> = samples.iter().map(|s| f(s).as_secs_f64() * 1e3).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Last non-empty line of a buffer, trimmed and capped at 200 characters.
fn last_line(buf: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(buf);
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    Some(line.chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn measures_first_line_exit_and_rss() {
        let outcome = run(
            sh("echo first; sleep 0.2; echo second"),
            Duration::from_secs(10),
        )
        .unwrap();
        let sample = outcome.sample(ExitConvention::Plain).unwrap();
        assert!(sample.first_line < Duration::from_millis(150), "{sample:?}");
        assert!(sample.exit >= Duration::from_millis(200), "{sample:?}");
        assert!(sample.max_rss_kib > 0);
        assert_eq!(outcome.stdout, b"first\nsecond\n");
    }

    #[test]
    fn kills_at_the_timeout() {
        let started = Instant::now();
        let outcome = run(sh("echo up; exec sleep 30"), Duration::from_millis(300)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        let reason = outcome.sample(ExitConvention::Plain).unwrap_err();
        assert!(reason.contains("timed out"), "{reason}");
    }

    #[test]
    fn reports_failures_with_stderr() {
        let outcome = run(sh("echo oops >&2; exit 3"), Duration::from_secs(10)).unwrap();
        let reason = outcome.sample(ExitConvention::Plain).unwrap_err();
        assert_eq!(reason, "exit status 3; stderr: oops");
        assert!(run(Command::new("/nonexistent/monitor"), Duration::from_secs(1)).is_err());
    }

    #[test]
    fn isa_debug_exit_convention() {
        let status = |code: i32| ExitStatus::from_raw(code << 8);
        assert!(ExitConvention::IsaDebugExit.check(status(1), b"").is_ok());
        assert!(ExitConvention::IsaDebugExit.check(status(0), b"").is_err());
        let err = ExitConvention::IsaDebugExit
            .check(status(5), b"")
            .unwrap_err();
        assert!(err.starts_with("guest exit code 2"), "{err}");
        assert!(ExitConvention::Plain.check(status(0), b"").is_ok());
        assert!(ExitConvention::Plain.check(status(1), b"").is_err());
    }

    #[test]
    fn serial_exit_line_convention() {
        let status = |code: i32| ExitStatus::from_raw(code << 8);
        let c = ExitConvention::SerialExitLine;
        assert!(c.check(status(0), b"Hello\nlibcloud-exit: 0\n").is_ok());
        assert!(c.check(status(0), b"Hello\n").is_err());
        let err = c.check(status(0), b"libcloud-exit: 101\n").unwrap_err();
        assert_eq!(err, "guest exit code 101");
        assert!(c.check(status(1), b"libcloud-exit: 0\n").is_err());
    }

    #[test]
    fn monitor_log_lines_are_not_the_first_console_line() {
        let fc = b"2026-12-07T01:40:47.5 [anonymous-instance:main] Running Firecracker v1.16.1\n";
        assert!(!has_guest_line(fc, 0));
        let both = [&fc[..], b"Hello\n"].concat();
        assert!(has_guest_line(&both, fc.len()));
        assert!(!has_guest_line(b"Hello", 0));
    }
}
