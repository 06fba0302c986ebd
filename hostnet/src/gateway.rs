//! The user-mode network's gateway (10.0.2.2): a smoltcp interface on a
//! port of the virtual switch, like QEMU's slirp with `hostfwd`.
//!
//! It answers ARP and ICMP echo for its address, and proxies published
//! ports (`--publish`): each connection accepted on a host TCP listener
//! becomes a smoltcp TCP socket that connects from the gateway to the
//! guest's port, and bytes flow both ways without intermediate buffers
//! (host socket -> smoltcp send buffer, smoltcp receive buffer -> host
//! socket). A FIN from either side is passed on as a FIN (half-close), a
//! reset as a reset. Host sockets are non-blocking and registered in the
//! network thread's epoll set only while the proxy wants to read or write
//! them, so a stalled peer costs no CPU. Published UDP ports map each host
//! peer to a gateway UDP port, for [`UDP_FLOW_IDLE`]. Every published port
//! counts its requests, bytes and connections ([`super::traffic`]).
//!
//! The gateway owns its link layer ([`Link`]) rather than leaving it to
//! smoltcp: the stack sees IP packets, and a guest's MAC is known from the
//! moment its network card exists (every card the shim makes has
//! [`mac_for`] its address; others are given with [`Gateway::neighbour`]).
//! So the gateway never resolves an address: a fresh guest's first SYN
//! goes out at once, and no cache entry expires or is evicted however many
//! guests there are. It answers ARP requests for its own address.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    HardwareAddress, IpAddress, IpCidr, IpEndpoint,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::port::Frame;
use super::traffic::PortTraffic;
use super::{in_subnet, mac_for, token, Proto};

/// Bytes buffered per direction of a proxied TCP connection.
const TCP_BUFFER: usize = 64 * 1024;
/// A connection to a guest that does not answer is given up after this.
const TCP_TIMEOUT: Duration = Duration::from_secs(30);
/// An idle proxied connection is probed this often (a keep-alive ACK the
/// guest answers): smoltcp's timeout counts from the guest's last segment,
/// so without probes a connection merely idle for [`TCP_TIMEOUT`] would be
/// reset.
const TCP_KEEP_ALIVE: Duration = Duration::from_secs(10);
/// A UDP flow (host peer <-> guest port) is forgotten after this long idle.
pub const UDP_FLOW_IDLE: Duration = Duration::from_secs(120);
/// Datagrams buffered per UDP flow and direction.
const UDP_PACKETS: usize = 64;
/// Gateway ports for proxied connections.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;
/// Connections accepted per listener per wake-up (the rest wait in the backlog).
const ACCEPT_BATCH: usize = 64;

/// A published port, listening on the host.
pub struct Published {
    pub host: SocketAddr,
    pub guest: (Ipv4Addr, u16),
    pub proto: Proto,
    /// Its counters (see [`super::traffic`]).
    pub traffic: Arc<PortTraffic>,
}

enum HostSocket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

struct Listener {
    socket: HostSocket,
    guest: IpEndpoint,
    host: SocketAddr,
    /// UDP: flows by host peer.
    flows: HashMap<SocketAddr, UdpFlow>,
    traffic: Arc<PortTraffic>,
}

struct UdpFlow {
    handle: SocketHandle,
    port: u16,
    last_used: Instant,
}

/// One proxied TCP connection.
struct Conn {
    /// `None` once both directions are done on the host side.
    stream: Option<TcpStream>,
    handle: SocketHandle,
    port: u16,
    peer: SocketAddr,
    /// epoll said the host socket may have data (or EOF, or an error).
    readable: bool,
    /// Writing to the host socket would not block.
    writable: bool,
    /// The host sent FIN: the guest was sent FIN after the data.
    host_eof: bool,
    /// The guest sent FIN: the host socket's write side is shut down.
    guest_eof: bool,
    last_state: tcp::State,
    /// What the host socket is registered for (empty: not registered).
    interest: EventSet,
    /// The client's bytes being read belong to a request already counted.
    in_request: bool,
    traffic: Arc<PortTraffic>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.traffic.closed();
    }
}

