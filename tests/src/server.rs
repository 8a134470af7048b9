//! The server's shared state, listener and control API ([`TestServer`]).
//!
//! One `Arc<Inner>` is shared by the accept loop, the broadcast ticker and one task per
//! connection. Tests hold [`TestServer`] handles; when the last one is dropped every task is
//! aborted, so a test can never leak a server into the next one.

use crate::app;
use crate::codec::{clean_path, Dialect};
use crate::conn;
use crate::longpoll;
use futures_util::future::join_all;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Server settings. [`Default`] gives a 0.2 server with the real Quick.IO server's timings,
/// which are far too slow for tests: tests shorten them to milliseconds.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The wire dialect spoken to every client (0.2).
    pub dialect: Dialect,
    /// 0.2: send `/qio/heartbeat:0=null` when nothing was sent to a client for this long.
    /// 0.1: send `/qio/heartbeat:0:plain=` to every open connection this often, on one
    /// server-wide timer, whatever else was sent (60 s).
    pub heartbeat_interval: Duration,
    /// Send a heartbeat challenge when nothing was received from a client for this long
    /// (15 min). 0.2 only: 0.1 has no challenges and ignores this.
    pub challenge_after: Duration,
    /// Drop a client that has not answered a challenge within this long (60 s).
    pub challenge_timeout: Duration,
    /// Period of the `/clienttest/broadcast` events while anyone is subscribed (10 ms).
    pub broadcast_interval: Duration,
    /// Whether every path outside `/qio/` and `/clienttest/` can be subscribed to (true), as
    /// if an app had registered a handler taking subscriptions for each. The real server
    /// answers 404 for a path no handler registered: with false, so does the test server
    /// for everything but the conformance app's subscribable paths. (The conformance app's
    /// other events answer 401 either way, unknown `/clienttest/` paths 404.)
    pub open_subscriptions: bool,
    /// Bound of each connection's outbound queue (8192 frames). Bounded so a client that stops
    /// reading cannot make the server eat all memory.
    pub max_queued_frames: usize,
    /// How long a full outbound queue may stay full before the client is considered hopelessly
    /// behind and dropped (5 s). Senders wait this long, which gives benchmarks backpressure
    /// instead of dropped clients.
    pub slow_client_timeout: Duration,
    /// The largest WebSocket payload (per frame, and per message) a client may send; a larger
    /// one drops the connection without a close frame ([`CloseReason::FrameTooLarge`]).
    /// `None` (the default) takes the dialect's: 1024 bytes for 0.1 (the real server's
    /// default), 16 MiB for 0.2 (each frame on its own: the 0.2 server does not join
    /// fragments).
    pub max_frame_bytes: Option<usize>,
    /// How long a server-requested callback stays answerable (15 s, as on the real 0.2
    /// server); a later answer gets `404 callback doesn't exist`. Heartbeat challenges do
    /// not expire this way (see `challenge_timeout`).
    pub callback_timeout: Duration,
    /// 0.2: a client that has not sent `/qio/ohai` this long after the upgrade, or that
    /// leaves a frame half sent this long, is closed with 1008 `client timeout` (10 s).
    pub client_timeout: Duration,
    /// Serve `wss://` with this identity (both dialects): every accepted connection does a
    /// TLS handshake first, and [`TestServer::url`] names `localhost`, so issue the
    /// certificate for that name. `None` (the default): plain `ws://`.
    pub tls: Option<TlsIdentity>,
    /// 0.2: serve HTTP long polling on the same port (true). False is the real server
    /// without `public-address`: every plain HTTP request gets `501 Not Implemented`.
    pub long_poll: bool,
    /// What `/qio/hostname` answers over long polling: a bare host, as the real server's
    /// `public-address` setting. `None` (the default): the host of [`TestServer::url`]
    /// (`127.0.0.1`, or `localhost` with TLS).
    pub public_address: Option<String>,
    /// How long a held poll waits before its empty answer (the real server: 45-55 s,
    /// compiled in; this takes 50 s).
    pub poll_hold: Duration,
    /// A long-poll session with no poll held and nothing sent to it for this long ends
    /// (the real server: its `timeout`, 5 s on the stand-in event library, plus up to 10 s
    /// of its periodic check; this takes 15 s).
    pub poll_session_timeout: Duration,
}

/// A server certificate chain and its private key, PEM-encoded, for
/// [`ServerConfig::tls`].
#[derive(Clone)]
pub struct TlsIdentity {
    /// The server's certificate first, then any intermediates.
    pub cert_chain_pem: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("key_pem", &"(hidden)")
            .finish()
    }
}

