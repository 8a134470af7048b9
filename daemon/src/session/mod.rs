//! The session: everything a Quick.IO client must do, as a pure state machine.
//!
//! [`Session`] owns no socket and reads no clock. The driver feeds it what happened (a
//! connection came up, a frame arrived, a deadline passed, a caller asked for something)
//! with the current [`Instant`], and drains [`Output`]s telling it what to do (connect,
//! send a frame, close, answer a caller). That keeps every protocol rule (handshake,
//! callbacks, which paths are wanted upstream, heartbeats, backoff, the offline queue,
//! moves) testable without a network and without waiting for real timers.
//!
//! `T` is whatever the caller wants back with an answer: the driver uses a oneshot
//! sender, unit tests use plain numbers. Every call that takes a `T` produces exactly one
//! [`Output::Reply`] carrying it, whatever happens to the connection meanwhile.
//!
//! One concern per file: `types.rs` (settings, outputs, outcomes, errors, status),
//! `connection.rs` (connecting, handshake and dialect detection, servers, moves, losing a
//! connection, backoff; with `backoff.rs` and `address.rs`), `callbacks.rs` (requests and
//! answers), `subscriptions.rs` (which paths are wanted upstream), `queue.rs`
//! (fire-and-forget sends and the offline queue). This file holds the state itself, the
//! frame dispatch, timers, heartbeats and `status`.

mod address;
mod backoff;
mod callbacks;
mod connection;
mod queue;
mod subscriptions;
mod types;

pub use address::{drops_tls, parse_server_url, resolve_move};
pub use backoff::Backoff;
pub use queue::{OfflineQueue, Queued, Unconfirmed};
pub use types::{
    code, CbHandle, DialectChoice, Event, FireAndForget, Outcome, Output, SessionConfig,
    SessionError, SessionStatus, StateChange, SubStatus, Transport, TransportChoice,
};

use crate::codec::{self, DecodeError, Dialect};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};
use thiserror::Error;
use url::Url;

/// How soon after fire-and-forget events the session pings for proof they were read.
const CONFIRM_AFTER: Duration = Duration::from_millis(100);
/// Moves of connections younger than `stable_after` followed at once, in a row; after
/// these, moves wait for the growing backoff.
const MAX_QUICK_MOVES: u32 = 3;
/// The default frame limit of a 0.1 server (bytes of WebSocket payload).
pub const V01_MAX_FRAME_BYTES: usize = 1024;

#[derive(Debug)]
enum Phase {
    Waiting {
        until: Instant,
    },
    /// `reached`: the server answered the TCP (and TLS) connect, so a WebSocket that fails
    /// from here on is a broken upgrade, not network trouble.
    Connecting {
        url: Url,
        deadline: Instant,
        reached: bool,
    },
    Handshaking {
        url: Url,
        deadline: Instant,
    },
    Open {
        url: Url,
        since: Instant,
    },
    Stopped,
}

