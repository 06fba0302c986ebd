//! hello: greets, shows its arguments, uptime and host, and exits 0.
//!
//! `--name NAME` picks whom to greet; `--bench` also times a fixed integer
//! loop with the TSC and the clock, to show ring-3 code runs at native speed.
#![no_std]
#![no_main]

use core::hint::black_box;
use libcloud::prelude::*;
use libcloud::time::{uptime, Instant};

#[libcloud::main]
fn main() {
    let args = libcloud::args();
    let name = args
        .iter()
        .position(|a| a == "--name")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("world");
    let host = libcloud::host();
    println!("Hello, {name}!");
    println!("args: {args:?}");
    println!("uptime: {:.3} ms", uptime().as_secs_f64() * 1e3);
    println!("host: {} (region {})", host.name, host.region);
    if args.iter().any(|a| a == "--bench") {
        bench_loop();
    }
}

/// A 10 M-iteration integer loop (its time tells ring 0 from ring 3 apart).
fn bench_loop() {
    const ITERATIONS: u64 = 10_000_000;
    let start = Instant::now();
    let tsc0 = tsc();
    let mut x = black_box(1u64);
    for i in 0..ITERATIONS {
        x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
    }
    let cycles = tsc() - tsc0;
    let took = start.elapsed();
    println!(
        "bench: {ITERATIONS}-iteration loop in ring {}: {:.3} ms, {:.2} TSC cycles/iteration (checksum {x:#x})",
        libcloud::current_ring(),
        took.as_secs_f64() * 1e3,
        cycles as f64 / ITERATIONS as f64
    );
}

fn tsc() -> u64 {
    // SAFETY: rdtsc has no side effects and is allowed in ring 3.
    unsafe { core::arch::x86_64::_rdtsc() }
}
