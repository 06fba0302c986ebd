//! netcheck: network probes for tests and benchmarks. The first argument
//! picks the mode:
//!
//! - `ping IP [COUNT]`          ICMP echo; prints each round trip, then `ping ok`
//! - `echo PORT`                TCP echo server (runs until stopped)
//! - `connect IP PORT MESSAGE`  sends MESSAGE to an echo server, prints `echoed: MESSAGE`
//! - `sink PORT`                TCP discard server; prints bytes and MB/s per connection
#![no_std]
#![no_main]

use core::net::Ipv4Addr;
use libcloud::net::icmp::ping::{PingManager, PingParams};
use libcloud::net::icmp::PacketMetadata;
use libcloud::net::{Stack, TcpSocket, Write};
use libcloud::prelude::*;
use libcloud::time::Instant;

#[libcloud::main]
async fn main() -> Result<(), String> {
    let args = libcloud::args();
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| format!("missing argument {i}"))
    };
    let stack = libcloud::net::start().await.map_err(|e| format!("{e}"))?;
    match arg(0)? {
        "ping" => {
            let ip: Ipv4Addr = arg(1)?.parse().map_err(|_| "bad IP".to_string())?;
            let count = args.get(2).and_then(|c| c.parse().ok()).unwrap_or(3);
            ping(stack, ip, count).await
        }
        "echo" => {
            let port = parse_port(arg(1)?)?;
            libcloud::net::serve_tcp(stack, port, 8, async |socket| echo(socket).await);
            println!("echo: listening on port {port}");
            core::future::pending().await
        }
        "connect" => {
            let ip: Ipv4Addr = arg(1)?.parse().map_err(|_| "bad IP".to_string())?;
            let port = parse_port(arg(2)?)?;
            connect(stack, ip, port, arg(3)?).await
        }
        "sink" => {
            let port = parse_port(arg(1)?)?;
            libcloud::net::serve_tcp(stack, port, 4, async |socket| sink(socket).await);
            println!("sink: listening on port {port}");
            core::future::pending().await
        }
        other => Err(format!("unknown mode {other:?}")),
    }
}

/// How long `ping` and `connect` retry while the peer is not up yet.
const RETRY_FOR: Duration = Duration::from_secs(10);

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("bad port {s:?}"))
}

async fn ping(stack: Stack<'static>, ip: Ipv4Addr, count: u16) -> Result<(), String> {
    let (mut rx_meta, mut tx_meta) = ([PacketMetadata::EMPTY; 4], [PacketMetadata::EMPTY; 4]);
    let (mut rx, mut tx) = ([0u8; 512], [0u8; 512]);
    let mut pinger = PingManager::new(stack, &mut rx_meta, &mut rx, &mut tx_meta, &mut tx);
    let mut params = PingParams::new(ip);
    params.set_payload(b"libcloud netcheck");
    let give_up = Instant::now() + RETRY_FOR;
    let mut answered = 0;
    while answered < count {
        match pinger.ping(&params).await {
            Ok(rtt) => {
                println!("ping {ip}: rtt {} us", rtt.as_micros());
                answered += 1;
            }
            // The peer may still be booting: retry for a while.
            Err(e) if Instant::now() < give_up => {
                libcloud::log::info!("ping {ip}: {e:?}, retrying")
            }
            Err(e) => return Err(format!("ping {ip}: {e:?}")),
        }
    }
    println!("ping ok");
    Ok(())
}

async fn echo(socket: &mut TcpSocket<'_>) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if socket.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn connect(
    stack: Stack<'static>,
    ip: Ipv4Addr,
    port: u16,
    message: &str,
) -> Result<(), String> {
    let (mut rx, mut tx) = (vec![0u8; 4096], vec![0u8; 4096]);
    let give_up = Instant::now() + RETRY_FOR;
    let mut socket = loop {
        let mut socket = TcpSocket::new(stack, &mut rx, &mut tx);
        match socket.connect((ip, port)).await {
            Ok(()) => break socket,
            // The peer may still be booting: retry for a while.
            Err(e) if Instant::now() < give_up => {
                libcloud::log::info!("connect {ip}:{port}: {e:?}, retrying");
                drop(socket);
                libcloud::time::sleep_async(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("connect {ip}:{port}: {e:?}")),
        }
    };
    socket
        .write_all(message.as_bytes())
        .await
        .map_err(|e| format!("write: {e:?}"))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.len() < message.len() {
        match socket.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e:?}")),
        }
    }
    println!("echoed: {}", String::from_utf8_lossy(&got));
    socket.close();
    let _ = socket.flush().await;
    Ok(())
}

async fn sink(socket: &mut TcpSocket<'_>) {
    let mut buf = vec![0u8; 16 * 1024];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    println!(
        "sink: received {total} bytes in {:.1} ms ({:.1} MB/s)",
        secs * 1e3,
        total as f64 / secs / 1e6
    );
    let _ = socket.write_all(format!("{total}\n").as_bytes()).await;
}
