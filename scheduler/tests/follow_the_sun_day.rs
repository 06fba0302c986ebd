//! A simulated day: the synthetic sun moves over three regions and the
//! follow-the-sun policy moves the app after it.

mod common;

use std::time::Duration;

use common::*;
use scheduler::*;

const DAY: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(2500); // one "hour"
const THRESHOLD_MS: f64 = 5.0;

#[test]
fn the_app_follows_the_sun_through_a_day() {
    let day = SyntheticDay::three_regions(DAY, US, EU, AP, 100.0);
    let policy = FollowTheSun::new();
    let mut inputs = three_regions();
    inputs.placement.set("kv", US);
    let mut sched = sun_scheduler(THRESHOLD_MS);

    let mut visited = vec![US];
    let (mut served, mut under) = (0u64, 0.0);
    let mut static_under = [0.0; 3];
    let mut now = Duration::ZERO;
    while now + TICK < DAY {
        now += TICK;
        // `w` is the traffic of the tick that just ended; the placement that served it is
        // the one decided before it (no hindsight: the decision below only helps next tick).
        let w = day.workload(now, TICK);
        let held = inputs.placement.get(&app("kv")).unwrap();
        inputs.workloads.insert(app("kv"), w.clone());
        let ds = sched.decide(now, &inputs);
        apply_moves(&mut sched, &mut inputs, &ds, now);
        let here = inputs.placement.get(&app("kv")).unwrap();
        if visited.last() != Some(&here) {
            visited.push(here);
        }

        // After each round the app is within the threshold of the optimum.
        let score = |r| policy.score(&app("kv"), r, &inputs);
        let optimum = [US, EU, AP]
            .map(score)
            .into_iter()
            .fold(f64::INFINITY, f64::min);
        assert!(
            score(here) - optimum <= THRESHOLD_MS,
            "at {now:?} in {here} with {} ms, optimum {optimum} ms",
            score(here)
        );

        // Requests served under 15 ms: here, and with each static placement.
        let total = w.total_requests();
        served += total;
        let share = |r| policy.share_under(&w, r, &inputs, 15.0).unwrap_or(0.0);
        under += share(held) * total as f64;
        for r in [US, EU, AP] {
            static_under[r.index()] += share(r) * total as f64;
        }
    }
    let names: Vec<&str> = visited.iter().map(|r| inputs.regions.name(*r)).collect();
    println!("visited: {}", names.join(" -> "));
    println!("{}", sched.log());

    let distinct: std::collections::BTreeSet<_> = visited.iter().collect();
    assert!(distinct.len() >= 2, "visited {names:?}");
    assert!(sched.log().moves().count() >= 2);
    // The day ends (23:00 UTC) in the US afternoon: the app is there.
    let end = inputs.placement.get(&app("kv")).unwrap();
    assert_eq!(day.busiest(now), Some(US));
    assert_eq!(end, US, "visited {names:?}");

    // Moving beats every static placement on the share under 15 ms.
    let dynamic = under / served as f64;
    let best_static = static_under.iter().fold(0.0f64, |a, &b| a.max(b)) / served as f64;
    println!("under 15 ms: follow-the-sun {dynamic:.3}, best static {best_static:.3}");
    assert!(dynamic > best_static + 0.1, "{dynamic} vs {best_static}");
}

#[test]
fn the_app_goes_where_the_traffic_peaks_at_each_peak() {
    let day = SyntheticDay::three_regions(DAY, US, EU, AP, 100.0);
    let mut inputs = three_regions();
    let mut sched = sun_scheduler(THRESHOLD_MS);
    // At each region's local 14:00, wherever the app starts, it goes there.
    for (utc_hour, peak) in [(6.0, AP), (14.0, EU), (19.0, US)] {
        let now = day.at_utc_hour(utc_hour);
        inputs.workloads.insert(app("kv"), day.workload(now, TICK));
        for start in [US, EU, AP] {
            inputs.placement.set("kv", start);
            let d = &sched.decide(now, &inputs)[0];
            let end = d.migration().map_or(start, |(_, to)| to);
            assert_eq!(end, peak, "{d}");
        }
    }
}
