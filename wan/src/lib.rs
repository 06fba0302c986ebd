//! WAN emulation in user space, for tests and demos that put "regions" on
//! one machine: this kernel has no `netem`, so latency between regions is
//! added by relays that hold each chunk of data for a fixed one-way delay.
//!
//! - [`delay`]: the delay line, a queue that releases items at their due time.
//! - [`tcp`]: a TCP relay: every accepted connection is forwarded to a target,
//!   each direction delayed.
//! - [`udp`]: a UDP relay: datagrams to the listen address go to a target and
//!   replies come back, each direction delayed (carries VXLAN overlay traffic
//!   between shims, for instance).
//!
//! A relay with delay `d` adds `2 d` to a round trip. Order is preserved in
//! each direction; nothing is dropped or duplicated.

pub mod delay;
pub mod tcp;
pub mod udp;
