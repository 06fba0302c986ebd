//! The placement scheduler: decides in which region each app should run.
//!
//! Host side and pure logic — no KVM, no clocks, no I/O. The shim daemon (or
//! a test, or the follow-the-sun demo) gathers the facts, calls
//! [`Scheduler::decide`] every interval, carries out the moves it returns and
//! reports back when migrations start and finish.
//!
//! # Model
//!
//! - **[`Region`]s** are where shims run and where clients come from. A
//!   [`Regions`] catalogue names them by dense [`RegionId`]s, which index
//!   the [`RttMatrix`] (round-trip ms between regions, measured by the shims,
//!   not assumed symmetric) and the [`PriceTable`] (price per hour, from a
//!   `region,price` CSV; see [`prices`]).
//! - **Apps** ([`AppId`]) run in one region each: the [`Placement`]. An
//!   app's [`Workload`] is the requests and bytes its published ports
//!   received from each client region over the last interval.
//! - **[`Inputs`]** bundle all of that, plus the providers'
//!   [`TerminationNotice`]s, as one snapshot per round. The caller owns the
//!   facts; the scheduler only remembers what it alone knows: migrations in
//!   flight, when each app last moved, and the [`DecisionLog`].
//! - A **[`Policy`]** scores an (app, candidate region) pair: **lower is
//!   better**, in the policy's unit (ms for [`FollowTheSun`], price per hour
//!   for [`Cost`], the user's for [`UserScore`]); a non-finite score rules
//!   the region out. A policy may add [`Constraints`] (allowed regions,
//!   evacuations) and report metrics (the share of requests under 15 ms).
//! - Each app is registered with an [`AppSpec`]: its policy, its threshold
//!   `T` in the policy's unit, an optional cooldown and allowed regions.
//!
//! # The decision rule
//!
//! For each app, independently (`O(R·C)` per app: `R` candidate regions,
//! `C` client regions with traffic; `O(A·R·C)` a round, never a search over
//! combinations of placements):
//!
//! 1. score every allowed region; the *gain* is the current region's score
//!    minus the best other region's;
//! 2. if the app's region has a termination notice (or the policy asks it to
//!    leave, or the region is not allowed), it is **forced** to move to the
//!    best other region, whatever the threshold and cooldown;
//! 3. otherwise it moves only if `gain > T` (strictly: equal regions never
//!    swap) and its cooldown since the last migration has passed;
//! 4. never while a migration of that app is in flight
//!    ([`Scheduler::migration_started`] / [`Scheduler::migration_finished`]);
//! 5. at most [`SchedulerConfig::max_concurrent`] migrations at a time,
//!    counting those in flight: forced moves go first (earliest deadline
//!    first), then the largest gains.
//!
//! Every decision, move or stay, is returned and logged with its
//! [`Reason`] and the scores behind it.
//!
//! # Example
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use scheduler::*;
//!
//! let regions = Regions::new(["us-east", "eu-west", "ap-southeast"]);
//! let (us, eu, ap) = (RegionId(0), RegionId(1), RegionId(2));
//! let mut inputs = Inputs::new(regions);
//! inputs.rtt.set_symmetric(us, eu, 80.0);
//! inputs.rtt.set_symmetric(us, ap, 220.0);
//! inputs.rtt.set_symmetric(eu, ap, 180.0);
//! inputs.placement.set("kv", us);
//! inputs.workloads.insert("kv".into(), Workload::new().with(eu, 900, 0).with(us, 100, 0));
//!
//! let mut sched = Scheduler::new(SchedulerConfig::default());
//! sched.add_app("kv", AppSpec::new(Arc::new(FollowTheSun::new()), 5.0)).unwrap();
//!
//! let now = Duration::from_secs(10);
//! for d in sched.decide(now, &inputs) {
//!     println!("{d}");
//!     if let Some((_, to)) = d.migration() {
//!         sched.migration_started(&d.app, now).unwrap();
//!         // ... migrate ...
//!         inputs.placement.set(d.app.clone(), to);
//!         sched.migration_finished(&d.app, now, true).unwrap();
//!     }
//! }
//! assert_eq!(inputs.placement.get(&"kv".into()), Some(eu));
//! ```
//!
//! [`synthetic::SyntheticDay`] generates a day of workload (client regions
//! whose request rate follows the sun in their time zone) for tests and the
//! demo.

pub mod decision;
pub mod model;
pub mod policy;
pub mod prices;
pub mod rtt;
mod scheduler;
pub mod synthetic;
mod time;
pub mod workload;

pub use decision::{Action, Decision, DecisionLog, Forced, Reason};
pub use model::{AppId, Inputs, Placement, Region, RegionId, Regions, TerminationNotice};
pub use policy::{Constraints, Cost, FollowTheSun, Metrics, Policy, UserScore, Weight};
pub use prices::{PriceError, PriceTable};
pub use rtt::RttMatrix;
pub use scheduler::{AppSpec, Scheduler, SchedulerConfig, SchedulerError};
pub use synthetic::{ClientRegion, SyntheticDay};
pub use workload::{ClientTraffic, Workload};
