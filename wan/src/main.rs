//! `wan-relay`: run delaying relays between emulated regions.
//!
//! ```text
//! wan-relay tcp --listen 127.0.0.1:16379 --to 127.0.0.1:6379 --delay 40ms
//! wan-relay udp --listen 127.0.0.1:14789 --to 127.0.0.1:4789 --delay 45ms [--from 127.0.0.1:24789]
//! ```
//!
//! Each direction is delayed by `--delay`, so a round trip gains twice it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
enum Protocol {
    Tcp,
    Udp,
}

/// Relay TCP connections or UDP datagrams to a target with a one-way delay.
#[derive(Parser)]
#[command(name = "wan-relay", version)]
struct Cli {
    /// What to relay.
    #[arg(value_enum)]
    protocol: Protocol,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Address to forward to.
    #[arg(long)]
    to: SocketAddr,
    /// UDP: the address to send to the target from [default: any port of
    /// the --listen address].
    #[arg(long)]
    from: Option<SocketAddr>,
    /// One-way delay added in each direction (e.g. 40ms, 0.1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Duration,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let local = match cli.protocol {
        Protocol::Tcp => wan::tcp::TcpRelay::start(cli.listen, cli.to, cli.delay)
            .with_context(|| format!("listening on {}", cli.listen))?
            .local_addr(),
        Protocol::Udp => wan::udp::UdpRelay::start_from(
            cli.listen,
            cli.from
                .unwrap_or_else(|| SocketAddr::new(cli.listen.ip(), 0)),
            cli.to,
            cli.delay,
        )
        .with_context(|| format!("listening on {}", cli.listen))?
        .local_addr(),
    };
    eprintln!(
        "wan-relay: {local} -> {} with {:?} each way",
        cli.to, cli.delay
    );
    loop {
        std::thread::park();
    }
}
