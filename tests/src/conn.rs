//! One client connection: WebSocket upgrade, Quick.IO greeting, the frame loop, protocol
//! events (`/qio/*`), server-requested callbacks, heartbeats and challenges. (The 0.1
//! heartbeat is one server-wide timer, in `server`.)
//!
//! Each connection is one task that owns its socket and selects over: stall changes, incoming
//! frames, its outbound queue and one timer. Owning everything in one task means no locks on
//! the hot path and a single place that decides when and how the connection ends.
//!
//! 0.2 connections frame by hand ([`crate::ws`]) because the real 0.2 server's framing
//! quirks cannot be had from a WebSocket library; 0.1 connections use tungstenite.

use crate::app::{self, reply, Action, AppState};
use crate::codec::{callback_id, snippet, Dialect, Frame, Reply};
use crate::handshake::{self, Io, V02Refusal, MAX_HEAD};
use crate::longpoll::{self, HttpSession};
use crate::server::{CallbackKind, CloseReason, Inner, LogEntry, Out, Received};
use crate::ws;
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// A client that opens TCP but never completes the HTTP upgrade is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the client's side of the close handshake before dropping TCP.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Server callback slots per connection, as on the real 0.2 server: a fifth outstanding
/// callback evicts one of the four.
const CALLBACK_SLOTS: usize = 4;
/// 0.1 (not observed): ids count 1, 2, 3... and up to this many wait at once, the oldest
/// evicted past it, so a client that never answers cannot grow the table forever.
const CALLBACK_SLOTS_V01: usize = 4096;
/// Queued frames written per flush, to batch syscalls under load without starving reads.
const BATCH: usize = 128;
/// The largest frame payload a 0.2 client may send when the config does not say (the limit
/// tungstenite applied before the 0.2 server framed by hand).
const DEFAULT_MAX_FRAME_V02: usize = 16 << 20;
/// How much a 0.2 connection reads at once: what arrives in one read with `/qio/ohai` is
/// thrown away, as on the real server.
const READ_CHUNK: usize = 64 * 1024;

type Step = Result<(), CloseReason>;

/// Runs one accepted TCP connection to its end. Always logs exactly one close (via
/// `remove_conn`, unless something else removed the connection first).
pub(crate) async fn run(
    inner: Arc<Inner>,
    id: u64,
    stream: TcpStream,
    mut rx: mpsc::Receiver<Out>,
) {
    let mut stall = inner.stall_rx();
    let mut closing = inner.closing_rx();
    let start = async {
        // A stalled server does not even answer the HTTP upgrade.
        if stall.wait_for(|s| !*s).await.is_err() {
            return Err(CloseReason::Shutdown);
        }
        let stream = start_tls(&inner, id, stream).await?;
        upgrade(&inner, id, stream).await
    };
    // A shutdown does not wait for upgrades in progress.
    let started = tokio::select! {
        res = start => res,
        _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => Err(CloseReason::Shutdown),
    };
    let transport = match started {
        Ok(Started::Ws(t)) => t,
        Ok(Started::Http(io, buf)) => {
            // A long-poll socket: its requests go to sessions, which are connections of
            // their own.
            let reason = longpoll::serve_socket(inner.clone(), id, io, buf).await;
            inner.remove_conn(id, reason);
            return;
        }
        Err(reason) => {
            inner.remove_conn(id, reason);
            return;
        }
    };
    // 0.1 connections were counted open with their 101, 0.2 ones open with the greeting.
    let mut conn = Conn::new(inner.clone(), id, transport);
    let reason = conn.serve(&mut rx, &mut stall).await;
    // Forget the connection first (counts, subscriptions), then finish the close handshake,
    // which may take a while.
    inner.remove_conn(id, reason.clone());
    drop(rx);
    conn.finish(&reason).await;
}

/// Runs one long-poll session to its end (see [`crate::longpoll`]): the same frame loop as
/// a WebSocket connection, open from the start (the `/qio/hostname` request is its
/// handshake, and there is no greeting).
pub(crate) async fn run_session(
    inner: Arc<Inner>,
    id: u64,
    sid: String,
    session: HttpSession,
    mut rx: mpsc::Receiver<Out>,
) {
    let mut stall = inner.stall_rx();
    inner.mark_opened(id);
    let mut conn = Conn::new(inner.clone(), id, Transport::Http(Box::new(session)));
    let reason = conn.serve(&mut rx, &mut stall).await;
    inner.end_session(&sid);
    inner.remove_conn(id, reason.clone());
    drop(rx);
    conn.finish(&reason).await;
}

