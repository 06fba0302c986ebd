//! Host networking: everything between a guest's virtio-net device and the
//! outside world. It owns the virtual switch (on its own thread) with the
//! guests' ports, the user-mode gateway and its published host ports, the
//! TAP uplink, the encrypted UDP overlay between hosts with its datagram
//! sealing ([`overlay_crypto`]), the traffic counters, and the epoll wait
//! helper ([`wait`]) the network thread and idle vCPUs share. It knows
//! nothing of KVM or of the VMM (which depends on it, not the reverse).
//!
//! Guest networking: a virtual switch on its own thread, with the guests'
//! virtio-net devices, the user-mode gateway and a TAP device as ports.
//!
//! ```text
//!  vCPU thread (guest 0) --GuestPort--+
//!  vCPU thread (guest 1) --GuestPort--+-- switch --+-- gateway (smoltcp, 10.0.2.2) -- published host ports
//!                                     |            +-- TAP device (--net tap=NAME)
//! ```
//!
//! - **User mode** (`--net user`, implied by `--publish`; no root needed):
//!   subnet 10.0.2.0/24, gateway 10.0.2.2 ([`gateway`]), guests from
//!   10.0.2.15 up. Published host ports are proxied into the guests.
//! - **TAP** (`--net tap=NAME`): the switch's uplink is a TAP device of the
//!   host ([`tap`]); the host configures its side.
//!
//! The network thread waits in epoll on an eventfd the guests' vCPU
//! threads signal when they hand over frames, on the listeners and proxied
//! connections, and on the TAP device, with smoltcp's next deadline as the
//! timeout. Frames cross threads in batches (see [`port`]).
//!
//! A guest that spins on its rings when idle (`abi::boot::NetPoll`) is
//! served by the network thread itself ([`port::RingServer`]): frames go
//! into its receive ring as they are switched to it, and for [`WATCH`]
//! after that the thread watches its transmit ring for the reply (epoll
//! without sleeping), so a request and its reply cross without a VM exit.
//! With [`clients::CLIENTS_HOLD_OFF`] clients at once it holds guests off polling:
//! requests then come in batches (one exit serves many) and the CPU a
//! spinning guest would hold is what the clients and this thread need.
//!
//! Every queue between a guest and anything else is bounded, as a real
//! switch's buffers are: the port's queues ([`port`]), each port's outbox
//! ([`OUTBOX_MAX`]) and the gateway's inbox ([`GATEWAY_INBOX_MAX`]); what a
//! guest floods (broadcast, multicast, unknown unicast) is rate-limited per
//! port ([`FLOOD_RATE`]). What does not fit is dropped and counted
//! (`GET /v1/stats`).

pub mod clients;
mod error;
pub mod gateway;
pub mod overlay;
pub mod overlay_crypto;
pub mod pool;
pub mod port;
pub mod switch;
mod sys;
pub mod tap;
pub mod traffic;
pub mod wait;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use crate::error::NetError;
use crate::wait::wait_events;
use shim_util::limit::TokenBucket;

use gateway::{Gateway, HostSocketKind, Published};
use port::{Frame, GuestPort, ReadyPorts};
use switch::{PortId, Route, Switch};
use tap::Tap;

/// The user-mode network's subnet, prefix length, gateway and first guest.
pub const USER_SUBNET: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
pub const USER_PREFIX: u8 = 24;
pub const USER_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const USER_FIRST_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// Largest frame the switch forwards (no FCS, no VLAN tag).
const MAX_FRAME: usize = 1514;
/// Frames read from the TAP device per round.
const TAP_BATCH: usize = 256;
/// Rounds of switching per wake-up before epoll is asked again.
const MAX_ROUNDS: usize = 64;
/// How long the network thread watches the transmit ring of a guest that
/// polls, after it last put frames in its receive ring, for the replies
/// (spinning: bounded). A reply the guest queues later costs it an exit.
const WATCH: std::time::Duration = std::time::Duration::from_micros(50);
/// Guests whose transmit rings the network thread watches at once (more
/// are served the usual way, through their vCPU threads).
const WATCH_MAX: usize = 8;

/// A polling guest's transmit ring the network thread watches: until when,
/// and for how many replies. It stops at the deadline, or once the guest
/// sent as many frames as it was handed since the watch began (one reply
/// per request, as for a client with one request in flight; with several
/// clients, one reply does not end the watch while others are due).
struct Watch {
    port: PortId,
    until: std::time::Instant,
    unanswered: usize,
}

impl Watch {
    /// Counts the `sent` frames a serve of the ring took out as replies.
    fn answered(&mut self, sent: usize) {
        self.unanswered = self.unanswered.saturating_sub(sent);
    }

    /// Whether to keep watching at `now` after a serve that took `sent`
    /// frames out: before the deadline, while nothing came out yet or
    /// replies are still due.
    fn goes_on(&self, now: std::time::Instant, sent: usize) -> bool {
        now < self.until && (sent == 0 || self.unanswered > 0)
    }
}

/// Frames the switch holds for one port (a guest, a peer, the TAP device)
/// before handing them over; more are dropped and counted, as a switch
/// with a full port buffer does.
pub const OUTBOX_MAX: usize = 1024;
/// Frames waiting for the gateway's TCP/IP stack; more are dropped.
pub const GATEWAY_INBOX_MAX: usize = 1024;
/// Frames a guest may have flooded (broadcast, multicast, unknown unicast:
/// copied to every port, the gateway and every overlay peer) per second...
pub const FLOOD_RATE: u64 = 500;
/// ... after a burst of this many; more are dropped and counted.
pub const FLOOD_BURST: u64 = 100;

pub use ::api::publish::{Proto, PublishSpec};

/// Which network the guests get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// No network device (the default without network flags).
    None,
    /// The user-mode network with its gateway.
    User,
    /// A TAP device of the host as the uplink.
    Tap(String),
}

/// One guest's network card and addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nic {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl Nic {
    /// The `lc.ip` / `lc.gw` parameters of the guest command line.
    pub fn cmdline_params(&self) -> Vec<(String, String)> {
        let mut params = vec![(
            abi::cmdline::IP_KEY.to_owned(),
            format!("{}/{}", self.ip, self.prefix),
        )];
        if let Some(gw) = self.gateway {
            params.push((abi::cmdline::GATEWAY_KEY.to_owned(), gw.to_string()));
        }
        params
    }
}

