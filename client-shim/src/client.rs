//! [`Client`] and its [`Builder`].

use crate::actor::{Actor, Link};
use crate::autostart;
use crate::connect;
use crate::shared::{Cmd, Common, Outgoing, Shared, MAILBOX};
use crate::stream::{ConnectionEvents, Subscription};
use crate::types::{ConnectionEvent, Reply};
use crate::Error;
use qio_ipc::clean_path;
use qio_ipc::Op;
use serde_json::Value;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Events buffered per subscription unless the builder says otherwise.
///
/// ```
/// assert_eq!(qio_client::DEFAULT_SUBSCRIPTION_BUFFER, 1024);
/// ```
pub const DEFAULT_SUBSCRIPTION_BUFFER: usize = 1024;

/// A connection to `qiod`, offering the Quick.IO client functions.
///
/// Cheap to clone: clones share one connection, owned by one background task. Every
/// awaited call resolves exactly once: with the daemon's answer, with
/// [`Error::Disconnected`] when the connection to the daemon is lost (at once, not after a
/// reconnect), with [`Error::Timeout`] after the builder's `request_timeout`, or with
/// another local [`Error`]. If the daemon goes away the client reconnects on its own and
/// subscribes again; see [`Client::events`] to follow that.
///
/// ```no_run
/// use qio_client::Client;
/// # async fn demo() -> Result<(), qio_client::Error> {
/// let client = Client::connect().await?;
/// let reply = client.send("/clienttest/echo", "hello").await?;
/// assert_eq!(reply.code, 200);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

/// How to connect: socket, timeouts, buffers and auto-start. From [`Client::builder`].
///
/// ```no_run
/// use qio_client::Client;
/// use std::time::Duration;
/// # async fn demo() -> Result<(), qio_client::Error> {
/// let client = Client::builder()
///     .socket("/tmp/qiod-test/qiod.sock")
///     .request_timeout(Duration::from_secs(5))
///     .auto_start(true)
///     .auto_start_args(["--server", "ws://127.0.0.1:8080/"])
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    socket: Option<PathBuf>,
    request_timeout: Option<Duration>,
    auto_start: bool,
    start: autostart::Options,
    subscription_buffer: usize,
    daemon_user: Option<String>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            daemon_user: None,
            socket: None,
            request_timeout: None,
            auto_start: false,
            start: autostart::Options::default(),
            subscription_buffer: DEFAULT_SUBSCRIPTION_BUFFER,
        }
    }
}

impl Builder {
    /// The daemon's socket. Default: [`qio_platform::paths::default_socket_path`] (`QIOD_SOCKET`,
    /// else `$XDG_RUNTIME_DIR/qiod/qiod.sock`, ...), exactly where the daemon listens by
    /// default.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qio_client::Error> {
    /// let client = qio_client::Client::builder().socket("/run/qiod/qiod.sock").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// The user the daemon runs as, when it is not ours: a user name or a numeric uid.
    /// Default: `QIOD_DAEMON_USER` when set, else only our own uid and root are trusted.
    ///
    /// Clients of the system service (which runs as the user `qiod`) set this to `qiod`:
    /// the client then also accepts a socket folder owned by that user and a daemon
    /// running as it. Anyone else behind the socket fails the connection with
    /// [`Error::Untrusted`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qio_client::Error> {
    /// let client = qio_client::Client::builder()
    ///     .socket("/run/qiod/qiod.sock")
    ///     .daemon_user("qiod")
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn daemon_user(mut self, user: impl Into<String>) -> Self {
        self.daemon_user = Some(user.into());
        self
    }

