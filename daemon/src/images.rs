//! The daemon's image store: images uploaded over the API, content-
//! addressed by the SHA-256 of their bytes, kept as `STATE/images/HEX`.
//!
//! `PUT /v1/images/HEX` stores a body only if its SHA-256 is HEX (a
//! tampered or truncated upload is refused and nothing is kept) and it is
//! no larger than the daemon's limit (`serve --max-image-size`). An image
//! that is already here is not written again (the client asks first with
//! `GET /v1/images/HEX` and skips the upload). `run` boots a stored image
//! by naming it `sha256:HEX`.

use std::path::{Path, PathBuf};

pub use ::api::images::{sha256_hex, ImageInfo, HASH_PREFIX};

/// Default `--max-image-size`: unikernel images are hundreds of KiB.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 20;

/// The API reads at most this much of a request body, so no limit can be larger.
pub const TRANSPORT_MAX_BYTES: u64 = 16 << 20;

/// Why an image was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("'{0}' is not a SHA-256 (64 lowercase hex digits)")]
    BadHash(String),
    #[error("the image is {size}, over this shim's limit of {max} bytes (serve --max-image-size)")]
    TooLarge { size: String, max: u64 },
    #[error(
        "the image's SHA-256 is {actual}, not {expected}: refused (tampered or truncated upload)"
    )]
    Mismatch { expected: String, actual: String },
    #[error("no image sha256:{0} on this shim: upload it first (PUT /v1/images/{0})")]
    NotFound(String),
    #[error("this shim keeps no images: start it with `serve --state-dir DIR`")]
    NoStore,
    #[error("image store: {0}")]
    Io(#[from] std::io::Error),
}

impl ImageError {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            ImageError::BadHash(_) => 400,
            ImageError::TooLarge { .. } => 413,
            ImageError::Mismatch { .. } => 422,
            ImageError::NotFound(_) => 404,
            ImageError::NoStore => 409,
            ImageError::Io(_) => 500,
        }
    }
}

/// Checks that `hash` is 64 lowercase hex digits (it becomes a file name).
pub fn check_hash(hash: &str) -> Result<(), ImageError> {
    if hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(ImageError::BadHash(hash.to_owned()))
    }
}

/// A directory of images named by their hash.
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
    max_bytes: u64,
}

