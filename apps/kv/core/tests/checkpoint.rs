//! Checkpoints: what a full checkpoint and its deltas restore (keys,
//! values, remaining TTLs, through libcloud's container as the guest uses
//! it), how a restored checkpoint serves reads and writes in place, and
//! the rejection of truncated, reordered or damaged payloads.

mod common;

use std::time::Duration;

use common::{bulk, int, ok, sorted, Kv};
use kv_core::checkpoint::{self, Checkpoints, Error, Key, KvDelta, KvState};
use kv_core::resp::Reply;
use kv_core::store::Store;
use kv_core::testing::contents;
use kv_core::Instant;

const MS: Duration = Duration::from_millis(1);

/// A kv with plain, binary and volatile keys.
fn populated() -> Kv {
    let mut kv = Kv::new();
    kv.run("MSET a 1 b 2 c 3");
    kv.cmd(&[&b"SET"[..], b"\x00bin\xff", b"\r\n\x00"]);
    kv.run("SET soon v PX 150");
    kv.run("SET later v PX 5000");
    for i in 0..100 {
        kv.run(&format!("SET key:{i:03} value-{i}"));
    }
    kv
}

/// The guest's path: payload in libcloud's container, then the container
/// read back and the payload restored into a fresh server whose clock
/// starts elsewhere.
fn through_container(full: &KvState, deltas: &[KvDelta]) -> Kv {
    let base = abi::checkpoint::encode(
        checkpoint::APP,
        checkpoint::VERSION,
        &postcard::to_allocvec(full).unwrap(),
    );
    let id = abi::checkpoint::decode(&base).unwrap().0.id;
    let mut stream = base.clone();
    for (i, d) in deltas.iter().enumerate() {
        let payload = postcard::to_allocvec(d).unwrap();
        stream.extend(abi::checkpoint::encode_delta(
            checkpoint::APP,
            checkpoint::VERSION,
            id,
            i as u64 + 1,
            &payload,
        ));
    }
    let chain = abi::checkpoint::latest_chain(&stream).unwrap();
    assert_eq!(
        (chain.base.app, chain.base.schema_version),
        (checkpoint::APP, checkpoint::VERSION)
    );
    let deltas: Vec<KvDelta> = chain
        .deltas
        .iter()
        .map(|d| postcard::from_bytes(d.payload).unwrap())
        .collect();
    let mut kv = Kv::new();
    kv.advance(Duration::from_secs(7)); // another machine's clock
    let now = kv.platform.now();
    // Owned: the store keeps its base for good.
    let base: Vec<u8> = chain.base.payload.into();
    checkpoint::restore(&mut kv.server.store, base, deltas, now).unwrap();
    kv
}

#[test]
fn a_full_checkpoint_restores_every_live_key_and_its_remaining_ttl() {
    let mut kv = populated();
    kv.advance(100 * MS);
    let now = kv.platform.now();
    let mut tracker = Checkpoints::new(&mut kv.server.store, now);
    let full = tracker.full(&mut kv.server.store, now);
    assert_eq!(full.keys.len(), 106);
    let want = contents(&kv.server.store, now);
    assert_eq!(want[&b"soon"[..]].1, Some(50));

    let mut restored = through_container(&full, &[]);
    let then = restored.platform.now();
    assert_eq!(contents(&restored.server.store, then), want);
    assert_eq!(restored.run("DBSIZE"), int(106));
    assert_eq!(restored.run("PTTL later"), int(4900));
    restored.advance(50 * MS);
    assert_eq!(restored.run("GET soon"), Reply::Nil, "deadlines carry over");
    assert_eq!(restored.run("DBSIZE"), int(105));
}

