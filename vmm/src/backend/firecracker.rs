//! The Firecracker backend: boots the same image through its PVH entry under
//! Firecracker (`--no-api`, its configuration on its stdin, its log on its
//! stderr), with the guest's serial console on our stdout. This module owns Firecracker's configuration, its TAP
//! device and the mapping of how it ended back to the app's exit status.
//!
//! Firecracker has no `isa-debug-exit`: the guest writes its status as the
//! last serial line (`abi::exit::SERIAL_EXIT_PREFIX`) and resets through the
//! i8042, which makes Firecracker exit 0. That line is not shown.
//!
//! Its network card needs a TAP device. With `--net tap=NAME` Firecracker
//! uses that device and the host configures its side. With the user-mode
//! network (`--net user`, `--publish`) Firecracker creates a TAP device for
//! the run (gone with it) and the shim makes its host side one more leg of
//! its own switch
//! ([`Tap::host_side`]), so the gateway, DHCP and published ports work as
//! with the other backends.
//!
//! App checkpoints (`--restore`, `--checkpoint-to`) travel over a vsock
//! connection the guest opens to host port `abi::checkpoint::VSOCK_PORT`;
//! Firecracker hands it to the shim's checkpoint port (`qemu_port`), with
//! the same protocol and "stored before acknowledged" meaning as under QEMU.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::qemu_port::CheckpointPort;
use crate::boot::loader;
use crate::config::RunConfig;
use crate::error::Error;
use crate::outcome::GuestExit;
use hostnet::tap::Tap;
use hostnet::{NetMode, Network, NetworkConfig};

/// The environment variable naming the Firecracker binary (when
/// `--firecracker` is not given).
pub const FIRECRACKER_ENV: &str = "FIRECRACKER";
/// The guest's vsock address (2 is the host).
const GUEST_CID: u32 = 3;
/// How often a running Firecracker is checked for exit and timeout.
const POLL: Duration = Duration::from_millis(2);
/// Longest console line kept whole; longer ones are passed on in pieces.
const MAX_LINE: u64 = 64 << 10;
/// Bytes of Firecracker's log quoted in an error.
const LOG_TAIL: u64 = 4 << 10;

/// Why Firecracker could not run the guest.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    #[error(
        "no Firecracker binary: pass --firecracker PATH or set ${FIRECRACKER_ENV} \
         (Firecracker is not in the package registries; see its releases)"
    )]
    NotConfigured,
    #[error("the Firecracker binary {path} cannot be used: {err}")]
    Missing { path: PathBuf, err: io::Error },
    #[error("cannot start Firecracker ({path}): {err}")]
    Spawn { path: PathBuf, err: io::Error },
    #[error("cannot wait for Firecracker: {0}")]
    Wait(io::Error),
    #[error("Firecracker failed (exit status {status}){log}")]
    Failed { status: i32, log: String },
    #[error("cannot connect the guest's network to Firecracker's TAP device: {err}{log}")]
    Network { err: String, log: String },
}

/// Firecracker's log as the tail of an error message.
fn log_suffix(log: &str) -> String {
    match log.trim() {
        "" => String::new(),
        log => format!(": {log}"),
    }
}

/// The Firecracker binary: `explicit` (`--firecracker`), else
/// `$FIRECRACKER`; it must be an executable file.
pub fn binary(explicit: Option<&Path>) -> Result<PathBuf, FirecrackerError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os(FIRECRACKER_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => return Err(FirecrackerError::NotConfigured),
        },
    };
    use std::os::unix::fs::PermissionsExt;
    let missing = |err| FirecrackerError::Missing {
        path: path.clone(),
        err,
    };
    let meta = std::fs::metadata(&path).map_err(missing)?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(missing(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an executable file",
        )));
    }
    Ok(path)
}

