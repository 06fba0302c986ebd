//! Command dispatch: the server's shared state ([`Server`]) and one handler
//! per command, writing RESP2 replies into the connection's output buffer.
//!
//! Replies and error texts follow Redis 7 so that clients and tools that
//! match on them (`redis-cli`, `redis-benchmark`, client libraries) work.
//! Handlers never `.await`: a command runs start to finish while the caller
//! holds the `RefCell` borrow of the server, which makes every command atomic
//! on the single vCPU, as in Redis. The time and the heap's usage come from
//! the server's [`Platform`].

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::time::Duration;

use crate::{Instant, Platform};

use crate::glob;
use crate::resp::{self, parse_i64, Command, MAX_BULK};
use crate::store::Store;

/// The version `INFO` and `HELLO` report.
pub const VERSION: &str = "7.0.0-libcloud";

const ERR_NOT_INTEGER: &[u8] = b"ERR value is not an integer or out of range";
const ERR_SYNTAX: &[u8] = b"ERR syntax error";
const ERR_OOM: &[u8] = b"OOM command not allowed when used memory > 'maxmemory'.";
const ERR_OVERFLOW: &[u8] = b"ERR increment or decrement would overflow";
const ERR_TOO_BIG: &[u8] = b"ERR string exceeds maximum allowed size (proto-max-bulk-len)";

/// Heap kept free for connections (buffers, replies): writes are refused
/// with `-OOM` once less than this is left. At most 8 MiB, at most 1/8 of
/// the heap.
const HEAP_RESERVE_MAX: usize = 8 * 1024 * 1024;
/// Due keys the dispatcher expires before each command: keeps expired keys
/// from piling up between runs of the background task under load.
const EXPIRE_PER_COMMAND: usize = 16;

/// Counters for `INFO stats`.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_received: u64,
    pub commands_processed: u64,
    pub keyspace_hits: u64,
    pub keyspace_misses: u64,
    pub rejected_oom: u64,
}

/// A connected client, for `CLIENT LIST`/`INFO`.
#[derive(Debug)]
pub struct ClientInfo {
    pub addr: String,
    pub name: Vec<u8>,
    pub lib_name: Vec<u8>,
    pub lib_ver: Vec<u8>,
    pub since: Instant,
}

/// Everything connections share: the keyspace, the clients, the counters.
pub struct Server {
    pub store: Store,
    pub stats: Stats,
    pub clients: BTreeMap<u64, ClientInfo>,
    next_client_id: u64,
    started: Instant,
    port: u16,
    max_clients: usize,
    /// `MAXMEMORY`: refuse writes once the heap holds more; 0 = no limit.
    maxmemory: usize,
    platform: Box<dyn Platform>,
}

impl core::fmt::Debug for Server {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Server")
            .field("store", &self.store)
            .field("stats", &self.stats)
            .field("clients", &self.clients)
            .field("port", &self.port)
            .field("maxmemory", &self.maxmemory)
            .finish_non_exhaustive()
    }
}

/// What the connection does after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Send the replies so far, then close (`QUIT`).
    Close,
}

impl Server {
    /// A server with an empty keyspace, for `max_clients` connections on
    /// `port` (as `INFO` and `CONFIG GET` report them), refusing writes past
    /// `maxmemory` bytes of heap (0: no limit).
    pub fn new(
        port: u16,
        max_clients: usize,
        maxmemory: usize,
        platform: Box<dyn Platform>,
    ) -> Self {
        Self {
            store: Store::new(),
            stats: Stats::default(),
            clients: BTreeMap::new(),
            next_client_id: 1,
            started: platform.now(),
            port,
            max_clients,
            maxmemory,
            platform,
        }
    }

    /// Now, by the platform's clock.
    pub fn now(&self) -> Instant {
        self.platform.now()
    }

    /// Registers a new connection from `addr`; returns its client id.
    pub fn connect(&mut self, addr: String) -> u64 {
        let id = self.next_client_id;
        self.next_client_id += 1;
        self.stats.connections_received += 1;
        let info = ClientInfo {
            addr,
            name: Vec::new(),
            lib_name: Vec::new(),
            lib_ver: Vec::new(),
            since: self.platform.now(),
        };
        self.clients.insert(id, info);
        id
    }

    /// Forgets client `id` (its connection ended).
    pub fn disconnect(&mut self, id: u64) {
        self.clients.remove(&id);
    }

    /// Whether memory is too short to accept more data.
    fn over_memory(&self) -> bool {
        let (used, free) = self.platform.heap_usage();
        let reserve = ((used + free) / 8).min(HEAP_RESERVE_MAX);
        free < reserve || (self.maxmemory != 0 && used > self.maxmemory)
    }

