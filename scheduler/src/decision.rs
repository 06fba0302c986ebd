//! Decisions and the decision log.
//!
//! Every round produces one [`Decision`] per app — a move or a stay — with
//! its [`Reason`] and the numbers behind it: the policy and its unit, the
//! threshold, the current region's score, the best other region and its
//! score, the gain, and the policy's metrics for both. Decisions print as
//! one line for humans ([`Display`](fmt::Display)) and serialize to JSON for
//! the dashboard and the API (times as seconds, non-finite scores as
//! `null`).

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::model::{AppId, Region, RegionId};
use crate::policy::Metrics;
use crate::time::fmt_secs;

/// What to do with the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Leave it where it is.
    Stay,
    /// Migrate it to [`Decision::best`].
    Move,
}

/// Why the app must leave its region regardless of threshold and cooldown.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Forced {
    /// The region is terminated at `deadline` (a provider notice or a
    /// policy constraint).
    Evacuation {
        /// The region being left.
        region: RegionId,
        /// When it goes away.
        #[serde(rename = "deadline_s", with = "crate::time::secs")]
        deadline: Duration,
    },
    /// The region is not among the app's allowed regions.
    NotAllowed,
}

/// Why the scheduler decided what it did.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// Move: the best region beats the current one by more than the
    /// threshold.
    Improvement,
    /// Move: evacuating a terminated region (see [`Decision::forced`]);
    /// `late` if the deadline had already passed.
    Evacuation {
        /// The deadline was already past when the move was decided.
        late: bool,
    },
    /// Move: the current region is not allowed.
    NotAllowed,
    /// Stay: no other region scores better.
    AlreadyBest,
    /// Stay: the gain does not exceed the threshold.
    BelowThreshold,
    /// Stay: a migration of this app is in flight.
    InFlight,
    /// Stay: the app moved recently and may not move again yet.
    Cooldown {
        /// How long until it may.
        #[serde(rename = "remaining_s", with = "crate::time::secs")]
        remaining: Duration,
    },
    /// Stay: it should move, but the cap on concurrent migrations is
    /// reached; it will be reconsidered next round.
    CapReached {
        /// The cap.
        cap: usize,
    },
    /// Stay: it should or must move, but no other region is allowed and
    /// scorable.
    NoCandidate,
    /// Stay: the current region cannot be scored (e.g. RTTs not measured
    /// yet), so there is nothing to compare with; not a reason to move.
    Unscored,
    /// Stay: the app is not in the placement (or its region is unknown).
    NotPlaced,
}

impl Reason {
    /// Whether this reason goes with a move.
    pub fn is_move(&self) -> bool {
        matches!(
            self,
            Reason::Improvement | Reason::Evacuation { .. } | Reason::NotAllowed
        )
    }
}

/// One decision about one app, with everything needed to explain it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// When it was decided (caller's clock).
    #[serde(rename = "at_s", with = "crate::time::secs")]
    pub at: Duration,
    /// The app.
    pub app: AppId,
    /// Move or stay.
    pub action: Action,
    /// Why.
    pub reason: Reason,
    /// Set when the app had to leave its region (even if it could not).
    pub forced: Option<Forced>,
    /// The policy's name.
    pub policy: String,
    /// The unit of scores, gain and threshold.
    pub unit: String,
    /// The app's threshold.
    pub threshold: f64,
    /// Where the app runs now (`None` if not placed).
    pub current: Option<Region>,
    /// The best other allowed region with a finite score, if any; for a
    /// move, the destination.
    pub best: Option<Region>,
    /// The current region's score (`None` if not finite or not scored).
    pub score_current: Option<f64>,
    /// The best other region's score.
    pub score_best: Option<f64>,
    /// `score_current - score_best`, when both are known.
    pub gain: Option<f64>,
    /// The policy's metrics for the current region.
    pub metrics_current: Metrics,
    /// The policy's metrics for the best other region.
    pub metrics_best: Metrics,
}

