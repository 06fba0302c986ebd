//! What `POST /v1/instances/NAME/migrate` streams: one JSON
//! [`MigrationEvent`] a line as the migration goes, the last one
//! [`MigrationEvent::Done`] or [`MigrationEvent::Failed`].
//!
//! Each event also renders ([`std::fmt::Display`]) as the line the CLI
//! prints for it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a migration was when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Reaching the destination and its handshake.
    Connect,
    /// Pre-copy rounds while the guest runs.
    Precopy,
    /// The guest paused: the last pages and its state sent, restored there.
    Paused,
    /// Learning that the guest runs there.
    Commit,
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationPhase::Connect => "connect",
            MigrationPhase::Precopy => "precopy",
            MigrationPhase::Paused => "paused",
            MigrationPhase::Commit => "commit",
        })
    }
}

/// What a finished migration did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The instance.
    pub name: String,
    /// The destination daemon, as the request named it.
    pub to: String,
    /// From the pause here to the guest running there.
    pub downtime_ms: f64,
    /// From the request to the guest running there.
    pub total_ms: f64,
    /// Bytes of guest memory sent (pages and state).
    pub bytes: u64,
    pub pages: u64,
    /// Guest memory, bytes.
    pub mem: u64,
    /// Pre-copy rounds (round 0 included).
    pub rounds: usize,
    /// Dirty heap pages left behind because the guest said they were free
    /// (none: no free-page hints were used).
    pub skipped: Option<u64>,
}

/// One step of a migration, as the source daemon streams it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MigrationEvent {
    /// The destination accepted.
    Started {
        name: String,
        mem: u64,
        /// This daemon's name.
        from: String,
        /// The destination's name, address and region.
        to_name: String,
        to: String,
        region: String,
    },
    /// A pre-copy round went out.
    Round {
        round: usize,
        /// Pages dirty at the start of the round.
        dirty: u64,
        /// Pages and bytes it sent.
        pages: u64,
        bytes: u64,
        /// Why it sent what it did: all pages written since boot (round 0),
        /// or those written while the destination caught up.
        #[serde(default)]
        catch_up: bool,
        #[serde(default)]
        skipped: Option<u64>,
    },
    /// The guest is paused here; the last pages and its state went out.
    Paused {
        dirty: u64,
        bytes: u64,
        #[serde(default)]
        skipped: Option<u64>,
    },
    /// Something worth telling that changes nothing (e.g. the destination
    /// is asked again whether it runs the guest).
    Note { message: String },
    /// The guest runs at the destination.
    Running {
        name: String,
        on: String,
        downtime_ms: f64,
        /// How long the destination took to restore it.
        #[serde(default)]
        restore_ms: Option<f64>,
    },
    /// When each step happened, ms since the request.
    Timeline {
        marks: Vec<(String, f64)>,
        hints_ms: f64,
    },
    /// The migration is over; the guest runs at the destination.
    Done(MigrationReport),
    /// The migration failed; where the guest runs is in `error`.
    Failed {
        phase: MigrationPhase,
        error: String,
    },
}

impl MigrationEvent {
    /// Whether this is the last event of a migration.
    pub fn is_last(&self) -> bool {
        matches!(
            self,
            MigrationEvent::Done(_) | MigrationEvent::Failed { .. }
        )
    }
}

fn skipped_note(skipped: Option<u64>) -> String {
    skipped.map_or_else(String::new, |n| format!(", {n} free pages skipped"))
}

impl fmt::Display for MigrationEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationEvent::Started {
                name,
                mem,
                from,
                to_name,
                to,
                region,
            } => write!(
                f,
                "migrating {name} ({} MiB) from {from} to {to_name} ({to}, region {region})",
                mem >> 20
            ),
            MigrationEvent::Round {
                round,
                dirty,
                pages,
                bytes,
                catch_up,
                skipped,
            } => write!(
                f,
                "round {round}: {dirty} dirty pages, {pages} pages sent ({}){}{}",
                human(*bytes),
                if *round == 0 {
                    ", all written since boot"
                } else if *catch_up {
                    ", written while the destination caught up"
                } else {
                    ""
                },
                skipped_note(*skipped)
            ),
            MigrationEvent::Paused {
                dirty,
                bytes,
                skipped,
            } => write!(
                f,
                "paused: {dirty} dirty pages and the vCPU/device state sent ({}){}",
                human(*bytes),
                skipped_note(*skipped)
            ),
            MigrationEvent::Note { message } => f.write_str(message),
            MigrationEvent::Running {
                name,
                on,
                downtime_ms,
                restore_ms,
            } => write!(
                f,
                "{name} runs on {on} since {downtime_ms:.2} ms after the pause{}",
                restore_ms
                    .map(|ms| format!(" (restore took {ms:.2} ms there)"))
                    .unwrap_or_default()
            ),
            MigrationEvent::Timeline { marks, hints_ms } => write!(
                f,
                "timeline (ms): {}; free-page hints read in {hints_ms:.1}",
                marks
                    .iter()
                    .map(|(what, at)| format!("{what} {at:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            MigrationEvent::Done(r) => write!(
                f,
                "ok: {} moved to {}; downtime {:.2} ms, total {:.1} ms, {} sent ({} pages) for {} \
                 of guest memory ({:.1}%), {} rounds{}",
                r.name,
                r.to,
                r.downtime_ms,
                r.total_ms,
                human(r.bytes),
                r.pages,
                human(r.mem),
                r.bytes as f64 * 100.0 / r.mem.max(1) as f64,
                r.rounds,
                skipped_note(r.skipped)
            ),
            MigrationEvent::Failed { error, .. } => write!(f, "error: {error}"),
        }
    }
}

/// `1.5 MiB`, `12.0 KiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_as_humans_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }

    #[test]
    fn events_are_json_lines_and_render_as_the_cli_shows_them() {
        let done = MigrationEvent::Done(MigrationReport {
            name: "kv".into(),
            to: "127.0.0.1:7100".into(),
            downtime_ms: 1.234,
            total_ms: 45.6,
            bytes: 2_726_297,
            pages: 672,
            mem: 64 << 20,
            rounds: 3,
            skipped: None,
        });
        let line = serde_json::to_string(&done).unwrap();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "done");
        assert_eq!(v["downtime_ms"], 1.234);
        assert_eq!(serde_json::from_str::<MigrationEvent>(&line).unwrap(), done);
        assert!(done.is_last());
        assert_eq!(
            done.to_string(),
            "ok: kv moved to 127.0.0.1:7100; downtime 1.23 ms, total 45.6 ms, 2.6 MiB sent \
             (672 pages) for 64.0 MiB of guest memory (4.1%), 3 rounds"
        );
        let failed = MigrationEvent::Failed {
            phase: MigrationPhase::Paused,
            error: "the destination died".into(),
        };
        let v = serde_json::to_value(&failed).unwrap();
        assert_eq!(
            (v["event"].as_str(), v["phase"].as_str()),
            (Some("failed"), Some("paused"))
        );
        assert_eq!(failed.to_string(), "error: the destination died");
        let round = MigrationEvent::Round {
            round: 0,
            dirty: 900,
            pages: 700,
            bytes: 2048,
            catch_up: false,
            skipped: Some(5),
        };
        assert!(!round.is_last());
        assert_eq!(
            round.to_string(),
            "round 0: 900 dirty pages, 700 pages sent (2.0 KiB), all written since boot, \
             5 free pages skipped"
        );
    }
}