/// What became of a connection after moving its data.
enum Fate {
    Open,
    Done,
}

/// Ethernet header length (no VLAN tag).
const ETH_HEADER: usize = 14;
/// Neighbours given with [`Gateway::neighbour`] (cards with a MAC that is
/// not [`mac_for`] their address); more are refused.
pub const NEIGHBOURS_MAX: usize = 65_536;

/// The gateway's link layer: its addresses and its guests' MACs.
struct Link {
    mac: [u8; 6],
    ip: Ipv4Addr,
    prefix: u8,
    /// Guests whose MAC is not [`mac_for`] their address.
    neighbours: HashMap<Ipv4Addr, [u8; 6]>,
}

impl Link {
    /// The MAC to send an IPv4 packet for `dst` to.
    fn mac_of(&self, dst: Ipv4Addr) -> [u8; 6] {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        let subnet_broadcast = u32::from(dst) | mask == u32::MAX;
        if dst.is_broadcast() || dst.is_multicast() || subnet_broadcast {
            return [0xff; 6];
        }
        self.neighbours
            .get(&dst)
            .copied()
            .unwrap_or_else(|| mac_for(dst))
    }

    /// A frame from the switch: `Some` if it carries an IPv4 packet for
    /// the stack (after the Ethernet header); an ARP request for the
    /// gateway's address is answered into `outbox`; anything else is
    /// dropped.
    fn ingress(&self, frame: &[u8], outbox: &mut Vec<Frame>) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        let dst = eth.dst_addr().0;
        if dst != self.mac && !super::switch::is_multicast(&dst) {
            return false;
        }
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => true,
            EthernetProtocol::Arp => {
                if let Some(reply) = self.arp_reply(eth.payload()) {
                    outbox.push(reply);
                }
                false
            }
            _ => false,
        }
    }

    /// The reply to an ARP request for the gateway's address.
    fn arp_reply(&self, payload: &[u8]) -> Option<Frame> {
        let arp = ArpPacket::new_checked(payload).ok()?;
        let ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = ArpRepr::parse(&arp).ok()?
        else {
            return None;
        };
        if target_protocol_addr != self.ip || !source_hardware_addr.is_unicast() {
            return None;
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(self.mac),
            source_protocol_addr: self.ip,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let mut out = vec![0u8; ETH_HEADER + reply.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut out[..]);
        eth.set_dst_addr(source_hardware_addr);
        eth.set_src_addr(EthernetAddress(self.mac));
        eth.set_ethertype(EthernetProtocol::Arp);
        reply.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        Some(out)
    }

    /// Frames an IPv4 packet the stack wrote after [`ETH_HEADER`] bytes.
    fn frame(&self, frame: &mut [u8]) {
        let dst = frame
            .get(ETH_HEADER + 16..ETH_HEADER + 20)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or([0xff; 6], |b| self.mac_of(Ipv4Addr::from(b)));
        let mut eth = EthernetFrame::new_unchecked(frame);
        eth.set_dst_addr(EthernetAddress(dst));
        eth.set_src_addr(EthernetAddress(self.mac));
        eth.set_ethertype(EthernetProtocol::Ipv4);
    }
}

/// The gateway: its interface, sockets and published ports.
pub struct Gateway {
    iface: Interface,
    link: Link,
    sockets: SocketSet<'static>,
    /// Frames switched to the gateway.
    pub inbox: VecDeque<Frame>,
    /// Frames the gateway sends into the switch.
    pub outbox: Vec<Frame>,
    /// Published ports by listener index (`None`: unpublished since; the
    /// slot is reused by the next publish, so this holds at most as many
    /// slots as ports were ever published at once).
    listeners: Vec<Option<Listener>>,
    /// Indices of the UDP listeners: the only ones with flows to look at on
    /// every loop (a thousand published TCP ports cost nothing there).
    udp_listeners: Vec<usize>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    ports_in_use: HashSet<u16>,
    next_port: u16,
    /// Sockets to remove after the next poll (so their RST goes out first).
    graveyard: Vec<(SocketHandle, u16)>,
    last_sweep: Instant,
}

