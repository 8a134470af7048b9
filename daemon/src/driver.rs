//! The driver: the one tokio task that owns the upstream WebSocket.
//!
//! It runs the pure [`Session`] against a real socket and a real (or paused) clock.
//! Everything else talks to it through [`SessionHandle`], whose calls travel over a
//! bounded channel and come back on oneshot channels, so a flood of callers waits
//! instead of growing a queue without limit.
//!
//! The loop never waits on anything but its one `select!`, so neither the server nor the
//! layer above can stop callers or timers:
//! - The WebSocket is split. The reading half is polled in the `select!`, and so is the
//!   writer that owns the writing half (a future, handed to a task of its own only to say
//!   goodbye on a closed connection), fed through a queue bounded in bytes
//!   (`write_queue_bytes`). A write that does not complete within the ping timeout, or a
//!   frame that does not fit in the queue, closes the connection: its server stopped
//!   reading.
//! - Notices go up with `try_send`; those the layer above has no room for are held, in
//!   order, and passed on as room comes (a `reserve` in the `select!`). While any are
//!   held the driver reads nothing from the server, which is the backpressure.
//! - `Driver::act` maps one session [`Output`] to what the driver does with it.

use crate::codec::Dialect;
use crate::longpoll::{LongPoll, LongPollConfig};
use crate::repeats::Repeats;
use crate::session::{
    CbHandle, Event, Outcome, Output, Session, SessionConfig, SessionError, SessionStatus,
    StateChange, Transport,
};
use crate::tls;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError, SubProtocolError};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Connecting = Pin<Box<dyn Future<Output = Result<Opened, ConnectError>> + Send>>;

/// A connection that finished its upgrade (WebSocket) or its handshake (long polling).
enum Opened {
    Ws(Box<Ws>),
    LongPoll(Box<LongPoll>),
}

pub use crate::session::TransportChoice;

/// Why an attempt failed.
struct ConnectError {
    reason: String,
    /// Whether the server had been reached (TCP and TLS), with whether the failure shows
    /// the other dialect.
    upgrade: Option<bool>,
}

/// Settings of the driver around the session's own.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The protocol settings.
    pub session: SessionConfig,
    /// Seed for backoff jitter and server order (fixed in tests, random in production).
    pub seed: u64,
    /// Capacity of the command channel from callers to the driver.
    pub command_capacity: usize,
    /// Capacity of the notice channel from the driver to the layer above. When it is
    /// full the driver stops reading from the server; it holds at most as many notices
    /// again (from commands and timers) before it waits for the layer above.
    pub notice_capacity: usize,
    /// Bytes of frames that may wait to be written to the server; beyond, the connection
    /// is closed as one that stopped reading.
    pub write_queue_bytes: usize,
    /// Largest WebSocket message accepted from the server, in bytes.
    pub max_message_bytes: usize,
    /// A PEM file of CA certificates that `wss://` servers may chain to, trusted in
    /// addition to the built-in web roots (`webpki-roots`). Read once, by [`spawn`].
    pub ca_file: Option<PathBuf>,
    /// The long-poll transport's settings (its `queue_bytes` is `write_queue_bytes`, its
    /// `max_body_bytes` a multiple of `max_message_bytes`).
    pub long_poll: LongPollConfig,
}

impl DriverConfig {
    /// Defaults around a session configuration.
    pub fn new(session: SessionConfig) -> Self {
        DriverConfig {
            session,
            seed: rand::random(),
            command_capacity: 1024,
            notice_capacity: 4096,
            write_queue_bytes: 32 * 1024 * 1024,
            max_message_bytes: 16 * 1024 * 1024,
            ca_file: None,
            long_poll: LongPollConfig::default(),
        }
    }
}

/// What the layer above hears from the session, in order.
#[derive(Debug)]
pub enum Notice {
    /// An event on a subscribed path.
    Event(Event),
    /// The connection's state changed.
    State(StateChange),
    /// An accepted fire-and-forget event was dropped after all; its sender is told.
    Dropped {
        /// The sender's tag given to [`SessionHandle::emit_from`] (the local client id).
        client: u64,
        /// The event's path.
        path: String,
        /// Why, with the code.
        outcome: Outcome,
    },
    /// The answer about a path wanted with [`SessionHandle::want`] (see
    /// [`Output::Subscription`]): on this stream, so it keeps its place among the events.
    Subscription {
        /// The path.
        path: String,
        /// The generation of the want it answers.
        gen: u64,
        /// 200 (active upstream), or the refusal (no longer wanted).
        outcome: Outcome,
    },
}

/// Where an answer goes.
#[derive(Debug)]
enum Reply {
    Plain(oneshot::Sender<Outcome>),
}

