//! The scheduler: per-app specs, migration bookkeeping, and the decision
//! round ([`Scheduler::decide`]). The rule it applies is described in the
//! crate documentation.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::decision::{Action, Decision, DecisionLog, Forced, Reason};
use crate::model::{AppId, Inputs, RegionId};
use crate::policy::{Constraints, Metrics, Policy};

/// Scheduler-wide settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// The most migrations in flight at once, counting those started earlier
    /// and not finished yet (default 4; 0 means no migration ever starts).
    pub max_concurrent: usize,
    /// How many decisions the log keeps (default 10 000).
    pub log_capacity: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_concurrent: 4,
            log_capacity: 10_000,
        }
    }
}

/// How one app is scheduled.
#[derive(Clone)]
pub struct AppSpec {
    /// Its policy (shared freely between apps).
    pub policy: Arc<dyn Policy>,
    /// The gain (in the policy's unit) a move must exceed. Finite, `>= 0`.
    pub threshold: f64,
    /// After a migration of this app ends (well or not), no other
    /// non-forced move starts for this long. Zero by default.
    pub cooldown: Duration,
    /// If set, the only regions the app may run in (intersected with the
    /// policy's own constraints).
    pub allowed: Option<Vec<RegionId>>,
}

impl AppSpec {
    /// `policy` with threshold `threshold`, no cooldown, any region.
    pub fn new(policy: Arc<dyn Policy>, threshold: f64) -> Self {
        AppSpec {
            policy,
            threshold,
            cooldown: Duration::ZERO,
            allowed: None,
        }
    }

    /// Sets the cooldown.
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// Restricts the app to these regions.
    pub fn with_allowed(mut self, regions: impl IntoIterator<Item = RegionId>) -> Self {
        self.allowed = Some(regions.into_iter().collect());
        self
    }
}

impl fmt::Debug for AppSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppSpec")
            .field("policy", &self.policy.name())
            .field("threshold", &self.threshold)
            .field("cooldown", &self.cooldown)
            .field("allowed", &self.allowed)
            .finish()
    }
}

/// A misuse of the scheduler's API.
#[derive(Clone, Debug, PartialEq)]
pub enum SchedulerError {
    /// The app was never added.
    UnknownApp(AppId),
    /// A threshold must be finite and non-negative.
    InvalidThreshold(f64),
    /// A migration of the app is already in flight.
    AlreadyInFlight(AppId),
    /// No migration of the app is in flight.
    NotInFlight(AppId),
}

impl fmt::Display for SchedulerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchedulerError::UnknownApp(a) => write!(f, "app {a} is not scheduled"),
            SchedulerError::InvalidThreshold(t) => {
                write!(f, "threshold {t} must be finite and non-negative")
            }
            SchedulerError::AlreadyInFlight(a) => {
                write!(f, "a migration of {a} is already in flight")
            }
            SchedulerError::NotInFlight(a) => write!(f, "no migration of {a} is in flight"),
        }
    }
}

impl std::error::Error for SchedulerError {}

#[derive(Debug)]
struct AppState {
    spec: AppSpec,
    in_flight_since: Option<Duration>,
    /// When the last migration ended, and whether it succeeded.
    last_migration: Option<(Duration, bool)>,
}

/// The placement scheduler. See the crate documentation.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    apps: BTreeMap<AppId, AppState>,
    log: DecisionLog,
    /// Scores of every region for the app being evaluated (reused).
    scores: Vec<f64>,
}

/// What one app's evaluation wants, before the concurrency cap.
struct Wanted {
    /// Index of the decision in the round's output.
    index: usize,
    /// The deadline, for evacuations.
    deadline: Option<Duration>,
    forced: bool,
    gain: f64,
}

impl Wanted {
    /// Forced first (earliest deadline first, then not-allowed), then the
    /// largest gains; ties in app order.
    fn priority(&self, other: &Wanted) -> Ordering {
        other
            .forced
            .cmp(&self.forced)
            .then_with(|| match (self.deadline, other.deadline) {
                (Some(a), Some(b)) => a.cmp(&b),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            })
            .then_with(|| other.gain.total_cmp(&self.gain))
            .then_with(|| self.index.cmp(&other.index))
    }
}

impl Scheduler {
    /// A scheduler with no apps.
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            log: DecisionLog::new(config.log_capacity),
            config,
            apps: BTreeMap::new(),
            scores: Vec::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Schedules `app` with `spec`, or replaces its spec (keeping its
    /// migration state). Only added apps are decided about; apps in the
    /// placement but not added are left alone.
    pub fn add_app(&mut self, app: impl Into<AppId>, spec: AppSpec) -> Result<(), SchedulerError> {
        if !(spec.threshold.is_finite() && spec.threshold >= 0.0) {
            return Err(SchedulerError::InvalidThreshold(spec.threshold));
        }
        match self.apps.entry(app.into()) {
            std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().spec = spec,
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(AppState {
                    spec,
                    in_flight_since: None,
                    last_migration: None,
                });
            }
        }
        Ok(())
    }

