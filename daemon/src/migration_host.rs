//! The daemon as the migration crate sees it: the
//! [`migration::MigrationContext`] it hands each migration, and
//! `impl migration::{Source, Destination} for Daemon` (what a migration
//! needs from an instance and from this host): reservations of guests moving in (in the [`crate::instances`] table),
//! their restored, not yet started guest, their ownership in the fleet
//! store, and the tombstones of guests that moved away.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hostnet::port::GuestPort;
use migration::protocol::Hello;
use migration::{Local, MigrationContext};
use vmm::machine::{Machine, MachineHandle};
use vmm::snapshot::state::{GuestSpec, MachineState, NicSpec};
use vmm::vstate::vm::Vm;

use crate::instance::{InstanceConsole, LogRing, State};
use crate::instances::{placeholder_spec, Incoming, Reserved};
use crate::{ApiError, Daemon};

/// A guest restored from an incoming migration, not started.
pub struct Prepared {
    machine: Machine,
    port: Arc<GuestPort>,
    log: Arc<Mutex<LogRing>>,
}

impl Daemon {
    /// This daemon as a migration in either direction sees it.
    pub(crate) fn migration_context(&self) -> MigrationContext<'_> {
        MigrationContext {
            config: self.config.migration,
            local: Local {
                name: self.config.name.clone(),
                region: self.config.region.clone(),
                api: self.config.listen,
            },
            hypervisor: &self.hv,
            overlay: self.net.overlay_addr(),
            migrations: &self.migrations,
        }
    }
}

impl migration::Overlay for Daemon {
    fn add_overlay_peer(&self, peer: SocketAddr) {
        self.net.add_peer(peer);
    }
}

impl migration::Source for Daemon {
    fn peer_client(&self, to: &str, fingerprint: Option<&str>) -> Result<api::Client, String> {
        Daemon::peer_client(self, to, fingerprint)
    }

    fn acquire(&self, name: &str) -> Result<(Arc<MachineHandle>, GuestSpec), String> {
        let handle = Daemon::acquire(self, name, "migrating").map_err(|ApiError(_, e)| e)?;
        match self.instances().get(name) {
            Some(i) => Ok((handle, i.spec.clone())),
            None => Err("the instance vanished".into()),
        }
    }

    fn release(&self, name: &str) {
        Daemon::release(self, name);
    }

    fn restart_record(&self, name: &str) -> Option<(api::RunRequest, std::path::PathBuf)> {
        Daemon::restart_record(self, name)
    }

    fn in_doubt(&self, name: &str) {
        if let Some(i) = self.instances().get_mut(name) {
            i.state = State::Busy("migration in doubt");
        }
    }

    fn moved_away(&self, name: &str, to: &str, to_overlay: Option<SocketAddr>, carried: usize) {
        Daemon::moved_away(self, name, to, to_overlay, carried);
        self.trim_heap();
    }
}

impl migration::Destination for Daemon {
    type Reservation = Reserved;
    type Prepared = Prepared;

    /// Reserves the name, address and MAC of an incoming instance, with
    /// the restart record it carries and its source. A tombstone of the
    /// same name (it lived here before and moved away) is set aside: its
    /// published ports are still bound here and go back to it.
    fn reserve(&self, hello: &Hello) -> Result<Reserved, String> {
        let mut spec = placeholder_spec(&hello.name, hello.mem_size);
        spec.nic = hello.nic;
        spec.image = hello.image.clone();
        let incoming = Incoming {
            from: hello.source.clone(),
            tombstone: None,
            record: self.carry_in(hello),
        };
        self.instances()
            .reserve_incoming(spec, incoming, |n, used, mem| self.admit(n, used, mem))
            .map_err(|e| e.to_string())
    }

    fn reserved_nic(&self, name: &str) -> Option<NicSpec> {
        self.instances().reserved_nic(name)
    }

    fn join_pinned_peers(&self) {
        Daemon::join_pinned_peers(self);
    }

