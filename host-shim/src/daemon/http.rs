//! The daemon's HTTP/1.1 server: one request per connection (answers carry
//! `Connection: close`), over plain TCP or TLS, with the caller checked
//! before [`Daemon::handle`] routes the request.
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

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::limits::Limits;
use super::{api, ApiError, Daemon, Reply, MIGRATION_PROTOCOL, PROGRESS_PROTOCOL};
use crate::limit::RateLimited;
use crate::security::tls::Stream;
use crate::security::HostSecurity;

/// Largest request body (larger ones get 413).
pub const MAX_BODY: usize = 16 << 20;
/// Largest request head.
const MAX_HEAD: usize = 64 << 10;

pub use api::routes::Method;

/// A parsed request head.
#[derive(Debug)]
struct Head {
    method: Method,
    path: String,
    content_length: Option<usize>,
    chunked: bool,
    bearer: Option<String>,
}

/// Who is calling.
enum Caller {
    /// Plain mode: nobody is checked.
    Anyone,
    User,
    /// A pinned peer host, by name.
    Peer(String),
}

/// How long a new connection waits for the slot of an evicted one.
const EVICT_WAIT: Duration = Duration::from_millis(500);
/// How often connections past their deadline are looked for.
const REAP_EVERY: Duration = Duration::from_millis(100);
/// Back-off after a failed `accept` (e.g. no file descriptors left).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// Refused connections kept open (reading and dropping what they send) so
/// that the 503 reaches them rather than a reset: at most this many, this long.
const MAX_LINGERING: usize = 64;
const LINGER: Duration = Duration::from_secs(1);
/// Repeated warnings (refused connections, accept errors) at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A connection still sending its TLS handshake or request: it can be cut
/// when its deadline passes, or to make room for a new one.
struct Pending {
    tcp: TcpStream,
    deadline: Instant,
}

#[derive(Default)]
struct Table {
    /// Connections served now (pending or not).
    active: usize,
    /// Those still sending, oldest first.
    pending: BTreeMap<u64, Pending>,
    next: u64,
}

/// The connection slots and the request-body budget of one server.
struct Slots {
    max: usize,
    table: Mutex<Table>,
    freed: Condvar,
    body_budget: u64,
    bodies: Mutex<u64>,
    /// Refused connections, answered, closing ([`MAX_LINGERING`]).
    lingering: Mutex<VecDeque<(TcpStream, Instant)>>,
}

/// Why a connection got no slot.
enum Refused {
    /// Every slot serves a connection past its request.
    Busy,
    /// The process is out of something (file descriptors).
    NoResources(io::Error),
}

/// One connection's slot, given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

/// Bytes of the body budget held by one request.
struct BodyBytes<'a> {
    slots: &'a Slots,
    n: u64,
}

impl Slots {
    fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            max: limits.max_connections.max(1),
            table: Mutex::new(Table::default()),
            freed: Condvar::new(),
            body_budget: limits.max_request_memory,
            bodies: Mutex::new(0),
            lingering: Mutex::new(VecDeque::new()),
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `tcp`, which must finish sending by `deadline`. When all
    /// are taken, the oldest connection still sending is cut to make room
    /// (idle and slow connections cannot starve quick ones); refused at
    /// once when every connection is past that stage.
    fn acquire(self: &Arc<Self>, tcp: &TcpStream, deadline: Instant) -> Result<Slot, Refused> {
        let watch = tcp.try_clone().map_err(Refused::NoResources)?;
        let mut t = self.table();
        if t.active >= self.max {
            let oldest = t.pending.keys().next().copied();
            let Some(p) = oldest.and_then(|id| t.pending.remove(&id)) else {
                return Err(Refused::Busy);
            };
            let _ = p.tcp.shutdown(Shutdown::Both);
            t = self
                .freed
                .wait_timeout_while(t, EVICT_WAIT, |t| t.active >= self.max)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if t.active >= self.max {
                return Err(Refused::Busy);
            }
        }
        let id = t.next;
        t.next += 1;
        t.active += 1;
        t.pending.insert(
            id,
            Pending {
                tcp: watch,
                deadline,
            },
        );
        Ok(Slot {
            slots: Arc::clone(self),
            id,
        })
    }

    /// Keeps a refused (answered, half-closed) connection a moment.
    fn linger(&self, tcp: TcpStream) {
        let mut l = self.lingering.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() >= MAX_LINGERING {
            l.pop_front();
        }
        l.push_back((tcp, Instant::now() + LINGER));
    }

