//! A daemon's guest addresses: the subnet all its guests and gateway share
//! (`serve --guest-net`, default [`DEFAULT_GUEST_NET`]), where in it the
//! gateway sits, and the pool it hands guest addresses out of.
//!
//! The subnet is cut into blocks of [`BLOCK`] addresses. Block 0 holds the
//! gateways: shim N's is the subnet's address N + 1 (distinct ids, distinct
//! gateways on one overlay). A shim without an overlay hands out every
//! address of the other blocks (a /16: 64,512); a shim on an overlay only
//! those of block N, so that shims joined by the overlay (one Ethernet
//! segment) never give two guests one address. A shim of a fleet on a
//! store (`serve --store`) is instead allocated a block of the fleet's
//! network by the store ([`GuestNet::block`]): its gateway is the block's
//! first address and its guests the rest, so a fleet is not limited to
//! the 14 ids but to the network's blocks (4,095 of a /10). The pool keeps no state of its own: the daemon
//! passes the addresses its live instances hold and takes the lowest free
//! one ([`GuestNet::lowest_free`]), so an address comes back when its
//! instance stops or moves away, whatever way that happens.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The default `--guest-net`.
pub const DEFAULT_GUEST_NET: GuestNet = GuestNet {
    net: Ipv4Addr::new(10, 0, 0, 0),
    prefix: 16,
};
/// Addresses per block (a /22).
pub const BLOCK: u32 = 1024;
/// Prefix lengths a guest network may have: at least two blocks, and the
/// guests' netmask must fit the kernel's command line syntax.
const PREFIXES: std::ops::RangeInclusive<u8> = 8..=21;

/// A guest subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestNet {
    net: Ipv4Addr,
    prefix: u8,
}

/// A `--guest-net` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestNetError {
    #[error("--guest-net {0}: not an IPv4 subnet (e.g. 10.0.0.0/16)")]
    Syntax(String),
    #[error(
        "--guest-net {0}: the prefix must be /8 to /21 (room for the gateways' block and guests)"
    )]
    Prefix(String),
    #[error("--guest-net {0}: host bits are set (the subnet starts at {1})")]
    HostBits(String, Ipv4Addr),
    #[error(
        "--guest-net {net} has {blocks} blocks of {BLOCK} addresses: shim id {id} on an \
         overlay needs block {id} (use a larger subnet or a smaller --shim-id)"
    )]
    NoBlock { net: GuestNet, blocks: u32, id: u8 },
    #[error(
        "{net} has {blocks} blocks of {BLOCK} addresses: block {index} is not one of 1..{blocks}"
    )]
    BlockOutOfRange {
        net: GuestNet,
        blocks: u32,
        index: u32,
    },
}

impl GuestNet {
    /// The subnet `net`/`prefix` (checked as [`FromStr`] does).
    pub fn new(net: Ipv4Addr, prefix: u8) -> Result<Self, GuestNetError> {
        format!("{net}/{prefix}").parse()
    }

    /// Its prefix length (the guests' netmask).
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn size(&self) -> u32 {
        1u32 << (32 - u32::from(self.prefix))
    }

    fn at(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) + offset)
    }

    /// Shim `shim_id`'s gateway.
    pub fn gateway(&self, shim_id: u8) -> Ipv4Addr {
        self.at(u32::from(shim_id) + 1)
    }

    /// The addresses shim `shim_id` hands out (first, last), checking
    /// that an overlay shim has its block.
    pub fn pool(&self, shim_id: u8, overlay: bool) -> Result<(Ipv4Addr, Ipv4Addr), GuestNetError> {
        let blocks = self.size() / BLOCK;
        if !overlay {
            // Everything past block 0 but the broadcast address.
            return Ok((self.at(BLOCK), self.at(self.size() - 2)));
        }
        let id = u32::from(shim_id);
        if id == 0 || id >= blocks {
            return Err(GuestNetError::NoBlock {
                net: *self,
                blocks,
                id: shim_id,
            });
        }
        let last = if id == blocks - 1 {
            BLOCK - 2
        } else {
            BLOCK - 1
        };
        Ok((self.at(id * BLOCK), self.at(id * BLOCK + last)))
    }

    /// How many blocks of [`BLOCK`] addresses it has.
    pub fn blocks(&self) -> u32 {
        self.size() / BLOCK
    }

    /// Block `index`'s gateway (its first address) and the addresses it
    /// hands out (the rest; the network's last block leaves out the
    /// broadcast address). Block 0 (the network's own address and the
    /// `--shim-id` gateways) is no shim's.
    pub fn block(&self, index: u32) -> Result<(Ipv4Addr, (Ipv4Addr, Ipv4Addr)), GuestNetError> {
        let blocks = self.blocks();
        if index == 0 || index >= blocks {
            return Err(GuestNetError::BlockOutOfRange {
                net: *self,
                blocks,
                index,
            });
        }
        let first = index * BLOCK;
        let last = if index == blocks - 1 {
            first + BLOCK - 2
        } else {
            first + BLOCK - 1
        };
        Ok((self.at(first), (self.at(first + 1), self.at(last))))
    }

    /// How many addresses `pool` holds.
    pub fn capacity((first, last): (Ipv4Addr, Ipv4Addr)) -> usize {
        (u32::from(last) - u32::from(first) + 1) as usize
    }

    /// The lowest address of `pool` not in `used`.
    pub fn lowest_free(
        (first, last): (Ipv4Addr, Ipv4Addr),
        used: &BTreeSet<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let mut want = u32::from(first);
        for &ip in used.range(first..=last) {
            if u32::from(ip) != want {
                break;
            }
            want += 1;
        }
        (want <= u32::from(last)).then(|| Ipv4Addr::from(want))
    }
}

