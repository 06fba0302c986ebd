//! What a daemon lets its callers take ([`Limits`], reported in
//! `GET /v1/info`) and the defaults of the `serve --max-*` flags.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
/// Host memory per instance the default `--max-instances` is sized by:
/// what an idle kv instance costs (daemon RSS and the guest pages it
/// touched, about 1.5 MiB), with room. What guests may really use is
/// bounded by `--max-guest-memory`.
const INSTANCE_SIZING: u64 = 4 << 20;
/// Bounds of the default `--max-instances`.
const DEFAULT_MAX_INSTANCES: (usize, usize) = (1, 4096);
/// Default `--max-open-files` when the process limit is unknown.
pub const DEFAULT_MAX_OPEN_FILES: u64 = 1024;
/// File descriptors an instance holds in its daemon (its vCPU's, its
/// network port's, its KVM VM and vCPU, a published port's listener),
/// with room: a run is refused unless this many are left...
pub const FDS_PER_INSTANCE: u64 = 8;
/// ... besides this many kept for the API, migrations and image uploads.
pub const FDS_RESERVED: u64 = 256;

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
    /// Bytes an instance's checkpoint chain may hold (`--max-checkpoint`);
    /// `None`: twice its memory, at most what a restore accepts.
    #[serde(default)]
    pub max_checkpoint: Option<u64>,
    /// File descriptors the daemon may have open (its `RLIMIT_NOFILE`,
    /// raised to the hard limit at start).
    #[serde(default = "default_max_open_files")]
    pub max_open_files: u64,
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
            max_checkpoint: None,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            allow_privileged_ports: false,
        }
    }
}

fn default_max_open_files() -> u64 {
    DEFAULT_MAX_OPEN_FILES
}

impl Limits {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
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