/// The gateway's end of smoltcp's `phy::Device`: IP packets from the
/// inbox's frames, framed into the outbox (see [`Link`]).
struct Phy<'a> {
    inbox: &'a mut VecDeque<Frame>,
    outbox: &'a mut Vec<Frame>,
    link: &'a Link,
}

/// A frame whose IPv4 packet (after the Ethernet header) the stack reads.
struct RxToken(Frame);
struct TxToken<'a> {
    outbox: &'a mut Vec<Frame>,
    link: &'a Link,
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0[ETH_HEADER..])
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; ETH_HEADER + len];
        let r = f(&mut frame[ETH_HEADER..]);
        self.link.frame(&mut frame);
        self.outbox.push(frame);
        r
    }
}

impl phy::Device for Phy<'_> {
    type RxToken<'a>
        = RxToken
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        loop {
            let frame = self.inbox.pop_front()?;
            if self.link.ingress(&frame, self.outbox) {
                let tx = TxToken {
                    outbox: self.outbox,
                    link: self.link,
                };
                return Some((RxToken(frame), tx));
            }
        }
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            outbox: self.outbox,
            link: self.link,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = 1500;
        caps
    }
}

impl Gateway {
    /// A gateway with `mac` and `ip`/`prefix`, serving `published` (whose
    /// host sockets are already bound; they are registered in `epoll`).
    pub fn new(
        mac: [u8; 6],
        ip: Ipv4Addr,
        prefix: u8,
        published: Vec<(Published, HostSocketKind)>,
        epoll: &Epoll,
    ) -> io::Result<Self> {
        let now = Instant::now();
        let mut inbox = VecDeque::new();
        let mut outbox = Vec::new();
        let link = Link {
            mac,
            ip,
            prefix,
            neighbours: HashMap::new(),
        };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed();
        let mut iface = Interface::new(
            config,
            &mut Phy {
                inbox: &mut inbox,
                outbox: &mut outbox,
                link: &link,
            },
            now,
        );
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip), prefix));
        });
        let mut gw = Self {
            iface,
            link,
            sockets: SocketSet::new(Vec::new()),
            inbox,
            outbox,
            listeners: Vec::new(),
            udp_listeners: Vec::new(),
            conns: HashMap::new(),
            next_conn: 0,
            ports_in_use: HashSet::new(),
            next_port: *EPHEMERAL.start(),
            graveyard: Vec::new(),
            last_sweep: now,
        };
        for (p, socket) in published {
            gw.publish(p, socket, epoll)?;
        }
        Ok(gw)
    }

    /// Sends what is for `ip` to `mac` (a card whose MAC is not
    /// [`mac_for`] its address); false if `ip` is outside the gateway's
    /// subnet or [`NEIGHBOURS_MAX`] are known.
    pub fn neighbour(&mut self, ip: Ipv4Addr, mac: [u8; 6]) -> bool {
        let link = &mut self.link;
        if !in_subnet(ip, link.ip, link.prefix) {
            return false;
        }
        if mac == mac_for(ip) {
            link.neighbours.remove(&ip);
            return true;
        }
        if link.neighbours.len() >= NEIGHBOURS_MAX && !link.neighbours.contains_key(&ip) {
            return false;
        }
        link.neighbours.insert(ip, mac);
        true
    }

    /// The gateway's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.link.ip
    }

    /// Starts forwarding a published port (its host socket is bound).
    pub fn publish(
        &mut self,
        p: Published,
        socket: HostSocketKind,
        epoll: &Epoll,
    ) -> io::Result<()> {
        let index = self
            .listeners
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.listeners.len());
        let fd = match &socket {
            HostSocketKind::Tcp(l) => l.as_raw_fd(),
            HostSocketKind::Udp(s) => s.as_raw_fd(),
        };
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token::listener(index)),
        )?;
        if matches!(socket, HostSocketKind::Udp(_)) {
            self.udp_listeners.push(index);
        }
        let listener = Some(Listener {
            socket: match socket {
                HostSocketKind::Tcp(l) => HostSocket::Tcp(l),
                HostSocketKind::Udp(s) => HostSocket::Udp(s),
            },
            guest: IpEndpoint::new(IpAddress::Ipv4(p.guest.0), p.guest.1),
            host: p.host,
            flows: HashMap::new(),
            traffic: p.traffic,
        });
        match self.listeners.get_mut(index) {
            Some(slot) => *slot = listener,
            None => self.listeners.push(listener),
        }
        Ok(())
    }

    /// Stops forwarding the published port at `host` (`proto`): its host
    /// socket is closed; connections already proxied go on.
    pub fn unpublish(&mut self, host: SocketAddr, proto: Proto, epoll: &Epoll) -> bool {
        for (index, slot) in self.listeners.iter_mut().enumerate() {
            let matches = slot.as_ref().is_some_and(|l| {
                l.host == host
                    && matches!(
                        (&l.socket, proto),
                        (HostSocket::Tcp(_), Proto::Tcp) | (HostSocket::Udp(_), Proto::Udp)
                    )
            });
            if matches {
                if let Some(l) = slot.take() {
                    let fd = match &l.socket {
                        HostSocket::Tcp(s) => s.as_raw_fd(),
                        HostSocket::Udp(s) => s.as_raw_fd(),
                    };
                    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    for flow in l.flows.values() {
                        self.sockets.remove(flow.handle);
                        self.ports_in_use.remove(&flow.port);
                    }
                }
                self.udp_listeners.retain(|&i| i != index);
                return true;
            }
        }
        false
    }

    /// How long the network thread may sleep before the gateway needs to
    /// run again (retransmissions, delayed ACKs, UDP flow expiry).
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let tcp = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        let has_flows = self
            .udp_listeners
            .iter()
            .filter_map(|&i| self.listeners[i].as_ref())
            .any(|l| !l.flows.is_empty());
        let sweep = has_flows.then_some(Duration::from_secs(1));
        match (tcp, sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// An epoll event for a listener or a connection of the gateway.
    pub fn on_event(&mut self, token: u64, events: EventSet, epoll: &Epoll) {
        match token::kind(token) {
            token::LISTENER => self.on_listener(token::index(token), epoll),
            token::CONN => {
                if let Some(conn) = self.conns.get_mut(&token::index(token)) {
                    let hangup = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
                    if hangup || events.contains(EventSet::IN) {
                        conn.readable = true;
                    }
                    if hangup || events.contains(EventSet::OUT) {
                        conn.writable = true;
                    }
                }
            }
            _ => {}
        }
    }

    fn on_listener(&mut self, index: u64, epoll: &Epoll) {
        let Some(Some(listener)) = self.listeners.get_mut(index as usize) else {
            return;
        };
        match &listener.socket {
            HostSocket::Tcp(l) => {
                let mut accepted = Vec::new();
                for _ in 0..ACCEPT_BATCH {
                    match l.accept() {
                        Ok((stream, peer)) => accepted.push((stream, peer)),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // ECONNABORTED, EMFILE...: the next wake-up retries.
                            tracing::warn!(host = %listener.host, error = %e, "accept failed");
                            break;
                        }
                    }
                }
                let (guest, traffic) = (listener.guest, Arc::clone(&listener.traffic));
                for (stream, peer) in accepted {
                    self.open_conn(stream, peer, guest, &traffic, epoll);
                }
            }
            HostSocket::Udp(_) => self.udp_from_host(index as usize),
        }
    }

    fn alloc_port(&mut self) -> Option<u16> {
        let span = EPHEMERAL.end() - EPHEMERAL.start() + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port == *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                port + 1
            };
            if self.ports_in_use.insert(port) {
                return Some(port);
            }
        }
        None
    }

    fn open_conn(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        guest: IpEndpoint,
        traffic: &Arc<PortTraffic>,
        epoll: &Epoll,
    ) {
        let setup = stream
            .set_nonblocking(true)
            .and_then(|()| stream.set_nodelay(true));
        if let Err(e) = setup {
            tracing::warn!(%peer, error = %e, "connection not set up");
            return;
        }
        let Some(port) = self.alloc_port() else {
            tracing::warn!(%peer, "connection refused: no free gateway port");
            return;
        };
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(
            TCP_TIMEOUT.as_secs(),
        )));
        socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(
            TCP_KEEP_ALIVE.as_secs(),
        )));
        if let Err(e) = socket.connect(self.iface.context(), guest, port) {
            tracing::warn!(%peer, %guest, error = %e, "connection to the guest failed");
            self.ports_in_use.remove(&port);
            return;
        }
        let handle = self.sockets.add(socket);
        let id = self.next_conn;
        self.next_conn += 1;
        tracing::debug!(conn = id, %peer, %guest, port, "connection to the guest");
        let mut conn = Conn {
            stream: Some(stream),
            handle,
            port,
            peer,
            readable: false,
            writable: true,
            host_eof: false,
            guest_eof: false,
            last_state: tcp::State::SynSent,
            interest: EventSet::empty(),
            in_request: false,
            traffic: Arc::clone(traffic),
        };
        conn.traffic.opened();
        // Nothing to read or write until the guest answers; HUP/ERR from a
        // client that gives up are noticed once we read.
        conn.update_interest(id, epoll, &self.sockets);
        self.conns.insert(id, conn);
    }

    /// Runs the gateway once: host data into sockets, frames in and out,
    /// socket data to the host. Returns whether anything moved.
    pub fn step(&mut self, epoll: &Epoll) -> bool {
        let now = Instant::now();
        let mut moved = self.pump_conns(epoll);
        let result = self.iface.poll(
            now,
            &mut Phy {
                inbox: &mut self.inbox,
                outbox: &mut self.outbox,
                link: &self.link,
            },
            &mut self.sockets,
        );
        for (handle, port) in self.graveyard.drain(..) {
            self.sockets.remove(handle);
            self.ports_in_use.remove(&port);
        }
        if result == PollResult::SocketStateChanged {
            moved |= self.pump_conns(epoll);
            self.udp_to_host();
        }
        if now - self.last_sweep >= smoltcp::time::Duration::from_secs(1) {
            self.last_sweep = now;
            self.expire_flows(now);
        }
        moved || !self.outbox.is_empty()
    }

    /// Moves data of every connection; returns whether any bytes moved or
    /// a connection changed.
    fn pump_conns(&mut self, epoll: &Epoll) -> bool {
        let mut moved = false;
        let mut done = Vec::new();
        for (&id, conn) in &mut self.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            let (fate, m) = conn.pump(socket);
            moved |= m;
            match fate {
                Fate::Open => conn.update_interest(id, epoll, &self.sockets),
                Fate::Done => done.push(id),
            }
        }
        for id in done {
            if let Some(mut conn) = self.conns.remove(&id) {
                conn.deregister(epoll);
                tracing::debug!(conn = id, peer = %conn.peer, "connection closed");
                // Removed after the next poll, so a RST (abort) still goes out.
                self.graveyard.push((conn.handle, conn.port));
                moved = true;
            }
        }
        moved
    }

    fn udp_from_host(&mut self, index: usize) {
        let now = Instant::now();
        let mut buf = vec![0u8; 65536];
        for _ in 0..ACCEPT_BATCH {
            let Some(listener) = self.listeners[index].as_mut() else {
                return;
            };
            let HostSocket::Udp(host) = &listener.socket else {
                return;
            };
            let (n, peer) = match host.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(host = %listener.host, error = %e, "udp receive failed");
                    return;
                }
            };
            let guest = listener.guest;
            listener.traffic.request(peer.ip());
            listener.traffic.inbound(peer.ip(), n);
            let handle = match listener.flows.get_mut(&peer) {
                Some(flow) => {
                    flow.last_used = now;
                    flow.handle
                }
                None => {
                    let Some(port) = self.alloc_port() else {
                        tracing::warn!(%peer, "udp dropped: no free gateway port");
                        continue;
                    };
                    let mut socket = udp::Socket::new(
                        udp::PacketBuffer::new(
                            vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                            vec![0; 64 * 1024],
                        ),
                        udp::PacketBuffer::new(
                            vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                            vec![0; 64 * 1024],
                        ),
                    );
                    if socket.bind(port).is_err() {
                        self.ports_in_use.remove(&port);
                        continue;
                    }
                    let handle = self.sockets.add(socket);
                    let Some(listener) = self.listeners[index].as_mut() else {
                        return;
                    };
                    listener.traffic.opened();
                    listener.flows.insert(
                        peer,
                        UdpFlow {
                            handle,
                            port,
                            last_used: now,
                        },
                    );
                    handle
                }
            };
            let socket = self.sockets.get_mut::<udp::Socket>(handle);
            if let Err(e) = socket.send_slice(&buf[..n], guest) {
                tracing::debug!(%peer, %guest, error = %e, "udp to the guest dropped");
            }
        }
    }

    fn udp_to_host(&mut self) {
        for &index in &self.udp_listeners {
            let Some(listener) = self.listeners[index].as_mut() else {
                continue;
            };
            let HostSocket::Udp(host) = &listener.socket else {
                continue;
            };
            for (peer, flow) in &mut listener.flows {
                let socket = self.sockets.get_mut::<udp::Socket>(flow.handle);
                while let Ok((data, meta)) = socket.recv() {
                    if meta.endpoint != listener.guest {
                        continue;
                    }
                    flow.last_used = Instant::now();
                    match host.send_to(data, peer) {
                        Ok(n) => listener.traffic.outbound(n),
                        Err(e) => tracing::debug!(%peer, error = %e, "udp to the peer dropped"),
                    }
                }
            }
        }
    }

    fn expire_flows(&mut self, now: Instant) {
        let idle = smoltcp::time::Duration::from_secs(UDP_FLOW_IDLE.as_secs());
        for &index in &self.udp_listeners {
            let Some(listener) = self.listeners[index].as_mut() else {
                continue;
            };
            listener.flows.retain(|_, flow| {
                let keep = now - flow.last_used < idle;
                if !keep {
                    listener.traffic.closed();
                    self.sockets.remove(flow.handle);
                    self.ports_in_use.remove(&flow.port);
                }
                keep
            });
        }
    }

    /// Open proxied TCP connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

