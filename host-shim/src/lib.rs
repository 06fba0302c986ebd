//! The host shim's control plane: the daemon (`host-shim serve`: the
//! JSON/HTTP(S) API, instances, standby, logs), live migration between
//! daemons, host identities and TLS (`security`), the fleet CLI and the
//! placement controller (`schedule`). The VMM is the `vmm` crate and host
//! networking the `hostnet` crate; this crate drives them.

pub mod daemon;
pub mod fleet;
pub mod migration;
pub mod schedule;
pub mod security;
