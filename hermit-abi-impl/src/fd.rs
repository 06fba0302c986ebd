//! File descriptors: 0-2 are the console (stdin reads end of file), the
//! rest are sockets ([`crate::net`]) and eventfds ([`crate::event`]), and
//! `poll` over all of them. There is no file system (an empty, read-only
//! one, as far as std can tell): opening for reading, `stat` and the
//! directory calls fail with `ENOENT`, opening for writing or creating
//! anything with `EROFS` (each with a log line).

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use core::cell::RefCell;
use core::sync::atomic::{AtomicI32, Ordering};
use core::task::Context;
use hermit_abi::{errno, iovec, pollfd, stat, S_IFCHR};
use spin::Mutex;

use crate::event::EventFd;
use crate::net::Socket;
use crate::sched;
use crate::VcpuLocal;

/// Open socket descriptors at once.
pub const MAX_FDS: usize = 128;
const FIRST_SOCKET_FD: i32 = 3;

/// What a descriptor names.
pub enum File {
    Socket(Socket),
    Event(EventFd),
}

/// A file, shared by the descriptors that name it (`dup`).
type Shared = Rc<RefCell<File>>;

/// Open files by descriptor. Calls borrow a socket only while they run,
/// never while their thread is blocked (socket waits poll, release it and
/// block), so threads can read and write one socket at once.
static FDS: VcpuLocal<Mutex<BTreeMap<i32, Shared>>> = VcpuLocal(Mutex::new(BTreeMap::new()));
static LAST_ERRNO: AtomicI32 = AtomicI32::new(0);

pub fn last_errno() -> i32 {
    LAST_ERRNO.load(Ordering::Relaxed)
}

/// Records a failure's errno for `sys_get_errno` and returns `-errno`.
pub fn fail(e: i32) -> i32 {
    LAST_ERRNO.store(e, Ordering::Relaxed);
    -e
}

fn insert_shared(socket: Shared) -> Result<i32, i32> {
    let mut fds = FDS.lock();
    if fds.len() >= MAX_FDS {
        log::warn!("socket limit reached: {MAX_FDS} descriptors are open");
        return Err(errno::EMFILE);
    }
    let fd = (FIRST_SOCKET_FD..)
        .find(|fd| !fds.contains_key(fd))
        .ok_or(errno::EMFILE)?;
    fds.insert(fd, socket);
    Ok(fd)
}

/// Adds a socket; `EMFILE` at the limit.
pub fn insert(socket: Socket) -> Result<i32, i32> {
    insert_shared(Rc::new(RefCell::new(File::Socket(socket))))
}

/// Adds an eventfd; `EMFILE` at the limit.
pub fn insert_event(event: EventFd) -> Result<i32, i32> {
    insert_shared(Rc::new(RefCell::new(File::Event(event))))
}

/// Runs `f` on file `fd` (`EBUSY` while another thread is inside a call
/// that keeps it, i.e. a blocking `connect`).
pub fn with_file<R>(fd: i32, f: impl FnOnce(&mut File) -> Result<R, i32>) -> Result<R, i32> {
    let shared = FDS.lock().get(&fd).cloned().ok_or(errno::EBADF)?;
    let r = match shared.try_borrow_mut() {
        Ok(mut file) => f(&mut file),
        Err(_) => Err(errno::EBUSY),
    };
    release(shared);
    r
}

/// Runs `f` on socket `fd` (`ENOTSOCK` for another kind of file).
pub fn with<R>(fd: i32, f: impl FnOnce(&mut Socket) -> Result<R, i32>) -> Result<R, i32> {
    with_file(fd, |file| match file {
        File::Socket(socket) => f(socket),
        File::Event(_) => Err(errno::ENOTSOCK),
    })
}

/// Drops a reference to a file, closing it if it was the last one.
fn release(shared: Shared) {
    if let Ok(cell) = Rc::try_unwrap(shared) {
        if let File::Socket(socket) = cell.into_inner() {
            crate::net::close(socket);
        }
    }
}

/// Reads or writes eventfd `fd` with `op`, blocking while it says
/// `EAGAIN` unless the eventfd is non-blocking; `None` if `fd` is not an
/// eventfd.
fn event_io(fd: i32, mut op: impl FnMut(&mut EventFd) -> Result<isize, i32>) -> Option<isize> {
    let waker = sched::thread_waker();
    loop {
        let r = with_file(fd, |file| match file {
            File::Event(e) => match op(e) {
                Err(errno::EAGAIN) if !e.nonblocking => {
                    e.register(&core::task::Context::from_waker(&waker));
                    Ok(None)
                }
                r => Ok(Some(r)),
            },
            File::Socket(_) => Err(errno::ENOTSOCK),
        });
        match r {
            Err(errno::ENOTSOCK) => return None,
            Err(e) => return Some(fail(e) as isize),
            Ok(Some(r)) => return Some(r.unwrap_or_else(|e| fail(e) as isize)),
            Ok(None) => {
                sched::block(None);
            }
        }
    }
}

