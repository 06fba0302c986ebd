//! The daemon's [`InstanceTable`]: who holds which name and which guest
//! address. It owns the instances (live, busy, exited, moved away), the
//! reservations of instances migrating in, and this shim's address pool,
//! so that a name or an address is given out under one lock, once.
//!
//! A name is reserved ([`InstanceTable::reserve`],
//! [`InstanceTable::reserve_incoming`]) as a busy placeholder, then
//! committed when its guest runs ([`InstanceTable::commit`],
//! [`InstanceTable::adopt`]) or released ([`InstanceTable::release`],
//! [`InstanceTable::cancel_incoming`]), which frees the name and the
//! address together.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use api::server::ApiError;
use api::RunRequest;
use hostnet::pool::GuestNet;
use hostnet::{mac_for, Nic};
use vmm::snapshot::state::{GuestSpec, ImageId, NicSpec};

use crate::instance::{Instance, State};
use crate::limits::check_name;

/// This shim's part of the guest network.
#[derive(Clone, Debug)]
pub struct AddressPool {
    /// The guest subnet (`--guest-net`).
    pub net: GuestNet,
    /// This shim's gateway.
    pub gateway: Ipv4Addr,
    /// The first and last address handed out here.
    pub range: (Ipv4Addr, Ipv4Addr),
    /// Whether guests that moved away keep their address here (the
    /// overlay carries their traffic to them).
    pub overlay: bool,
}

/// An instance migrating in, from its reservation until its guest runs
/// here or the migration fails.
#[derive(Default)]
pub struct Incoming {
    /// The daemon sending it.
    pub from: String,
    /// The instance of that name that lived here before and moved away:
    /// its published ports are still bound here and go back to it.
    pub tombstone: Option<Instance>,
    /// The restart record its migration carried, as this daemon records it.
    pub record: Option<RunRequest>,
}

/// The proof that an incoming name is reserved (the migration crate's
/// `Host::Reservation`): given back to adopt or cancel it.
#[derive(Debug)]
pub struct Reserved {
    name: String,
}

impl Reserved {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The instances, the incoming reservations and the address pool.
pub struct InstanceTable {
    instances: BTreeMap<String, Instance>,
    /// One per instance migrating in (each also an instance `Busy("incoming")`).
    incoming: BTreeMap<String, Incoming>,
    pool: AddressPool,
    /// Addresses of this pool that guests on other hosts hold (they moved
    /// away before this daemon restarted): never handed out here.
    held_elsewhere: BTreeSet<Ipv4Addr>,
}

/// Why a name or an address cannot be reserved.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// Not an instance name (the message says what one is).
    #[error("{0}")]
    BadName(String),
    /// The daemon's limits have no room (status and message of the limit).
    #[error("{}", .0 .1)]
    Refused(ApiError),
    #[error("an instance named '{name}' exists ({state}): stop it first")]
    NameTaken { name: String, state: String },
    #[error("an instance named '{name}' already exists here ({state})")]
    NameTakenHere { name: String, state: String },
    #[error("instance '{holder}' already has address {ip}")]
    AddressTaken { holder: String, ip: Ipv4Addr },
    #[error("instance '{holder}' here already has address {ip} or its MAC")]
    AddressOrMacTaken { holder: String, ip: Ipv4Addr },
    #[error("{ip} is in use by another instance")]
    AddressInUse { ip: Ipv4Addr },
    #[error("{ip} is outside this shim's guest network {net} (serve --guest-net)")]
    OutsideNetwork { ip: Ipv4Addr, net: GuestNet },
    #[error(
        "all {capacity} guest addresses of this shim ({first}..{last}) are in use \
         (serve --guest-net)"
    )]
    PoolFull {
        capacity: usize,
        first: Ipv4Addr,
        last: Ipv4Addr,
    },
}

impl ReserveError {
    /// The API's answer: 400 for a bad name or address, the limit's own
    /// status, else 409 (a conflict).
    pub fn into_api(self) -> ApiError {
        match self {
            ReserveError::BadName(why) => ApiError(400, why),
            ReserveError::Refused(e) => e,
            e @ ReserveError::OutsideNetwork { .. } => ApiError(400, e.to_string()),
            e => ApiError(409, e.to_string()),
        }
    }
}

/// Checks that an instance of `mem` bytes fits beside `live` instances
/// holding `used` bytes (the daemon's limits).
pub trait Admit: FnOnce(usize, u64, u64) -> Result<(), ApiError> {}
impl<F: FnOnce(usize, u64, u64) -> Result<(), ApiError>> Admit for F {}

