//! The fleet commands: `fleet add/ls/rm`, `deploy`, `ps`, `logs`,
//! `migrate`, `stop`, over the `fleet` crate's store and locator. Each
//! returns its exit status ([`exit`]) or a [`FleetError`] (whose status
//! [`FleetError::exit_code`] gives); tables go to stdout, progress bars and
//! notes to stderr, `--json` prints one JSON document on stdout instead of
//! the table.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use api::images::{sha256_hex, ImageInfo, HASH_PREFIX};
use api::migration::human;
use api::{
    Client, ClientError, InstanceInfo, InstanceState, LogEvent, MigrateRequest, MigrationEvent,
    PublishSpec, PushRequest, Restart, RestartRequest, RunRequest, ShimInfo,
};
use fleet::locate::{hop_to, locate, record_move};
use fleet::store::Expect;
use fleet::{client_for, exit, App, Fleet, FleetError, Host};

/// Prints `value` as JSON on stdout (a closed pipe is not an error).
fn print_json(value: &impl Serialize) {
    let text = serde_json::to_string_pretty(value).expect("serializable");
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// A progress bar on stderr (hidden when stderr is no terminal or for `--json`).
fn bar(len: Option<u64>, template: &str, json: bool) -> ProgressBar {
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    if json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn uptime(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{secs:.1}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

// ---- fleet add / ls / rm ----

/// A host as `fleet add/ls` show it: the token is never printed.
#[derive(Serialize)]
struct HostView<'a> {
    name: &'a str,
    url: &'a str,
    region: &'a str,
    fingerprint: Option<&'a str>,
    token: bool,
    apps: usize,
    /// `up`/`down` for a host that registers itself (by its lease), else `-`.
    state: &'static str,
    overlay: Option<&'a str>,
    capacity: Option<&'a fleet::Capacity>,
}

impl<'a> HostView<'a> {
    fn new(h: &'a Host, apps: &[App], alive: &std::collections::BTreeSet<String>) -> Self {
        Self {
            name: &h.name,
            url: &h.url,
            region: &h.region,
            fingerprint: h.fingerprint.as_deref(),
            token: h.token.is_some(),
            apps: apps.iter().filter(|a| a.host == h.name).count(),
            state: match (alive.contains(&h.name), h.registered) {
                (true, _) => "up",
                (false, true) => "down",
                (false, false) => "-",
            },
            overlay: h.overlay.as_deref(),
            capacity: h.capacity.as_ref(),
        }
    }
}

/// `fleet add NAME URL`: checks that the host answers, notes its region.
pub fn fleet_add(fleet: &Fleet, mut host: Host, json: bool) -> Result<u8, FleetError> {
    if host.name.is_empty() || host.name.contains(['/', ' ']) {
        return Err(FleetError::Failed(format!(
            "'{}' is not a host name (non-empty, no '/' or spaces)",
            host.name
        )));
    }
    if !host.url.contains("://") {
        host.url = format!("http://{}", host.url);
    }
    // A host that registered itself (`serve --store`) at this URL is
    // adopted: the user adds their token (and pins the same fingerprint).
    let old = fleet.host(&host.name)?;
    let expect = match &old {
        None => Expect::Absent,
        Some(v) if v.value.registered && v.value.url == host.url => {
            if let (Some(mine), Some(theirs)) = (&host.fingerprint, &v.value.fingerprint) {
                if !mine.eq_ignore_ascii_case(theirs) {
                    return Err(FleetError::Failed(format!(
                        "host {} registered the fingerprint {theirs}, not {mine}",
                        host.name
                    )));
                }
            }
            Expect::Version(v.version)
        }
        Some(v) => {
            return Err(FleetError::Failed(format!(
                "the fleet has a host '{}' already ({}): `host-shim fleet rm {}` first",
                host.name, v.value.url, host.name
            )))
        }
    };
    let info: ShimInfo = client_for(&host)?
        .info()
        .map_err(|e| refused_add(&host, e))?;
    host.region = info.region.clone();
    if let Some(v) = old {
        host = Host {
            token: host.token,
            region: host.region,
            ..v.value
        };
    }
    fleet.put_host(&host, expect)?;
    if json {
        print_json(&HostView::new(&host, &[], &Default::default()));
    } else {
        println!(
            "added {} ({}): shim '{}' in region {}, {} instance(s){}",
            host.name,
            host.url,
            info.name,
            info.region,
            info.instances,
            match info.max_image_bytes {
                Some(max) => format!(", accepts images up to {}", human(max)),
                None => ", keeps no images (no --state-dir): deploy to it will fail".into(),
            }
        );
    }
    Ok(exit::OK)
}

/// Why `fleet add` failed, with what to check when the host refused the
/// token or showed another certificate than the one given.
fn refused_add(host: &Host, e: ClientError) -> FleetError {
    let hint = match &e {
        ClientError::Api { status: 401, .. } => {
            "--token must be your user token on that host: its `host-shim init` printed it \
             (it is in the host's DIR/token)"
        }
        ClientError::Tls { .. } if host.fingerprint.is_some() => {
            "--fingerprint must be the host's: its `init` and `serve` print it, and \
             `host-shim peer list` on the host shows it"
        }
        _ => return e.into(),
    };
    FleetError::Failed(format!(
        "host {} ({}) was not added: {e}\n{hint}",
        host.name, host.url
    ))
}

/// `fleet ls`.
pub fn fleet_ls(fleet: &Fleet, json: bool) -> Result<u8, FleetError> {
    let hosts = fleet.hosts()?;
    let apps = fleet.apps()?;
    let alive = fleet.alive()?;
    let views: Vec<HostView> = hosts
        .iter()
        .map(|h| HostView::new(h, &apps, &alive))
        .collect();
    if json {
        print_json(&views);
        return Ok(exit::OK);
    }
    println!(
        "{:<14} {:<30} {:<12} {:<5} {:<5} {:>4} STATE",
        "NAME", "URL", "REGION", "PIN", "TOKEN", "APPS"
    );
    for h in views {
        println!(
            "{:<14} {:<30} {:<12} {:<5} {:<5} {:>4} {}",
            h.name,
            h.url,
            h.region,
            if h.fingerprint.is_some() { "yes" } else { "-" },
            if h.token { "yes" } else { "-" },
            h.apps,
            h.state
        );
    }
    Ok(exit::OK)
}

/// `fleet rm NAME`: the apps recorded on it stay recorded (and running).
pub fn fleet_rm(fleet: &Fleet, name: &str) -> Result<u8, FleetError> {
    fleet.need_host(name)?;
    fleet.remove_host(name)?;
    let left: Vec<String> = fleet
        .apps()?
        .into_iter()
        .filter(|a| a.host == name)
        .map(|a| a.name)
        .collect();
    println!("removed host {name} from the fleet");
    if !left.is_empty() {
        eprintln!(
            "note: the fleet still records {} on {name}; they keep running there",
            left.join(", ")
        );
    }
    Ok(exit::OK)
}

// ---- deploy ----

/// What `deploy` runs.
pub struct DeployOptions<'a> {
    pub image: &'a Path,
    pub on: &'a str,
    pub name: &'a str,
    pub mem: u64,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    /// Published ports.
    pub publish: Vec<PublishSpec>,
    pub restart: Restart,
    pub checkpoint_every_ms: Option<u64>,
}

#[derive(Serialize)]
struct Deployed {
    name: String,
    host: String,
    region: String,
    image: String,
    bytes: u64,
    uploaded: bool,
    ip: Option<String>,
    publish: Vec<String>,
    restart: Restart,
    /// From the start of the command to the instance running.
    ms: f64,
}

/// Makes sure image `hash` (`bytes`) is on the shim behind `client`;
/// returns whether it had to be uploaded.
fn ensure_image(
    client: &Client,
    host: &Host,
    hash: &str,
    bytes: &[u8],
    json: bool,
) -> Result<bool, FleetError> {
    match client.image::<ImageInfo>(hash) {
        Ok(_) => return Ok(false),
        Err(ClientError::Api { status: 404, .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let bar = bar(
        Some(bytes.len() as u64),
        "uploading {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        json,
    );
    bar.set_message(format!("to {}", host.name));
    let answer = client.put_image::<ImageInfo>(hash, bytes, |sent| bar.set_position(sent));
    bar.finish_and_clear();
    answer.map_err(|e| match e {
        ClientError::Api { message, .. } => {
            FleetError::Failed(format!("host {} refused the image: {message}", host.name))
        }
        e => e.into(),
    })?;
    Ok(true)
}

/// `deploy IMAGE --on HOST --name NAME`: uploads the image (unless the host
/// has it) and runs it there.
pub fn deploy(fleet: &Fleet, o: DeployOptions<'_>, json: bool) -> Result<u8, FleetError> {
    let start = Instant::now();
    let host = fleet.need_host(o.on)?;
    if let Some(app) = fleet.app(o.name)? {
        return Err(FleetError::Failed(format!(
            "the fleet has an app '{}' already (on {}): `host-shim stop {}` first, or pick another --name",
            o.name, app.value.host, o.name
        )));
    }
    let bytes = std::fs::read(o.image).map_err(|e| {
        FleetError::Failed(format!("cannot read the image {}: {e}", o.image.display()))
    })?;
    let hash = sha256_hex(&bytes);
    let client = client_for(&host)?;
    let info: ShimInfo = client.info()?;
    let max = info.max_image_bytes.ok_or_else(|| {
        FleetError::Failed(format!(
            "host {} keeps no images: start its shim with `host-shim serve --state-dir DIR`",
            host.name
        ))
    })?;
    if bytes.len() as u64 > max {
        return Err(FleetError::Failed(format!(
            "{} is {}, over host {}'s limit of {} (serve --max-image-size)",
            o.image.display(),
            human(bytes.len() as u64),
            host.name,
            human(max)
        )));
    }
    let uploaded = ensure_image(&client, &host, &hash, &bytes, json)?;
    let image = format!("{HASH_PREFIX}{hash}");
    let req = RunRequest {
        name: o.name.to_owned(),
        image: image.clone(),
        mem: o.mem,
        env: o.env,
        args: o.args,
        publish: o.publish,
        checkpoint_every_ms: o.checkpoint_every_ms,
        restart: o.restart,
        ..RunRequest::default()
    };
    let inst: InstanceInfo = client.run(&req).map_err(|e| match e {
        ClientError::Api { message, .. } => FleetError::Failed(format!(
            "host {} refused to run {}: {message}",
            host.name, o.name
        )),
        e => e.into(),
    })?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    fleet.put_app(
        &App {
            name: o.name.to_owned(),
            host: host.name.clone(),
            image: image.clone(),
        },
        Expect::Absent,
    )?;
    let out = Deployed {
        name: inst.name,
        host: host.name,
        region: info.region,
        image,
        bytes: bytes.len() as u64,
        uploaded,
        ip: inst.ip,
        publish: inst.publish,
        restart: o.restart,
        ms,
    };
    if json {
        print_json(&out);
    } else {
        println!(
            "{} runs on {} ({}) at {}{}: image sha256:{} {} ({}), {:.0} ms",
            out.name,
            out.host,
            out.region,
            out.ip.as_deref().unwrap_or("-"),
            if out.publish.is_empty() {
                String::new()
            } else {
                format!(", ports {}", out.publish.join(", "))
            },
            &hash[..12],
            if uploaded {
                "uploaded"
            } else {
                "already there"
            },
            human(out.bytes),
            out.ms
        );
    }
    Ok(exit::OK)
}

// ---- ps ----

#[derive(Serialize)]
struct PsRow {
    name: String,
    host: String,
    region: String,
    #[serde(flatten)]
    state: InstanceState,
    uptime_s: f64,
    mem: u64,
    ip: Option<String>,
    publish: Vec<String>,
    restart: Restart,
}

#[derive(Serialize)]
struct Unreachable {
    host: String,
    error: String,
}

#[derive(Serialize)]
struct Ps {
    instances: Vec<PsRow>,
    unreachable: Vec<Unreachable>,
}

/// `ps`: every instance on every fleet host (those that moved away only
/// with `all`). Hosts that do not answer are reported; the status is then
/// [`exit::UNREACHABLE`]. Where an app runs elsewhere than the fleet file
/// says (moved by another tool), the file is corrected.
pub fn ps(fleet: &Fleet, all: bool, json: bool) -> Result<u8, FleetError> {
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
    // Where the shims say an app runs wins over the file.
    for app in fleet.apps()? {
        let here = out
            .instances
            .iter()
            .find(|r| r.name == app.name && r.state == InstanceState::Running);
        if let Some(row) = here.filter(|r| r.host != app.host) {
            record_move(fleet, &app.name, &row.host)?;
        }
    }
    if json {
        print_json(&out);
    } else {
        println!(
            "{:<16} {:<12} {:<10} {:<24} {:>9} {:>6}  {:<16} PORTS",
            "NAME", "HOST", "REGION", "STATE", "UPTIME", "MEM", "IP"
        );
        for r in &out.instances {
            println!(
                "{:<16} {:<12} {:<10} {:<24} {:>9} {:>5}M  {:<16} {}",
                r.name,
                r.host,
                r.region,
                r.state,
                uptime(r.uptime_s),
                r.mem >> 20,
                r.ip.as_deref().unwrap_or("-"),
                r.publish.join(", ")
            );
        }
        for u in &out.unreachable {
            eprintln!("warning: host {} did not answer: {}", u.host, u.error);
        }
    }
    Ok(if out.unreachable.is_empty() {
        exit::OK
    } else {
        exit::UNREACHABLE
    })
}

// ---- logs ----

/// `logs NAME` (fleet): the console where the app runs now.
pub fn logs(fleet: &Fleet, name: &str, follow: bool) -> Result<u8, FleetError> {
    let loc = locate(fleet, name)?;
    if follow {
        return follow_logs(loc.live.client, &loc.live.label, name, Some(fleet));
    }
    let text = loc.live.client.logs(name)?;
    let _ = std::io::stdout().write_all(text.as_bytes());
    Ok(exit::OK)
}

/// Streams `name`'s console from the shim behind `client`, and from each
/// shim it moves to after that, until it ends. Notes go to stderr.
pub fn follow_logs(
    mut client: Client,
    label: &str,
    name: &str,
    fleet: Option<&Fleet>,
) -> Result<u8, FleetError> {
    let mut label = label.to_owned();
    loop {
        let mut moved = None;
        let mut ended = None;
        let mut stdout = std::io::stdout();
        client.follow_logs(name, |event: LogEvent| {
            if let Some(text) = event.line {
                let _ = writeln!(stdout, "{text}");
                let _ = stdout.flush();
            }
            if event.moved_to.is_some() {
                moved = event.moved_to;
            }
            if event.end.is_some() {
                ended = event.end;
            }
        })?;
        match (moved, ended) {
            (Some(addr), _) => {
                let next = hop_to(fleet, &addr)?;
                eprintln!(
                    "-- {name} moved from {label} to {}; following it there",
                    next.label
                );
                if let (Some(f), Some(h)) = (fleet, &next.host) {
                    record_move(f, name, &h.name)?;
                }
                client = next.client;
                label = next.label;
            }
            (None, Some(why)) => {
                eprintln!("-- {name} on {label}: {why}");
                return Ok(exit::OK);
            }
            (None, None) => {
                return Err(FleetError::Failed(format!(
                    "the shim {label} closed the log stream of {name} (did it stop?)"
                )))
            }
        }
    }
}

// ---- migrate ----

#[derive(Serialize)]
struct Migrated {
    name: String,
    from: String,
    to: String,
    region: String,
    downtime_ms: f64,
    total_ms: f64,
    bytes: u64,
    rounds: usize,
    summary: String,
}

/// `migrate NAME --to HOST`: moves the app live, with a progress line,
/// and records its new host. An app that restarts with its shim
/// (`--restart always`) has its image copied to the destination first and
/// keeps that policy there.
pub fn migrate(fleet: &Fleet, name: &str, to: &str, json: bool) -> Result<u8, FleetError> {
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
            eprintln!(
                "warning: cannot copy {name}'s image to {to} ({e}): it will not restart with that shim"
            );
        }
    }
    let bar = bar(None, "{spinner} {elapsed_precise} {wide_msg}", json);
    bar.set_message(format!("migrating {name} from {} to {to}", loc.live.label));
    let result = loc.live.client.migrate(
        name,
        &MigrateRequest {
            to: dest.addr().to_owned(),
            fingerprint: dest.fingerprint.clone(),
        },
        |event| {
            // Phases above the spinner (stderr); the outcome on stdout.
            if bar.is_hidden() {
                if !json && !event.is_last() {
                    println!("{event}");
                }
            } else if !event.is_last() {
                bar.println(event.to_string());
            }
        },
    );
    bar.finish_and_clear();
    let report = result.map_err(|e| match e {
        ClientError::Migration { error, .. } => {
            FleetError::Failed(format!("migration of {name} to {to} failed: {error}"))
        }
        e => FleetError::Failed(format!("migration of {name} to {to} failed: {e}")),
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
            eprintln!("warning: {name} will not restart with {to}'s shim: {e}");
        }
    }
    record_move(fleet, name, &dest.name)?;
    let out = Migrated {
        name: name.to_owned(),
        from: loc.live.label,
        to: dest.name,
        region: dest.region,
        downtime_ms: report.downtime_ms,
        total_ms: report.total_ms,
        bytes: report.bytes,
        rounds: report.rounds,
        summary: summary.clone(),
    };
    if json {
        print_json(&out);
    } else {
        println!("{summary}");
    }
    Ok(exit::OK)
}

// ---- stop ----

/// `stop NAME`: stops the app where it runs, drops what it left on the
/// shims it moved away from (its published ports there), and forgets it.
pub fn stop(fleet: &Fleet, name: &str, json: bool) -> Result<u8, FleetError> {
    let loc = match locate(fleet, name) {
        Ok(loc) => loc,
        Err(FleetError::NotFound(why)) if fleet.app(name)?.is_some() => {
            fleet.remove_app(name, Expect::Any)?;
            return Err(FleetError::NotFound(format!(
                "{why}; removed it from the fleet file"
            )));
        }
        Err(e) => return Err(e),
    };
    let info: InstanceInfo = loc.live.client.stop(name)?;
    // What it left on the shims it moved away from: found on the way, or
    // on any other fleet host (the file only knows where it runs now).
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
            Err(e) => eprintln!(
                "warning: cannot look for {name}'s ports on {}: {e}",
                host.name
            ),
        }
    }
    for (label, client) in &left {
        if let Err(e) = client.stop(name) {
            eprintln!("warning: {name}'s ports on {label}: {e}");
        }
    }
    fleet.remove_app(name, Expect::Any)?;
    if json {
        print_json(&serde_json::json!({
            "name": name,
            "host": loc.live.label,
            "state": info.state.to_string(),
        }));
    } else {
        println!("stopped {name} on {}", loc.live.label);
    }
    Ok(exit::OK)
}
