//! What migration needs from the daemon it runs in: a [`MigrationContext`]
//! (plain data: who this daemon is, how it migrates, its hypervisor and the
//! migrations under way) and, as behaviour, one narrow trait per side:
//! [`Source`] and [`Destination`], plus the [`Overlay`] both join. The daemon
//! implements them; this crate never names the daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use api::Client;
use vmm::machine::{Hypervisor, MachineHandle};
use vmm::snapshot::state::{GuestSpec, MachineState, NicSpec};
use vmm::vstate::vm::Vm;

use crate::protocol::Hello;
use crate::{MigrationConfig, Migrations};

/// Who this daemon is, as a migration tells the other side.
#[derive(Clone, Debug)]
pub struct Local {
    /// The daemon's name (`--name`).
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its API address (a destination probes it to learn whether the
    /// source's daemon is gone).
    pub api: SocketAddr,
}

/// The daemon a migration runs in, as data: handed to
/// [`crate::source::migrate`] and [`crate::dest::accept`].
pub struct MigrationContext<'a> {
    /// How this daemon migrates (`serve` flags).
    pub config: MigrationConfig,
    /// This daemon's name, region and API address.
    pub local: Local,
    /// The hypervisor guests run on here.
    pub hypervisor: &'a Hypervisor,
    /// This daemon's overlay address, if it has an overlay.
    pub overlay: Option<SocketAddr>,
    /// The migrations under way here.
    pub migrations: &'a Migrations,
}

/// The overlay both sides put the other daemon on, so that the guest's
/// traffic follows it.
pub trait Overlay {
    /// Adds a daemon's overlay address to the overlay's peers.
    fn add_overlay_peer(&self, peer: SocketAddr);
}

/// What the sending side asks of its daemon: hold an instance, let it go,
/// and drop it once it runs elsewhere.
pub trait Source: Overlay {
    /// A client for the daemon `to` (a pinned peer's name or an address;
    /// `fingerprint` pins an address that is not a peer).
    fn peer_client(&self, to: &str, fingerprint: Option<&str>) -> Result<Client, String>;
    /// Holds the running instance `name` for a migration (nothing else may
    /// stop, snapshot or move it meanwhile): its machine and its spec.
    fn acquire(&self, name: &str) -> Result<(Arc<MachineHandle>, GuestSpec), String>;
    /// Lets an instance [`Self::acquire`]d go again (it keeps running).
    fn release(&self, name: &str);
    /// What brings `name` back after this daemon restarts, if it is
    /// recorded (`--restart always`), and the image file it boots.
    fn restart_record(&self, name: &str) -> Option<(api::RunRequest, PathBuf)>;
    /// Says that whether `name` runs at the destination is not known yet.
    fn in_doubt(&self, name: &str);
    /// `name` runs at `to` now: drops it here; its published ports reach it
    /// over the overlay (`to_overlay`), and the first `carried` frames
    /// queued for it went with its state.
    fn moved_away(&self, name: &str, to: &str, to_overlay: Option<SocketAddr>, carried: usize);
}

/// What the receiving side asks of its daemon: hold a name for the guest
/// coming in, restore it, start it or drop it.
pub trait Destination: Overlay {
    /// A name, address and MAC held for an incoming guest.
    type Reservation;
    /// A guest restored from an incoming migration, not started.
    type Prepared;

    /// Reserves the name, address and MAC of the guest `hello` announces.
    fn reserve(&self, hello: &Hello) -> Result<Self::Reservation, String>;
    /// The network card reserved for `name`, while it is reserved.
    fn reserved_nic(&self, name: &str) -> Option<NicSpec>;
    /// Joins the overlay with the pinned peers (the guest may talk to them).
    fn join_pinned_peers(&self);
    /// Restores `state` into `vm` (attached to this host's network, told
    /// where it now runs) without starting it.
    fn prepare(&self, name: &str, vm: Vm, state: MachineState) -> Result<Self::Prepared, String>;
    /// Drops a prepared guest that will not start.
    fn discard(&self, prepared: Self::Prepared);
    /// Starts a prepared guest as instance `name`.
    fn launch(&self, name: &str, prepared: Self::Prepared) -> Result<(), String>;
    /// The guest started: it takes over what `reservation` held for it.
    fn adopt(&self, name: &str, reservation: &Self::Reservation);
    /// The guest will not come: the reservation goes.
    fn cancel(&self, name: &str, reservation: Self::Reservation);
}
