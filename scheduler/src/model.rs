//! The things the scheduler reasons about: regions, apps, where each app runs
//! now, termination notices, and the [`Inputs`] bundle one decision round
//! reads.
//!
//! Regions are named by dense indices ([`RegionId`]) into a [`Regions`]
//! catalogue so that the RTT matrix and price table are plain vectors and a
//! score is a few array reads; names are kept for humans and for the log.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::prices::PriceTable;
use crate::rtt::RttMatrix;
use crate::workload::Workload;

/// A region, by its index in the [`Regions`] catalogue of the same [`Inputs`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct RegionId(pub u32);

impl RegionId {
    /// The index of this region in the catalogue (and in the RTT matrix).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A region: where shims run and where clients come from (`us-east`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Its index in the catalogue.
    pub id: RegionId,
    /// Its name, unique in the catalogue.
    pub name: String,
}

/// The catalogue of regions; a region's [`RegionId`] is its position here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Regions {
    list: Vec<Region>,
}

impl Regions {
    /// A catalogue of the given names, in order (ids 0, 1, ...). A repeated
    /// name keeps its first id.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        let mut regions = Regions::default();
        for name in names {
            regions.add(name);
        }
        regions
    }

    /// Adds a region (or finds it, if the name is already there).
    pub fn add(&mut self, name: impl Into<String>) -> RegionId {
        let name = name.into();
        if let Some(id) = self.id(&name) {
            return id;
        }
        let id = RegionId(u32::try_from(self.list.len()).expect("fewer than 2^32 regions"));
        self.list.push(Region { id, name });
        id
    }

    /// The id of the region with this name.
    pub fn id(&self, name: &str) -> Option<RegionId> {
        self.list.iter().find(|r| r.name == name).map(|r| r.id)
    }

    /// The region with this id.
    pub fn get(&self, id: RegionId) -> Option<&Region> {
        self.list.get(id.index())
    }

    /// The name of the region with this id (`"?"` for an unknown id, so
    /// that logs never fail).
    pub fn name(&self, id: RegionId) -> &str {
        self.get(id).map_or("?", |r| r.name.as_str())
    }

    /// Whether the id names a region of this catalogue.
    pub fn contains(&self, id: RegionId) -> bool {
        id.index() < self.list.len()
    }

    /// The number of regions.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether the catalogue is empty.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// All regions, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Region> {
        self.list.iter()
    }

    /// All region ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = RegionId> {
        (0..self.list.len() as u32).map(RegionId)
    }
}

/// An app, by name (`kv`, ...). Apps are independent of each other.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AppId(pub String);

impl From<&str> for AppId {
    fn from(name: &str) -> Self {
        AppId(name.to_owned())
    }
}

impl From<String> for AppId {
    fn from(name: String) -> Self {
        AppId(name)
    }
}

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where each app runs now (app -> region), as the shims report it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Placement {
    map: BTreeMap<AppId, RegionId>,
}

impl Placement {
    /// An empty placement.
    pub fn new() -> Self {
        Placement::default()
    }

    /// Records that `app` runs in `region`.
    pub fn set(&mut self, app: impl Into<AppId>, region: RegionId) {
        self.map.insert(app.into(), region);
    }

    /// Where `app` runs, if it is placed.
    pub fn get(&self, app: &AppId) -> Option<RegionId> {
        self.map.get(app).copied()
    }

    /// Forgets `app`.
    pub fn remove(&mut self, app: &AppId) -> Option<RegionId> {
        self.map.remove(app)
    }

    /// All (app, region) pairs, in app order.
    pub fn iter(&self) -> impl Iterator<Item = (&AppId, RegionId)> {
        self.map.iter().map(|(a, r)| (a, *r))
    }

