//! Thin wrappers over the Linux calls no crate offers us: `epoll_pwait2`
//! (epoll with a nanosecond timeout), `TUNSETIFF` (attach to a TAP device),
//! an interface's host side (link up, a packet socket on it), socket
//! options and thread placement (which CPUs a thread may run on, its
//! scheduling policy, how much CPU it used). The only `unsafe` code of this crate; each block has its
//! `SAFETY:` argument.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::epoll::EpollEvent;

/// `epoll_pwait2(epfd, events, timeout, NULL)`: the raw return value (-1
/// with errno set on failure).
pub fn epoll_pwait2(epfd: RawFd, events: &mut [EpollEvent], timeout: Option<Duration>) -> i32 {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos()),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
    // SAFETY: `events` is a writable array of `max` epoll_event structs
    // (EpollEvent is repr(transparent) over libc::epoll_event), `ts_ptr` is
    // null or points at a timespec that outlives the call, and the sigmask
    // is null (no mask change).
    unsafe {
        libc::epoll_pwait2(
            epfd,
            events.as_mut_ptr().cast::<libc::epoll_event>(),
            max,
            ts_ptr,
            std::ptr::null(),
        )
    }
}

/// The calling thread's kernel id (`gettid`).
pub fn thread_id() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The CPU the calling thread is running on (`sched_getcpu`), if the
/// kernel says.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments; it returns -1 on failure.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// A set of CPUs a thread may run on (`cpu_set_t`).
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    /// The set holding `cpu` only.
    pub fn only(cpu: usize) -> io::Result<Self> {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is past CPU_SETSIZE"),
            ));
        }
        // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so CPU_SET
        // stays inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        Ok(Self(set))
    }

    /// The set without `cpu` (unchanged if `cpu` is past the set's size).
    pub fn without(mut self, cpu: usize) -> Self {
        if cpu < libc::CPU_SETSIZE as usize {
            // SAFETY: `cpu` is below CPU_SETSIZE, so CPU_CLR stays inside the set.
            unsafe { libc::CPU_CLR(cpu, &mut self.0) };
        }
        self
    }

    /// The CPUs in the set, in order.
    pub fn cpus(&self) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: every index is below CPU_SETSIZE, inside the set.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &self.0) })
            .collect()
    }
}

impl std::fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.cpus()).finish()
    }
}

/// The CPUs thread `tid` (0: the calling thread) may run on.
pub fn thread_affinity(tid: libc::pid_t) -> io::Result<CpuSet> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()`
    // bytes into `set`, which is a whole cpu_set_t living across the call.
    let r =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(CpuSet(set))
}

/// Lets thread `tid` (0: the calling thread) run on the CPUs of `set` only.
pub fn set_thread_affinity(tid: libc::pid_t, set: &CpuSet) -> io::Result<()> {
    // SAFETY: sched_setaffinity reads `size_of::<cpu_set_t>()` bytes from
    // `set.0`, which is a whole cpu_set_t living across the call.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set.0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lets thread `tid` (0: the calling thread) run on `cpu` only.
pub fn pin_thread(tid: libc::pid_t, cpu: usize) -> io::Result<()> {
    set_thread_affinity(tid, &CpuSet::only(cpu)?)
}

/// Puts thread `tid` (0: the calling thread) under `SCHED_BATCH` (`batch`)
/// or back under `SCHED_OTHER`: a batch thread that wakes up does not
/// preempt the thread running on its CPU, it waits for that one to sleep
/// (or for the scheduler's tick). Needs no privilege.
pub fn set_thread_batch(tid: libc::pid_t, batch: bool) -> io::Result<()> {
    let policy = if batch {
        libc::SCHED_BATCH
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid `sched_param` that outlives the call; the
    // kernel only reads it.
    let r = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether thread `tid` (0: the calling thread) is under `SCHED_BATCH`
/// (for tests).
#[cfg(test)]
pub fn thread_is_batch(tid: libc::pid_t) -> bool {
    // SAFETY: a plain system call without pointers.
    unsafe { libc::sched_getscheduler(tid) == libc::SCHED_BATCH }
}

/// The CPUs thread `tid` (0: the calling thread) may run on (for tests).
#[cfg(test)]
pub fn thread_cpus(tid: libc::pid_t) -> io::Result<Vec<usize>> {
    thread_affinity(tid).map(|set| set.cpus())
}

/// What the scheduler counted for a thread so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadSched {
    /// Time it ran on a CPU.
    pub run: Duration,
    /// Time it waited for one (runnable but not running).
    pub waited: Duration,
    /// How often it went to sleep (gave up its CPU to wait for something).
    pub sleeps: u64,
}

/// [`ThreadSched`] of thread `tid` of this process, from
/// `/proc/self/task/TID/schedstat` and its `status`
/// (`voluntary_ctxt_switches`). Fails if `tid` is not (or no longer) a
/// thread of this process.
pub fn thread_sched(tid: libc::pid_t) -> io::Result<ThreadSched> {
    let unexpected = |what: &str, text: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected {what} of thread {tid}: {text:?}"),
        )
    };
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))?;
    let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
    let (Some(Ok(run)), Some(Ok(wait))) = (fields.next(), fields.next()) else {
        return Err(unexpected("schedstat", &text));
    };
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))?;
    let sleeps = status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| unexpected("status", &status))?;
    Ok(ThreadSched {
        run: Duration::from_nanos(run),
        waited: Duration::from_nanos(wait),
        sleeps,
    })
}

/// Attaches the open `/dev/net/tun` file `tun` to the TAP device `name`
/// (created if missing), without packet information or vnet headers.
/// Returns the kernel's name for the device.
pub fn tun_set_iff(tun: &impl AsRawFd, name: &str) -> io::Result<String> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "'{name}' is not a valid interface name (1 to {} bytes, no NUL)",
                req.ifr_name.len() - 1
            ),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is
    // and which lives across the call; the fd is an open file.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = req
        .ifr_name
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(req.ifr_name.len());
    Ok(req.ifr_name[..len]
        .iter()
        .map(|&c| c as u8 as char)
        .collect())
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{name}' is not a valid interface name"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn datagram_socket() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Sets the host side of interface `name` administratively up.
pub fn set_link_up(name: &str) -> io::Result<()> {
    let socket = datagram_socket()?;
    let mut req = ifreq_for(name)?;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one `struct ifreq`,
    // which `req` is and which lives across the calls.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `PACKET_IGNORE_OUTGOING` (Linux 4.20), not in the libc crate.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// A non-blocking raw packet socket on interface `name`: it reads the
/// frames that arrive on the host side (from the device side of a TAP) and
/// sends frames out of it, never its own frames back.
pub fn packet_socket(name: &str) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let c_name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: `c_name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) has no memory arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            protocol as libc::c_int,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a live sockaddr_ll of the size passed.
    let ret = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    setsockopt(
        &socket,
        libc::SOL_PACKET,
        PACKET_IGNORE_OUTGOING,
        &1 as &libc::c_int,
    )?;
    Ok(socket)
}

/// `setsockopt(fd, level, name, value)` for a plain-data option value.
pub fn setsockopt<T: Copy>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points at a live `T` of the size passed; the kernel
    // only reads it. The fd is an open socket.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
