//! The receiving side: takes an instance another daemon sends.
//!
//! Checks the [`Hello`] (protocol, snapshot format and ABI versions, memory
//! size, CPUID, name and address) and refuses what it cannot honour, with
//! the reason; else creates a VM, writes pages into it as they come, and on
//! the final state restores vCPU, devices and clock, tells the guest its
//! new host and region (`BootInfo`, generation + 1), starts it and
//! acknowledges with the time it started. If the source goes away before
//! the final state, everything is dropped.
//!
//! Test hook: with `HOST_SHIM_TEST_DIE_AFTER_PAGES=N` in its environment, a
//! daemon exits abruptly (status 137, as if killed) once it has received N
//! pages of an incoming migration.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use vm_memory::{Bytes, GuestAddress};

use super::protocol::{
    read_msg, write_msg, write_value, Accept, Ack, Hello, Kind, ProtocolError, PROTOCOL_VERSION,
};
use crate::daemon::instance::{InstanceConsole, LogRing};
use crate::daemon::Daemon;
use crate::machine::Machine;
use crate::security::tls::{Shared, Stream};
use crate::snapshot::format::{FORMAT_VERSION, PAGE};
use crate::snapshot::state::MachineState;
use crate::vstate::vm::Vm;

/// Environment variable of the test hook (see the module docs).
pub const DIE_AFTER_PAGES: &str = "HOST_SHIM_TEST_DIE_AFTER_PAGES";

/// Serves `POST /v1/migration` on a connection already switched to the
/// migration protocol; `from` names the sending host (its pinned peer name
/// in secure mode).
pub fn accept(daemon: &Arc<Daemon>, conn: BufReader<Stream>, from: &str) {
    let shared = Shared::new(conn);
    let mut r = BufReader::with_capacity(1 << 20, shared.clone());
    let mut w = BufWriter::with_capacity(1 << 20, shared);
    if let Err(e) = receive(daemon, &mut r, &mut w) {
        tracing::warn!("incoming migration from {from} failed: {e}");
        eprintln!("incoming migration from {from} failed: {e}");
    }
}

/// Why a `Hello` cannot be honoured here, if it cannot.
fn check_hello(daemon: &Daemon, hello: &Hello) -> Result<(), String> {
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
    crate::config::check_mem_size(hello.mem_size)?;
    daemon.hv.check_cpuid(&hello.cpuid)?;
    Ok(())
}

fn receive<R: Read, W: Write>(daemon: &Arc<Daemon>, r: &mut R, w: &mut W) -> Result<(), String> {
    let hello: Hello = match read_msg(r) {
        Ok(m) if m.kind == Kind::Hello => m.value().map_err(|e| e.to_string())?,
        Ok(m) => return Err(format!("expected Hello, got {:?}", m.kind)),
        Err(e) => return Err(e.to_string()),
    };
    let refuse = |w: &mut W, why: String| {
        let _ = write_msg(w, Kind::Refuse, why.as_bytes());
        let _ = w.flush();
        format!("refused {} from {}: {why}", hello.name, hello.source)
    };
    if let Err(why) = check_hello(daemon, &hello) {
        return Err(refuse(w, why));
    }
    let restore_point = match daemon.reserve_incoming(&hello) {
        Ok(p) => p,
        Err(why) => return Err(refuse(w, why)),
    };
    let name = hello.name.clone();
    let result = (|| {
        let vm = Vm::new(&daemon.hv.kvm, hello.mem_size).map_err(|e| e.to_string())?;
        write_value(
            w,
            Kind::Accept,
            &Accept {
                name: daemon.config.name.clone(),
                region: daemon.config.region.clone(),
                overlay: daemon.net.overlay_addr(),
            },
        )
        .map_err(|e| e.to_string())?;
        w.flush().map_err(|e| e.to_string())?;
        if let Some(peer) = hello.source_overlay {
            daemon.net.add_peer(peer);
        }
        daemon.join_pinned_peers();
        let die_after: Option<u64> = std::env::var(DIE_AFTER_PAGES)
            .ok()
            .and_then(|v| v.parse().ok());
        let mut pages = 0u64;
        let state: MachineState = loop {
            let m = read_msg(r).map_err(|e| match e {
                ProtocolError::Closed => "the source closed the connection".to_owned(),
                e => e.to_string(),
            })?;
            match m.kind {
                Kind::Pages | Kind::Zeroes => {
                    let (indices, data) = m.pages().map_err(|e| e.to_string())?;
                    write_pages(&vm, &indices, data, m.kind == Kind::Zeroes)?;
                    pages += indices.len() as u64;
                    if die_after.is_some_and(|n| pages >= n) {
                        eprintln!("{DIE_AFTER_PAGES}: dying after {pages} pages");
                        std::process::exit(137);
                    }
                }
                Kind::Sync => {
                    write_msg(w, Kind::Synced, &[]).map_err(|e| e.to_string())?;
                    w.flush().map_err(|e| e.to_string())?;
                }
                Kind::State => break m.value().map_err(|e| e.to_string())?,
                Kind::Abort => return Err(format!("the source gave up: {}", m.text())),
                other => return Err(format!("unexpected {other:?}")),
            }
        };
        let restore_start = Instant::now();
        let started = match start(daemon, &name, vm, state, restore_point.clone()) {
            Ok(t) => t,
            Err(why) => {
                let _ = write_msg(w, Kind::Failed, why.as_bytes());
                let _ = w.flush();
                return Err(why);
            }
        };
        let ack = Ack {
            resumed_unix_ns: started
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            restore_us: restore_start.elapsed().as_micros() as u64,
        };
        write_value(w, Kind::Ack, &ack).map_err(|e| e.to_string())?;
        w.flush().map_err(|e| e.to_string())?;
        eprintln!(
            "{name} arrived from {}: {pages} pages, running after {:.2} ms of restore",
            hello.source,
            ack.restore_us as f64 / 1e3
        );
        Ok(())
    })();
    if result.is_err() && !daemon.is_running(&name) {
        daemon.cancel_incoming(&name, restore_point);
    }
    result
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

/// Restores and starts the guest; returns when its vCPU thread started.
fn start(
    daemon: &Arc<Daemon>,
    name: &str,
    vm: Vm,
    state: MachineState,
    restore_point: crate::daemon::Incoming,
) -> Result<SystemTime, String> {
    let log = Arc::new(std::sync::Mutex::new(LogRing::default()));
    let port = match state.spec.nic {
        Some(nic) => daemon.net.attach(nic.mac).map_err(|e| e.to_string())?,
        None => return Err("guests without a network card cannot run in the daemon".into()),
    };
    let console = Box::new(InstanceConsole::new(name, Arc::clone(&log)));
    let mut machine = match Machine::restore(vm, state, Some(Arc::clone(&port)), console) {
        Ok(m) => m,
        Err(e) => {
            daemon.net.detach(&port);
            return Err(e.to_string());
        }
    };
    if let Err(e) = machine.set_location(&daemon.config.name, &daemon.config.region) {
        daemon.net.detach(&port);
        return Err(e.to_string());
    }
    daemon
        .launch(name, machine, port, log, Vec::new())
        .map_err(|e| e.1)?;
    // The vCPU thread is running.
    let started = SystemTime::now();
    daemon.adopt_publishes(name, &restore_point);
    Ok(started)
}
