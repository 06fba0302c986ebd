//! The saved state of a guest, as plain serde structs (postcard-encoded in
//! snapshots and migration streams).
//!
//! - [`GuestSpec`]: what the guest is (image identity, command line,
//!   memory size, network card, CPUID template, name, location).
//! - [`MachineState`]: the whole guest but its memory (which travels as
//!   pages): the spec and the states its parts save themselves, each
//!   defined beside its part — the vCPU's ([`VcpuState`], in
//!   `vstate::vcpu`), the VM clock ([`ClockState`], in `vstate::vm`) and
//!   the devices' ([`DeviceStates`], in `devices::persist`).

use std::net::Ipv4Addr;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use crate::devices::persist::DeviceStates;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::ClockState;

/// The guest's network card and addresses, as the shim configured them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl From<hostnet::Nic> for NicSpec {
    fn from(n: hostnet::Nic) -> Self {
        Self {
            mac: n.mac,
            ip: n.ip,
            prefix: n.prefix,
            gateway: n.gateway,
        }
    }
}

impl From<NicSpec> for hostnet::Nic {
    fn from(n: NicSpec) -> Self {
        Self {
            mac: n.mac,
            ip: n.ip,
            prefix: n.prefix,
            gateway: n.gateway,
        }
    }
}

/// Which image the guest was booted from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageId {
    /// The path it was booted from (on the first host).
    pub path: String,
    pub size: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// What the guest is: everything needed to recreate its VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestSpec {
    /// The instance name (daemon) or the image stem (`run`).
    pub name: String,
    pub image: ImageId,
    /// The boot command line (without NUL).
    pub cmdline: String,
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// Whether the shim programmed kvmclock.
    pub kvmclock: bool,
    /// The network card, if the guest has one.
    pub nic: Option<NicSpec>,
    /// The CPUID the guest runs with (its template).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Environment and arguments as given (for `list`).
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    /// How many times the guest has moved (`BootInfo::generation`).
    pub generation: u64,
}

/// Everything about a paused guest except its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub spec: GuestSpec,
    pub vcpu: VcpuState,
    pub clock: ClockState,
    pub devices: DeviceStates,
}
