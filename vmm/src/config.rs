//! What a run is asked to do: [`RunConfig`] and the parsers of the values
//! that arrive as command-line flags (memory size, timeout, `KEY=VALUE`).
//!
//! The parsers return plain `String` errors so clap can show them next to
//! the flag that carried them.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use abi::layout::{LARGE_PAGE_SIZE, MAX_MEM_SIZE, MIN_MEM_SIZE};

use hostnet::{
    in_subnet, mac_for, NetMode, NetworkConfig, Nic, PublishSpec, USER_FIRST_GUEST, USER_GATEWAY,
    USER_PREFIX, USER_SUBNET,
};

const MIB: u64 = 1 << 20;

/// Which monitor boots the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Backend {
    /// Our own KVM monitor: the guest starts directly in 64-bit ring 3.
    Kvm,
    /// QEMU microvm, booting the image's PVH entry.
    Qemu,
    /// Firecracker, booting the image's PVH entry (`--firecracker PATH` or
    /// `$FIRECRACKER`).
    Firecracker,
}

/// QEMU's accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum QemuAccel {
    /// Pure emulation (`-accel tcg -cpu max`).
    Tcg,
    /// Hardware virtualization (`-accel kvm -cpu host,-arch-capabilities`).
    Kvm,
}

/// Everything a backend needs to run one guest.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub image: PathBuf,
    /// Bytes of guest RAM; a valid size (see [`parse_mem_size`]).
    pub mem_size: u64,
    pub backend: Backend,
    /// Stop the guest after this long (exit status 124).
    pub timeout: Option<Duration>,
    /// The guest command line, without its NUL (see [`crate::boot::cmdline`]).
    pub cmdline: String,
    pub qemu_accel: QemuAccel,
    /// The KVM device node (`/dev/kvm`).
    pub kvm_device: PathBuf,
    /// The Firecracker binary (`--firecracker`); `None`: `$FIRECRACKER`.
    pub firecracker: Option<PathBuf>,
    /// The guests' network; `None`: no network device.
    pub network: Option<NetworkConfig>,
    /// More guests in the same process and on the same switch (`--also`),
    /// each on its own vCPU thread with `mem_size` bytes of RAM.
    pub also: Vec<GuestSpec>,
    /// An app checkpoint (`abi::checkpoint`) handed to the main guest.
    pub restore: Option<PathBuf>,
    /// Where the main guest's checkpoints are stored (`DIR/latest.ckpt`).
    pub checkpoint_to: Option<PathBuf>,
    /// The bound of its checkpoint chain (`--max-checkpoint`); `None`: by
    /// its memory ([`crate::checkpoint::limit_for`]).
    pub checkpoint_max: Option<u64>,
}

/// One more guest (`--also`).
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub image: PathBuf,
    /// Its console lines are prefixed with `[name] `.
    pub name: String,
    /// Its command line, without the NUL.
    pub cmdline: String,
}

/// Parses a guest memory size: a byte count with an optional binary suffix
/// (`K`, `M`, `G`, optionally followed by `iB` or `B`, any case), e.g. `64M`,
/// `1G`, `33554432`. The result is a multiple of 2 MiB within
/// [`MIN_MEM_SIZE`, `MAX_MEM_SIZE`].
pub fn parse_mem_size(s: &str) -> Result<u64, String> {
    let bytes = parse_byte_size(s)?;
    check_mem_size(bytes)?;
    Ok(bytes)
}

/// Parses a byte count with an optional binary suffix (`K`, `M`, `G`,
/// optionally followed by `iB` or `B`, any case), e.g. `8M`, `512K`.
pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "'{s}' is not a size: expected a number with an optional K, M or G suffix (e.g. 64M)"
        ));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size suffix '{other}': use K, M or G")),
    };
    let value: u64 = digits.parse().map_err(|_| format!("'{s}' is too large"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Checks that `bytes` is a guest memory size the layout allows.
pub fn check_mem_size(bytes: u64) -> Result<(), String> {
    if !bytes.is_multiple_of(LARGE_PAGE_SIZE) {
        return Err(format!(
            "{bytes} bytes is not a multiple of 2 MiB (guest RAM is mapped with 2 MiB pages)"
        ));
    }
    if bytes < MIN_MEM_SIZE {
        return Err(format!(
            "{} MiB is too small: the minimum is {} MiB",
            bytes / MIB,
            MIN_MEM_SIZE / MIB
        ));
    }
    if bytes > MAX_MEM_SIZE {
        return Err(format!(
            "{} MiB is too large: the maximum is {} MiB (RAM must end below the device window)",
            bytes / MIB,
            MAX_MEM_SIZE / MIB
        ));
    }
    Ok(())
}

/// Parses one `KEY=VALUE` environment entry. The key must be non-empty.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, _)) if key.starts_with("lc.") || key == abi::cmdline::VIRTIO_MMIO_KEY => {
            Err(format!(
                "'{key}' is reserved for the shim: lc.* keys and {} are not environment",
                abi::cmdline::VIRTIO_MMIO_KEY
            ))
        }
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        Some(_) => Err(format!("'{s}' has an empty key: expected KEY=VALUE")),
        None => Err(format!("'{s}' has no '=': expected KEY=VALUE")),
    }
}

