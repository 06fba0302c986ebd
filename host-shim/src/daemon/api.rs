//! The daemon's HTTP/1.1 JSON API: the `api` crate's request and answer
//! bodies and its typed client, re-exported where the daemon's modules
//! look for them.

pub use ::api::*;
