//! Policies: how good it would be for an app to run in a region.
//!
//! A [`Policy`] scores one (app, candidate region) pair from the round's
//! [`Inputs`]. **Lower is better** — scores are costs: milliseconds of
//! latency, price per hour, or whatever the user's unit is. The scheduler
//! compares the current region's score with the best other region's and
//! moves when the difference (the *gain*) is larger than the app's threshold,
//! which is in the same unit.
//!
//! A score that is not finite (`f64::INFINITY`, NaN) means "this region
//! cannot be scored or must not be used" (no RTT measured, no price known);
//! such a region is never a destination. It is not a reason to leave, though:
//! an app whose current region scores non-finite stays (the measurement may
//! just be missing). To make apps leave a region, use [`Constraints`].
//!
//! Policies can also impose [`Constraints`] (regions the app may run in,
//! regions it must leave by a deadline) and report extra [`Metrics`] for
//! the decision log (follow-the-sun reports the share of requests under a
//! latency bound).
//!
//! Provided: [`FollowTheSun`], [`Cost`] and [`UserScore`] (a closure).
//! Implementing the trait directly is the other way to plug in a score.

mod cost;
mod follow_the_sun;
mod user;

use std::collections::BTreeMap;

pub use cost::Cost;
pub use follow_the_sun::{FollowTheSun, Weight};
pub use user::UserScore;

use crate::model::{AppId, Inputs, RegionId, TerminationNotice};

/// Named numbers a policy reports about a placement, for the log and the
/// dashboard (e.g. `share_under_15ms`).
pub type Metrics = BTreeMap<String, f64>;

/// Where an app may run and what it must leave.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Constraints {
    /// If set, the app may run only in these regions. An app found outside
    /// them is moved (whatever the threshold and cooldown) to the best
    /// allowed region.
    pub allowed: Option<Vec<RegionId>>,
    /// Regions the app must leave before a deadline, in addition to the
    /// provider's termination notices in [`Inputs::notices`], which the
    /// scheduler honours for every policy.
    pub evacuate: Vec<TerminationNotice>,
}

/// A placement policy. See the module documentation for the conventions.
///
/// Implementations must be cheap: [`score`](Policy::score) runs once per
/// app and region each round (`A × R` calls), and should cost `O(C)` in the
/// number of client regions with traffic.
pub trait Policy: Send + Sync {
    /// A short name for logs (`follow-the-sun`).
    fn name(&self) -> &str;

    /// The unit of scores and thresholds, for logs (`ms`, `$/h`).
    fn unit(&self) -> &str {
        ""
    }

    /// The cost of running `app` in `candidate`; lower is better, not finite
    /// means "not there".
    fn score(&self, app: &AppId, candidate: RegionId, inputs: &Inputs) -> f64;

    /// Constraints on `app` this round. None by default.
    fn constraints(&self, _app: &AppId, _inputs: &Inputs) -> Constraints {
        Constraints::default()
    }

    /// Extra numbers about running `app` in `region`, recorded in the log
    /// for the current and the chosen region only. None by default.
    fn metrics(&self, _app: &AppId, _region: RegionId, _inputs: &Inputs) -> Metrics {
        Metrics::new()
    }
}
