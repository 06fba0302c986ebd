//! The fleet, from the user's machine: the hosts they own (each running
//! `host-shim serve`) and where each of their apps runs, kept in a
//! [`store::FleetStore`] (a local file by default, or etcd: [`etcd`]; hosts
//! that register themselves under a lease: [`registry`]), and the path
//! from an app's recorded host to the shim it runs on ([`locate`]); the
//! operations a user performs on apps ([`ops`]: deploy, ps, migrate, stop,
//! each changing an app's record only by compare-and-swap), the fleet's
//! event stream ([`events`]) and leader election among controller
//! replicas ([`leader`]). The `host-shim` CLI's fleet commands drive them
//! and render what they return.
//!
//! Every API client of a fleet host is made by [`client_for`], the one
//! place that turns a host's URL, pinned fingerprint and token into a
//! connection. The placement controller (`host-shim schedule`) is
//! [`schedule`]. This crate talks to daemons through the `api` crate only:
//! no VMM in it.

pub mod etcd;
pub mod events;
pub mod leader;
pub mod locate;
pub mod ops;
pub mod registry;
pub mod schedule;
pub mod store;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use api::{Client, ClientError};
use store::{Expect, FleetStore, StoreError, Versioned};

/// Exit statuses of the fleet commands (also in `--help` and the README).
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// The operation failed (the shim refused, also for a wrong token or a
    /// certificate that is not the pinned one; bad flags, a broken state file).
    pub const FAILED: u8 = 1;
    /// No such host or app (in the fleet file, or on the host).
    pub const NOT_FOUND: u8 = 3;
    /// A host did not answer (`ps`: after listing the others).
    pub const UNREACHABLE: u8 = 4;
    /// The fleet state changed under this command (another CLI): run it
    /// again; `deploy`: another deploy holds the name.
    pub const CONFLICT: u8 = 5;
}

/// One host of the fleet.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    /// `https://ADDR:PORT` (a host with an identity: TLS, pinned) or
    /// `http://ADDR:PORT` (a plain daemon).
    pub url: String,
    /// Its region, as it said when added (`GET /v1/info`).
    #[serde(default)]
    pub region: String,
    /// The pinned certificate fingerprint, `SHA256:...` (for TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The bearer token of this user on that host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Its overlay's UDP address (a host that registered itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<String>,
    /// What it can run (a host that registered itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    /// It registers itself ([`registry`]): without a live lease it is down.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub registered: bool,
}

/// What a host can run, as its daemon's limits say.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub max_instances: usize,
    pub max_guest_memory: u64,
}

impl Host {
    /// `ADDR:PORT` of its API (the URL without scheme and path).
    pub fn addr(&self) -> &str {
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or(rest)
    }
}

/// Where an app runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct App {
    pub name: String,
    /// The fleet host it runs on.
    pub host: String,
    /// `sha256:HEX` of its image.
    pub image: String,
}

/// Why a fleet command failed; [`FleetError::exit_code`] is its status.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unreachable(ClientError),
    #[error("{0}")]
    Client(ClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Failed(String),
    /// Another party holds what this command needed (an app's name).
    #[error("{0}")]
    Conflict(String),
}

impl From<ClientError> for FleetError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Connect { .. } => FleetError::Unreachable(e),
            ClientError::Api { status: 404, .. } => FleetError::NotFound(e.to_string()),
            e => FleetError::Client(e),
        }
    }
}

impl FleetError {
    pub fn exit_code(&self) -> u8 {
        match self {
            FleetError::NotFound(_) => exit::NOT_FOUND,
            FleetError::Unreachable(_) => exit::UNREACHABLE,
            FleetError::Store(StoreError::Conflict { .. }) | FleetError::Conflict(_) => {
                exit::CONFLICT
            }
            _ => exit::FAILED,
        }
    }
}

/// The API client of `host`: the one place clients of fleet hosts are made.
pub fn client_for(host: &Host) -> Result<Client, FleetError> {
    match host.url.split_once("://") {
        None | Some(("http", _)) => Ok(Client::new(host.addr())),
        Some(("https", _)) => {
            let pin = host.fingerprint.as_deref().ok_or_else(|| {
                FleetError::Failed(format!(
                    "host {} speaks https:// and needs its certificate fingerprint: \
                     host-shim fleet add {} {} --fingerprint SHA256:...",
                    host.name, host.name, host.url
                ))
            })?;
            let pin = pin
                .parse()
                .map_err(|e| FleetError::Failed(format!("host {}: {e}", host.name)))?;
            Client::secure(&host.url, pin, host.token.clone(), None)
                .map_err(|e| FleetError::Failed(format!("host {}: {e}", host.name)))
        }
        Some((scheme, _)) => Err(FleetError::Failed(format!(
            "host {}: this host-shim speaks http:// to shims, not {scheme}://",
            host.name
        ))),
    }
}

