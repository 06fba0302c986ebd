//! A typed blocking client of one daemon: one method per endpoint, plain
//! HTTP ([`Client::new`]) or, with the `tls` feature, TLS to a pinned server
//! certificate with a bearer token ([`Client::secure`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
#[cfg(feature = "tls")]
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::migration::{MigrationEvent, MigrationPhase, MigrationReport};
use crate::server::Connection;
use crate::stats::ShimStats;
#[cfg(feature = "tls")]
use crate::{tls::CertKey, Fingerprint};
use crate::{
    CheckpointInfo, CheckpointRequest, ErrorBody, Health, InstanceInfo, LogEvent, MigrateRequest,
    PushRequest, RestartRequest, RestoreRequest, RunRequest, ShimInfo, SnapshotInfo,
    SnapshotRequest, PROGRESS_PROTOCOL,
};

/// The longest line of a streamed answer a client takes (a console line is
/// at most a few KiB, a migration event less).
pub const MAX_STREAMED_LINE: usize = 1 << 20;

/// Why the next line of a streamed answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("a streamed line longer than {0} bytes")]
    TooLong(usize),
}

/// Reads the next line of a streamed answer (without its end; invalid
/// UTF-8 replaced), taking at most `max` bytes of it: `None` at the end of
/// the stream, an error for a longer line.
pub fn read_streamed_line(
    reader: &mut impl BufRead,
    max: usize,
) -> Result<Option<String>, LineError> {
    let mut line = Vec::new();
    let limit = max as u64 + 1;
    let n = reader.take(limit).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') && n as u64 == limit {
        return Err(LineError::TooLong(max));
    }
    let text = String::from_utf8_lossy(&line);
    Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()))
}

/// Why a migration's event stream gave no report.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum EventsError {
    /// A line that is not a [`MigrationEvent`].
    #[error("bad migration event {line:?}: {error}")]
    Bad { line: String, error: String },
    /// The stream ended before its `done` or `failed` event.
    #[error("the migration stream ended without a result")]
    NoResult,
    /// The migration failed (in `phase`); `error` says where the guest runs.
    #[error("{error}")]
    Failed {
        phase: MigrationPhase,
        error: String,
    },
}

/// Decodes the events a source daemon streams for a migration, line by
/// line ([`Client::migrate`]); after a bad line, the rest is ignored.
#[derive(Debug, Default)]
pub struct MigrationEvents {
    last: Option<MigrationEvent>,
    bad: Option<EventsError>,
}

impl MigrationEvents {
    /// Takes one line; the event it holds, unless it or an earlier line
    /// was bad.
    pub fn line(&mut self, line: &str) -> Option<&MigrationEvent> {
        if self.bad.is_some() {
            return None;
        }
        match serde_json::from_str(line) {
            Ok(event) => {
                self.last = Some(event);
                self.last.as_ref()
            }
            Err(e) => {
                self.bad = Some(EventsError::Bad {
                    line: line.to_owned(),
                    error: e.to_string(),
                });
                None
            }
        }
    }

    /// The migration's report, once the stream ended.
    pub fn finish(self) -> Result<MigrationReport, EventsError> {
        if let Some(bad) = self.bad {
            return Err(bad);
        }
        match self.last {
            Some(MigrationEvent::Done(report)) => Ok(report),
            Some(MigrationEvent::Failed { phase, error }) => {
                Err(EventsError::Failed { phase, error })
            }
            _ => Err(EventsError::NoResult),
        }
    }
}

/// A connection to a daemon: plain TCP, or TLS with the `tls` feature.
#[cfg(feature = "tls")]
pub use crate::tls::Stream;
/// A connection to a daemon (plain TCP: this build has no `tls` feature).
#[cfg(not(feature = "tls"))]
pub type Stream = TcpStream;

/// A failed API call, with the daemon's message.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the shim at {addr}: {err} (is `host-shim serve` running there?)")]
    Connect { addr: String, err: std::io::Error },
    #[error("no secure connection to the shim at {addr}: {err}")]
    Tls { addr: String, err: String },
    #[error("the shim at {addr}: {err}")]
    Io { addr: String, err: std::io::Error },
    /// The daemon answered with an error status and this message.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("the shim at {addr} answered something that is not valid: {detail}")]
    Protocol { addr: String, detail: String },
    /// A migration failed (in `phase`); `error` says where the guest runs.
    #[error("{error}")]
    Migration {
        phase: MigrationPhase,
        error: String,
    },
}

