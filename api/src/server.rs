//! The HTTP/1.1 server of the daemon API, whatever serves it: the accept
//! loop ([`serve`]) with its connection slots (at most `--max-connections`,
//! the oldest one still sending cut to make room, whole deadlines for
//! handshakes and requests), the budget of request bodies held at once
//! (`--max-request-memory`), request heads and bodies read with their
//! bounds, and answers (JSON, text, JSON lines streamed after `101
//! Switching Protocols`, JSON errors). What is served is a [`Service`]'s:
//! the daemon's (`daemon::http`) opens TLS, authenticates callers and
//! answers typed requests.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use shim_util::limit::RateLimited;

use crate::routes::Method;
use crate::workers::Workers;
use crate::Limits;

/// A refused or failed request: its HTTP status and message (the answer is
/// `{"error": message}`).
#[derive(Debug)]
pub struct ApiError(pub u16, pub String);

impl<E: std::fmt::Display> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(500, format!("{e:#}"))
    }
}

/// Largest request body (larger ones get 413).
pub const MAX_BODY: usize = 16 << 20;
/// Largest request head.
pub const MAX_HEAD: usize = 64 << 10;

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub path: String,
    pub content_length: Option<usize>,
    pub chunked: bool,
    pub bearer: Option<String>,
}

/// How long a new connection waits for the slot of an evicted one.
pub const EVICT_WAIT: Duration = Duration::from_millis(500);

/// Refused connections kept open (reading and dropping what they send) so
/// that the 503 reaches them rather than a reset: at most this many, this long.
pub const MAX_LINGERING: usize = 64;
pub const LINGER: Duration = Duration::from_secs(1);

/// A connection still sending its TLS handshake or request: it can be cut
/// when its deadline passes, or to make room for a new one.
pub struct Pending {
    tcp: TcpStream,
    deadline: Instant,
}

#[derive(Default)]
pub struct Table {
    /// Connections served now (pending or not).
    active: usize,
    /// Those still sending, oldest first.
    pending: BTreeMap<u64, Pending>,
    next: u64,
}

/// The connection slots and the request-body budget of one server.
pub struct Slots {
    pub max: usize,
    table: Mutex<Table>,
    freed: Condvar,
    pub body_budget: u64,
    bodies: Mutex<u64>,
    /// Refused connections, answered, closing ([`MAX_LINGERING`]).
    lingering: Mutex<VecDeque<(TcpStream, Instant)>>,
}

/// Why a connection got no slot.
pub enum Refused {
    /// Every slot serves a connection past its request.
    Busy,
    /// The process is out of something (file descriptors).
    NoResources(io::Error),
}

/// One connection's slot, given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

/// Bytes of the body budget held by one request.
pub struct BodyBytes<'a> {
    slots: &'a Slots,
    n: u64,
}

