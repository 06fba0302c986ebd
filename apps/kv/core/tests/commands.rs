//! Commands against the keyspace, through the real parser and reply
//! encoders: string semantics, TTLs on a clock the tests move, KEYS
//! patterns, integer overflow, counts, memory limits and pipelining.

mod common;

use std::time::Duration;

use common::{bulk, err, error_text, int, ok, replies, sorted, Kv};
use kv_core::resp::{self, Parser, Reply, MAX_BULK};
use kv_core::Flow;

const MS: Duration = Duration::from_millis(1);

#[test]
fn set_get_and_their_options() {
    let mut kv = Kv::new();
    assert_eq!(kv.run("GET k"), Reply::Nil);
    assert_eq!(kv.run("SET k v1"), ok());
    assert_eq!(kv.run("GET k"), bulk("v1"));
    assert_eq!(kv.run("SET k v2 NX"), Reply::Nil);
    assert_eq!(kv.run("SET other v XX"), Reply::Nil);
    assert_eq!(kv.run("EXISTS other"), int(0));
    assert_eq!(kv.run("SET k v3 XX GET"), bulk("v1"));
    assert_eq!(kv.run("SET new v GET"), Reply::Nil);
    assert_eq!(kv.run("GET k"), bulk("v3"));
    for bad in [
        "SET k v NX XX",
        "SET k v EX 1 PX 1",
        "SET k v KEEPTTL EX 1",
        "SET k v EX",
        "SET k v BOGUS",
    ] {
        assert_eq!(kv.run(bad), err("ERR syntax error"), "{bad}");
    }
    assert_eq!(
        kv.run("SET k v EX 0"),
        err("ERR invalid expire time in 'set' command")
    );
    assert_eq!(
        kv.run("SET k v EX 9223372036854775807"),
        err("ERR invalid expire time in 'set' command")
    );
    assert_eq!(
        kv.run("SET k v PX ten"),
        err("ERR value is not an integer or out of range")
    );
    // A refused SET changed nothing.
    assert_eq!(kv.run("GET k"), bulk("v3"));
    assert_eq!(kv.run("PTTL k"), int(-1));
}

#[test]
fn binary_keys_and_values_round_trip() {
    let mut kv = Kv::new();
    let key: &[u8] = b"\x00k\r\n\xff";
    let value: Vec<u8> = (0..=255).collect();
    assert_eq!(kv.cmd(&[&b"SET"[..], key, &value]), ok());
    assert_eq!(kv.cmd(&[&b"GET"[..], key]), Reply::Bulk(value));
    assert_eq!(kv.cmd(&[&b"STRLEN"[..], key]), int(256));
    assert_eq!(sorted(kv.run("KEYS *")), vec![key.to_vec()]);
}

#[test]
fn keys_expire_exactly_at_their_deadline() {
    let mut kv = Kv::new();
    assert_eq!(kv.run("SET k v PX 100"), ok());
    assert_eq!(kv.run("SETEX s 1 v"), ok());
    assert_eq!(kv.run("PSETEX p 50 v"), ok());
    kv.advance(49 * MS);
    assert_eq!(kv.run("PTTL p"), int(1));
    kv.advance(MS);
    assert_eq!(kv.run("GET p"), Reply::Nil);
    assert_eq!(kv.run("PTTL k"), int(50));
    assert_eq!(kv.run("TTL k"), int(0)); // 50 ms rounds to 0 s, as in Redis
    kv.advance(49 * MS);
    assert_eq!(kv.run("GET k"), bulk("v"));
    kv.advance(MS);
    assert_eq!(kv.run("GET k"), Reply::Nil);
    assert_eq!(kv.run("TTL k"), int(-2));
    assert_eq!(kv.run("TTL s"), int(1));
    kv.advance(900 * MS);
    assert_eq!(kv.run("EXISTS s k p"), int(0));
    assert_eq!(kv.run("DBSIZE"), int(0));
    assert_eq!(kv.server.store.expired_keys, 3);
}

