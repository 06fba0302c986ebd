//! The API's routes as data: [`ROUTES`] maps a method and a path template
//! to an [`Endpoint`]; [`Request::parse`] turns a request into a typed
//! [`Request`] (path parameters and JSON bodies parsed), which the daemon
//! answers with one exhaustive `match`.

use std::fmt;

use serde::de::DeserializeOwned;

use crate::{
    CheckpointRequest, MigrateRequest, PushRequest, RestartRequest, RestoreRequest, RunRequest,
    SnapshotRequest,
};

/// A request method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Other(String),
}

impl Method {
    pub fn parse(s: &str) -> Self {
        match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Other(m) => m,
        })
    }
}

/// What a route leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Health,
    Info,
    Stats,
    List,
    Run,
    SetRestart,
    FollowLogs,
    Image,
    PutImage,
    PushImage,
    OpenApi,
    Logs,
    Stop,
    Snapshot,
    Checkpoint,
    Restore,
    Migrate,
    /// The incoming migration stream (the HTTP server upgrades it itself).
    Migration,
    Standbys,
    Standby,
    StandbyCheckpoint,
}

/// One route: its methods, its path (`{name}`, `{hash}`: one segment),
/// and whether a caller known only by a pinned peer certificate may call
/// it (migration, standby, image and read routes).
#[derive(Debug)]
pub struct Route {
    pub methods: &'static [Method],
    pub path: &'static str,
    pub endpoint: Endpoint,
    pub peer: bool,
}

const fn route(
    methods: &'static [Method],
    path: &'static str,
    endpoint: Endpoint,
    peer: bool,
) -> Route {
    Route {
        methods,
        path,
        endpoint,
        peer,
    }
}

const GET: &[Method] = &[Method::Get];
const POST: &[Method] = &[Method::Post];
const PUT: &[Method] = &[Method::Put];

/// Every route of the daemon API.
pub static ROUTES: &[Route] = &[
    route(GET, "/v1/health", Endpoint::Health, true),
    route(GET, "/v1/info", Endpoint::Info, true),
    route(GET, "/v1/stats", Endpoint::Stats, false),
    route(GET, "/v1/instances", Endpoint::List, true),
    route(POST, "/v1/instances", Endpoint::Run, false),
    route(
        PUT,
        "/v1/instances/{name}/restart",
        Endpoint::SetRestart,
        false,
    ),
    route(
        POST,
        "/v1/instances/{name}/logs/follow",
        Endpoint::FollowLogs,
        false,
    ),
    route(
        &[Method::Get, Method::Head],
        "/v1/images/{hash}",
        Endpoint::Image,
        true,
    ),
    route(PUT, "/v1/images/{hash}", Endpoint::PutImage, true),
    route(POST, "/v1/images/{hash}/push", Endpoint::PushImage, false),
    route(GET, "/v1/openapi.yaml", Endpoint::OpenApi, false),
    route(GET, "/v1/instances/{name}/logs", Endpoint::Logs, false),
    route(POST, "/v1/instances/{name}/stop", Endpoint::Stop, false),
    route(
        POST,
        "/v1/instances/{name}/snapshot",
        Endpoint::Snapshot,
        false,
    ),
    route(
        POST,
        "/v1/instances/{name}/checkpoint",
        Endpoint::Checkpoint,
        false,
    ),
    route(POST, "/v1/restore", Endpoint::Restore, false),
    route(
        POST,
        "/v1/instances/{name}/migrate",
        Endpoint::Migrate,
        false,
    ),
    route(POST, "/v1/migration", Endpoint::Migration, true),
    route(GET, "/v1/standby", Endpoint::Standbys, true),
    route(POST, "/v1/standby", Endpoint::Standby, true),
    route(
        POST,
        "/v1/standby/{name}/checkpoint",
        Endpoint::StandbyCheckpoint,
        true,
    ),
];

/// The route of `method` and `path`, with the path's parameters in order.
pub fn find<'p>(method: &Method, path: &'p str) -> Option<(&'static Route, Vec<&'p str>)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    ROUTES.iter().find_map(|r| {
        if !r.methods.contains(method) {
            return None;
        }
        let template: Vec<&str> = r.path.trim_matches('/').split('/').collect();
        if template.len() != segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (t, s) in template.iter().zip(&segments) {
            if t.starts_with('{') {
                params.push(*s);
            } else if t != s {
                return None;
            }
        }
        Some((r, params))
    })
}

