//! The monitors that can run an image: our KVM VMM (`kvm`, the default),
//! QEMU microvm (`qemu`), for comparison and for hosts without KVM, and
//! Firecracker (`firecracker`), as a reference PVH monitor.

pub mod firecracker;
pub mod kvm;
pub mod qemu;
pub mod qemu_port;
