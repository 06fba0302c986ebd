//! The sending side: moves a running instance of this daemon to another.
//!
//! 1. Handshake: [`Hello`] out, `Accept` (or `Refuse`, which ends it) back.
//! 2. Round 0 sends the pages written since the VM was created (KVM's dirty
//!    log OR'ed with the shim's own writes; all-zero pages are skipped: the
//!    destination's memory starts zeroed). Pre-copy rounds then send what
//!    was dirtied meanwhile, while the guest keeps running, until the dirty
//!    set is small ([`CONVERGED_PAGES`]), stops shrinking, or
//!    [`MAX_ROUNDS`] is reached.
//!    Then `Sync`: the destination answers `Synced` once it has taken in
//!    everything sent so far, so the pause does not wait for its backlog.
//! 3. Stop-and-copy: the guest is paused (vCPU quiesced, devices idle), the
//!    last dirty pages and the vCPU, clock and device state are sent; the
//!    destination checks and restores them and answers `Ready`.
//! 4. Commit: from here this side never resumes the guest unless the
//!    destination says it will not run it; `Commit` goes, and `Committed`
//!    (or the answer to a `Query`) says the guest runs there. Only then is
//!    the instance dropped here; its published ports stay and reach it over
//!    the overlay. The step table, with what each side does on a failure at
//!    each step, is in [`crate::protocol`].
//!
//! Every step has a deadline ([`PRECOPY_DEADLINE`], [`PAUSED_DEADLINE`],
//! [`COMMITTED_WAIT`]) on top of the stream's per-call timeouts, and
//! `stop NAME` cancels a migration before its `Commit` ([`Migrations`]):
//! the guest resumes here (and is then stopped), the destination discards.
//!
//! Free-page hints (on unless the daemon runs with `--no-free-page-hints`,
//! see [`HeapHints`]): a guest that publishes per-page usage of its heap in
//! its `BootInfo` has the heap pages that hold no live data dropped from
//! each round's send set.
//!
//! Progress goes to the caller as it happens, one JSON [`MigrationEvent`] a
//! line; the last is `done` or `failed` (with the phase it failed in).
//!
//! [`Migrations`]: crate::Migrations

use std::io::BufReader;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use abi::boot::{heap_page_is_free, BootInfo};
use abi::layout::BOOT_INFO_ADDR;
use api::tls::Stream;
use api::{Client, ClientError, MigrateRequest, MigrationEvent, MigrationReport};
use vm_memory::{Bytes, GuestAddress};
use vmm::machine::{Machine, MachineHandle};
use vmm::snapshot::format::{is_zero, FORMAT_VERSION, PAGE};
use vmm::snapshot::state::GuestSpec;
use vmm::vstate::vm::{pages_of, Vm};
use zerocopy::FromBytes;

use crate::faults::{Injected, Step};
use crate::protocol::{
    encode_pages, Accept, Ack, Conn, Hello, Kind, ProtocolError, IO_TIMEOUT, MIGRATION_PROTOCOL,
    PAGES_PER_MESSAGE, PROTOCOL_VERSION,
};
use crate::{MigrationContext, MigrationError, Source};

/// Pre-copy stops when a round leaves at most this many dirty pages.
pub const CONVERGED_PAGES: usize = 64;
/// Pre-copy rounds at most (round 0 included).
pub const MAX_ROUNDS: usize = 8;
/// The handshake and pre-copy together, at most.
pub const PRECOPY_DEADLINE: Duration = Duration::from_secs(120);
/// How long the destination may take to accept (it creates the VM:
/// `KVM_CREATE_VM` took 4–10 s now and then on a loaded nested host).
pub const ACCEPT_WAIT: Duration = Duration::from_secs(30);
/// From the pause to `Ready`, at most (the guest is paused meanwhile).
pub const PAUSED_DEADLINE: Duration = Duration::from_secs(15);
/// How long `Committed` may take before the destination is asked.
pub const COMMITTED_WAIT: Duration = Duration::from_secs(10);
/// How often a destination that did not answer is asked again.
const QUERY_RETRY: Duration = Duration::from_secs(1);

/// What a migration did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub rounds: usize,
    pub pages: u64,
    pub bytes: u64,
    pub downtime: Duration,
    pub total: Duration,
    /// Dirty heap pages left behind because the guest said they were free;
    /// `None` when no hints were used.
    pub skipped: Option<u64>,
    /// The guest's memory size.
    pub mem: u64,
}

struct Sent {
    pages: u64,
    bytes: u64,
}