#[derive(Debug)]
enum Pending<T> {
    Request { reply: T, deadline: Instant },
    Ping,
    Subscribe { path: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Callback(u64),
}

#[derive(Deserialize)]
struct Envelope {
    code: i64,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    err_msg: Option<serde_json::Value>,
}

/// The Quick.IO client state machine; see the module documentation.
#[derive(Debug)]
pub struct Session<T> {
    cfg: SessionConfig,
    rng: StdRng,
    phase: Phase,
    out: VecDeque<Output<T>>,
    backoff: Backoff,
    order: Vec<usize>,
    cursor: usize,
    moved_to: Option<Url>,
    last_url: Option<Url>,
    conn: u64,
    next_cb: u64,
    pending: HashMap<u64, Pending<T>>,
    user_pending: usize,
    timers: BTreeSet<(Instant, Timer)>,
    subs: foldhash::HashMap<String, subscriptions::Sub>,
    /// `/qio/on` requests sent on this connection and not answered yet.
    sub_asks: usize,
    heartbeat_at: Option<Instant>,
    ping_deadline: Option<Instant>,
    queue: OfflineQueue,
    dialect: Dialect,
    detected: HashMap<Url, Dialect>,
    /// Fire-and-forget events sent on this connection that the server has not yet been
    /// seen to read.
    unconfirmed: Unconfirmed,
    /// When to ping for proof that the unconfirmed events were read.
    confirm_at: Option<Instant>,
    /// The callback of the one unanswered ping asking for that proof.
    confirm_ping: Option<u64>,
    /// Moves of connections that were not yet stable, in a row.
    quick_moves: u32,
    events_dropped: u64,
    opened: u64,
    last_error: Option<String>,
    events_in: u64,
    events_out: u64,
    /// The transport of the current attempt or connection.
    transport: Transport,
    /// The transport of the open (or last) connection, for `status`.
    in_use: Option<Transport>,
    /// Why the WebSocket upgrade failed, while the fallback it caused lasts.
    upgrade_error: Option<String>,
    /// Whether that failure looked like the other dialect.
    fallback_sign: bool,
}

impl<T> Session<T> {
    /// A session that starts connecting at once; `seed` drives jitter and server order.
    pub fn new(cfg: SessionConfig, seed: u64, now: Instant) -> Result<Self, SessionError> {
        cfg.validate()?;
        let mut s = Session {
            rng: StdRng::seed_from_u64(seed),
            phase: Phase::Waiting { until: now },
            out: VecDeque::new(),
            backoff: Backoff::new(cfg.backoff_initial, cfg.backoff_max),
            order: Vec::new(),
            cursor: 0,
            moved_to: None,
            last_url: None,
            conn: 0,
            next_cb: 1,
            pending: HashMap::new(),
            user_pending: 0,
            timers: BTreeSet::new(),
            subs: foldhash::HashMap::default(),
            sub_asks: 0,
            heartbeat_at: None,
            ping_deadline: None,
            queue: OfflineQueue::new(cfg.queue_max_events, cfg.queue_max_bytes),
            dialect: match cfg.dialect {
                DialectChoice::Fixed(d) => d,
                DialectChoice::Auto => Dialect::V02,
            },
            detected: HashMap::new(),
            unconfirmed: Unconfirmed::new(cfg.queue_max_events, cfg.queue_max_bytes),
            confirm_at: None,
            confirm_ping: None,
            quick_moves: 0,
            events_dropped: 0,
            opened: 0,
            last_error: None,
            events_in: 0,
            events_out: 0,
            transport: Transport::WebSocket,
            in_use: None,
            upgrade_error: None,
            fallback_sign: false,
            cfg,
        };
        s.start_connect(now);
        Ok(s)
    }

    /// The next instruction for the driver, if any.
    pub fn poll_output(&mut self) -> Option<Output<T>> {
        self.out.pop_front()
    }

