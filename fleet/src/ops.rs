//! The fleet operations a user performs (`deploy`, `ps`, `migrate`,
//! `stop`): each takes the [`Fleet`], reports what happens meanwhile
//! through a [`Progress`] callback, and returns a typed outcome that the
//! CLI renders (a table, or JSON). The app's record in the store (its
//! owner: the host it runs on) changes only by compare-and-swap here, and
//! every operation appends its [`crate::events`]. The daemons' side of
//! ownership is here too: [`take_over`] (a standby taking an app of a dead
//! host) and [`reclaim`] (a host that comes back checking it still owns
//! what it ran).

use std::time::Instant;

use serde::Serialize;

use api::images::{sha256_hex, ImageInfo, HASH_PREFIX};
use api::migration::human;
use api::{
    Client, ClientError, InstanceInfo, InstanceState, MigrateRequest, MigrationEvent,
    MigrationReport, PublishSpec, PushRequest, Restart, RestartRequest, RunRequest, ShimInfo,
};

use crate::events::{Event, Kind};
use crate::locate::{locate, record_move};
use crate::store::{Expect, StoreError};
use crate::{client_for, App, Fleet, FleetError, Host};

/// What an operation reports while it runs.
#[derive(Debug)]
pub enum Progress<'a> {
    /// `deploy`: bytes of the image sent to `host` so far.
    Upload {
        host: &'a str,
        sent: u64,
        total: u64,
    },
    /// `migrate`: a phase of the migration (not the last: that is the
    /// outcome).
    Migration(&'a MigrationEvent),
    /// Something went wrong that does not fail the operation.
    Warning(String),
}

/// What `deploy` runs.
#[derive(Clone, Debug, Default)]
pub struct DeployRequest {
    /// The image's bytes (an ELF built by `cargo xtask build-image`).
    pub image: Vec<u8>,
    /// Where the image came from, for errors.
    pub source: String,
    /// The fleet host to run it on.
    pub on: String,
    pub name: String,
    pub mem: u64,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    /// Published ports.
    pub publish: Vec<PublishSpec>,
    pub restart: Restart,
    pub checkpoint_every_ms: Option<u64>,
    /// The fleet host that keeps the app's checkpoints and takes it over
    /// if its host dies (it gets the image too).
    pub standby: Option<String>,
}

/// A deployed app.
#[derive(Clone, Debug, Serialize)]
pub struct Deployed {
    pub name: String,
    pub host: String,
    pub region: String,
    /// `sha256:HEX`.
    pub image: String,
    pub bytes: u64,
    /// Whether the image had to be uploaded (else the host had it).
    pub uploaded: bool,
    pub ip: Option<api::GuestAddr>,
    pub publish: Vec<String>,
    pub restart: Restart,
    /// From the start of the operation to the instance running.
    pub ms: f64,
}