#[test]
fn the_commands_of_one_read_run_at_the_time_it_was_read() {
    let mut kv = Kv::new();
    let read_at = kv.platform.now();
    let mut out = Vec::new();
    let run = |kv: &mut Kv, words: &[&str], out: &mut Vec<u8>| {
        let mut req = Vec::new();
        resp::command(&mut req, words);
        let cmd = Parser::new().parse(&req).unwrap().command.unwrap();
        kv_core::commands::execute_at(&mut kv.server, kv.client, cmd, out, read_at);
    };
    run(&mut kv, &["SET", "k", "v", "PX", "10"], &mut out);
    // The clock moves on while the read's commands run: they still see its time.
    kv.advance(10 * MS);
    run(&mut kv, &["GET", "k"], &mut out);
    run(&mut kv, &["PTTL", "k"], &mut out);
    assert_eq!(replies(&out), [ok(), bulk("v"), int(10)]);
    // The next read sees the key gone.
    assert_eq!(kv.run("GET k"), Reply::Nil);
}

#[test]
fn expired_keys_are_removed_without_being_touched() {
    let mut kv = Kv::new();
    for i in 0..100 {
        kv.run(&format!("SET k{i} v PX {}", 10 + i));
    }
    kv.run("SET forever v");
    assert_eq!(kv.server.store.volatile_len(), 100);
    kv.advance(60 * MS);
    // The background task's batches: bounded work per call.
    assert_eq!(kv_core::commands::expire_cycle(&mut kv.server, 20), 20);
    // Deadlines of 10..=60 ms have passed: 51 keys.
    assert_eq!(kv_core::commands::expire_cycle(&mut kv.server, 1000), 31);
    assert_eq!(kv_core::commands::expire_cycle(&mut kv.server, 1000), 0);
    assert_eq!(kv.server.store.len(), 50);
    assert_eq!(kv.server.store.volatile_len(), 49);
    kv.advance(Duration::from_secs(1));
    assert_eq!(kv.run("DBSIZE"), int(1));
}

#[test]
fn expire_and_its_conditions() {
    let mut kv = Kv::new();
    kv.run("SET k v");
    assert_eq!(kv.run("EXPIRE missing 10"), int(0));
    assert_eq!(kv.run("EXPIRE k 10 XX"), int(0), "no TTL yet");
    assert_eq!(kv.run("EXPIRE k 10 GT"), int(0), "no TTL is infinite");
    assert_eq!(kv.run("EXPIRE k 10 NX"), int(1));
    assert_eq!(kv.run("EXPIRE k 20 NX"), int(0));
    assert_eq!(kv.run("EXPIRE k 5 GT"), int(0));
    assert_eq!(kv.run("EXPIRE k 20 GT"), int(1));
    assert_eq!(kv.run("EXPIRE k 30 LT"), int(0));
    assert_eq!(kv.run("PEXPIRE k 1500 LT"), int(1));
    assert_eq!(kv.run("PTTL k"), int(1500));
    assert_eq!(kv.run("TTL k"), int(2)); // 1.5 s rounds up
    assert_eq!(kv.run("PERSIST k"), int(1));
    assert_eq!(kv.run("PERSIST k"), int(0));
    assert_eq!(kv.run("TTL k"), int(-1));
    assert_eq!(
        kv.run("EXPIRE k 1 NX XX"),
        err("ERR NX and XX, GT or LT options at the same time are not compatible")
    );
    assert_eq!(
        kv.run("EXPIRE k 1 GT LT"),
        err("ERR GT and LT options at the same time are not compatible")
    );
    assert_eq!(
        kv.run("EXPIRE k 9223372036854775807"),
        err("ERR invalid expire time in 'expire' command")
    );
    assert_eq!(kv.run("EXISTS k"), int(1));
    // A deadline in the past deletes the key.
    assert_eq!(kv.run("EXPIRE k -1"), int(1));
    assert_eq!(kv.run("EXISTS k"), int(0));
}

