//! Exit statuses with a fixed meaning. An app's own `exit(code)` passes its
//! code through unchanged; keep app codes below 100 to stay clear of these.

/// The guest panicked (Rust's own convention for a panicking process).
pub const EXIT_PANIC: u8 = 101;
/// The guest took a CPU exception (page fault, #GP, #UD, ...).
pub const EXIT_FAULT: u8 = 102;
/// The guest's main returned an error.
pub const EXIT_FAILURE: u8 = 1;

/// On PVH monitors without `isa-debug-exit` (Firecracker), the guest's last
/// serial line is this prefix and its exit status in decimal (`0`..=`255`),
/// then it resets the machine through the i8042. The monitor's host side
/// maps the line back to the status.
pub const SERIAL_EXIT_PREFIX: &str = "libcloud-exit: ";

/// The status in a console line that ends with [`SERIAL_EXIT_PREFIX`] and a
/// status, and the text before it (what the app printed without a newline).
pub fn parse_serial_exit(line: &str) -> Option<(&str, u8)> {
    let at = line.rfind(SERIAL_EXIT_PREFIX)?;
    let digits = &line[at + SERIAL_EXIT_PREFIX.len()..];
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((&line[..at], digits.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_exit_lines() {
        assert_eq!(parse_serial_exit("libcloud-exit: 0"), Some(("", 0)));
        assert_eq!(parse_serial_exit("libcloud-exit: 101"), Some(("", 101)));
        assert_eq!(
            parse_serial_exit("no newlinelibcloud-exit: 7"),
            Some(("no newline", 7))
        );
        assert_eq!(parse_serial_exit("libcloud-exit: 256"), None);
        assert_eq!(parse_serial_exit("libcloud-exit: "), None);
        assert_eq!(parse_serial_exit("libcloud-exit: 1x"), None);
        assert_eq!(parse_serial_exit("libcloud-exit: 0001"), None);
        assert_eq!(parse_serial_exit("hello"), None);
    }
}
