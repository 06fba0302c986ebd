//! One instance of the daemon: a named guest with its vCPU thread, its port
//! on the shim's switch, its published ports and its console log.
//!
//! Console output goes to a ring buffer of [`LOG_RING`] bytes (`logs NAME`
//! reads it) and to the daemon's stdout, each line prefixed with `[name] `,
//! in bounded lines and at a bounded rate (see [`vmm::console`]).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hostnet::port::GuestPort;
use hostnet::PublishSpec;
use vmm::console::{Dropped, PrefixedConsole};
use vmm::machine::MachineHandle;
use vmm::snapshot::state::GuestSpec;

use api::{InstanceInfo, InstanceState};

/// Bytes of console output kept per instance.
pub const LOG_RING: usize = 256 * 1024;

/// The last [`LOG_RING`] bytes of an instance's console.
#[derive(Default)]
pub struct LogRing {
    buf: VecDeque<u8>,
    /// Bytes pushed since the ring was made (the offset of its end).
    total: u64,
    /// What the daemon's stdout left out of this console.
    pub dropped: Dropped,
}

impl LogRing {
    pub fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let bytes = &bytes[bytes.len().saturating_sub(LOG_RING)..];
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(LOG_RING);
        self.buf.drain(..overflow);
        self.buf.extend(bytes);
    }

    /// The bytes after offset `from` that are still in the ring, and the
    /// offset of the end (for the next call).
    pub fn since(&self, from: u64) -> (Vec<u8>, u64) {
        let start = self.total - self.buf.len() as u64;
        let skip = from.clamp(start, self.total) - start;
        (
            self.buf.iter().skip(skip as usize).copied().collect(),
            self.total,
        )
    }

    pub fn contents(&self) -> Vec<u8> {
        self.buf.iter().copied().collect()
    }
}

/// An instance's console: the ring and the prefixed stdout.
pub struct InstanceConsole {
    ring: Arc<Mutex<LogRing>>,
    stdout: PrefixedConsole<io::Stdout>,
}

impl InstanceConsole {
    pub fn new(name: &str, ring: Arc<Mutex<LogRing>>) -> Self {
        Self {
            ring,
            stdout: PrefixedConsole::new(format!("[{name}] "), io::stdout()),
        }
    }
}

impl Write for InstanceConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(buf);
        // A closed stdout must not break the guest's console (nor a slow
        // one hold the ring's lock).
        let _ = self.stdout.write_all(buf);
        let dropped = self.stdout.dropped();
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).dropped = dropped;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.stdout.flush();
        Ok(())
    }
}

/// Where an instance is in its life.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Running,
    /// Paused for a snapshot or a migration.
    Busy(&'static str),
    /// The guest ended on its own.
    Exited(String),
    /// It was migrated to the daemon at this address; its published ports
    /// stay here and forward to it over the overlay.
    Moved(String),
}

/// A named guest.
pub struct Instance {
    pub name: String,
    pub spec: GuestSpec,
    pub state: State,
    pub handle: Option<Arc<MachineHandle>>,
    pub port: Option<Arc<GuestPort>>,
    pub publish: Vec<PublishSpec>,
    pub log: Arc<Mutex<LogRing>>,
    pub started: Instant,
    /// The app checkpoints the guest hands over (`checkpoint NAME`).
    pub checkpoints: Arc<vmm::checkpoint::Latest>,
}

impl Instance {
    /// An instance with no guest yet (reserved, or about to be filled in).
    pub fn new(name: &str, spec: GuestSpec, state: State) -> Self {
        Self {
            name: name.to_owned(),
            spec,
            state,
            handle: None,
            port: None,
            publish: Vec::new(),
            log: Arc::default(),
            started: Instant::now(),
            checkpoints: Arc::default(),
        }
    }

    pub fn info(&self) -> InstanceInfo {
        let state = match &self.state {
            State::Running => InstanceState::Running,
            State::Busy(what) => InstanceState::Busy {
                what: (*what).to_owned(),
            },
            State::Exited(how) => InstanceState::Exited { how: how.clone() },
            State::Moved(to) => InstanceState::Moved { to: to.clone() },
        };
        InstanceInfo {
            name: self.name.clone(),
            state,
            image: self.spec.image.path.clone(),
            ip: self.spec.nic.map(|n| format!("{}/{}", n.ip, n.prefix)),
            mac: self
                .spec
                .nic
                .map(|n| vmm::devices::virtio::net::fmt_mac(&n.mac)),
            mem: self.spec.mem_size,
            uptime_s: self.started.elapsed().as_secs_f64(),
            generation: self.spec.generation,
            publish: self.publish.iter().map(ToString::to_string).collect(),
            restart: super::restart_records::Restart::Never,
        }
    }

    /// Whether the guest is (still) here and alive.
    pub fn is_live(&self) -> bool {
        matches!(self.state, State::Running | State::Busy(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_bytes() {
        let mut r = LogRing::default();
        r.push(b"hello ");
        r.push(b"world");
        assert_eq!(r.contents(), b"hello world");
        r.push(&vec![b'x'; LOG_RING]);
        assert_eq!(r.contents().len(), LOG_RING);
        assert!(r.contents().iter().all(|&b| b == b'x'));
        r.push(b"end");
        assert!(r.contents().ends_with(b"xend"));
        assert_eq!(r.contents().len(), LOG_RING);
    }

    #[test]
    fn since_returns_what_came_after_an_offset() {
        let mut r = LogRing::default();
        r.push(b"abc");
        let (all, end) = r.since(0);
        assert_eq!((all.as_slice(), end), (&b"abc"[..], 3));
        r.push(b"de");
        assert_eq!(r.since(end), (b"de".to_vec(), 5));
        assert_eq!(r.since(5), (Vec::new(), 5));
        r.push(&vec![b'x'; LOG_RING]);
        let (tail, end) = r.since(2);
        assert_eq!(tail.len(), LOG_RING, "what fell out of the ring is skipped");
        assert_eq!(end, 5 + LOG_RING as u64);
    }
}