    /// When [`Session::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match &self.phase {
            Phase::Waiting { until } => Some(*until),
            Phase::Connecting { deadline, .. } | Phase::Handshaking { deadline, .. } => {
                Some(*deadline)
            }
            Phase::Open { .. } | Phase::Stopped => None,
        };
        [
            phase,
            self.heartbeat_at,
            self.ping_deadline,
            self.confirm_at,
            self.timers.first().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether the connection is open (handshake done).
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open { .. })
    }

    fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    /// A text frame arrived from the server.
    pub fn handle_frame(&mut self, now: Instant, text: &str) {
        match &self.phase {
            Phase::Handshaking { .. } => {
                if text == codec::OHAI {
                    self.go_open(now);
                } else {
                    let shown: String = text.chars().take(64).collect();
                    self.handshake_failed(
                        now,
                        format!("server answered {shown:?} instead of /qio/ohai: is it a Quick.IO 0.2 server?"),
                        true,
                    );
                }
            }
            Phase::Open { .. } => {
                self.heartbeat_at = Some(now + self.cfg.heartbeat_interval);
                self.ping_deadline = None;
                match self.dialect.decode(text) {
                    Ok(frame) => self.handle_open_frame(now, frame),
                    Err(e) => self.invalid_frame(now, text, e),
                }
            }
            Phase::Waiting { .. } | Phase::Connecting { .. } | Phase::Stopped => {}
        }
    }

    /// Deadlines up to `now` have passed: retries, handshakes, heartbeats, timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::Waiting { until } if *until <= now => self.start_connect(now),
            Phase::Connecting {
                deadline, reached, ..
            } if *deadline <= now => {
                let reason = format!("handshake timed out after {:?}", self.cfg.handshake_timeout);
                self.out.push_back(Output::Close);
                if *reached {
                    self.upgrade_failed(now, reason, false);
                } else {
                    self.attempt_failed(now, reason, false);
                }
            }
            Phase::Handshaking { deadline, .. } if *deadline <= now => {
                let after = self.cfg.handshake_timeout;
                self.handshake_failed(now, format!("no /qio/ohai within {after:?}"), false);
            }
            Phase::Open { .. } => {
                if self.ping_deadline.is_some_and(|d| d <= now) {
                    let after = self.cfg.ping_timeout;
                    self.lose(
                        now,
                        format!("no answer to /qio/ping within {after:?}: connection is dead"),
                        true,
                    );
                    self.retry_later(now);
                } else if self.heartbeat_at.is_some_and(|d| d <= now) {
                    self.heartbeat_at = None;
                    self.ping_deadline = Some(now + self.cfg.ping_timeout);
                    let id = self.alloc_cb(Pending::Ping);
                    self.send("/qio/ping", id, &crate::json::null());
                } else if self.confirm_at.is_some_and(|d| d <= now) {
                    // Fire-and-forget events have no answer: a ping's answer proves the
                    // server read them. Until then they are kept, to be sent again if the
                    // connection dies first. One such ping at a time keeps the table of
                    // callbacks bounded against a server that reads but does not answer;
                    // the next one goes when it is answered.
                    self.confirm_at = None;
                    if self.confirm_ping.is_none() {
                        let id = self.alloc_cb(Pending::Ping);
                        self.confirm_ping = Some(id);
                        self.send("/qio/ping", id, &crate::json::null());
                    }
                }
            }
            _ => {}
        }
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Callback(id) => {
                    if let Some(Pending::Request { reply, .. }) = self.pending.remove(&id) {
                        self.user_pending -= 1;
                        let after = self.cfg.request_timeout;
                        let outcome = Outcome::local(
                            code::TIMEOUT,
                            format!("no answer from the server within {after:?}"),
                        );
                        self.out.push_back(Output::Reply(reply, outcome));
                    }
                }
            }
        }
    }

    /// Shuts down: every waiting caller gets -1 and the connection is closed.
    pub fn shutdown(&mut self) {
        if matches!(self.phase, Phase::Stopped) {
            return;
        }
        if !matches!(self.phase, Phase::Waiting { .. }) {
            self.out.push_back(Output::Close);
        }
        self.phase = Phase::Stopped;
        self.fail_pending();
        self.subs.clear();
        self.timers.clear();
        self.heartbeat_at = None;
        self.ping_deadline = None;
        self.out.push_back(Output::State(StateChange::Stopped));
    }

    /// A snapshot for `status`.
    pub fn status(&self, now: Instant) -> SessionStatus {
        let (state, open_for) = match &self.phase {
            Phase::Waiting { .. } => ("waiting", None),
            Phase::Connecting { .. } => ("connecting", None),
            Phase::Handshaking { .. } => ("handshaking", None),
            Phase::Open { since, .. } => ("open", Some(now.saturating_duration_since(*since))),
            Phase::Stopped => ("stopped", None),
        };
        let subscriptions = self
            .subscription_states()
            .into_iter()
            .map(|(path, state)| SubStatus { path, state })
            .collect();
        SessionStatus {
            state,
            url: self.last_url.clone(),
            dialect: self.dialect.name(),
            open_for,
            reconnects: self.opened.saturating_sub(1),
            last_error: self.last_error.clone(),
            subscriptions,
            queued_events: self.queue.len(),
            queued_bytes: self.queue.bytes(),
            pending_callbacks: self.user_pending,
            events_in: self.events_in,
            events_out: self.events_out,
            events_dropped: self.events_dropped,
            transport: self.in_use.map(Transport::name),
            upgrade_error: self.upgrade_error.clone(),
        }
    }

    fn handle_open_frame(&mut self, now: Instant, frame: codec::Frame) {
        if let Some(id) = frame.path.strip_prefix("/qio/callback/") {
            let id = id.parse::<u64>().unwrap_or(0);
            if id > 0 && id < self.next_cb {
                // The server answers in order: it has read every frame sent before this
                // callback's, so the events among them are delivered.
                self.unconfirmed.confirm_through(id);
                if self.unconfirmed.is_empty() {
                    self.confirm_at = None;
                }
            }
            match self.pending.remove(&id) {
                Some(Pending::Request { reply, deadline }) => {
                    self.user_pending -= 1;
                    self.timers.remove(&(deadline, Timer::Callback(id)));
                    let outcome = self.envelope(&frame);
                    self.reply(reply, outcome);
                }
                Some(Pending::Ping) => {
                    if self.confirm_ping == Some(id) {
                        self.confirm_ping = None;
                        if !self.unconfirmed.is_empty() && self.confirm_at.is_none() {
                            self.confirm_at =
                                Some(now + CONFIRM_AFTER.min(self.cfg.heartbeat_interval));
                        }
                    }
                }
                Some(Pending::Subscribe { path }) => {
                    let outcome = self.envelope(&frame);
                    self.subscription_answer(id, &path, outcome);
                }
                None => {
                    tracing::debug!(path = %frame.path, "callback for an id never issued or already answered; dropped")
                }
            }
            return;
        }
        match frame.path.as_str() {
            "/qio/heartbeat" => {
                if frame.cb > 0 {
                    let path = format!("/qio/callback/{}", frame.cb);
                    self.send(&path, 0, &crate::json::null());
                }
            }
            "/qio/move" => self.moved(now, &frame.data),
            p if p.starts_with("/qio/") => {
                tracing::debug!(path = p, "unknown protocol event; dropped");
            }
            _ => {
                if self.subs.contains_key(&frame.path) {
                    self.events_in += 1;
                    let cb = (frame.cb > 0).then_some(CbHandle {
                        conn: self.conn,
                        id: frame.cb,
                    });
                    self.out.push_back(Output::Event(Event {
                        path: frame.path,
                        data: frame.data,
                        cb,
                    }));
                } else {
                    tracing::debug!(path = %frame.path, "event for a path with no subscription; dropped");
                }
            }
        }
    }

    fn check_size(&self, frame: &str) -> Result<(), SessionError> {
        let max = self.cfg.max_frame_bytes.or(match self.dialect {
            Dialect::V02 => None,
            Dialect::V01 => Some(V01_MAX_FRAME_BYTES),
        });
        match max {
            Some(max) if frame.len() > max => Err(SessionError::TooLarge {
                len: frame.len(),
                max,
            }),
            _ => Ok(()),
        }
    }

    fn send(&mut self, path: &str, cb: u64, data: &RawValue) {
        if !path.starts_with("/qio/") {
            self.events_out += 1;
        }
        self.out
            .push_back(Output::Send(self.dialect.encode(path, cb, data)));
    }
}

/// Cleans a caller's path and refuses the empty and the reserved ones.
pub fn check_path(path: &str) -> Result<String, SessionError> {
    let clean = qio_ipc::clean_path(path);
    if clean == "/" {
        return Err(SessionError::BadPath(format!(
            "{path:?} is empty once cleaned (paths keep only A-Z a-z 0-9 _ - /)"
        )));
    }
    if clean == "/qio" || clean.starts_with("/qio/") {
        return Err(SessionError::BadPath(format!(
            "{clean} is reserved for the Quick.IO protocol itself"
        )));
    }
    Ok(clean)
}

#[cfg(test)]
mod tests;
