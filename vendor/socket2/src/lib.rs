//! The part of socket2's API that tokio uses (`Socket`, `SockRef`,
//! `SockAddr`, `Domain`, `Type`, `Protocol` and the socket options of
//! `tokio::net::TcpSocket`/`UdpSocket`), over `libc`, for
//! `x86_64-unknown-hermit`, where libc binds the `sys_*` ABI that our
//! kernel provides. crates.io's socket2 refuses the Hermit target; see
//! README.md for why this crate stands in for it there (and only there).

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::mem::{self, size_of, ManuallyDrop};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Deref;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

type CInt = i32;

/// `libc` result: `Err(last OS error)` when negative.
fn cvt(r: CInt) -> io::Result<CInt> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[cfg_attr(unix, allow(dead_code))]
fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{what} is not supported on this target"),
    )
}

/// A socket's address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Domain(CInt);

impl Domain {
    pub const IPV4: Domain = Domain(libc::AF_INET);
    pub const IPV6: Domain = Domain(libc::AF_INET6);
    #[cfg(unix)]
    pub const UNIX: Domain = Domain(libc::AF_UNIX);

    pub const fn for_address(address: SocketAddr) -> Domain {
        match address {
            SocketAddr::V4(_) => Domain::IPV4,
            SocketAddr::V6(_) => Domain::IPV6,
        }
    }
}

/// A socket's type (with creation flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Type(CInt);

impl Type {
    pub const STREAM: Type = Type(libc::SOCK_STREAM);
    pub const DGRAM: Type = Type(libc::SOCK_DGRAM);

    pub const fn nonblocking(self) -> Type {
        Type(self.0 | libc::SOCK_NONBLOCK)
    }

    pub const fn cloexec(self) -> Type {
        Type(self.0 | libc::SOCK_CLOEXEC)
    }
}

/// A socket's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protocol(CInt);

impl Protocol {
    pub const TCP: Protocol = Protocol(libc::IPPROTO_TCP);
    pub const UDP: Protocol = Protocol(libc::IPPROTO_UDP);
}

