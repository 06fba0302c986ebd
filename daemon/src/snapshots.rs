//! Saving an instance: a whole-VM snapshot (`POST .../snapshot`), an app
//! checkpoint (`POST .../checkpoint`), and where the daemon may write
//! the files they name.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use api::{CheckpointInfo, CheckpointRequest, SnapshotInfo, SnapshotRequest};
use vmm::machine;

use crate::instance::State;
use crate::limits::check_name;
use crate::{bad, not_found, ApiError, Daemon};

impl Daemon {
    /// Where a file the API asked for (`--out` of a snapshot or
    /// checkpoint, `--checkpoint-to`) goes. A daemon with a state directory
    /// writes only in its `STATE/KIND` directory (0700): `out` is a file
    /// name there, or a path of one (as an earlier answer gave it);
    /// anything else, `/etc/x` or `../x`, gets 403. A daemon without one
    /// (a plain daemon for tests and trusted networks) writes where told.
    pub(crate) fn output_path(&self, kind: &str, out: &str) -> Result<PathBuf, ApiError> {
        if out.is_empty() {
            return Err(bad(format!("{kind}: no output file given")));
        }
        let Some(state) = &self.config.state_dir else {
            return Ok(PathBuf::from(out));
        };
        let dir = state.join(kind);
        let path = Path::new(out);
        let file = match path.parent() {
            Some(p) if p.as_os_str().is_empty() || p == dir => path.file_name(),
            _ => None,
        };
        let file = file
            .and_then(|f| f.to_str())
            .filter(|f| check_name(f).is_ok())
            .ok_or_else(|| {
                ApiError(
                    403,
                    format!(
                        "this shim writes {kind} only to {}: give a file name (letters, digits, \
                         '-', '_', '.'), not {out:?}",
                        dir.display()
                    ),
                )
            })?;
        shim_util::files::private_dir(&dir)
            .map_err(|e| ApiError(500, format!("{}: {e}", dir.display())))?;
        Ok(dir.join(file))
    }

    pub(crate) fn snapshot(
        &self,
        name: &str,
        req: SnapshotRequest,
    ) -> Result<SnapshotInfo, ApiError> {
        let out = self.output_path("snapshots", &req.out)?;
        let handle = self.acquire(name, "snapshotting")?;
        let result = (|| {
            let start = Instant::now();
            let machine = handle
                .pause()
                .map_err(|e| ApiError(409, format!("cannot pause '{name}': {e}")))?;
            let saved = vmm::snapshot::save(&self.hv, &machine, &self.config.name, &out);
            handle.resume(machine);
            let paused_ms = start.elapsed().as_secs_f64() * 1e3;
            let stats = saved?;
            Ok(SnapshotInfo {
                file: out.display().to_string(),
                pages: stats.pages,
                bytes: stats.bytes,
                paused_ms,
            })
        })();
        self.release(name);
        result
    }

    /// Asks `name`'s app for a checkpoint and writes it to `req.out` when
    /// it arrives (the guest keeps running).
    pub(crate) fn checkpoint(
        &self,
        name: &str,
        req: CheckpointRequest,
    ) -> Result<CheckpointInfo, ApiError> {
        let out = self.output_path("checkpoints", &req.out)?;
        let (handle, latest) = {
            let instances = self.instances();
            let inst = instances.get(name).ok_or_else(|| not_found(name))?;
            match (&inst.state, &inst.handle) {
                (State::Running, Some(h)) => (Arc::clone(h), Arc::clone(&inst.checkpoints)),
                _ => {
                    return Err(ApiError(
                        409,
                        format!("instance '{name}' is not running ({})", inst.info().state),
                    ))
                }
            }
        };
        let start = Instant::now();
        let seen = latest.count();
        handle
            .request_checkpoint()
            .map_err(|e| ApiError(500, e.to_string()))?;
        let timeout = std::time::Duration::from_millis(req.timeout_ms.unwrap_or(10_000));
        let blob = loop {
            if let Some(blob) = latest.wait_after(seen, machine::KICK_INTERVAL * 4) {
                break Some(blob);
            }
            if start.elapsed() >= timeout {
                break None;
            }
            handle.wake();
        };
        let blob = blob.ok_or_else(|| {
            ApiError(
                504,
                format!(
                    "instance '{name}' handed over no checkpoint within {:.1} s: its app may \
                     not support checkpoints (libcloud::state) or be busy",
                    timeout.as_secs_f64()
                ),
            )
        })?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let describe = abi::checkpoint::decode(&blob)
            .map(|(c, _)| abi::checkpoint::describe(&c))
            .unwrap_or_default();
        shim_util::files::write_atomic(&out, &blob)
            .map_err(|e| ApiError(500, format!("cannot write {}: {e}", out.display())))?;
        Ok(CheckpointInfo {
            file: out.display().to_string(),
            bytes: blob.len() as u64,
            describe,
            ms,
        })
    }
}
