//! File descriptors: 0-2 are the console (stdin reads end of file), the
//! rest are sockets ([`crate::net`]). There is no file system: `open`,
//! `stat` and the directory calls fail with clear errors (and a log line).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use core::sync::atomic::{AtomicI32, Ordering};
use hermit_abi::{errno, iovec, stat, S_IFCHR};
use spin::Mutex;

use crate::net::Socket;
use crate::VcpuLocal;

/// Open socket descriptors at once.
pub const MAX_FDS: usize = 128;
const FIRST_SOCKET_FD: i32 = 3;

/// Open sockets by descriptor. A socket is taken out while a call uses it
/// (so calls on other sockets can run while it blocks) and put back after.
static FDS: VcpuLocal<Mutex<BTreeMap<i32, Option<Box<Socket>>>>> =
    VcpuLocal(Mutex::new(BTreeMap::new()));
static LAST_ERRNO: AtomicI32 = AtomicI32::new(0);

pub fn last_errno() -> i32 {
    LAST_ERRNO.load(Ordering::Relaxed)
}

/// Records a failure's errno for `sys_get_errno` and returns `-errno`.
pub fn fail(e: i32) -> i32 {
    LAST_ERRNO.store(e, Ordering::Relaxed);
    -e
}

/// Adds a socket; `EMFILE` at the limit.
pub fn insert(socket: Box<Socket>) -> Result<i32, i32> {
    let mut fds = FDS.lock();
    if fds.len() >= MAX_FDS {
        log::warn!("socket limit reached: {MAX_FDS} descriptors are open");
        return Err(errno::EMFILE);
    }
    let fd = (FIRST_SOCKET_FD..)
        .find(|fd| !fds.contains_key(fd))
        .ok_or(errno::EMFILE)?;
    fds.insert(fd, Some(socket));
    Ok(fd)
}

/// Runs `f` on socket `fd`, which is out of the table meanwhile (a second
/// thread using the same socket at once gets `EBUSY`).
pub fn with<R>(fd: i32, f: impl FnOnce(&mut Socket) -> Result<R, i32>) -> Result<R, i32> {
    let mut socket = {
        let mut fds = FDS.lock();
        match fds.get_mut(&fd) {
            None => return Err(errno::EBADF),
            Some(slot) => slot.take().ok_or(errno::EBUSY)?,
        }
    };
    let r = f(&mut socket);
    let mut fds = FDS.lock();
    match fds.get_mut(&fd) {
        Some(slot) => *slot = Some(socket),
        None => {
            drop(fds);
            crate::net::close(*socket); // closed by another thread meanwhile
        }
    }
    r
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
    match FDS.lock().remove(&fd) {
        None => fail(errno::EBADF),
        Some(socket) => {
            if let Some(socket) = socket {
                crate::net::close(*socket);
            }
            0
        }
    }
}

#[no_mangle]
pub extern "C" fn sys_dup(fd: i32) -> i32 {
    log::warn!("dup({fd}): descriptors cannot be duplicated here");
    fail(errno::ENOSYS)
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