    /// The number of placed apps.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no app is placed.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A provider's notice that the instances of a region go away at `deadline`
/// (a spot termination, a maintenance window...). Every app in that region
/// is evacuated before then, whatever its policy, threshold or cooldown.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TerminationNotice {
    /// The region being terminated.
    pub region: RegionId,
    /// When it goes away, on the caller's clock (the `now` of
    /// [`Scheduler::decide`](crate::Scheduler::decide)).
    #[serde(with = "crate::time::secs")]
    pub deadline: Duration,
}

/// Everything one decision round reads: a snapshot of the world.
///
/// The scheduler keeps only its own memory (migrations in flight, when each
/// app last moved, the decision log); the facts — where apps run, what the
/// shims measured, prices, notices — come in here each round, so the caller
/// (the shim daemon, a test, a simulation) stays the single source of truth.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Inputs {
    /// The regions; every [`RegionId`] below indexes this.
    pub regions: Regions,
    /// Round-trip times between regions, in milliseconds.
    pub rtt: RttMatrix,
    /// Where each app runs now.
    pub placement: Placement,
    /// Per app: requests and bytes by client region over the last interval.
    pub workloads: BTreeMap<AppId, Workload>,
    /// Price per hour of running in each region (for [`Cost`](crate::Cost)).
    pub prices: PriceTable,
    /// Regions that are going away.
    pub notices: Vec<TerminationNotice>,
}

impl Inputs {
    /// Inputs over these regions, with an RTT matrix of the right size (no
    /// measurements yet but zero on the diagonal), and nothing else.
    pub fn new(regions: Regions) -> Self {
        let n = regions.len();
        Inputs {
            regions,
            rtt: RttMatrix::new(n),
            prices: PriceTable::new(n),
            ..Inputs::default()
        }
    }

    /// The workload of `app`, if one was measured.
    pub fn workload(&self, app: &AppId) -> Option<&Workload> {
        self.workloads.get(app)
    }

    /// The earliest termination notice for `region`, if any.
    pub fn notice(&self, region: RegionId) -> Option<&TerminationNotice> {
        self.notices
            .iter()
            .filter(|n| n.region == region)
            .min_by_key(|n| n.deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_dense_and_unique() {
        let mut regions = Regions::new(["us-east", "eu-west"]);
        assert_eq!(regions.add("ap-southeast"), RegionId(2));
        assert_eq!(regions.add("eu-west"), RegionId(1));
        assert_eq!(regions.len(), 3);
        assert_eq!(regions.id("ap-southeast"), Some(RegionId(2)));
        assert_eq!(regions.name(RegionId(0)), "us-east");
        assert_eq!(regions.name(RegionId(9)), "?");
        assert!(!regions.contains(RegionId(3)));
    }

    #[test]
    fn inputs_round_trip_through_json() {
        let mut inputs = Inputs::new(Regions::new(["a", "b"]));
        inputs.rtt.set_symmetric(RegionId(0), RegionId(1), 40.0);
        inputs.placement.set("kv", RegionId(1));
        inputs
            .workloads
            .insert("kv".into(), Workload::new().with(RegionId(0), 5, 50));
        inputs.prices.set(RegionId(0), 0.5);
        inputs.notices.push(TerminationNotice {
            region: RegionId(1),
            deadline: Duration::from_millis(2500),
        });
        let json = serde_json::to_string(&inputs).unwrap();
        assert!(json.contains(r#""placement":{"kv":1}"#), "{json}");
        assert!(json.contains(r#""deadline":2.5"#), "{json}");
        let back: Inputs = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(back.regions.name(RegionId(1)), "b");
    }

    #[test]
    fn earliest_notice_wins() {
        let mut inputs = Inputs::new(Regions::new(["a", "b"]));
        for s in [30, 10, 20] {
            inputs.notices.push(TerminationNotice {
                region: RegionId(1),
                deadline: Duration::from_secs(s),
            });
        }
        assert_eq!(
            inputs.notice(RegionId(1)).unwrap().deadline,
            Duration::from_secs(10)
        );
        assert!(inputs.notice(RegionId(0)).is_none());
    }
}
