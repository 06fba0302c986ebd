//! The process's effective user, which owns the files it creates, its
//! file descriptor limit and open descriptors, and handing freed heap
//! back to the kernel. The only `unsafe` code of this crate; each block
//! has its `SAFETY:` argument.

/// This process's effective user id (the owner of the files it creates).
pub fn uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process runs as root (effective user id 0).
pub fn is_root() -> bool {
    uid() == 0
}

/// Raises this process's soft limit on open file descriptors to its hard
/// limit (a daemon with a thousand guests needs several thousand); returns
/// the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; the call only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(lim.rlim_cur)
}

/// File descriptors this process has open.
pub fn open_fds() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

/// Hands the heap memory that is free back to the kernel (glibc keeps
/// freed memory in its arenas: after a thousand guests stop, tens of MiB).
pub fn release_free_heap() {
    // SAFETY: malloc_trim only walks and trims the allocator's own free
    // lists, under the allocator's locks; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit_and_open_fds_counted() {
        let limit = super::raise_fd_limit().unwrap();
        assert_eq!(super::raise_fd_limit().unwrap(), limit, "idempotent");
        let files: Vec<_> = (0..64)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        assert!(super::open_fds().unwrap() >= files.len());
        drop(files);
        super::release_free_heap();
    }
}
