//! The RTT matrix: round-trip times between regions, in milliseconds, as the
//! shims measure them between themselves.
//!
//! Entry `(from, to)` is what a client (or shim) in `from` sees talking to
//! `to`. The matrix is not assumed symmetric: each shim measures its own
//! row. A missing entry falls back to the reverse measurement (a round trip
//! covers both directions, so it is the best estimate there is), and only
//! when both are missing is the RTT unknown. The diagonal (clients talking
//! to an app in their own region) starts at 0 and can be set like any other
//! entry, for instance to the measured in-region latency.

use serde::{Deserialize, Serialize};

use crate::model::RegionId;

/// Round-trip times between `n` regions, in milliseconds; dense, `n × n`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RttMatrixRepr")]
pub struct RttMatrix {
    n: usize,
    /// Row-major; `None` is "not measured".
    ms: Vec<Option<f64>>,
}

/// The serialized form, checked on the way in.
#[derive(Deserialize)]
struct RttMatrixRepr {
    n: usize,
    ms: Vec<Option<f64>>,
}

impl TryFrom<RttMatrixRepr> for RttMatrix {
    type Error = String;

    fn try_from(r: RttMatrixRepr) -> Result<Self, String> {
        if r.n.checked_mul(r.n) != Some(r.ms.len()) {
            return Err(format!(
                "an RTT matrix of {} regions needs {} entries, not {}",
                r.n,
                r.n * r.n,
                r.ms.len()
            ));
        }
        if let Some(bad) =
            r.ms.iter()
                .flatten()
                .find(|ms| !(ms.is_finite() && **ms >= 0.0))
        {
            return Err(format!("invalid RTT {bad} ms"));
        }
        Ok(RttMatrix { n: r.n, ms: r.ms })
    }
}

impl RttMatrix {
    /// A matrix for `n` regions: 0 ms on the diagonal, nothing else known.
    pub fn new(n: usize) -> Self {
        let mut ms = vec![None; n * n];
        for i in 0..n {
            ms[i * n + i] = Some(0.0);
        }
        RttMatrix { n, ms }
    }

    /// The number of regions the matrix covers.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the matrix covers no region.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn slot(&self, from: RegionId, to: RegionId) -> Option<usize> {
        let (f, t) = (from.index(), to.index());
        (f < self.n && t < self.n).then(|| f * self.n + t)
    }

    /// Records a measurement from `from` to `to`. A negative or non-finite
    /// value is no measurement: it clears the entry.
    ///
    /// # Panics
    /// If either region is outside the matrix (a caller bug, like indexing
    /// past the end of a slice).
    pub fn set(&mut self, from: RegionId, to: RegionId, ms: f64) {
        let slot = self
            .slot(from, to)
            .unwrap_or_else(|| panic!("RTT {from} -> {to} outside a {0}x{0} matrix", self.n));
        self.ms[slot] = (ms.is_finite() && ms >= 0.0).then_some(ms);
    }

    /// Records the same RTT in both directions.
    pub fn set_symmetric(&mut self, a: RegionId, b: RegionId, ms: f64) {
        self.set(a, b, ms);
        self.set(b, a, ms);
    }

    /// Exactly what was measured from `from` to `to`, without fallback.
    pub fn measured(&self, from: RegionId, to: RegionId) -> Option<f64> {
        self.slot(from, to).and_then(|s| self.ms[s])
    }

    /// The RTT from `from` to `to`: the measurement in that direction, else
    /// the reverse one, else `None` (unknown, or a region outside the
    /// matrix).
    #[inline]
    pub fn get(&self, from: RegionId, to: RegionId) -> Option<f64> {
        self.measured(from, to).or_else(|| self.measured(to, from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonal_zero_and_fallback_to_reverse() {
        let (a, b, c) = (RegionId(0), RegionId(1), RegionId(2));
        let mut m = RttMatrix::new(3);
        assert_eq!(m.get(a, a), Some(0.0));
        m.set(a, b, 80.0);
        assert_eq!(m.get(a, b), Some(80.0));
        assert_eq!(m.measured(b, a), None);
        assert_eq!(m.get(b, a), Some(80.0), "falls back to the reverse entry");
        m.set(b, a, 90.0);
        assert_eq!(m.get(b, a), Some(90.0), "not assumed symmetric");
        assert_eq!(m.get(a, c), None);
        assert_eq!(m.get(a, RegionId(7)), None);
    }

    #[test]
    fn invalid_measurement_clears() {
        let mut m = RttMatrix::new(2);
        m.set_symmetric(RegionId(0), RegionId(1), 10.0);
        m.set(RegionId(0), RegionId(1), f64::NAN);
        m.set(RegionId(1), RegionId(0), -1.0);
        assert_eq!(m.get(RegionId(0), RegionId(1)), None);
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let mut m = RttMatrix::new(2);
        m.set(RegionId(0), RegionId(1), 12.5);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"n":2,"ms":[0.0,12.5,null,0.0]}"#);
        assert_eq!(serde_json::from_str::<RttMatrix>(&json).unwrap(), m);
        assert!(serde_json::from_str::<RttMatrix>(r#"{"n":2,"ms":[0.0]}"#).is_err());
        assert!(serde_json::from_str::<RttMatrix>(r#"{"n":1,"ms":[-1.0]}"#).is_err());
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn set_outside_panics() {
        RttMatrix::new(2).set(RegionId(0), RegionId(2), 1.0);
    }
}
