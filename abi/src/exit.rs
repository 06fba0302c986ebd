//! Exit statuses with a fixed meaning. An app's own `exit(code)` passes its
//! code through unchanged; keep app codes below 100 to stay clear of these.

/// The guest panicked (Rust's own convention for a panicking process).
pub const EXIT_PANIC: u8 = 101;
/// The guest took a CPU exception (page fault, #GP, #UD, ...).
pub const EXIT_FAULT: u8 = 102;
/// The guest's main returned an error.
pub const EXIT_FAILURE: u8 = 1;
