//! Where the fleet state lives: the [`FleetStore`] trait (versioned keys
//! with compare-and-swap writes, leases), its file implementation, and
//! [`open`], which picks a store from its URL.
//!
//! # Keys and versions
//!
//! The state is a set of keys (`hosts/NAME`, `apps/NAME`), each holding a
//! JSON value and a version: the store's revision when the key was last
//! written (revisions only grow). A write names what it expects to find
//! ([`Expect`]): nothing, a given version, or anything; a write whose
//! expectation fails is refused with [`StoreError::Conflict`] and changes
//! nothing. Two CLIs that read the same app record and both try to move it
//! therefore cannot both win: the second re-reads and sees the move.
//!
//! # etcd
//!
//! The trait maps one-to-one on etcd's v3 KV API, so a fleet that outgrows
//! a file on one laptop can keep its state in an etcd cluster behind the
//! same commands:
//!
//! - a key is the etcd key `PREFIX/KEY` (e.g. `/host-shim/fleet/apps/kv`),
//!   its value the JSON bytes;
//! - a version is the key's `mod_revision` (etcd's revision also only grows);
//! - [`FleetStore::get`] is a `Range` on the key, [`FleetStore::list`]
//!   `Range`s over the prefix (`range_end` = prefix + 1), in pages at the
//!   first page's revision;
//! - [`FleetStore::put`] with [`Expect::Version`]`(v)` is a `Txn` with
//!   `compare: mod_revision(key) == v`, `success: Put`; with
//!   [`Expect::Absent`] the compare is `create_revision(key) == 0`; a
//!   failed compare is [`StoreError::Conflict`]; the new version is the
//!   `Txn` response header's revision;
//! - [`FleetStore::delete`] is the same `Txn` with a `DeleteRange`.
//!
//! [`super::etcd::EtcdStore`] is that mapping. It also has leases
//! ([`FleetStore::grant_lease`]): keys written under a lease vanish when
//! its holder stops keeping it alive, which is how a host's liveness is
//! kept ([`super::registry`]). The file store has no leases.
//!
//! [`open`] picks the store from a URL: `file://PATH` or
//! `etcd://HOST:PORT[,HOST:PORT...]`; [`open_with`] also takes how to
//! reach etcd ([`Access`]: TLS with a CA and a client certificate, a user
//! and password).
//!
//! # The file
//!
//! [`FileStore`] keeps everything in one JSON file (default
//! `~/.config/host-shim/fleet.json`). Every change takes an exclusive lock
//! on `FILE.lock` (so two CLIs never interleave read-modify-write), reads
//! the file, checks the expectation, and replaces the file atomically
//! (temp file, fsync, rename): a crash leaves the old state or the new one,
//! never half of each. Reads need no lock. The file is readable by its
//! owner only (mode 0600): it holds the hosts' tokens.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a write expects to find at its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key exists with this version.
    Version(u64),
    /// Anything (unconditional).
    Any,
}

/// A value with the version it was read at.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub version: u64,
    pub value: T,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{key} changed meanwhile (expected {expected:?}, found version {found:?}): try again")]
    Conflict {
        key: String,
        expected: Expect,
        found: Option<u64>,
    },
    #[error("fleet state {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("fleet state {path} is not valid: {detail} (fix or remove it)")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "'{url}' is not a fleet store: {detail} (file://PATH or etcd://HOST:PORT[,HOST:PORT...])"
    )]
    BadUrl { url: String, detail: String },
    #[error("etcd at {endpoints}: {detail}")]
    Etcd { endpoints: String, detail: String },
    #[error(
        "etcd at {endpoints} did not answer within {after:?} (is it running, and has it a quorum?){}",
        last.as_deref().map(|l| format!("; last error: {l}")).unwrap_or_default()
    )]
    Timeout {
        endpoints: String,
        after: Duration,
        /// What the last attempt said, if it said anything.
        last: Option<String>,
    },
    #[error("{0}")]
    Access(String),
    #[error("fleet state: {key} holds no valid JSON: {detail}")]
    BadRecord { key: String, detail: String },
    #[error("lease {0:x} has expired (not kept alive within its time to live)")]
    LeaseExpired(i64),
    #[error("the store's history before revision {0} was compacted away")]
    Compacted(u64),
    #[error("this fleet store has no leases: {0} needs an etcd store (--store etcd://HOST:PORT)")]
    NoLeases(&'static str),
}

/// A lease granted by the store (etcd's lease ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseId(pub i64);

