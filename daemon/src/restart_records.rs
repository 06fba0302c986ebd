//! What a daemon started with `--state-dir DIR` remembers across its own
//! restarts: one file per instance, `DIR/instances/NAME.json`, holding the
//! [`RunRequest`] that brings it back (image by hash or path, memory,
//! environment, arguments, published ports, address, restart policy,
//! checkpoint settings).
//!
//! The guest's VM dies with the daemon's process, so bringing an instance
//! back means booting its image again, with the same address and ports,
//! and handing the app its latest checkpoint if it wrote one
//! (`CHECKPOINT_DIR/latest.ckpt`). Only instances whose policy is
//! [`Restart::Always`] are recorded; `stop` and a migration away forget
//! them. Records are written atomically (temp file, fsync, rename), mode
//! 0600 in a 0700 directory (`shim_util::files`).

use std::path::{Path, PathBuf};

use super::{bad, not_found, ApiError, Daemon};
use api::{InstanceInfo, RunRequest};

pub use ::api::Restart;

/// An instance recorded in the state directory, booted again as the
/// daemon started.
#[derive(Debug)]
pub struct BroughtBack {
    pub name: String,
    /// The checkpoint it was restored from, if it had one.
    pub checkpoint: Option<String>,
    /// It runs again, or why not.
    pub result: Result<InstanceInfo, String>,
}

/// Largest instance record read back.
const MAX_RECORD: u64 = 1 << 20;

/// The instance records of one state directory.
#[derive(Debug)]
pub struct RestartRecords {
    dir: PathBuf,
}