/// A client of one daemon.
#[derive(Clone)]
pub struct Client {
    /// `HOST:PORT`.
    pub addr: String,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<String>,
    /// Connect here instead of `addr` (a relay; TLS still pins the peer).
    via: Option<SocketAddr>,
    /// The longest any read or write may block (none: forever).
    timeout: Option<Duration>,
    /// The longest a whole request and its answer may take ([`Self::call`]
    /// and the calls built on it; none: no bound but `timeout`'s).
    deadline: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.is_secure() { "https" } else { "http" };
        write!(f, "Client({scheme}://{})", self.addr)
    }
}

/// An answer: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `HOST:PORT` of `http://HOST:PORT/`, `https://HOST:PORT` or `HOST:PORT`.
fn bare(addr: &str) -> &str {
    addr.trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
}

impl Client {
    /// A plain-HTTP client (a daemon started without an identity).
    pub fn new(addr: &str) -> Self {
        Self {
            addr: bare(addr).to_owned(),
            #[cfg(feature = "tls")]
            tls: None,
            token: None,
            via: None,
            timeout: None,
            deadline: None,
        }
    }

    /// A TLS client that accepts only the server certificate `pin`, sends
    /// `token` as its bearer token and presents `id`'s certificate, if given.
    #[cfg(feature = "tls")]
    pub fn secure(
        addr: &str,
        pin: Fingerprint,
        token: Option<String>,
        id: Option<&dyn CertKey>,
    ) -> Result<Self, ClientError> {
        let config = crate::tls::client_config(pin, id).map_err(|e| ClientError::Tls {
            addr: addr.to_owned(),
            err: e.to_string(),
        })?;
        Ok(Self {
            addr: bare(addr).to_owned(),
            tls: Some(config),
            token,
            via: None,
            timeout: None,
            deadline: None,
        })
    }

    /// The same client, connecting to `via` (e.g. a `wan-relay tcp`)
    /// instead of its address.
    pub fn via(self, via: SocketAddr) -> Self {
        Self {
            via: Some(via),
            ..self
        }
    }

    /// The same client, with every read and write on its connections
    /// (handshakes included) failing after blocking for `t`.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// The same client, each of whose whole requests and answers (not
    /// streams) must end within `d`, however the other side paces them.
    pub fn with_deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Whether the client speaks TLS.
    pub fn is_secure(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    #[cfg(not(feature = "tls"))]
    fn connect(&self) -> Result<Stream, ClientError> {
        self.connect_tcp()
    }

    #[cfg(feature = "tls")]
    fn connect(&self) -> Result<Stream, ClientError> {
        let tcp = self.connect_tcp()?;
        match &self.tls {
            None => Ok(Stream::Plain(tcp)),
            Some(config) => {
                let _ = tcp.set_read_timeout(Some(self.timeout.unwrap_or(Duration::from_secs(30))));
                let stream = Stream::connect(tcp, config).map_err(|e| ClientError::Tls {
                    addr: self.addr.clone(),
                    err: tls_reason(&e),
                })?;
                let _ = stream.tcp().set_read_timeout(self.timeout);
                Ok(stream)
            }
        }
    }

    fn connect_tcp(&self) -> Result<TcpStream, ClientError> {
        let addrs: Vec<SocketAddr> = match self.via {
            Some(via) => vec![via],
            None => self
                .addr
                .to_socket_addrs()
                .map_err(|err| ClientError::Connect {
                    addr: self.addr.clone(),
                    err,
                })?
                .collect(),
        };
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(self.timeout);
                    let _ = s.set_write_timeout(self.timeout);
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(ClientError::Connect {
            addr: self.addr.clone(),
            err: last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
        })
    }

    fn auth_header(&self) -> String {
        self.token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default()
    }

    fn io(&self) -> impl Fn(std::io::Error) -> ClientError + '_ {
        move |err| ClientError::Io {
            addr: self.addr.clone(),
            err,
        }
    }