fn is_console(fd: i32) -> bool {
    (0..FIRST_SOCKET_FD).contains(&fd)
}

/// # Safety
/// `buf` is readable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sys_write(fd: i32, buf: *const u8, len: usize) -> isize {
    let _kernel = crate::preempt::kernel_section();
    if buf.is_null() && len > 0 {
        return fail(errno::EFAULT) as isize;
    }
    // SAFETY: the caller's guarantee.
    let bytes = unsafe { core::slice::from_raw_parts(buf, len) };
    match fd {
        1 | 2 => {
            sched::preempt_point();
            kernel::console::write(bytes);
            len as isize
        }
        0 => fail(errno::EBADF) as isize,
        _ => event_io(fd, |e| e.write(bytes))
            .unwrap_or_else(|| crate::net::send(fd, bytes).unwrap_or_else(|e| fail(e) as isize)),
    }
}

/// # Safety
/// `buf` is writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sys_read(fd: i32, buf: *mut u8, len: usize) -> isize {
    let _kernel = crate::preempt::kernel_section();
    if buf.is_null() && len > 0 {
        return fail(errno::EFAULT) as isize;
    }
    match fd {
        0 => 0, // no console input: end of file
        1 | 2 => fail(errno::EBADF) as isize,
        _ => {
            // SAFETY: the caller's guarantee.
            let bytes = unsafe { core::slice::from_raw_parts_mut(buf, len) };
            event_io(fd, |e| e.read(bytes)).unwrap_or_else(|| {
                crate::net::recv(fd, bytes, 0).unwrap_or_else(|e| fail(e) as isize)
            })
        }
    }
}

/// # Safety
/// `iov` holds `iovcnt` valid buffers.
#[no_mangle]
pub unsafe extern "C" fn sys_writev(fd: i32, iov: *const iovec, iovcnt: usize) -> isize {
    let _kernel = crate::preempt::kernel_section();
    if iovcnt > hermit_abi::IOV_MAX || (iov.is_null() && iovcnt > 0) {
        return fail(errno::EINVAL) as isize;
    }
    // SAFETY: the caller's guarantee.
    let iov = unsafe { core::slice::from_raw_parts(iov, iovcnt) };
    let mut total = 0isize;
    for v in iov.iter().filter(|v| v.iov_len > 0) {
        // SAFETY: the caller's guarantee for each buffer.
        let n = unsafe { sys_write(fd, v.iov_base as *const u8, v.iov_len) };
        if n < 0 {
            return if total > 0 { total } else { n };
        }
        total += n;
        if (n as usize) < v.iov_len {
            break;
        }
    }
    total
}

/// # Safety
/// `iov` holds `iovcnt` valid buffers.
#[no_mangle]
pub unsafe extern "C" fn sys_readv(fd: i32, iov: *const iovec, iovcnt: usize) -> isize {
    let _kernel = crate::preempt::kernel_section();
    if iovcnt > hermit_abi::IOV_MAX || (iov.is_null() && iovcnt > 0) {
        return fail(errno::EINVAL) as isize;
    }
    // SAFETY: the caller's guarantee.
    let iov = unsafe { core::slice::from_raw_parts(iov, iovcnt) };
    // One read into the first non-empty buffer: a short read is allowed.
    match iov.iter().find(|v| v.iov_len > 0) {
        // SAFETY: the caller's guarantee.
        Some(v) => unsafe { sys_read(fd, v.iov_base as *mut u8, v.iov_len) },
        None => 0,
    }
}

#[no_mangle]
pub extern "C" fn sys_close(fd: i32) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    if is_console(fd) {
        return 0;
    }
    let removed = FDS.lock().remove(&fd);
    match removed {
        None => fail(errno::EBADF),
        Some(shared) => {
            release(shared);
            0
        }
    }
}

/// A second descriptor for the same file (std's `try_clone`).
#[no_mangle]
pub extern "C" fn sys_dup(fd: i32) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    let shared = FDS.lock().get(&fd).cloned();
    match shared {
        None => fail(errno::EBADF),
        Some(shared) => insert_shared(shared).unwrap_or_else(fail),
    }
}

/// # Safety
/// `st` is writable.
#[no_mangle]
pub unsafe extern "C" fn sys_fstat(fd: i32, st: *mut stat) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    if !is_console(fd) || st.is_null() {
        return fail(errno::EBADF);
    }
    // SAFETY: checked non-null; the caller's guarantee.
    unsafe {
        st.write(stat {
            st_mode: S_IFCHR | 0o620,
            ..stat::default()
        })
    };
    0
}

fn no_files(call: &str) -> i32 {
    log::warn!("{call}: this kernel has no file system");
    fail(errno::ENOENT)
}

fn read_only(call: &str) -> i32 {
    log::warn!("{call}: this kernel has no file system (nothing can be written)");
    fail(errno::EROFS)
}

#[no_mangle]
pub extern "C" fn sys_open(_name: *const i8, flags: i32, _mode: i32) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    use hermit_abi::{O_APPEND, O_CREAT, O_RDWR, O_TRUNC, O_WRONLY};
    if flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND) != 0 {
        read_only("open for writing")
    } else {
        no_files("open")
    }
}