enum Command {
    Emit {
        path: String,
        data: Box<RawValue>,
        sender: Option<u64>,
        done: oneshot::Sender<Result<(), SessionError>>,
    },
    Request {
        path: String,
        data: Box<RawValue>,
        reply: Reply,
    },
    Answer {
        handle: CbHandle,
        data: Box<RawValue>,
        reply: Option<Reply>,
        done: oneshot::Sender<Result<(), SessionError>>,
    },
    Want {
        path: String,
        data: Option<Box<RawValue>>,
        gen: u64,
    },
    Unwant {
        path: String,
        gen: u64,
    },
    Status {
        reply: oneshot::Sender<SessionStatus>,
    },
    SetServers {
        servers: Vec<Url>,
    },
}

/// A cheap, cloneable way to talk to the driver task.
///
/// Every call resolves exactly once; when the driver is gone, with the disconnected
/// outcome or error.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

#[cfg(test)]
impl SessionHandle {
    /// A handle with no session behind it: every command finds the channel closed.
    pub(crate) fn detached() -> SessionHandle {
        let (tx, _) = mpsc::channel(1);
        SessionHandle { tx }
    }
}

impl SessionHandle {
    /// Sends an event without a callback (queued while offline).
    pub async fn emit(&self, path: &str, data: Box<RawValue>) -> Result<(), SessionError> {
        self.send_emit(None, path, data).await
    }

    /// [`SessionHandle::emit`] on behalf of local client `client`: should the accepted event
    /// be dropped later, a [`Notice::Dropped`] names that client.
    pub async fn emit_from(
        &self,
        client: u64,
        path: &str,
        data: Box<RawValue>,
    ) -> Result<(), SessionError> {
        self.send_emit(Some(client), path, data).await
    }

    async fn send_emit(
        &self,
        sender: Option<u64>,
        path: &str,
        data: Box<RawValue>,
    ) -> Result<(), SessionError> {
        let (done, rx) = oneshot::channel();
        let cmd = Command::Emit {
            path: path.to_owned(),
            data,
            sender,
            done,
        };
        if self.tx.send(cmd).await.is_err() {
            return Err(SessionError::Stopped);
        }
        rx.await.unwrap_or(Err(SessionError::Stopped))
    }

    /// Sends an event and waits for the server's callback.
    pub async fn request(&self, path: &str, data: Box<RawValue>) -> Outcome {
        self.request_deferred(path, data).await.await
    }

    /// Hands the request to the session (in call order) and returns the wait for its
    /// answer, so a caller can pipeline many requests.
    pub async fn request_deferred(
        &self,
        path: &str,
        data: Box<RawValue>,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Request {
            path: path.to_owned(),
            data,
            reply: Reply::Plain(tx),
        };
        self.deferred(cmd, rx).await
    }

    /// Answers a server's callback request without asking for one back.
    pub async fn answer(&self, handle: CbHandle, data: Box<RawValue>) -> Result<(), SessionError> {
        let (done, rx) = oneshot::channel();
        let cmd = Command::Answer {
            handle,
            data,
            reply: None,
            done,
        };
        if self.tx.send(cmd).await.is_err() {
            return Err(SessionError::Stopped);
        }
        rx.await.unwrap_or(Err(SessionError::Stopped))
    }

    /// Answers a server's callback request; the returned wait ends with the server's
    /// callback to the answer.
    pub async fn answer_deferred(
        &self,
        handle: CbHandle,
        data: Box<RawValue>,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let (done, _) = oneshot::channel();
        let cmd = Command::Answer {
            handle,
            data,
            reply: Some(Reply::Plain(tx)),
            done,
        };
        self.deferred(cmd, rx).await
    }

    /// Wants a path upstream for generation `gen`; see [`Session::want`]. The answer comes
    /// as a [`Notice::Subscription`].
    pub async fn want(&self, path: &str, data: Option<Box<RawValue>>, gen: u64) {
        let cmd = Command::Want {
            path: path.to_owned(),
            data,
            gen,
        };
        let _ = self.tx.send(cmd).await;
    }

    /// Ends generation `gen` of a wanted path; see [`Session::unwant`].
    pub async fn unwant(&self, path: &str, gen: u64) {
        let cmd = Command::Unwant {
            path: path.to_owned(),
            gen,
        };
        let _ = self.tx.send(cmd).await;
    }

    /// Replaces the configured server addresses (a reload); see [`Session::set_servers`].
    pub async fn set_servers(&self, servers: Vec<Url>) {
        let _ = self.tx.send(Command::SetServers { servers }).await;
    }