/// A bound host socket of a published port.
pub enum HostSocketKind {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Conn {
    /// Moves what can move; returns the connection's fate and whether
    /// anything moved.
    fn pump(&mut self, socket: &mut tcp::Socket) -> (Fate, bool) {
        let mut moved = false;
        let state = socket.state();
        if state != self.last_state {
            moved = true;
        }
        // A connection the guest refused or reset, or that timed out.
        if state == tcp::State::Closed
            && !matches!(
                self.last_state,
                tcp::State::LastAck | tcp::State::TimeWait | tcp::State::Closed
            )
            && !(self.host_eof && self.guest_eof)
        {
            tracing::debug!(
                peer = %self.peer,
                was = %self.last_state,
                "connection reset by the guest"
            );
            self.reset_host();
            return (Fate::Done, true);
        }
        let Some(stream) = self.stream.as_mut() else {
            self.last_state = state;
            return match state {
                tcp::State::Closed | tcp::State::TimeWait => (Fate::Done, true),
                _ => (Fate::Open, moved),
            };
        };

        // Guest -> host.
        while self.writable && socket.can_recv() {
            let result = socket.recv(|buf| match stream.write(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match result {
                Ok(Ok(n)) => {
                    self.traffic.outbound(n);
                    self.in_request = false;
                    moved = true;
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "connection: write failed");
                    socket.abort();
                    self.stream = None;
                    return (Fate::Done, true);
                }
                Err(_) => break,
            }
        }
        if !self.guest_eof
            && !socket.can_recv()
            && matches!(
                state,
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
                    | tcp::State::Closed
            )
        {
            self.guest_eof = true;
            let _ = stream.shutdown(Shutdown::Write);
            moved = true;
        }

        // Host -> guest.
        while self.readable && !self.host_eof && socket.may_send() && socket.can_send() {
            let result = socket.send(|buf| match stream.read(buf) {
                Ok(n) => (n, Ok((n, n < buf.len()))),
                Err(e) => (0, Err(e)),
            });
            match result {
                Ok(Ok((0, _))) => {
                    self.host_eof = true;
                    socket.close();
                    moved = true;
                }
                Ok(Ok((n, short))) => {
                    if !self.in_request {
                        self.in_request = true;
                        self.traffic.request(self.peer.ip());
                    }
                    self.traffic.inbound(self.peer.ip(), n);
                    moved = true;
                    if short {
                        // The kernel had less than there was room for: the
                        // socket is drained, and saying so spares the read
                        // that would fail with EAGAIN (one syscall per
                        // request). Its epoll interest is level-triggered,
                        // so bytes arriving later are reported again.
                        self.readable = false;
                        self.in_request = false;
                    }
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    self.in_request = false;
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "connection: read failed");
                    socket.abort();
                    self.stream = None;
                    return (Fate::Done, true);
                }
                Err(_) => break,
            }
        }
        // Both directions done on the host side: the host socket can go.
        if self.host_eof && self.guest_eof {
            self.stream = None;
            moved = true;
        }
        self.last_state = socket.state();
        (Fate::Open, moved)
    }