#[no_mangle]
pub extern "C" fn sys_stat(_name: *const i8, _stat: *mut stat) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    no_files("stat")
}

#[no_mangle]
pub extern "C" fn sys_lstat(_name: *const i8, _stat: *mut stat) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    no_files("lstat")
}

#[no_mangle]
pub extern "C" fn sys_unlink(_name: *const i8) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    no_files("unlink")
}

#[no_mangle]
pub extern "C" fn sys_rmdir(_name: *const i8) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    no_files("rmdir")
}

#[no_mangle]
pub extern "C" fn sys_mkdir(_name: *const i8, _mode: u32) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    read_only("mkdir")
}

#[no_mangle]
pub extern "C" fn sys_lseek(_fd: i32, _offset: isize, _whence: i32) -> isize {
    let _kernel = crate::preempt::kernel_section();
    fail(errno::ESPIPE) as isize
}

#[no_mangle]
pub extern "C" fn sys_getdents64(_fd: i32, _dirp: *mut u8, _count: usize) -> i64 {
    let _kernel = crate::preempt::kernel_section();
    fail(errno::EBADF) as i64
}

/// Sets or clears non-blocking mode on file `fd`.
pub fn set_nonblocking(fd: i32, on: bool) -> Result<i32, i32> {
    with_file(fd, |file| {
        match file {
            File::Socket(s) => s.nonblocking = on,
            File::Event(e) => e.nonblocking = on,
        }
        Ok(0)
    })
}

fn is_nonblocking(fd: i32) -> Result<bool, i32> {
    with_file(fd, |file| {
        Ok(match file {
            File::Socket(s) => s.nonblocking,
            File::Event(e) => e.nonblocking,
        })
    })
}

#[no_mangle]
pub extern "C" fn sys_fcntl(fd: i32, cmd: i32, arg: i32) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    let r = match cmd {
        hermit_abi::F_SETFL => set_nonblocking(fd, arg & hermit_abi::O_NONBLOCK != 0),
        hermit_abi::F_GETFL if is_console(fd) => Ok(0),
        hermit_abi::F_GETFL => {
            is_nonblocking(fd).map(|on| if on { hermit_abi::O_NONBLOCK } else { 0 })
        }
        hermit_abi::F_GETFD | hermit_abi::F_SETFD => Ok(0),
        _ => {
            log::warn!("fcntl(command {cmd}): not supported");
            Err(errno::EINVAL)
        }
    };
    r.unwrap_or_else(fail)
}

/// `poll`'s events for one descriptor, registering `cx` with what it
/// waits for when nothing is ready.
fn poll_one(fd: i32, events: i16, cx: &mut Context<'_>) -> i16 {
    use hermit_abi::{POLLIN, POLLNVAL, POLLOUT};
    match fd {
        _ if fd < 0 => 0,
        0 => events & POLLIN,
        1 | 2 => events & POLLOUT,
        _ => with_file(fd, |file| {
            Ok(match file {
                File::Socket(s) => crate::net::poll_socket(s, events, cx),
                File::Event(e) => {
                    let mut r = 0;
                    if e.readable() {
                        r |= POLLIN;
                    }
                    if e.writable() {
                        r |= POLLOUT;
                    }
                    let r = r & events;
                    if r == 0 {
                        e.register(cx);
                    }
                    r
                }
            })
        })
        .unwrap_or(POLLNVAL),
    }
}

/// Most descriptors one `poll` call may watch.
const MAX_POLL_FDS: usize = 4 * MAX_FDS;

/// Waits until one of `fds` is ready or `timeout` ms pass (forever if
/// negative); returns how many are ready.
///
/// # Safety
/// `fds` holds `nfds` writable `pollfd`s.
#[no_mangle]
pub unsafe extern "C" fn sys_poll(fds: *mut pollfd, nfds: usize, timeout: i32) -> i32 {
    let _kernel = crate::preempt::kernel_section();
    if nfds > MAX_POLL_FDS {
        return fail(errno::EINVAL);
    }
    if fds.is_null() && nfds > 0 {
        return fail(errno::EFAULT);
    }
    let fds = if nfds == 0 {
        &mut [][..]
    } else {
        // SAFETY: the caller's guarantee.
        unsafe { core::slice::from_raw_parts_mut(fds, nfds) }
    };
    let deadline = u64::try_from(timeout)
        .ok()
        .map(|ms| kernel::time::now_ns().saturating_add(ms.saturating_mul(1_000_000)));
    let waker = sched::thread_waker();
    loop {
        let mut cx = Context::from_waker(&waker);
        let mut ready = 0;
        for p in fds.iter_mut() {
            p.revents = poll_one(p.fd, p.events, &mut cx);
            ready += i32::from(p.revents != 0);
        }
        if ready > 0 || timeout == 0 {
            return ready;
        }
        if sched::block(deadline) && deadline.is_some_and(|d| kernel::time::now_ns() >= d) {
            return 0;
        }
    }
}