/// A MAC as `ip link` writes it: `52:54:00:12:34:56`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC the shim gives an address: locally administered, unicast,
/// `02:4c:` + the four bytes of the IPv4 address (unique per address).
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x4c, o[0], o[1], o[2], o[3]]
}

/// Whether `ip` lies in `net`/`prefix`.
pub fn in_subnet(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// The network of a run: what to attach and what to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// [`NetMode::User`] or [`NetMode::Tap`].
    pub mode: NetMode,
    /// Published ports (user mode only).
    pub publish: Vec<PublishSpec>,
    /// The guests' cards: the main guest first, then each `--also`.
    pub nics: Vec<Nic>,
}

/// epoll tokens of the network thread: a kind in the top byte, an index
/// below.
pub(crate) mod token {
    pub const WAKE: u64 = 0;
    pub const STOP: u64 = 1;
    pub const TAP: u64 = 2;
    pub const LISTENER: u64 = 3;
    pub const CONN: u64 = 4;
    pub const OVERLAY: u64 = 5;

    pub fn listener(index: usize) -> u64 {
        (LISTENER << 56) | index as u64
    }
    pub fn conn(id: u64) -> u64 {
        (CONN << 56) | (id & ((1 << 56) - 1))
    }
    pub fn kind(token: u64) -> u64 {
        token >> 56
    }
    pub fn index(token: u64) -> u64 {
        token & ((1 << 56) - 1)
    }
}

/// The running network: the switch thread and the guests' ports.
pub struct Network {
    ports: Vec<Arc<GuestPort>>,
    overlay_addr: Option<SocketAddr>,
    overlay_rejected: Option<Arc<std::sync::atomic::AtomicU64>>,
    wake: Arc<EventFd>,
    stop: Arc<EventFd>,
    commands: Arc<Mutex<Vec<Command>>>,
    thread: Option<thread::JoinHandle<()>>,
    /// The published ports' counters, in publishing order.
    traffic: Mutex<Vec<(PublishSpec, Ipv4Addr, Arc<traffic::PortTraffic>)>>,
    /// Round trips to the other shims of the overlay.
    rtts: overlay::Rtts,
    /// Frames the switch dropped: a port's outbox or the gateway's inbox
    /// was full.
    dropped: Arc<AtomicU64>,
}

/// Changes to a running network, carried out by its thread.
enum Command {
    Attach(Arc<GuestPort>),
    Detach(Arc<GuestPort>),
    Publish(Published, HostSocketKind),
    Unpublish(SocketAddr, Proto),
    AddPeer(SocketAddr),
    RemovePeer(SocketAddr),
    /// The guest of this port moved to the shim at `peer`: detach it and
    /// send its MAC's frames (and those still waiting in the port, after
    /// the first `skip`, which went with the guest's state) there.
    Moved {
        port: Arc<GuestPort>,
        peer: Option<SocketAddr>,
        skip: usize,
    },
}

/// How a shared network (the daemon's) is set up.
#[derive(Clone, Debug)]
pub struct SharedNetConfig {
    /// The gateway's address (its MAC is [`mac_for`] it) and prefix.
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// The overlay to other shims, if any.
    pub overlay: Option<overlay::OverlayConfig>,
    /// This shim's name (for messages).
    pub shim_name: String,
}

impl Network {
    /// Binds the published ports, opens the TAP device and starts the
    /// network thread. Errors (a port in use, no TAP permission) come
    /// before any guest boots.
    pub fn start(config: &NetworkConfig) -> Result<Self, NetError> {
        let tap = match &config.mode {
            NetMode::Tap(name) => Some(Tap::open(name)?),
            _ => None,
        };
        let mut net = Self::launch_for(config, &config.mode, tap)?;
        for nic in &config.nics {
            net.ports.push(net.attach(nic.mac)?);
        }
        Ok(net)
    }

    /// The user-mode network of `config` (gateway and published ports) for
    /// a guest another monitor runs behind the TAP device `leg` (see
    /// [`Tap::host_side`]): the TAP is a port of the switch, and no guest
    /// port of ours is attached.
    pub fn start_with_leg(config: &NetworkConfig, leg: Tap) -> Result<Self, NetError> {
        Self::launch_for(config, &NetMode::User, Some(leg))
    }

    /// [`Self::launch`] for `config`'s guests in `mode`, with its published
    /// ports bound and recorded in user mode.
    fn launch_for(
        config: &NetworkConfig,
        mode: &NetMode,
        tap: Option<Tap>,
    ) -> Result<Self, NetError> {
        let main_ip = config.nics.first().map_or(USER_FIRST_GUEST, |n| n.ip);
        let published = match mode {
            NetMode::User => bind_published(&config.publish, main_ip)?,
            _ => Vec::new(),
        };
        let traffic = record(&config.publish, &published);
        let net = Self::launch(
            mode,
            tap,
            USER_GATEWAY,
            USER_PREFIX,
            published,
            None,
            &config.nics,
        )?;
        *lock(&net.traffic) = traffic;
        Ok(net)
    }

    /// A user-mode network with a gateway and no guests yet: guests attach
    /// and publish ports while it runs ([`Self::attach`], [`Self::publish`]).
    pub fn start_shared(config: &SharedNetConfig) -> Result<Self, NetError> {
        Self::launch(
            &NetMode::User,
            None,
            config.gateway,
            config.prefix,
            Vec::new(),
            config.overlay.as_ref(),
            &[],
        )
    }

