//! The QEMU backend: boots the same image through its PVH entry under
//! `qemu-system-x86_64 -M microvm`, with the guest's serial port on our
//! stdout and `isa-debug-exit` carrying its exit code. App checkpoints
//! (`--restore`, `--checkpoint-to`) travel over a virtio console whose
//! other end is ours (`qemu_port`).
//!
//! `isa-debug-exit` turns guest code `c` into QEMU exit status
//! `(c << 1) | 1`; QEMU's own errors exit with 1 too, so a status of 1 with
//! an error line on QEMU's stderr is reported as a QEMU failure.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::qemu_port::CheckpointPort;
use crate::boot::loader;
use crate::config::{QemuAccel, RunConfig};
use crate::error::{Error, QemuError};
use crate::outcome::GuestExit;
use hostnet::{NetMode, NetworkConfig};

/// The QEMU binary, looked up in `PATH`.
pub const QEMU: &str = "qemu-system-x86_64";
/// The `isa-debug-exit` port; the guest's PVH platform code uses it.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// How often a running QEMU is checked for exit and timeout.
const POLL: Duration = Duration::from_millis(2);

/// QEMU's command-line arguments for `config`, with the checkpoint port
/// connected to the socket `checkpoint_port` if given.
pub fn qemu_args(config: &RunConfig, checkpoint_port: Option<&Path>) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "-M",
        "microvm,acpi=off",
        "-m",
        &format!("{}M", config.mem_size >> 20),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push("-kernel".into());
    args.push(config.image.clone().into_os_string());
    args.push("-append".into());
    args.push(config.cmdline.clone().into());
    args.push("-device".into());
    args.push(format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=4").into());
    if config.network.is_some() || checkpoint_port.is_some() {
        // Modern (v2) virtio-mmio devices.
        args.extend(["-global", "virtio-mmio.force-legacy=false"].map(OsString::from));
    }
    if let Some(net) = &config.network {
        args.extend(network_args(net).into_iter().map(OsString::from));
    }
    if let Some(socket) = checkpoint_port {
        // QEMU option values escape commas by doubling them.
        let path = socket.display().to_string().replace(',', ",,");
        args.extend([
            "-chardev".into(),
            format!("socket,id=ckpt,path={path}").into(),
            "-device".into(),
            "virtio-serial-device,max_ports=1".into(),
            "-device".into(),
            "virtconsole,chardev=ckpt".into(),
        ]);
    }
    let (accel, cpu) = match config.qemu_accel {
        QemuAccel::Tcg => ("tcg", "max"),
        // Without `-arch-capabilities` QEMU 7.2 aborts on nested-KVM (PVM)
        // hosts, which refuse its write of MSR 0x10a; the guest never
        // reads that MSR.
        QemuAccel::Kvm => ("kvm", "host,-arch-capabilities"),
    };
    args.extend(["-accel", accel, "-cpu", cpu].map(OsString::from));
    args
}

/// QEMU's flags for the guest network: its own user-mode network (slirp,
/// the same 10.0.2.0/24 layout) with `hostfwd` for published ports, or a
/// TAP device; a virtio-mmio network card with our MAC.
fn network_args(net: &NetworkConfig) -> Vec<String> {
    let netdev = match &net.mode {
        NetMode::Tap(name) => format!("tap,id=net0,ifname={name},script=no,downscript=no"),
        _ => {
            let mut user = String::from("user,id=net0,net=10.0.2.0/24,host=10.0.2.2");
            for p in &net.publish {
                let host = match p.host {
                    std::net::SocketAddr::V4(a) => a.ip().to_string(),
                    std::net::SocketAddr::V6(a) => format!("[{}]", a.ip()),
                };
                let guest = p.guest_addr.map(|a| a.to_string()).unwrap_or_default();
                user.push_str(&format!(
                    ",hostfwd={}:{host}:{}-{guest}:{}",
                    p.proto,
                    p.host.port(),
                    p.guest_port
                ));
            }
            user
        }
    };
    let mac = net
        .nics
        .first()
        .map(|n| format!(",mac={}", crate::devices::virtio::net::fmt_mac(&n.mac)))
        .unwrap_or_default();
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        format!("virtio-net-device,netdev=net0{mac}"),
    ]
}

