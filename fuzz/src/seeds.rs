//! Seed inputs for each target, made with the real encoders (image builder, snapshot writer,
//! migration and checkpoint encoders, probe and VXLAN encoders, kv's RESP encoder, the JSON
//! of migration events and of the fleet store), so fuzzing starts from valid inputs. `cargo xtask fuzz --seed` writes them to `fuzz/corpus/<target>/`.

use abi::hypercall::{
    CheckpointWrite, ConsoleWrite, FaultReport, PanicReport, HC_CHECKPOINT, HC_CONSOLE_WRITE,
    HC_EXIT, HC_FAULT, HC_PANIC, HC_YIELD,
};
use hostnet::overlay::{encapsulate, encode_probe};
use migration::protocol::{
    encode_pages, write_msg, write_value, Accept, Ack, Hello, Kind, PROTOCOL_VERSION,
};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::mmio::persist::QueueState;
use vmm::snapshot::format::write_snapshot_at;
use vmm::snapshot::state::{MachineState, NicSpec};
use vmm::testutil::{sample_machine_state, TestImage};
use vmm::vstate::vm::allocate;
use zerocopy::{Immutable, IntoBytes};

use crate::virtio_net::{ring, Op, SIZE};

/// The seeds of target `name`: (file name, bytes).
pub fn seeds(name: &str) -> Vec<(&'static str, Vec<u8>)> {
    match name {
        "virtio_net" => virtio_net(),
        "doorbell" => doorbell(),
        "elf_loader" => vec![
            ("exit", TestImage::exit(7).build()),
            ("notes-aligned-8", TestImage::exit(0).note_align(8).build()),
            ("bss", TestImage::exit(1).bss(0x10_0000).build()),
        ],
        "snapshot" => vec![("kv", snapshot())],
        "migration_stream" => vec![("whole-migration", migration())],
        "checkpoint" => checkpoint(),
        "http_request" => http(),
        "overlay" => overlay(),
        "kv" => kv(),
        "migration_events" => migration_events(),
        "fleet_store" => vec![("hosts-apps-events", fleet_store())],
        _ => panic!("no target {name}"),
    }
}

/// A virtio-net driver: bring-up, one frame sent, one received.
fn virtio_net() -> Vec<(&'static str, Vec<u8>)> {
    let mut s = vec![Op::BringUp as u8];
    // TX (queue 1): descriptor 0 = net header + a 60-byte frame at 0x4000.
    let frame = [
        [0xffu8; 6].as_slice(),
        &[2, 0, 0, 0, 0, 0x0f],
        &[0x08, 0x06],
        &[0; 46],
    ]
    .concat();
    let tx = 0x4000u16;
    s.push(Op::Poke as u8);
    s.extend_from_slice(&tx.to_le_bytes());
    s.push((12 + frame.len()) as u8);
    s.extend_from_slice(&[0; 12]);
    s.extend_from_slice(&frame);
    desc(&mut s, 1, 0, tx, 12 + frame.len() as u16, 0, 0);
    offer(&mut s, 1, 0);
    // RX (queue 0): a frame from the switch into a writable two-descriptor chain.
    s.push(Op::Deliver as u8);
    s.extend_from_slice(&(frame.len() as u16).to_le_bytes());
    s.extend_from_slice(&frame);
    desc(&mut s, 0, 0, 0x5000, 12, 1 | 2, 1); // NEXT | WRITE
    desc(&mut s, 0, 1, 0x5100, 1514, 2, 0);
    offer(&mut s, 0, 0);
    // The same frames moved by the network thread while the guest polls,
    // then the vCPU thread's look.
    let mut polled = s.clone();
    polled.extend_from_slice(&[Op::Polled as u8, Op::Process as u8]);
    s.push(Op::Process as u8);
    let bring_up_only = vec![Op::BringUp as u8, Op::Process as u8];
    assert!(usize::from(SIZE) * 16 <= 0x400 && ring(1) < 0x4000);
    vec![
        ("bring-up", bring_up_only),
        ("tx-rx", s),
        ("tx-rx-polled", polled),
    ]
}

fn desc(s: &mut Vec<u8>, q: u8, index: u8, addr: u16, len: u16, flags: u8, next: u8) {
    s.extend_from_slice(&[Op::Desc as u8, q, index]);
    s.extend_from_slice(&addr.to_le_bytes());
    s.extend_from_slice(&len.to_le_bytes());
    s.extend_from_slice(&[flags, next]);
}