    /// Sends a request (HTTP/1.0: the answer's body ends when the
    /// connection closes) and returns the stream, positioned at the body,
    /// with the status.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, BufReader<Until<Stream>>), ClientError> {
        let stream = self.connect()?;
        let deadline = self.deadline.map(|d| Instant::now() + d);
        let mut stream = Until::new(stream, deadline, self.timeout).map_err(self.io())?;
        let mut req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\n{}",
            self.addr,
            self.auth_header()
        );
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        stream.write_all(&bytes).map_err(self.io())?;
        let mut reader = BufReader::new(stream);
        let (status, _) = read_head(&mut reader).map_err(|detail| ClientError::Protocol {
            addr: self.addr.clone(),
            detail,
        })?;
        Ok((status, reader))
    }

    /// A whole request and answer.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer, ClientError> {
        let (status, reader) = self.send(method, path, body)?;
        let mut body = Vec::new();
        reader
            .take(MAX_ANSWER + 1)
            .read_to_end(&mut body)
            .map_err(self.io())?;
        if body.len() as u64 > MAX_ANSWER {
            return Err(self.protocol(format!("an answer larger than {MAX_ANSWER} bytes")));
        }
        if status >= 400 {
            return Err(api_error(status, &body));
        }
        Ok(Answer { status, body })
    }

    /// `PUT path` with a binary body written in chunks, `progress` seeing
    /// the bytes sent so far; returns the answer like [`Self::call`].
    pub fn upload(
        &self,
        path: &str,
        body: &[u8],
        mut progress: impl FnMut(u64),
    ) -> Result<Answer, ClientError> {
        let stream = self.connect()?;
        let whole = upload_deadline(body.len() as u64);
        let deadline = Instant::now() + self.deadline.map_or(whole, |d| d.min(whole));
        let mut stream = Until::new(stream, Some(deadline), self.timeout).map_err(self.io())?;
        let head = format!(
            "PUT {path} HTTP/1.0\r\nHost: {}\r\n{}Content-Type: application/octet-stream\r\n\
             Content-Length: {}\r\n\r\n",
            self.addr,
            self.auth_header(),
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(self.io())?;
        let mut sent = 0u64;
        for chunk in body.chunks(64 << 10) {
            if let Err(err) = stream.write_all(chunk) {
                // The daemon may refuse (and close) before the whole body:
                // its answer says why.
                tracing::debug!(host = %self.addr, error = %err, "upload cut short");
                break;
            }
            sent += chunk.len() as u64;
            progress(sent);
        }
        let mut reader = BufReader::new(stream);
        let (status, _) = read_head(&mut reader).map_err(|detail| ClientError::Protocol {
            addr: self.addr.clone(),
            detail,
        })?;
        let mut answer = Vec::new();
        reader.read_to_end(&mut answer).map_err(self.io())?;
        if status >= 400 {
            return Err(api_error(status, &answer));
        }
        Ok(Answer {
            status,
            body: answer,
        })
    }

    /// A JSON request with a JSON answer.
    pub fn json<Req: Serialize, Resp: for<'de> Deserialize<'de>>(
        &self,
        method: &str,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, ClientError> {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("serializable"));
        let answer = self.call(method, path, bytes.as_deref())?;
        serde_json::from_slice(&answer.body).map_err(|e| ClientError::Protocol {
            addr: self.addr.clone(),
            detail: e.to_string(),
        })
    }

    /// A request whose answer is text lines as they come (over an
    /// upgraded connection); `on_line` sees each one. Returns the last line.
    /// A line longer than [`MAX_STREAMED_LINE`] ends the stream with an error.
    fn stream_lines<Req: Serialize>(
        &self,
        path: &str,
        body: &Req,
        mut on_line: impl FnMut(&str),
    ) -> Result<String, ClientError> {
        let bytes = serde_json::to_vec(body).expect("serializable");
        let mut reader = self.upgrade(path, PROGRESS_PROTOCOL, &bytes)?;
        let mut last = String::new();
        loop {
            match read_streamed_line(&mut reader, MAX_STREAMED_LINE) {
                Ok(Some(text)) => {
                    on_line(&text);
                    last = text;
                }
                Ok(None) => return Ok(last),
                Err(LineError::Io(e)) => return Err(self.io()(e)),
                Err(e @ LineError::TooLong(_)) => return Err(self.protocol(e.to_string())),
            }
        }
    }

    /// Opens a raw two-way stream to the daemon by upgrading
    /// `POST path` (the migration stream).
    pub fn upgrade(
        &self,
        path: &str,
        protocol: &str,
        body: &[u8],
    ) -> Result<BufReader<Stream>, ClientError> {
        let mut stream = self.connect()?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\
             {}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            self.auth_header(),
            body.len()
        );
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        stream.write_all(&bytes).map_err(self.io())?;
        let mut reader = BufReader::new(stream);
        let (status, length) = read_head(&mut reader).map_err(|detail| ClientError::Protocol {
            addr: self.addr.clone(),
            detail,
        })?;
        if status != 101 {
            let mut body = vec![0u8; length.unwrap_or(0).min(1 << 20)];
            let _ = reader.read_exact(&mut body);
            let msg = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("status {status}"));
            return Err(ClientError::Api {
                status,
                message: msg,
            });
        }
        Ok(reader)
    }
}