    fn launch(
        mode: &NetMode,
        tap: Option<Tap>,
        gateway_ip: Ipv4Addr,
        prefix: u8,
        published: Vec<(Published, HostSocketKind)>,
        overlay: Option<&overlay::OverlayConfig>,
        nics: &[Nic],
    ) -> Result<Self, NetError> {
        let epoll = Epoll::new().map_err(setup("epoll"))?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?);
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?);
        for (fd, tok) in [
            (wake.as_raw_fd(), token::WAKE),
            (stop.as_raw_fd(), token::STOP),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, tok),
                )
                .map_err(setup("epoll"))?;
        }
        let gateway = match mode {
            NetMode::User => {
                let mut gw =
                    Gateway::new(mac_for(gateway_ip), gateway_ip, prefix, published, &epoll)
                        .map_err(setup("the gateway"))?;
                // Cards with a MAC of their own (`--mac`); the others'
                // the gateway knows from their address.
                for nic in nics {
                    gw.neighbour(nic.ip, nic.mac);
                }
                Some(gw)
            }
            _ => None,
        };
        if let Some(tap) = &tap {
            epoll
                .ctl(
                    ControlOperation::Add,
                    tap.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token::TAP),
                )
                .map_err(setup("epoll"))?;
            tracing::info!(tap = tap.name(), "guest network on a TAP device");
        }
        let (overlay, peers) = match overlay {
            Some(config) => {
                let o = overlay::Overlay::bind(config).map_err(|e| {
                    NetError::Setup(format!(
                        "cannot bind the overlay at udp {}: {e}",
                        config.listen
                    ))
                })?;
                epoll
                    .ctl(
                        ControlOperation::Add,
                        o.socket().as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token::OVERLAY),
                    )
                    .map_err(setup("epoll"))?;
                (Some(o), config.peers.clone())
            }
            None => (None, Vec::new()),
        };
        let overlay_addr = overlay.as_ref().map(overlay::Overlay::local_addr);
        let rtts = overlay.as_ref().map(|o| o.rtts()).unwrap_or_default();
        let overlay_rejected = overlay.as_ref().map(overlay::Overlay::rejected);
        let commands = Arc::new(Mutex::new(
            peers.into_iter().map(Command::AddPeer).collect::<Vec<_>>(),
        ));
        let mut engine = Engine::new(
            epoll,
            Arc::clone(&wake),
            Arc::clone(&commands),
            gateway,
            tap,
        );
        engine.overlay = overlay;
        let dropped = Arc::clone(&engine.dropped);
        let thread = thread::Builder::new()
            .name("net".into())
            .spawn(move || engine.run())
            .map_err(setup("cannot start the network thread"))?;
        Ok(Self {
            ports: Vec::new(),
            overlay_addr,
            overlay_rejected,
            wake,
            stop,
            commands,
            thread: Some(thread),
            traffic: Mutex::default(),
            rtts,
            dropped,
        })
    }

    fn command(&self, command: Command) {
        lock(&self.commands).push(command);
        if let Err(e) = self.wake.write(1) {
            tracing::warn!(error = %e, "cannot wake the network thread");
        }
    }

    /// The overlay's local UDP address, if this network has one.
    pub fn overlay_addr(&self) -> Option<SocketAddr> {
        self.overlay_addr
    }

    /// Frames the switch dropped because a port's queue was full.
    pub fn switch_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Overlay datagrams dropped for failing authentication (fleet key).
    pub fn overlay_rejected(&self) -> u64 {
        self.overlay_rejected
            .as_ref()
            .map_or(0, |n| n.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Adds another shim's overlay address to the peers.
    pub fn add_peer(&self, peer: SocketAddr) {
        if self.overlay_addr.is_some() && Some(peer) != self.overlay_addr {
            self.command(Command::AddPeer(peer));
        }
    }

    /// Takes no more datagrams from the shim at overlay address `peer` (its
    /// host was unpinned). Frames already on their way to it still go.
    pub fn remove_peer(&self, peer: SocketAddr) {
        if self.overlay_addr.is_some() {
            self.command(Command::RemovePeer(peer));
        }
    }

    /// A guest left this shim for the shim at overlay address `peer`: its
    /// port leaves the switch, and frames for its MAC (including those that
    /// were waiting for it) go to `peer`.
    pub fn moved(&self, port: &Arc<GuestPort>, peer: Option<SocketAddr>, skip: usize) {
        self.command(Command::Moved {
            port: Arc::clone(port),
            peer: peer.filter(|_| self.overlay_addr.is_some()),
            skip,
        });
    }

    /// The port of guest `index` of the configuration (0 = the main guest).
    pub fn port(&self, index: usize) -> Option<Arc<GuestPort>> {
        self.ports.get(index).cloned()
    }

    /// A new port on the switch for a guest card with `mac`.
    pub fn attach(&self, mac: [u8; 6]) -> Result<Arc<GuestPort>, NetError> {
        let port = Arc::new(GuestPort::new(mac, Arc::clone(&self.wake)).map_err(setup("eventfd"))?);
        self.command(Command::Attach(Arc::clone(&port)));
        Ok(port)
    }

    /// Takes `port` off the switch (its guest left or ended).
    pub fn detach(&self, port: &Arc<GuestPort>) {
        self.command(Command::Detach(Arc::clone(port)));
    }

    /// Binds `spec` on the host and forwards it to `guest_ip` (the guest
    /// named in `spec` wins).
    pub fn publish(&self, spec: &PublishSpec, guest_ip: Ipv4Addr) -> Result<(), NetError> {
        let mut bound = bind_published(std::slice::from_ref(spec), guest_ip)?;
        lock(&self.traffic).extend(record(std::slice::from_ref(spec), &bound));
        if let Some((p, socket)) = bound.pop() {
            self.command(Command::Publish(p, socket));
        }
        Ok(())
    }

    /// Stops forwarding `spec`'s host port.
    pub fn unpublish(&self, spec: &PublishSpec) {
        lock(&self.traffic).retain(|(s, _, _)| !(s.host == spec.host && s.proto == spec.proto));
        self.command(Command::Unpublish(spec.host, spec.proto));
    }

    /// The published ports' counters now.
    pub fn port_stats(&self) -> Vec<traffic::PortStats> {
        lock(&self.traffic)
            .iter()
            .map(|(spec, guest, t)| {
                t.snapshot(
                    format!("{}/{}", spec.host, spec.proto),
                    std::net::SocketAddrV4::new(*guest, spec.guest_port),
                )
            })
            .collect()
    }

    /// The smoothed round trips to the other shims of the overlay.
    pub fn peer_rtts(&self) -> Vec<overlay::PeerRtt> {
        self.rtts.list()
    }
}

/// The counters of freshly bound ports, for [`Network::port_stats`].
fn record(
    specs: &[PublishSpec],
    bound: &[(Published, HostSocketKind)],
) -> Vec<(PublishSpec, Ipv4Addr, Arc<traffic::PortTraffic>)> {
    specs
        .iter()
        .zip(bound)
        .map(|(s, (p, _))| (s.clone(), p.guest.0, Arc::clone(&p.traffic)))
        .collect()
}

fn setup(what: &str) -> impl Fn(io::Error) -> NetError {
    let what = what.to_owned();
    move |e: io::Error| NetError::Setup(format!("{what}: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the network thread panicked");
            }
        }
    }
}

