//! A host's identity and config in its state directory, made once by
//! `host-shim init` and read by `host-shim serve` and the local CLI.
//!
//! ```text
//! DIR/                  mode 0700; default /var/lib/host-shim (root) or
//!                       ~/.local/share/host-shim; --dir or HOST_SHIM_DIR
//!   host.json           name, region, API address, shim id, overlay, peers
//!   cert.pem            the self-signed certificate (its SHA-256 is the
//!                       host's fingerprint)
//!   key.pem             its private key (ECDSA P-256), mode 0600
//!   token               the user token for the API, mode 0600
//!   fleet.key           the fleet's overlay key (64 hex digits), mode 0600
//! ```
//!
//! Peers are other hosts of the fleet, pinned by certificate fingerprint
//! (`host-shim peer add NAME SHA256:... [--addr https://HOST:PORT]`): only
//! they may send this host a migration stream, and this host migrates to
//! them only if their certificate matches.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{decode_hex, encode_hex, random, Fingerprint};

/// Environment variable naming the state directory.
pub const DIR_ENV: &str = "HOST_SHIM_DIR";
/// The config file in the state directory.
pub const CONFIG: &str = "host.json";
const CERT: &str = "cert.pem";
const KEY: &str = "key.pem";
const TOKEN: &str = "token";
const FLEET_KEY: &str = "fleet.key";

/// Errors of the identity store.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |err| IdentityError::Io {
        path: path.to_owned(),
        err,
    }
}

/// Another host of the fleet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Peer {
    pub name: String,
    /// `SHA256:...` of its certificate.
    pub fingerprint: String,
    /// Its API address, `https://HOST:PORT`, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

impl Peer {
    /// Its overlay address: a shim's overlay listens on its API address
    /// (UDP) unless told otherwise, so that of `addr`, if it has one.
    pub fn overlay_addr(&self) -> Option<std::net::SocketAddr> {
        use std::net::ToSocketAddrs;
        let addr = self.addr.as_deref()?;
        let bare = addr.trim_start_matches("https://").trim_end_matches('/');
        bare.to_socket_addrs().ok()?.next()
    }
}

/// `DIR/host.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostConfig {
    pub name: String,
    pub region: String,
    /// The API address (TLS).
    pub listen: SocketAddr,
    pub shim_id: u8,
    /// The overlay's UDP address (default: the API address).
    #[serde(default)]
    pub overlay: Option<SocketAddr>,
    #[serde(default = "default_vni")]
    pub vni: u32,
    #[serde(default)]
    pub peers: Vec<Peer>,
}

fn default_vni() -> u32 {
    4242
}

/// What `host-shim init` is asked for.
#[derive(Clone, Debug)]
pub struct InitRequest {
    pub name: String,
    pub region: String,
    pub listen: SocketAddr,
    pub shim_id: u8,
    /// Use this fleet key (64 hex digits) instead of a new one.
    pub fleet_key: Option<[u8; 32]>,
    /// Use this user token instead of a new one.
    pub token: Option<String>,
}

/// A host's identity, loaded.
#[derive(Clone)]
pub struct Identity {
    pub dir: PathBuf,
    pub config: HostConfig,
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: Fingerprint,
    pub token: String,
    pub fleet_key: [u8; 32],
}

impl ::api::tls::CertKey for Identity {
    fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    fn key_pem(&self) -> &str {
        &self.key_pem
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({} {})", self.config.name, self.fingerprint)
    }
}

/// The default state directory: `$HOST_SHIM_DIR`, else
/// /var/lib/host-shim for root, else `$XDG_DATA_HOME/host-shim` or
/// ~/.local/share/host-shim.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if shim_util::sys::is_root() {
        return PathBuf::from("/var/lib/host-shim");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("host-shim");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/host-shim")
}

/// Whether `dir` holds an identity.
pub fn exists(dir: &Path) -> bool {
    dir.join(CONFIG).is_file()
}