#[test]
fn writes_keep_or_drop_the_ttl_as_redis_does() {
    let mut kv = Kv::new();
    kv.run("SET n 5 EX 100");
    assert_eq!(kv.run("INCR n"), int(6));
    assert_eq!(kv.run("APPEND n 0"), int(2));
    assert_eq!(kv.run("TTL n"), int(100), "INCR and APPEND keep the TTL");
    assert_eq!(kv.run("SET n 1 KEEPTTL"), ok());
    assert_eq!(kv.run("TTL n"), int(100));
    assert_eq!(kv.run("SET n 1"), ok());
    assert_eq!(kv.run("TTL n"), int(-1), "a plain SET drops it");
    kv.run("SET g old EX 100");
    assert_eq!(kv.run("GETSET g new"), bulk("old"));
    assert_eq!(kv.run("TTL g"), int(-1));
    // An expired key counts as missing for every command.
    kv.run("SET e 41 PX 10");
    kv.advance(10 * MS);
    assert_eq!(kv.run("GETSET e x"), Reply::Nil);
    kv.run("SET e 41 PX 10");
    kv.advance(10 * MS);
    assert_eq!(kv.run("INCR e"), int(1));
    assert_eq!(kv.run("TTL e"), int(-1));
    kv.run("SET e v PX 10");
    kv.advance(10 * MS);
    assert_eq!(kv.run("SETNX e w"), int(1));
    assert_eq!(kv.run("SET e v PX 10"), ok());
    kv.advance(10 * MS);
    assert_eq!(kv.run("SET e w KEEPTTL"), ok());
    assert_eq!(kv.run("TTL e"), int(-1), "an expired key's TTL is not kept");
}

#[test]
fn incr_overflow_and_non_integers_are_refused_and_change_nothing() {
    let mut kv = Kv::new();
    assert_eq!(kv.run("INCR n"), int(1));
    assert_eq!(kv.run("DECRBY n 3"), int(-2));
    kv.run("SET n 9223372036854775806");
    assert_eq!(kv.run("INCR n"), int(i64::MAX));
    assert_eq!(
        kv.run("INCR n"),
        err("ERR increment or decrement would overflow")
    );
    assert_eq!(kv.run("GET n"), bulk(i64::MAX.to_string()));
    kv.run("SET m -9223372036854775807");
    assert_eq!(kv.run("DECR m"), int(i64::MIN));
    assert_eq!(
        kv.run("DECR m"),
        err("ERR increment or decrement would overflow")
    );
    assert_eq!(
        kv.run("INCRBY m -1"),
        err("ERR increment or decrement would overflow")
    );
    assert_eq!(kv.run("INCRBY m 9223372036854775807"), int(-1));
    assert_eq!(
        kv.run("DECRBY z -9223372036854775808"),
        err("ERR decrement would overflow")
    );
    assert_eq!(kv.run("EXISTS z"), int(0));
    for bad in ["abc", "1.5", " 1", "01", "", "9223372036854775808"] {
        kv.cmd(&["SET", "s", bad]);
        assert_eq!(
            kv.run("INCR s"),
            err("ERR value is not an integer or out of range"),
            "{bad:?}"
        );
        assert_eq!(kv.run("GET s"), bulk(bad));
    }
    assert_eq!(
        kv.run("INCRBY n x"),
        err("ERR value is not an integer or out of range")
    );
}

#[test]
fn del_and_exists_count_like_redis() {
    let mut kv = Kv::new();
    kv.run("MSET a 1 b 2 c 3");
    assert_eq!(kv.run("EXISTS a a b missing"), int(3), "each name counts");
    assert_eq!(kv.run("DEL a a missing"), int(1), "each key deleted once");
    assert_eq!(kv.run("UNLINK b c"), int(2));
    assert_eq!(kv.run("DEL b"), int(0));
    assert_eq!(kv.run("DBSIZE"), int(0));
    kv.run("SET t v PX 5");
    kv.advance(5 * MS);
    assert_eq!(
        kv.run("DEL t"),
        int(0),
        "an expired key is not deleted again"
    );
}