/// Binds the host side of every published port.
fn bind_published(
    specs: &[PublishSpec],
    main_ip: Ipv4Addr,
) -> Result<Vec<(Published, HostSocketKind)>, NetError> {
    let mut out = Vec::new();
    for spec in specs {
        let bind_err = |err: io::Error| {
            if err.kind() == io::ErrorKind::AddrInUse {
                NetError::PortInUse {
                    addr: spec.host,
                    proto: spec.proto,
                }
            } else {
                NetError::Bind {
                    addr: spec.host,
                    proto: spec.proto,
                    err,
                }
            }
        };
        let socket = match spec.proto {
            Proto::Tcp => {
                let l = TcpListener::bind(spec.host).map_err(bind_err)?;
                l.set_nonblocking(true).map_err(bind_err)?;
                HostSocketKind::Tcp(l)
            }
            Proto::Udp => {
                let s = UdpSocket::bind(spec.host).map_err(bind_err)?;
                s.set_nonblocking(true).map_err(bind_err)?;
                HostSocketKind::Udp(s)
            }
        };
        let guest = (spec.guest_addr.unwrap_or(main_ip), spec.guest_port);
        tracing::info!(
            host = %spec.host,
            proto = %spec.proto,
            guest = %guest.0,
            port = guest.1,
            "publishing"
        );
        out.push((
            Published {
                host: spec.host,
                guest,
                proto: spec.proto,
                traffic: Arc::default(),
            },
            socket,
        ));
    }
    Ok(out)
}

/// What is plugged into a switch port.
enum Slot {
    Free,
    Guest(Arc<GuestPort>),
    Gateway,
    Tap,
    /// Another shim, over the overlay.
    Peer(SocketAddr),
}

/// The network thread's state.
struct Engine {
    epoll: Epoll,
    wake: Arc<EventFd>,
    commands: Arc<Mutex<Vec<Command>>>,
    switch: Switch,
    slots: Vec<Slot>,
    gateway: Option<Gateway>,
    tap: Option<Tap>,
    tap_readable: bool,
    overlay: Option<overlay::Overlay>,
    overlay_readable: bool,
    /// When the overlay's peers are probed next.
    next_probe: std::time::Instant,
    /// The guest ports that sent frames since they were last looked at.
    ready: Arc<ReadyPorts>,
    /// Scratch for the ready ports of a round.
    ready_now: Vec<PortId>,
    /// Frames switched to each port, not yet handed over.
    outboxes: Outboxes,
    /// The guests that poll whose transmit rings are watched (see
    /// [`Watch`]).
    watched: Vec<Watch>,
    /// How many clients the network thread serves at once.
    clients: clients::Clients,
    /// Each port's budget of flooded frames (enforced on guests').
    floods: Vec<TokenBucket>,
    /// Scratch for frames coming in.
    incoming: Vec<Frame>,
    /// Frames dropped for a full outbox or gateway inbox.
    dropped: Arc<AtomicU64>,
    /// The rate limit of warnings about them.
    warnings: shim_util::limit::Warnings,
}

impl Engine {
    fn new(
        epoll: Epoll,
        wake: Arc<EventFd>,
        commands: Arc<Mutex<Vec<Command>>>,
        gateway: Option<Gateway>,
        tap: Option<Tap>,
    ) -> Self {
        let mut slots = Vec::new();
        if gateway.is_some() {
            slots.push(Slot::Gateway);
        }
        if tap.is_some() {
            slots.push(Slot::Tap);
        }
        let outboxes = Outboxes {
            boxes: slots.iter().map(|_| Vec::new()).collect(),
            ..Outboxes::default()
        };
        let floods = slots.iter().map(|_| flood_budget()).collect();
        Self {
            epoll,
            wake,
            commands,
            switch: Switch::new(),
            slots,
            gateway,
            tap,
            tap_readable: false,
            overlay: None,
            overlay_readable: false,
            next_probe: std::time::Instant::now(),
            ready: Arc::default(),
            ready_now: Vec::new(),
            outboxes,
            watched: Vec::new(),
            clients: clients::Clients::default(),
            floods,
            incoming: Vec::new(),
            dropped: Arc::default(),
            warnings: Default::default(),
        }
    }

    /// The port of the gateway or the TAP device: they take the first
    /// ports, made with the engine, so the thousands of guest ports after
    /// them are not looked at (this runs on every round).
    fn slot_of(&self, want: fn(&Slot) -> bool) -> Option<PortId> {
        self.slots.iter().take(2).position(want)
    }

    fn add_slot(&mut self, slot: Slot) -> PortId {
        match self.slots.iter().position(|s| matches!(s, Slot::Free)) {
            Some(i) => {
                self.slots[i] = slot;
                self.outboxes.boxes[i].clear();
                self.floods[i] = flood_budget();
                i
            }
            None => {
                self.slots.push(slot);
                self.outboxes.boxes.push(Vec::new());
                self.floods.push(flood_budget());
                self.slots.len() - 1
            }
        }
    }