/// Firecracker's configuration file for `config`, its guest on the TAP
/// device `tap` if it has a network, with a vsock device on the unix
/// socket `vsock` if given, logging to `log`.
pub fn config_json(
    config: &RunConfig,
    tap: Option<&str>,
    vsock: Option<&Path>,
    log: &Path,
) -> serde_json::Value {
    let mut json = serde_json::json!({
        "boot-source": {
            "kernel_image_path": config.image,
            "boot_args": boot_args(&config.cmdline),
        },
        "drives": [],
        "machine-config": {
            "vcpu_count": 1,
            "mem_size_mib": config.mem_size >> 20,
        },
        "logger": { "log_path": log, "level": "Warning" },
    });
    if let (Some(tap), Some(net)) = (tap, &config.network) {
        let mut iface = serde_json::json!({ "iface_id": "net0", "host_dev_name": tap });
        if let Some(nic) = net.nics.first() {
            iface["guest_mac"] = crate::devices::virtio::net::fmt_mac(&nic.mac).into();
        }
        json["network-interfaces"] = serde_json::json!([iface]);
    }
    if let Some(uds) = vsock {
        json["vsock"] = serde_json::json!({ "guest_cid": GUEST_CID, "uds_path": uds });
    }
    json
}

/// The guest command line as Firecracker's boot arguments: Firecracker
/// adds its own parameters before ` -- `, or at the end if the line has no
/// ` -- ` (a trailing `--` with no arguments after it), where they would be
/// taken for the app's arguments; the trailing `--` is dropped.
fn boot_args(cmdline: &str) -> &str {
    match cmdline.strip_suffix(" --") {
        Some(line) if !cmdline.contains(" -- ") => line,
        _ => cmdline,
    }
}

/// A fresh TAP device name for one run (Firecracker creates the device and
/// it goes when Firecracker does, also if we are killed).
fn run_tap_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "lcfc{}.{}",
        std::process::id() % 10_000_000,
        NEXT.fetch_add(1, Ordering::Relaxed) % 100
    )
}

/// Boots `config.image` under Firecracker and waits for it to end.
pub fn run(config: &RunConfig) -> Result<GuestExit, Error> {
    loader::inspect(&config.image, config.mem_size)?;
    let firecracker = binary(config.firecracker.as_deref())?;
    // Checkpoints in and out: the port listens before the guest connects.
    let checkpoints = match config.restore.is_some() || config.checkpoint_to.is_some() {
        true => Some(checkpoint_port(config)?),
        false => None,
    };
    let vsock = checkpoints.as_ref().map(|(dir, _)| dir.0.join("vsock"));
    let (tap, user_net) = match &config.network {
        Some(net) => match &net.mode {
            NetMode::Tap(name) => (Some(name.clone()), None),
            _ => (Some(run_tap_name()), Some(net)),
        },
        None => (None, None),
    };
    // The configuration arrives on Firecracker's stdin and its log goes to
    // its stderr: no files to leave behind.
    let json = config_json(
        config,
        tap.as_deref(),
        vsock.as_deref(),
        Path::new("/proc/self/fd/2"),
    );
    let args: Vec<OsString> = ["--no-api", "--config-file", "/proc/self/fd/0"]
        .map(OsString::from)
        .into();
    tracing::info!(program = %firecracker.display(), ?args, "running Firecracker");
    let mut command = Command::new(&firecracker);
    // Firecracker dies with us (also on kill -9): a dead shim is a dead host.
    crate::sys::kill_with_parent(&mut command);
    let child = command
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| FirecrackerError::Spawn {
            path: firecracker.clone(),
            err,
        })?;
    let mut guard = KillOnDrop(Some(child));
    let child = guard.0.as_mut().expect("just set");
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(json.to_string().as_bytes())
            .map_err(|err| FirecrackerError::Spawn {
                path: firecracker.clone(),
                err,
            })?;
    }
    let stdout = child.stdout.take();
    let console = thread::spawn(move || stdout.map(forward_console).unwrap_or_default());
    let stderr = child.stderr.take();
    let errors = thread::spawn(move || stderr.map(keep_log).unwrap_or_default());
    let _network = match (user_net, &tap) {
        (Some(net), Some(tap)) => match user_network(child, net, tap) {
            Ok(network) => Some(network),
            Err(err) => {
                // Firecracker's own log says why its device went or never came.
                let _ = child.kill();
                let _ = child.wait();
                let log = errors.join().unwrap_or_default();
                return Err(FirecrackerError::Network {
                    err: err.to_string(),
                    log: log_suffix(&log),
                }
                .into());
            }
        },
        _ => None,
    };
    let child = guard.0.take().expect("still ours");
    let (mut dir, port) = match checkpoints {
        Some((dir, port)) => (Some(dir), Some(port)),
        None => (None, None),
    };
    // Once the guest is connected the sockets' directory can go: nothing
    // is left behind even if we are killed.
    let mut tidy = || {
        if port.as_ref().is_some_and(CheckpointPort::connected) {
            dir.take();
        }
    };
    let exit = wait(child, config.timeout, console, errors, &mut tidy);
    // The port's thread ends once Firecracker has closed its end.
    drop(port);
    exit
}

