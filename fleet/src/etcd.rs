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
//!
//! With an [`Access`] that names a CA (and a client certificate) the
//! members are reached over TLS (rustls); with a user, the client
//! authenticates as it and refreshes its token when etcd expires it.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde_json::Value;

use super::store::{Access, Expect, FleetStore, LeaseId, StoreError, Versioned};

/// Where the fleet's keys live in etcd.
pub const PREFIX: &str = "/host-shim/fleet/";

/// How long any etcd call may take, connecting included.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// How often an idle connection is pinged (a watch on a member that
/// stopped answering ends within this plus [`DEADLINE`]).
const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// Keys per answer of a list (each far below gRPC's 4 MiB message limit).
const PAGE: i64 = 1000;

/// Most keys one list returns (beyond: an error, not unbounded memory).
const MAX_LIST: usize = 1_000_000;

/// A fleet store in etcd (see the module docs).
pub struct EtcdStore {
    runtime: tokio::runtime::Runtime,
    /// One client per member: a request that a member cannot serve (down,
    /// or its leader just died) is retried on the next one.
    members: Vec<Client>,
    /// The member that answered last, tried first.
    preferred: AtomicUsize,
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
        Self::connect_with(endpoints, &Access::default(), DEADLINE)
    }

    /// [`EtcdStore::connect`] reaching the members as `access` says, with
    /// another deadline for every call.
    pub fn connect_with(
        endpoints: &[String],
        access: &Access,
        deadline: Duration,
    ) -> Result<Self, StoreError> {
        let label = format!("etcd://{}", endpoints.join(","));
        let failed = |detail: String| StoreError::Etcd {
            endpoints: label.clone(),
            detail,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(format!("cannot start its client's runtime: {e}")))?;
        // Without a leader (no quorum) a member refuses at once instead of waiting.
        let options = ConnectOptions::new()
            .with_connect_timeout(deadline)
            .with_timeout(deadline)
            .with_require_leader(true)
            // A member that stops answering under a long watch is noticed.
            .with_keep_alive(KEEP_ALIVE, deadline)
            .with_keep_alive_while_idle(true);
        let options = with_access(options, access)
            .map_err(|e| StoreError::Access(format!("{label}: {e}")))?;
        let scheme = if access.tls() { "https" } else { "http" };
        let mut members = Vec::with_capacity(endpoints.len());
        // The channel connects lazily: this does not wait for the member,
        // unless a user must log in first. A member that fails then is
        // left out if another one answers (it may be down).
        let end = Instant::now() + deadline;
        let mut refused = None;
        for e in endpoints {
            let url = format!("{scheme}://{e}");
            let options = options.clone();
            let budget = end.saturating_duration_since(Instant::now());
            let client = runtime.block_on(async {
                tokio::time::timeout(budget, Client::connect([url], Some(options))).await
            });
            match client {
                Ok(Ok(client)) => members.push(client),
                Ok(Err(err)) => {
                    tracing::debug!(member = %e, error = %err, "cannot connect to an etcd member");
                    refused = Some(failed(format!("{e}: {}", describe(&err))));
                }
                Err(_) => {
                    refused = Some(StoreError::Timeout {
                        endpoints: label.clone(),
                        after: deadline,
                        last: None,
                    })
                }
            }
        }
        if members.is_empty() {
            return Err(refused.unwrap_or_else(|| failed("no endpoints".into())));
        }
        let store = Self {
            runtime,
            members,
            preferred: AtomicUsize::new(0),
            endpoints: label,
            deadline,
        };
        // One round trip now, so that a URL that does not answer fails here.
        store.call(|mut c| async move { c.status().await })?;
        Ok(store)
    }

    /// Runs one etcd request within the deadline, on the member that
    /// answered last, else on the others in turn (each attempt gets a third
    /// of the deadline: a member whose leader just died holds a request
    /// for longer than that). Only errors that say the member could not
    /// serve it are retried; a write that timed out may have been applied,
    /// and its retry then fails its compare (a conflict, never a double
    /// write).
    fn call<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let end = Instant::now() + self.deadline;
        let attempt = (self.deadline / 3).max(Duration::from_millis(500));
        let first = self.preferred.load(Ordering::Relaxed);
        let n = self.members.len();
        let mut no_leader = None;
        let mut last = None;
        for k in 0.. {
            let mut now = Instant::now();
            if k > 0 && k % n == 0 && now < end {
                // Every member refused: give the cluster a moment (an election).
                std::thread::sleep(Duration::from_millis(100).min(end - now));
                now = Instant::now();
            }
            if now >= end {
                break;
            }
            let i = (first + k) % n;
            let request = op(self.members[i].clone());
            let budget = attempt.min(end - now);
            let answer = self
                .runtime
                .block_on(async { tokio::time::timeout(budget, request).await });
            match answer {
                Ok(Ok(v)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) if retryable(&e) => {
                    tracing::debug!(member = i, error = %e, "etcd member could not serve a request");
                    let text = describe(&e);
                    if text.contains("no leader") {
                        no_leader = Some(text);
                    } else {
                        last = Some(text);
                    }
                }
                Ok(Err(e)) => return Err(self.error(&e)),
                Err(_) => {}
            }
        }
        Err(match (no_leader, last) {
            (Some(text), _) => StoreError::Etcd {
                endpoints: self.endpoints.clone(),
                detail: format!("etcd has no quorum (no leader): {text}"),
            },
            (None, last) => StoreError::Timeout {
                endpoints: self.endpoints.clone(),
                after: self.deadline,
                last,
            },
        })
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
        let resp = self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
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

