//! The same images under Firecracker (`host-shim run --backend firecracker`):
//! exit statuses, panics and faults mapped back as under our shim, and kv
//! reached over `--publish` with redis-cli, an idle guest that leaves the
//! CPU alone. (Checkpoints moving between our shim and Firecracker:
//! tests/checkpoint.rs.)
//!
//! These tests need the Firecracker binary in `$FIRECRACKER` (`.ci/run`
//! sets it when `../shared/bin/firecracker` exists). Without the variable
//! they say they were skipped; with it naming a missing file they fail.

mod common;

use std::time::Duration;

use common::{
    assert_same_output_but_uptime, boot, boot_under, firecracker, free_port, image, redis_cli,
    require_kvm, run_image, wait_for_pong, Run, Shim,
};

/// Runs `app` under Firecracker to completion with `shim_args`, passing
/// `app_args` after `--`.
fn run_firecracker(app: &str, shim_args: &[&str], app_args: &[&str]) -> Run {
    boot_under("firecracker", app, shim_args, app_args)
}

#[test]
fn hello_exits_zero_with_the_same_output_as_under_our_shim() {
    if firecracker().is_none() {
        return;
    }
    let identity = ["--host-name", "h", "--region", "r"];
    let fc = run_firecracker("hello", &identity, &["--name", "fc"]);
    let kvm = boot("hello", &identity, &["--name", "fc"]);
    assert_eq!(fc.status, Some(0), "{fc:?}");
    assert_same_output_but_uptime(&fc, &kvm);
    assert!(fc.stdout.contains("host: h (region r)"), "{fc:?}");
    assert!(!fc.stdout.contains("libcloud-exit"), "{fc:?}");
    // What Firecracker adds to the command line is not the app's.
    let fc = run_firecracker("hello", &[], &[]);
    assert!(fc.stdout.contains("args: []"), "{fc:?}");
}

#[test]
fn exit_codes_panics_and_faults_map_to_the_same_statuses() {
    if firecracker().is_none() {
        return;
    }
    let run = run_firecracker("selftest", &[], &["exit", "7"]);
    assert_eq!(run.status, Some(7), "{run:?}");
    let run = run_firecracker("selftest", &[], &["panic"]);
    assert_eq!(run.status, Some(101), "{run:?}");
    assert!(run.stdout.contains("selftest panic: 42"), "{run:?}");
    let run = run_firecracker("selftest", &[], &["fault"]);
    assert_eq!(run.status, Some(102), "{run:?}");
    assert!(run.stdout.contains("page fault"), "{run:?}");
}

#[test]
fn a_firecracker_binary_that_does_not_exist_is_named() {
    require_kvm();
    let img = image("hello");
    let run = run_image(
        &img,
        &[
            "--backend",
            "firecracker",
            "--firecracker",
            "/nonexistent/firecracker",
        ],
    );
    assert_eq!(run.status, Some(1), "{run:?}");
    assert!(run.stderr.contains("/nonexistent/firecracker"), "{run:?}");
}

/// `redis-cli -p PORT ARGS...`'s answer, trimmed.
fn redis(port: u16, args: &[&str]) -> String {
    redis_cli(port, args).1.trim().to_owned()
}

/// kv under Firecracker on a fresh published port, once it answers PING.
fn start_kv() -> (Shim, u16) {
    let port = free_port();
    let img = image("kv");
    let mut kv = Shim::start(&[
        "run",
        img.to_str().unwrap(),
        "--backend",
        "firecracker",
        "--publish",
        &format!("{port}:6379"),
    ]);
    wait_for_pong(port, Some(&mut kv), "kv under Firecracker");
    (kv, port)
}

#[test]
fn kv_answers_redis_cli_over_publish() {
    if firecracker().is_none() {
        return;
    }
    let (kv, port) = start_kv();
    assert_eq!(redis(port, &["SET", "monitor", "firecracker"]), "OK");
    assert_eq!(redis(port, &["GET", "monitor"]), "firecracker");
    let (out, _) = kv.stop();
    assert!(out.contains("kv: listening on port 6379"), "{out}");
}

#[test]
fn an_idle_kv_uses_at_most_one_percent_of_a_core_and_still_answers() {
    if firecracker().is_none() {
        return;
    }
    let (kv, port) = start_kv();
    let share = common::monitor_cpu_share(kv.pid(), Duration::from_secs(5));
    eprintln!(
        "idle kv under Firecracker: {:.2} % of a core",
        share * 100.0
    );
    assert!(
        share <= 0.01,
        "an idle kv used {:.1} % of a core",
        share * 100.0
    );
    // Its network card's interrupt still wakes it.
    assert_eq!(redis(port, &["SET", "after", "idle"]), "OK");
    assert_eq!(redis(port, &["GET", "after"]), "idle");
}