impl fmt::Display for GuestNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl FromStr for GuestNet {
    type Err = GuestNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || GuestNetError::Syntax(s.to_owned());
        let (net, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let net: Ipv4Addr = net.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        if !PREFIXES.contains(&prefix) {
            return Err(GuestNetError::Prefix(s.to_owned()));
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        let start = Ipv4Addr::from(u32::from(net) & mask);
        if start != net {
            return Err(GuestNetError::HostBits(s.to_owned(), start));
        }
        Ok(Self { net, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_default_gives_a_lone_shim_64_thousand_addresses_and_an_overlay_shim_its_block() {
        let net = DEFAULT_GUEST_NET;
        assert_eq!(net.to_string(), "10.0.0.0/16");
        assert_eq!(net.gateway(1), ip("10.0.0.2"));
        assert_eq!(net.gateway(14), ip("10.0.0.15"));
        let alone = net.pool(1, false).unwrap();
        assert_eq!(alone, (ip("10.0.4.0"), ip("10.0.255.254")));
        assert_eq!(GuestNet::capacity(alone), 65_536 - 1024 - 1);
        assert_eq!(
            net.pool(1, true).unwrap(),
            (ip("10.0.4.0"), ip("10.0.7.255"))
        );
        assert_eq!(
            net.pool(14, true).unwrap(),
            (ip("10.0.56.0"), ip("10.0.59.255"))
        );
        // Blocks never overlap one another or the gateways.
        let (a, b) = (net.pool(1, true).unwrap(), net.pool(2, true).unwrap());
        assert_eq!(u32::from(a.1) + 1, u32::from(b.0));
        assert!(u32::from(net.gateway(14)) < u32::from(a.0));
    }

    #[test]
    fn the_last_block_leaves_out_the_broadcast_address_and_small_nets_are_checked() {
        let net: GuestNet = "192.168.0.0/20".parse().unwrap();
        assert_eq!(
            net.pool(3, true).unwrap(),
            (ip("192.168.12.0"), ip("192.168.15.254"))
        );
        assert!(matches!(
            net.pool(4, true),
            Err(GuestNetError::NoBlock { blocks: 4, .. })
        ));
        assert_eq!(net.pool(9, false).unwrap().1, ip("192.168.15.254"));
        for bad in [
            "10.0.0.0",
            "10.0.0/16",
            "10.0.0.0/x",
            "10.0.0.0/22",
            "10.0.0.0/7",
        ] {
            assert!(bad.parse::<GuestNet>().is_err(), "{bad}");
        }
        assert_eq!(
            "10.0.1.0/16".parse::<GuestNet>(),
            Err(GuestNetError::HostBits(
                "10.0.1.0/16".into(),
                ip("10.0.0.0")
            ))
        );
    }

    #[test]
    fn a_store_allocated_block_has_its_gateway_first_and_1023_guests() {
        let net: GuestNet = "10.64.0.0/10".parse().unwrap();
        assert_eq!(net.blocks(), 4096);
        let (gw, pool) = net.block(1).unwrap();
        assert_eq!(gw, ip("10.64.4.0"));
        assert_eq!(pool, (ip("10.64.4.1"), ip("10.64.7.255")));
        assert_eq!(GuestNet::capacity(pool), 1023);
        // Far past the 14 shim ids, and the last block keeps the broadcast address out.
        let (gw, pool) = net.block(4095).unwrap();
        assert_eq!(gw, ip("10.127.252.0"));
        assert_eq!(pool, (ip("10.127.252.1"), ip("10.127.255.254")));
        for bad in [0, 4096] {
            assert!(matches!(
                net.block(bad),
                Err(GuestNetError::BlockOutOfRange { blocks: 4096, .. })
            ));
        }
        // Neighbouring blocks do not overlap.
        let (_, a) = net.block(2).unwrap();
        let (gw3, _) = net.block(3).unwrap();
        assert_eq!(u32::from(a.1) + 1, u32::from(gw3));
    }

    #[test]
    fn the_lowest_free_address_is_taken_and_a_full_pool_has_none() {
        let pool = (ip("10.0.4.0"), ip("10.0.4.3"));
        let mut used = BTreeSet::new();
        used.insert(ip("10.0.0.2")); // outside the pool: no matter
        assert_eq!(GuestNet::lowest_free(pool, &used), Some(ip("10.0.4.0")));
        used.extend([ip("10.0.4.0"), ip("10.0.4.1"), ip("10.0.4.3")]);
        assert_eq!(GuestNet::lowest_free(pool, &used), Some(ip("10.0.4.2")));
        used.insert(ip("10.0.4.2"));
        assert_eq!(GuestNet::lowest_free(pool, &used), None);
        used.remove(&ip("10.0.4.1"));
        assert_eq!(GuestNet::lowest_free(pool, &used), Some(ip("10.0.4.1")));
    }
}