/// The fleet file: `$HOST_SHIM_FLEET`, else `$XDG_CONFIG_HOME/host-shim/fleet.json`,
/// else `~/.config/host-shim/fleet.json`.
pub fn default_path() -> PathBuf {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    config.join("host-shim").join("fleet.json")
}

/// Typed access to the fleet state.
pub struct Fleet {
    store: Box<dyn FleetStore>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    key: &str,
    v: Versioned<serde_json::Value>,
) -> Result<Versioned<T>, FleetError> {
    let value = serde_json::from_value(v.value)
        .map_err(|e| FleetError::Failed(format!("fleet state: {key} is not valid: {e}")))?;
    Ok(Versioned {
        version: v.version,
        value,
    })
}

impl Fleet {
    pub fn new(store: Box<dyn FleetStore>) -> Self {
        Self { store }
    }

    fn get<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, FleetError> {
        self.store.get(key)?.map(|v| decode(key, v)).transpose()
    }

    /// The records under `prefix`; one that does not decode (written by
    /// another tool or version) is skipped with a warning.
    fn values<T: for<'de> Deserialize<'de>>(&self, prefix: &str) -> Result<Vec<T>, FleetError> {
        Ok(self
            .store
            .list(prefix)?
            .into_iter()
            .filter_map(|(k, v)| {
                decode(&k, v)
                    .inspect_err(|e| tracing::warn!(error = %e, "skipping a fleet record"))
                    .ok()
                    .map(|v| v.value)
            })
            .collect())
    }

    fn put<T: Serialize>(&self, key: &str, record: &T, expect: Expect) -> Result<u64, FleetError> {
        let value = serde_json::to_value(record).expect("serializable");
        Ok(self.store.put(key, value, expect)?)
    }

    pub fn host(&self, name: &str) -> Result<Option<Versioned<Host>>, FleetError> {
        self.get(&format!("hosts/{name}"))
    }

    /// Host `name`, or a not-found error naming `fleet add`.
    pub fn need_host(&self, name: &str) -> Result<Host, FleetError> {
        self.host(name)?.map(|v| v.value).ok_or_else(|| {
            FleetError::NotFound(format!(
                "no host '{name}' in the fleet: add it with `host-shim fleet add {name} URL`"
            ))
        })
    }

    pub fn hosts(&self) -> Result<Vec<Host>, FleetError> {
        self.values("hosts/")
    }

    pub fn put_host(&self, host: &Host, expect: Expect) -> Result<u64, FleetError> {
        self.put(&format!("hosts/{}", host.name), host, expect)
    }

    pub fn remove_host(&self, name: &str) -> Result<(), FleetError> {
        Ok(self.store.delete(&format!("hosts/{name}"), Expect::Any)?)
    }

    pub fn app(&self, name: &str) -> Result<Option<Versioned<App>>, FleetError> {
        self.get(&format!("apps/{name}"))
    }

    pub fn apps(&self) -> Result<Vec<App>, FleetError> {
        self.values("apps/")
    }

    pub fn put_app(&self, app: &App, expect: Expect) -> Result<u64, FleetError> {
        self.put(&format!("apps/{}", app.name), app, expect)
    }

    pub fn remove_app(&self, name: &str, expect: Expect) -> Result<(), FleetError> {
        Ok(self.store.delete(&format!("apps/{name}"), expect)?)
    }

    /// The fleet host whose API address is `addr` (as a migration names it).
    pub fn host_by_addr(&self, addr: &str) -> Result<Option<Host>, FleetError> {
        Ok(self.hosts()?.into_iter().find(|h| h.addr() == addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses_and_clients() {
        let mut h = Host {
            name: "a".into(),
            url: "http://127.0.0.1:7000/".into(),
            ..Host::default()
        };
        assert_eq!(h.addr(), "127.0.0.1:7000");
        assert_eq!(client_for(&h).unwrap().addr, "127.0.0.1:7000");
        h.url = "127.0.0.1:7001".into();
        assert_eq!(h.addr(), "127.0.0.1:7001");
        h.url = "ftp://x:1".into();
        assert!(matches!(client_for(&h), Err(FleetError::Failed(_))));
    }

    #[test]
    fn errors_map_to_exit_statuses() {
        let api = |status| ClientError::Api {
            status,
            message: "m".into(),
        };
        assert_eq!(FleetError::from(api(404)).exit_code(), exit::NOT_FOUND);
        assert_eq!(FleetError::from(api(409)).exit_code(), exit::FAILED);
        let refused = ClientError::Connect {
            addr: "x".into(),
            err: std::io::ErrorKind::ConnectionRefused.into(),
        };
        assert_eq!(FleetError::from(refused).exit_code(), exit::UNREACHABLE);
        let conflict = StoreError::Conflict {
            key: "apps/kv".into(),
            expected: Expect::Absent,
            found: Some(1),
        };
        assert_eq!(FleetError::from(conflict).exit_code(), exit::CONFLICT);
    }
}
