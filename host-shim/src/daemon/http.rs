//! The daemon's HTTP/1.1 server: one request per connection (answers carry
//! `Connection: close`), over plain TCP or TLS, with the caller checked
//! before [`Daemon::handle`] answers the typed request. The plumbing
//! (connection slots, body budget, bounded heads and bodies, answers) is
//! the `api` crate's ([`api::server`]); this module adds TLS,
//! authentication, the accept loop and the daemon.
//!
//! Secure mode (a daemon with an identity, [`crate::security`]):
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
//! Hostile callers: at most `--max-connections` connections are served at
//! once (beyond, the oldest one still sending its request is cut to make
//! room, else the new one gets 503); a TLS handshake must end within
//! `--handshake-timeout` and a request's head and body within
//! `--request-timeout`, whole (a byte now and then does not extend it);
//! request bodies held at once are capped at `--max-request-memory` bytes
//! (503 beyond); a failing `accept` (no file descriptors left) backs off
//! exponentially. Repeated warnings are rate-limited.
//!
//! Plain mode (`serve --listen` without an identity): plain TCP, no checks,
//! for tests, benchmarks and trusted networks.
//!
//! Answers: JSON or text with a Content-Length; streamed answers
//! ([`Reply::Stream`]) and the migration stream switch protocols (101) and
//! then own the connection.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::limits::Limits;
use super::{api, ApiError, Daemon, Reply, MIGRATION_PROTOCOL, PROGRESS_PROTOCOL};
use crate::security::tls::Stream;
use crate::security::HostSecurity;
use api::server::{
    read_body, read_head, respond, respond_error, switch_protocols, Head, Refused, Slot, Slots,
};
use shim_util::limit::RateLimited;

pub use api::routes::Method;

/// Who is calling.
enum Caller {
    /// Plain mode: nobody is checked.
    Anyone,
    User,
    /// A pinned peer host, by name.
    Peer(String),
}

/// How often connections past their deadline are looked for.
const REAP_EVERY: Duration = Duration::from_millis(100);
/// Back-off after a failed `accept` (e.g. no file descriptors left).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// Repeated warnings (refused connections, accept errors) at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What every connection of one server shares.
struct Server {
    daemon: Arc<Daemon>,
    security: Option<Arc<HostSecurity>>,
    slots: Arc<Slots>,
    request_timeout: Duration,
    handshake_timeout: Duration,
}

