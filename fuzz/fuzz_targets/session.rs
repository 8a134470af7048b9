//! The session state machine driven by a script of hostile server frames, caller requests
//! and clock steps. Checks: no panic; every request and answer gets exactly one reply, also
//! through shutdown; a subscription answer only ever concerns a generation still wanted,
//! and nothing follows a refusal for it; after a timeout is handled the next deadline is
//! in the future (no busy loop).
//!
//! Script: one action per line, the first character picks it, the rest is its argument:
//! `f` frame, `c` connected, `x` closed, `X` connect failed, `w` wrong dialect, `t` advance
//! the clock (ms) and handle timeouts, `s`/`S` want a path for a new generation
//! (without/with data), `u` unwant its latest generation, `r` request, `e` emit, `a` answer a handle (arg: `<conn>.<id>`, or empty for
//! one the session handed out), `A` the same asking for a callback, `m` set servers,
//! `q` status.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qiod::codec;
use qiod::session::{CbHandle, Output, Session, SessionConfig};
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use url::Url;

#[derive(Default)]
struct Harness {
    issued: u64,
    replies: HashMap<u64, u32>,
    handles: Vec<CbHandle>,
    /// Generations wanted and not yet unwanted or refused.
    wanted: HashSet<u64>,
    /// The latest generation per (cleaned) path.
    latest: HashMap<String, u64>,
}

impl Harness {
    fn issue(&mut self) -> u64 {
        self.issued += 1;
        self.issued
    }

    fn drain(&mut self, s: &mut Session<u64>) {
        while let Some(out) = s.poll_output() {
            match out {
                Output::Reply(t, outcome) => {
                    let n = self.replies.entry(t).or_default();
                    *n += 1;
                    assert_eq!(*n, 1, "request {t} answered twice (code {})", outcome.code);
                    if let Some(h) = outcome.cb {
                        self.handles.push(h);
                    }
                }
                Output::Event(ev) => {
                    assert!(ev.path.starts_with('/') && !ev.path.starts_with("/qio/"));
                    if let Some(h) = ev.cb {
                        self.handles.push(h);
                    }
                }
                Output::Send(text) => {
                    // What the session sends must itself be a valid frame.
                    let ok = codec::Dialect::V02.decode(&text).is_ok()
                        || codec::Dialect::V01.decode(&text).is_ok()
                        || text == codec::OHAI;
                    assert!(ok, "the session sent an invalid frame: {text:?}");
                }
                Output::Subscription { gen, outcome, .. } => {
                    assert!(
                        self.wanted.contains(&gen),
                        "an answer (code {}) for generation {gen}, not wanted",
                        outcome.code
                    );
                    if outcome.code != 200 {
                        self.wanted.remove(&gen);
                    }
                }
                Output::Connect { .. }
                | Output::Close
                | Output::Dropped { .. }
                | Output::State(_) => {}
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(script) = std::str::from_utf8(data) else {
        return;
    };
    let servers = vec![
        Url::parse("ws://127.0.0.1:1/").expect("url"),
        Url::parse("ws://127.0.0.1:2/qio").expect("url"),
    ];
    let mut cfg = SessionConfig::new(servers);
    cfg.queue_max_events = 8;
    cfg.max_pending_callbacks = 16;
    cfg.max_subscriptions = 8;
    let mut now = Instant::now();
    let mut s: Session<u64> = Session::new(cfg, 7, now).expect("session");
    let mut h = Harness::default();
    let null = qiod::json::null();
    let sub_data = RawValue::from_string("123".into()).expect("json");
    h.drain(&mut s);
    for line in script.split('\n').take(512) {
        let mut chars = line.chars();
        let Some(op) = chars.next() else { continue };
        let arg = chars.as_str();
        match op {
            'f' => s.handle_frame(now, arg),
            'c' => s.handle_connected(now),
            'x' => s.handle_closed(now, arg),
            'X' => s.handle_connect_failed(now, arg),
            'w' => s.handle_wrong_dialect(now, arg),
            't' => {
                let ms = arg.parse::<u64>().unwrap_or(1).min(1 << 32);
                now += Duration::from_millis(ms);
                s.handle_timeout(now);
                if let Some(next) = s.poll_timeout() {
                    assert!(
                        next > now,
                        "a deadline at or before now after handling timeouts"
                    );
                }
            }
            's' | 'S' => {
                // Generations share the counter with requests but need no reply.
                h.issued += 1;
                let gen = h.issued;
                h.replies.insert(gen, 1);
                h.wanted.insert(gen);
                if let Some(old) = h.latest.insert(qio_ipc::clean_path(arg), gen) {
                    // A newer want takes over the path; the older one is never answered.
                    h.wanted.remove(&old);
                }
                let data = (op == 'S').then_some(&*sub_data);
                s.want(arg, data, gen);
            }
            'u' => {
                if let Some(gen) = h.latest.remove(&qio_ipc::clean_path(arg)) {
                    h.wanted.remove(&gen);
                    s.unwant(arg, gen);
                }
            }
            'r' => {
                let t = h.issue();
                s.request(now, arg, &null, t);
            }
            'e' => {
                let _ = s.emit(now, arg, &null);
            }
            'a' | 'A' => {
                let handle = match arg.parse::<CbHandle>() {
                    Ok(handle) => Some(handle),
                    Err(_) => h.handles.pop(),
                };
                if let Some(handle) = handle {
                    let reply = (op == 'A').then(|| h.issue());
                    let _ = s.answer(now, handle, &null, reply);
                }
            }
            'm' => {
                if let Ok(u) = qiod::session::parse_server_url(arg) {
                    s.set_servers(now, vec![u]);
                }
            }
            'q' => {
                let _ = s.status(now);
            }
            _ => {}
        }
        h.drain(&mut s);
    }
    s.shutdown();
    h.drain(&mut s);
    for t in 1..=h.issued {
        assert_eq!(h.replies.get(&t), Some(&1), "request {t} never answered");
    }
});
