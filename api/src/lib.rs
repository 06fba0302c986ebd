//! The host-shim daemon's HTTP/1.1 JSON API, shared by the daemon, its
//! CLI, the fleet tools, the benchmarks and the tests: every request and
//! answer body ([`RunRequest`], [`InstanceInfo`], [`ShimInfo`],
//! [`stats::ShimStats`], ...), the migration progress events
//! ([`migration::MigrationEvent`]) and a typed blocking [`Client`] with one
//! method per endpoint.
//!
//! The server side: the route table and typed requests ([`routes`]) and
//! the HTTP plumbing with its bounds ([`server`]).
//!
//! Without its default `http` feature it is only the data types, which the
//! `vmm` and `hostnet` crates report in. It needs no KVM: building an image or running a benchmark links this
//! crate only. TLS (rustls with ring, certificates pinned by fingerprint:
//! [`tls`], [`Client::secure`]) is behind the `tls` feature.
//!
//! Every answer is JSON, except `logs` (plain text lines) and `migrate`
//! (one JSON [`migration::MigrationEvent`] a line, streamed as it happens,
//! the last one `done` or `failed`). Errors are `{"error": "..."}` with a
//! 4xx or 5xx status.

use std::fmt;

use serde::{Deserialize, Serialize};

#[cfg(feature = "http")]
mod client;
mod fingerprint;
pub mod images;
pub mod limits;
pub mod migration;
pub mod publish;
#[cfg(feature = "http")]
pub mod routes;
#[cfg(feature = "http")]
pub mod server;
pub mod stats;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "http")]
mod workers;

#[cfg(feature = "http")]
pub use client::{
    read_streamed_line, upload_deadline, Answer, Client, ClientError, EventsError, LineError,
    MigrationEvents, Stream, UPLOAD_FLOOR, UPLOAD_MIN_RATE,
};
pub use fingerprint::{decode_hex, encode_hex, Fingerprint};
pub use images::{ImageInfo, HASH_PREFIX};
pub use limits::Limits;
pub use migration::{MigrationEvent, MigrationPhase, MigrationReport};
pub use publish::{parse_publish, Proto, PublishSpec};
pub use stats::{InstanceStats, ShimStats};

/// The upgrade protocol of streamed answers (`logs --follow`, `migrate`).
pub const PROGRESS_PROTOCOL: &str = "host-shim-progress";

/// What happens to an instance when its daemon restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Restart {
    /// It is gone (the behaviour without `--state-dir`).
    #[default]
    Never,
    /// It is booted again, from its app's latest checkpoint if it has one.
    Always,
}

impl std::fmt::Display for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Restart::Never => "never",
            Restart::Always => "always",
        })
    }
}

impl std::str::FromStr for Restart {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(Restart::Never),
            "always" => Ok(Restart::Always),
            other => Err(format!(
                "'{other}' is not a restart policy: always or never"
            )),
        }
    }
}

/// A guest's address on its network and the network's prefix length
/// (`10.0.2.15/24` on the wire, as `ip addr` writes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct GuestAddr {
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
}

impl fmt::Display for GuestAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

impl std::str::FromStr for GuestAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not an address with a prefix length (10.0.2.15/24)");
        let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
        let ip = ip.parse().map_err(|_| bad())?;
        let prefix = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
        Ok(Self { ip, prefix })
    }
}

impl From<GuestAddr> for String {
    fn from(a: GuestAddr) -> Self {
        a.to_string()
    }
}

