//! std-echo: an ordinary Rust std program (threads, `HashMap`, `std::time`,
//! `std::net::TcpListener`) that runs unmodified in a unikernel image.
//!
//! Arguments: `--port N` (default 7) serves a line echo; `--panic` panics;
//! `--exit N` exits with status N after the self-check; `--spawn N` starts
//! N sleeping threads and reports how many the system allowed;
//! `--listeners N` binds N TCP listeners (ports 2000 on) and reports how
//! many the system allowed; `--udp N` also answers UDP datagrams on port
//! N (`std::net::UdpSocket`): each comes back prefixed with `udp N:`, N
//! counting the datagrams;
//! `--unsupported` tries a file, UDP and a host name lookup and prints
//! each outcome (an image has no file system, UDP or DNS); `--spin`
//! starts a thread that computes forever without a single system call
//! (the others must still be served: the monitor preempts it), the same
//! integer and floating-point rounds again and again, checking each
//! result against the first (`spin` answers `rounds=N bad=M`: a preemption
//! that lost a register would show as a bad round).
//! Each line is echoed back prefixed with `$GREETING` (default `echo`) and
//! how many lines that connection sent so far; `stats` answers with the
//! lines and connections served, `host` with the host the app runs on
//! (through libcloud in an image: it changes when the app migrates), and
//! `tick N` starts a thread that writes N `tick` lines on a clone of the
//! connection, 10 ms apart, while the connection's own thread reads on;
//! `udp-ask IP:PORT` sends `ping` from a UDP socket `connect`ed to
//! IP:PORT and answers with the datagram that came back.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[cfg(target_os = "hermit")]
use hermit_abi_impl as _;

/// Connections served at once; more wait in the listener's backlog.
const MAX_CLIENTS: u64 = 56;

#[derive(Default)]
struct Stats {
    lines: AtomicU64,
    connections: AtomicU64,
    open: AtomicU64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if args.iter().any(|a| a == "--panic") {
        let words: HashMap<&str, u32> = HashMap::new();
        panic!("std-echo was asked to panic ({} words known)", words.len());
    }
    self_check();
    if args.iter().any(|a| a == "--unsupported") {
        try_unsupported();
    }
    if let Some(n) = value("--spawn") {
        spawn_many(n.parse().unwrap_or(0));
    }
    if let Some(n) = value("--listeners") {
        listen_many(n.parse().unwrap_or(0));
    }
    if args.iter().any(|a| a == "--spin") {
        thread::spawn(spin_forever);
    }
    if let Some(code) = value("--exit") {
        std::process::exit(code.parse().unwrap_or(1));
    }
    if let Some(port) = value("--udp").and_then(|p| p.parse().ok()) {
        let udp = UdpSocket::bind(("0.0.0.0", port)).expect("UDP bind");
        thread::spawn(move || udp_echo(&udp));
    }
    let port: u16 = value("--port").and_then(|p| p.parse().ok()).unwrap_or(7);
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "echo".into());
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    println!("std-echo: listening on port {port}");
    let stats = Arc::new(Stats::default());
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("std-echo: accept: {e}");
                continue;
            }
        };
        if stats.open.load(Ordering::Relaxed) >= MAX_CLIENTS {
            drop(stream); // over the limit: closed at once
            continue;
        }
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (stats, greeting) = (stats.clone(), greeting.clone());
        let spawned = thread::Builder::new().stack_size(128 << 10).spawn(move || {
            if let Err(e) = serve(stream, &stats, &greeting) {
                eprintln!("std-echo: client: {e}");
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
        if let Err(e) = spawned {
            eprintln!("std-echo: no thread for a client: {e}");
        }
    }
}

fn serve(stream: TcpStream, stats: &Stats, greeting: &str) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    let mut seen = 0u64;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        seen += 1;
        stats.lines.fetch_add(1, Ordering::Relaxed);
        let text = line.trim_end();
        let reply = if let Some(n) = text.strip_prefix("tick ") {
            // A second thread writes on a clone of this connection while
            // this one goes on reading.
            let n: u32 = n.parse().unwrap_or(0).min(100);
            let mut out = stream.try_clone()?;
            thread::Builder::new().stack_size(64 << 10).spawn(move || {
                for i in 0..n {
                    thread::sleep(Duration::from_millis(10));
                    if writeln!(out, "tick {i}").is_err() {
                        break;
                    }
                }
            })?;
            "ticking\n".to_string()
        } else if let Some(to) = text.strip_prefix("udp-ask ") {
            format!("{}\n", udp_ask(to))
        } else if text == "spin" {
            format!(
                "rounds={} bad={}\n",
                SPIN_ROUNDS.load(Ordering::Relaxed),
                SPIN_BAD.load(Ordering::Relaxed)
            )
        } else if text == "host" {
            format!("{}\n", host())
        } else if text == "stats" {
            format!(
                "lines={} connections={}\n",
                stats.lines.load(Ordering::Relaxed),
                stats.connections.load(Ordering::Relaxed)
            )
        } else {
            format!("{greeting} {seen}: {text}\n")
        };
        writer.write_all(reply.as_bytes())?;
    }
}