    /// Cuts the connections past their deadline (returns how many) and
    /// closes the refused ones that are done.
    fn reap(&self) -> usize {
        let now = Instant::now();
        self.lingering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain_mut(|(tcp, until)| *until > now && !drained(tcp));
        let mut t = self.table();
        let late: Vec<u64> = t
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &late {
            if let Some(p) = t.pending.remove(id) {
                let _ = p.tcp.shutdown(Shutdown::Both);
            }
        }
        late.len()
    }

    /// `n` bytes of the request-body budget, if that many are free.
    fn body_bytes(&self, n: u64) -> Option<BodyBytes<'_>> {
        let mut used = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        if used.saturating_add(n) > self.body_budget {
            return None;
        }
        *used += n;
        Some(BodyBytes { slots: self, n })
    }
}

impl Slot {
    /// The connection must finish sending by `deadline` now.
    fn set_deadline(&self, deadline: Instant) {
        if let Some(p) = self.slots.table().pending.get_mut(&self.id) {
            p.deadline = deadline;
        }
    }

    /// The request is in: no deadline, no eviction from now on.
    fn admitted(&self) {
        self.slots.table().pending.remove(&self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.slots.table();
        t.pending.remove(&self.id);
        t.active -= 1;
        self.slots.freed.notify_all();
    }
}

impl Drop for BodyBytes<'_> {
    fn drop(&mut self) {
        *self.slots.bodies.lock().unwrap_or_else(|e| e.into_inner()) -= self.n;
    }
}

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

/// Reads and drops what a (non-blocking) connection sent; whether it is
/// closed (or broken).
fn drained(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
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

/// Reads the request line and headers (up to [`MAX_HEAD`] bytes).
fn read_head<R: BufRead>(r: &mut R) -> Result<Head, String> {
    let mut raw = Vec::new();
    loop {
        let n = r
            .by_ref()
            .take((MAX_HEAD - raw.len()) as u64)
            .read_until(b'\n', &mut raw)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(if raw.len() >= MAX_HEAD {
                "the request head is too large".into()
            } else {
                "the connection closed before the request ended".into()
            });
        }
        if raw.ends_with(b"\r\n\r\n") || raw.ends_with(b"\n\n") {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&raw).map_err(|e| e.to_string())? {
        httparse::Status::Complete(_) => {}
        httparse::Status::Partial => return Err("incomplete request head".into()),
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    let content_length = match header("content-length") {
        Some(v) => Some(v.parse().map_err(|_| format!("bad Content-Length {v:?}"))?),
        None => None,
    };
    Ok(Head {
        method: Method::parse(req.method.unwrap_or("")),
        path: req
            .path
            .unwrap_or("/")
            .split('?')
            .next()
            .unwrap_or("/")
            .to_owned(),
        content_length,
        chunked: header("transfer-encoding").is_some_and(|v| v.contains("chunked")),
        bearer: header("authorization").and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .map(|t| t.trim().to_owned())
        }),
    })
}

/// A request body and the budget bytes it holds.
struct Body<'a> {
    bytes: Vec<u8>,
    _held: Option<BodyBytes<'a>>,
}

/// Reads the body the head announces, if the budget of bodies held at
/// once (`--max-request-memory`) has room for it (503 otherwise).
fn read_body<'a, R: Read>(r: &mut R, head: &Head, slots: &'a Slots) -> Result<Body<'a>, ApiError> {
    let n = check_body(head)?;
    if n == 0 {
        return Ok(Body {
            bytes: Vec::new(),
            _held: None,
        });
    }
    let held = slots.body_bytes(n as u64).ok_or_else(|| {
        ApiError(
            503,
            format!(
                "this shim holds {} bytes of request bodies at most (serve --max-request-memory) and is busy: try again",
                slots.body_budget
            ),
        )
    })?;
    // Exactly the announced size (reserved from the budget above); pages
    // are touched only as bytes arrive.
    let mut body = Vec::with_capacity(n);
    r.take(n as u64)
        .read_to_end(&mut body)
        .map_err(|e| ApiError(400, format!("reading the request body: {e}")))?;
    if body.len() != n {
        return Err(ApiError(
            400,
            format!(
                "the connection closed after {} of the {n} bytes of the request body",
                body.len()
            ),
        ));
    }
    Ok(Body {
        bytes: body,
        _held: Some(held),
    })
}