/// Boots `config.image` under QEMU and waits for it to end.
pub fn run(config: &RunConfig) -> Result<GuestExit, Error> {
    loader::inspect(&config.image, config.mem_size)?;
    // Checkpoints in and out: the port is ours before QEMU connects to it.
    let port = if config.restore.is_some() || config.checkpoint_to.is_some() {
        Some(CheckpointPort::listen(config)?)
    } else {
        None
    };
    // The port's thread ends once QEMU has closed its end.
    run_qemu(config, port.as_ref().map(CheckpointPort::path))
}

fn run_qemu(config: &RunConfig, checkpoint_port: Option<&Path>) -> Result<GuestExit, Error> {
    let args = qemu_args(config, checkpoint_port);
    tracing::info!(program = QEMU, ?args, "running QEMU");
    let mut command = Command::new(QEMU);
    // QEMU dies with us (also on kill -9): a dead shim is a dead host.
    crate::sys::kill_with_parent(&mut command);
    let mut child = command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => QemuError::NotFound,
            _ => QemuError::Spawn(e),
        })?;
    let stderr = child.stderr.take();
    let forwarder = thread::spawn(move || stderr.map(forward_stderr).unwrap_or_default());

    let deadline = config.timeout.map(|t| Instant::now() + t);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(QemuError::Wait)? {
            break status;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = forwarder.join();
            return Ok(GuestExit::TimedOut(config.timeout.unwrap_or_default()));
        }
        thread::sleep(POLL);
    };
    let errors = forwarder.join().unwrap_or_default();
    Ok(guest_exit(status, &errors)?)
}

/// Copies QEMU's stderr to ours, line by line, and returns the lines that
/// are not warnings.
fn forward_stderr(stderr: impl Read) -> String {
    let mut errors = Vec::new();
    let mut out = io::stderr();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(out, "{line}");
        if !line.contains("warning:") && !line.trim().is_empty() {
            errors.push(line);
        }
    }
    errors.join("\n")
}

