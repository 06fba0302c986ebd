//! The demo's clients: one per region, on one keep-alive RESP connection
//! to its own region's shim for the whole demo, sending requests at the
//! rate the day curve gives its region (open loop: a request's latency is
//! measured from when it was due, so a slow server cannot hide its
//! backlog).
//!
//! Three requests in four are `GET key:N` of a key loaded at the start
//! (the reply must be its value); one in four is `SET w:REGION:N N`, which
//! must survive every later move ([`Client::check_written`]).

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use scheduler::{ClientRegion, SyntheticDay};

/// Keys loaded before the runs.
pub const KEYS: usize = 2000;
/// A reply later than this breaks the client.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// One answered request.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub region: usize,
    /// When the request was due, seconds from the start of the run.
    pub due_s: f64,
    pub latency_ms: f64,
}

impl Sample {
    /// When the reply came, seconds from the start of the run.
    pub fn reply_s(&self) -> f64 {
        self.due_s + self.latency_ms / 1e3
    }
}

/// A region's connection.
pub struct Client {
    pub region: usize,
    name: String,
    w: TcpStream,
    r: BufReader<TcpStream>,
    /// SETs acknowledged so far: `w:REGION:N` = N.
    written: Vec<u64>,
    next: u64,
    /// The first error (the connection is unusable after it).
    pub broken: Option<String>,
}

impl Client {
    pub fn connect(region: usize, name: &str, port: u16) -> Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("connecting to {name}'s shim on port {port}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Self {
            region,
            name: name.to_owned(),
            r: BufReader::new(s.try_clone()?),
            w: s,
            written: Vec::new(),
            next: 0,
            broken: None,
        })
    }

    /// One reply (a reply later than [`REPLY_TIMEOUT`] is an error).
    fn reply(r: &mut BufReader<TcpStream>) -> Result<String> {
        crate::resp::reply(r)
            .with_context(|| format!("waiting up to {} s", REPLY_TIMEOUT.as_secs()))
    }

    /// Sends `cmds` pipelined and checks each reply.
    fn pipeline(&mut self, cmds: &[(Vec<u8>, String)]) -> Result<()> {
        for chunk in cmds.chunks(200) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|(c, _)| c.clone()).collect();
            self.w.write_all(&bytes)?;
            for (_, want) in chunk {
                let got = Self::reply(&mut self.r)?;
                if &got != want {
                    bail!("expected {want:?}, got {got:?}");
                }
            }
        }
        Ok(())
    }

    /// Loads `key:N` = `value-N` for N < [`KEYS`].
    pub fn load_keys(&mut self) -> Result<()> {
        let cmds: Vec<_> = (0..KEYS)
            .map(|i| {
                (
                    crate::resp::encode(&["SET", &format!("key:{i}"), &format!("value-{i}")]),
                    "OK".to_owned(),
                )
            })
            .collect();
        self.pipeline(&cmds).context("loading the keys")
    }

    /// Checks the loaded keys and every SET this client had acknowledged.
    pub fn check_keys(&mut self) -> Result<usize> {
        let mut cmds: Vec<_> = (0..KEYS)
            .map(|i| {
                (
                    crate::resp::encode(&["GET", &format!("key:{i}")]),
                    format!("value-{i}"),
                )
            })
            .collect();
        for n in &self.written {
            cmds.push((
                crate::resp::encode(&["GET", &format!("w:{}:{n}", self.name)]),
                n.to_string(),
            ));
        }
        let count = cmds.len();
        self.pipeline(&cmds)
            .with_context(|| format!("checking the keys through {}'s shim", self.name))?;
        Ok(count)
    }

    /// Sends requests at `day`'s rate for `client` from `start` for
    /// `length`; every answered request goes to `samples`.
    pub fn run(
        &mut self,
        day: &SyntheticDay,
        client: &ClientRegion,
        start: Instant,
        length: Duration,
        samples: &Arc<Mutex<Vec<Sample>>>,
    ) {
        if self.broken.is_some() {
            return;
        }
        let (tx, rx) = mpsc::channel::<(Duration, Option<u64>, String)>();
        let region = self.region;
        let reader = &mut self.r;
        let w = &mut self.w;
        let name = self.name.clone();
        let next_n = &mut self.next;
        let written = &mut self.written;
        let broken = thread::scope(|s| {
            let reading = s.spawn(move || -> Result<()> {
                for (due, set, want) in rx {
                    let got = Client::reply(reader)?;
                    let latency = start.elapsed().saturating_sub(due);
                    if got != want {
                        bail!("expected {want:?}, got {got:?}");
                    }
                    if let Some(n) = set {
                        written.push(n);
                    }
                    samples.lock().unwrap().push(Sample {
                        region,
                        due_s: due.as_secs_f64(),
                        latency_ms: latency.as_secs_f64() * 1e3,
                    });
                }
                Ok(())
            });
            let writing = (|| -> Result<()> {
                let mut due = Duration::ZERO;
                while due < length {
                    let rate = day.client_rate(client, due).max(0.5);
                    let wait = (start + due).saturating_duration_since(Instant::now());
                    thread::sleep(wait);
                    let n = *next_n;
                    *next_n += 1;
                    let (cmd, set, want) = if n.is_multiple_of(4) {
                        let key = format!("w:{name}:{n}");
                        (
                            crate::resp::encode(&["SET", &key, &n.to_string()]),
                            Some(n),
                            "OK".to_owned(),
                        )
                    } else {
                        let i = (n as usize * 7919) % KEYS;
                        (
                            crate::resp::encode(&["GET", &format!("key:{i}")]),
                            None,
                            format!("value-{i}"),
                        )
                    };
                    w.write_all(&cmd)?;
                    if tx.send((due, set, want)).is_err() {
                        break; // the reader failed: its error says why
                    }
                    due += Duration::from_secs_f64(1.0 / rate);
                }
                Ok(())
            })();
            drop(tx);
            let read = reading
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the reader panicked")));
            writing.and(read).err()
        });
        if let Some(e) = broken {
            self.broken = Some(format!("{e:#}"));
        }
    }
}