/// Moves instance `name` of the daemon `cx` describes (`host`) to the
/// daemon `req.to`, writing progress events to `out` as JSON lines; the
/// last one is `done` or `failed`.
pub fn migrate(
    cx: &MigrationContext<'_>,
    host: &impl Source,
    name: &str,
    req: &MigrateRequest,
    out: &Sender<String>,
) {
    let say = |event: MigrationEvent| {
        let _ = out.send(serde_json::to_string(&event).expect("serializable"));
    };
    let result = host
        .peer_client(&req.to, req.fingerprint.as_deref())
        .map_err(|e| MigrationError::Connect(format!("{e}; {name} keeps running here")))
        .and_then(|client| run(cx, host, name, &client.with_timeout(IO_TIMEOUT), &say));
    match result {
        Ok(s) => say(MigrationEvent::Done(MigrationReport {
            name: name.to_owned(),
            to: req.to.clone(),
            downtime_ms: s.downtime.as_secs_f64() * 1e3,
            total_ms: s.total.as_secs_f64() * 1e3,
            bytes: s.bytes,
            pages: s.pages,
            mem: s.mem,
            rounds: s.rounds,
            skipped: s.skipped,
        })),
        Err(e) => say(MigrationEvent::Failed {
            phase: e.phase(),
            error: e.to_string(),
        }),
    }
}

/// Waits until the destination has taken in everything sent so far.
fn sync(conn: &mut Conn) -> Result<(), ProtocolError> {
    conn.send_now(Kind::Sync, &[])?;
    match conn.recv()? {
        m if m.kind == Kind::Synced => Ok(()),
        m => Err(ProtocolError::Unexpected(m.kind)),
    }
}

/// A migration connection over an upgraded API connection.
pub(crate) fn conn_of(stream: BufReader<Stream>, fault: Option<Injected>) -> std::io::Result<Conn> {
    let sock = stream.get_ref().tcp().try_clone()?;
    Conn::new(stream, sock, fault)
}

/// The migration itself (to `client`'s daemon); an error has already
/// resumed the guest (or, if `stop` cancelled it, let it go).
pub fn run(
    cx: &MigrationContext<'_>,
    host: &impl Source,
    name: &str,
    client: &Client,
    say: &dyn Fn(MigrationEvent),
) -> Result<Stats, MigrationError> {
    let (handle, spec) = host.acquire(name).map_err(MigrationError::Connect)?;
    cx.migrations.start_outgoing(name);
    let result = Outgoing {
        cx,
        host,
        name,
        client,
        handle: &handle,
        start: Instant::now(),
        marks: Vec::new(),
    }
    .run(&spec, say);
    cx.migrations.end_outgoing(name);
    result
}

/// What the destination said about a migration whose `Committed` did not
/// come.
enum Settled {
    /// The guest runs there.
    Started,
    /// It does not, and never will.
    NotStarted(String),
    /// `stop` gave up waiting.
    Cancelled,
}

/// An outgoing migration, phase by phase.
struct Outgoing<'a, S: Source> {
    cx: &'a MigrationContext<'a>,
    host: &'a S,
    name: &'a str,
    client: &'a Client,
    handle: &'a Arc<MachineHandle>,
    start: Instant,
    /// When each step ended, for the timeline event.
    marks: Vec<(String, Duration)>,
}

/// What the handshake settled.
struct Connected {
    conn: Conn,
    migration_id: u64,
    accept: Accept,
}

/// What pre-copy left for the pause.
struct Precopied {
    vm: Arc<Vm>,
    hints: Option<HeapHints>,
    hints_took: Duration,
}

/// The guest paused, its state at the destination and `Ready`.
struct Paused {
    machine: Box<Machine>,
    paused_at: SystemTime,
    paused: Instant,
    /// Frames that were waiting for the guest and went with its state.
    carried: usize,
}

