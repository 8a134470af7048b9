//! The local failures of a call.

use std::path::PathBuf;
use std::time::Duration;

/// Why a call failed on this side of the socket.
///
/// Answers that came back from the daemon or the Quick.IO server are not errors for
/// [`Client::send`](crate::Client::send) and [`Handle::answer_and_wait`](crate::Handle::answer_and_wait):
/// those return `Ok(Reply)` whatever the code (see [`Reply::code`](crate::Reply::code)).
/// Calls that have no reply value to give ([`Client::on`](crate::Client::on),
/// [`Client::off`](crate::Client::off), [`Client::status`](crate::Client::status)) turn a
/// non-200 answer into [`Error::Server`].
///
/// ```
/// use qio_client::Error;
/// let e = Error::Timeout { after: std::time::Duration::from_secs(1) };
/// assert_eq!(e.to_string(), "no answer within 1s (request_timeout)");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Nothing listens on the socket (no socket file, or one left by a daemon that died)
    /// and auto-start is off.
    #[error("qiod is not running on {}: start it with `qiod --server ws://host:port/` or enable auto_start", socket.display())]
    DaemonNotRunning {
        /// The socket that was tried.
        socket: PathBuf,
    },
    /// The socket is there but connecting failed for another reason (permissions, ...).
    #[error("cannot connect to qiod on {}: {source}", socket.display())]
    Connect {
        /// The socket that was tried.
        socket: PathBuf,
        /// The system's answer.
        #[source]
        source: std::io::Error,
    },
    /// The socket's folder, or the process listening on the socket, is not trusted: it
    /// could be another user's stand-in for qiod. Nothing was sent to it, and no other
    /// socket was tried instead.
    #[error("refusing to use qiod on {}: {problem}", socket.display())]
    Untrusted {
        /// The socket that was tried.
        socket: PathBuf,
        /// What was found, and what was expected.
        #[source]
        problem: Box<qio_platform::trust::TrustError>,
    },
    /// Auto-start was on, but no daemon could be started.
    #[error("cannot start qiod: {reason}")]
    AutoStart {
        /// What went wrong, with the daemon's last log line when it said something.
        reason: String,
    },
    /// The connection to the daemon was lost before the answer arrived, or was down when
    /// the call was made. The client reconnects on its own; the call may be retried.
    #[error("disconnected from qiod before an answer arrived (the client reconnects on its own)")]
    Disconnected,
    /// No answer within the builder's `request_timeout`.
    #[error("no answer within {after:?} (request_timeout)")]
    Timeout {
        /// The timeout that passed.
        after: Duration,
    },
    /// The daemon or the server answered a code other than 200 to a call that has no
    /// [`Reply`](crate::Reply) to return it in; the codes are those of [`qio_ipc::code`].
    #[error("refused with code {code}: {err_msg}")]
    Server {
        /// The code (see [`qio_ipc::code`]).
        code: i64,
        /// The explanation given with it.
        err_msg: String,
    },
    /// [`Client::off`](crate::Client::off) was called for the path while this
    /// subscription was still waiting for its confirmation.
    #[error("off({path}) ended the subscription before it was confirmed")]
    Unsubscribed {
        /// The path.
        path: String,
    },
    /// There is no callback handle to answer with: the sender did not ask for an answer,
    /// or it was answered already.
    #[error("no callback handle: the sender asked for no answer, or it was answered already")]
    NoHandle,
    /// The daemon sent something this client cannot read.
    #[error("qiod sent something unexpected: {0}")]
    Protocol(String),
    /// The daemon cannot reach its Quick.IO server (from [`Client::wait_open`](crate::Client::wait_open)):
    /// its last connection attempt failed; it keeps trying on its own.
    #[error("qiod cannot reach its server: {reason} (it keeps trying)")]
    Upstream {
        /// Why, as the daemon tells it.
        reason: String,
    },
    /// The client was closed with [`Client::close`](crate::Client::close).
    #[error("the client was closed")]
    Closed,
}
