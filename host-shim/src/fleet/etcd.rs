//! The fleet state in an etcd cluster: [`EtcdStore`], the [`FleetStore`]
//! over etcd's v3 API as the [`super::store`] module docs map it (keys
//! under [`PREFIX`], versions are `mod_revision`s, conditional writes are
//! `Txn`s), with etcd's leases.
//!
//! The `etcd-client` crate is async; the store owns a small current-thread
//! tokio runtime and blocks on it, so its callers stay synchronous. Every
//! call, connecting included, has a deadline ([`DEADLINE`]): a cluster that
//! does not answer (down, or without a quorum) is an error naming its
//! endpoints, never a hang.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use serde_json::Value;

use super::store::{Expect, FleetStore, LeaseId, StoreError, Versioned};

/// Where the fleet's keys live in etcd.
pub const PREFIX: &str = "/host-shim/fleet/";

/// How long any etcd call may take, connecting included.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// A fleet store in etcd (see the module docs).
pub struct EtcdStore {
    runtime: tokio::runtime::Runtime,
    client: Client,
    /// `etcd://HOST:PORT,...`, for errors.
    endpoints: String,
    deadline: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`HOST:PORT` each) and checks
    /// that it answers, within [`DEADLINE`].
    pub fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, DEADLINE)
    }

    /// [`EtcdStore::connect`] with another deadline for every call.
    pub fn connect_with(endpoints: &[String], deadline: Duration) -> Result<Self, StoreError> {
        let label = format!("etcd://{}", endpoints.join(","));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Etcd {
                endpoints: label.clone(),
                detail: format!("cannot start its client's runtime: {e}"),
            })?;
        let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
        // Without a leader (no quorum) requests fail at once instead of waiting.
        let options = ConnectOptions::new()
            .with_connect_timeout(deadline)
            .with_timeout(deadline)
            .with_require_leader(true);
        // The timer needs the runtime: the timeout is made inside it.
        let connected = runtime.block_on(async {
            tokio::time::timeout(deadline, Client::connect(urls, Some(options))).await
        });
        let client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(StoreError::Etcd {
                    endpoints: label,
                    detail: describe(&e),
                })
            }
            Err(_) => {
                return Err(StoreError::Timeout {
                    endpoints: label,
                    after: deadline,
                })
            }
        };
        let store = Self {
            runtime,
            client,
            endpoints: label,
            deadline,
        };
        // The channel connects lazily: one round trip now, so that a URL
        // that does not answer fails here.
        store.call(|mut c| async move { c.status().await })?;
        Ok(store)
    }

    /// Runs one etcd request on the store's runtime, within the deadline.
    fn call<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let request = op(self.client.clone());
        let answer = self
            .runtime
            .block_on(async { tokio::time::timeout(self.deadline, request).await });
        match answer {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(&e)),
            Err(_) => Err(StoreError::Timeout {
                endpoints: self.endpoints.clone(),
                after: self.deadline,
            }),
        }
    }

    fn error(&self, e: &etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            detail: describe(e),
        }
    }

    fn key(key: &str) -> String {
        format!("{PREFIX}{key}")
    }

    /// The compare of a write expecting `expect` at `key`, if any.
    fn compare(key: &str, expect: Expect) -> Vec<Compare> {
        match expect {
            Expect::Any => Vec::new(),
            Expect::Absent => vec![Compare::create_revision(key, CompareOp::Equal, 0)],
            Expect::Version(v) => vec![Compare::mod_revision(
                key,
                CompareOp::Equal,
                i64::try_from(v).unwrap_or(i64::MAX),
            )],
        }
    }

    /// `op` on `key` if `expect` holds, else a conflict naming the version
    /// found; returns the revision of the change.
    fn write(&self, key: &str, expect: Expect, op: TxnOp) -> Result<u64, StoreError> {
        let full = Self::key(key);
        let txn = Txn::new()
            .when(Self::compare(&full, expect))
            .and_then(vec![op])
            .or_else(vec![TxnOp::get(full.clone(), None)]);
        let resp = self.call(|mut c| async move { c.txn(txn).await })?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision() as u64));
        }
        let found = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.mod_revision() as u64)),
            _ => None,
        });
        Err(StoreError::Conflict {
            key: key.to_owned(),
            expected: expect,
            found: found.flatten(),
        })
    }
}

/// An etcd error in words, saying so when the cluster has no quorum.
fn describe(e: &etcd_client::Error) -> String {
    let text = e.to_string();
    if text.contains("no leader") {
        format!("etcd has no quorum (no leader): {text}")
    } else {
        text
    }
}

/// A key-value of etcd as a versioned JSON value.
fn decode(kv: &KeyValue) -> Result<(String, Versioned<Value>), StoreError> {
    let key = String::from_utf8_lossy(kv.key());
    let key = key.strip_prefix(PREFIX).unwrap_or(&key).to_owned();
    match serde_json::from_slice(kv.value()) {
        Ok(value) => Ok((
            key,
            Versioned {
                version: kv.mod_revision() as u64,
                value,
            },
        )),
        Err(e) => Err(StoreError::BadRecord {
            key,
            detail: e.to_string(),
        }),
    }
}

impl FleetStore for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<Versioned<Value>>, StoreError> {
        let full = Self::key(key);
        let resp = self.call(|mut c| async move { c.get(full, None).await })?;
        resp.kvs()
            .first()
            .map(|kv| decode(kv).map(|(_, v)| v))
            .transpose()
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned<Value>)>, StoreError> {
        let full = Self::key(prefix);
        let resp =
            self.call(
                |mut c| async move { c.get(full, Some(GetOptions::new().with_prefix())).await },
            )?;
        // etcd returns a range in key order. A record that does not decode
        // (written by something else) is skipped, not fatal to the list.
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| match decode(kv) {
                Ok(entry) => Some(entry),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a fleet record");
                    None
                }
            })
            .collect())
    }

    fn put(&self, key: &str, value: Value, expect: Expect) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(&value).expect("serializable");
        self.write(key, expect, TxnOp::put(Self::key(key), bytes, None))
    }

    fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError> {
        self.write(key, expect, TxnOp::delete(Self::key(key), None))
            .map(|_| ())
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let resp = self.call(|mut c| async move { c.lease_grant(secs, None).await })?;
        Ok(LeaseId(resp.id()))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        // Opening the keep-alive stream sends one renewal and reads its answer.
        match self.call(|mut c| async move { c.lease_keep_alive(lease.0).await }) {
            Ok(_) => Ok(()),
            Err(StoreError::Etcd { detail, .. }) if detail.contains("lease not found") => {
                Err(StoreError::LeaseExpired(lease.0))
            }
            Err(e) => Err(e),
        }
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.call(|mut c| async move { c.lease_revoke(lease.0).await }) {
            Ok(_) => Ok(()),
            Err(StoreError::Etcd { detail, .. }) if detail.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn put_leased(
        &self,
        key: &str,
        value: Value,
        expect: Expect,
        lease: LeaseId,
    ) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(&value).expect("serializable");
        let options = PutOptions::new().with_lease(lease.0);
        match self.write(
            key,
            expect,
            TxnOp::put(Self::key(key), bytes, Some(options)),
        ) {
            Err(StoreError::Etcd { detail, .. }) if detail.contains("lease not found") => {
                Err(StoreError::LeaseExpired(lease.0))
            }
            other => other,
        }
    }
}