impl TlsIdentity {
    /// The acceptor for this identity, with the ring provider (the process has no default
    /// one). A malformed chain or key is an `InvalidInput` error.
    fn acceptor(&self) -> std::io::Result<tokio_rustls::TlsAcceptor> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("tls {what}: {e}"))
        };
        let chain = CertificateDer::pem_slice_iter(self.cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("certificate chain", &e))?;
        if chain.is_empty() {
            return Err(invalid("certificate chain", &"no certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| invalid("key", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("setup", &e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| invalid("identity", &e))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            dialect: Dialect::V02,
            heartbeat_interval: Duration::from_secs(60),
            challenge_after: Duration::from_secs(15 * 60),
            challenge_timeout: Duration::from_secs(60),
            broadcast_interval: Duration::from_millis(10),
            open_subscriptions: true,
            max_queued_frames: 8192,
            slow_client_timeout: Duration::from_secs(5),
            max_frame_bytes: None,
            callback_timeout: Duration::from_secs(15),
            client_timeout: Duration::from_secs(10),
            tls: None,
            long_poll: true,
            public_address: None,
            poll_hold: Duration::from_secs(50),
            poll_session_timeout: Duration::from_secs(15),
        }
    }
}

impl ServerConfig {
    /// Clamps zero durations and sizes so a careless test config cannot make timers spin or
    /// `tokio::time::interval` panic.
    fn sanitized(mut self) -> Self {
        let min = Duration::from_millis(1);
        for d in [
            &mut self.heartbeat_interval,
            &mut self.challenge_after,
            &mut self.challenge_timeout,
            &mut self.broadcast_interval,
            &mut self.callback_timeout,
            &mut self.client_timeout,
            &mut self.poll_hold,
            &mut self.poll_session_timeout,
        ] {
            *d = (*d).max(min);
        }
        self.max_queued_frames = self.max_queued_frames.max(1);
        self
    }

    /// The payload limit in force: [`ServerConfig::max_frame_bytes`] or the dialect's default.
    pub fn effective_max_frame_bytes(&self) -> Option<usize> {
        self.max_frame_bytes
            .or(self.dialect.default_max_frame_bytes())
    }
}

/// One frame received from a client after the handshake, in arrival order. For 0.1, `data` is
/// mapped as in [`Frame::data`](crate::Frame::data): `plain` text as a JSON string, `json` as
/// the value.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The connection id (see [`LogEntry::Accepted`]); ids count up from 1 per server.
    pub conn: u64,
    /// The cleaned path.
    pub path: String,
    /// The path exactly as sent, to check a client's own path cleaning.
    pub raw_path: String,
    /// The callback id the client requested (0 = none).
    pub cb: u64,
    /// The data.
    pub data: Value,
}

/// What kind of server-requested callback a client answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackKind {
    /// A heartbeat challenge (`/qio/heartbeat:<cb>=null`, 0.2 only).
    Challenge,
    /// A `/clienttest/echo` answer requesting a callback back (a chain link).
    Echo,
    /// A request sent by [`TestServer::request_from_all`].
    Request,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a WebSocket close frame (with its close code, if any).
    ClientClose {
        /// The close code the client sent.
        code: Option<u16>,
    },
    /// The TCP stream ended without a close frame.
    ClientGone,
    /// A read or write error, including WebSocket protocol violations detected by tungstenite.
    Transport(String),
    /// The HTTP upgrade failed or timed out (the connection was dropped without an HTTP
    /// answer). For 0.1 the text says which check failed, e.g.
    /// `lower-case header name: sec-websocket-key` or `path without /qio: "/"`; see also
    /// [`LogEntry::UpgradeRejected`]. With [`ServerConfig::tls`], a failed TLS handshake ends
    /// here too, its text starting with `TLS handshake:` (and no request head was read).
    HandshakeFailed(String),
    /// 0.2: the first frame after the upgrade was not the greeting (`/qio/ohai`); holds its
    /// start.
    NotGreeting(String),
    /// A text frame that is not a valid event.
    Malformed {
        /// The parse error.
        error: String,
        /// The start of the offending frame.
        text: String,
    },
    /// The client sent a WebSocket ping frame (the real servers close on that opcode; the test
    /// server never answers it with a pong).
    PingFrame,
    /// The client sent a WebSocket pong frame (also an unsupported opcode).
    PongFrame,
    /// The client sent a binary frame.
    BinaryFrame,
    /// 0.2: the client sent a continuation frame (the server ignores FIN, so the first
    /// fragment was already routed as a whole event); closed with 1003.
    ContinuationFrame,
    /// 0.2: the client sent a frame with an opcode RFC 6455 reserves; closed with 1003.
    ReservedOpcode(u8),
    /// 0.2: the client sent an unmasked frame; closed with 1002 `client must mask data`.
    UnmaskedFrame,
    /// 0.2: a text frame that is not UTF-8; closed with 1007.
    InvalidUtf8,
    /// 0.2: `/qio/ohai` did not come, or a frame was left half sent, for
    /// [`ServerConfig::client_timeout`]; closed with 1008 `client timeout`.
    ClientTimeout,
    /// The client sent a frame (or message) with a payload larger than the limit
    /// ([`ServerConfig::max_frame_bytes`]); dropped without a close frame in both dialects.
    FrameTooLarge {
        /// The payload length the client announced.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A heartbeat challenge was not answered within `challenge_timeout`.
    ChallengeTimeout,
    /// The server closed it on request (`/clienttest/close`): 0.2 with a close frame with an
    /// empty payload (the client sees 1005, no status), 0.1 with a bare TCP drop.
    ServerClose,
    /// The server sent `/qio/move` and closed (`/clienttest/move`): 0.2 with an empty close
    /// frame, 0.1 with a bare TCP drop.
    Moved,
    /// The outbound queue stayed full for `slow_client_timeout`.
    SlowConsumer,
    /// [`TestServer::kill`] (or `restart`) dropped it without a close frame.
    Killed,
    /// The server shut down.
    Shutdown,
    /// A long-poll session held no poll and was sent nothing for
    /// [`ServerConfig::poll_session_timeout`].
    PollTimeout,
}

