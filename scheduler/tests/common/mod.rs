//! Shared fixtures: the three demo regions with realistic RTTs.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use scheduler::*;

pub const US: RegionId = RegionId(0);
pub const EU: RegionId = RegionId(1);
pub const AP: RegionId = RegionId(2);

/// In-region round trip, ms.
pub const LOCAL_MS: f64 = 2.0;

/// us-east, eu-west, ap-southeast. Round trips: 40 ms one way between
/// us-east and eu-west (80 ms RTT), 110 ms one way us-east <-> ap-southeast
/// (220), 90 ms one way eu-west <-> ap-southeast (180), 2 ms in a region.
pub fn three_regions() -> Inputs {
    let mut inputs = Inputs::new(Regions::new(["us-east", "eu-west", "ap-southeast"]));
    inputs.rtt.set_symmetric(US, EU, 80.0);
    inputs.rtt.set_symmetric(US, AP, 220.0);
    inputs.rtt.set_symmetric(EU, AP, 180.0);
    for r in [US, EU, AP] {
        inputs.rtt.set(r, r, LOCAL_MS);
    }
    inputs
}

/// A workload from request counts per (us, eu, ap).
pub fn requests(us: u64, eu: u64, ap: u64) -> Workload {
    Workload::new()
        .with(US, us, us * 100)
        .with(EU, eu, eu * 100)
        .with(AP, ap, ap * 100)
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn app(name: &str) -> AppId {
    AppId::from(name)
}

pub fn sun_spec(threshold_ms: f64) -> AppSpec {
    AppSpec::new(Arc::new(FollowTheSun::new()), threshold_ms)
}

/// A scheduler of kv alone, by follow-the-sun with `threshold_ms`.
pub fn sun_scheduler(threshold_ms: f64) -> Scheduler {
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched.add_app("kv", sun_spec(threshold_ms)).unwrap();
    sched
}

/// The one decision about `name` in a round.
pub fn decision_for<'a>(decisions: &'a [Decision], name: &str) -> &'a Decision {
    decisions
        .iter()
        .find(|d| d.app.0 == name)
        .unwrap_or_else(|| panic!("no decision for {name}"))
}

/// Carries out a round's moves at once: started, placed, finished.
pub fn apply_moves(
    sched: &mut Scheduler,
    inputs: &mut Inputs,
    decisions: &[Decision],
    now: Duration,
) {
    for d in decisions {
        if let Some((_, to)) = d.migration() {
            sched.migration_started(&d.app, now).unwrap();
            inputs.placement.set(d.app.clone(), to);
            sched.migration_finished(&d.app, now, true).unwrap();
        }
    }
}
