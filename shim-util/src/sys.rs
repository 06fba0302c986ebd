//! The process's effective user, which owns the files it creates. The only
//! `unsafe` code of this crate; each block has its `SAFETY:` argument.

/// This process's effective user id (the owner of the files it creates).
pub fn uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process runs as root (effective user id 0).
pub fn is_root() -> bool {
    uid() == 0
}
