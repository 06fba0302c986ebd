//! Guest network stack: virtio-net device under smoltcp. Placeholder crate of
//! the workspace layout; the stack lands with networking (issue 3).
#![no_std]
