//! Ordinary Rust std programs in our images (the Hermit ABI, built by
//! `cargo xtask build-image` for `x86_64-unknown-hermit`): std-echo's
//! threads, `HashMap`, clock, env, exit status and panics, its
//! `std::net::TcpListener` behind a published port, and live migration of
//! it with an open connection. Clients are std `TcpStream`s.
//!
//! Needs /dev/kvm and the images (`cargo xtask build-image --all`).

mod common;

use common::daemon::{Daemon, TempDir};
use common::{boot, free_port, image, Shim};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A line-oriented client of std-echo.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    /// Connects to 127.0.0.1:`port`, retrying while the guest boots (30 s).
    fn when_up(port: u16, shim: Option<&mut Shim>) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut shim = shim;
        loop {
            if let Some(s) = shim.as_deref_mut() {
                s.assert_running("std-echo to answer");
            }
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut c = Self {
                    reader: BufReader::new(stream.try_clone().unwrap()),
                    writer: stream,
                };
                // The shim accepts before the guest listens: wait for a reply.
                if c.ask("ping").is_ok() {
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "std-echo did not answer on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ask(&mut self, line: &str) -> std::io::Result<String> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(reply.trim_end().to_string())
    }
}

#[test]
fn std_echo_serves_many_clients_on_threads_behind_a_published_port() {
    let port = free_port();
    let img = image("std-echo");
    let publish = format!("{port}:7");
    let mut shim = Shim::start(&[
        "run",
        img.to_str().unwrap(),
        "--publish",
        &publish,
        "--env",
        "GREETING=hola",
        "--host-name",
        "box1",
        "--timeout",
        "120",
    ]);
    let mut first = Client::when_up(port, Some(&mut shim));
    // Several connections open at once, each served by its own std thread,
    // with replies interleaved between them.
    let mut clients: Vec<Client> = (0..6).map(|_| Client::when_up(port, None)).collect();
    for round in 1..=3 {
        for (i, c) in clients.iter_mut().enumerate() {
            let reply = c.ask(&format!("client {i} round {round}")).unwrap();
            // `when_up`'s ping was line 1 of each connection.
            assert_eq!(
                reply,
                format!("hola {}: client {i} round {round}", round + 1)
            );
        }
    }
    // One socket, two threads: a clone of the connection (`try_clone`)
    // writes ticks from its own thread while the first keeps reading.
    let n = first.ask("tick 5").unwrap();
    assert_eq!(n, "ticking");
    first.writer.write_all(b"during\n").unwrap();
    let mut lines = Vec::new();
    for _ in 0..6 {
        let mut line = String::new();
        first.reader.read_line(&mut line).unwrap();
        lines.push(line.trim_end().to_string());
    }
    lines.sort();
    assert_eq!(
        lines,
        [
            "hola 3: during",
            "tick 0",
            "tick 1",
            "tick 2",
            "tick 3",
            "tick 4"
        ]
    );
    // A large line crosses several TCP segments both ways.
    let big = "x".repeat(100_000);
    assert_eq!(first.ask(&big).unwrap(), format!("hola 4: {big}"));
    let stats = first.ask("stats").unwrap();
    assert!(stats.starts_with("lines="), "{stats}");
    let lines: u64 = stats["lines=".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(lines >= 1 + 6 + 18 + 4, "{stats}");
    assert_eq!(
        first.ask("host").unwrap(),
        "box1",
        "libcloud::host() from std"
    );
    // Closed connections end their threads; the server keeps serving.
    drop(clients);
    let mut again = Client::when_up(port, None);
    assert_eq!(again.ask("after").unwrap(), "hola 2: after");
    let (out, err) = shim.stop();
    assert!(
        out.contains("std-echo: 4 threads joined (sum 60), counts [0=6 1=6 2=6 3=6]"),
        "{out}\n{err}"
    );
    assert!(out.contains("std-echo: listening on port 7"), "{out}");
    // Each of the 4 threads slept 3 x 5 ms, all at once: std::thread::sleep
    // and Instant agree with the clock.
    let took: u64 = out
        .split(", took ")
        .nth(1)
        .and_then(|t| t.split(" ms").next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {out}"));
    assert!((15..5000).contains(&took), "self-check took {took} ms");
}

#[test]
fn std_exit_status_panics_and_thread_limit() {
    let run = boot("std-echo", &[], &["--exit", "7"]);
    assert_eq!(run.status, Some(7), "{run:?}");
    assert!(run.stdout.contains("4 threads joined"), "{run:?}");

    let run = boot("std-echo", &[], &["--panic"]);
    assert_eq!(run.status, Some(101), "{run:?}");
    assert!(
        run.stdout
            .contains("panicked at apps/std-echo/src/main.rs:")
            && run.stdout.contains("std-echo was asked to panic"),
        "the panic names file:line and the message: {run:?}"
    );

    // Sockets without a network device: std's error names it, the kernel says why.
    let run = boot("std-echo", &[], &[]);
    assert_eq!(run.status, Some(101), "{run:?}");
    assert!(
        run.stdout
            .contains("sockets unavailable: no virtio-net device")
            && run.stdout.contains("bind: Os { code: 100")
            && run.stdout.contains("Network is down"),
        "{run:?}"
    );

    // No file system, UDP or DNS: clear errors, and the app goes on.
    let run = boot("std-echo", &[], &["--unsupported", "--exit", "0"]);
    assert_eq!(run.status, Some(0), "{run:?}");
    for expected in [
        "read /etc/hostname: Err(Os { code: 2, kind: NotFound",
        "this kernel has no file system",
        "UDP bind: Err(Os { code: 93, kind: Uncategorized",
        "only TCP (SOCK_STREAM) is provided",
        "connect by name: Err(",
        "no DNS resolver; use numeric addresses",
    ] {
        assert!(run.stdout.contains(expected), "{expected:?} in {run:?}");
    }

    // 64 threads at most (the main thread is one): the 64th spawn fails
    // with std's error, the kernel says why, and the app goes on.
    let run = boot("std-echo", &[], &["--spawn", "100", "--exit", "0"]);
    assert_eq!(run.status, Some(0), "{run:?}");
    assert!(
        run.stdout.contains("spawned 63 threads, then: Some("),
        "{run:?}"
    );
    assert!(run.stdout.contains("thread limit reached"), "{run:?}");
}

#[test]
fn std_echo_migrates_there_and_back_with_an_open_connection() {
    let dir = TempDir::new("stdmig");
    let a = Daemon::start("std-a", 5, &[], &dir);
    let b = Daemon::start("std-b", 6, &[], &dir);
    let port = free_port();
    let img = image("std-echo").to_string_lossy().into_owned();
    a.cli(&[
        "run",
        &img,
        "--name",
        "echo",
        "--publish",
        &format!("{port}:7"),
    ]);
    let mut c = Client::when_up(port, None);
    let mut other = Client::when_up(port, None);
    assert_eq!(c.ask("host").unwrap(), "std-a");
    assert_eq!(c.ask("before").unwrap(), "echo 3: before");
    // A 4 MB line: the thread's buffers for it are written, then freed.
    let big = "y".repeat(4_000_000);
    assert_eq!(other.ask(&big).unwrap(), format!("echo 2: {big}"));

    for (from, to, n) in [(&a, &b, 4), (&b, &a, 6)] {
        let out = from.migrate(&["migrate", "echo", "--to", &to.addr]);
        assert_eq!(out.name, "echo");
        if n == 4 {
            // std's allocations go to the kernel heap, whose free-page
            // hints leave the freed megabytes behind.
            let skipped = out
                .skipped
                .unwrap_or_else(|| panic!("no skipped-page count in {out:?}"));
            assert!(
                skipped >= 1000,
                "freed pages sent anyway: {skipped}\n{out:?}"
            );
        }
        // The same connections, with their per-connection counters (state
        // of the threads serving them), now reach the other host.
        let host = if std::ptr::eq(to, &b) {
            "std-b"
        } else {
            "std-a"
        };
        assert_eq!(c.ask("host").unwrap(), host);
        assert_eq!(c.ask("moved").unwrap(), format!("echo {}: moved", n + 1));
        assert!(other.ask("other").unwrap().ends_with(": other"));
    }
    // And a new connection after the round trip.
    let mut fresh = Client::when_up(port, None);
    assert_eq!(fresh.ask("new").unwrap(), "echo 2: new");
    assert!(a.cli(&["list"]).contains("running"));
}

#[test]
fn std_echo_runs_under_qemu_too() {
    // The PVH entry sets the same CR4 bits (SSE, FSGSBASE) as our shim.
    let run = boot("std-echo", &["--backend", "qemu"], &["--exit", "5"]);
    assert_eq!(run.status, Some(5), "{run:?}");
    assert!(
        run.stdout
            .contains("std-echo: 4 threads joined (sum 60), counts [0=6 1=6 2=6 3=6]"),
        "{run:?}"
    );
}