/// A socket address in the target's `sockaddr` layout.
#[derive(Clone)]
pub struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl SockAddr {
    fn empty() -> Self {
        Self {
            // SAFETY: `sockaddr_storage` is plain integers, valid all-zero.
            storage: unsafe { mem::zeroed() },
            len: size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    /// A Unix-domain address (`sockaddr_un`) for `path`.
    #[cfg(unix)]
    pub fn unix<P: AsRef<std::path::Path>>(path: P) -> io::Result<SockAddr> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_ref().as_os_str().as_bytes();
        let mut out = Self::empty();
        // SAFETY: plain integers, valid all-zero.
        let mut sun: libc::sockaddr_un = unsafe { mem::zeroed() };
        if bytes.len() >= sun.sun_path.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "path must be shorter than SUN_LEN",
            ));
        }
        sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sun.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let base = mem::offset_of!(libc::sockaddr_un, sun_path);
        // SAFETY: `sockaddr_storage` is larger than `sockaddr_un`.
        unsafe { (&mut out.storage as *mut _ as *mut libc::sockaddr_un).write(sun) };
        // A path name: with its NUL; an abstract (leading NUL) one: without.
        let nul = usize::from(bytes.first() != Some(&0));
        out.len = (base + bytes.len() + nul) as libc::socklen_t;
        Ok(out)
    }

    pub fn as_ptr(&self) -> *const libc::sockaddr {
        (&self.storage as *const libc::sockaddr_storage).cast()
    }

    pub fn len(&self) -> libc::socklen_t {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn family(&self) -> libc::sa_family_t {
        self.storage.ss_family
    }

    /// The address as a std `SocketAddr` (IPv4 or IPv6 only).
    pub fn as_socket(&self) -> Option<SocketAddr> {
        let family = CInt::from(self.storage.ss_family);
        if family == libc::AF_INET && self.len as usize >= size_of::<libc::sockaddr_in>() {
            // SAFETY: the storage holds a `sockaddr_in` (family and length).
            let sin = unsafe { &*(self.as_ptr() as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        } else if family == libc::AF_INET6 && self.len as usize >= size_of::<libc::sockaddr_in6>()
        {
            // SAFETY: the storage holds a `sockaddr_in6` (family and length).
            let sin6 = unsafe { &*(self.as_ptr() as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        } else {
            None
        }
    }
}

impl From<SocketAddr> for SockAddr {
    fn from(addr: SocketAddr) -> Self {
        let mut out = Self::empty();
        match addr {
            SocketAddr::V4(a) => {
                // SAFETY: plain integers, valid all-zero.
                let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                #[cfg(target_os = "hermit")]
                {
                    sin.sin_len = size_of::<libc::sockaddr_in>() as u8;
                }
                // SAFETY: `sockaddr_storage` is larger than `sockaddr_in`
                // and suitably aligned for it.
                unsafe { (&mut out.storage as *mut _ as *mut libc::sockaddr_in).write(sin) };
                out.len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            SocketAddr::V6(a) => {
                // SAFETY: plain integers, valid all-zero.
                let mut sin6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_flowinfo = a.flowinfo();
                sin6.sin6_scope_id = a.scope_id();
                #[cfg(target_os = "hermit")]
                {
                    sin6.sin6_len = size_of::<libc::sockaddr_in6>() as u8;
                }
                // SAFETY: as above, for `sockaddr_in6`.
                unsafe { (&mut out.storage as *mut _ as *mut libc::sockaddr_in6).write(sin6) };
                out.len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        out
    }
}

impl fmt::Debug for SockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_socket() {
            Some(a) => write!(f, "SockAddr({a})"),
            None => write!(f, "SockAddr(family {})", self.storage.ss_family),
        }
    }
}

/// `struct linger` (the same layout on Linux and Hermit).
#[repr(C)]
#[derive(Clone, Copy)]
struct Linger {
    l_onoff: CInt,
    l_linger: CInt,
}

/// An owned socket.
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    pub fn new(domain: Domain, ty: Type, protocol: Option<Protocol>) -> io::Result<Socket> {
        // SAFETY: plain system call.
        let fd = cvt(unsafe { libc::socket(domain.0, ty.0, protocol.map_or(0, |p| p.0)) })?;
        // SAFETY: `fd` is a fresh descriptor that we own.
        Ok(unsafe { Socket::from_raw_fd(fd) })
    }

    pub fn bind(&self, address: &SockAddr) -> io::Result<()> {
        // SAFETY: `address` is a valid sockaddr of `len` bytes.
        cvt(unsafe { libc::bind(self.as_raw_fd(), address.as_ptr(), address.len) }).map(drop)
    }

    pub fn connect(&self, address: &SockAddr) -> io::Result<()> {
        // SAFETY: as for `bind`.
        cvt(unsafe { libc::connect(self.as_raw_fd(), address.as_ptr(), address.len) }).map(drop)
    }

    pub fn listen(&self, backlog: CInt) -> io::Result<()> {
        // SAFETY: plain system call.
        cvt(unsafe { libc::listen(self.as_raw_fd(), backlog) }).map(drop)
    }

    pub fn local_addr(&self) -> io::Result<SockAddr> {
        let mut addr = SockAddr::empty();
        // SAFETY: the storage is writable for `len` bytes.
        cvt(unsafe {
            libc::getsockname(
                self.as_raw_fd(),
                (&mut addr.storage as *mut libc::sockaddr_storage).cast(),
                &mut addr.len,
            )
        })?;
        Ok(addr)
    }

    pub fn peer_addr(&self) -> io::Result<SockAddr> {
        let mut addr = SockAddr::empty();
        // SAFETY: the storage is writable for `len` bytes.
        cvt(unsafe {
            libc::getpeername(
                self.as_raw_fd(),
                (&mut addr.storage as *mut libc::sockaddr_storage).cast(),
                &mut addr.len,
            )
        })?;
        Ok(addr)
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        let mut on = CInt::from(nonblocking);
        // SAFETY: FIONBIO reads one `int` through the pointer.
        cvt(unsafe {
            libc::ioctl(
                self.as_raw_fd(),
                libc::FIONBIO,
                (&mut on as *mut CInt).cast::<libc::c_void>(),
            )
        })
        .map(drop)
    }

    pub fn nonblocking(&self) -> io::Result<bool> {
        // SAFETY: plain system call.
        let flags = cvt(unsafe { libc::fcntl(self.as_raw_fd(), libc::F_GETFL, 0) })?;
        Ok(flags & libc::O_NONBLOCK != 0)
    }

    fn getsockopt<T: Copy>(&self, level: CInt, name: CInt) -> io::Result<T> {
        let mut value = mem::MaybeUninit::<T>::zeroed();
        let mut len = size_of::<T>() as libc::socklen_t;
        // SAFETY: `value` is writable for `len` bytes.
        cvt(unsafe {
            libc::getsockopt(
                self.as_raw_fd(),
                level,
                name,
                value.as_mut_ptr().cast(),
                &mut len,
            )
        })?;
        // SAFETY: zero-initialised and (partly) written by the kernel; `T`
        // is a plain integer type here.
        Ok(unsafe { value.assume_init() })
    }

    fn setsockopt<T: Copy>(&self, level: CInt, name: CInt, value: T) -> io::Result<()> {
        // SAFETY: `value` is readable for its size.
        cvt(unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                level,
                name,
                (&value as *const T).cast(),
                size_of::<T>() as libc::socklen_t,
            )
        })
        .map(drop)
    }

    fn flag(&self, level: CInt, name: CInt) -> io::Result<bool> {
        self.getsockopt::<CInt>(level, name).map(|v| v != 0)
    }

    fn set_flag(&self, level: CInt, name: CInt, on: bool) -> io::Result<()> {
        self.setsockopt(level, name, CInt::from(on))
    }

    /// The socket's type (`SO_TYPE`).
    #[cfg(unix)]
    pub fn r#type(&self) -> io::Result<Type> {
        self.getsockopt::<CInt>(libc::SOL_SOCKET, libc::SO_TYPE).map(Type)
    }

    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    pub fn tcp_quickack(&self) -> io::Result<bool> {
        self.flag(libc::IPPROTO_TCP, libc::TCP_QUICKACK)
    }

    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    pub fn set_tcp_quickack(&self, quickack: bool) -> io::Result<()> {
        self.set_flag(libc::IPPROTO_TCP, libc::TCP_QUICKACK, quickack)
    }

    /// The sender of the next datagram, without taking it (`MSG_PEEK`).
    pub fn peek_sender(&self) -> io::Result<SockAddr> {
        let mut addr = SockAddr::empty();
        let mut byte = [0u8; 1];
        // SAFETY: `byte` is writable for 1 byte, the storage for `len`.
        let n = unsafe {
            libc::recvfrom(
                self.as_raw_fd(),
                byte.as_mut_ptr().cast(),
                byte.len(),
                libc::MSG_PEEK,
                (&mut addr.storage as *mut libc::sockaddr_storage).cast(),
                &mut addr.len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(addr)
    }

    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        let e = self.getsockopt::<CInt>(libc::SOL_SOCKET, libc::SO_ERROR)?;
        Ok((e != 0).then(|| io::Error::from_raw_os_error(e)))
    }

    pub fn keepalive(&self) -> io::Result<bool> {
        self.flag(libc::SOL_SOCKET, libc::SO_KEEPALIVE)
    }

    pub fn set_keepalive(&self, keepalive: bool) -> io::Result<()> {
        self.set_flag(libc::SOL_SOCKET, libc::SO_KEEPALIVE, keepalive)
    }

    pub fn reuse_address(&self) -> io::Result<bool> {
        self.flag(libc::SOL_SOCKET, libc::SO_REUSEADDR)
    }

    pub fn set_reuse_address(&self, reuse: bool) -> io::Result<()> {
        self.set_flag(libc::SOL_SOCKET, libc::SO_REUSEADDR, reuse)
    }

    #[cfg(unix)]
    pub fn reuse_port(&self) -> io::Result<bool> {
        self.flag(libc::SOL_SOCKET, libc::SO_REUSEPORT)
    }

    #[cfg(unix)]
    pub fn set_reuse_port(&self, reuse: bool) -> io::Result<()> {
        self.set_flag(libc::SOL_SOCKET, libc::SO_REUSEPORT, reuse)
    }

    pub fn send_buffer_size(&self) -> io::Result<usize> {
        self.getsockopt::<CInt>(libc::SOL_SOCKET, libc::SO_SNDBUF)
            .map(|v| v as usize)
    }

    pub fn set_send_buffer_size(&self, size: usize) -> io::Result<()> {
        self.setsockopt(libc::SOL_SOCKET, libc::SO_SNDBUF, size as CInt)
    }

    pub fn recv_buffer_size(&self) -> io::Result<usize> {
        self.getsockopt::<CInt>(libc::SOL_SOCKET, libc::SO_RCVBUF)
            .map(|v| v as usize)
    }

    pub fn set_recv_buffer_size(&self, size: usize) -> io::Result<()> {
        self.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUF, size as CInt)
    }

    pub fn linger(&self) -> io::Result<Option<Duration>> {
        let l = self.getsockopt::<Linger>(libc::SOL_SOCKET, libc::SO_LINGER)?;
        Ok((l.l_onoff != 0).then(|| Duration::from_secs(l.l_linger as u64)))
    }

    pub fn set_linger(&self, linger: Option<Duration>) -> io::Result<()> {
        let l = Linger {
            l_onoff: CInt::from(linger.is_some()),
            l_linger: linger.map_or(0, |d| d.as_secs().min(CInt::MAX as u64) as CInt),
        };
        self.setsockopt(libc::SOL_SOCKET, libc::SO_LINGER, l)
    }

    pub fn tcp_nodelay(&self) -> io::Result<bool> {
        self.flag(libc::IPPROTO_TCP, libc::TCP_NODELAY)
    }

    pub fn set_tcp_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.set_flag(libc::IPPROTO_TCP, libc::TCP_NODELAY, nodelay)
    }

    pub fn tos_v4(&self) -> io::Result<u32> {
        self.getsockopt::<CInt>(libc::IPPROTO_IP, libc::IP_TOS)
            .map(|v| v as u32)
    }

    pub fn set_tos_v4(&self, tos: u32) -> io::Result<()> {
        self.setsockopt(libc::IPPROTO_IP, libc::IP_TOS, tos as CInt)
    }

    pub fn tclass_v6(&self) -> io::Result<u32> {
        #[cfg(unix)]
        return self
            .getsockopt::<CInt>(libc::IPPROTO_IPV6, libc::IPV6_TCLASS)
            .map(|v| v as u32);
        #[cfg(not(unix))]
        Err(unsupported("IPV6_TCLASS"))
    }

    pub fn set_tclass_v6(&self, tclass: u32) -> io::Result<()> {
        #[cfg(unix)]
        return self.setsockopt(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, tclass as CInt);
        #[cfg(not(unix))]
        {
            let _ = tclass;
            Err(unsupported("IPV6_TCLASS"))
        }
    }

    /// The device the socket is bound to (`SO_BINDTODEVICE`).
    pub fn device(&self) -> io::Result<Option<Vec<u8>>> {
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        {
            let mut buf = [0u8; libc::IFNAMSIZ];
            let mut len = buf.len() as libc::socklen_t;
            // SAFETY: `buf` is writable for `len` bytes.
            cvt(unsafe {
                libc::getsockopt(
                    self.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_BINDTODEVICE,
                    buf.as_mut_ptr().cast(),
                    &mut len,
                )
            })?;
            let name = &buf[..(len as usize).min(buf.len())];
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            Ok((!name.is_empty()).then(|| name.to_vec()))
        }
        #[cfg(not(any(target_os = "android", target_os = "fuchsia", target_os = "linux")))]
        Err(unsupported("SO_BINDTODEVICE"))
    }

    /// Binds the socket to a device (`None` unbinds it).
    pub fn bind_device(&self, interface: Option<&[u8]>) -> io::Result<()> {
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        {
            let (ptr, len) = interface.map_or((std::ptr::null(), 0), |i| (i.as_ptr(), i.len()));
            // SAFETY: `ptr` is null or readable for `len` bytes.
            cvt(unsafe {
                libc::setsockopt(
                    self.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_BINDTODEVICE,
                    ptr.cast(),
                    len as libc::socklen_t,
                )
            })
            .map(drop)
        }
        #[cfg(not(any(target_os = "android", target_os = "fuchsia", target_os = "linux")))]
        {
            let _ = interface;
            Err(unsupported("SO_BINDTODEVICE"))
        }
    }
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket")
            .field("fd", &self.as_raw_fd())
            .finish()
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Socket {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

impl FromRawFd for Socket {
    unsafe fn from_raw_fd(fd: RawFd) -> Socket {
        Socket {
            // SAFETY: the caller passes an open descriptor it owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        }
    }
}

impl From<OwnedFd> for Socket {
    fn from(fd: OwnedFd) -> Socket {
        Socket { fd }
    }
}

impl From<Socket> for OwnedFd {
    fn from(s: Socket) -> OwnedFd {
        s.fd
    }
}

macro_rules! std_conversions {
    ($($t:ty),*) => {$(
        impl From<Socket> for $t {
            fn from(s: Socket) -> $t {
                <$t>::from(s.fd)
            }
        }
        impl From<$t> for Socket {
            fn from(s: $t) -> Socket {
                Socket { fd: OwnedFd::from(s) }
            }
        }
    )*};
}
std_conversions!(
    std::net::TcpStream,
    std::net::TcpListener,
    std::net::UdpSocket
);

/// A socket borrowed from anything that has a descriptor; never closed.
pub struct SockRef<'s> {
    socket: ManuallyDrop<Socket>,
    _borrow: PhantomData<&'s Socket>,
}

impl Deref for SockRef<'_> {
    type Target = Socket;

    fn deref(&self) -> &Socket {
        &self.socket
    }
}

impl<'s, S: AsFd> From<&'s S> for SockRef<'s> {
    fn from(s: &'s S) -> Self {
        let fd = s.as_fd().as_raw_fd();
        SockRef {
            // SAFETY: the descriptor stays open for `'s` (borrowed from
            // `s`), and `ManuallyDrop` never closes it.
            socket: ManuallyDrop::new(unsafe { Socket::from_raw_fd(fd) }),
            _borrow: PhantomData,
        }
    }
}

impl fmt::Debug for SockRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.socket.fmt(f)
    }
}