/// A private directory for Firecracker's vsock sockets and the checkpoint
/// port listening in it at `vsock_PORT` (where Firecracker connects the
/// guest's connection to host port `PORT`).
fn checkpoint_port(config: &RunConfig) -> Result<(RunDir, CheckpointPort), Error> {
    let dir = RunDir::create()?;
    let path = dir.0.join(format!("vsock_{}", abi::checkpoint::VSOCK_PORT));
    let port = CheckpointPort::listen_at(path, config)?;
    Ok((dir, port))
}

/// A private directory for one run's sockets; removed when dropped.
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> Result<Self, Error> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "host-shim-firecracker-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        shim_util::files::private_dir(&dir)
            .map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Self(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills Firecracker if we leave early (an error while wiring its network).
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How long Firecracker may take to create its TAP device.
const TAP_WAIT: Duration = Duration::from_secs(10);

/// Once Firecracker has made the TAP device `tap`, the user-mode network
/// with the device's host side as the guest's leg.
fn user_network(
    child: &mut std::process::Child,
    net: &NetworkConfig,
    tap: &str,
) -> Result<Network, Error> {
    let sysfs = Path::new("/sys/class/net").join(tap);
    let give_up = Instant::now() + TAP_WAIT;
    let leg = loop {
        let over = child.try_wait().map_err(FirecrackerError::Wait)?.is_some()
            || Instant::now() >= give_up;
        if sysfs.exists() {
            // No host addresses on it: the host stays out of the guest's frames.
            let ipv6 = format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6");
            if let Err(e) = std::fs::write(&ipv6, "1") {
                tracing::debug!(tap, error = %e, "cannot disable IPv6");
            }
            match Tap::host_side(tap) {
                Ok(leg) => break leg,
                Err(err) if over => return Err(err.into()),
                // The device can go between appearing and being set up (seen
                // once under load): asked again while Firecracker still runs.
                Err(err) => tracing::debug!(tap, error = %err, "TAP device not ready"),
            }
        } else if over {
            return Err(hostnet::NetError::Tap {
                name: tap.to_owned(),
                detail: "Firecracker did not create it".into(),
            }
            .into());
        }
        thread::sleep(Duration::from_millis(1));
    };
    Ok(Network::start_with_leg(net, leg)?)
}

/// Waits for Firecracker to end (or the timeout) and maps how it ended.
fn wait(
    mut child: std::process::Child,
    timeout: Option<Duration>,
    console: thread::JoinHandle<Option<u8>>,
    errors: thread::JoinHandle<String>,
    tick: &mut dyn FnMut(),
) -> Result<GuestExit, Error> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let status = loop {
        tick();
        if let Some(status) = child.try_wait().map_err(FirecrackerError::Wait)? {
            break status;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = console.join();
            let _ = errors.join();
            return Ok(GuestExit::TimedOut(timeout.unwrap_or_default()));
        }
        thread::sleep(POLL);
    };
    let exit_line = console.join().unwrap_or_default();
    let log = errors.join().unwrap_or_default();
    match (status.code(), exit_line) {
        (Some(0), Some(code)) => Ok(GuestExit::Exited(code)),
        (Some(0), None) => Ok(GuestExit::PoweredOff),
        (Some(s), _) => Err(FirecrackerError::Failed {
            status: s,
            log: log_suffix(&log),
        }
        .into()),
        (None, _) => Ok(GuestExit::Died(format!(
            "Firecracker was killed by signal {}",
            status.signal().unwrap_or(0)
        ))),
    }
}

/// Reads Firecracker's log to its end, keeping the last [`LOG_TAIL`] bytes
/// (for an error) and passing each line to our log at debug level.
fn keep_log(stderr: impl Read) -> String {
    let mut reader = BufReader::new(stderr);
    let mut tail = std::collections::VecDeque::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        tracing::debug!(line = %text, "firecracker");
        tail.push_back(text);
        while tail.iter().map(String::len).sum::<usize>() > LOG_TAIL as usize {
            tail.pop_front();
        }
    }
    Vec::from(tail).join("\n")
}