/// Notable happenings, in order, for tests to assert on (see [`TestServer::log`]).
#[derive(Debug, Clone, PartialEq)]
pub enum LogEntry {
    /// A TCP connection was accepted and got its id.
    Accepted {
        /// Connection id.
        conn: u64,
        /// The client's address.
        peer: SocketAddr,
    },
    /// The WebSocket upgrade succeeded.
    Upgraded {
        /// Connection id.
        conn: u64,
        /// The request URI (path and query) the client asked for.
        uri: String,
        /// Whether the client requested the `quickio` subprotocol: echoed by a 0.2 server,
        /// ignored by a 0.1 server (which makes tungstenite-based clients fail the upgrade).
        subprotocol_requested: bool,
        /// The raw request head exactly as the client sent it (lossy UTF-8), from the request
        /// line through the blank line (`\r\n\r\n`), so tests can assert header spellings.
        request: String,
    },
    /// The WebSocket upgrade was refused or failed; a [`LogEntry::Closed`] with
    /// [`CloseReason::HandshakeFailed`] and the same reason follows.
    UpgradeRejected {
        /// Connection id.
        conn: u64,
        /// The raw request head as far as it was received (lossy UTF-8, at most 8 KiB).
        request: String,
        /// Why.
        reason: String,
    },
    /// The Quick.IO handshake completed (0.2: greeting answered; 0.1: right after the HTTP
    /// 101): the connection is open.
    Opened {
        /// Connection id.
        conn: u64,
    },
    /// The connection ended; every accepted connection gets exactly one of these.
    Closed {
        /// Connection id.
        conn: u64,
        /// Why.
        reason: CloseReason,
    },
    /// A subscription became active.
    Subscribed {
        /// Connection id.
        conn: u64,
        /// Cleaned path.
        path: String,
    },
    /// A subscription was removed by `/qio/off` or `/qio/unsub` (not by the connection closing).
    Unsubscribed {
        /// Connection id.
        conn: u64,
        /// Cleaned path.
        path: String,
    },
    /// A heartbeat challenge was sent (0.2 only).
    ChallengeSent {
        /// Connection id.
        conn: u64,
        /// The callback id requested.
        cb: u64,
    },
    /// A client answered a server-requested callback.
    CallbackAnswered {
        /// Connection id.
        conn: u64,
        /// The server's callback id that was answered.
        cb: u64,
        /// What the server had asked for.
        kind: CallbackKind,
        /// The data of the answer.
        data: Value,
    },
    /// A client answered a callback id the server never requested (or already saw answered).
    UnknownCallback {
        /// Connection id.
        conn: u64,
        /// The callback id.
        cb: u64,
    },
    /// 0.2: bytes that arrived in the same read as the client's `/qio/ohai` were thrown
    /// away, as the real server does.
    DiscardedWithGreeting {
        /// Connection id.
        conn: u64,
        /// How many bytes.
        bytes: usize,
    },
    /// A server-requested callback expired unanswered ([`ServerConfig::callback_timeout`]);
    /// noticed when its slot was needed or when the late answer came.
    CallbackExpired {
        /// Connection id.
        conn: u64,
        /// The callback id.
        cb: u64,
    },
    /// A fifth outstanding server callback evicted the oldest of the four slots.
    CallbackEvicted {
        /// Connection id.
        conn: u64,
        /// The evicted callback id.
        cb: u64,
    },
    /// A frame was discarded because the connection's queue was full while stalled.
    FrameDiscarded {
        /// Connection id.
        conn: u64,
    },
    /// A long-poll request (`POST /?sid=...&connect=true`) started a session, which is a
    /// connection with this id from then on.
    PollSession {
        /// The session's connection id.
        conn: u64,
        /// Its sid (lower case).
        sid: String,
    },
    /// A long-poll socket wrote an answer (every answer is `HTTP/1.0`).
    PollAnswered {
        /// The socket's connection id (not the session's).
        socket: u64,
        /// The request's sid, if it named one.
        sid: Option<String>,
        /// The status code.
        status: u16,
        /// The body.
        body: String,
    },
    /// [`TestServer::kill`] ran.
    Killed,
    /// [`TestServer::restart`] is listening again.
    Restarted,
    /// [`TestServer::set_stalled`] changed the stall state.
    Stalled {
        /// The new state.
        on: bool,
    },
}