/// The error of an answer with a 4xx/5xx status: its `{"error": ...}` message.
fn api_error(status: u16, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
    ClientError::Api { status, message }
}

#[cfg(feature = "tls")]
/// The rustls reason inside a handshake error, readable.
fn tls_reason(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) => {
            o.0.to_string()
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

/// Reads a status line and headers; returns the status and the
/// Content-Length, if any.
fn read_head<R: BufRead>(r: &mut R) -> Result<(u16, Option<usize>), String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.starts_with(['\x15', '\x16']) {
        return Err("it speaks TLS: use https://HOST:PORT with its fingerprint".into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {:?}", line.trim()))?;
    let mut length = None;
    loop {
        line.clear();
        let n = r.read_line(&mut line).map_err(|e| e.to_string())?;
        if n == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok();
            }
        }
    }
    Ok((status, length))
}

/// One method per endpoint.
impl Client {
    /// `GET /v1/health` (no token needed).
    pub fn health(&self) -> Result<Health, ClientError> {
        self.json::<(), _>("GET", "/v1/health", None)
    }

    /// `GET /v1/info`: who the daemon is.
    pub fn info(&self) -> Result<ShimInfo, ClientError> {
        self.json::<(), _>("GET", "/v1/info", None)
    }

    /// `GET /v1/stats`: its figures now.
    pub fn stats(&self) -> Result<ShimStats, ClientError> {
        self.json::<(), _>("GET", "/v1/stats", None)
    }

    /// `GET /v1/instances`.
    pub fn list(&self) -> Result<Vec<InstanceInfo>, ClientError> {
        self.json::<(), _>("GET", "/v1/instances", None)
    }

    /// `POST /v1/instances`: boots an instance.
    pub fn run(&self, req: &RunRequest) -> Result<InstanceInfo, ClientError> {
        self.json("POST", "/v1/instances", Some(req))
    }

    /// `POST /v1/restore`: runs a snapshot file.
    pub fn restore(&self, req: &RestoreRequest) -> Result<InstanceInfo, ClientError> {
        self.json("POST", "/v1/restore", Some(req))
    }

    /// `POST /v1/instances/NAME/stop`.
    pub fn stop(&self, name: &str) -> Result<InstanceInfo, ClientError> {
        self.json::<(), _>("POST", &instance(name, "stop"), None)
    }

    /// `PUT /v1/instances/NAME/restart`: sets its restart policy.
    pub fn set_restart(
        &self,
        name: &str,
        req: &RestartRequest,
    ) -> Result<InstanceInfo, ClientError> {
        self.json("PUT", &instance(name, "restart"), Some(req))
    }

    /// `GET /v1/instances/NAME/logs`: its console so far.
    pub fn logs(&self, name: &str) -> Result<String, ClientError> {
        let answer = self.call("GET", &instance(name, "logs"), None)?;
        Ok(String::from_utf8_lossy(&answer.body).into_owned())
    }

    /// `POST /v1/instances/NAME/logs/follow`: its console as it comes,
    /// each [`LogEvent`] to `on_event` (heartbeats included), until the
    /// stream ends.
    pub fn follow_logs(
        &self,
        name: &str,
        mut on_event: impl FnMut(LogEvent),
    ) -> Result<(), ClientError> {
        let mut bad = None;
        let body = serde_json::json!({});
        self.stream_lines(&instance(name, "logs/follow"), &body, |line| {
            if bad.is_some() {
                return;
            }
            match serde_json::from_str::<LogEvent>(line) {
                Ok(event) => on_event(event),
                Err(e) => bad = Some(format!("bad log event {line:?}: {e}")),
            }
        })?;
        bad.map_or(Ok(()), |detail| Err(self.protocol(detail)))
    }

