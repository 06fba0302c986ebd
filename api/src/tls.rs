//! TLS for the daemon API and the migration streams (rustls, ring, TLS 1.3
//! only), with certificates pinned by fingerprint instead of a CA.
//!
//! - A client ([`client_config`]) accepts the server only if its
//!   certificate's SHA-256 is the pinned one, and may present its own
//!   certificate (a daemon migrating to a peer does).
//! - A server ([`server_config`]) asks every client for a certificate but
//!   does not require one: users come with a bearer token instead. A
//!   certificate that is presented must be the client's own (the handshake
//!   signature is checked); whether its fingerprint is a pinned peer is
//!   decided after the handshake (by the daemon's HTTP server), so that a stranger
//!   gets a clear refusal rather than a bare TLS alert.
//!
//! [`Stream`] is a TCP connection, plain or TLS, either side.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::DerefMut;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, DigitallySignedStruct, DistinguishedName,
    ServerConfig, ServerConnection, SideData, SignatureScheme, StreamOwned,
};

use crate::Fingerprint;

/// A certificate and its private key, both PEM: what a TLS side presents.
pub trait CertKey {
    fn cert_pem(&self) -> &str;
    fn key_pem(&self) -> &str;
}

/// The name in every host certificate, and the one clients ask for (the
/// certificate is checked by fingerprint, not by name).
pub const SERVER_NAME: &str = "host-shim";

/// Errors setting TLS up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad certificate or key: {0}")]
    Pem(String),
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
}

/// ring, with AES-128-GCM preferred (the cheapest suite with AES-NI: the
/// migration stream's last round is encrypted while the guest is paused).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// The one protocol version either side speaks.
const TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The DER of the first certificate in `pem`.
pub fn cert_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| TlsError::Pem(e.to_string()))
}

fn cert_and_key(
    id: &dyn CertKey,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cert = CertificateDer::from(cert_der(id.cert_pem())?);
    let key = PrivateKeyDer::from_pem_slice(id.key_pem().as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    Ok((vec![cert], key))
}

/// The server side of a host: its certificate, client certificates asked for.
pub fn server_config(id: &dyn CertKey) -> Result<Arc<ServerConfig>, TlsError> {
    let (certs, key) = cert_and_key(id)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13_ONLY)?
        .with_client_cert_verifier(Arc::new(AnyClientCert {
            provider: provider(),
        }))
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// A client that trusts only the server whose certificate is `pin`, and
/// presents `id`'s certificate if given.
pub fn client_config(
    pin: Fingerprint,
    id: Option<&dyn CertKey>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13_ONLY)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            pin,
            provider: provider(),
        }));
    let config = match id {
        Some(id) => {
            let (certs, key) = cert_and_key(id)?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The handshake-signature methods both verifier traits ask for, checked
/// with the algorithms of `self.provider` by rustls's function of the same
/// name as each method.
macro_rules! handshake_signatures_by_provider {
    () => {
        handshake_signatures_by_provider!(verify_tls12_signature, verify_tls13_signature);

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
    ($($verify:ident),+) => {$(
        fn $verify(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.provider.signature_verification_algorithms;
            $verify(message, cert, dss, algs)
        }
    )+};
}

/// The server's certificate must hash to `pin`.
#[derive(Debug)]
struct Pinned {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

/// Why a server certificate was refused.
#[derive(Debug, thiserror::Error)]
#[error("the server's certificate is {got}, not the pinned {want}")]
struct PinMismatch {
    got: Fingerprint,
    want: Fingerprint,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity);
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                    got,
                    want: self.pin,
                }))),
            ))
        }
    }

    handshake_signatures_by_provider!();
}

/// Takes any client certificate whose key signed the handshake; the
/// fingerprint is matched against the peers afterwards.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_by_provider!();
}

/// The TCP connection under rustls, read in large chunks: rustls asks for
/// 4 KiB at a time, which costs a system call per 4 KiB of a migration
/// stream otherwise.
pub struct Tcp {
    sock: TcpStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Tcp {
    fn new(sock: TcpStream) -> Self {
        Self {
            sock,
            buf: vec![0u8; 256 << 10].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl Read for Tcp {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = self.sock.read(&mut self.buf)?;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl Write for Tcp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.sock.write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// Completes a handshake on `tcp` as `conn`'s side.
fn handshake<C, S>(mut conn: C, tcp: TcpStream) -> io::Result<Box<StreamOwned<C, Tcp>>>
where
    C: DerefMut<Target = ConnectionCommon<S>>,
    S: SideData,
{
    let mut tcp = Tcp::new(tcp);
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(Box::new(StreamOwned::new(conn, tcp)))
}

/// A TCP connection, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Server(Box<StreamOwned<ServerConnection, Tcp>>),
    Client(Box<StreamOwned<ClientConnection, Tcp>>),
}

impl Stream {
    /// Completes a server-side handshake on `tcp`.
    pub fn accept(tcp: TcpStream, config: &Arc<ServerConfig>) -> io::Result<Self> {
        let conn = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
        Ok(Self::Server(handshake(conn, tcp)?))
    }

    /// Completes a client-side handshake on `tcp`.
    pub fn connect(tcp: TcpStream, config: &Arc<ClientConfig>) -> io::Result<Self> {
        let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
        let conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
        Ok(Self::Client(handshake(conn, tcp)?))
    }

    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Server(s) => &s.sock.sock,
            Stream::Client(s) => &s.sock.sock,
        }
    }

    /// The fingerprint of the certificate the other side presented.
    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        let certs = match self {
            Stream::Plain(_) => None,
            Stream::Server(s) => s.conn.peer_certificates(),
            Stream::Client(s) => s.conn.peer_certificates(),
        };
        certs.and_then(|c| c.first()).map(|c| Fingerprint::of(c))
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Server(s) => s.read(buf),
            Stream::Client(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Server(s) => s.write(buf),
            Stream::Client(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Server(s) => s.flush(),
            Stream::Client(s) => s.flush(),
        }
    }
}

impl Drop for Stream {
    /// Ends a TLS stream with close_notify, so the other side can tell the
    /// end of an answer from a cut connection.
    fn drop(&mut self) {
        match self {
            Stream::Plain(_) => return,
            Stream::Server(s) => s.conn.send_close_notify(),
            Stream::Client(s) => s.conn.send_close_notify(),
        }
        let _ = self.flush();
    }
}

/// One connection used by a reader and a writer (the migration stream):
/// each half locks it for one call.
#[derive(Clone)]
pub struct Shared(Arc<std::sync::Mutex<io::BufReader<Stream>>>);

impl Shared {
    pub fn new(stream: io::BufReader<Stream>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(stream)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, io::BufReader<Stream>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.lock().get_ref().tcp().set_read_timeout(t)
    }
}

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.lock().read(buf)
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().get_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.lock().get_mut().flush()
    }
}
