//! The daemon's HTTP/1.1 server: one request per connection (answers carry
//! `Connection: close`), over plain TCP or TLS, with the caller checked
//! before [`Daemon::handle`] routes the request.
//!
//! Secure mode (a daemon with an identity, [`crate::security`]):
//! - every connection is TLS 1.3; the server asks for a client certificate
//!   but does not require one;
//! - API calls need `Authorization: Bearer TOKEN` with the user token, or a
//!   client certificate pinned as a peer; anything else gets 401 and a log
//!   line;
//! - `POST /v1/migration` (the migration stream) needs a client certificate
//!   pinned as a peer; anything else gets 403 and a log line, and the
//!   sender's instance keeps running where it is.
//!
//! Plain mode (`serve --listen` without an identity): plain TCP, no checks,
//! for tests, benchmarks and trusted networks.
//!
//! Answers: JSON or text with a Content-Length; streamed answers
//! ([`Reply::Stream`]) and the migration stream switch protocols (101) and
//! then own the connection.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::{api, ApiError, Daemon, Reply, MIGRATION_PROTOCOL, PROGRESS_PROTOCOL};
use crate::security::tls::Stream;
use crate::security::HostSecurity;

/// Largest request body (larger ones get 413).
pub const MAX_BODY: usize = 16 << 20;
/// Largest request head.
const MAX_HEAD: usize = 64 << 10;
/// How long a client may take for the handshake, head and body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A request method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Other(String),
}

impl Method {
    fn parse(s: &str) -> Self {
        match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Other(m) => m,
        })
    }
}

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

/// Accepts connections until the listener fails.
pub fn serve(daemon: &Arc<Daemon>, listener: TcpListener, security: Option<Arc<HostSecurity>>) {
    for conn in listener.incoming() {
        let tcp = match conn {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        let d = Arc::clone(daemon);
        let sec = security.clone();
        let spawned = thread::Builder::new()
            .name("api".into())
            .spawn(move || serve_conn(&d, tcp, sec.as_deref()));
        if let Err(e) = spawned {
            tracing::error!("cannot start an API thread: {e}");
        }
    }
}

fn serve_conn(daemon: &Arc<Daemon>, tcp: TcpStream, security: Option<&HostSecurity>) {
    let from = tcp
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a: SocketAddr| a.to_string());
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(REQUEST_TIMEOUT));
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
    if migration {
        let peer = match caller {
            Caller::Peer(name) => name,
            _ => from,
        };
        let _ = conn.get_ref().tcp().set_read_timeout(None);
        if switch_protocols(conn.get_mut(), MIGRATION_PROTOCOL).is_ok() {
            crate::migration::dest::accept(daemon, conn, &peer);
        }
        return;
    }
    let body = match read_body(&mut conn, &head) {
        Ok(b) => b,
        Err(ApiError(status, why)) => {
            let _ = respond_error(conn.get_mut(), status, &why);
            return;
        }
    };
    let _ = conn.get_ref().tcp().set_read_timeout(None);
    let mut stream = conn.into_inner();
    let reply = daemon.handle(&method, &path, &body);
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
    if let Some(peer) = fp.and_then(|fp| sec.peer_by_fingerprint(&fp)) {
        return Ok(Caller::Peer(peer.name));
    }
    if migration {
        return Err(ApiError(
            403,
            match fp {
                Some(fp) => format!(
                    "migration refused: the sending host's certificate {fp} is not pinned here \
                     (to trust it, on this host: host-shim peer add NAME {fp})"
                ),
                None => "migration refused: a migration stream needs the client certificate \
                         of a pinned peer"
                    .to_owned(),
            },
        ));
    }
    match &head.bearer {
        Some(t) if sec.is_user_token(t) => Ok(Caller::User),
        Some(_) => Err(ApiError(401, "wrong token".into())),
        None => Err(ApiError(
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

fn read_body<R: Read>(r: &mut R, head: &Head) -> Result<Vec<u8>, ApiError> {
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
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)
        .map_err(|e| ApiError(400, format!("reading the request body: {e}")))?;
    Ok(body)
}

/// Reads one request (head and body) from `r` as [`serve`] does: the HTTP fuzz target's entry
/// point. Gives the path and the body, or the status and message the caller would get.
#[doc(hidden)]
pub fn fuzz_request<R: BufRead>(r: &mut R) -> Result<(String, Vec<u8>), (u16, String)> {
    let head = read_head(r).map_err(|e| (400, e))?;
    let body = read_body(r, &head).map_err(|ApiError(status, e)| (status, e))?;
    Ok((head.path, body))
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
        411 => "Length Required",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
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
        assert_eq!(read_body(&mut r, &h).ok(), Some(b"{}".to_vec()));

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
        assert_eq!(read_body(&mut &b""[..], &h).err().map(|e| e.0), Some(413));
    }
}