/// Writes `contents` to `path` atomically, readable only by its owner
/// (secrets or not: the directory is its owner's alone anyway), through a
/// new temporary file that no planted link can redirect.
fn write_file(path: &Path, contents: &[u8]) -> Result<(), IdentityError> {
    shim_util::files::write_atomic(path, contents).map_err(io(path))
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// Creates the identity in `dir`; refuses if one exists there.
pub fn init(dir: &Path, req: &InitRequest) -> Result<Identity, IdentityError> {
    if exists(dir) {
        return Err(IdentityError::Invalid(format!(
            "{} already holds a host identity (host.json): a host's identity is made once; \
             remove the directory to start over",
            dir.display()
        )));
    }
    let max = crate::daemon::MAX_SHIM_ID;
    if !(1..=max).contains(&req.shim_id) {
        return Err(IdentityError::Invalid(format!(
            "--shim-id {} is out of range: 1 to {max}",
            req.shim_id
        )));
    }
    shim_util::files::private_dir(dir).map_err(io(dir))?;
    let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Invalid(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(vec![super::tls::SERVER_NAME.to_owned(), req.name.clone()])
            .map_err(|e| IdentityError::Invalid(format!("name '{}': {e}", req.name)))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("host-shim {}", req.name));
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = params
        .self_signed(&key)
        .map_err(|e| IdentityError::Invalid(e.to_string()))?;
    let token = req
        .token
        .clone()
        .unwrap_or_else(|| encode_hex(&random::<24>()));
    let fleet_key = req.fleet_key.unwrap_or_else(random::<32>);
    let config = HostConfig {
        name: req.name.clone(),
        region: req.region.clone(),
        listen: req.listen,
        shim_id: req.shim_id,
        overlay: None,
        vni: default_vni(),
        peers: Vec::new(),
    };
    write_file(&dir.join(KEY), key.serialize_pem().as_bytes())?;
    write_file(&dir.join(CERT), cert.pem().as_bytes())?;
    write_file(&dir.join(TOKEN), format!("{token}\n").as_bytes())?;
    write_file(
        &dir.join(FLEET_KEY),
        format!("{}\n", encode_hex(&fleet_key)).as_bytes(),
    )?;
    save_config(dir, &config)?;
    load(dir)
}

/// Reads a fleet key file (64 hex digits).
pub fn read_fleet_key(path: &Path) -> Result<[u8; 32], IdentityError> {
    decode_hex(read(path)?.trim()).ok_or_else(|| {
        IdentityError::Invalid(format!(
            "{}: not a fleet key (64 hex digits, like DIR/fleet.key of another host)",
            path.display()
        ))
    })
}

/// Largest token file read.
const MAX_TOKEN_FILE: u64 = 64 << 10;

/// Reads a token file (its first line); `-` reads standard input, so a
/// token need not appear on a command line (where `ps` shows it).
pub fn read_token(path: &Path) -> Result<String, IdentityError> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(std::io::stdin().lock(), MAX_TOKEN_FILE),
            &mut text,
        )
        .map_err(io(path))?;
        text
    } else {
        let bytes = shim_util::files::read_capped(path, MAX_TOKEN_FILE)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        String::from_utf8(bytes)
            .map_err(|_| IdentityError::Invalid(format!("{}: not text", path.display())))?
    };
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(IdentityError::Invalid(format!(
            "{}: the token file is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// Loads the identity in `dir`.
pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
    if !exists(dir) {
        return Err(IdentityError::Invalid(format!(
            "no host identity in {}: run `host-shim init --name NAME --region REGION` \
             (with --dir {0} or HOST_SHIM_DIR={0} if that is where it should go)",
            dir.display()
        )));
    }
    let config = load_config(dir)?;
    let cert_pem = read(&dir.join(CERT))?;
    let key_pem = read(&dir.join(KEY))?;
    let der = super::tls::cert_der(&cert_pem)
        .map_err(|e| IdentityError::Invalid(format!("{}: {e}", dir.join(CERT).display())))?;
    Ok(Identity {
        dir: dir.to_owned(),
        config,
        fingerprint: Fingerprint::of(&der),
        cert_pem,
        key_pem,
        token: read_token(&dir.join(TOKEN))?,
        fleet_key: read_fleet_key(&dir.join(FLEET_KEY))?,
    })
}

/// Reads `DIR/host.json`.
pub fn load_config(dir: &Path) -> Result<HostConfig, IdentityError> {
    let path = dir.join(CONFIG);
    serde_json::from_str(&read(&path)?)
        .map_err(|e| IdentityError::Invalid(format!("{}: {e}", path.display())))
}

/// Writes `DIR/host.json`.
pub fn save_config(dir: &Path, config: &HostConfig) -> Result<(), IdentityError> {
    let text = serde_json::to_string_pretty(config).expect("serializable");
    write_file(&dir.join(CONFIG), format!("{text}\n").as_bytes())
}

/// Adds (or replaces, by name) a pinned peer.
pub fn add_peer(dir: &Path, peer: Peer) -> Result<(), IdentityError> {
    peer.fingerprint
        .parse::<Fingerprint>()
        .map_err(IdentityError::Invalid)?;
    let mut config = load_config(dir)?;
    config.peers.retain(|p| p.name != peer.name);
    config.peers.push(peer);
    save_config(dir, &config)
}

/// Removes a pinned peer; whether it was there.
pub fn remove_peer(dir: &Path, name: &str) -> Result<bool, IdentityError> {
    let mut config = load_config(dir)?;
    let before = config.peers.len();
    config.peers.retain(|p| p.name != name);
    save_config(dir, &config)?;
    Ok(config.peers.len() != before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_load_and_peers() {
        let dir = std::env::temp_dir().join(format!("host-shim-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let req = InitRequest {
            name: "us-east".into(),
            region: "us".into(),
            listen: "127.0.0.1:7443".parse().unwrap(),
            shim_id: 1,
            fleet_key: None,
            token: None,
        };
        let id = init(&dir, &req).unwrap();
        assert_eq!(id.config.name, "us-east");
        assert_eq!(id.token.len(), 48);
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(KEY), 0o600);
        assert_eq!(mode(TOKEN), 0o600);
        assert_eq!(mode(FLEET_KEY), 0o600);
        assert!(init(&dir, &req)
            .unwrap_err()
            .to_string()
            .contains("already"));
        let again = load(&dir).unwrap();
        assert_eq!(again.fingerprint, id.fingerprint);
        assert_eq!(again.fleet_key, id.fleet_key);
        add_peer(
            &dir,
            Peer {
                name: "eu".into(),
                fingerprint: id.fingerprint.to_string(),
                addr: None,
            },
        )
        .unwrap();
        assert!(add_peer(
            &dir,
            Peer {
                name: "x".into(),
                fingerprint: "SHA256:00".into(),
                addr: None
            }
        )
        .is_err());
        assert_eq!(load_config(&dir).unwrap().peers.len(), 1);
        assert!(remove_peer(&dir, "eu").unwrap());
        assert!(!remove_peer(&dir, "eu").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tls_tests {
    //! The `api` crate's TLS between two identities of this module.
    use super::*;
    use crate::security::tls::{client_config, server_config, Stream};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn identity(tag: &str) -> Identity {
        let dir = std::env::temp_dir().join(format!("host-shim-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id = init(
            &dir,
            &InitRequest {
                name: tag.into(),
                region: "r".into(),
                listen: "127.0.0.1:0".parse().unwrap(),
                shim_id: 1,
                fleet_key: None,
                token: None,
            },
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        id
    }

    /// Serves one connection: echoes a line back with the client's fingerprint.
    fn server(id: &Identity) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = server_config(id).unwrap();
        let t = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            if let Ok(mut s) = Stream::accept(tcp, &config) {
                let mut b = [0u8; 5];
                if s.read_exact(&mut b).is_ok() {
                    let fp = s
                        .peer_fingerprint()
                        .map(|f| f.to_string())
                        .unwrap_or_default();
                    let _ = s.write_all(fp.as_bytes());
                }
            }
        });
        (addr, t)
    }

    #[test]
    fn clients_pin_the_server_and_servers_see_client_certificates() {
        let (host, peer) = (identity("host"), identity("peer"));
        let (addr, t) = server(&host);
        let config = client_config(host.fingerprint, Some(&peer)).unwrap();
        let mut s = Stream::connect(TcpStream::connect(addr).unwrap(), &config).unwrap();
        assert_eq!(s.peer_fingerprint(), Some(host.fingerprint));
        s.write_all(b"hello").unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, peer.fingerprint.to_string());
        t.join().unwrap();

        // Pinned to another certificate: the handshake fails, saying why.
        let (addr, t) = server(&host);
        let config = client_config(peer.fingerprint, None).unwrap();
        let err = Stream::connect(TcpStream::connect(addr).unwrap(), &config)
            .err()
            .unwrap();
        assert!(format!("{err:?}").contains("PinMismatch"), "{err:?}");
        t.join().unwrap();
    }
}
