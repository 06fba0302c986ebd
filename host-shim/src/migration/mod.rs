//! Live migration shim→shim over TCP: [`protocol`] (the versioned
//! message stream), [`source`] (pre-copy rounds with KVM's dirty log OR'ed
//! with the shim's own writes, then stop-and-copy; resumes the guest on any
//! failure before the destination's acknowledgement) and [`dest`] (checks
//! the handshake, restores, tells the guest its new host, starts it,
//! acknowledges).

pub mod dest;
pub mod protocol;
pub mod source;