impl<S: Source> Outgoing<'_, S> {
    fn mark(&mut self, what: impl Into<String>) {
        self.marks.push((what.into(), self.start.elapsed()));
    }

    fn to(&self) -> &str {
        self.client.addr.as_str()
    }

    /// Ends a migration that failed before the pause: the guest keeps
    /// running here.
    fn fail(&self, why: String) -> String {
        self.host.release(self.name);
        if self.cx.migrations.cancelled(self.name) {
            return format!("cancelled by stop ({why})");
        }
        format!("{why}; {} keeps running here", self.name)
    }

    /// Ends a migration that failed after the pause, before the guest may
    /// have been taken over: it resumes here.
    fn resume(&self, machine: Box<Machine>, why: String) -> String {
        self.handle.resume(machine);
        self.host.release(self.name);
        if self.cx.migrations.cancelled(self.name) {
            return format!("cancelled by stop ({why})");
        }
        format!("{why}; {} resumed on {}", self.name, self.cx.local.name)
    }

    fn run(
        mut self,
        spec: &GuestSpec,
        say: &dyn Fn(MigrationEvent),
    ) -> Result<Stats, MigrationError> {
        let mut connected = self.connect(spec, say).map_err(MigrationError::Connect)?;
        let mut stats = Stats {
            mem: spec.mem_size,
            ..Stats::default()
        };
        let pre = self
            .precopy(&mut connected.conn, &mut stats, say)
            .map_err(MigrationError::Precopy)?;
        let paused = self
            .pause(&mut connected.conn, &pre, &mut stats, say)
            .map_err(MigrationError::Paused)?;
        let ack = self
            .commit(&mut connected, paused.machine, say)
            .map_err(MigrationError::Commit)?;
        self.mark("committed");
        connected.conn.at(Step::Committed, "source");
        stats.downtime = match ack {
            Some(ack) => {
                let resumed = UNIX_EPOCH + Duration::from_nanos(ack.resumed_unix_ns);
                resumed
                    .duration_since(paused.paused_at)
                    .unwrap_or_else(|_| paused.paused.elapsed())
            }
            None => paused.paused.elapsed(),
        };
        stats.total = self.start.elapsed();
        self.hand_over(&connected.accept, paused.carried, &stats, ack, &pre, say);
        Ok(stats)
    }

    /// Phase 1: Handshake: `Hello` out, `Accept` back (`Refuse` ends it).
    fn connect(
        &mut self,
        spec: &GuestSpec,
        say: &dyn Fn(MigrationEvent),
    ) -> Result<Connected, String> {
        let (cx, host, name) = (self.cx, self.host, self.name);
        let to = self.to().to_owned();
        let local = &cx.local;
        let reader = self
            .client
            .migration_stream(MIGRATION_PROTOCOL)
            .map_err(|e| self.fail(e.to_string()))?;
        self.mark("connected");
        let mut conn = conn_of(reader, cx.config.fault)
            .map_err(|e| self.fail(format!("the connection to {to}: {e}")))?;
        let sock = conn
            .handle()
            .map_err(|e| self.fail(format!("the connection to {to}: {e}")))?;
        if !cx.migrations.outgoing_conn(name, sock) {
            return Err(self.fail("stopped before it began".into()));
        }
        conn.deadline(PRECOPY_DEADLINE);
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id).map_err(|e| self.fail(e.to_string()))?;
        let migration_id = u64::from_le_bytes(id);
        let record = carried_record(host, self.client, name, &spec.image);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            format_version: FORMAT_VERSION,
            abi_version: abi::ABI_VERSION,
            migration_id,
            name: name.to_owned(),
            mem_size: spec.mem_size,
            cpuid: spec.cpuid.clone(),
            nic: spec.nic,
            image: spec.image.clone(),
            source: local.name.clone(),
            source_overlay: cx.overlay,
            source_api: Some(local.api),
            record,
        };
        let accept: Accept = (|| {
            conn.send_value(Kind::Hello, &hello)?;
            conn.flush()?;
            conn.read_timeout(ACCEPT_WAIT)?;
            let m = conn.recv()?;
            conn.read_timeout(IO_TIMEOUT)?;
            match m.kind {
                Kind::Accept => m.value::<Accept>(),
                Kind::Refuse => Err(ProtocolError::Malformed(format!("refused: {}", m.text()))),
                other => Err(ProtocolError::Unexpected(other)),
            }
        })()
        .map_err(|e| {
            self.fail(format!(
                "the destination {to} did not take {name}: {}",
                refusal(e)
            ))
        })?;
        self.mark(format!(
            "accepted (there: checks {:.1}, VM {:.1})",
            accept.checks_us as f64 / 1e3,
            accept.vm_us as f64 / 1e3
        ));
        if let Some(peer) = accept.overlay {
            host.add_overlay_peer(peer);
        }
        say(MigrationEvent::Started {
            name: name.to_owned(),
            mem: spec.mem_size,
            from: local.name.clone(),
            to_name: accept.name.clone(),
            to: to.clone(),
            region: accept.region.clone(),
        });
        Ok(Connected {
            conn,
            migration_id,
            accept,
        })
    }

    /// Phase 2: Pre-copy rounds while the guest runs, until the dirty set is
    /// small or stops shrinking; then the destination must have taken in
    /// everything sent (`Sync`: over TLS it may lag behind, decrypting),
    /// else the pause would wait for it. What the guest dirtied during that
    /// wait goes in one more round, synced again, so the paused round holds
    /// only what the guest wrote since: over TLS, where the first wait is
    /// longest, this is most of the stop-and-copy's pages.
    fn precopy(
        &mut self,
        conn: &mut Conn,
        stats: &mut Stats,
        say: &dyn Fn(MigrationEvent),
    ) -> Result<Precopied, String> {
        let (cx, name) = (self.cx, self.name);
        let to = self.to().to_owned();
        let vm = Arc::clone(self.handle.vm());
        let mut last_dirty = usize::MAX;
        let hints = if cx.config.free_page_hints {
            HeapHints::of(&vm)
        } else {
            None
        };
        if hints.is_some() {
            stats.skipped = Some(0);
        }
        let mut round = 0;
        let mut catch_up = false;
        let mut hints_took = Duration::ZERO;
        loop {
            if cx.migrations.cancelled(name) {
                let _ = conn.send_now(Kind::Abort, b"stopped at the source");
                return Err(self.fail(format!("stopped in round {round}")));
            }
            let mut dirty = match vm.take_dirty() {
                Ok(d) => pages_of(&d),
                Err(e) => return Err(self.fail(format!("dirty log: {e}"))),
            };
            let count = dirty.len();
            // After take_dirty, never before: see HeapHints.
            let hinting = Instant::now();
            let skipped = hints.as_ref().map(|h| h.drop_free(&vm, &mut dirty));
            hints_took += hinting.elapsed();
            add_skipped(&mut stats.skipped, skipped);
            let sent = send_pages(conn, &vm, &dirty, round == 0).map_err(|e| {
                self.fail(format!(
                    "sending memory to {to} failed in round {round}: {e}"
                ))
            })?;
            self.mark(format!("round {round}"));
            stats.rounds = round + 1;
            stats.pages += sent.pages;
            stats.bytes += sent.bytes;
            say(MigrationEvent::Round {
                round,
                dirty: count as u64,
                pages: sent.pages,
                bytes: sent.bytes,
                catch_up,
                skipped,
            });
            let converged = round > 0 && (count <= CONVERGED_PAGES || count >= last_dirty);
            last_dirty = count;
            round += 1;
            if catch_up || converged || round == MAX_ROUNDS {
                if !catch_up {
                    conn.at(Step::Precopy, "source");
                }
                sync(conn)
                    .map_err(|e| self.fail(format!("the destination {to} did not keep up: {e}")))?;
                self.mark("synced");
                if catch_up {
                    break;
                }
                catch_up = true;
            }
        }
        Ok(Precopied {
            vm,
            hints,
            hints_took,
        })
    }

    /// Phase 3: Stop and copy: the guest paused, its last pages and state sent,
    /// until the destination is `Ready` (on a failure the guest resumes).
    fn pause(
        &mut self,
        conn: &mut Conn,
        pre: &Precopied,
        stats: &mut Stats,
        say: &dyn Fn(MigrationEvent),
    ) -> Result<Paused, String> {
        let name = self.name;
        let to = self.to().to_owned();
        let machine = self
            .handle
            .pause()
            .map_err(|e| self.fail(format!("cannot pause {name}: {e}")))?;
        let paused_at = SystemTime::now();
        let paused = Instant::now();
        self.mark("paused");
        conn.deadline(PAUSED_DEADLINE);
        let vm = &pre.vm;
        let final_round = (|| -> Result<(Sent, usize, usize, Option<u64>), String> {
            let mut dirty = pages_of(&vm.take_dirty().map_err(|e| e.to_string())?);
            let count = dirty.len();
            let skipped = pre.hints.as_ref().map(|h| h.drop_free(vm, &mut dirty));
            let sent = send_pages(conn, vm, &dirty, false).map_err(|e| e.to_string())?;
            let state = machine
                .capture(self.cx.hypervisor)
                .map_err(|e| e.to_string())?;
            // Frames that were waiting for the guest go with its state.
            let carried = state
                .devices
                .net
                .iter()
                .map(|n| n.device.pending_rx.len())
                .sum::<usize>();
            let bytes = postcard::to_stdvec(&state).map_err(|e| e.to_string())?;
            conn.at(Step::Paused, "source");
            conn.send_now(Kind::State, &bytes)
                .map_err(|e| e.to_string())?;
            Ok((
                Sent {
                    pages: sent.pages,
                    bytes: sent.bytes + bytes.len() as u64 + 9,
                },
                count,
                carried,
                skipped,
            ))
        })();
        let (sent, final_dirty, carried, skipped) = match final_round {
            Ok(x) => x,
            Err(e) => {
                return Err(self.resume(
                    machine,
                    format!("sending the final state to {to} failed: {e}"),
                ))
            }
        };
        stats.pages += sent.pages;
        stats.bytes += sent.bytes;
        add_skipped(&mut stats.skipped, skipped);
        say(MigrationEvent::Paused {
            dirty: final_dirty as u64,
            bytes: sent.bytes,
            skipped,
        });
        match conn.recv() {
            Ok(m) if m.kind == Kind::Ready => self.mark("ready"),
            Ok(m) if m.kind == Kind::Failed => {
                return Err(self.resume(
                    machine,
                    format!(
                        "the destination {to} could not restore {name}: {}",
                        m.text()
                    ),
                ))
            }
            Ok(m) => {
                let _ = conn.send_now(Kind::Abort, b"expected Ready");
                return Err(self.resume(machine, format!("{to} sent {:?}, not Ready", m.kind)));
            }
            Err(e) => {
                conn.cut();
                return Err(self.resume(machine, format!("{to} was not ready: {e}")));
            }
        }
        Ok(Paused {
            machine,
            paused_at,
            paused,
            carried,
        })
    }

    /// Phase 4: Commit: past this point the guest resumes here only if the
    /// destination says it will not run it. `Ok` once it runs there (with
    /// the destination's `Ack`, unless it was learnt by asking).
    fn commit(
        &self,
        c: &mut Connected,
        machine: Box<Machine>,
        say: &dyn Fn(MigrationEvent),
    ) -> Result<Option<Ack>, String> {
        let (host, name) = (self.host, self.name);
        let to = self.to();
        let conn = &mut c.conn;
        if !self.cx.migrations.commit_point(name) {
            let _ = conn.send_now(Kind::Abort, b"stopped at the source");
            return Err(self.resume(machine, "stopped before the commit".into()));
        }
        conn.at(Step::Ready, "source");
        let reply = match conn.send_now(Kind::Commit, &[]) {
            Err(e) => Err(format!("sending Commit failed: {e}")),
            Ok(()) => {
                conn.at(Step::Commit, "source");
                conn.deadline(COMMITTED_WAIT);
                match conn.recv() {
                    Ok(m) if m.kind == Kind::Committed => m.value::<Ack>().map(Ok),
                    // The destination decided (aborted) and says so: final.
                    Ok(m) if m.kind == Kind::Failed => Ok(Err(m.text())),
                    Ok(m) => Err(ProtocolError::Unexpected(m.kind)),
                    Err(e) => Err(e),
                }
                .map_err(|e| format!("no Committed from {to}: {e}"))
            }
        };
        match reply {
            Ok(Ok(ack)) => Ok(Some(ack)),
            Ok(Err(failed)) => Err(self.resume(
                machine,
                format!("the destination {to} could not start {name}: {failed}"),
            )),
            Err(why) => {
                say(MigrationEvent::Note {
                    message: format!(
                        "{why}; asking {to} whether {name} runs there ({name} stays paused \
                         here until it answers)"
                    ),
                });
                match self.settle(c.migration_id) {
                    Settled::Started => Ok(None),
                    Settled::NotStarted(answer) => {
                        Err(self.resume(machine, format!("{why}; {answer}")))
                    }
                    Settled::Cancelled => {
                        drop(machine);
                        self.handle.stop();
                        host.release(name);
                        Err(format!(
                            "{why}; stopped while waiting to learn whether {to} runs {name}: \
                             {name} no longer runs here"
                        ))
                    }
                }
            }
        }
    }

    /// Phase 5: The guest runs there now: let it go here and report.
    fn hand_over(
        &self,
        accept: &Accept,
        carried: usize,
        stats: &Stats,
        ack: Option<Ack>,
        pre: &Precopied,
        say: &dyn Fn(MigrationEvent),
    ) {
        let name = self.name;
        self.host
            .moved_away(name, self.to(), accept.overlay, carried);
        say(MigrationEvent::Running {
            name: name.to_owned(),
            on: accept.name.clone(),
            downtime_ms: stats.downtime.as_secs_f64() * 1e3,
            restore_ms: ack.map(|a| a.restore_us as f64 / 1e3),
        });
        say(MigrationEvent::Timeline {
            marks: self
                .marks
                .iter()
                .map(|(what, at)| (what.clone(), at.as_secs_f64() * 1e3))
                .collect(),
            hints_ms: pre.hints_took.as_secs_f64() * 1e3,
        });
    }

    /// Asks the destination, on fresh connections, whether it started the
    /// guest, until it answers (its answer is final: asking settles a
    /// pending migration as aborted), its daemon is gone, or `stop`.
    fn settle(&self, id: u64) -> Settled {
        let (host, name, to) = (self.host, self.name, self.to());
        let mut in_doubt = false;
        loop {
            match ask(self.client, id) {
                Ok(true) => return Settled::Started,
                Ok(false) => {
                    return Settled::NotStarted(format!("{to} says it did not start {name}"))
                }
                Err(e) if gone(&e) => {
                    return Settled::NotStarted(format!(
                        "{to} is gone ({e}), and any copy it ran with it"
                    ))
                }
                Err(e) => {
                    if !in_doubt {
                        tracing::warn!(instance = name, %to, error = %e, "migration in doubt, asking again");
                        host.in_doubt(name);
                        in_doubt = true;
                    }
                }
            }
            if self.cx.migrations.cancelled(name) {
                return Settled::Cancelled;
            }
            std::thread::sleep(QUERY_RETRY);
        }
    }
}

