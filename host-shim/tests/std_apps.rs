//! Ordinary Rust std programs in our images (the Hermit ABI, built by
//! `cargo xtask build-image` for `x86_64-unknown-hermit`): std-echo's
//! threads, `HashMap`, clock, env, exit status and panics, its
//! `std::net::TcpListener` behind a published port, and live migration of
//! it with an open connection. Clients are std `TcpStream`s.
//!
//! axum-hello (axum + tokio on the same ABI: mio's `poll` and `eventfd`)
//! answers `curl` with JSON, serves many keep-alive clients, keeps one and
//! its request counter across A->B->A migration, keeps answering while a
//! thread computes (timeslices), connects out with tokio to a second guest,
//! and a call to an ABI function the kernel does not provide stops it with
//! the function named.
//!
//! Needs /dev/kvm and the images (`cargo xtask build-image --all`).

mod common;

use common::daemon::{Daemon, TempDir};
use common::{boot, free_port, image, Shim};
use std::io::{BufRead, BufReader, Read, Write};
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
    let publish = format!("{port}:7");
    let mut shim = start(
        "std-echo",
        &[
            "--publish",
            &publish,
            "--env",
            "GREETING=hola",
            "--host-name",
            "box1",
        ],
    );
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

    // No file system (std sees an empty, read-only one), UDP or DNS:
    // clear errors, and the app goes on.
    let run = boot("std-echo", &[], &["--unsupported", "--exit", "0"]);
    assert_eq!(run.status, Some(0), "{run:?}");
    for expected in [
        "read /etc/hostname: Err(Os { code: 2, kind: NotFound",
        "this kernel has no file system",
        r#"write /tmp/out.txt: Err(Os { code: 30, kind: Uncategorized, message: "Read-only file system""#,
        "open for writing: this kernel has no file system (nothing can be written)",
        r#"create_dir /tmp/d: Err(Os { code: 30, kind: Uncategorized, message: "Read-only file system""#,
        "read_dir /: Err(Os { code: 2, kind: NotFound",
        "metadata /: Err(Os { code: 2, kind: NotFound",
        "remove_file /tmp/out.txt: Err(Os { code: 2, kind: NotFound",
        "UDP bind: Err(Os { code: 100",
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

    // Sockets are bounded too: a listener takes one TCP socket per backlog
    // slot (std asks for 128, the kernel gives 64), and 152 TCP sockets
    // exist at most: the third listener fails with ENFILE, the kernel says
    // why, and the app goes on.
    let publish = format!("{}:7", free_port());
    let run = boot(
        "std-echo",
        &["--publish", &publish],
        &["--listeners", "10", "--exit", "0"],
    );
    assert_eq!(run.status, Some(0), "{run:?}");
    assert!(
        run.stdout
            .contains("bound 2 listeners, then: Some(Os { code: 23"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("TCP socket limit reached (152)"),
        "{run:?}"
    );
}

#[test]
fn std_echo_migrates_there_and_back_with_an_open_connection() {
    let dir = TempDir::new("stdmig");
    let a = Daemon::start("std-a", 5, &[], &dir);
    let b = Daemon::start("std-b", 6, &[], &dir);
    let port = a.run_published("std-echo", "echo", 7, &[]);
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

/// An HTTP/1.1 client on one keep-alive connection.
struct Http {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Http {
    fn connect(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// GETs `path`: the status and the body (which must be JSON).
    fn get_json(&mut self, path: &str) -> std::io::Result<(u16, serde_json::Value)> {
        write!(
            self.writer,
            "GET {path} HTTP/1.1\r\nHost: axum-hello\r\n\r\n"
        )?;
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut len = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().map_err(std::io::Error::other)?;
                }
                assert!(
                    !(k.eq_ignore_ascii_case("connection") && v.trim() == "close"),
                    "the server closes a keep-alive connection"
                );
            }
        }
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        let json = serde_json::from_slice(&body).map_err(std::io::Error::other)?;
        Ok((status, json))
    }

    /// `/count`'s counter after this request.
    fn count(&mut self) -> u64 {
        let (status, json) = self.get_json("/count").expect("GET /count");
        assert_eq!(status, 200, "{json}");
        json["count"].as_u64().unwrap_or_else(|| panic!("{json}"))
    }
}

/// `curl -s -f URL`'s output (fails if curl is missing or the request does).
fn curl(url: &str) -> Result<String, String> {
    let out = std::process::Command::new("curl")
        .args(["-s", "-f", "-m", "10", url])
        .output()
        .unwrap_or_else(|e| panic!("these tests need curl (apt-get install curl): {e}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("curl {url}: {}", out.status))
    }
}

/// `host-shim run IMAGE-OF-APP --timeout 120 ARGS`, running.
fn start(app: &str, args: &[&str]) -> Shim {
    let img = image(app);
    let mut all = vec!["run", img.to_str().unwrap(), "--timeout", "120"];
    all.extend_from_slice(args);
    Shim::start(&all)
}

/// Starts axum-hello behind a published port and waits until it answers.
fn axum_hello(port: u16) -> Shim {
    let mut shim = start("axum-hello", &["--publish", &format!("{port}:8080")]);
    wait_for_json(port, Some(&mut shim));
    shim
}

/// Waits (30 s at most) until `/json` answers on `port`; returns it.
fn wait_for_json(port: u16, mut shim: Option<&mut Shim>) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = shim.as_deref_mut() {
            s.assert_running("axum-hello to answer");
        }
        if let Ok(body) = curl(&format!("http://127.0.0.1:{port}/json")) {
            return serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        }
        assert!(
            Instant::now() < deadline,
            "axum-hello did not answer on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn axum_hello_answers_curl_with_json_and_serves_many_keep_alive_clients() {
    let port = free_port();
    let shim = axum_hello(port);
    let json = wait_for_json(port, None);
    assert_eq!(json["message"], "hello", "{json}");
    assert_eq!(json["app"], "axum-hello", "{json}");
    assert_eq!(json["os"], "hermit", "built for the Hermit target: {json}");
    assert_eq!(
        curl(&format!("http://127.0.0.1:{port}/")).unwrap(),
        "hello from axum\n"
    );

    // tokio's blocking pool (a second thread, which wakes the runtime
    // sleeping in `poll` through mio's eventfd waker) and its timers.
    let mut c = Http::connect(port).unwrap();
    let (_, json) = c.get_json("/blocking?n=1000000").unwrap();
    assert_eq!(json["sum"], 499_999_500_000u64, "{json}");
    let t = Instant::now();
    let (_, json) = c.get_json("/sleep?ms=300").unwrap();
    let slept = json["slept_ms"].as_u64().unwrap();
    assert!((300..2000).contains(&slept), "{json}");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    drop(c);

    // 40 keep-alive connections at once, 5 requests each, interleaved: every
    // request is counted once, on its own connection.
    let mut clients: Vec<Http> = (0..40).map(|_| Http::connect(port).unwrap()).collect();
    let mut seen = Vec::new();
    for _ in 0..5 {
        for c in &mut clients {
            seen.push(c.count());
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=200).collect::<Vec<u64>>());
    let body = curl(&format!("http://127.0.0.1:{port}/count")).unwrap();
    assert_eq!(body, r#"{"count":201}"#);
    // Closed connections free their sockets; the server goes on.
    drop(clients);
    let mut again = Http::connect(port).unwrap();
    assert_eq!(again.count(), 202);
    drop(shim);
}

#[test]
fn a_computing_std_thread_does_not_starve_axum_hello() {
    let port = free_port();
    let _shim = axum_hello(port);
    let mut c = Http::connect(port).unwrap();
    assert_eq!(c.count(), 1);
    // A thread that computes for 4 s, reading the clock but never blocking
    // (started by the handler, which replies at once).
    let spin_started = Instant::now();
    let (status, json) = c.get_json("/spin?ms=4000").unwrap();
    assert_eq!((status, json["spinning_ms"].as_u64()), (200, Some(4000)));
    let mut slowest = spin_started.elapsed();
    for n in 2..=6 {
        let t = Instant::now();
        assert_eq!(c.count(), n);
        slowest = slowest.max(t.elapsed());
    }
    // And a new connection is accepted while it computes.
    let mut fresh = Http::connect(port).unwrap();
    assert_eq!(fresh.count(), 7);
    // Without timeslices the first reply waits for the whole spin (4 s).
    assert!(
        spin_started.elapsed() < Duration::from_secs(3),
        "7 requests took {:?} while a thread computed (slowest {slowest:?})",
        spin_started.elapsed()
    );
}

#[test]
fn axum_hello_keeps_a_keep_alive_client_and_its_count_across_migration() {
    let dir = TempDir::new("axummig");
    let a = Daemon::start("axum-a", 7, &[], &dir);
    let b = Daemon::start("axum-b", 8, &[], &dir);
    let port = a.run_published("axum-hello", "web", 8080, &[]);
    wait_for_json(port, None);
    let mut c = Http::connect(port).unwrap();
    assert_eq!(c.count(), 1);
    assert_eq!(c.count(), 2);
    let mut expected = 2;
    for (from, to) in [(&a, &b), (&b, &a)] {
        let out = from.cli(&["migrate", "web", "--to", &to.addr]);
        assert!(out.lines().last().unwrap_or("").starts_with("ok"), "{out}");
        // The same connection, and the count kept in the app's state.
        expected += 1;
        assert_eq!(c.count(), expected, "after migrating to {}", to.addr);
        let (_, json) = c.get_json("/json").unwrap();
        assert_eq!(json["message"], "hello");
    }
    // A new connection after the round trip sees the same counter.
    let mut fresh = Http::connect(port).unwrap();
    assert_eq!(fresh.count(), expected + 1);
    assert!(a.cli(&["list"]).contains("running"));
}

#[test]
fn axum_hello_connects_out_with_tokio_to_a_second_guest() {
    let port = free_port();
    let img = image("axum-hello");
    let img = img.to_str().unwrap();
    let publish = format!("{port}:8080");
    // A second axum-hello on the same switch (10.0.2.16).
    let mut shim = start("axum-hello", &["--publish", &publish, "--also", img]);
    wait_for_json(port, Some(&mut shim));
    // tokio's TcpStream::connect: a non-blocking connect, `poll` for the
    // handshake, SO_ERROR; the peer boots at the same time, so retry.
    let fetch = |to: &str| -> serde_json::Value {
        let body = curl(&format!("http://127.0.0.1:{port}/fetch?to={to}")).unwrap();
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let peer = loop {
        let json = fetch("10.0.2.16:8080");
        if json.get("peer").is_some() {
            break json;
        }
        assert!(Instant::now() < deadline, "the peer never answered: {json}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(peer["peer"]["message"], "hello", "{peer}");
    // A port nobody listens on: refused, reported through SO_ERROR.
    let refused = fetch("10.0.2.16:9");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("refused"), "{refused}");
    // And the app goes on connecting out.
    assert_eq!(fetch("10.0.2.16:8080")["peer"]["app"], "axum-hello");
}

#[test]
fn a_call_to_an_abi_function_the_kernel_lacks_stops_the_app_naming_it() {
    let run = boot("axum-hello", &[], &["--call-unprovided"]);
    assert_eq!(run.status, Some(102), "{run:?}");
    assert!(
        run.stdout.contains(
            "app called sys_sem_init, a Hermit ABI function this kernel does not provide"
        ),
        "{run:?}"
    );
    assert!(
        !run.stdout.contains("sem_init returned"),
        "the call returned: {run:?}"
    );
}

/// The daemon's only app's VM exits: (caused by the guest, `KVM_RUN`s
/// the shim interrupted).
fn app_exits(d: &Daemon) -> (u64, u64) {
    let stats = d.stats();
    assert_eq!(stats.instances.len(), 1, "{stats:?}");
    let exits = stats.instances[0].exits;
    (exits.total, exits.interrupted)
}

/// std-echo's `spin` answer: (rounds computed, rounds with a wrong result).
fn spin_rounds(c: &mut Client) -> (u64, u64) {
    let reply = c.ask("spin").unwrap();
    let field = |name: &str| -> u64 {
        reply
            .split(' ')
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {reply:?}"))
    };
    (field("rounds="), field("bad="))
}

#[test]
fn a_std_thread_spinning_without_system_calls_does_not_starve_the_others() {
    let dir = TempDir::new("stdspin");
    let a = Daemon::start("spin-a", 9, &[], &dir);
    let b = Daemon::start("spin-b", 10, &[], &dir);
    // A thread computes for good without one ABI call (no clock, no lock):
    // only the monitor's timeslice timer takes the vCPU back from it.
    // Without it, the main thread never gets to listen.
    let port = a.run_published("std-echo", "spin", 7, &["--", "--spin"]);
    let mut c = Client::when_up(port, None);
    let mut n = 1; // when_up's ping
    let mut took = Vec::new();
    for _ in 0..20 {
        n += 1;
        let t = Instant::now();
        assert_eq!(
            c.ask(&format!("line {n}")).unwrap(),
            format!("echo {n}: line {n}")
        );
        took.push(t.elapsed());
    }
    took.sort();
    let median = took[took.len() / 2];
    let slowest = took[took.len() - 1];
    eprintln!("round trips while a thread spins: median {median:?}, slowest {slowest:?}");
    // A timeslice is 10 ms; a loaded 2-core host may stretch a few of them.
    assert!(
        slowest < Duration::from_secs(5),
        "a round trip took {slowest:?} while a thread spun (median {median:?})"
    );
    assert!(
        app_exits(&a).1 > 0,
        "the spinning thread was never interrupted"
    );
    // A new connection gets its own thread while the spinner runs.
    let mut fresh = Client::when_up(port, None);
    assert_eq!(fresh.ask("new").unwrap(), "echo 2: new");

    // The guest migrates with a preemption in flight at any moment: A->B->A,
    // the same connection, its counter, and the spinner still spinning.
    for (from, to) in [(&a, &b), (&b, &a)] {
        let out = from.migrate(&["migrate", "spin", "--to", &to.addr]);
        assert_eq!(out.name, "spin");
        for _ in 0..3 {
            n += 1;
            let t = Instant::now();
            assert_eq!(c.ask("moved").unwrap(), format!("echo {n}: moved"));
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        }
        assert!(app_exits(to).1 > 0, "not preempted on {}", to.addr);
    }
    // The spinner was interrupted hundreds of times, on three hosts, and
    // every round it computed (floating point and integers) came out the
    // same: the trampoline restores every register it may use.
    let (rounds, bad) = spin_rounds(&mut c);
    assert_eq!(bad, 0, "{bad} of {rounds} rounds computed wrong results");
    let deadline = Instant::now() + Duration::from_secs(30);
    while spin_rounds(&mut c).0 < rounds + 2 {
        assert!(
            Instant::now() < deadline,
            "the spinner stopped after {rounds} rounds"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(spin_rounds(&mut c).1, 0);
}

#[test]
fn axum_hello_on_tokios_multi_thread_runtime_serves_and_idles_without_exits() {
    let dir = TempDir::new("stdmt");
    let d = Daemon::start("mt", 11, &[], &dir);
    let port = d.run_published("axum-hello", "mt", 8080, &["--", "--multi-thread"]);
    let json = wait_for_json(port, None);
    assert_eq!(json["os"], "hermit", "{json}");
    let logs = d.cli(&["logs", "mt"]);
    assert!(logs.contains("(multi-thread runtime)"), "{logs}");

    // Two workers, the blocking pool and the I/O driver: threads, futexes
    // and eventfds on the one vCPU.
    let mut clients: Vec<Http> = (0..20).map(|_| Http::connect(port).unwrap()).collect();
    let mut seen = Vec::new();
    for _ in 0..3 {
        for c in &mut clients {
            seen.push(c.count());
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=60).collect::<Vec<u64>>());
    drop(clients);
    let mut c = Http::connect(port).unwrap();
    let (_, json) = c.get_json("/blocking?n=1000000").unwrap();
    assert_eq!(json["sum"], 499_999_500_000u64, "{json}");
    let (_, json) = c.get_json("/sleep?ms=200").unwrap();
    assert!(
        (200..2000).contains(&json["slept_ms"].as_u64().unwrap()),
        "{json}"
    );
    // A computing thread does not starve the workers.
    let spin_started = Instant::now();
    let (status, _) = c.get_json("/spin?ms=2000").unwrap();
    assert_eq!(status, 200);
    for n in 61..=65 {
        assert_eq!(c.count(), n);
    }
    assert!(
        spin_started.elapsed() < Duration::from_millis(1800),
        "5 requests took {:?} while a thread computed",
        spin_started.elapsed()
    );
    drop(c);

    // Idle (the spin over, every thread parked): no timeslice timer, so no
    // interrupted runs, and hardly any exit at all. The spinner's 2 s are
    // over once they passed and a look 250 ms later finds no new
    // interrupted run.
    common::until_steady(
        Duration::from_millis(250),
        "the spinner's interrupted runs",
        || {
            let spun = spin_started.elapsed() > Duration::from_secs(2);
            (app_exits(&d).1, spun)
        },
    );
    let (total, interrupted) = app_exits(&d);
    std::thread::sleep(Duration::from_secs(3));
    let (total_after, interrupted_after) = app_exits(&d);
    eprintln!(
        "idle multi-thread axum-hello over 3 s: {} exits, {} interrupted runs",
        total_after - total,
        interrupted_after - interrupted
    );
    assert_eq!(interrupted_after, interrupted, "timer exits while idle");
    assert!(
        total_after - total <= 10,
        "{} exits while idle",
        total_after - total
    );
}

#[test]
fn std_echo_answers_udp_datagrams_behind_a_published_port() {
    let tcp = free_port();
    let udp_port = free_port();
    let img = image("std-echo");
    let img = img.to_str().unwrap();
    // A second std-echo on the same switch (10.0.2.16) answers UDP too.
    let also = format!("{img} --udp 53");
    let mut shim = start(
        "std-echo",
        &[
            "--publish",
            &format!("{tcp}:7"),
            "--publish",
            &format!("{udp_port}:53/udp"),
            "--also",
            &also,
            "--",
            "--udp",
            "53",
        ],
    );
    // The TCP side answering means the UDP socket is bound too.
    let mut c = Client::when_up(tcp, Some(&mut shim));
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let mut ask = |msg: &[u8]| -> Vec<u8> {
        // Datagrams may be lost: resend a few times.
        for _ in 0..10 {
            client.send_to(msg, ("127.0.0.1", udp_port)).unwrap();
            if let Ok((n, _)) = client.recv_from(&mut buf) {
                return buf[..n].to_vec();
            }
        }
        panic!("no UDP answer to {:?}", String::from_utf8_lossy(msg));
    };
    let first = ask(b"hello");
    assert!(
        first.starts_with(b"udp ") && first.ends_with(b": hello"),
        "{first:?}"
    );
    let n: u64 = std::str::from_utf8(&first[4..first.len() - 7])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ask(b"again"), format!("udp {}: again", n + 1).into_bytes());
    // A datagram near the MTU comes back whole.
    let long = vec![b'z'; 1400];
    let reply = ask(&long);
    assert!(reply.ends_with(&long[..1400]), "{} bytes", reply.len());
    // From inside: a socket `connect`ed to the other guest, `send` and
    // `recv` (the peer boots at the same time: the app resends).
    // (A resent ping may be answered twice: the peer's count may jump.)
    let count = |reply: String| -> u64 {
        reply
            .strip_prefix("udp ")
            .and_then(|r| r.strip_suffix(": ping"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{reply:?}"))
    };
    let first = count(c.ask("udp-ask 10.0.2.16:53").unwrap());
    let second = count(c.ask("udp-ask 10.0.2.16:53").unwrap());
    assert!(second > first, "{first} then {second}");
    let (out, err) = shim.stop();
    assert!(!out.contains("UDP receive:"), "{out}\n{err}");
}
