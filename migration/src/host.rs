//! What migration needs from the daemon it runs in: the [`Host`] trait. The
//! daemon implements it; this crate never names the daemon.

use std::net::SocketAddr;
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

/// A daemon, as the source and the destination of migrations see it.
pub trait Host: Send + Sync + 'static {
    /// A name, address and MAC held for an incoming guest.
    type Reservation;
    /// A guest restored from an incoming migration, not started.
    type Prepared;

    /// The migrations under way here.
    fn migrations(&self) -> &Migrations;
    /// How this daemon migrates (`serve` flags).
    fn migration_config(&self) -> MigrationConfig;
    /// This daemon's name, region and API address.
    fn local(&self) -> Local;
    /// The hypervisor guests run on here.
    fn hypervisor(&self) -> &Hypervisor;
    /// This daemon's overlay address, if it has an overlay.
    fn overlay_addr(&self) -> Option<SocketAddr>;
    /// Adds a daemon's overlay address to the overlay's peers.
    fn add_overlay_peer(&self, peer: SocketAddr);

    // The source side.

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
    fn restart_record(&self, name: &str) -> Option<(api::RunRequest, std::path::PathBuf)>;
    /// Says that whether `name` runs at the destination is not known yet.
    fn in_doubt(&self, name: &str);
    /// `name` runs at `to` now: drops it here; its published ports reach it
    /// over the overlay (`to_overlay`), and the first `carried` frames
    /// queued for it went with its state.
    fn moved_away(&self, name: &str, to: &str, to_overlay: Option<SocketAddr>, carried: usize);

    // The destination side.

    /// Reserves the name, address and MAC of the guest `hello` announces.
    fn reserve_incoming(&self, hello: &Hello) -> Result<Self::Reservation, String>;
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
    fn cancel_incoming(&self, name: &str, reservation: Self::Reservation);
}