/// `Query`: whether the destination started migration `id`.
/// Largest image copied to the destination with a restart record.
const MAX_CARRIED_IMAGE: u64 = 256 << 20;

/// `name`'s restart record, if it has one, with its image copied to the
/// destination's store first (unless there already), the copy whole within
/// [`api::upload_deadline`] of its size and the question within
/// [`api::UPLOAD_FLOOR`]. `None`, with a warning, if
/// that copy fails: the app then moves but does not come back after a
/// restart of the destination's daemon.
fn carried_record(
    host: &impl Source,
    to: &Client,
    name: &str,
    image: &vmm::snapshot::state::ImageId,
) -> Option<api::RunRequest> {
    let (mut record, file) = host.restart_record(name)?;
    let copied = (|| {
        let asked = to.clone().with_deadline(api::UPLOAD_FLOOR);
        if asked.image::<serde::de::IgnoredAny>(&image.sha256).is_ok() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::fs::File::open(&file)?, MAX_CARRIED_IMAGE + 1),
            &mut bytes,
        )?;
        if bytes.len() as u64 > MAX_CARRIED_IMAGE {
            return Err(std::io::Error::other("the image is too large to copy"));
        }
        to.put_image::<serde::de::IgnoredAny>(&image.sha256, &bytes, |_| {})
            .map(drop)
            .map_err(std::io::Error::other)
    })();
    match copied {
        Ok(()) => {
            record.image = format!("sha256:{}", image.sha256);
            Some(record)
        }
        Err(e) => {
            tracing::warn!(
                instance = name,
                to = %to.addr,
                error = %e,
                "cannot copy the image: the app will not come back after a restart there"
            );
            None
        }
    }
}

