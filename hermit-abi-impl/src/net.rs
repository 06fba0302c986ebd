//! BSD sockets over the kernel's TCP/IP stack (embassy-net on smoltcp):
//! TCP over IPv4, blocking or non-blocking, with receive/send timeouts.
//!
//! A listening socket keeps a pool of smoltcp sockets listening on its port
//! (one per backlog slot, at most [`MAX_BACKLOG`]); `accept` hands out the
//! first that got a connection and puts a fresh one in its place. Closing a
//! connection sends FIN and lets a kernel task flush it for at most
//! [`CLOSE_FLUSH_NS`] before the socket is freed. A blocking call polls
//! its socket, releases it and blocks the thread, so two threads (or two
//! descriptors from `dup`) can use one socket at once. [`poll_socket`]
//! gives `poll` a socket's readiness (a listener is readable once a slot
//! holds a connection, which `accept` then takes). A non-blocking
//! `connect` answers `EINPROGRESS`; the socket turns writable when the
//! handshake ends, and `SO_ERROR` then says how.
//!
//! UDP over IPv4: a datagram socket is bound on `bind` (or, on an ephemeral
//! port, at its first `sendto`/`connect`); `sendto`/`recvfrom`, and
//! `send`/`recv` once `connect` named a peer (datagrams from others are
//! then dropped), blocking or not, with the same timeouts and `poll`.
//! A datagram longer than the buffer is truncated, as with POSIX.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ffi::c_void;
use core::future::Future;
use core::mem::ManuallyDrop;
use core::pin::{pin, Pin};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use core::task::{Context, Poll};
use hermit_abi::{errno, sockaddr, socklen_t};
use libcloud::net::{
    tcp, IpAddress, IpEndpoint, Ipv4Address, PacketMetadata, Stack, TcpSocket, UdpSocket,
};

use crate::fd::{self, fail};
use crate::sched::{self, Wait};
use crate::VcpuLocal;

/// Listening sockets per listener.
pub const MAX_BACKLOG: usize = 64;
/// smoltcp sockets this layer holds at once (the stack has room for
/// `net::MAX_SOCKETS`, a few of which the stack itself uses).
pub const MAX_TCP_SOCKETS: usize = net::MAX_SOCKETS - 8;
/// Buffer size per direction and socket.
const BUFFER: usize = libcloud::net::BUFFER_SIZE;
/// Datagrams a UDP socket queues per direction.
const UDP_PACKETS: usize = 16;
/// How long a closed connection may take to deliver what it still holds.
const CLOSE_FLUSH_NS: u64 = 10_000_000_000;

static TCP_SOCKETS: AtomicUsize = AtomicUsize::new(0);
static STACK: VcpuLocal<spin::Once<Option<Stack<'static>>>> = VcpuLocal(spin::Once::new());

/// How long the first socket call waits for the network to come up (DHCP).
const NET_UP_NS: u64 = 30_000_000_000;
static NET_STARTING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// The network stack, started by the first socket call; `ENETDOWN` if it
/// has no device or did not come up in time (for good: it is started once).
fn stack() -> Result<Stack<'static>, i32> {
    if NET_STARTING.swap(true, Ordering::AcqRel) {
        // Another thread is starting it: wait for its verdict.
        while STACK.get().is_none() {
            sched::sleep_until(kernel::time::now_ns() + 1_000_000);
        }
        return STACK.get().copied().flatten().ok_or(errno::ENETDOWN);
    }
    let deadline = kernel::time::now_ns().saturating_add(NET_UP_NS);
    let stack = match sched::block_on(libcloud::net::start(), Wait::Until(Some(deadline))) {
        Some(Ok(stack)) => Some(stack),
        Some(Err(e)) => {
            log::error!("sockets unavailable: {e}");
            None
        }
        None => {
            log::error!("sockets unavailable: the network did not come up within 30 s");
            None
        }
    };
    STACK.call_once(|| stack).ok_or(errno::ENETDOWN)
}

/// Receive and send buffers of one smoltcp socket, freed on drop (after
/// the socket that borrows them: declare this field after the socket).
struct Buffers {
    rx: NonNull<[u8]>,
    tx: NonNull<[u8]>,
}