    fn run_commands(&mut self) {
        let commands = std::mem::take(&mut *lock(&self.commands));
        for command in commands {
            match command {
                Command::Attach(port) => {
                    let mac = port.mac();
                    let id = self.add_slot(Slot::Guest(Arc::clone(&port)));
                    port.plug(id, &self.ready);
                    // A guest that comes back must not be looked for
                    // where it was.
                    self.switch.learn(mac, id);
                    tracing::debug!(port = id, "switch: a guest attached");
                }
                Command::AddPeer(peer) => {
                    if self.overlay.as_ref().is_some_and(|o| o.add_peer(peer)) {
                        self.peer_slot(peer);
                    }
                }
                Command::RemovePeer(peer) => {
                    if self.overlay.as_ref().is_some_and(|o| o.remove_peer(peer)) {
                        tracing::info!(%peer, "overlay: no more datagrams from the peer");
                    }
                }
                Command::Moved { port, peer, skip } => {
                    self.free_slot_of(&port);
                    let left: Vec<Frame> = port.received().drain(..).skip(skip).collect();
                    match peer.map(|p| self.peer_slot(p)) {
                        Some(to) => {
                            self.switch.learn(port.mac(), to);
                            tracing::debug!(
                                mac = %fmt_mac(&port.mac()),
                                peer = ?peer,
                                frames = left.len(),
                                "guest moved to a peer: its waiting frames follow it"
                            );
                            for frame in left {
                                self.outboxes.push(to, frame);
                            }
                            self.hand_over();
                        }
                        None => self.switch.forget_mac(port.mac()),
                    }
                }
                Command::Detach(port) => {
                    if let Some(id) = self.free_slot_of(&port) {
                        tracing::debug!(port = id, "switch: the guest detached");
                    }
                }
                Command::Publish(p, socket) => {
                    if let Some(gw) = self.gateway.as_mut() {
                        let what = p.host;
                        if let Err(e) = gw.publish(p, socket, &self.epoll) {
                            tracing::warn!(host = %what, error = %e, "cannot publish");
                        }
                    }
                }
                Command::Unpublish(host, proto) => {
                    if let Some(gw) = self.gateway.as_mut() {
                        gw.unpublish(host, proto, &self.epoll);
                    }
                }
            }
        }
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            self.run_commands();
            let timeout = if self.tap_readable || self.overlay_readable || !self.watched.is_empty()
            {
                Some(std::time::Duration::ZERO)
            } else {
                self.gateway.as_mut().and_then(Gateway::poll_delay)
            };
            let timeout = [self.probe_due(), self.ready.seat_check_due()]
                .into_iter()
                .fold(timeout, |a, b| match (a, b) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                });
            let n = match wait_events(&self.epoll, timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    tracing::error!(error = %e, "the network thread stops: epoll failed");
                    return;
                }
            };
            for event in &events[..n] {
                let tok = event.data();
                match tok {
                    token::WAKE => {
                        let _ = self.wake.read();
                    }
                    token::STOP => return,
                    token::TAP => self.tap_readable = true,
                    token::OVERLAY => self.overlay_readable = true,
                    _ => {
                        if let Some(gw) = self.gateway.as_mut() {
                            gw.on_event(tok, event.event_set(), &self.epoll);
                        }
                    }
                }
            }
            self.clients.tick();
            self.run_commands();
            self.pump();
            if self.probe_due() == Some(std::time::Duration::ZERO) {
                self.probe_peers();
            }
            if self.ready.seat_check_due() == Some(std::time::Duration::ZERO) {
                self.ready.check_seats();
            }
        }
    }

    /// How long until the peers are probed next (`None`: no overlay).
    fn probe_due(&self) -> Option<std::time::Duration> {
        self.overlay.as_ref()?;
        Some(
            self.next_probe
                .saturating_duration_since(std::time::Instant::now()),
        )
    }

    /// Probes every overlay peer (round trips for `GET /v1/stats`).
    fn probe_peers(&mut self) {
        self.next_probe = std::time::Instant::now() + overlay::PROBE_INTERVAL;
        if let Some(overlay) = self.overlay.as_ref() {
            overlay.probe(self.slots.iter().filter_map(|s| match s {
                Slot::Peer(p) => Some(*p),
                _ => None,
            }));
        }
    }

    /// Switches frames until nothing moves (or [`MAX_ROUNDS`]).
    fn pump(&mut self) {
        for _ in 0..MAX_ROUNDS {
            let mut moved = self.serve_watched();
            let mut ready = std::mem::take(&mut self.ready_now);
            self.ready.take(&mut ready);
            for &index in &ready {
                // A stale entry (the port left) finds another guest's
                // port, which has nothing, or a free slot.
                if let Some(Slot::Guest(port)) = self.slots.get(index) {
                    port.take_sent(&mut self.incoming);
                    moved |= self.forward_incoming(index);
                }
            }
            self.ready_now = ready;
            if self.overlay_readable {
                moved |= self.read_overlay();
            }
            let tap_port = self.slot_of(|s| matches!(s, Slot::Tap));
            if let (Some(tap), true) = (self.tap.as_mut(), self.tap_readable) {
                match tap.read_frames(&mut self.incoming, TAP_BATCH) {
                    Ok(drained) => self.tap_readable = !drained,
                    Err(e) => {
                        tracing::warn!(tap = tap.name(), error = %e, "cannot read the TAP device");
                        self.tap_readable = false;
                    }
                }
                if let Some(port) = tap_port {
                    moved |= self.forward_incoming(port);
                }
            }
            if let Some(port) = self.slot_of(|s| matches!(s, Slot::Gateway)) {
                let gw = self
                    .gateway
                    .as_mut()
                    .expect("gateway port implies a gateway");
                let room = GATEWAY_INBOX_MAX.saturating_sub(gw.inbox.len());
                let frames = &mut self.outboxes.boxes[port];
                let over = frames.len().saturating_sub(room);
                gw.inbox.extend(frames.drain(..frames.len() - over));
                frames.clear();
                moved |= gw.step(&self.epoll);
                self.incoming.append(&mut gw.outbox);
                self.note_dropped(over, "the gateway's inbox is full");
                moved |= self.forward_incoming(port);
            }
            self.hand_over();
            if !moved {
                break;
            }
        }
    }

    /// Serves the watched guests' rings (their replies go out); ends the
    /// watches that saw their reply or ran out of time. Whether any frame
    /// moved.
    fn serve_watched(&mut self) -> bool {
        if self.watched.is_empty() {
            return false;
        }
        let now = std::time::Instant::now();
        let mut moved = false;
        let slots = &self.slots;
        let hold_off = self.clients.hold_off;
        self.watched.retain_mut(|w| {
            let Some(Slot::Guest(port)) = slots.get(w.port) else {
                return false;
            };
            let served = port.serve(true, hold_off);
            moved |= served.sent > 0 || served.delivered > 0;
            w.answered(served.sent);
            if w.goes_on(now, served.sent) {
                return true;
            }
            // The replies went out (or they are late): stop watching, then
            // look once more for what the guest queued before it saw that.
            port.watch(false);
            moved |= port.serve(true, hold_off).sent > 0;
            false
        });
        moved
    }

    /// Watches `index`'s transmit ring (guest `port` polls) for [`WATCH`]
    /// from now, for the replies to `frames` more frames.
    fn watch(watched: &mut Vec<Watch>, index: PortId, port: &GuestPort, frames: usize) {
        let until = std::time::Instant::now() + WATCH;
        if let Some(w) = watched.iter_mut().find(|w| w.port == index) {
            w.until = until;
            w.unanswered = w.unanswered.saturating_add(frames);
        } else if watched.len() < WATCH_MAX {
            port.watch(true);
            watched.push(Watch {
                port: index,
                until,
                unanswered: frames,
            });
        }
    }

    /// Takes `port`'s guest off the switch (its slot, queued frames and
    /// learnt addresses); returns the switch port it had.
    fn free_slot_of(&mut self, port: &Arc<GuestPort>) -> Option<PortId> {
        let id = self
            .slots
            .iter()
            .position(|s| matches!(s, Slot::Guest(p) if Arc::ptr_eq(p, port)))?;
        self.slots[id] = Slot::Free;
        port.unplug();
        self.outboxes.boxes[id].clear();
        self.switch.forget_port(id);
        Some(id)
    }

    /// The switch port of overlay peer `peer` (made if new).
    fn peer_slot(&mut self, peer: SocketAddr) -> PortId {
        if let Some(id) = self
            .slots
            .iter()
            .position(|s| matches!(s, Slot::Peer(p) if *p == peer))
        {
            return id;
        }
        let id = self.add_slot(Slot::Peer(peer));
        tracing::info!(%peer, port = id, "overlay: a peer on a switch port");
        id
    }

    /// Reads overlay datagrams into the switch; whether any came.
    fn read_overlay(&mut self) -> bool {
        let Some(overlay) = self.overlay.as_ref() else {
            self.overlay_readable = false;
            return false;
        };
        let mut got = Vec::new();
        self.overlay_readable = !overlay.receive(&mut got, TAP_BATCH);
        let any = !got.is_empty();
        for (from, frame) in got {
            let slot = self.peer_slot(from);
            self.incoming.push(frame);
            self.forward_incoming(slot);
        }
        any
    }

    /// Hands what was switched to the ports with frames waiting (not the
    /// gateway's, which its step takes) to their guests, peers or the TAP
    /// device.
    fn hand_over(&mut self) {
        let mut dirty = std::mem::take(&mut self.outboxes.dirty);
        for &index in &dirty {
            let frames = &mut self.outboxes.boxes[index];
            match &self.slots[index] {
                Slot::Guest(guest) => {
                    self.clients.saw_frames(frames.iter());
                    // A guest that spins on its rings when idle gets the
                    // frames now, without an exit, and its reply is watched
                    // for: from before it can see them (the vCPU thread of
                    // a guest that sleeps wakes as they are queued).
                    if !self.clients.hold_off && guest.spins() {
                        Self::watch(&mut self.watched, index, guest, frames.len());
                    }
                    // Counted in the guest's port (`rx_dropped`).
                    let dropped = guest.deliver(frames);
                    if dropped > 0 {
                        tracing::debug!(port = index, dropped, "frames dropped: backlog full");
                    }
                    let watch = self.watched.iter_mut().find(|w| w.port == index);
                    let served = guest.serve(watch.is_some(), self.clients.hold_off);
                    if let Some(w) = watch {
                        w.answered(served.sent);
                    }
                }
                Slot::Tap => {
                    if let Some(tap) = self.tap.as_mut() {
                        tap.write_frames(frames);
                    }
                }
                Slot::Peer(peer) => {
                    if let Some(overlay) = self.overlay.as_ref() {
                        overlay.send(*peer, frames);
                    }
                }
                Slot::Free => frames.clear(),
                Slot::Gateway => {}
            }
        }
        dirty.clear();
        self.outboxes.dirty = dirty;
    }

    /// Switches the frames in `incoming`, which came from `from`.
    fn forward_incoming(&mut self, from: PortId) -> bool {
        if self.incoming.is_empty() {
            return false;
        }
        let mut dropped = 0;
        let gateway_slot = self.slot_of(|s| matches!(s, Slot::Gateway));
        for frame in self.incoming.drain(..) {
            if frame.len() > MAX_FRAME {
                tracing::debug!(port = from, bytes = frame.len(), "frame dropped: too long");
                continue;
            }
            // Split horizon: what came from a peer never goes to a peer.
            let from_peer = matches!(self.slots[from], Slot::Peer(_));
            // A frame relayed by another shim never takes a station that
            // is on a local port (a moved guest's leftover frames carry
            // this shim's gateway as their source).
            let slots = &self.slots;
            let route = if from_peer {
                self.switch.route_with(from, &frame, |now| {
                    matches!(
                        slots.get(now),
                        Some(Slot::Peer(_)) | Some(Slot::Free) | None
                    )
                })
            } else {
                self.switch.route(from, &frame)
            };
            match route {
                Route::Port(to) => {
                    if !(from_peer && matches!(self.slots[to], Slot::Peer(_))) {
                        dropped += self.outboxes.push(to, frame);
                    }
                }
                Route::Flood => {
                    if let Slot::Guest(port) = &self.slots[from] {
                        if !self.floods[from].take(1) {
                            port.flood_dropped();
                            continue;
                        }
                    }
                    // Who has the gateway's address: only the gateway
                    // answers, so the other guests are not woken for it.
                    if let (Some(gw), Some(to)) = (&self.gateway, gateway_slot) {
                        if to != from && arp_request_for(&frame) == Some(gw.ip()) {
                            dropped += self.outboxes.push(to, frame);
                            continue;
                        }
                    }
                    for (to, slot) in self.slots.iter().enumerate() {
                        let skip = matches!(slot, Slot::Free)
                            || (from_peer && matches!(slot, Slot::Peer(_)));
                        if to != from && !skip {
                            dropped += self.outboxes.push(to, frame.clone());
                        }
                    }
                }
                Route::Drop => {}
            }
        }
        self.note_dropped(dropped, "a port's queue is full");
        true
    }

    /// Counts `n` frames dropped (and warns, rate-limited).
    fn note_dropped(&self, n: usize, why: &str) {
        if n == 0 {
            return;
        }
        let total = self.dropped.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        shim_util::guest_warn!(
            self.warnings,
            dropped = n,
            reason = why,
            total,
            "switch: frames dropped"
        );
    }
}