/// Something for a connection task to send, queued by the control API or the ticker.
#[derive(Debug, Clone)]
pub(crate) enum Out {
    /// A pre-encoded text frame (encoded once, shared by every receiver).
    Text(Utf8Bytes),
    /// An event with a server-requested callback; the connection picks the id, because ids
    /// count per connection.
    Request { path: Arc<str>, data: Arc<Value> },
}

struct ConnEntry {
    tx: mpsc::Sender<Out>,
    task: Option<JoinHandle<()>>,
    opened: bool,
    subs: HashSet<String>,
}

#[derive(Default)]
struct State {
    conns: HashMap<u64, ConnEntry>,
    subs: HashMap<String, HashSet<u64>>,
    /// Set under the lock by shutdown so a racing accept cannot register a new connection.
    shut: bool,
}

/// Shared server state. Connection tasks and the control API meet here.
pub(crate) struct Inner {
    pub(crate) cfg: ServerConfig,
    pub(crate) dialect: Dialect,
    /// Set when serving `wss://`: connections go through it before the upgrade.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    addr: SocketAddr,
    state: Mutex<State>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
    ticker_task: Mutex<Option<JoinHandle<()>>>,
    heartbeat_task: Mutex<Option<JoinHandle<()>>>,
    received: Mutex<Vec<Received>>,
    log: Mutex<Vec<LogEntry>>,
    stalled: watch::Sender<bool>,
    /// Set by [`TestServer::shutdown`]: connections close with 1001 (0.2).
    closing: watch::Sender<bool>,
    drop_callbacks: AtomicBool,
    refuse: Mutex<HashMap<String, i64>>,
    bytes_sent: AtomicU64,
    next_conn: AtomicU64,
    ticker_wakeup: Notify,
    /// Live long-poll sessions by sid.
    sessions: Mutex<HashMap<String, mpsc::Sender<longpoll::Request>>>,
}