impl Buffers {
    /// New buffers and a socket on them; `ENFILE` at the socket limit.
    fn socket(stack: Stack<'static>) -> Result<(TcpSocket<'static>, Self), i32> {
        if TCP_SOCKETS.fetch_add(1, Ordering::AcqRel) >= MAX_TCP_SOCKETS {
            TCP_SOCKETS.fetch_sub(1, Ordering::AcqRel);
            log::warn!("TCP socket limit reached ({MAX_TCP_SOCKETS})");
            return Err(errno::ENFILE);
        }
        let rx = Box::leak(alloc::vec![0u8; BUFFER].into_boxed_slice());
        let tx = Box::leak(alloc::vec![0u8; BUFFER].into_boxed_slice());
        let bufs = Self {
            rx: NonNull::from(&mut *rx),
            tx: NonNull::from(&mut *tx),
        };
        Ok((TcpSocket::new(stack, rx, tx), bufs))
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: leaked from boxes in `socket`; the socket borrowing them
        // was dropped before (field order), so nothing refers to them.
        unsafe {
            drop(Box::from_raw(self.rx.as_ptr()));
            drop(Box::from_raw(self.tx.as_ptr()));
        }
        TCP_SOCKETS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connected (or connecting) TCP socket.
pub struct Conn {
    socket: ManuallyDrop<TcpSocket<'static>>,
    _bufs: Buffers,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, before the buffers it borrows.
        unsafe { ManuallyDrop::drop(&mut self.socket) }
    }
}

/// Datagram queues of one UDP socket (payload bytes and packet metadata
/// per direction), freed on drop after the socket that borrows them.
struct UdpBuffers {
    rx: NonNull<[u8]>,
    tx: NonNull<[u8]>,
    rx_meta: NonNull<[PacketMetadata]>,
    tx_meta: NonNull<[PacketMetadata]>,
}

impl UdpBuffers {
    /// New queues and a UDP socket on them; `ENFILE` at the socket limit
    /// (TCP and UDP share the stack's sockets).
    fn socket(stack: Stack<'static>) -> Result<(UdpSocket<'static>, Self), i32> {
        if TCP_SOCKETS.fetch_add(1, Ordering::AcqRel) >= MAX_TCP_SOCKETS {
            TCP_SOCKETS.fetch_sub(1, Ordering::AcqRel);
            log::warn!("socket limit reached ({MAX_TCP_SOCKETS})");
            return Err(errno::ENFILE);
        }
        let rx = Box::leak(alloc::vec![0u8; BUFFER].into_boxed_slice());
        let tx = Box::leak(alloc::vec![0u8; BUFFER].into_boxed_slice());
        let meta = || alloc::vec![PacketMetadata::EMPTY; UDP_PACKETS].into_boxed_slice();
        let rx_meta = Box::leak(meta());
        let tx_meta = Box::leak(meta());
        let bufs = Self {
            rx: NonNull::from(&mut *rx),
            tx: NonNull::from(&mut *tx),
            rx_meta: NonNull::from(&mut *rx_meta),
            tx_meta: NonNull::from(&mut *tx_meta),
        };
        Ok((UdpSocket::new(stack, rx_meta, rx, tx_meta, tx), bufs))
    }
}

impl Drop for UdpBuffers {
    fn drop(&mut self) {
        // SAFETY: leaked from boxes in `socket`; the socket borrowing them
        // was dropped before (field order), so nothing refers to them.
        unsafe {
            drop(Box::from_raw(self.rx.as_ptr()));
            drop(Box::from_raw(self.tx.as_ptr()));
            drop(Box::from_raw(self.rx_meta.as_ptr()));
            drop(Box::from_raw(self.tx_meta.as_ptr()));
        }
        TCP_SOCKETS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A bound UDP socket and the peer `connect` named, if any.
pub struct Udp {
    socket: ManuallyDrop<UdpSocket<'static>>,
    _bufs: UdpBuffers,
    peer: Option<IpEndpoint>,
}

impl Drop for Udp {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, before the buffers it borrows.
        unsafe { ManuallyDrop::drop(&mut self.socket) }
    }
}

impl Udp {
    /// A UDP socket bound to `port` (0: an ephemeral one).
    fn bind(port: u16) -> Result<Self, i32> {
        let (mut socket, bufs) = UdpBuffers::socket(stack()?)?;
        socket.bind(port).map_err(|e| {
            log::debug!("UDP bind to port {port}: {e:?}");
            errno::EADDRINUSE
        })?;
        Ok(Self {
            socket: ManuallyDrop::new(socket),
            _bufs: bufs,
            peer: None,
        })
    }
}

type Accepting = Pin<Box<dyn Future<Output = Result<TcpSocket<'static>, ()>>>>;

/// One backlog slot: a socket waiting for a connection.
struct Slot {
    accepting: Option<Accepting>,
    /// The connection (or failed attempt) `accepting` produced, until
    /// `accept` takes it.
    ready: Option<Result<TcpSocket<'static>, ()>>,
    bufs: Option<Buffers>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Before the buffers they borrow.
        self.accepting = None;
        self.ready = None;
    }
}

impl Slot {
    fn new(stack: Stack<'static>, port: u16) -> Result<Self, i32> {
        let (mut socket, bufs) = Buffers::socket(stack)?;
        let accepting: Accepting = Box::pin(async move {
            socket
                .accept(port)
                .await
                .map_err(|e| log::debug!("accept: {e:?}"))?;
            Ok(socket)
        });
        Ok(Self {
            accepting: Some(accepting),
            ready: None,
            bufs: Some(bufs),
        })
    }
}

pub struct Listener {
    port: u16,
    slots: Vec<Slot>,
}

pub enum Kind {
    /// `socket()` was called; `bind` may have named a port.
    Fresh {
        port: u16,
    },
    Listening(Listener),
    Connected(Conn),
    /// A datagram socket, unbound until `bind`, `connect` or `sendto`.
    Datagram(Option<Udp>),
}

pub struct Socket {
    kind: Kind,
    pub nonblocking: bool,
    /// A non-blocking `connect` whose outcome `SO_ERROR` has not reported.
    connecting: bool,
    nodelay: bool,
    recv_timeout: Option<u64>,
    send_timeout: Option<u64>,
}

impl Socket {
    fn wait(&self, timeout: Option<u64>) -> Wait {
        if self.nonblocking {
            Wait::Once
        } else {
            Wait::Until(timeout.map(|t| kernel::time::now_ns().saturating_add(t)))
        }
    }

