//! The keyspace on its own: deadlines against explicit instants, the
//! change tracking incremental checkpoints rely on, and the glob matcher
//! against a plain reference implementation.

use std::time::Duration;

use kv_core::glob;
use kv_core::store::Store;
use kv_core::Instant;

fn at(ms: u64) -> Instant {
    Instant::from_nanos(ms * 1_000_000)
}

fn keys(store: &Store, pattern: &[u8]) -> Vec<Vec<u8>> {
    store.keys(pattern).map(<[u8]>::to_vec).collect()
}

#[test]
fn deadlines_are_exact_and_the_expiry_index_follows_every_change() {
    let mut s = Store::new();
    assert_eq!(
        s.next_deadline(),
        None,
        "nothing to expire: sleep until a command"
    );
    s.set(b"a".to_vec(), b"1".to_vec(), Some(at(100)));
    s.set(b"b".to_vec(), b"2".to_vec(), Some(at(200)));
    s.set(b"c".to_vec(), b"3".to_vec(), None);
    assert_eq!(s.volatile_len(), 2);
    assert_eq!(s.next_deadline(), Some(at(100)));
    // Moving a deadline leaves one index entry, at the new deadline.
    assert!(s.set_expiry(b"a", Some(at(300)), at(0)));
    assert!(s.set_expiry(b"c", Some(at(150)), at(0)));
    assert!(s.set_expiry(b"b", None, at(0)));
    assert_eq!(s.volatile_len(), 2);
    assert_eq!(
        s.next_deadline(),
        Some(at(150)),
        "the earliest moved deadline"
    );
    assert_eq!(s.expire_due(at(149), usize::MAX), 0);
    assert_eq!(s.expire_due(at(150), usize::MAX), 1);
    assert_eq!(s.next_deadline(), Some(at(300)));
    assert!(s.get(b"c", at(150)).is_none());
    assert!(s.get(b"b", at(10_000)).is_some(), "b persists");
    assert!(s.get(b"a", at(299)).is_some());
    assert!(s.get(b"a", at(300)).is_none(), "expired when touched");
    assert_eq!(s.volatile_len(), 0);
    assert_eq!(s.expired_keys, 2);
    assert!(!s.set_expiry(b"a", Some(at(400)), at(300)), "no such key");
    // Overwriting drops the old deadline from the index.
    s.set(b"d".to_vec(), b"4".to_vec(), Some(at(500)));
    s.set(b"d".to_vec(), b"5".to_vec(), None);
    assert_eq!(s.volatile_len(), 0);
    assert_eq!(s.expire_due(at(10_000), usize::MAX), 0);
    assert_eq!(s.next_deadline(), None);
    assert_eq!(s.len(), 2);
}

#[test]
fn a_removed_or_expired_key_is_gone_for_every_reader() {
    let mut s = Store::new();
    s.set(b"k".to_vec(), b"v".to_vec(), Some(at(10)));
    assert!(
        s.remove(b"k", at(10)).is_none(),
        "expired: nothing to remove"
    );
    assert_eq!(s.len(), 0);
    s.set(b"k".to_vec(), b"v".to_vec(), Some(at(20)));
    assert_eq!(s.remove(b"k", at(19)).map(|e| e.value), Some(b"v".to_vec()));
    assert_eq!(s.volatile_len(), 0);
    assert!(s.value_mut(b"k", at(19)).is_none());
    assert_eq!(s.live_entries(at(0)).count(), 0);
}

#[test]
fn changes_are_tracked_for_deltas_only_when_asked() {
    let mut s = Store::new();
    s.set(b"untracked".to_vec(), b"v".to_vec(), None);
    assert!(s.take_dirty().is_none());
    s.track_changes();
    assert!(s.take_dirty().is_none(), "nothing changed since");
    s.set(b"a".to_vec(), b"1".to_vec(), Some(at(5)));
    s.set(b"b".to_vec(), b"2".to_vec(), None);
    s.remove(b"untracked", at(0));
    s.remove(b"missing", at(0));
    let d = s.take_dirty().expect("changes");
    assert!(!d.cleared);
    let names: Vec<&[u8]> = d.keys.iter().map(Vec::as_slice).collect();
    assert_eq!(names, [&b"a"[..], b"b", b"untracked"]);
    assert_eq!(s.expire_due(at(5), usize::MAX), 1);
    let d = s.take_dirty().expect("an expiry is a change");
    assert!(d.keys.contains(b"a".as_slice()));
    s.clear();
    s.set(b"c".to_vec(), b"3".to_vec(), None);
    let d = s.take_dirty().expect("changes");
    assert!(d.cleared);
    assert_eq!(d.keys.len(), 1, "only what changed after the flush");
    s.stop_tracking();
    s.set(b"d".to_vec(), b"4".to_vec(), None);
    assert!(s.take_dirty().is_none());
}