impl Decision {
    /// Whether this is a move.
    pub fn is_move(&self) -> bool {
        self.action == Action::Move
    }

    /// For a move, (from, to).
    pub fn migration(&self) -> Option<(RegionId, RegionId)> {
        match (self.action, &self.current, &self.best) {
            (Action::Move, Some(from), Some(to)) => Some((from.id, to.id)),
            _ => None,
        }
    }
}

struct Score<'a>(Option<f64>, &'a str);

impl fmt::Display for Score<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:.2}")?,
            None => write!(f, "n/a")?,
        }
        if !self.1.is_empty() {
            write!(f, " {}", self.1)?;
        }
        Ok(())
    }
}

fn region_name(r: &Option<Region>) -> &str {
    r.as_ref().map_or("nowhere", |r| r.name.as_str())
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = self.unit.as_str();
        write!(f, "[{}] {}: ", fmt_secs(self.at), self.app)?;
        match self.action {
            Action::Move => write!(
                f,
                "move {} -> {}",
                region_name(&self.current),
                region_name(&self.best)
            )?,
            Action::Stay => write!(f, "stay in {}", region_name(&self.current))?,
        }
        write!(f, " (")?;
        match self.reason {
            Reason::Improvement => write!(f, "improvement")?,
            Reason::Evacuation { late } => {
                write!(f, "evacuation")?;
                if late {
                    write!(f, ", late")?;
                }
            }
            Reason::NotAllowed => write!(f, "region not allowed")?,
            Reason::AlreadyBest => write!(f, "already best")?,
            Reason::BelowThreshold => write!(f, "below threshold")?,
            Reason::InFlight => write!(f, "migration in flight")?,
            Reason::Cooldown { remaining } => write!(f, "cooldown, {} left", fmt_secs(remaining))?,
            Reason::CapReached { cap } => write!(f, "{cap} concurrent migrations already")?,
            Reason::NoCandidate => write!(f, "no other region possible")?,
            Reason::Unscored => write!(f, "current region cannot be scored")?,
            Reason::NotPlaced => write!(f, "not placed")?,
        }
        match self.forced {
            Some(Forced::Evacuation { deadline, .. }) if !self.reason.is_move() => {
                write!(f, "; must evacuate by {}", fmt_secs(deadline))?
            }
            Some(Forced::Evacuation { deadline, .. }) => {
                write!(f, ": region terminates at {}", fmt_secs(deadline))?
            }
            Some(Forced::NotAllowed) if !self.reason.is_move() => {
                write!(f, "; region not allowed")?
            }
            _ => {}
        }
        write!(f, ")")?;
        if self.reason == Reason::NotPlaced {
            return Ok(());
        }
        write!(f, ": {} {}", self.policy, Score(self.score_current, unit))?;
        if self.best.is_some() {
            write!(
                f,
                ", best {} {}",
                region_name(&self.best),
                Score(self.score_best, unit)
            )?;
        }
        if let Some(gain) = self.gain {
            let cmp = if gain > self.threshold { ">" } else { "<=" };
            write!(
                f,
                ", gain {} {cmp} T {}",
                Score(Some(gain), ""),
                Score(Some(self.threshold), unit)
            )?;
        }
        for (name, now) in &self.metrics_current {
            write!(f, "; {name} {now:.2}")?;
            if let Some(best) = self.metrics_best.get(name) {
                write!(f, " (best {best:.2})")?;
            }
        }
        Ok(())
    }
}

/// The most recent decisions, oldest first, bounded in size.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionLog {
    capacity: usize,
    /// How many older decisions were dropped to stay within capacity.
    dropped: u64,
    entries: VecDeque<Decision>,
}

impl DecisionLog {
    /// A log keeping the last `capacity` decisions (at least one).
    pub fn new(capacity: usize) -> Self {
        DecisionLog {
            capacity: capacity.max(1),
            dropped: 0,
            entries: VecDeque::new(),
        }
    }