/// Locks a mutex, ignoring poisoning: the state stays usable for the assertions of a test even
/// if some task panicked (which would be a bug, but should not hide the test's real failure).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn push_log(&self, entry: LogEntry) {
        tracing::debug!(?entry, "log");
        lock(&self.log).push(entry);
    }

    pub(crate) fn record(&self, r: Received) {
        lock(&self.received).push(r);
    }

    pub(crate) fn stall_rx(&self) -> watch::Receiver<bool> {
        self.stalled.subscribe()
    }

    pub(crate) fn closing_rx(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub(crate) fn is_stalled(&self) -> bool {
        *self.stalled.borrow()
    }

    pub(crate) fn drop_callbacks(&self) -> bool {
        self.drop_callbacks.load(Ordering::Relaxed)
    }

    pub(crate) fn refused(&self, path: &str) -> Option<i64> {
        lock(&self.refuse).get(path).copied()
    }

    pub(crate) fn add_bytes_sent(&self, n: usize) {
        self.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn wake_ticker(&self) {
        self.ticker_wakeup.notify_one();
    }

    pub(crate) async fn ticker_wakeup(&self) {
        self.ticker_wakeup.notified().await;
    }

    /// Registers a freshly accepted TCP connection and starts its task.
    fn spawn_conn(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let (tx, rx) = mpsc::channel(self.cfg.max_queued_frames);
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = lock(&self.state);
            if st.shut {
                return;
            }
            // Registered before the task exists, so kill() can never miss a connection: the
            // accept loop has no await point between here and storing the task handle.
            st.conns.insert(
                id,
                ConnEntry {
                    tx,
                    task: None,
                    opened: false,
                    subs: HashSet::new(),
                },
            );
        }
        self.push_log(LogEntry::Accepted { conn: id, peer });
        let task = tokio::spawn(conn::run(self.clone(), id, stream, rx));
        match lock(&self.state).conns.get_mut(&id) {
            Some(entry) => entry.task = Some(task),
            None => drop(task), // already finished: detach
        }
    }

    /// The host `/qio/hostname` names over long polling.
    pub(crate) fn public_address(&self) -> String {
        match (&self.cfg.public_address, &self.tls) {
            (Some(a), _) => a.clone(),
            (None, Some(_)) => "localhost".to_owned(),
            (None, None) => self.addr.ip().to_string(),
        }
    }

    /// The live session `sid` names; with `connect`, a new one when there is none.
    pub(crate) fn poll_session(
        self: &Arc<Self>,
        sid: &str,
        connect: bool,
    ) -> Option<mpsc::Sender<longpoll::Request>> {
        {
            let mut sessions = lock(&self.sessions);
            match sessions.get(sid) {
                Some(tx) if !tx.is_closed() => return Some(tx.clone()),
                Some(_) => {
                    sessions.remove(sid);
                }
                None => {}
            }
        }
        if !connect {
            return None;
        }
        let (tx, rx) = mpsc::channel(self.cfg.max_queued_frames);
        let (req_tx, req_rx) = mpsc::channel(longpoll::SESSION_REQUESTS);
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = lock(&self.state);
            if st.shut {
                return None;
            }
            st.conns.insert(
                id,
                ConnEntry {
                    tx,
                    task: None,
                    opened: false,
                    subs: HashSet::new(),
                },
            );
        }
        lock(&self.sessions).insert(sid.to_owned(), req_tx.clone());
        self.push_log(LogEntry::PollSession {
            conn: id,
            sid: sid.to_owned(),
        });
        let session =
            longpoll::HttpSession::new(req_rx, self.cfg.poll_hold, self.cfg.poll_session_timeout);
        let task = tokio::spawn(conn::run_session(
            self.clone(),
            id,
            sid.to_owned(),
            session,
            rx,
        ));
        match lock(&self.state).conns.get_mut(&id) {
            Some(entry) => entry.task = Some(task),
            None => drop(task),
        }
        Some(req_tx)
    }

    /// Forgets session `sid` (its task is ending).
    pub(crate) fn end_session(&self, sid: &str) {
        lock(&self.sessions).remove(sid);
    }

    pub(crate) fn mark_opened(&self, id: u64) {
        if let Some(e) = lock(&self.state).conns.get_mut(&id) {
            e.opened = true;
        }
        self.push_log(LogEntry::Opened { conn: id });
    }

    /// Forgets a connection (subscriptions included) and logs why it closed. Returns its task
    /// handle, or `None` if it was already removed (so each close is logged exactly once).
    pub(crate) fn remove_conn(
        &self,
        id: u64,
        reason: CloseReason,
    ) -> Option<Option<JoinHandle<()>>> {
        let entry = {
            let mut st = lock(&self.state);
            let entry = st.conns.remove(&id)?;
            for path in &entry.subs {
                if let Some(set) = st.subs.get_mut(path) {
                    set.remove(&id);
                    if set.is_empty() {
                        st.subs.remove(path);
                    }
                }
            }
            entry
        };
        self.push_log(LogEntry::Closed { conn: id, reason });
        Some(entry.task)
    }

    /// Removes a connection from outside its task and aborts the task (no close frame).
    fn drop_conn(&self, id: u64, reason: CloseReason) -> Option<JoinHandle<()>> {
        let task = self.remove_conn(id, reason)??;
        task.abort();
        Some(task)
    }

    pub(crate) fn is_subscribed(&self, id: u64, path: &str) -> bool {
        lock(&self.state)
            .conns
            .get(&id)
            .is_some_and(|e| e.subs.contains(path))
    }

    /// Adds a subscription; false if it already existed (or the connection is gone).
    pub(crate) fn subscribe(&self, id: u64, path: &str) -> bool {
        {
            let mut st = lock(&self.state);
            let Some(entry) = st.conns.get_mut(&id) else {
                return false;
            };
            if !entry.subs.insert(path.to_owned()) {
                return false;
            }
            st.subs.entry(path.to_owned()).or_default().insert(id);
        }
        self.push_log(LogEntry::Subscribed {
            conn: id,
            path: path.to_owned(),
        });
        true
    }

    /// Removes a subscription; false if there was none.
    pub(crate) fn unsubscribe(&self, id: u64, path: &str) -> bool {
        {
            let mut st = lock(&self.state);
            let Some(entry) = st.conns.get_mut(&id) else {
                return false;
            };
            if !entry.subs.remove(path) {
                return false;
            }
            if let Some(set) = st.subs.get_mut(path) {
                set.remove(&id);
                if set.is_empty() {
                    st.subs.remove(path);
                }
            }
        }
        self.push_log(LogEntry::Unsubscribed {
            conn: id,
            path: path.to_owned(),
        });
        true
    }

    pub(crate) fn subscriber_count(&self, path: &str) -> usize {
        lock(&self.state).subs.get(path).map_or(0, HashSet::len)
    }

    fn subscribers(&self, path: &str) -> Vec<(u64, mpsc::Sender<Out>)> {
        let st = lock(&self.state);
        let Some(set) = st.subs.get(path) else {
            return Vec::new();
        };
        set.iter()
            .filter_map(|id| st.conns.get(id).map(|e| (*id, e.tx.clone())))
            .collect()
    }

    fn open_conns(&self) -> Vec<(u64, mpsc::Sender<Out>)> {
        lock(&self.state)
            .conns
            .iter()
            .filter(|(_, e)| e.opened)
            .map(|(id, e)| (*id, e.tx.clone()))
            .collect()
    }

    /// Sends an event with cb 0 to every subscriber of `path`, encoding it once.
    pub(crate) async fn broadcast(&self, path: &str, data: &Value) -> usize {
        let targets = self.subscribers(path);
        if targets.is_empty() {
            return 0;
        }
        let text = Utf8Bytes::from(self.dialect.encode(path, 0, data));
        self.deliver(targets, Out::Text(text)).await
    }

    /// Queues `out` for every target. Full queues are waited on concurrently for up to
    /// `slow_client_timeout` (backpressure for fast producers); a client whose queue stays full
    /// that long is dropped. While stalled, nobody drains queues, so a full queue just loses
    /// the frame instead. Returns how many targets got it.
    async fn deliver(&self, targets: Vec<(u64, mpsc::Sender<Out>)>, out: Out) -> usize {
        let mut delivered = 0;
        let mut slow = Vec::new();
        for (id, tx) in targets {
            match tx.try_send(out.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(o)) => slow.push((id, tx, o)),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        if slow.is_empty() {
            return delivered;
        }
        if self.is_stalled() {
            for (id, _, _) in slow {
                self.push_log(LogEntry::FrameDiscarded { conn: id });
            }
            return delivered;
        }
        let timeout = self.cfg.slow_client_timeout;
        let results = join_all(
            slow.into_iter()
                .map(|(id, tx, o)| async move { (id, tx.send_timeout(o, timeout).await) }),
        )
        .await;
        for (id, res) in results {
            match res {
                Ok(()) => delivered += 1,
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    tracing::warn!(conn = id, "client too far behind: dropped");
                    self.drop_conn(id, CloseReason::SlowConsumer);
                }
                Err(mpsc::error::SendTimeoutError::Closed(_)) => {}
            }
        }
        delivered
    }

    /// Aborts every task at once without waiting (usable from `Drop`).
    fn shutdown_now(&self) -> Vec<JoinHandle<()>> {
        let mut handles = Vec::new();
        handles.extend(lock(&self.accept_task).take());
        handles.extend(lock(&self.ticker_task).take());
        handles.extend(lock(&self.heartbeat_task).take());
        let ids: Vec<u64> = {
            let mut st = lock(&self.state);
            st.shut = true;
            st.conns.keys().copied().collect()
        };
        for id in ids {
            if let Some(Some(task)) = self.remove_conn(id, CloseReason::Shutdown) {
                handles.push(task);
            }
        }
        for h in &handles {
            h.abort();
        }
        handles
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Quick.IO frames are small and latency matters more than packet count.
                let _ = stream.set_nodelay(true);
                inner.spawn_conn(stream, peer);
            }
            Err(e) => {
                // Typically EMFILE: back off a little instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The 0.1 heartbeat: one server-wide timer sends `/qio/heartbeat` to every open connection
/// each `heartbeat_interval`, whatever else they were sent. Ticks are skipped while stalled.
async fn heartbeat_ticker(inner: Arc<Inner>) {
    let period = inner.cfg.heartbeat_interval;
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let text = Utf8Bytes::from(inner.dialect.encode("/qio/heartbeat", 0, &Value::Null));
    loop {
        tick.tick().await;
        if inner.is_stalled() {
            continue;
        }
        let targets = inner.open_conns();
        if !targets.is_empty() {
            inner.deliver(targets, Out::Text(text.clone())).await;
        }
    }
}

/// Dropping the last [`TestServer`] drops this, which aborts every task.
struct Guard {
    inner: Arc<Inner>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.shutdown_now();
    }
}

