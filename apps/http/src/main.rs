//! http: a small HTTP/1.1 server with keep-alive, for `curl` and `wrk`.
//!
//! - `GET /`         a greeting naming the host and region the app runs on
//! - `GET /healthz`  `ok`
//! - anything else   404, echoing the method, path and headers it got
//!
//! Listens on port 80 (or `PORT` from the environment).
#![no_std]
#![no_main]

use libcloud::net::{TcpSocket, Write};
use libcloud::prelude::*;

/// Concurrent connections served.
const WORKERS: usize = 32;
/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;

#[libcloud::main]
async fn main() -> Result<(), libcloud::net::Error> {
    let port: u16 = libcloud::env("PORT")
        .and_then(|p| p.parse().ok())
        .unwrap_or(80);
    let stack = libcloud::net::start().await?;
    libcloud::net::serve_tcp(stack, port, WORKERS, async |socket| serve(socket).await);
    println!("http: listening on port {port}");
    core::future::pending().await
}

struct Request<'a> {
    method: &'a str,
    path: &'a str,
    version: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

impl Request<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    fn keep_alive(&self) -> bool {
        match self.header("connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => false,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => true,
            _ => self.version == "HTTP/1.1",
        }
    }
}

fn parse(head: &str) -> Option<Request<'_>> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path, version) = (first.next()?, first.next()?, first.next()?);
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| l.split_once(':').map(|(k, v)| (k.trim(), v.trim())))
        .collect::<Option<Vec<_>>>()?;
    Some(Request {
        method,
        path,
        version,
        headers,
    })
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Serves requests on one connection until the client closes it.
async fn serve(socket: &mut TcpSocket<'_>) {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    loop {
        let head_len = loop {
            if let Some(end) = find_head_end(&buf[..filled]) {
                break end;
            }
            if filled == buf.len() {
                let _ = respond(socket, 431, "request head too large\n", false).await;
                return;
            }
            match socket.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => filled += n,
            }
        };
        let head = core::str::from_utf8(&buf[..head_len - 4]).ok();
        let Some(request) = head.and_then(parse) else {
            let _ = respond(socket, 400, "bad request\n", false).await;
            return;
        };
        let keep_alive = request.keep_alive();
        let body_len: usize = request
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (status, body) = route(&request);
        if respond(socket, status, &body, keep_alive).await.is_err() || !keep_alive {
            return;
        }
        // Drop the head and any body the client sent, keep pipelined bytes.
        let consumed = (head_len + body_len).min(filled);
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
    }
}

fn route(req: &Request) -> (u16, String) {
    match (req.method, req.path) {
        ("GET" | "HEAD", "/") => {
            let host = libcloud::host();
            (
                200,
                format!(
                    "Hello from a libcloud unikernel on {} (region {})\n",
                    host.name, host.region
                ),
            )
        }
        ("GET" | "HEAD", "/healthz") => (200, "ok\n".into()),
        _ => {
            let mut body = format!("no route for {} {}\n", req.method, req.path);
            for (k, v) in &req.headers {
                body.push_str(&format!("{k}: {v}\n"));
            }
            (404, body)
        }
    }
}

async fn respond(
    socket: &mut TcpSocket<'_>,
    status: u16,
    body: &str,
    keep_alive: bool,
) -> Result<(), ()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    socket.write_all(head.as_bytes()).await.map_err(|_| ())?;
    socket.write_all(body.as_bytes()).await.map_err(|_| ())?;
    socket.flush().await.map_err(|_| ())
}
