//! KVM state: the VM with its guest memory (`vm`) and vCPU 0 with its run
//! loop (`vcpu`). With `sys` (raw Linux calls), the only place in the shim
//! with `unsafe` code, each block with its `SAFETY:` argument.

pub mod preempt;
pub mod vcpu;
pub mod vm;
