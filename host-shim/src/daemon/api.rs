//! The daemon's HTTP/1.1 JSON API: the request and answer bodies, and a
//! small blocking client for them (used by the `host-shim` subcommands and
//! by one daemon talking to another).
//!
//! A [`Client`] talks plain HTTP ([`Client::new`]) or TLS to a pinned
//! server certificate with a bearer token ([`Client::secure`]); a daemon
//! migrating to a peer also presents its own certificate.
//!
//! Every answer is JSON, except `logs` (plain text) and `migrate` (plain
//! text progress lines, streamed as they happen, ending with a line that
//! starts with `ok` or `error:`). Errors are `{"error": "..."}` with a 4xx
//! or 5xx status. See [`super`] for the endpoints.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use super::persist::Restart;
use crate::security::identity::Identity;
use crate::security::tls::Stream;
use crate::security::Fingerprint;

/// The upgrade protocol of streamed answers.
const PROGRESS: &str = "host-shim-progress";

/// `POST /v1/instances`: boot an image as a named instance.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunRequest {
    pub name: String,
    /// A path the daemon can read, or `sha256:HEX` for an image uploaded
    /// with `PUT /v1/images/HEX`.
    pub image: String,
    /// Bytes of guest RAM.
    pub mem: u64,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub args: Vec<String>,
    /// `--publish` mappings, in their command-line syntax.
    #[serde(default)]
    pub publish: Vec<String>,
    /// The guest's address (else the daemon picks one of its own range).
    #[serde(default)]
    pub ip: Option<String>,
    /// An app checkpoint file (a path the daemon can read) to hand over.
    #[serde(default)]
    pub restore: Option<String>,
    /// Have the app checkpoint itself every this many milliseconds.
    #[serde(default)]
    pub checkpoint_every_ms: Option<u64>,
    /// The directory (the daemon's) its checkpoints go to, as `latest.ckpt`.
    #[serde(default)]
    pub checkpoint_to: Option<String>,
    /// A standby daemon's API address: it receives every checkpoint and
    /// restarts the app if this daemon dies (see `daemon::standby`).
    #[serde(default)]
    pub standby: Option<String>,
    /// How long this daemon may be unreachable before the standby takes
    /// over, in ms [default: 2000].
    #[serde(default)]
    pub standby_grace_ms: Option<u64>,
    /// Whether it comes back after a daemon restart (needs `--state-dir`).
    #[serde(default)]
    pub restart: Restart,
}

/// `PUT /v1/instances/NAME/restart`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestartRequest {
    pub restart: Restart,
}

/// `POST /v1/images/HEX/push`: copy a stored image to another daemon.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PushRequest {
    /// The other daemon's API address.
    pub to: String,
}

/// `POST /v1/restore`: run a snapshot file (a path the daemon can read).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub file: String,
    /// The instance name (default: the one saved in the snapshot).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub publish: Vec<String>,
}

/// `POST /v1/instances/NAME/snapshot`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Where the daemon writes the file.
    pub out: String,
}

/// `POST /v1/instances/NAME/checkpoint`: ask the app for a checkpoint now.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckpointRequest {
    /// Where the daemon writes the checkpoint.
    pub out: String,
    /// How long to wait for the app [default: 10 s].
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A checkpoint written by `POST /v1/instances/NAME/checkpoint`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub file: String,
    pub bytes: u64,
    /// `app schema vN, N bytes of state`.
    pub describe: String,
    /// From the request to the checkpoint's arrival.
    pub ms: f64,
}

/// What a snapshot cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub file: String,
    pub pages: u64,
    pub bytes: u64,
    /// How long the guest was paused.
    pub paused_ms: f64,
}

/// `POST /v1/instances/NAME/migrate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The destination daemon's API address, or (secure daemons) the name
    /// or address of a pinned peer.
    pub to: String,
    /// The destination's certificate fingerprint (`SHA256:...`), when it
    /// is not a pinned peer of the source known by `to`.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// One instance, as `list` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct InstanceInfo {
    pub name: String,
    /// `running`, `paused`, `exited (N)`, `failed: ...`, `moved to ADDR`.
    pub state: String,
    pub image: String,
    pub ip: Option<String>,
    pub mac: Option<String>,
    pub mem: u64,
    pub uptime_s: f64,
    /// Moves so far (`BootInfo::generation`).
    pub generation: u64,
    pub publish: Vec<String>,
    /// Its restart policy (`always`: recorded in the daemon's `--state-dir`).
    #[serde(default)]
    pub restart: Restart,
}

/// `GET /v1/health`: a cheap liveness answer (no token needed).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
}

/// `GET /v1/info`: who this daemon is.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ShimInfo {
    pub name: String,
    pub region: String,
    pub version: String,
    pub gateway: String,
    pub overlay: Option<String>,
    pub instances: usize,
    /// The largest image `PUT /v1/images/HEX` accepts; none: this shim
    /// keeps no images (no `--state-dir`).
    #[serde(default)]
    pub max_image_bytes: Option<u64>,
    /// The certificate fingerprint (secure daemons).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Overlay datagrams dropped for failing authentication.
    #[serde(default)]
    pub overlay_rejected: u64,
    /// What callers may take (`serve --max-*` flags).
    #[serde(default)]
    pub limits: Option<super::limits::Limits>,
}

/// An error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

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
}

/// A client of one daemon.
#[derive(Clone)]
pub struct Client {
    /// `HOST:PORT`.
    pub addr: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<String>,
    /// Connect here instead of `addr` (a relay; TLS still pins the peer).
    via: Option<SocketAddr>,
    /// The longest any read or write may block (none: forever).
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
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
            tls: None,
            token: None,
            via: None,
            timeout: None,
        }
    }

    /// A TLS client that accepts only the server certificate `pin`, sends
    /// `token` as its bearer token and presents `id`'s certificate, if given.
    pub fn secure(
        addr: &str,
        pin: Fingerprint,
        token: Option<String>,
        id: Option<&Identity>,
    ) -> Result<Self, ClientError> {
        let config =
            crate::security::tls::client_config(pin, id).map_err(|e| ClientError::Tls {
                addr: addr.to_owned(),
                err: e.to_string(),
            })?;
        Ok(Self {
            addr: bare(addr).to_owned(),
            tls: Some(config),
            token,
            via: None,
            timeout: None,
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

    /// Whether the client speaks TLS.
    pub fn is_secure(&self) -> bool {
        self.tls.is_some()
    }

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
    ) -> Result<(u16, BufReader<Stream>), ClientError> {
        let mut stream = self.connect()?;
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
        let (status, mut reader) = self.send(method, path, body)?;
        let mut body = Vec::new();
        reader.read_to_end(&mut body).map_err(self.io())?;
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
        let mut stream = self.connect()?;
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
                tracing::debug!("upload to {} cut short: {err}", self.addr);
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
    pub fn stream_lines<Req: Serialize>(
        &self,
        path: &str,
        body: &Req,
        mut on_line: impl FnMut(&str),
    ) -> Result<String, ClientError> {
        let bytes = serde_json::to_vec(body).expect("serializable");
        let reader = self.upgrade(path, PROGRESS, &bytes)?;
        let mut last = String::new();
        for line in reader.lines() {
            let line = line.map_err(self.io())?;
            on_line(&line);
            last = line;
        }
        Ok(last)
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
