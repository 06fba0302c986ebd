//! Images by hash: what `GET`/`PUT /v1/images/HEX` answer, and how a run
//! request names an uploaded image (`sha256:HEX`).

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// The prefix of an image reference by hash in [`crate::RunRequest::image`].
pub const HASH_PREFIX: &str = "sha256:";

/// A stored image, as the API describes it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    /// Hex SHA-256 of the image.
    pub sha256: String,
    pub size: u64,
    /// Whether this call wrote it (false: it was already here).
    #[serde(default)]
    pub stored: bool,
}

/// Hex SHA-256 of `bytes` (the name of an image).
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::encode_hex(&sha2::Sha256::digest(bytes))
}