#[test]
fn keys_matches_glob_patterns() {
    let mut kv = Kv::new();
    let names = [
        "", "a", "ab", "abc", "b", "hello", "hallo", "hxllo", "hllo", "heeello", "h*llo", "user:1",
        "user:2", "user:10", "users", "User:3",
    ];
    for n in names {
        kv.cmd(&["SET", n, "v"]);
    }
    let keys = |kv: &mut Kv, p: &str| -> Vec<String> {
        sorted(kv.cmd(&["KEYS", p]))
            .into_iter()
            .map(|k| String::from_utf8(k).unwrap())
            .collect()
    };
    let mut all: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    all.sort();
    assert_eq!(keys(&mut kv, "*"), all);
    assert_eq!(keys(&mut kv, "user:*"), ["user:1", "user:10", "user:2"]);
    assert_eq!(keys(&mut kv, "user:?"), ["user:1", "user:2"]);
    assert_eq!(keys(&mut kv, "h?llo"), ["h*llo", "hallo", "hello", "hxllo"]);
    assert_eq!(
        keys(&mut kv, "h*llo"),
        ["h*llo", "hallo", "heeello", "hello", "hllo", "hxllo"]
    );
    assert_eq!(keys(&mut kv, "h[ae]llo"), ["hallo", "hello"]);
    assert_eq!(keys(&mut kv, "h[^e]llo"), ["h*llo", "hallo", "hxllo"]);
    assert_eq!(keys(&mut kv, "h[a-e]llo"), ["hallo", "hello"]);
    assert_eq!(
        keys(&mut kv, "h[e-a]llo"),
        ["hallo", "hello"],
        "a reversed range"
    );
    assert_eq!(keys(&mut kv, "h\\*llo"), ["h*llo"]);
    assert_eq!(
        keys(&mut kv, "a"),
        ["a"],
        "a literal pattern is not a prefix"
    );
    assert_eq!(keys(&mut kv, "ab*"), ["ab", "abc"]);
    assert_eq!(
        keys(&mut kv, "[Uu]ser:*"),
        ["User:3", "user:1", "user:10", "user:2"]
    );
    assert_eq!(keys(&mut kv, "nothing*"), Vec::<String>::new());
    // An unterminated set runs to the pattern's end, as in Redis.
    assert_eq!(keys(&mut kv, "[unterminated"), ["a"]);
    // Expired keys are not listed.
    kv.run("PEXPIRE users 1");
    kv.advance(MS);
    assert_eq!(keys(&mut kv, "user*"), ["user:1", "user:10", "user:2"]);
}

#[test]
fn glob_matching_takes_polynomial_time_on_hostile_patterns() {
    let subject = vec![b'a'; 20_000];
    let pattern = b"*a*a*a*a*a*a*a*a*a*a*b";
    // Exponential backtracking would not finish; this takes milliseconds.
    assert!(!kv_core::glob::matches(pattern, &subject, false));
    assert!(kv_core::glob::matches(b"*a*a*a*a", &subject, false));
    assert!(kv_core::glob::matches(b"HELLO", b"hello", true));
    assert!(!kv_core::glob::matches(b"HELLO", b"hello", false));
}

#[test]
fn mset_mget_msetnx_append_strlen_getdel() {
    let mut kv = Kv::new();
    assert_eq!(kv.run("MSET a 1 b 2"), ok());
    assert_eq!(
        kv.run("MSET a 1 b"),
        err("ERR wrong number of arguments for 'mset' command")
    );
    assert_eq!(
        kv.run("MGET a missing b"),
        Reply::Array(vec![bulk("1"), Reply::Nil, bulk("2")])
    );
    assert_eq!(kv.run("MSETNX c 3 a 9"), int(0));
    assert_eq!(kv.run("EXISTS c"), int(0), "MSETNX sets all or none");
    assert_eq!(kv.run("MSETNX c 3 d 4"), int(1));
    assert_eq!(kv.run("APPEND c 45"), int(3));
    assert_eq!(kv.run("STRLEN c"), int(3));
    assert_eq!(kv.run("STRLEN missing"), int(0));
    assert_eq!(kv.run("GETDEL c"), bulk("345"));
    assert_eq!(kv.run("GETDEL c"), Reply::Nil);
    assert_eq!(kv.run("TYPE a"), Reply::Simple(b"string".to_vec()));
    assert_eq!(kv.run("TYPE c"), Reply::Simple(b"none".to_vec()));
}