#[test]
fn every_write_counts_as_a_change() {
    // `changes` orders acknowledgements after checkpoints.
    let mut s = Store::new();
    let mut last = s.changes;
    let mut step = |s: &mut Store, what: &str| {
        assert!(s.changes > last, "{what} counts");
        last = s.changes;
    };
    s.set(b"k".to_vec(), b"1".to_vec(), None);
    step(&mut s, "set");
    s.set_keep_ttl(b"k".to_vec(), b"2".to_vec(), at(0));
    step(&mut s, "set_keep_ttl");
    s.value_mut(b"k", at(0)).unwrap().push(b'3');
    step(&mut s, "value_mut");
    s.set_expiry(b"k", Some(at(9)), at(0));
    step(&mut s, "set_expiry");
    s.remove(b"k", at(0));
    step(&mut s, "remove");
    s.clear();
    step(&mut s, "clear");
}

#[test]
fn keys_lists_in_order_and_uses_the_literal_prefix() {
    let mut s = Store::new();
    for k in ["a", "a*", "ab", "b", "ba", "a\\"] {
        s.set(k.as_bytes().to_vec(), b"v".to_vec(), None);
    }
    assert_eq!(
        keys(&s, b"*"),
        [&b"a"[..], b"a*", b"a\\", b"ab", b"b", b"ba"]
    );
    assert_eq!(keys(&s, b"a\\*"), [b"a*"]);
    assert_eq!(keys(&s, b"a\\"), [b"a\\"], "a trailing backslash is itself");
    assert_eq!(keys(&s, b"b?"), [b"ba"]);
    assert_eq!(glob::literal_prefix(b"us\\er:[0-9]*"), b"user:");
    assert!(glob::is_literal(b"a\\*b") && !glob::is_literal(b"a?"));
}

/// A direct transcription of the glob rules (Redis's `stringmatchlen`,
/// with `*` matching the empty string), exponential but obviously right.
fn reference(p: &[u8], s: &[u8], nocase: bool) -> bool {
    let eq = |a: u8, b: u8| {
        if nocase {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    match p.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len()).any(|i| reference(&p[1..], &s[i..], nocase)),
        Some(_) if s.is_empty() => false,
        Some(b'?') => reference(&p[1..], &s[1..], nocase),
        Some(b'[') => {
            let c = s[0];
            let mut i = 1;
            let negate = p.get(i) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut hit = false;
            while i < p.len() && p[i] != b']' {
                if p[i] == b'\\' && i + 1 < p.len() {
                    hit |= p[i + 1] == c;
                    i += 2;
                } else if i + 2 < p.len() && p[i + 1] == b'-' {
                    let (lo, hi) = (p[i].min(p[i + 2]), p[i].max(p[i + 2]));
                    hit |= if nocase {
                        let x = c.to_ascii_lowercase();
                        lo.to_ascii_lowercase() <= x && x <= hi.to_ascii_lowercase()
                    } else {
                        lo <= c && c <= hi
                    };
                    i += 3;
                } else {
                    hit |= eq(p[i], c);
                    i += 1;
                }
            }
            let rest = &p[(i + 1).min(p.len())..];
            hit != negate && reference(rest, &s[1..], nocase)
        }
        Some(b'\\') if p.len() > 1 => eq(p[1], s[0]) && reference(&p[2..], &s[1..], nocase),
        Some(&c) => eq(c, s[0]) && reference(&p[1..], &s[1..], nocase),
    }
}

#[test]
fn glob_matching_agrees_with_the_reference_on_random_inputs() {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let pattern_bytes = b"ab*?[]^-\\A";
    let subject_bytes = b"ab-]^\\*A";
    for _ in 0..200_000 {
        let p: Vec<u8> = (0..next(8)).map(|_| pattern_bytes[next(10)]).collect();
        let s: Vec<u8> = (0..next(7)).map(|_| subject_bytes[next(8)]).collect();
        let nocase = next(2) == 1;
        assert_eq!(
            glob::matches(&p, &s, nocase),
            reference(&p, &s, nocase),
            "pattern {:?} subject {:?} nocase {nocase}",
            String::from_utf8_lossy(&p),
            String::from_utf8_lossy(&s)
        );
        // What KEYS lists is what matches, the prefix shortcut included.
        let mut store = Store::new();
        store.set(s.clone(), Vec::new(), None);
        let listed = store.keys(&p).count() == 1;
        assert_eq!(
            listed,
            glob::matches(&p, &s, false),
            "KEYS {:?} with key {:?}",
            String::from_utf8_lossy(&p),
            String::from_utf8_lossy(&s)
        );
    }
}

#[test]
fn instants_saturate_instead_of_wrapping() {
    let end = Instant::from_nanos(u64::MAX);
    assert_eq!(end + Duration::from_secs(1), end);
    assert_eq!(at(1) - at(2), Duration::ZERO);
    assert_eq!(at(5).duration_since(at(2)), Duration::from_millis(3));
}