/// The body length a head announces, if it is acceptable.
fn check_body(head: &Head) -> Result<usize, ApiError> {
    if head.chunked {
        return Err(ApiError(
            411,
            "chunked request bodies are not supported: send a Content-Length".into(),
        ));
    }
    let n = head.content_length.unwrap_or(0);
    if n > MAX_BODY {
        return Err(ApiError(
            413,
            format!("the request body of {n} bytes is larger than {MAX_BODY}"),
        ));
    }
    Ok(n)
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

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        429 => "Too Many Requests",
        411 => "Length Required",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

fn respond<W: Write>(w: &mut W, status: u16, content_type: &str, body: &[u8]) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        reason(status),
        body.len()
    );
    if status == 401 {
        out.push_str("WWW-Authenticate: Bearer realm=\"host-shim\"\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    w.write_all(&bytes)?;
    w.flush()
}

fn respond_error<W: Write>(w: &mut W, status: u16, msg: &str) -> io::Result<()> {
    let body = serde_json::to_string(&api::ErrorBody {
        error: msg.to_owned(),
    })
    .unwrap_or_default();
    respond(w, status, "application/json", body.as_bytes())
}

fn switch_protocols<W: Write>(w: &mut W, protocol: &str) -> io::Result<()> {
    write!(
        w,
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    )?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse() {
        let mut r = &b"POST /v1/instances?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\
                       Authorization: Bearer s3cret\r\n\r\n{}"[..];
        let h = read_head(&mut r).unwrap();
        assert_eq!(
            (h.method.clone(), h.path.as_str()),
            (Method::Post, "/v1/instances")
        );
        assert_eq!(h.content_length, Some(2));
        assert_eq!(h.bearer.as_deref(), Some("s3cret"));
        let slots = Slots::new(&Limits::default());
        assert_eq!(
            read_body(&mut r, &h, &slots).ok().map(|b| b.bytes),
            Some(b"{}".to_vec())
        );

        let mut r = &b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..];
        assert!(read_head(&mut r).unwrap_err().contains("Content-Length"));
        let mut r = &b"GET / HTTP/1.1\r\nHost: a\r\n"[..];
        assert!(read_head(&mut r).unwrap_err().contains("closed"));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(read_head(&mut big.as_bytes())
            .unwrap_err()
            .contains("too large"));
        let h = Head {
            method: Method::Post,
            path: "/".into(),
            content_length: Some(MAX_BODY + 1),
            chunked: false,
            bearer: None,
        };
        assert_eq!(
            read_body(&mut &b""[..], &h, &slots).err().map(|e| e.0),
            Some(413)
        );
        let mut h = h;
        h.content_length = Some(MAX_BODY);
        let budget = Slots::new(&Limits {
            max_request_memory: 10,
            ..Limits::default()
        });
        assert_eq!(
            read_body(&mut &b""[..], &h, &budget).err().map(|e| e.0),
            Some(503)
        );
    }

    /// A connection thread: holds its slot until its connection ends.
    fn serve_until_closed(slot: Slot, mut tcp: TcpStream) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let _ = tcp.read(&mut [0u8; 1]);
            drop(slot);
        })
    }

    #[test]
    fn a_full_table_cuts_its_oldest_sender_or_refuses() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let pair = || {
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            (c, l.accept().unwrap().0)
        };
        let slots = Slots::new(&Limits {
            max_connections: 2,
            ..Limits::default()
        });
        let later = Instant::now() + Duration::from_secs(60);
        let (mut idle, s1) = pair();
        let first = slots.acquire(&s1, later).ok().unwrap();
        let t1 = serve_until_closed(first, s1);
        let (_busy, s2) = pair();
        let second = slots.acquire(&s2, later).ok().unwrap();
        second.admitted();
        // Full: the idle sender is cut for the newcomer.
        let (_new, s3) = pair();
        let third = slots.acquire(&s3, later).ok().expect("room made");
        t1.join().unwrap();
        assert_eq!(
            idle.read(&mut [0u8; 1]).unwrap_or(0),
            0,
            "the idle one is closed"
        );
        // Full of requests past their sending: refused at once.
        third.admitted();
        let (_late, s4) = pair();
        let t = Instant::now();
        assert!(matches!(slots.acquire(&s4, later), Err(Refused::Busy)));
        assert!(t.elapsed() < EVICT_WAIT);
        drop(third);
        assert!(
            slots.acquire(&s4, later).is_ok(),
            "a slot given back is free"
        );
    }

    #[test]
    fn senders_past_their_deadline_are_cut() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = l.accept().unwrap().0;
        let slots = Slots::new(&Limits::default());
        let slot = slots
            .acquire(&s, Instant::now() + Duration::from_secs(60))
            .ok()
            .unwrap();
        assert_eq!(slots.reap(), 0);
        slot.set_deadline(Instant::now());
        assert_eq!(slots.reap(), 1);
        assert_eq!(c.read(&mut [0u8; 1]).unwrap_or(0), 0, "cut");
    }

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
