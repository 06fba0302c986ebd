//! `http_request`: the daemon's HTTP request head and body reader.
//!
//! The daemon's request reader (head through httparse, then the body by
//! `Content-Length`) over the input as what a client sent on one keep-alive connection, read
//! through a buffer of the size the first input byte picks (heads split across reads).

use std::io::BufReader;

use daemon::http::fuzz_request;

use crate::Input;

/// Requests read per input.
const MAX_REQUESTS: usize = 16;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let buffer = 1 + usize::from(input.u8()) * 16;
    let mut conn = BufReader::with_capacity(buffer, input.rest());
    for _ in 0..MAX_REQUESTS {
        match fuzz_request(&mut conn) {
            Ok((path, _body)) => assert!(!path.contains('?'), "the query is cut off: {path}"),
            Err((status, message)) => {
                assert!((400..500).contains(&status), "{status} {message}");
                break;
            }
        }
    }
}
