//! Certificate fingerprints (`SHA256:` and 64 hex digits): how a client
//! pins a daemon and how a daemon knows its peers.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The SHA-256 of a certificate (DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SHA256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = String;

    /// `SHA256:` and 64 hex digits (colons between bytes allowed).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "'{s}' is not a certificate fingerprint: expected SHA256: and 64 hex digits \
                 (as `host-shim init` and `host-shim serve` print it)"
            )
        };
        let hex: String = s
            .trim()
            .strip_prefix("SHA256:")
            .or_else(|| s.trim().strip_prefix("sha256:"))
            .ok_or_else(bad)?
            .chars()
            .filter(|c| *c != ':')
            .collect();
        Ok(Self(decode_hex(&hex).ok_or_else(bad)?))
    }
}

/// `N` bytes from `2N` hex digits.
pub fn decode_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Lower-case hex of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
