//! The `host-shim` binary's command modules: they parse nothing (clap does,
//! in `main.rs`) and render what the libraries return.

pub mod daemon;
pub mod fleet;
pub mod run;
pub mod schedule;

use std::time::Duration;

/// The one parser of every duration flag: humantime's syntax (`5s`,
/// `500ms`, `1m 30s`, `2h`), or a bare number of seconds (`5`, `1.5`); at
/// least 1 ms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = match t.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))?
        }
        Ok(_) => return Err(format!("`{s}` is not a duration: it must be positive")),
        Err(_) => humantime::parse_duration(t)
            .map_err(|e| format!("`{s}` is not a duration (e.g. 5s, 500ms, 2m): {e}"))?,
    };
    if d < Duration::from_millis(1) {
        return Err(format!("`{s}` is too short: at least 1ms"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::schedule::parse_cooldown;
    use super::*;

    #[test]
    fn durations_take_units_or_bare_seconds() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_cooldown("0s"), Ok(Duration::ZERO));
        for bad in ["0s", "0", "-1", "-1s", "soon", "NaN", "inf", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