pub use ::api::publish::{parse_publish, PUBLISH_SYNTAX};

/// Parses `--net`: `none`, `user` or `tap=NAME`.
pub fn parse_net_mode(s: &str) -> Result<NetMode, String> {
    match s {
        "none" => Ok(NetMode::None),
        "user" => Ok(NetMode::User),
        _ => match s.strip_prefix("tap=") {
            Some(name) if !name.is_empty() && name.len() < 16 && !name.contains('/') => {
                Ok(NetMode::Tap(name.to_owned()))
            }
            Some(name) => Err(format!(
                "'{name}' is not a network interface name (1 to 15 bytes, no '/')"
            )),
            None => Err(format!("unknown network '{s}': use none, user or tap=NAME")),
        },
    }
}

/// Parses a MAC address `52:54:00:12:34:56` (or with `-`); refuses group
/// (multicast) and all-zero addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = s
        .split([':', '-'])
        .map(|b| {
            if b.len() == 2 {
                u8::from_str_radix(b, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()
        .ok_or_else(|| {
            format!("'{s}' is not a MAC address (expected six hex bytes, e.g. 02:00:00:00:00:01)")
        })?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| {
        format!("'{s}' is not a MAC address (expected six hex bytes, e.g. 02:00:00:00:00:01)")
    })?;
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{s} is a multicast address (the lowest bit of the first byte is set): a card needs              a unicast one"
        ));
    }
    if mac == [0; 6] {
        return Err("00:00:00:00:00:00 is not a usable MAC address".into());
    }
    Ok(mac)
}

/// Parses `ADDR[/PREFIX]` (the prefix defaults to 24; `api::GuestAddr`'s
/// syntax, with a prefix of at least 1).
pub fn parse_ip_prefix(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let a: api::GuestAddr = match s.contains('/') {
        true => s.parse()?,
        false => format!("{s}/24").parse()?,
    };
    if a.prefix == 0 {
        return Err(format!("'{s}': a prefix length of 0 leaves no network"));
    }
    Ok((a.ip, a.prefix))
}

/// Parses an IPv4 address.
pub fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not an IPv4 address"))
}

/// The network flags of `run`.
#[derive(Clone, Debug, Default)]
pub struct NetOptions {
    pub net: Option<NetMode>,
    pub publish: Vec<PublishSpec>,
    pub mac: Option<[u8; 6]>,
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
}

