//! The interface's addresses: static from the shim's `lc.ip=ADDR/PREFIX`
//! and `lc.gw=ADDR`, or DHCP when the monitor gives none (QEMU user net).

use abi::cmdline::{GATEWAY_KEY, IP_KEY};
use embassy_net::{Config, DhcpConfig, Ipv4Address, Ipv4Cidr, StaticConfigV4};

use crate::Error;

/// DHCP with quick retries: smoltcp's defaults wait 10 s before the
/// second DISCOVER and 5 s before the second REQUEST, so one datagram lost
/// while QEMU's user network starts (seen on a loaded host) cost the guest
/// 5 to 20 s of its boot.
fn dhcp() -> DhcpConfig {
    let mut config = DhcpConfig::default();
    config.retry_config.discover_timeout = smoltcp::time::Duration::from_millis(500);
    config.retry_config.initial_request_timeout = smoltcp::time::Duration::from_millis(500);
    config.retry_config.request_retries = 8;
    config
}

/// Reads the configuration from the command line.
pub fn from_cmdline() -> Result<Config, Error> {
    let cmdline = kernel::cmdline::get();
    let Some(ip) = cmdline.param(IP_KEY) else {
        return Ok(Config::dhcpv4(dhcp()));
    };
    let (addr, prefix) = ip.split_once('/').unwrap_or((ip, "24"));
    let address: Ipv4Address = addr
        .parse()
        .map_err(|_| Error::BadConfig("lc.ip address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or(Error::BadConfig("lc.ip prefix"))?;
    let gateway = match cmdline.param(GATEWAY_KEY) {
        Some(gw) => Some(gw.parse().map_err(|_| Error::BadConfig("lc.gw address"))?),
        None => None,
    };
    Ok(Config::ipv4_static(StaticConfigV4 {
        address: Ipv4Cidr::new(address, prefix),
        gateway,
        dns_servers: Default::default(),
    }))
}
