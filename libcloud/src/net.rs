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

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec;
use core::cell::{Cell, RefCell};
use core::future::{poll_fn, Future};
use core::pin::pin;
use core::task::{Poll, Waker};

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

/// Sockets kept listening per served port: a connection request takes
/// one, and the worker that owns it hands the turn to the next idle worker.
/// Each idle listener costs every poll of the stack a walk over it (about
/// 3.5 ns), so they are few; a burst of connection requests still finds one
/// each, since the stack takes at most [`net::SYNS_PER_POLL`] SYNs per poll
/// and the hand-over takes two executor rounds (the runner's next poll
/// comes in the next round, after the listeners' workers ran).
///
/// [`net::SYNS_PER_POLL`]: ::net::SYNS_PER_POLL
pub const LISTENERS: usize = 2 * ::net::SYNS_PER_POLL + 2;

/// Serves TCP `port` with up to `max_connections` connections at once: each
/// is handed to `handler`, then closed. Runs in background tasks: one
/// worker per connection, of which at most [`LISTENERS`] listen at a time.
/// Returns the port's [`Listeners`] (apps may report how many listen).
pub fn serve_tcp<F>(
    stack: Stack<'static>,
    port: u16,
    max_connections: usize,
    handler: F,
) -> Rc<Listeners>
where
    F: AsyncFn(&mut TcpSocket<'_>) + Clone + 'static,
{
    let listeners = Rc::new(Listeners {
        limit: LISTENERS.min(max_connections),
        listening: Cell::new(0),
        waiting: RefCell::new(VecDeque::with_capacity(max_connections)),
    });
    // The workers' buffers, both directions of all of them, in one block
    // that lives as long as the workers (forever): the heap touches a page
    // at each block's edge, and idle workers should cost none.
    let buffers = vec![0u8; 2 * BUFFER_SIZE * max_connections].leak();
    for buffers in buffers.chunks_exact_mut(2 * BUFFER_SIZE) {
        let handler = handler.clone();
        let listeners = listeners.clone();
        kernel::task::spawn(async move {
            let (rx, tx) = buffers.split_at_mut(BUFFER_SIZE);
            loop {
                let turn = listeners.turn().await;
                let mut socket = TcpSocket::new(stack, &mut *rx, &mut *tx);
                if !accept(&mut socket, port, turn).await {
                    continue;
                }
                handler(&mut socket).await;
                socket.close();
                let _ = socket.flush().await;
            }
        });
    }
    listeners
}

/// The listening sockets of a port served by [`serve_tcp`].
pub struct Listeners {
    /// At most this many listen at once.
    limit: usize,
    /// Sockets listening now.
    listening: Cell<usize>,
    /// Workers waiting for their turn to listen, first come first served
    /// (at most one entry per worker).
    waiting: RefCell<VecDeque<Waker>>,
}

impl Listeners {
    /// Sockets listening on the port now (at most [`LISTENERS`]).
    pub fn listening(&self) -> usize {
        self.listening.get()
    }

    /// Waits until fewer than `limit` sockets listen, and takes a turn.
    async fn turn(&self) -> Turn<'_> {
        poll_fn(|cx| {
            let mut waiting = self.waiting.borrow_mut();
            if self.listening.get() < self.limit {
                self.listening.set(self.listening.get() + 1);
                // Woken by something else than a hand-over, the worker may
                // still be queued: a hand-over to it would be lost.
                waiting.retain(|w| !w.will_wake(cx.waker()));
                return Poll::Ready(Turn(self));
            }
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push_back(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// A worker's turn to listen: ended (and handed to the next waiting
/// worker) once its socket has left the listening state.
struct Turn<'a>(&'a Listeners);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let listeners = self.0;
        listeners.listening.set(listeners.listening.get() - 1);
        if let Some(next) = listeners.waiting.borrow_mut().pop_front() {
            next.wake();
        }
    }
}

/// Listens on `port` with `socket`, ends `turn` as soon as a connection
/// request takes it, and waits until the connection is established: false
/// if it could not listen or the peer reset the connection first.
async fn accept(socket: &mut TcpSocket<'_>, port: u16, turn: Turn<'_>) -> bool {
    // embassy-net's `accept` listens on its first poll, then waits for the
    // whole handshake; its first poll is all that is wanted here.
    let listen = poll_fn(|cx| Poll::Ready(pin!(socket.accept(port)).poll(cx))).await;
    if let Poll::Ready(Err(e)) = listen {
        log::warn!("listen on port {port}: {e:?}");
        return false;
    }
    wait_while(socket, |state| state == tcp::State::Listen).await;
    drop(turn);
    wait_while(socket, |state| {
        matches!(state, tcp::State::SynReceived | tcp::State::SynSent)
    })
    .await;
    // A reset during the handshake puts the socket back to listening.
    !matches!(socket.state(), tcp::State::Listen | tcp::State::Closed)
}

/// Waits while `socket`'s state is one that `waiting` holds to.
async fn wait_while(socket: &TcpSocket<'_>, waiting: impl Fn(tcp::State) -> bool) {
    poll_fn(|cx| {
        if !waiting(socket.state()) {
            return Poll::Ready(());
        }
        // smoltcp wakes the socket's send waker on every change of state;
        // until the connection is established it cannot send, so this only
        // registers the waker.
        let _ = pin!(socket.wait_write_ready()).poll(cx);
        Poll::Pending
    })
    .await
}