/// `options` with the TLS and the user `access` asks for; errors name
/// the flag and file at fault.
fn with_access(options: ConnectOptions, access: &Access) -> Result<ConnectOptions, String> {
    // PEM files: regular files of at most 1 MiB.
    let read = |flag: &str, path: &std::path::Path| {
        shim_util::files::read_capped(path, 1 << 20).map_err(|e| format!("{flag}: {e}"))
    };
    let mut options = options;
    if access.tls() {
        let Some(ca) = &access.ca else {
            return Err(
                "--store-cert needs --store-ca (the CA the members' certificates chain to)".into(),
            );
        };
        let mut tls =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read("--store-ca", ca)?));
        match (&access.cert, &access.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("--store-cert", cert)?,
                    read("--store-key", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err("--store-cert and --store-key go together".into()),
        }
        options = options.with_tls(tls);
    } else if access.key.is_some() {
        return Err("--store-key goes with --store-cert".into());
    }
    match (&access.user, &access.password) {
        (Some(user), Some(password)) => {
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        (None, None) => {}
        (Some(user), None) => return Err(format!("--store-user {user} needs a password (--store-password-file FILE or $HOST_SHIM_STORE_PASSWORD)")),
        (None, Some(_)) => return Err("a store password needs --store-user".into()),
    }
    Ok(options)
}

/// The end of the range of keys starting with `prefix` (etcd's `range_end`).
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every key (an all-0xff prefix).
    vec![0]
}

