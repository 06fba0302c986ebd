//! Where an app of the fleet runs: its record says a host, and each shim it
//! left on the way says where it went (`moved`); [`locate`] follows that
//! path, [`record_move`] writes where it ended up.

use api::{Client, InstanceInfo};

use crate::store::{Expect, StoreError, Versioned};
use crate::{client_for, App, Fleet, FleetError, Host};

/// Most hops from a shim an app left to the shim it runs on.
pub const MAX_HOPS: usize = 16;

/// A shim of the app's path, by fleet host when there is one.
pub struct Hop {
    pub client: Client,
    /// The fleet host's name, else the shim's address.
    pub label: String,
    pub host: Option<Host>,
}

/// The shim at API address `addr`, as a fleet host if it is one.
pub fn hop_to(fleet: Option<&Fleet>, addr: &str) -> Result<Hop, FleetError> {
    match fleet.map(|f| f.host_by_addr(addr)).transpose()?.flatten() {
        Some(h) => Ok(Hop {
            client: client_for(&h)?,
            label: h.name.clone(),
            host: Some(h),
        }),
        None => Ok(Hop {
            client: Client::new(addr),
            label: addr.to_owned(),
            host: None,
        }),
    }
}

/// Where an app is: the shim it runs on, and the shims it left on the way
/// (whose tombstones hold its published ports).
pub struct Located {
    /// Its fleet record.
    pub app: Versioned<App>,
    /// The shim it runs on.
    pub live: Hop,
    /// What that shim says of it.
    pub info: InstanceInfo,
    /// The shims it moved away from, in order.
    pub left: Vec<Hop>,
}

/// Finds app `name`: from its recorded host, along the shims' `moved`
/// tombstones (at most [`MAX_HOPS`]) to the shim it runs on.
pub fn locate(fleet: &Fleet, name: &str) -> Result<Located, FleetError> {
    let app = fleet.app(name)?.ok_or_else(|| {
        FleetError::NotFound(format!(
            "no app '{name}' in the fleet (see `host-shim ps`; deploy it with `host-shim deploy`)"
        ))
    })?;
    let host = fleet.need_host(&app.value.host)?;
    let mut hop = Hop {
        client: client_for(&host)?,
        label: host.name.clone(),
        host: Some(host),
    };
    let mut left = Vec::new();
    for _ in 0..MAX_HOPS {
        let list: Vec<InstanceInfo> = hop.client.list()?;
        let info = list.into_iter().find(|i| i.name == name).ok_or_else(|| {
            FleetError::NotFound(format!("app '{name}' is not on host {}", hop.label))
        })?;
        match info.state.moved_to() {
            Some(addr) => {
                let next = hop_to(Some(fleet), addr)?;
                left.push(std::mem::replace(&mut hop, next));
            }
            None => {
                return Ok(Located {
                    app,
                    live: hop,
                    info,
                    left,
                })
            }
        }
    }
    Err(FleetError::Failed(format!(
        "app '{name}' moved more than {MAX_HOPS} times without arriving"
    )))
}

/// Records that app `name` runs on `host` now (what a shim said, so it
/// wins): compare-and-swap on the app's record, again if another CLI
/// wrote it meanwhile; nothing if the app is not in the fleet.
pub fn record_move(fleet: &Fleet, name: &str, host: &str) -> Result<(), FleetError> {
    for _ in 0..8 {
        let Some(v) = fleet.app(name)? else {
            return Ok(());
        };
        if v.value.host == host {
            return Ok(());
        }
        let mut app = v.value;
        app.host = host.to_owned();
        match fleet.put_app(&app, Expect::Version(v.version)) {
            Err(FleetError::Store(StoreError::Conflict { .. })) => continue,
            other => return other.map(|_| ()),
        }
    }
    Err(FleetError::Failed(format!(
        "the fleet record of {name} keeps changing: run the command again"
    )))
}
