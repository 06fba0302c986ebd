//! The receiving side: takes an instance another daemon sends.
//!
//! Checks the [`Hello`] (protocol, snapshot format and ABI versions, memory
//! size, CPUID, name and address) and refuses what it cannot honour, with
//! the reason; else reserves the name, address and MAC, creates a VM and
//! writes pages into it as they come. The final state is checked field by
//! field against the handshake and the reservation ([`check_state`]),
//! restored (vCPU, devices, clock, the guest told its new host and region)
//! and answered with `Ready`; the guest starts only on `Commit` (see the
//! step table in [`crate::protocol`]). Every read has a deadline: a source
//! that stalls loses the reservation within [`crate::protocol::IO_TIMEOUT`], one that
//! trickles within [`INCOMING_DEADLINE`].
//!
//! A `Query` on a fresh connection answers whether a migration was started
//! here, and settles a pending one as aborted.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::Scope;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vm_memory::{Bytes, GuestAddress};
use vmm::snapshot::format::{FORMAT_VERSION, PAGE};
use vmm::snapshot::state::MachineState;
use vmm::vstate::vm::Vm;

use crate::faults::Step;
use crate::protocol::{
    Accept, Ack, Conn, Hello, Kind, ProtocolError, COMMIT_WAIT, PROTOCOL_VERSION,
};
use crate::{Decision, Destination, MigrationContext, MigrationError, Outcome};

/// The longest an incoming migration may hold its reservation before its
/// final state is in.
pub const INCOMING_DEADLINE: Duration = Duration::from_secs(120);
/// How long a probe of a vanished source's daemon waits for each answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a source's daemon that is going away may take to be gone.
const PROBE_WINDOW: Duration = Duration::from_secs(5);

/// Serves `POST /v1/migration` for the daemon `cx` describes (`host`) on a
/// connection already switched to the migration protocol (`stream`, plain
/// or TLS, over the socket `sock`); `from` names the sending host (its
/// pinned peer name in secure mode).
pub fn accept<S: Read + Write + Send + 'static>(
    cx: &MigrationContext<'_>,
    host: &impl Destination,
    stream: BufReader<S>,
    sock: TcpStream,
    from: &str,
) {
    let mut conn = match Conn::new(stream, sock, cx.config.fault) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %from, error = %e, "incoming migration not set up");
            return;
        }
    };
    conn.deadline(INCOMING_DEADLINE);
    // The next spare VM is made meanwhile, on a thread of this scope.
    std::thread::scope(|scope| {
        let result = receive(cx, host, &mut conn, scope);
        // Closed now, not once the spare is made: the source learns at once.
        drop(conn);
        if let Err(e) = result {
            tracing::warn!(peer = %from, phase = %e.phase(), error = %e, "incoming migration failed");
        }
    });
}

/// Why a `Hello` cannot be honoured here, if it cannot.
fn check_hello(cx: &MigrationContext<'_>, hello: &Hello) -> Result<(), String> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "migration protocol version {} is not supported here (this shim speaks {PROTOCOL_VERSION})",
            hello.protocol_version
        ));
    }
    if hello.format_version != FORMAT_VERSION {
        return Err(format!(
            "state format version {} is not supported here (this shim reads {FORMAT_VERSION})",
            hello.format_version
        ));
    }
    if hello.abi_version != abi::ABI_VERSION {
        return Err(format!(
            "the guest speaks ABI v{}, this shim v{}: it cannot run here",
            hello.abi_version,
            abi::ABI_VERSION
        ));
    }
    vmm::config::check_mem_size(hello.mem_size)?;
    if hello.nic.is_none() {
        return Err("guests without a network card cannot run in the daemon".into());
    }
    cx.hypervisor.check_cpuid(&hello.cpuid)?;
    Ok(())
}

