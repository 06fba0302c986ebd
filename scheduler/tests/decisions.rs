//! The decision rule on hand-made inputs: best placement, threshold,
//! in-flight migrations, the concurrency cap, cooldowns, constraints, and the
//! decision log.

mod common;

use std::sync::Arc;

use common::*;
use scheduler::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn best_placement_is_chosen_hand_computed() {
    // 100 requests from us-east, 300 from eu-west, 100 from ap-southeast:
    //   us-east:      (100·2   + 300·80 + 100·220) / 500 =  92.4 ms
    //   eu-west:      (100·80  + 300·2  + 100·180) / 500 =  53.2 ms
    //   ap-southeast: (100·220 + 300·180 + 100·2)  / 500 = 152.4 ms
    let mut inputs = three_regions();
    inputs.placement.set("kv", AP);
    inputs.workloads.insert(app("kv"), requests(100, 300, 100));
    let policy = FollowTheSun::new();
    for (r, want) in [(US, 92.4), (EU, 53.2), (AP, 152.4)] {
        let got = policy.score(&app("kv"), r, &inputs);
        assert!(close(got, want), "{r}: {got} != {want}");
    }

    let mut sched = sun_scheduler(5.0);
    let ds = sched.decide(secs(1), &inputs);
    assert_eq!(ds.len(), 1);
    let d = &ds[0];
    assert_eq!(d.migration(), Some((AP, EU)), "{d}");
    assert_eq!(d.reason, Reason::Improvement);
    assert!(close(d.score_current.unwrap(), 152.4));
    assert!(close(d.score_best.unwrap(), 53.2));
    assert!(close(d.gain.unwrap(), 99.2));
    assert_eq!(d.best.as_ref().unwrap().name, "eu-west");
    // Share of requests under 15 ms: only the local clients.
    assert!(close(d.metrics_current["share_under_15ms"], 0.2));
    assert!(close(d.metrics_best["share_under_15ms"], 0.6));
}

#[test]
fn threshold_is_respected() {
    let mut inputs = three_regions();
    inputs.placement.set("kv", US);
    let mut sched = sun_scheduler(5.0);

    // us 100, eu 110: us 42.86 ms, eu 39.14 ms, gain 3.71 ms <= 5 ms: stay.
    inputs.workloads.insert(app("kv"), requests(100, 110, 0));
    let d = &sched.decide(secs(1), &inputs)[0];
    assert_eq!(d.action, Action::Stay, "{d}");
    assert_eq!(d.reason, Reason::BelowThreshold);
    assert!(close(
        d.gain.unwrap(),
        (8800.0 + 200.0 - 8000.0 - 220.0) / 210.0
    ));
    assert_eq!(d.best.as_ref().unwrap().id, EU);

    // us 100, eu 150: us 48.8 ms, eu 33.2 ms, gain 15.6 ms > 5 ms: move.
    inputs.workloads.insert(app("kv"), requests(100, 150, 0));
    let d = &sched.decide(secs(2), &inputs)[0];
    assert_eq!(d.migration(), Some((US, EU)), "{d}");
    assert!(close(d.gain.unwrap(), 15.6));

    // With a 20 ms threshold the same gain does not move.
    sched.add_app("kv", sun_spec(20.0)).unwrap();
    let d = &sched.decide(secs(3), &inputs)[0];
    assert_eq!(d.reason, Reason::BelowThreshold, "{d}");
}

#[test]
fn gain_equal_to_threshold_does_not_move_and_ties_never_swap() {
    let mut inputs = three_regions();
    inputs.placement.set("a", US);
    inputs.placement.set("b", US);
    // Exact scores: us 10, eu 5, ap 10.
    let exact = Arc::new(UserScore::new("exact", "pts", |_, r, _| {
        if r == EU {
            5.0
        } else {
            10.0
        }
    }));
    // Everywhere equal.
    let flat = Arc::new(UserScore::new("flat", "pts", |_, _, _| 1.0));
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched.add_app("a", AppSpec::new(exact, 5.0)).unwrap();
    sched.add_app("b", AppSpec::new(flat, 0.0)).unwrap();
    let ds = sched.decide(secs(1), &inputs);
    assert_eq!(decision_for(&ds, "a").reason, Reason::BelowThreshold);
    assert_eq!(decision_for(&ds, "a").gain, Some(5.0));
    assert_eq!(decision_for(&ds, "b").reason, Reason::AlreadyBest);
}

