//! The interface's addresses: static from the shim's `lc.ip=ADDR/PREFIX`
//! and `lc.gw=ADDR`, or DHCP when the monitor gives none (QEMU user net).

use abi::cmdline::{GATEWAY_KEY, IP_KEY};
use embassy_net::{Config, Ipv4Address, Ipv4Cidr, StaticConfigV4};

use crate::Error;

/// Reads the configuration from the command line.
pub fn from_cmdline() -> Result<Config, Error> {
    let cmdline = kernel::cmdline::get();
    let Some(ip) = cmdline.param(IP_KEY) else {
        return Ok(Config::dhcpv4(Default::default()));
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