    /// Whether a reply of `bytes` can be built without running the heap dry.
    fn reply_fits(&self, bytes: usize) -> bool {
        let (used, free) = self.platform.heap_usage();
        let reserve = ((used + free) / 8).min(HEAP_RESERVE_MAX);
        bytes < 64 * 1024 || free.saturating_sub(reserve) > bytes.saturating_mul(2)
    }
}

/// A size as `MAXMEMORY` takes it, in bytes: `123`, `64kb`, `100mb`, `1gb`
/// (also `k`, `m`, `g`; any case). `None` if it is not one or overflows.
pub fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim().to_ascii_lowercase();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let scale = match unit {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        _ => return None,
    };
    n.parse::<usize>().ok()?.checked_mul(scale)
}

/// A command being run.
struct Ctx<'a> {
    srv: &'a mut Server,
    client: u64,
    out: &'a mut Vec<u8>,
    now: Instant,
    flow: Flow,
}

impl Ctx<'_> {
    fn ok(&mut self) {
        resp::ok(self.out);
    }
    fn err(&mut self, msg: &[u8]) {
        resp::error(self.out, msg);
    }
    fn int(&mut self, n: i64) {
        resp::integer(self.out, n);
    }
    fn bulk(&mut self, b: &[u8]) {
        resp::bulk(self.out, b);
    }
    fn nil(&mut self) {
        resp::nil(self.out);
    }
    fn array(&mut self, n: usize) {
        resp::array(self.out, n);
    }
}

type Handler = fn(&mut Ctx, &mut [Vec<u8>]);

struct Spec {
    /// Lowercase, as in error messages.
    name: &'static str,
    /// Argument count including the name; negative: at least that many.
    arity: i32,
    /// Refused with `-OOM` when memory is short (commands that add data).
    denyoom: bool,
    run: Handler,
}

const fn spec(name: &'static str, arity: i32, denyoom: bool, run: Handler) -> Spec {
    Spec {
        name,
        arity,
        denyoom,
        run,
    }
}

/// Every command, most used first (lookup is a linear scan).
static COMMANDS: &[Spec] = &[
    spec("get", 2, false, get),
    spec("set", -3, true, set),
    spec("ping", -1, false, ping),
    spec("incr", 2, true, incr),
    spec("decr", 2, true, decr),
    spec("incrby", 3, true, incrby),
    spec("decrby", 3, true, decrby),
    spec("mget", -2, false, mget),
    spec("mset", -3, true, mset),
    spec("del", -2, false, del),
    spec("unlink", -2, false, del),
    spec("exists", -2, false, exists),
    spec("expire", -3, false, expire),
    spec("pexpire", -3, false, pexpire),
    spec("ttl", 2, false, ttl),
    spec("pttl", 2, false, pttl),
    spec("persist", 2, false, persist),
    spec("setnx", 3, true, setnx),
    spec("setex", 4, true, setex),
    spec("psetex", 4, true, psetex),
    spec("getset", 3, true, getset),
    spec("getdel", 2, false, getdel),
    spec("msetnx", -3, true, msetnx),
    spec("append", 3, true, append),
    spec("strlen", 2, false, strlen),
    spec("type", 2, false, type_),
    spec("echo", 2, false, echo),
    spec("keys", 2, false, keys),
    spec("dbsize", 1, false, dbsize),
    spec("flushall", -1, false, flushall),
    spec("flushdb", -1, false, flushall),
    spec("select", 2, false, select),
    spec("info", -1, false, info),
    spec("command", -1, false, command),
    spec("config", -2, false, config),
    spec("client", -2, false, client),
    spec("hello", -1, false, hello),
    spec("auth", -2, false, auth),
    spec("quit", -1, false, quit),
];