#[test]
fn no_move_while_a_migration_is_in_flight() {
    let mut inputs = three_regions();
    inputs.placement.set("kv", US);
    inputs.workloads.insert(app("kv"), requests(0, 1000, 0));
    let mut sched = sun_scheduler(5.0);

    let d = &sched.decide(secs(1), &inputs)[0];
    assert_eq!(d.migration(), Some((US, EU)));
    sched.migration_started(&app("kv"), secs(1)).unwrap();
    assert!(sched.is_in_flight(&app("kv")));
    assert_eq!(sched.in_flight(), 1);

    // Still in us-east (the move is under way) and still worth moving, but
    // nothing starts, not even with the region under a termination notice.
    inputs.notices.push(TerminationNotice {
        region: US,
        deadline: secs(100),
    });
    for t in 2..5 {
        let d = &sched.decide(secs(t), &inputs)[0];
        assert_eq!(d.action, Action::Stay, "{d}");
        assert_eq!(d.reason, Reason::InFlight);
        assert!(d.forced.is_some(), "the pending evacuation is recorded");
    }
    assert_eq!(
        sched.migration_started(&app("kv"), secs(5)),
        Err(SchedulerError::AlreadyInFlight(app("kv")))
    );

    // It failed: the app is still in us-east and is proposed again.
    sched
        .migration_finished(&app("kv"), secs(5), false)
        .unwrap();
    let d = &sched.decide(secs(6), &inputs)[0];
    assert_eq!(d.migration(), Some((US, EU)), "{d}");

    assert_eq!(
        sched.migration_finished(&app("kv"), secs(6), true),
        Err(SchedulerError::NotInFlight(app("kv")))
    );
    assert_eq!(
        sched.migration_started(&app("nope"), secs(6)),
        Err(SchedulerError::UnknownApp(app("nope")))
    );
}

#[test]
fn concurrency_cap_takes_the_largest_gains_first() {
    let mut inputs = three_regions();
    // a: ap -> eu, gain 178 ms. b: us -> eu, gain 78 ms. c: us -> eu, gain 15.6 ms.
    for (name, at, w) in [
        ("a", AP, requests(0, 100, 0)),
        ("b", US, requests(0, 100, 0)),
        ("c", US, requests(100, 150, 0)),
    ] {
        inputs.placement.set(name, at);
        inputs.workloads.insert(app(name), w);
    }
    let mut sched = Scheduler::new(SchedulerConfig {
        max_concurrent: 2,
        ..SchedulerConfig::default()
    });
    for name in ["a", "b", "c"] {
        sched.add_app(name, sun_spec(5.0)).unwrap();
    }
    let ds = sched.decide(secs(1), &inputs);
    assert!(decision_for(&ds, "a").is_move());
    assert!(decision_for(&ds, "b").is_move());
    let c = decision_for(&ds, "c");
    assert_eq!(c.reason, Reason::CapReached { cap: 2 }, "{c}");
    assert_eq!(
        c.best.as_ref().unwrap().id,
        EU,
        "the wanted move is still logged"
    );

    // a is in flight, b's move is done: room for one more, and a forced
    // move beats any gain.
    sched.migration_started(&app("a"), secs(1)).unwrap();
    sched.migration_started(&app("b"), secs(1)).unwrap();
    sched.migration_finished(&app("b"), secs(1), true).unwrap();
    inputs.placement.set("b", EU);
    inputs.placement.set("d", AP);
    inputs.workloads.insert(app("d"), requests(0, 100, 0)); // d: gain 178 ms
    sched.add_app("d", sun_spec(5.0)).unwrap();
    inputs.notices.push(TerminationNotice {
        region: US,
        deadline: secs(60),
    });
    inputs.workloads.insert(app("c"), requests(100, 0, 0)); // c is happy in us-east...
    let ds = sched.decide(secs(2), &inputs);
    assert_eq!(decision_for(&ds, "a").reason, Reason::InFlight);
    assert_eq!(decision_for(&ds, "b").reason, Reason::AlreadyBest);
    let c = decision_for(&ds, "c");
    assert_eq!(c.reason, Reason::Evacuation { late: false }, "{c}"); // ...but must leave.
    assert!(c.gain.unwrap() < 0.0);
    assert_eq!(decision_for(&ds, "d").reason, Reason::CapReached { cap: 2 });
    assert_eq!(ds.iter().filter(|d| d.is_move()).count(), 1);

    // Two in flight: nothing starts.
    sched.migration_started(&app("c"), secs(2)).unwrap();
    let ds = sched.decide(secs(3), &inputs);
    assert_eq!(ds.iter().filter(|d| d.is_move()).count(), 0);
}

