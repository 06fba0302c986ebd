//! Cost: chase the cheapest region.
//!
//! The score of a region is its price per hour from the round's price feed
//! ([`Inputs::prices`], loaded with
//! [`PriceTable::from_csv`](crate::PriceTable::from_csv)); a region without a
//! price cannot be scored and is never a destination. The threshold is in
//! the same unit: with a threshold of 0.01 an app moves only to a region at
//! least 0.01/h cheaper.
//!
//! Termination notices ([`Inputs::notices`]) are what makes cost chasing
//! safe on spot capacity: the scheduler evacuates every app from a noticed
//! region before its deadline, to the best (cheapest) other region, whatever
//! the threshold or cooldown. That rule lives in the scheduler and applies
//! to every policy.

use super::Policy;
use crate::model::{AppId, Inputs, RegionId};

/// The cost policy: price per hour of the candidate region.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost;

impl Cost {
    /// The cost policy.
    pub fn new() -> Self {
        Cost
    }
}

impl Policy for Cost {
    fn name(&self) -> &str {
        "cost"
    }

    fn unit(&self) -> &str {
        "$/h"
    }

    fn score(&self, _app: &AppId, candidate: RegionId, inputs: &Inputs) -> f64 {
        inputs.prices.get(candidate).unwrap_or(f64::INFINITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Regions;

    #[test]
    fn score_is_price_or_infinite() {
        let mut i = Inputs::new(Regions::new(["a", "b"]));
        i.prices.set(RegionId(0), 0.25);
        let app = AppId::from("x");
        assert_eq!(Cost.score(&app, RegionId(0), &i), 0.25);
        assert_eq!(Cost.score(&app, RegionId(1), &i), f64::INFINITY);
    }
}