/// Why the final `state` does not match what the handshake announced and
/// what was reserved here (`reserved`: the reservation's NIC), if it does
/// not.
pub fn check_state(
    hello: &Hello,
    state: &MachineState,
    mem_size: u64,
    reserved: Option<vmm::snapshot::state::NicSpec>,
) -> Result<(), String> {
    let spec = &state.spec;
    let differs = |what: &str, got: String, want: String| {
        Err(format!(
            "the final state's {what} ({got}) differs from the handshake's ({want})"
        ))
    };
    if spec.name != hello.name {
        return differs("name", spec.name.clone(), hello.name.clone());
    }
    if spec.mem_size != hello.mem_size || spec.mem_size != mem_size {
        return differs(
            "memory size",
            spec.mem_size.to_string(),
            hello.mem_size.to_string(),
        );
    }
    if spec.image.sha256 != hello.image.sha256 {
        return differs(
            "image",
            spec.image.sha256.clone(),
            hello.image.sha256.clone(),
        );
    }
    if spec.cpuid != hello.cpuid {
        return Err("the final state's CPUID differs from the handshake's".into());
    }
    let Some(nic) = spec.nic else {
        return Err("the final state has no network card".into());
    };
    let mac = |m: [u8; 6]| vmm::devices::virtio::net::fmt_mac(&m);
    let show = |n: vmm::snapshot::state::NicSpec| format!("{} {}", n.ip, mac(n.mac));
    match hello.nic {
        Some(h) if h == nic => {}
        Some(h) => return differs("network card", show(nic), show(h)),
        None => return Err("the handshake announced no network card".into()),
    }
    match reserved {
        Some(r) if r.ip == nic.ip && r.mac == nic.mac => {}
        Some(r) => {
            return Err(format!(
                "the final state's network card ({}) is not the one reserved here ({})",
                show(nic),
                show(r)
            ))
        }
        None => return Err("the reservation here is gone".into()),
    }
    match state.devices.net.as_slice() {
        [one] if one.device.mac == nic.mac => Ok(()),
        [one] => Err(format!(
            "the final state's virtio-net MAC {} is not the card's {}",
            mac(one.device.mac),
            mac(nic.mac)
        )),
        devices => Err(format!(
            "the final state has {} devices; a daemon guest has exactly one network card",
            devices.len()
        )),
    }
}

/// An incoming migration: the handshake, then [`Incoming`] phase by phase.
fn receive<'s, D: Destination>(
    cx: &'s MigrationContext<'_>,
    host: &D,
    conn: &mut Conn,
    scope: &'s Scope<'s, '_>,
) -> Result<(), MigrationError> {
    let first = conn
        .recv()
        .map_err(|e| MigrationError::Connect(e.to_string()))?;
    let hello: Hello = match first.kind {
        Kind::Hello => first
            .value()
            .map_err(|e| MigrationError::Connect(e.to_string()))?,
        Kind::Query => {
            return answer_query(cx, conn, &first.payload).map_err(MigrationError::Connect)
        }
        other => {
            return Err(MigrationError::Connect(format!(
                "expected Hello, got {other:?}"
            )))
        }
    };
    let hello_at = Instant::now();
    let refuse = |conn: &mut Conn, why: String| {
        let _ = conn.send_now(Kind::Refuse, why.as_bytes());
        MigrationError::Connect(format!(
            "refused {} from {}: {why}",
            hello.name, hello.source
        ))
    };
    if let Err(why) = check_hello(cx, &hello) {
        return Err(refuse(conn, why));
    }
    let reservation = match host.reserve(&hello) {
        Ok(r) => r,
        Err(why) => return Err(refuse(conn, why)),
    };
    let name = hello.name.clone();
    let decision = cx
        .migrations
        .start_incoming(&name, hello.migration_id, conn.handle().ok());
    let checks = hello_at.elapsed();
    let result = vm_for(cx, hello.mem_size, scope)
        .map_err(MigrationError::Connect)
        .and_then(|made| {
            Incoming {
                cx,
                host,
                conn,
                hello: &hello,
                decision: &decision,
                reservation: &reservation,
            }
            .take(made, checks)
        });
    if result.is_err() {
        decision.abort();
    }
    if *decision.lock() != Outcome::Started {
        host.cancel(&name, reservation);
    }
    cx.migrations.end_incoming(&name);
    result
}

/// `Query`: the final outcome of a migration here.
fn answer_query(cx: &MigrationContext<'_>, conn: &mut Conn, payload: &[u8]) -> Result<(), String> {
    let id = u64::from_le_bytes(
        payload
            .try_into()
            .map_err(|_| format!("a Query of {} bytes", payload.len()))?,
    );
    let outcome = cx.migrations.query(id);
    tracing::info!(id, ?outcome, "migration outcome asked");
    conn.send_now(Kind::Outcome, &[u8::from(outcome == Outcome::Started)])
        .map_err(|e| e.to_string())
}

/// An incoming migration past its handshake, holding a reservation.
struct Incoming<'a, D: Destination> {
    cx: &'a MigrationContext<'a>,
    host: &'a D,
    conn: &'a mut Conn,
    hello: &'a Hello,
    decision: &'a Decision,
    reservation: &'a D::Reservation,
}