    /// A snapshot of the session, or `None` when the driver is gone.
    pub async fn status(&self) -> Option<SessionStatus> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Status { reply }).await.ok()?;
        rx.await.ok()
    }

    async fn deferred(
        &self,
        cmd: Command,
        rx: oneshot::Receiver<Outcome>,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let sent = self.tx.send(cmd).await.is_ok();
        async move {
            if !sent {
                return Outcome::disconnected();
            }
            rx.await.unwrap_or_else(|_| Outcome::disconnected())
        }
    }
}

/// Why the driver could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The session settings are unusable.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The TLS settings are unusable (`ca_file`).
    #[error("ca_file: {0}")]
    Tls(#[from] tls::TlsError),
}

/// Starts the driver task; it runs until `shutdown` is cancelled or every handle is
/// dropped, and answers every waiting caller with -1 on its way out.
///
/// Fails when the session settings are unusable or `ca_file` cannot be read or holds no
/// usable certificate; the error names the file.
pub fn spawn(
    cfg: DriverConfig,
    shutdown: CancellationToken,
) -> Result<
    (
        SessionHandle,
        mpsc::Receiver<Notice>,
        tokio::task::JoinHandle<()>,
    ),
    SpawnError,
> {
    let (handle, notices, task) = prepare(cfg, shutdown, None)?;
    Ok((handle, notices, tokio::spawn(task)))
}

/// [`spawn`] without the spawning: the caller runs the returned future as a task of its
/// own (the daemon puts it in its task tracker and watches it).
pub fn prepare(
    cfg: DriverConfig,
    shutdown: CancellationToken,
    states: Option<mpsc::Sender<StateChange>>,
) -> Result<
    (
        SessionHandle,
        mpsc::Receiver<Notice>,
        impl Future<Output = ()> + Send + 'static,
    ),
    SpawnError,
> {
    // A zero capacity would make tokio's channel panic: refuse it with the key's name.
    for (key, v) in [
        ("command_capacity", cfg.command_capacity),
        ("notice_capacity", cfg.notice_capacity),
        ("write_queue_bytes", cfg.write_queue_bytes),
        ("max_message_bytes", cfg.max_message_bytes),
    ] {
        if v == 0 {
            return Err(SpawnError::Session(SessionError::ZeroBound(key)));
        }
    }
    let session = Session::new(cfg.session.clone(), cfg.seed, Instant::now().into_std())?;
    let tls = tls::client_config(cfg.ca_file.as_deref())?;
    if let Some(path) = &cfg.ca_file {
        tracing::info!(
            path = %path.display(),
            "trusting the CA certificates of ca_file besides the built-in roots"
        );
    }
    let (tx, rx) = mpsc::channel(cfg.command_capacity);
    let (notice_tx, notice_rx) = mpsc::channel(cfg.notice_capacity);
    let driver = Driver {
        write_timeout: cfg.session.ping_timeout,
        write_queue_bytes: cfg.write_queue_bytes,
        session,
        connecting: None,
        reader: None,
        writer: None,
        writers: TaskTracker::new(),
        notices: notice_tx,
        states,
        held: VecDeque::new(),
        held_max: cfg.notice_capacity,
        repeats: Repeats::new(LOG_REPEATS_EVERY),
        tls,
        poll: None,
        reached: None,
        long_poll: LongPollConfig {
            queue_bytes: cfg.write_queue_bytes.max(1),
            // One answer carries everything the server gathered while we were between
            // polls: many frames.
            max_body_bytes: cfg.max_message_bytes.saturating_mul(4),
            ..cfg.long_poll.clone()
        },
        // tungstenite zero-fills its whole read buffer before every read (128 KiB by
        // default): 32 KiB took a request's cost from 281 k to 70 k instructions.
        ws_config: WebSocketConfig::default()
            .read_buffer_size(32 * 1024)
            .max_message_size(Some(cfg.max_message_bytes))
            .max_frame_size(Some(cfg.max_message_bytes)),
    };
    Ok((SessionHandle { tx }, notice_rx, driver.run(rx, shutdown)))
}