#[test]
fn deltas_replay_sets_deletes_expiries_and_flushes() {
    let mut kv = populated();
    let now = kv.platform.now();
    let mut tracker = Checkpoints::new(&mut kv.server.store, now);
    let full = tracker.full(&mut kv.server.store, now);
    assert!(
        tracker.delta(&mut kv.server.store, now).is_none(),
        "no changes yet"
    );

    kv.advance(100 * MS);
    kv.run("SET a changed");
    kv.run("DEL b");
    kv.run("EXPIRE c 1");
    kv.run("INCR counter");
    kv.run("SET brief v PX 20");
    let d1 = tracker
        .delta(&mut kv.server.store, kv.platform.now())
        .unwrap();
    assert_eq!(d1.at_ms, 100);
    assert_eq!(d1.dels, vec![b"b".to_vec()]);
    assert_eq!(d1.sets.len(), 4);

    kv.advance(200 * MS); // `soon` (150 ms) and `brief` have expired by now
    kv.run("PERSIST c");
    kv.run("DEL key:000 key:001");
    let d2 = tracker
        .delta(&mut kv.server.store, kv.platform.now())
        .unwrap();
    assert_eq!(d2.at_ms, 300);

    let now = kv.platform.now();
    let want = contents(&kv.server.store, now);
    assert!(!want.contains_key(&b"soon"[..]) && !want.contains_key(&b"brief"[..]));
    assert_eq!(want[&b"later"[..]].1, Some(4700));
    let mut restored = through_container(&full, &[d1.clone(), d2.clone()]);
    assert_eq!(
        contents(&restored.server.store, restored.platform.now()),
        want
    );
    assert_eq!(restored.run("GET a"), bulk("changed"));
    assert_eq!(restored.run("TTL c"), int(-1));

    // A flush in a delta empties what came before it.
    kv.run("FLUSHALL");
    kv.run("SET after flush");
    let d3 = tracker
        .delta(&mut kv.server.store, kv.platform.now())
        .unwrap();
    assert!(d3.cleared);
    let restored = through_container(&full, &[d1, d2, d3]);
    assert_eq!(
        contents(&restored.server.store, restored.platform.now()),
        contents(&kv.server.store, kv.platform.now())
    );
    assert_eq!(restored.server.store.len(), 1);
}

#[test]
fn a_restored_checkpoint_serves_reads_and_writes_in_place() {
    let mut kv = populated();
    let now = kv.platform.now();
    let full = Checkpoints::new(&mut kv.server.store, now).full(&mut kv.server.store, now);
    let mut r = through_container(&full, &[]);
    assert_eq!(r.run("GET key:042"), bulk("value-42"));
    assert_eq!(r.run("SET key:042 new"), ok());
    assert_eq!(r.run("GET key:042"), bulk("new"));
    assert_eq!(r.run("DEL key:043 key:043"), int(1));
    assert_eq!(
        r.run("GET key:043"),
        Reply::Nil,
        "a deleted key stays deleted"
    );
    assert_eq!(r.run("APPEND key:044 !"), int(9));
    assert_eq!(r.run("EXPIRE key:045 1"), int(1));
    r.advance(Duration::from_secs(1));
    assert_eq!(r.run("EXISTS key:045"), int(0));
    assert_eq!(r.run("DBSIZE"), int(103), "106 less soon, 043 and 045");
    assert_eq!(
        sorted(r.run("KEYS key:04?")),
        ["key:040", "key:041", "key:042", "key:044", "key:046", "key:047", "key:048", "key:049"]
            .map(|k| k.as_bytes().to_vec())
    );
    assert_eq!(r.run("GET key:044"), bulk("value-44!"));
    // A checkpoint of the restored store merges the base and the changes.
    let now = r.platform.now();
    let again = KvState::capture(&r.server.store, now);
    let names: Vec<&[u8]> = again.keys.iter().map(|k| k.0.as_slice()).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "in key order");
    assert_eq!(names.len(), 103);
    assert_eq!(r.run("FLUSHALL"), ok());
    assert_eq!(r.run("DBSIZE"), int(0));
    assert_eq!(r.run("GET key:050"), Reply::Nil);
}

