//! The session: everything a Quick.IO client must do, as a pure state machine.
//!
//! [`Session`] owns no socket and reads no clock. The driver feeds it what happened (a
//! connection came up, a frame arrived, a deadline passed, a caller asked for something)
//! with the current [`Instant`], and drains [`Output`]s telling it what to do (connect,
//! send a frame, close, answer a caller). That keeps every protocol rule (handshake,
//! callbacks, reference-counted subscriptions, heartbeats, backoff, the offline queue,
//! moves) testable without a network and without waiting for real timers.
//!
//! `T` is whatever the caller wants back with an answer: the driver uses a oneshot
//! sender, unit tests use plain numbers. Every call that takes a `T` produces exactly one
//! [`Output::Reply`] carrying it, whatever happens to the connection meanwhile.

mod address;
mod backoff;
mod queue;

pub use address::{drops_tls, parse_server_url, resolve_move};
pub use backoff::Backoff;
pub use queue::{OfflineQueue, Queued, Unconfirmed};

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

/// Answer codes: Quick.IO's own, and the daemon's local ones (all negative).
pub mod code {
    /// The server accepted the request.
    pub const OK: i64 = 200;
    /// The server has the request but not the final answer yet.
    pub const PENDING: i64 = 202;
    /// The request was malformed (from the server, or refused locally before sending).
    pub const BAD_REQUEST: i64 = 400;
    /// The connection that carried the request is gone; the answer can never arrive.
    pub const DISCONNECTED: i64 = -1;
    /// No answer came within the request timeout.
    pub const TIMEOUT: i64 = -2;
    /// A local bound was reached (offline queue, pending callbacks, subscriptions).
    pub const OVERLOADED: i64 = -3;
}

/// Tunables of the session; every bound of every table lives here.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Server addresses, tried in random order, moving on after a failure.
    pub servers: Vec<Url>,
    /// Silence after which the session sends `/qio/ping` (Quick.IO says 65 s).
    pub heartbeat_interval: Duration,
    /// How long a `/qio/ping` may go unanswered before the connection counts as dead.
    pub ping_timeout: Duration,
    /// How long a caller waits for a callback or a subscription answer.
    pub request_timeout: Duration,
    /// Time allowed from starting to connect to receiving `/qio/ohai`.
    pub handshake_timeout: Duration,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Most events held while offline.
    pub queue_max_events: usize,
    /// Most bytes of encoded events held while offline.
    pub queue_max_bytes: usize,
    /// Most callbacks callers may have outstanding at once.
    pub max_pending_callbacks: usize,
    /// Most distinct subscribed paths.
    pub max_subscriptions: usize,
    /// Which wire dialect to speak.
    pub dialect: DialectChoice,
    /// Largest frame the server accepts, in bytes; `None` means the dialect's default
    /// (no limit for 0.2, 1024 for 0.1, whose server drops the connection beyond it).
    pub max_frame_bytes: Option<usize>,
    /// How long a connection must stay open to count as good: only then does the backoff
    /// start over (and the move-loop count clear). A server that greets and then drops
    /// the connection is therefore retried at the growing backoff's pace, not hammered.
    pub stable_after: Duration,
    /// What happens to fire-and-forget events across a broken connection.
    pub fire_and_forget: FireAndForget,
    /// Whether a `/qio/move` from a `wss://` server to a `ws://` address is followed.
    /// Off by default: a move must not silently drop TLS.
    pub allow_insecure_move: bool,
}

/// The delivery promise for events sent without a callback (the `fire_and_forget` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FireAndForget {
    /// Quick.IO's own semantics: an event written to an open connection is never sent
    /// again (it may or may not arrive, as the client documents say); events accepted
    /// while not open are queued and sent once, in order, after the reconnect. A server
    /// never acts twice on one event.
    #[default]
    Once,
    /// Every event is kept until the server is seen to have read it (the answer to a later
    /// callback) and sent again after every break until then, so none is lost but one the
    /// server read just before a break arrives twice. A server's close frame or
    /// `/qio/move` does not end the replay: neither shows which frames it read.
    AtLeastOnce,
}

impl FireAndForget {
    /// The setting's spelling.
    pub fn name(self) -> &'static str {
        match self {
            FireAndForget::Once => "once",
            FireAndForget::AtLeastOnce => "at-least-once",
        }
    }
}

/// The dialect setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialectChoice {
    /// Try 0.2; when the server shows it speaks 0.1, switch at once and remember it for
    /// that address until a move or a restart.
    Auto,
    /// Always this one.
    Fixed(Dialect),
}

/// How soon after fire-and-forget events the session pings for proof they were read.
const CONFIRM_AFTER: Duration = Duration::from_millis(100);

/// Moves of connections younger than `stable_after` followed at once, in a row; after
/// these, moves wait for the growing backoff.
const MAX_QUICK_MOVES: u32 = 3;

/// The default frame limit of a 0.1 server (bytes of WebSocket payload).
pub const V01_MAX_FRAME_BYTES: usize = 1024;