    fn conn(&mut self) -> Result<&mut TcpSocket<'static>, i32> {
        match &mut self.kind {
            Kind::Connected(c) => Ok(&mut c.socket),
            _ => Err(errno::ENOTCONN),
        }
    }

    /// The datagram socket, bound on an ephemeral port if it is not yet.
    fn udp(&mut self) -> Result<&mut Udp, i32> {
        let Kind::Datagram(udp) = &mut self.kind else {
            return Err(errno::EOPNOTSUPP);
        };
        if udp.is_none() {
            *udp = Some(Udp::bind(0)?);
        }
        udp.as_mut().ok_or(errno::EIO)
    }
}

/// `sockaddr_in` (hermit layout: len, family, port BE, address) -> endpoint.
fn endpoint_from(addr: *const sockaddr, len: socklen_t) -> Result<IpEndpoint, i32> {
    if addr.is_null() || (len as usize) < 8 {
        return Err(errno::EINVAL);
    }
    // SAFETY: std passes a `sockaddr_in` of `len` >= 8 readable bytes.
    let raw = unsafe { core::slice::from_raw_parts(addr as *const u8, 8) };
    if raw[1] as i32 != hermit_abi::AF_INET {
        return Err(errno::EAFNOSUPPORT);
    }
    let port = u16::from_be_bytes([raw[2], raw[3]]);
    let ip = Ipv4Address::new(raw[4], raw[5], raw[6], raw[7]);
    Ok(IpEndpoint::new(IpAddress::Ipv4(ip), port))
}

/// Writes `ep` as a `sockaddr_in` into `addr` (if given).
fn endpoint_to(
    ep: Option<IpEndpoint>,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> Result<(), i32> {
    if addr.is_null() || len.is_null() {
        return Ok(());
    }
    let ep = ep.ok_or(errno::ENOTCONN)?;
    let IpAddress::Ipv4(ip) = ep.addr;
    let mut raw = [0u8; 16];
    raw[0] = 16;
    raw[1] = hermit_abi::AF_INET as u8;
    raw[2..4].copy_from_slice(&ep.port.to_be_bytes());
    raw[4..8].copy_from_slice(&ip.octets());
    // SAFETY: `len` is readable/writable and `addr` writable for `*len`
    // bytes (the caller's guarantee); we write at most that.
    unsafe {
        let n = (*len as usize).min(raw.len());
        core::ptr::copy_nonoverlapping(raw.as_ptr(), addr as *mut u8, n);
        *len = raw.len() as socklen_t;
    }
    Ok(())
}

#[no_mangle]
pub extern "C" fn sys_socket(domain: i32, type_: i32, _protocol: i32) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    if domain != hermit_abi::AF_INET {
        return fail(errno::EAFNOSUPPORT);
    }
    let base = type_ & !(hermit_abi::SOCK_NONBLOCK | hermit_abi::SOCK_CLOEXEC);
    let kind = match base {
        hermit_abi::SOCK_STREAM => Kind::Fresh { port: 0 },
        hermit_abi::SOCK_DGRAM => Kind::Datagram(None),
        _ => {
            log::warn!("socket type {type_}: only TCP and UDP are provided");
            return fail(errno::EPROTONOSUPPORT);
        }
    };
    let socket = Socket {
        kind,
        nonblocking: type_ & hermit_abi::SOCK_NONBLOCK != 0,
        connecting: false,
        nodelay: false,
        recv_timeout: None,
        send_timeout: None,
    };
    fd::insert(socket).unwrap_or_else(fail)
}

