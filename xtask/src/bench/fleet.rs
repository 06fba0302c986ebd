//! `cargo xtask bench fleet`: what the fleet's security costs a live migration.
//!
//! Two pairs of `host-shim serve` daemons on loopback, each hosting the kv app (64 MiB,
//! [`KEYS`] keys) under the same steady SET/GET load as `bench migrate` (whose pieces this
//! reuses): a plain pair (no identity: plain TCP migration stream, as `bench migrate` runs it) and a
//! secure pair (`host-shim init`, peers pinned by fingerprint: TLS 1.3 with mutual
//! authentication for the API and the migration stream, overlay sealed with the fleet key).
//! Migrations alternate between the pairs (plain A→B, TLS A→B, plain B→A, TLS B→A, ...) so
//! both are measured side by side under the same machine load; the report gives the
//! medians and the TLS/plain ratio of the downtime against the target (≤ 1.10).
//!
//! Then deploy-to-first-reply ([`super::deploy`]): the user's fleet file holds the secure
//! host (`fleet add tls https://... --fingerprint --token`) and the plain one, and
//! `host-shim deploy kv.img` alternates between them, image new to the host (uploaded) or
//! already there; the report gives medians and the TLS/plain ratio of the first reply.

use std::thread;

use anyhow::{Context, Result};

use super::deploy::{DeployTimes, FleetCli};
use super::migrate::{
    migrate_once, prepare_kv, stat, Daemon, Loaded, Sample, TempDir, KEYS, SETTLE,
};
use crate::workspace::Workspace;

/// TLS may add at most this much to the migration downtime (the target).
const TARGET_TLS_RATIO: f64 = 1.10;

/// Options of `bench fleet`.
#[derive(Debug)]
pub struct FleetOptions {
    /// Migrations per stream kind.
    pub runs: usize,
}

/// Two daemons and the kv app under load on the first.
struct Pair {
    label: &'static str,
    a: Daemon,
    b: Daemon,
    /// How each daemon names the other in `migrate --to`.
    to_a: String,
    to_b: String,
    loaded: Loaded,
    samples: Vec<Sample>,
}

/// The fingerprint a secure daemon's `peer list --json` shows for itself.
fn fingerprint(d: &Daemon) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct ThisHost {
        fingerprint: String,
    }
    let out = d.cli(&["peer", "list", "--json"])?;
    let host: ThisHost = serde_json::from_str(&out)
        .with_context(|| format!("`peer list --json` printed something else: {out}"))?;
    Ok(host.fingerprint)
}

