//! What calls return and streams yield: events, replies, callback handles, connection events.

use crate::shared::{Cmd, Outgoing, RawEvent, RawReply, Shared};
use crate::Error;
use qio_ipc::Op;
use serde_json::Value;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// An event from the server on a path this client subscribed to.
///
/// When the server asked for an answer, [`Event::cb`] holds the handle to answer with
/// ([`Event::answer`]); answering is polite, not required.
///
/// ```no_run
/// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
/// let mut questions = client.on("/ask").await?;
/// while let Some(mut ev) = questions.recv().await {
///     if ev.cb.is_some() {
///         ev.answer(serde_json::json!({"answer": 42})).await?;
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Event {
    /// The event's path, cleaned (see [`clean_path`](crate::clean_path)).
    pub path: String,
    /// The event's data (`null` when it had none).
    pub data: Value,
    /// The handle to answer with, when the server asked for an answer.
    pub cb: Option<Handle>,
}

impl Event {
    pub(crate) fn from_raw(raw: RawEvent, shared: &Arc<Shared>) -> Event {
        Event {
            path: raw.path.to_string(),
            data: raw.data,
            cb: raw.cb.map(|cb| Handle::new(cb, raw.generation, shared)),
        }
    }

    /// Answers the server's request (fire-and-forget, like [`Client::emit`](crate::Client::emit));
    /// takes the handle, so a second call fails with [`Error::NoHandle`].
    ///
    /// ```no_run
    /// # async fn demo(mut ev: qio_client::Event) -> Result<(), qio_client::Error> {
    /// ev.answer("yes").await?;
    /// # Ok(()) }
    /// ```
    pub async fn answer(&mut self, data: impl Into<Value>) -> Result<(), Error> {
        self.cb.take().ok_or(Error::NoHandle)?.answer(data).await
    }

    /// Answers the server's request and waits for the server's answer to that.
    ///
    /// ```no_run
    /// # async fn demo(mut ev: qio_client::Event) -> Result<(), qio_client::Error> {
    /// let reply = ev.answer_and_wait("yes").await?;
    /// println!("the server says {} {}", reply.code, reply.data);
    /// # Ok(()) }
    /// ```
    pub async fn answer_and_wait(&mut self, data: impl Into<Value>) -> Result<Reply, Error> {
        self.cb
            .take()
            .ok_or(Error::NoHandle)?
            .answer_and_wait(data)
            .await
    }
}

/// The answer to a request ([`Client::send`](crate::Client::send),
/// [`Handle::answer_and_wait`]), whatever its code.
///
/// `code` is 200 on success; other codes come from the server (400, 401, 404, 420, 500,
/// ...) or from the daemon (negative: -1 the upstream connection was lost, -2 the daemon's
/// request timeout, -3 a bound was reached); see [`qio_ipc::code`].
///
/// ```no_run
/// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
/// let mut reply = client.send("/clienttest/echo", "ping").await?;
/// if reply.is_ok() && reply.handle.is_some() {
///     // The server asked for an answer to its answer.
///     reply.answer("pong").await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Reply {
    /// The code: 200 on success; see [`qio_ipc::code`].
    pub code: i64,
    /// The data.
    pub data: Value,
    /// The explanation, on errors.
    pub err_msg: Option<String>,
    /// The handle to answer with, when the server asked for an answer to its answer.
    pub handle: Option<Handle>,
}

impl Reply {
    pub(crate) fn from_raw(raw: RawReply, shared: &Arc<Shared>) -> Reply {
        Reply {
            code: raw.code,
            data: raw.data,
            err_msg: raw.err_msg,
            handle: raw.cb.map(|cb| Handle::new(cb, raw.generation, shared)),
        }
    }

    /// Whether the code is 200.
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// let reply = client.send("/app/login", serde_json::json!({"user": "ann"})).await?;
    /// if !reply.is_ok() {
    ///     eprintln!("login refused: {} {:?}", reply.code, reply.err_msg);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn is_ok(&self) -> bool {
        self.code == qio_ipc::code::OK
    }

    /// Answers the server's callback request carried by this reply (fire-and-forget); takes
    /// the handle, so a second call fails with [`Error::NoHandle`].
    ///
    /// ```no_run
    /// # async fn demo(mut reply: qio_client::Reply) -> Result<(), qio_client::Error> {
    /// reply.answer(serde_json::json!({"ack": true})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn answer(&mut self, data: impl Into<Value>) -> Result<(), Error> {
        self.handle
            .take()
            .ok_or(Error::NoHandle)?
            .answer(data)
            .await
    }

    /// Answers the server's callback request and waits for the server's answer to that
    /// (which may carry a handle again: chains go on as long as the server asks).
    ///
    /// ```no_run
    /// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
    /// let mut reply = client.send("/clienttest/echo", 1).await?;
    /// let next = reply.answer_and_wait(2).await?;
    /// assert_eq!(next.data, 2);
    /// # Ok(()) }
    /// ```
    pub async fn answer_and_wait(&mut self, data: impl Into<Value>) -> Result<Reply, Error> {
        self.handle
            .take()
            .ok_or(Error::NoHandle)?
            .answer_and_wait(data)
            .await
    }
}