    /// Stops scheduling `app` (a migration in flight no longer counts).
    pub fn remove_app(&mut self, app: &AppId) -> Option<AppSpec> {
        self.apps.remove(app).map(|s| s.spec)
    }

    /// The spec of `app`.
    pub fn spec(&self, app: &AppId) -> Option<&AppSpec> {
        self.apps.get(app).map(|s| &s.spec)
    }

    /// The scheduled apps, in order.
    pub fn apps(&self) -> impl Iterator<Item = &AppId> {
        self.apps.keys()
    }

    /// The caller started migrating `app`: no other move of it starts until
    /// [`migration_finished`](Self::migration_finished), and it counts
    /// against the concurrency cap.
    pub fn migration_started(&mut self, app: &AppId, now: Duration) -> Result<(), SchedulerError> {
        let st = self
            .apps
            .get_mut(app)
            .ok_or_else(|| SchedulerError::UnknownApp(app.clone()))?;
        if st.in_flight_since.is_some() {
            return Err(SchedulerError::AlreadyInFlight(app.clone()));
        }
        st.in_flight_since = Some(now);
        Ok(())
    }

    /// The migration of `app` ended, well (`ok`) or not. Either way the
    /// app's cooldown starts now: a failed migration is not retried at once
    /// unless the app is forced out. The placement is the caller's to update
    /// (in the next round's [`Inputs`]).
    pub fn migration_finished(
        &mut self,
        app: &AppId,
        now: Duration,
        ok: bool,
    ) -> Result<(), SchedulerError> {
        let st = self
            .apps
            .get_mut(app)
            .ok_or_else(|| SchedulerError::UnknownApp(app.clone()))?;
        if st.in_flight_since.take().is_none() {
            return Err(SchedulerError::NotInFlight(app.clone()));
        }
        st.last_migration = Some((now, ok));
        Ok(())
    }

    /// When the last migration of `app` ended and whether it succeeded.
    pub fn last_migration(&self, app: &AppId) -> Option<(Duration, bool)> {
        self.apps.get(app).and_then(|s| s.last_migration)
    }

    /// Whether a migration of `app` is in flight.
    pub fn is_in_flight(&self, app: &AppId) -> bool {
        self.apps
            .get(app)
            .is_some_and(|s| s.in_flight_since.is_some())
    }

    /// How many migrations are in flight.
    pub fn in_flight(&self) -> usize {
        self.apps
            .values()
            .filter(|s| s.in_flight_since.is_some())
            .count()
    }

    /// The decisions so far.
    pub fn log(&self) -> &DecisionLog {
        &self.log
    }

    /// One decision round at `now`: one [`Decision`] per scheduled app, in
    /// app order, each also appended to the log. The moves among them
    /// ([`Decision::migration`]) are for the caller to carry out, reporting
    /// each with [`migration_started`](Self::migration_started) and
    /// [`migration_finished`](Self::migration_finished); a move that is not
    /// started is simply proposed again next round if still worth it.
    ///
    /// `O(A·R·C)`: each app is evaluated on its own against every region.
    pub fn decide(&mut self, now: Duration, inputs: &Inputs) -> Vec<Decision> {
        // Earliest provider notice per region, computed once per round.
        let mut doomed: Vec<Option<Duration>> = vec![None; inputs.regions.len()];
        for n in &inputs.notices {
            if let Some(slot) = doomed.get_mut(n.region.index()) {
                *slot = Some(slot.map_or(n.deadline, |d| d.min(n.deadline)));
            }
        }

        let mut out = Vec::with_capacity(self.apps.len());
        let mut wanted = Vec::new();
        let mut scores = std::mem::take(&mut self.scores);
        for (app, st) in &self.apps {
            let (decision, want) = evaluate(app, st, now, inputs, &doomed, &mut scores);
            if let Some(mut w) = want {
                w.index = out.len();
                wanted.push(w);
            }
            out.push(decision);
        }
        self.scores = scores;

        // The concurrency cap: the most pressing moves first.
        let room = self.config.max_concurrent.saturating_sub(self.in_flight());
        if wanted.len() > room {
            wanted.sort_by(Wanted::priority);
            for w in &wanted[room..] {
                let d = &mut out[w.index];
                d.action = Action::Stay;
                d.reason = Reason::CapReached {
                    cap: self.config.max_concurrent,
                };
            }
        }

        for d in &out {
            self.log.push(d.clone());
        }
        out
    }
}