#[no_mangle]
pub extern "C" fn sys_bind(s: i32, name: *const sockaddr, namelen: socklen_t) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    let r = endpoint_from(name, namelen).and_then(|ep| {
        fd::with(s, |sock| match &mut sock.kind {
            Kind::Fresh { port } => {
                *port = ep.port;
                Ok(0)
            }
            Kind::Datagram(udp @ None) => {
                *udp = Some(Udp::bind(ep.port)?);
                Ok(0)
            }
            _ => Err(errno::EINVAL),
        })
    });
    r.unwrap_or_else(fail)
}

#[no_mangle]
pub extern "C" fn sys_listen(s: i32, backlog: i32) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    let r = fd::with(s, |sock| {
        let Kind::Fresh { port } = sock.kind else {
            return Err(errno::EINVAL);
        };
        if port == 0 {
            return Err(errno::EINVAL); // ephemeral listening ports: not provided
        }
        let stack = stack()?;
        let slots = (0..backlog.clamp(1, MAX_BACKLOG as i32))
            .map(|_| Slot::new(stack, port))
            .collect::<Result<Vec<_>, _>>()?;
        sock.kind = Kind::Listening(Listener { port, slots });
        Ok(0)
    });
    r.unwrap_or_else(fail)
}

impl Listener {
    /// The first slot that holds a connection (polling the others, so
    /// that they wake `cx` when one arrives).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<usize> {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(fut) = slot.accepting.as_mut() {
                if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                    slot.accepting = None;
                    slot.ready = Some(r);
                }
            }
            if slot.ready.is_some() {
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    }
}

/// Polls `f` on socket `fd` until it is ready, blocking the thread in
/// between with the socket released (so other threads may use it);
/// `EAGAIN` at once for a non-blocking socket, or after the timeout that
/// `timeout` picks from the socket.
fn wait_for<T>(
    fd: i32,
    timeout: fn(&Socket) -> Option<u64>,
    mut f: impl FnMut(&mut Socket, &mut Context<'_>) -> Result<Poll<T>, i32>,
) -> Result<T, i32> {
    let wait = fd::with(fd, |sock| Ok(sock.wait(timeout(sock))))?;
    let waker = sched::thread_waker();
    loop {
        let mut cx = Context::from_waker(&waker);
        if let Poll::Ready(v) = fd::with(fd, |sock| f(sock, &mut cx))? {
            return Ok(v);
        }
        match wait {
            Wait::Once => return Err(errno::EAGAIN),
            Wait::Until(deadline) => {
                if sched::block(deadline) && deadline.is_some_and(|d| kernel::time::now_ns() >= d) {
                    return Err(errno::EAGAIN);
                }
            }
        }
    }
}

/// One attempt at taking a connection from `listener`.
fn poll_accept(
    listener: &mut Listener,
    nodelay: bool,
    cx: &mut Context<'_>,
) -> Result<Poll<Socket>, i32> {
    loop {
        let Poll::Ready(i) = listener.poll_ready(cx) else {
            return Ok(Poll::Pending);
        };
        let fresh = Slot::new(stack()?, listener.port)?;
        let mut old = core::mem::replace(&mut listener.slots[i], fresh);
        // The fresh slot listens from its first poll on.
        if let Some(fut) = listener.slots[i].accepting.as_mut() {
            let _ = fut.as_mut().poll(cx);
        }
        let result = old.ready.take().ok_or(errno::EIO)?;
        let bufs = old.bufs.take().ok_or(errno::EIO)?;
        let Ok(mut socket) = result else {
            continue; // that attempt was reset: look for the next
        };
        socket.set_nagle_enabled(!nodelay);
        return Ok(Poll::Ready(Socket {
            kind: Kind::Connected(Conn {
                socket: ManuallyDrop::new(socket),
                _bufs: bufs,
            }),
            nonblocking: false,
            connecting: false,
            nodelay,
            recv_timeout: None,
            send_timeout: None,
        }));
    }
}

/// # Safety
/// `addr`/`addrlen` are null or writable as for POSIX `accept`.
#[no_mangle]
pub unsafe extern "C" fn sys_accept(s: i32, addr: *mut sockaddr, addrlen: *mut socklen_t) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    let r = wait_for(
        s,
        |sock| sock.recv_timeout,
        |sock, cx| {
            let nodelay = sock.nodelay;
            match &mut sock.kind {
                Kind::Listening(listener) => poll_accept(listener, nodelay, cx),
                _ => Err(errno::EINVAL),
            }
        },
    )
    .and_then(|conn| {
        let peer = match &conn.kind {
            Kind::Connected(c) => c.socket.remote_endpoint(),
            _ => None,
        };
        endpoint_to(peer, addr, addrlen)?;
        fd::insert(conn)
    });
    r.unwrap_or_else(fail)
}