/// A versioned key-value store for the fleet state (see the module docs).
pub trait FleetStore: Send + Sync {
    /// The value of `key` and its version, if it exists.
    fn get(&self, key: &str) -> Result<Option<Versioned<Value>>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned<Value>)>, StoreError>;
    /// Writes `value` at `key` if `expect` holds; returns the new version.
    fn put(&self, key: &str, value: Value, expect: Expect) -> Result<u64, StoreError>;
    /// Removes `key` if `expect` holds (removing a missing key with
    /// [`Expect::Any`] is not an error).
    fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError>;

    /// Whether it has leases (etcd does, the file store not).
    fn has_leases(&self) -> bool {
        false
    }
    /// A new lease that lapses `ttl` after it was last kept alive.
    fn grant_lease(&self, _ttl: Duration) -> Result<LeaseId, StoreError> {
        Err(StoreError::NoLeases("a lease"))
    }
    /// Renews `lease` for its whole TTL ([`StoreError::LeaseExpired`] if too late).
    fn keep_alive(&self, _lease: LeaseId) -> Result<(), StoreError> {
        Err(StoreError::NoLeases("a lease"))
    }
    /// Ends `lease` now: the keys written under it vanish (an expired lease is no error).
    fn revoke_lease(&self, _lease: LeaseId) -> Result<(), StoreError> {
        Err(StoreError::NoLeases("a lease"))
    }
    /// [`FleetStore::put`] of a key that lives only as long as `lease`.
    fn put_leased(
        &self,
        _key: &str,
        _value: Value,
        _expect: Expect,
        _lease: LeaseId,
    ) -> Result<u64, StoreError> {
        Err(StoreError::NoLeases("a leased key"))
    }

    /// Calls `on` with every write of a key under `prefix` whose version
    /// is above `after`, in version order, as they happen, until `on`
    /// returns `false` (then `Ok`) or the store is lost (an error: the
    /// caller resumes from the last version it saw). Deletions are not
    /// reported. This default polls [`FleetStore::list`] every
    /// [`POLL`]; etcd watches.
    fn watch(
        &self,
        prefix: &str,
        after: u64,
        on: &mut dyn FnMut(String, Versioned<Value>) -> bool,
    ) -> Result<(), StoreError> {
        let mut last = after;
        loop {
            let mut new: Vec<_> = self
                .list(prefix)?
                .into_iter()
                .filter(|(_, v)| v.version > last)
                .collect();
            new.sort_by_key(|(_, v)| v.version);
            for (key, v) in new {
                last = v.version;
                if !on(key, v) {
                    return Ok(());
                }
            }
            std::thread::sleep(POLL);
        }
    }
}

/// How often [`FleetStore::watch`] polls a store that cannot watch.
pub const POLL: Duration = Duration::from_millis(200);

/// How to reach an etcd store beyond its URL (`--store-ca`,
/// `--store-cert`, `--store-key`, `--store-user`): none of it by default.
#[derive(Clone, Default)]
pub struct Access {
    /// PEM certificate(s) of the CA the members' certificates must chain
    /// to: the store is reached over TLS (`https://` to each member).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and its key, for members that check client
    /// certificates (`etcd --client-cert-auth`); TLS too.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// An etcd user and its password (`etcd auth enable`).
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Access {
    /// Whether the members are reached over TLS.
    pub fn tls(&self) -> bool {
        self.ca.is_some() || self.cert.is_some()
    }

    /// Whether anything beyond the URL is asked for.
    pub fn is_default(&self) -> bool {
        !self.tls() && self.key.is_none() && self.user.is_none()
    }
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Access")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// The store behind `url`: `file://PATH` (a [`FileStore`]) or
/// `etcd://HOST:PORT[,HOST:PORT...]` (an etcd cluster, reached within
/// [`super::etcd::DEADLINE`] or an error naming it).
pub fn open(url: &str) -> Result<Box<dyn FleetStore>, StoreError> {
    open_with(url, &Access::default())
}

/// [`open`], reaching etcd as `access` says (TLS, a user).
pub fn open_with(url: &str, access: &Access) -> Result<Box<dyn FleetStore>, StoreError> {
    let bad = |detail: &str| StoreError::BadUrl {
        url: url.to_owned(),
        detail: detail.to_owned(),
    };
    match url.split_once("://") {
        Some(("file", _)) if !access.is_default() => Err(bad(
            "TLS and users (--store-ca, --store-cert, --store-key, --store-user) are for etcd stores",
        )),
        Some(("file", path)) if !path.is_empty() => Ok(Box::new(FileStore::new(Path::new(path)))),
        Some(("file", _)) => Err(bad("no path after file://")),
        Some(("etcd", hosts)) => {
            let endpoints: Vec<String> = hosts.split(',').map(|h| h.trim().to_owned()).collect();
            for e in &endpoints {
                let port = e.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
                if !matches!(port, Some((h, Ok(p))) if !h.is_empty() && p != 0 && !h.contains('/'))
                {
                    return Err(bad(&format!("'{e}' is not HOST:PORT")));
                }
            }
            Ok(Box::new(super::etcd::EtcdStore::connect_with(
                &endpoints,
                access,
                super::etcd::DEADLINE,
            )?))
        }
        Some((scheme, _)) => Err(bad(&format!("unknown scheme {scheme}://"))),
        None => Err(bad("no scheme")),
    }
}

/// The file's layout.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FileState {
    /// Bumped by every write; the version of the keys it wrote.
    revision: u64,
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    version: u64,
    value: Value,
}

/// The fleet state in one JSON file.
#[derive(Clone, Debug)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self) -> impl Fn(std::io::Error) -> StoreError + '_ {
        |err| StoreError::Io {
            path: self.path.clone(),
            err,
        }
    }

    fn read(&self) -> Result<FileState, StoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileState::default()),
            Err(e) => Err(self.io()(e)),
        }
    }

    /// Runs `change` on the state under the lock and writes the result.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut FileState) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(self.io())?;
        }
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(self.io())?;
        lock.lock().map_err(self.io())?;
        let mut state = self.read()?;
        let out = change(&mut state)?;
        let json = serde_json::to_vec_pretty(&state).expect("serializable");
        write_private(&self.path, &json).map_err(self.io())?;
        // The lock goes with `lock`.
        Ok(out)
    }
}