impl TryFrom<String> for GuestAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// `POST /v1/instances`: boot an image as a named instance.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunRequest {
    pub name: String,
    /// A path the daemon can read, or `sha256:HEX` for an image uploaded
    /// with `PUT /v1/images/HEX`.
    pub image: String,
    /// Bytes of guest RAM.
    pub mem: u64,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub args: Vec<String>,
    /// Host ports forwarded to the guest.
    #[serde(default)]
    pub publish: Vec<PublishSpec>,
    /// The guest's address (else the daemon picks one of its own range).
    #[serde(default)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// An app checkpoint file (a path the daemon can read) to hand over.
    #[serde(default)]
    pub restore: Option<String>,
    /// Have the app checkpoint itself every this many milliseconds.
    #[serde(default)]
    pub checkpoint_every_ms: Option<u64>,
    /// The directory (the daemon's) its checkpoints go to, as `latest.ckpt`.
    #[serde(default)]
    pub checkpoint_to: Option<String>,
    /// A standby daemon's API address: it receives every checkpoint and
    /// restarts the app if this daemon dies (the daemon's standby).
    #[serde(default)]
    pub standby: Option<String>,
    /// How long this daemon may be unreachable before the standby takes
    /// over, in ms [default: 2000].
    #[serde(default)]
    pub standby_grace_ms: Option<u64>,
    /// Whether it comes back after a daemon restart (needs `--state-dir`).
    #[serde(default)]
    pub restart: Restart,
}

/// `PUT /v1/instances/NAME/restart`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestartRequest {
    pub restart: Restart,
}

/// `POST /v1/images/HEX/push`: copy a stored image to another daemon.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PushRequest {
    /// The other daemon's API address.
    pub to: String,
}

/// `POST /v1/restore`: run a snapshot file (a path the daemon can read).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub file: String,
    /// The instance name (default: the one saved in the snapshot).
    #[serde(default)]
    pub name: Option<String>,
    /// Host ports forwarded to the guest.
    #[serde(default)]
    pub publish: Vec<PublishSpec>,
}

/// `POST /v1/instances/NAME/snapshot`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Where the daemon writes the file.
    pub out: String,
}

/// `POST /v1/instances/NAME/checkpoint`: ask the app for a checkpoint now.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckpointRequest {
    /// Where the daemon writes the checkpoint.
    pub out: String,
    /// How long to wait for the app [default: 10 s].
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A checkpoint written by `POST /v1/instances/NAME/checkpoint`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub file: String,
    pub bytes: u64,
    /// `app schema vN, N bytes of state`.
    pub describe: String,
    /// From the request to the checkpoint's arrival.
    pub ms: f64,
}

/// What a snapshot cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub file: String,
    pub pages: u64,
    pub bytes: u64,
    /// How long the guest was paused.
    pub paused_ms: f64,
}

/// `POST /v1/instances/NAME/migrate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The destination daemon's API address, or (secure daemons) the name
    /// or address of a pinned peer.
    pub to: String,
    /// The destination's certificate fingerprint (`SHA256:...`), when it
    /// is not a pinned peer of the source known by `to`.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// Where an instance is in its life (`"state"` in its JSON, with the
/// variant's fields beside it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum InstanceState {
    /// Its guest runs here.
    #[default]
    Running,
    /// Its guest is here but held by an operation (`what`: snapshotting,
    /// migrating, ...); calls that need it get 409 meanwhile.
    Busy { what: String },
    /// Its guest ended (`how`: its exit status or fault).
    Exited { how: String },
    /// Its guest moved to the daemon at API address `to`; its published
    /// ports here still reach it.
    Moved { to: String },
    /// It was stopped (the answer of `stop`).
    Stopped,
}

impl InstanceState {
    /// Whether its guest is (still) here and alive.
    pub fn is_live(&self) -> bool {
        matches!(self, InstanceState::Running | InstanceState::Busy { .. })
    }

    /// Where it moved to, if it did.
    pub fn moved_to(&self) -> Option<&str> {
        match self {
            InstanceState::Moved { to } => Some(to),
            _ => None,
        }
    }
}

impl std::fmt::Display for InstanceState {
    /// As `list` shows it: `running`, `migrating`, `exited: HOW`,
    /// `moved to ADDR`, `stopped`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            InstanceState::Running => "running".to_owned(),
            InstanceState::Busy { what } => what.clone(),
            InstanceState::Exited { how } => format!("exited: {how}"),
            InstanceState::Moved { to } => format!("moved to {to}"),
            InstanceState::Stopped => "stopped".to_owned(),
        };
        f.pad(&text)
    }
}