impl SessionConfig {
    /// The defaults Quick.IO clients use, for the given servers.
    pub fn new(servers: Vec<Url>) -> Self {
        SessionConfig {
            servers,
            heartbeat_interval: Duration::from_secs(65),
            ping_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(25_600),
            queue_max_events: 10_000,
            queue_max_bytes: 16 * 1024 * 1024,
            max_pending_callbacks: 65_536,
            max_subscriptions: 65_536,
            dialect: DialectChoice::Auto,
            max_frame_bytes: None,
            stable_after: Duration::from_secs(10),
            fire_and_forget: FireAndForget::Once,
            allow_insecure_move: false,
        }
    }
}

/// A server's request for a callback, valid only on the connection it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CbHandle {
    /// The connection generation (counts up with every opened connection).
    pub conn: u64,
    /// The callback id the server asked for.
    pub id: u64,
}

impl fmt::Display for CbHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.conn, self.id)
    }
}

impl FromStr for CbHandle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("{s:?} is not a callback handle (expected the \"cb\" value of an event or reply, like \"3.7\")")
        };
        let (conn, id) = s.split_once('.').ok_or_else(bad)?;
        Ok(CbHandle {
            conn: conn.parse().map_err(|_| bad())?,
            id: id.parse().map_err(|_| bad())?,
        })
    }
}

/// The answer to a request: the server's callback envelope, or a local failure.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Quick.IO code, or one of the negative local codes in [`code`].
    pub code: i64,
    /// The answer's data (JSON `null` when there is none).
    pub data: Box<RawValue>,
    /// The server's or the daemon's explanation, on errors.
    pub err_msg: Option<String>,
    /// Set when the server asked for a callback on its answer.
    pub cb: Option<CbHandle>,
}

impl Outcome {
    /// A local outcome with no data.
    pub fn local(code: i64, err_msg: impl Into<String>) -> Self {
        Outcome {
            code,
            data: codec::null(),
            err_msg: Some(err_msg.into()),
            cb: None,
        }
    }

    /// The answer every caller gets when its connection is gone.
    pub fn disconnected() -> Self {
        Outcome::local(code::DISCONNECTED, "disconnected")
    }

    /// Success with no data.
    pub fn ok() -> Self {
        Outcome {
            code: code::OK,
            data: codec::null(),
            err_msg: None,
            cb: None,
        }
    }
}

/// An event from the server on a subscribed path.
#[derive(Debug)]
pub struct Event {
    /// The cleaned path.
    pub path: String,
    /// The data, raw JSON exactly as received.
    pub data: Box<RawValue>,
    /// Set when the server asked for a callback.
    pub cb: Option<CbHandle>,
}

/// What the layers above see of the connection's life.
#[derive(Debug, Clone, PartialEq)]
pub enum StateChange {
    /// A connection attempt started.
    Connecting {
        /// Where to.
        url: Url,
    },
    /// The handshake finished, subscriptions were re-sent and the queue flushed.
    Open {
        /// The server.
        url: Url,
    },
    /// An attempt failed before the handshake finished.
    ConnectFailed {
        /// The server that failed.
        url: Url,
        /// Why.
        reason: String,
    },
    /// An open connection was lost.
    Closed {
        /// Why.
        reason: String,
    },
    /// The server told us to go elsewhere.
    Moved {
        /// The server that sent the move.
        from: Url,
        /// Where we go now.
        to: Url,
    },
    /// Waiting before the next attempt.
    Reconnecting {
        /// How long.
        after: Duration,
    },
    /// The session was shut down and does nothing more.
    Stopped,
}

/// Instructions for the driver, in the order they must be carried out.
#[derive(Debug)]
pub enum Output<T> {
    /// Open a WebSocket to this address (dropping any previous one) and report back with
    /// [`Session::handle_connected`], [`Session::handle_connect_failed`] or
    /// [`Session::handle_wrong_dialect`].
    Connect {
        /// Where to.
        url: Url,
        /// Which dialect's upgrade request to send (0.2 asks for the `quickio` subprotocol,
        /// 0.1 must not).
        dialect: Dialect,
    },
    /// Send this text frame on the current connection.
    Send(String),
    /// Close the current connection or abandon the current attempt; the session already
    /// knows, so nothing is reported back.
    Close,
    /// Answer a caller.
    Reply(T, Outcome),
    /// Deliver an event to the subscribers of its path.
    Event(Event),
    /// An accepted fire-and-forget event could not be sent after all (queued while offline,
    /// then too large for the dialect the server turned out to speak): its sender must be
    /// told, since nothing else will tell it.
    Dropped {
        /// Who sent it (the tag given to [`Session::emit_from`]).
        sender: u64,
        /// The event's path.
        path: String,
        /// Why, with the code the sender sees.
        outcome: Outcome,
    },
    /// A subscription callers held was refused when it was restored; they hold it no more.
    SubscriptionLost {
        /// The path.
        path: String,
        /// The server's refusal.
        outcome: Outcome,
    },
    /// The connection's state changed.
    State(StateChange),
}

/// Why a call without a reply target failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The path is empty or reserved.
    #[error("bad path: {0}")]
    BadPath(String),
    /// The offline queue is full; nothing was queued.
    #[error("offline queue is full ({0}): the server has been unreachable for a while; retry later or raise queue_max_events/queue_max_bytes")]
    QueueFull(String),
    /// The connection the handle belonged to is gone.
    #[error("disconnected: the callback handle belongs to a connection that is gone")]
    Disconnected,
    /// The session was shut down.
    #[error("the session is shut down")]
    Stopped,
    /// The frame would exceed what the server accepts; nothing was sent.
    #[error("event too large: its frame is {len} bytes and the server accepts {max} (max_frame_bytes); send less data")]
    TooLarge {
        /// The frame's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No server address was given.
    #[error("no server address configured")]
    NoServers,
}