/// Threads, a shared `HashMap`, sleeping and the clock, checked once at start.
fn self_check() {
    let start = Instant::now();
    let counts = Arc::new(Mutex::new(HashMap::new()));
    let workers: Vec<_> = (0..4)
        .map(|id| {
            let counts = counts.clone();
            thread::spawn(move || {
                for round in 0..3 {
                    *counts.lock().unwrap().entry(id).or_insert(0) += round + 1;
                    thread::sleep(Duration::from_millis(5));
                }
                id * 10
            })
        })
        .collect();
    let sum: i32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let counts = counts.lock().unwrap();
    let mut keys: Vec<_> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    keys.sort();
    println!(
        "std-echo: 4 threads joined (sum {sum}), counts [{}], took {} ms",
        keys.join(" "),
        start.elapsed().as_millis()
    );
}

/// Starts `n` threads that sleep for a second; prints how many started and
/// the error that stopped the rest, then joins them.
fn spawn_many(n: usize) {
    let mut handles = Vec::new();
    let mut error = None;
    for _ in 0..n {
        match thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(|| thread::sleep(Duration::from_millis(200)))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    println!(
        "std-echo: spawned {} threads, then: {error:?}",
        handles.len()
    );
    for h in handles {
        h.join().unwrap();
    }
}

/// Rounds `spin_forever` completed, and those whose result differed.
static SPIN_ROUNDS: AtomicU64 = AtomicU64::new(0);
static SPIN_BAD: AtomicU64 = AtomicU64::new(0);

/// Computes for good, with no system call at all (not even the clock).
fn spin_forever() {
    let reference = spin_round();
    loop {
        if spin_round() != reference {
            SPIN_BAD.fetch_add(1, Ordering::Relaxed);
        }
        SPIN_ROUNDS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Some floating-point (SSE) and integer work with a fixed result, its
/// state held in registers for the whole round.
fn spin_round() -> (u64, u64) {
    let mut acc = [1.0f64; 8];
    let mut h = 0u64;
    for i in 0..std::hint::black_box(3_000_000u64) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = *a * (0.999_999_9 - k as f64 * 1e-9) + (i & 7) as f64;
        }
        h = h.wrapping_mul(6364136223846793005).wrapping_add(i);
    }
    (acc.iter().fold(0, |s, a| s ^ a.to_bits()), h)
}

/// Answers each datagram on `udp` (at most 1,500 bytes are read: a longer
/// one is cut).
fn udp_echo(udp: &UdpSocket) {
    let mut buf = [0u8; 1500];
    let mut seen = 0u64;
    loop {
        let (n, from) = match udp.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("std-echo: UDP receive: {e}");
                continue;
            }
        };
        seen += 1;
        let mut reply = format!("udp {seen}: ").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        if let Err(e) = udp.send_to(&reply, from) {
            eprintln!("std-echo: UDP reply to {from}: {e}");
        }
    }
}

/// `ping` to `to` over a connected UDP socket (resent every 0.5 s, 20
/// times at most): the answer, or why there is none.
fn udp_ask(to: &str) -> String {
    let ask = || -> std::io::Result<String> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(to)?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 1500];
        let mut last = None;
        for _ in 0..20 {
            socket.send(b"ping")?;
            match socket.recv(&mut buf) {
                Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::ErrorKind::TimedOut.into()))
    };
    ask().unwrap_or_else(|e| format!("udp-ask: {e}"))
}

/// Binds `n` listeners on ports 2000, 2001, ...; prints how many it got
/// and the error that stopped the rest.
fn listen_many(n: u16) {
    let mut listeners = Vec::new();
    let mut error = None;
    for port in 2000..2000 + n {
        match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    println!(
        "std-echo: bound {} listeners, then: {error:?}",
        listeners.len()
    );
}

/// The host the app runs on.
#[cfg(target_os = "hermit")]
fn host() -> String {
    libcloud::host().name
}

#[cfg(not(target_os = "hermit"))]
fn host() -> String {
    "native".into()
}

/// Prints what files, a UDP socket and a name lookup give.
fn try_unsupported() {
    let file = std::fs::read("/etc/hostname").map(|b| b.len());
    println!("std-echo: read /etc/hostname: {file:?}");
    let created = std::fs::write("/tmp/out.txt", b"data");
    println!("std-echo: write /tmp/out.txt: {created:?}");
    let dir = std::fs::create_dir("/tmp/d");
    println!("std-echo: create_dir /tmp/d: {dir:?}");
    let listing = std::fs::read_dir("/").map(|d| d.count());
    println!("std-echo: read_dir /: {listing:?}");
    let meta = std::fs::metadata("/").map(|m| m.is_dir());
    println!("std-echo: metadata /: {meta:?}");
    let removed = std::fs::remove_file("/tmp/out.txt");
    println!("std-echo: remove_file /tmp/out.txt: {removed:?}");
    let udp = std::net::UdpSocket::bind("0.0.0.0:9").map(|_| ());
    println!("std-echo: UDP bind: {udp:?}");
    let dns = TcpStream::connect("example.invalid:80").map(|_| ());
    println!("std-echo: connect by name: {dns:?}");
}
