//! A user-supplied score: Supercloud's `f(placement, workload, latency)`.
//!
//! The interface is a closure
//! `Fn(&AppId, RegionId, &Inputs) -> f64 + Send + Sync`: given the app, a
//! candidate region and the round's inputs (workloads, RTT matrix, prices,
//! placement), return the cost of running the app there. The conventions
//! are those of every [`Policy`]:
//!
//! - **lower is better**, and the app's threshold is in the same unit;
//! - a non-finite result (`f64::INFINITY`) means "never there";
//! - it is called once per app and region each round, so keep it `O(C)`
//!   (client regions with traffic) and free of I/O.
//!
//! An optional second closure returns [`Constraints`] (allowed regions,
//! evacuations). For more control (metrics in the log), implement
//! [`Policy`] on your own type instead.
//!
//! ```
//! use scheduler::{Cost, FollowTheSun, Policy, UserScore};
//!
//! // Latency, plus 100 ms worth of penalty per $/h: a latency/cost blend.
//! let sun = FollowTheSun::new();
//! let blend = UserScore::new("latency+cost", "ms", move |app, region, inputs| {
//!     sun.score(app, region, inputs) + 100.0 * Cost.score(app, region, inputs)
//! });
//! assert_eq!(blend.name(), "latency+cost");
//! ```

use std::fmt;

use super::{Constraints, Policy};
use crate::model::{AppId, Inputs, RegionId};

/// The signature of a user score.
pub type ScoreFn = dyn Fn(&AppId, RegionId, &Inputs) -> f64 + Send + Sync;

/// The signature of user constraints.
pub type ConstraintsFn = dyn Fn(&AppId, &Inputs) -> Constraints + Send + Sync;

/// A policy made of a user closure. See the module documentation.
pub struct UserScore {
    name: String,
    unit: String,
    score: Box<ScoreFn>,
    constraints: Option<Box<ConstraintsFn>>,
}

impl UserScore {
    /// A policy named `name`, whose scores are in `unit`, computed by `score`.
    pub fn new(
        name: impl Into<String>,
        unit: impl Into<String>,
        score: impl Fn(&AppId, RegionId, &Inputs) -> f64 + Send + Sync + 'static,
    ) -> Self {
        UserScore {
            name: name.into(),
            unit: unit.into(),
            score: Box::new(score),
            constraints: None,
        }
    }

    /// Adds constraints computed by `constraints` each round.
    pub fn with_constraints(
        mut self,
        constraints: impl Fn(&AppId, &Inputs) -> Constraints + Send + Sync + 'static,
    ) -> Self {
        self.constraints = Some(Box::new(constraints));
        self
    }
}

impl fmt::Debug for UserScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserScore")
            .field("name", &self.name)
            .field("unit", &self.unit)
            .field("constraints", &self.constraints.is_some())
            .finish_non_exhaustive()
    }
}

impl Policy for UserScore {
    fn name(&self) -> &str {
        &self.name
    }

    fn unit(&self) -> &str {
        &self.unit
    }

    fn score(&self, app: &AppId, candidate: RegionId, inputs: &Inputs) -> f64 {
        (self.score)(app, candidate, inputs)
    }

    fn constraints(&self, app: &AppId, inputs: &Inputs) -> Constraints {
        self.constraints
            .as_ref()
            .map_or_else(Constraints::default, |c| c(app, inputs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Regions;

    #[test]
    fn delegates_to_closures() {
        let i = Inputs::new(Regions::new(["a", "b"]));
        let p = UserScore::new("by-id", "pts", |_, r, _| r.0 as f64).with_constraints(|_, _| {
            Constraints {
                allowed: Some(vec![RegionId(1)]),
                evacuate: vec![],
            }
        });
        let app = AppId::from("x");
        assert_eq!(p.score(&app, RegionId(1), &i), 1.0);
        assert_eq!(p.unit(), "pts");
        assert_eq!(p.constraints(&app, &i).allowed, Some(vec![RegionId(1)]));
        assert!(format!("{p:?}").contains("by-id"));
    }
}