/// The address an ARP request (Ethernet, IPv4) asks for.
fn arp_request_for(frame: &[u8]) -> Option<Ipv4Addr> {
    // Ethertype 0x0806; hardware 1 (Ethernet), protocol 0x0800, lengths
    // 6 and 4, operation 1 (request); the target address at 38..42.
    const ARP_REQUEST: [u8; 10] = [0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1];
    if frame.get(12..22)? != ARP_REQUEST {
        return None;
    }
    let target: [u8; 4] = frame.get(38..42)?.try_into().ok()?;
    Some(Ipv4Addr::from(target))
}

fn flood_budget() -> TokenBucket {
    TokenBucket::new(FLOOD_RATE, FLOOD_BURST)
}

/// The frames switched to each port, not yet handed over (at most
/// [`OUTBOX_MAX`] each), and which ports have any: handing over costs
/// O(ports with frames), not O(ports).
#[derive(Default)]
struct Outboxes {
    boxes: Vec<Vec<Frame>>,
    /// Ports whose outbox went from empty to not since the last hand-over
    /// (each at most once; one may have been emptied since, by the
    /// gateway's step or its port leaving).
    dirty: Vec<PortId>,
}

impl Outboxes {
    /// Queues `frame` for port `to` unless its outbox holds [`OUTBOX_MAX`]
    /// frames; returns how many were dropped (0 or 1).
    fn push(&mut self, to: PortId, frame: Frame) -> usize {
        let outbox = &mut self.boxes[to];
        if outbox.len() >= OUTBOX_MAX {
            return 1;
        }
        if outbox.is_empty() {
            self.dirty.push(to);
        }
        outbox.push(frame);
        0
    }
}

