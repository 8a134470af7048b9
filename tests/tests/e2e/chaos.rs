//! Chaos soak: the daemon in-process against two test servers while a seeded fault injector
//! breaks things, and raw line clients keep subscribing, sending and answering.
//!
//! The run is a sequence of rounds. In each round the workers (raw JSON-line clients) issue
//! random requests while the injector applies one fault (kill and restart a server, stall it,
//! move the daemon to the other server and back, send it invalid frames, drop callbacks,
//! refuse subscriptions, close the connection, kill a local client...). Then a barrier:
//! the workers stop issuing requests, every request must get its reply, the daemon must be
//! open again, and the invariants are checked at that quiescent point:
//!
//! - the upstream subscriptions equal the union of what the live clients hold, once each;
//! - a broadcast on every held path reaches every holder (nobody silently stopped);
//! - every frame the daemon wrote has reached a server (an echo proves it), so the events
//!   can be accounted for.
//!
//! At the end: every request with an id got exactly one reply; fire-and-forget events arrived
//! in order per client, each mode keeping its promise (PROTOCOL.md): with the default
//! `fire_and_forget = "once"` none arrived twice and none queued while offline went missing
//! (one written to a connection that broke may be lost), with `"at-least-once"` none went
//! missing (duplicates only in rounds with a reconnect); file descriptors and tasks are back
//! to their baseline; nothing panicked. The run does both modes, two thirds of the rounds
//! with the default. A figures table per mode is printed (`-- --nocapture`).
//!
//! `QIOD_CHAOS_SEED` picks the seed (printed at start), `QIOD_CHAOS_FAULTS` the number of
//! rounds (one fault each; default 300). The seed fixes every random choice; thread timing
//! still varies between runs, so a rerun explores the same faults, not the same interleaving.

use crate::common::{daemon_settings, server_with, Daemon, DEADLINE};
use qio_testserver::{CallbackKind, CloseReason, LogEntry, TestServer};
use qiod::driver::TransportChoice;
use qiod::session::FireAndForget;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The seed when `QIOD_CHAOS_SEED` is not set.
const DEFAULT_SEED: u64 = 0x51_0D_C4_A0_5E_ED;
/// Rounds (faults) when `QIOD_CHAOS_FAULTS` is not set: about 40 s on a 2-core machine.
const DEFAULT_FAULTS: u64 = 300;
/// Local clients working at once.
const WORKERS: usize = 4;
/// The daemon's offline queue bound, small so long outages overflow it.
const QUEUE_MAX: usize = 64;
/// Requests one worker may have waiting before it only sends events.
const MAX_OUTSTANDING: usize = 128;
/// Short, so dropped callbacks and stalled subscriptions resolve within a round.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(250);
/// Paths the workers subscribe to. Only the barrier broadcasts on them (besides the test
/// server's own ticker on `/clienttest/broadcast`).
const POOL: [&str; 6] = [
    "/chaos/sub/0",
    "/chaos/sub/1",
    "/chaos/sub/2",
    "/chaos/sub/3",
    "/chaos/sub/4",
    TICKER,
];
/// The server's 10 ms counter broadcast; never subscribed with `one` (the ticker could
/// consume it before the barrier's marker).
const TICKER: &str = "/clienttest/broadcast";
/// Where the injector sends server requests (`request_from_all`); every worker holds it.
const ASK: &str = "/chaos/ask";
/// Codes a refused subscription gets.
const REFUSALS: [i64; 4] = [401, 404, 420, 500];
/// Codes requested from `/clienttest/error/<code>`.
const ERRORS: [i64; 5] = [400, 401, 404, 420, 500];
/// Frames that are not events: the daemon must close and reconnect.
const INVALID: [&str; 10] = [
    "unicorns, ponies, princesses, and magic!:good times",
    "/x:abc=1",
    "/x:1={",
    "",
    "no colon at all",
    "/x:1=nul",
    "/x:-1=null",
    "/x:1=\"unterminated",
    ":0=null",
    "/qio/callback/1:0=not json",
];
/// Valid frames the daemon must ignore without breaking the connection.
const ODD: [&str; 5] = [
    "/qio/unknown:0=null",
    "/not/subscribed:0=1",
    "/qio/callback/987654321:0={\"code\":200,\"data\":null}",
    "/qio/heartbeat:0=null",
    "/chaos/sub/0/deeper:0={\"x\":1}",
];

static PANICS: AtomicUsize = AtomicUsize::new(0);

type Counts = BTreeMap<String, u64>;
type Lines = mpsc::UnboundedReceiver<Result<Value, String>>;

fn bump(c: &mut Counts, key: impl Into<String>) {
    *c.entry(key.into()).or_default() += 1;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// splitmix64: tiny, deterministic, good enough to pick faults.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?}: {e}")))
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Connects a raw line client; a reader task parses every line the daemon writes.
async fn connect(socket: &Path) -> (OwnedWriteHalf, Lines, JoinHandle<()>) {
    let stream = UnixStream::connect(socket).await.expect("connect");
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(rd).lines();
        loop {
            let item = match lines.next_line().await {
                Ok(Some(l)) => {
                    serde_json::from_str::<Value>(&l).map_err(|e| format!("not JSON: {l:?}: {e}"))
                }
                Ok(None) => break,
                Err(e) => Err(format!("read error: {e}")),
            };
            let stop = item.is_err();
            if tx.send(item).is_err() || stop {
                break;
            }
        }
    });
    (wr, rx, reader)
}

fn line_of(v: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(v).expect("json");
    line.push(b'\n');
    line
}

// ---------------------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Issue random requests.
    Work,
    /// Issue nothing new (keep reading): the barrier is checking.
    Quiesce,
}

enum Cmd {
    /// Send a `status` with an id and record `synced = n` when its reply comes.
    Sync(u64),
    /// Die abruptly (optionally in the middle of a line).
    Kill { half_line: bool },
    /// Close the sending side and read until the daemon closes.
    Leave,
}

#[derive(Debug, Clone)]
enum Kind {
    Echo(Value),
    Error(i64),
    Status,
    Sync(u64),
    On(String),
    One(String),
    Off,
    Bad,
    Answer,
    Bogus,
    Final,
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Echo(_) => "echo",
            Kind::Error(_) => "error",
            Kind::Status => "status",
            Kind::Sync(_) => "sync",
            Kind::On(_) => "on",
            Kind::One(_) => "one",
            Kind::Off => "off",
            Kind::Bad => "malformed",
            Kind::Answer => "callback",
            Kind::Bogus => "bogus-callback",
            Kind::Final => "final-callback",
        }
    }
}

struct Req {
    kind: Kind,
    /// Events this client had sent before the request: its reply proves the daemon handled
    /// every one of them (lines are handled in order).
    ev_seq: u64,
    replies: u32,
}

/// One incarnation of one worker, shared with the coordinator.
#[derive(Default)]
struct WState {
    w: usize,
    inc: u32,
    alive: bool,
    killed: bool,
    /// Fire-and-forget events sent: index `seq - 1` holds the round it was sent in.
    ev_round: Vec<u64>,
    /// For each event sent while this client believed the daemon offline (after `/close`,
    /// before `/open`), the number of `/close` lines seen when it was sent.
    ev_offline: HashMap<u64, u64>,
    /// Events queued while offline whose next connection was still up at a barrier: they
    /// must arrive in every mode.
    must_arrive: HashSet<u64>,
    /// Whether the last connection line was `/open`.
    online: bool,
    /// `/close` lines seen.
    closes: u64,
    /// Events the daemon refused at once (`/error` naming their path), by code.
    refused: HashMap<u64, i64>,
    /// Every event up to this sequence number was handled by the daemon.
    confirmed_upto: u64,
    next_id: u64,
    reqs: HashMap<u64, Req>,
    outstanding: usize,
    /// Subscriptions held (path -> taken with `one`).
    held: BTreeMap<String, bool>,
    /// Paths with an `on`/`one` waiting for its reply.
    sub_inflight: HashSet<String>,
    /// Barrier markers received, as (path, marker).
    markers: HashSet<(String, u64)>,
    /// Callback handles this client may answer.
    handles: Vec<String>,
    synced: u64,
    final_seen: bool,
    ticker_last: Option<u64>,
    counts: Counts,
}

