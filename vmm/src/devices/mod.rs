//! Devices the guest talks to: the hypercall doorbell (`doorbell`), the
//! epoll set an idle guest waits on (`io_wait`) and virtio-mmio devices
//! (`virtio`: the transport and the network card); the counters of the
//! exits they cost (`exits`).

pub mod doorbell;
pub mod exits;
pub mod io_wait;
pub mod virtio;