/// Copies the guest's console to our stdout, line by line, and returns the
/// status of its exit line if it wrote one (that line is not copied).
/// Firecracker's own start-up line (before its logger is set up) goes to
/// the log at debug level.
fn forward_console(stdout: impl Read) -> Option<u8> {
    let mut reader = BufReader::new(stdout);
    let mut out = io::stdout();
    let mut exit = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return exit,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let body = text.trim_end_matches(['\n', '\r']);
        if is_firecracker_log(body) {
            tracing::debug!(line = body, "firecracker");
            continue;
        }
        match abi::exit::parse_serial_exit(body) {
            Some((before, code)) => {
                exit = Some(code);
                if !before.is_empty() {
                    let _ = writeln!(out, "{before}");
                }
            }
            None => {
                exit = None; // the exit line is the last one
                let _ = out.write_all(&line);
            }
        }
        let _ = out.flush();
    }
}

/// Whether `line` is one of Firecracker's log lines
/// (`2026-12-07T01:40:47.535650024 [anonymous-instance:main] ...`).
fn is_firecracker_log(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 30
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[10] == b'T'
        && line.contains(" [anonymous-instance:")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backend;
    use crate::testutil::run_config;

    fn config() -> RunConfig {
        RunConfig {
            cmdline: "lc.host=h lc.region=r -- a".into(),
            ..run_config(Backend::Firecracker, "/img/kv.img".into())
        }
    }

    #[test]
    fn configuration_file() {
        use crate::config::{parse_publish, plan_network, NetOptions};
        let mut c = config();
        let json = config_json(&c, None, None, Path::new("/run/fc.log"));
        assert_eq!(json["boot-source"]["kernel_image_path"], "/img/kv.img");
        assert_eq!(
            json["boot-source"]["boot_args"],
            "lc.host=h lc.region=r -- a"
        );
        assert_eq!(json["machine-config"]["mem_size_mib"], 64);
        assert_eq!(json["logger"]["log_path"], "/run/fc.log");
        assert!(json.get("network-interfaces").is_none());
        let opts = NetOptions {
            publish: vec![parse_publish("6379:6379").unwrap()],
            ..Default::default()
        };
        c.network = plan_network(&opts, 1).unwrap();
        let json = config_json(
            &c,
            Some("lcfc1.0"),
            Some(Path::new("/run/v.sock")),
            Path::new("/run/fc.log"),
        );
        assert_eq!(
            json["network-interfaces"],
            serde_json::json!([{
                "iface_id": "net0",
                "host_dev_name": "lcfc1.0",
                "guest_mac": "02:4c:0a:00:02:0f"
            }])
        );
        assert_eq!(
            json["vsock"],
            serde_json::json!({ "guest_cid": 3, "uds_path": "/run/v.sock" })
        );
    }

    #[test]
    fn firecracker_parameters_stay_out_of_the_app_args() {
        assert_eq!(boot_args("lc.host=h --"), "lc.host=h");
        assert_eq!(boot_args("lc.host=h -- a"), "lc.host=h -- a");
        // One argument, `--`: Firecracker splits at the first ` -- `.
        assert_eq!(boot_args("lc.host=h -- --"), "lc.host=h -- --");
    }

    #[test]
    fn binary_errors_name_the_fix() {
        let e = binary(Some(Path::new("/nonexistent/firecracker"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/firecracker"), "{e}");
        let e = binary(Some(Path::new("/"))).unwrap_err();
        assert!(e.to_string().contains("not an executable file"), "{e}");
    }

    #[test]
    fn console_lines_and_the_exit_line() {
        let console =
            "2026-12-07T01:40:47.535650024 [anonymous-instance:main] Running Firecracker v1.16.1\n\
                       Hello\nlibcloud-exit: 101\n";
        assert_eq!(forward_console(console.as_bytes()), Some(101));
        assert_eq!(forward_console(&b"Hello\n"[..]), None);
        assert_eq!(forward_console(&b"libcloud-exit: 3\nmore\n"[..]), None);
        assert_eq!(
            forward_console(&b"no newlinelibcloud-exit: 0\n"[..]),
            Some(0)
        );
    }
}