#[no_mangle]
pub extern "C" fn sys_connect(s: i32, name: *const sockaddr, namelen: socklen_t) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    let r = endpoint_from(name, namelen).and_then(|ep| {
        fd::with(s, |sock| {
            if matches!(sock.kind, Kind::Datagram(_)) {
                sock.udp()?.peer = Some(ep);
                return Ok(0);
            }
            if !matches!(sock.kind, Kind::Fresh { .. }) {
                return Err(errno::EISCONN);
            }
            let (mut socket, bufs) = Buffers::socket(stack()?)?;
            socket.set_nagle_enabled(!sock.nodelay);
            let wait = sock.wait(sock.send_timeout);
            let result = sched::block_on(socket.connect(ep), wait);
            let conn = Conn {
                socket: ManuallyDrop::new(socket),
                _bufs: bufs,
            };
            match result {
                // Non-blocking: the handshake goes on; `poll` says when it ends.
                None if sock.nonblocking => {
                    sock.kind = Kind::Connected(conn);
                    sock.connecting = true;
                    Err(errno::EINPROGRESS)
                }
                None => Err(errno::ETIMEDOUT),
                Some(Err(e)) => {
                    log::debug!("connect to {ep}: {e:?}");
                    Err(errno::ECONNREFUSED)
                }
                Some(Ok(())) => {
                    sock.kind = Kind::Connected(conn);
                    Ok(0)
                }
            }
        })
    });
    r.unwrap_or_else(fail)
}

/// Whether `socket`'s handshake is still under way.
fn handshaking(socket: &TcpSocket<'_>) -> bool {
    matches!(
        socket.state(),
        tcp::State::SynSent | tcp::State::SynReceived
    )
}

/// Pending (with `cx` woken when the handshake ends) while `socket` connects.
fn poll_handshake(socket: &TcpSocket<'_>, cx: &mut Context<'_>) -> Poll<()> {
    if handshaking(socket) {
        let _ = pin!(socket.wait_write_ready()).poll(cx);
        Poll::Pending
    } else {
        Poll::Ready(())
    }
}

/// One transfer on a connection: a read into, or a write from, a buffer.
enum Transfer<'a> {
    Recv(&'a mut [u8]),
    Send(&'a [u8]),
}

/// Moves data on connected socket `fd` (after its handshake), waiting as
/// the socket's timeout for that direction says: a read returns 0 at end
/// of stream, a write at least one byte unless it fails.
fn transfer(fd: i32, mut op: Transfer<'_>) -> Result<isize, i32> {
    let timeout: fn(&Socket) -> Option<u64> = match op {
        Transfer::Recv(_) => |sock| sock.recv_timeout,
        Transfer::Send(_) => |sock| sock.send_timeout,
    };
    wait_for(fd, timeout, |sock, cx| {
        if matches!(sock.kind, Kind::Datagram(_)) {
            let udp = sock.udp()?;
            let peer = udp.peer.ok_or(errno::EDESTADDRREQ)?;
            return Ok(match &mut op {
                Transfer::Recv(buf) => poll_recv_from(udp, buf, Some(peer), cx)?.map(|(n, _)| n),
                Transfer::Send(buf) => poll_send_to(udp, buf, peer, cx)?,
            });
        }
        let nonblocking = sock.nonblocking;
        let socket = sock.conn()?;
        // A non-blocking call that would block says so without polling:
        // polling would take the socket's one waker per direction away
        // from a thread waiting on it in `poll` (tokio's other worker).
        if nonblocking
            && (handshaking(socket)
                || match &op {
                    Transfer::Recv(b) => !b.is_empty() && !socket.can_recv() && socket.may_recv(),
                    Transfer::Send(b) => !b.is_empty() && !socket.can_send() && socket.may_send(),
                })
        {
            return Ok(Poll::Pending);
        }
        if poll_handshake(socket, cx).is_pending() {
            return Ok(Poll::Pending);
        }
        let done = match &mut op {
            Transfer::Recv([]) | Transfer::Send([]) => return Ok(Poll::Ready(0)),
            Transfer::Recv(buf) => match pin!(socket.read(buf)).poll(cx) {
                Poll::Pending => return Ok(Poll::Pending),
                Poll::Ready(r) => r.map_err(|_| errno::ECONNRESET),
            },
            Transfer::Send(buf) => match pin!(socket.write(buf)).poll(cx) {
                Poll::Pending => return Ok(Poll::Pending),
                Poll::Ready(Ok(0)) => Err(errno::EPIPE),
                Poll::Ready(r) => r.map_err(|_| errno::EPIPE),
            },
        };
        done.map(|n| Poll::Ready(n as isize))
    })
}

/// One attempt at receiving a datagram (from `from` only, if given:
/// others are dropped): its length (truncated to `buf`, as POSIX does)
/// and sender.
fn poll_recv_from(
    udp: &mut Udp,
    buf: &mut [u8],
    from: Option<IpEndpoint>,
    cx: &mut Context<'_>,
) -> Result<Poll<(isize, IpEndpoint)>, i32> {
    loop {
        let received = pin!(udp.socket.recv_from_with(|data: &[u8], meta| {
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            (n, meta.endpoint)
        }))
        .poll(cx);
        match received {
            Poll::Pending => return Ok(Poll::Pending),
            Poll::Ready((_, sender)) if from.is_some_and(|f| f != sender) => continue,
            Poll::Ready((n, sender)) => return Ok(Poll::Ready((n as isize, sender))),
        }
    }
}

/// One attempt at sending `buf` as one datagram to `to`.
fn poll_send_to(
    udp: &mut Udp,
    buf: &[u8],
    to: IpEndpoint,
    cx: &mut Context<'_>,
) -> Result<Poll<isize>, i32> {
    match udp.socket.poll_send_to(buf, to, cx) {
        Poll::Pending => Ok(Poll::Pending),
        Poll::Ready(Ok(())) => Ok(Poll::Ready(buf.len() as isize)),
        Poll::Ready(Err(e)) => {
            log::debug!("UDP send of {} bytes to {to}: {e:?}", buf.len());
            Err(errno::EMSGSIZE)
        }
    }
}

/// Reads into `buf`: 0 at end of stream.
pub fn recv(fd: i32, buf: &mut [u8], flags: i32) -> Result<isize, i32> {
    if flags & hermit_abi::MSG_PEEK != 0 {
        return Err(errno::EOPNOTSUPP);
    }
    transfer(fd, Transfer::Recv(buf))
}

/// Writes from `buf` (at least one byte unless it fails).
pub fn send(fd: i32, buf: &[u8]) -> Result<isize, i32> {
    transfer(fd, Transfer::Send(buf))
}

/// # Safety
/// `buf` is writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sys_recv(s: i32, buf: *mut u8, len: usize, flags: i32) -> isize {
    let _kernel = crate::preempt::kernel_section();
    if buf.is_null() && len > 0 {
        return fail(errno::EFAULT) as isize;
    }
    // SAFETY: the caller's guarantee.
    let buf = unsafe { core::slice::from_raw_parts_mut(buf, len) };
    recv(s, buf, flags).unwrap_or_else(|e| fail(e) as isize)
}