/// Makes sure image `hash` (`bytes`) is on the shim behind `client`;
/// returns whether it had to be uploaded.
fn ensure_image(
    client: &Client,
    host: &Host,
    hash: &str,
    bytes: &[u8],
    progress: &mut dyn FnMut(Progress),
) -> Result<bool, FleetError> {
    match client.image::<ImageInfo>(hash) {
        Ok(_) => return Ok(false),
        Err(ClientError::Api { status: 404, .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let total = bytes.len() as u64;
    let answer = client.put_image::<ImageInfo>(hash, bytes, |sent| {
        progress(Progress::Upload {
            host: &host.name,
            sent,
            total,
        })
    });
    answer.map_err(|e| match e {
        ClientError::Api { message, .. } => {
            FleetError::Failed(format!("host {} refused the image: {message}", host.name))
        }
        e => e.into(),
    })?;
    Ok(true)
}

/// Uploads the image (unless the host has it) and runs it there. The
/// app's name is claimed in the store first (compare-and-swap on an absent
/// record: of two deploys of one name, one wins, the other gets
/// [`FleetError::Conflict`]) and given back if the host does not run it.
pub fn deploy(
    fleet: &Fleet,
    req: DeployRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<Deployed, FleetError> {
    let start = Instant::now();
    let host = fleet.need_host(&req.on)?;
    let hash = sha256_hex(&req.image);
    let client = client_for(&host)?;
    let info: ShimInfo = client.info()?;
    let max = info.max_image_bytes.ok_or_else(|| {
        FleetError::Failed(format!(
            "host {} keeps no images: start its shim with `host-shim serve --state-dir DIR`",
            host.name
        ))
    })?;
    let bytes = req.image.len() as u64;
    if bytes > max {
        return Err(FleetError::Failed(format!(
            "{} is {}, over host {}'s limit of {} (serve --max-image-size)",
            req.source,
            human(bytes),
            host.name,
            human(max)
        )));
    }
    let image = format!("{HASH_PREFIX}{hash}");
    let app = App {
        name: req.name.clone(),
        host: host.name.clone(),
        image: image.clone(),
    };
    let claimed = match fleet.put_app(&app, Expect::Absent) {
        Ok(version) => version,
        Err(FleetError::Store(StoreError::Conflict { .. })) => {
            let holder = fleet.app(&app.name)?.map(|a| a.value.host);
            return Err(FleetError::Conflict(format!(
                "the fleet has an app '{}' already (on {}): `host-shim stop {}` first, or pick \
                 another --name",
                app.name,
                holder.as_deref().unwrap_or("?"),
                app.name
            )));
        }
        Err(e) => return Err(e),
    };
    let restart = req.restart;
    let inst = standby_for(fleet, &host, &hash, &req, progress)
        .and_then(|standby| run_claimed(&client, &host, &hash, req, &image, standby, progress));
    let inst = match inst {
        Ok(v) => v,
        Err(e) => {
            if let Err(undo) = fleet.remove_app(&app.name, Expect::Version(claimed)) {
                tracing::warn!(
                    instance = %app.name,
                    error = %undo,
                    "cannot give back the app's name",
                );
            }
            return Err(e);
        }
    };
    let (inst, uploaded) = inst;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    fleet.note(Event::new(
        Kind::Deploy,
        Some(&app.name),
        &[&host.name],
        serde_json::json!({ "image": image, "ip": inst.ip, "ms": ms }),
    ));
    Ok(Deployed {
        name: inst.name,
        host: host.name,
        region: info.region,
        image,
        bytes,
        uploaded,
        ip: inst.ip,
        publish: inst.publish,
        restart,
        ms,
    })
}

/// The API address of the standby `req` names, which gets the image first.
fn standby_for(
    fleet: &Fleet,
    host: &Host,
    hash: &str,
    req: &DeployRequest,
    progress: &mut dyn FnMut(Progress),
) -> Result<Option<String>, FleetError> {
    let Some(name) = &req.standby else {
        return Ok(None);
    };
    if *name == host.name {
        return Err(FleetError::Failed(format!(
            "the standby of {} must be another host than {name}",
            req.name
        )));
    }
    let standby = fleet.need_host(name)?;
    ensure_image(&client_for(&standby)?, &standby, hash, &req.image, progress)?;
    Ok(Some(standby.addr().to_owned()))
}

/// Uploads the image if needed and runs the app whose name `deploy` claimed.
fn run_claimed(
    client: &Client,
    host: &Host,
    hash: &str,
    req: DeployRequest,
    image: &str,
    standby: Option<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(InstanceInfo, bool), FleetError> {
    let uploaded = ensure_image(client, host, hash, &req.image, progress)?;
    let run = RunRequest {
        name: req.name.clone(),
        image: image.to_owned(),
        mem: req.mem,
        env: req.env,
        args: req.args,
        publish: req.publish,
        checkpoint_every_ms: req.checkpoint_every_ms,
        restart: req.restart,
        standby,
        ..RunRequest::default()
    };
    let inst: InstanceInfo = client.run(&run).map_err(|e| match e {
        ClientError::Api { message, .. } => FleetError::Failed(format!(
            "host {} refused to run {}: {message}",
            host.name, req.name
        )),
        e => e.into(),
    })?;
    Ok((inst, uploaded))
}

/// One instance as `ps` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PsRow {
    pub name: String,
    pub host: String,
    pub region: String,
    #[serde(flatten)]
    pub state: InstanceState,
    pub uptime_s: f64,
    pub mem: u64,
    pub ip: Option<api::GuestAddr>,
    pub publish: Vec<String>,
    pub restart: Restart,
}

/// A host `ps` could not list.
#[derive(Clone, Debug, Serialize)]
pub struct Unreachable {
    pub host: String,
    pub error: String,
}

/// What `ps` found.
#[derive(Clone, Debug, Serialize)]
pub struct Ps {
    pub instances: Vec<PsRow>,
    pub unreachable: Vec<Unreachable>,
}

/// Every instance on every fleet host (those that moved away only with
/// `all`), asking the hosts at once; hosts that do not answer are listed
/// in [`Ps::unreachable`]. Where a shim says an app runs elsewhere than
/// its record says (moved by another tool), the record is corrected (by
/// compare-and-swap).
pub fn ps(fleet: &Fleet, all: bool) -> Result<Ps, FleetError> {
    let hosts = fleet.hosts()?;
    let answers: Vec<(Host, Result<Vec<InstanceInfo>, FleetError>)> = std::thread::scope(|s| {
        let workers: Vec<_> = hosts
            .into_iter()
            .map(|h| {
                s.spawn(move || {
                    let list = client_for(&h).and_then(|c| c.list().map_err(FleetError::from));
                    (h, list)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("ps worker"))
            .collect()
    });
    let mut out = Ps {
        instances: Vec::new(),
        unreachable: Vec::new(),
    };
    for (host, answer) in answers {
        match answer {
            Ok(list) => {
                for i in list {
                    if !all && i.state.moved_to().is_some() {
                        continue;
                    }
                    out.instances.push(PsRow {
                        name: i.name,
                        host: host.name.clone(),
                        region: host.region.clone(),
                        state: i.state,
                        uptime_s: i.uptime_s,
                        mem: i.mem,
                        ip: i.ip,
                        publish: i.publish,
                        restart: i.restart,
                    });
                }
            }
            Err(e) => out.unreachable.push(Unreachable {
                host: host.name,
                error: e.to_string(),
            }),
        }
    }
    for app in fleet.apps()? {
        let here = out
            .instances
            .iter()
            .find(|r| r.name == app.name && r.state == InstanceState::Running);
        if let Some(row) = here.filter(|r| r.host != app.host) {
            record_move(fleet, &app.name, &row.host)?;
        }
    }
    Ok(out)
}

/// A migrated app.
#[derive(Clone, Debug, Serialize)]
pub struct Migrated {
    pub name: String,
    pub from: String,
    pub to: String,
    pub region: String,
    pub downtime_ms: f64,
    pub total_ms: f64,
    pub bytes: u64,
    pub rounds: usize,
    /// The migration's last line (`ok: ... moved to ...`).
    pub summary: String,
    #[serde(skip)]
    pub report: MigrationReport,
}

/// Moves app `name` live to fleet host `to` and records its new host. An
/// app that restarts with its shim (`--restart always`) has its image
/// copied to the destination first and keeps that policy there.
pub fn migrate(
    fleet: &Fleet,
    name: &str,
    to: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<Migrated, FleetError> {
    let loc = locate(fleet, name)?;
    let dest = fleet.need_host(to)?;
    if loc.live.host.as_ref().is_some_and(|h| h.name == dest.name) {
        return Err(FleetError::Failed(format!("{name} runs on {to} already")));
    }
    let dest_client = client_for(&dest)?;
    let keep_restart = loc.info.restart == Restart::Always;
    if keep_restart {
        let hash = loc.app.value.image.trim_start_matches(HASH_PREFIX);
        let pushed = loc.live.client.push_image::<ImageInfo>(
            hash,
            &PushRequest {
                to: dest.addr().to_owned(),
            },
        );
        if let Err(e) = pushed {
            progress(Progress::Warning(format!(
                "cannot copy {name}'s image to {to} ({e}): it will not restart with that shim"
            )));
        }
    }
    let hosts = [loc.live.label.as_str(), dest.name.as_str()];
    fleet.note(Event::new(
        Kind::MigrationStarted,
        Some(name),
        &hosts,
        serde_json::Value::Null,
    ));
    let result = loc.live.client.migrate(
        name,
        &MigrateRequest {
            to: dest.addr().to_owned(),
            fingerprint: dest.fingerprint.clone(),
        },
        |event| {
            if !event.is_last() {
                progress(Progress::Migration(event));
            }
        },
    );
    let report = result.map_err(|e| {
        let error = match e {
            ClientError::Migration { error, .. } => error,
            e => e.to_string(),
        };
        fleet.note(Event::new(
            Kind::MigrationFailed,
            Some(name),
            &hosts,
            serde_json::json!({ "error": error }),
        ));
        FleetError::Failed(format!("migration of {name} to {to} failed: {error}"))
    })?;
    let summary = MigrationEvent::Done(report.clone()).to_string();
    if keep_restart {
        let kept = dest_client.set_restart(
            name,
            &RestartRequest {
                restart: Restart::Always,
            },
        );
        if let Err(e) = kept {
            progress(Progress::Warning(format!(
                "{name} will not restart with {to}'s shim: {e}"
            )));
        }
    }
    record_move(fleet, name, &dest.name)?;
    fleet.note(Event::new(
        Kind::MigrationDone,
        Some(name),
        &hosts,
        serde_json::to_value(&report).expect("serializable"),
    ));
    Ok(Migrated {
        name: name.to_owned(),
        from: loc.live.label,
        to: dest.name,
        region: dest.region,
        downtime_ms: report.downtime_ms,
        total_ms: report.total_ms,
        bytes: report.bytes,
        rounds: report.rounds,
        summary,
        report,
    })
}

/// A stopped app.
#[derive(Clone, Debug, Serialize)]
pub struct Stopped {
    pub name: String,
    /// The host it ran on.
    pub host: String,
    /// Its state there now.
    pub state: String,
}

/// Stops app `name` where it runs, drops what it left on the shims it
/// moved away from (its published ports there), and forgets it (by
/// compare-and-swap: if another CLI moved or redeployed it meanwhile, a
/// conflict). An app recorded on a host that does not have it is
/// forgotten, and the outcome is [`FleetError::NotFound`].
pub fn stop(
    fleet: &Fleet,
    name: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<Stopped, FleetError> {
    let loc = match locate(fleet, name) {
        Ok(loc) => loc,
        Err(FleetError::NotFound(why)) if fleet.app(name)?.is_some() => {
            fleet.remove_app(name, Expect::Any)?;
            return Err(FleetError::NotFound(format!(
                "{why}; removed it from the fleet state"
            )));
        }
        Err(e) => return Err(e),
    };
    let info: InstanceInfo = loc.live.client.stop(name)?;
    // What it left on the shims it moved away from: found on the way, or
    // on any other fleet host (the store only knows where it runs now).
    let mut left: Vec<(String, Client)> =
        loc.left.into_iter().map(|h| (h.label, h.client)).collect();
    for host in fleet.hosts()? {
        if left.iter().any(|(l, _)| *l == host.name) || host.name == loc.live.label {
            continue;
        }
        let client = client_for(&host)?;
        match client.list() {
            Ok(list) => {
                if list
                    .iter()
                    .any(|i| i.name == name && i.state.moved_to().is_some())
                {
                    left.push((host.name, client));
                }
            }
            Err(e) => progress(Progress::Warning(format!(
                "cannot look for {name}'s ports on {}: {e}",
                host.name
            ))),
        }
    }
    for (label, client) in &left {
        if let Err(e) = client.stop(name) {
            progress(Progress::Warning(format!("{name}'s ports on {label}: {e}")));
        }
    }
    fleet.remove_app(name, Expect::Version(loc.app.version))?;
    fleet.note(Event::new(
        Kind::Stop,
        Some(name),
        &[&loc.live.label],
        serde_json::Value::Null,
    ));
    Ok(Stopped {
        name: name.to_owned(),
        host: loc.live.label,
        state: info.state.to_string(),
    })
}

/// Who owns an app, as [`reclaim`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// This host owns it (its record was rewritten: a takeover that read
    /// the record before now fails its compare-and-swap).
    Ours,
    /// Another host owns it now.
    Theirs(String),
    /// The store has no record of it (not deployed through the fleet).
    Unrecorded,
}

/// Checks that host `me` still owns app `name` before it resumes running
/// it (a host that restarted or was cut off), by compare-and-swap: the
/// record is written again unchanged, so of this and a takeover that both
/// read the same version, exactly one wins.
pub fn reclaim(fleet: &Fleet, name: &str, me: &str) -> Result<Ownership, FleetError> {
    for _ in 0..CAS_ATTEMPTS {
        let Some(app) = fleet.app(name)? else {
            return Ok(Ownership::Unrecorded);
        };
        if app.value.host != me {
            return Ok(Ownership::Theirs(app.value.host));
        }
        match fleet.put_app(&app.value, Expect::Version(app.version)) {
            Ok(_) => return Ok(Ownership::Ours),
            // Changed meanwhile: read it again.
            Err(FleetError::Store(StoreError::Conflict { .. })) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(FleetError::Conflict(format!(
        "the record of {name} keeps changing: cannot check who owns it"
    )))
}

/// Makes host `to`, where app `name` arrives by live migration from
/// `from`, its owner before the guest starts there: a compare-and-swap
/// from `from` (already `to`: nothing to do). Another owner (the app was
/// taken over meanwhile, e.g. `from`'s lease lapsed) is
/// [`Ownership::Theirs`]: the guest must not start here. A standby that
/// read the record before this move then loses its takeover.
pub fn move_in(fleet: &Fleet, name: &str, from: &str, to: &str) -> Result<Ownership, FleetError> {
    for _ in 0..CAS_ATTEMPTS {
        let Some(app) = fleet.app(name)? else {
            return Ok(Ownership::Unrecorded);
        };
        if app.value.host == to {
            return Ok(Ownership::Ours);
        }
        if app.value.host != from {
            return Ok(Ownership::Theirs(app.value.host));
        }
        let mut mine = app.value.clone();
        mine.host = to.to_owned();
        match fleet.put_app(&mine, Expect::Version(app.version)) {
            Ok(_) => return Ok(Ownership::Ours),
            Err(FleetError::Store(StoreError::Conflict { .. })) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(FleetError::Conflict(format!(
        "the record of {name} keeps changing: cannot move it to {to}"
    )))
}

/// Most compare-and-swap attempts of [`reclaim`] and [`move_in`].
const CAS_ATTEMPTS: usize = 8;

/// Makes host `to` the owner of app `name`, which host `from` owned, if
/// `from` registered itself and its lease lapsed: a compare-and-swap on
/// the version of the record read *before* looking at `from`'s lease, so
/// that of several hosts taking it over, or of a taker and `from` coming
/// back ([`reclaim`]), exactly one wins. Losing is
/// [`FleetError::Conflict`]; an app no longer recorded is
/// [`FleetError::NotFound`].
pub fn take_over(fleet: &Fleet, name: &str, from: &str, to: &str) -> Result<App, FleetError> {
    let app = fleet
        .app(name)?
        .ok_or_else(|| FleetError::NotFound(format!("the fleet has no app '{name}'")))?;
    if app.value.host != from {
        return Err(FleetError::Conflict(format!(
            "{name} is owned by {} now, not {from}",
            app.value.host
        )));
    }
    if !fleet.lapsed(from)? {
        return Err(FleetError::Conflict(format!(
            "host {from} holds its lease: {name} stays there"
        )));
    }
    let mut mine = app.value.clone();
    mine.host = to.to_owned();
    match fleet.put_app(&mine, Expect::Version(app.version)) {
        Ok(_) => Ok(mine),
        Err(FleetError::Store(StoreError::Conflict { .. })) => {
            let now = fleet.app(name)?.map(|a| a.value.host);
            Err(FleetError::Conflict(format!(
                "{name} was taken by {} first",
                now.as_deref().unwrap_or("nobody (removed)")
            )))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{temp_store, FileStore};

    /// Several hosts race to take over one app of a host that went down:
    /// exactly one wins; then the old host coming back finds it owned.
    #[test]
    fn one_taker_wins_and_the_old_host_finds_its_app_taken() {
        let (store, dir) = temp_store("takeover");
        let path = store.path().to_owned();
        let fleet = Fleet::new(Box::new(store));
        let a = Host {
            name: "a".into(),
            url: "http://127.0.0.1:1".into(),
            registered: true,
            ..Host::default()
        };
        fleet.put_host(&a, Expect::Absent).unwrap();
        let app = App {
            name: "kv".into(),
            host: "a".into(),
            image: "sha256:00".into(),
        };
        fleet.put_app(&app, Expect::Absent).unwrap();
        let won: Vec<bool> = std::thread::scope(|s| {
            let takers: Vec<_> = ["b", "c", "d", "e"]
                .into_iter()
                .map(|to| {
                    let path = &path;
                    s.spawn(move || {
                        let fleet = Fleet::new(Box::new(FileStore::new(path)));
                        match take_over(&fleet, "kv", "a", to) {
                            Ok(app) => {
                                assert_eq!(app.host, to);
                                true
                            }
                            Err(FleetError::Conflict(_)) => false,
                            Err(e) => panic!("{e}"),
                        }
                    })
                })
                .collect();
            takers.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
        let owner = fleet.app("kv").unwrap().unwrap().value.host;
        assert_ne!(owner, "a");
        assert_eq!(
            reclaim(&fleet, "kv", "a").unwrap(),
            Ownership::Theirs(owner.clone())
        );
        assert_eq!(reclaim(&fleet, "kv", &owner).unwrap(), Ownership::Ours);
        assert_eq!(
            reclaim(&fleet, "other", "a").unwrap(),
            Ownership::Unrecorded
        );
        // A host with a live lease keeps its apps; an unregistered one
        // (added by hand) is never taken from.
        fleet
            .store
            .put("alive/b", serde_json::json!({}), Expect::Any)
            .unwrap();
        fleet
            .put_app(
                &App {
                    host: "b".into(),
                    ..app.clone()
                },
                Expect::Any,
            )
            .unwrap();
        assert!(matches!(
            take_over(&fleet, "kv", "b", "c"),
            Err(FleetError::Conflict(_))
        ));
        assert!(matches!(
            take_over(&fleet, "gone", "a", "c"),
            Err(FleetError::NotFound(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