    fn prepare(&self, name: &str, vm: Vm, state: MachineState) -> Result<Prepared, String> {
        let log = Arc::new(Mutex::new(LogRing::default()));
        let Some(nic) = state.spec.nic else {
            return Err("guests without a network card cannot run in the daemon".into());
        };
        let port = self.net.attach(nic.mac).map_err(|e| e.to_string())?;
        let console = Box::new(InstanceConsole::new(name, Arc::clone(&log)));
        let restored =
            Machine::restore(vm, state, Some(Arc::clone(&port)), console).and_then(|mut m| {
                m.set_location(&self.config.name, &self.config.region)?;
                m.doorbell
                    .set_checkpoint_dir(self.carried_checkpoint_dir(name));
                Ok(m)
            });
        match restored {
            Ok(machine) => Ok(Prepared { machine, port, log }),
            Err(e) => {
                self.net.detach(&port);
                Err(e.to_string())
            }
        }
    }

    fn discard(&self, prepared: Prepared) {
        self.net.detach(&prepared.port);
    }

    fn launch(&self, name: &str, prepared: Prepared) -> Result<(), String> {
        let from = match self.own_incoming(name) {
            Ok(from) => from,
            Err(why) => {
                self.net.detach(&prepared.port);
                return Err(why);
            }
        };
        let Prepared { machine, port, log } = prepared;
        Daemon::launch(self, name, machine, port, log, Vec::new())
            .map(drop)
            .map_err(|ApiError(_, e)| {
                if let Some(from) = from {
                    self.disown_incoming(name, &from);
                }
                e
            })
    }

    /// The guest that came in runs: it takes the published ports its
    /// tombstone left here, and is recorded from the record it carried.
    fn adopt(&self, name: &str, reservation: &Reserved) {
        debug_assert_eq!(name, reservation.name());
        let adopted = self.instances().adopt(reservation);
        if let Some(record) = adopted.and_then(|i| i.record) {
            self.record_carried(name, record);
        }
    }

    fn cancel(&self, name: &str, reservation: Reserved) {
        debug_assert_eq!(name, reservation.name());
        self.instances().cancel_incoming(reservation);
    }
}

impl Daemon {
    /// After a successful migration: stops the (paused, released) vCPU
    /// thread, takes the guest's port off the switch (frames for it now go
    /// over the overlay to `peer`) and leaves a tombstone that keeps the
    /// published ports.
    pub(crate) fn moved_away(
        &self,
        name: &str,
        to: &str,
        peer: Option<SocketAddr>,
        skip_frames: usize,
    ) {
        let (handle, port) = {
            let mut instances = self.instances();
            let Some(inst) = instances.get_mut(name) else {
                return;
            };
            inst.state = State::Moved(to.to_owned());
            (inst.handle.take(), inst.port.take())
        };
        self.forget(name);
        if let Some(h) = handle {
            h.stop();
        }
        if let Some(port) = port {
            self.net.moved(&port, peer, skip_frames);
        }
    }

    /// In a fleet store: makes this host the owner of app `name` (moving in
    /// from its source) before its guest starts here, by compare-and-swap.
    /// Refused when another host owns it (it was taken over meanwhile: the
    /// source then keeps or loses it as the store says) or when the store
    /// cannot say. `Some(source)`: ownership moved, and goes back to the
    /// source if the guest then fails to start.
    fn own_incoming(&self, name: &str) -> Result<Option<String>, String> {
        let from = self.instances().incoming(name).map(|i| i.from.clone());
        let (Some(link), Some(from)) = (&self.config.fleet, from) else {
            return Ok(None);
        };
        match fleet::ops::move_in(&link.fleet, name, &from, &self.config.name) {
            Ok(fleet::ops::Ownership::Ours) => Ok(Some(from)),
            Ok(fleet::ops::Ownership::Unrecorded) => Ok(None),
            Ok(fleet::ops::Ownership::Theirs(owner)) => Err(format!(
                "{name} is owned by {owner} in the fleet store (taken over?): not started here"
            )),
            Err(e) => Err(format!(
                "cannot make this host the owner of {name} in the fleet store: {e}"
            )),
        }
    }

    /// Gives app `name` back to `from` in the fleet store (its guest did
    /// not start here after all).
    fn disown_incoming(&self, name: &str, from: &str) {
        let Some(link) = &self.config.fleet else {
            return;
        };
        if let Err(e) = fleet::ops::move_in(&link.fleet, name, &self.config.name, from) {
            tracing::error!(
                instance = name,
                to = from,
                error = %e,
                "cannot give the app back in the fleet store"
            );
        }
    }
}
