//! Time on the caller's clock.
//!
//! The scheduler never reads a clock: every entry point takes `now` as a
//! [`Duration`] since an epoch the caller picks (process start, the Unix
//! epoch, the start of a simulation), and deadlines use the same epoch. In
//! serialized form times are plain seconds (`f64`), which is what a
//! dashboard wants.

use std::time::Duration;

/// Serde helpers: a [`Duration`] as seconds in an `f64`.
pub(crate) mod secs {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// Formats a time for humans: `12.500s`.
pub(crate) fn fmt_secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}
