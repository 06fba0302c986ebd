//! Who may talk to a shim, and how: host identities and TLS (the overlay's
//! datagram sealing lives with the overlay, in `hostnet::overlay_crypto`).
//!
//! - [`identity`]: a host's identity on disk (`host-shim init`): a key and a
//!   self-signed certificate, the host's config, the user token, the fleet's
//!   overlay key and the pinned certificate fingerprints of its peers.
//! - [`tls`] (the `api` crate's, re-exported): rustls (ring provider, TLS
//!   1.3) for the daemon API and the migration streams. Clients pin the server's certificate fingerprint;
//!   servers ask for a client certificate and match it against their
//!   peers. Users authenticate with a bearer token.
//!
//! Hosts know each other by [`Fingerprint`]s (SHA-256 of the certificate's
//! DER), written `SHA256:` and 64 hex digits.

pub mod identity;
pub use ::api::tls;
pub use ::api::{decode_hex, encode_hex, Fingerprint};

use std::fmt;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use identity::{Identity, Peer};

/// A daemon's security set-up: its identity, its TLS server config and its
/// pinned peers (re-read from `DIR/host.json` whenever it changed, so
/// `host-shim peer add` and `peer remove` need no restart).
pub struct HostSecurity {
    pub identity: Identity,
    pub server: Arc<rustls::ServerConfig>,
    /// The peers and when `host.json` was last modified.
    peers: RwLock<(Option<std::time::SystemTime>, Vec<Peer>)>,
}

impl fmt::Debug for HostSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostSecurity({} at {})",
            self.identity.fingerprint,
            self.identity.dir.display()
        )
    }
}

impl HostSecurity {
    pub fn new(identity: Identity) -> Result<Self, tls::TlsError> {
        Ok(Self {
            server: tls::server_config(&identity)?,
            peers: RwLock::new((None, identity.config.peers.clone())),
            identity,
        })
    }

    /// The first pinned peer that `matches`, as `host.json` says now (it
    /// is re-read when it changed: a pin removed is a pin revoked).
    fn find_peer(&self, matches: impl Fn(&Peer) -> bool) -> Option<Peer> {
        self.peers().into_iter().find(|p| matches(p))
    }

    /// The pinned peers, as `host.json` says now.
    pub fn peers(&self) -> Vec<Peer> {
        let modified = std::fs::metadata(self.identity.dir.join(identity::CONFIG))
            .and_then(|m| m.modified())
            .ok();
        let stale = self.peers.read().unwrap_or_else(|e| e.into_inner()).0 != modified;
        if stale {
            match identity::load_config(&self.identity.dir) {
                Ok(c) => {
                    *self.peers.write().unwrap_or_else(|e| e.into_inner()) = (modified, c.peers)
                }
                Err(e) => tracing::warn!(error = %e, "cannot re-read the peers"),
            }
        }
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        peers.1.clone()
    }

    /// The pinned peer with this certificate.
    pub fn peer_by_fingerprint(&self, fp: &Fingerprint) -> Option<Peer> {
        self.find_peer(|p| p.fingerprint.parse::<Fingerprint>().ok().as_ref() == Some(fp))
    }

    /// The pinned peer named `to`, or at address `to`.
    pub fn peer_by_name_or_addr(&self, to: &str) -> Option<Peer> {
        let bare = |a: &str| {
            a.trim_start_matches("https://")
                .trim_end_matches('/')
                .to_owned()
        };
        self.find_peer(|p| p.name == to || p.addr.as_deref().map(bare) == Some(bare(to)))
    }

    /// Whether `token` is the user token.
    pub fn is_user_token(&self, token: &str) -> bool {
        same_secret(token.as_bytes(), self.identity.token.as_bytes())
    }
}

/// `n` random bytes from the operating system.
pub fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).expect("the operating system's random source works");
    out
}

/// Compares two secrets in time independent of where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_and_parse() {
        let f = Fingerprint::of(b"certificate");
        let s = f.to_string();
        assert!(s.starts_with("SHA256:") && s.len() == 7 + 64);
        assert_eq!(s.parse::<Fingerprint>().unwrap(), f);
        assert_eq!(
            s.to_uppercase()
                .replace("SHA256", "sha256")
                .parse::<Fingerprint>()
                .unwrap(),
            f
        );
        assert!("SHA256:abcd".parse::<Fingerprint>().is_err());
        assert!(s[7..].parse::<Fingerprint>().is_err());
        assert!(same_secret(b"tok", b"tok"));
        assert!(!same_secret(b"tok", b"tok2"));
    }
}
