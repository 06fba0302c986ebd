//! The saved state of all the guest's devices, each kind in its own list
//! with its transport's registers, and the machine's devices rebuilt from
//! it. Each device saves and restores itself ([`crate::persist::Persist`],
//! in a `persist.rs` beside it); this module only gathers them.

use std::sync::Arc;

use hostnet::port::GuestPort;
use serde::{Deserialize, Serialize};

use super::virtio::mmio::persist::{TransportArgs, TransportPersistError, TransportState};
use super::virtio::net::persist::{NetArgs, NetPersistError, NetState};
use super::virtio::net::Net;
use super::virtio::{window_base, MmioTransport};
use crate::persist::Persist;

/// Every device of a guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// The network cards (at most one today), in window order.
    pub net: Vec<ConnectedNetState>,
}

/// A network card and the virtio-mmio window it sits in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectedNetState {
    pub transport: TransportState,
    pub device: NetState,
}

/// Why the saved devices do not fit what the restore gives them.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DevicePersistError {
    #[error("the saved guest has {saved} network cards, the restore gives it {given}")]
    NetCount { saved: usize, given: usize },
    #[error(transparent)]
    Net(#[from] NetPersistError),
    #[error(transparent)]
    Transport(#[from] TransportPersistError),
}

impl DeviceStates {
    /// The state of `devices` (the guest is paused).
    pub fn save(devices: &[MmioTransport]) -> Self {
        let mut states = Self::default();
        for transport in devices {
            match transport.device().as_any().downcast_ref::<Net>() {
                Some(net) => states.net.push(ConnectedNetState {
                    transport: transport.save(),
                    device: net.save(),
                }),
                // Every device the VMM creates has a case above.
                None => tracing::error!(
                    device = transport.device().name(),
                    "a device without saved state"
                ),
            }
        }
        states
    }

    /// The devices rebuilt, the network card on `port` (which must have the
    /// guest's MAC), in the windows they were saved in.
    pub fn restore(
        &self,
        port: Option<Arc<GuestPort>>,
    ) -> Result<Vec<MmioTransport>, DevicePersistError> {
        let given = usize::from(port.is_some());
        if self.net.len() != given {
            return Err(DevicePersistError::NetCount {
                saved: self.net.len(),
                given,
            });
        }
        let mut devices = Vec::with_capacity(self.net.len());
        for (index, (saved, port)) in self.net.iter().zip(port).enumerate() {
            let net = Net::restore(NetArgs { port }, &saved.device)?;
            let args = TransportArgs {
                base: window_base(index as u64),
                size: abi::layout::VIRTIO_MMIO_SIZE,
                device: Box::new(net),
            };
            devices.push(MmioTransport::restore(args, &saved.transport)?);
        }
        Ok(devices)
    }
}
