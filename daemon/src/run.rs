//! An instance's life in the daemon: run (boot an image), restore (from a
//! snapshot), launch (publish, spawn, record), stop, and the guests that
//! end on their own; the limits every new instance is admitted under.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use api::{InstanceInfo, RestoreRequest, RunRequest};
use hostnet::{Nic, PublishSpec};
use vmm::boot::cmdline::{self, GuestArgs};
use vmm::devices::virtio;
use vmm::error::Error;
use vmm::machine::{self, BootRequest, Ended, Machine, MachineHandle};

use crate::instance::{InstanceConsole, LogRing, State};
use crate::instances::{placeholder_spec, ReserveError};
use crate::limits::{self, check_name, Quotas};
use crate::{bad, not_found, standby, ApiError, Daemon};

impl Daemon {
    /// Runs `machine` as instance `name` (already reserved as Busy).
    pub(crate) fn start_instance(&self, machine: Machine) -> Result<Arc<MachineHandle>, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(machine::spawn(machine, id, self.ended_sender(), None)?);
        Ok(handle)
    }

    /// Notes guests that ended on their own (runs on its own thread).
    pub(crate) fn watch(self: Arc<Self>, ended: Receiver<Ended>) {
        for (id, exit) in ended {
            let mut instances = self.instances();
            let Some(inst) = instances
                .values_mut()
                .find(|i| i.handle.as_ref().is_some_and(|h| h.id() == id))
            else {
                continue;
            };
            let Some(exit) = exit else { continue };
            let how = match &exit {
                vmm::GuestExit::Exited(code) => format!("status {code}"),
                other => other.to_string(),
            };
            tracing::info!(instance = %inst.name, %exit, "guest ended");
            inst.state = State::Exited(how);
            if let Some(h) = inst.handle.take() {
                h.join();
            }
            if let Some(port) = inst.port.take() {
                self.net.detach(&port);
            }
            drop(instances);
            self.trim_heap();
        }
    }

    /// Refuses an instance of `mem` bytes beyond the instance and memory
    /// limits and the host's, beside `count` live (running and starting)
    /// instances holding `used` bytes ([`crate::instances::Admit`]).
    pub(crate) fn admit(&self, count: usize, used: u64, mem: u64) -> Result<(), ApiError> {
        self.config.limits.admit(count, used, mem)?;
        self.fds
            .admit_one(count as u64, self.config.limits.max_open_files)?;
        limits::HostLimits::read(self.config.limits.max_open_files).admit_one(count as u64)
    }

    pub(crate) fn run(&self, req: RunRequest) -> Result<InstanceInfo, ApiError> {
        check_name(&req.name)?;
        vmm::config::check_mem_size(req.mem).map_err(bad)?;
        let publish = self.publishes(&req.publish)?;
        let ip = req.ip;
        let image = PathBuf::from(&req.image);
        // Placeholder spec for the reservation; the real one comes from boot.
        let mut placeholder = placeholder_spec(&req.name, req.mem);
        placeholder.image.path = req.image.clone();
        let nic = self
            .instances()
            .reserve_with_address(&req.name, placeholder, ip, |n, used, mem| {
                self.admit(n, used, mem)
            })
            .map_err(ReserveError::into_api)?;
        match self.boot(&req, &image, nic, publish) {
            Ok(info) => Ok(info),
            Err(e) => {
                self.instances().release(&req.name);
                Err(e)
            }
        }
    }

    fn boot(
        &self,
        req: &RunRequest,
        image: &Path,
        nic: Nic,
        publish: Vec<PublishSpec>,
    ) -> Result<InstanceInfo, ApiError> {
        let mut params = nic.cmdline_params();
        if let Some(ms) = req.checkpoint_every_ms {
            if req.checkpoint_to.is_none() && req.standby.is_none() {
                return Err(bad("--checkpoint-every needs --checkpoint-to or --standby"));
            }
            params.push((
                abi::cmdline::CHECKPOINT_EVERY_KEY.to_owned(),
                ms.max(1).to_string(),
            ));
        }
        let checkpoint = match &req.restore {
            Some(file) => Some((
                vmm::checkpoint::read_file(Path::new(file)).map_err(|e| bad(e.to_string()))?,
                vmm::boot::loader::inspect(image, req.mem)
                    .map_err(|e| bad(e.to_string()))?
                    .load_end,
            )),
            None => None,
        };
        let guest = GuestArgs {
            host_name: self.config.name.clone(),
            region: self.config.region.clone(),
            params,
            env: req.env.clone(),
            devices: vec![virtio::cmdline_entry(0)],
            args: req.args.clone(),
        };
        let cmdline = cmdline::build(&guest).map_err(|e| bad(e.to_string()))?;
        let standby = standby::register(self, req)?;
        let log = Arc::new(Mutex::new(LogRing::default()));
        let port = self.net.attach(nic.mac)?;
        let machine = Machine::boot(
            &self.hv,
            BootRequest {
                name: req.name.clone(),
                image,
                cmdline,
                mem_size: req.mem,
                nic: Some(nic),
                port: Some(Arc::clone(&port)),
                env: req.env.clone(),
                args: req.args.clone(),
            },
            Box::new(InstanceConsole::new(&req.name, Arc::clone(&log))),
        );
        let machine = machine.and_then(|mut m| {
            if let Some((blob, image_end)) = &checkpoint {
                m.place_checkpoint(blob, *image_end)?;
            }
            m.doorbell
                .set_checkpoint_dir(req.checkpoint_to.as_ref().map(PathBuf::from));
            if let Some(sink) = standby {
                m.doorbell.add_checkpoint_sink(Box::new(sink));
            }
            Ok(m)
        });
        let machine = match machine {
            Ok(m) => m,
            Err(e) => {
                self.net.detach(&port);
                return Err(bad(e.to_string()));
            }
        };
        self.launch(&req.name, machine, port, log, publish)
    }

    /// Publishes, spawns and records a machine under the reserved `name`.
    pub(crate) fn launch(
        &self,
        name: &str,
        mut machine: Machine,
        port: Arc<hostnet::port::GuestPort>,
        log: Arc<Mutex<LogRing>>,
        publish: Vec<PublishSpec>,
    ) -> Result<InstanceInfo, ApiError> {
        let ip = machine.spec.nic.map(|n| n.ip);
        let mut done = Vec::new();
        for spec in &publish {
            let target = spec
                .guest_addr
                .or(ip)
                .ok_or_else(|| bad("--publish needs a guest with a network card"));
            let result = target.and_then(|t| {
                self.net
                    .publish(spec, t)
                    .map_err(|e| ApiError(409, e.to_string()))
            });
            if let Err(e) = result {
                for s in &done {
                    self.net.unpublish(s);
                }
                self.net.detach(&port);
                return Err(e);
            }
            done.push(spec.clone());
        }
        let spec = machine.spec.clone();
        let checkpoints = Arc::new(vmm::checkpoint::Latest::default());
        machine
            .doorbell
            .set_checkpoint_latest(Some(Arc::clone(&checkpoints)));
        machine
            .doorbell
            .set_checkpoint_max(self.config.limits.max_checkpoint);
        let handle = match self.start_instance(machine) {
            Ok(h) => h,
            Err(e) => {
                for s in &done {
                    self.net.unpublish(s);
                }
                self.net.detach(&port);
                return Err(e.into());
            }
        };
        let mut instances = self.instances();
        let inst = instances.commit(name, spec, |inst| {
            inst.handle = Some(handle);
            inst.port = Some(port);
            inst.publish.extend(done);
            inst.log = log;
            inst.started = Instant::now();
            inst.checkpoints = checkpoints;
        });
        Ok(inst.info())
    }

    /// Asks the `trim` thread to give the heap the allocator holds free back
    /// to the operating system (after an instance stops or moves away: glibc
    /// keeps freed memory mapped, so an idle daemon's RSS would otherwise keep
    /// what its busiest moment needed). A trim already pending covers it.
    pub fn trim_heap(&self) {
        let _ = self.trim.try_send(());
    }

    pub(crate) fn stop(&self, name: &str) -> Result<InstanceInfo, ApiError> {
        // A migration of it ends first (cancelled before its commit).
        self.migrations.cancel(name, Duration::from_secs(30));
        let inst = {
            let mut instances = self.instances();
            let busy = |i: &crate::instance::Instance| {
                ApiError(
                    409,
                    format!("instance '{name}' is busy ({}): try again", i.info().state),
                )
            };
            match instances.get(name) {
                None => return Err(not_found(name)),
                Some(i) if matches!(i.state, State::Busy(_)) => return Err(busy(i)),
                Some(i) => {
                    let err = busy(i);
                    // Still completing its arrival here.
                    instances.remove(name).ok_or(err)?
                }
            }
        };
        if let Some(h) = &inst.handle {
            if !h.stop() {
                tracing::warn!(
                    instance = %name,
                    "the vCPU thread did not stop; leaving it behind"
                );
            }
        }
        if let Some(port) = &inst.port {
            self.net.detach(port);
        }
        for spec in &inst.publish {
            self.net.unpublish(spec);
        }
        let mut info = inst.info();
        drop(inst);
        // What the instance's threads allocated stays in the allocator's
        // arenas otherwise (tens of MiB after a thousand instances).
        self.trim_heap();
        info.state = api::InstanceState::Stopped;
        Ok(info)
    }

    /// Marks a live instance busy and returns its handle; `release` undoes it.
    pub(crate) fn acquire(
        &self,
        name: &str,
        what: &'static str,
    ) -> Result<Arc<MachineHandle>, ApiError> {
        let mut instances = self.instances();
        let inst = instances.get_mut(name).ok_or_else(|| not_found(name))?;
        match (&inst.state, &inst.handle) {
            (State::Running, Some(h)) => {
                let h = Arc::clone(h);
                inst.state = State::Busy(what);
                Ok(h)
            }
            (State::Busy(other), _) => Err(ApiError(
                409,
                format!("instance '{name}' is busy ({other})"),
            )),
            _ => Err(ApiError(
                409,
                format!("instance '{name}' is not running ({})", inst.info().state),
            )),
        }
    }

    /// Back to running after [`Self::acquire`].
    pub(crate) fn release(&self, name: &str) {
        if let Some(inst) = self.instances().get_mut(name) {
            if matches!(inst.state, State::Busy(_)) {
                inst.state = State::Running;
            }
        }
    }

    /// Checks a caller's published ports and the limits.
    pub(crate) fn publishes(&self, publish: &[PublishSpec]) -> Result<Vec<PublishSpec>, ApiError> {
        for p in publish {
            p.check().map_err(bad)?;
        }
        self.config.limits.check_publish(publish)?;
        Ok(publish.to_vec())
    }

    pub(crate) fn restore(&self, req: RestoreRequest) -> Result<InstanceInfo, ApiError> {
        let publish = self.publishes(&req.publish)?;
        if let Some(name) = &req.name {
            check_name(name)?;
        }
        let opened = vmm::snapshot::open(Path::new(&req.file)).map_err(|e| bad(e.to_string()))?;
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| opened.state.spec.name.clone());
        // The name and the limits are checked before the snapshot's memory
        // is allocated, and again (atomically) when the name is reserved.
        check_name(&name)?;
        let (live, used) = self.instances().live_usage();
        self.admit(live, used, opened.state.spec.mem_size)?;
        let (state, vm) = opened.into_vm(&self.hv).map_err(|e| bad(e.to_string()))?;
        self.instances()
            .reserve(&name, state.spec.clone(), |n, used, mem| {
                self.admit(n, used, mem)
            })
            .map_err(ReserveError::into_api)?;
        let result = (|| {
            let log = Arc::new(Mutex::new(LogRing::default()));
            let port = match state.spec.nic {
                Some(nic) => Some(self.net.attach(nic.mac)?),
                None => None,
            };
            let mut state = state;
            state.spec.name = name.clone();
            let console = Box::new(InstanceConsole::new(&name, Arc::clone(&log)));
            let mut machine = Machine::restore(vm, state, port.clone(), console).map_err(|e| {
                if let Some(p) = &port {
                    self.net.detach(p);
                }
                bad(e.to_string())
            })?;
            machine.set_location(&self.config.name, &self.config.region)?;
            let port = port.ok_or_else(|| {
                bad("snapshots of guests without a network card cannot run in the daemon")
            })?;
            self.launch(&name, machine, port, log, publish)
        })();
        if result.is_err() {
            self.instances().release(&name);
        }
        result
    }
}

/// Hands the heap that stopped instances freed back to the kernel, once
/// stops pause for [`TRIM_DEBOUNCE`] (a trim walks the whole heap: after
/// each of a thousand stops it would cost more than the stop).
pub(crate) fn trim_after_stops(wanted: Receiver<()>) {
    while wanted.recv().is_ok() {
        thread::sleep(TRIM_DEBOUNCE);
        while wanted.try_recv().is_ok() {}
        shim_util::sys::release_free_heap();
    }
}

/// How long stops must pause before the heap is trimmed.
const TRIM_DEBOUNCE: Duration = Duration::from_millis(200);
