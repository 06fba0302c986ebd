//! The overlay between shims (VXLAN over UDP).

use std::net::SocketAddr;

/// How a shim joins the overlay.
#[derive(Clone, Debug)]
pub struct OverlayConfig {
    /// The local UDP address.
    pub listen: SocketAddr,
    /// Peers known from the start.
    pub peers: Vec<SocketAddr>,
    /// The VXLAN network identifier.
    pub vni: u32,
}
