//! The daemon's API server policy, served by the `api` crate's HTTP server
//! ([`api::server::serve`], which owns the accept loop, connection slots,
//! deadlines and bounded reads): TLS or not, who may call what, and the
//! typed requests handed to the daemon (`Daemon::handle`) or, for the
//! migration stream, to the migration crate.
//!
//! Secure mode (a daemon with an identity, the `security` crate):
//! - every connection is TLS 1.3; the server asks for a client certificate
//!   but does not require one;
//! - API calls need `Authorization: Bearer TOKEN` with the user token, or a
//!   client certificate pinned as a peer; anything else gets 401 and a log
//!   line. A caller known only by its peer certificate may migrate, stand
//!   by, push images and read health, info and the instance list
//!   ([`api::routes::peer_may_call`]); anything else gets 403 and a log line;
//! - `POST /v1/migration` (the migration stream) needs a client certificate
//!   pinned as a peer; anything else gets 403 and a log line, and the
//!   sender's instance keeps running where it is.
//!
//! Plain mode (`serve --listen` without an identity): plain TCP, no checks,
//! for tests, benchmarks and trusted networks.

use std::io::{self, BufReader};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use super::{ApiError, Daemon, MIGRATION_PROTOCOL};
use api::server::{Admission, Head, Reply, Service};
use security::tls::Stream;
use security::HostSecurity;

pub use api::routes::Method;
pub use api::server::fuzz_request;

/// Who is calling.
pub enum Caller {
    /// Plain mode: nobody is checked.
    Anyone,
    User,
    /// A pinned peer host, by name.
    Peer(String),
}

/// The daemon as the API server's [`Service`].
struct Api {
    daemon: Arc<Daemon>,
    security: Option<Arc<HostSecurity>>,
}

/// Serves the daemon's API on `listener` until the process ends (TLS and
/// authentication when `security` is set).
pub fn serve(daemon: &Arc<Daemon>, listener: TcpListener, security: Option<Arc<HostSecurity>>) {
    let limits = daemon.config.limits.clone();
    let service = Arc::new(Api {
        daemon: Arc::clone(daemon),
        security,
    });
    api::server::serve(service, listener, &limits);
}

fn is_migration(head: &Head) -> bool {
    head.method == Method::Post && head.path.trim_end_matches('/') == "/v1/migration"
}

impl Service for Api {
    type Conn = Stream;
    type Caller = Caller;

    fn handshakes(&self) -> bool {
        self.security.is_some()
    }

    fn open(&self, tcp: TcpStream) -> io::Result<Stream> {
        match &self.security {
            Some(sec) => Stream::accept(tcp, &sec.server),
            None => Ok(Stream::Plain(tcp)),
        }
    }

    fn admit(
        &self,
        head: &Head,
        conn: &Stream,
        _from: &str,
    ) -> Result<Admission<Caller>, ApiError> {
        let migration = is_migration(head);
        let caller = authenticate(head, conn, self.security.as_deref(), migration)?;
        if let Caller::Peer(peer) = &caller {
            if !api::routes::peer_may_call(&head.method, &head.path) {
                return Err(ApiError(
                    403,
                    format!(
                        "{} {} needs the user token: peers may only migrate, stand by and push \
                         images (this caller has only the certificate of peer host {peer})",
                        head.method, head.path
                    ),
                ));
            }
        }
        Ok(if migration {
            Admission::Upgrade(caller, MIGRATION_PROTOCOL)
        } else {
            Admission::Request(caller)
        })
    }

    fn handle(
        &self,
        _caller: Caller,
        method: &Method,
        path: &str,
        body: &[u8],
    ) -> Result<Reply, ApiError> {
        self.daemon.handle(method, path, body)
    }

    /// The migration stream: the migration crate's destination owns it.
    fn upgraded(&self, caller: Caller, conn: BufReader<Stream>, from: String) {
        let peer = match caller {
            Caller::Peer(name) => name,
            _ => from,
        };
        match conn.get_ref().tcp().try_clone() {
            Ok(sock) => {
                let cx = self.daemon.migration_context();
                migration::dest::accept(&cx, &*self.daemon, conn, sock, &peer)
            }
            Err(e) => tracing::warn!(%peer, error = %e, "incoming migration failed"),
        }
    }
}

/// Who the caller is, or why they may not call. A migration stream must
/// come from a pinned peer; `GET /v1/health` from anyone; other calls from
/// a user with the token or a pinned peer.
fn authenticate(
    head: &Head,
    stream: &Stream,
    security: Option<&HostSecurity>,
    migration: bool,
) -> Result<Caller, ApiError> {
    let Some(sec) = security else {
        return Ok(Caller::Anyone);
    };
    // Liveness probes (monitors, load balancers) need no token.
    if head.method == Method::Get && head.path.trim_end_matches('/') == "/v1/health" {
        return Ok(Caller::Anyone);
    }
    let fp = stream.peer_fingerprint();
    let peer = fp.and_then(|fp| sec.peer_by_fingerprint(&fp));
    if migration {
        return match (peer, fp) {
            (Some(peer), _) => Ok(Caller::Peer(peer.name)),
            (None, Some(fp)) => Err(ApiError(
                403,
                format!(
                    "migration refused: the sending host's certificate {fp} is not pinned here \
                     (to trust it, on this host: host-shim peer add NAME {fp})"
                ),
            )),
            (None, None) => Err(ApiError(
                403,
                "migration refused: a migration stream needs the client certificate of a \
                 pinned peer"
                    .to_owned(),
            )),
        };
    }
    match (&head.bearer, peer) {
        (Some(t), _) if sec.is_user_token(t) => Ok(Caller::User),
        (Some(_), _) => Err(ApiError(401, "wrong token".into())),
        (None, Some(peer)) => Ok(Caller::Peer(peer.name)),
        (None, None) => Err(ApiError(
            401,
            "no token: this shim needs `Authorization: Bearer TOKEN` (the token `host-shim \
             init` printed, in DIR/token) or a pinned peer's certificate"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_may_migrate_stand_by_and_move_images_only() {
        for (m, p) in [
            (Method::Post, "/v1/migration"),
            (Method::Post, "/v1/standby"),
            (Method::Post, "/v1/standby/kv/checkpoint"),
            (Method::Put, "/v1/images/abc"),
            (Method::Get, "/v1/instances"),
        ] {
            assert!(api::routes::peer_may_call(&m, p), "{m} {p}");
        }
        for (m, p) in [
            (Method::Post, "/v1/instances"),
            (Method::Post, "/v1/instances/kv/snapshot"),
            (Method::Post, "/v1/instances/kv/stop"),
            (Method::Post, "/v1/restore"),
            (Method::Post, "/v1/images/abc/push"),
            (Method::Get, "/v1/instances/kv/logs"),
        ] {
            assert!(!api::routes::peer_may_call(&m, p), "{m} {p}");
        }
    }
}