#[test]
fn cooldown_holds_an_app_that_just_moved() {
    let mut inputs = three_regions();
    inputs.placement.set("kv", US);
    inputs.workloads.insert(app("kv"), requests(0, 100, 0));
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched
        .add_app("kv", sun_spec(5.0).with_cooldown(secs(30)))
        .unwrap();

    let ds = sched.decide(secs(10), &inputs);
    apply_moves(&mut sched, &mut inputs, &ds, secs(10));
    assert_eq!(inputs.placement.get(&app("kv")), Some(EU));

    // The traffic swings back at once: held by the cooldown.
    inputs.workloads.insert(app("kv"), requests(100, 0, 0));
    let d = &sched.decide(secs(20), &inputs)[0];
    assert_eq!(
        d.reason,
        Reason::Cooldown {
            remaining: secs(20)
        },
        "{d}"
    );
    assert!(d.gain.unwrap() > 5.0, "it would have moved otherwise");
    let d = &sched.decide(secs(40), &inputs)[0];
    assert_eq!(d.migration(), Some((EU, US)), "{d}");
}

#[test]
fn unmeasured_regions_are_neither_scored_nor_chosen() {
    let mut regions = Regions::new(["us-east", "eu-west", "ap-southeast"]);
    let new = regions.add("sa-east");
    let mut inputs = three_regions();
    inputs.regions = regions;
    inputs.rtt = {
        let mut m = RttMatrix::new(4);
        m.set_symmetric(US, EU, 80.0);
        m.set_symmetric(US, AP, 220.0);
        m.set_symmetric(EU, AP, 180.0);
        // sa-east only knows eu-west, so it cannot serve us-east clients.
        m.set_symmetric(new, EU, 1.0);
        m
    };
    let mut sched = sun_scheduler(5.0);
    sched.add_app("fresh", sun_spec(5.0)).unwrap();
    inputs.placement.set("kv", US);
    inputs.placement.set("fresh", new);
    for a in ["kv", "fresh"] {
        inputs.workloads.insert(app(a), requests(100, 100, 0));
    }
    let ds = sched.decide(secs(1), &inputs);
    let kv = decision_for(&ds, "kv");
    assert_eq!(kv.reason, Reason::AlreadyBest, "{kv}");
    assert_ne!(kv.best.as_ref().unwrap().id, new);
    let fresh = decision_for(&ds, "fresh");
    assert_eq!(fresh.reason, Reason::Unscored, "{fresh}");
    assert_eq!(fresh.score_current, None);
}

#[test]
fn allowed_regions_restrict_and_force() {
    let mut inputs = three_regions();
    inputs.workloads.insert(app("a"), requests(0, 100, 0));
    inputs.workloads.insert(app("b"), requests(0, 100, 0));
    inputs.placement.set("a", AP);
    inputs.placement.set("b", EU);
    let mut sched = Scheduler::new(SchedulerConfig::default());
    // a may not go to eu-west, where its clients are: us-east is next best.
    sched
        .add_app("a", sun_spec(5.0).with_allowed([US, AP]))
        .unwrap();
    // b sits in eu-west, perfect for latency, but is not allowed there: it
    // must leave whatever its (huge) threshold.
    sched
        .add_app("b", sun_spec(1e9).with_allowed([US, AP]))
        .unwrap();
    let ds = sched.decide(secs(1), &inputs);
    assert_eq!(decision_for(&ds, "a").migration(), Some((AP, US)));
    let b = decision_for(&ds, "b");
    assert_eq!(b.migration(), Some((EU, US)), "{b}");
    assert_eq!(b.reason, Reason::NotAllowed);
    assert_eq!(b.forced, Some(Forced::NotAllowed));
}

