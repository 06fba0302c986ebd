//! What a run is asked to do: [`RunConfig`] and the parsers of the values
//! that arrive as command-line flags (memory size, timeout, `KEY=VALUE`).
//!
//! The parsers return plain `String` errors so clap can show them next to
//! the flag that carried them.

use std::path::PathBuf;
use std::time::Duration;

use abi::layout::{LARGE_PAGE_SIZE, MAX_MEM_SIZE, MIN_MEM_SIZE};

const MIB: u64 = 1 << 20;

/// Which monitor boots the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Our own KVM monitor: the guest starts directly in 64-bit ring 3.
    Kvm,
    /// QEMU microvm, booting the image's PVH entry.
    Qemu,
}

/// QEMU's accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QemuAccel {
    /// Pure emulation (`-accel tcg -cpu max`).
    Tcg,
    /// Hardware virtualization (`-accel kvm -cpu host,-arch-capabilities`).
    Kvm,
}

/// Everything a backend needs to run one guest.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub image: PathBuf,
    /// Bytes of guest RAM; a valid size (see [`parse_mem_size`]).
    pub mem_size: u64,
    pub backend: Backend,
    /// Stop the guest after this long (exit status 124).
    pub timeout: Option<Duration>,
    /// The guest command line, without its NUL (see [`crate::boot::cmdline`]).
    pub cmdline: String,
    pub qemu_accel: QemuAccel,
    /// The KVM device node (`/dev/kvm`).
    pub kvm_device: PathBuf,
}

/// Parses a guest memory size: a byte count with an optional binary suffix
/// (`K`, `M`, `G`, optionally followed by `iB` or `B`, any case), e.g. `64M`,
/// `1G`, `33554432`. The result is a multiple of 2 MiB within
/// [`MIN_MEM_SIZE`, `MAX_MEM_SIZE`].
pub fn parse_mem_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "'{s}' is not a size: expected a number with an optional K, M or G suffix (e.g. 64M)"
        ));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size suffix '{other}': use K, M or G")),
    };
    let value: u64 = digits.parse().map_err(|_| format!("'{s}' is too large"))?;
    let bytes = value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    check_mem_size(bytes)?;
    Ok(bytes)
}

/// Checks that `bytes` is a guest memory size the layout allows.
pub fn check_mem_size(bytes: u64) -> Result<(), String> {
    if !bytes.is_multiple_of(LARGE_PAGE_SIZE) {
        return Err(format!(
            "{bytes} bytes is not a multiple of 2 MiB (guest RAM is mapped with 2 MiB pages)"
        ));
    }
    if bytes < MIN_MEM_SIZE {
        return Err(format!(
            "{} MiB is too small: the minimum is {} MiB",
            bytes / MIB,
            MIN_MEM_SIZE / MIB
        ));
    }
    if bytes > MAX_MEM_SIZE {
        return Err(format!(
            "{} MiB is too large: the maximum is {} MiB (RAM must end below the device window)",
            bytes / MIB,
            MAX_MEM_SIZE / MIB
        ));
    }
    Ok(())
}

/// Parses a timeout in seconds; fractions are fine (`0.5`).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("the timeout must be more than 0 s, not '{s}'"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("'{s}': {e}"))
}

/// Parses one `KEY=VALUE` environment entry. The key must be non-empty.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, _)) if key.starts_with("lc.") || key == abi::cmdline::VIRTIO_MMIO_KEY => {
            Err(format!(
                "'{key}' is reserved for the shim: lc.* keys and {} are not environment",
                abi::cmdline::VIRTIO_MMIO_KEY
            ))
        }
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        Some(_) => Err(format!("'{s}' has an empty key: expected KEY=VALUE")),
        None => Err(format!("'{s}' has no '=': expected KEY=VALUE")),
    }
}

/// This machine's host name, for `lc.host` (falls back to `localhost`).
pub fn default_host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes_with_and_without_suffixes() {
        assert_eq!(parse_mem_size("64M"), Ok(64 * MIB));
        assert_eq!(parse_mem_size("64m"), Ok(64 * MIB));
        assert_eq!(parse_mem_size("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_mem_size("1G"), Ok(1024 * MIB));
        assert_eq!(parse_mem_size("33554432"), Ok(32 * MIB));
        assert_eq!(parse_mem_size("4096K"), Ok(4 * MIB));
        assert_eq!(parse_mem_size("3G"), Ok(MAX_MEM_SIZE));
    }

    #[test]
    fn mem_sizes_out_of_the_layout_are_refused() {
        let err = parse_mem_size("3M").unwrap_err();
        assert!(err.contains("multiple of 2 MiB"), "{err}");
        let err = parse_mem_size("2M").unwrap_err();
        assert!(err.contains("too small"), "{err}");
        let err = parse_mem_size("4G").unwrap_err();
        assert!(err.contains("too large"), "{err}");
        assert!(parse_mem_size("0").is_err());
        assert!(parse_mem_size("").is_err());
        assert!(parse_mem_size("M").is_err());
        assert!(parse_mem_size("64X").unwrap_err().contains("suffix"));
        assert!(parse_mem_size("99999999999999999999").is_err());
        assert!(parse_mem_size("99999999999G").is_err());
        assert!(parse_mem_size("-64M").is_err());
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_timeout("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("NaN").is_err());
        assert!(parse_timeout("inf").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn env_entries() {
        assert_eq!(parse_env("A=b"), Ok(("A".into(), "b".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), "".into())));
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=b").is_err());
        assert!(parse_env("AB").is_err());
        assert!(parse_env("lc.host=x").unwrap_err().contains("reserved"));
        assert!(parse_env("virtio_mmio.device=1@2:3").is_err());
    }

    #[test]
    fn host_name_is_never_empty() {
        assert!(!default_host_name().is_empty());
    }
}