/// A valid full-checkpoint payload with a few keys.
fn payload() -> Vec<u8> {
    let state = KvState {
        keys: vec![
            Key(b"a".to_vec(), b"1".to_vec(), None),
            Key(b"b".to_vec(), vec![0; 40], Some(10_000)),
            Key(b"c".to_vec(), b"3".to_vec(), Some(1)),
        ],
    };
    postcard::to_allocvec(&state).unwrap()
}

fn restore(bytes: Vec<u8>) -> (Store, Result<(), Error>) {
    let mut store = Store::new();
    let r = checkpoint::restore(&mut store, bytes, Vec::new(), Instant::from_nanos(0));
    (store, r)
}

#[test]
fn truncated_payloads_are_refused_and_restore_nothing() {
    let full = payload();
    for len in 0..full.len() {
        let (store, r) = restore(full[..len].to_vec());
        assert!(r.is_err(), "a {len}-byte prefix of {} restored", full.len());
        assert_eq!(store.len(), 0);
        assert_eq!(store.volatile_len(), 0);
    }
    let (store, r) = restore(full.clone());
    r.unwrap();
    assert_eq!(store.len(), 3);
    let mut longer = full;
    longer.push(0);
    assert!(matches!(restore(longer).1, Err(Error::TrailingBytes(1))));
}

#[test]
fn keys_out_of_order_or_repeated_are_refused() {
    for keys in [[b"b", b"a"], [b"a", b"a"]] {
        let state = KvState {
            keys: keys
                .iter()
                .map(|k| Key(k.to_vec(), b"v".to_vec(), None))
                .collect(),
        };
        let (store, r) = restore(postcard::to_allocvec(&state).unwrap());
        assert!(matches!(r, Err(Error::Unordered)), "{keys:?}: {r:?}");
        assert_eq!(store.len(), 0);
    }
}

#[test]
fn a_count_larger_than_the_payload_is_refused_without_reserving_for_it() {
    // A varint count of about 2^63 entries, and nothing after it.
    let mut bytes = vec![0xff; 9];
    bytes.push(0x7f);
    assert!(matches!(restore(bytes).1, Err(Error::Decode(_))));
    let mut bytes = vec![0xff, 0xff, 0xff, 0x7f]; // 2^28 - 1 entries
    bytes.extend([1, b'k', 1, b'v', 0]);
    assert!(matches!(restore(bytes).1, Err(Error::Decode(_))));
}

#[test]
fn damaged_payloads_never_panic_and_what_restores_reads_back() {
    let full = payload();
    for i in 0..full.len() {
        for flip in [0x01, 0x80, 0xff] {
            let mut bytes = full.clone();
            bytes[i] ^= flip;
            let (store, r) = restore(bytes);
            if r.is_ok() {
                let now = Instant::from_nanos(0);
                let live: Vec<_> = store.live_entries(now).collect();
                assert_eq!(live.len(), store.len(), "byte {i} ^ {flip:#x}");
                assert!(store.keys(b"*").count() == store.len());
            } else {
                assert_eq!(store.len(), 0);
            }
        }
    }
}

#[test]
fn entries_whose_ttl_ran_out_before_the_last_blob_are_left_out() {
    let mut store = Store::new();
    let delta = KvDelta {
        at_ms: 5,
        ..KvDelta::default()
    };
    // `c` had 1 ms left at the full checkpoint, 5 ms before the last blob.
    checkpoint::restore(&mut store, payload(), vec![delta], Instant::from_nanos(0)).unwrap();
    let now = Instant::from_nanos(0);
    let left: Vec<_> = store.live_entries(now).map(|(k, _)| k.to_vec()).collect();
    assert_eq!(left, [b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(store.volatile_len(), 1);
    assert_eq!(
        store.entry(b"b").unwrap().expires_at,
        Some(Instant::from_nanos(9_995 * 1_000_000))
    );
}