/// Replaces `path` by `bytes` atomically and durably, readable by its
/// owner only (the file holds the users' tokens): a new temporary file with
/// an unpredictable name beside it (0600, `O_EXCL|O_NOFOLLOW`), fsync,
/// rename over `path`, fsync of the directory.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    shim_util::files::write_atomic(path, bytes)
}

fn check(key: &str, found: Option<u64>, expect: Expect) -> Result<(), StoreError> {
    let ok = match expect {
        Expect::Any => true,
        Expect::Absent => found.is_none(),
        Expect::Version(v) => found == Some(v),
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            key: key.to_owned(),
            expected: expect,
            found,
        })
    }
}

impl FleetStore for FileStore {
    fn get(&self, key: &str) -> Result<Option<Versioned<Value>>, StoreError> {
        Ok(self.read()?.entries.remove(key).map(|e| Versioned {
            version: e.version,
            value: e.value,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned<Value>)>, StoreError> {
        Ok(self
            .read()?
            .entries
            .into_iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| {
                (
                    k,
                    Versioned {
                        version: e.version,
                        value: e.value,
                    },
                )
            })
            .collect())
    }

    fn put(&self, key: &str, value: Value, expect: Expect) -> Result<u64, StoreError> {
        self.update(|state| {
            check(key, state.entries.get(key).map(|e| e.version), expect)?;
            state.revision += 1;
            let version = state.revision;
            state
                .entries
                .insert(key.to_owned(), Entry { version, value });
            Ok(version)
        })
    }

    fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError> {
        self.update(|state| {
            check(key, state.entries.get(key).map(|e| e.version), expect)?;
            if state.entries.remove(key).is_some() {
                state.revision += 1;
            }
            Ok(())
        })
    }
}

/// A file store in a fresh temporary directory named for `tag` (unique
/// among the crate's tests), and that directory.
#[cfg(test)]
pub(crate) fn temp_store(tag: &str) -> (FileStore, PathBuf) {
    let dir = std::env::temp_dir().join(format!("host-shim-fleet-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    (FileStore::new(&dir.join("sub/fleet.json")), dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compare_and_swap() {
        let (s, dir) = temp_store("cas");
        assert!(s.get("hosts/a").unwrap().is_none());
        let v1 = s
            .put("hosts/a", json!({"url": "x"}), Expect::Absent)
            .unwrap();
        assert!(matches!(
            s.put("hosts/a", json!({}), Expect::Absent),
            Err(StoreError::Conflict { .. })
        ));
        let v2 = s
            .put("hosts/a", json!({"url": "y"}), Expect::Version(v1))
            .unwrap();
        assert!(v2 > v1);
        assert!(matches!(
            s.put("hosts/a", json!({}), Expect::Version(v1)),
            Err(StoreError::Conflict { found: Some(v), .. }) if v == v2
        ));
        s.put("apps/kv", json!({"host": "a"}), Expect::Any).unwrap();
        let hosts = s.list("hosts/").unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].1.value, json!({"url": "y"}));
        assert!(s.delete("hosts/a", Expect::Version(v1)).is_err());
        s.delete("hosts/a", Expect::Version(v2)).unwrap();
        s.delete("hosts/a", Expect::Any).unwrap();
        assert!(s.get("hosts/a").unwrap().is_none());
        assert!(s.get("apps/kv").unwrap().is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "tokens stay private");
        std::fs::write(s.path(), b"{ not json").unwrap();
        assert!(matches!(s.list(""), Err(StoreError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn store_urls() {
        for bad in [
            "",
            "fleet.json",
            "file://",
            "nfs://x",
            "etcd://",
            "etcd://h",
            "etcd://h:0",
            "etcd://:1",
            "etcd://a:1,b",
        ] {
            assert!(matches!(open(bad), Err(StoreError::BadUrl { .. })), "{bad}");
        }
        let (s, dir) = temp_store("url");
        let url = format!("file://{}", s.path().display());
        open(&url)
            .unwrap()
            .put("hosts/a", json!({}), Expect::Absent)
            .unwrap();
        assert!(s.get("hosts/a").unwrap().is_some());
        // The file store has no leases, and says what needs them.
        let lease = open(&url).unwrap().grant_lease(Duration::from_secs(5));
        assert!(matches!(lease, Err(StoreError::NoLeases(_))));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let (s, dir) = temp_store("lock");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        s.put(&format!("apps/{t}-{i}"), json!(i), Expect::Absent)
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.list("apps/").unwrap().len(), 40);
        let _ = std::fs::remove_dir_all(dir);
    }
}