/// How an accepted connection goes on after its first request head.
enum Started {
    /// An upgraded WebSocket.
    Ws(Transport),
    /// 0.2: a long-poll socket, with what was read of its first request.
    Http(Io, Vec<u8>),
}

/// How much a 0.1 connection's tungstenite reads at once. tungstenite zero-fills this much
/// of its buffer before every read, also when the read then finds nothing: its default
/// (128 KiB) cost each connection more per event than the event itself. The daemon uses
/// the same size for its upstream connection.
const READ_BUFFER_V01: usize = 32 * 1024;

/// The tungstenite settings: the configured payload limit (tungstenite's defaults when
/// there is none) and a read buffer of [`READ_BUFFER_V01`].
fn ws_config(inner: &Inner) -> Option<WebSocketConfig> {
    let cfg = WebSocketConfig::default().read_buffer_size(READ_BUFFER_V01);
    Some(match inner.cfg.effective_max_frame_bytes() {
        Some(max) => cfg.max_frame_size(Some(max)).max_message_size(Some(max)),
        None => cfg,
    })
}

/// The TLS handshake when the server has an identity; a plain connection otherwise. A
/// failure is logged like a failed upgrade (with no request head: none was readable).
async fn start_tls(inner: &Inner, id: u64, stream: TcpStream) -> Result<Io, CloseReason> {
    let Some(acceptor) = &inner.tls else {
        return Ok(Io::Plain(stream));
    };
    let reason = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => return Ok(Io::Tls(Box::new(tls))),
        Ok(Err(e)) => format!("TLS handshake: {e}"),
        Err(_) => "TLS handshake: timed out".to_owned(),
    };
    inner.push_log(LogEntry::UpgradeRejected {
        conn: id,
        request: String::new(),
        reason: reason.clone(),
    });
    Err(CloseReason::HandshakeFailed(reason))
}

/// The HTTP upgrade, the dialect's way. Failures are logged as [`LogEntry::UpgradeRejected`]
/// and end the connection (0.2 answers some with an HTTP status first).
async fn upgrade(inner: &Inner, id: u64, stream: Io) -> Result<Started, CloseReason> {
    let res = match inner.dialect {
        Dialect::V01 => upgrade_v01(inner, id, stream)
            .await
            .map(|ws| Started::Ws(Transport::Lib(Box::new(ws)))),
        Dialect::V02 => upgrade_v02(inner, id, stream).await,
    };
    res.map_err(|(request, reason)| {
        inner.push_log(LogEntry::UpgradeRejected {
            conn: id,
            request,
            reason: reason.clone(),
        });
        CloseReason::HandshakeFailed(reason)
    })
}

/// 0.2: the upgrade by hand, checked as the real server checks it ([`handshake::check_v02`]):
/// the `quickio` subprotocol is required, refusals are answered `HTTP/1.0 400` or `426`
/// (then the socket is closed), and the 101 carries the real server's headers. Bytes the
/// client sent after the head are kept for the frames.
async fn upgrade_v02(inner: &Inner, id: u64, mut stream: Io) -> Result<Started, (String, String)> {
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_head(&mut stream, &mut buf)).await;
    let end = match read {
        Err(_) => Err("timed out".to_owned()),
        Ok(res) => res,
    }
    .map_err(|reason| (handshake::head_text(&buf), reason))?;
    let request = handshake::head_text(&buf[..end]);
    if longpoll::is_long_poll(&request) {
        return Ok(Started::Http(stream, buf));
    }
    let req = match handshake::check_v02(&request) {
        Ok(req) => req,
        Err(V02Refusal::Drop(reason)) => return Err((request, reason)),
        Err(V02Refusal::Status(status, reason)) => {
            let answer = handshake::refusal_v02(status);
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                stream.write_all(answer.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
            return Err((request, format!("answered {status}: {reason}")));
        }
    };
    let answer = handshake::response_101_v02(&req.key);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.write_all(answer.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err((request, format!("writing the 101: {e}"))),
        Err(_) => return Err((request, "timed out writing the 101".into())),
    }
    inner.push_log(LogEntry::Upgraded {
        conn: id,
        uri: req.uri,
        subprotocol_requested: true,
        request,
    });
    let max = inner
        .cfg
        .effective_max_frame_bytes()
        .unwrap_or(DEFAULT_MAX_FRAME_V02);
    Ok(Started::Ws(Transport::Raw(RawWs {
        io: stream,
        buf: BytesMut::from(&buf[end..]),
        out: BytesMut::new(),
        max,
        client_timeout: inner.cfg.client_timeout,
        partial_since: None,
    })))
}