/// # Safety
/// `mem` is readable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sys_send(s: i32, mem: *const c_void, len: usize, _flags: i32) -> isize {
    let _kernel = crate::preempt::kernel_section();
    // SAFETY: the caller's guarantee.
    unsafe { crate::fd::sys_write(s, mem as *const u8, len) }
}

#[no_mangle]
pub extern "C" fn sys_shutdown(s: i32, how: i32) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    let r = fd::with(s, |sock| {
        let socket = sock.conn()?;
        if how == hermit_abi::SHUT_WR || how == hermit_abi::SHUT_RDWR {
            socket.close();
        }
        Ok(0)
    });
    r.unwrap_or_else(fail)
}

/// Closes `socket`: a connection gets a FIN and a bounded flush in the
/// background; listening sockets are dropped at once.
pub fn close(socket: Socket) {
    let Socket { kind, .. } = socket;
    if let Kind::Connected(mut conn) = kind {
        conn.socket.close();
        kernel::task::spawn(async move {
            let deadline = kernel::time::now_ns().saturating_add(CLOSE_FLUSH_NS);
            let flushed = WithDeadline {
                inner: conn.socket.flush(),
                deadline,
            }
            .await;
            if flushed.is_none() {
                log::debug!("closed socket not flushed in time; dropping it");
            }
            drop(conn);
        });
    }
}

/// Ends `inner` at `deadline` (kernel ns).
struct WithDeadline<F> {
    inner: F,
    deadline: u64,
}

impl<F: Future> Future for WithDeadline<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `inner` is never moved out of the pinned struct.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: as above: structural pinning of `inner`.
        if let Poll::Ready(v) = unsafe { Pin::new_unchecked(&mut this.inner) }.poll(cx) {
            return Poll::Ready(Some(v));
        }
        if kernel::time::now_ns() >= this.deadline {
            return Poll::Ready(None);
        }
        kernel::time::wake_at(this.deadline, cx.waker());
        Poll::Pending
    }
}

