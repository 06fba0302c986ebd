//! hostile: a guest that attacks its host, for the tests that prove the
//! daemon stays bounded. Its first argument picks the attack; each runs
//! until the instance is stopped:
//!
//! - `console-flood`    console output without a newline, in the longest
//!   writes the host takes: megabytes a second
//! - `delta-flood [KIB]` a full checkpoint, then incremental deltas of KIB
//!   (default 512) KiB in a loop; a refused delta is answered with a new
//!   full checkpoint, as `libcloud::state` does
//! - `broadcast-flood`  UDP datagrams to 255.255.255.255 in a tight loop
//! - `net-spin`         one datagram (its vCPU thread then sits next to the
//!   network thread), then computes without ever waiting
//! - `warn-flood`       hypercalls the host warns about (unknown numbers,
//!   console writes outside RAM) in a loop
//! - `disk-fill [KIB]`  the same with KIB (default 4096) KiB blobs, run with
//!   `--checkpoint-to DIR`: full checkpoints as fast as possible, each
//!   continued by deltas (appended to the file) until the host refuses one
//!
//! Every so often each mode prints one progress line (`MODE: N ...`).
#![no_std]
#![no_main]

use abi::hypercall::{ConsoleWrite, CONSOLE_WRITE_MAX, HC_CONSOLE_WRITE};
use kernel::checkpoint::{save, Saved};
use libcloud::net::{IpAddress, IpEndpoint, PacketMetadata, UdpSocket};
use libcloud::prelude::*;

/// The app name its checkpoints carry.
const APP: &str = "hostile";

#[libcloud::main]
async fn main() -> Result<(), String> {
    let args = libcloud::args();
    let kib =
        |default: usize| -> usize { args.get(1).and_then(|s| s.parse().ok()).unwrap_or(default) };
    match args.first().map(String::as_str) {
        Some("console-flood") => console_flood(),
        Some("delta-flood") => delta_flood(kib(512) << 10),
        Some("disk-fill") => delta_flood(kib(4096) << 10),
        Some("warn-flood") => warn_flood(),
        Some("broadcast-flood") => broadcast_flood().await,
        Some("net-spin") => net_spin().await,
        other => Err(format!("unknown hostile mode {other:?}")),
    }
}

/// The longest console writes the host takes, none with a newline.
fn console_flood() -> Result<(), String> {
    let chunk = vec![b'x'; CONSOLE_WRITE_MAX as usize];
    let req = ConsoleWrite {
        buf: chunk.as_ptr() as u64,
        len: chunk.len() as u64,
    };
    loop {
        kernel::platform::hypercall(HC_CONSOLE_WRITE, &req as *const _ as u64);
    }
}

/// Checkpoints of `size` bytes: a full one, then deltas until the host
/// refuses one (then a full one again).
fn delta_flood(size: usize) -> Result<(), String> {
    let payload = vec![0x5au8; size];
    let (mut stored, mut refused) = (0u64, 0u64);
    let mut chain: Option<(u32, u64)> = None;
    for round in 0u64.. {
        let (blob, full) = match chain {
            Some((base, seq)) => (
                abi::checkpoint::encode_delta(APP, 1, base, seq + 1, &payload),
                false,
            ),
            None => (abi::checkpoint::encode(APP, 1, &payload), true),
        };
        match save(&blob) {
            Saved::Stored => {
                stored += 1;
                chain = Some(if full {
                    let id = abi::checkpoint::decode(&blob)
                        .map_err(|e| e.to_string())?
                        .0
                        .id;
                    (id, 0)
                } else {
                    let (base, seq) = chain.expect("a delta continues a chain");
                    (base, seq + 1)
                });
            }
            Saved::Refused => {
                refused += 1;
                chain = None;
            }
        }
        if round % 64 == 0 {
            println!("checkpoints: {stored} stored, {refused} refused");
        }
    }
    Ok(())
}

fn warn_flood() -> Result<(), String> {
    let outside = ConsoleWrite {
        buf: 0xffff_0000_0000,
        len: 64,
    };
    for round in 0u64.. {
        // Inside the doorbell page, and outside it (unclaimed MMIO).
        kernel::platform::hypercall(99, round);
        kernel::platform::hypercall(4242, round);
        kernel::platform::hypercall(HC_CONSOLE_WRITE, &outside as *const _ as u64);
        if round % 10_000 == 0 {
            println!("warn-flood: {round} rounds");
        }
    }
    Ok(())
}

/// One datagram, one exit (the host serves the card and seats the vCPU
/// thread next to the network thread), then a loop that never waits.
async fn net_spin() -> Result<(), String> {
    let stack = libcloud::net::start().await.map_err(|e| format!("{e}"))?;
    let (mut rx_meta, mut tx_meta) = ([PacketMetadata::EMPTY; 1], [PacketMetadata::EMPTY; 1]);
    let (mut rx, mut tx) = (vec![0u8; 512], vec![0u8; 512]);
    let mut socket = UdpSocket::new(stack, &mut rx_meta, &mut rx, &mut tx_meta, &mut tx);
    socket.bind(9998).map_err(|e| format!("bind: {e:?}"))?;
    let to = IpEndpoint::new(IpAddress::v4(255, 255, 255, 255), 9);
    socket
        .send_to(b"hello", to)
        .await
        .map_err(|e| format!("send: {e:?}"))?;
    libcloud::task::yield_now().await;
    println!("net-spin: computing");
    let mut x = 0u64;
    loop {
        x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

async fn broadcast_flood() -> Result<(), String> {
    let stack = libcloud::net::start().await.map_err(|e| format!("{e}"))?;
    let (mut rx_meta, mut tx_meta) = ([PacketMetadata::EMPTY; 4], [PacketMetadata::EMPTY; 64]);
    let (mut rx, mut tx) = (vec![0u8; 2048], vec![0u8; 64 * 1024]);
    let mut socket = UdpSocket::new(stack, &mut rx_meta, &mut rx, &mut tx_meta, &mut tx);
    socket.bind(9999).map_err(|e| format!("bind: {e:?}"))?;
    let to = IpEndpoint::new(IpAddress::v4(255, 255, 255, 255), 9);
    let datagram = [0xbbu8; 1024];
    for sent in 0u64.. {
        socket
            .send_to(&datagram, to)
            .await
            .map_err(|e| format!("send: {e:?}"))?;
        if sent % 100_000 == 0 {
            println!("broadcast-flood: {sent} datagrams");
        }
    }
    Ok(())
}