/// Runs the benchmark and prints a markdown report.
pub fn run(ws: &Workspace, opts: &FleetOptions) -> Result<()> {
    let (shim, kv) = prepare_kv(ws, opts.runs)?;
    let dir = TempDir::new("fleet")?;

    let plain_state = dir.0.join("plain-a.state");
    let plain_state_arg = plain_state.to_string_lossy().into_owned();
    let (a, b) = (
        Daemon::start_with(
            &shim,
            "plain-a",
            1,
            &dir.0,
            &["--state-dir", &plain_state_arg],
        )?,
        Daemon::start(&shim, "plain-b", 2, &dir.0)?,
    );
    let loaded = Loaded::start(&a, &kv)?;
    let plain = Pair {
        label: "plain TCP (no identity)",
        to_a: a.addr.clone(),
        to_b: b.addr.clone(),
        a,
        b,
        loaded,
        samples: Vec::new(),
    };

    let sa = Daemon::secure(&shim, "tls-a", 3, &dir.0, &[])?;
    let key = sa.state().expect("secure").join("fleet.key");
    let key = key.to_string_lossy();
    let sb = Daemon::secure(&shim, "tls-b", 4, &dir.0, &["--fleet-key-file", &key])?;
    let (fa, fb) = (fingerprint(&sa)?, fingerprint(&sb)?);
    sa.cli(&[
        "peer",
        "add",
        "tls-b",
        &fb,
        "--addr",
        &format!("https://{}", sb.addr),
    ])?;
    sb.cli(&[
        "peer",
        "add",
        "tls-a",
        &fa,
        "--addr",
        &format!("https://{}", sa.addr),
    ])?;
    let loaded = Loaded::start(&sa, &kv)?;
    let tls = Pair {
        label: "TLS 1.3, mutual authentication, sealed overlay",
        to_a: "tls-a".into(),
        to_b: "tls-b".into(),
        a: sa,
        b: sb,
        loaded,
        samples: Vec::new(),
    };

    let mut pairs = [plain, tls];
    let mut failure = None;
    'runs: for i in 0..opts.runs {
        // Alternate which pair goes first, so neither always migrates right after the other.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let pair = &mut pairs[k];
            let (from, to) = if i % 2 == 0 {
                (&pair.a, &pair.to_b)
            } else {
                (&pair.b, &pair.to_a)
            };
            eprintln!(
                "bench fleet: migration {}/{} over {}: {} -> {to}",
                i + 1,
                opts.runs,
                pair.label,
                from.name
            );
            match migrate_once(from, to) {
                Ok(s) => pair.samples.push(s),
                Err(e) => {
                    failure = Some(e);
                    break 'runs;
                }
            }
            thread::sleep(SETTLE);
        }
    }
    let [plain, tls] = pairs;
    let (plain_label, tls_label) = (plain.label, tls.label);
    let (mut ps, mut ts) = (plain.samples, tls.samples);
    let plain_acked = plain.loaded.finish(&mut ps, None);
    let tls_acked = tls.loaded.finish(&mut ts, failure);
    let (plain_acked, tls_acked) = (plain_acked?, tls_acked?);

    // Deploys, as a user with a fleet file: the secure host and the plain one.
    let file = dir.0.join("fleet.json");
    let fleet = FleetCli {
        shim: &shim,
        file: &file,
    };
    let tls_state = tls.a.state().expect("secure").to_owned();
    let token = std::fs::read_to_string(tls_state.join("token"))?;
    let tls_url = format!("https://{}", tls.a.addr);
    fleet.ok(&["fleet", "add", "plain", &format!("http://{}", plain.a.addr)])?;
    fleet.ok(&[
        "fleet",
        "add",
        "tls",
        &tls_url,
        "--fingerprint",
        &fingerprint(&tls.a)?,
        "--token",
        token.trim(),
    ])?;
    let hosts = [
        ("tls", &tls.a, tls_state.join("images")),
        ("plain", &plain.a, plain_state.join("images")),
    ];
    let mut deploys = [DeployTimes::default(), DeployTimes::default()];
    for i in 0..opts.runs {
        for ((host, daemon, images), times) in hosts.iter().zip(deploys.iter_mut()) {
            for upload in [true, false] {
                let name = format!("kv-{i}-{}", if upload { "new" } else { "dedup" });
                times.measure(&fleet, (host, daemon, images), &kv, &name, upload)?;
            }
        }
        eprintln!("bench fleet: deploys {}/{}", i + 1, opts.runs);
    }
    let kv_kib = std::fs::metadata(&kv)?.len() / 1024;
    drop((plain.a, plain.b, tls.a, tls.b));

    let (plain_down, plain_row) = stat(&ps, 2, |s| s.downtime_ms);
    let (tls_down, tls_row) = stat(&ts, 2, |s| s.downtime_ms);
    let (plain_total, plain_total_row) = stat(&ps, 1, |s| s.total_ms);
    let (tls_total, tls_total_row) = stat(&ts, 1, |s| s.total_ms);
    let (_, plain_gap_row) = stat(&ps, 1, |s| s.gap_ms);
    let (_, tls_gap_row) = stat(&ts, 1, |s| s.gap_ms);
    let ratio = tls_down / plain_down;
    let downtimes = |s: &[Sample]| s.iter().map(|s| s.downtime_ms).collect::<Vec<_>>();
    let (ci_lo, ci_hi) = super::ratio_ci(&downtimes(&ts), &downtimes(&ps), 2000);
    // Met only when the whole interval is within the target, missed when it is all above.
    let tls_verdict = if ci_hi <= TARGET_TLS_RATIO {
        "met"
    } else if ci_lo > TARGET_TLS_RATIO {
        "missed"
    } else {
        "not established: the interval straddles it, take more --runs"
    };

    println!(
        "### Fleet security: migration downtime with TLS vs the plain stream (kv, 64 MiB, \
         {KEYS} keys, steady SET/GET load, two daemon pairs on loopback, {} migrations each, \
         alternating)\n",
        ps.len()
    );
    println!(
        "| migration stream | downtime, ms | min–max | total, ms | min–max | longest client \
         gap, ms | min–max |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("| {plain_label} | {plain_row} | {plain_total_row} | {plain_gap_row} |");
    println!("| {tls_label} | {tls_row} | {tls_total_row} | {tls_gap_row} |");
    println!(
        "\n- TLS / plain downtime: **{ratio:.2}×**, 95 % bootstrap interval {ci_lo:.2}–{ci_hi:.2}× \
         (target ≤ {TARGET_TLS_RATIO}×: {tls_verdict}); total time {:.2}×",
        tls_total / plain_total
    );
    println!(
        "- clients: {plain_acked} (plain) and {tls_acked} (TLS) SET+GET pairs acknowledged, \
         no error; all {KEYS} keys intact on both"
    );
    println!(
        "\n### Deploy to first reply (`host-shim deploy kv.img --on HOST --publish ...` from \
         the fleet CLI until kv answers PING through the published port; {kv_kib} KiB image, \
         {} deploys per case, alternating hosts)\n",
        opts.runs
    );
    println!("| host | image on the host | deploy command returns, ms | first PING reply, ms |");
    println!("|---|---|---:|---:|");
    println!("{}", deploys[0].rows("TLS 1.3, token (`https://`, pinned)"));
    println!("{}", deploys[1].rows("plain HTTP"));
    println!(
        "\n- TLS / plain first reply with an upload: {:.2}×",
        deploys[0].first_reply_new() / deploys[1].first_reply_new()
    );
    Ok(())
}
