//! The small pieces every host crate (the VMM, host networking, the daemon
//! and the fleet) needs, one module per concept:
//!
//! - [`limit`]: rate limits on what a guest (or a caller) can make the host
//!   do, and [`guest_warn!`], the one way a guest-triggered log line is
//!   written;
//! - [`files`]: private directories and files, atomic writes and reads
//!   capped at a size limit;
//! - [`sys`]: the process's effective user, fd limit and free heap.
//!
//! It depends on no other crate of the workspace.

pub mod files;
pub mod limit;
pub mod sys;