    /// A bound on every awaited call; past it the call fails with [`Error::Timeout`].
    /// Default: none here, beyond the daemon's own `request_timeout_ms` (30 s), after which
    /// the daemon answers -2.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qio_client::Error> {
    /// let client = qio_client::Client::builder()
    ///     .request_timeout(std::time::Duration::from_secs(2))
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Whether [`Builder::connect`] starts `qiod` when no daemon answers (default: off).
    ///
    /// The start happens under an exclusive lock on `<socket>.lock`, so clients racing
    /// start one daemon; it runs `qiod --socket <socket>` plus
    /// [`Builder::auto_start_args`], detached, with its log in `<socket>.log`, and
    /// `connect` waits up to 5 s for it to answer. Only `connect` starts a daemon: a client
    /// whose daemon goes away later reconnects to whatever daemon comes back, it does not
    /// start one.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qio_client::Error> {
    /// let client = qio_client::Client::builder()
    ///     .auto_start(true)
    ///     .auto_start_args(["--server", "ws://quickio.example:8080/"])
    ///     .connect()
    ///     .await?;
    /// if let Some(pid) = client.started_daemon() {
    ///     eprintln!("started qiod (pid {pid})");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn auto_start(mut self, on: bool) -> Self {
        self.auto_start = on;
        self
    }

    /// The `qiod` to auto-start. Default: `qiod` on `PATH`, else `qiod` beside the current
    /// executable.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qio_client::Error> {
    /// let client = qio_client::Client::builder()
    ///     .auto_start(true)
    ///     .qiod_path("/usr/local/bin/qiod")
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn qiod_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.start.qiod = Some(path.into());
        self
    }

    /// Arguments for an auto-started `qiod`, after `--socket <socket>`; it needs at least
    /// `--server ws://host:port/` unless its configuration file names the servers.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qio_client::Error> {
    /// let client = qio_client::Client::builder()
    ///     .auto_start(true)
    ///     .auto_start_args(["--server", "ws://127.0.0.1:8080/", "--log", "debug"])
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn auto_start_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.start.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// How many events each [`Subscription`] buffers before it drops its oldest (default
    /// [`DEFAULT_SUBSCRIPTION_BUFFER`]; at least 1).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qio_client::Error> {
    /// let client = qio_client::Client::builder().subscription_buffer(64).connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn subscription_buffer(mut self, events: usize) -> Self {
        self.subscription_buffer = events.max(1);
        self
    }

    /// Connects and checks the daemon exactly as [`Builder::connect`] does (no auto-start),
    /// then hands over the socket itself (interprocess's local-socket stream), for a
    /// program that speaks the line protocol directly (`qio raw`). Nothing has been read
    /// or written on it.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qio_client::Error> {
    /// let stream = qio_client::Client::builder().connect_raw().await?;
    /// # drop(stream); Ok(()) }
    /// ```
    pub async fn connect_raw(self) -> Result<crate::LocalStream, Error> {
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(qio_platform::paths::default_socket_path);
        let rules = connect::rules_for(self.daemon_user.as_deref());
        connect::connect_verified(&socket, &rules).await
    }

    /// Connects (starting the daemon first when auto-start is on and none answers) and
    /// waits for the daemon's first line, the upstream state.
    ///
    /// Fails with [`Error::DaemonNotRunning`] when nothing listens on the socket,
    /// [`Error::Untrusted`] when the socket's folder or the process behind it is not
    /// trusted (see the crate docs), [`Error::Connect`] when connecting fails otherwise,
    /// [`Error::AutoStart`] when the daemon could not be started, [`Error::Server`] with
    /// code -3 when the daemon has too many clients. A connection refused because the
    /// daemon's backlog is full is retried for 2 s first.
    ///
    /// ```no_run
    /// # async fn demo() {
    /// match qio_client::Client::builder().connect().await {
    ///     Ok(client) => println!("connected to {}", client.socket().display()),
    ///     Err(e) => eprintln!("{e}"),
    /// }
    /// # }
    /// ```
    pub async fn connect(self) -> Result<Client, Error> {
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(qio_platform::paths::default_socket_path);
        let rules = connect::rules_for(self.daemon_user.as_deref());
        let (stream, started) = match connect::connect_verified(&socket, &rules).await {
            Ok(stream) => (stream, None),
            Err(Error::DaemonNotRunning { .. }) if self.auto_start => {
                let (path, opts) = (socket.clone(), self.start.clone());
                let started =
                    tokio::task::spawn_blocking(move || autostart::ensure_daemon(&path, &opts))
                        .await
                        .map_err(|e| Error::AutoStart {
                            reason: e.to_string(),
                        })??;
                let stream = connect::connect_verified(&socket, &rules).await?;
                (stream, started)
            }
            Err(e) => return Err(e),
        };
        let mut link = Link::new(stream);
        let (state, connecting) = link.first_state().await?;
        let common = Arc::new(Common::new(socket, rules, started, state, connecting));
        let (tx, rx) = mpsc::channel(MAILBOX);
        tokio::spawn(Actor::new(common.clone(), rx, self.subscription_buffer).run(link));
        Ok(Client {
            shared: Arc::new(Shared {
                tx,
                common,
                request_timeout: self.request_timeout,
            }),
        })
    }
}