#[test]
fn unplaced_and_unregistered_apps() {
    let mut inputs = three_regions();
    inputs.placement.set("stranger", US);
    inputs.placement.set("lost", RegionId(42));
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched.add_app("ghost", sun_spec(5.0)).unwrap();
    sched.add_app("lost", sun_spec(5.0)).unwrap();
    let ds = sched.decide(secs(1), &inputs);
    assert_eq!(ds.len(), 2, "only scheduled apps are decided about");
    assert!(ds.iter().all(|d| d.reason == Reason::NotPlaced));
    let err = sched.add_app("bad", sun_spec(f64::NAN)).unwrap_err();
    assert!(matches!(err, SchedulerError::InvalidThreshold(t) if t.is_nan()));
    assert!(matches!(
        sched.add_app("bad", sun_spec(-1.0)),
        Err(SchedulerError::InvalidThreshold(_))
    ));
}

#[test]
fn decision_log_records_every_decision_with_its_reason() {
    let mut inputs = three_regions();
    inputs.placement.set("kv", US);
    let mut sched = sun_scheduler(5.0);

    inputs.workloads.insert(app("kv"), requests(100, 110, 0));
    sched.decide(secs(1), &inputs); // stay, below threshold
    inputs.workloads.insert(app("kv"), requests(100, 150, 0));
    let ds = sched.decide(secs(2), &inputs); // move
    sched.migration_started(&app("kv"), secs(2)).unwrap();
    sched.decide(secs(3), &inputs); // stay, in flight
    sched.migration_finished(&app("kv"), secs(3), true).unwrap();
    inputs.placement.set("kv", EU);
    sched.decide(secs(4), &inputs); // stay, already best

    let log = sched.log();
    let reasons: Vec<Reason> = log.iter().map(|d| d.reason).collect();
    assert_eq!(
        reasons,
        [
            Reason::BelowThreshold,
            Reason::Improvement,
            Reason::InFlight,
            Reason::AlreadyBest
        ]
    );
    assert_eq!(log.moves().count(), 1);
    assert_eq!(log.last_for(&app("kv")).unwrap().at, secs(4));
    assert_eq!(log.iter().nth(1).unwrap(), &ds[0]);

    let text = log.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(lines[0].starts_with("[1.000s] kv: stay in us-east (below threshold): follow-the-sun 42.86 ms, best eu-west 39.14 ms, gain 3.71 <= T 5.00 ms"), "{}", lines[0]);
    assert!(lines[1].starts_with("[2.000s] kv: move us-east -> eu-west (improvement): follow-the-sun 48.80 ms, best eu-west 33.20 ms, gain 15.60 > T 5.00 ms; share_under_15ms 0.40 (best 0.60)"), "{}", lines[1]);
    assert!(lines[2].contains("(migration in flight)"), "{}", lines[2]);
    assert!(
        lines[3].contains("stay in eu-west (already best)"),
        "{}",
        lines[3]
    );

    let json: serde_json::Value = serde_json::from_str(&log.to_json()).unwrap();
    let entries = json["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 4);
    let mv = &entries[1];
    assert_eq!(mv["action"], "move");
    assert_eq!(mv["reason"]["kind"], "improvement");
    assert_eq!(mv["policy"], "follow-the-sun");
    assert_eq!(mv["unit"], "ms");
    assert_eq!(mv["threshold"], 5.0);
    assert_eq!(mv["current"]["name"], "us-east");
    assert_eq!(mv["best"]["name"], "eu-west");
    assert!((mv["score_current"].as_f64().unwrap() - 48.8).abs() < 1e-9);
    assert!((mv["score_best"].as_f64().unwrap() - 33.2).abs() < 1e-9);
    assert_eq!(entries[0]["reason"]["kind"], "below_threshold");
}