/// The driver's state. Its loop never awaits anything but its one `select!`: frames go to
/// the connection's writer through a queue bounded in bytes, notices to the layer above
/// through `held` when its channel is full, and everything else is a plain call into the
/// session.
struct Driver {
    session: Session<Reply>,
    /// How long one write to the server may make no progress. A server that stops
    /// reading is as dead as one that answers no ping, so the same limit applies.
    write_timeout: Duration,
    /// Bytes of frames that may wait for the writer.
    write_queue_bytes: usize,
    connecting: Option<Connecting>,
    /// The reading half of the open connection.
    reader: Option<SplitStream<Ws>>,
    /// The writing half, fed by a queue.
    writer: Option<Writer>,
    /// The writers of closed connections saying goodbye; the driver ends only after them.
    writers: TaskTracker,
    notices: mpsc::Sender<Notice>,
    /// Gets a copy of every state change, for the binary's systemd notifications.
    states: Option<mpsc::Sender<StateChange>>,
    /// Notices the layer above has no room for yet, oldest first. While any waits, the
    /// driver reads nothing from the server (that is the backpressure); commands and
    /// timers go on. Commands can make notices too (with the events of a read they keep
    /// one order), so beyond `held_max` the driver takes no more commands: only a layer
    /// above that stopped taking notices altogether gets there, and then the watchdog's
    /// probe (a command) goes unanswered, as it should. Timers always run; their notices
    /// are a few state changes per connection attempt.
    held: VecDeque<Notice>,
    held_max: usize,
    /// Holds back repeated connection log lines (a flapping server).
    repeats: Repeats,
    tls: Arc<rustls::ClientConfig>,
    ws_config: WebSocketConfig,
    /// The open long-poll connection, instead of `reader` and `writer`.
    poll: Option<Box<LongPoll>>,
    /// Told by the attempt in progress when the server answered its TCP (and TLS)
    /// connect, which the session must know to tell network trouble from a broken upgrade.
    reached: Option<oneshot::Receiver<()>>,
    long_poll: LongPollConfig,
}

/// The writer of the open connection: a future the loop polls in its `select!`, so a
/// write costs no hand-off to another thread, and a blocked one holds up nothing else.
struct Writer {
    /// Frames to write, each with its share of the byte bound; the channel itself is
    /// unbounded because `room` bounds it.
    frames: mpsc::UnboundedSender<(Message, OwnedSemaphorePermit)>,
    /// What is left of `write_queue_bytes`.
    room: Arc<Semaphore>,
    /// [`write_loop`]; ends with the reason when a write fails or makes no progress in
    /// time.
    task: Pin<Box<dyn Future<Output = Result<(), String>> + Send>>,
    /// Tells the writer to stop: it then sends what is queued and a close frame, for at
    /// most [`GOODBYE`], as a task of its own.
    goodbye: CancellationToken,
}

/// Most frames taken in one pass of the driver's loop (see `Driver::read_ready`).
const READ_BATCH: usize = 64;