impl SessionError {
    /// The code a caller sees for this error.
    pub fn code(&self) -> i64 {
        match self {
            SessionError::BadPath(_) | SessionError::TooLarge { .. } => code::BAD_REQUEST,
            SessionError::QueueFull(_) => code::OVERLOADED,
            SessionError::Disconnected | SessionError::Stopped | SessionError::NoServers => {
                code::DISCONNECTED
            }
        }
    }
}

/// A snapshot of the session for `status`.
#[derive(Debug, Clone)]
pub struct SessionStatus {
    /// `connecting`, `handshaking`, `open`, `waiting` or `stopped`.
    pub state: &'static str,
    /// The server of the current (or last) attempt.
    pub url: Option<Url>,
    /// The dialect of the current (or last) attempt.
    pub dialect: &'static str,
    /// How long the current connection has been open.
    pub open_for: Option<Duration>,
    /// How many times a connection was opened after the first.
    pub reconnects: u64,
    /// The latest connection error.
    pub last_error: Option<String>,
    /// Every subscribed path with its holders and upstream state.
    pub subscriptions: Vec<SubStatus>,
    /// Events waiting in the offline queue.
    pub queued_events: usize,
    /// Bytes waiting in the offline queue.
    pub queued_bytes: usize,
    /// Callbacks callers are waiting for.
    pub pending_callbacks: usize,
    /// Events received on subscribed paths.
    pub events_in: u64,
    /// Events sent to the server.
    pub events_out: u64,
    /// Accepted fire-and-forget events that were dropped afterwards (each sender told).
    pub events_dropped: u64,
    /// The transport of the open (or last) connection, `websocket` or `long-poll`; the
    /// driver fills it in (the session does not know transports).
    pub transport: Option<&'static str>,
    /// Why the WebSocket upgrade failed, when the connection fell back to long polling;
    /// filled in by the driver.
    pub upgrade_error: Option<String>,
}

/// One subscription in [`SessionStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubStatus {
    /// The path.
    pub path: String,
    /// Callers holding it, plus callers waiting for it.
    pub refs: usize,
    /// `active`, `pending` (asked, not answered) or `offline`.
    pub state: &'static str,
}