/// A running Quick.IO test server (0.2, or 0.1 with [`ServerConfig::dialect`]) and its control
/// API.
///
/// Cheap to clone (an `Arc` inside); all clones control the same server. Dropping the last
/// clone (or calling [`TestServer::shutdown`]) stops the listener, every connection and the
/// broadcast ticker.
#[derive(Clone)]
pub struct TestServer {
    guard: Arc<Guard>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr())
            .finish_non_exhaustive()
    }
}

impl TestServer {
    fn inner(&self) -> &Arc<Inner> {
        &self.guard.inner
    }

    /// Starts a server on `127.0.0.1` with a free port chosen by the OS.
    pub async fn start(cfg: ServerConfig) -> std::io::Result<TestServer> {
        Self::bind(cfg, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts a server on a given address (port 0 = any free port). Used by the binary's
    /// `--bind`/`--port`; tests should prefer [`TestServer::start`].
    pub async fn bind(cfg: ServerConfig, addr: SocketAddr) -> std::io::Result<TestServer> {
        let tls = cfg.tls.as_ref().map(TlsIdentity::acceptor).transpose()?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stalled, _) = watch::channel(false);
        let (closing, _) = watch::channel(false);
        let dialect = cfg.dialect;
        let inner = Arc::new(Inner {
            cfg: cfg.sanitized(),
            dialect,
            tls,
            addr,
            state: Mutex::new(State::default()),
            accept_task: Mutex::new(None),
            ticker_task: Mutex::new(None),
            heartbeat_task: Mutex::new(None),
            received: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            stalled,
            closing,
            drop_callbacks: AtomicBool::new(false),
            refuse: Mutex::new(HashMap::new()),
            bytes_sent: AtomicU64::new(0),
            next_conn: AtomicU64::new(1),
            ticker_wakeup: Notify::new(),
            sessions: Mutex::new(HashMap::new()),
        });
        *lock(&inner.accept_task) = Some(tokio::spawn(accept_loop(inner.clone(), listener)));
        *lock(&inner.ticker_task) = Some(tokio::spawn(app::broadcast_ticker(inner.clone())));
        if dialect.global_heartbeat() {
            *lock(&inner.heartbeat_task) = Some(tokio::spawn(heartbeat_ticker(inner.clone())));
        }
        tracing::info!(%addr, %dialect, "test server listening");
        Ok(TestServer {
            guard: Arc::new(Guard { inner }),
        })
    }

    /// The address the server listens on (stays the same across [`TestServer::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.inner().addr
    }

