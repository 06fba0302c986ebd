//! The typed requests ([`api::routes::Request`]) to the daemon calls that
//! answer them: one arm per endpoint.

use std::sync::{mpsc, Arc};
use std::thread;

use api::server::Reply;
use api::{InstanceInfo, ShimInfo};

use crate::{bad, logs, not_found, openapi, standby, ApiError, Daemon, Method};

impl Daemon {
    fn info(&self) -> ShimInfo {
        let (instances, addresses) = {
            let instances = self.instances();
            (instances.len(), instances.address_use())
        };
        ShimInfo {
            name: self.config.name.clone(),
            region: self.config.region.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            gateway: self.config.gateway().to_string(),
            overlay: self.net.overlay_addr().map(|a| a.to_string()),
            instances,
            max_image_bytes: self.images.as_ref().map(|i| i.max_bytes()),
            fingerprint: self
                .config
                .security
                .as_ref()
                .map(|s| s.identity.fingerprint.to_string()),
            overlay_rejected: self.net.overlay_rejected(),
            limits: Some(self.config.limits.clone()),
            open_files: shim_util::sys::open_fds().unwrap_or(0) as u64,
            addresses: Some(addresses),
        }
    }

    /// Answers one API request: routed and typed by [`api::routes`], then
    /// one arm per endpoint.
    pub(crate) fn handle(
        self: &Arc<Self>,
        method: &Method,
        path: &str,
        body: &[u8],
    ) -> Result<Reply, ApiError> {
        use api::routes::Request;
        let json = |status: u16, v: &dyn erased::Json| Ok(Reply::Json(status, v.to_json()));
        let req =
            Request::parse(method, path, body).map_err(|e| ApiError(e.status(), e.to_string()))?;
        match req {
            Request::Health => json(
                200,
                &api::Health {
                    ok: true,
                    version: env!("CARGO_PKG_VERSION").into(),
                    uptime_s: self.started.elapsed().as_secs_f64(),
                },
            ),
            Request::Info => json(200, &self.info()),
            Request::Stats => json(200, &self.stats()),
            Request::List => {
                let list: Vec<InstanceInfo> = self
                    .instances()
                    .values()
                    .map(|i| self.with_restart(i.info()))
                    .collect();
                json(200, &list)
            }
            Request::Run(req) => json(201, &self.run_recorded(req)?),
            Request::SetRestart(name, req) => json(200, &self.set_restart(name, req.restart)?),
            Request::FollowLogs(name) => Ok(Reply::Stream(logs::follow(self, name)?)),
            Request::Image(hash) => json(200, &self.image_info(hash)?),
            Request::PutImage(hash, bytes) => {
                let info = self.store_image(hash, bytes)?;
                json(if info.stored { 201 } else { 200 }, &info)
            }
            Request::PushImage(hash, req) => json(200, &self.push_image(hash, &req.to)?),
            Request::OpenApi => Ok(Reply::Text(200, openapi::OPENAPI.to_owned())),
            Request::Logs(name) => {
                let instances = self.instances();
                let inst = instances.get(name).ok_or_else(|| not_found(name))?;
                let text = String::from_utf8_lossy(
                    &inst
                        .log
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contents(),
                )
                .into_owned();
                Ok(Reply::Text(200, text))
            }
            Request::Stop(name) => {
                let info = self.stop(name)?;
                self.forget(name);
                json(200, &info)
            }
            Request::Snapshot(name, req) => json(200, &self.snapshot(name, req)?),
            Request::Checkpoint(name, req) => json(200, &self.checkpoint(name, req)?),
            Request::Restore(req) => json(201, &self.restore(req)?),
            Request::Migrate(name, req) => {
                let (tx, rx) = mpsc::channel();
                let daemon = Arc::clone(self);
                let name = name.to_owned();
                thread::Builder::new()
                    .name(format!("migrate-{name}"))
                    .spawn(move || {
                        let cx = daemon.migration_context();
                        migration::source::migrate(&cx, &*daemon, &name, &req, &tx)
                    })
                    .map_err(|e| ApiError(500, e.to_string()))?;
                Ok(Reply::Stream(rx))
            }
            // The HTTP server upgrades the migration stream before this.
            Request::Migration => Err(ApiError(404, format!("no such endpoint: {method} {path}"))),
            Request::Standbys => json(200, &standby::list(self)),
            Request::Standby(body) => {
                let req = request(body, "standby")?;
                json(201, &standby::accept(self, req)?)
            }
            Request::StandbyCheckpoint(name, blob) => {
                json(200, &standby::receive(self, name, blob)?)
            }
        }
    }
}

/// A JSON request body of type `T` (`what` names it in the error).
fn request<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("bad {what} request: {e}")))
}

/// Serializing answers of different types through one closure.
mod erased {
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        }
    }
}