#[test]
fn append_stops_at_the_largest_value() {
    let mut kv = Kv::new();
    let half = vec![b'x'; MAX_BULK / 2];
    assert_eq!(
        kv.cmd(&[&b"APPEND"[..], b"k", &half]),
        int(half.len() as i64)
    );
    assert_eq!(kv.cmd(&[&b"APPEND"[..], b"k", &half]), int(MAX_BULK as i64));
    assert_eq!(
        kv.run("APPEND k y"),
        err("ERR string exceeds maximum allowed size (proto-max-bulk-len)")
    );
    assert_eq!(kv.run("STRLEN k"), int(MAX_BULK as i64));
}

#[test]
fn bad_commands_get_redis_errors() {
    let mut kv = Kv::new();
    assert_eq!(
        kv.run("NOPE a b"),
        err("ERR unknown command 'NOPE', with args beginning with: 'a' 'b' ")
    );
    assert_eq!(
        kv.run("GET"),
        err("ERR wrong number of arguments for 'get' command")
    );
    assert_eq!(
        kv.run("GET a b"),
        err("ERR wrong number of arguments for 'get' command")
    );
    assert_eq!(
        kv.run("SET k"),
        err("ERR wrong number of arguments for 'set' command")
    );
    assert_eq!(kv.run("get k"), Reply::Nil, "names are case-insensitive");
    assert_eq!(kv.run("SELECT 1"), err("ERR DB index is out of range"));
    assert_eq!(kv.run("SELECT 0"), ok());
    let long = "x".repeat(1000);
    let text = error_text(&kv.cmd(&[long.as_str(), long.as_str()]));
    assert!(
        text.len() < 400,
        "the echoed command is cut short: {}",
        text.len()
    );
    assert_eq!(
        kv.run("HELLO 3"),
        err("NOPROTO unsupported protocol version")
    );
}

#[test]
fn a_pipeline_is_answered_in_order_and_quit_ends_it() {
    let mut kv = Kv::new();
    let (replies, flow) =
        kv.send(b"SET a 1\r\n*2\r\n$4\r\nINCR\r\n$1\r\na\r\nPING\r\nQUIT\r\nSET b 2\r\n");
    assert_eq!(
        replies,
        vec![ok(), int(2), Reply::Simple(b"PONG".to_vec()), ok()]
    );
    assert_eq!(flow, Flow::Close);
    assert_eq!(kv.run("EXISTS b"), int(0), "nothing runs after QUIT");
}

#[test]
fn writes_are_refused_when_memory_is_short_and_reads_go_on() {
    let mut kv = Kv::with_maxmemory(2 << 20);
    kv.run("SET k v");
    // 3 MiB used is past MAXMEMORY.
    kv.platform.heap.set((3 << 20, 60 << 20));
    let oom = err("OOM command not allowed when used memory > 'maxmemory'.");
    assert_eq!(kv.run("SET k w"), oom);
    assert_eq!(kv.run("APPEND k w"), oom);
    assert_eq!(kv.run("GET k"), bulk("v"));
    assert_eq!(kv.run("DEL k"), int(1), "deletes free memory, so they run");
    // Without MAXMEMORY, a heap with less than 1/8 free refuses too.
    let mut kv = Kv::new();
    kv.platform.heap.set((60 << 20, 4 << 20));
    assert_eq!(kv.run("SET k v"), oom);
    assert_eq!(kv.server.stats.rejected_oom, 1);
    kv.platform.heap.set((1 << 20, 60 << 20));
    assert_eq!(kv.run("SET k v"), ok());
}

