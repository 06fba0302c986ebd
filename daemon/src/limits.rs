//! What a daemon lets its callers take: API connections, request bodies
//! and their deadlines, instances, guest memory, published ports, and the
//! names instances may have. Set by `serve` flags (shown in
//! `serve --help`), reported in `GET /v1/info`; every refusal names the
//! limit and the flag that sets it.
//!
//! And what the host lets the daemon take ([`HostLimits`]): the kernel's
//! thread and process id counts (`kernel.threads-max`, `kernel.pid_max`),
//! memory mappings per process (`vm.max_map_count`) and the open files
//! limit. `serve` warns at start when they cannot hold `--max-instances`
//! (naming the setting and the value needed), and a run that would pass
//! one is refused with a 503 naming it, before anything is set up.

use std::sync::atomic::{AtomicU64, Ordering};

use super::ApiError;
use hostnet::PublishSpec;

/// Longest instance name.
pub const MAX_NAME: usize = 64;

pub use api::limits::*;

/// Threads an instance adds to the host (its vCPU's, and one of the
/// daemon's for it at times: 2 measured with 1,000 instances)...
pub const THREADS_PER_INSTANCE: u64 = 2;
/// ... besides these, for the daemon's own and its API connections, and
/// for the rest of the host to start a process or two.
pub const THREADS_RESERVED: u64 = 256;
/// Memory mappings an instance adds to its daemon (its guest RAM, its
/// vCPU's shared page, its thread's stack, signal stack and their guard
/// pages: 5 measured), with room...
pub const MAPS_PER_INSTANCE: u64 = 8;
/// ... besides these, for the daemon's own (about 170 at start).
pub const MAPS_RESERVED: u64 = 1024;

/// The host's limits that cap how many instances one daemon can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLimits {
    /// `kernel.threads-max`: threads on the host.
    pub threads_max: u64,
    /// `kernel.pid_max`: every thread takes a process id.
    pub pid_max: u64,
    /// `vm.max_map_count`: memory mappings per process.
    pub max_map_count: u64,
    /// The daemon's open files limit (`RLIMIT_NOFILE`).
    pub open_files: u64,
}

