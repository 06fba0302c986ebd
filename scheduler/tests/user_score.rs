//! User-supplied scores through `UserScore` and through the `Policy` trait.

mod common;

use std::sync::Arc;

use common::*;
use scheduler::*;

#[test]
fn a_closure_score_drives_placement() {
    let mut inputs = three_regions();
    inputs.prices = PriceTable::from_csv(
        "us-east,0.10\neu-west,0.30\nap-southeast,0.05\n",
        &inputs.regions,
    )
    .unwrap();
    inputs.placement.set("kv", AP);
    inputs.workloads.insert(app("kv"), requests(100, 100, 0));

    // Latency plus 100 ms per $/h.
    let sun = FollowTheSun::new();
    let blend = UserScore::new("latency+cost", "ms", move |a, r, i| {
        sun.score(a, r, i) + 100.0 * Cost.score(a, r, i)
    });
    // us: 41 + 10 = 51; eu: 41 + 30 = 71; ap: 200 + 5 = 205.
    assert!((blend.score(&app("kv"), US, &inputs) - 51.0).abs() < 1e-9);
    assert!((blend.score(&app("kv"), EU, &inputs) - 71.0).abs() < 1e-9);

    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched
        .add_app("kv", AppSpec::new(Arc::new(blend), 5.0))
        .unwrap();
    let d = &sched.decide(secs(1), &inputs)[0];
    assert_eq!(d.migration(), Some((AP, US)), "{d}");
    assert_eq!(d.policy, "latency+cost");
    assert!(
        d.to_string()
            .contains("latency+cost 205.00 ms, best us-east 51.00 ms"),
        "{d}"
    );
}

#[test]
fn infinite_score_rules_a_region_out() {
    let mut inputs = three_regions();
    inputs.placement.set("kv", US);
    inputs.workloads.insert(app("kv"), requests(0, 100, 0));
    // Follow the sun, but never ap-southeast and never eu-west (data residency).
    let sun = FollowTheSun::new();
    let policy = UserScore::new("sun-us-ap", "ms", move |a, r, i| {
        if r == EU {
            f64::INFINITY
        } else {
            sun.score(a, r, i)
        }
    });
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched
        .add_app("kv", AppSpec::new(Arc::new(policy), 0.0))
        .unwrap();
    let d = &sched.decide(secs(1), &inputs)[0];
    assert_eq!(d.reason, Reason::AlreadyBest, "{d}");
    assert_eq!(d.best.as_ref().unwrap().id, AP);
}

/// A policy implemented on a user type, with a metric.
struct DataGravity {
    data_in: RegionId,
}

impl Policy for DataGravity {
    fn name(&self) -> &str {
        "data-gravity"
    }
    fn unit(&self) -> &str {
        "hops"
    }
    fn score(&self, _app: &AppId, candidate: RegionId, _inputs: &Inputs) -> f64 {
        if candidate == self.data_in {
            0.0
        } else {
            1.0
        }
    }
    fn metrics(&self, _app: &AppId, region: RegionId, _inputs: &Inputs) -> Metrics {
        [("near_data".to_string(), f64::from(region == self.data_in))].into()
    }
}

#[test]
fn a_policy_trait_object_drives_placement() {
    let mut inputs = three_regions();
    inputs.placement.set("etl", US);
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched
        .add_app(
            "etl",
            AppSpec::new(Arc::new(DataGravity { data_in: AP }), 0.5),
        )
        .unwrap();
    let d = &sched.decide(secs(1), &inputs)[0];
    assert_eq!(d.migration(), Some((US, AP)), "{d}");
    assert_eq!(d.metrics_best["near_data"], 1.0);
    assert_eq!(d.metrics_current["near_data"], 0.0);
}
