//! The monitors that can run an image: our KVM VMM (`kvm`, the default)
//! and QEMU microvm (`qemu`), for comparison and for hosts without KVM.

pub mod kvm;
pub mod qemu;
pub mod qemu_port;
