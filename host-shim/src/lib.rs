//! The host shim: a small KVM monitor for libcloud unikernel images.
//!
//! `run` takes a [`RunConfig`] (image, memory, backend, timeout, guest
//! command line) and returns how the guest ended ([`GuestExit`]), whose
//! [`GuestExit::status`] is the shim's exit status. Layout follows
//! Firecracker: `vstate` (KVM VM, memory, vCPU), `boot` (image loading and
//! boot-time state), `devices` (what the guest talks to: the hypercall
//! doorbell, virtio-mmio devices), `net` (the virtual switch, user-mode
//! gateway and TAP backend behind virtio-net), `backend` (KVM, QEMU or
//! Firecracker),
//! `security` (host identities, TLS, overlay sealing).

pub mod backend;
pub mod boot;
pub mod checkpoint;
pub mod config;
pub mod console;
pub mod daemon;
pub mod devices;
pub mod error;
pub mod files;
pub mod limit;
pub mod machine;
pub mod migration;
pub mod net;
pub mod outcome;
pub mod security;
pub mod snapshot;
mod sys;
pub mod vstate;

#[cfg(any(test, feature = "testutil"))]
#[doc(hidden)]
pub mod testutil;

pub use config::{Backend, QemuAccel, RunConfig};
pub use error::Error;
pub use outcome::GuestExit;

/// Runs the guest described by `config` with its console on our stdout.
pub fn run(config: &RunConfig) -> Result<GuestExit, Error> {
    match config.backend {
        Backend::Kvm => backend::kvm::run(config, std::io::stdout()),
        Backend::Qemu => backend::qemu::run(config),
        Backend::Firecracker => backend::firecracker::run(config),
    }
}
