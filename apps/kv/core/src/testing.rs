//! What the tests and the fuzz targets observe of kv (feature `testing`): the live contents of
//! a keyspace, and a request stream read in pieces the way the guest's connection loop reads it.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::resp::{Command, Parser, ProtocolError};
use crate::store::Store;
use crate::Instant;

/// The live keys of `store` at `now`: value and milliseconds left.
pub fn contents(store: &Store, now: Instant) -> BTreeMap<Vec<u8>, (Vec<u8>, Option<u128>)> {
    store
        .live_entries(now)
        .map(|(k, e)| {
            let ttl = e.expires_at.map(|at| (at - now).as_millis());
            (k.to_vec(), (e.value.to_vec(), ttl))
        })
        .collect()
}

/// What one parser made of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The commands, in order.
    pub commands: Vec<Command>,
    /// The error that ended the stream, if one did.
    pub error: Option<ProtocolError>,
    /// Bytes received but not parsed (an incomplete request, or what followed the last
    /// command taken).
    pub left: usize,
}

/// Feeds `reads` to one parser as successive reads from a connection (unconsumed bytes stay in
/// the buffer), taking at most `max` commands.
pub fn parse_reads<'a>(reads: impl IntoIterator<Item = &'a [u8]>, max: usize) -> Parsed {
    let mut parser = Parser::new();
    let mut buf = Vec::new();
    let mut commands = Vec::new();
    for read in reads {
        buf.extend_from_slice(read);
        let mut start = 0;
        loop {
            let parsed = match parser.parse(&buf[start..]) {
                Ok(parsed) => parsed,
                Err(e) => {
                    let left = buf.len() - start;
                    return Parsed {
                        commands,
                        error: Some(e),
                        left,
                    };
                }
            };
            start += parsed.consumed;
            match parsed.command {
                Some(_) if commands.len() == max => {
                    return Parsed {
                        commands,
                        error: None,
                        left: buf.len() - start,
                    }
                }
                Some(c) => commands.push(c),
                None if parsed.consumed == 0 => break,
                None => {}
            }
        }
        buf.drain(..start);
    }
    Parsed {
        commands,
        error: None,
        left: buf.len(),
    }
}