impl std::ops::Index<PortId> for Outboxes {
    type Output = Vec<Frame>;

    fn index(&self, port: PortId) -> &Vec<Frame> {
        &self.boxes[port]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_lasts_until_every_reply_due_left_or_its_deadline() {
        let now = std::time::Instant::now();
        let mut w = Watch {
            port: 0,
            until: now + WATCH,
            unanswered: 3,
        };
        assert!(w.goes_on(now, 0), "nothing came out yet");
        w.answered(1);
        assert!(w.goes_on(now, 1), "two replies still due");
        w.answered(5); // more frames than handed (ACKs, a late reply): no underflow
        assert_eq!(w.unanswered, 0);
        assert!(!w.goes_on(now, 5), "every reply left");
        let w = Watch {
            port: 0,
            until: now,
            unanswered: 3,
        };
        assert!(!w.goes_on(now, 0), "the deadline passed");
    }

    #[test]
    fn what_a_guest_floods_is_rate_limited_and_counted() {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut engine = Engine::new(
            Epoll::new().unwrap(),
            Arc::clone(&wake),
            Arc::default(),
            None,
            None,
        );
        let a = Arc::new(GuestPort::new([2, 0, 0, 0, 0, 0xa], Arc::clone(&wake)).unwrap());
        let b = Arc::new(GuestPort::new([2, 0, 0, 0, 0, 0xb], Arc::clone(&wake)).unwrap());
        let from = engine.add_slot(Slot::Guest(Arc::clone(&a)));
        let to = engine.add_slot(Slot::Guest(Arc::clone(&b)));
        engine.switch.learn(b.mac(), to);
        let frame = |dst: [u8; 6]| [&dst[..], &a.mac()[..], &[0u8; 50]].concat();
        // Broadcast, multicast and unknown unicast: the burst passes.
        for dst in [[0xff; 6], [1, 0, 0x5e, 0, 0, 1], [2, 9, 9, 9, 9, 9]] {
            engine.incoming.extend(vec![frame(dst); 400]);
            engine.forward_incoming(from);
        }
        let flooded = engine.outboxes[to].len() as u64;
        assert!(
            (FLOOD_BURST..FLOOD_BURST + 10).contains(&flooded),
            "{flooded}"
        );
        assert_eq!(a.traffic().flood_dropped, 1200 - flooded);
        // Unicast to a known station is not limited.
        engine.outboxes.boxes[to].clear();
        engine.incoming.extend(vec![frame(b.mac()); 500]);
        engine.forward_incoming(from);
        assert_eq!(engine.outboxes[to].len(), 500);
        assert_eq!(a.traffic().flood_dropped, 1200 - flooded);
        // A full outbox drops (and counts) the rest.
        engine.incoming.extend(vec![frame(b.mac()); OUTBOX_MAX]);
        engine.forward_incoming(from);
        assert_eq!(engine.outboxes[to].len(), OUTBOX_MAX);
        assert_eq!(engine.dropped.load(Ordering::Relaxed), 500);
    }

    #[test]
    fn among_many_idle_ports_those_with_frames_are_switched() {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let commands = Arc::new(Mutex::new(Vec::new()));
        let mut engine = Engine::new(
            Epoll::new().unwrap(),
            Arc::clone(&wake),
            Arc::clone(&commands),
            None,
            None,
        );
        let ports: Vec<Arc<GuestPort>> = (0..1000u16)
            .map(|i| {
                let [hi, lo] = i.to_be_bytes();
                Arc::new(GuestPort::new([2, 0, 0, 0, hi, lo], Arc::clone(&wake)).unwrap())
            })
            .collect();
        let (a, b) = (&ports[10], &ports[900]);
        let frame = |dst: [u8; 6], src: [u8; 6]| [&dst[..], &src[..], &[0u8; 50]].concat();
        // A guest that sends before its port is on the switch is not
        // forgotten.
        a.send(&mut vec![frame(b.mac(), a.mac())]);
        lock(&commands).extend(ports.iter().map(|p| Command::Attach(Arc::clone(p))));
        engine.run_commands();
        engine.pump();
        assert_eq!(b.received().len(), 1);
        // Both ways, many times, and nobody else gets anything.
        for _ in 0..100 {
            b.send(&mut vec![frame(a.mac(), b.mac())]);
            a.send(&mut vec![frame(b.mac(), a.mac()), frame(b.mac(), a.mac())]);
            engine.pump();
        }
        assert_eq!((a.received().len(), b.received().len()), (100, 201));
        let others: usize = ports.iter().map(|p| p.received().len()).sum();
        assert_eq!(others, 301);
        // A port that left is not switched from, even if still listed.
        a.send(&mut vec![frame(b.mac(), a.mac())]);
        lock(&commands).push(Command::Detach(Arc::clone(a)));
        engine.run_commands();
        engine.pump();
        assert_eq!(b.received().len(), 201);
    }

    #[test]
    fn an_outbox_holds_at_most_its_bound() {
        let mut outboxes = Outboxes {
            boxes: vec![Vec::new(); 3],
            ..Outboxes::default()
        };
        let dropped: usize = (0..OUTBOX_MAX + 7)
            .map(|i| outboxes.push(2, vec![i as u8]))
            .sum();
        assert_eq!((outboxes[2].len(), dropped), (OUTBOX_MAX, 7));
        assert_eq!(outboxes[2].last(), Some(&vec![(OUTBOX_MAX - 1) as u8]));
        assert_eq!(outboxes.dirty, [2], "listed once, when it filled");
    }

    #[test]
    fn macs_and_subnets() {
        assert_eq!(
            mac_for(Ipv4Addr::new(10, 0, 2, 15)),
            [0x02, 0x4c, 10, 0, 2, 15]
        );
        assert!(in_subnet(Ipv4Addr::new(10, 0, 2, 200), USER_SUBNET, 24));
        assert!(!in_subnet(Ipv4Addr::new(10, 0, 3, 1), USER_SUBNET, 24));
        assert!(in_subnet(Ipv4Addr::new(1, 2, 3, 4), USER_SUBNET, 0));
        assert!(in_subnet(USER_GATEWAY, USER_GATEWAY, 32));
        let nic = Nic {
            mac: mac_for(USER_FIRST_GUEST),
            ip: USER_FIRST_GUEST,
            prefix: 24,
            gateway: Some(USER_GATEWAY),
        };
        assert_eq!(
            nic.cmdline_params(),
            [
                ("lc.ip".to_owned(), "10.0.2.15/24".to_owned()),
                ("lc.gw".to_owned(), "10.0.2.2".to_owned())
            ]
        );
    }
}

/// The whole network on real host sockets, with a fake guest: a smoltcp
/// interface of the test's own on guest port 0, serving TCP and UDP echo.
#[cfg(test)]
mod gateway_tests {
    use super::*;
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::phy::{self, DeviceCapabilities, Medium};
    use smoltcp::socket::{tcp, udp};
    use smoltcp::time::Instant as SmolInstant;
    use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
    use std::io::{Read, Write};
    use std::net::{TcpStream, UdpSocket};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    struct PortPhy(Arc<GuestPort>, Vec<Frame>);
    struct Rx(Frame);
    struct Tx<'a>(&'a mut Vec<Frame>);