/// 0.1: the upgrade by hand, because the real 0.1 server matches header names
/// case-sensitively and tungstenite's parser lower-cases them. Reads the raw head (at most
/// [`MAX_HEAD`] bytes, within [`HANDSHAKE_TIMEOUT`]), checks it ([`handshake::check_v01`]) and
/// answers 101 without any subprotocol. Bytes the client sent after the head are kept for the
/// WebSocket.
async fn upgrade_v01(
    inner: &Inner,
    id: u64,
    mut stream: Io,
) -> Result<WebSocketStream<Io>, (String, String)> {
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_head(&mut stream, &mut buf)).await;
    let end = match read {
        Err(_) => Err("timed out".to_owned()),
        Ok(res) => res,
    }
    .map_err(|reason| (handshake::head_text(&buf), reason))?;
    let request = handshake::head_text(&buf[..end]);
    let req = handshake::check_v01(&request).map_err(|reason| (request.clone(), reason))?;
    let answer = handshake::response_101(&req.key);
    // 0.1 is open with the 101: counted open before the client can see it, so a client
    // that got the 101 can rely on the server counting it.
    inner.push_log(LogEntry::Upgraded {
        conn: id,
        uri: req.uri,
        subprotocol_requested: req.subprotocol_requested,
        request: request.clone(),
    });
    inner.mark_opened(id);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.write_all(answer.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err((request, format!("writing the 101: {e}"))),
        Err(_) => return Err((request, "timed out writing the 101".into())),
    }
    let rest = buf.split_off(end);
    Ok(WebSocketStream::from_partially_read(stream, rest, Role::Server, ws_config(inner)).await)
}

/// Reads into `buf` until it holds a complete request head; returns where the head ends.
async fn read_head(stream: &mut Io, buf: &mut Vec<u8>) -> Result<usize, String> {
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = handshake::head_end(buf) {
            if end > MAX_HEAD {
                return Err(format!("request head larger than {MAX_HEAD} bytes"));
            }
            return Ok(end);
        }
        if buf.len() >= MAX_HEAD {
            return Err(format!("request head larger than {MAX_HEAD} bytes"));
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return Err("connection closed before the end of the request head".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    }
}

/// Maps a tungstenite error to a close reason: a vanished peer is not a protocol problem.
fn classify(e: WsError) -> CloseReason {
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match e {
        WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => CloseReason::ClientGone,
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            CloseReason::FrameTooLarge {
                size,
                max: max_size,
            }
        }
        other => CloseReason::Transport(other.to_string()),
    }
}

/// An instant far enough away to mean "never" (tokio timers need a real instant).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

/// `base + d`, saturating to "never" so huge configured durations cannot overflow.
fn after(base: Instant, d: Duration) -> Instant {
    base.checked_add(d).unwrap_or_else(far_future)
}

/// What arrived from the client, whatever the transport.
enum In {
    /// A text frame (0.2: also the first fragment of a fragmented one, FIN being ignored).
    Text(String),
    /// 0.2: a text frame that is not UTF-8.
    BadUtf8,
    /// 0.2: a frame the client did not mask.
    Unmasked,
    Binary,
    Ping,
    Pong,
    /// 0.2: a continuation frame.
    Continuation,
    /// 0.2: an opcode RFC 6455 reserves.
    Reserved(u8),
    /// A close frame and its status code.
    Close(Option<u16>),
}

/// A 0.2 connection's socket with its own framing: what was read and not yet taken as
/// frames, what is to be written.
struct RawWs {
    io: Io,
    buf: BytesMut,
    out: BytesMut,
    max: usize,
    /// How long a frame may stay half sent.
    client_timeout: Duration,
    /// Since when `buf` has held part of a frame (the real server drops a client that does
    /// not finish a frame in time).
    partial_since: Option<Instant>,
}

