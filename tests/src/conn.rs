//! One client connection: WebSocket upgrade, Quick.IO greeting, the frame loop, protocol
//! events (`/qio/*`), server-requested callbacks, heartbeats and challenges. (The 0.1
//! heartbeat is one server-wide timer, in `server`.)
//!
//! Each connection is one task that owns its socket and selects over: stall changes, incoming
//! frames, its outbound queue and one timer. Owning everything in one task means no locks on
//! the hot path and a single place that decides when and how the connection ends.

use crate::app::{self, reply, Action, AppState};
use crate::codec::{callback_id, snippet, Dialect, Frame, Reply};
use crate::handshake::{self, Io, Tap, MAX_HEAD};
use crate::server::{CallbackKind, CloseReason, Inner, LogEntry, Out, Received};
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
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<Tap>;

/// A client that opens TCP but never completes the HTTP upgrade is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the client's side of the close handshake before dropping TCP.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// At most this many echo/request callbacks wait for answers per connection; past it, answers
/// stop requesting callbacks, so a client that never answers cannot grow the table forever.
const MAX_PENDING_CALLBACKS: usize = 4096;
/// Queued frames written per flush, to batch syscalls under load without starving reads.
const BATCH: usize = 128;

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
    // A stalled server does not even answer the HTTP upgrade.
    if stall.wait_for(|s| !*s).await.is_err() {
        inner.remove_conn(id, CloseReason::Shutdown);
        return;
    }
    let stream = match start_tls(&inner, id, stream).await {
        Ok(stream) => stream,
        Err(reason) => {
            inner.remove_conn(id, reason);
            return;
        }
    };
    let ws = match upgrade(&inner, id, stream).await {
        Ok(ws) => ws,
        Err(reason) => {
            inner.remove_conn(id, reason);
            return;
        }
    };
    let mut conn = Conn::new(inner.clone(), id, ws);
    if conn.opened {
        inner.mark_opened(id);
    }
    let reason = conn.serve(&mut rx, &mut stall).await;
    // Forget the connection first (counts, subscriptions), then finish the close handshake,
    // which may take a while.
    inner.remove_conn(id, reason.clone());
    drop(rx);
    conn.finish(&reason).await;
}

/// The tungstenite settings for the configured payload limit; `None` keeps tungstenite's
/// defaults.
fn ws_config(inner: &Inner) -> Option<WebSocketConfig> {
    inner.cfg.effective_max_frame_bytes().map(|max| {
        WebSocketConfig::default()
            .max_frame_size(Some(max))
            .max_message_size(Some(max))
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
/// and end the connection with a bare TCP close.
async fn upgrade(inner: &Inner, id: u64, stream: Io) -> Result<Ws, CloseReason> {
    let res = match inner.dialect {
        Dialect::V01 => upgrade_v01(inner, id, stream).await,
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

/// 0.2: tungstenite's server handshake; echoes the subprotocol when the client requests it.
/// The socket is tapped to log the raw request head.
async fn upgrade_v02(inner: &Inner, id: u64, stream: Io) -> Result<Ws, (String, String)> {
    let subprotocol = inner.dialect.subprotocol();
    let mut seen: Option<(String, bool)> = None;
    // The callback's signature (and its large error type) is tungstenite's, not ours.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let requested = subprotocol.is_some_and(|want| {
            req.headers()
                .get_all(SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|p| p.trim() == want)
        });
        if let (true, Some(want)) = (requested, subprotocol) {
            resp.headers_mut()
                .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(want));
        }
        seen = Some((req.uri().to_string(), requested));
        Ok(resp)
    };
    let (tap, recording) = Tap::recording(stream);
    let res = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_hdr_async_with_config(tap, callback, ws_config(inner)),
    )
    .await;
    let request = handshake::head_text(&recording.lock().unwrap_or_else(|e| e.into_inner()));
    match res {
        Err(_) => Err((request, "timed out".into())),
        Ok(Err(e)) => Err((request, e.to_string())),
        Ok(Ok(mut ws)) => {
            ws.get_mut().stop_recording();
            let (uri, subprotocol_requested) = seen.unwrap_or_default();
            inner.push_log(LogEntry::Upgraded {
                conn: id,
                uri,
                subprotocol_requested,
                request,
            });
            Ok(ws)
        }
    }
}