struct Shared {
    round: AtomicU64,
    violations: Mutex<Vec<String>>,
    violation_count: AtomicU64,
}

impl Shared {
    fn violation(&self, what: String) {
        let n = self.violation_count.fetch_add(1, Ordering::Relaxed);
        if n < 200 {
            eprintln!("chaos violation: {what}");
            lock(&self.violations).push(what);
        }
    }
}

struct Worker {
    w: usize,
    inc: u32,
    st: Arc<Mutex<WState>>,
    writer: Option<OwnedWriteHalf>,
    lines: Lines,
    rng: Rng,
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    mode: watch::Receiver<Mode>,
    leaving: bool,
}

impl Worker {
    async fn run(mut self) {
        loop {
            let working = *self.mode.borrow() == Mode::Work && !self.leaving;
            let pace = Duration::from_micros(self.rng.range(100, 1500));
            tokio::select! {
                biased;
                cmd = self.cmds.recv() => match cmd {
                    Some(Cmd::Sync(n)) => {
                        self.request(Kind::Sync(n), json!({"op": "status"})).await;
                    }
                    Some(Cmd::Kill { half_line }) => return self.kill(half_line).await,
                    Some(Cmd::Leave) => {
                        self.leaving = true;
                        // Dropping the write half shuts the sending side down.
                        self.writer = None;
                    }
                    None => return,
                },
                line = self.lines.recv() => match line {
                    Some(Ok(v)) => self.on_line(v).await,
                    Some(Err(e)) => {
                        self.violation(e);
                        lock(&self.st).alive = false;
                        return;
                    }
                    None => {
                        if !self.leaving {
                            self.violation("the daemon closed a worker's connection".into());
                        }
                        lock(&self.st).alive = false;
                        return;
                    }
                },
                res = self.mode.changed() => {
                    if res.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(pace), if working => self.op().await,
            }
        }
    }

    fn violation(&self, what: String) {
        self.shared
            .violation(format!("w{}.{}: {what}", self.w, self.inc));
    }

    async fn kill(&mut self, half_line: bool) {
        if let Some(mut w) = self.writer.take() {
            if half_line {
                let _ = w.write_all(b"{\"op\":\"send\",\"pa").await;
            }
            // No shutdown: the socket closes when the coordinator aborts the reader.
            w.forget();
        }
        let mut s = lock(&self.st);
        s.alive = false;
        s.killed = true;
    }

    async fn write(&mut self, v: &Value) {
        let line = line_of(v);
        self.write_raw(&line).await;
    }

    async fn write_raw(&mut self, bytes: &[u8]) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        if let Err(e) = w.write_all(bytes).await {
            self.violation(format!("writing to the daemon failed: {e}"));
        }
    }

    /// Registers a request (before writing it, so a fast reply finds it) and sends it.
    async fn request(&mut self, kind: Kind, mut v: Value) {
        let id = {
            let mut s = lock(&self.st);
            s.next_id += 1;
            let id = s.next_id;
            let ev_seq = s.ev_round.len() as u64;
            bump(&mut s.counts, format!("requests.{}", kind.name()));
            s.reqs.insert(
                id,
                Req {
                    kind,
                    ev_seq,
                    replies: 0,
                },
            );
            s.outstanding += 1;
            id
        };
        v["id"] = id.into();
        self.write(&v).await;
    }

    async fn event(&mut self) {
        let round = self.shared.round.load(Ordering::Relaxed);
        let seq = {
            let mut s = lock(&self.st);
            s.ev_round.push(round);
            bump(&mut s.counts, "events.sent");
            let seq = s.ev_round.len() as u64;
            if !s.online {
                let closes = s.closes;
                s.ev_offline.insert(seq, closes);
            }
            seq
        };
        let (w, inc) = (self.w, self.inc);
        let v = json!({
            "op": "send",
            "path": format!("/chaos/ev/{w}/{inc}/{seq}"),
            "data": {"w": w, "i": inc, "s": seq},
        });
        self.write(&v).await;
    }

    async fn subscribe(&mut self, path: &str, once: bool) {
        let busy = !lock(&self.st).sub_inflight.insert(path.to_owned());
        if busy {
            return self.event().await;
        }
        let (op, kind) = if once {
            ("one", Kind::One(path.to_owned()))
        } else {
            ("on", Kind::On(path.to_owned()))
        };
        self.request(kind, json!({"op": op, "path": path})).await;
    }

    async fn op(&mut self) {
        let (need_ask, outstanding, handles) = {
            let s = lock(&self.st);
            (
                !s.held.contains_key(ASK) && !s.sub_inflight.contains(ASK),
                s.outstanding,
                s.handles.len(),
            )
        };
        if outstanding >= MAX_OUTSTANDING {
            return self.event().await;
        }
        if need_ask {
            return self.subscribe(ASK, false).await;
        }
        let (w, inc) = (self.w, self.inc);
        match self.rng.below(100) {
            0..=34 => self.event().await,
            35..=49 => {
                let d = json!({"w": w, "i": inc, "n": self.rng.next_u64() >> 12});
                let v = json!({"op": "send", "path": "/clienttest/echo", "data": d});
                self.request(Kind::Echo(d), v).await;
            }
            50..=53 => {
                let c = *self.rng.pick(&ERRORS);
                let v = json!({"op": "send", "path": format!("/clienttest/error/{c}")});
                self.request(Kind::Error(c), v).await;
            }
            54..=63 => {
                let p = *self.rng.pick(&POOL);
                self.subscribe(p, false).await;
            }
            64..=68 => {
                let p = *self.rng.pick(&POOL[..5]);
                self.subscribe(p, true).await;
            }
            69..=77 => {
                let held: Vec<String> = {
                    let s = lock(&self.st);
                    s.held.keys().filter(|p| *p != ASK).cloned().collect()
                };
                let path = if held.is_empty() || self.rng.chance(0.2) {
                    (*self.rng.pick(&POOL)).to_owned()
                } else {
                    self.rng.pick(&held).clone()
                };
                let busy = {
                    let mut s = lock(&self.st);
                    let busy = s.sub_inflight.contains(&path);
                    if !busy {
                        // Handled in order: nothing this client sends later sees it held.
                        s.held.remove(&path);
                    }
                    busy
                };
                if busy {
                    return self.event().await;
                }
                let v = json!({"op": "off", "path": path});
                if self.rng.chance(0.7) {
                    self.request(Kind::Off, v).await;
                } else {
                    bump(&mut lock(&self.st).counts, "requests.off-without-id");
                    self.write(&v).await;
                }
            }
            78..=81 => self.request(Kind::Status, json!({"op": "status"})).await,
            82..=84 => match self.rng.below(4) {
                0 => self.request(Kind::Bad, json!({"op": "fly"})).await,
                1 => {
                    let v = json!({"op": "on", "path": 7});
                    self.request(Kind::Bad, v).await;
                }
                2 => {
                    bump(&mut lock(&self.st).counts, "requests.garbage-line");
                    self.write_raw(b"not json at all\n").await;
                }
                _ => {
                    bump(&mut lock(&self.st).counts, "requests.garbage-line");
                    self.write_raw(b"{\"op\":\"send\",\"data\":[1,\n").await;
                }
            },
            85..=95 if handles > 0 => {
                let h = {
                    let mut s = lock(&self.st);
                    let i = self.rng.below(s.handles.len() as u64) as usize;
                    s.handles.swap_remove(i)
                };
                let v = json!({"op": "callback", "cb": h, "data": {"w": w, "i": inc}});
                if self.rng.chance(0.6) {
                    self.request(Kind::Answer, v).await;
                } else {
                    bump(&mut lock(&self.st).counts, "requests.callback-without-id");
                    self.write(&v).await;
                }
            }
            85..=95 => self.event().await,
            _ => {
                let v = json!({"op": "callback", "cb": "999999.1", "data": null});
                self.request(Kind::Bogus, v).await;
            }
        }
    }