impl Slots {
    pub fn new(limits: &Limits) -> Arc<Self> {
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
    pub fn acquire(self: &Arc<Self>, tcp: &TcpStream, deadline: Instant) -> Result<Slot, Refused> {
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
    pub fn linger(&self, tcp: TcpStream) {
        let mut l = self.lingering.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() >= MAX_LINGERING {
            l.pop_front();
        }
        l.push_back((tcp, Instant::now() + LINGER));
    }

    /// Cuts the connections past their deadline (returns how many) and
    /// closes the refused ones that are done.
    pub fn reap(&self) -> usize {
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
    pub fn body_bytes(&self, n: u64) -> Option<BodyBytes<'_>> {
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
    pub fn set_deadline(&self, deadline: Instant) {
        if let Some(p) = self.slots.table().pending.get_mut(&self.id) {
            p.deadline = deadline;
        }
    }

    /// The request is in: no deadline, no eviction from now on.
    pub fn admitted(&self) {
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

/// Reads and drops what a (non-blocking) connection sent; whether it is
/// closed (or broken).
pub fn drained(tcp: &mut TcpStream) -> bool {
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

/// Reads the request line and headers (up to [`MAX_HEAD`] bytes).
pub fn read_head<R: BufRead>(r: &mut R) -> Result<Head, String> {
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
pub struct Body<'a> {
    pub bytes: Vec<u8>,
    pub _held: Option<BodyBytes<'a>>,
}

/// Reads the body the head announces, if the budget of bodies held at
/// once (`--max-request-memory`) has room for it (503 otherwise).
pub fn read_body<'a, R: Read>(
    r: &mut R,
    head: &Head,
    slots: &'a Slots,
) -> Result<Body<'a>, ApiError> {
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
pub fn check_body(head: &Head) -> Result<usize, ApiError> {
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

pub fn reason(status: u16) -> &'static str {
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

pub fn respond<W: Write>(
    w: &mut W,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
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

pub fn respond_error<W: Write>(w: &mut W, status: u16, msg: &str) -> io::Result<()> {
    let body = serde_json::to_string(&crate::ErrorBody {
        error: msg.to_owned(),
    })
    .unwrap_or_default();
    respond(w, status, "application/json", body.as_bytes())
}

pub fn switch_protocols<W: Write>(w: &mut W, protocol: &str) -> io::Result<()> {
    write!(
        w,
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    )?;
    w.flush()
}

/// What a [`Service`] answers a request with.
pub enum Reply {
    Json(u16, String),
    Text(u16, String),
    /// Lines produced by a worker as it goes, streamed over a connection
    /// switched to [`crate::PROGRESS_PROTOCOL`].
    Stream(Receiver<String>),
}

/// A connection a [`Service`] serves: bytes over one TCP socket.
pub trait Connection: Read + Write + Send + 'static {
    /// The socket (for its timeouts).
    fn tcp(&self) -> &TcpStream;
}

impl Connection for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

#[cfg(feature = "tls")]
impl Connection for crate::tls::Stream {
    fn tcp(&self) -> &TcpStream {
        crate::tls::Stream::tcp(self)
    }
}

/// How a request is served once its caller is known.
pub enum Admission<C> {
    /// Its body is read and [`Service::handle`] answers it.
    Request(C),
    /// The connection switches to this protocol (`101`, no body read) and
    /// [`Service::upgraded`] owns it.
    Upgrade(C, &'static str),
}

/// A server's policy, which [`serve`] calls: how a connection opens (TLS
/// or not), who may call what, and the answers.
pub trait Service: Send + Sync + 'static {
    type Conn: Connection;
    /// Who sent a request, as [`Service::admit`] found.
    type Caller: Send;

    /// Whether a connection opens with a handshake (TLS): it is then
    /// bounded by `--handshake-timeout`, and one refused for lack of room
    /// is closed rather than answered in plain text.
    fn handshakes(&self) -> bool;
    /// The connection over an accepted socket (after a TLS handshake, or
    /// the socket as is).
    fn open(&self, tcp: TcpStream) -> io::Result<Self::Conn>;
    /// Who sends `head` over `conn` (from address `from`) and how it is
    /// served, or why it is refused (answered with that status).
    fn admit(
        &self,
        head: &Head,
        conn: &Self::Conn,
        from: &str,
    ) -> Result<Admission<Self::Caller>, ApiError>;
    /// Answers a request whose head and body are in.
    fn handle(
        &self,
        caller: Self::Caller,
        method: &Method,
        path: &str,
        body: &[u8],
    ) -> Result<Reply, ApiError>;
    /// Owns a connection switched to the protocol of an
    /// [`Admission::Upgrade`] (no deadlines left on it).
    fn upgraded(&self, caller: Self::Caller, conn: BufReader<Self::Conn>, from: String);
}

/// How often connections past their deadline are looked for.
const REAP_EVERY: Duration = Duration::from_millis(100);
/// Back-off after a failed `accept` (e.g. no file descriptors left).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// Repeated warnings (refused connections, accept errors) at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What every connection of one server shares.
struct Server<S> {
    service: Arc<S>,
    slots: Arc<Slots>,
    request_timeout: Duration,
    handshake_timeout: Duration,
}

/// Serves `listener` with `service` until the process ends, one request
/// per connection (answers carry `Connection: close`), each on one of at
/// most `--max-connections` threads: that many connections at once (beyond, the oldest one
/// still sending its request is cut to make room, else the new one gets
/// 503); a handshake must end within `--handshake-timeout` and a request's
/// head and body within `--request-timeout`, whole (a byte now and then
/// does not extend it); request bodies held at once are capped at
/// `--max-request-memory` bytes (503 beyond); a failing `accept` (no file
/// descriptors left) backs off exponentially. Repeated warnings are
/// rate-limited.
pub fn serve<S: Service>(service: Arc<S>, listener: TcpListener, limits: &Limits) {
    let server = Arc::new(Server {
        service,
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
            tracing::error!(
                error = %e,
                "cannot start the API deadline thread: no request deadlines",
            );
        }
    }
    let workers = Workers::new("api", server.slots.max);
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
        let handshakes = server.service.handshakes();
        let first = if handshakes {
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
                if handshakes {
                    // A TLS client cannot read a plain-text 503: close at once.
                    drop(tcp);
                } else {
                    refuse(&server.slots, tcp, &why);
                }
                continue;
            }
        };
        let s = Arc::clone(&server);
        // The slot is given back last, when the thread is about to take
        // its next connection.
        let queued = workers.run(move || serve_conn(&s, tcp, &slot, now));
        if let Err(e) = queued {
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
fn refuse(slots: &Slots, tcp: TcpStream, why: &Refused) {
    let _ = tcp.set_nonblocking(true);
    let mut tcp = tcp;
    let msg = match why {
        Refused::Busy => format!(
            "this shim serves {} API connections at once (serve --max-connections): \
             try again",
            slots.max
        ),
        Refused::NoResources(_) => "this shim is out of resources: try again".to_owned(),
    };
    if respond_error(&mut tcp, 503, &msg).is_ok() && tcp.shutdown(Shutdown::Write).is_ok() {
        slots.linger(tcp);
    }
}

fn serve_conn<S: Service>(server: &Server<S>, tcp: TcpStream, slot: &Slot, accepted: Instant) {
    let service = &server.service;
    let from = tcp
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a: SocketAddr| a.to_string());
    let _ = tcp.set_nodelay(true);
    // A backstop per read; the whole deadlines are the slot's.
    let _ = tcp.set_read_timeout(Some(server.request_timeout));
    let _ = tcp.set_write_timeout(Some(server.request_timeout));
    let conn = match service.open(tcp) {
        Ok(c) => c,
        // A bare TCP connect and close (a port probe) is not worth a warning.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!(peer = %from, error = %e, "the connection closed before its handshake");
            return;
        }
        Err(e) => {
            tracing::warn!(peer = %from, error = %e, "refused a connection: handshake failed");
            return;
        }
    };
    slot.set_deadline(accepted + server.request_timeout);
    let mut conn = BufReader::new(conn);
    let head = match read_head(&mut conn) {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(peer = %from, error = %e, "bad request");
            let _ = respond_error(conn.get_mut(), 400, &format!("bad request: {e}"));
            return;
        }
    };
    let (method, path) = (head.method.clone(), head.path.clone());
    let caller = match service.admit(&head, conn.get_ref(), &from) {
        Ok(Admission::Request(caller)) => caller,
        Ok(Admission::Upgrade(caller, protocol)) => {
            slot.admitted();
            let _ = conn.get_ref().tcp().set_read_timeout(None);
            let _ = conn.get_ref().tcp().set_write_timeout(None);
            if switch_protocols(conn.get_mut(), protocol).is_ok() {
                service.upgraded(caller, conn, from);
            }
            return;
        }
        Err(ApiError(status, why)) => {
            tracing::warn!(
                %method,
                %path,
                peer = %from,
                status,
                error = %why,
                "request refused"
            );
            let _ = respond_error(conn.get_mut(), status, &why);
            return;
        }
    };
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
    let reply = service.handle(caller, &method, &path, &body.bytes);
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
        Ok(Reply::Stream(rx)) => {
            switch_protocols(&mut stream, crate::PROGRESS_PROTOCOL).map(|()| {
                // A client that stops reading is dropped, not waited for.
                let _ = stream.tcp().set_write_timeout(Some(server.request_timeout));
                for line in rx {
                    let sent = stream
                        .write_all(line.as_bytes())
                        .and_then(|()| stream.write_all(b"\n"))
                        .and_then(|()| stream.flush());
                    if sent.is_err() {
                        tracing::debug!(%method, %path, "the client went away");
                        break;
                    }
                }
            })
        }
        Err(ApiError(status, msg)) => respond_error(&mut stream, status, &msg),
    };
    if let Err(e) = result {
        tracing::debug!(%method, %path, error = %e, "answer not delivered");
    }
}

/// Reads one request (head and body) from `r` as [`serve`] does: the HTTP
/// fuzz target's entry point. Gives the path and the body, or the status
/// and message the caller would get.
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
    use std::net::TcpListener;
    use std::thread;

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
}