fn ask(client: &Client, id: u64) -> Result<bool, ClientError> {
    let reader = client.migration_stream(MIGRATION_PROTOCOL)?;
    let protocol = |e: ProtocolError| ClientError::Protocol {
        addr: client.addr.clone(),
        detail: e.to_string(),
    };
    let mut conn = conn_of(reader, None).map_err(|e| protocol(e.into()))?;
    conn.deadline(IO_TIMEOUT);
    conn.send_now(Kind::Query, &id.to_le_bytes())
        .map_err(|e| protocol(e.into()))?;
    let m = conn.recv().map_err(protocol)?;
    match (m.kind, m.payload.as_slice()) {
        (Kind::Outcome, [started]) => Ok(*started == 1),
        (kind, _) => Err(protocol(ProtocolError::Unexpected(kind))),
    }
}

/// Whether the daemon at the other end is gone (nothing listens there).
fn gone(e: &ClientError) -> bool {
    matches!(e, ClientError::Connect { err, .. } if err.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// `, N free pages skipped`, or nothing without hints.
fn add_skipped(total: &mut Option<u64>, round: Option<u64>) {
    if let (Some(t), Some(n)) = (total.as_mut(), round) {
        *t += n;
    }
}

/// Where the guest's heap and its per-page usage are (`BootInfo::heap_start`,
/// `heap_pages`, `page_use_addr`), checked against guest memory.
///
/// Heap page `i` is left out of a round when `abi::boot::heap_page_is_free`
/// says so (`i >= 1` and pages `i - 1` and `i` hold no live bytes: the
/// allocator's free-list header after a live block lies in the block's last
/// page or the next one). Only pages inside the heap are ever dropped, and
/// never those holding the usage array itself.
///
/// Why leaving them behind is meant to be safe: the array is read after
/// each round's dirty log was taken, so a page skipped while free that the
/// guest later allocates and writes is dirty again and goes in a later
/// round; the final round reads the array with the vCPU paused; a page freed
/// after it was sent leaves harmless stale bytes on the destination.
///
/// That argument needs the array to agree with the allocator's free list
/// whenever the host trusts it, and the guest (kernel/src/heap.rs) updates
/// the two at different instants (a free-list header is written when a
/// block is carved, its bytes are counted just after). So the guest keeps a
/// seqlock, `BootInfo::page_use_seq`, odd while it allocates or frees; the
/// host reads it before and after the array and drops nothing in a round in
/// which it was odd or moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapHints {
    /// Page number of the heap's first page.
    first: u64,
    pages: u64,
    use_addr: u64,
}

impl HeapHints {
    /// The guest's hints, or `None` when it publishes none or they make no
    /// sense (then with a warning).
    fn of(vm: &Vm) -> Option<Self> {
        let mut raw = [0u8; std::mem::size_of::<BootInfo>()];
        if let Err(e) = vm
            .memory()
            .read_slice(&mut raw, GuestAddress(BOOT_INFO_ADDR))
        {
            tracing::warn!(error = %e, "free-page hints unused: cannot read the BootInfo");
            return None;
        }
        let info = BootInfo::read_from_bytes(&raw).ok()?;
        match Self::check(&info, vm.mem_size()) {
            Ok(hints) => hints,
            Err(why) => {
                tracing::warn!(reason = %why, "free-page hints unused");
                None
            }
        }
    }

    /// Validates the three fields against `mem_size` bytes of guest RAM.
    fn check(info: &BootInfo, mem_size: u64) -> Result<Option<Self>, String> {
        let (start, pages, use_addr) = (info.heap_start, info.heap_pages, info.page_use_addr);
        if start == 0 && pages == 0 && use_addr == 0 {
            return Ok(None);
        }
        let page = PAGE as u64;
        let heap_end = pages
            .checked_mul(page)
            .and_then(|len| start.checked_add(len))
            .filter(|&end| end <= mem_size);
        let use_end = pages
            .checked_mul(2)
            .and_then(|len| use_addr.checked_add(len))
            .filter(|&end| end <= mem_size);
        if start % page != 0 || pages == 0 || heap_end.is_none() || use_end.is_none() {
            return Err(format!(
                "heap_start {start:#x}, heap_pages {pages}, page_use_addr {use_addr:#x} \
                 do not fit {mem_size:#x} bytes of guest memory"
            ));
        }
        Ok(Some(Self {
            first: start / page,
            pages,
            use_addr,
        }))
    }

    /// Reads the usage array now and removes the pages it allows from
    /// `dirty`; returns how many. Any read error keeps every page.
    fn drop_free(&self, vm: &Vm, dirty: &mut Vec<u32>) -> u64 {
        // A seqlock: the array is only trusted if the allocator was not in
        // the middle of a change (odd) and made none while it was read. A
        // running guest finishes its change within microseconds, so retry a
        // little; a guest paused mid-change keeps every page this round.
        const TRIES: usize = 50;
        let seq_addr =
            GuestAddress(BOOT_INFO_ADDR + std::mem::offset_of!(BootInfo, page_use_seq) as u64);
        let seq = || vm.memory().read_obj::<u64>(seq_addr).ok();
        let mut raw = vec![0u8; self.pages as usize * 2];
        let mut consistent = false;
        for _ in 0..TRIES {
            let before = seq();
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            if let Err(e) = vm
                .memory()
                .read_slice(&mut raw, GuestAddress(self.use_addr))
            {
                tracing::warn!(error = %e, "free-page hints unused this round");
                return 0;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            if matches!((before, seq()), (Some(a), Some(b)) if a == b && a % 2 == 0) {
                consistent = true;
                break;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        if !consistent {
            tracing::info!("free-page hints unused this round: the guest was changing its heap");
            return 0;
        }
        let usage: Vec<u16> = raw
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        self.retain(&usage, dirty)
    }

    /// Keeps the pages of `dirty` that must go, given per-page `usage`.
    fn retain(&self, usage: &[u16], dirty: &mut Vec<u32>) -> u64 {
        let page = PAGE as u64;
        // The pages holding the array itself always go.
        let table_first = self.use_addr / page;
        let table_last = (self.use_addr + self.pages * 2 - 1) / page;
        let before = dirty.len();
        dirty.retain(|&p| {
            let p = u64::from(p);
            let Some(i) = p.checked_sub(self.first).filter(|&i| i < self.pages) else {
                return true;
            };
            (table_first..=table_last).contains(&p) || !heap_page_is_free(usage, i as usize)
        });
        (before - dirty.len()) as u64
    }
}

/// The reason in a refusal or protocol error.
fn refusal(e: ProtocolError) -> String {
    match e {
        ProtocolError::Malformed(m) if m.starts_with("refused: ") => {
            m.trim_start_matches("refused: ").to_owned()
        }
        other => other.to_string(),
    }
}

/// Sends `pages` of `vm`: non-zero ones with their data, zero ones as a
/// list (or not at all in round 0, when the destination is all zero).
fn send_pages(conn: &mut Conn, vm: &Vm, pages: &[u32], first: bool) -> std::io::Result<Sent> {
    let mem = vm.memory();
    let mut data = Vec::with_capacity(PAGES_PER_MESSAGE * PAGE);
    let mut indices = Vec::with_capacity(PAGES_PER_MESSAGE);
    let mut zeroes = Vec::new();
    let mut sent = Sent { pages: 0, bytes: 0 };
    let mut page = vec![0u8; PAGE];
    let flush = |conn: &mut Conn, indices: &mut Vec<u32>, data: &mut Vec<u8>, sent: &mut Sent| {
        if indices.is_empty() {
            return Ok(());
        }
        let msg = encode_pages(indices, data);
        conn.send(Kind::Pages, &msg)?;
        sent.pages += indices.len() as u64;
        sent.bytes += msg.len() as u64 + 5;
        indices.clear();
        data.clear();
        Ok::<(), std::io::Error>(())
    };
    for &index in pages {
        mem.read_slice(&mut page, GuestAddress(u64::from(index) * PAGE as u64))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if is_zero(&page) {
            if !first {
                zeroes.push(index);
            }
            continue;
        }
        indices.push(index);
        data.extend_from_slice(&page);
        if indices.len() == PAGES_PER_MESSAGE {
            flush(conn, &mut indices, &mut data, &mut sent)?;
        }
    }
    flush(conn, &mut indices, &mut data, &mut sent)?;
    for chunk in zeroes.chunks(4096) {
        let msg = encode_pages(chunk, &[]);
        conn.send(Kind::Zeroes, &msg)?;
        sent.pages += chunk.len() as u64;
        sent.bytes += msg.len() as u64 + 5;
    }
    conn.flush()?;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(start: u64, pages: u64, use_addr: u64) -> BootInfo {
        BootInfo {
            heap_start: start,
            heap_pages: pages,
            page_use_addr: use_addr,
            ..BootInfo::default()
        }
    }

    #[test]
    fn free_heap_pages_are_dropped_by_the_rule() {
        // Heap = pages 16..24; the array lies in page 30 (outside the heap).
        let hints = HeapHints::check(&info(16 * 4096, 8, 30 * 4096), 64 * 4096)
            .unwrap()
            .unwrap();
        let usage = [0u16, 0, 0, 12, 0, 0, 4096, 0];
        let mut dirty: Vec<u32> = (0..40).collect();
        assert_eq!(hints.retain(&usage, &mut dirty), 3);
        // Heap pages 1, 2 and 5 go; page 0 (i = 0), 4 and 7 (after used
        // pages) and everything outside the heap stay.
        let dropped: Vec<u32> = (0..40).filter(|p| !dirty.contains(p)).collect();
        assert_eq!(dropped, [17, 18, 21]);

        // The array's own pages are never dropped, whatever it says.
        let hints = HeapHints::check(&info(16 * 4096, 8, 18 * 4096 + 4094), 64 * 4096)
            .unwrap()
            .unwrap();
        let mut dirty: Vec<u32> = (0..40).collect();
        assert_eq!(hints.retain(&[0; 8], &mut dirty), 5);
        let dropped: Vec<u32> = (0..40).filter(|p| !dirty.contains(p)).collect();
        assert_eq!(dropped, [17, 20, 21, 22, 23]);
    }

    #[test]
    fn heap_hints_are_validated() {
        let mem = 64 * 4096;
        assert_eq!(HeapHints::check(&info(0, 0, 0), mem), Ok(None));
        assert!(HeapHints::check(&info(16 * 4096, 48, 0), mem).is_ok());
        for bad in [
            info(16 * 4096 + 8, 8, 0),        // unaligned
            info(16 * 4096, 0, 0),            // empty
            info(16 * 4096, 49, 0),           // past the end of RAM
            info(16 * 4096, u64::MAX / 2, 0), // overflows
            info(16 * 4096, 8, mem - 15),     // array past the end
            info(!4095, 2, 0),                // overflows
            info(16 * 4096, 8, u64::MAX - 4), // overflows
        ] {
            assert!(HeapHints::check(&bad, mem).is_err(), "{bad:?}");
        }
    }
}