    /// Closes the host socket with a RST (SO_LINGER 0).
    fn reset_host(&mut self) {
        if let Some(stream) = self.stream.take() {
            if let Err(e) = linger_zero(&stream) {
                tracing::debug!(error = %e, "cannot set SO_LINGER");
            }
        }
    }

    fn wanted(&self, socket: &tcp::Socket) -> EventSet {
        let mut want = EventSet::empty();
        if self.stream.is_none() {
            return want;
        }
        if !self.host_eof && socket.may_send() && socket.send_queue() < socket.send_capacity() {
            want |= EventSet::IN;
        }
        if !self.writable && socket.can_recv() {
            want |= EventSet::OUT;
        }
        want
    }

    fn update_interest(&mut self, id: u64, epoll: &Epoll, sockets: &SocketSet) {
        let socket = sockets.get::<tcp::Socket>(self.handle);
        let want = self.wanted(socket);
        if want == self.interest {
            return;
        }
        let Some(stream) = &self.stream else {
            self.interest = EventSet::empty();
            return;
        };
        let fd = stream.as_raw_fd();
        let event = EpollEvent::new(want, token::conn(id));
        let result = if self.interest.is_empty() {
            epoll.ctl(ControlOperation::Add, fd, event)
        } else if want.is_empty() {
            // Unregistered, HUP and ERR cannot spin the loop while we do
            // not want to read or write.
            epoll.ctl(ControlOperation::Delete, fd, event)
        } else {
            epoll.ctl(ControlOperation::Modify, fd, event)
        };
        match result {
            Ok(()) => self.interest = want,
            Err(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "epoll for a connection failed")
            }
        }
    }