impl InstanceTable {
    pub fn new(pool: AddressPool) -> Self {
        Self {
            instances: BTreeMap::new(),
            incoming: BTreeMap::new(),
            pool,
            held_elsewhere: BTreeSet::new(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Instance> {
        self.instances.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Instance> {
        self.instances.get_mut(name)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.instances.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Instance)> {
        self.instances.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Instance> {
        self.instances.values_mut()
    }

    /// How many instances are live and the memory they hold.
    pub fn live_usage(&self) -> (usize, u64) {
        self.instances
            .values()
            .filter(|i| i.is_live())
            .fold((0, 0u64), |(n, m), i| {
                (n + 1, m.saturating_add(i.spec.mem_size))
            })
    }

    /// The addresses guests hold: live ones', those of guests that moved
    /// away while the overlay carries them there, and those
    /// [`Self::hold_elsewhere`] names.
    pub fn used_ips(&self) -> BTreeSet<Ipv4Addr> {
        let mut used: BTreeSet<Ipv4Addr> = self
            .instances
            .values()
            .filter(|i| i.is_live() || (self.pool.overlay && matches!(i.state, State::Moved(_))))
            .filter_map(|i| i.spec.nic.map(|n| n.ip))
            .collect();
        used.extend(self.held_elsewhere.iter());
        used
    }

    /// This shim's pool and how much of it is free.
    pub fn address_use(&self) -> api::AddressUse {
        let (first, last) = self.pool.range;
        let taken = self.used_ips().range(first..=last).count();
        api::AddressUse {
            guest_net: self.pool.net.to_string(),
            first: first.to_string(),
            last: last.to_string(),
            free: GuestNet::capacity(self.pool.range) - taken,
        }
    }

    /// Notes addresses of this pool that guests on other hosts hold (found
    /// at start, e.g. guests that moved away before a restart): no new
    /// instance here gets them, for the daemon's life (at most the pool's
    /// size); a guest coming back with one is let in.
    pub fn hold_elsewhere(&mut self, ips: impl IntoIterator<Item = Ipv4Addr>) {
        let (first, last) = self.pool.range;
        self.held_elsewhere
            .extend(ips.into_iter().filter(|ip| (first..=last).contains(ip)));
    }

    /// Reserves `name` for `spec` (its address, if it has one, must be
    /// free); fails if the name is bad or taken or `admit` has no room.
    pub fn reserve(
        &mut self,
        name: &str,
        spec: GuestSpec,
        admit: impl Admit,
    ) -> Result<(), ReserveError> {
        self.check_reservable(name, &spec, admit)?;
        self.insert_placeholder(name, spec, "starting");
        Ok(())
    }

    /// Reserves `name` as [`Self::reserve`] does, with a network card whose
    /// address is picked under the same lock (`asked`, else the lowest
    /// free one of the pool): concurrent runs never get one address twice.
    pub fn reserve_with_address(
        &mut self,
        name: &str,
        mut spec: GuestSpec,
        asked: Option<Ipv4Addr>,
        admit: impl Admit,
    ) -> Result<Nic, ReserveError> {
        self.check_reservable(name, &spec, admit)?;
        let ip = self.pick_ip(asked)?;
        let nic = Nic {
            mac: mac_for(ip),
            ip,
            prefix: self.pool.net.prefix(),
            gateway: Some(self.pool.gateway),
        };
        spec.nic = Some(nic.into());
        self.insert_placeholder(name, spec, "starting");
        Ok(nic)
    }

    /// Reserves the name, address and MAC of an instance migrating in from
    /// `incoming.from`. A tombstone of the same name (it lived here and
    /// moved away) is set aside in the reservation.
    pub fn reserve_incoming(
        &mut self,
        spec: GuestSpec,
        mut incoming: Incoming,
        admit: impl Admit,
    ) -> Result<Reserved, ReserveError> {
        let name = spec.name.clone();
        check_name(&name).map_err(|ApiError(_, why)| ReserveError::BadName(why))?;
        let (live, used) = self.live_usage();
        admit(live, used, spec.mem_size).map_err(ReserveError::Refused)?;
        if let Some(old) = self.instances.get(&name) {
            if !matches!(old.state, State::Moved(_)) {
                return Err(ReserveError::NameTakenHere {
                    name,
                    state: old.info().state.to_string(),
                });
            }
        }
        if let Some(nic) = spec.nic {
            if let Some(other) = self.holder_of(&nic, true) {
                return Err(ReserveError::AddressOrMacTaken {
                    holder: other.name.clone(),
                    ip: nic.ip,
                });
            }
        }
        incoming.tombstone = self.instances.remove(&name);
        self.insert_placeholder(&name, spec, "incoming");
        self.incoming.insert(name.clone(), incoming);
        Ok(Reserved { name })
    }

    /// The reservation of an instance migrating in.
    pub fn incoming(&self, name: &str) -> Option<&Incoming> {
        self.incoming.get(name)
    }

    /// The network card reserved for `name`, while it migrates in.
    pub fn reserved_nic(&self, name: &str) -> Option<NicSpec> {
        self.incoming.get(name)?;
        self.instances.get(name).and_then(|i| i.spec.nic)
    }

    /// The guest of reserved `name` runs: it becomes (or is updated to be)
    /// a running instance, which `fill` completes.
    pub fn commit(
        &mut self,
        name: &str,
        spec: GuestSpec,
        fill: impl FnOnce(&mut Instance),
    ) -> &mut Instance {
        let inst = self
            .instances
            .entry(name.to_owned())
            .or_insert_with(|| Instance::new(name, spec.clone(), State::Running));
        inst.spec = spec;
        inst.state = State::Running;
        fill(inst);
        inst
    }

    /// The guest that migrated in as `reserved` runs here: it takes the
    /// published ports its tombstone left here. Returns the reservation.
    pub fn adopt(&mut self, reserved: &Reserved) -> Option<Incoming> {
        let mut incoming = self.incoming.remove(&reserved.name)?;
        if let (Some(t), Some(inst)) = (
            incoming.tombstone.take(),
            self.instances.get_mut(&reserved.name),
        ) {
            inst.publish.extend(t.publish);
        }
        Some(incoming)
    }

    /// Undoes [`Self::reserve_incoming`]: the name and the address are
    /// free again, the tombstone (if any) is back. Returns the reservation.
    pub fn cancel_incoming(&mut self, reserved: Reserved) -> Option<Incoming> {
        let mut incoming = self.incoming.remove(&reserved.name)?;
        self.instances.remove(&reserved.name);
        if let Some(t) = incoming.tombstone.take() {
            self.instances.insert(reserved.name, t);
        }
        Some(incoming)
    }

    /// Frees a name [`Self::reserve`]d whose guest did not start (and its
    /// address).
    pub fn release(&mut self, name: &str) {
        if self.incoming.contains_key(name) {
            return;
        }
        self.instances.remove(name);
    }

    /// Takes an instance out (stopped): its name and address are free.
    pub fn remove(&mut self, name: &str) -> Option<Instance> {
        if self.incoming.contains_key(name) {
            return None;
        }
        self.instances.remove(name)
    }

    fn insert_placeholder(&mut self, name: &str, spec: GuestSpec, what: &'static str) {
        self.instances.insert(
            name.to_owned(),
            Instance::new(name, spec, State::Busy(what)),
        );
    }

    /// A live instance with `nic`'s address (or, `mac` set, its MAC).
    fn holder_of(&self, nic: &NicSpec, mac: bool) -> Option<&Instance> {
        self.instances.values().find(|i| {
            i.is_live()
                && i.spec
                    .nic
                    .is_some_and(|n| n.ip == nic.ip || (mac && n.mac == nic.mac))
        })
    }

    /// Why `name` with `spec` cannot be reserved, if it cannot: a bad or
    /// taken name, no room in the limits, its address held by another
    /// instance.
    fn check_reservable(
        &self,
        name: &str,
        spec: &GuestSpec,
        admit: impl Admit,
    ) -> Result<(), ReserveError> {
        check_name(name).map_err(|ApiError(_, why)| ReserveError::BadName(why))?;
        let (live, used) = self.live_usage();
        admit(live, used, spec.mem_size).map_err(ReserveError::Refused)?;
        if let Some(old) = self.instances.get(name) {
            return Err(ReserveError::NameTaken {
                name: name.to_owned(),
                state: old.info().state.to_string(),
            });
        }
        if let Some(nic) = spec.nic {
            if let Some(other) = self.holder_of(&nic, false) {
                return Err(ReserveError::AddressTaken {
                    holder: other.name.clone(),
                    ip: nic.ip,
                });
            }
        }
        Ok(())
    }

    /// The address of a new instance: `asked` if free and in the guest
    /// subnet, else the lowest free one of the pool.
    fn pick_ip(&self, asked: Option<Ipv4Addr>) -> Result<Ipv4Addr, ReserveError> {
        let used = self.used_ips();
        let net = self.pool.net;
        if let Some(ip) = asked {
            if !hostnet::in_subnet(ip, self.pool.gateway, net.prefix()) {
                return Err(ReserveError::OutsideNetwork { ip, net });
            }
            if used.contains(&ip) {
                return Err(ReserveError::AddressInUse { ip });
            }
            return Ok(ip);
        }
        let (first, last) = self.pool.range;
        GuestNet::lowest_free((first, last), &used).ok_or(ReserveError::PoolFull {
            capacity: GuestNet::capacity((first, last)),
            first,
            last,
        })
    }
}

/// A spec for a reservation, before the guest exists.
pub fn placeholder_spec(name: &str, mem: u64) -> GuestSpec {
    GuestSpec {
        name: name.to_owned(),
        image: ImageId {
            path: String::new(),
            size: 0,
            sha256: String::new(),
        },
        cmdline: String::new(),
        mem_size: mem,
        kvmclock: false,
        nic: None,
        cpuid: Vec::new(),
        env: Vec::new(),
        args: Vec::new(),
        generation: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> InstanceTable {
        let net: GuestNet = "10.0.0.0/16".parse().unwrap();
        let range = net.pool(1, false).unwrap();
        InstanceTable::new(AddressPool {
            net,
            gateway: net.gateway(1),
            range,
            overlay: false,
        })
    }

    fn any(_: usize, _: u64, _: u64) -> Result<(), ApiError> {
        Ok(())
    }

    fn spec(name: &str) -> GuestSpec {
        placeholder_spec(name, 16 << 20)
    }

    #[test]
    fn a_name_or_an_address_is_reserved_once() {
        let mut t = table();
        let a = t.reserve_with_address("a", spec("a"), None, any).unwrap();
        let b = t.reserve_with_address("b", spec("b"), None, any).unwrap();
        assert_ne!(a.ip, b.ip, "two reservations, two addresses");
        assert_eq!(
            t.reserve_with_address("a", spec("a"), None, any)
                .err()
                .map(|e| e.into_api().0),
            Some(409),
            "the name is taken"
        );
        assert!(
            matches!(
                t.reserve_with_address("c", spec("c"), Some(a.ip), any),
                Err(ReserveError::AddressInUse { ip }) if ip == a.ip
            ),
            "the address is taken"
        );
        let mut incoming = spec("d");
        incoming.nic = Some(b.into());
        assert!(
            matches!(
                t.reserve_incoming(incoming, Incoming::default(), any),
                Err(ReserveError::AddressOrMacTaken { holder, .. }) if holder == "b"
            ),
            "an incoming guest cannot take a live one's address"
        );
        let refused = |_: usize, _: u64, _: u64| Err(ApiError(409, "full".into()));
        assert!(matches!(
            t.reserve_with_address("e", spec("e"), None, refused),
            Err(ReserveError::Refused(ApiError(409, _)))
        ));
        assert!(!t.contains_key("e"), "a refused reservation leaves nothing");
        assert_eq!(t.live_usage(), (2, 32 << 20));
    }

    #[test]
    fn release_frees_the_name_and_the_address() {
        let mut t = table();
        let a = t.reserve_with_address("a", spec("a"), None, any).unwrap();
        t.release("a");
        assert!(!t.contains_key("a"));
        let again = t.reserve_with_address("b", spec("b"), None, any).unwrap();
        assert_eq!(
            again.ip, a.ip,
            "the lowest free address is the released one"
        );

        // An incoming guest: cancelled, its name and address are free and
        // the tombstone it replaced is back.
        let ip = again.ip;
        let b_spec = t.get("b").unwrap().spec.clone();
        t.commit("b", b_spec, |_| {});
        t.get_mut("b").unwrap().state = State::Moved("elsewhere".into());
        let mut s = spec("b");
        s.nic = t.get("b").unwrap().spec.nic;
        let reserved = t
            .reserve_incoming(
                s,
                Incoming {
                    from: "peer".into(),
                    ..Incoming::default()
                },
                any,
            )
            .unwrap();
        assert_eq!(t.reserved_nic("b").map(|n| n.ip), Some(ip));
        assert!(t.remove("b").is_none(), "a reservation is not stopped");
        assert!(t.used_ips().contains(&ip));
        let back = t.cancel_incoming(reserved).unwrap();
        assert_eq!(back.from, "peer");
        assert!(matches!(
            t.get("b").map(|i| &i.state),
            Some(State::Moved(_))
        ));
        assert!(t.reserved_nic("b").is_none());
        assert!(
            !t.used_ips().contains(&ip),
            "a moved guest's address, no overlay"
        );
    }
}