/// Why the connection ended, for the log.
fn lost(e: ProtocolError) -> String {
    match e {
        ProtocolError::Closed => "the source closed the connection".to_owned(),
        e => e.to_string(),
    }
}

impl<D: Destination> Incoming<'_, D> {
    /// Takes the guest in; `Ok` once it runs here.
    fn take(
        mut self,
        (vm, vm_took): (Vm, Duration),
        checks: Duration,
    ) -> Result<(), MigrationError> {
        self.accept(vm_took, checks)
            .map_err(MigrationError::Connect)?;
        let (state, pages) = self.memory(&vm).map_err(MigrationError::Precopy)?;
        let restore_start = Instant::now();
        let prepared = self.restore(vm, state).map_err(MigrationError::Paused)?;
        self.commit(prepared, restore_start, pages)
            .map_err(MigrationError::Commit)
    }

    /// Phase 1: `Accept` (the VM for the guest is made: it took `vm_took`).
    fn accept(&mut self, vm_took: Duration, checks: Duration) -> Result<(), String> {
        let (cx, host, hello) = (self.cx, self.host, self.hello);
        self.conn
            .send_value(
                Kind::Accept,
                &Accept {
                    name: cx.local.name.clone(),
                    region: cx.local.region.clone(),
                    overlay: cx.overlay,
                    checks_us: checks.as_micros() as u64,
                    vm_us: vm_took.as_micros() as u64,
                },
            )
            .and_then(|()| self.conn.flush())
            .map_err(|e| e.to_string())?;
        if let Some(peer) = hello.source_overlay {
            host.add_overlay_peer(peer);
        }
        host.join_pinned_peers();
        Ok(())
    }

    /// Phase 2: Pages into guest memory as they come, until the final `State`;
    /// gives it and how many pages came.
    fn memory(&mut self, vm: &Vm) -> Result<(MachineState, u64), String> {
        let conn = &mut *self.conn;
        let mut pages = 0u64;
        let mut synced = false;
        loop {
            let m = conn.recv().map_err(lost)?;
            match m.kind {
                Kind::Pages | Kind::Zeroes => {
                    let (indices, data) = m.pages().map_err(|e| e.to_string())?;
                    write_pages(vm, &indices, data, m.kind == Kind::Zeroes)?;
                    pages += indices.len() as u64;
                }
                Kind::Sync => {
                    if !synced {
                        conn.at(Step::Precopy, "destination");
                        synced = true;
                    }
                    conn.send_now(Kind::Synced, &[])
                        .map_err(|e| e.to_string())?;
                }
                Kind::State => return Ok((m.value().map_err(|e| e.to_string())?, pages)),
                Kind::Abort => return Err(format!("the source gave up: {}", m.text())),
                other => return Err(format!("unexpected {other:?}")),
            }
        }
    }

    /// Phase 3: The final state checked against the handshake and the
    /// reservation, restored (not started), then `Ready`.
    fn restore(&mut self, vm: Vm, state: MachineState) -> Result<D::Prepared, String> {
        let (host, hello) = (self.host, self.hello);
        let name = hello.name.as_str();
        let reserved = host.reserved_nic(name);
        let prepared = check_state(hello, &state, vm.mem_size(), reserved)
            .and_then(|()| host.prepare(name, vm, state));
        let prepared = match prepared {
            Ok(p) => p,
            Err(why) => {
                let _ = self.conn.send_now(Kind::Failed, why.as_bytes());
                return Err(why);
            }
        };
        self.conn.at(Step::Paused, "destination");
        if let Err(e) = self.conn.send_now(Kind::Ready, &[]) {
            // The source may still send Commit on a half-open link; without it
            // nothing starts here.
            tracing::debug!(instance = %self.hello.name, error = %e, "Ready not sent");
        }
        self.conn.at(Step::Ready, "destination");
        Ok(prepared)
    }

    /// Phase 4: `Commit`: the decision becomes started and the guest runs here
    /// (or, without it, the guest is discarded), then `Committed`.
    fn commit(
        &mut self,
        prepared: D::Prepared,
        restore_start: Instant,
        pages: u64,
    ) -> Result<(), String> {
        let (host, hello, conn) = (self.host, self.hello, &mut *self.conn);
        let name = hello.name.as_str();
        conn.deadline(COMMIT_WAIT);
        let commit = match conn.recv() {
            Ok(m) if m.kind == Kind::Commit => Ok(()),
            Ok(m) if m.kind == Kind::Abort => Err(format!("the source gave up: {}", m.text())),
            Ok(m) => Err(format!("expected Commit, got {:?}", m.kind)),
            Err(e) => match source_gone(conn, hello) {
                true => {
                    tracing::warn!(
                        instance = name,
                        source = %hello.source,
                        error = %e,
                        "the source's daemon is gone after Ready: its guest is gone \
                         with it, so this copy starts"
                    );
                    Ok(())
                }
                false => Err(format!("no Commit from the source: {}", lost(e))),
            },
        };
        if let Err(why) = commit {
            host.discard(prepared);
            return Err(why);
        }
        conn.at(Step::Commit, "destination");
        // Started or aborted, once, and never both: a Query waits on this lock.
        let started = {
            let mut outcome = self.decision.lock();
            if *outcome != Outcome::Pending {
                drop(outcome);
                host.discard(prepared);
                let why = "the migration was settled as aborted before its Commit arrived";
                let _ = conn.send_now(Kind::Failed, why.as_bytes());
                return Err(why.into());
            }
            match host.launch(name, prepared) {
                Ok(()) => {
                    *outcome = Outcome::Started;
                    SystemTime::now()
                }
                Err(e) => {
                    *outcome = Outcome::Aborted;
                    drop(outcome);
                    let _ = conn.send_now(Kind::Failed, e.as_bytes());
                    return Err(e);
                }
            }
        };
        host.adopt(name, self.reservation);
        conn.at(Step::Committed, "destination");
        let ack = Ack {
            resumed_unix_ns: started
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            restore_us: restore_start.elapsed().as_micros() as u64,
        };
        if let Err(e) = conn
            .send_value(Kind::Committed, &ack)
            .and_then(|()| conn.flush())
        {
            // The guest runs here; the source learns it by asking.
            tracing::warn!(instance = name, error = %e, "Committed not delivered");
        }
        tracing::info!(
            instance = name,
            source = %hello.source,
            pages,
            restore_ms = ack.restore_us as f64 / 1e3,
            "arrived and running"
        );
        Ok(())
    }
}