    async fn on_line(&mut self, v: Value) {
        if v.get("event").is_some() {
            self.on_event(v).await;
        } else if v.get("id").is_some() && v.get("code").is_some() {
            self.on_reply(v);
        } else {
            self.violation(format!("a line that is neither event nor reply: {v}"));
        }
    }

    fn on_reply(&mut self, v: Value) {
        let Some(id) = v["id"].as_u64() else {
            return self.violation(format!("a reply with an id never used: {v}"));
        };
        let code = v["code"].as_i64().unwrap_or(i64::MIN);
        let mut bad = None;
        {
            let mut guard = lock(&self.st);
            let s = &mut *guard;
            let Some(req) = s.reqs.get_mut(&id) else {
                drop(guard);
                return self.violation(format!("a reply for an unknown id: {v}"));
            };
            req.replies += 1;
            if req.replies > 1 {
                bump(&mut s.counts, "replies.duplicated");
                drop(guard);
                return self.violation(format!("a second reply for id {id}: {v}"));
            }
            let kind = req.kind.clone();
            s.outstanding -= 1;
            s.confirmed_upto = s.confirmed_upto.max(req.ev_seq);
            bump(&mut s.counts, "replies.total");
            bump(&mut s.counts, format!("replies.{}.{code}", kind.name()));
            let ok = match &kind {
                Kind::Echo(d) => match code {
                    200 => v["data"] == *d,
                    -1 | -2 => true,
                    _ => false,
                },
                Kind::Error(c) => code == *c || code == -1 || code == -2,
                Kind::Status => code == 200,
                Kind::Sync(n) => {
                    s.synced = *n;
                    code == 200
                }
                Kind::On(p) | Kind::One(p) => {
                    s.sub_inflight.remove(p);
                    // 202: not connected, held as state until the daemon connects.
                    if code == 200 || code == 202 {
                        let once = matches!(kind, Kind::One(_));
                        match s.held.get_mut(p) {
                            // `on` makes a one-shot lasting; `one` leaves a held path as is.
                            Some(o) => *o = *o && once,
                            None => {
                                s.held.insert(p.clone(), once);
                            }
                        }
                    }
                    // -1 would mean the daemon stopped; 400 that it subscribed twice.
                    code == 200 || code == 202 || code == -2 || REFUSALS.contains(&code)
                }
                Kind::Off => code == 200,
                Kind::Bad => code == 400,
                // 404: the server evicted the callback (4 slots) or let it expire.
                Kind::Answer | Kind::Final => matches!(code, 200 | -1 | -2 | 400 | 404),
                Kind::Bogus => matches!(code, -1 | 400),
            };
            if !ok {
                bad = Some(kind);
            }
            if let Some(cb) = v["cb"].as_str() {
                s.handles.push(cb.to_owned());
                if s.handles.len() > 32 {
                    s.handles.remove(0);
                }
            }
        }
        if let Some(kind) = bad {
            self.violation(format!("unexpected reply to {kind:?}: {v}"));
        }
    }