/// Accepts connections until the process ends: at most
/// `--max-connections` at once (a clear 503 beyond), each with whole
/// deadlines for its TLS handshake and its request, backing off when
/// `accept` fails (e.g. no file descriptors left).
pub fn serve(daemon: &Arc<Daemon>, listener: TcpListener, security: Option<Arc<HostSecurity>>) {
    let limits = &daemon.config.limits;
    let server = Arc::new(Server {
        daemon: Arc::clone(daemon),
        security,
        slots: Slots::new(limits),
        request_timeout: limits.request_timeout(),
        handshake_timeout: limits.handshake_timeout(),
    });
    {
        let slots = Arc::clone(&server.slots);
        let timeout = server.request_timeout;
        let reaper = thread::Builder::new()
            .name("api-deadlines".into())
            .spawn(move || reap(&slots, timeout));
        if let Err(e) = reaper {
            tracing::error!(error = %e, "cannot start the API deadline thread: no request deadlines");
        }
    }
    let refused = RateLimited::new(WARN_EVERY);
    let failed = RateLimited::new(WARN_EVERY);
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let tcp = match listener.accept() {
            Ok((tcp, _)) => {
                backoff = ACCEPT_BACKOFF.0;
                tcp
            }
            Err(e) => {
                if let Some(held) = failed.allow() {
                    tracing::warn!(error = %e, held_back = held, "accept failed; backing off");
                }
                thread::sleep(backoff);
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let now = Instant::now();
        let first = if server.security.is_some() {
            server.handshake_timeout
        } else {
            server.request_timeout
        };
        let slot = match server.slots.acquire(&tcp, now + first) {
            Ok(slot) => slot,
            Err(why) => {
                if let Some(held) = refused.allow() {
                    match &why {
                        Refused::Busy => tracing::warn!(
                            max_connections = server.slots.max,
                            held_back = held,
                            "refused a connection: all API connections are busy \
                             (serve --max-connections)"
                        ),
                        Refused::NoResources(e) => tracing::warn!(
                            error = %e,
                            held_back = held,
                            "refused a connection: out of resources"
                        ),
                    }
                }
                if server.security.is_some() {
                    // A TLS client cannot read a plain-text 503: close at once.
                    drop(tcp);
                } else {
                    refuse(&server.slots, tcp, &why, server.slots.max);
                }
                continue;
            }
        };
        let s = Arc::clone(&server);
        let spawned = thread::Builder::new()
            .name("api".into())
            .spawn(move || serve_conn(&s, tcp, &slot, now));
        if let Err(e) = spawned {
            if let Some(held) = failed.allow() {
                tracing::error!(error = %e, held_back = held, "cannot start an API thread");
            }
        }
    }
}

/// Cuts connections past their deadline, forever.
fn reap(slots: &Slots, timeout: Duration) {
    let cut = RateLimited::new(WARN_EVERY);
    loop {
        thread::sleep(REAP_EVERY);
        let n = slots.reap();
        if n > 0 {
            if let Some(held) = cut.allow() {
                tracing::warn!(
                    connections = n,
                    held_back = held,
                    timeout_s = timeout.as_secs_f64(),
                    "cut API connections that did not send their handshake or request in time \
                     (serve --handshake-timeout, --request-timeout)"
                );
            }
        }
    }
}

/// A 503 to a plain-HTTP connection there is no room for, without waiting
/// on it (it lingers a moment, so that the answer is not lost to a reset).
fn refuse(slots: &Slots, tcp: TcpStream, why: &Refused, max: usize) {
    let _ = tcp.set_nonblocking(true);
    let mut tcp = tcp;
    let msg = match why {
        Refused::Busy => format!(
            "this shim serves {max} API connections at once (serve --max-connections): \
             try again"
        ),
        Refused::NoResources(_) => "this shim is out of resources: try again".to_owned(),
    };
    if respond_error(&mut tcp, 503, &msg).is_ok() && tcp.shutdown(Shutdown::Write).is_ok() {
        slots.linger(tcp);
    }
}

fn serve_conn(server: &Server, tcp: TcpStream, slot: &Slot, accepted: Instant) {
    let daemon = &server.daemon;
    let security = server.security.as_deref();
    let from = tcp
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a: SocketAddr| a.to_string());
    let _ = tcp.set_nodelay(true);
    // A backstop per read; the whole deadlines are the slot's.
    let _ = tcp.set_read_timeout(Some(server.request_timeout));
    let _ = tcp.set_write_timeout(Some(server.request_timeout));
    let stream = match security {
        Some(sec) => match Stream::accept(tcp, &sec.server) {
            Ok(s) => s,
            // A bare TCP connect and close (a port probe) is not worth a warning.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::debug!("{from} closed the connection before the TLS handshake: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!("refused a connection from {from}: TLS handshake failed: {e}");
                return;
            }
        },
        None => Stream::Plain(tcp),
    };
    slot.set_deadline(accepted + server.request_timeout);
    let mut conn = BufReader::new(stream);
    let head = match read_head(&mut conn) {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!("bad request from {from}: {e}");
            let _ = respond_error(conn.get_mut(), 400, &format!("bad request: {e}"));
            return;
        }
    };
    let (method, path) = (head.method.clone(), head.path.clone());
    let migration = method == Method::Post && path.trim_end_matches('/') == "/v1/migration";
    let caller = match authenticate(&head, conn.get_ref(), security, migration) {
        Ok(c) => c,
        Err(ApiError(status, why)) => {
            tracing::warn!("refused {method} {path} from {from}: {why}");
            let _ = respond_error(conn.get_mut(), status, &why);
            return;
        }
    };
    if let Caller::Peer(peer) = &caller {
        if !api::routes::peer_may_call(&method, &path) {
            tracing::warn!(
                %method, %path, %from, %peer,
                "refused a call from a peer host: peers may only migrate, stand by and push images"
            );
            let _ = respond_error(
                conn.get_mut(),
                403,
                &format!(
                    "{method} {path} needs the user token: a peer host's certificate \
                     ({peer}) may only migrate, stand by and push images"
                ),
            );
            return;
        }
    }
    if migration {
        let peer = match caller {
            Caller::Peer(name) => name,
            _ => from,
        };
        slot.admitted();
        let _ = conn.get_ref().tcp().set_read_timeout(None);
        let _ = conn.get_ref().tcp().set_write_timeout(None);
        if switch_protocols(conn.get_mut(), MIGRATION_PROTOCOL).is_ok() {
            crate::migration::dest::accept(daemon, conn, &peer);
        }
        return;
    }
    let body = match read_body(&mut conn, &head, &server.slots) {
        Ok(b) => b,
        Err(ApiError(status, why)) => {
            let _ = respond_error(conn.get_mut(), status, &why);
            return;
        }
    };
    slot.admitted();
    let _ = conn.get_ref().tcp().set_read_timeout(None);
    let mut stream = conn.into_inner();
    let reply = daemon.handle(&method, &path, &body.bytes);
    drop(body);
    // HEAD: the status and headers of the GET answer, no body.
    let reply = match reply {
        Ok(Reply::Json(status, _)) if method == Method::Head => {
            Ok(Reply::Json(status, String::new()))
        }
        Ok(Reply::Text(status, _)) if method == Method::Head => {
            Ok(Reply::Text(status, String::new()))
        }
        other => other,
    };
    let result = match reply {
        Ok(Reply::Json(status, body)) => {
            respond(&mut stream, status, "application/json", body.as_bytes())
        }
        Ok(Reply::Text(status, body)) => respond(
            &mut stream,
            status,
            "text/plain; charset=utf-8",
            body.as_bytes(),
        ),
        Ok(Reply::Stream(rx)) => switch_protocols(&mut stream, PROGRESS_PROTOCOL).map(|()| {
            // A client that stops reading is dropped, not waited for.
            let _ = stream.tcp().set_write_timeout(Some(server.request_timeout));
            for line in rx {
                let sent = stream
                    .write_all(line.as_bytes())
                    .and_then(|()| stream.write_all(b"\n"))
                    .and_then(|()| stream.flush());
                if sent.is_err() {
                    tracing::debug!("the client of {method} {path} went away");
                    break;
                }
            }
        }),
        Err(ApiError(status, msg)) => respond_error(&mut stream, status, &msg),
    };
    if let Err(e) = result {
        tracing::debug!("API answer to {method} {path} not delivered: {e}");
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

/// Reads one request (head and body) from `r` as [`serve`] does: the HTTP fuzz target's entry
/// point. Gives the path and the body, or the status and message the caller would get.
#[doc(hidden)]
pub fn fuzz_request<R: BufRead>(r: &mut R) -> Result<(String, Vec<u8>), (u16, String)> {
    static SLOTS: std::sync::OnceLock<Arc<Slots>> = std::sync::OnceLock::new();
    let slots = SLOTS.get_or_init(|| Slots::new(&Limits::default()));
    let head = read_head(r).map_err(|e| (400, e))?;
    let body = read_body(r, &head, slots).map_err(|ApiError(status, e)| (status, e))?;
    Ok((head.path, body.bytes))
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