#[test]
fn info_reports_the_keyspace_and_the_platform() {
    let mut kv = Kv::new();
    kv.run("SET a 1");
    kv.run("SET b 1 EX 10");
    let Reply::Bulk(info) = kv.run("INFO") else {
        panic!("INFO is a bulk string");
    };
    let info = String::from_utf8(info).unwrap();
    for line in [
        "# Server\r\n",
        "host:test-host\r\n",
        "region:test-region\r\n",
        "connected_clients:1\r\n",
        "used_memory:1048576\r\n",
        "db0:keys=2,expires=1,avg_ttl=0\r\n",
    ] {
        assert!(info.contains(line), "{line:?} in {info}");
    }
    let Reply::Bulk(stats) = kv.run("INFO stats") else {
        panic!("INFO is a bulk string");
    };
    let stats = String::from_utf8(stats).unwrap();
    assert!(
        stats.starts_with("# Stats\r\n") && !stats.contains("# Server"),
        "{stats}"
    );
    assert_eq!(
        kv.run("CONFIG GET maxmemory*"),
        Reply::Array(vec![
            bulk("maxmemory"),
            bulk("0"),
            bulk("maxmemory-policy"),
            bulk("noeviction")
        ])
    );
}

#[test]
fn flushall_empties_the_keyspace() {
    let mut kv = Kv::new();
    kv.run("MSET a 1 b 2");
    kv.run("EXPIRE a 10");
    assert_eq!(kv.run("FLUSHALL"), ok());
    assert_eq!(kv.run("DBSIZE"), int(0));
    assert_eq!(kv.server.store.volatile_len(), 0);
    assert_eq!(kv.run("FLUSHDB SOMETIMES"), err("ERR syntax error"));
}

#[test]
fn client_names_and_ids() {
    let mut kv = Kv::new();
    assert_eq!(kv.run("CLIENT ID"), int(kv.client as i64));
    assert_eq!(kv.run("CLIENT GETNAME"), Reply::Nil);
    assert_eq!(kv.run("CLIENT SETNAME app-1"), ok());
    assert_eq!(kv.run("CLIENT GETNAME"), bulk("app-1"));
    assert_eq!(
        kv.cmd(&["CLIENT", "SETNAME", "two words"]),
        err("ERR Client names cannot contain spaces, newlines or special characters.")
    );
    let Reply::Bulk(list) = kv.run("CLIENT LIST") else {
        panic!("CLIENT LIST is a bulk string");
    };
    let list = String::from_utf8(list).unwrap();
    assert!(list.contains("addr=10.0.0.9:40000 name=app-1 "), "{list}");
    // Library names cannot forge lines or fields of CLIENT LIST.
    assert_eq!(kv.run("CLIENT SETINFO LIB-NAME redis-py"), ok());
    assert_eq!(
        kv.cmd(&["CLIENT", "SETINFO", "LIB-VER", "1\nid=99 addr=evil"]),
        err("ERR lib-ver cannot contain spaces, newlines or special characters.")
    );
    let Reply::Bulk(list) = kv.run("CLIENT LIST") else {
        panic!("CLIENT LIST is a bulk string");
    };
    assert_eq!(
        list.iter().filter(|&&b| b == b'\n').count(),
        1,
        "one client, one line"
    );
    assert!(String::from_utf8(list)
        .unwrap()
        .contains(" lib-name=redis-py lib-ver=\n"));
    kv.server.disconnect(kv.client);
    assert!(kv.server.clients.is_empty());
}

#[test]
fn maxmemory_sizes_parse_with_units_and_refuse_overflow() {
    use kv_core::commands::parse_bytes;
    for (s, n) in [
        ("123", 123),
        ("0", 0),
        ("64kb", 64 << 10),
        ("64K", 64 << 10),
        (" 100mb ", 100 << 20),
        ("1GB", 1 << 30),
        ("7b", 7),
    ] {
        assert_eq!(parse_bytes(s), Some(n), "{s:?}");
    }
    for s in [
        "",
        "mb",
        "1.5m",
        "-1",
        "1 mb",
        "1tb",
        "18446744073709551615g",
        "99999999999999999999",
    ] {
        assert_eq!(parse_bytes(s), None, "{s:?}");
    }
}