    async fn on_event(&mut self, v: Value) {
        let ev = v["event"].as_str().unwrap_or_default().to_owned();
        let data = &v["data"];
        let mut answer_final = None;
        let mut complaint = None;
        {
            let mut guard = lock(&self.st);
            let s = &mut *guard;
            match ev.as_str() {
                "/open" => {
                    bump(&mut s.counts, "lines.open");
                    s.ticker_last = None;
                    s.online = true;
                }
                "/close" => {
                    bump(&mut s.counts, "lines.close");
                    s.ticker_last = None;
                    s.online = false;
                    s.closes += 1;
                }
                "/lost" => {
                    bump(&mut s.counts, "lines.lost");
                    complaint = Some(format!("events dropped for a fast reader: {v}"));
                }
                "/error" => {
                    let code = data["code"].as_i64().unwrap_or(i64::MIN);
                    match data["op"].as_str() {
                        Some("send") => match data["path"].as_str() {
                            Some(p) => {
                                let prefix = format!("/chaos/ev/{}/{}/", s.w, s.inc);
                                match p.strip_prefix(&prefix).and_then(|x| x.parse().ok()) {
                                    Some(seq) => {
                                        s.refused.insert(seq, code);
                                        bump(&mut s.counts, format!("events.refused.{code}"));
                                        if code != -3 {
                                            complaint = Some(format!("event refused: {v}"));
                                        }
                                    }
                                    None => complaint = Some(format!("/error for {p}: {v}")),
                                }
                            }
                            None => bump(&mut s.counts, "lines.error.malformed"),
                        },
                        Some("on" | "one") => {
                            // A held subscription refused when restored after a reconnect.
                            bump(&mut s.counts, "lines.error.subscription-lost");
                            if let Some(p) = data["path"].as_str() {
                                s.held.remove(p);
                            }
                        }
                        Some("callback") => {
                            bump(&mut s.counts, format!("lines.error.callback.{code}"));
                            if code != 400 && code != -1 {
                                complaint = Some(format!("callback failed: {v}"));
                            }
                        }
                        Some(_) => complaint = Some(format!("unexpected /error: {v}")),
                        None if code == -1 => bump(&mut s.counts, "lines.error.connect-failed"),
                        None => bump(&mut s.counts, "lines.error.malformed"),
                    }
                }
                path => {
                    bump(&mut s.counts, "lines.event");
                    if let Some(m) = data.get("marker").and_then(Value::as_u64) {
                        bump(&mut s.counts, "lines.event.marker");
                        match s.held.get(path).copied() {
                            None => {
                                complaint = Some(format!("marker on a path not held: {v}"));
                            }
                            Some(true) => {
                                s.held.remove(path);
                            }
                            Some(false) => {}
                        }
                        s.markers.insert((path.to_owned(), m));
                    } else if path == TICKER {
                        bump(&mut s.counts, "lines.event.ticker");
                        if let Some(n) = data.as_u64() {
                            if s.ticker_last.is_some_and(|last| n <= last) {
                                complaint = Some(format!(
                                    "ticker went from {:?} to {n} on one connection",
                                    s.ticker_last
                                ));
                            }
                            s.ticker_last = Some(n);
                        }
                    } else if path == ASK {
                        bump(&mut s.counts, "lines.event.server-request");
                        if let Some(cb) = v["cb"].as_str() {
                            if data["final"] == true {
                                s.final_seen = true;
                                answer_final = Some(cb.to_owned());
                            } else {
                                s.handles.push(cb.to_owned());
                                if s.handles.len() > 32 {
                                    s.handles.remove(0);
                                }
                            }
                        }
                    } else {
                        complaint = Some(format!("an event nobody asked for: {v}"));
                    }
                }
            }
        }
        if let Some(c) = complaint {
            self.violation(c);
        }
        if let Some(cb) = answer_final {
            let data = json!({"final": true, "w": self.w, "i": self.inc});
            let v = json!({"op": "callback", "cb": cb, "data": data});
            self.request(Kind::Final, v).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The coordinator
// ---------------------------------------------------------------------------------------

/// The injector's own client: moves, closes, status.
struct Ctl {
    writer: OwnedWriteHalf,
    lines: Lines,
    reader: JoinHandle<()>,
    next: u64,
    closes: u64,
}

impl Ctl {
    async fn call(&mut self, mut v: Value) -> Value {
        self.next += 1;
        let id = format!("ctl-{}", self.next);
        v["id"] = id.clone().into();
        self.writer
            .write_all(&line_of(&v))
            .await
            .expect("ctl write");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("ctl: no reply to {v} in time"))
                .expect("ctl: the daemon closed the connection")
                .expect("ctl: a line");
            if line["id"] == id {
                return line;
            }
            if line["event"] == "/close" {
                self.closes += 1;
            }
        }
    }

    async fn status(&mut self) -> Value {
        let r = self.call(json!({"op": "status"})).await;
        assert_eq!(r["code"], 200, "status: {r}");
        r["data"].clone()
    }
}

struct Slot {
    st: Arc<Mutex<WState>>,
    cmds: mpsc::UnboundedSender<Cmd>,
    task: JoinHandle<()>,
    reader: JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillRestart,
    KillBoth,
    Stall,
    Move,
    MoveSelf,
    InvalidFrame,
    OddFrame,
    ServerClose,
    DropCallbacks,
    RefuseSubscriptions,
    KillClient,
    Challenge,
    Quiet,
}

const FAULTS: [(Fault, u64); 13] = [
    (Fault::KillRestart, 14),
    (Fault::KillBoth, 4),
    (Fault::Stall, 12),
    (Fault::Move, 12),
    (Fault::MoveSelf, 2),
    (Fault::InvalidFrame, 10),
    (Fault::OddFrame, 4),
    (Fault::ServerClose, 6),
    (Fault::DropCallbacks, 8),
    (Fault::RefuseSubscriptions, 10),
    (Fault::KillClient, 12),
    (Fault::Challenge, 3),
    (Fault::Quiet, 3),
];

type ClientKey = (usize, u32);
/// An event's arrival: its sequence number, which server, which connection.
type Arrival = (u64, usize, u64);

struct Chaos {
    seed: u64,
    /// The daemon's `fire_and_forget` setting: which promise the events are held to.
    delivery: FireAndForget,
    servers: [TestServer; 2],
    socket: std::path::PathBuf,
    ctl: Ctl,
    slots: Vec<Slot>,
    all: Vec<Arc<Mutex<WState>>>,
    shared: Arc<Shared>,
    mode: watch::Sender<Mode>,
    rng: Rng,
    counts: Counts,
    arrivals: HashMap<ClientKey, Vec<Arrival>>,
    seen: HashSet<(usize, u32, u64)>,
    duplicates: Vec<(usize, u32, u64)>,
    answered: HashSet<(usize, u64, u64)>,
    /// Server callbacks the server evicted or let expire: answering them gets 404, as on
    /// the real server, and is no violation.
    gone: HashSet<(usize, u64, u64)>,
    broken_rounds: HashSet<u64>,
    round_fault: HashMap<u64, Fault>,
    reconnects: u64,
    ctl_closes: u64,
    marker: u64,
    round_times: Vec<Duration>,
}

impl Chaos {
    async fn spawn_worker(&mut self, w: usize, inc: u32) -> Slot {
        let (writer, lines, reader) = connect(&self.socket).await;
        let st = Arc::new(Mutex::new(WState {
            w,
            inc,
            alive: true,
            ..WState::default()
        }));
        self.all.push(st.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = Worker {
            w,
            inc,
            st: st.clone(),
            writer: Some(writer),
            lines,
            rng: Rng::new(self.seed ^ ((w as u64 + 1) << 48) ^ ((inc as u64) << 20)),
            shared: self.shared.clone(),
            cmds: rx,
            mode: self.mode.subscribe(),
            leaving: false,
        };
        let task = tokio::spawn(worker.run());
        Slot {
            st,
            cmds: tx,
            task,
            reader,
        }
    }

    fn violation(&self, what: String) {
        self.shared.violation(what);
    }

    async fn pause(&mut self, lo: u64, hi: u64) {
        let ms = self.rng.range(lo, hi);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Which server the daemon is on (or last tried).
    async fn current(&mut self) -> usize {
        let st = self.ctl.status().await;
        let url = st["url"].as_str().unwrap_or_default().to_owned();
        self.servers
            .iter()
            .position(|s| s.url() == url)
            .unwrap_or(0)
    }

    async fn ctl_send(&mut self, path: &str, data: Value) -> i64 {
        let r = self
            .ctl
            .call(json!({"op": "send", "path": path, "data": data}))
            .await;
        r["code"].as_i64().unwrap_or(i64::MIN)
    }

    async fn kill_client(&mut self) {
        let i = self.rng.below(WORKERS as u64) as usize;
        let half_line = self.rng.chance(0.3);
        let slot = &self.slots[i];
        let _ = slot.cmds.send(Cmd::Kill { half_line });
        let (w, inc) = {
            let s = lock(&slot.st);
            (s.w, s.inc)
        };
        let slot = self.slots.remove(i);
        if tokio::time::timeout(DEADLINE, slot.task).await.is_err() {
            self.violation(format!("worker {w}.{inc} did not die in time"));
        }
        slot.reader.abort();
        let _ = slot.reader.await;
        let new = self.spawn_worker(w, inc + 1).await;
        self.slots.insert(i, new);
    }

    async fn fault(&mut self, kind: Fault) {
        let cur = self.current().await;
        let other = 1 - cur;
        match kind {
            Fault::KillRestart => {
                let t = if self.rng.chance(0.8) { cur } else { other };
                self.servers[t].kill().await;
                self.pause(0, 100).await;
                self.servers[t].restart().await.expect("restart");
            }
            Fault::KillBoth => {
                for s in &self.servers {
                    s.kill().await;
                }
                self.pause(50, 250).await;
                for s in &self.servers {
                    s.restart().await.expect("restart");
                }
            }
            Fault::Stall => {
                self.servers[cur].set_stalled(true);
                self.pause(0, 300).await;
                self.servers[cur].set_stalled(false);
            }
            Fault::Move | Fault::MoveSelf => {
                let to = if kind == Fault::Move { other } else { cur };
                let url = self.servers[to].url();
                let code = self.ctl_send("/clienttest/move", json!(url)).await;
                bump(&mut self.counts, format!("ctl.move.{code}"));
            }
            Fault::InvalidFrame => {
                let text = *self.rng.pick(&INVALID);
                self.servers[cur].send_raw_to_all(text).await;
            }
            Fault::OddFrame => {
                let text = *self.rng.pick(&ODD);
                self.servers[cur].send_raw_to_all(text).await;
            }
            Fault::ServerClose => {
                let code = self.ctl_send("/clienttest/close", Value::Null).await;
                bump(&mut self.counts, format!("ctl.close.{code}"));
            }
            Fault::DropCallbacks => {
                for s in &self.servers {
                    s.set_drop_callbacks(true);
                }
                self.pause(20, 150).await;
                for s in &self.servers {
                    s.set_drop_callbacks(false);
                }
            }
            Fault::RefuseSubscriptions => {
                let path = *self.rng.pick(&POOL);
                let code = *self.rng.pick(&REFUSALS);
                for s in &self.servers {
                    s.set_refuse_subscriptions(path, Some(code));
                }
                if self.rng.chance(0.5) {
                    // Reconnect now: restoring the held subscription is refused.
                    let code = self.ctl_send("/clienttest/close", Value::Null).await;
                    bump(&mut self.counts, format!("ctl.close.{code}"));
                }
                self.pause(10, 80).await;
                for s in &self.servers {
                    s.set_refuse_subscriptions(path, None);
                }
            }
            Fault::KillClient => self.kill_client().await,
            Fault::Challenge => {
                let code = self
                    .ctl_send("/clienttest/heartbeat-challenge", Value::Null)
                    .await;
                bump(&mut self.counts, format!("ctl.challenge.{code}"));
            }
            Fault::Quiet => self.pause(0, 20).await,
        }
    }

    /// Polls `f` every 2 ms for up to `d`.
    async fn wait(&self, d: Duration, mut f: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + d;
        loop {
            if f(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn expected_subscriptions(&self) -> BTreeMap<String, usize> {
        let mut want = BTreeMap::new();
        for slot in &self.slots {
            for path in lock(&slot.st).held.keys() {
                *want.entry(path.clone()).or_insert(0) += 1;
            }
        }
        want
    }

    /// Waits for the daemon to be open with nothing in flight; returns its status.
    async fn settled(&mut self, round: u64) -> (usize, Value) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.ctl.status().await;
            let conns: usize = self.servers.iter().map(|s| s.connection_count()).sum();
            let subs_active = st["subscriptions"]
                .as_array()
                .is_some_and(|a| a.iter().all(|s| s["state"] == "active"));
            if st["state"] == "open"
                && st["queued_events"] == 0
                && st["pending_callbacks"] == 0
                && subs_active
                && conns == 1
            {
                let url = st["url"].as_str().unwrap_or_default();
                let cur = self.servers.iter().position(|s| s.url() == url);
                if let Some(cur) = cur {
                    if self.servers[cur].connection_count() == 1 {
                        return (cur, st);
                    }
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "seed {}: round {round}: the daemon did not settle within 10 s: {st} \
                     (server connections {conns})",
                    self.seed
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn barrier(&mut self, round: u64) {
        self.mode.send_replace(Mode::Quiesce);
        // 1. Every request answered.
        let answered = self
            .wait(Duration::from_secs(10), |c| {
                c.slots.iter().all(|s| lock(&s.st).outstanding == 0)
            })
            .await;
        if !answered {
            let left: Vec<usize> = self.slots.iter().map(|s| lock(&s.st).outstanding).collect();
            self.violation(format!(
                "round {round}: requests still unanswered after 10 s: {left:?}"
            ));
        }
        // 2. Open, nothing queued or waiting, one upstream connection; 3. the workers'
        // lines all handled; 4. everything written upstream has arrived.
        let mut tries = 0;
        let (cur, status) = loop {
            let (cur, status) = self.settled(round).await;
            for slot in &self.slots {
                let _ = slot.cmds.send(Cmd::Sync(round));
            }
            let synced = self
                .wait(Duration::from_secs(10), |c| {
                    c.slots.iter().all(|s| lock(&s.st).synced >= round)
                })
                .await;
            if !synced {
                self.violation(format!("round {round}: a worker's status went unanswered"));
            }
            let code = self.ctl_send("/clienttest/echo", json!("barrier")).await;
            if code == 200 {
                break (cur, status);
            }
            tries += 1;
            assert!(
                tries < 5,
                "seed {}: round {round}: no stable connection",
                self.seed
            );
        };
        // 5. Upstream subscriptions = the union of the local ones, once each.
        let mut last = String::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let consistent = loop {
            let want = self.expected_subscriptions();
            let st = self.ctl.status().await;
            let daemon: BTreeMap<String, (u64, u64, String)> = st["subscriptions"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| {
                            let path = s["path"].as_str().unwrap_or_default().to_owned();
                            let refs = s["refs"].as_u64().unwrap_or(0);
                            let local = s["local_subscribers"].as_u64().unwrap_or(0);
                            let state = s["state"].as_str().unwrap_or_default().to_owned();
                            (path, (refs, local, state))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let daemon_ok = daemon.len() == want.len()
                && want.iter().all(|(p, n)| {
                    daemon.get(p).is_some_and(|(r, l, s)| {
                        *r == *n as u64 && *l == *n as u64 && s == "active"
                    })
                });
            let upstream = self.servers[cur].subscriptions();
            let upstream_ok = upstream.len() == want.len()
                && want.keys().all(|p| upstream.get(p) == Some(&1))
                && self.servers[1 - cur].subscriptions().is_empty();
            if daemon_ok && upstream_ok {
                break true;
            }
            last = format!("clients hold {want:?}; daemon {daemon:?}; upstream {upstream:?}");
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        bump(&mut self.counts, "checks.subscriptions");
        if !consistent {
            self.violation(format!("round {round}: subscriptions differ: {last}"));
        }
        // 6. A broadcast on every held path reaches every holder; and on every path
        // active upstream too: no local subscriber's events stop while its subscription
        // is active upstream.
        let mut paths: std::collections::BTreeSet<String> =
            self.expected_subscriptions().into_keys().collect();
        paths.extend(self.servers[cur].subscriptions().into_keys());
        let mut expect = Vec::new();
        for path in &paths {
            self.marker += 1;
            let m = self.marker;
            let holders: Vec<usize> = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| lock(&s.st).held.contains_key(path))
                .map(|(i, _)| i)
                .collect();
            let n = self.servers[cur]
                .broadcast(path, json!({"marker": m}))
                .await;
            if n != 1 {
                self.violation(format!(
                    "round {round}: {path} has {n} upstream subscribers, not 1"
                ));
            }
            expect.push((path.clone(), m, holders));
        }
        let delivered = self
            .wait(Duration::from_secs(5), |c| {
                expect.iter().all(|(p, m, hs)| {
                    hs.iter()
                        .all(|&i| lock(&c.slots[i].st).markers.contains(&(p.clone(), *m)))
                })
            })
            .await;
        self.counts
            .entry("checks.broadcasts".into())
            .and_modify(|n| *n += expect.len() as u64)
            .or_insert(expect.len() as u64);
        if delivered {
            // A holder that got its marker has read every connection line before it (one
            // ordered stream), so an event it sent offline with no `/close` since went out
            // on the connection that is open now, which the echo above proved delivered.
            let holders: HashSet<usize> = expect.iter().flat_map(|e| e.2.clone()).collect();
            for i in holders {
                let mut guard = lock(&self.slots[i].st);
                let s = &mut *guard;
                let closes = s.closes;
                let sure: Vec<u64> = s
                    .ev_offline
                    .iter()
                    .filter(|&(_, &c)| c == closes)
                    .map(|(&seq, _)| seq)
                    .collect();
                for seq in sure {
                    s.ev_offline.remove(&seq);
                    s.must_arrive.insert(seq);
                }
            }
        }
        if !delivered {
            let missed: Vec<_> = expect
                .iter()
                .flat_map(|(p, m, hs)| {
                    hs.iter()
                        .filter(|&&i| !lock(&self.slots[i].st).markers.contains(&(p.clone(), *m)))
                        .map(move |&i| (p.clone(), i))
                })
                .collect();
            self.violation(format!(
                "round {round}: subscribers silently stopped getting events: {missed:?}"
            ));
        }
        // 7. A client that subscribes and leaves takes its upstream subscription along.
        self.probe_leave(round, cur).await;
        // 8. Account for what reached the servers.
        self.account();
        let reconnects = status["reconnects"].as_u64().unwrap_or(0);
        if reconnects != self.reconnects || self.ctl.closes != self.ctl_closes {
            self.broken_rounds.insert(round);
        }
        self.reconnects = reconnects;
        self.ctl_closes = self.ctl.closes;
    }

    /// Subscribes a throwaway client to a path nobody else uses and drops its connection
    /// at once: after all (here: the only) clients of a path leave, no upstream
    /// subscription of it remains.
    async fn probe_leave(&mut self, round: u64, cur: usize) {
        let path = format!("/chaos/probe/{round}");
        let (mut writer, mut lines, reader) = connect(&self.socket).await;
        let on = json!({"op": if round.is_multiple_of(2) { "on" } else { "one" }, "path": path, "id": 1});
        let _ = writer.write_all(&line_of(&on)).await;
        let deadline = Instant::now() + DEADLINE;
        let reply = loop {
            match tokio::time::timeout_at(deadline, lines.recv()).await {
                Ok(Some(Ok(v))) if v["id"] == 1 => break Some(v),
                Ok(Some(Ok(_))) => {}
                _ => break None,
            }
        };
        // A timeout (-2) is allowed: the connection may break right after the barrier on
        // a loaded machine (100 ms ping timeout). Either way nothing may stay upstream.
        match reply {
            Some(v) if v["code"] == 200 || v["code"] == 202 || v["code"] == -2 => {
                bump(
                    &mut self.counts,
                    format!("checks.leave-releases.{}", v["code"]),
                );
            }
            Some(v) => self.violation(format!("round {round}: the probe's on {path}: {v}")),
            None => self.violation(format!("round {round}: the probe's on {path} got no reply")),
        }
        drop(writer);
        drop(lines);
        let _ = reader.await;
        let released = self.servers[cur]
            .wait_until(Duration::from_secs(5), |s| {
                !s.subscriptions().contains_key(&path)
            })
            .await;
        if !released {
            self.violation(format!(
                "round {round}: {path} is still subscribed upstream after its only client left"
            ));
        }
    }

    /// Takes what the servers received and logged since the last barrier.
    fn account(&mut self) {
        for si in 0..self.servers.len() {
            let received = self.servers[si].received();
            self.servers[si].clear_received();
            let log = self.servers[si].log();
            self.servers[si].clear_log();
            for r in received {
                match r.path.as_str() {
                    "/qio/on" | "/qio/off" | "/qio/ping" | "/qio/ohai" => {
                        bump(&mut self.counts, format!("upstream.{}", &r.path[5..]));
                    }
                    p if p.starts_with("/chaos/ev/") => {
                        let d = &r.data;
                        let (Some(w), Some(i), Some(s)) =
                            (d["w"].as_u64(), d["i"].as_u64(), d["s"].as_u64())
                        else {
                            self.violation(format!("an event with bad data: {r:?}"));
                            continue;
                        };
                        let (w, i) = (w as usize, i as u32);
                        bump(&mut self.counts, "events.arrived");
                        if !self.seen.insert((w, i, s)) {
                            // Delivery is at least once: an event the server read just
                            // before a break is sent again. Allowed only in rounds with a
                            // reconnect; checked in `tally`.
                            bump(&mut self.counts, "events.duplicated");
                            self.duplicates.push((w, i, s));
                        }
                        self.arrivals
                            .entry((w, i))
                            .or_default()
                            .push((s, si, r.conn));
                    }
                    p if p.starts_with("/qio/callback/") => {
                        bump(&mut self.counts, "upstream.callback-answers");
                    }
                    _ => bump(&mut self.counts, "upstream.other"),
                }
            }
            for e in log {
                match e {
                    LogEntry::CallbackAnswered { conn, cb, kind, .. } => {
                        bump(&mut self.counts, format!("server.answered.{kind:?}"));
                        if !self.answered.insert((si, conn, cb)) {
                            self.violation(format!("callback {si}/{conn}/{cb} answered twice"));
                        }
                        if kind == CallbackKind::Request {
                            bump(&mut self.counts, "server-requests.answered");
                        }
                    }
                    LogEntry::CallbackEvicted { conn, cb }
                    | LogEntry::CallbackExpired { conn, cb } => {
                        bump(&mut self.counts, "server.callback-gone");
                        self.gone.insert((si, conn, cb));
                    }
                    LogEntry::UnknownCallback { conn, cb } => {
                        bump(&mut self.counts, "server.unknown-callback");
                        if !self.gone.contains(&(si, conn, cb)) {
                            self.violation(format!("server {si}: unknown callback {conn}/{cb}"));
                        }
                    }
                    LogEntry::Closed { reason, conn } => {
                        if std::env::var_os("QIOD_CHAOS_DEBUG").is_some() {
                            let round = self.shared.round.load(Ordering::Relaxed);
                            eprintln!("round {round}: server {si} conn {conn} closed: {reason:?}");
                        }
                        let name = format!("{reason:?}");
                        let name = name.split([' ', '(', '{']).next().unwrap_or("?").to_owned();
                        bump(&mut self.counts, format!("server.closes.{name}"));
                        if matches!(
                            reason,
                            CloseReason::PingFrame
                                | CloseReason::PongFrame
                                | CloseReason::BinaryFrame
                                | CloseReason::Malformed { .. }
                                | CloseReason::NotGreeting(_)
                                | CloseReason::FrameTooLarge { .. }
                                | CloseReason::SlowConsumer
                                | CloseReason::ChallengeTimeout
                        ) {
                            self.violation(format!("server {si} closed the daemon: {reason:?}"));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The end-of-run tallies of requests and events.
#[derive(Default)]
struct Tally {
    requests: u64,
    replies: u64,
    missing: u64,
    duplicated: u64,
    abandoned: u64,
    sent: u64,
    refused: u64,
    arrived: u64,
    unknown_fate: u64,
    lost_in_flight: u64,
    lost_offline: u64,
    offline_checked: u64,
    lost_unexplained: u64,
    refused_but_arrived: u64,
    out_of_order: u64,
    lost_by_fault: Counts,
}

fn tally(c: &Chaos) -> Tally {
    let mut t = Tally::default();
    for st in &c.all {
        let s = lock(st);
        for (id, r) in &s.reqs {
            t.requests += 1;
            t.replies += u64::from(r.replies.min(1));
            match r.replies {
                0 if s.killed => t.abandoned += 1,
                0 => {
                    t.missing += 1;
                    c.violation(format!(
                        "w{}.{}: no reply to id {id} ({:?})",
                        s.w, s.inc, r.kind
                    ));
                }
                1 => {}
                _ => t.duplicated += 1,
            }
        }
        let arrived: HashSet<u64> = c
            .arrivals
            .get(&(s.w, s.inc))
            .map(|a| a.iter().map(|x| x.0).collect())
            .unwrap_or_default();
        for (i, round) in s.ev_round.iter().enumerate() {
            let seq = i as u64 + 1;
            t.sent += 1;
            let got = arrived.contains(&seq);
            if s.refused.contains_key(&seq) {
                t.refused += 1;
                if got {
                    t.refused_but_arrived += 1;
                    c.violation(format!(
                        "w{}.{}: event {seq} refused and arrived",
                        s.w, s.inc
                    ));
                }
            } else if got {
                t.arrived += 1;
                t.offline_checked += u64::from(s.must_arrive.contains(&seq));
            } else if s.killed && seq > s.confirmed_upto {
                t.unknown_fate += 1;
            } else if s.must_arrive.contains(&seq) {
                t.offline_checked += 1;
                t.lost_offline += 1;
                c.violation(format!(
                    "w{}.{}: event {seq} (round {round}) was queued while offline and never arrived",
                    s.w, s.inc
                ));
            } else if c.broken_rounds.contains(round) && c.delivery == FireAndForget::Once {
                // Written to a connection that broke: sent once, never again (PROTOCOL.md).
                t.lost_in_flight += 1;
                let kind = c.round_fault.get(round).copied().unwrap_or(Fault::Quiet);
                *t.lost_by_fault.entry(format!("{kind:?}")).or_default() += 1;
            } else if c.broken_rounds.contains(round) {
                t.lost_in_flight += 1;
                c.violation(format!(
                    "w{}.{}: event {seq} (round {round}, with a reconnect) never arrived",
                    s.w, s.inc
                ));
                if std::env::var_os("QIOD_CHAOS_DEBUG").is_some() {
                    let near = |q: u64| {
                        c.arrivals
                            .get(&(s.w, s.inc))
                            .and_then(|a| a.iter().find(|x| x.0 == q))
                            .map(|x| (x.1, x.2))
                    };
                    eprintln!(
                        "lost w{}.{} #{seq} round {round} {:?}: prev {:?} next {:?}",
                        s.w,
                        s.inc,
                        c.round_fault.get(round),
                        near(seq - 1),
                        near(seq + 1)
                    );
                }
                let kind = c.round_fault.get(round).copied().unwrap_or(Fault::Quiet);
                *t.lost_by_fault.entry(format!("{kind:?}")).or_default() += 1;
            } else {
                t.lost_unexplained += 1;
                c.violation(format!(
                    "w{}.{}: event {seq} (round {round}, no reconnect in it) never arrived",
                    s.w, s.inc
                ));
            }
        }
    }
    // Never a duplicate by default; with at-least-once, only where a connection broke.
    for &(w, i, seq) in &c.duplicates {
        if c.delivery == FireAndForget::Once {
            c.violation(format!(
                "event {w}.{i}#{seq} arrived twice (fire_and_forget = once)"
            ));
            continue;
        }
        let round = c.all.iter().find_map(|st| {
            let s = lock(st);
            (s.w == w && s.inc == i)
                .then(|| s.ev_round.get(seq as usize - 1).copied())
                .flatten()
        });
        if !round.is_some_and(|r| c.broken_rounds.contains(&r)) {
            c.violation(format!(
                "event {w}.{i}#{seq} arrived twice without a reconnect in its round"
            ));
        }
    }
    // Order: increasing within each connection; across connections, what a connection
    // brings for the first time comes after everything earlier connections brought (a
    // new connection may start with events sent again).
    for (key, list) in &c.arrivals {
        let mut groups: BTreeMap<(usize, u64), Vec<u64>> = BTreeMap::new();
        for &(seq, server, conn) in list {
            groups.entry((server, conn)).or_default().push(seq);
        }
        let mut ordered: Vec<_> = groups.iter().collect();
        ordered.sort_by_key(|(_, seqs)| seqs.iter().min().copied().unwrap_or(0));
        let mut seen: HashSet<u64> = HashSet::new();
        let mut high = 0u64;
        for (g, seqs) in ordered {
            if seqs.windows(2).any(|w| w[0] >= w[1]) {
                t.out_of_order += 1;
                c.violation(format!("client {key:?}: out of order on {g:?}: {seqs:?}"));
            }
            let firsts: Vec<u64> = seqs.iter().copied().filter(|q| !seen.contains(q)).collect();
            if firsts.first().is_some_and(|&f| f <= high) {
                t.out_of_order += 1;
                c.violation(format!(
                    "client {key:?}: {g:?} brings {firsts:?} after {high} was delivered"
                ));
            }
            high = high.max(firsts.iter().copied().max().unwrap_or(0));
            seen.extend(seqs.iter().copied());
        }
    }
    t
}

fn install_panic_counter() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        prev(info);
    }));
}

fn chaos_settings(url: &str, seed: u64, delivery: FireAndForget) -> qiod::Settings {
    let mut s = daemon_settings(url);
    let c = &mut s.driver.session;
    c.fire_and_forget = delivery;
    c.heartbeat_interval = Duration::from_millis(100);
    c.ping_timeout = Duration::from_millis(100);
    c.request_timeout = REQUEST_TIMEOUT;
    c.handshake_timeout = Duration::from_millis(250);
    c.backoff_initial = Duration::from_millis(5);
    c.backoff_max = Duration::from_millis(80);
    c.queue_max_events = QUEUE_MAX;
    s.driver.seed = seed;
    s
}

/// Polls until `f` is at most `target`, for up to 5 s; returns the last value.
async fn settle_count(target: usize, f: impl Fn() -> usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = f();
        if n <= target || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Both delivery modes, one after the other (in one test, because the file descriptor and
/// task baselines are the whole process's): the default with two thirds of the rounds.
/// In a process of its own, away from the other tests of this binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak() {
    if crate::common::in_own_process("chaos::chaos_soak") {
        return;
    }
    install_panic_counter();
    let seed = env_u64("QIOD_CHAOS_SEED").unwrap_or(DEFAULT_SEED);
    let faults = env_u64("QIOD_CHAOS_FAULTS").unwrap_or(DEFAULT_FAULTS);
    // A sixth of the rounds over HTTP long polling (the default delivery), out of the
    // default's share, so the run takes about as long as before.
    let long_poll = faults / 6;
    let once = faults - faults / 3 - long_poll;
    soak(seed, once, FireAndForget::Once, TransportChoice::Auto).await;
    soak(
        seed,
        faults - once - long_poll,
        FireAndForget::AtLeastOnce,
        TransportChoice::Auto,
    )
    .await;
    soak(
        seed,
        long_poll,
        FireAndForget::Once,
        TransportChoice::LongPoll,
    )
    .await;
}

async fn soak(seed: u64, faults: u64, delivery: FireAndForget, transport: TransportChoice) {
    if faults == 0 {
        return;
    }
    println!(
        "chaos: seed {seed} (QIOD_CHAOS_SEED), faults {faults} (QIOD_CHAOS_FAULTS), \
         fire_and_forget = {}, transport = {}",
        delivery.name(),
        transport.name()
    );
    let started = Instant::now();
    let panics_before = PANICS.load(Ordering::Relaxed);
    let fd_start = fd_count();
    // Held polls are answered well within the daemon's long-poll request timeout.
    // A dropped long-poll session that held no poll at that moment lingers on the server
    // until its session timeout, as on the real server: short here, so rounds settle.
    let hold = |c: &mut qio_testserver::ServerConfig| {
        c.poll_hold = Duration::from_millis(100);
        c.poll_session_timeout = Duration::from_millis(300);
    };
    let servers = [server_with(hold).await, server_with(hold).await];
    let mut settings = chaos_settings(&servers[0].url(), seed, delivery);
    settings.driver.session.transport = transport;
    settings.driver.long_poll.delay_max = Duration::from_millis(5);
    settings.driver.long_poll.request_timeout = Duration::from_millis(400);
    let daemon = Daemon::start_with(settings).await;
    let (writer, lines, reader) = connect(&daemon.socket).await;
    let mut ctl = Ctl {
        writer,
        lines,
        reader,
        next: 0,
        closes: 0,
    };
    let deadline = Instant::now() + DEADLINE;
    while ctl.status().await["state"] != "open" {
        assert!(Instant::now() < deadline, "the daemon never opened");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Baselines: servers, daemon and the injector's client are up; no worker yet.
    let fd_base = fd_count();
    let tasks_base = alive_tasks();
    let (mode, _) = watch::channel(Mode::Quiesce);
    let mut c = Chaos {
        seed,
        delivery,
        socket: daemon.socket.clone(),
        servers,
        ctl,
        slots: Vec::new(),
        all: Vec::new(),
        shared: Arc::new(Shared {
            round: AtomicU64::new(0),
            violations: Mutex::new(Vec::new()),
            violation_count: AtomicU64::new(0),
        }),
        mode,
        rng: Rng::new(seed),
        counts: Counts::new(),
        arrivals: HashMap::new(),
        seen: HashSet::new(),
        duplicates: Vec::new(),
        answered: HashSet::new(),
        gone: HashSet::new(),
        broken_rounds: HashSet::new(),
        round_fault: HashMap::new(),
        reconnects: 0,
        ctl_closes: 0,
        marker: 0,
        round_times: Vec::new(),
    };
    for w in 0..WORKERS {
        let slot = c.spawn_worker(w, 0).await;
        c.slots.push(slot);
    }
    let total_weight: u64 = FAULTS.iter().map(|f| f.1).sum();
    for round in 1..=faults {
        let t0 = Instant::now();
        c.shared.round.store(round, Ordering::Relaxed);
        c.mode.send_replace(Mode::Work);
        c.pause(2, 15).await;
        let cur = c.current().await;
        for _ in 0..c.rng.below(3) {
            c.servers[cur]
                .request_from_all(ASK, json!({"q": round}))
                .await;
            bump(&mut c.counts, "server-requests.issued");
        }
        let mut pick = c.rng.below(total_weight);
        let kind = FAULTS
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map_or(Fault::Quiet, |f| f.0);
        bump(&mut c.counts, format!("faults.{kind:?}"));
        c.round_fault.insert(round, kind);
        c.fault(kind).await;
        c.pause(0, 15).await;
        c.barrier(round).await;
        c.round_times.push(t0.elapsed());
    }

    // Final: one server request, answered by every holder at once: exactly one answer wins.
    let (cur, _) = c.settled(faults + 1).await;
    let holders: Vec<usize> = (0..c.slots.len())
        .filter(|&i| lock(&c.slots[i].st).held.contains_key(ASK))
        .collect();
    c.servers[cur]
        .request_from_all(ASK, json!({"final": true}))
        .await;
    let all_answered = c
        .wait(Duration::from_secs(5), |c| {
            holders.iter().all(|&i| {
                let s = lock(&c.slots[i].st);
                s.final_seen && s.outstanding == 0
            })
        })
        .await;
    assert!(all_answered, "every holder got the final server request");
    let final_answers = c.servers[cur]
        .wait_until(Duration::from_secs(5), |s| {
            s.log().iter().any(
                |e| matches!(e, LogEntry::CallbackAnswered { data, .. } if data["final"] == true),
            )
        })
        .await;
    let final_count = c.servers[cur]
        .log()
        .iter()
        .filter(|e| {
            matches!(e, LogEntry::CallbackAnswered { kind: CallbackKind::Request, data, .. }
                if data["final"] == true)
        })
        .count();
    if !holders.is_empty() && (!final_answers || final_count != 1) {
        c.violation(format!(
            "the final server request got {final_count} answers from {} holders",
            holders.len()
        ));
    }
    c.account();

    // Everyone leaves; the daemon must forget them all.
    for slot in &c.slots {
        let _ = slot.cmds.send(Cmd::Leave);
    }
    for slot in std::mem::take(&mut c.slots) {
        if tokio::time::timeout(DEADLINE, slot.task).await.is_err() {
            c.violation("a worker did not finish leaving".into());
        }
        let _ = slot.reader.await;
    }
    let deadline = Instant::now() + DEADLINE;
    let after = loop {
        let st = c.ctl.status().await;
        let clean = st["clients"] == 1
            && st["subscriptions"] == json!([])
            && st["pending_callbacks"] == 0
            && c.servers.iter().all(|s| s.subscriptions().is_empty());
        if clean || Instant::now() >= deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    if after["clients"] != 1 || after["subscriptions"] != json!([]) {
        c.violation(format!(
            "state left behind after every client left: {after}"
        ));
    }
    let left_upstream: Vec<_> = c.servers.iter().map(|s| s.subscriptions()).collect();
    if left_upstream.iter().any(|s| !s.is_empty()) {
        c.violation(format!(
            "upstream subscriptions left after every client left: {left_upstream:?}"
        ));
    }
    // Over long polling the daemon may keep one more HTTP connection than at the baseline
    // (a held poll and an idle one): two descriptors (both ends are in this process) and
    // two tasks (its hyper driver and the server's socket task).
    let pool = if transport == TransportChoice::LongPoll {
        2
    } else {
        0
    };
    let fd_after = settle_count(fd_base + pool, fd_count).await;
    let tasks_after = settle_count(tasks_base + pool, alive_tasks).await;

    let t = tally(&c);
    let reconnects = after["reconnects"].as_u64().unwrap_or(0);
    let Chaos {
        ctl,
        servers,
        shared,
        counts,
        all,
        round_times,
        broken_rounds,
        ..
    } = c;
    drop(ctl.writer);
    ctl.reader.abort();
    daemon.stop().await;
    for s in &servers {
        s.shutdown().await;
    }
    drop(servers);
    let fd_end = settle_count(fd_start, fd_count).await;
    let panics = PANICS.load(Ordering::Relaxed) - panics_before;

    // The figures.
    let mut figures = counts;
    for (k, v) in &t.lost_by_fault {
        figures.insert(format!("events.lost-in-flight.{k}"), *v);
    }
    for st in &all {
        for (k, v) in &lock(st).counts {
            *figures.entry(format!("clients.{k}")).or_default() += v;
        }
    }
    let elapsed = started.elapsed();
    let mean = round_times.iter().sum::<Duration>() / round_times.len().max(1) as u32;
    let max = round_times.iter().max().copied().unwrap_or_default();
    let summary: Vec<(&str, String)> = vec![
        ("seed", seed.to_string()),
        ("fire_and_forget", delivery.name().to_owned()),
        ("transport", transport.name().to_owned()),
        ("faults (rounds)", faults.to_string()),
        ("rounds with a reconnect", broken_rounds.len().to_string()),
        ("daemon reconnects", reconnects.to_string()),
        ("client incarnations", all.len().to_string()),
        ("requests with an id", t.requests.to_string()),
        (
            "  answered exactly once",
            (t.replies - t.duplicated).to_string(),
        ),
        ("  missing reply", t.missing.to_string()),
        ("  duplicated reply", t.duplicated.to_string()),
        (
            "  pending when their client was killed",
            t.abandoned.to_string(),
        ),
        ("events sent (fire and forget)", t.sent.to_string()),
        ("  refused at once (-3, queue full)", t.refused.to_string()),
        ("  arrived", t.arrived.to_string()),
        (
            "  queued while offline, checked (must arrive)",
            t.offline_checked.to_string(),
        ),
        ("  queued while offline, lost", t.lost_offline.to_string()),
        (
            "  lost with a broken connection (allowed with once)",
            t.lost_in_flight.to_string(),
        ),
        ("  lost otherwise", t.lost_unexplained.to_string()),
        ("  unknown fate (client killed)", t.unknown_fate.to_string()),
        ("  refused yet arrived", t.refused_but_arrived.to_string()),
        (
            "  duplicated",
            figures
                .get("events.duplicated")
                .copied()
                .unwrap_or(0)
                .to_string(),
        ),
        ("  out of order", t.out_of_order.to_string()),
        (
            "fd delta, clients gone (daemon up)",
            format!("{:+}", fd_after as i64 - fd_base as i64),
        ),
        (
            "fd delta, all stopped",
            format!("{:+}", fd_end as i64 - fd_start as i64),
        ),
        (
            "task delta, clients gone",
            format!("{:+}", tasks_after as i64 - tasks_base as i64),
        ),
        ("panics", panics.to_string()),
        (
            "violations",
            shared.violation_count.load(Ordering::Relaxed).to_string(),
        ),
        ("round time mean / max", format!("{mean:.1?} / {max:.1?}")),
        ("wall time", format!("{elapsed:.1?}")),
    ];
    println!("\n| figure | value |\n|---|---|");
    for (k, v) in &summary {
        println!("| {k} | {v} |");
    }
    println!("\n| counter | value |\n|---|---|");
    for (k, v) in &figures {
        println!("| {k} | {v} |");
    }

    let violations = lock(&shared.violations).clone();
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations, first ones:\n{}",
        shared.violation_count.load(Ordering::Relaxed),
        violations
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!((t.missing, t.duplicated), (0, 0), "seed {seed}: replies");
    assert_eq!(
        t.lost_unexplained, 0,
        "seed {seed}: events lost without a reconnect"
    );
    assert_eq!(
        t.lost_offline, 0,
        "seed {seed}: events queued while offline lost"
    );
    assert_eq!(t.out_of_order, 0, "seed {seed}: events out of order");
    assert_eq!(panics, 0, "seed {seed}: panics");
    // Slack: nothing should stay behind; 2 allows for the runtime's own bookkeeping.
    assert!(
        fd_after <= fd_base + 2 + pool,
        "seed {seed}: fds {fd_base} -> {fd_after}"
    );
    assert!(
        fd_end <= fd_start + 2,
        "seed {seed}: fds {fd_start} -> {fd_end}"
    );
    assert!(
        tasks_after <= tasks_base + 2 + pool,
        "seed {seed}: tasks {tasks_base} -> {tasks_after}"
    );
}
