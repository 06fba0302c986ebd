//! The virtio-net device's saved state: its MAC, which queues the guest
//! broke, and the frames that had reached the guest's switch port but not
//! yet its receive buffers (they go with the guest).

use std::sync::Arc;

use hostnet::port::GuestPort;
use serde::{Deserialize, Serialize};

use super::{fmt_mac, Net};
use crate::persist::Persist;

/// A virtio-net device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub halted: [bool; 2],
    /// Frames that had reached the guest's port but not its buffers.
    pub pending_rx: Vec<Vec<u8>>,
}

/// Why a saved card does not fit the port it is restored on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetPersistError {
    #[error(
        "the saved card has MAC {}, this one {}",
        fmt_mac(saved),
        fmt_mac(here)
    )]
    Mac { saved: [u8; 6], here: [u8; 6] },
}

/// What a restored card is given: its switch port (with the guest's MAC).
pub struct NetArgs {
    pub port: Arc<GuestPort>,
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetArgs;
    type Error = NetPersistError;

    fn save(&self) -> NetState {
        // Frames queued for the guest go with it (copied: if a migration
        // fails, the guest resumes here and still gets them).
        NetState {
            mac: self.mac,
            halted: self.halted,
            pending_rx: self.port.received().iter().cloned().collect(),
        }
    }

    fn restore(args: NetArgs, state: &NetState) -> Result<Self, NetPersistError> {
        let mut net = Net::new(args.port);
        if state.mac != net.mac {
            return Err(NetPersistError::Mac {
                saved: state.mac,
                here: net.mac,
            });
        }
        net.halted = state.halted;
        let mut frames = state.pending_rx.clone();
        net.port.deliver(&mut frames);
        Ok(net)
    }
}