#[derive(Debug)]
enum Phase {
    Waiting { until: Instant },
    Connecting { url: Url, deadline: Instant },
    Handshaking { url: Url, deadline: Instant },
    Open { url: Url, since: Instant },
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
    Waiter(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Offline,
    Pending,
    Active,
}

#[derive(Debug)]
struct Waiter<T> {
    id: u64,
    reply: T,
    deadline: Instant,
}

#[derive(Debug)]
struct Sub<T> {
    data: Option<Box<RawValue>>,
    holders: usize,
    waiters: Vec<Waiter<T>>,
    upstream: Upstream,
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
    subs: HashMap<String, Sub<T>>,
    waiter_paths: HashMap<u64, String>,
    next_waiter: u64,
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
    /// Moves of connections that were not yet stable, in a row.
    quick_moves: u32,
    events_dropped: u64,
    opened: u64,
    last_error: Option<String>,
    events_in: u64,
    events_out: u64,
}

impl<T> Session<T> {
    /// A session that starts connecting at once; `seed` drives jitter and server order.
    pub fn new(cfg: SessionConfig, seed: u64, now: Instant) -> Result<Self, SessionError> {
        if cfg.servers.is_empty() {
            return Err(SessionError::NoServers);
        }
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
            subs: HashMap::new(),
            waiter_paths: HashMap::new(),
            next_waiter: 0,
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
            quick_moves: 0,
            events_dropped: 0,
            opened: 0,
            last_error: None,
            events_in: 0,
            events_out: 0,
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

    /// The transport connected; the session starts the Quick.IO handshake (0.2), or is
    /// open at once (0.1 has no handshake beyond the upgrade).
    pub fn handle_connected(&mut self, now: Instant) {
        if let Phase::Connecting { url, deadline } = &self.phase {
            self.phase = Phase::Handshaking {
                url: url.clone(),
                deadline: *deadline,
            };
            match self.dialect {
                Dialect::V02 => self.out.push_back(Output::Send(codec::OHAI.to_owned())),
                Dialect::V01 => self.go_open(now),
            }
        }
    }

    /// The connection attempt failed before it connected.
    pub fn handle_connect_failed(&mut self, now: Instant, reason: &str) {
        if matches!(
            self.phase,
            Phase::Connecting { .. } | Phase::Handshaking { .. }
        ) {
            self.attempt_failed(now, reason.to_owned(), false);
        }
    }

    /// The upgrade failed in a way that shows the other dialect, such as a server that
    /// does not echo the `quickio` subprotocol (a 0.1 server never does).
    pub fn handle_wrong_dialect(&mut self, now: Instant, reason: &str) {
        if matches!(
            self.phase,
            Phase::Connecting { .. } | Phase::Handshaking { .. }
        ) {
            self.attempt_failed(now, reason.to_owned(), true);
        }
    }

    /// The transport was closed or broke; `reason` says how.
    pub fn handle_closed(&mut self, now: Instant, reason: &str) {
        match self.phase {
            Phase::Connecting { .. } => self.attempt_failed(now, reason.to_owned(), false),
            // A 0.1 server drops a connection whose first frame is /qio/ohai.
            Phase::Handshaking { .. } => {
                let reason = format!("closed during the handshake: {reason}");
                self.attempt_failed(now, reason, true)
            }
            Phase::Open { .. } => {
                self.lose(now, reason.to_owned(), false);
                self.retry_later(now);
            }
            Phase::Waiting { .. } | Phase::Stopped => {}
        }
    }

    /// A text frame arrived from the server.
    pub fn handle_frame(&mut self, now: Instant, text: &str) {
        match &self.phase {
            Phase::Handshaking { .. } => {
                if text == codec::OHAI {
                    self.go_open(now);
                } else {
                    self.out.push_back(Output::Close);
                    let shown: String = text.chars().take(64).collect();
                    self.attempt_failed(
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
            Phase::Connecting { deadline, .. } | Phase::Handshaking { deadline, .. }
                if *deadline <= now =>
            {
                self.out.push_back(Output::Close);
                let after = self.cfg.handshake_timeout;
                self.attempt_failed(now, format!("handshake timed out after {after:?}"), false);
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
                    self.send("/qio/ping", id, &codec::null());
                } else if self.confirm_at.is_some_and(|d| d <= now) {
                    // Fire-and-forget events have no answer: a ping's answer proves the
                    // server read them. Until then they are kept, to be sent again if the
                    // connection dies first.
                    self.confirm_at = None;
                    let id = self.alloc_cb(Pending::Ping);
                    self.send("/qio/ping", id, &codec::null());
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
                Timer::Waiter(id) => self.waiter_timed_out(id),
            }
        }
    }

    /// Sends an event without asking for a callback; queued while not open.
    pub fn emit(&mut self, now: Instant, path: &str, data: &RawValue) -> Result<(), SessionError> {
        self.emit_from(now, path, data, None)
    }

    /// [`Session::emit`] on behalf of `sender` (the driver passes the local client's id):
    /// should the event be dropped after it was accepted, an [`Output::Dropped`] names it.
    ///
    /// What happens across breaks follows [`SessionConfig::fire_and_forget`].
    pub fn emit_from(
        &mut self,
        now: Instant,
        path: &str,
        data: &RawValue,
        sender: Option<u64>,
    ) -> Result<(), SessionError> {
        let path = check_path(path)?;
        let frame = self.dialect.encode(&path, 0, data);
        self.check_size(&frame)?;
        let event = Queued::new(path, data.to_owned(), sender);
        match self.phase {
            Phase::Open { .. } if self.cfg.fire_and_forget == FireAndForget::Once => {
                // Written once; whatever happens to the connection, never again.
                self.events_out += 1;
                self.out.push_back(Output::Send(frame));
                Ok(())
            }
            Phase::Open { .. } => {
                if self.unconfirmed.push(self.next_cb, event).is_err() {
                    let (n, bytes) = self.unconfirmed.size();
                    return Err(SessionError::QueueFull(format!(
                        "{n} events, {bytes} bytes sent and not yet confirmed by the server"
                    )));
                }
                self.events_out += 1;
                self.out.push_back(Output::Send(frame));
                if self.unconfirmed.half_full() {
                    // Ask for proof now rather than refuse events soon.
                    self.confirm_at = Some(now);
                } else if self.confirm_at.is_none() {
                    self.confirm_at = Some(now + CONFIRM_AFTER.min(self.cfg.heartbeat_interval));
                }
                Ok(())
            }
            Phase::Stopped => Err(SessionError::Stopped),
            _ => self.queue.push(event).map_err(|_| {
                SessionError::QueueFull(format!(
                    "{} events, {} bytes",
                    self.queue.len(),
                    self.queue.bytes()
                ))
            }),
        }
    }

    /// Sends an event asking for a callback; `reply` gets the answer, exactly once.
    pub fn request(&mut self, now: Instant, path: &str, data: &RawValue, reply: T) {
        let path = match check_path(path) {
            Ok(p) => p,
            Err(e) => return self.reply(reply, Outcome::local(e.code(), e.to_string())),
        };
        if let Some(outcome) = self.refuse_request() {
            return self.reply(reply, outcome);
        }
        // Checked with the largest id the request could get, before it takes one.
        if let Err(e) = self.check_size(&self.dialect.encode(&path, u64::MAX, data)) {
            return self.reply(reply, Outcome::local(e.code(), e.to_string()));
        }
        let id = self.alloc_request(now, reply);
        self.send(&path, id, data);
    }

    /// Answers a server's callback request; with `reply`, asks for a callback back.
    ///
    /// With a `reply`, every failure goes to it and this returns `Ok`; without one,
    /// failures are returned.
    pub fn answer(
        &mut self,
        now: Instant,
        handle: CbHandle,
        data: &RawValue,
        reply: Option<T>,
    ) -> Result<(), SessionError> {
        let live = self.is_open() && handle.conn == self.conn;
        let path = format!("/qio/callback/{}", handle.id);
        if let Err(e) = self.check_size(&self.dialect.encode(&path, u64::MAX, data)) {
            return match reply {
                Some(reply) => {
                    self.reply(reply, Outcome::local(e.code(), e.to_string()));
                    Ok(())
                }
                None => Err(e),
            };
        }
        match (live, reply) {
            (false, None) => Err(SessionError::Disconnected),
            (false, Some(reply)) => {
                self.reply(reply, Outcome::disconnected());
                Ok(())
            }
            (true, None) => {
                self.send(&path, 0, data);
                Ok(())
            }
            (true, Some(reply)) => {
                if let Some(outcome) = self.refuse_request() {
                    self.reply(reply, outcome);
                } else {
                    let id = self.alloc_request(now, reply);
                    self.send(&path, id, data);
                }
                Ok(())
            }
        }
    }

    /// Takes a reference on a subscription; `reply` gets 200 once the server confirmed
    /// it (at once when it already is), or the refusal.
    ///
    /// Only a 200 leaves the caller holding a reference, to be given back with
    /// [`Session::unsubscribe`]. While offline the subscription is recorded and the answer
    /// comes when the reconnect restores it, or as a timeout. The first caller's
    /// subscription data is the one sent to the server.
    pub fn subscribe(&mut self, now: Instant, path: &str, data: Option<&RawValue>, reply: T) {
        let path = match check_path(path) {
            Ok(p) => p,
            Err(e) => return self.reply(reply, Outcome::local(e.code(), e.to_string())),
        };
        if matches!(self.phase, Phase::Stopped) {
            return self.reply(reply, Outcome::disconnected());
        }
        if let Some(sub) = self.subs.get_mut(&path) {
            if sub.upstream == Upstream::Active {
                sub.holders += 1;
                return self.reply(reply, Outcome::ok());
            }
        } else {
            if self.subs.len() >= self.cfg.max_subscriptions {
                let max = self.cfg.max_subscriptions;
                let msg = format!("too many subscriptions (max_subscriptions = {max})");
                return self.reply(reply, Outcome::local(code::OVERLOADED, msg));
            }
            self.subs.insert(
                path.clone(),
                Sub {
                    data: data.map(ToOwned::to_owned),
                    holders: 0,
                    waiters: Vec::new(),
                    upstream: Upstream::Offline,
                },
            );
        }
        let id = self.next_waiter;
        self.next_waiter += 1;
        let deadline = now + self.cfg.request_timeout;
        self.timers.insert((deadline, Timer::Waiter(id)));
        self.waiter_paths.insert(id, path.clone());
        if let Some(sub) = self.subs.get_mut(&path) {
            sub.waiters.push(Waiter {
                id,
                reply,
                deadline,
            });
            if sub.upstream == Upstream::Offline && self.is_open() {
                self.send_on(&path);
            }
        }
    }

    /// Gives back a reference taken by a successful [`Session::subscribe`]; the last
    /// one unsubscribes upstream. Returns whether a reference was held.
    pub fn unsubscribe(&mut self, path: &str) -> bool {
        let path = codec::clean_path(path);
        let Some(sub) = self.subs.get_mut(&path) else {
            return false;
        };
        if sub.holders == 0 {
            return false;
        }
        sub.holders -= 1;
        self.drop_if_unused(&path);
        true
    }

    /// Replaces the configured servers (a reload). When the current connection goes to an
    /// address no longer configured, and was not reached through a move, it is closed and
    /// the session reconnects at once to one of the new addresses.
    pub fn set_servers(&mut self, now: Instant, servers: Vec<Url>) {
        if servers.is_empty() || servers == self.cfg.servers {
            return;
        }
        self.cfg.servers = servers;
        self.order.clear();
        self.cursor = 0;
        self.moved_to = None;
        let current = match &self.phase {
            Phase::Connecting { url, .. }
            | Phase::Handshaking { url, .. }
            | Phase::Open { url, .. } => Some(url.clone()),
            Phase::Waiting { .. } | Phase::Stopped => None,
        };
        match current {
            Some(url) if self.cfg.servers.contains(&url) => {}
            Some(_) => {
                if self.is_open() {
                    self.lose(now, "the configured server address changed".into(), true);
                } else {
                    self.out.push_back(Output::Close);
                }
                self.backoff.reset();
                self.start_connect(now);
            }
            None => {
                if matches!(self.phase, Phase::Waiting { .. }) {
                    self.backoff.reset();
                    self.start_connect(now);
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
        for (_, sub) in self.subs.drain() {
            for w in sub.waiters {
                self.out
                    .push_back(Output::Reply(w.reply, Outcome::disconnected()));
            }
        }
        self.timers.clear();
        self.waiter_paths.clear();
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
        let mut subscriptions: Vec<SubStatus> = self
            .subs
            .iter()
            .map(|(path, sub)| SubStatus {
                path: path.clone(),
                refs: sub.holders + sub.waiters.len(),
                state: match sub.upstream {
                    Upstream::Active => "active",
                    Upstream::Pending => "pending",
                    Upstream::Offline => "offline",
                },
            })
            .collect();
        subscriptions.sort_by(|a, b| a.path.cmp(&b.path));
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
            transport: None,
            upgrade_error: None,
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
                Some(Pending::Ping) => {}
                Some(Pending::Subscribe { path }) => {
                    let outcome = self.envelope(&frame);
                    self.subscription_answer(&path, outcome);
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
                    self.send(&path, 0, &codec::null());
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

    fn envelope(&self, frame: &codec::Frame) -> Outcome {
        let cb = (frame.cb > 0).then_some(CbHandle {
            conn: self.conn,
            id: frame.cb,
        });
        if self.dialect == Dialect::V01 {
            // 0.1 callbacks carry the data as sent; `qio_error` is the only error.
            return if frame.data.get() == "\"qio_error\"" {
                Outcome {
                    code: 500,
                    data: codec::null(),
                    err_msg: Some("qio_error".into()),
                    cb,
                }
            } else {
                Outcome {
                    code: code::OK,
                    data: frame.data.clone(),
                    err_msg: None,
                    cb,
                }
            };
        }
        match serde_json::from_str::<Envelope>(frame.data.get()) {
            Ok(env) => Outcome {
                code: env.code,
                data: env.data.unwrap_or_else(codec::null),
                err_msg: env.err_msg.and_then(|m| match m {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(s),
                    other => Some(other.to_string()),
                }),
                cb,
            },
            Err(_) => Outcome {
                code: 500,
                data: frame.data.clone(),
                err_msg: Some("the server's callback had no {code, data} envelope".into()),
                cb,
            },
        }
    }

    fn subscription_answer(&mut self, path: &str, outcome: Outcome) {
        let Some(sub) = self.subs.get_mut(path) else {
            if outcome.code == code::OK && self.is_open() {
                // Confirmed after every caller left: give it back upstream too.
                self.out
                    .push_back(Output::Send(self.dialect.unsubscribe(path)));
            }
            return;
        };
        if sub.upstream != Upstream::Pending || outcome.code == code::PENDING {
            return;
        }
        if outcome.code == code::OK {
            sub.upstream = Upstream::Active;
            let waiters = std::mem::take(&mut sub.waiters);
            sub.holders += waiters.len();
            for w in waiters {
                self.timers.remove(&(w.deadline, Timer::Waiter(w.id)));
                self.waiter_paths.remove(&w.id);
                self.out.push_back(Output::Reply(w.reply, outcome.clone()));
            }
            return;
        }
        if let Some(sub) = self.subs.remove(path) {
            for w in sub.waiters {
                self.timers.remove(&(w.deadline, Timer::Waiter(w.id)));
                self.waiter_paths.remove(&w.id);
                self.out.push_back(Output::Reply(w.reply, outcome.clone()));
            }
            if sub.holders > 0 {
                self.out.push_back(Output::SubscriptionLost {
                    path: path.to_owned(),
                    outcome,
                });
            }
        }
    }

    fn waiter_timed_out(&mut self, id: u64) {
        let Some(path) = self.waiter_paths.remove(&id) else {
            return;
        };
        let Some(sub) = self.subs.get_mut(&path) else {
            return;
        };
        if let Some(i) = sub.waiters.iter().position(|w| w.id == id) {
            let w = sub.waiters.swap_remove(i);
            let after = self.cfg.request_timeout;
            let msg = format!("the server did not confirm the subscription within {after:?}");
            self.out
                .push_back(Output::Reply(w.reply, Outcome::local(code::TIMEOUT, msg)));
            self.drop_if_unused(&path);
        }
    }

    fn drop_if_unused(&mut self, path: &str) {
        let unused = self
            .subs
            .get(path)
            .is_some_and(|s| s.holders == 0 && s.waiters.is_empty());
        if !unused {
            return;
        }
        if let Some(sub) = self.subs.remove(path) {
            if sub.upstream != Upstream::Offline && self.is_open() {
                self.out
                    .push_back(Output::Send(self.dialect.unsubscribe(path)));
            }
        }
    }

    fn moved(&mut self, now: Instant, data: &RawValue) {
        let Phase::Open { url, .. } = &self.phase else {
            return;
        };
        let from = url.clone();
        // A server that moves us on before the connection proved stable (a move loop, or
        // two servers sending clients to each other) must not make us reconnect as fast
        // as we can.
        if self.is_stable(now) {
            self.quick_moves = 0;
        } else {
            self.quick_moves += 1;
        }
        let target = serde_json::from_str::<String>(data.get())
            .map_err(|_| format!("move data {} is not a string", data.get()))
            .and_then(|t| resolve_move(&from, &t));
        let to = match target {
            Ok(to) => to,
            Err(e) => {
                tracing::warn!("ignoring a move the server asked for: {e}");
                self.last_error = Some(e);
                return;
            }
        };
        if drops_tls(&from, &to) && !self.cfg.allow_insecure_move {
            // The server wants us gone, but not to where it says: back to the configured
            // servers, as after a move target that cannot be reached.
            let reason = format!(
                "refused a move from {from} to {to}: it would drop TLS \
                 (set allow_insecure_move = true to follow such moves)"
            );
            tracing::warn!("{reason}");
            self.moved_to = None;
            self.lose(now, reason, true);
        } else {
            self.out.push_back(Output::State(StateChange::Moved {
                from,
                to: to.clone(),
            }));
            self.moved_to = Some(to.clone());
            // The new server may speak the other dialect: detect afresh.
            self.detected.clear();
            self.lose(now, format!("moved to {to}"), true);
        }
        if self.quick_moves < MAX_QUICK_MOVES {
            // A move is not a failure: go to the new server at once.
            self.start_connect(now);
        } else {
            tracing::warn!(
                moves = self.quick_moves,
                "the servers keep moving us right after connecting; backing off"
            );
            self.retry_later(now);
        }
    }

    /// Whether the open connection has lasted long enough to count as good.
    fn is_stable(&self, now: Instant) -> bool {
        match &self.phase {
            Phase::Open { since, .. } => {
                now.saturating_duration_since(*since) >= self.cfg.stable_after
            }
            _ => false,
        }
    }

    /// Tells the sender of an accepted event that it will not be sent after all.
    fn drop_event(&mut self, event: Queued, code: i64, why: String) {
        self.events_dropped += 1;
        // The caller logs one line for the lot: a full queue can hold thousands.
        tracing::debug!(path = event.path, "dropping an accepted event: {why}");
        if let Some(sender) = event.sender {
            self.out.push_back(Output::Dropped {
                sender,
                path: event.path,
                outcome: Outcome::local(code, why),
            });
        }
    }

    fn invalid_frame(&mut self, now: Instant, text: &str, e: DecodeError) {
        let shown: String = text.chars().take(64).collect();
        self.lose(
            now,
            format!("invalid frame from the server ({e}): {shown:?}"),
            true,
        );
        self.retry_later(now);
    }

    fn go_open(&mut self, now: Instant) {
        let Phase::Handshaking { url, .. } = &self.phase else {
            return;
        };
        let url = url.clone();
        if self.cfg.dialect == DialectChoice::Auto {
            self.detected.insert(url.clone(), self.dialect);
        }
        // The backoff starts over only when this connection proves stable (see `lose`):
        // a server that greets and then drops us must not be hammered.
        self.conn += 1;
        self.next_cb = 1;
        self.opened += 1;
        self.phase = Phase::Open {
            url: url.clone(),
            since: now,
        };
        self.heartbeat_at = Some(now + self.cfg.heartbeat_interval);
        let mut paths: Vec<String> = self.subs.keys().cloned().collect();
        paths.sort();
        for path in paths {
            self.send_on(&path);
        }
        let queued: Vec<_> = self.queue.drain().collect();
        let dropped_before = self.events_dropped;
        for event in queued {
            let frame = self.dialect.encode(&event.path, 0, &event.data);
            if let Err(e) = self.check_size(&frame) {
                // Only when the dialect changed since it was queued (0.1's smaller limit).
                let why = format!(
                    "queued while offline, then the server turned out to speak Quick.IO {}: {e}",
                    self.dialect.name()
                );
                self.drop_event(event, e.code(), why);
                continue;
            }
            self.events_out += 1;
            self.out.push_back(Output::Send(frame));
            if self.cfg.fire_and_forget == FireAndForget::Once {
                continue;
            }
            // The queue and this table have the same bounds, and this one is empty now.
            if let Err(event) = self.unconfirmed.push(self.next_cb, event) {
                // Unreachable with equal bounds; should it happen, the event was still sent
                // once, only not kept for another replay.
                tracing::debug!(
                    path = event.path,
                    "no room to keep a sent event for a replay"
                );
            } else if self.confirm_at.is_none() {
                self.confirm_at = Some(now + CONFIRM_AFTER.min(self.cfg.heartbeat_interval));
            }
        }
        if self.events_dropped > dropped_before {
            tracing::warn!(
                events = self.events_dropped - dropped_before,
                dialect = self.dialect.name(),
                "dropped queued events too large for the server's frame limit; their senders were told"
            );
        }
        self.out.push_back(Output::State(StateChange::Open { url }));
    }

    fn send_on(&mut self, path: &str) {
        let Some(sub) = self.subs.get_mut(path) else {
            return;
        };
        sub.upstream = Upstream::Pending;
        if sub.data.is_some() && self.dialect == Dialect::V01 {
            let msg = "subscription data needs a Quick.IO 0.2 server; this one speaks 0.1";
            self.subscription_answer(path, Outcome::local(code::BAD_REQUEST, msg));
            return;
        }
        let id = self.alloc_cb(Pending::Subscribe {
            path: path.to_owned(),
        });
        let data = self.subs.get(path).and_then(|s| s.data.as_deref());
        let frame = self.dialect.subscribe(id, path, data);
        self.out.push_back(Output::Send(frame));
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

    fn start_connect(&mut self, now: Instant) {
        let url = match self.moved_to.clone() {
            Some(url) => url,
            None => {
                if self.cursor >= self.order.len() {
                    self.order = (0..self.cfg.servers.len()).collect();
                    self.order.shuffle(&mut self.rng);
                    self.cursor = 0;
                }
                let i = self.order[self.cursor];
                self.cursor += 1;
                self.cfg.servers[i].clone()
            }
        };
        let dialect = match self.cfg.dialect {
            DialectChoice::Fixed(d) => d,
            DialectChoice::Auto => self.detected.get(&url).copied().unwrap_or(Dialect::V02),
        };
        self.connect_to(now, url, dialect);
    }

    fn connect_to(&mut self, now: Instant, url: Url, dialect: Dialect) {
        self.dialect = dialect;
        self.last_url = Some(url.clone());
        self.phase = Phase::Connecting {
            url: url.clone(),
            deadline: now + self.cfg.handshake_timeout,
        };
        self.out
            .push_back(Output::State(StateChange::Connecting { url: url.clone() }));
        self.out.push_back(Output::Connect { url, dialect });
    }

    /// An attempt failed; `dialect_sign` says the failure looks like the other dialect.
    fn attempt_failed(&mut self, now: Instant, reason: String, dialect_sign: bool) {
        let url = match &self.phase {
            Phase::Connecting { url, .. } | Phase::Handshaking { url, .. } => url.clone(),
            _ => return,
        };
        let fall_back = dialect_sign
            && self.cfg.dialect == DialectChoice::Auto
            && self.dialect == Dialect::V02
            && !self.detected.contains_key(&url);
        if fall_back {
            tracing::info!(%url, "not a Quick.IO 0.2 server ({reason}); trying 0.1");
            self.connect_to(now, url, Dialect::V01);
            return;
        }
        let mut reason = reason;
        if self.dialect == Dialect::V01 && !url.path().contains("/qio") {
            reason.push_str(
                " (a Quick.IO 0.1 server needs /qio in the address, like ws://host:port/qio)",
            );
        }
        if self.moved_to.as_ref() == Some(&url) {
            // A moved-to server that cannot be reached sends us back to the configured ones.
            self.moved_to = None;
        }
        self.last_error = Some(format!("{url}: {reason}"));
        self.out
            .push_back(Output::State(StateChange::ConnectFailed { url, reason }));
        self.retry_later(now);
    }

    fn retry_later(&mut self, now: Instant) {
        let after = self.backoff.next_delay(&mut self.rng);
        self.phase = Phase::Waiting { until: now + after };
        self.out
            .push_back(Output::State(StateChange::Reconnecting { after }));
    }

    /// The open connection is gone: fail callbacks at once and keep subscriptions for the
    /// reconnect, which the caller schedules.
    ///
    /// A connection that lasted `stable_after` was a good one: the backoff and the move
    /// count start over. One that did not leaves both growing, so a server that greets
    /// and drops is retried ever more slowly.
    ///
    /// With `fire_and_forget = "at-least-once"`, events the server was not seen to read go
    /// first after the reconnect, however many breaks it takes (an event read just before
    /// a break arrives twice). Even a server that closes or moves us on purpose may not
    /// have read what was in flight, so its close frame or move does not end the replay.
    /// By default nothing written is kept.
    fn lose(&mut self, now: Instant, reason: String, close: bool) {
        if self.is_stable(now) {
            self.backoff.reset();
            self.quick_moves = 0;
        }
        if close {
            self.out.push_back(Output::Close);
        }
        self.confirm_at = None;
        let unconfirmed = self.unconfirmed.take();
        if !unconfirmed.is_empty() {
            tracing::info!(
                events = unconfirmed.len(),
                "sending again after the reconnect: events the server may not have read"
            );
            // The queue is empty while open and has the same bounds, so all fit.
            let refused = self.queue.push_front(unconfirmed);
            if !refused.is_empty() {
                tracing::warn!(
                    events = refused.len(),
                    "the offline queue is full: dropping events to be sent again; their senders were told"
                );
            }
            for event in refused {
                let why = "the offline queue is full (queue_max_events/queue_max_bytes): \
                           an event sent before the connection broke cannot be sent again"
                    .to_owned();
                self.drop_event(event, code::OVERLOADED, why);
            }
        }
        self.fail_pending();
        for sub in self.subs.values_mut() {
            sub.upstream = Upstream::Offline;
        }
        self.heartbeat_at = None;
        self.ping_deadline = None;
        self.last_error = Some(reason.clone());
        self.out
            .push_back(Output::State(StateChange::Closed { reason }));
    }

    fn fail_pending(&mut self) {
        for (id, p) in self.pending.drain() {
            if let Pending::Request { reply, deadline } = p {
                self.timers.remove(&(deadline, Timer::Callback(id)));
                self.out
                    .push_back(Output::Reply(reply, Outcome::disconnected()));
            }
        }
        self.user_pending = 0;
    }

    fn refuse_request(&self) -> Option<Outcome> {
        match self.phase {
            Phase::Open { .. } if self.user_pending >= self.cfg.max_pending_callbacks => {
                let max = self.cfg.max_pending_callbacks;
                Some(Outcome::local(
                    code::OVERLOADED,
                    format!("too many callbacks waiting (max_pending_callbacks = {max})"),
                ))
            }
            Phase::Open { .. } => None,
            _ => Some(Outcome::disconnected()),
        }
    }

    fn alloc_request(&mut self, now: Instant, reply: T) -> u64 {
        let deadline = now + self.cfg.request_timeout;
        let id = self.alloc_cb(Pending::Request { reply, deadline });
        self.timers.insert((deadline, Timer::Callback(id)));
        self.user_pending += 1;
        id
    }

    fn alloc_cb(&mut self, p: Pending<T>) -> u64 {
        let id = self.next_cb;
        self.next_cb += 1;
        self.pending.insert(id, p);
        id
    }

    fn send(&mut self, path: &str, cb: u64, data: &RawValue) {
        if !path.starts_with("/qio/") {
            self.events_out += 1;
        }
        self.out
            .push_back(Output::Send(self.dialect.encode(path, cb, data)));
    }

    fn reply(&mut self, reply: T, outcome: Outcome) {
        self.out.push_back(Output::Reply(reply, outcome));
    }
}

/// Cleans a caller's path and refuses the empty and the reserved ones.
fn check_path(path: &str) -> Result<String, SessionError> {
    let clean = codec::clean_path(path);
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
