//! Published ports: what `--publish` means ([`PublishSpec`]) and its
//! command-line syntax ([`parse_publish`]), read once by the CLI; the API
//! carries the parsed value.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// A transport protocol of a published port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A published port: `--publish [HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT[/tcp|/udp]`,
/// parsed once by the CLI ([`parse_publish`]) and sent as this value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishSpec {
    pub host: SocketAddr,
    /// `None`: the main guest.
    #[serde(default)]
    pub guest_addr: Option<Ipv4Addr>,
    pub guest_port: u16,
    #[serde(default)]
    pub proto: Proto,
}

impl fmt::Display for PublishSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} -> ", self.host, self.proto)?;
        match self.guest_addr {
            Some(a) => write!(f, "{a}:{}", self.guest_port),
            None => write!(f, "guest port {}", self.guest_port),
        }
    }
}

impl PublishSpec {
    /// Whether its ports are real ports (not 0): an API caller's value is
    /// checked as the command line's is.
    pub fn check(&self) -> Result<(), String> {
        if self.host.port() == 0 || self.guest_port == 0 {
            return Err(format!(
                "{self} is not a port mapping: ports are 1-65535 (expected {PUBLISH_SYNTAX})"
            ));
        }
        Ok(())
    }
}

impl std::str::FromStr for PublishSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_publish(s)
    }
}

/// The syntax of `--publish`, for messages.
pub const PUBLISH_SYNTAX: &str = "[HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT[/tcp|/udp]";

/// Parses `--publish [HOST_ADDR:]HOST_PORT:[GUEST_ADDR:]GUEST_PORT[/tcp|/udp]`
/// (`8080:80`, `127.0.0.1:8080:80/tcp`, `[::1]:5353:53/udp`,
/// `8081:10.0.2.16:80`). The host address defaults to 127.0.0.1, the guest
/// to the main guest, the protocol to TCP.
pub fn parse_publish(s: &str) -> Result<PublishSpec, String> {
    let bad = |why: &str| {
        format!("'{s}' is not a port mapping ({why}): expected {PUBLISH_SYNTAX}, e.g. 8080:80 or 127.0.0.1:8080:80/tcp")
    };
    let (body, proto) = match s.rsplit_once('/') {
        Some((body, "tcp")) => (body, Proto::Tcp),
        Some((body, "udp")) => (body, Proto::Udp),
        Some((_, other)) => return Err(bad(&format!("unknown protocol '{other}'"))),
        None => (s, Proto::Tcp),
    };
    // A bracketed IPv6 host address first.
    let (v6_host, rest) = match body.strip_prefix('[') {
        Some(after) => {
            let (addr, rest) = after
                .split_once("]:")
                .ok_or_else(|| bad("unclosed '[' in the host address"))?;
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| bad(&format!("'{addr}' is not an IPv6 address")))?;
            (Some(addr), rest)
        }
        None => (None, body),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let is_ip = |p: &str| p.parse::<Ipv4Addr>().is_ok() || p == "localhost";
    let (host, host_port, guest_addr, guest_port) = match (v6_host, parts.as_slice()) {
        (Some(h), [hp, gp]) => (Some(h.to_string()), *hp, None, *gp),
        (Some(h), [hp, ga, gp]) => (Some(h.to_string()), *hp, Some(*ga), *gp),
        (None, [hp, gp]) => (None, *hp, None, *gp),
        (None, [h, hp, gp]) if is_ip(h) => (Some(h.to_string()), *hp, None, *gp),
        (None, [hp, ga, gp]) => (None, *hp, Some(*ga), *gp),
        (None, [h, hp, ga, gp]) => (Some(h.to_string()), *hp, Some(*ga), *gp),
        _ => return Err(bad("wrong number of ':'-separated parts")),
    };
    let port = |p: &str, what: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad(&format!("'{p}' is not a {what} port (1-65535)"))),
        Ok(n) => Ok(n),
    };
    let host_port = port(host_port, "host")?;
    let guest_port = port(guest_port, "guest")?;
    let host_ip: IpAddr = match host.as_deref() {
        None | Some("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(h) => h
            .parse()
            .map_err(|_| bad(&format!("'{h}' is not an IP address")))?,
    };
    let guest_addr = match guest_addr {
        None => None,
        Some(a) => Some(
            a.parse::<Ipv4Addr>()
                .map_err(|_| bad(&format!("'{a}' is not a guest IPv4 address")))?,
        ),
    };
    Ok(PublishSpec {
        host: SocketAddr::new(host_ip, host_port),
        guest_addr,
        guest_port,
        proto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(s: &str) -> PublishSpec {
        parse_publish(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn publish_specs() {
        let p = publish("8080:80");
        assert_eq!(p.host, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            (p.guest_addr, p.guest_port, p.proto),
            (None, 80, Proto::Tcp)
        );
        let p = publish("0.0.0.0:8080:80/tcp");
        assert_eq!(p.host, "0.0.0.0:8080".parse().unwrap());
        let p = publish("127.0.0.2:5353:53/udp");
        assert_eq!(
            (p.host.port(), p.guest_port, p.proto),
            (5353, 53, Proto::Udp)
        );
        let p = publish("[::1]:8080:80");
        assert_eq!(p.host, "[::1]:8080".parse().unwrap());
        let p = publish("8081:10.0.2.16:80");
        assert_eq!(p.host, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(p.guest_addr, Some(Ipv4Addr::new(10, 0, 2, 16)));
        let p = publish("127.0.0.1:8081:10.0.2.16:80/udp");
        assert_eq!(p.guest_addr, Some(Ipv4Addr::new(10, 0, 2, 16)));
        assert_eq!(p.proto, Proto::Udp);
        assert_eq!(
            publish("localhost:1:2").host,
            "127.0.0.1:1".parse().unwrap()
        );
        assert_eq!(p.to_string(), "127.0.0.1:8081/udp -> 10.0.2.16:80");
    }

    #[test]
    fn bad_publish_specs_say_what_is_wrong() {
        for (s, why) in [
            ("80", "number of"),
            ("", "number of"),
            ("a:b", "not a host port"),
            ("8080:0", "not a guest port"),
            ("70000:80", "not a host port"),
            ("8080:80/sctp", "unknown protocol 'sctp'"),
            ("1.2.3:8080:80:80", "not an IP address"),
            ("[::1:8080:80", "unclosed"),
            ("8080:10.0.2:80", "not a guest IPv4"),
            ("1:2:3:4:5", "number of"),
        ] {
            let e = parse_publish(s).unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
            assert!(e.contains("HOST_PORT:"), "{s}: {e}");
        }
    }

    #[test]
    fn specs_travel_as_json_and_zero_ports_are_refused() {
        let p = publish("127.0.0.1:8081:10.0.2.16:80/udp");
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["proto"], "udp");
        assert_eq!(serde_json::from_value::<PublishSpec>(v).unwrap(), p);
        let minimal: PublishSpec =
            serde_json::from_str(r#"{"host":"127.0.0.1:8080","guest_port":80}"#).unwrap();
        assert_eq!(minimal, publish("8080:80"));
        assert!(minimal.check().is_ok());
        let zero: PublishSpec =
            serde_json::from_str(r#"{"host":"127.0.0.1:8080","guest_port":0}"#).unwrap();
        assert!(zero.check().is_err());
    }
}
