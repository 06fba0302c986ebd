//! Why the guest network could not be set up.

use std::io;

/// Errors setting up the guest network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "cannot publish {addr}/{proto}: the address is already in use (another program \
         listens there: pick another host port)"
    )]
    PortInUse {
        addr: std::net::SocketAddr,
        proto: crate::Proto,
    },
    #[error("cannot publish {addr}/{proto}: {err}")]
    Bind {
        addr: std::net::SocketAddr,
        proto: crate::Proto,
        err: io::Error,
    },
    #[error("TAP device {name}: {detail}")]
    Tap { name: String, detail: String },
    #[error("cannot set up the network: {0}")]
    Setup(String),
}
