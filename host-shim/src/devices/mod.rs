//! Devices the guest talks to: the hypercall doorbell (`doorbell`) and the
//! epoll set an idle guest waits on (`io_wait`). virtio-mmio devices will
//! join them.

pub mod doorbell;
pub mod io_wait;