/// `poll`'s events for `sock` (of those in `events`); registers `cx` with
/// the socket when none is ready.
pub fn poll_socket(sock: &mut Socket, events: i16, cx: &mut Context<'_>) -> i16 {
    use hermit_abi::{POLLERR, POLLHUP, POLLIN, POLLOUT, POLLRDHUP};
    let read = events & POLLIN;
    let write = events & POLLOUT;
    if let Kind::Connected(c) = &sock.kind {
        if sock.connecting && !handshaking(&c.socket) && c.socket.may_send() {
            sock.connecting = false; // the handshake succeeded: nothing to report
        }
    }
    let connecting = sock.connecting;
    match &mut sock.kind {
        // Neither connected nor listening: nothing will ever happen.
        Kind::Fresh { .. } => POLLHUP,
        // Unbound: nothing to read; a send binds it.
        Kind::Datagram(None) => write,
        Kind::Datagram(Some(udp)) => {
            let s = &udp.socket;
            let mut r = 0;
            if read != 0 && s.poll_recv_ready(cx).is_ready() {
                r |= POLLIN;
            }
            if write != 0 && s.poll_send_ready(cx).is_ready() {
                r |= POLLOUT;
            }
            r
        }
        Kind::Listening(l) => {
            if read != 0 && l.poll_ready(cx).is_ready() {
                POLLIN
            } else {
                0
            }
        }
        Kind::Connected(c) => {
            let s = &c.socket;
            if poll_handshake(s, cx).is_pending() {
                return 0;
            }
            let mut r = 0;
            if read != 0 {
                if s.can_recv() {
                    r |= POLLIN;
                } else if !s.may_recv() {
                    // End of stream: a read returns 0 at once.
                    r |= POLLIN | (events & POLLRDHUP);
                } else {
                    let _ = pin!(s.wait_read_ready()).poll(cx);
                }
            }
            if write != 0 {
                if s.can_send() || !s.may_send() {
                    // Room to send, or a write fails at once.
                    r |= POLLOUT;
                } else {
                    let _ = pin!(s.wait_write_ready()).poll(cx);
                }
            }
            if !s.may_recv() && !s.may_send() {
                r |= POLLHUP;
                if connecting {
                    r |= POLLERR; // the handshake failed
                }
            }
            r
        }
    }
}

/// # Safety
/// `argp` points to an `i32` for `FIONBIO`.
#[no_mangle]
pub unsafe extern "C" fn sys_ioctl(s: i32, cmd: i32, argp: *mut c_void) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    if cmd != hermit_abi::FIONBIO || argp.is_null() {
        return fail(errno::EINVAL);
    }
    // SAFETY: the caller's guarantee.
    let on = unsafe { *(argp as *const i32) } != 0;
    fd::set_nonblocking(s, on).unwrap_or_else(fail)
}

/// Reads an option value of type `T` (checking the length).
fn opt<T: Copy>(val: *const c_void, len: socklen_t) -> Result<T, i32> {
    if val.is_null() || (len as usize) < core::mem::size_of::<T>() {
        return Err(errno::EINVAL);
    }
    // SAFETY: checked non-null and long enough; the caller's guarantee.
    Ok(unsafe { (val as *const T).read_unaligned() })
}

fn timeval_ns(tv: hermit_abi::timeval) -> Option<u64> {
    let ns = (tv.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(tv.tv_usec.max(0) as u64 * 1000);
    (ns > 0).then_some(ns)
}

#[no_mangle]
pub extern "C" fn sys_setsockopt(
    s: i32,
    level: i32,
    optname: i32,
    optval: *const c_void,
    optlen: socklen_t,
) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    use hermit_abi::*;
    let r = fd::with(s, |sock| {
        match (level, optname) {
            (IPPROTO_TCP, TCP_NODELAY) => {
                sock.nodelay = opt::<i32>(optval, optlen)? != 0;
                let nodelay = sock.nodelay;
                if let Ok(socket) = sock.conn() {
                    socket.set_nagle_enabled(!nodelay);
                }
            }
            (SOL_SOCKET, SO_RCVTIMEO) => sock.recv_timeout = timeval_ns(opt(optval, optlen)?),
            (SOL_SOCKET, SO_SNDTIMEO) => sock.send_timeout = timeval_ns(opt(optval, optlen)?),
            (SOL_SOCKET, SO_REUSEADDR) | (SOL_SOCKET, SO_KEEPALIVE) => {}
            _ => {
                log::warn!("setsockopt(level {level}, option {optname}): not supported");
                return Err(errno::ENOPROTOOPT);
            }
        }
        Ok(0)
    });
    r.unwrap_or_else(fail)
}

/// # Safety
/// `optval` is writable for `*optlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn sys_getsockopt(
    s: i32,
    level: i32,
    optname: i32,
    optval: *mut c_void,
    optlen: *mut socklen_t,
) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    use hermit_abi::*;
    let r = fd::with(s, |sock| {
        let value: i32 = match (level, optname) {
            (IPPROTO_TCP, TCP_NODELAY) => sock.nodelay as i32,
            (SOL_SOCKET, SO_ERROR) => match &sock.kind {
                Kind::Connected(c) if sock.connecting && !handshaking(&c.socket) => {
                    sock.connecting = false;
                    if c.socket.may_send() {
                        0
                    } else {
                        log::debug!("non-blocking connect failed");
                        errno::ECONNREFUSED
                    }
                }
                _ => 0,
            },
            _ => return Err(errno::ENOPROTOOPT),
        };
        if optval.is_null() || optlen.is_null() {
            return Err(errno::EINVAL);
        }
        // SAFETY: checked non-null; the caller's guarantee for the sizes.
        unsafe {
            if (*optlen as usize) < 4 {
                return Err(errno::EINVAL);
            }
            (optval as *mut i32).write_unaligned(value);
            *optlen = 4;
        }
        Ok(0)
    });
    r.unwrap_or_else(fail)
}

