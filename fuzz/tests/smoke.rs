//! A short, deterministic run of every fuzz target without libFuzzer: its committed corpus
//! (`fuzz/corpus/<target>/`), its freshly built seeds, and a few thousand inputs mutated from
//! them or random, so a decoder that panics on garbage fails the ordinary tests.

use std::path::Path;

use host_shim_fuzz::{seeds::seeds, TARGETS};

/// Mutated and random inputs per target.
const INPUTS: usize = 3000;

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// libFuzzer-like mutations: bit flips, interesting bytes and integers, insertions,
/// deletions, duplicated runs, truncation and splices with another input.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(b.len());
        match rng.below(8) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)],
            2 if b.len() >= at + 4 => {
                let v: u32 = [0, 1, 0xffff, 0x7fff_ffff, 0xffff_ffff][rng.below(5)];
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(at..at, bytes);
            }
            4 if !b.is_empty() => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                b.drain(at..end);
            }
            5 if !b.is_empty() => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                let run = b[at..end].to_vec();
                b.splice(at..at, run);
            }
            6 => b.truncate(at),
            _ => {
                let from = rng.below(other.len());
                let end = (from + rng.below(256)).min(other.len());
                b.splice(at.min(b.len())..b.len(), other[from..end].iter().copied());
            }
        }
    }
    b
}

fn smoke(target: &str) {
    let (_, run) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a target of that name");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {} cannot be read: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.expect("a corpus entry").path()).expect("read it"))
        .collect();
    assert!(!corpus.is_empty(), "{} is empty", dir.display());
    corpus.extend(seeds(target).into_iter().map(|(_, bytes)| bytes));
    for input in &corpus {
        run(input);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    for i in 0..INPUTS {
        let input = if i % 10 == 9 {
            (0..rng.below(512)).map(|_| rng.next() as u8).collect()
        } else {
            let a = &corpus[rng.below(corpus.len())];
            let b = &corpus[rng.below(corpus.len())];
            mutate(&mut rng, a, b)
        };
        let result = std::panic::catch_unwind(|| run(&input));
        if result.is_err() {
            let path = std::env::temp_dir().join(format!("smoke-{target}-{i}"));
            std::fs::write(&path, &input).expect("write the failing input");
            panic!(
                "{target} panicked on input {i}, saved to {}: reproduce with \
                 `cargo xtask fuzz {target} --run {}`",
                path.display(),
                path.display()
            );
        }
    }
}

#[test]
fn virtio_net() {
    smoke("virtio_net");
}

#[test]
fn doorbell() {
    smoke("doorbell");
}

#[test]
fn elf_loader() {
    smoke("elf_loader");
}

#[test]
fn snapshot() {
    smoke("snapshot");
}

#[test]
fn migration_stream() {
    smoke("migration_stream");
}

#[test]
fn checkpoint() {
    smoke("checkpoint");
}

#[test]
fn http_request() {
    smoke("http_request");
}

#[test]
fn overlay() {
    smoke("overlay");
}

#[test]
fn kv() {
    smoke("kv");
}

#[test]
fn migration_events() {
    smoke("migration_events");
}

#[test]
fn fleet_store() {
    smoke("fleet_store");
}

/// The committed seeds are what the encoders write today (`cargo xtask fuzz --seed`), so a
/// format change (a new snapshot version, say) cannot leave them testing only the version
/// check.
#[test]
fn committed_seeds_are_what_the_encoders_write() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, _) in TARGETS {
        for (name, bytes) in seeds(target) {
            let path = corpus.join(target).join(format!("seed-{name}"));
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == bytes,
                "{} is not what the encoders write now: run `cargo xtask fuzz --seed`",
                path.display()
            );
        }
    }
}

#[test]
fn every_target_has_a_smoke_test() {
    let this = include_str!("smoke.rs");
    for (name, _) in TARGETS {
        assert!(
            this.contains(&format!("fn {name}() {{\n    smoke(\"{name}\");")),
            "no smoke test for {name}"
        );
    }
}
