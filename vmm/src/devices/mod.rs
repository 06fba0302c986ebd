//! Devices the guest talks to: the hypercall doorbell (`doorbell`), the
//! epoll set an idle guest waits on (`io_wait`) and virtio-mmio devices
//! (`virtio`: the transport and the network card); the counters of the
//! exits they cost (`exits`). Each device saves and restores its own state
//! (a `persist.rs` beside it); `persist` gathers them for the machine.

pub mod doorbell;
pub mod exits;
pub mod io_wait;
pub mod persist;
pub mod virtio;