/// The right to answer one callback request of the server, once.
///
/// A handle is only valid on the daemon connection it came on: after the daemon went away
/// answering fails with [`Error::Disconnected`]; after the daemon's upstream connection was
/// lost, the daemon answers -1.
///
/// ```no_run
/// # async fn demo(client: qio_client::Client) -> Result<(), qio_client::Error> {
/// let reply = client.send("/clienttest/echo", "hi").await?;
/// if let Some(handle) = reply.handle {
///     println!("answering {}", handle.id());
///     handle.answer("thanks").await?;
/// }
/// # Ok(()) }
/// ```
pub struct Handle {
    cb: String,
    generation: u64,
    shared: Arc<Shared>,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Handle").field(&self.cb).finish()
    }
}

impl Handle {
    fn new(cb: String, generation: u64, shared: &Arc<Shared>) -> Handle {
        Handle {
            cb,
            generation,
            shared: shared.clone(),
        }
    }

    /// The handle as the daemon wrote it (`"<connection>.<id>"`), for logs.
    ///
    /// ```no_run
    /// # fn demo(h: &qio_client::Handle) {
    /// println!("server request {}", h.id());
    /// # }
    /// ```
    pub fn id(&self) -> &str {
        &self.cb
    }

    fn outgoing(&self, data: Value) -> Outgoing {
        Outgoing {
            op: Op::Callback,
            path: None,
            data: Some(data),
            cb: Some((self.cb.clone(), self.generation)),
        }
    }

    /// Answers without waiting for anything back. `Ok` means the line is written to the
    /// daemon's socket; a failure the daemon finds later (the handle is stale, ...) is
    /// reported on [`Client::events`](crate::Client::events) as an `Error` event.
    ///
    /// ```no_run
    /// # async fn demo(h: qio_client::Handle) -> Result<(), qio_client::Error> {
    /// h.answer(serde_json::json!({"ok": true})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn answer(self, data: impl Into<Value>) -> Result<(), Error> {
        let msg = self.outgoing(data.into());
        self.shared.call(|done| Cmd::Forget { msg, done }).await
    }

    /// Answers and waits for the server's answer to that, as [`Client::send`](crate::Client::send) does.
    ///
    /// ```no_run
    /// # async fn demo(h: qio_client::Handle) -> Result<(), qio_client::Error> {
    /// let reply = h.answer_and_wait("more?").await?;
    /// println!("{}", reply.code);
    /// # Ok(()) }
    /// ```
    pub async fn answer_and_wait(self, data: impl Into<Value>) -> Result<Reply, Error> {
        let msg = self.outgoing(data.into());
        let raw = self
            .shared
            .call(|reply| Cmd::Request { msg, reply })
            .await?;
        Ok(Reply::from_raw(raw, &self.shared))
    }
}

/// What happened to the connections: the daemon's upstream one and this client's own.
///
/// Read them with [`Client::events`](crate::Client::events).
///
/// ```
/// use qio_client::ConnectionEvent;
/// let ev = ConnectionEvent::Lost { count: 3, path: None };
/// assert!(matches!(ev, ConnectionEvent::Lost { count: 3, .. }));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// The daemon's upstream connection to the Quick.IO server is open.
    Open,
    /// The daemon's upstream connection is closed (it reconnects on its own).
    Close {
        /// Why, as the daemon tells it.
        reason: String,
    },
    /// Something failed that no reply could report: a fire-and-forget send or answer the
    /// daemon refused, a subscription the server refused when it was restored after a
    /// reconnect (its [`Subscription`](crate::Subscription) streams end), a failure to
    /// connect upstream.
    Error {
        /// The op that failed (`"send"`, `"on"`, `"callback"`), when it was about a request.
        op: Option<String>,
        /// The path concerned, when there is one.
        path: Option<String>,
        /// The code, as a reply would carry it (see [`qio_ipc::code`]).
        code: i64,
        /// What went wrong.
        err_msg: String,
    },
    /// Events were dropped because they were not read fast enough.
    Lost {
        /// How many.
        count: u64,
        /// `None`: the daemon dropped them, because this client as a whole read too slowly.
        /// `Some(path)`: a [`Subscription`](crate::Subscription) on this path dropped its
        /// oldest events because the program did not read it fast enough.
        path: Option<String>,
    },
    /// The connection to the daemon is lost; calls fail with [`Error::Disconnected`] until
    /// it is back. The client reconnects with backoff (50 ms, doubling, at most 5 s).
    DaemonGone {
        /// Why.
        reason: String,
    },
    /// A reconnect found a socket or a daemon that is not trusted (see
    /// [`Error::Untrusted`](crate::Error::Untrusted)); nothing was sent to it and the
    /// client keeps trying, with backoff.
    Untrusted {
        /// What was found, and what was expected.
        reason: String,
    },
    /// The client is connected to a daemon again, after `after`; every live subscription
    /// was asked for again (confirmations that fail are reported as `Error` events).
    DaemonBack {
        /// How long the daemon was away.
        after: Duration,
        /// How many paths were subscribed again.
        resubscribed: usize,
    },
}
