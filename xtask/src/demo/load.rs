//! The demo's clients: one per region, on one keep-alive RESP connection
//! to its own region's shim for the whole demo, sending requests at the
//! rate the day curve gives its region (open loop: a request's latency is
//! measured from when it was due, so a slow server cannot hide its
//! backlog).
//!
//! Three requests in four are `GET key:N` of a key loaded at the start
//! (the reply must be its value); one in four is `SET w:REGION:N N`, which
//! must survive every later move ([`Client::check_written`]).

use std::io::{BufRead, BufReader, Read, Write};
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
    pub latency_ms: f64,
}

/// The RESP encoding of a command.
pub fn resp(args: &[&str]) -> Vec<u8> {
    let mut b = format!("*{}\r\n", args.len());
    for a in args {
        b.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    b.into_bytes()
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

    /// One reply: simple strings, integers and bulk strings as text, nil as `(nil)`.
    fn reply(r: &mut BufReader<TcpStream>) -> Result<String> {
        let mut line = String::new();
        let timed_out = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow::anyhow!(
                "no reply within {} s (the app or this host stalled)",
                REPLY_TIMEOUT.as_secs()
            ),
            _ => e.into(),
        };
        if r.read_line(&mut line).map_err(timed_out)? == 0 {
            bail!("the server closed the connection");
        }
        let line = line.trim_end();
        match line.as_bytes().first() {
            Some(b'+' | b':') => Ok(line[1..].to_owned()),
            Some(b'-') => bail!("error reply: {}", &line[1..]),
            Some(b'$') => {
                let n: i64 = line[1..].parse().context("bad bulk length")?;
                if n < 0 {
                    return Ok("(nil)".into());
                }
                let mut buf = vec![0u8; n as usize + 2];
                r.read_exact(&mut buf).map_err(timed_out)?;
                Ok(String::from_utf8_lossy(&buf[..n as usize]).into_owned())
            }
            _ => bail!("unexpected reply {line:?}"),
        }
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
                    resp(&["SET", &format!("key:{i}"), &format!("value-{i}")]),
                    "OK".to_owned(),
                )
            })
            .collect();
        self.pipeline(&cmds).context("loading the keys")
    }

    /// Checks the loaded keys and every SET this client had acknowledged.
    pub fn check_keys(&mut self) -> Result<usize> {
        let mut cmds: Vec<_> = (0..KEYS)
            .map(|i| (resp(&["GET", &format!("key:{i}")]), format!("value-{i}")))
            .collect();
        for n in &self.written {
            cmds.push((
                resp(&["GET", &format!("w:{}:{n}", self.name)]),
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
                            resp(&["SET", &key, &n.to_string()]),
                            Some(n),
                            "OK".to_owned(),
                        )
                    } else {
                        let i = (n as usize * 7919) % KEYS;
                        (
                            resp(&["GET", &format!("key:{i}")]),
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