    /// `POST /v1/instances/NAME/snapshot`.
    pub fn snapshot(&self, name: &str, req: &SnapshotRequest) -> Result<SnapshotInfo, ClientError> {
        self.json("POST", &instance(name, "snapshot"), Some(req))
    }

    /// `POST /v1/instances/NAME/checkpoint`.
    pub fn checkpoint(
        &self,
        name: &str,
        req: &CheckpointRequest,
    ) -> Result<CheckpointInfo, ClientError> {
        self.json("POST", &instance(name, "checkpoint"), Some(req))
    }

    /// `GET /v1/images/HEX`: what the daemon knows of a stored image.
    pub fn image<T: for<'de> Deserialize<'de>>(&self, hash: &str) -> Result<T, ClientError> {
        self.json::<(), _>("GET", &image(hash), None)
    }

    /// `PUT /v1/images/HEX`: uploads an image, `progress` seeing the bytes
    /// sent so far.
    pub fn put_image<T: for<'de> Deserialize<'de>>(
        &self,
        hash: &str,
        bytes: &[u8],
        progress: impl FnMut(u64),
    ) -> Result<T, ClientError> {
        let answer = self.upload(&image(hash), bytes, progress)?;
        self.parse(&answer.body)
    }

    /// `POST /v1/images/HEX/push`: has the daemon copy a stored image to
    /// another.
    pub fn push_image<T: for<'de> Deserialize<'de>>(
        &self,
        hash: &str,
        req: &PushRequest,
    ) -> Result<T, ClientError> {
        self.json("POST", &format!("{}/push", image(hash)), Some(req))
    }

    /// `POST /v1/instances/NAME/migrate`: moves an instance to another
    /// daemon, `on_event` seeing each [`MigrationEvent`] as it happens.
    /// A migration that fails is an [`ClientError::Migration`] naming its
    /// phase.
    pub fn migrate(
        &self,
        name: &str,
        req: &MigrateRequest,
        mut on_event: impl FnMut(&MigrationEvent),
    ) -> Result<MigrationReport, ClientError> {
        let mut events = MigrationEvents::default();
        self.stream_lines(&instance(name, "migrate"), req, |line| {
            if let Some(event) = events.line(line) {
                on_event(event);
            }
        })?;
        events.finish().map_err(|e| match e {
            EventsError::Failed { phase, error } => ClientError::Migration { phase, error },
            e => self.protocol(e.to_string()),
        })
    }

    /// `POST /v1/standby`: registers an instance the daemon is to stand by
    /// for (`req` and the answer are the daemon's standby types).
    pub fn standby<Req: Serialize, Resp: for<'de> Deserialize<'de>>(
        &self,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        self.json("POST", "/v1/standby", Some(req))
    }

    /// `GET /v1/standby`: the instances the daemon stands by for.
    pub fn standbys<Resp: for<'de> Deserialize<'de>>(&self) -> Result<Vec<Resp>, ClientError> {
        self.json::<(), _>("GET", "/v1/standby", None)
    }

    /// `POST /v1/standby/NAME/checkpoint`: ships one checkpoint blob of a
    /// watched instance; returns once the standby has it on disk.
    pub fn standby_checkpoint(&self, name: &str, blob: &[u8]) -> Result<(), ClientError> {
        self.call(
            "POST",
            &format!("/v1/standby/{name}/checkpoint"),
            Some(blob),
        )
        .map(|_| ())
    }

    /// `POST /v1/migration`: opens the two-way migration stream (upgraded
    /// to `protocol`) to a destination daemon.
    pub fn migration_stream(&self, protocol: &str) -> Result<BufReader<Stream>, ClientError> {
        self.upgrade("/v1/migration", protocol, b"")
    }

    /// `GET /v1/openapi.yaml`: the API's OpenAPI 3 description.
    pub fn openapi(&self) -> Result<String, ClientError> {
        let answer = self.call("GET", "/v1/openapi.yaml", None)?;
        Ok(String::from_utf8_lossy(&answer.body).into_owned())
    }