impl RawWs {
    /// The next frame. Cancel-safe: decoding is synchronous and `read_buf` loses nothing
    /// when cancelled.
    async fn next(&mut self) -> Result<In, CloseReason> {
        loop {
            match ws::decode(&mut self.buf, self.max) {
                Ok(Some(f)) => {
                    self.partial_since = None;
                    return Ok(classify_raw(f));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(CloseReason::FrameTooLarge {
                        size: e.size,
                        max: e.max,
                    })
                }
            }
            if self.buf.is_empty() {
                self.partial_since = None;
            } else if self.partial_since.is_none() {
                self.partial_since = Some(Instant::now());
            }
            self.buf.reserve(READ_CHUNK);
            let read = self.io.read_buf(&mut self.buf);
            let res = match self.partial_since {
                Some(since) => {
                    match tokio::time::timeout_at(after(since, self.client_timeout), read).await {
                        Ok(res) => res,
                        Err(_) => return Err(CloseReason::ClientTimeout),
                    }
                }
                None => read.await,
            };
            match res {
                Ok(0) => return Err(CloseReason::ClientGone),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(CloseReason::ClientGone)
                }
                Err(e) => return Err(CloseReason::Transport(e.to_string())),
            }
        }
    }

    fn feed(&mut self, opcode: u8, payload: &[u8]) {
        ws::encode(&mut self.out, opcode, payload);
    }

    async fn flush(&mut self) -> Step {
        let res = async {
            self.io.write_all(&self.out).await?;
            self.io.flush().await
        }
        .await;
        self.out.clear();
        res.map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                CloseReason::ClientGone
            }
            _ => CloseReason::Transport(e.to_string()),
        })
    }
}

fn classify_raw(f: ws::RawFrame) -> In {
    if !f.masked {
        return In::Unmasked;
    }
    match f.opcode {
        ws::OP_TEXT => match String::from_utf8(f.payload.to_vec()) {
            Ok(s) => In::Text(s),
            Err(_) => In::BadUtf8,
        },
        ws::OP_CONTINUATION => In::Continuation,
        ws::OP_BINARY => In::Binary,
        ws::OP_PING => In::Ping,
        ws::OP_PONG => In::Pong,
        ws::OP_CLOSE => In::Close(ws::close_code(&f.payload)),
        other => In::Reserved(other),
    }
}

/// The connection's socket: tungstenite for 0.1, hand framing for 0.2.
enum Transport {
    Lib(Box<WebSocketStream<Io>>),
    Raw(RawWs),
    /// 0.2 over HTTP long polling: a session, not a socket.
    Http(Box<HttpSession>),
}

impl Transport {
    async fn next(&mut self) -> Result<In, CloseReason> {
        match self {
            Transport::Raw(raw) => raw.next().await,
            Transport::Http(s) => s.next().await.map(In::Text),
            Transport::Lib(ws) => loop {
                return match ws.next().await {
                    None => Err(CloseReason::ClientGone),
                    Some(Err(e)) => Err(classify(e)),
                    Some(Ok(Message::Text(t))) => Ok(In::Text(t.as_str().to_owned())),
                    Some(Ok(Message::Binary(_))) => Ok(In::Binary),
                    Some(Ok(Message::Ping(_))) => Ok(In::Ping),
                    Some(Ok(Message::Pong(_))) => Ok(In::Pong),
                    Some(Ok(Message::Close(f))) => Ok(In::Close(f.map(|f| u16::from(f.code)))),
                    Some(Ok(Message::Frame(_))) => continue,
                };
            },
        }
    }

    async fn feed(&mut self, text: Utf8Bytes) -> Step {
        match self {
            Transport::Raw(raw) => {
                raw.feed(ws::OP_TEXT, text.as_bytes());
                Ok(())
            }
            Transport::Lib(ws) => ws.feed(Message::Text(text)).await.map_err(classify),
            Transport::Http(s) => {
                s.feed(text.as_str());
                Ok(())
            }
        }
    }

    async fn flush(&mut self) -> Step {
        match self {
            Transport::Raw(raw) => raw.flush().await,
            Transport::Lib(ws) => ws.flush().await.map_err(classify),
            Transport::Http(_) => Ok(()),
        }
    }

    /// 0.2: drops whatever was read with the greeting and not yet handled; returns how many
    /// bytes that was.
    fn discard_buffered(&mut self) -> usize {
        match self {
            Transport::Raw(raw) => {
                let n = raw.buf.len();
                raw.buf.clear();
                raw.partial_since = None;
                n
            }
            Transport::Lib(_) | Transport::Http(_) => 0,
        }
    }
}

