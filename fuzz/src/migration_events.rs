//! `migration_events`: the migration events a source daemon streams to its caller.
//!
//! The client's decoder over the input as what a (hostile) daemon streamed back for
//! `POST /v1/instances/NAME/migrate`: lines read with the client's line-size bound
//! ([`api::read_streamed_line`]; the first byte picks a bound of 16 to 4096 bytes and the read
//! buffer's size, so the bound is hit), each decoded as a [`api::MigrationEvent`]
//! ([`api::MigrationEvents`]) until the stream ends or a line is bad. Every event decoded must
//! encode back to JSON that decodes again, and render as the CLI's line.

use std::io::BufReader;

use api::{read_streamed_line, LineError, MigrationEvent, MigrationEvents};

pub fn run(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let max = 16 * (1 + usize::from(first));
    let mut reader = BufReader::with_capacity(1 + usize::from(first % 64), stream);
    let mut events = MigrationEvents::default();
    loop {
        match read_streamed_line(&mut reader, max) {
            Ok(Some(line)) => {
                if let Some(event) = events.line(&line) {
                    let json = serde_json::to_string(event).expect("a decoded event encodes");
                    let again: MigrationEvent = serde_json::from_str(&json)
                        .unwrap_or_else(|e| panic!("{json} does not decode again: {e}"));
                    assert_eq!(again.is_last(), event.is_last());
                    let _ = event.to_string();
                }
            }
            Ok(None) => break,
            Err(LineError::TooLong(n)) => {
                assert_eq!(n, max);
                break;
            }
            Err(LineError::Io(e)) => panic!("reading from memory failed: {e}"),
        }
    }
    let _ = events.finish().map_err(|e| e.to_string());
}