/// One instance, as `list` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct InstanceInfo {
    pub name: String,
    #[serde(flatten)]
    pub state: InstanceState,
    pub image: String,
    pub ip: Option<GuestAddr>,
    pub mac: Option<String>,
    pub mem: u64,
    pub uptime_s: f64,
    /// Moves so far (`BootInfo::generation`).
    pub generation: u64,
    pub publish: Vec<String>,
    /// Its restart policy (`always`: recorded in the daemon's `--state-dir`).
    #[serde(default)]
    pub restart: Restart,
}

/// `GET /v1/health`: a cheap liveness answer (no token needed).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
}

/// `GET /v1/info`: who this daemon is.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ShimInfo {
    pub name: String,
    pub region: String,
    pub version: String,
    pub gateway: String,
    pub overlay: Option<String>,
    pub instances: usize,
    /// The largest image `PUT /v1/images/HEX` accepts; none: this shim
    /// keeps no images (no `--state-dir`).
    #[serde(default)]
    pub max_image_bytes: Option<u64>,
    /// The certificate fingerprint (secure daemons).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Overlay datagrams dropped for failing authentication.
    #[serde(default)]
    pub overlay_rejected: u64,
    /// What callers may take (`serve --max-*` flags).
    #[serde(default)]
    pub limits: Option<crate::limits::Limits>,
    /// File descriptors the daemon has open (against `limits.max_open_files`).
    #[serde(default)]
    pub open_files: u64,
    /// Guest addresses this shim hands out, and how many of them are free.
    #[serde(default)]
    pub addresses: Option<AddressUse>,
}

/// A shim's guest address pool, in `GET /v1/info`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AddressUse {
    /// The subnet of the gateway and guests (`serve --guest-net`).
    pub guest_net: String,
    /// The first and last address this shim hands out.
    pub first: String,
    pub last: String,
    /// Addresses of the pool no instance holds.
    pub free: usize,
}

/// One line of a followed log (`POST /v1/instances/NAME/logs/follow`
/// streams one a line; an empty one is a heartbeat).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogEvent {
    /// A console line (without its newline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// The instance moved to the daemon at this API address; the stream ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// The instance ended (exited, stopped); the stream ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

/// An error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_address_travels_as_ip_addr_writes_it_and_bad_ones_are_refused() {
        let a: GuestAddr = serde_json::from_str("\"10.0.2.15/24\"").unwrap();
        assert_eq!(
            (a.ip, a.prefix),
            (std::net::Ipv4Addr::new(10, 0, 2, 15), 24)
        );
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"10.0.2.15/24\"");
        for bad in [
            "10.0.2.15",
            "10.0.2.15/33",
            "10.0.2/24",
            "x/24",
            "10.0.2.15/",
        ] {
            let e = serde_json::from_str::<GuestAddr>(&format!("\"{bad}\"")).unwrap_err();
            assert!(e.to_string().contains("prefix length"), "{bad}: {e}");
        }
    }

    #[test]
    fn instance_states_are_tagged_beside_the_other_fields() {
        let info = InstanceInfo {
            name: "kv".into(),
            state: InstanceState::Moved {
                to: "127.0.0.1:7100".into(),
            },
            ..InstanceInfo::default()
        };
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["state"], "moved");
        assert_eq!(v["to"], "127.0.0.1:7100");
        let back: InstanceInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, info);
        assert_eq!(info.state.to_string(), "moved to 127.0.0.1:7100");
        assert_eq!(format!("{:<9}|", InstanceState::Running), "running  |");
        assert_eq!(info.state.moved_to(), Some("127.0.0.1:7100"));
        assert!(!info.state.is_live());
        let exited: InstanceState =
            serde_json::from_str(r#"{"state":"exited","how":"status 3"}"#).unwrap();
        assert_eq!(exited.to_string(), "exited: status 3");
        assert!(serde_json::from_str::<InstanceState>(r#"{"state":"flying"}"#).is_err());
        assert!("sometimes".parse::<Restart>().is_err());
    }
}