/// Whether the source's daemon is gone (its API address refuses
/// connections): the guest lived in that process, so no copy runs there.
/// A connection it takes and holds open says it is there. Anything else (a
/// connection reset or closed at once, by a listener closing as its process
/// exits, or a connection that fails some other way) is asked again, for up
/// to [`PROBE_WINDOW`]; still unclear then, it may be there.
fn source_gone(conn: &Conn, hello: &Hello) -> bool {
    let Some(api) = hello.source_api else {
        return false;
    };
    daemon_gone(match conn.peer() {
        Some(peer) => SocketAddr::new(peer.ip(), api.port()),
        None => api,
    })
}

/// [`source_gone`] for the daemon API at `addr`.
fn daemon_gone(addr: SocketAddr) -> bool {
    use std::io::Read;
    let give_up = Instant::now() + PROBE_WINDOW;
    let mut last = None;
    while Instant::now() < give_up {
        match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            Err(e) => last = Some(e.to_string()),
            Ok(s) => {
                let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
                match (&s).read(&mut [0u8; 1]) {
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return false
                    }
                    _ => last = Some("a connection closed at once".into()),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!(%addr, last = ?last, "cannot tell whether the source's daemon is gone");
    false
}

/// A VM of `mem_size` bytes: the spare one if it fits, else a new one,
/// and how long that took; either way another spare of that size is made
/// on a thread of `scope`.
fn vm_for<'s>(
    cx: &'s MigrationContext<'_>,
    mem_size: u64,
    scope: &'s Scope<'s, '_>,
) -> Result<(Vm, Duration), String> {
    let creating = Instant::now();
    let spare = cx
        .migrations
        .spare
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .filter(|vm| vm.mem_size() == mem_size);
    let vm = match spare {
        Some(vm) => vm,
        None => Vm::new(&cx.hypervisor.kvm, mem_size).map_err(|e| e.to_string())?,
    };
    let took = creating.elapsed();
    let made = std::thread::Builder::new()
        .name("spare-vm".into())
        .spawn_scoped(scope, move || match Vm::new(&cx.hypervisor.kvm, mem_size) {
            Ok(vm) => {
                *cx.migrations
                    .spare
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(vm)
            }
            Err(e) => tracing::warn!(error = %e, "no spare VM for the next migration"),
        });
    if let Err(e) = made {
        tracing::warn!(error = %e, "no spare VM for the next migration");
    }
    Ok((vm, took))
}

fn write_pages(vm: &Vm, indices: &[u32], data: &[u8], zero: bool) -> Result<(), String> {
    let max = (vm.mem_size() / PAGE as u64) as u32;
    let zeroes = [0u8; PAGE];
    for (i, &index) in indices.iter().enumerate() {
        if index >= max {
            return Err(format!("page {index} is beyond the guest's memory"));
        }
        let bytes = if zero {
            &zeroes[..]
        } else {
            &data[i * PAGE..(i + 1) * PAGE]
        };
        vm.memory()
            .write_slice(bytes, GuestAddress(u64::from(index) * PAGE as u64))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::snapshot::state::NicSpec;

    #[test]
    fn a_daemon_is_gone_only_once_its_address_refuses_connections() {
        // Nothing listens: gone.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        assert!(daemon_gone(addr), "a refused connection");

        // A daemon that takes a connection and holds it: there.
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let holder = std::thread::spawn(move || held.accept().map(|(s, _)| s));
        assert!(!daemon_gone(addr), "a connection held open");
        drop(holder.join());

        // A daemon on its way out: it closes what it takes at once, then its
        // listener goes. Asked again until refused: gone.
        let dying = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dying.local_addr().unwrap();
        let closer = std::thread::spawn(move || {
            for _ in 0..2 {
                drop(dying.accept());
            }
        });
        assert!(daemon_gone(addr), "closed at once, then refused");
        closer.join().unwrap();
    }

    #[test]
    fn the_final_state_is_checked_field_by_field() {
        let mut state = vmm::testutil::sample_machine_state();
        let nic = NicSpec {
            mac: [2, 0, 0, 0, 0, 1],
            ip: "10.0.2.16".parse().unwrap(),
            prefix: 24,
            gateway: None,
        };
        state.spec.nic = Some(nic);
        let spec = state.spec.clone();
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            format_version: FORMAT_VERSION,
            abi_version: abi::ABI_VERSION,
            migration_id: 1,
            name: spec.name.clone(),
            mem_size: spec.mem_size,
            cpuid: spec.cpuid.clone(),
            nic: Some(nic),
            image: spec.image.clone(),
            source: "a".into(),
            source_overlay: None,
            source_api: None,
            record: None,
        };
        let mem = spec.mem_size;
        check_state(&hello, &state, mem, Some(nic)).unwrap();
        let other_ip = NicSpec {
            ip: "10.0.2.17".parse().unwrap(),
            ..nic
        };
        let other_mac = NicSpec {
            mac: [2, 0, 0, 0, 0, 9],
            ..nic
        };
        let expect = |r: Result<(), String>, want: &str| {
            let e = r.expect_err(want);
            assert!(e.contains(want), "{e}");
        };
        expect(
            check_state(&hello, &state, mem * 2, Some(nic)),
            "memory size",
        );
        let mut h = hello.clone();
        h.mem_size *= 2;
        expect(check_state(&h, &state, mem, Some(nic)), "memory size");
        let mut h = hello.clone();
        h.name = "other".into();
        expect(check_state(&h, &state, mem, Some(nic)), "name");
        let mut h = hello.clone();
        h.image.sha256 = "cd".repeat(32);
        expect(check_state(&h, &state, mem, Some(nic)), "image");
        let mut h = hello.clone();
        h.cpuid.clear();
        expect(check_state(&h, &state, mem, Some(nic)), "CPUID");
        let mut h = hello.clone();
        h.nic = Some(other_ip);
        expect(check_state(&h, &state, mem, Some(nic)), "10.0.2.17");
        expect(
            check_state(&hello, &state, mem, Some(other_mac)),
            "not the one reserved here",
        );
        expect(check_state(&hello, &state, mem, None), "reservation");
        let mut s = vmm::testutil::sample_machine_state();
        s.spec.nic = Some(other_mac);
        let mut h = hello.clone();
        h.nic = Some(other_mac);
        expect(
            check_state(&h, &s, mem, Some(other_mac)),
            "virtio-net MAC 02:00:00:00:00:01",
        );
        let mut s = vmm::testutil::sample_machine_state();
        s.spec.nic = Some(nic);
        let dev = s.devices.net[0].clone();
        s.devices.net.push(dev);
        expect(check_state(&hello, &s, mem, Some(nic)), "2 devices");
    }
}
