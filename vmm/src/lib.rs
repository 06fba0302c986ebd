//! The VMM: boots a libcloud unikernel image in ring 3 under KVM and runs it
//! until it exits, with the guest as a hostile party. This crate is the
//! security boundary against the guest: everything the guest can reach
//! (its memory, registers, hypercalls, virtio queues) is decoded here, and
//! nothing here speaks HTTP, TLS, JSON or the fleet's protocols.
//!
//! [`run`] takes a [`RunConfig`] (image, memory, backend, timeout, guest
//! command line) and returns how the guest ended ([`GuestExit`]), whose
//! [`GuestExit::status`] is the shim's exit status. Layout follows
//! Firecracker: `vstate` (KVM VM, memory, vCPU), `boot` (image loading and
//! boot-time state), `devices` (what the guest talks to: the hypercall
//! doorbell, virtio-mmio devices; each device saves and restores its own
//! state through [`persist::Persist`]), `machine` (a booted guest: pause,
//! capture, restore), `snapshot` (the snapshot file format and the
//! [`snapshot::state::MachineState`] aggregate), `checkpoint` (the
//! host-side chain of app checkpoints), `console` and `backend` (KVM, QEMU
//! or Firecracker). Host networking is the `hostnet` crate's.

pub mod backend;
pub mod boot;
pub mod checkpoint;
pub mod config;
pub mod console;
pub mod devices;
pub mod error;
pub mod machine;
pub mod outcome;
pub mod persist;
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
