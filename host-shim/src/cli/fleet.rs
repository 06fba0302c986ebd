//! The fleet commands: `fleet add/ls/rm`, `deploy`, `ps`, `logs`,
//! `migrate`, `stop`, `events`. The operations themselves are the `fleet`
//! crate's ([`fleet::ops`], [`fleet::events`]); this module renders what
//! they return. Each returns its exit status ([`exit`]) or a
//! [`FleetError`] (whose status [`FleetError::exit_code`] gives); tables go
//! to stdout, progress bars and notes to stderr, `--json` prints one JSON
//! document on stdout instead of the table (`events --json`: one per line).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use api::images::HASH_PREFIX;
use api::migration::human;
use api::{Client, ClientError, LogEvent, MigrationEvent, ShimInfo};
use fleet::events::{Event, Kind};
use fleet::locate::{hop_to, locate, record_move};
use fleet::ops::{self, DeployRequest, Progress};
use fleet::store::Expect;
use fleet::{client_for, exit, Fleet, FleetError, Host};

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
    /// `apps`: how many apps each host runs.
    fn new(
        h: &'a Host,
        apps: &HashMap<&str, usize>,
        alive: &std::collections::BTreeSet<String>,
    ) -> Self {
        Self {
            name: &h.name,
            url: &h.url,
            region: &h.region,
            fingerprint: h.fingerprint.as_deref(),
            token: h.token.is_some(),
            apps: apps.get(h.name.as_str()).copied().unwrap_or(0),
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
        print_json(&HostView::new(&host, &HashMap::new(), &Default::default()));
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
    let mut per_host: HashMap<&str, usize> = HashMap::new();
    for a in &apps {
        *per_host.entry(a.host.as_str()).or_default() += 1;
    }
    let views: Vec<HostView> = hosts
        .iter()
        .map(|h| HostView::new(h, &per_host, &alive))
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

/// `deploy IMAGE --on HOST --name NAME`: [`ops::deploy`] of `req` with the
/// image read from `image`, with an upload bar.
pub fn deploy(
    fleet: &Fleet,
    image: &Path,
    req: DeployRequest,
    json: bool,
) -> Result<u8, FleetError> {
    let req = DeployRequest {
        image: std::fs::read(image).map_err(|e| {
            FleetError::Failed(format!("cannot read the image {}: {e}", image.display()))
        })?,
        source: image.display().to_string(),
        ..req
    };
    let mut upload: Option<ProgressBar> = None;
    let result = ops::deploy(fleet, req, &mut |p| match p {
        Progress::Upload { host, sent, total } => {
            let bar = upload.get_or_insert_with(|| {
                let bar = bar(
                    Some(total),
                    "uploading {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    json,
                );
                bar.set_message(format!("to {host}"));
                bar
            });
            bar.set_position(sent);
        }
        other => note(other),
    });
    if let Some(bar) = upload {
        bar.finish_and_clear();
    }
    let out = result?;
    if json {
        print_json(&out);
    } else {
        println!(
            "{} runs on {} ({}) at {}{}: image {} {} ({}), {:.0} ms",
            out.name,
            out.host,
            out.region,
            out.ip.map_or_else(|| "-".into(), |a| a.to_string()),
            if out.publish.is_empty() {
                String::new()
            } else {
                format!(", ports {}", out.publish.join(", "))
            },
            out.image
                .get(..HASH_PREFIX.len() + 12)
                .unwrap_or(&out.image),
            if out.uploaded {
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

/// A progress note of an operation, on stderr.
fn note(p: Progress) {
    match p {
        Progress::Warning(w) => eprintln!("warning: {w}"),
        Progress::Migration(e) => eprintln!("{e}"),
        Progress::Upload { .. } => {}
    }
}

// ---- ps ----

/// `ps`: [`ops::ps`] as a table; status [`exit::UNREACHABLE`] if a host
/// did not answer.
pub fn ps(fleet: &Fleet, all: bool, json: bool) -> Result<u8, FleetError> {
    let out = ops::ps(fleet, all)?;
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
                r.ip.map_or_else(|| "-".into(), |a| a.to_string()),
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

/// `migrate NAME --to HOST`: [`ops::migrate`], with a progress line.
pub fn migrate(fleet: &Fleet, name: &str, to: &str, json: bool) -> Result<u8, FleetError> {
    let bar = bar(None, "{spinner} {elapsed_precise} {wide_msg}", json);
    bar.set_message(format!("migrating {name} to {to}"));
    let result = ops::migrate(fleet, name, to, &mut |p| match p {
        // Phases above the spinner (stderr); the outcome on stdout.
        Progress::Migration(event) if bar.is_hidden() => {
            if !json {
                println!("{event}");
            }
        }
        Progress::Migration(event) => bar.println(event.to_string()),
        other => bar.suspend(|| note(other)),
    });
    bar.finish_and_clear();
    let out = result?;
    if json {
        print_json(&out);
    } else {
        println!("{}", out.summary);
    }
    Ok(exit::OK)
}

// ---- stop ----

/// `stop NAME`: [`ops::stop`].
pub fn stop(fleet: &Fleet, name: &str, json: bool) -> Result<u8, FleetError> {
    let out = ops::stop(fleet, name, &mut note)?;
    if json {
        print_json(&out);
    } else {
        println!("stopped {} on {}", out.name, out.host);
    }
    Ok(exit::OK)
}

// ---- events ----

/// Print the fleet's events (deploys, stops, migrations, hosts up and
/// down, scheduler leaders), oldest first; the store keeps the last 1,000.
#[derive(clap::Args)]
pub struct EventsArgs {
    /// Keep printing new events as they happen (until killed); a lost
    /// store is waited for and the stream resumes where it left off.
    #[arg(long, short)]
    follow: bool,
    /// Only the events after this revision (the REV column).
    #[arg(long, value_name = "REV", default_value_t = 0)]
    since: u64,
    /// One JSON object per line (rev, time, kind, app, hosts, details).
    #[arg(long)]
    json: bool,
}

/// `events`: the history after `--since`, then (`--follow`) what comes.
pub fn events(fleet: &Fleet, args: &EventsArgs) -> Result<u8, FleetError> {
    let mut stdout = std::io::stdout();
    if !args.json {
        let _ = writeln!(
            stdout,
            "{:>8}  {:<24} {:<18} {:<14} {:<20} DETAILS",
            "REV", "TIME", "KIND", "APP", "HOSTS"
        );
    }
    let mut print = |e: Event| {
        let line = if args.json {
            serde_json::to_string(&e).expect("serializable")
        } else {
            event_line(&e)
        };
        // A closed pipe ends a follow.
        writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_ok()
    };
    if args.follow {
        fleet::events::follow(fleet, args.since, &mut print)?;
    } else {
        for e in fleet.events(args.since)? {
            if !print(e) {
                break;
            }
        }
    }
    Ok(exit::OK)
}

/// An event as a table row.
fn event_line(e: &Event) -> String {
    let time = std::time::UNIX_EPOCH + Duration::try_from_secs_f64(e.time).unwrap_or_default();
    let details = match (e.kind, &e.details) {
        (_, serde_json::Value::Null) => String::new(),
        (Kind::MigrationDone, d) => match serde_json::from_value(d.clone()) {
            Ok(report) => MigrationEvent::Done(report).to_string(),
            Err(_) => d.to_string(),
        },
        (_, d) => d.to_string(),
    };
    format!(
        "{:>8}  {:<24} {:<18} {:<14} {:<20} {details}",
        e.rev,
        humantime::format_rfc3339_millis(time).to_string(),
        e.kind.to_string(),
        e.app.as_deref().unwrap_or("-"),
        match e.kind {
            _ if e.hosts.is_empty() => "-".to_owned(),
            Kind::MigrationStarted
            | Kind::MigrationDone
            | Kind::MigrationFailed
            | Kind::Takeover
            | Kind::TakeoverFailed => {
                e.hosts.join(" -> ")
            }
            _ => e.hosts.join(","),
        },
    )
}

/// The password env variable of `--store-user`.
pub(crate) const STORE_PASSWORD_ENV: &str = "HOST_SHIM_STORE_PASSWORD";

/// How to reach an etcd store over TLS and as an etcd user (global flags;
/// the password never on the command line).
#[derive(clap::Args, Clone, Default)]
pub(crate) struct StoreAccessArgs {
    /// With --store etcd://...: reach its members over TLS, trusting this
    /// CA's certificate (PEM).
    #[arg(long, global = true, value_name = "FILE", env = "HOST_SHIM_STORE_CA")]
    store_ca: Option<std::path::PathBuf>,

    /// With --store-ca: this client certificate (PEM), for members started
    /// with --client-cert-auth.
    #[arg(long, global = true, value_name = "FILE", env = "HOST_SHIM_STORE_CERT")]
    store_cert: Option<std::path::PathBuf>,

    /// The key of --store-cert (PEM).
    #[arg(long, global = true, value_name = "FILE", env = "HOST_SHIM_STORE_KEY")]
    store_key: Option<std::path::PathBuf>,

    /// With --store etcd://...: authenticate as this etcd user (etcd auth
    /// enabled); the password from --store-password-file or
    /// $HOST_SHIM_STORE_PASSWORD.
    #[arg(long, global = true, value_name = "NAME", env = "HOST_SHIM_STORE_USER")]
    store_user: Option<String>,

    /// The file holding --store-user's password (its first line; `-`:
    /// standard input).
    #[arg(long, global = true, value_name = "FILE")]
    store_password_file: Option<std::path::PathBuf>,
}

impl StoreAccessArgs {
    /// The store access these flags ask for, with the password read.
    pub(crate) fn access(&self) -> anyhow::Result<fleet::store::Access> {
        let password = match &self.store_password_file {
            Some(file) => Some(read_password(file)?),
            None => std::env::var(STORE_PASSWORD_ENV)
                .ok()
                .filter(|p| !p.is_empty()),
        };
        if password.is_some() && self.store_user.is_none() {
            anyhow::bail!("a store password needs --store-user NAME");
        }
        Ok(fleet::store::Access {
            ca: self.store_ca.clone(),
            cert: self.store_cert.clone(),
            key: self.store_key.clone(),
            user: self.store_user.clone(),
            password,
        })
    }
}

/// The first line of `file` (`-`: standard input), at most 4 KiB read.
fn read_password(file: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    const MAX: u64 = 4096;
    let bytes = if file == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::io::stdin().lock(), MAX),
            &mut bytes,
        )
        .context("--store-password-file -: reading standard input")?;
        bytes
    } else {
        shim_util::files::read_capped(file, MAX)
            .with_context(|| format!("--store-password-file {}", file.display()))?
    };
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("--store-password-file {}: not text", file.display()))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        anyhow::bail!("--store-password-file {}: empty", file.display());
    }
    Ok(line.to_owned())
}