    fn deregister(&mut self, epoll: &Epoll) {
        if let (Some(stream), false) = (&self.stream, self.interest.is_empty()) {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.interest = EventSet::empty();
    }
}

/// Sets SO_LINGER {on, 0} so that closing `stream` sends a RST.
fn linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    crate::sys::setsockopt(stream, libc::SOL_SOCKET, libc::SO_LINGER, &linger)
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        NetMode, Network, NetworkConfig, Nic, PublishSpec, USER_FIRST_GUEST, USER_GATEWAY,
    };
    use std::time::Instant as StdInstant;

    /// Waits up to 5 s for `port` to receive a frame; returns them all.
    fn frames_of(port: &crate::port::GuestPort) -> Vec<Frame> {
        let give_up = StdInstant::now() + Duration::from_secs(5);
        loop {
            let got: Vec<Frame> = port.received().drain(..).collect();
            if !got.is_empty() || StdInstant::now() > give_up {
                return got;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn arp_request(from_mac: [u8; 6], from_ip: Ipv4Addr, target: Ipv4Addr) -> Frame {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&from_mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&from_mac);
        f.extend_from_slice(&from_ip.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target.octets());
        f
    }

    #[test]
    fn the_first_syn_to_a_fresh_guest_goes_out_at_once_and_arp_for_the_gateway_wakes_no_guest() {
        let host_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let own_mac = [0x02, 0, 0, 0, 0, 0x99];
        let other_ip = Ipv4Addr::new(10, 0, 2, 16);
        let config = NetworkConfig {
            mode: NetMode::User,
            publish: vec![PublishSpec {
                host: SocketAddr::from((Ipv4Addr::LOCALHOST, host_port)),
                guest_addr: None,
                guest_port: 7,
                proto: Proto::Tcp,
            }],
            nics: [(own_mac, USER_FIRST_GUEST), (mac_for(other_ip), other_ip)]
                .map(|(mac, ip)| Nic {
                    mac,
                    ip,
                    prefix: 24,
                    gateway: Some(USER_GATEWAY),
                })
                .to_vec(),
        };
        let network = Network::start(&config).unwrap();
        let (guest, other) = (network.port(0).unwrap(), network.port(1).unwrap());

        // No guest ever answered ARP: the SYN still goes straight to the
        // card's own MAC (given with its address), not an ARP broadcast.
        let _client = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
        let frames = frames_of(&guest);
        let first = frames.first().expect("a frame for the guest");
        assert_eq!(first[..6], own_mac, "to the card's MAC: {first:02x?}");
        assert_eq!(first[6..12], mac_for(USER_GATEWAY), "from the gateway");
        assert_eq!(first[12..14], [0x08, 0x00], "IPv4, not ARP: {first:02x?}");
        assert_eq!(first[23], 6, "TCP");
        assert_eq!(first[14 + 20 + 13] & 0x02, 0x02, "a SYN");

        // A guest asks who has the gateway's address: the gateway answers,
        // and the request is not flooded to the other guests.
        let mut ask = vec![arp_request(mac_for(other_ip), other_ip, USER_GATEWAY)];
        other.send(&mut ask);
        let reply = frames_of(&other);
        let reply = reply.first().expect("an ARP reply");
        assert_eq!(reply[..6], mac_for(other_ip));
        assert_eq!(reply[12..14], [0x08, 0x06], "ARP");
        assert_eq!(reply[20..22], [0, 2], "a reply");
        assert_eq!(reply[22..28], mac_for(USER_GATEWAY), "the gateway's MAC");
        assert_eq!(reply[28..32], USER_GATEWAY.octets());
        // Asked again: once the second reply is back, the network thread
        // has handed over everything it switched before (the first
        // request's flood, were there one).
        other.send(&mut vec![arp_request(
            mac_for(other_ip),
            other_ip,
            USER_GATEWAY,
        )]);
        assert!(!frames_of(&other).is_empty(), "a second ARP reply");
        let leaked: Vec<Frame> = guest
            .received()
            .drain(..)
            .filter(|f| f[12..14] == [0x08, 0x06])
            .collect();
        assert!(
            leaked.is_empty(),
            "ARP flooded to another guest: {leaked:02x?}"
        );
    }
}