/// What the host holds now, against [`HostLimits`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostUse {
    /// Threads on the whole host.
    pub threads: u64,
    /// The daemon's memory mappings.
    pub maps: u64,
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Threads on the host now (the fourth field of `/proc/loadavg`,
/// `running/total`).
pub fn host_threads() -> Option<u64> {
    let loadavg = std::fs::read_to_string("/proc/loadavg").ok()?;
    let field = loadavg.split_whitespace().nth(3)?;
    field.split_once('/')?.1.parse().ok()
}

/// The daemon's memory mappings now (lines of `/proc/self/maps`; a few
/// ms with thousands of instances).
pub fn own_maps() -> Option<u64> {
    let maps = std::fs::read("/proc/self/maps").ok()?;
    Some(maps.iter().filter(|&&b| b == b'\n').count() as u64)
}

impl HostLimits {
    /// The host's limits now (an unreadable one counts as unlimited), with
    /// the daemon's `open_files`.
    pub fn read(open_files: u64) -> Self {
        let or_max = |path| read_u64(path).unwrap_or(u64::MAX);
        Self {
            threads_max: or_max("/proc/sys/kernel/threads-max"),
            pid_max: or_max("/proc/sys/kernel/pid_max"),
            max_map_count: or_max("/proc/sys/vm/max_map_count"),
            open_files,
        }
    }

    /// What falls short for `instances` more instances when the host
    /// holds `now`: one message per limit, naming its setting and the
    /// value it needs.
    pub fn shortfalls(&self, instances: u64, now: HostUse) -> Vec<String> {
        let threads = now.threads + instances * THREADS_PER_INSTANCE + THREADS_RESERVED;
        let maps = now.maps + instances * MAPS_PER_INSTANCE + MAPS_RESERVED;
        let fds = instances * FDS_PER_INSTANCE + FDS_RESERVED;
        let mut short = Vec::new();
        for (have, need, what, how) in [
            (
                self.threads_max,
                threads,
                "kernel.threads-max",
                "threads on the host",
            ),
            (
                self.pid_max,
                threads,
                "kernel.pid_max",
                "process ids (one per thread)",
            ),
            (
                self.max_map_count,
                maps,
                "vm.max_map_count",
                "memory mappings of the daemon",
            ),
        ] {
            if have < need {
                short.push(format!(
                    "{what} is {have}: {instances} instances need {need} {how} \
                     (sysctl -w {what}={need})"
                ));
            }
        }
        if self.open_files < fds {
            short.push(format!(
                "the open files limit (RLIMIT_NOFILE) is {}: {instances} instances need {fds} \
                 (raise the hard limit: ulimit -Hn {fds}, or LimitNOFILE={fds})",
                self.open_files
            ));
        }
        short
    }

    /// What falls short for `max_instances` on this host now, for `serve`
    /// to warn about at start.
    pub fn check_at_start(&self, max_instances: usize) -> Vec<String> {
        let now = HostUse {
            threads: host_threads().unwrap_or(0),
            maps: own_maps().unwrap_or(0),
        };
        self.shortfalls(max_instances as u64, now)
    }

    /// Refuses one more instance (503) when the host's threads, process
    /// ids or the daemon's mappings would pass their limit; `live`
    /// instances run. The mappings are counted only when `live` could be
    /// near their limit. (Open files: the daemon's own check.)
    pub fn admit_one(&self, live: u64) -> Result<(), ApiError> {
        let maps_near = 2 * ((live + 1) * MAPS_PER_INSTANCE + MAPS_RESERVED) >= self.max_map_count;
        let now = HostUse {
            threads: host_threads().unwrap_or(0),
            maps: if maps_near {
                own_maps().unwrap_or(0)
            } else {
                0
            },
        };
        let room = Self {
            open_files: u64::MAX,
            ..*self
        };
        match room.shortfalls(1, now).into_iter().next() {
            None => Ok(()),
            Some(why) => Err(ApiError(
                503,
                format!("the host has no room for another instance: {why}"),
            )),
        }
    }
}

/// The daemon's check of its open files before a run. Counting
/// `/proc/self/fd` costs milliseconds with thousands open (it made each
/// launch past about 1,200 instances 20–30 ms slower), so it is counted
/// only when `live` instances could be near the limit, and a count that
/// left room for N more instances is trusted for the next N / 2 runs.
#[derive(Debug, Default)]
pub struct FdGauge {
    /// Live instances at which the fds are counted again.
    recount_at: AtomicU64,
}

impl FdGauge {
    /// Refuses (503) an instance the daemon's `max` file descriptors would
    /// not cover (its fds and those the API and migrations need), `live`
    /// instances running. Callers serialise (the instances' lock).
    pub fn admit_one(&self, live: u64, max: u64) -> Result<(), ApiError> {
        if 2 * ((live + 1) * FDS_PER_INSTANCE + FDS_RESERVED) < max
            || live < self.recount_at.load(Ordering::Relaxed)
        {
            return Ok(());
        }
        let open = shim_util::sys::open_fds()
            .map_err(|e| ApiError(503, format!("cannot count this daemon's open files: {e}")))?
            as u64;
        let left = max.saturating_sub(open + FDS_RESERVED) / FDS_PER_INSTANCE;
        self.recount_at.store(live + left / 2, Ordering::Relaxed);
        if left == 0 {
            return Err(ApiError(
                503,
                format!(
                    "this shim has {open} of its {max} file descriptors open: another \
                     instance would leave too few (raise the hard RLIMIT_NOFILE of the daemon, \
                     e.g. LimitNOFILE= or ulimit -Hn)"
                ),
            ));
        }
        Ok(())
    }
}

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
    fn host_limits_short_for_the_instances_asked_are_named_with_the_value_needed() {
        let roomy = HostLimits {
            threads_max: 190_000,
            pid_max: 32_768,
            max_map_count: 65_530,
            open_files: 20_000,
        };
        let now = HostUse {
            threads: 450,
            maps: 170,
        };
        assert_eq!(roomy.shortfalls(2000, now), Vec::<String>::new());
        let short = roomy.shortfalls(17_000, now);
        assert_eq!(short.len(), 3, "{short:?}");
        assert!(short[0].contains("kernel.pid_max is 32768"), "{short:?}");
        assert!(
            short[0].contains("sysctl -w kernel.pid_max=34706"),
            "{short:?}"
        );
        assert!(short[1].contains("vm.max_map_count"), "{short:?}");
        assert!(short[2].contains("RLIMIT_NOFILE"), "{short:?}");
        assert!(short[2].contains("136256"), "{short:?}");
        let tight = HostLimits {
            threads_max: 500,
            ..roomy
        };
        let short = tight.shortfalls(100, now);
        assert_eq!(short.len(), 1, "{short:?}");
        assert!(short[0].contains("kernel.threads-max is 500"), "{short:?}");
    }

    #[test]
    fn a_run_past_the_hosts_threads_is_refused_with_a_503() {
        let threads = host_threads().expect("/proc/loadavg");
        let maps = own_maps().expect("/proc/self/maps");
        assert!(maps > 0);
        let roomy = HostLimits::read(1 << 20);
        assert!(roomy.admit_one(0).is_ok());
        // A threads-max the host is already at.
        let full = HostLimits {
            threads_max: threads,
            ..roomy
        };
        let err = full.admit_one(0).unwrap_err();
        assert_eq!(err.0, 503);
        assert!(err.1.contains("kernel.threads-max"), "{}", err.1);
        // A map count the daemon would pass.
        let few_maps = HostLimits {
            max_map_count: maps + MAPS_RESERVED,
            ..roomy
        };
        let err = few_maps.admit_one(10).unwrap_err();
        assert!(err.1.contains("vm.max_map_count"), "{}", err.1);
    }

    #[test]
    fn open_files_are_counted_only_near_the_limit_and_then_every_other_run() {
        let gauge = FdGauge::default();
        let open = shim_util::sys::open_fds().unwrap() as u64;
        // Far from the limit: not counted, whatever.
        assert!(gauge.admit_one(10, 1 << 20).is_ok());
        assert_eq!(gauge.recount_at.load(Ordering::Relaxed), 0);
        // Room for 100 more: counted, then trusted for 50 runs (other
        // tests of this process may hold a few fds meanwhile).
        let max = open + FDS_RESERVED + 100 * FDS_PER_INSTANCE;
        assert!(gauge.admit_one(100, max).is_ok());
        let next = gauge.recount_at.load(Ordering::Relaxed);
        assert!((140..=150).contains(&next), "{next}");
        // No room: refused, and counted again on the next run.
        let full = open + FDS_RESERVED;
        let err = FdGauge::default().admit_one(1, full).unwrap_err();
        assert_eq!(err.0, 503);
        assert!(err.1.contains("file descriptors"), "{}", err.1);
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