/// A request, typed: its endpoint's path parameters and body.
#[derive(Debug)]
pub enum Request<'a> {
    Health,
    Info,
    Stats,
    List,
    Run(RunRequest),
    SetRestart(&'a str, RestartRequest),
    FollowLogs(&'a str),
    Image(&'a str),
    PutImage(&'a str, &'a [u8]),
    PushImage(&'a str, PushRequest),
    OpenApi,
    Logs(&'a str),
    Stop(&'a str),
    Snapshot(&'a str, SnapshotRequest),
    Checkpoint(&'a str, CheckpointRequest),
    Restore(RestoreRequest),
    Migrate(&'a str, MigrateRequest),
    Migration,
    Standbys,
    /// The body is the daemon's standby registration (JSON).
    Standby(&'a [u8]),
    StandbyCheckpoint(&'a str, &'a [u8]),
}

/// Why a request is not one of the API's.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such endpoint: {method} {path}")]
    NotFound { method: String, path: String },
    #[error("bad {what} request: {error}")]
    BadBody { what: &'static str, error: String },
}

impl RouteError {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound { .. } => 404,
            RouteError::BadBody { .. } => 400,
        }
    }
}

fn body<T: DeserializeOwned>(body: &[u8], what: &'static str) -> Result<T, RouteError> {
    serde_json::from_slice(body).map_err(|e| RouteError::BadBody {
        what,
        error: e.to_string(),
    })
}

impl<'a> Request<'a> {
    /// The request `method path` with `bytes` as its body.
    pub fn parse(method: &Method, path: &'a str, bytes: &'a [u8]) -> Result<Self, RouteError> {
        let Some((route, params)) = find(method, path) else {
            return Err(RouteError::NotFound {
                method: method.to_string(),
                path: path.to_owned(),
            });
        };
        let p = params.first().copied().unwrap_or_default();
        Ok(match route.endpoint {
            Endpoint::Health => Request::Health,
            Endpoint::Info => Request::Info,
            Endpoint::Stats => Request::Stats,
            Endpoint::List => Request::List,
            Endpoint::Run => Request::Run(body(bytes, "run")?),
            Endpoint::SetRestart => Request::SetRestart(p, body(bytes, "restart")?),
            Endpoint::FollowLogs => Request::FollowLogs(p),
            Endpoint::Image => Request::Image(p),
            Endpoint::PutImage => Request::PutImage(p, bytes),
            Endpoint::PushImage => Request::PushImage(p, body(bytes, "push")?),
            Endpoint::OpenApi => Request::OpenApi,
            Endpoint::Logs => Request::Logs(p),
            Endpoint::Stop => Request::Stop(p),
            Endpoint::Snapshot => Request::Snapshot(p, body(bytes, "snapshot")?),
            Endpoint::Checkpoint => Request::Checkpoint(p, body(bytes, "checkpoint")?),
            Endpoint::Restore => Request::Restore(body(bytes, "restore")?),
            Endpoint::Migrate => Request::Migrate(p, body(bytes, "migrate")?),
            Endpoint::Migration => Request::Migration,
            Endpoint::Standbys => Request::Standbys,
            Endpoint::Standby => Request::Standby(bytes),
            Endpoint::StandbyCheckpoint => Request::StandbyCheckpoint(p, bytes),
        })
    }
}

/// Whether a caller known only by a pinned peer certificate may make this
/// call.
pub fn peer_may_call(method: &Method, path: &str) -> bool {
    find(method, path).is_some_and(|(r, _)| r.peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_typed_requests() {
        let m = |s| Method::parse(s);
        assert!(matches!(
            Request::parse(&m("GET"), "/v1/instances/kv/logs", b""),
            Ok(Request::Logs("kv"))
        ));
        assert!(matches!(
            Request::parse(&m("HEAD"), "/v1/images/ab/", b""),
            Ok(Request::Image("ab"))
        ));
        let run = br#"{"name":"kv","image":"kv.img","mem":67108864}"#;
        match Request::parse(&m("POST"), "/v1/instances", run) {
            Ok(Request::Run(r)) => assert_eq!((r.name.as_str(), r.mem), ("kv", 64 << 20)),
            other => panic!("{other:?}"),
        }
        let bad = Request::parse(&m("POST"), "/v1/instances", b"{").unwrap_err();
        assert_eq!(bad.status(), 400);
        assert!(bad.to_string().starts_with("bad run request: "), "{bad}");
        for (method, path) in [
            ("DELETE", "/v1/instances"),
            ("GET", "/v1/instances/kv/logs/more"),
            ("GET", "/v2/health"),
            ("BREW", "/v1/health"),
        ] {
            let e = Request::parse(&m(method), path, b"").unwrap_err();
            assert_eq!(e.status(), 404);
            assert_eq!(e.to_string(), format!("no such endpoint: {method} {path}"));
        }
    }

    #[test]
    fn peers_may_call_only_their_routes() {
        let m = |s| Method::parse(s);
        assert!(peer_may_call(&m("POST"), "/v1/migration"));
        assert!(peer_may_call(&m("PUT"), "/v1/images/abc"));
        assert!(peer_may_call(&m("POST"), "/v1/standby/kv/checkpoint"));
        assert!(!peer_may_call(&m("POST"), "/v1/instances"));
        assert!(!peer_may_call(&m("POST"), "/v1/images/abc/push"));
        assert!(!peer_may_call(&m("GET"), "/v1/instances/kv/logs"));
        assert!(!peer_may_call(&m("GET"), "/v1/nowhere"));
    }
}
