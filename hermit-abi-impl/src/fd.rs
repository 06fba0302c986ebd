//! File descriptors: 0-2 are the console (stdin reads end of file), the
//! rest are sockets ([`crate::net`]). There is no file system: `open`,
//! `stat` and the directory calls fail with clear errors (and a log line).

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use core::cell::RefCell;
use core::sync::atomic::{AtomicI32, Ordering};
use hermit_abi::{errno, iovec, stat, S_IFCHR};
use spin::Mutex;

use crate::net::Socket;
use crate::VcpuLocal;

/// Open socket descriptors at once.
pub const MAX_FDS: usize = 128;
const FIRST_SOCKET_FD: i32 = 3;

/// A socket, shared by the descriptors that name it (`dup`).
type Shared = Rc<RefCell<Socket>>;

/// Open sockets by descriptor. Calls borrow a socket only while they run,
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
    insert_shared(Rc::new(RefCell::new(socket)))
}

/// Runs `f` on socket `fd` (`EBUSY` while another thread is inside a call
/// that keeps it, i.e. a blocking `connect`).
pub fn with<R>(fd: i32, f: impl FnOnce(&mut Socket) -> Result<R, i32>) -> Result<R, i32> {
    let shared = FDS.lock().get(&fd).cloned().ok_or(errno::EBADF)?;
    let r = match shared.try_borrow_mut() {
        Ok(mut socket) => f(&mut socket),
        Err(_) => Err(errno::EBUSY),
    };
    release(shared);
    r
}

/// Drops a reference to a socket, closing it if it was the last one.
fn release(shared: Shared) {
    if let Ok(cell) = Rc::try_unwrap(shared) {
        crate::net::close(cell.into_inner());
    }
}

fn is_console(fd: i32) -> bool {
    (0..FIRST_SOCKET_FD).contains(&fd)
}

/// # Safety
/// `buf` is readable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sys_write(fd: i32, buf: *const u8, len: usize) -> isize {
    if buf.is_null() && len > 0 {
        return fail(errno::EFAULT) as isize;
    }
    // SAFETY: the caller's guarantee.
    let bytes = unsafe { core::slice::from_raw_parts(buf, len) };
    match fd {
        1 | 2 => {
            kernel::console::write(bytes);
            len as isize
        }
        0 => fail(errno::EBADF) as isize,
        _ => crate::net::send(fd, bytes).unwrap_or_else(|e| fail(e) as isize),
    }
}

/// # Safety
/// `buf` is writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sys_read(fd: i32, buf: *mut u8, len: usize) -> isize {
    if buf.is_null() && len > 0 {
        return fail(errno::EFAULT) as isize;
    }
    match fd {
        0 => 0, // no console input: end of file
        1 | 2 => fail(errno::EBADF) as isize,
        _ => {
            // SAFETY: the caller's guarantee.
            let bytes = unsafe { core::slice::from_raw_parts_mut(buf, len) };
            crate::net::recv(fd, bytes, 0).unwrap_or_else(|e| fail(e) as isize)
        }
    }
}

/// # Safety
/// `iov` holds `iovcnt` valid buffers.
#[no_mangle]
pub unsafe extern "C" fn sys_writev(fd: i32, iov: *const iovec, iovcnt: usize) -> isize {
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

/// A second descriptor for the same socket (std's `try_clone`).
#[no_mangle]
pub extern "C" fn sys_dup(fd: i32) -> i32 {
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

#[no_mangle]
pub extern "C" fn sys_open(_name: *const i8, _flags: i32, _mode: i32) -> i32 {
    no_files("open")
}

#[no_mangle]
pub extern "C" fn sys_stat(_name: *const i8, _stat: *mut stat) -> i32 {
    no_files("stat")
}

#[no_mangle]
pub extern "C" fn sys_lstat(_name: *const i8, _stat: *mut stat) -> i32 {
    no_files("lstat")
}

#[no_mangle]
pub extern "C" fn sys_unlink(_name: *const i8) -> i32 {
    no_files("unlink")
}

#[no_mangle]
pub extern "C" fn sys_rmdir(_name: *const i8) -> i32 {
    no_files("rmdir")
}

#[no_mangle]
pub extern "C" fn sys_mkdir(_name: *const i8, _mode: u32) -> i32 {
    log::warn!("mkdir: this kernel has no file system");
    fail(errno::EROFS)
}

#[no_mangle]
pub extern "C" fn sys_lseek(_fd: i32, _offset: isize, _whence: i32) -> isize {
    fail(errno::ESPIPE) as isize
}

#[no_mangle]
pub extern "C" fn sys_getdents64(_fd: i32, _dirp: *mut u8, _count: usize) -> i64 {
    fail(errno::EBADF) as i64
}

#[no_mangle]
pub extern "C" fn sys_fcntl(fd: i32, cmd: i32, arg: i32) -> i32 {
    match cmd {
        hermit_abi::F_SETFL => crate::ret(crate::net::set_nonblocking(
            fd,
            arg & hermit_abi::O_NONBLOCK != 0,
        )),
        hermit_abi::F_GETFD | hermit_abi::F_SETFD => 0,
        _ => fail(errno::EINVAL),
    }
}
