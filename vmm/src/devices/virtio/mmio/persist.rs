//! The virtio-mmio transport's saved state: its registers and each queue
//! (virtio-queue's `QueueState` has no serde, so it is mirrored here). The
//! device behind the transport saves its own state; restoring takes the
//! already restored device.

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::MmioTransport;
use crate::devices::virtio::VirtioDevice;
use crate::persist::Persist;

/// The register file of one virtio-mmio window and its queues (the device
/// behind it saves its own state).
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

/// Both conversions between [`QueueState`] and `virtio_queue::QueueState`,
/// from one list of their fields (a field missing from the list is a
/// compile error: both are struct literals).
macro_rules! mirror_queue_state {
    ($($field:ident),+ $(,)?) => {
        impl From<virtio_queue::QueueState> for QueueState {
            fn from(q: virtio_queue::QueueState) -> Self {
                Self { $($field: q.$field),+ }
            }
        }

        impl From<QueueState> for virtio_queue::QueueState {
            fn from(q: QueueState) -> Self {
                Self { $($field: q.$field),+ }
            }
        }
    };
}

mirror_queue_state!(
    max_size,
    next_avail,
    next_used,
    event_idx_enabled,
    size,
    ready,
    desc_table,
    avail_ring,
    used_ring,
);

/// Why a saved transport does not fit the window and device it is
/// restored into.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportPersistError {
    #[error(
        "the snapshot has device type {saved_type} at {saved_base:#x}, this VM {name} at {base:#x}"
    )]
    Mismatch {
        saved_type: u32,
        saved_base: u64,
        name: &'static str,
        base: u64,
    },
    #[error("{name}: the snapshot has {saved} queues, the device {here}")]
    QueueCount {
        name: &'static str,
        saved: usize,
        here: usize,
    },
    #[error("{name}: queue {index} has max size {saved} in the snapshot, {here} here")]
    QueueMaxSize {
        name: &'static str,
        index: usize,
        saved: u16,
        here: u16,
    },
    #[error("{name}: queue {index}: {detail}")]
    Queue {
        name: &'static str,
        index: usize,
        detail: String,
    },
}

/// What a restored transport is given: its window and its device (already
/// restored).
pub struct TransportArgs {
    pub base: u64,
    pub size: u64,
    pub device: Box<dyn VirtioDevice>,
}

impl Persist for MmioTransport {
    type State = TransportState;
    type ConstructorArgs = TransportArgs;
    type Error = TransportPersistError;

    fn save(&self) -> TransportState {
        TransportState {
            base: self.base,
            device_type: self.device.device_type(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            active: self.active,
            errors: self.errors,
            addrs: self.addrs.clone(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// The device is not activated again: its rings are already set up in
    /// the restored guest memory.
    fn restore(args: TransportArgs, state: &TransportState) -> Result<Self, Self::Error> {
        let name = args.device.name();
        if state.base != args.base || state.device_type != args.device.device_type() {
            return Err(TransportPersistError::Mismatch {
                saved_type: state.device_type,
                saved_base: state.base,
                name,
                base: args.base,
            });
        }
        let max_sizes = args.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() || state.addrs.len() != max_sizes.len() {
            return Err(TransportPersistError::QueueCount {
                name,
                saved: state.queues.len(),
                here: max_sizes.len(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (q, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != max {
                return Err(TransportPersistError::QueueMaxSize {
                    name,
                    index,
                    saved: q.max_size,
                    here: max,
                });
            }
            let queue = Queue::try_from(virtio_queue::QueueState::from(*q)).map_err(|e| {
                TransportPersistError::Queue {
                    name,
                    index,
                    detail: e.to_string(),
                }
            })?;
            queues.push(queue);
        }
        let mut transport = MmioTransport::new(args.base, args.size, args.device);
        transport.queues = queues;
        transport.addrs = state.addrs.clone();
        transport.queue_sel = state.queue_sel;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = state.driver_features;
        transport.status = state.status;
        transport.interrupt_status = state.interrupt_status;
        transport.config_generation = state.config_generation;
        transport.active = state.active;
        transport.errors = state.errors;
        Ok(transport)
    }
}