    /// Appends a decision, dropping the oldest if full.
    pub fn push(&mut self, d: Decision) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
            self.dropped += 1;
        }
        self.entries.push_back(d);
    }

    /// The decisions kept, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Decision> + ExactSizeIterator {
        self.entries.iter()
    }

    /// The moves kept, oldest first.
    pub fn moves(&self) -> impl Iterator<Item = &Decision> {
        self.entries.iter().filter(|d| d.is_move())
    }

    /// The last decision about `app`.
    pub fn last_for(&self, app: &AppId) -> Option<&Decision> {
        self.entries.iter().rev().find(|d| &d.app == app)
    }

    /// The number of decisions kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many decisions were dropped to stay within capacity.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The log as JSON: `{"capacity":..,"dropped":..,"entries":[..]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a decision log always serializes")
    }
}

impl fmt::Display for DecisionLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dropped > 0 {
            writeln!(f, "({} older decisions dropped)", self.dropped)?;
        }
        for d in &self.entries {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(at: u64) -> Decision {
        Decision {
            at: Duration::from_secs(at),
            app: "kv".into(),
            action: Action::Move,
            reason: Reason::Improvement,
            forced: None,
            policy: "follow-the-sun".into(),
            unit: "ms".into(),
            threshold: 5.0,
            current: Some(Region {
                id: RegionId(0),
                name: "us-east".into(),
            }),
            best: Some(Region {
                id: RegionId(1),
                name: "eu-west".into(),
            }),
            score_current: Some(92.4),
            score_best: Some(53.2),
            gain: Some(39.2),
            metrics_current: [("share_under_15ms".to_string(), 0.2)].into(),
            metrics_best: [("share_under_15ms".to_string(), 0.6)].into(),
        }
    }

    #[test]
    fn display_one_line() {
        let s = decision(12).to_string();
        assert_eq!(
            s,
            "[12.000s] kv: move us-east -> eu-west (improvement): follow-the-sun 92.40 ms, \
             best eu-west 53.20 ms, gain 39.20 > T 5.00 ms; share_under_15ms 0.20 (best 0.60)"
        );
        assert_eq!(decision(1).migration(), Some((RegionId(0), RegionId(1))));
    }

    #[test]
    fn json_shape() {
        let mut d = decision(3);
        d.score_current = Some(f64::INFINITY);
        d.reason = Reason::Cooldown {
            remaining: Duration::from_millis(1500),
        };
        d.forced = Some(Forced::Evacuation {
            region: RegionId(0),
            deadline: Duration::from_secs(30),
        });
        let v: serde_json::Value = serde_json::to_value(&d).unwrap();
        assert_eq!(v["at_s"], 3.0);
        assert_eq!(v["action"], "move");
        assert_eq!(v["reason"]["kind"], "cooldown");
        assert_eq!(v["reason"]["remaining_s"], 1.5);
        assert_eq!(v["forced"]["kind"], "evacuation");
        assert_eq!(v["forced"]["deadline_s"], 30.0);
        assert_eq!(v["current"]["name"], "us-east");
        assert!(v["score_current"].is_null(), "non-finite is null");
        assert_eq!(v["metrics_best"]["share_under_15ms"], 0.6);
    }

    #[test]
    fn log_is_bounded() {
        let mut log = DecisionLog::new(2);
        for t in 0..5 {
            log.push(decision(t));
        }
        assert_eq!(log.len(), 2);
        assert_eq!(log.dropped(), 3);
        assert_eq!(log.iter().next().unwrap().at, Duration::from_secs(3));
        assert!(log
            .to_string()
            .starts_with("(3 older decisions dropped)\n[3.000s]"));
        let v: serde_json::Value = serde_json::from_str(&log.to_json()).unwrap();
        assert_eq!(v["entries"].as_array().unwrap().len(), 2);
    }
}