fn contains(list: &Option<Vec<RegionId>>, r: RegionId) -> bool {
    list.as_ref().is_none_or(|l| l.contains(&r))
}

/// Evaluates one app: its decision before the concurrency cap, and whether
/// it wants to move.
fn evaluate(
    app: &AppId,
    st: &AppState,
    now: Duration,
    inputs: &Inputs,
    doomed: &[Option<Duration>],
    scores: &mut Vec<f64>,
) -> (Decision, Option<Wanted>) {
    let spec = &st.spec;
    let policy = &*spec.policy;
    let mut d = Decision {
        at: now,
        app: app.clone(),
        action: Action::Stay,
        reason: Reason::NotPlaced,
        forced: None,
        policy: policy.name().to_owned(),
        unit: policy.unit().to_owned(),
        threshold: spec.threshold,
        current: None,
        best: None,
        score_current: None,
        score_best: None,
        gain: None,
        metrics_current: Metrics::new(),
        metrics_best: Metrics::new(),
    };
    let Some(cur) = inputs
        .placement
        .get(app)
        .filter(|r| inputs.regions.contains(*r))
    else {
        return (d, None);
    };
    d.current = inputs.regions.get(cur).cloned();

    let Constraints { allowed, evacuate } = policy.constraints(app, inputs);
    let deadline_of = |r: RegionId| {
        evacuate
            .iter()
            .filter(|n| n.region == r)
            .map(|n| n.deadline)
            .chain(doomed[r.index()])
            .min()
    };
    let allowed_here = |r: RegionId| contains(&spec.allowed, r) && contains(&allowed, r);

    // Score every region: the current one always (for the log), the others
    // only if they are possible destinations.
    scores.clear();
    for r in inputs.regions.ids() {
        let possible = r == cur || (allowed_here(r) && deadline_of(r).is_none());
        let s = if possible {
            policy.score(app, r, inputs)
        } else {
            f64::INFINITY
        };
        scores.push(if s.is_nan() { f64::INFINITY } else { s });
    }
    let current = scores[cur.index()];
    let mut best: Option<(RegionId, f64)> = None;
    for (i, &s) in scores.iter().enumerate() {
        let r = RegionId(i as u32);
        if r != cur && s.is_finite() && best.is_none_or(|(_, b)| s < b) {
            best = Some((r, s));
        }
    }

    d.score_current = current.is_finite().then_some(current);
    d.metrics_current = policy.metrics(app, cur, inputs);
    if let Some((b, s)) = best {
        d.best = inputs.regions.get(b).cloned();
        d.score_best = Some(s);
        d.metrics_best = policy.metrics(app, b, inputs);
        if current.is_finite() {
            d.gain = Some(current - s);
        }
    }
    let gain = d.gain.unwrap_or(f64::INFINITY);

    let deadline = deadline_of(cur);
    d.forced = match deadline {
        Some(deadline) => Some(Forced::Evacuation {
            region: cur,
            deadline,
        }),
        None if !allowed_here(cur) => Some(Forced::NotAllowed),
        None => None,
    };

    let stay = |mut d: Decision, reason| {
        d.reason = reason;
        (d, None)
    };
    let go = |mut d: Decision, reason, forced| {
        d.action = Action::Move;
        d.reason = reason;
        let want = Wanted {
            index: 0,
            deadline,
            forced,
            gain,
        };
        (d, Some(want))
    };

    if st.in_flight_since.is_some() {
        return stay(d, Reason::InFlight);
    }
    if let Some(forced) = d.forced {
        if best.is_none() {
            return stay(d, Reason::NoCandidate);
        }
        let reason = match forced {
            Forced::Evacuation { deadline, .. } => Reason::Evacuation {
                late: now >= deadline,
            },
            Forced::NotAllowed => Reason::NotAllowed,
        };
        return go(d, reason, true);
    }
    if let Some((end, _)) = st.last_migration {
        let until = end + spec.cooldown;
        if now < until {
            return stay(
                d,
                Reason::Cooldown {
                    remaining: until - now,
                },
            );
        }
    }
    if !current.is_finite() {
        return stay(d, Reason::Unscored);
    }
    if best.is_none() {
        return stay(d, Reason::NoCandidate);
    }
    if gain <= 0.0 {
        stay(d, Reason::AlreadyBest)
    } else if gain <= spec.threshold {
        stay(d, Reason::BelowThreshold)
    } else {
        go(d, Reason::Improvement, false)
    }
}