    fn parse<T: for<'de> Deserialize<'de>>(&self, body: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|e| self.protocol(e.to_string()))
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol {
            addr: self.addr.clone(),
            detail,
        }
    }
}

/// `/v1/instances/NAME/WHAT`.
fn instance(name: &str, what: &str) -> String {
    format!("/v1/instances/{name}/{what}")
}

/// `/v1/images/HEX`.
fn image(hash: &str) -> String {
    format!("/v1/images/{hash}")
}

/// The shortest whole deadline of an upload ([`upload_deadline`]).
pub const UPLOAD_FLOOR: Duration = Duration::from_secs(30);
/// The slowest rate an upload may go at, in bytes per second, past
/// [`UPLOAD_FLOOR`].
pub const UPLOAD_MIN_RATE: u64 = 1 << 20;

/// How long an upload of `bytes` (an image copied to another daemon) may
/// take, whole: [`UPLOAD_FLOOR`] plus the bytes at [`UPLOAD_MIN_RATE`]. A
/// daemon that reads a byte now and then cannot hold the sender longer.
pub fn upload_deadline(bytes: u64) -> Duration {
    UPLOAD_FLOOR + Duration::from_secs(bytes / UPLOAD_MIN_RATE)
}

/// Largest answer body [`Client::call`] reads.
pub const MAX_ANSWER: u64 = 64 << 20;

/// A connection whose reads and writes all end by one deadline, if it has
/// one (each also within `per_op`, if set): the other side cannot stretch
/// an exchange past it by answering a byte now and then.
struct Until<S> {
    inner: S,
    tcp: TcpStream,
    deadline: Option<Instant>,
    per_op: Option<Duration>,
}

impl<S: Connection> Until<S> {
    fn new(inner: S, deadline: Option<Instant>, per_op: Option<Duration>) -> std::io::Result<Self> {
        let tcp = inner.tcp().try_clone()?;
        Ok(Self {
            inner,
            tcp,
            deadline,
            per_op,
        })
    }

    /// Bounds the next read (or write) by what is left of the deadline.
    fn arm(&self, read: bool) -> std::io::Result<()> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the exchange did not end in time",
            ));
        }
        let t = Some(self.per_op.map_or(left, |p| p.min(left)));
        if read {
            self.tcp.set_read_timeout(t)
        } else {
            self.tcp.set_write_timeout(t)
        }
    }
}

impl<S: Connection> Read for Until<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm(true)?;
        self.inner.read(buf)
    }
}