    /// The wire dialect the server speaks.
    pub fn dialect(&self) -> Dialect {
        self.inner().dialect
    }

    /// The WebSocket URL of the server: `ws://127.0.0.1:PORT/` for 0.2,
    /// `ws://127.0.0.1:PORT/qio` for 0.1 (which only upgrades paths containing `/qio`).
    /// With [`ServerConfig::tls`] it is `wss://localhost:PORT/...`, the name the
    /// certificate must carry (the server still listens on its address).
    pub fn url(&self) -> String {
        let inner = self.inner();
        let path = inner.dialect.url_path();
        match inner.tls {
            Some(_) => format!("wss://localhost:{}{path}", self.addr().port()),
            None => format!("ws://{}{path}", self.addr()),
        }
    }

    /// Simulates a crash: closes the listener (new connects are refused) and drops every
    /// connection at once without a WebSocket close frame (the kernel closes the TCP stream,
    /// as it would for a dead process). Returns when all of them are gone.
    pub async fn kill(&self) {
        let inner = self.inner();
        let accept = lock(&inner.accept_task).take();
        if let Some(task) = accept {
            task.abort();
            let _ = task.await;
        }
        let ids: Vec<u64> = lock(&inner.state).conns.keys().copied().collect();
        let tasks: Vec<_> = ids
            .into_iter()
            .filter_map(|id| inner.drop_conn(id, CloseReason::Killed))
            .collect();
        for task in tasks {
            let _ = task.await;
        }
        inner.push_log(LogEntry::Killed);
    }

