//! `host-shim events --follow --json` run in the background: what a user
//! watching the fleet's event stream sees, one JSON value per event.

use std::collections::VecDeque;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::daemon::BIN;

/// A `host-shim events --follow --json` on a store, started before what
/// happens; its events arrive on a channel as they are printed.
pub struct Follower {
    child: Child,
    events: Receiver<Value>,
    /// Every event received so far, in order.
    pub seen: Vec<Value>,
    /// The last [`LOG_LINES`] lines it logged (warnings: `RUST_LOG=warn`).
    log: Arc<Mutex<VecDeque<String>>>,
}

/// Lines of the follower's log kept.
const LOG_LINES: usize = 200;

impl Follower {
    pub fn start(store: &str) -> Self {
        let mut child = Command::new(BIN)
            .args(["--store", store, "events", "--follow", "--json"])
            .env_remove("HOST_SHIM")
            .env_remove("HOST_SHIM_FLEET")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn host-shim events --follow");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let mut lines = lines.lock().unwrap();
                if lines.len() == LOG_LINES {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        });
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("events --json printed {line:?}: {e}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            events,
            seen: Vec::new(),
            log,
        }
    }

    /// Waits (up to `within`) until the follower logs a line containing
    /// `needle`.
    pub fn wait_says(&self, needle: &str, within: Duration) {
        let give_up = Instant::now() + within;
        while !self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < give_up,
                "events --follow did not log {needle:?} within {within:?}; it logged:\n{}",
                Vec::from(self.log.lock().unwrap().clone()).join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The next event, within `left`.
    fn next(&mut self, left: Duration) -> Option<&Value> {
        let v = self.events.recv_timeout(left).ok()?;
        self.seen.push(v);
        self.seen.last()
    }

    /// Whether no event comes within `within` (none repeated or made up).
    pub fn nothing_more_within(&mut self, within: Duration) -> bool {
        self.next(within).is_none()
    }

    /// The events printed from now until one satisfies `last` (within
    /// `within`).
    pub fn until(&mut self, within: Duration, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let give_up = Instant::now() + within;
        let from = self.seen.len();
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(v) if last(v) => return self.seen[from..].to_vec(),
                Some(_) => {}
                None => panic!(
                    "events --follow: no matching event within {within:?}; saw:\n{}",
                    self.table()
                ),
            }
        }
    }

    /// Waits (up to `within`) until `n` events (counted from the start of
    /// the stream) satisfy `matches`.
    pub fn wait_for(
        &mut self,
        what: &str,
        n: usize,
        within: Duration,
        matches: impl Fn(&Value) -> bool,
    ) {
        let give_up = Instant::now() + within;
        while self.seen.iter().filter(|e| matches(e)).count() < n {
            let left = give_up.saturating_duration_since(Instant::now());
            if self.next(left).is_none() {
                panic!(
                    "events --follow: fewer than {n} {what} within {within:?}; saw:\n{}",
                    self.table()
                );
            }
        }
    }

    /// The events seen so far, one line each: revision, kind, app, hosts.
    pub fn table(&self) -> String {
        self.seen
            .iter()
            .map(|e| format!("{} {} {} {}\n", e["rev"], e["kind"], e["app"], e["hosts"]))
            .collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
