//! Fuzz targets for every decoder of bytes that come from outside the shim: guest memory and
//! registers, snapshot files, migration peers, checkpoint blobs, API callers and overlay
//! datagrams, JSON from other processes (a daemon's migration events, the fleet store's
//! records), and the kv app's protocol and store.
//!
//! Each target is a module with `run(data: &[u8])`, a thin driver of the real decoder in
//! `vmm`/`migration`/`daemon`/`hostnet`/`api`/`fleet`/`abi`/`kv-core`: `fuzz_targets/<name>.rs` hands it to libFuzzer
//! (`cargo xtask fuzz NAME`), `tests/smoke.rs` runs it over the committed corpus and mutated inputs in the ordinary tests.
//! A target panics only when the decoder does (or breaks a property it asserts). [`seeds`]
//! builds each target's seed corpus with the real encoders.

pub mod checkpoint;
pub mod doorbell;
pub mod elf_loader;
pub mod fleet_store;
pub mod http_request;
pub mod kv;
pub mod migration_events;
pub mod migration_stream;
pub mod overlay;
pub mod seeds;
pub mod snapshot;
pub mod virtio_net;

/// A zeroed guest memory of `size` bytes. Mapping and unmapping a fresh one per input cost more
/// than the code under test did, so each thread keeps one per size (a few sizes at a time) and
/// zeroes it again for the next input: every input still starts from zeroed memory.
pub fn guest_memory(size: u64) -> vmm::vstate::vm::GuestMemoryMmap {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use vm_memory::{Bytes, GuestAddress};
    use vmm::vstate::vm::{allocate, GuestMemoryMmap};

    /// Sizes kept at a time.
    const KEPT: usize = 8;
    const ZEROES: [u8; 4096] = [0; 4096];
    thread_local! {
        static KEPT_MEMORY: RefCell<HashMap<u64, GuestMemoryMmap>> = RefCell::default();
    }
    KEPT_MEMORY.with(|kept| {
        let mut kept = kept.borrow_mut();
        if let Some(mem) = kept.get(&size) {
            let mut at = 0;
            while at < size {
                let n = (size - at).min(ZEROES.len() as u64);
                mem.write_slice(&ZEROES[..n as usize], GuestAddress(at))
                    .expect("the kept memory is whole");
                at += n;
            }
            return mem.clone();
        }
        if kept.len() >= KEPT {
            kept.clear();
        }
        let mem = allocate(size).expect("allocate guest memory");
        kept.insert(size, mem.clone());
        mem
    })
}

/// A target's body: runs one input.
pub type Target = fn(&[u8]);

/// Every target: name and body.
pub const TARGETS: &[(&str, Target)] = &[
    ("virtio_net", virtio_net::run),
    ("doorbell", doorbell::run),
    ("elf_loader", elf_loader::run),
    ("snapshot", snapshot::run),
    ("migration_stream", migration_stream::run),
    ("checkpoint", checkpoint::run),
    ("http_request", http_request::run),
    ("overlay", overlay::run),
    ("kv", kv::run),
    ("migration_events", migration_events::run),
    ("fleet_store", fleet_store::run),
];

/// Reads fields off the front of a fuzz input; past its end every field is zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }
}
