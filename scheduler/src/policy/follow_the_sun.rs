//! Follow the sun: put the app where its requests come from.
//!
//! The score of a candidate region is the mean round-trip time a request
//! would see if the app ran there: the request-weighted mean, over client
//! regions with traffic, of the RTT from the client region to the candidate
//! (the metric of the Supercloud TOCS paper):
//!
//! ```text
//! score(c) = Σ_r requests(r) · rtt(r, c) / Σ_r requests(r)      [ms]
//! ```
//!
//! `O(C)` per candidate. With no traffic every region scores 0 (no request
//! sees any latency), so the app stays. A client region with no RTT known to
//! the candidate makes the candidate unscorable (infinite): the scheduler
//! does not move apps into regions it cannot measure.
//!
//! It also reports, for the log and the demo, the share of requests that
//! would be served within a latency bound (15 ms by default).

use super::{Metrics, Policy};
use crate::model::{AppId, Inputs, RegionId};
use crate::workload::Workload;

/// What a request weighs in the mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Weight {
    /// Every request counts the same (the mean latency a request sees).
    #[default]
    Requests,
    /// Weighted by bytes (for bulk-transfer apps, where big responses
    /// matter more than many small ones).
    Bytes,
}

/// The follow-the-sun policy: request-weighted client latency, in ms.
#[derive(Clone, Debug)]
pub struct FollowTheSun {
    /// How requests are weighted.
    pub weight: Weight,
    /// The latency bound of the reported share, in ms (15 by default).
    pub bound_ms: f64,
    metric_name: String,
}

impl Default for FollowTheSun {
    fn default() -> Self {
        FollowTheSun::new()
    }
}

impl FollowTheSun {
    /// Request-weighted, reporting the share under 15 ms.
    pub fn new() -> Self {
        FollowTheSun::with_bound(15.0)
    }

    /// Request-weighted, reporting the share under `bound_ms`.
    pub fn with_bound(bound_ms: f64) -> Self {
        FollowTheSun {
            weight: Weight::Requests,
            bound_ms,
            metric_name: format!("share_under_{bound_ms}ms"),
        }
    }

    /// Weighted by `weight` instead.
    pub fn weighted_by(mut self, weight: Weight) -> Self {
        self.weight = weight;
        self
    }

    /// The name of the share metric in the log: `share_under_15ms`.
    pub fn share_metric_name(&self) -> &str {
        &self.metric_name
    }

    fn weight_of(&self, requests: u64, bytes: u64) -> f64 {
        match self.weight {
            Weight::Requests => requests as f64,
            Weight::Bytes => bytes as f64,
        }
    }

    /// The weighted mean RTT clients would see with the app in `candidate`;
    /// 0 with no traffic, `None` if an RTT is unknown.
    pub fn mean_latency(
        &self,
        workload: &Workload,
        candidate: RegionId,
        inputs: &Inputs,
    ) -> Option<f64> {
        let (mut sum, mut total) = (0.0, 0.0);
        for c in workload.clients() {
            let w = self.weight_of(c.requests, c.bytes);
            if w == 0.0 {
                continue;
            }
            sum += w * inputs.rtt.get(c.region, candidate)?;
            total += w;
        }
        Some(if total > 0.0 { sum / total } else { 0.0 })
    }

    /// The share (0..=1) of the weight whose RTT to `candidate` is at most
    /// `bound_ms`; client regions with an unknown RTT count as over the
    /// bound. `None` with no traffic.
    pub fn share_under(
        &self,
        workload: &Workload,
        candidate: RegionId,
        inputs: &Inputs,
        bound_ms: f64,
    ) -> Option<f64> {
        let (mut under, mut total) = (0.0, 0.0);
        for c in workload.clients() {
            let w = self.weight_of(c.requests, c.bytes);
            total += w;
            if inputs
                .rtt
                .get(c.region, candidate)
                .is_some_and(|ms| ms <= bound_ms)
            {
                under += w;
            }
        }
        (total > 0.0).then(|| under / total)
    }
}

impl Policy for FollowTheSun {
    fn name(&self) -> &str {
        "follow-the-sun"
    }

    fn unit(&self) -> &str {
        "ms"
    }

    fn score(&self, app: &AppId, candidate: RegionId, inputs: &Inputs) -> f64 {
        match inputs.workload(app) {
            None => 0.0,
            Some(w) => self
                .mean_latency(w, candidate, inputs)
                .unwrap_or(f64::INFINITY),
        }
    }

    fn metrics(&self, app: &AppId, region: RegionId, inputs: &Inputs) -> Metrics {
        let mut m = Metrics::new();
        if let Some(share) = inputs
            .workload(app)
            .and_then(|w| self.share_under(w, region, inputs, self.bound_ms))
        {
            m.insert(self.metric_name.clone(), share);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Regions;

    fn inputs() -> Inputs {
        let mut i = Inputs::new(Regions::new(["a", "b", "c"]));
        i.rtt.set_symmetric(RegionId(0), RegionId(1), 10.0);
        i.rtt.set_symmetric(RegionId(0), RegionId(2), 100.0);
        i.rtt.set(RegionId(1), RegionId(1), 1.0);
        i
    }

    #[test]
    fn mean_and_share() {
        let mut i = inputs();
        let app = AppId::from("kv");
        i.workloads.insert(
            app.clone(),
            Workload::new()
                .with(RegionId(0), 3, 300)
                .with(RegionId(1), 1, 10_000),
        );
        let p = FollowTheSun::new();
        assert_eq!(
            p.score(&app, RegionId(0), &i),
            (3.0 * 0.0 + 1.0 * 10.0) / 4.0
        );
        assert_eq!(
            p.score(&app, RegionId(1), &i),
            (3.0 * 10.0 + 1.0 * 1.0) / 4.0
        );
        // No RTT b <-> c: c cannot be scored.
        assert_eq!(p.score(&app, RegionId(2), &i), f64::INFINITY);
        assert_eq!(p.metrics(&app, RegionId(0), &i)["share_under_15ms"], 1.0);
        let w = i.workload(&app).unwrap();
        assert_eq!(p.share_under(w, RegionId(0), &i, 5.0), Some(0.75));
        assert_eq!(p.share_under(w, RegionId(2), &i, 5.0), Some(0.0));
        let by_bytes = FollowTheSun::new().weighted_by(Weight::Bytes);
        assert!(by_bytes.score(&app, RegionId(1), &i) < by_bytes.score(&app, RegionId(0), &i));
    }

    #[test]
    fn no_traffic_scores_zero_everywhere() {
        let i = inputs();
        let p = FollowTheSun::new();
        let app = AppId::from("idle");
        assert_eq!(p.score(&app, RegionId(2), &i), 0.0);
        assert!(p.metrics(&app, RegionId(2), &i).is_empty());
    }
}