/// A server-requested callback waiting for the client's answer, in one of the
/// [`CALLBACK_SLOTS`].
#[derive(Debug, Clone)]
struct ServerCb {
    /// 0.2: `(slot << 16) | counter`.
    id: u64,
    kind: CallbackKind,
    /// After this the id is gone (answers get 404); challenges never expire this way (they
    /// have their own drop deadline).
    expires: Instant,
    /// For order: the oldest is evicted when all slots are taken.
    seq: u64,
    /// A client callback to answer once this is answered (`/clienttest/heartbeat-challenge`
    /// answers its caller only when the challenge is answered); 0 for none.
    then_reply: u64,
}

struct Conn {
    inner: Arc<Inner>,
    id: u64,
    dialect: Dialect,
    t: Transport,
    /// The Quick.IO handshake (greeting) is done.
    opened: bool,
    /// When the upgrade finished: 0.2 drops a client whose greeting does not come in time.
    started: Instant,
    last_sent: Instant,
    last_recv: Instant,
    /// The per-connection counter in server callback ids.
    cb_counter: u16,
    cb_seq: u64,
    /// The server callback slots.
    slots: Vec<Option<ServerCb>>,
    /// Unanswered heartbeat challenges -> drop deadline (kept even if the challenge's slot is
    /// evicted: the client can then no longer answer it, and is dropped).
    challenges: HashMap<u64, Instant>,
    app: AppState,
    /// A long-poll session: no heartbeats and no 15-minute challenges (the empty 200 to a
    /// held poll stands in for them), and `/qio/hostname` names the public address.
    http: bool,
}

impl Conn {
    fn new(inner: Arc<Inner>, id: u64, t: Transport) -> Conn {
        let now = Instant::now();
        let dialect = inner.dialect;
        let http = matches!(t, Transport::Http(_));
        Conn {
            inner,
            id,
            dialect,
            t,
            opened: http || dialect.greeting().is_none(),
            started: now,
            last_sent: now,
            last_recv: now,
            cb_counter: 0,
            cb_seq: 0,
            slots: vec![
                None;
                match dialect {
                    Dialect::V01 => CALLBACK_SLOTS_V01,
                    Dialect::V02 => CALLBACK_SLOTS,
                }
            ],
            challenges: HashMap::new(),
            app: AppState::default(),
            http,
        }
    }

    /// The frame loop; returns why the connection must end.
    async fn serve(
        &mut self,
        rx: &mut mpsc::Receiver<Out>,
        stall: &mut watch::Receiver<bool>,
    ) -> CloseReason {
        let sleep = tokio::time::sleep_until(self.next_deadline());
        tokio::pin!(sleep);
        let mut closing = self.inner.closing_rx();
        loop {
            let stalled = *stall.borrow_and_update();
            if stalled {
                let since = Instant::now();
                if stall.wait_for(|s| !*s).await.is_err() {
                    return CloseReason::Shutdown;
                }
                // A hung server's clock does not run for its timers either.
                self.shift_timers(since.elapsed());
                continue;
            }
            sleep.as_mut().reset(self.next_deadline());
            // Biased: a stall takes effect at once, and frames the client already sent are
            // handled before timers fire (e.g. a challenge answer buffered during a stall).
            let step = tokio::select! {
                biased;
                res = stall.changed() => res.map_err(|_| CloseReason::Shutdown),
                _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => {
                    Err(CloseReason::Shutdown)
                }
                msg = self.t.next() => match msg {
                    Ok(msg) => self.on_message(msg).await,
                    Err(reason) => Err(reason),
                },
                out = rx.recv(), if self.opened => self.on_out(out, rx).await,
                () = &mut sleep => self.on_timer().await,
            };
            if let Err(reason) = step {
                return reason;
            }
        }
    }

