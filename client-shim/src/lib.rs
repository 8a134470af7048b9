//! The Quick.IO client API, served by the `qiod` daemon.
//!
//! Instead of opening its own WebSocket, a program connects to the local `qiod`, which
//! keeps ONE upstream Quick.IO connection for every program on the machine. This crate
//! speaks the daemon's line-JSON protocol ([`qio_ipc`]) and offers the Quick.IO client
//! functions on tokio:
//!
//! | Quick.IO | here |
//! |---|---|
//! | constructor | [`Client::connect`], [`Client::builder`] |
//! | `on` | [`Client::on`], [`Client::on_with_data`]: a [`Subscription`] stream; dropping it unsubscribes |
//! | `one` | [`Client::one`]: a stream of at most one event |
//! | `off` | [`Client::off`] |
//! | `send` with a callback | [`Client::send`] → [`Reply`], whatever its code |
//! | `send` without one | [`Client::emit`] |
//! | answering the server's callbacks | [`Reply::answer`], [`Event::answer`], [`Handle`] |
//! | `/open`, `/close`, `/error` | [`Client::events`]: [`ConnectionEvent`]s, also `Lost`, `DaemonGone`, `DaemonBack` |
//!
//! ```no_run
//! use qio_client::Client;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), qio_client::Error> {
//!     let client = Client::connect().await?;
//!     let mut news = client.on("/news").await?;
//!     let reply = client.send("/app/hello", serde_json::json!({"me": "demo"})).await?;
//!     println!("hello answered {}: {}", reply.code, reply.data);
//!     while let Some(ev) = news.recv().await {
//!         println!("{}: {}", ev.path, ev.data);
//!     }
//!     Ok(())
//! }
//! ```
//!
//! # How calls end
//!
//! Every awaited call resolves exactly once:
//!
//! - with the answer that came back: `Ok(Reply)` for [`Client::send`] and
//!   [`Handle::answer_and_wait`] whatever the code, including the daemon's negative codes
//!   (-1: its upstream connection was lost; -2: the server did not answer within the
//!   daemon's timeout; -3: a bound was reached; see [`qio_ipc::code`]). Calls with no reply
//!   to return ([`Client::on`], [`Client::off`], [`Client::status`]) turn a non-200 code
//!   into [`Error::Server`];
//! - with `Err(`[`Error::Disconnected`]`)` as soon as the connection to the daemon is lost,
//!   or at once while it is down (nothing is queued here);
//! - with `Err(`[`Error::Timeout`]`)` after the builder's `request_timeout`, when one is set;
//! - with another [`Error`] for other local failures.
//!
//! # While the daemon cannot reach its server
//!
//! The daemon's upstream state is the first event on [`Client::events`] (`Close` with the
//! daemon's reason while it is not connected). Subscriptions are state: [`Client::on`]
//! resolves at once, the daemon makes the subscription when it connects and events
//! follow. [`Client::send`] is answered -1 at once while not connected; call
//! [`Client::wait_open`] first to wait for a connection the daemon is making (it fails
//! with [`Error::Upstream`] and the daemon's reason when the server is unreachable).
//!
//! # Is it really qiod?
//!
//! Before anything is sent, on the first connection and on every reconnect, the client
//! checks that the socket's folder could not have been set up by another user (no
//! symlink, owned by us, root or the daemon's user, not writable by group or others) and
//! that the process listening is ours: our uid, root, or the daemon user configured with
//! [`Builder::daemon_user`] or `QIOD_DAEMON_USER` (for clients of the system service).
//! Otherwise [`Builder::connect`] fails with [`Error::Untrusted`], naming what was found
//! and what was expected; a reconnect that finds an untrusted daemon reports
//! [`ConnectionEvent::Untrusted`] and keeps trying, sending it nothing.
//!
//! # When the daemon restarts
//!
//! The client notices at once (`DaemonGone` on [`Client::events`]), fails what was waiting,
//! and reconnects with backoff: 50 ms, doubling, at most 5 s. Once connected it reports
//! `DaemonBack` with the length of the gap, and subscribes again to every path that still
//! has a live [`Subscription`]: the program keeps its streams (events sent during the gap
//! are not recovered). A path the server now refuses ends its streams and is reported as
//! an `Error` event. Callback [`Handle`]s from before the gap can no longer be answered.
//!
//! # Bounds
//!
//! Commands wait in a mailbox of 256 to the connection task (callers wait for room); the
//! task takes new ones while less than 1 MiB of request lines waits to be written, and it
//! keeps reading the daemon's lines while it writes, so a daemon that pushes back (it stops
//! reading a client that leaves replies unread) slows the callers and never blocks. Each
//! [`Subscription`] buffers [`DEFAULT_SUBSCRIPTION_BUFFER`] events (see
//! [`Builder::subscription_buffer`]); when the program reads slower than they come, the
//! oldest are dropped, counted ([`Subscription::lost`]) and reported (`Lost` with the path).
//! Each [`ConnectionEvents`] stream buffers 256 connection events.
//!
//! # Design
//!
//! One background task per client owns the socket (reader and writer); the handles send
//! it commands with a oneshot for the answer. Request ids are assigned by the client,
//! counting up from 1. Subscriptions are kept per cleaned path ([`clean_path`]): one daemon
//! subscription per path, however many [`Subscription`]s share it.
#![deny(missing_docs)]

mod actor;
mod autostart;
mod client;
mod connect;
mod error;
mod queue;
mod shared;
mod stream;
mod types;

pub use client::{Builder, Client, DEFAULT_SUBSCRIPTION_BUFFER};
pub use error::Error;
pub use qio_ipc::clean_path;
pub use qio_ipc::code;
/// The connection [`Builder::connect_raw`] hands over: interprocess's tokio local-socket
/// stream (a Unix socket here). `qio_platform::local::split` splits it into halves whose
/// `shutdown` half-closes.
pub use qio_platform::local::Stream as LocalStream;
pub use stream::{ConnectionEvents, Subscription};
pub use types::{ConnectionEvent, Event, Handle, Reply};

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_can_move_between_tasks() {
        send_sync::<crate::Client>();
        send_sync::<crate::Subscription>();
        send_sync::<crate::ConnectionEvents>();
        send_sync::<crate::Event>();
        send_sync::<crate::Reply>();
        send_sync::<crate::Handle>();
        send_sync::<crate::Error>();
    }
}
