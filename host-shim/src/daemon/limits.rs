//! What a daemon lets its callers take: API connections, request bodies
//! and their deadlines, instances, guest memory, published ports, and the
//! names instances may have. Set by `serve` flags (shown in
//! `serve --help`), reported in `GET /v1/info`; every refusal names the
//! limit and the flag that sets it.

use super::ApiError;
use hostnet::PublishSpec;

/// Longest instance name.
pub const MAX_NAME: usize = 64;

pub use api::limits::*;

/// The admission checks of a daemon's [`Limits`].
pub trait Quotas {
    /// Refuses an instance of `mem` bytes when `live` instances holding
    /// `used` bytes run already (409, naming the limit and its flag).
    fn admit(&self, live: usize, used: u64, mem: u64) -> Result<(), ApiError>;
    /// Refuses too many published ports or privileged host ports.
    fn check_publish(&self, publish: &[PublishSpec]) -> Result<(), ApiError>;
}

impl Quotas for Limits {
    fn admit(&self, live: usize, used: u64, mem: u64) -> Result<(), ApiError> {
        if live >= self.max_instances {
            return Err(ApiError(
                409,
                format!(
                    "this shim runs {live} instances, its limit (serve --max-instances {})",
                    self.max_instances
                ),
            ));
        }
        if used.saturating_add(mem) > self.max_guest_memory {
            return Err(ApiError(
                409,
                format!(
                    "{} MiB more guest memory would exceed this shim's limit of {} MiB ({} MiB \
                     in use; serve --max-guest-memory / --memory-overcommit)",
                    mem >> 20,
                    self.max_guest_memory >> 20,
                    used >> 20
                ),
            ));
        }
        Ok(())
    }

    fn check_publish(&self, publish: &[PublishSpec]) -> Result<(), ApiError> {
        if publish.len() > self.max_publish {
            return Err(ApiError(
                400,
                format!(
                    "{} published ports: an instance may publish at most {} (serve --max-publish)",
                    publish.len(),
                    self.max_publish
                ),
            ));
        }
        if !self.allow_privileged_ports {
            if let Some(p) = publish
                .iter()
                .find(|p| p.host.port() != 0 && p.host.port() < 1024)
            {
                return Err(ApiError(
                    403,
                    format!(
                        "host port {} is privileged (below 1024): this shim refuses them \
                         (serve --allow-privileged-ports)",
                        p.host.port()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The one name check of every path that creates an instance (run,
/// restore, incoming migration, standby registration): names become file
/// names, so letters, digits, `-`, `_` and `.`, not starting with `.`, at
/// most [`MAX_NAME`] bytes.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        return Ok(());
    }
    Err(ApiError(
        400,
        format!(
            "{:?} is not an instance name: 1 to {MAX_NAME} letters, digits, '-', '_' or '.', \
             not starting with '.'",
            name.escape_debug().to_string()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_plain_file_name() {
        for good in ["kv", "web-1", "a_b.c", "A9"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(MAX_NAME + 1);
        for bad in ["", "a/b", "..", ".hidden", "a\0b", "a b", "é", &long] {
            assert_eq!(check_name(bad).err().map(|e| e.0), Some(400), "{bad:?}");
        }
    }

    #[test]
    fn quotas_name_their_flags() {
        let l = Limits {
            max_instances: 2,
            max_guest_memory: 1 << 30,
            max_publish: 1,
            ..Limits::default()
        };
        assert!(l.admit(1, 512 << 20, 512 << 20).is_ok());
        assert!(l
            .admit(2, 0, 2 << 20)
            .unwrap_err()
            .1
            .contains("--max-instances"));
        assert!(l
            .admit(1, 768 << 20, 512 << 20)
            .unwrap_err()
            .1
            .contains("--max-guest-memory"));
        let p = |s| vmm::config::parse_publish(s).unwrap();
        assert!(l.check_publish(&[p("8080:80")]).is_ok());
        let two = [p("8080:80"), p("8081:81")];
        assert!(l
            .check_publish(&two)
            .unwrap_err()
            .1
            .contains("--max-publish"));
        let err = l.check_publish(&[p("80:80")]).unwrap_err();
        assert_eq!(err.0, 403);
        assert!(err.1.contains("--allow-privileged-ports"));
    }
}