impl RestartRecords {
    /// Opens (creating) `state_dir/instances`; both are made private
    /// (0700, ours): records hold environments, e.g. passwords.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("instances");
        shim_util::files::private_dir(state_dir)?;
        shim_util::files::private_dir(&dir)?;
        Ok(Self { dir })
    }

    /// The record of `name` (one path component: `run` refuses names
    /// with a `/` or a leading `.`; a `/` from elsewhere is replaced here).
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{}.json", name.replace('/', "_")))
    }

    /// Where an instance's checkpoints go when its run names no directory.
    pub fn checkpoint_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.checkpoints"))
    }

    /// Records `req` (the instance runs now); a `never` instance is forgotten.
    pub fn save(&self, req: &RunRequest) -> std::io::Result<()> {
        if req.restart != Restart::Always {
            return self.forget(&req.name);
        }
        let mut req = req.clone();
        // Restoring is what a restart decides, from the latest checkpoint.
        req.restore = None;
        let json = serde_json::to_vec_pretty(&req).map_err(std::io::Error::other)?;
        shim_util::files::write_atomic(&self.file(&req.name), &json)
    }

    /// Forgets instance `name` (stopped, or moved away).
    pub fn forget(&self, name: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.file(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The recorded instances, each with the checkpoint to restore from
    /// (its app's latest, if there is one). Unreadable records are
    /// reported and skipped, never deleted.
    pub fn load(&self) -> Vec<RunRequest> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(
                    path = %self.dir.display(),
                    error = %e,
                    "cannot read the instance records",
                );
                return out;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let parsed = shim_util::files::read_capped(&path, MAX_RECORD)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<RunRequest>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(mut req) => {
                    req.restore = req
                        .checkpoint_to
                        .as_deref()
                        .map(|d| Path::new(d).join("latest.ckpt"))
                        .filter(|f| f.is_file())
                        .map(|f| f.display().to_string());
                    out.push(req);
                }
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "skipping an instance record"
                ),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl Daemon {
    /// `POST /v1/instances`: boots `req` (an image by path or by
    /// `sha256:HEX`) and records it when its policy says so.
    pub(super) fn run_recorded(&self, mut req: RunRequest) -> Result<InstanceInfo, ApiError> {
        super::check_name(&req.name)?;
        if let Some(dir) = &req.checkpoint_to {
            let dir = self.output_path("checkpoints", dir)?;
            shim_util::files::private_dir(&dir)
                .map_err(|e| ApiError(500, format!("{}: {e}", dir.display())))?;
            req.checkpoint_to = Some(dir.display().to_string());
        }
        if let (Some(p), Some(_), None) =
            (&self.persist, req.checkpoint_every_ms, &req.checkpoint_to)
        {
            let dir = p.checkpoint_dir(&req.name);
            shim_util::files::private_dir(&dir)
                .map_err(|e| ApiError(500, format!("{}: {e}", dir.display())))?;
            req.checkpoint_to = Some(dir.display().to_string());
        }
        if req.restart == Restart::Always && self.persist.is_none() {
            return Err(bad(
                "--restart always needs a shim started with --state-dir (it keeps nothing otherwise)",
            ));
        }
        let mut boot = req.clone();
        boot.image = self.image_file(&req.image)?;
        let mut info = self.run(boot)?;
        if let Some(p) = &self.persist {
            // The address it got, so that it gets it again.
            req.ip = self
                .instances()
                .get(&req.name)
                .and_then(|i| i.spec.nic)
                .map(|n| n.ip);
            if let Err(e) = p.save(&req) {
                tracing::error!(instance = %req.name, error = %e, "cannot record instance");
            }
        }
        info.restart = req.restart;
        Ok(info)
    }

    /// Boots the instances recorded in the state directory again; says
    /// how each went. With a fleet store, only those this host still owns
    /// ([`crate::fence`]): another host's are forgotten, and nothing is
    /// booted while the store cannot say.
    pub(super) fn bring_back(&self) -> Vec<BroughtBack> {
        let Some(p) = &self.persist else {
            return Vec::new();
        };
        p.load()
            .into_iter()
            .map(|req| {
                if let Some(link) = &self.config.fleet {
                    let fenced = match link.may_resume(&req.name, &self.config.name) {
                        Ok(crate::fence::Verdict::Run) => None,
                        Ok(crate::fence::Verdict::Fenced(owner)) => {
                            self.forget(&req.name);
                            Some(format!("fenced: {owner} owns it now (taken over)"))
                        }
                        Err(e) => Some(format!("not booted: cannot check who owns it: {e}")),
                    };
                    if let Some(why) = fenced {
                        tracing::warn!(
                            instance = %req.name,
                            reason = %why,
                            "its record is not booted",
                        );
                        return BroughtBack {
                            name: req.name,
                            checkpoint: None,
                            result: Err(why),
                        };
                    }
                }
                let mut boot = req.clone();
                let result = self.image_file(&req.image).and_then(|image| {
                    boot.image = image;
                    self.run(boot)
                });
                BroughtBack {
                    name: req.name,
                    checkpoint: req.restore,
                    result: result.map_err(|ApiError(_, why)| why),
                }
            })
            .collect()
    }

    /// `name`'s record and the image file it boots, if it is recorded.
    pub(super) fn restart_record(&self, name: &str) -> Option<(RunRequest, PathBuf)> {
        let p = self.persist.as_ref()?;
        let bytes = shim_util::files::read_capped(&p.file(name), MAX_RECORD).ok()?;
        let req: RunRequest = serde_json::from_slice(&bytes).ok()?;
        let image = self.image_file(&req.image).ok()?;
        Some((req, PathBuf::from(image)))
    }

    /// The restart record an incoming migration carries, as this daemon
    /// would have recorded a run of it: with this guest's image (by hash,
    /// in this daemon's store), its address, and this daemon's own
    /// checkpoint directory; none of the peer's paths or ports. Without a
    /// `--state-dir` here there is nothing to keep.
    pub(super) fn carry_in(&self, hello: &migration::protocol::Hello) -> Option<RunRequest> {
        let (Some(p), Some(record)) = (&self.persist, &hello.record) else {
            return None;
        };
        let checkpoints = record.checkpoint_to.is_some() || record.checkpoint_every_ms.is_some();
        Some(RunRequest {
            name: hello.name.clone(),
            image: format!("{}{}", super::images::HASH_PREFIX, hello.image.sha256),
            mem: hello.mem_size,
            ip: hello.nic.map(|n| n.ip),
            restore: None,
            checkpoint_to: checkpoints.then(|| p.checkpoint_dir(&hello.name).display().to_string()),
            standby: None,
            standby_grace_ms: None,
            // Its published ports stay with the daemon it left, which
            // forwards them over the overlay.
            publish: Vec::new(),
            ..record.clone()
        })
    }

    /// Where an instance migrating in keeps its checkpoints here, if
    /// anywhere (from the record it carried).
    pub(super) fn carried_checkpoint_dir(&self, name: &str) -> Option<PathBuf> {
        let dir = self
            .instances()
            .incoming(name)?
            .record
            .as_ref()?
            .checkpoint_to
            .clone()?;
        let dir = PathBuf::from(dir);
        match shim_util::files::private_dir(&dir) {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::error!(
                    instance = name,
                    path = %dir.display(),
                    error = %e,
                    "cannot keep its checkpoints"
                );
                None
            }
        }
    }

    /// Records the instance that came in as `name` (its guest runs here
    /// now), from the record its migration carried.
    pub(super) fn record_carried(&self, name: &str, req: RunRequest) {
        let Some(p) = &self.persist else {
            return;
        };
        if let Err(e) = self.image_file(&req.image) {
            tracing::warn!(instance = name, error = %e.1, "not recorded for restarts");
            return;
        }
        if let Err(e) = p.save(&req) {
            tracing::error!(instance = name, error = %e, "cannot record instance");
        }
    }

    /// Forgets `name`'s record (it was stopped or moved away).
    pub(super) fn forget(&self, name: &str) {
        if let Some(Err(e)) = self.persist.as_ref().map(|p| p.forget(name)) {
            tracing::error!(instance = name, error = %e, "cannot forget instance");
        }
    }

    /// Fills in an instance's restart policy from its record.
    pub(super) fn with_restart(&self, mut info: InstanceInfo) -> InstanceInfo {
        if let Some(p) = &self.persist {
            if p.file(&info.name).is_file() {
                info.restart = Restart::Always;
            }
        }
        info
    }

    /// `PUT /v1/instances/NAME/restart`: sets a running instance's policy
    /// (for one that migrated in, whose image must be in this shim's store).
    pub(super) fn set_restart(
        &self,
        name: &str,
        restart: Restart,
    ) -> Result<InstanceInfo, ApiError> {
        super::check_name(name)?;
        let persist = self.persist.as_ref().ok_or_else(|| {
            bad("this shim has no --state-dir: its instances cannot survive a restart")
        })?;
        let (info, req) = {
            let instances = self.instances();
            let inst = instances.get(name).ok_or_else(|| not_found(name))?;
            if !inst.is_live() {
                return Err(ApiError(
                    409,
                    format!("instance '{name}' is not running ({})", inst.info().state),
                ));
            }
            let spec = &inst.spec;
            let req = RunRequest {
                name: name.to_owned(),
                image: format!("{}{}", super::images::HASH_PREFIX, spec.image.sha256),
                mem: spec.mem_size,
                env: spec.env.clone(),
                args: spec.args.clone(),
                publish: inst.publish.clone(),
                ip: spec.nic.map(|n| n.ip),
                restart,
                ..RunRequest::default()
            };
            (inst.info(), req)
        };
        if restart == Restart::Always {
            // A restart boots the image: it must be here.
            self.image_file(&req.image)?;
        }
        persist
            .save(&req)
            .map_err(|e| ApiError(500, format!("cannot record instance {name}: {e}")))?;
        Ok(self.with_restart(info))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_always_instances_only_and_finds_their_checkpoint() {
        let dir = std::env::temp_dir().join(format!("host-shim-persist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = RestartRecords::open(&dir).unwrap();
        let ckpt = p.checkpoint_dir("kv");
        let mut req = RunRequest {
            name: "kv".into(),
            image: "sha256:00".into(),
            mem: 64 << 20,
            publish: vec!["127.0.0.1:6379:6379/tcp".parse().unwrap()],
            ip: Some(std::net::Ipv4Addr::new(10, 0, 2, 16)),
            restart: Restart::Always,
            checkpoint_every_ms: Some(100),
            checkpoint_to: Some(ckpt.display().to_string()),
            ..RunRequest::default()
        };
        p.save(&req).unwrap();
        let mut never = req.clone();
        never.name = "tmp".into();
        never.restart = Restart::Never;
        p.save(&never).unwrap();
        let loaded = p.load();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].publish, req.publish);
        assert_eq!(loaded[0].restore, None);

        std::fs::create_dir_all(&ckpt).unwrap();
        std::fs::write(ckpt.join("latest.ckpt"), b"x").unwrap();
        req.restore = p.load()[0].restore.clone();
        assert!(req.restore.unwrap().ends_with("latest.ckpt"));

        std::fs::write(dir.join("instances/bad.json"), b"{").unwrap();
        assert_eq!(p.load().len(), 1, "a bad record is skipped");
        p.forget("kv").unwrap();
        p.forget("kv").unwrap();
        assert!(p.load().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