fn lookup(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .find(|c| c.name.len() == name.len() && c.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Runs `cmd` (name and arguments) for client `client`, appending its reply
/// to `out`.
pub fn execute(srv: &mut Server, client: u64, cmd: Command, out: &mut Vec<u8>) -> Flow {
    let now = srv.now();
    execute_at(srv, client, cmd, out, now)
}

/// [`execute`] at `now`: the commands of one pipelined read may share the
/// time it was read (in a guest, reading the clock costs about as much as
/// a `GET`).
pub fn execute_at(
    srv: &mut Server,
    client: u64,
    mut cmd: Command,
    out: &mut Vec<u8>,
    now: Instant,
) -> Flow {
    let Some(spec) = cmd.first().and_then(|name| lookup(name)) else {
        unknown_command(&cmd, out);
        return Flow::Continue;
    };
    let argc = cmd.len() as i32;
    if (spec.arity > 0 && argc != spec.arity) || argc < -spec.arity {
        wrong_arity(out, spec.name);
        return Flow::Continue;
    }
    srv.store.expire_due(now, EXPIRE_PER_COMMAND);
    if spec.denyoom && srv.over_memory() {
        srv.stats.rejected_oom += 1;
        resp::error(out, ERR_OOM);
        return Flow::Continue;
    }
    srv.stats.commands_processed += 1;
    let mut ctx = Ctx {
        srv,
        client,
        out,
        now,
        flow: Flow::Continue,
    };
    (spec.run)(&mut ctx, &mut cmd);
    ctx.flow
}

/// Removes expired keys in the background; returns how many. Called by the
/// expiry task with a `limit` so one call never holds the CPU for long.
pub fn expire_cycle(srv: &mut Server, limit: usize) -> usize {
    let now = srv.now();
    srv.store.expire_due(now, limit)
}

fn unknown_command(cmd: &Command, out: &mut Vec<u8>) {
    let mut msg = Vec::from(&b"ERR unknown command '"[..]);
    let name = cmd.first().map(Vec::as_slice).unwrap_or_default();
    msg.extend_from_slice(&name[..name.len().min(128)]);
    msg.extend_from_slice(b"', with args beginning with: ");
    let mut shown = 0;
    for arg in cmd.iter().skip(1) {
        if shown >= 128 {
            break;
        }
        let take = arg.len().min(128 - shown);
        msg.push(b'\'');
        msg.extend_from_slice(&arg[..take]);
        msg.extend_from_slice(b"' ");
        shown += take + 3;
    }
    resp::error(out, &msg);
}

fn wrong_arity(out: &mut Vec<u8>, name: &str) {
    let msg = alloc::format!("ERR wrong number of arguments for '{name}' command");
    resp::error(out, msg.as_bytes());
}

fn unknown_subcommand(ctx: &mut Ctx, sub: &[u8], command: &str) {
    let mut msg = Vec::from(&b"ERR unknown subcommand '"[..]);
    msg.extend_from_slice(&sub[..sub.len().min(128)]);
    msg.extend_from_slice(b"'. Try ");
    msg.extend_from_slice(command.as_bytes());
    msg.extend_from_slice(b" HELP.");
    ctx.err(&msg);
}

fn eq(arg: &[u8], word: &str) -> bool {
    arg.eq_ignore_ascii_case(word.as_bytes())
}

// --- strings -----------------------------------------------------------

fn get(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    match ctx.srv.store.get(&args[1], ctx.now) {
        Some(entry) => {
            resp::bulk(ctx.out, entry.value);
            ctx.srv.stats.keyspace_hits += 1;
        }
        None => {
            ctx.nil();
            ctx.srv.stats.keyspace_misses += 1;
        }
    }
}

/// A time-to-live argument in `unit` (ms per unit) as a duration, checked as
/// Redis checks it: an integer, positive, and no overflow in milliseconds.
fn parse_ttl(ctx: &mut Ctx, arg: &[u8], unit: i64, command: &str) -> Option<Duration> {
    let Some(n) = parse_i64(arg) else {
        ctx.err(ERR_NOT_INTEGER);
        return None;
    };
    if n <= 0 || n > i64::MAX / unit {
        ctx.err(alloc::format!("ERR invalid expire time in '{command}' command").as_bytes());
        return None;
    }
    Some(Duration::from_millis((n * unit) as u64))
}

fn set(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    #[derive(PartialEq)]
    enum Cond {
        Always,
        Nx,
        Xx,
    }
    let mut cond = Cond::Always;
    let mut want_old = false;
    let mut keep_ttl = false;
    let mut ttl: Option<Duration> = None;
    let mut i = 3;
    while i < args.len() {
        let opt = &args[i];
        let next = args.get(i + 1);
        if eq(opt, "NX") && cond == Cond::Always {
            cond = Cond::Nx;
        } else if eq(opt, "XX") && cond == Cond::Always {
            cond = Cond::Xx;
        } else if eq(opt, "GET") && !want_old {
            want_old = true;
        } else if eq(opt, "KEEPTTL") && ttl.is_none() && !keep_ttl {
            keep_ttl = true;
        } else if (eq(opt, "EX") || eq(opt, "PX")) && ttl.is_none() && !keep_ttl && next.is_some() {
            let unit = if eq(opt, "EX") { 1000 } else { 1 };
            let arg = args[i + 1].clone();
            match parse_ttl(ctx, &arg, unit, "set") {
                Some(d) => ttl = Some(d),
                None => return,
            }
            i += 1;
        } else {
            ctx.err(ERR_SYNTAX);
            return;
        }
        i += 1;
    }
    let key = core::mem::take(&mut args[1]);
    let value = core::mem::take(&mut args[2]);
    let now = ctx.now;
    let store = &mut ctx.srv.store;
    let old = store.get(&key, now);
    let exists = old.is_some();
    let old_value = if want_old {
        old.map(|e| e.value.to_vec())
    } else {
        None
    };
    let proceed = match cond {
        Cond::Always => true,
        Cond::Nx => !exists,
        Cond::Xx => exists,
    };
    if proceed {
        if keep_ttl {
            store.set_keep_ttl(key, value, now);
        } else {
            store.set(key, value, ttl.map(|d| now + d));
        }
    }
    if want_old {
        resp::bulk_or_nil(ctx.out, old_value.as_deref());
    } else if proceed {
        ctx.ok();
    } else {
        ctx.nil();
    }
}

fn setnx(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    if ctx.srv.store.contains(&args[1], ctx.now) {
        ctx.int(0);
    } else {
        let (key, value) = (core::mem::take(&mut args[1]), core::mem::take(&mut args[2]));
        ctx.srv.store.set(key, value, None);
        ctx.int(1);
    }
}

fn setex_with(ctx: &mut Ctx, args: &mut [Vec<u8>], unit: i64, name: &str) {
    let Some(ttl) = parse_ttl(ctx, &args[2].clone(), unit, name) else {
        return;
    };
    let (key, value) = (core::mem::take(&mut args[1]), core::mem::take(&mut args[3]));
    let at = ctx.now + ttl;
    ctx.srv.store.set(key, value, Some(at));
    ctx.ok();
}

fn setex(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    setex_with(ctx, args, 1000, "setex");
}

fn psetex(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    setex_with(ctx, args, 1, "psetex");
}

fn getset(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let (key, value) = (core::mem::take(&mut args[1]), core::mem::take(&mut args[2]));
    let now = ctx.now;
    let live = ctx.srv.store.contains(&key, now);
    let old = ctx.srv.store.set(key, value, None);
    resp::bulk_or_nil(
        ctx.out,
        old.filter(|_| live).as_ref().map(|e| e.value.as_slice()),
    );
}

fn getdel(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let old = ctx.srv.store.remove(&args[1], ctx.now);
    resp::bulk_or_nil(ctx.out, old.as_ref().map(|e| e.value.as_slice()));
}

fn mget(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let now = ctx.now;
    let keys = &args[1..];
    let size: usize = keys
        .iter()
        .map(|k| {
            ctx.srv
                .store
                .get(k, now)
                .map_or(5, |e| resp::bulk_size(e.value.len()))
        })
        .sum();
    if !ctx.srv.reply_fits(size) {
        ctx.err(ERR_OOM);
        return;
    }
    ctx.out.reserve(size + 16);
    ctx.array(keys.len());
    for key in keys {
        match ctx.srv.store.get(key, now) {
            Some(e) => {
                resp::bulk(ctx.out, e.value);
                ctx.srv.stats.keyspace_hits += 1;
            }
            None => {
                resp::nil(ctx.out);
                ctx.srv.stats.keyspace_misses += 1;
            }
        }
    }
}

fn mset(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    if args.len().is_multiple_of(2) {
        wrong_arity(ctx.out, "mset");
        return;
    }
    for pair in args[1..].chunks_exact_mut(2) {
        let (key, value) = (core::mem::take(&mut pair[0]), core::mem::take(&mut pair[1]));
        ctx.srv.store.set(key, value, None);
    }
    ctx.ok();
}

fn msetnx(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    if args.len().is_multiple_of(2) {
        wrong_arity(ctx.out, "msetnx");
        return;
    }
    let now = ctx.now;
    if args[1..]
        .chunks_exact(2)
        .any(|pair| ctx.srv.store.contains(&pair[0], now))
    {
        ctx.int(0);
        return;
    }
    for pair in args[1..].chunks_exact_mut(2) {
        let (key, value) = (core::mem::take(&mut pair[0]), core::mem::take(&mut pair[1]));
        ctx.srv.store.set(key, value, None);
    }
    ctx.int(1);
}

fn append(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let now = ctx.now;
    let len = match ctx.srv.store.value_mut(&args[1], now) {
        Some(value) => {
            if value.len() + args[2].len() > MAX_BULK {
                ctx.err(ERR_TOO_BIG);
                return;
            }
            value.extend_from_slice(&args[2]);
            value.len()
        }
        None => {
            let (key, value) = (core::mem::take(&mut args[1]), core::mem::take(&mut args[2]));
            let len = value.len();
            ctx.srv.store.set(key, value, None);
            len
        }
    };
    ctx.int(len as i64);
}

fn strlen(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let len = ctx
        .srv
        .store
        .get(&args[1], ctx.now)
        .map_or(0, |e| e.value.len());
    ctx.int(len as i64);
}

/// INCR/DECR/INCRBY/DECRBY: adds `delta` to the integer at `key`, keeping
/// its deadline; a missing key counts as 0.
fn incr_by(ctx: &mut Ctx, key: &mut Vec<u8>, delta: i64) {
    let now = ctx.now;
    let current = match ctx.srv.store.get(key, now) {
        Some(e) => match parse_i64(e.value) {
            Some(n) => Some(n),
            None => {
                ctx.err(ERR_NOT_INTEGER);
                return;
            }
        },
        None => None,
    };
    let Some(new) = current.unwrap_or(0).checked_add(delta) else {
        ctx.err(ERR_OVERFLOW);
        return;
    };
    let mut text = Vec::with_capacity(20);
    resp::push_i64(&mut text, new);
    match ctx.srv.store.value_mut(key, now) {
        Some(value) => *value = text,
        None => {
            ctx.srv.store.set(core::mem::take(key), text, None);
        }
    }
    ctx.int(new);
}

fn incr(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    incr_by(ctx, &mut args[1], 1);
}

fn decr(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    incr_by(ctx, &mut args[1], -1);
}

fn incrby(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    match parse_i64(&args[2]) {
        Some(delta) => incr_by(ctx, &mut args[1], delta),
        None => ctx.err(ERR_NOT_INTEGER),
    }
}

fn decrby(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    match parse_i64(&args[2]) {
        Some(i64::MIN) => ctx.err(b"ERR decrement would overflow"),
        Some(delta) => incr_by(ctx, &mut args[1], -delta),
        None => ctx.err(ERR_NOT_INTEGER),
    }
}

// --- keys --------------------------------------------------------------

fn del(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let now = ctx.now;
    let n = args[1..]
        .iter()
        .filter(|k| ctx.srv.store.remove(k, now).is_some())
        .count();
    ctx.int(n as i64);
}

fn exists(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let now = ctx.now;
    let n = args[1..]
        .iter()
        .filter(|k| ctx.srv.store.contains(k, now))
        .count();
    ctx.int(n as i64);
}

fn type_(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let kind = if ctx.srv.store.contains(&args[1], ctx.now) {
        "string"
    } else {
        "none"
    };
    resp::simple(ctx.out, kind);
}

fn keys(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    ctx.srv.store.expire_due(ctx.now, usize::MAX);
    let pattern = &args[1];
    let (mut count, mut size) = (0, 0);
    for key in ctx.srv.store.keys(pattern) {
        count += 1;
        size += resp::bulk_size(key.len());
    }
    if !ctx.srv.reply_fits(size) {
        ctx.err(ERR_OOM);
        return;
    }
    ctx.out.reserve(size + 16);
    resp::array(ctx.out, count);
    for key in ctx.srv.store.keys(pattern) {
        resp::bulk(ctx.out, key);
    }
}

fn dbsize(ctx: &mut Ctx, _: &mut [Vec<u8>]) {
    ctx.srv.store.expire_due(ctx.now, usize::MAX);
    ctx.int(ctx.srv.store.len() as i64);
}

fn flushall(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    match args {
        [_] => {}
        [_, mode] if eq(mode, "ASYNC") || eq(mode, "SYNC") => {}
        _ => return ctx.err(ERR_SYNTAX),
    }
    ctx.srv.store.clear();
    ctx.ok();
}

// --- expiry ------------------------------------------------------------

fn expire(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    expire_with(ctx, args, 1000, "expire");
}

fn pexpire(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    expire_with(ctx, args, 1, "pexpire");
}

/// EXPIRE/PEXPIRE key time [NX|XX|GT|LT]; `unit` is ms per unit of `time`.
fn expire_with(ctx: &mut Ctx, args: &mut [Vec<u8>], unit: i64, name: &str) {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in &args[3..] {
        if eq(opt, "NX") {
            nx = true;
        } else if eq(opt, "XX") {
            xx = true;
        } else if eq(opt, "GT") {
            gt = true;
        } else if eq(opt, "LT") {
            lt = true;
        } else {
            let mut msg = Vec::from(&b"ERR Unsupported option "[..]);
            msg.extend_from_slice(opt);
            return ctx.err(&msg);
        }
    }
    if nx && (xx || gt || lt) {
        return ctx.err(b"ERR NX and XX, GT or LT options at the same time are not compatible");
    }
    if gt && lt {
        return ctx.err(b"ERR GT and LT options at the same time are not compatible");
    }
    let Some(n) = parse_i64(&args[2]) else {
        return ctx.err(ERR_NOT_INTEGER);
    };
    if n > i64::MAX / unit || n < i64::MIN / unit {
        let msg = alloc::format!("ERR invalid expire time in '{name}' command");
        return ctx.err(msg.as_bytes());
    }
    let ms = n * unit;
    let now = ctx.now;
    let Some(entry) = ctx.srv.store.get(&args[1], now) else {
        return ctx.int(0);
    };
    // Remaining ms of the current deadline; `None` = never expires.
    let current = entry
        .expires_at
        .map(|at| at.duration_since(now).as_millis().min(i64::MAX as u128) as i64);
    let allowed = match current {
        _ if !(nx || xx || gt || lt) => true,
        None => nx || lt,
        Some(rem) => !nx && (!gt || ms > rem) && (!lt || ms < rem),
    };
    if !allowed {
        return ctx.int(0);
    }
    if ms <= 0 {
        ctx.srv.store.remove(&args[1], now);
    } else {
        ctx.srv
            .store
            .set_expiry(&args[1], Some(now + Duration::from_millis(ms as u64)), now);
    }
    ctx.int(1);
}

fn ttl_with(ctx: &mut Ctx, key: &[u8], in_ms: bool) {
    let now = ctx.now;
    let reply = match ctx.srv.store.get(key, now) {
        None => -2,
        Some(e) => match e.expires_at {
            None => -1,
            Some(at) => {
                let ms = at.duration_since(now).as_millis().min(i64::MAX as u128) as i64;
                if in_ms {
                    ms
                } else {
                    (ms + 500) / 1000
                }
            }
        },
    };
    ctx.int(reply);
}

fn ttl(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    ttl_with(ctx, &args[1], false);
}

fn pttl(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    ttl_with(ctx, &args[1], true);
}

fn persist(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let now = ctx.now;
    let had_ttl = ctx
        .srv
        .store
        .get(&args[1], now)
        .is_some_and(|e| e.expires_at.is_some());
    if had_ttl {
        ctx.srv.store.set_expiry(&args[1], None, now);
    }
    ctx.int(had_ttl as i64);
}

// --- connection and server ---------------------------------------------

fn ping(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    match args {
        [_] => resp::simple(ctx.out, "PONG"),
        [_, msg] => ctx.bulk(msg),
        _ => wrong_arity(ctx.out, "ping"),
    }
}

fn echo(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    ctx.bulk(&args[1]);
}

fn select(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    match parse_i64(&args[1]) {
        Some(0) => ctx.ok(),
        Some(_) => ctx.err(b"ERR DB index is out of range"),
        None => ctx.err(ERR_NOT_INTEGER),
    }
}

fn quit(ctx: &mut Ctx, _: &mut [Vec<u8>]) {
    ctx.ok();
    ctx.flow = Flow::Close;
}

fn auth(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    if args.len() > 3 {
        return ctx.err(ERR_SYNTAX);
    }
    ctx.err(
        b"ERR AUTH <password> called without any password configured for the default user. \
          Are you sure your configuration is correct?",
    );
}

/// HELLO [protover [AUTH user pass] [SETNAME name]]: RESP2 only.
fn hello(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    if let Some(ver) = args.get(1) {
        match parse_i64(ver) {
            Some(2) => {}
            Some(_) => return ctx.err(b"NOPROTO unsupported protocol version"),
            None => return ctx.err(b"ERR Protocol version is not an integer or out of range"),
        }
    }
    let mut name = None;
    let mut i = 2;
    while i < args.len() {
        if eq(&args[i], "AUTH") && i + 2 < args.len() {
            i += 3;
        } else if eq(&args[i], "SETNAME") && i + 1 < args.len() {
            if !valid_client_name(&args[i + 1]) {
                return ctx.err(ERR_CLIENT_NAME);
            }
            name = Some(args[i + 1].clone());
            i += 2;
        } else {
            let mut msg = Vec::from(&b"ERR Syntax error in HELLO option '"[..]);
            msg.extend_from_slice(&args[i]);
            msg.push(b'\'');
            return ctx.err(&msg);
        }
    }
    if let (Some(name), Some(info)) = (name, ctx.srv.clients.get_mut(&ctx.client)) {
        info.name = name;
    }
    ctx.array(14);
    for (k, v) in [("server", "redis"), ("version", VERSION)] {
        ctx.bulk(k.as_bytes());
        ctx.bulk(v.as_bytes());
    }
    ctx.bulk(b"proto");
    ctx.int(2);
    ctx.bulk(b"id");
    ctx.int(ctx.client as i64);
    for (k, v) in [("mode", "standalone"), ("role", "master")] {
        ctx.bulk(k.as_bytes());
        ctx.bulk(v.as_bytes());
    }
    ctx.bulk(b"modules");
    ctx.array(0);
}

const ERR_CLIENT_NAME: &[u8] =
    b"ERR Client names cannot contain spaces, newlines or special characters.";

fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

/// CLIENT ID | SETNAME | GETNAME | SETINFO | INFO | LIST | NO-EVICT | NO-TOUCH
fn client(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let sub = &args[1];
    let id = ctx.client;
    if eq(sub, "ID") && args.len() == 2 {
        ctx.int(id as i64);
    } else if eq(sub, "SETNAME") && args.len() == 3 {
        if !valid_client_name(&args[2]) {
            return ctx.err(ERR_CLIENT_NAME);
        }
        if let Some(info) = ctx.srv.clients.get_mut(&id) {
            info.name = core::mem::take(&mut args[2]);
        }
        ctx.ok();
    } else if eq(sub, "GETNAME") && args.len() == 2 {
        let name = ctx
            .srv
            .clients
            .get(&id)
            .map(|c| c.name.as_slice())
            .filter(|n| !n.is_empty());
        resp::bulk_or_nil(ctx.out, name);
    } else if eq(sub, "SETINFO") && args.len() == 4 {
        let lib_name = eq(&args[2], "LIB-NAME");
        if !lib_name && !eq(&args[2], "LIB-VER") {
            let mut msg = Vec::from(&b"ERR Unrecognized option '"[..]);
            msg.extend_from_slice(&args[2]);
            msg.push(b'\'');
            return ctx.err(&msg);
        }
        // Shown in `CLIENT LIST` lines: no blanks or line breaks, as in Redis.
        if !valid_client_name(&args[3]) {
            let attr = if lib_name { "lib-name" } else { "lib-ver" };
            let msg =
                alloc::format!("ERR {attr} cannot contain spaces, newlines or special characters.");
            return ctx.err(msg.as_bytes());
        }
        let value = core::mem::take(&mut args[3]);
        if let Some(info) = ctx.srv.clients.get_mut(&id) {
            if lib_name {
                info.lib_name = value;
            } else {
                info.lib_ver = value;
            }
        }
        ctx.ok();
    } else if eq(sub, "INFO") && args.len() == 2 {
        let mut line = Vec::new();
        if let Some(info) = ctx.srv.clients.get(&id) {
            client_line(&mut line, id, info, ctx.now);
        }
        ctx.bulk(&line);
    } else if eq(sub, "LIST") {
        let mut text = Vec::new();
        for (id, info) in &ctx.srv.clients {
            client_line(&mut text, *id, info, ctx.now);
        }
        ctx.bulk(&text);
    } else if (eq(sub, "NO-EVICT") || eq(sub, "NO-TOUCH")) && args.len() == 3 {
        ctx.ok();
    } else if [
        "ID", "SETNAME", "GETNAME", "SETINFO", "INFO", "NO-EVICT", "NO-TOUCH",
    ]
    .iter()
    .any(|s| eq(sub, s))
    {
        let name = alloc::format!("client|{}", String::from_utf8_lossy(sub).to_lowercase());
        wrong_arity(ctx.out, &name);
    } else {
        let sub = sub.clone();
        unknown_subcommand(ctx, &sub, "CLIENT");
    }
}

/// One `CLIENT LIST` line, `\n`-terminated.
fn client_line(out: &mut Vec<u8>, id: u64, info: &ClientInfo, now: Instant) {
    let mut line = alloc::format!("id={id} addr={} name=", info.addr);
    line.push_str(&String::from_utf8_lossy(&info.name));
    let _ = write!(
        line,
        " age={} db=0 lib-name=",
        now.duration_since(info.since).as_secs()
    );
    line.push_str(&String::from_utf8_lossy(&info.lib_name));
    line.push_str(" lib-ver=");
    line.push_str(&String::from_utf8_lossy(&info.lib_ver));
    line.push('\n');
    out.extend_from_slice(line.as_bytes());
}

/// COMMAND [COUNT | LIST | DOCS | INFO ...]: enough for `redis-cli`, which
/// asks for `COMMAND DOCS` on start and copes with an empty answer.
fn command(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let Some(sub) = args.get(1) else {
        return ctx.array(0);
    };
    if eq(sub, "DOCS") {
        ctx.array(0);
    } else if eq(sub, "COUNT") && args.len() == 2 {
        ctx.int(COMMANDS.len() as i64);
    } else if eq(sub, "LIST") {
        ctx.array(COMMANDS.len());
        for c in COMMANDS {
            ctx.bulk(c.name.as_bytes());
        }
    } else if eq(sub, "INFO") {
        // One nil per name: "no details" (RESP2 has no other way to say it).
        ctx.array(args.len() - 2);
        for _ in 2..args.len() {
            ctx.nil();
        }
    } else {
        let sub = sub.clone();
        unknown_subcommand(ctx, &sub, "COMMAND");
    }
}

/// The parameters `CONFIG GET` knows, with their values.
fn config_params(srv: &Server) -> [(&'static str, String); 10] {
    [
        ("save", String::new()),
        ("appendonly", "no".into()),
        ("databases", "1".into()),
        ("maxclients", alloc::format!("{}", srv.max_clients)),
        ("maxmemory", alloc::format!("{}", srv.maxmemory)),
        ("maxmemory-policy", "noeviction".into()),
        ("port", alloc::format!("{}", srv.port)),
        ("proto-max-bulk-len", alloc::format!("{MAX_BULK}")),
        ("timeout", "0".into()),
        ("bind", "*".into()),
    ]
}

/// CONFIG GET pattern... | RESETSTAT; `SET` and `REWRITE` are refused.
fn config(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    let sub = &args[1];
    if eq(sub, "GET") {
        if args.len() < 3 {
            return wrong_arity(ctx.out, "config|get");
        }
        let params = config_params(ctx.srv);
        let hits: Vec<&(&str, String)> = params
            .iter()
            .filter(|(name, _)| {
                args[2..]
                    .iter()
                    .any(|p| glob::matches(p, name.as_bytes(), true))
            })
            .collect();
        resp::array(ctx.out, hits.len() * 2);
        for (name, value) in hits {
            resp::bulk(ctx.out, name.as_bytes());
            resp::bulk(ctx.out, value.as_bytes());
        }
    } else if eq(sub, "RESETSTAT") && args.len() == 2 {
        ctx.srv.stats = Stats::default();
        ctx.ok();
    } else if eq(sub, "SET") || eq(sub, "REWRITE") {
        ctx.err(b"ERR CONFIG SET and CONFIG REWRITE are not supported by this server");
    } else {
        let sub = sub.clone();
        unknown_subcommand(ctx, &sub, "CONFIG");
    }
}

/// INFO [section ...]: `server`, `clients`, `memory`, `persistence`,
/// `stats`, `replication`, `keyspace`; `all`/`everything`/`default` or none
/// for all of them.
fn info(ctx: &mut Ctx, args: &mut [Vec<u8>]) {
    const SECTIONS: [&str; 7] = [
        "server",
        "clients",
        "memory",
        "persistence",
        "stats",
        "replication",
        "keyspace",
    ];
    let all = args.len() == 1
        || args[1..]
            .iter()
            .any(|a| eq(a, "all") || eq(a, "everything") || eq(a, "default"));
    let wanted = |s: &str| all || args[1..].iter().any(|a| eq(a, s));
    ctx.srv.store.expire_due(ctx.now, usize::MAX);
    let srv = &*ctx.srv;
    let uptime = ctx.now.duration_since(srv.started).as_secs();
    let (used, free) = srv.platform.heap_usage();
    let (host, region) = srv.platform.location();
    let mut text = String::new();
    for section in SECTIONS.into_iter().filter(|s| wanted(s)) {
        if !text.is_empty() {
            text.push_str("\r\n");
        }
        let title = alloc::format!("{}{}", section[..1].to_uppercase(), &section[1..]);
        let _ = write!(text, "# {title}\r\n");
        let mut line = |k: &str, v: &dyn core::fmt::Display| {
            let _ = write!(text, "{k}:{v}\r\n");
        };
        match section {
            "server" => {
                line("redis_version", &VERSION);
                line("redis_mode", &"standalone");
                line("os", &"libcloud unikernel x86_64");
                line("arch_bits", &64);
                line("multiplexing_api", &"libcloud-async");
                line("process_id", &1);
                line("tcp_port", &srv.port);
                line("uptime_in_seconds", &uptime);
                line("uptime_in_days", &(uptime / 86_400));
                line("host", &host);
                line("region", &region);
            }
            "clients" => {
                line("connected_clients", &srv.clients.len());
                line("maxclients", &srv.max_clients);
                line("blocked_clients", &0);
            }
            "memory" => {
                line("used_memory", &used);
                line("used_memory_human", &Human(used));
                line("heap_free", &free);
                line("heap_free_human", &Human(free));
                line("maxmemory", &srv.maxmemory);
                line("maxmemory_human", &Human(srv.maxmemory));
                line("maxmemory_policy", &"noeviction");
            }
            "persistence" => {
                line("loading", &0);
                line("rdb_changes_since_last_save", &0);
                line("aof_enabled", &0);
            }
            "stats" => {
                line(
                    "total_connections_received",
                    &srv.stats.connections_received,
                );
                line("total_commands_processed", &srv.stats.commands_processed);
                line("expired_keys", &srv.store.expired_keys);
                line("evicted_keys", &0);
                line("keyspace_hits", &srv.stats.keyspace_hits);
                line("keyspace_misses", &srv.stats.keyspace_misses);
                line("rejected_writes_oom", &srv.stats.rejected_oom);
            }
            "replication" => {
                line("role", &"master");
                line("connected_slaves", &0);
            }
            _ => {
                // As in Redis, an empty database has no line.
                if !srv.store.is_empty() {
                    let (keys, volatile) = (srv.store.len(), srv.store.volatile_len());
                    line(
                        "db0",
                        &alloc::format!("keys={keys},expires={volatile},avg_ttl=0"),
                    );
                }
            }
        }
    }
    ctx.bulk(text.as_bytes());
}

/// Bytes as `INFO` shows them for humans: `1.50M`.
struct Human(usize);

impl core::fmt::Display for Human {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let n = self.0 as f64;
        match self.0 {
            0..1024 => write!(f, "{}B", self.0),
            1024..1_048_576 => write!(f, "{:.2}K", n / 1024.0),
            1_048_576..1_073_741_824 => write!(f, "{:.2}M", n / 1_048_576.0),
            _ => write!(f, "{:.2}G", n / 1_073_741_824.0),
        }
    }
}
