//! axum-hello: an ordinary axum + tokio web app that runs unmodified in a
//! unikernel image (and natively on Linux, for side-by-side figures).
//!
//! Routes: `/` says hello in plain text; `/json` answers a JSON object;
//! `/count` counts the requests it served in shared state (the count
//! survives live migration with the rest of the guest's memory);
//! `/spin?ms=N` starts a thread that computes for N ms without blocking
//! (it shows that a busy thread does not starve the server);
//! `/blocking?n=N` sums 0..N on tokio's blocking pool (another thread,
//! which wakes the runtime through mio's waker when done); `/sleep?ms=N`
//! answers after a `tokio::time::sleep` of N ms (at most 10 s);
//! `/fetch?to=IP:PORT` connects out with tokio (a non-blocking connect),
//! GETs `/json` there and answers with what it got. HTTP/1.1
//! keep-alive connections are served concurrently by one tokio runtime.
//!
//! Arguments: `--port N` (default 8080); `--multi-thread` runs tokio's
//! multi-thread runtime (2 workers; threads, futexes and eventfds on the
//! one vCPU) instead of the current-thread one; `--call-unprovided` first calls a
//! Hermit ABI function our kernel does not provide (`sem_init`), which stops
//! the app with an error naming it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[cfg(target_os = "hermit")]
use hermit_abi_impl as _;

/// Longest `/spin` or `/sleep` a caller may ask for.
const MAX_SPIN: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
}

async fn hello() -> &'static str {
    "hello from axum\n"
}

async fn json_route() -> Json<Value> {
    Json(json!({ "message": "hello", "app": "axum-hello", "os": std::env::consts::OS }))
}

async fn count(State(c): State<Arc<Counters>>) -> Json<Value> {
    let n = c.requests.fetch_add(1, Ordering::Relaxed) + 1;
    Json(json!({ "count": n }))
}

/// Starts a thread that computes without blocking for `ms` milliseconds.
async fn spin(Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let d = Duration::from_millis(query_u64(&q, "ms", 1000)).min(MAX_SPIN);
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < d {
            for i in 0..1000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        std::hint::black_box(x);
    });
    Json(json!({ "spinning_ms": d.as_millis() as u64 }))
}

#[cfg(target_os = "hermit")]
fn call_unprovided() {
    let mut sem: hermit_abi::sem_t = std::ptr::null();
    // SAFETY: `sem` is writable; our kernel stops the app in this call.
    let r = unsafe { hermit_abi::sem_init(&mut sem, 0, 1) };
    println!("sem_init returned {r}");
}

#[cfg(not(target_os = "hermit"))]
fn call_unprovided() {
    println!("--call-unprovided: only in a Hermit build");
}

fn query_u64(q: &HashMap<String, String>, key: &str, default: u64) -> u64 {
    q.get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn blocking(Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let n = query_u64(&q, "n", 1000).min(1 << 32);
    let sum = tokio::task::spawn_blocking(move || (0..n).fold(0u64, |a, i| a.wrapping_add(i)))
        .await
        .unwrap_or_default();
    Json(json!({ "n": n, "sum": sum }))
}

async fn sleep(Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let d = Duration::from_millis(query_u64(&q, "ms", 100)).min(MAX_SPIN);
    let start = tokio::time::Instant::now();
    tokio::time::sleep(d).await;
    Json(json!({ "slept_ms": start.elapsed().as_millis() as u64 }))
}

/// `/fetch`'s answer from `to`: the peer's JSON body, or an error.
async fn get_json_from(to: SocketAddr) -> Result<Value, String> {
    let exchange = async move {
        let mut s = tokio::net::TcpStream::connect(to).await?;
        s.write_all(b"GET /json HTTP/1.1\r\nHost: peer\r\nConnection: close\r\n\r\n")
            .await?;
        let mut reply = Vec::new();
        s.take(64 << 10).read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let body = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| &reply[i + 4..])
        .ok_or("no HTTP reply")?;
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

async fn fetch(Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let Some(to) = q.get("to").and_then(|t| t.parse::<SocketAddr>().ok()) else {
        return Json(json!({ "error": "expected to=IP:PORT" }));
    };
    Json(match get_json_from(to).await {
        Ok(peer) => json!({ "peer": peer }),
        Err(e) => json!({ "error": e }),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--call-unprovided") {
        call_unprovided();
    }
    let port: u16 = args
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let app = Router::new()
        .route("/", get(hello))
        .route("/json", get(json_route))
        .route("/count", get(count))
        .route("/spin", get(spin))
        .route("/blocking", get(blocking))
        .route("/sleep", get(sleep))
        .route("/fetch", get(fetch))
        .with_state(Arc::new(Counters::default()));
    let multi = args.iter().any(|a| a == "--multi-thread");
    let runtime = if multi {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let flavor = if multi {
        "multi-thread"
    } else {
        "current-thread"
    };
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .expect("bind");
        println!("axum-hello listening on port {port} ({flavor} runtime)");
        axum::serve(listener, app).await.expect("serve");
    });
}
