//! Networking for apps: async TCP and UDP sockets over the guest's own
//! TCP/IP stack (the `net` crate: virtio-net + embassy-net/smoltcp).
//!
//! ```ignore
//! #[libcloud::main]
//! async fn main() -> Result<(), libcloud::net::Error> {
//!     let stack = libcloud::net::start().await?;
//!     libcloud::net::serve_tcp(stack, 80, 16, async |socket| { /* read, write */ });
//!     core::future::pending().await
//! }
//! ```
//!
//! Sockets implement `embedded_io_async::{Read, Write}`.

use alloc::vec;

pub use ::net::embassy_net::{
    icmp,
    tcp::{self, TcpSocket},
    udp::{self, PacketMetadata, UdpSocket},
    IpAddress, IpEndpoint, Ipv4Address, Stack,
};
pub use ::net::Error;
pub use embedded_io_async::{Read, Write};

/// Default socket buffer size, per direction.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Brings up the network (the first virtio-net device) and waits until the
/// interface has an address.
pub async fn start() -> Result<Stack<'static>, Error> {
    let stack = ::net::start()?;
    stack.wait_config_up().await;
    if let Some(config) = stack.config_v4() {
        log::info!("network up: {}", config.address);
        ::net::device::set_address(config.address.address().octets());
    }
    Ok(stack)
}

/// Serves TCP `port` with up to `max_connections` connections at once: each
/// is handed to `handler`, then closed. Runs in background tasks.
pub fn serve_tcp<F>(stack: Stack<'static>, port: u16, max_connections: usize, handler: F)
where
    F: AsyncFn(&mut TcpSocket<'_>) + Clone + 'static,
{
    // The listeners' buffers, both directions of all of them, in one block
    // that lives as long as the listeners (forever): the heap touches a page
    // at each block's edge, and idle listeners should cost none.
    let buffers = vec![0u8; 2 * BUFFER_SIZE * max_connections].leak();
    for buffers in buffers.chunks_exact_mut(2 * BUFFER_SIZE) {
        let handler = handler.clone();
        kernel::task::spawn(async move {
            let (rx, tx) = buffers.split_at_mut(BUFFER_SIZE);
            loop {
                let mut socket = TcpSocket::new(stack, &mut *rx, &mut *tx);
                if let Err(e) = socket.accept(port).await {
                    log::warn!("accept on port {port}: {e:?}");
                    continue;
                }
                handler(&mut socket).await;
                socket.close();
                let _ = socket.flush().await;
            }
        });
    }
}
