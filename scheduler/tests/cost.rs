//! The cost policy: chase the cheapest region, and evacuate a region under a
//! termination notice before its deadline whatever the threshold says.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use scheduler::*;

const PRICES: &str = "\
# $/h, spot
region,price
us-east,0.10
eu-west,0.08
ap-southeast,0.12
";

fn cost_spec(threshold: f64) -> AppSpec {
    AppSpec::new(Arc::new(Cost::new()), threshold)
}

#[test]
fn goes_to_the_cheapest_region() {
    let mut inputs = three_regions();
    inputs.prices = PriceTable::from_csv(PRICES, &inputs.regions).unwrap();
    inputs.placement.set("batch", AP);
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched.add_app("batch", cost_spec(0.01)).unwrap();

    let d = &sched.decide(secs(1), &inputs)[0];
    assert_eq!(d.migration(), Some((AP, EU)), "{d}");
    assert_eq!(d.policy, "cost");
    assert_eq!(d.unit, "$/h");
    assert!((d.gain.unwrap() - 0.04).abs() < 1e-12);
    apply_moves(&mut sched, &mut inputs, std::slice::from_ref(d), secs(1));

    // A feed update makes us-east a little cheaper: below the threshold.
    inputs
        .prices
        .update_from_csv("us-east,0.075\n", &inputs.regions)
        .unwrap();
    let d = &sched.decide(secs(2), &inputs)[0];
    assert_eq!(d.reason, Reason::BelowThreshold, "{d}");
    // Much cheaper: it moves.
    inputs
        .prices
        .update_from_csv("us-east,0.05\n", &inputs.regions)
        .unwrap();
    let d = &sched.decide(secs(3), &inputs)[0];
    assert_eq!(d.migration(), Some((EU, US)), "{d}");

    // Regions without a price are never chosen.
    let mut unpriced = three_regions();
    unpriced.prices.set(US, 1.0);
    unpriced.placement.set("batch", US);
    let d = &sched.decide(secs(4), &unpriced)[0];
    assert_eq!(d.reason, Reason::NoCandidate, "{d}");
}

#[test]
fn termination_notice_evacuates_before_the_deadline_whatever_the_threshold() {
    let mut inputs = three_regions();
    inputs.prices = PriceTable::from_csv(PRICES, &inputs.regions).unwrap();
    inputs.placement.set("batch", EU);
    inputs.placement.set("web", EU);
    inputs.placement.set("other", US);
    inputs.workloads.insert(app("web"), requests(10, 100, 0));
    let mut sched = Scheduler::new(SchedulerConfig::default());
    // A threshold no price difference can beat, and a long cooldown.
    sched
        .add_app("batch", cost_spec(1000.0).with_cooldown(secs(3600)))
        .unwrap();
    // Evacuation is not the cost policy's privilege: any app must leave.
    sched.add_app("web", sun_spec(1000.0)).unwrap();
    sched.add_app("other", cost_spec(1000.0)).unwrap();
    // batch just moved into eu-west (cooldown running).
    sched.migration_started(&app("batch"), secs(0)).unwrap();
    sched
        .migration_finished(&app("batch"), secs(1), true)
        .unwrap();

    let d = &sched.decide(secs(5), &inputs)[0];
    assert_eq!(
        d.reason,
        Reason::Cooldown {
            remaining: secs(3596)
        }
    );

    // eu-west (the cheapest) gets a two-minute notice.
    let deadline = secs(10 + 120);
    inputs.notices.push(TerminationNotice {
        region: EU,
        deadline,
    });
    let now = secs(10);
    let ds = sched.decide(now, &inputs);
    let batch = decision_for(&ds, "batch");
    // To the best other region: us-east (0.10), not ap-southeast (0.12),
    // although it costs more than staying.
    assert_eq!(batch.migration(), Some((EU, US)), "{batch}");
    assert_eq!(batch.reason, Reason::Evacuation { late: false });
    assert_eq!(
        batch.forced,
        Some(Forced::Evacuation {
            region: EU,
            deadline
        })
    );
    assert!(batch.gain.unwrap() < 0.0, "a loss, and still a move");
    assert!(batch.at < deadline);
    assert!(
        batch
            .to_string()
            .contains("evacuation: region terminates at 130.000s"),
        "{batch}"
    );
    let web = decision_for(&ds, "web");
    assert_eq!(web.migration(), Some((EU, US)), "{web}");
    assert_eq!(decision_for(&ds, "other").reason, Reason::AlreadyBest);

    // Carried out within the deadline; nobody moves back into eu-west while
    // the notice stands, although it is still the cheapest.
    apply_moves(&mut sched, &mut inputs, &ds, secs(11));
    assert!(secs(11) < deadline);
    let ds = sched.decide(secs(20), &inputs);
    assert!(ds.iter().all(|d| !d.is_move()), "{ds:?}");
    let batch = decision_for(&ds, "batch");
    assert_ne!(batch.best.as_ref().unwrap().id, EU);
}

#[test]
fn evacuation_with_nowhere_to_go_and_late_evacuation() {
    let mut inputs = three_regions();
    inputs.prices = PriceTable::from_csv(PRICES, &inputs.regions).unwrap();
    inputs.placement.set("batch", EU);
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched
        .add_app("batch", cost_spec(0.0).with_allowed([EU, US]))
        .unwrap();
    // Both allowed regions are going away.
    inputs.notices.push(TerminationNotice {
        region: EU,
        deadline: secs(30),
    });
    inputs.notices.push(TerminationNotice {
        region: US,
        deadline: secs(60),
    });
    let d = &sched.decide(secs(1), &inputs)[0];
    assert_eq!(d.reason, Reason::NoCandidate, "{d}");
    assert!(d.to_string().contains("must evacuate by 30.000s"), "{d}");

    // us-east's notice is withdrawn after eu-west's deadline passed: leave, late.
    inputs.notices.retain(|n| n.region == EU);
    let d = &sched.decide(secs(31), &inputs)[0];
    assert_eq!(d.migration(), Some((EU, US)), "{d}");
    assert_eq!(d.reason, Reason::Evacuation { late: true });
}

#[test]
fn policy_constraints_can_ask_for_an_evacuation() {
    let mut inputs = three_regions();
    inputs.prices = PriceTable::from_csv(PRICES, &inputs.regions).unwrap();
    inputs.placement.set("batch", EU);
    // A cost policy that also refuses to stay in eu-west past t = 50 s.
    let policy = UserScore::new("cost-until-50s", "$/h", |a, r, i| Cost.score(a, r, i))
        .with_constraints(|_, _| Constraints {
            allowed: None,
            evacuate: vec![TerminationNotice {
                region: EU,
                deadline: Duration::from_secs(50),
            }],
        });
    let mut sched = Scheduler::new(SchedulerConfig::default());
    sched
        .add_app("batch", AppSpec::new(Arc::new(policy), 1.0))
        .unwrap();
    let d = &sched.decide(secs(1), &inputs)[0];
    assert_eq!(d.migration(), Some((EU, US)), "{d}");
    assert_eq!(d.reason, Reason::Evacuation { late: false });
}