/// Whether the member could not serve the request (down, unreachable,
/// without a leader), so another member may.
fn retryable(e: &etcd_client::Error) -> bool {
    match e {
        // 14: Unavailable, 4: DeadlineExceeded; a connection that broke
        // under the request comes as Unknown with a transport error.
        // A certificate the client does not trust stays so on every member.
        etcd_client::Error::GRpcStatus(s) if s.message().contains("certificate") => false,
        etcd_client::Error::GRpcStatus(s) => {
            matches!(s.code() as i32, 14 | 4) || s.message() == "transport error"
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// An etcd error in words, saying so when the cluster has no quorum.
fn describe(e: &etcd_client::Error) -> String {
    // With its causes: a transport error says why (e.g. the member's
    // certificate is not signed by --store-ca) only in them.
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    if text.contains("no leader") {
        format!("etcd has no quorum (no leader): {text}")
    } else if text.contains("invalid peer certificate") {
        format!("{text} (is --store-ca the CA that signed the members' certificates?)")
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

impl EtcdStore {
    /// Opens a watch of `prefix` from revision `from` on the member that
    /// answered last, else on the others in turn, within the deadline.
    async fn open_watch(
        &self,
        prefix: &str,
        from: u64,
    ) -> Result<etcd_client::WatchStream, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(i64::try_from(from).unwrap_or(i64::MAX));
        let first = self.preferred.load(Ordering::Relaxed);
        let n = self.members.len();
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            let mut client = self.members[i].clone();
            let opened = tokio::time::timeout(
                self.deadline,
                client.watch(Self::key(prefix), Some(options.clone())),
            )
            .await;
            match opened {
                Ok(Ok(stream)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(stream);
                }
                Ok(Err(e)) => last = Some(self.error(&e)),
                Err(_) => {}
            }
        }
        Err(last.unwrap_or(StoreError::Timeout {
            endpoints: self.endpoints.clone(),
            after: self.deadline,
            last: None,
        }))
    }
}

impl FleetStore for EtcdStore {
    /// An etcd watch of the prefix from revision `after + 1`: etcd sends
    /// every write since then, in revision order, then each new one as it
    /// happens. A broken connection, or a member that stops answering
    /// (its pings go unanswered), ends it with an error; a start revision
    /// that etcd compacted away is an error too (the caller lists again).
    fn watch(
        &self,
        prefix: &str,
        after: u64,
        on: &mut dyn FnMut(String, Versioned<Value>) -> bool,
    ) -> Result<(), StoreError> {
        self.runtime.block_on(async {
            let mut stream = self.open_watch(prefix, after + 1).await?;
            loop {
                let resp = match stream.message().await {
                    Ok(Some(resp)) => resp,
                    Ok(None) => {
                        return Err(StoreError::Etcd {
                            endpoints: self.endpoints.clone(),
                            detail: "the watch stream ended".into(),
                        })
                    }
                    Err(e) => return Err(self.error(&e)),
                };
                if resp.canceled() && resp.compact_revision() > 0 {
                    return Err(StoreError::Compacted(resp.compact_revision() as u64));
                }
                if resp.canceled() {
                    return Err(StoreError::Etcd {
                        endpoints: self.endpoints.clone(),
                        detail: format!(
                            "watch canceled (compacted up to revision {}): {}",
                            resp.compact_revision(),
                            resp.cancel_reason()
                        ),
                    });
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv().filter(|_| ev.event_type() == EventType::Put) else {
                        continue;
                    };
                    match decode(kv) {
                        Ok((key, v)) => {
                            if !on(key, v) {
                                return Ok(());
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "skipping a watched record"),
                    }
                }
            }
        })
    }

    fn get(&self, key: &str) -> Result<Option<Versioned<Value>>, StoreError> {
        let full = Self::key(key);
        let resp = self.call(|mut c| {
            let key = full.clone();
            async move { c.get(key, None).await }
        })?;
        resp.kvs()
            .first()
            .map(|kv| decode(kv).map(|(_, v)| v))
            .transpose()
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned<Value>)>, StoreError> {
        let full = Self::key(prefix).into_bytes();
        let end = range_end(&full);
        let mut from = full;
        // Page after page at the first page's revision: one snapshot.
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_revision(revision);
            let resp = self.call(|mut c| {
                let (key, options) = (from.clone(), options.clone());
                async move { c.get(key, Some(options)).await }
            })?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            // In key order. A record that does not decode (written by
            // something else) is skipped, not fatal to the list.
            out.extend(resp.kvs().iter().filter_map(|kv| match decode(kv) {
                Ok(entry) => Some(entry),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a fleet record");
                    None
                }
            }));
            let Some(last) = resp.kvs().last().filter(|_| resp.more()) else {
                return Ok(out);
            };
            if out.len() > MAX_LIST {
                return Err(StoreError::Etcd {
                    endpoints: self.endpoints.clone(),
                    detail: format!("more than {MAX_LIST} keys under {PREFIX}{prefix}"),
                });
            }
            from = last.key().to_vec();
            from.push(0);
        }
    }

    fn put(&self, key: &str, value: Value, expect: Expect) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(&value).expect("serializable");
        self.write(key, expect, TxnOp::put(Self::key(key), bytes, None))
    }

    fn delete(&self, key: &str, expect: Expect) -> Result<(), StoreError> {
        self.write(key, expect, TxnOp::delete(Self::key(key), None))
            .map(|_| ())
    }

    fn has_leases(&self) -> bool {
        true
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_ends() {
        assert_eq!(range_end(b"/a/"), b"/a0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), vec![0]);
    }
}
