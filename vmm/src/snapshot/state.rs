//! The saved state of a guest, as plain serde structs (postcard-encoded in
//! snapshots and migration streams).
//!
//! - [`VcpuState`]: KVM's vCPU state, captured in the order DESIGN.md §4
//!   prescribes (mp_state, regs, sregs, xsave, xcrs, debug registers, lapic
//!   when an irqchip exists, MSRs, vcpu_events last). kvm-bindings' `serde`
//!   feature serializes the KVM structs themselves.
//! - [`ClockState`]: the VM clock (`KVM_GET_CLOCK`).
//! - [`TransportState`], [`QueueState`], [`NetState`]: virtio-mmio
//!   registers, each queue (virtio-queue's `QueueState` has no serde, so it
//!   is mirrored here) and the network card, including frames that had
//!   arrived for the guest but were not yet in its buffers.
//! - [`GuestSpec`]: what the guest is (image identity, command line,
//!   memory size, network card, CPUID template, name, location).
//! - [`MachineState`]: all of the above but memory, which travels as pages.

use std::net::Ipv4Addr;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// vCPU 0's registers and KVM state. `None` fields are state KVM would not
/// give on the source (e.g. no lapic without an irqchip); they are not
/// restored either.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Option<Box<kvm_xsave>>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: Option<kvm_debugregs>,
    pub lapic: Option<Box<kvm_lapic_state>>,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: Option<kvm_vcpu_events>,
}

/// The VM's clock (kvmclock's base).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ClockState {
    pub clock: kvm_clock_data,
}

/// One virtqueue (mirrors `virtio_queue::QueueState`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(q: virtio_queue::QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueState> for virtio_queue::QueueState {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The register file of one virtio-mmio window and its queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub base: u64,
    pub device_type: u32,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub active: bool,
    pub errors: u32,
    /// Queue addresses as the driver wrote them: desc, avail, used.
    pub addrs: Vec<[u64; 3]>,
    pub queues: Vec<QueueState>,
    pub device: DeviceState,
}

/// The device behind a transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Net(NetState),
}

/// A virtio-net device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub halted: [bool; 2],
    /// Frames that had reached the guest's port but not its buffers.
    pub pending_rx: Vec<Vec<u8>>,
}

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
    pub devices: Vec<TransportState>,
}
