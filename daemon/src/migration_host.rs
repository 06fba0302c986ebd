//! The daemon as the migration crate sees it: `impl migration::Host for
//! Daemon` (what a migration needs from an instance and from this host),
//! and the restored, not yet started guest of an incoming migration.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hostnet::port::GuestPort;
use migration::protocol::Hello;
use migration::{Local, MigrationConfig, Migrations};
use vmm::machine::{Hypervisor, Machine, MachineHandle};
use vmm::snapshot::state::{GuestSpec, MachineState, NicSpec};
use vmm::vstate::vm::Vm;

use crate::instance::{InstanceConsole, LogRing, State};
use crate::{ApiError, Daemon, Incoming};

/// A guest restored from an incoming migration, not started.
pub struct Prepared {
    machine: Machine,
    port: Arc<GuestPort>,
    log: Arc<Mutex<LogRing>>,
}

impl migration::Host for Daemon {
    type Reservation = Incoming;
    type Prepared = Prepared;

    fn migrations(&self) -> &Migrations {
        &self.migrations
    }

    fn migration_config(&self) -> MigrationConfig {
        self.config.migration
    }

    fn local(&self) -> Local {
        Local {
            name: self.config.name.clone(),
            region: self.config.region.clone(),
            api: self.config.listen,
        }
    }

    fn hypervisor(&self) -> &Hypervisor {
        &self.hv
    }

    fn overlay_addr(&self) -> Option<SocketAddr> {
        self.net.overlay_addr()
    }

    fn add_overlay_peer(&self, peer: SocketAddr) {
        self.net.add_peer(peer);
    }

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

    fn reserve_incoming(&self, hello: &Hello) -> Result<Incoming, String> {
        Daemon::reserve_incoming(self, hello)
    }

    fn reserved_nic(&self, name: &str) -> Option<NicSpec> {
        self.instances().get(name).and_then(|i| match i.state {
            State::Busy("incoming") => i.spec.nic,
            _ => None,
        })
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

    fn adopt(&self, name: &str, reservation: &Incoming) {
        self.adopt_publishes(name, reservation);
        self.record_carried(name);
        self.incoming_from().remove(name);
    }

    fn cancel_incoming(&self, name: &str, reservation: Incoming) {
        Daemon::cancel_incoming(self, name, reservation);
    }
}

impl Daemon {
    /// Who is sending the instances migrating in, by name (one entry per
    /// incoming reservation at most).
    pub(crate) fn incoming_from(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, String>> {
        self.incoming_from.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// In a fleet store: makes this host the owner of app `name` (moving in
    /// from its source) before its guest starts here, by compare-and-swap.
    /// Refused when another host owns it (it was taken over meanwhile: the
    /// source then keeps or loses it as the store says) or when the store
    /// cannot say. `Some(source)`: ownership moved, and goes back to the
    /// source if the guest then fails to start.
    fn own_incoming(&self, name: &str) -> Result<Option<String>, String> {
        let (Some(link), Some(from)) =
            (&self.config.fleet, self.incoming_from().get(name).cloned())
        else {
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
                app = name,
                "cannot give the app back to {from} in the fleet store: {e}"
            );
        }
    }
}
