//! The secure fleet as a user runs it, through the real binary: three
//! hosts with identities (`init` with one fleet key, `peer add` both ways,
//! `serve`), the user's fleet file with pinned fingerprints and tokens,
//! and every fleet command over TLS: deploy (image upload), migrate with a
//! client connected (mutual TLS between daemons, image push), ps,
//! logs --follow, stop; and hosts added with a wrong pin or token refused.
//! Real guests (kv) under KVM, real clients (redis-cli, a RESP client).
//!
//! Needs /dev/kvm, redis-tools and the images (`cargo xtask build-image --all`).

mod common;

use common::daemon::{deploy_kv, Daemon, FleetCli, TempDir};
use common::{ended, redis_pipe_set, Redis};
use std::process::Output;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_secure_fleet_deploys_moves_follows_and_stops_an_app_over_tls() {
    let dir = TempDir::new("secure-fleet");
    let a = Daemon::secure("a", 1, &[], &dir);
    let key = a.state.as_ref().unwrap().join("fleet.key");
    let key = key.to_str().unwrap();
    let b = Daemon::secure("b", 2, &["--fleet-key-file", key], &dir);
    let c = Daemon::secure("c", 3, &["--fleet-key-file", key], &dir);
    let hosts = [("a", &a), ("b", &b), ("c", &c)];
    let creds: Vec<(String, String)> = hosts.iter().map(|(_, d)| d.pin_and_token()).collect();
    let url = |d: &Daemon| format!("https://{}", d.addr);
    for (i, (_, host)) in hosts.iter().enumerate() {
        for (j, (name, peer)) in hosts.iter().enumerate() {
            if i != j {
                host.cli(&["peer", "add", name, &creds[j].0, "--addr", &url(peer)]);
            }
        }
    }
    let fleet = FleetCli::new(&dir);

    // Added with the wrong pin, the wrong token, no pin, or plain HTTP:
    // refused with a clear error (status 1), nothing recorded.
    let (fp_a, token_a) = &creds[0];
    let (fp_b, _) = &creds[1];
    let refusals: [(&[&str], String); 4] = [
        (
            &["--fingerprint", fp_b, "--token", token_a],
            format!("the server's certificate is {fp_a}, not the pinned {fp_b}"),
        ),
        (
            &["--fingerprint", fp_a, "--token", "not-the-token"],
            "wrong token".into(),
        ),
        (&["--token", token_a], "--fingerprint SHA256:".into()),
        (&[], "speaks TLS".into()),
    ];
    for (i, (flags, why)) in refusals.iter().enumerate() {
        let target = if i == 3 { a.addr.clone() } else { url(&a) };
        let mut args = vec!["fleet", "add", "a", &target];
        args.extend_from_slice(flags);
        let out = fleet.run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(stderr(&out).contains(why.as_str()), "{args:?}: {out:?}");
    }
    assert_eq!(
        fleet.json(&["fleet", "ls", "--json"]),
        serde_json::json!([])
    );

    for ((name, d), (fp, token)) in hosts.iter().zip(&creds) {
        let added = fleet.json(&[
            "fleet",
            "add",
            name,
            &url(d),
            "--fingerprint",
            fp,
            "--token",
            token,
            "--json",
        ]);
        assert_eq!(added["fingerprint"], fp.as_str(), "{added}");
        assert_eq!(added["token"], true, "{added}");
    }

    // Deploy: the image is uploaded to a over TLS and runs there.
    let (port, deployed) = deploy_kv("a", &["--json"], |args| fleet.json(args));
    assert_eq!(
        (&deployed["uploaded"], &deployed["host"]),
        (&serde_json::json!(true), &serde_json::json!("a")),
        "{deployed}"
    );
    let mut client = Redis::when_up(port);
    redis_pipe_set(
        port,
        (0..2000).map(|i| (format!("key:{i}"), format!("value-{i}"))),
    );
    let follow = fleet.follow_logs("kv");

    // Live moves between the secure daemons, the client connected.
    for to in ["b", "c"] {
        let key = format!("moving:{to}");
        assert_eq!(client.cmd(&["SET", &key, to]).unwrap(), "OK");
        let out = fleet.run(&["migrate", "kv", "--to", to, "--json"]);
        assert!(out.status.success(), "{out:?}\n{}", a.output());
        assert!(!stderr(&out).contains("warning"), "{out:?}");
        let moved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(moved["to"], to, "{moved}");
        let got = client.cmd(&["GET", &key]);
        assert_eq!(
            got.as_deref().ok(),
            Some(to),
            "{got:?}\n--- a:\n{}\n--- {to}:\n{}",
            a.output(),
            hosts.iter().find(|h| h.0 == to).unwrap().1.output()
        );
        assert_eq!(client.host(), to, "the app knows where it runs");
        let row = fleet.ps_row("kv").expect("kv in ps");
        assert_eq!(
            (row["host"].as_str(), row["state"].as_str()),
            (Some(to), Some("running")),
            "{row}"
        );
        // It restarts with its new shim: its image was pushed there.
        assert_eq!(row["restart"], "always", "{row}");
    }
    client.check(2000);
    // The scheduler reads the fleet file too: stats of every host over TLS.
    let out = fleet.ok(&[
        "schedule",
        "kv",
        "--policy",
        "follow-the-sun",
        "--interval",
        "100ms",
        "--rounds",
        "2",
    ]);
    // `fleet.ok` requires status 0: every host's stats reached the scheduler in both rounds.
    assert!(!out.contains("warning"), "{out}");
    assert!(out.contains("kv: stay"), "{out}");
    let dbsize = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "DBSIZE"])
        .output()
        .expect("redis-cli is installed");
    assert_eq!(String::from_utf8_lossy(&dbsize.stdout).trim(), "2002");

    // Stop: logs --follow followed kv to c and ends with it.
    fleet.ok(&["stop", "kv"]);
    let (logs, notes) = ended(follow, "logs --follow");
    assert!(logs.contains("kv: listening on port 6379"), "{logs}");
    for note in [
        "kv moved from a to b",
        "kv moved from b to c",
        "kv on c: stopped",
    ] {
        assert!(notes.contains(note), "no '{note}':\n{notes}");
    }
    let ps = fleet.json(&["ps", "--all", "--json"]);
    assert!(ps["instances"].as_array().unwrap().is_empty(), "{ps}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