fn offer(s: &mut Vec<u8>, q: u8, head: u16) {
    s.extend_from_slice(&[Op::Offer as u8, q]);
    s.extend_from_slice(&head.to_le_bytes());
}

/// Doorbell operations: guest memory writes, then hypercalls.
struct Calls(Vec<u8>);

impl Calls {
    fn poke(mut self, addr: u16, bytes: &[u8]) -> Self {
        self.0.push(0);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0
            .extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    fn put<T: IntoBytes + Immutable>(self, addr: u16, value: &T) -> Self {
        self.poke(addr, value.as_bytes())
    }

    fn call(mut self, nr: u64, value: u64) -> Self {
        self.0.push(1);
        self.0.extend_from_slice(&((nr * 8) as u16).to_le_bytes());
        self.0.push(0); // 8 bytes wide
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
}

fn doorbell() -> Vec<(&'static str, Vec<u8>)> {
    let console = Calls(Vec::new())
        .poke(0x200, b"hello\n")
        .put(0x100, &ConsoleWrite { buf: 0x200, len: 6 })
        .call(HC_CONSOLE_WRITE, 0x100)
        .call(HC_YIELD, 1000)
        .call(HC_EXIT, 3);
    let full = abi::checkpoint::encode("kv", 1, b"state");
    let id = abi::checkpoint::decode(&full).expect("decodes").0.id;
    let delta = abi::checkpoint::encode_delta("kv", 1, id, 1, b"changes");
    let request = |buf: u64, len: usize| CheckpointWrite {
        buf,
        len: len as u64,
        status: 0,
    };
    let checkpoints = Calls(Vec::new())
        .poke(0x1000, &full)
        .put(0x100, &request(0x1000, full.len()))
        .call(HC_CHECKPOINT, 0x100)
        .poke(0x2000, &delta)
        .put(0x100, &request(0x2000, delta.len()))
        .call(HC_CHECKPOINT, 0x100);
    let panic = Calls(Vec::new())
        .poke(0x200, b"src/main.rs")
        .poke(0x300, b"it broke")
        .put(
            0x100,
            &PanicReport {
                msg: 0x300,
                msg_len: 8,
                file: 0x200,
                file_len: 11,
                line: 7,
                column: 3,
            },
        )
        .call(HC_PANIC, 0x100);
    let fault = Calls(Vec::new())
        .put(
            0x100,
            &FaultReport {
                vector: 14,
                error_code: 2,
                rip: 0x10_1234,
                cs: 0x23,
                rflags: 0x3002,
                rsp: 0x7_ff00,
                ss: 0x1b,
                cr2: 0xdead_0000,
            },
        )
        .call(HC_FAULT, 0x100);
    vec![
        ("console", console.0),
        ("checkpoints", checkpoints.0),
        ("panic", panic.0),
        ("fault", fault.0),
    ]
}

/// A guest's state as the snapshot writer and the migration source produce it: the shared
/// sample ([`vmm::testutil::sample_machine_state`]) with the fuzz targets' guest memory, a
/// network card, and its queues where the `virtio_net` target lays out its rings, so a restore
/// serves real descriptors.
fn machine_state(mem_size: u64) -> MachineState {
    let mut state = sample_machine_state();
    state.spec.mem_size = mem_size;
    state.spec.nic = Some(NicSpec {
        mac: [2, 0, 0, 0, 0, 1],
        ip: [10, 0, 0, 2].into(),
        prefix: 24,
        gateway: Some([10, 0, 0, 1].into()),
    });
    let net = &mut state.devices.net[0];
    net.transport.base = vmm::devices::virtio::window_base(0);
    net.transport.driver_features |= 1 << 5;
    net.transport.addrs = (0..2)
        .map(|q| [ring(q), ring(q) + 0x400, ring(q) + 0x800])
        .collect();
    net.transport.queues = (0..2)
        .map(|q| QueueState {
            max_size: vmm::devices::virtio::net::QUEUE_MAX,
            size: SIZE,
            ready: true,
            desc_table: ring(q),
            avail_ring: ring(q) + 0x400,
            used_ring: ring(q) + 0x800,
            ..Default::default()
        })
        .collect();
    net.device.pending_rx = vec![vec![0xff; 60]];
    state
}

const GUEST_MEM: u64 = 64 << 10;

fn snapshot() -> Vec<u8> {
    let mem = allocate(GUEST_MEM).expect("allocate guest memory");
    mem.write_slice(b"hello", GuestAddress(0x1000))
        .expect("in RAM");
    mem.write_slice(&[7; 16], GuestAddress(0x8000))
        .expect("in RAM");
    let mut out = Vec::new();
    // A fixed time: the seed is the same bytes on every run.
    let taken = 1_765_000_000_000;
    write_snapshot_at(&mut out, "host-a", taken, &machine_state(GUEST_MEM), &mem)
        .expect("write snapshot");
    out
}

/// Everything a source sends and a destination answers, one after another.
fn migration() -> Vec<u8> {
    let state = machine_state(GUEST_MEM);
    let mut s = Vec::new();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        format_version: vmm::snapshot::format::FORMAT_VERSION,
        abi_version: abi::ABI_VERSION,
        name: "kv".into(),
        mem_size: GUEST_MEM,
        cpuid: state.spec.cpuid.clone(),
        nic: state.spec.nic,
        image: state.spec.image.clone(),
        source: "host-a".into(),
        source_overlay: Some(([127, 0, 0, 1], 4789).into()),
        migration_id: 42,
        source_api: Some(([127, 0, 0, 1], 7000).into()),
        record: None,
    };
    let io = "writing to a Vec";
    write_value(&mut s, Kind::Hello, &hello).expect(io);
    let accept = Accept {
        name: "host-b".into(),
        region: "eu-west".into(),
        overlay: None,
        checks_us: 3,
        vm_us: 4,
    };
    write_value(&mut s, Kind::Accept, &accept).expect(io);
    let page = [0x5au8; 4096];
    write_msg(
        &mut s,
        Kind::Pages,
        &encode_pages(&[1, 3], &[page, page].concat()),
    )
    .expect(io);
    write_msg(&mut s, Kind::Sync, &[]).expect(io);
    write_msg(&mut s, Kind::Synced, &[]).expect(io);
    write_msg(&mut s, Kind::Zeroes, &encode_pages(&[3], &[])).expect(io);
    write_value(&mut s, Kind::State, &state).expect(io);
    write_msg(&mut s, Kind::Ready, &[]).expect(io);
    write_msg(&mut s, Kind::Commit, &[]).expect(io);
    let ack = Ack {
        resumed_unix_ns: 1,
        restore_us: 2,
    };
    write_value(&mut s, Kind::Committed, &ack).expect(io);
    write_msg(&mut s, Kind::Query, &42u64.to_le_bytes()).expect(io);
    write_msg(&mut s, Kind::Outcome, &[1]).expect(io);
    write_msg(&mut s, Kind::Abort, b"the source gave up").expect(io);
    s
}

fn checkpoint() -> Vec<(&'static str, Vec<u8>)> {
    let full = abi::checkpoint::encode("kv", 3, b"a full snapshot of the store");
    let id = abi::checkpoint::decode(&full).expect("decodes").0.id;
    let mut chain = full.clone();
    for seq in 1..=3 {
        chain.extend_from_slice(&abi::checkpoint::encode_delta("kv", 3, id, seq, b"set k v"));
    }
    let mut restarted = chain.clone();
    restarted.extend_from_slice(&abi::checkpoint::encode("kv", 4, b"another"));
    vec![
        ("full", [&[0u8][..], &full].concat()),
        ("chain", [&[0u8][..], &chain].concat()),
        ("chain-fixed-up", [&[3u8][..], &restarted].concat()),
    ]
}

fn http() -> Vec<(&'static str, Vec<u8>)> {
    let body = br#"{"image":"kv","mem":"64M","args":["--port","6379"]}"#;
    let post = [
        format!(
            "POST /v1/instances/kv?wait=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer abc\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
        body,
    ]
    .concat();
    let keep_alive = [
        &b"GET /v1/instances HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        &post,
        b"DELETE /v1/instances/kv HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    ]
    .concat();
    let chunked =
        b"PUT /v1/images/kv HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let upgrade =
        b"POST /v1/migrate HTTP/1.1\nConnection: Upgrade\nUpgrade: host-shim-migration\n\n";
    vec![
        ("keep-alive", [&[0u8][..], &keep_alive].concat()),
        ("post-small-buffer", [&[1u8][..], &post].concat()),
        ("chunked", [&[4u8][..], chunked].concat()),
        ("upgrade", [&[255u8][..], upgrade].concat()),
    ]
}

fn overlay() -> Vec<(&'static str, Vec<u8>)> {
    let vni = 42u32;
    let frame = [
        [0xffu8; 6].as_slice(),
        &[2, 0, 0, 0, 0, 1],
        &[0x08, 0x00],
        &[0x45; 40],
    ]
    .concat();
    // A TCP segment from 10.0.2.2:40000 to a guest (a client's flow).
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 2, 2]);
    ip[16..20].copy_from_slice(&[10, 0, 4, 15]);
    let segment = [
        [2u8, 0, 0, 0, 0, 2].as_slice(),
        &[2, 0, 0, 0, 0, 1],
        &[0x08, 0x00],
        &ip,
        &40000u16.to_be_bytes(),
        &6379u16.to_be_bytes(),
        &[0; 16],
    ]
    .concat();
    let head = |tamper: u16| [&vni.to_le_bytes()[..], &tamper.to_le_bytes()].concat();
    vec![
        ("frame", [head(3), encapsulate(vni, &frame)].concat()),
        (
            "tcp-segment",
            [head(5), encapsulate(vni, &segment)].concat(),
        ),
        (
            "probe",
            [head(70), encode_probe(false, 123, "host-a", "eu-west")].concat(),
        ),
        (
            "answer",
            [head(9), encode_probe(true, 456, "host-b", "us-east")].concat(),
        ),
    ]
}

/// A client of the kv app: what `redis-benchmark` and `redis-cli` send, pipelined, after the
/// byte that picks the read size.
fn kv() -> Vec<(&'static str, Vec<u8>)> {
    let mut strings = Vec::new();
    for args in [
        &["SET", "k", "v", "PX", "3"][..],
        &["GET", "k"],
        &["MSET", "a", "1", "b", "2", "user:1", "x"],
        &["INCRBY", "a", "9223372036854775806"],
        &["INCR", "a"],
        &["APPEND", "b", "\r\n"],
        &["EXPIRE", "b", "1", "NX"],
        &["PTTL", "b"],
        &["KEYS", "[a-z]*"],
        &["MGET", "a", "b", "k"],
        &["DEL", "a", "a", "k"],
        &["EXISTS", "b", "b"],
        &["SET", "c", "v", "KEEPTTL", "GET"],
        &["CLIENT", "SETNAME", "fuzz"],
        &["FLUSHALL"],
        &["SET", "after", "flush", "EX", "10"],
        &["INFO", "keyspace"],
    ] {
        kv_core::resp::command(&mut strings, args);
    }
    let inline = b"PING\r\nSET \"quoted key\" '\\'x\\'' EX 5\nGET \"quoted\\x20key\"\r\n\r\nQUIT\r\nGET after\r\n";
    let mut partial = Vec::new();
    kv_core::resp::command(&mut partial, &[&b"SET"[..], b"big", &[b'v'; 300]]);
    partial.truncate(partial.len() - 40);
    vec![
        ("strings-pipelined", [&[7u8][..], &strings].concat()),
        ("strings-byte-by-byte", [&[0u8][..], &strings].concat()),
        ("inline", [&[3u8][..], inline].concat()),
        ("partial-bulk", [&[4u8][..], &partial].concat()),
    ]
}

/// What a source daemon streams for a migration that succeeds and one that fails, one JSON
/// event a line, after the byte that picks the line bound (4 KiB).
fn migration_events() -> Vec<(&'static str, Vec<u8>)> {
    use api::{MigrationEvent as E, MigrationPhase, MigrationReport};
    let report = MigrationReport {
        name: "kv".into(),
        to: "10.0.0.2:7000".into(),
        downtime_ms: 4.95,
        total_ms: 312.5,
        bytes: 5 << 20,
        pages: 1280,
        mem: 64 << 20,
        rounds: 3,
        skipped: Some(200),
    };
    let started = E::Started {
        name: "kv".into(),
        mem: 64 << 20,
        from: "host-a".into(),
        to_name: "host-b".into(),
        to: "10.0.0.2:7000".into(),
        region: "eu-west".into(),
    };
    let done = [
        started.clone(),
        E::Round {
            round: 0,
            dirty: 1200,
            pages: 1200,
            bytes: 4_915_200,
            catch_up: false,
            skipped: Some(200),
        },
        E::Round {
            round: 1,
            dirty: 80,
            pages: 80,
            bytes: 327_680,
            catch_up: true,
            skipped: None,
        },
        E::Paused {
            dirty: 12,
            bytes: 49_152,
            skipped: None,
        },
        E::Note {
            message: "asking the destination again whether kv runs there".into(),
        },
        E::Running {
            name: "kv".into(),
            on: "host-b".into(),
            downtime_ms: 4.95,
            restore_ms: Some(1.25),
        },
        E::Timeline {
            marks: vec![("connected".into(), 2.5), ("paused".into(), 300.0)],
            hints_ms: 0.5,
        },
        E::Done(report),
    ];
    let failed = [
        started,
        E::Failed {
            phase: MigrationPhase::Commit,
            error: "the destination did not answer; kv keeps running here".into(),
        },
    ];
    let lines = |events: &[E]| {
        let mut out = vec![255u8];
        for e in events {
            out.extend(serde_json::to_vec(e).expect("an event encodes"));
            out.push(b'\n');
        }
        out
    };
    vec![("done", lines(&done)), ("failed", lines(&failed))]
}

/// A fleet store file as the CLI, registered hosts and the event log write it: two hosts (one
/// pinned with a token, one registered with its capacity), an app, and events of each kind.
fn fleet_store() -> Vec<u8> {
    use fleet::events::{Event, Kind};
    use fleet::store::{Expect, FileStore};
    use fleet::{App, Capacity, Fleet, Host};
    let dir = std::env::temp_dir().join(format!("host-shim-fuzz-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let path = dir.join("fleet.json");
    let _ = std::fs::remove_file(&path);
    let fleet = Fleet::new(Box::new(FileStore::new(&path)));
    let hosts = [
        Host {
            name: "eu-west".into(),
            url: "https://203.0.113.5:7443".into(),
            region: "eu-west".into(),
            fingerprint: Some(format!("SHA256:{}", "ab".repeat(32))),
            token: Some("43d8".repeat(16)),
            ..Host::default()
        },
        Host {
            name: "us-east".into(),
            url: "http://198.51.100.7:7000".into(),
            region: "us-east".into(),
            overlay: Some("198.51.100.7:4789".into()),
            capacity: Some(Capacity {
                max_instances: 4096,
                max_guest_memory: 24 << 30,
            }),
            registered: true,
            ..Host::default()
        },
    ];
    let store = "writing the seed's fleet store";
    for h in &hosts {
        fleet.put_host(h, Expect::Absent).expect(store);
    }
    let app = App {
        name: "kv".into(),
        host: "eu-west".into(),
        image: format!("sha256:{}", "cd".repeat(32)),
    };
    fleet.put_app(&app, Expect::Absent).expect(store);
    let event = |kind, app: Option<&str>, hosts: &[&str], details| Event {
        time: 1_765_000_000.5,
        ..Event::new(kind, app, hosts, details)
    };
    for e in [
        event(Kind::HostUp, None, &["us-east"], serde_json::Value::Null),
        event(
            Kind::Deploy,
            Some("kv"),
            &["eu-west"],
            serde_json::Value::Null,
        ),
        event(
            Kind::MigrationStarted,
            Some("kv"),
            &["eu-west", "us-east"],
            serde_json::Value::Null,
        ),
        event(
            Kind::MigrationDone,
            Some("kv"),
            &["eu-west", "us-east"],
            serde_json::json!({"downtime_ms": 4.95, "total_ms": 312.5, "bytes": 5242880}),
        ),
        event(
            Kind::MigrationFailed,
            Some("kv"),
            &["us-east", "eu-west"],
            serde_json::json!({"error": "the destination did not answer"}),
        ),
        event(
            Kind::LeaderChange,
            None,
            &[],
            serde_json::json!({"replica": "r1"}),
        ),
        event(Kind::HostDown, None, &["us-east"], serde_json::Value::Null),
        event(
            Kind::Stop,
            Some("kv"),
            &["eu-west"],
            serde_json::Value::Null,
        ),
    ] {
        fleet.record(&e).expect(store);
    }
    let bytes = std::fs::read(&path).expect(store);
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}
