//! Failures injected into migrations, for tests: `serve --test-fault
//! STEP:FAULT` makes this daemon, as the source or the destination of a
//! migration, die, cut the connection or corrupt a byte when it reaches
//! STEP (see the step table in [`super::protocol`]). A daemon configuration
//! field, never read from the environment: production daemons have none.

use std::fmt;
use std::str::FromStr;

/// Where in a migration the fault strikes; each side has its own point
/// for each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Source: before its first `Sync`. Destination: before its first
    /// `Synced`. The guest runs at the source.
    Precopy,
    /// Source: guest paused, before `State`. Destination: `State` received
    /// and checked, before `Ready`.
    Paused,
    /// Source: `Ready` received, before `Commit`. Destination: `Ready`
    /// sent, before reading `Commit`.
    Ready,
    /// Source: `Commit` sent, before reading `Committed`. Destination:
    /// `Commit` received, before starting the guest.
    Commit,
    /// Source: `Committed` received, before dropping its copy.
    /// Destination: guest started, before `Committed`.
    Committed,
}

/// What happens there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The daemon exits at once (status 137, as if killed).
    Die,
    /// The migration connection is shut down both ways.
    Cut,
    /// One byte of the next frame this side sends is flipped (a no-op if
    /// it sends none after the step).
    Corrupt,
    /// This side's migration thread stops there until its connection is
    /// cut (the rest of the daemon goes on: a `Query` is still answered).
    Hang,
}

/// A fault at a step: `STEP:FAULT`, e.g. `ready:die`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injected {
    pub step: Step,
    pub fault: Fault,
}

impl FromStr for Injected {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (step, fault) = s
            .split_once(':')
            .ok_or_else(|| format!("'{s}' is not STEP:FAULT (e.g. ready:die)"))?;
        let step = match step {
            "precopy" => Step::Precopy,
            "paused" => Step::Paused,
            "ready" => Step::Ready,
            "commit" => Step::Commit,
            "committed" => Step::Committed,
            other => {
                return Err(format!(
                    "unknown step '{other}' (precopy, paused, ready, commit, committed)"
                ))
            }
        };
        let fault = match fault {
            "die" => Fault::Die,
            "cut" => Fault::Cut,
            "corrupt" => Fault::Corrupt,
            "hang" => Fault::Hang,
            other => return Err(format!("unknown fault '{other}' (die, cut, corrupt, hang)")),
        };
        Ok(Self { step, fault })
    }
}

impl fmt::Display for Injected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}:{:?}", self.step, self.fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!(
            "ready:die".parse::<Injected>(),
            Ok(Injected {
                step: Step::Ready,
                fault: Fault::Die
            })
        );
        assert!("commit:corrupt".parse::<Injected>().is_ok());
        assert!("ready".parse::<Injected>().is_err());
        assert!("later:die".parse::<Injected>().is_err());
        assert!("ready:explode".parse::<Injected>().is_err());
    }
}
