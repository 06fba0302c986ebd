//! Seed inputs for each target, made with the real encoders (image builder, snapshot writer,
//! migration and checkpoint encoders, probe and VXLAN encoders, kv's RESP encoder), so fuzzing starts from valid
//! inputs. `cargo xtask fuzz --seed` writes them to `fuzz/corpus/<target>/`.

use abi::hypercall::{
    CheckpointWrite, ConsoleWrite, FaultReport, PanicReport, HC_CHECKPOINT, HC_CONSOLE_WRITE,
    HC_EXIT, HC_FAULT, HC_PANIC, HC_YIELD,
};
use hostnet::overlay::{encapsulate, encode_probe};
use migration::protocol::{
    encode_pages, write_msg, write_value, Accept, Ack, Hello, Kind, PROTOCOL_VERSION,
};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::persist::{ConnectedNetState, DeviceStates};
use vmm::devices::virtio::mmio::persist::{QueueState, TransportState};
use vmm::devices::virtio::net::persist::NetState;
use vmm::snapshot::format::write_snapshot;
use vmm::snapshot::state::{GuestSpec, ImageId, MachineState, NicSpec};
use vmm::testutil::TestImage;
use vmm::vstate::vcpu::VcpuState;
use vmm::vstate::vm::allocate;
use vmm::vstate::vm::ClockState;
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
    s.push(Op::Process as u8);
    let bring_up_only = vec![Op::BringUp as u8, Op::Process as u8];
    assert!(usize::from(SIZE) * 16 <= 0x400 && ring(1) < 0x4000);
    vec![("bring-up", bring_up_only), ("tx-rx", s)]
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

/// A guest's state as the snapshot writer and the migration source produce it.
fn machine_state(mem_size: u64) -> MachineState {
    MachineState {
        spec: GuestSpec {
            name: "kv".into(),
            image: ImageId {
                path: "/images/kv.img".into(),
                size: 4096,
                sha256: "ab".repeat(32),
            },
            cmdline: "lc.host=a -- --port 6379".into(),
            mem_size,
            kvmclock: true,
            nic: Some(NicSpec {
                mac: [2, 0, 0, 0, 0, 1],
                ip: [10, 0, 0, 2].into(),
                prefix: 24,
                gateway: Some([10, 0, 0, 1].into()),
            }),
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x8000_0000,
                ..Default::default()
            }],
            env: vec![("K".into(), "V".into())],
            args: vec!["--port".into(), "6379".into()],
            generation: 1,
        },
        vcpu: VcpuState {
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs {
                rip: 0x10_1234,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: None,
            xcrs: None,
            debugregs: Some(Default::default()),
            lapic: None,
            msrs: vec![kvm_bindings::kvm_msr_entry {
                index: 0x4b56_4d01,
                data: 0x5001,
                ..Default::default()
            }],
            vcpu_events: None,
        },
        clock: ClockState {
            clock: kvm_bindings::kvm_clock_data {
                clock: 42,
                ..Default::default()
            },
        },
        devices: DeviceStates {
            net: vec![ConnectedNetState {
                transport: TransportState {
                    base: vmm::devices::virtio::window_base(0),
                    device_type: 1,
                    queue_sel: 1,
                    device_features_sel: 1,
                    driver_features_sel: 1,
                    driver_features: (1 << 32) | (1 << 5),
                    status: 15,
                    interrupt_status: 0,
                    config_generation: 0,
                    active: true,
                    errors: 0,
                    addrs: (0..2)
                        .map(|q| [ring(q), ring(q) + 0x400, ring(q) + 0x800])
                        .collect(),
                    queues: (0..2)
                        .map(|q| QueueState {
                            max_size: vmm::devices::virtio::net::QUEUE_MAX,
                            size: SIZE,
                            ready: true,
                            desc_table: ring(q),
                            avail_ring: ring(q) + 0x400,
                            used_ring: ring(q) + 0x800,
                            ..Default::default()
                        })
                        .collect(),
                },
                device: NetState {
                    mac: [2, 0, 0, 0, 0, 1],
                    halted: [false, false],
                    pending_rx: vec![vec![0xff; 60]],
                },
            }],
        },
    }
}

const GUEST_MEM: u64 = 64 << 10;

fn snapshot() -> Vec<u8> {
    let mem = allocate(GUEST_MEM).expect("allocate guest memory");
    mem.write_slice(b"hello", GuestAddress(0x1000))
        .expect("in RAM");
    mem.write_slice(&[7; 16], GuestAddress(0x8000))
        .expect("in RAM");
    let mut out = Vec::new();
    write_snapshot(&mut out, "host-a", &machine_state(GUEST_MEM), &mem).expect("write snapshot");
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
    let head = |tamper: u16| [&vni.to_le_bytes()[..], &tamper.to_le_bytes()].concat();
    vec![
        ("frame", [head(3), encapsulate(vni, &frame)].concat()),
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
