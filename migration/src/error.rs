//! [`MigrationError`]: why a migration failed, and in which phase.

use api::MigrationPhase;

/// Why a migration failed, by the phase it failed in. The message says what
/// became of the guest (it keeps running at the source, resumed there, or
/// runs at the destination).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Reaching the other daemon, the handshake, its refusal.
    #[error("{0}")]
    Connect(String),
    /// Pre-copy rounds while the guest runs (or the incoming memory).
    #[error("{0}")]
    Precopy(String),
    /// The guest paused: its last pages and state, restored there.
    #[error("{0}")]
    Paused(String),
    /// `Commit` and learning whether the guest runs there.
    #[error("{0}")]
    Commit(String),
}

impl MigrationError {
    /// The phase, as the progress events report it.
    pub fn phase(&self) -> MigrationPhase {
        match self {
            MigrationError::Connect(_) => MigrationPhase::Connect,
            MigrationError::Precopy(_) => MigrationPhase::Precopy,
            MigrationError::Paused(_) => MigrationPhase::Paused,
            MigrationError::Commit(_) => MigrationPhase::Commit,
        }
    }
}
