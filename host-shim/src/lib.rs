//! The host shim's daemon: `host-shim serve` (the JSON/HTTP(S) API,
//! instances, standby, logs), live migration between daemons and host
//! identities (`security`). The VMM is the `vmm` crate, host networking the
//! `hostnet` crate, the API types and client the `api` crate and the fleet
//! store and placement controller the `fleet` crate; this crate drives them.

pub mod daemon;
pub mod migration;
pub mod security;