/// How long a closed connection may take to send its last frames and a close frame.
const GOODBYE: Duration = Duration::from_secs(1);

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// What woke the driver's loop.
enum Wake {
    Stop,
    Connected(Box<Result<Opened, ConnectError>>),
    Reached(bool),
    Message(Option<Result<Message, WsError>>),
    Polled(Result<String, String>),
    Command(Option<Command>),
    Timer,
    WriteFailed(String),
    Room(Option<mpsc::OwnedPermit<Notice>>),
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let stopped = shutdown.cancelled();
        tokio::pin!(stopped);
        // One timer for the task's life, moved only when the next deadline comes earlier:
        // registering a fresh one on every pass cost 12% of the daemon's CPU under load. A
        // deadline that moved later just makes it fire early once; then it is re-armed.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed: Option<std::time::Instant> = None;
        loop {
            self.carry_out();
            self.forward_held();
            match (self.session.poll_timeout(), armed) {
                (Some(next), Some(at)) if next >= at => {}
                (Some(next), _) => {
                    timer.as_mut().reset(Instant::from_std(next));
                    armed = Some(next);
                }
                (None, _) => armed = None,
            }
            let reading = self.reader.is_some() && self.held.is_empty();
            let working = self.held.len() < self.held_max;
            // Not biased: a server flooding events must not starve callers, nor callers
            // the server; select! picks fairly among what is ready.
            let wake = tokio::select! {
                _ = &mut stopped => Wake::Stop,
                res = async { self.connecting.as_mut().expect("guarded").await }, if self.connecting.is_some() => {
                    Wake::Connected(Box::new(res))
                }
                res = async { self.reached.as_mut().expect("guarded").await }, if self.reached.is_some() => {
                    Wake::Reached(res.is_ok())
                }
                msg = async { self.reader.as_mut().expect("guarded").next().await }, if reading => {
                    Wake::Message(msg)
                }
                res = async { self.poll.as_mut().expect("guarded").recv().await }, if self.poll.is_some() && self.held.is_empty() => {
                    Wake::Polled(res)
                }
                res = async { self.writer.as_mut().expect("guarded").task.as_mut().await }, if self.writer.is_some() => {
                    Wake::WriteFailed(match res {
                        Ok(()) => "the connection's writer ended".to_owned(),
                        Err(reason) => reason,
                    })
                }
                permit = self.notices.clone().reserve_owned(), if !self.held.is_empty() => {
                    Wake::Room(permit.ok())
                }
                cmd = commands.recv(), if working => Wake::Command(cmd),
                _ = &mut timer, if armed.is_some() => Wake::Timer,
            };
            match wake {
                Wake::Stop | Wake::Command(None) => break,
                Wake::Connected(res) => {
                    self.connecting = None;
                    self.reached = None;
                    match *res {
                        Ok(Opened::Ws(ws)) => {
                            self.open(*ws);
                            self.session.handle_connected(now());
                        }
                        Ok(Opened::LongPoll(poll)) => {
                            self.poll = Some(poll);
                            self.session.handle_connected(now());
                        }
                        Err(ConnectError {
                            reason,
                            upgrade: Some(other_dialect),
                        }) => self
                            .session
                            .handle_upgrade_failed(now(), &reason, other_dialect),
                        Err(ConnectError {
                            reason,
                            upgrade: None,
                        }) => self.session.handle_connect_failed(now(), &reason),
                    }
                }
                Wake::Reached(reached) => {
                    self.reached = None;
                    if reached {
                        self.session.handle_reached();
                    }
                }
                Wake::Message(msg) => {
                    let now = now();
                    self.on_message(now, msg);
                    std::future::poll_fn(|cx| {
                        self.read_ready(now, cx);
                        std::task::Poll::Ready(())
                    })
                    .await;
                }
                Wake::Polled(Ok(text)) => self.session.handle_frame(now(), &text),
                Wake::Polled(Err(reason)) => {
                    self.drop_connection();
                    self.session.handle_closed(now(), &reason);
                }
                Wake::WriteFailed(reason) => {
                    // The writer has ended: there is no goodbye left for it to say.
                    self.writer = None;
                    self.drop_connection();
                    self.session.handle_closed(now(), &reason);
                }
                Wake::Room(Some(permit)) => {
                    if let Some(notice) = self.held.pop_front() {
                        permit.send(notice);
                    }
                }
                // Nobody listens any more: nothing to keep.
                Wake::Room(None) => self.held.clear(),
                Wake::Command(Some(cmd)) => self.on_command(cmd),
                Wake::Timer => {
                    armed = None;
                    self.session.handle_timeout(now());
                }
            }
        }
        self.session.shutdown();
        commands.close();
        while let Ok(cmd) = commands.try_recv() {
            self.on_command(cmd);
        }
        self.carry_out();
        self.drop_connection();
        // The last notices (the session stopped) are worth a short wait for the layer
        // above, which is draining its side; a layer above that takes nothing gets none.
        let notices = self.notices.clone();
        let held = std::mem::take(&mut self.held);
        let last = async move {
            for notice in held {
                if notices.send(notice).await.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(GOODBYE, last).await.is_err() {
            tracing::warn!(
                "the notice loop took no notices for {GOODBYE:?}; dropped the last ones"
            );
        }
        self.writers.close();
        self.writers.wait().await;
    }

    /// Takes the frames that are already read, up to [`READ_BATCH`], in the same pass of
    /// the loop: under a flood, one `select!`, one clock reading and one wake-up of the
    /// notice loop serve many frames instead of one each. The frames go through the
    /// session one at a time as ever, and reading stops when the layer above has no room
    /// or the connection went away. Polled with the loop's own waker (`cx`), as its
    /// `select!` would: a read that finds nothing leaves the wake-up registered.
    fn read_ready(&mut self, now: std::time::Instant, cx: &mut std::task::Context<'_>) {
        for _ in 1..READ_BATCH {
            self.carry_out();
            if !self.held.is_empty() {
                return;
            }
            let Some(reader) = self.reader.as_mut() else {
                return;
            };
            let std::task::Poll::Ready(msg) = reader.poll_next_unpin(cx) else {
                return;
            };
            self.on_message(now, msg);
        }
    }

    fn on_message(&mut self, now: std::time::Instant, msg: Option<Result<Message, WsError>>) {
        match msg {
            Some(Ok(Message::Text(text))) => self.session.handle_frame(now, text.as_str()),
            Some(Ok(Message::Binary(_))) => {
                // Quick.IO never sends binary frames: treat one like any invalid frame.
                self.session.handle_frame(now, "(a binary WebSocket frame)");
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Close(frame))) => {
                self.drop_connection();
                let reason = match frame {
                    Some(f) if !f.reason.is_empty() => {
                        format!("server closed the connection ({}: {})", f.code, f.reason)
                    }
                    Some(f) => format!("server closed the connection ({})", f.code),
                    None => "server closed the connection".to_owned(),
                };
                self.session.handle_closed(now, &reason);
            }
            Some(Err(e)) => {
                self.drop_connection();
                self.session
                    .handle_closed(now, &format!("connection error: {e}"));
            }
            None => {
                self.drop_connection();
                self.session
                    .handle_closed(now, "connection closed without a close frame");
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let now = now();
        match cmd {
            Command::Emit {
                path,
                data,
                sender,
                done,
            } => {
                let _ = done.send(self.session.emit_from(now, &path, &data, sender));
            }
            Command::Request { path, data, reply } => {
                self.session.request(now, &path, &data, reply)
            }
            Command::Answer {
                handle,
                data,
                reply,
                done,
            } => {
                let _ = done.send(self.session.answer(now, handle, &data, reply));
            }
            Command::Want { path, data, gen } => self.session.want(&path, data.as_deref(), gen),
            Command::Unwant { path, gen } => self.session.unwant(&path, gen),
            Command::Status { reply } => {
                let _ = reply.send(self.session.status(now));
            }
            Command::SetServers { servers } => self.session.set_servers(now, servers),
        }
    }

    /// Carries out every instruction the session has; none of them waits.
    fn carry_out(&mut self) {
        while let Some(out) = self.session.poll_output() {
            self.act(out);
        }
    }

    /// Carries out one instruction of the session.
    fn act(&mut self, out: Output<Reply>) {
        match out {
            Output::Connect {
                url,
                dialect,
                transport,
            } => {
                self.drop_connection();
                let (reached, told) = oneshot::channel();
                let attempt = Attempt {
                    url,
                    dialect,
                    config: self.ws_config,
                    tls: self.tls.clone(),
                    long_poll: self.long_poll.clone(),
                    reached: Some(reached),
                };
                self.reached = Some(told);
                self.connecting = Some(Box::pin(attempt.run(transport)));
            }
            Output::Send(text) => self.send(text),
            Output::Close => self.drop_connection(),
            Output::Reply(Reply::Plain(tx), outcome) => {
                let _ = tx.send(outcome);
            }
            Output::Event(ev) => self.notify(Notice::Event(ev)),
            Output::State(state) => {
                log_state(&state, &mut self.repeats);
                if let Some(states) = &self.states {
                    // Offered, never awaited: a watcher that falls behind misses changes.
                    let _ = states.try_send(state.clone());
                }
                self.notify(Notice::State(state))
            }
            Output::Dropped {
                sender,
                path,
                outcome,
            } => self.notify(Notice::Dropped {
                client: sender,
                path,
                outcome,
            }),
            Output::Subscription { path, gen, outcome } => {
                self.notify(Notice::Subscription { path, gen, outcome })
            }
        }
    }

    /// Hands a notice up, or holds it (in order) while the layer above has no room.
    fn notify(&mut self, notice: Notice) {
        if !self.held.is_empty() {
            self.held.push_back(notice);
            return;
        }
        match self.notices.try_send(notice) {
            Ok(()) => {}
            Err(TrySendError::Full(notice)) => self.held.push_back(notice),
            // Nobody listening is fine: a session may run without a layer above (tests).
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Passes on as many held notices as the layer above has room for.
    fn forward_held(&mut self) {
        while let Some(notice) = self.held.pop_front() {
            match self.notices.try_send(notice) {
                Ok(()) => {}
                Err(TrySendError::Full(notice)) => {
                    self.held.push_front(notice);
                    return;
                }
                Err(TrySendError::Closed(_)) => {
                    self.held.clear();
                    return;
                }
            }
        }
    }

    /// Queues a frame for the writer. A frame that does not fit in `write_queue_bytes`
    /// means the server reads far slower than it is written to: the connection is closed
    /// like one whose write made no progress (the session then fails or re-sends what was
    /// in flight, as after any break). One frame larger than the whole bound is let in
    /// when the queue is empty.
    fn send(&mut self, text: String) {
        if let Some(poll) = self.poll.as_mut() {
            if let Err(reason) = poll.send(text) {
                self.drop_connection();
                self.session.handle_closed(now(), &reason);
            }
            return;
        }
        let Some(writer) = self.writer.as_ref() else {
            return;
        };
        let bound = self.write_queue_bytes.min(u32::MAX as usize);
        let share = u32::try_from(text.len().clamp(1, bound)).unwrap_or(u32::MAX);
        match writer.room.clone().try_acquire_many_owned(share) {
            Ok(permit) => {
                // A writer that ended reports why when the loop polls it.
                let _ = writer.frames.send((Message::text(text), permit));
            }
            Err(_) => {
                let reason = format!(
                    "the server stopped reading: more than {} bytes of frames wait to be \
                     written to it (write_queue_bytes)",
                    self.write_queue_bytes
                );
                self.drop_connection();
                self.session.handle_closed(now(), &reason);
            }
        }
    }

    /// Takes a fresh connection: both halves stay with the loop, the writing half inside
    /// its writer.
    fn open(&mut self, ws: Ws) {
        let (sink, stream) = ws.split();
        let (frames, queue) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(
            self.write_queue_bytes.min(Semaphore::MAX_PERMITS),
        ));
        let goodbye = CancellationToken::new();
        let task = Box::pin(write_loop(sink, queue, self.write_timeout, goodbye.clone()));
        self.reader = Some(stream);
        self.writer = Some(Writer {
            frames,
            room,
            task,
            goodbye,
        });
    }

    fn drop_connection(&mut self) {
        self.connecting = None;
        self.reached = None;
        self.reader = None;
        // Closes every socket, the held poll's too, and makes sure the session on the server
        // ends (in a task of its own, bounded like a WebSocket's goodbye).
        if let Some(bye) = self.poll.take().and_then(|poll| poll.goodbye()) {
            self.writers.spawn(async move {
                let _ = tokio::time::timeout(GOODBYE, bye).await;
            });
        }
        if let Some(writer) = self.writer.take() {
            // Say goodbye politely without holding up the loop on a stalled server: the
            // writer finishes in a task of its own.
            writer.goodbye.cancel();
            drop(writer.frames);
            self.writers.spawn(async move {
                let _ = writer.task.await;
            });
        }
    }
}

/// The writer of one connection: writes queued frames in order, a burst fed as one batch
/// and flushed once, until `goodbye` (or until the queue's sender is gone); then sends what is still queued and a close frame,
/// for at most [`GOODBYE`]. Ends early, with the reason, when a write fails or makes no
/// progress for `limit`.
async fn write_loop(
    mut sink: SplitSink<Ws, Message>,
    mut queue: mpsc::UnboundedReceiver<(Message, OwnedSemaphorePermit)>,
    limit: Duration,
    goodbye: CancellationToken,
) -> Result<(), String> {
    let pump = async {
        while let Some((frame, room)) = queue.recv().await {
            within(limit, sink.feed(frame)).await?;
            drop(room);
            while let Ok((frame, room)) = queue.try_recv() {
                within(limit, sink.feed(frame)).await?;
                drop(room);
            }
            within(limit, sink.flush()).await?;
        }
        Ok(())
    };
    let result = tokio::select! {
        res = pump => res,
        _ = goodbye.cancelled() => Ok(()),
    };
    if result.is_ok() {
        let last = async {
            queue.close();
            while let Some((frame, _)) = queue.recv().await {
                sink.feed(frame).await?;
            }
            sink.close().await
        };
        let _ = tokio::time::timeout(GOODBYE, last).await;
    }
    result
}

/// Runs one write with a deadline, turning both failure kinds into a close reason.
async fn within<E: std::fmt::Display>(
    limit: Duration,
    write: impl Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("sending failed: {e}")),
        Err(_) => Err(format!(
            "the server stopped reading: a write did not complete within {limit:?}"
        )),
    }
}

/// A line of each kind at most this often; the next says how many were held back.
const LOG_REPEATS_EVERY: Duration = Duration::from_secs(60);

fn log_state(state: &StateChange, repeats: &mut Repeats) {
    // The key leaves out what varies between identical events (the jittered delay). The
    // lines an operator looks for, open and stopped, are never held back.
    let key = match state {
        StateChange::Reconnecting { .. } => "reconnecting".to_owned(),
        StateChange::Open { .. } | StateChange::Stopped => String::new(),
        other => format!("{other:?}"),
    };
    let held = match state {
        StateChange::Open { .. } | StateChange::Stopped => 0,
        _ => match repeats.check(&key, now()) {
            Some(held) => held,
            None => return,
        },
    };
    let more = match held {
        0 => String::new(),
        n => format!(" (and {n} more like this, not logged, since the last one)"),
    };
    match state {
        StateChange::Connecting { url } => tracing::info!(%url, "connecting{more}"),
        StateChange::Open { url } => tracing::info!(%url, "open{more}"),
        StateChange::ConnectFailed { url, reason } => {
            tracing::warn!(%url, "connection attempt failed: {reason}{more}")
        }
        StateChange::Closed { reason } => tracing::warn!("connection closed: {reason}{more}"),
        StateChange::Moved { from, to } => {
            tracing::info!(%from, %to, "moved by the server{more}")
        }
        StateChange::Reconnecting { after } => {
            tracing::info!("reconnecting in {after:.1?}{more}")
        }
        StateChange::Stopped => tracing::info!("session stopped"),
    }
}

/// One connection attempt, carried out off the loop (a future the loop polls). Which
/// transport to use, and whether to fall back, is the session's decision.
struct Attempt {
    url: Url,
    dialect: Dialect,
    config: WebSocketConfig,
    tls: Arc<rustls::ClientConfig>,
    long_poll: LongPollConfig,
    /// Told when the TCP (and TLS) connect succeeded.
    reached: Option<oneshot::Sender<()>>,
}

impl Attempt {
    /// Network trouble (DNS, a refused or unreachable connect, TLS) ends the attempt as
    /// not reached; any failure after it as a failed upgrade.
    async fn run(mut self, transport: Transport) -> Result<Opened, ConnectError> {
        if transport == Transport::LongPoll {
            let url = crate::longpoll::http_url(&self.url);
            return match crate::longpoll::connect(&url, self.tls.clone(), self.long_poll.clone())
                .await
            {
                Ok(poll) => Ok(Opened::LongPoll(Box::new(poll))),
                Err(reason) => Err(ConnectError {
                    reason,
                    upgrade: None,
                }),
            };
        }
        let stream = self.transport_connect().await?;
        if let Some(reached) = self.reached.take() {
            let _ = reached.send(());
        }
        self.upgrade(stream)
            .await
            .map(|ws| Opened::Ws(Box::new(ws)))
            .map_err(|e| {
                // A 0.1 server never echoes the subprotocol that 0.2 asks for, and a 0.2
                // server always does; 0.1 asks for none, so any subprotocol shows 0.2.
                let other_dialect = match self.dialect {
                    Dialect::V02 => matches!(
                        e,
                        WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(
                            SubProtocolError::NoSubProtocol
                        ))
                    ),
                    Dialect::V01 => matches!(
                        e,
                        WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(_))
                    ),
                };
                ConnectError {
                    reason: e.to_string(),
                    upgrade: Some(other_dialect),
                }
            })
    }

    /// The TCP connect and, for `wss://`, the TLS handshake, with the same verification as
    /// always ([`tls::client_config`]).
    async fn transport_connect(&self) -> Result<MaybeTlsStream<TcpStream>, ConnectError> {
        let fail = |reason: String| ConnectError {
            reason,
            upgrade: None,
        };
        let host = self
            .url
            .host_str()
            .ok_or_else(|| fail(format!("bad address {}: no host", self.url)))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = self
            .url
            .port_or_known_default()
            .ok_or_else(|| fail(format!("bad address {}: no port", self.url)))?;
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| fail(format!("IO error: {e}")))?;
        let _ = tcp.set_nodelay(true);
        if self.url.scheme() != "wss" {
            return Ok(MaybeTlsStream::Plain(tcp));
        }
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| fail(format!("bad address {}: {e}", self.url)))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS error: {e}")))?;
        Ok(MaybeTlsStream::Rustls(tls))
    }

    /// The upgrade; 0.2 asks for the `quickio` subprotocol, 0.1 must not (a 0.1 server
    /// never echoes one, and the upgrade would then fail).
    ///
    /// tungstenite writes the canonical header spellings (`Host`, `Connection`, `Upgrade`,
    /// `Sec-WebSocket-Version`, `Sec-WebSocket-Key`) that the 0.1 server insists on; the
    /// end-to-end tests check the exact bytes.
    async fn upgrade(&self, stream: MaybeTlsStream<TcpStream>) -> Result<Ws, WsError> {
        let mut request = self.url.as_str().into_client_request()?;
        if self.dialect == Dialect::V02 {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static("quickio"),
            );
        }
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(self.config)).await?;
        Ok(ws)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_zero_capacity_is_refused_with_its_name_not_a_panic() {
        let url = Url::parse("ws://127.0.0.1:9/").unwrap();
        for key in ["command_capacity", "notice_capacity", "write_queue_bytes"] {
            let mut cfg = DriverConfig::new(SessionConfig::new(vec![url.clone()]));
            match key {
                "command_capacity" => cfg.command_capacity = 0,
                "notice_capacity" => cfg.notice_capacity = 0,
                _ => cfg.write_queue_bytes = 0,
            }
            let Err(err) = prepare(cfg, CancellationToken::new(), None) else {
                panic!("{key} = 0 was accepted");
            };
            assert_eq!(err.to_string(), format!("{key} must be at least 1"));
        }
    }

    #[tokio::test]
    async fn an_unusable_ca_file_is_refused_naming_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let mut cfg = DriverConfig::new(SessionConfig::new(vec![
            Url::parse("wss://127.0.0.1:9/").unwrap()
        ]));
        cfg.ca_file = Some(missing.clone());
        let Err(err) = prepare(cfg, CancellationToken::new(), None) else {
            panic!("a missing ca_file was accepted");
        };
        let msg = err.to_string();
        assert!(msg.starts_with("ca_file: cannot read "), "{msg}");
        assert!(msg.contains(missing.to_str().unwrap()), "{msg}");
    }
}