/// Decides the network of a run with `guests` guests (the main one and
/// each `--also`): the mode, and each guest's card and addresses. `None`:
/// no network (no network flag was given, or `--net none`).
pub fn plan_network(opts: &NetOptions, guests: usize) -> Result<Option<NetworkConfig>, String> {
    let mode = match (&opts.net, opts.publish.is_empty()) {
        (Some(mode), _) => mode.clone(),
        (None, false) => NetMode::User,
        (None, true) => NetMode::None,
    };
    let needs_net =
        |flag: &str| format!("{flag} needs a network: add --net user, --net tap=NAME or --publish");
    if mode == NetMode::None {
        if !opts.publish.is_empty() {
            return Err("--publish needs the user-mode network, not --net none".into());
        }
        for (given, flag) in [
            (opts.mac.is_some(), "--mac"),
            (opts.ip.is_some(), "--ip"),
            (opts.gateway.is_some(), "--gateway"),
        ] {
            if given {
                return Err(needs_net(flag));
            }
        }
        return Ok(None);
    }
    if let NetMode::Tap(_) = mode {
        if !opts.publish.is_empty() {
            return Err("--publish works with the user-mode network (--net user), not with a TAP                         device: there the host reaches the guest directly"
                .into());
        }
    }
    let (ip, prefix) = opts.ip.unwrap_or((USER_FIRST_GUEST, USER_PREFIX));
    let gateway = match (&mode, opts.gateway) {
        (NetMode::User, Some(gw)) if gw != USER_GATEWAY => {
            return Err(format!(
                "--gateway {gw}: the user-mode network's gateway is {USER_GATEWAY}"
            ))
        }
        (NetMode::User, _) => Some(USER_GATEWAY),
        (_, Some(gw)) => Some(gw),
        (_, None) if in_subnet(ip, USER_SUBNET, USER_PREFIX) && ip != USER_GATEWAY => {
            Some(USER_GATEWAY)
        }
        (_, None) => None,
    };
    let network = u32::from(ip) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let broadcast = network | !u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let usable = |a: Ipv4Addr| {
        let n = u32::from(a);
        in_subnet(a, ip, prefix) && n != network && n != broadcast && Some(a) != gateway
    };
    if mode == NetMode::User && (!in_subnet(ip, USER_SUBNET, USER_PREFIX) || prefix != USER_PREFIX)
    {
        return Err(format!(
            "--ip {ip}/{prefix}: the user-mode network is {USER_SUBNET}/{USER_PREFIX}"
        ));
    }
    if !usable(ip) && prefix < 31 {
        return Err(format!(
            "--ip {ip}/{prefix}: that is the subnet's network, broadcast or gateway address"
        ));
    }
    if let Some(gw) = gateway {
        if !in_subnet(gw, ip, prefix) {
            return Err(format!("--gateway {gw} is outside {ip}/{prefix}"));
        }
    }
    let mut nics = vec![Nic {
        mac: opts.mac.unwrap_or_else(|| mac_for(ip)),
        ip,
        prefix,
        gateway,
    }];
    let mut next = u32::from(ip);
    while nics.len() < guests {
        next = next.wrapping_add(1);
        let candidate = Ipv4Addr::from(next);
        if !in_subnet(candidate, ip, prefix) || next == broadcast {
            return Err(format!(
                "{guests} guests do not fit in {ip}/{prefix} from {ip} upward"
            ));
        }
        if usable(candidate) {
            nics.push(Nic {
                mac: mac_for(candidate),
                ip: candidate,
                prefix,
                gateway,
            });
        }
    }
    Ok(Some(NetworkConfig {
        mode,
        publish: opts.publish.clone(),
        nics,
    }))
}

