//! x86-64 specifics: the entry points and ELF notes (`boot`), the ring-0
//! trap stubs (`trap`), the ring-0 PVH setup (`pvh`), the interrupts of the
//! PVH idle wait (`apic`), port I/O (`port`) and
//! the few CPU instructions ring 3 may use (`cpu`).
//!
//! All of the guest's `unsafe` lives in this folder.

pub mod apic;
pub mod boot;
pub mod cpu;
pub mod mmio;
pub mod port;
pub mod pvh;
pub mod trap;
