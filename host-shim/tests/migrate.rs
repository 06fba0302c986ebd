//! Snapshots, the daemon and live migration through the real binary: shim
//! daemons as separate processes on loopback, the kv app (Redis protocol)
//! or the http app behind published ports, and a client of our own.
//!
//! Needs /dev/kvm and the images (`cargo xtask build-image --all`).

mod common;

use common::{image, require_kvm};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_host-shim");

/// A free TCP port on 127.0.0.1 (and, in practice, UDP too).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch directory of this test, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("host-shim-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `host-shim serve` process, killed when dropped.
struct Daemon {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Daemon {
    fn start(name: &str, shim_id: u8, extra: &[&str], dir: &TempDir) -> Self {
        require_kvm();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.path(&format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args([
                "serve", "--listen", &addr, "--name", name, "--region", "test",
            ])
            .args(["--shim-id", &shim_id.to_string()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn host-shim serve");
        let d = Self { child, addr, log };
        let give_up = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&d.addr).is_err() {
            assert!(
                Instant::now() < give_up,
                "the daemon never listened:\n{}",
                d.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `host-shim --shim ADDR ARGS`; panics unless it succeeds.
    fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        assert!(
            out.status.success(),
            "host-shim {args:?} failed:\n{}{}\n--- daemon:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.output()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn try_cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(["--shim", &self.addr])
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("spawn host-shim")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal Redis-protocol client.
struct Redis {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Redis {
    fn connect(port: u16) -> std::io::Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(Self {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    /// Connects once the app answers PING (it may be booting).
    fn when_up(port: u16) -> Self {
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = Redis::connect(port) {
                if c.cmd(&["PING"]).ok().as_deref() == Some("PONG") {
                    return c;
                }
            }
            assert!(Instant::now() < give_up, "kv on port {port} never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn send(&mut self, args: &[&str]) -> std::io::Result<()> {
        let mut b = format!("*{}\r\n", args.len());
        for a in args {
            b.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.w.write_all(b.as_bytes())
    }

    /// One reply: simple strings, integers and bulk strings as text; nil as "(nil)".
    fn reply(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end().to_owned();
        match line.as_bytes().first() {
            Some(b'+') | Some(b':') => Ok(line[1..].to_owned()),
            Some(b'-') => Ok(format!("ERR {}", &line[1..])),
            Some(b'$') => {
                let n: i64 = line[1..].parse().unwrap();
                if n < 0 {
                    return Ok("(nil)".into());
                }
                let mut buf = vec![0u8; n as usize + 2];
                self.r.read_exact(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n as usize]).into_owned())
            }
            _ => Ok(line),
        }
    }

    fn cmd(&mut self, args: &[&str]) -> std::io::Result<String> {
        self.send(args)?;
        self.reply()
    }

    /// SETs `n` keys in pipelined batches.
    fn fill(&mut self, n: usize) {
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            for i in chunk {
                self.send(&["SET", &format!("key:{i}"), &format!("value-{i}")])
                    .unwrap();
            }
            for _ in chunk {
                assert_eq!(self.reply().unwrap(), "OK");
            }
        }
    }

    /// Checks that all `n` keys hold their values (pipelined).
    fn check(&mut self, n: usize) {
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            for i in chunk {
                self.send(&["GET", &format!("key:{i}")]).unwrap();
            }
            for i in chunk {
                assert_eq!(self.reply().unwrap(), format!("value-{i}"), "key:{i}");
            }
        }
    }

    /// The `host` field of INFO.
    fn host(&mut self) -> String {
        let info = self.cmd(&["INFO", "server"]).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("host:"))
            .unwrap_or("?")
            .trim()
            .to_owned()
    }
}

fn kv_img() -> String {
    image("kv").to_string_lossy().into_owned()
}

#[test]
fn snapshot_and_restore_in_a_new_process_keep_the_data() {
    let dir = TempDir::new("snap");
    let a = Daemon::start("snap-a", 1, &["--no-overlay"], &dir);
    let port = free_port();
    let img = kv_img();
    a.cli(&[
        "run",
        &img,
        "--name",
        "kv",
        "--publish",
        &format!("{port}:6379"),
    ]);
    let mut c = Redis::when_up(port);
    c.fill(10_000);
    let snap = dir.path("kv.snap");
    let out = a.cli(&["snapshot", "kv", "--out", snap.to_str().unwrap()]);
    assert!(out.contains("pages"), "{out}");
    // The source keeps serving after the snapshot.
    c.check(100);
    assert_eq!(c.cmd(&["SET", "after", "snapshot"]).unwrap(), "OK");
    let list = a.cli(&["list"]);
    assert!(list.contains("kv") && list.contains("running"), "{list}");
    assert!(a.cli(&["logs", "kv"]).contains("listening on port 6379"));
    a.cli(&["stop", "kv"]);
    drop(c);

    // A new process restores it, on another "host".
    let port2 = free_port();
    let mut restored = Command::new(BIN)
        .args(["restore", snap.to_str().unwrap(), "--host-name", "restored"])
        .args(["--publish", &format!("{port2}:6379"), "--timeout", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut c = Redis::when_up(port2);
    c.check(10_000);
    assert_eq!(c.cmd(&["GET", "after"]).unwrap(), "(nil)", "taken before");
    assert_eq!(c.cmd(&["DBSIZE"]).unwrap(), "10000");
    assert_eq!(c.host(), "restored");
    let _ = restored.kill();
    let _ = restored.wait();

    // And a daemon restores it as a new instance.
    let port3 = free_port();
    a.cli(&[
        "restore",
        snap.to_str().unwrap(),
        "--name",
        "kv2",
        "--publish",
        &format!("{port3}:6379"),
    ]);
    let mut c = Redis::when_up(port3);
    c.check(10_000);
    assert_eq!(c.host(), "snap-a");
}

#[test]
fn corrupt_truncated_and_foreign_snapshots_are_refused() {
    let dir = TempDir::new("corrupt");
    let a = Daemon::start("corrupt-a", 2, &["--no-overlay"], &dir);
    let img = image("http").to_string_lossy().into_owned();
    a.cli(&["run", &img, "--name", "web"]);
    let snap = dir.path("web.snap");
    a.cli(&["snapshot", "web", "--out", snap.to_str().unwrap()]);
    let good = std::fs::read(&snap).unwrap();

    let try_restore = |bytes: &[u8], tag: &str| -> String {
        let path = dir.path(&format!("{tag}.snap"));
        std::fs::write(&path, bytes).unwrap();
        let out = Command::new(BIN)
            .args(["restore", path.to_str().unwrap(), "--timeout", "5"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{tag}: refused with status 1");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let mut corrupt = good.clone();
    let at = corrupt.len() - 1000;
    corrupt[at] ^= 0xff;
    let err = try_restore(&corrupt, "corrupt");
    assert!(err.contains("corrupt"), "{err}");
    let err = try_restore(&good[..good.len() / 2], "truncated");
    assert!(err.contains("truncated"), "{err}");
    let mut version = good.clone();
    version[8..12].copy_from_slice(&7u32.to_le_bytes());
    let err = try_restore(&version, "version");
    assert!(err.contains("format version 7"), "{err}");
    let err = try_restore(b"GIF89a not a snapshot at all", "foreign");
    assert!(err.contains("not a host-shim snapshot"), "{err}");
    // The daemon refuses it too, and says why.
    let bad = dir.path("corrupt.snap");
    let out = a.try_cli(&["restore", bad.to_str().unwrap(), "--name", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));
}