    fn shift_timers(&mut self, d: Duration) {
        self.started = after(self.started, d);
        self.last_sent = after(self.last_sent, d);
        self.last_recv = after(self.last_recv, d);
        for deadline in self.challenges.values_mut() {
            *deadline = after(*deadline, d);
        }
        for cb in self.slots.iter_mut().flatten() {
            cb.expires = after(cb.expires, d);
        }
        if let Transport::Raw(raw) = &mut self.t {
            if let Some(since) = &mut raw.partial_since {
                *since = after(*since, d);
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let cfg = &self.inner.cfg;
        if !self.opened {
            return after(self.started, cfg.client_timeout);
        }
        let heartbeat = if self.dialect.global_heartbeat() || self.http {
            far_future()
        } else {
            after(self.last_sent, cfg.heartbeat_interval)
        };
        let challenge = match self.challenges.values().min() {
            Some(deadline) => *deadline,
            None if self.dialect.heartbeat_challenges() && !self.http => {
                after(self.last_recv, cfg.challenge_after)
            }
            None => far_future(),
        };
        let expiry = self
            .slots
            .iter()
            .flatten()
            .map(|cb| cb.expires)
            .min()
            .unwrap_or_else(far_future);
        heartbeat.min(challenge).min(expiry)
    }

    /// Frees the slots of server callbacks that expired unanswered.
    fn expire_callbacks(&mut self, now: Instant) {
        for slot in self.slots.iter_mut() {
            if let Some(cb) = slot.as_ref().filter(|cb| cb.expires <= now) {
                self.inner.push_log(LogEntry::CallbackExpired {
                    conn: self.id,
                    cb: cb.id,
                });
                *slot = None;
            }
        }
    }

    async fn on_timer(&mut self) -> Step {
        let now = Instant::now();
        let inner = self.inner.clone();
        let cfg = &inner.cfg;
        if !self.opened {
            if self.dialect.greeting().is_some() && after(self.started, cfg.client_timeout) <= now {
                return Err(CloseReason::ClientTimeout);
            }
            return Ok(());
        }
        if self.challenges.values().any(|d| *d <= now) {
            return Err(CloseReason::ChallengeTimeout);
        }
        self.expire_callbacks(now);
        if self.dialect.heartbeat_challenges()
            && !self.http
            && self.challenges.is_empty()
            && after(self.last_recv, cfg.challenge_after) <= now
        {
            self.perform(vec![Action::Challenge { then_reply: 0 }])
                .await?;
        }
        if !self.dialect.global_heartbeat()
            && !self.http
            && after(self.last_sent, self.inner.cfg.heartbeat_interval) <= now
        {
            let text = self.dialect.encode("/qio/heartbeat", 0, &Value::Null);
            self.send(text.into()).await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, msg: In) -> Step {
        match msg {
            In::Text(text) => {
                self.last_recv = Instant::now();
                self.on_text(&text).await
            }
            // The real servers close on these opcodes; for 0.1, tungstenite has already
            // queued a pong for a ping, but it is never flushed: the connection ends before
            // the next read.
            In::Binary => Err(CloseReason::BinaryFrame),
            In::Ping => Err(CloseReason::PingFrame),
            In::Pong => Err(CloseReason::PongFrame),
            In::Continuation => Err(CloseReason::ContinuationFrame),
            In::Reserved(op) => Err(CloseReason::ReservedOpcode(op)),
            In::Unmasked => Err(CloseReason::UnmaskedFrame),
            In::BadUtf8 => Err(CloseReason::InvalidUtf8),
            In::Close(code) => Err(CloseReason::ClientClose { code }),
        }
    }

    async fn on_text(&mut self, text: &str) -> Step {
        tracing::trace!(conn = self.id, text = %snippet(text, 200), "received");
        if !self.opened {
            if let Some(greeting) = self.dialect.greeting() {
                if text != greeting {
                    return Err(CloseReason::NotGreeting(snippet(text, 64)));
                }
                self.inner.record(Received {
                    conn: self.id,
                    path: greeting.into(),
                    raw_path: greeting.into(),
                    cb: 0,
                    data: Value::Null,
                });
                // Like the real server: whatever came in the same read is thrown away.
                let bytes = self.t.discard_buffered();
                if bytes > 0 {
                    self.inner.push_log(LogEntry::DiscardedWithGreeting {
                        conn: self.id,
                        bytes,
                    });
                }
                // Open before answering, so a client that got the answer can rely on the
                // server counting it as open.
                self.opened = true;
                self.inner.mark_opened(self.id);
                return self.send(Utf8Bytes::from_static(greeting)).await;
            }
        }
        let frame = self
            .dialect
            .parse(text)
            .map_err(|e| CloseReason::Malformed {
                error: e.to_string(),
                text: snippet(text, 64),
            })?;
        self.inner.record(Received {
            conn: self.id,
            path: frame.path.clone(),
            raw_path: frame.raw_path.clone(),
            cb: frame.cb,
            data: frame.data.clone(),
        });
        let actions = self.dispatch(&frame);
        self.perform(actions).await
    }

    /// Routes one event: protocol events here, everything else to the app.
    fn dispatch(&mut self, f: &Frame) -> Vec<Action> {
        let d = self.dialect;
        let path = f.path.as_str();
        if path == d.subscribe_event() {
            return match d.parse_subscription(&f.data) {
                Some((sub, data)) => app::subscribe(
                    &self.inner,
                    self.id,
                    &mut self.app,
                    f.cb,
                    &sub,
                    data.as_ref(),
                ),
                None => vec![reply(f.cb, Reply::error(400, "invalid json ev_path"))],
            };
        }
        if path == d.unsubscribe_event() {
            return match d.parse_unsubscription(&f.data) {
                Some(sub) => app::unsubscribe(&self.inner, self.id, f.cb, &sub),
                None => vec![reply(f.cb, Reply::error(400, "invalid json ev_path"))],
            };
        }
        match path {
            "/qio/ping" => vec![reply(f.cb, Reply::ok(d.ping_answer(&f.data)))],
            "/qio/hostname" if self.http => vec![reply(
                f.cb,
                Reply::ok(Value::String(self.inner.public_address())),
            )],
            "/qio/hostname" if d.has_hostname() => vec![reply(
                f.cb,
                Reply::ok(Value::String(self.inner.addr().to_string())),
            )],
            _ => {
                if let Some(id) = callback_id(path) {
                    return self.resolve(id, f);
                }
                if path == "/qio" || path.starts_with("/qio/") {
                    // Like the real server: 404 with a null err_msg (0.1: qio_error).
                    let not_found = Reply {
                        code: 404,
                        data: Value::Null,
                        err_msg: None,
                    };
                    return vec![reply(f.cb, not_found)];
                }
                app::event(&self.inner, self.id, &mut self.app, f)
            }
        }
    }

    /// Takes server callback `id` out of its slot if it is there and not expired.
    fn take_cb(&mut self, id: u64, now: Instant) -> Option<ServerCb> {
        let slot = self
            .slots
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|cb| cb.id == id))?;
        let cb = slot.take()?;
        if cb.expires <= now {
            self.inner.push_log(LogEntry::CallbackExpired {
                conn: self.id,
                cb: id,
            });
            return None;
        }
        Some(cb)
    }

    /// The client answered server callback `id` with frame `f`.
    fn resolve(&mut self, id: u64, f: &Frame) -> Vec<Action> {
        let Some(cb) = self.take_cb(id, Instant::now()) else {
            self.inner.push_log(LogEntry::UnknownCallback {
                conn: self.id,
                cb: id,
            });
            return vec![reply(f.cb, Reply::error(404, "callback doesn't exist"))];
        };
        let kind = cb.kind;
        if kind == CallbackKind::Challenge {
            self.challenges.remove(&id);
        }
        self.inner.push_log(LogEntry::CallbackAnswered {
            conn: self.id,
            cb: id,
            kind,
            data: f.data.clone(),
        });
        let mut actions = vec![reply(cb.then_reply, Reply::ok(Value::Null))];
        // If the answer itself wants an answer: echo the data; echo answers continue the chain.
        actions.push(Action::Reply {
            cb: f.cb,
            reply: Reply::ok(f.data.clone()),
            chain: (kind == CallbackKind::Echo).then_some(CallbackKind::Echo),
        });
        actions
    }

    /// Allocates a server callback id for `kind` the real 0.2 server's way: the first free
    /// slot (expired ones are free), else the oldest callback is evicted; the id is
    /// `(slot << 16) | counter`, the counter counting up from 1 per connection (never 0).
    /// 0.1 ids simply count up.
    fn request_cb(&mut self, kind: CallbackKind, then_reply: u64) -> u64 {
        let now = Instant::now();
        self.expire_callbacks(now);
        let index = match self.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                let (i, old) = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.as_ref().map(|cb| (i, cb)))
                    .min_by_key(|(_, cb)| cb.seq)
                    .expect("all slots are taken");
                self.inner.push_log(LogEntry::CallbackEvicted {
                    conn: self.id,
                    cb: old.id,
                });
                i
            }
        };
        self.cb_seq += 1;
        self.cb_counter = self.cb_counter.wrapping_add(1).max(1);
        let id = match self.dialect {
            Dialect::V02 => ((index as u64) << 16) | u64::from(self.cb_counter),
            Dialect::V01 => self.cb_seq,
        };
        let expires = if kind == CallbackKind::Challenge {
            let deadline = after(now, self.inner.cfg.challenge_timeout);
            self.challenges.insert(id, deadline);
            self.inner.push_log(LogEntry::ChallengeSent {
                conn: self.id,
                cb: id,
            });
            far_future()
        } else if self.dialect == Dialect::V02 {
            after(now, self.inner.cfg.callback_timeout)
        } else {
            far_future()
        };
        self.slots[index] = Some(ServerCb {
            id,
            kind,
            expires,
            seq: self.cb_seq,
            then_reply,
        });
        id
    }

    async fn perform(&mut self, actions: Vec<Action>) -> Step {
        for action in actions {
            match action {
                Action::Reply { cb, reply, chain } => {
                    if cb == 0 {
                        continue;
                    }
                    let server_cb = chain.map_or(0, |k| self.request_cb(k, 0));
                    let text = self.dialect.encode_reply(cb, server_cb, &reply);
                    self.send(text.into()).await?;
                }
                Action::Send { path, data } => {
                    let text = self.dialect.encode(&path, 0, &data);
                    self.send(text.into()).await?;
                }
                Action::Challenge { then_reply } => {
                    let cb = self.request_cb(CallbackKind::Challenge, then_reply);
                    let text = self.dialect.encode("/qio/heartbeat", cb, &Value::Null);
                    self.send(text.into()).await?;
                }
                Action::Raw(text) => self.send(text.into()).await?,
                Action::Close(reason) => return Err(reason),
            }
        }
        Ok(())
    }

    async fn send(&mut self, text: Utf8Bytes) -> Step {
        let n = text.len();
        self.t.feed(text).await?;
        self.t.flush().await?;
        self.inner.add_bytes_sent(n);
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Writes queued frames, batching whatever else is already queued into one flush.
    async fn on_out(&mut self, first: Option<Out>, rx: &mut mpsc::Receiver<Out>) -> Step {
        // No senders left: the server forgot this connection (it was killed or dropped, and
        // its close is logged already): end without a close frame.
        let Some(first) = first else {
            return Err(CloseReason::Killed);
        };
        let mut next = Some(first);
        let mut bytes = 0;
        let mut count = 0;
        while let Some(out) = next {
            let text = match out {
                Out::Text(text) => text,
                Out::Request { path, data } => {
                    let cb = self.request_cb(CallbackKind::Request, 0);
                    Utf8Bytes::from(self.dialect.encode(&path, cb, &data))
                }
            };
            bytes += text.len();
            self.t.feed(text).await?;
            count += 1;
            next = if count < BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        self.t.flush().await?;
        self.inner.add_bytes_sent(bytes);
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Ends the connection the way the reason calls for. 0.2, as the real server: a close
    /// frame with an empty payload (no status) for `/clienttest/close`, a move and the answer
    /// to a client's close; a coded close frame for protocol errors and shutdown; then the
    /// TCP close (after reading for a moment, so nothing the client still sends turns the
    /// close into a reset). Crashes, vanished clients, oversized frames and challenge or
    /// slow-consumer drops: a bare TCP drop. 0.1 never sends close frames (not even the
    /// reply to the client's close, which tungstenite queued but is never flushed): always a
    /// bare TCP drop.
    async fn finish(self, reason: &CloseReason) {
        let mut raw = match self.t {
            Transport::Raw(raw) => raw,
            Transport::Http(session) => return session.finish(reason),
            Transport::Lib(_) => return,
        };
        let code: Option<(u16, &str)> = match reason {
            CloseReason::ClientClose { .. } | CloseReason::ServerClose | CloseReason::Moved => None,
            CloseReason::Malformed { .. } => Some((1002, "invalid event format")),
            CloseReason::NotGreeting(_) => Some((1002, "invalid handshake")),
            CloseReason::UnmaskedFrame => Some((1002, "client must mask data")),
            CloseReason::PingFrame
            | CloseReason::PongFrame
            | CloseReason::BinaryFrame
            | CloseReason::ContinuationFrame
            | CloseReason::ReservedOpcode(_) => Some((1003, "")),
            CloseReason::InvalidUtf8 => Some((1007, "")),
            CloseReason::ClientTimeout => Some((1008, "client timeout")),
            CloseReason::Shutdown => Some((1001, "")),
            _ => return,
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, async move {
            raw.feed(ws::OP_CLOSE, &ws::close_payload(code));
            if raw.flush().await.is_err() || raw.io.shutdown().await.is_err() {
                return;
            }
            // Read until the client closes its side too.
            let mut sink = [0u8; 4096];
            while let Ok(n) = raw.io.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}