fn local_or_peer(s: i32, addr: *mut sockaddr, len: *mut socklen_t, peer: bool) -> i32 {
    let r = fd::with(s, |sock| {
        let ep = match &sock.kind {
            Kind::Connected(c) if peer => c.socket.remote_endpoint(),
            Kind::Connected(c) => c.socket.local_endpoint(),
            Kind::Listening(l) if !peer => stack()?
                .config_v4()
                .map(|c| IpEndpoint::new(IpAddress::Ipv4(c.address.address()), l.port)),
            Kind::Fresh { port } if !peer => Some(IpEndpoint::new(
                IpAddress::Ipv4(Ipv4Address::UNSPECIFIED),
                *port,
            )),
            Kind::Datagram(Some(u)) if peer => u.peer,
            Kind::Datagram(Some(u)) if !peer => Some(IpEndpoint::new(
                IpAddress::Ipv4(Ipv4Address::UNSPECIFIED),
                u.socket.endpoint().port,
            )),
            _ => None,
        };
        endpoint_to(ep, addr, len).map(|()| 0)
    });
    r.unwrap_or_else(fail)
}

#[no_mangle]
pub extern "C" fn sys_getpeername(s: i32, name: *mut sockaddr, namelen: *mut socklen_t) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    local_or_peer(s, name, namelen, true)
}

#[no_mangle]
pub extern "C" fn sys_getsockname(s: i32, name: *mut sockaddr, namelen: *mut socklen_t) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    local_or_peer(s, name, namelen, false)
}

/// Host names cannot be resolved (no DNS client); numeric addresses never
/// reach this call.
#[no_mangle]
pub extern "C" fn sys_getaddrinfo(
    _nodename: *const i8,
    _servname: *const i8,
    _hints: *const hermit_abi::addrinfo,
    _res: *mut *mut hermit_abi::addrinfo,
) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    log::warn!("getaddrinfo: no DNS resolver; use numeric addresses");
    hermit_abi::EAI_FAIL
}

#[no_mangle]
pub extern "C" fn sys_freeaddrinfo(_ai: *mut hermit_abi::addrinfo) {}

/// # Safety
/// `buf` is writable for `len` bytes; `addr`/`addrlen` are null or
/// writable as for POSIX `recvfrom`.
#[no_mangle]
pub unsafe extern "C" fn sys_recvfrom(
    s: i32,
    buf: *mut u8,
    len: usize,
    flags: i32,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> isize {
    let _kernel = crate::preempt::kernel_section();
    if buf.is_null() && len > 0 {
        return fail(errno::EFAULT) as isize;
    }
    if flags & hermit_abi::MSG_PEEK != 0 {
        return fail(errno::EOPNOTSUPP) as isize;
    }
    // SAFETY: the caller's guarantee.
    let buf = unsafe { core::slice::from_raw_parts_mut(buf, len) };
    let r = wait_for(
        s,
        |sock| sock.recv_timeout,
        |sock, cx| {
            let udp = sock.udp()?;
            let peer = udp.peer;
            poll_recv_from(udp, buf, peer, cx)
        },
    )
    .and_then(|(n, sender)| endpoint_to(Some(sender), addr, addrlen).map(|()| n));
    r.unwrap_or_else(|e| fail(e) as isize)
}

/// # Safety
/// `mem` is readable for `len` bytes; `to` as for POSIX `sendto`.
#[no_mangle]
pub unsafe extern "C" fn sys_sendto(
    s: i32,
    mem: *const c_void,
    len: usize,
    _flags: i32,
    to: *const sockaddr,
    tolen: socklen_t,
) -> isize {
    let _kernel = crate::preempt::kernel_section();
    if mem.is_null() && len > 0 {
        return fail(errno::EFAULT) as isize;
    }
    // SAFETY: the caller's guarantee.
    let buf = unsafe { core::slice::from_raw_parts(mem as *const u8, len) };
    let r = endpoint_from(to, tolen).and_then(|ep| {
        wait_for(
            s,
            |sock| sock.send_timeout,
            |sock, cx| poll_send_to(sock.udp()?, buf, ep, cx),
        )
    });
    r.unwrap_or_else(|e| fail(e) as isize)
}