/// 0.1: the upgrade by hand, because the real 0.1 server matches header names
/// case-sensitively and tungstenite's parser lower-cases them. Reads the raw head (at most
/// [`MAX_HEAD`] bytes, within [`HANDSHAKE_TIMEOUT`]), checks it ([`handshake::check_v01`]) and
/// answers 101 without any subprotocol. Bytes the client sent after the head are kept for the
/// WebSocket.
async fn upgrade_v01(inner: &Inner, id: u64, mut stream: Io) -> Result<Ws, (String, String)> {
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
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.write_all(answer.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err((request, format!("writing the 101: {e}"))),
        Err(_) => return Err((request, "timed out writing the 101".into())),
    }
    inner.push_log(LogEntry::Upgraded {
        conn: id,
        uri: req.uri,
        subprotocol_requested: req.subprotocol_requested,
        request,
    });
    let rest = buf.split_off(end);
    Ok(
        WebSocketStream::from_partially_read(
            Tap::new(stream),
            rest,
            Role::Server,
            ws_config(inner),
        )
        .await,
    )
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

struct Conn {
    inner: Arc<Inner>,
    id: u64,
    dialect: Dialect,
    ws: Ws,
    /// The Quick.IO handshake (greeting) is done.
    opened: bool,
    last_sent: Instant,
    last_recv: Instant,
    /// Next server-requested callback id; ids count up from 1 per connection.
    next_cb: u64,
    /// Echo/request callbacks waiting for the client's answer.
    pending: HashMap<u64, CallbackKind>,
    /// Unanswered heartbeat challenges -> drop deadline.
    challenges: HashMap<u64, Instant>,
    app: AppState,
}

impl Conn {
    fn new(inner: Arc<Inner>, id: u64, ws: Ws) -> Conn {
        let now = Instant::now();
        let dialect = inner.dialect;
        Conn {
            inner,
            id,
            dialect,
            ws,
            opened: dialect.greeting().is_none(),
            last_sent: now,
            last_recv: now,
            next_cb: 1,
            pending: HashMap::new(),
            challenges: HashMap::new(),
            app: AppState::default(),
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
                msg = self.ws.next() => self.on_message(msg).await,
                out = rx.recv(), if self.opened => self.on_out(out, rx).await,
                () = &mut sleep => self.on_timer().await,
            };
            if let Err(reason) = step {
                return reason;
            }
        }
    }

    fn shift_timers(&mut self, d: Duration) {
        self.last_sent = after(self.last_sent, d);
        self.last_recv = after(self.last_recv, d);
        for deadline in self.challenges.values_mut() {
            *deadline = after(*deadline, d);
        }
    }

    fn next_deadline(&self) -> Instant {
        if !self.opened {
            return far_future();
        }
        let cfg = &self.inner.cfg;
        let heartbeat = if self.dialect.global_heartbeat() {
            far_future()
        } else {
            after(self.last_sent, cfg.heartbeat_interval)
        };
        let challenge = match self.challenges.values().min() {
            Some(deadline) => *deadline,
            None if self.dialect.heartbeat_challenges() => {
                after(self.last_recv, cfg.challenge_after)
            }
            None => far_future(),
        };
        heartbeat.min(challenge)
    }

    async fn on_timer(&mut self) -> Step {
        if !self.opened {
            return Ok(());
        }
        let now = Instant::now();
        if self.challenges.values().any(|d| *d <= now) {
            return Err(CloseReason::ChallengeTimeout);
        }
        let cfg = &self.inner.cfg;
        if self.dialect.heartbeat_challenges()
            && self.challenges.is_empty()
            && after(self.last_recv, cfg.challenge_after) <= now
        {
            self.perform(vec![Action::Send {
                path: "/qio/heartbeat".into(),
                data: Value::Null,
                request: Some(CallbackKind::Challenge),
            }])
            .await?;
        }
        if !self.dialect.global_heartbeat()
            && after(self.last_sent, self.inner.cfg.heartbeat_interval) <= now
        {
            let text = self.dialect.encode("/qio/heartbeat", 0, &Value::Null);
            self.send(text.into()).await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, msg: Option<Result<Message, WsError>>) -> Step {
        match msg {
            None => Err(CloseReason::ClientGone),
            Some(Err(e)) => Err(classify(e)),
            Some(Ok(Message::Text(text))) => {
                self.last_recv = Instant::now();
                self.on_text(text.as_str()).await
            }
            // The real servers close on these opcodes; tungstenite has already queued a pong
            // for a ping, but it is never flushed: the connection ends before the next read.
            Some(Ok(Message::Binary(_))) => Err(CloseReason::BinaryFrame),
            Some(Ok(Message::Ping(_))) => Err(CloseReason::PingFrame),
            Some(Ok(Message::Pong(_))) => Err(CloseReason::PongFrame),
            Some(Ok(Message::Close(frame))) => Err(CloseReason::ClientClose {
                code: frame.map(|f| u16::from(f.code)),
            }),
            Some(Ok(Message::Frame(_))) => Ok(()),
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
                None => vec![reply(f.cb, Reply::error(400, "invalid subscription"))],
            };
        }
        if path == d.unsubscribe_event() {
            return match d.parse_unsubscription(&f.data) {
                Some(sub) => app::unsubscribe(&self.inner, self.id, f.cb, &sub),
                None => vec![reply(f.cb, Reply::error(400, "invalid subscription"))],
            };
        }
        match path {
            "/qio/ping" => vec![reply(f.cb, Reply::ok(d.ping_answer(&f.data)))],
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

    /// The client answered server callback `id` with frame `f`.
    fn resolve(&mut self, id: u64, f: &Frame) -> Vec<Action> {
        let kind = match self.challenges.remove(&id) {
            Some(_) => Some(CallbackKind::Challenge),
            None => self.pending.remove(&id),
        };
        let Some(kind) = kind else {
            self.inner.push_log(LogEntry::UnknownCallback {
                conn: self.id,
                cb: id,
            });
            return vec![reply(f.cb, Reply::error(404, "unknown callback"))];
        };
        self.inner.push_log(LogEntry::CallbackAnswered {
            conn: self.id,
            cb: id,
            kind,
            data: f.data.clone(),
        });
        // If the answer itself wants an answer: echo the data; echo answers continue the chain.
        vec![Action::Reply {
            cb: f.cb,
            reply: Reply::ok(f.data.clone()),
            chain: (kind == CallbackKind::Echo).then_some(CallbackKind::Echo),
        }]
    }

    /// Allocates a server callback id for `kind`; 0 (no callback) if the table is full.
    fn request_cb(&mut self, kind: CallbackKind) -> u64 {
        if kind != CallbackKind::Challenge && self.pending.len() >= MAX_PENDING_CALLBACKS {
            return 0;
        }
        let cb = self.next_cb;
        self.next_cb += 1;
        if kind == CallbackKind::Challenge {
            let deadline = after(Instant::now(), self.inner.cfg.challenge_timeout);
            self.challenges.insert(cb, deadline);
            self.inner
                .push_log(LogEntry::ChallengeSent { conn: self.id, cb });
        } else {
            self.pending.insert(cb, kind);
        }
        cb
    }

    async fn perform(&mut self, actions: Vec<Action>) -> Step {
        for action in actions {
            match action {
                Action::Reply { cb, reply, chain } => {
                    if cb == 0 {
                        continue;
                    }
                    let server_cb = chain.map_or(0, |k| self.request_cb(k));
                    let text = self.dialect.encode_reply(cb, server_cb, &reply);
                    self.send(text.into()).await?;
                }
                Action::Send {
                    path,
                    data,
                    request,
                } => {
                    let server_cb = request.map_or(0, |k| self.request_cb(k));
                    let text = self.dialect.encode(&path, server_cb, &data);
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
        self.ws.send(Message::Text(text)).await.map_err(classify)?;
        self.inner.add_bytes_sent(n);
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Writes queued frames, batching whatever else is already queued into one flush.
    async fn on_out(&mut self, first: Option<Out>, rx: &mut mpsc::Receiver<Out>) -> Step {
        // No senders left: the server forgot this connection (shutdown).
        let Some(first) = first else {
            return Err(CloseReason::Shutdown);
        };
        let mut next = Some(first);
        let mut bytes = 0;
        let mut count = 0;
        while let Some(out) = next {
            let text = match out {
                Out::Text(text) => text,
                Out::Request { path, data } => {
                    let cb = self.request_cb(CallbackKind::Request);
                    Utf8Bytes::from(self.dialect.encode(&path, cb, &data))
                }
            };
            bytes += text.len();
            self.ws.feed(Message::Text(text)).await.map_err(classify)?;
            count += 1;
            next = if count < BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        self.ws.flush().await.map_err(classify)?;
        self.inner.add_bytes_sent(bytes);
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Ends the connection the way the reason calls for. 0.2: a close frame for
    /// server-initiated and protocol closes, the close reply for a client close, a bare TCP
    /// drop otherwise. 0.1 never sends close frames (not even the reply to the client's close,
    /// which tungstenite queued but is never flushed): always a bare TCP drop.
    async fn finish(mut self, reason: &CloseReason) {
        if !self.dialect.close_frames() {
            return;
        }
        let frame = match reason {
            CloseReason::ClientClose { .. } => None,
            CloseReason::ServerClose | CloseReason::Moved => Some((CloseCode::Normal, "bye")),
            CloseReason::Malformed { .. } | CloseReason::NotGreeting(_) => {
                Some((CloseCode::Protocol, "invalid frame"))
            }
            CloseReason::PingFrame | CloseReason::PongFrame | CloseReason::BinaryFrame => {
                Some((CloseCode::Unsupported, "unsupported opcode"))
            }
            _ => return,
        };
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(CLOSE_GRACE, async move {
            if let Some((code, why)) = frame {
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(why),
                };
                if ws.close(Some(frame)).await.is_err() {
                    return;
                }
            }
            // Reading flushes our close (or the reply to theirs) and waits for the peer's.
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}