impl Client {
    /// Connects to the daemon on the default socket ([`qio_platform::paths::default_socket_path`]).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qio_client::Error> {
    /// let client = qio_client::Client::connect().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect() -> Result<Client, Error> {
        Builder::default().connect().await
    }

    /// A builder, to choose the socket, a timeout, auto-start, buffers.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qio_client::Error> {
    /// let client = qio_client::Client::builder().socket("/tmp/qiod-test/qiod.sock").connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Subscribes to `path`; resolves once the server confirmed, or at once while the
    /// daemon is not connected to its server: the daemon then holds the subscription and
    /// makes it when it connects, as it restores subscriptions after a reconnect (events
    /// follow once it is open; a refusal then ends the stream and is reported as an
    /// `Error` event on [`Client::events`]).
    ///
    /// Fails with [`Error::Server`] when the server (or the daemon) refuses, e.g. 404 for
    /// a path nobody serves, 401 when not allowed, -2 when the connected server did not
    /// confirm in time. Several subscriptions to one path share one daemon subscription; dropping the
    /// last one unsubscribes. The path is cleaned ([`clean_path`](crate::clean_path)).
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// let mut sub = client.on("/news").await?;
    /// while let Some(ev) = sub.recv().await {
    ///     println!("{}", ev.data);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn on(&self, path: &str) -> Result<Subscription, Error> {
        self.subscribe(path, None, false).await
    }

    /// Subscribes to `path` with subscription data (the server may require some).
    ///
    /// The data goes with the first subscription to the path; while this client already
    /// holds the path, later data is not sent again. The same data is sent when the client
    /// subscribes again after a daemon restart.
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// let sub = client.on_with_data("/clienttest/on-data", 123987).await?;
    /// # Ok(()) }
    /// ```
    pub async fn on_with_data(
        &self,
        path: &str,
        data: impl Into<Value>,
    ) -> Result<Subscription, Error> {
        self.subscribe(path, Some(data.into()), false).await
    }

    /// Subscribes to `path` for one event: the returned stream yields at most one event,
    /// then ends and gives the subscription back.
    ///
    /// Done by this client over a regular subscription, so a `one` and an `on` on the same
    /// path share it.
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// let first = client.one("/news").await?.recv().await;
    /// # Ok(()) }
    /// ```
    pub async fn one(&self, path: &str) -> Result<Subscription, Error> {
        self.subscribe(path, None, true).await
    }

    async fn subscribe(
        &self,
        path: &str,
        data: Option<Value>,
        once: bool,
    ) -> Result<Subscription, Error> {
        let path = clean_path(path);
        let key = path.clone();
        let parts = self
            .shared
            .call(|reply| Cmd::On {
                path: key,
                data,
                once,
                reply,
            })
            .await?;
        Ok(Subscription::new(
            path,
            parts.ring,
            parts.slot,
            self.shared.clone(),
        ))
    }

    /// Unsubscribes from `path`: every [`Subscription`] of this client on the path ends,
    /// and subscriptions still waiting for their confirmation fail with
    /// [`Error::Unsubscribed`]. While the daemon is away this only ends them locally.
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// client.off("/news").await?;
    /// # Ok(()) }
    /// ```
    pub async fn off(&self, path: &str) -> Result<(), Error> {
        let path = clean_path(path);
        self.shared.call(|reply| Cmd::Off { path, reply }).await
    }

    /// Waits until the daemon's upstream connection is open: at once when it is; while
    /// the daemon says it is making a connection (it has just started, or lost one and is
    /// reconnecting), until that attempt's outcome. Fails with [`Error::Upstream`] and the
    /// daemon's reason when its last attempt failed (the server is unreachable now; the
    /// daemon keeps trying on its own) or the attempt waited for fails, with
    /// [`Error::Disconnected`] while the daemon itself is away, and with
    /// [`Error::Timeout`] past the builder's `request_timeout`.
    ///
    /// [`Client::send`] while not connected is answered -1 at once; a program that starts
    /// with the daemon calls this first.
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// client.wait_open().await?;
    /// let reply = client.send("/app/hello", "hi").await?;
    /// # Ok(()) }
    /// ```
    pub async fn wait_open(&self) -> Result<(), Error> {
        let mut events = self.events();
        let common = &self.shared.common;
        let run = async {
            loop {
                match events.recv().await {
                    Some(ConnectionEvent::Open) => return Ok(()),
                    Some(ConnectionEvent::Close { reason }) if !common.upstream_connecting() => {
                        return Err(Error::Upstream { reason });
                    }
                    Some(ConnectionEvent::Error {
                        op: None,
                        code: qio_ipc::code::DISCONNECTED,
                        err_msg,
                        ..
                    }) => return Err(Error::Upstream { reason: err_msg }),
                    Some(ConnectionEvent::DaemonGone { .. }) => return Err(Error::Disconnected),
                    Some(_) => {}
                    None => return Err(Error::Closed),
                }
            }
        };
        match self.shared.request_timeout {
            Some(after) => tokio::time::timeout(after, run)
                .await
                .unwrap_or(Err(Error::Timeout { after })),
            None => run.await,
        }
    }

    /// Sends an event and waits for the server's answer.
    ///
    /// Returns `Ok(Reply)` whatever the code, also the daemon's own: -1 when its upstream
    /// connection was lost, -2 when the server did not answer within the daemon's
    /// `request_timeout_ms`, -3 when a bound was reached. `Err` only for local failures:
    /// [`Error::Disconnected`] when the connection to the daemon is lost or down,
    /// [`Error::Timeout`] past the builder's `request_timeout`.
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// let reply = client.send("/app/login", serde_json::json!({"user": "ann"})).await?;
    /// match reply.code {
    ///     200 => println!("welcome: {}", reply.data),
    ///     code => eprintln!("refused ({code}): {:?}", reply.err_msg),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn send(&self, path: &str, data: impl Into<Value>) -> Result<Reply, Error> {
        let msg = Outgoing {
            op: Op::Send,
            path: Some(path.to_owned()),
            data: Some(data.into()),
            cb: None,
        };
        let raw = self
            .shared
            .call(|reply| Cmd::Request { msg, reply })
            .await?;
        Ok(Reply::from_raw(raw, &self.shared))
    }

    /// Sends an event without asking for an answer.
    ///
    /// `Ok` means the line is written to the daemon's socket. The daemon sends it upstream,
    /// or queues it while the server is unreachable; what fails later (full offline queue:
    /// code -3; bad path: 400)
    /// arrives as an `Error` event on [`Client::events`]. Fails with
    /// [`Error::Disconnected`] while the daemon is away (this client queues nothing).
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// client.emit("/app/click", serde_json::json!({"x": 10, "y": 20})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn emit(&self, path: &str, data: impl Into<Value>) -> Result<(), Error> {
        let msg = Outgoing {
            op: Op::Send,
            path: Some(path.to_owned()),
            data: Some(data.into()),
            cb: None,
        };
        self.shared.call(|done| Cmd::Forget { msg, done }).await
    }

    /// The daemon's state: the `data` of its `status` reply (upstream state and address,
    /// reconnects, clients, subscriptions with their references, queue, pending requests,
    /// counters; see PROTOCOL.md). A non-200 answer is [`Error::Server`].
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// let st = client.status().await?;
    /// println!("upstream is {}", st["state"]);
    /// # Ok(()) }
    /// ```
    pub async fn status(&self) -> Result<Value, Error> {
        let msg = Outgoing {
            op: Op::Status,
            path: None,
            data: None,
            cb: None,
        };
        let raw = self
            .shared
            .call(|reply| Cmd::Request { msg, reply })
            .await?;
        if raw.code == qio_ipc::code::OK {
            Ok(raw.data)
        } else {
            Err(Error::Server {
                code: raw.code,
                err_msg: raw.err_msg.unwrap_or_default(),
            })
        }
    }

    /// The connection events: the current state first, then `Open`, `Close`, `Error`,
    /// `Lost`, `DaemonGone`, `DaemonBack` as they happen. Each call gives a new stream.
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) {
    /// let mut events = client.events();
    /// tokio::spawn(async move {
    ///     while let Some(ev) = events.recv().await {
    ///         eprintln!("connection: {ev:?}");
    ///     }
    /// });
    /// # }
    /// ```
    pub fn events(&self) -> ConnectionEvents {
        ConnectionEvents::new(&self.shared.common)
    }

    /// Closes the connection for every clone of this client, gracefully: ends every
    /// subscription, stops sending, and waits until the daemon has answered everything
    /// still waiting and closed its side (so `Error` events about earlier
    /// [`Client::emit`]s have arrived on [`Client::events`] streams by then). Later calls
    /// fail with [`Error::Closed`]; the client does not reconnect.
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// client.emit("/app/bye", ()).await?;
    /// client.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close(&self) -> Result<(), Error> {
        match self.shared.call(|done| Cmd::Close { done }).await {
            Err(Error::Closed) => Ok(()),
            other => other,
        }
    }

    /// The socket this client talks to.
    ///
    /// ```no_run
    /// # fn demo(client: qio_client::Client) {
    /// println!("qiod at {}", client.socket().display());
    /// # }
    /// ```
    pub fn socket(&self) -> &Path {
        &self.shared.common.socket
    }

    /// The pid of the daemon [`Builder::connect`] started (auto-start), if it started one.
    ///
    /// ```no_run
    /// # fn demo(client: qio_client::Client) {
    /// assert_eq!(client.started_daemon(), None);
    /// # }
    /// ```
    pub fn started_daemon(&self) -> Option<u32> {
        self.shared.common.started
    }
}
