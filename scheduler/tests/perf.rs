//! Placement search stays fast: one round over 50 regions × 100 apps × 50
//! client regions each (250 000 RTT lookups) in well under 50 ms, asserted
//! loosely (500 ms, debug build, loaded 2-core machine) so the test is not
//! flaky; the measured time is printed (`--nocapture`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler::*;

const REGIONS: u32 = 50;
const APPS: usize = 100;

/// A small deterministic generator (xorshift), so the test needs no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn world() -> (Inputs, Scheduler) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let regions = Regions::new((0..REGIONS).map(|i| format!("region-{i:02}")));
    let mut inputs = Inputs::new(regions);
    // Regions on a ring of longitudes: RTT grows with distance, plus noise,
    // not symmetric.
    for a in 0..REGIONS {
        for b in 0..REGIONS {
            let d = a.abs_diff(b).min(REGIONS - a.abs_diff(b)) as f64;
            let ms = if a == b {
                1.0
            } else {
                8.0 * d + rng.below(10) as f64
            };
            inputs.rtt.set(RegionId(a), RegionId(b), ms);
        }
        inputs
            .prices
            .set(RegionId(a), 0.05 + rng.below(100) as f64 / 1000.0);
    }
    let mut sched = Scheduler::new(SchedulerConfig {
        max_concurrent: 10,
        ..SchedulerConfig::default()
    });
    let sun: Arc<dyn Policy> = Arc::new(FollowTheSun::new());
    let cost: Arc<dyn Policy> = Arc::new(Cost::new());
    for i in 0..APPS {
        let name = format!("app-{i:03}");
        let mut w = Workload::new();
        for r in 0..REGIONS {
            w.add(RegionId(r), 1 + rng.below(1000), rng.below(1 << 20));
        }
        inputs.workloads.insert(AppId::from(name.as_str()), w);
        inputs
            .placement
            .set(name.as_str(), RegionId(rng.below(REGIONS as u64) as u32));
        let policy = if i % 10 == 0 {
            cost.clone()
        } else {
            sun.clone()
        };
        sched
            .add_app(name.as_str(), AppSpec::new(policy, 5.0))
            .unwrap();
    }
    inputs.notices.push(TerminationNotice {
        region: RegionId(7),
        deadline: Duration::from_secs(100),
    });
    (inputs, sched)
}

#[test]
fn decide_50_regions_100_apps_50_client_regions_is_fast() {
    let (inputs, mut sched) = world();
    let mut times = Vec::new();
    let mut moves = 0;
    for round in 0..5 {
        let start = Instant::now();
        let ds = sched.decide(Duration::from_secs(round), &inputs);
        times.push(start.elapsed());
        assert_eq!(ds.len(), APPS);
        moves = ds.iter().filter(|d| d.is_move()).count();
    }
    let first = times[0];
    let best = *times.iter().min().unwrap();
    println!(
        "decide(): {} regions × {APPS} apps × {} client regions: first {first:?}, best of 5 {best:?} ({} build), {moves} moves",
        REGIONS,
        REGIONS,
        if cfg!(debug_assertions) { "debug" } else { "release" },
    );
    assert!(moves > 0 && moves <= 10, "the cap holds: {moves}");
    assert!(
        first < Duration::from_millis(500),
        "one round took {first:?}"
    );
    assert!(
        best < Duration::from_millis(500),
        "best round took {best:?}"
    );
}