/// Maps QEMU's exit status to how the guest ended.
fn guest_exit(status: ExitStatus, qemu_errors: &str) -> Result<GuestExit, QemuError> {
    match status.code() {
        Some(0) => Ok(GuestExit::PoweredOff),
        Some(1) if !qemu_errors.is_empty() => Err(QemuError::Failed {
            status: 1,
            stderr: qemu_errors.to_owned(),
        }),
        Some(s) if s & 1 == 1 => Ok(GuestExit::Exited(((s >> 1) & 0xff) as u8)),
        Some(s) => Err(QemuError::Failed {
            status: s,
            stderr: qemu_errors.to_owned(),
        }),
        None => Ok(GuestExit::Died(format!(
            "{QEMU} was killed by signal {}",
            status.signal().unwrap_or(0)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backend;
    use crate::testutil::{run_config, TestImage};

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn exit_status_mapping() {
        assert!(matches!(
            guest_exit(exited(15), ""),
            Ok(GuestExit::Exited(7))
        ));
        assert!(matches!(
            guest_exit(exited(1), ""),
            Ok(GuestExit::Exited(0))
        ));
        assert!(matches!(
            guest_exit(exited(0), ""),
            Ok(GuestExit::PoweredOff)
        ));
        assert_eq!(guest_exit(exited(0), "").unwrap().status(), 125);
        assert!(matches!(
            guest_exit(exited(1), "qemu-system-x86_64: -m 0M: bad size"),
            Err(QemuError::Failed { status: 1, .. })
        ));
        assert!(matches!(
            guest_exit(exited(2), ""),
            Err(QemuError::Failed { status: 2, .. })
        ));
        assert!(matches!(
            guest_exit(ExitStatus::from_raw(9), ""),
            Ok(GuestExit::Died(_))
        ));
    }

    fn config(image: std::path::PathBuf, accel: QemuAccel) -> RunConfig {
        RunConfig {
            timeout: Some(Duration::from_secs(30)),
            cmdline: "lc.host=h lc.region=local -- \"a b\"".into(),
            qemu_accel: accel,
            ..run_config(Backend::Qemu, image)
        }
    }

    #[test]
    fn checkpoint_port_flags() {
        let c = config("img".into(), QemuAccel::Tcg);
        let args: Vec<String> = qemu_args(&c, Some(Path::new("/tmp/a,b.sock")))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(
            line.contains(
                "-global virtio-mmio.force-legacy=false \
                 -chardev socket,id=ckpt,path=/tmp/a,,b.sock \
                 -device virtio-serial-device,max_ports=1 \
                 -device virtconsole,chardev=ckpt"
            ),
            "{line}"
        );
        assert!(!line.contains("-initrd"), "{line}");
    }

    #[test]
    fn network_flags() {
        use crate::config::{parse_publish, plan_network, NetOptions};
        let mut c = config("img".into(), QemuAccel::Tcg);
        let opts = NetOptions {
            publish: vec![
                parse_publish("8080:80").unwrap(),
                parse_publish("0.0.0.0:5353:10.0.2.16:53/udp").unwrap(),
            ],
            ..Default::default()
        };
        c.network = plan_network(&opts, 1).unwrap();
        let args: Vec<String> = qemu_args(&c, None)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let line = args.join(" ");
        assert!(
            line.contains(
                "-netdev user,id=net0,net=10.0.2.0/24,host=10.0.2.2,\
                 hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:0.0.0.0:5353-10.0.2.16:53"
            ),
            "{line}"
        );
        assert!(
            line.contains("-device virtio-net-device,netdev=net0,mac=02:4c:0a:00:02:0f"),
            "{line}"
        );
    }

    #[test]
    fn command_line() {
        let args = qemu_args(&config("/img/hello".into(), QemuAccel::Tcg), None);
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "-M",
                "microvm,acpi=off",
                "-m",
                "64M",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
                "-kernel",
                "/img/hello",
                "-append",
                "lc.host=h lc.region=local -- \"a b\"",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=4",
                "-accel",
                "tcg",
                "-cpu",
                "max"
            ]
        );
        let args = qemu_args(&config("/img/hello".into(), QemuAccel::Kvm), None);
        assert_eq!(
            args[args.len() - 3..],
            ["kvm", "-cpu", "host,-arch-capabilities"]
        );
    }

    /// QEMU is a test dependency (`.ci/run` installs it): fail, never skip.
    fn require_qemu() {
        assert!(
            Command::new(QEMU).arg("--version").output().is_ok(),
            "{QEMU} is required by this test: apt-get install qemu-system-x86"
        );
    }

    #[test]
    fn the_same_test_image_boots_under_qemu() {
        require_qemu();
        let path = TestImage::exit(7).write("qemu-exit7");
        let start = Instant::now();
        let exit = run(&config(path, QemuAccel::Tcg)).unwrap();
        eprintln!("QEMU TCG exit(7) guest: {:?}", start.elapsed());
        assert!(matches!(exit, GuestExit::Exited(7)), "{exit}");
    }

    #[test]
    fn a_spinning_guest_is_stopped_by_the_timeout() {
        require_qemu();
        let path = TestImage::exit(0)
            .pvh_code(crate::testutil::Asm::new().spin())
            .write("qemu-spin");
        let mut config = config(path, QemuAccel::Tcg);
        config.timeout = Some(Duration::from_millis(500));
        let start = Instant::now();
        let exit = run(&config).unwrap();
        assert!(matches!(exit, GuestExit::TimedOut(_)), "{exit}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn image_errors_come_before_qemu() {
        let path = crate::testutil::junk_image("qemu-errors");
        let e = run(&config(path, QemuAccel::Tcg)).unwrap_err();
        assert!(e.to_string().ends_with("is not an ELF file"), "{e}");
    }
}