impl<S: Connection> Write for Until<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm(false)?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.arm(false)?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_get_a_whole_deadline_by_size() {
        assert_eq!(upload_deadline(0), UPLOAD_FLOOR);
        assert_eq!(
            upload_deadline(64 << 20),
            UPLOAD_FLOOR + Duration::from_secs(64)
        );
    }

    /// A one-connection daemon that reads the request (head and body) and
    /// answers `head`, then `body` in pieces of `piece` bytes `every` apart.
    fn slow_daemon(
        head: &'static [u8],
        body: Vec<u8>,
        piece: usize,
        every: Duration,
    ) -> (String, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            while !got.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                got.push(byte[0]);
            }
            // Read the body too: unread bytes at close would reset the connection.
            let length: usize = String::from_utf8_lossy(&got)
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |n| n.trim().parse().unwrap());
            s.read_exact(&mut vec![0u8; length]).unwrap();
            if s.write_all(head).is_err() {
                return;
            }
            for chunk in body.chunks(piece) {
                std::thread::sleep(every);
                if s.write_all(chunk).is_err() {
                    return;
                }
            }
        });
        (addr, t)
    }

    #[test]
    fn a_call_with_a_deadline_ends_in_time_however_slow_the_answer() {
        let head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n";
        let (addr, t) = slow_daemon(head, vec![b' '; 100], 1, Duration::from_millis(100));
        let client = Client::new(&addr)
            .with_timeout(Duration::from_secs(20))
            .with_deadline(Duration::from_secs(1));
        let start = Instant::now();
        let err = client.call("GET", "/v1/info", None).err().expect("cut");
        let took = start.elapsed();
        assert!(matches!(err, ClientError::Io { .. }), "{err}");
        assert!(took < Duration::from_secs(8), "the deadline held: {took:?}");
        t.join().unwrap();
    }

    #[test]
    fn answers_larger_than_the_cap_are_refused() {
        let head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n";
        let body = vec![b' '; MAX_ANSWER as usize + 1];
        let (addr, t) = slow_daemon(head, body, 1 << 20, Duration::ZERO);
        let err = Client::new(&addr)
            .call("GET", "/v1/info", None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("larger than"), "{err}");
        t.join().unwrap();
    }

    #[test]
    fn a_reader_taking_a_byte_now_and_then_cannot_stretch_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                // Reads at first (the kernel's buffers fill), then a byte
                // every 50 ms: each write makes a little progress.
                let mut buf = vec![0u8; 1 << 20];
                let _ = server.read(&mut buf);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if server.read(&mut buf[..1]).unwrap_or(0) == 0 {
                        break;
                    }
                }
            })
        };
        let start = Instant::now();
        let deadline = start + Duration::from_secs(1);
        // Each write alone may block 20 s: only the whole deadline ends it.
        let mut conn = Until::new(client, Some(deadline), Some(Duration::from_secs(20))).unwrap();
        let err = conn.write_all(&vec![0u8; 64 << 20]).unwrap_err();
        let took = start.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ),
            "{err}"
        );
        assert!(took >= Duration::from_secs(1), "{took:?}");
        assert!(
            took < Duration::from_secs(10),
            "the deadline held: {took:?}"
        );
        drop(conn);
        reader.join().unwrap();
    }
    use crate::migration::MigrationReport;
    use std::net::TcpListener;

    /// A one-connection daemon that switches protocols and sends `answer`.
    fn daemon(answer: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                     Upgrade: host-shim-progress\r\n\r\n";
        slow_daemon(head, answer, usize::MAX, Duration::ZERO)
    }

    fn req() -> MigrateRequest {
        MigrateRequest {
            to: "127.0.0.1:1".into(),
            fingerprint: None,
        }
    }

    #[test]
    fn migrate_returns_the_report_and_shows_every_event() {
        let report = MigrationReport {
            name: "kv".into(),
            downtime_ms: 2.5,
            ..MigrationReport::default()
        };
        let events = [
            MigrationEvent::Note {
                message: "hello".into(),
            },
            MigrationEvent::Done(report.clone()),
        ];
        let mut wire = Vec::new();
        for e in &events {
            wire.extend(serde_json::to_vec(e).unwrap());
            wire.push(b'\n');
        }
        let (addr, t) = daemon(wire);
        let mut seen = Vec::new();
        let got = Client::new(&addr)
            .migrate("kv", &req(), |e| seen.push(e.clone()))
            .unwrap();
        assert_eq!(got, report);
        assert_eq!(seen, events);
        t.join().unwrap();
    }

    #[test]
    fn a_failed_migration_names_its_phase() {
        let failed = MigrationEvent::Failed {
            phase: MigrationPhase::Precopy,
            error: "the destination died; kv keeps running here".into(),
        };
        let (addr, t) = daemon(serde_json::to_vec(&failed).unwrap());
        match Client::new(&addr).migrate("kv", &req(), |_| {}) {
            Err(ClientError::Migration { phase, error }) => {
                assert_eq!(phase, MigrationPhase::Precopy);
                assert!(error.contains("keeps running"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        t.join().unwrap();
    }

    #[test]
    fn hostile_streams_are_errors_not_memory() {
        // Not an event.
        let (addr, t) = daemon(b"ok: kv moved\n".to_vec());
        let err = Client::new(&addr)
            .migrate("kv", &req(), |_| {})
            .unwrap_err();
        assert!(matches!(err, ClientError::Protocol { .. }), "{err:?}");
        t.join().unwrap();
        // No end of line, ever: refused after the limit.
        let (addr, t) = daemon(vec![b'x'; MAX_STREAMED_LINE + 10]);
        let err = Client::new(&addr)
            .migrate("kv", &req(), |_| {})
            .unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
        t.join().unwrap();
        // The stream ends before a result.
        let (addr, t) = daemon(Vec::new());
        let err = Client::new(&addr)
            .migrate("kv", &req(), |_| {})
            .unwrap_err();
        assert!(err.to_string().contains("without a result"), "{err}");
        t.join().unwrap();
    }
}