/// This machine's host name, for `lc.host` (falls back to `localhost`).
pub fn default_host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(s: &str) -> PublishSpec {
        parse_publish(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn mem_sizes_with_and_without_suffixes() {
        assert_eq!(parse_mem_size("64M"), Ok(64 * MIB));
        assert_eq!(parse_mem_size("64m"), Ok(64 * MIB));
        assert_eq!(parse_mem_size("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_mem_size("1G"), Ok(1024 * MIB));
        assert_eq!(parse_mem_size("33554432"), Ok(32 * MIB));
        assert_eq!(parse_mem_size("4096K"), Ok(4 * MIB));
        assert_eq!(parse_mem_size("3G"), Ok(MAX_MEM_SIZE));
    }

    #[test]
    fn mem_sizes_out_of_the_layout_are_refused() {
        let err = parse_mem_size("3M").unwrap_err();
        assert!(err.contains("multiple of 2 MiB"), "{err}");
        let err = parse_mem_size("2M").unwrap_err();
        assert!(err.contains("too small"), "{err}");
        let err = parse_mem_size("4G").unwrap_err();
        assert!(err.contains("too large"), "{err}");
        assert!(parse_mem_size("0").is_err());
        assert!(parse_mem_size("").is_err());
        assert!(parse_mem_size("M").is_err());
        assert!(parse_mem_size("64X").unwrap_err().contains("suffix"));
        assert!(parse_mem_size("99999999999999999999").is_err());
        assert!(parse_mem_size("99999999999G").is_err());
        assert!(parse_mem_size("-64M").is_err());
    }

    #[test]
    fn env_entries() {
        assert_eq!(parse_env("A=b"), Ok(("A".into(), "b".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), "".into())));
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=b").is_err());
        assert!(parse_env("AB").is_err());
        assert!(parse_env("lc.host=x").unwrap_err().contains("reserved"));
        assert!(parse_env("virtio_mmio.device=1@2:3").is_err());
    }

    #[test]
    fn net_modes_macs_and_addresses() {
        assert_eq!(parse_net_mode("user"), Ok(NetMode::User));
        assert_eq!(parse_net_mode("none"), Ok(NetMode::None));
        assert_eq!(parse_net_mode("tap=tap0"), Ok(NetMode::Tap("tap0".into())));
        assert!(parse_net_mode("tap=").is_err());
        assert!(parse_net_mode("tap=waytoolonginterfacename").is_err());
        assert!(parse_net_mode("slirp")
            .unwrap_err()
            .contains("unknown network"));
        assert_eq!(parse_mac("02:00:0A:0b:0c:0d"), Ok([2, 0, 10, 11, 12, 13]));
        assert_eq!(
            parse_mac("52-54-00-12-34-56"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_mac("00:00:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:0g").is_err());
        assert!(parse_mac("2:0:0:0:0:1").is_err());
        assert_eq!(
            parse_ip_prefix("10.0.2.20/24"),
            Ok((Ipv4Addr::new(10, 0, 2, 20), 24))
        );
        assert_eq!(
            parse_ip_prefix("192.168.7.2"),
            Ok((Ipv4Addr::new(192, 168, 7, 2), 24))
        );
        assert!(parse_ip_prefix("10.0.2.20/33").is_err());
        assert!(parse_ip_prefix("10.0.2/24").is_err());
        assert!(parse_ipv4("10.0.2.256").is_err());
    }

    #[test]
    fn network_plans() {
        let none = NetOptions::default();
        assert_eq!(plan_network(&none, 3), Ok(None));
        let ip_only = NetOptions {
            ip: Some((Ipv4Addr::new(10, 0, 2, 20), 24)),
            ..Default::default()
        };
        assert!(plan_network(&ip_only, 1)
            .unwrap_err()
            .contains("--ip needs a network"));

        let user = NetOptions {
            publish: vec![publish("8080:80")],
            ..Default::default()
        };
        let plan = plan_network(&user, 3).unwrap().unwrap();
        assert_eq!(plan.mode, NetMode::User);
        let ips: Vec<String> = plan.nics.iter().map(|n| n.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.2.15", "10.0.2.16", "10.0.2.17"]);
        assert!(plan.nics.iter().all(|n| n.gateway == Some(USER_GATEWAY)));
        assert_eq!(plan.nics[1].mac, [2, 0x4c, 10, 0, 2, 16]);

        let custom = NetOptions {
            net: Some(NetMode::User),
            mac: Some([2, 0, 0, 0, 0, 9]),
            ip: Some((Ipv4Addr::new(10, 0, 2, 1), 24)),
            ..Default::default()
        };
        let plan = plan_network(&custom, 2).unwrap().unwrap();
        assert_eq!(plan.nics[0].mac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(
            plan.nics[1].ip,
            Ipv4Addr::new(10, 0, 2, 3),
            "skips the gateway"
        );

        let outside = NetOptions {
            net: Some(NetMode::User),
            ip: Some((Ipv4Addr::new(192, 168, 1, 5), 24)),
            ..Default::default()
        };
        assert!(plan_network(&outside, 1)
            .unwrap_err()
            .contains("10.0.2.0/24"));
        let gw = NetOptions {
            net: Some(NetMode::User),
            gateway: Some(Ipv4Addr::new(10, 0, 2, 1)),
            ..Default::default()
        };
        assert!(plan_network(&gw, 1).is_err());

        let tap = NetOptions {
            net: Some(NetMode::Tap("t0".into())),
            ip: Some((Ipv4Addr::new(192, 168, 7, 2), 24)),
            gateway: Some(Ipv4Addr::new(192, 168, 7, 1)),
            ..Default::default()
        };
        let plan = plan_network(&tap, 1).unwrap().unwrap();
        assert_eq!(plan.nics[0].gateway, Some(Ipv4Addr::new(192, 168, 7, 1)));
        let tap_default = NetOptions {
            net: Some(NetMode::Tap("t0".into())),
            ..Default::default()
        };
        let plan = plan_network(&tap_default, 1).unwrap().unwrap();
        assert_eq!(plan.nics[0].ip, USER_FIRST_GUEST);
        assert_eq!(plan.nics[0].gateway, Some(USER_GATEWAY));
        let tap_publish = NetOptions {
            net: Some(NetMode::Tap("t0".into())),
            publish: vec![publish("1:2")],
            ..Default::default()
        };
        assert!(plan_network(&tap_publish, 1).is_err());
        let none_publish = NetOptions {
            net: Some(NetMode::None),
            publish: vec![publish("1:2")],
            ..Default::default()
        };
        assert!(plan_network(&none_publish, 1).is_err());
        let full = NetOptions {
            net: Some(NetMode::User),
            ip: Some((Ipv4Addr::new(10, 0, 2, 253), 24)),
            ..Default::default()
        };
        assert!(plan_network(&full, 3).unwrap_err().contains("do not fit"));
    }

    #[test]
    fn host_name_is_never_empty() {
        assert!(!default_host_name().is_empty());
    }
}
