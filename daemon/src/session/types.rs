//! Owns the session's vocabulary: its settings, what it tells the driver ([`Output`],
//! [`StateChange`]), what callers get back ([`Outcome`], [`SessionError`]) and what
//! `status` shows. No behaviour beyond small constructors and checks.

use super::*;

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
    /// Which transports to use (the `transport` setting).
    pub transport: TransportChoice,
}

/// The `transport` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// WebSocket first on every attempt; HTTP long polling at once, on the same address,
    /// when the server was reached but the WebSocket gave no `/qio/ohai`, as the Quick.IO
    /// client documents require.
    #[default]
    Auto,
    /// WebSocket only.
    WebSocket,
    /// HTTP long polling only (0.2 only: 0.1 servers have none).
    LongPoll,
}

impl TransportChoice {
    /// The setting's spelling.
    pub fn name(self) -> &'static str {
        match self {
            TransportChoice::Auto => "auto",
            TransportChoice::WebSocket => "websocket",
            TransportChoice::LongPoll => "long-poll",
        }
    }
}

/// How one connection moves frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A WebSocket.
    WebSocket,
    /// HTTP long polling.
    LongPoll,
}

impl Transport {
    /// The name `status` shows.
    pub fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::LongPoll => "long-poll",
        }
    }
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
            transport: TransportChoice::Auto,
        }
    }

    /// Checks what a library embedder may get wrong: no server, or a zero bound (which
    /// would refuse everything, or worse, later).
    pub fn validate(&self) -> Result<(), SessionError> {
        if self.servers.is_empty() {
            return Err(SessionError::NoServers);
        }
        let bounds = [
            ("queue_max_events", self.queue_max_events),
            ("queue_max_bytes", self.queue_max_bytes),
            ("max_pending_callbacks", self.max_pending_callbacks),
            ("max_subscriptions", self.max_subscriptions),
            ("max_frame_bytes", self.max_frame_bytes.unwrap_or(1)),
        ];
        match bounds.into_iter().find(|(_, v)| *v == 0) {
            Some((key, _)) => Err(SessionError::ZeroBound(key)),
            None => Ok(()),
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
            data: crate::json::null(),
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
            data: crate::json::null(),
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
    /// Open a connection to this address (dropping any previous one or the attempt in
    /// progress) and report back with [`Session::handle_connected`],
    /// [`Session::handle_connect_failed`] or [`Session::handle_upgrade_failed`].
    Connect {
        /// Where to.
        url: Url,
        /// Which dialect's upgrade request to send (0.2 asks for the `quickio` subprotocol,
        /// 0.1 must not).
        dialect: Dialect,
        /// Over which transport.
        transport: Transport,
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
    /// The answer about a path wanted with [`Session::want`], for the generation it was
    /// wanted for: 200 when the server confirmed it (also after a reconnect restored it),
    /// anything else when it was refused (also when restored) and is not wanted any more.
    /// It comes in stream order, after every event received before it.
    Subscription {
        /// The path, as given to [`Session::want`].
        path: String,
        /// The generation the answer is for; the owner ignores one it has already ended.
        gen: u64,
        /// The server's answer, or a local refusal.
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
    /// A bound of the configuration is zero: nothing could ever fit.
    #[error("{0} must be at least 1")]
    ZeroBound(&'static str),
}

impl SessionError {
    /// The code a caller sees for this error.
    pub fn code(&self) -> i64 {
        match self {
            SessionError::BadPath(_) | SessionError::TooLarge { .. } => code::BAD_REQUEST,
            SessionError::QueueFull(_) => code::OVERLOADED,
            SessionError::Disconnected
            | SessionError::Stopped
            | SessionError::NoServers
            | SessionError::ZeroBound(_) => code::DISCONNECTED,
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
    /// Every path wanted upstream, with its upstream state.
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
    /// `active`, `pending` (asked, not answered) or `offline`.
    pub state: &'static str,
}