    /// Listens again on the same port after [`TestServer::kill`] (if the server is still
    /// listening, kills it first, so `restart` alone simulates a server restart). Retries the
    /// bind for about 2 s because the port can be briefly busy. Fails after
    /// [`TestServer::shutdown`].
    pub async fn restart(&self) -> std::io::Result<()> {
        if lock(&self.inner().state).shut {
            return Err(std::io::Error::other("the test server was shut down"));
        }
        let running = lock(&self.inner().accept_task)
            .as_ref()
            .is_some_and(|t| !t.is_finished());
        if running {
            self.kill().await;
        }
        let inner = self.inner();
        let deadline = Instant::now() + Duration::from_secs(2);
        let listener = loop {
            match TcpListener::bind(inner.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let task = tokio::spawn(accept_loop(inner.clone(), listener));
        if let Some(old) = lock(&inner.accept_task).replace(task) {
            old.abort();
        }
        inner.push_log(LogEntry::Restarted);
        Ok(())
    }

    /// Stalls or resumes the server. Stalled, it keeps its TCP connections and still accepts
    /// new ones, but reads nothing and sends nothing: no handshakes, answers, heartbeats or
    /// ticker broadcasts, like a hung process. Frames queued meanwhile (e.g. by
    /// [`TestServer::broadcast`]) go out after resuming; time spent stalled does not count
    /// towards heartbeat or challenge timers.
    pub fn set_stalled(&self, on: bool) {
        let old = self.inner().stalled.send_replace(on);
        if old != on {
            self.inner().push_log(LogEntry::Stalled { on });
        }
    }

    /// `Some(code)`: subscribing to `path` (cleaned) answers that code with an `err_msg` (0.1:
    /// `qio_error`). `None`: back to normal. Existing subscriptions are not touched.
    pub fn set_refuse_subscriptions(&self, path: &str, code: Option<i64>) {
        let path = clean_path(path);
        let mut refuse = lock(&self.inner().refuse);
        match code {
            Some(code) => refuse.insert(path, code),
            None => refuse.remove(&path),
        };
    }

    /// While on, application events (outside `/qio/`) that request a callback get no answer,
    /// as with `/clienttest/drop-callback`. Side effects of `/clienttest/*` events still happen.
    pub fn set_drop_callbacks(&self, on: bool) {
        self.inner().drop_callbacks.store(on, Ordering::Relaxed);
    }

    /// The number of open connections (Quick.IO handshake done, not closed; for 0.1 that is
    /// right after the HTTP 101).
    pub fn connection_count(&self) -> usize {
        lock(&self.inner().state)
            .conns
            .values()
            .filter(|e| e.opened)
            .count()
    }

    /// Path -> number of connections subscribed to it (paths with none are absent). A
    /// multiplexing client must show at most 1 per path.
    pub fn subscriptions(&self) -> BTreeMap<String, usize> {
        lock(&self.inner().state)
            .subs
            .iter()
            .map(|(p, s)| (p.clone(), s.len()))
            .collect()
    }

    /// Every frame received from clients after their greeting (0.2: the greeting included, as
    /// `/qio/ohai` with cb 0 and data null; 0.1 has none), in arrival order, `/qio/*` frames
    /// included.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.inner().received).clone()
    }

    /// How many frames [`TestServer::received`] holds, without copying them (for polling in
    /// benchmarks).
    pub fn received_count(&self) -> usize {
        lock(&self.inner().received).len()
    }

    /// Forgets the received frames (e.g. between benchmark phases).
    pub fn clear_received(&self) {
        lock(&self.inner().received).clear();
    }

    /// Every notable happening so far, in order.
    pub fn log(&self) -> Vec<LogEntry> {
        lock(&self.inner().log).clone()
    }

    /// Forgets the log.
    pub fn clear_log(&self) {
        lock(&self.inner().log).clear();
    }

    /// The close reasons in the log, as `(conn, reason)` pairs in order: the usual thing to
    /// assert ("no connection was closed for a ping frame").
    pub fn closes(&self) -> Vec<(u64, CloseReason)> {
        lock(&self.inner().log)
            .iter()
            .filter_map(|e| match e {
                LogEntry::Closed { conn, reason } => Some((*conn, reason.clone())),
                _ => None,
            })
            .collect()
    }

    /// Sends an event (cb 0) to every subscriber of `path` (cleaned), encoded once. Returns
    /// how many subscribers it was queued for. Waits (up to `slow_client_timeout`) while a
    /// subscriber's queue is full.
    pub async fn broadcast(&self, path: &str, data: Value) -> usize {
        self.inner().broadcast(&clean_path(path), &data).await
    }

    /// Sends a raw text frame, as is, to every open connection.
    pub async fn send_raw_to_all(&self, text: &str) {
        let inner = self.inner();
        let targets = inner.open_conns();
        inner
            .deliver(targets, Out::Text(Utf8Bytes::from(text)))
            .await;
    }

    /// Sends an event with a server-requested callback (cb > 0, per connection) to every open
    /// connection. Answers show up in [`TestServer::received`] as `/qio/callback/<id>` frames
    /// and in the log as [`LogEntry::CallbackAnswered`] with [`CallbackKind::Request`].
    pub async fn request_from_all(&self, path: &str, data: Value) {
        let inner = self.inner();
        let targets = inner.open_conns();
        let out = Out::Request {
            path: Arc::from(clean_path(path)),
            data: Arc::new(data),
        };
        inner.deliver(targets, out).await;
    }

    /// Sends an event with a server-requested callback (cb > 0, per connection) to every
    /// subscriber of `path` (cleaned), as a server asks the clients interested in a topic.
    /// Returns how many subscribers it was queued for; answers show up as with
    /// [`TestServer::request_from_all`].
    pub async fn request_subscribers(&self, path: &str, data: Value) -> usize {
        let inner = self.inner();
        let path = clean_path(path);
        let targets = inner.subscribers(&path);
        if targets.is_empty() {
            return 0;
        }
        let out = Out::Request {
            path: Arc::from(path),
            data: Arc::new(data),
        };
        inner.deliver(targets, out).await
    }

    /// Total bytes of text payload written to clients so far.
    pub fn bytes_sent(&self) -> u64 {
        self.inner().bytes_sent.load(Ordering::Relaxed)
    }

    /// Polls `f` every 2 ms until it returns true (then true) or `timeout` passes (then false).
    /// Tests use this instead of fixed sleeps.
    pub async fn wait_until<F: Fn(&TestServer) -> bool>(&self, timeout: Duration, f: F) -> bool {
        let deadline = Instant::now() + timeout;
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

    /// Stops the server (listener, ticker, every connection) and waits for the tasks to end:
    /// open 0.2 connections get a close frame with 1001 first (given about 2 s in all). The
    /// handle stays usable for inspecting the log, but the server cannot be restarted.
    /// Dropping the last handle stops everything at once, without close frames.
    pub async fn shutdown(&self) {
        let inner = self.inner();
        let accept = lock(&inner.accept_task).take();
        if let Some(task) = accept {
            task.abort();
            let _ = task.await;
        }
        // Like the real server going down: open 0.2 connections get a 1001 close frame.
        // Their tasks are given a moment for it, then everything is aborted.
        let mut tasks: Vec<JoinHandle<()>> = {
            let mut st = lock(&inner.state);
            st.shut = true;
            st.conns
                .values_mut()
                .filter_map(|e| e.task.take())
                .collect()
        };
        inner.closing.send_replace(true);
        let _ = tokio::time::timeout(conn::CLOSE_GRACE * 2, join_all(tasks.iter_mut())).await;
        for task in &tasks {
            task.abort();
        }
        for task in self.inner().shutdown_now() {
            let _ = task.await;
        }
    }
}
