//! How a component of the machine saves its state for a snapshot or a
//! migration, and is rebuilt from it: [`Persist`]. Each device keeps its
//! saved state and its restore in a `persist.rs` beside it (the virtio-mmio
//! transport, virtio-net); `devices::persist` gathers them for the machine
//! and `snapshot` writes the whole [`crate::snapshot::state::MachineState`].
//!
//! A saved state is plain serde data (postcard-encoded), decoded from
//! bytes that may come from anywhere: restoring checks it against what the
//! host gives (a MAC, queue sizes, a window address) and refuses what does
//! not fit, with an error that says why.

/// A component that can be saved (the guest paused) and rebuilt.
pub trait Persist: Sized {
    /// What is saved.
    type State;
    /// What the host gives a restored component besides its state (a
    /// switch port, a device behind a transport, ...).
    type ConstructorArgs;
    /// Why a state does not fit what the host gives.
    type Error;

    /// The component's state (the guest is paused: nothing is half done).
    fn save(&self) -> Self::State;

    /// A fresh component with `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