impl ImageStore {
    /// Opens (creating) `dir`; uploads over `max_bytes` are refused.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            shim_util::files::private_dir(parent)?;
        }
        shim_util::files::private_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes: max_bytes.min(TRANSPORT_MAX_BYTES),
        })
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Where image `hash` lives (whether or not it is there).
    fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(hash)
    }

    /// The stored image `hash`, if any.
    pub fn get(&self, hash: &str) -> Result<Option<ImageInfo>, ImageError> {
        check_hash(hash)?;
        match std::fs::metadata(self.path(hash)) {
            Ok(m) => Ok(Some(ImageInfo {
                sha256: hash.to_owned(),
                size: m.len(),
                stored: false,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores `body` as image `hash` after checking its size and hash.
    pub fn put(&self, hash: &str, body: &[u8]) -> Result<ImageInfo, ImageError> {
        check_hash(hash)?;
        let size = body.len() as u64;
        if size > self.max_bytes || size >= TRANSPORT_MAX_BYTES {
            return Err(ImageError::TooLarge {
                // A body cut at the transport's limit was larger still.
                size: if size >= TRANSPORT_MAX_BYTES {
                    format!("{size} bytes or more")
                } else {
                    format!("{size} bytes")
                },
                max: self.max_bytes,
            });
        }
        let actual = sha256_hex(body);
        if actual != hash {
            return Err(ImageError::Mismatch {
                expected: hash.to_owned(),
                actual,
            });
        }
        if let Some(info) = self.get(hash)? {
            return Ok(info);
        }
        shim_util::files::write_atomic(&self.path(hash), body)?;
        tracing::info!(
            image = format_args!("sha256:{hash}"),
            bytes = size,
            "stored image"
        );
        Ok(ImageInfo {
            sha256: hash.to_owned(),
            size,
            stored: true,
        })
    }

    /// The file of a stored image, for `run`.
    pub fn file(&self, hash: &str) -> Result<PathBuf, ImageError> {
        match self.get(hash)? {
            Some(_) => Ok(self.path(hash)),
            None => Err(ImageError::NotFound(hash.to_owned())),
        }
    }

    /// The bytes of a stored image (to push it to another shim).
    pub fn read(&self, hash: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.file(hash)?;
        shim_util::files::read_capped(&path, self.max_bytes)
            .map_err(|e| ImageError::Io(std::io::Error::other(e.to_string())))
    }
}

impl super::Daemon {
    fn store(&self) -> Result<&ImageStore, super::ApiError> {
        self.images.as_ref().ok_or_else(|| api(ImageError::NoStore))
    }

    /// `GET /v1/images/HEX`.
    pub(super) fn image_info(&self, hash: &str) -> Result<ImageInfo, super::ApiError> {
        self.store()?
            .get(hash)
            .map_err(api)?
            .ok_or_else(|| api(ImageError::NotFound(hash.to_owned())))
    }

    /// `PUT /v1/images/HEX`.
    pub(super) fn store_image(
        &self,
        hash: &str,
        body: &[u8],
    ) -> Result<ImageInfo, super::ApiError> {
        self.store()?.put(hash, body).map_err(|e| {
            tracing::warn!(
                image = format_args!("sha256:{hash}"),
                error = %e,
                "image upload refused",
            );
            api(e)
        })
    }

    /// `POST /v1/images/HEX/push`: copies a stored image to the shim at
    /// `to` unless it has it already.
    pub(super) fn push_image(&self, hash: &str, to: &str) -> Result<ImageInfo, super::ApiError> {
        let bytes = self.store()?.read(hash).map_err(api)?;
        let peer = self
            .peer_client(to, None)
            .map_err(|why| super::ApiError(502, why))?;
        let asked = peer.clone().with_deadline(::api::UPLOAD_FLOOR);
        if let Ok(info) = asked.image::<ImageInfo>(hash) {
            return Ok(info);
        }
        peer.put_image::<ImageInfo>(hash, &bytes, |_| {})
            .map_err(|e| super::ApiError(502, format!("pushing image sha256:{hash} to {to}: {e}")))
    }

    /// The file to boot for `image`: a path as is, `sha256:HEX` from the store.
    pub(super) fn image_file(&self, image: &str) -> Result<String, super::ApiError> {
        match image.strip_prefix(HASH_PREFIX) {
            Some(hash) => Ok(self.store()?.file(hash).map_err(api)?.display().to_string()),
            None => Ok(image.to_owned()),
        }
    }
}

/// An image refusal as an API error with its status.
fn api(e: ImageError) -> super::ApiError {
    super::ApiError(e.status(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max: u64) -> (ImageStore, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("host-shim-images-{}-{max}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (ImageStore::open(&dir, max).unwrap(), dir)
    }

    #[test]
    fn stores_once_and_refuses_mismatch_and_oversize() {
        let (s, dir) = store(1024);
        let body = b"an image".to_vec();
        let hash = sha256_hex(&body);
        assert!(s.get(&hash).unwrap().is_none());
        assert!(s.put(&hash, &body).unwrap().stored);
        assert!(!s.put(&hash, &body).unwrap().stored, "dedup");
        assert_eq!(std::fs::read(s.file(&hash).unwrap()).unwrap(), body);

        let other = sha256_hex(b"something else");
        assert!(matches!(
            s.put(&other, &body),
            Err(ImageError::Mismatch { .. })
        ));
        assert!(s.get(&other).unwrap().is_none(), "nothing kept");
        let big = vec![0u8; 2048];
        assert!(matches!(
            s.put(&sha256_hex(&big), &big),
            Err(ImageError::TooLarge { .. })
        ));
        assert!(matches!(s.get("../etc"), Err(ImageError::BadHash(_))));
        assert!(matches!(s.file(&other), Err(ImageError::NotFound(_))));
        let _ = std::fs::remove_dir_all(dir);
    }
}