    impl phy::RxToken for Rx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }
    impl phy::TxToken for Tx<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut frame = vec![0; len];
            let r = f(&mut frame);
            self.0.push(frame);
            r
        }
    }
    impl phy::Device for PortPhy {
        type RxToken<'a> = Rx;
        type TxToken<'a> = Tx<'a>;
        fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
            let frame = self.0.received().pop_front()?;
            Some((Rx(frame), Tx(&mut self.1)))
        }
        fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
            Some(Tx(&mut self.1))
        }
        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ethernet;
            caps.max_transmission_unit = 1514;
            caps
        }
    }

    /// Runs the fake guest until `stop`: TCP echo on 7 (closes after the
    /// peer's FIN), UDP echo on 7; TCP port 9 is closed (RST).
    fn fake_guest(port: Arc<GuestPort>, stop: Arc<AtomicBool>) {
        let mut phy = PortPhy(Arc::clone(&port), Vec::new());
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(EthernetAddress(port.mac()))),
            &mut phy,
            SmolInstant::now(),
        );
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::v4(10, 0, 2, 15), 24));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let mut tcp_sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 8192]),
            tcp::SocketBuffer::new(vec![0; 8192]),
        );
        tcp_sock.listen(7).unwrap();
        let tcp_h = sockets.add(tcp_sock);
        let mut udp_sock = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
        );
        udp_sock.bind(7).unwrap();
        let udp_h = sockets.add(udp_sock);
        while !stop.load(Ordering::Relaxed) {
            iface.poll(SmolInstant::now(), &mut phy, &mut sockets);
            let s = sockets.get_mut::<tcp::Socket>(tcp_h);
            let room = s.send_capacity() - s.send_queue();
            if s.can_recv() {
                // Echo what fits in the send buffer; the rest waits.
                if room > 0 {
                    let data = s
                        .recv(|b| {
                            let n = b.len().min(room);
                            (n, b[..n].to_vec())
                        })
                        .unwrap();
                    assert_eq!(s.send_slice(&data).unwrap(), data.len());
                }
            } else if s.state() == tcp::State::CloseWait {
                s.close();
            } else if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                s.abort();
                s.listen(7).unwrap();
            }
            let u = sockets.get_mut::<udp::Socket>(udp_h);
            while let Ok((data, meta)) = u.recv() {
                let (data, endpoint) = (data.to_vec(), meta.endpoint);
                u.send_slice(&data, endpoint).unwrap();
            }
            iface.poll(SmolInstant::now(), &mut phy, &mut sockets);
            port.send(&mut phy.1);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn published_tcp_and_udp_ports_reach_the_guest() {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (tcp_port, closed_port) = (free(), free());
        let udp_port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec = |host_port, guest_port, proto| PublishSpec {
            host: SocketAddr::from((Ipv4Addr::LOCALHOST, host_port)),
            guest_addr: None,
            guest_port,
            proto,
        };
        let config = NetworkConfig {
            mode: NetMode::User,
            publish: vec![
                spec(tcp_port, 7, Proto::Tcp),
                spec(closed_port, 9, Proto::Tcp),
                spec(udp_port, 7, Proto::Udp),
            ],
            nics: vec![Nic {
                mac: mac_for(USER_FIRST_GUEST),
                ip: USER_FIRST_GUEST,
                prefix: 24,
                gateway: Some(USER_GATEWAY),
            }],
        };
        let network = Network::start(&config).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let guest = {
            let (port, stop) = (network.port(0).unwrap(), Arc::clone(&stop));
            thread::spawn(move || fake_guest(port, stop))
        };

        // TCP: bytes both ways, then a half-close answered by the guest's FIN.
        let mut conn = TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut w = conn.try_clone().unwrap();
            let big = big.clone();
            thread::spawn(move || {
                w.write_all(&big).unwrap();
                w.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let mut echoed = Vec::new();
        conn.read_to_end(&mut echoed).unwrap();
        writer.join().unwrap();
        assert_eq!(echoed.len(), big.len());
        assert!(echoed == big, "the echo differs");

        // A closed guest port: the host client sees a reset.
        let mut refused = TcpStream::connect(("127.0.0.1", closed_port)).unwrap();
        refused
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 8];
        let r = refused.read(&mut buf);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
                || matches!(r, Ok(0)),
            "{r:?}"
        );

        // UDP: a datagram and its echo.
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut got = None;
        for _ in 0..20 {
            udp.send_to(b"ping over udp", ("127.0.0.1", udp_port))
                .unwrap();
            let mut buf = [0u8; 64];
            if let Ok((n, _)) = udp.recv_from(&mut buf) {
                got = Some(buf[..n].to_vec());
                break;
            }
        }
        assert_eq!(got.as_deref(), Some(&b"ping over udp"[..]));

        stop.store(true, Ordering::Relaxed);
        guest.join().unwrap();
        drop(network);
    }
}
