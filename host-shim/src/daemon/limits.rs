//! What a daemon lets its callers take: API connections, request bodies
//! and their deadlines, instances, guest memory, published ports, and the
//! names instances may have. Set by `serve` flags (shown in
//! `serve --help`), reported in `GET /v1/info`; every refusal names the
//! limit and the flag that sets it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ApiError;
use hostnet::PublishSpec;

/// Longest instance name.
pub const MAX_NAME: usize = 64;

/// Default `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default `--max-request-memory`: request bodies held at once, in bytes.
pub const DEFAULT_MAX_REQUEST_MEMORY: u64 = 64 << 20;
/// Default `--request-timeout`: head and body of one request, whole.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `--handshake-timeout`: one TLS handshake, whole.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `--max-publish`: published ports per instance.
pub const DEFAULT_MAX_PUBLISH: usize = 16;
/// Default `--memory-overcommit`: guest memory over host memory.
pub const DEFAULT_OVERCOMMIT: f64 = 1.0;
/// Guest memory per instance the default `--max-instances` is sized by.
const INSTANCE_SIZING: u64 = 64 << 20;
/// Bounds of the default `--max-instances`.
const DEFAULT_MAX_INSTANCES: (usize, usize) = (1, 256);

/// The limits of one daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Limits {
    /// API connections served at once (`--max-connections`); more get 503.
    pub max_connections: usize,
    /// Bytes of request bodies held at once (`--max-request-memory`).
    pub max_request_memory: u64,
    /// Milliseconds a client has for a request's head and body, whole
    /// (`--request-timeout`).
    pub request_timeout_ms: u64,
    /// Milliseconds a client has for a TLS handshake, whole (`--handshake-timeout`).
    pub handshake_timeout_ms: u64,
    /// Instances at once, running or starting (`--max-instances`).
    pub max_instances: usize,
    /// Bytes of guest memory of all instances at once (`--max-guest-memory`).
    pub max_guest_memory: u64,
    /// Published ports per instance (`--max-publish`).
    pub max_publish: usize,
    /// Whether instances may publish host ports below 1024
    /// (`--allow-privileged-ports`).
    pub allow_privileged_ports: bool,
}

impl Default for Limits {
    fn default() -> Self {
        let mem = host_memory().unwrap_or(4 << 30);
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_request_memory: DEFAULT_MAX_REQUEST_MEMORY,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT.as_millis() as u64,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT.as_millis() as u64,
            max_instances: default_max_instances(mem),
            max_guest_memory: guest_memory_for(mem, DEFAULT_OVERCOMMIT),
            max_publish: DEFAULT_MAX_PUBLISH,
            allow_privileged_ports: false,
        }
    }
}

impl Limits {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// Refuses an instance of `mem` bytes when `live` instances holding
    /// `used` bytes run already (409, naming the limit and its flag).
    pub fn admit(&self, live: usize, used: u64, mem: u64) -> Result<(), ApiError> {
        if live >= self.max_instances {
            return Err(ApiError(
                409,
                format!(
                    "this shim runs {live} instances, its limit (serve --max-instances {})",
                    self.max_instances
                ),
            ));
        }
        if used.saturating_add(mem) > self.max_guest_memory {
            return Err(ApiError(
                409,
                format!(
                    "{} MiB more guest memory would exceed this shim's limit of {} MiB ({} MiB \
                     in use; serve --max-guest-memory / --memory-overcommit)",
                    mem >> 20,
                    self.max_guest_memory >> 20,
                    used >> 20
                ),
            ));
        }
        Ok(())
    }

    /// Refuses too many published ports or privileged host ports.
    pub fn check_publish(&self, publish: &[PublishSpec]) -> Result<(), ApiError> {
        if publish.len() > self.max_publish {
            return Err(ApiError(
                400,
                format!(
                    "{} published ports: an instance may publish at most {} (serve --max-publish)",
                    publish.len(),
                    self.max_publish
                ),
            ));
        }
        if !self.allow_privileged_ports {
            if let Some(p) = publish
                .iter()
                .find(|p| p.host.port() != 0 && p.host.port() < 1024)
            {
                return Err(ApiError(
                    403,
                    format!(
                        "host port {} is privileged (below 1024): this shim refuses them \
                         (serve --allow-privileged-ports)",
                        p.host.port()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The host's memory (`MemTotal` of /proc/meminfo), in bytes.
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Guest memory allowed on a host of `host` bytes with `overcommit`.
pub fn guest_memory_for(host: u64, overcommit: f64) -> u64 {
    (host as f64 * overcommit) as u64
}

/// The default instance count for a host of `host` bytes.
pub fn default_max_instances(host: u64) -> usize {
    let (lo, hi) = DEFAULT_MAX_INSTANCES;
    usize::try_from(host / INSTANCE_SIZING)
        .unwrap_or(hi)
        .clamp(lo, hi)
}

/// The one name check of every path that creates an instance (run,
/// restore, incoming migration, standby registration): names become file
/// names, so letters, digits, `-`, `_` and `.`, not starting with `.`, at
/// most [`MAX_NAME`] bytes.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        return Ok(());
    }
    Err(ApiError(
        400,
        format!(
            "{:?} is not an instance name: 1 to {MAX_NAME} letters, digits, '-', '_' or '.', \
             not starting with '.'",
            name.escape_debug().to_string()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_plain_file_name() {
        for good in ["kv", "web-1", "a_b.c", "A9"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(MAX_NAME + 1);
        for bad in ["", "a/b", "..", ".hidden", "a\0b", "a b", "é", &long] {
            assert_eq!(check_name(bad).err().map(|e| e.0), Some(400), "{bad:?}");
        }
    }

    #[test]
    fn quotas_name_their_flags() {
        let l = Limits {
            max_instances: 2,
            max_guest_memory: 1 << 30,
            max_publish: 1,
            ..Limits::default()
        };
        assert!(l.admit(1, 512 << 20, 512 << 20).is_ok());
        assert!(l
            .admit(2, 0, 2 << 20)
            .unwrap_err()
            .1
            .contains("--max-instances"));
        assert!(l
            .admit(1, 768 << 20, 512 << 20)
            .unwrap_err()
            .1
            .contains("--max-guest-memory"));
        let p = |s| vmm::config::parse_publish(s).unwrap();
        assert!(l.check_publish(&[p("8080:80")]).is_ok());
        let two = [p("8080:80"), p("8081:81")];
        assert!(l
            .check_publish(&two)
            .unwrap_err()
            .1
            .contains("--max-publish"));
        let err = l.check_publish(&[p("80:80")]).unwrap_err();
        assert_eq!(err.0, 403);
        assert!(err.1.contains("--allow-privileged-ports"));
    }
}
